#!/usr/bin/env python3
"""Commands in sandboxes, measured (issue 15): `bench/run exec [--smoke]`.

In one run, interleaved round by round so the machine's drift cancels in the ratios:
  - spawn `true` from a process (sandgate-loadgen's `spawn`): the floor;
  - `POST /sandboxes/{id}/exec {"command":"true"}` round trip, on the process backend;
  - the same through seed 004's socket (`/ws/{id}`);
  - time to the first streamed byte (`Accept: application/x-ndjson`);
  - execs per second with 8 at once;
and, when a Docker engine answers, the same on the Docker backend beside `docker exec` of the
same container (what a Docker user has today).

Targets: the process backend's HTTP round trip within 3x the direct spawn; the Docker
backend's faster than `docker exec`. Standard library only; prints a markdown table and writes
JSON to bench/results/.
"""

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
IMAGE = "sandgate-bench-busybox:latest"


def log(msg):
    print(f"exec-bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port, method, path, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


class Gateway:
    """A `sandgate serve` on loopback, authentication off, with one idle shell sandbox."""

    def __init__(self, binary, args, tmp, name):
        self.port = free_port()
        self.dir = Path(tmp) / name
        self.log = open(Path(tmp) / f"{name}.log", "w")
        cmd = [str(binary), "serve", "--port", str(self.port), "--data-dir", str(self.dir),
               "--auth-enabled", "false", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                api(self.port, "GET", "/health", timeout=2)
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{name} did not start; see {self.log.name}")
                time.sleep(0.1)
        self.sandbox = api(self.port, "POST", "/sandboxes", {"runtime": "shell"})["id"]

    def stop(self):
        try:
            api(self.port, "DELETE", f"/sandboxes/{self.sandbox}")
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def loadgen(binary, cmd, port, **opts):
    argv = [str(binary), cmd, "--addr", f"127.0.0.1:{port}"]
    for k, v in opts.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def docker_available():
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def build_image(tmp):
    """A `FROM scratch` busybox image (no registry is needed)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    ctx = Path(tmp) / "image"
    (ctx / "bin").mkdir(parents=True)
    shutil.copy(busybox, ctx / "bin" / "busybox")
    (ctx / "Dockerfile").write_text(
        "FROM scratch\nCOPY bin/busybox /bin/busybox\n"
        'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        'CMD ["/bin/sh"]\n'
    )
    subprocess.run(["docker", "build", "-q", "-t", IMAGE, str(ctx)], check=True,
                   capture_output=True, timeout=300)


def docker_exec(container, seconds):
    """`docker exec CONTAINER true`, sequentially, for `seconds`: latencies in µs."""
    subprocess.run(["docker", "exec", container, "true"], check=True, capture_output=True)
    samples = []
    end = time.time() + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        subprocess.run(["docker", "exec", container, "true"], check=True, capture_output=True)
        samples.append((time.perf_counter() - t0) * 1e6)
    return {"p50_us": statistics.median(samples), "count": len(samples)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds, not a minute: 1 round, short runs")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; smoke 1)")
    p.add_argument("--seconds", type=float, help="seconds per measurement (default 3; smoke 0.5)")
    p.add_argument("--sandgate-bin", type=Path, default=ROOT / "target/release/sandgate")
    p.add_argument("--loadgen-bin", type=Path, default=ROOT / "target/bench-loadgen/release/sandgate-loadgen")
    p.add_argument("--no-docker", action="store_true", help="skip the Docker backend")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    rounds = a.rounds or (1 if a.smoke else 3)
    secs = a.seconds or (0.5 if a.smoke else 3.0)
    tmp = tempfile.mkdtemp(prefix="sandgate-exec-bench-")
    gateways = {}
    results = {}
    try:
        gateways["process"] = Gateway(a.sandgate_bin, [], tmp, "process")
        docker = not a.no_docker and docker_available()
        if docker:
            build_image(tmp)
            gateways["docker"] = Gateway(
                a.sandgate_bin,
                ["--backend", "docker", "--config", str(write_docker_config(tmp))],
                tmp, "docker")
        else:
            log("no Docker engine: the Docker rows are left out")

        def record(name, value):
            results.setdefault(name, []).append(value)

        lg = a.loadgen_bin
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}")
            record("spawn true (floor)", loadgen(lg, "spawn", 9, seconds=secs)["p50_us"])
            for name, gw in gateways.items():
                path = f"/sandboxes/{gw.sandbox}/exec"
                record(f"{name}: HTTP exec true",
                       loadgen(lg, "exec-http", gw.port, path=path, seconds=secs)["p50_us"])
                record(f"{name}: /ws exec true",
                       loadgen(lg, "exec-ws", gw.port, path=f"/ws/{gw.sandbox}", seconds=secs)["p50_us"])
                record(f"{name}: first streamed byte",
                       loadgen(lg, "exec-first-byte", gw.port, path=path,
                               count=10 if a.smoke else 50)["p50_us"])
                conc = loadgen(lg, "exec-http", gw.port, path=path, conns=8, seconds=secs)
                record(f"{name}: execs/s, 8 at once", conc["execs_per_s"])
                if name == "docker":
                    record("docker exec true (CLI)",
                           docker_exec(f"sandgate-{gw.sandbox}", secs)["p50_us"])
    finally:
        for gw in gateways.values():
            gw.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    floor = med["spawn true (floor)"]
    lines = [f"## sandgate exec benchmark{' (smoke)' if a.smoke else ''}: "
             f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {rounds} round(s), median of rounds\n",
             "| measurement | median | ratio |", "| --- | --- | --- |"]
    for k, v in med.items():
        if "execs/s" in k:
            lines.append(f"| {k} | {v:.0f} /s | |")
            continue
        ratio = f"{v / floor:.2f}x the spawn" if k != "spawn true (floor)" else ""
        if k.startswith("docker") and "docker exec true (CLI)" in med and k != "docker exec true (CLI)":
            ratio += f"; {v / med['docker exec true (CLI)']:.2f}x docker exec"
        lines.append(f"| {k} | {v / 1000:.2f} ms | {ratio} |")
    checks = []
    if "process: HTTP exec true" in med:
        ok = med["process: HTTP exec true"] <= 3 * floor
        checks.append(f"process HTTP exec within 3x the spawn: {'met' if ok else 'NOT met'}")
    if "docker: HTTP exec true" in med and "docker exec true (CLI)" in med:
        ok = med["docker: HTTP exec true"] < med["docker exec true (CLI)"]
        checks.append(f"Docker HTTP exec faster than docker exec: {'met' if ok else 'NOT met'}")
    lines += ["", *[f"- {c}" for c in checks]]
    print("\n".join(lines))
    out = a.out or BENCH / "results" / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-exec" + ("-smoke" if a.smoke else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": results, "median": med, "checks": checks}, indent=2))
    return 0


def write_docker_config(tmp):
    cfg = Path(tmp) / "docker.toml"
    cfg.write_text(f'[runtimes.shell]\nimage = "{IMAGE}"\n')
    return cfg


if __name__ == "__main__":
    sys.exit(main())
