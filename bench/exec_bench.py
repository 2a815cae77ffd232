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

Also, per backend (issue 17's warm pools): create to the first proxied byte and create to
the first exec's answer, from a runtime with a warm pool (`web`, `warm = 2`) and from the
same runtime without one (`cold`), beside a plain proxied request and a plain exec.

Targets: the process backend's HTTP round trip within 3x the direct spawn; the Docker
backend's faster than `docker exec`; from a warm pool, create to first byte within a few
milliseconds of a plain request and create to first exec within 2x a plain exec. Standard library only; prints a markdown table and writes
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


# The runtimes the create measurements use: one dev server (busybox httpd serving "ok"),
# pooled and not. The same command runs on both backends (the Docker image is busybox).
SERVER = 'echo ok > index.html && exec busybox httpd -f -p "${HOST:-127.0.0.1}:$PORT"'


def runtimes_toml(image=None):
    out = []
    for name, warm in (("web", 2), ("cold", 0)):
        out.append(f"[runtimes.{name}]")
        out.append('program = "busybox"')
        out.append(f"command = {json.dumps(SERVER)}")
        if image:
            out.append(f'image = "{image}"')
        if warm:
            out.append(f"warm = {warm}")
    return "\n".join(out) + "\n"


def raw_get(port, path, timeout=30):
    """GET over a new connection: the answer's status (its body read)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def pool_ready(port, runtime):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    series = f'sandgate_warm_pool_sandboxes{{runtime="{runtime}",state="ready"}} '
    for line in text.splitlines():
        if line.startswith(series):
            return float(line[len(series):])
    return 0.0


def create_latencies(gw, runtime, count, then):
    """`count` creates of `runtime`, each followed by `then` (`byte`: GET its dev server
    until a 200; `exec`: run `true`), timed from the create's request to that answer;
    median in µs. With a pool, each create waits (untimed) until one is waiting."""
    samples = []
    for _ in range(count):
        if runtime == "web":
            deadline = time.time() + 60
            while pool_ready(gw.port, runtime) < 1:
                if time.time() > deadline:
                    raise RuntimeError("the warm pool did not refill within 60 s")
                time.sleep(0.01)
        t0 = time.perf_counter()
        sb = api(gw.port, "POST", "/sandboxes", {"runtime": runtime})["id"]
        if then == "byte":
            while raw_get(gw.port, f"/sandbox/{sb}/") != 200:
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError(f"sandbox {sb} never answered 200")
        else:
            api(gw.port, "POST", f"/sandboxes/{sb}/exec", {"command": "true"})
        samples.append((time.perf_counter() - t0) * 1e6)
        api(gw.port, "DELETE", f"/sandboxes/{sb}")
    return statistics.median(samples)


def plain_latencies(gw, count):
    """A plain proxied GET and a plain exec on a running `web` sandbox, each over a new
    connection as the create measurements' are: medians in µs."""
    sb = api(gw.port, "POST", "/sandboxes", {"runtime": "cold"})["id"]
    deadline = time.time() + 60
    while raw_get(gw.port, f"/sandbox/{sb}/") != 200:
        if time.time() > deadline:
            raise RuntimeError(f"sandbox {sb} never answered 200")
    gets, execs = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        raw_get(gw.port, f"/sandbox/{sb}/")
        gets.append((time.perf_counter() - t0) * 1e6)
        t0 = time.perf_counter()
        api(gw.port, "POST", f"/sandboxes/{sb}/exec", {"command": "true"})
        execs.append((time.perf_counter() - t0) * 1e6)
    api(gw.port, "DELETE", f"/sandboxes/{sb}")
    return statistics.median(gets), statistics.median(execs)


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
        process_config = Path(tmp) / "process.toml"
        process_config.write_text(runtimes_toml())
        gateways["process"] = Gateway(a.sandgate_bin, ["--config", str(process_config)], tmp,
                                      "process")
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
                n = 3 if a.smoke else 15
                get, ex = plain_latencies(gw, n)
                record(f"{name}: plain request (new connection)", get)
                record(f"{name}: plain exec (new connection)", ex)
                for runtime, label in (("web", "warm pool"), ("cold", "no pool")):
                    record(f"{name}: create to first byte, {label}",
                           create_latencies(gw, runtime, n, "byte"))
                    record(f"{name}: create to first exec, {label}",
                           create_latencies(gw, runtime, n, "exec"))
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
        if "create" in k or "plain" in k:
            lines.append(f"| {k} | {v / 1000:.2f} ms | |")
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
    for name in ("process", "docker"):
        get = med.get(f"{name}: plain request (new connection)")
        ex = med.get(f"{name}: plain exec (new connection)")
        byte = med.get(f"{name}: create to first byte, warm pool")
        first_exec = med.get(f"{name}: create to first exec, warm pool")
        if None in (get, ex, byte, first_exec):
            continue
        checks.append(f"{name}: warm create to first byte {(byte - get) / 1000:.1f} ms over a "
                      f"plain request ({byte / get:.1f}x)")
        ok = first_exec <= 2 * ex
        checks.append(f"{name}: warm create to first exec within 2x a plain exec "
                      f"({first_exec / ex:.2f}x): {'met' if ok else 'NOT met'}")
    lines += ["", *[f"- {c}" for c in checks]]
    print("\n".join(lines))
    out = a.out or BENCH / "results" / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-exec" + ("-smoke" if a.smoke else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": results, "median": med, "checks": checks}, indent=2))
    return 0


def write_docker_config(tmp):
    cfg = Path(tmp) / "docker.toml"
    cfg.write_text(f'[runtimes.shell]\nimage = "{IMAGE}"\n' + runtimes_toml(IMAGE))
    return cfg


if __name__ == "__main__":
    sys.exit(main())
