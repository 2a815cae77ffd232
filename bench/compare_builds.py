#!/usr/bin/env python3
"""Before/after keep-alive comparison of sandgate builds: runs bench.py's `get-1k-keepalive`
once per variant per round, interleaved (A, B, C, A, B, C, ...), each run measuring that build
beside direct access and nginx, and prints each variant's medians raw and as x nginx of the
same run (which cancels the machine's drift between runs).

    bench/compare_builds.py --rounds 3 \
        before=/tmp/sandgate-before \
        after-fast=target/release/sandgate:--fast-lane=on \
        after-hyper=target/release/sandgate:--fast-lane=off

A variant is NAME=BINARY[:ARG,ARG...] (arguments for `sandgate serve`). The fixture and load
client are the ones `bench/run` builds (run it once first, or pass --fixture-bin)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME=BINARY[:ARG,ARG...]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--fixture-bin", default=str(ROOT / "target/release/sandgate-fixture"))
    p.add_argument("--loadgen-bin", default=str(ROOT / "target/bench-loadgen/release/sandgate-loadgen"))
    p.add_argument("--out-dir", default=str(BENCH / "results" / "compare"))
    a = p.parse_args()
    variants = []
    for v in a.variants:
        name, _, rest = v.partition("=")
        binary, _, args = rest.partition(":")
        extra = [f"--sandgate-arg={x}" for x in args.split(",") if x]
        variants.append((name, binary, extra))
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SANDGATE_BENCH_NO_BUILD="1")
    res = {name: [] for name, _, _ in variants}
    for r in range(a.rounds):
        for name, binary, extra in variants:
            out = f"{a.out_dir}/{name}-{r}.json"
            cmd = [sys.executable, str(BENCH / "bench.py"), "--scenarios", "get-1k-keepalive",
                   "--targets", "direct,sandgate-path,nginx", "--rounds", "1",
                   "--duration", str(a.duration), "--sandgate-bin", binary,
                   "--fixture-bin", a.fixture_bin, "--loadgen-bin", a.loadgen_bin,
                   "--out", out] + extra
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{name} round {r} failed:\n{run.stderr[-2000:]}", file=sys.stderr)
                return 1
            d = json.loads(Path(out).read_text())["results"]["get-1k-keepalive"]
            sg, ng = d["sandgate-path"]["rounds"][0], d["nginx"]["rounds"][0]
            row = dict(rps=sg["rps"], cpu=sg["cpu_us_per_req"], rps_x=sg["rps"] / ng["rps"],
                       cpu_x=sg["cpu_us_per_req"] / ng["cpu_us_per_req"], up=sg["cpu_vs_upstream"])
            res[name].append(row)
            print(f"{name:12} round {r}: rps {row['rps']:,.0f} ({row['rps_x']:.3f}x nginx), "
                  f"cpu {row['cpu']:.2f} us/req ({row['cpu_x']:.3f}x nginx), "
                  f"cpu/upstream {row['up']:.3f}", flush=True)
    print()
    for name, rows in res.items():
        med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731
        print(f"{name:12} median: rps {med('rps'):,.0f} ({med('rps_x'):.3f}x nginx), "
              f"cpu {med('cpu'):.2f} us/req ({med('cpu_x'):.3f}x nginx), "
              f"cpu/upstream {med('up'):.3f}  [{len(rows)} runs]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
