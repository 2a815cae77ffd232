#!/usr/bin/env python3
"""sandgate's benchmark harness: sandgate side by side with direct access, nginx and
configurable-http-proxy (JupyterHub's proxy), all in front of one fixed upstream.

Run it through `bench/run` (which installs the tools and builds the binaries first); see
bench/README.md for what is measured and how. Standard library only.

Every load run targets 127.0.0.1 and is bounded in time; every process this script starts is
stopped by its PID when it ends (sandboxes are deleted through the API first).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WRK_LUA = BENCH / "wrk-report.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"
MIB = 1024 * 1024
START = time.monotonic()

# Scenario names, in the order they run.
HTTP_SCENARIOS = ["get-1k-keepalive", "get-1k-close", "get-1m"]
SCENARIOS = HTTP_SCENARIOS + [
    "upload",
    "ws-echo-1",
    "ws-echo-16",
    "sse-first",
    "ws-idle",
    "route",
]
TARGETS = ["direct", "sandgate-path", "sandgate-key", "sandgate-host", "sandgate-quiet", "sandgate-netns",
           "sandgate-replicas", "nginx", "chp"]
# The owner key of every sandgate the harness starts (`SANDGATE_ADMIN_KEY`): its API calls carry
# it, and `sandgate-key` sends it on every proxied request. Builds without authentication
# ignore both.
BENCH_KEY = "sandgate-bench-owner-key-0123456789abcdef"
API_HEADERS = {"X-API-Key": BENCH_KEY}
# Measured in the HTTP scenarios only: targets that send headers of their own (the WebSocket and
# upload load client cannot), and the 2-instance sandbox (what it adds is per request).
HEADER_TARGETS = {"sandgate-key", "sandgate-replicas"}


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# /proc readers


def proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
    return s[s.rindex(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (fields 14 and 15 of /proc/PID/stat) of every process, all threads."""
    total = 0
    for pid in pids:
        f = proc_stat(pid)
        total += int(f[11]) + int(f[12])
    return total / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except FileNotFoundError:
            pass
    return total


def children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except FileNotFoundError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], children(pid)
    while todo:
        c = todo.pop()
        out.append(c)
        todo += children(c)
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


class RssSampler:
    """Samples the summed RSS of some processes every 50 ms while a load runs; keeps the peak."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.peak = rss_kib(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_kib(self.pids))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.pids))


# --------------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process {proc.pid} exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise BenchError(f"port {port} did not open within {timeout}s")


def http_request(port, method, path, body=None, headers=None, timeout=30.0):
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["content-type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    a = abs(x)
    if a >= 10000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def run_cmd(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{cmd[0]} did not finish within {timeout}s") from e


def tool_version(cmd) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        out = (p.stdout + p.stderr).strip().splitlines()
        return out[0].strip() if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "not found"


# --------------------------------------------------------------------------------------------
# targets


class Target:
    """One way of reaching the upstream: a port, a path prefix and maybe a Host header."""

    def __init__(self, name, port, prefix="", host=None, proxy_pids=None, upstream_pids=None, headers=()):
        self.name = name
        self.headers = list(headers)
        self.port = port
        self.prefix = prefix
        self.host = host
        self._proxy_pids = proxy_pids
        self._upstream_pids = upstream_pids

    def proxy_pids(self) -> list[int]:
        return self._proxy_pids()

    def upstream_pids(self, default: list[int]) -> list[int]:
        return self._upstream_pids() if self._upstream_pids else default

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{self.prefix}{path}"

    def loadgen_args(self, path: str) -> list[str]:
        args = ["--addr", f"{LOOPBACK}:{self.port}", "--path", self.prefix + path]
        if self.host:
            args += ["--host", self.host]
        return args


class Sandgate:
    """One running `sandgate serve` and the sandboxes this harness created in it."""

    def __init__(self, name: str, proc: subprocess.Popen, port: int, isolation: str | None):
        self.name = name
        self.proc = proc
        self.port = port
        self.isolation = isolation
        self.sandboxes: list[str] = []
        self.fixture_pid: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="sandgate-bench-"))
        self.procs: list[subprocess.Popen] = []  # everything we started, stopped at the end
        self.holders: list[subprocess.Popen] = []  # ws-idle clients still holding connections
        self.sg: Sandgate | None = None  # the main instance: shared-host isolation
        self.sg_ns: Sandgate | None = None  # optional: sandboxes in their own network namespaces
        self.sg_quiet: Sandgate | None = None  # optional: metrics and access log off
        self.fixture_pid = None
        self.targets: dict[str, Target] = {}
        self.results: dict = {}
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.idle_rss: dict[str, float] = {}

    # ---------------------------------------------------------------- processes

    def spawn(self, cmd, log_name, env=None, stdout=None) -> subprocess.Popen:
        logf = open(self.tmp / log_name, "wb")
        p = subprocess.Popen(
            cmd,
            stdout=stdout if stdout is not None else logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=self.child_setup,
        )
        self.procs.append(p)
        return p

    def child_setup(self) -> None:
        """Runs in each server before it starts. A process group of its own keeps a terminal's
        ^C from reaching the servers (our own signal handling stops them, in order), but the
        session stays ours: Linux's autogroup scheduler gives every session an equal share of
        the CPU, and a sandbox's processes stay in sandgate's session, so with a session per
        server sandgate and the fixture it proxies to would share one share while nginx and the
        same fixture had two (`Connection: close` showed sandgate 1.2x nginx's CPU per request
        that way, and 0.9x with every process in one session)."""
        os.setpgid(0, 0)
        self.pin_servers()

    def pin_servers(self) -> None:
        if self.args.pin == "split":
            os.sched_setaffinity(0, {self.args.server_cpu})

    def client_prefix(self) -> list[str]:
        if self.args.pin == "split":
            return ["taskset", "-c", str(self.args.client_cpu)]
        return []

    def sandgate_isolation_flag(self) -> bool:
        """Whether this sandgate build has `--isolation` (older builds always share the host)."""
        p = run_cmd([str(self.args.sandgate_bin), "serve", "--help"], timeout=30)
        return "--isolation" in p.stdout

    def start_sandgate(self, name: str, isolation: str | None, port_range: str,
                       extra: list[str] | None = None) -> Sandgate:
        data = self.tmp / f"{name}-data"
        env = {k: v for k, v in os.environ.items()
               if k not in ("PORT", "GATEWAY_PORT", "GATEWAY_HOST", "DATABASE_URL", "AUTH_ENABLED")
               and not k.startswith("SANDGATE_")}
        env["SANDGATE_ADMIN_KEY"] = BENCH_KEY
        cmd = [str(self.args.sandgate_bin), "serve", "--port", "0", "--data-dir", str(data),
               "--port-range", port_range]
        if isolation:
            cmd += ["--isolation", isolation]
        cmd += extra or []
        cmd += self.args.sandgate_arg
        p = self.spawn(cmd, f"{name}.log", env=env, stdout=subprocess.PIPE)
        line = b""
        deadline = time.monotonic() + 30
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or p.poll() is not None:
                raise BenchError(f"{name} did not print its port (exit {p.poll()}): {self.tail(name + '.log')}")
            r, _, _ = select.select([p.stdout], [], [], left)
            if r:
                ch = os.read(p.stdout.fileno(), 1)
                if not ch:
                    continue
                line += ch
        m = re.search(rb"listening on [\d.]+:(\d+)", line)
        if not m:
            raise BenchError(f"unexpected first line from {name}: {line!r}")
        sg = Sandgate(name, p, int(m.group(1)), isolation)
        # Keep draining its stdout so it can never block on a full pipe.
        threading.Thread(target=self._drain, args=(p.stdout, self.tmp / f"{name}.stdout"), daemon=True).start()
        log(f"{name} pid {p.pid} on port {sg.port}" + (f" (--isolation {isolation})" if isolation else ""))
        return sg

    @staticmethod
    def _drain(pipe, path) -> None:
        with open(path, "wb") as f:
            for chunk in iter(lambda: pipe.read1(65536), b""):
                f.write(chunk)

    def tail(self, name: str, n: int = 20) -> str:
        try:
            return "\n".join((self.tmp / name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def create_sandbox(self, sg: Sandgate, dev_server: bool, public: bool = False, replicas: int = 1) -> dict:
        body = {"runtime": "shell", "dev_server": dev_server}
        if replicas > 1:
            body["replicas"] = replicas
        if dev_server:
            body["command"] = f"exec {self.args.fixture_bin}"
        status, data = http_request(sg.port, "POST", "/sandboxes", body, headers=API_HEADERS)
        if status not in (200, 201):
            raise BenchError(f"{sg.name}: POST /sandboxes answered {status}: {data[:300]!r}")
        sb = json.loads(data)
        sg.sandboxes.append(sb["id"])
        if public:
            # Reached without a credential, as before authentication existed (builds without
            # `PATCH` answer 404/405 and need none).
            status, data = http_request(sg.port, "PATCH", f"/sandboxes/{sb['id']}", {"public": True},
                                        headers=API_HEADERS)
            if status not in (200, 404, 405):
                raise BenchError(f"{sg.name}: PATCH /sandboxes answered {status}: {data[:300]!r}")
        return sb

    def delete_sandboxes(self, sg: Sandgate) -> None:
        ids, sg.sandboxes = sg.sandboxes, []
        if not ids or sg.proc.poll() is not None:
            return
        log(f"deleting {len(ids)} sandbox(es) of {sg.name}")
        failed = []

        def delete(i):
            try:
                status, data = http_request(sg.port, "DELETE", f"/sandboxes/{i}", headers=API_HEADERS,
                                            timeout=60)
                if status not in (200, 202, 204, 404):
                    failed.append(f"{i}: {status} {data[:200]!r}")
            except OSError as e:
                failed.append(f"{i}: {e}")

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(delete, ids))
        if failed:
            self.failure(f"deleting sandboxes of {sg.name}: {len(failed)} failed, e.g. {failed[0]}")

    def start_fixture_sandbox(self, sg: Sandgate, public: bool = True) -> tuple[str, int]:
        """Creates a fixture sandbox (public: reached without a credential); returns its id and
        the port clients name it by. The first one's process is `sg.fixture_pid`."""
        t0 = time.monotonic()
        sb = self.create_sandbox(sg, dev_server=True, public=public)
        sid, port = sb["id"], sb.get("allocated_port") or sb.get("port")
        log(f"{sg.name}: sandbox {sid} created in {1000 * (time.monotonic() - t0):.0f} ms; "
            f"port {port}{'' if sb.get('allocated_port') else ' (inside its own network namespace)'}")
        # The fixture is one of sandgate's descendants (`sh -c 'exec sandgate-fixture'`,
        # maybe under `unshare`).
        deadline = time.monotonic() + 15
        while sg.fixture_pid is None:
            for c in descendants(sg.pid):
                if comm(c).startswith("sandgate-fixtur"):
                    sg.fixture_pid = c
            if sg.fixture_pid is None:
                if time.monotonic() > deadline:
                    raise BenchError(f"{sg.name}: cannot find the fixture among sandgate's descendants")
                time.sleep(0.05)
        return sid, port

    def setup(self) -> None:
        a = self.args
        has_isolation = self.sandgate_isolation_flag()
        self.sg = self.start_sandgate("sandgate", "none" if has_isolation else None, a.port_range)
        sid, fport = self.start_fixture_sandbox(self.sg)
        wait_port(fport, 15)
        self.fixture_pid = self.sg.fixture_pid
        self.fport = fport
        fixture = lambda: [self.fixture_pid]  # noqa: E731
        sandgate = lambda: [self.sg.pid]  # noqa: E731
        self.targets["direct"] = Target("direct", fport, proxy_pids=fixture)
        self.targets["sandgate-path"] = Target("sandgate-path", self.sg.port, prefix=f"/sandbox/{sid}",
                                               proxy_pids=sandgate)
        if "sandgate-key" in a.targets:
            # A second fixture sandbox, not public: every request carries the API key and the
            # gateway verifies it (sandgate-path's sandbox needs no credential).
            kid, kport = self.start_fixture_sandbox(self.sg, public=False)
            wait_port(kport, 15)
            deadline = time.monotonic() + 15
            others: list[int] = []
            while not others:
                others = [c for c in descendants(self.sg.pid)
                          if comm(c).startswith("sandgate-fixtur") and c != self.fixture_pid]
                if not others and time.monotonic() > deadline:
                    raise BenchError("cannot find the second fixture among sandgate's descendants")
                time.sleep(0.05)
            key_fixture = others[0]
            self.targets["sandgate-key"] = Target("sandgate-key", self.sg.port, prefix=f"/sandbox/{kid}",
                                                  proxy_pids=sandgate, upstream_pids=lambda: [key_fixture],
                                                  headers=[f"X-API-Key: {BENCH_KEY}"])
        if "sandgate-replicas" in a.targets:
            # A public sandbox of two instances (issue 17: the load balancer's overhead with 2
            # replicas, against sandgate-path's one instance on the same gateway), path route.
            known = {c for c in descendants(self.sg.pid) if comm(c).startswith("sandgate-fixtur")}
            try:
                rsb = self.create_sandbox(self.sg, dev_server=True, public=True, replicas=2)
            except BenchError as e:
                self.notes.append(f"sandgate-replicas skipped (a build without replicas?): {e}")
                a.targets.remove("sandgate-replicas")
            else:
                deadline = time.monotonic() + 15
                fixtures: list[int] = []
                while len(fixtures) < 2:
                    fixtures = [c for c in descendants(self.sg.pid)
                                if comm(c).startswith("sandgate-fixtur") and c not in known]
                    if len(fixtures) < 2 and time.monotonic() > deadline:
                        raise BenchError("cannot find both instances' fixtures among sandgate's descendants")
                    time.sleep(0.05)
                self.targets["sandgate-replicas"] = Target(
                    "sandgate-replicas", self.sg.port, prefix=f"/sandbox/{rsb['id']}",
                    proxy_pids=sandgate, upstream_pids=lambda: fixtures)
        self.targets["sandgate-host"] = Target("sandgate-host", self.sg.port,
                                               host=f"{fport}-{sid}.localhost:{self.sg.port}",
                                               proxy_pids=sandgate)
        if "sandgate-quiet" in a.targets:
            # The same build with metrics and the access log off (issue 17: on vs off, CPU per
            # keep-alive request within 3%), its own fixture sandbox, path route.
            help_text = run_cmd([str(a.sandgate_bin), "serve", "--help"], timeout=30).stdout
            if "--access-log" not in help_text:
                self.notes.append("sandgate-quiet skipped: this sandgate build has no --access-log.")
                a.targets.remove("sandgate-quiet")
            else:
                self.sg_quiet = self.start_sandgate(
                    "sandgate-quiet", "none" if has_isolation else None, a.quiet_port_range,
                    ["--metrics", "off", "--access-log", "off"])
                qid, qport = self.start_fixture_sandbox(self.sg_quiet)
                wait_port(qport, 15)
                q = self.sg_quiet
                self.targets["sandgate-quiet"] = Target(
                    "sandgate-quiet", q.port, prefix=f"/sandbox/{qid}",
                    proxy_pids=lambda: [q.pid], upstream_pids=lambda: [q.fixture_pid])
        if "sandgate-netns" in a.targets:
            if not has_isolation:
                self.notes.append("sandgate-netns skipped: this sandgate build has no --isolation.")
                a.targets.remove("sandgate-netns")
            else:
                try:
                    self.sg_ns = self.start_sandgate("sandgate-netns", "netns", a.netns_port_range)
                    nsid, nport = self.start_fixture_sandbox(self.sg_ns)
                    ns = self.sg_ns
                    self.targets["sandgate-netns"] = Target(
                        "sandgate-netns", ns.port, prefix=f"/sandbox/{nsid}",
                        proxy_pids=lambda: [ns.pid], upstream_pids=lambda: [ns.fixture_pid])
                except BenchError as e:
                    self.notes.append(f"sandgate-netns skipped: {e}")
                    a.targets.remove("sandgate-netns")
        self.start_nginx(fport)
        self.start_chp(fport)
        # Every target must answer before anything is measured.
        for name in self.active_targets():
            self.check_target(self.targets[name])
        time.sleep(0.3)
        for name in self.active_targets():
            t = self.targets[name]
            samples = []
            for _ in range(3):
                samples.append(rss_kib(t.proxy_pids()) / 1024)
                time.sleep(0.1)
            self.idle_rss[name] = median(samples)
        log("idle RSS (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in self.idle_rss.items()))

    def check_target(self, t: Target) -> None:
        headers = {"Host": t.host} if t.host else {}
        headers.update(h.split(": ", 1) for h in t.headers)
        last = None
        for _ in range(50):
            try:
                status, data = http_request(t.port, "GET", t.prefix + "/1k", headers=headers, timeout=5)
                if status == 200 and len(data) == 1024:
                    return
                last = f"{status} {data[:200]!r}"
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise BenchError(f"{t.name}: GET /1k does not work: {last}")

    def start_nginx(self, fport: int) -> None:
        if "nginx" not in self.args.targets:
            return
        prefix = self.tmp / "nginx"
        prefix.mkdir()
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / d).mkdir()
            os.chmod(prefix / d, 0o777)
        port = free_port()
        conf = NGINX_CONF.format(prefix=prefix, port=port, upstream=fport,
                                 user="user root;" if os.geteuid() == 0 else "")
        (prefix / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        p = self.spawn([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
                       "nginx.log")
        wait_port(port, 15, p)
        master = p.pid
        self.targets["nginx"] = Target("nginx", port, proxy_pids=lambda: [master] + children(master))
        log(f"nginx pid {master} (workers {children(master)}) on port {port}")

    def start_chp(self, fport: int) -> None:
        if "chp" not in self.args.targets:
            return
        port, api = free_port(), free_port()
        chp = shutil.which("configurable-http-proxy")
        if chp is None:
            raise BenchError("configurable-http-proxy is not installed (bench/run installs it)")
        env = dict(os.environ, CONFIGPROXY_AUTH_TOKEN=os.urandom(16).hex())
        # The script's shebang is `env node`, which execs: the PID is node's.
        p = self.spawn([chp, "--ip", LOOPBACK, "--port", str(port), "--api-ip", LOOPBACK, "--api-port", str(api),
                        "--default-target", f"http://{LOOPBACK}:{fport}", "--log-level", "warn"],
                       "chp.log", env=env)
        wait_port(port, 30, p)
        self.targets["chp"] = Target("chp", port, proxy_pids=lambda: [p.pid])
        log(f"configurable-http-proxy pid {p.pid} on port {port}")

    def active_targets(self) -> list[str]:
        return [t for t in TARGETS if t in self.targets and t in self.args.targets]

    def stop_all(self) -> None:
        for h in self.holders:
            if h.poll() is None:
                h.kill()
                h.wait()
        for sg in (self.sg, self.sg_ns, self.sg_quiet):
            if sg is None:
                continue
            try:
                self.delete_sandboxes(sg)
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                self.failure(f"deleting sandboxes of {sg.name}: {e}")
        for p in reversed(self.procs):
            if p.poll() is not None:
                continue
            sig = signal.SIGQUIT if p.args[0].endswith("nginx") else signal.SIGTERM
            try:
                p.send_signal(sig)
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                log(f"pid {p.pid} ({p.args[0]}) ignored {sig.name}; killing it")
                p.kill()
                p.wait()
        for sg in (self.sg, self.sg_ns, self.sg_quiet):
            if sg is not None and sg.proc.returncode not in (0, None):
                self.failure(f"{sg.name} exited with status {sg.proc.returncode}: {self.tail(sg.name + '.log')}")
        if self.args.keep_tmp:
            log(f"logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def failure(self, msg: str) -> None:
        log("FAILED: " + msg)
        self.failures.append(msg)

    # ---------------------------------------------------------------- measuring

    def upstream_pids(self) -> list[int]:
        return [self.fixture_pid]

    def measured(self, target: Target, fn):
        """Runs fn() while recording the proxy's and the upstream's CPU time and peak RSS."""
        proxy, upstream = target.proxy_pids(), target.upstream_pids(self.upstream_pids())
        c0, u0 = cpu_seconds(proxy), cpu_seconds(upstream)
        with RssSampler(proxy) as rss:
            out = fn()
        c1, u1 = cpu_seconds(proxy), cpu_seconds(upstream)
        return out, c1 - c0, u1 - u0, rss.peak / 1024

    def wrk(self, target: Target, path: str, conns: int, seconds: int, headers=()) -> dict:
        cmd = self.client_prefix() + ["wrk", f"-t{self.args.wrk_threads}", f"-c{conns}", f"-d{seconds}s",
                                      "--timeout", "5s", "-s", str(WRK_LUA)]
        for h in list(headers) + target.headers:
            cmd += ["-H", h]
        if target.host:
            cmd += ["-H", f"Host: {target.host}"]
        cmd.append(target.url(path))

        def go():
            p = run_cmd(cmd, timeout=seconds + 30)
            m = re.search(r"WRK_JSON (\{.*\})", p.stdout)
            if p.returncode != 0 or not m:
                raise BenchError(f"wrk failed ({p.returncode}): {p.stdout[-500:]} {p.stderr[-500:]}")
            return json.loads(m.group(1))

        w, cpu, ucpu, rss = self.measured(target, go)
        n = w["requests"]
        errors = sum(w["errors"].values())
        if n == 0:
            raise BenchError(f"wrk completed no request: {w}")
        if w["errors"]["status"] or w["errors"]["timeout"] or w["errors"]["connect"] or errors > 0.01 * n:
            raise BenchError(f"wrk saw errors: {w['errors']} in {n} requests")
        return {
            "rps": n / (w["duration_us"] / 1e6),
            "p50_ms": w["latency_us"]["p50"] / 1000,
            "p99_ms": w["latency_us"]["p99"] / 1000,
            "cpu_us_per_req": 1e6 * cpu / n,
            "cpu_vs_upstream": cpu / ucpu if ucpu > 0 else None,
            "rss_load_mib": rss,
            "requests": n,
            "socket_errors": errors,
        }

    def loadgen(self, target: Target, sub: str, path: str, extra: list[str], timeout: float) -> dict:
        cmd = self.client_prefix() + [str(self.args.loadgen_bin), sub] + target.loadgen_args(path) + extra
        p = run_cmd(cmd, timeout=timeout)
        if p.returncode != 0:
            raise BenchError(f"sandgate-loadgen {sub} failed: {p.stderr.strip()[-600:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    def run_scenario_once(self, scenario: str, target: Target) -> dict:
        a = self.args
        if scenario == "get-1k-keepalive":
            return self.wrk(target, "/1k", 64, a.duration)
        if scenario == "get-1k-close":
            return self.wrk(target, "/1k", 64, a.duration, headers=["Connection: close"])
        if scenario == "get-1m":
            r = self.wrk(target, f"/bytes/{MIB}", a.big_conns, a.duration)
            r["mib_per_s"] = r["rps"]
            return r
        if scenario == "upload":
            def go():
                return self.loadgen(target, "upload", "/upload", ["--bytes", str(a.upload_mib * MIB)], timeout=120)
            out, cpu, ucpu, rss = self.measured(target, go)
            return {
                "mib_per_s": out["mib_per_s"],
                "seconds": out["median_seconds"],
                "cpu_us_per_mib": 1e6 * cpu / a.upload_mib,
                "cpu_vs_upstream": cpu / ucpu if ucpu > 0 else None,
                "rss_load_mib": rss,
            }
        if scenario.startswith("ws-echo-"):
            conns = int(scenario.rsplit("-", 1)[1])

            def go():
                return self.loadgen(target, "ws-echo", "/ws",
                                    ["--conns", str(conns), "--seconds", str(a.ws_seconds), "--warmup", str(a.ws_warmup)],
                                    timeout=a.ws_seconds + a.ws_warmup + 30)
            out, cpu, ucpu, rss = self.measured(target, go)
            if out["errors"]:
                raise BenchError(f"{out['errors']} of {conns} WebSocket connections failed")
            return {
                "rt_per_s": out["round_trips_per_s"],
                "p50_us": out["p50_us"],
                "p99_us": out["p99_us"],
                "cpu_us_per_rt": 1e6 * cpu / max(out["total_round_trips"], 1),
                "cpu_vs_upstream": cpu / ucpu if ucpu > 0 else None,
            }
        if scenario == "sse-first":
            def go():
                return self.loadgen(target, "sse-first", "/sse-hold", ["--count", str(a.sse_count), "--max-seconds", "60"],
                                    timeout=90)
            out, cpu, ucpu, rss = self.measured(target, go)
            return {
                "p50_us": out["p50_us"],
                "p99_us": out["p99_us"],
                "cpu_us_per_req": 1e6 * cpu / max(out["samples"], 1),
            }
        raise BenchError(f"unknown scenario {scenario}")

    def record(self, scenario: str, target: str, rnd: int, figures: dict) -> None:
        self.results.setdefault(scenario, {}).setdefault(target, {}).setdefault("rounds", [None] * self.rounds_for(scenario))
        self.results[scenario][target]["rounds"][rnd] = figures

    def rounds_for(self, scenario: str) -> int:
        return self.args.rounds

    def run_interleaved(self, scenario: str, targets: list[str], rounds: int, key: str | None = None) -> None:
        key = key or scenario
        warm = self.args.warmup
        for r in range(rounds):
            order = targets[r % len(targets):] + targets[: r % len(targets)]
            for name in order:
                t = self.targets[name]
                try:
                    if r == 0 and warm and scenario in HTTP_SCENARIOS:
                        # Fills pools and caches; not recorded.
                        self.wrk(t, "/1k" if scenario != "get-1m" else f"/bytes/{MIB}", 64 if scenario != "get-1m" else self.args.big_conns, warm,
                                 headers=["Connection: close"] if scenario == "get-1k-close" else [])
                    fig = self.run_scenario_once(scenario, t)
                    self.record(key, name, r, fig)
                    log(f"{key} round {r + 1}/{rounds} {name}: " + ", ".join(
                        f"{k}={fmt(v)}" for k, v in fig.items() if k in SHOWN))
                except BenchError as e:
                    self.failure(f"{key} / {name} / round {r + 1}: {e}")
                self.check_alive()

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise BenchError(f"{p.args[0]} (pid {p.pid}) exited with status {p.returncode}; "
                                 f"sandgate log tail:\n{self.tail('sandgate.log')}")

    # ---------------------------------------------------------------- idle WebSockets

    def ws_idle(self, targets: list[str]) -> None:
        """Per target: `rounds` batches of N idle WebSockets, every batch held until the end of
        the scenario, so each is measured on top of the last (no freed memory to reuse)."""
        n, a = self.args.idle_ws, self.args
        held: dict[str, list] = {}
        for name in targets:
            t = self.targets[name]
            holders = held.setdefault(name, [])
            try:
                for r in range(a.rounds):
                    pids = t.proxy_pids()
                    before = rss_kib(pids)
                    cmd = self.client_prefix() + [str(a.loadgen_bin), "ws-idle"] + t.loadgen_args("/ws") + [
                        "--conns", str(n), "--max-hold", "300"]
                    h = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
                    holders.append(h)
                    self.holders.append(h)
                    r_ok, _, _ = select.select([h.stdout], [], [], 60)
                    line = h.stdout.readline() if r_ok else ""
                    if not line:
                        h.kill()
                        raise BenchError(f"ws-idle client failed: {h.stderr.read()[-500:] if h.poll() is not None else 'timeout'}")
                    opened = json.loads(line)
                    time.sleep(a.idle_settle)
                    after = rss_kib(t.proxy_pids())
                    fig = {
                        "rss_before_mib": before / 1024,
                        "rss_after_mib": after / 1024,
                        "kib_per_ws": (after - before) / n,
                        "open_ms": opened["open_ms"],
                        "echoed": opened["echoed"],
                    }
                    if r == a.rounds - 1:
                        fig["rss_with_all_mib"] = after / 1024
                    self.record("ws-idle", name, r, fig)
                    log(f"ws-idle {name} batch {r + 1}: {fmt(fig['kib_per_ws'])} KiB per idle WebSocket "
                        f"({fmt(before / 1024)} → {fmt(after / 1024)} MiB, {opened['echoed']}/{n} echoed)")
            except BenchError as e:
                self.failure(f"ws-idle / {name}: {e}")
            self.check_alive()
        # Released only now: both sandgate targets are one process, and memory freed by one
        # target's batches would otherwise be reused by the next target's.
        for name, holders in held.items():
            alive = 0
            for h in holders:
                try:
                    out, err = h.communicate("\n", timeout=60)
                    alive += json.loads(out.strip().splitlines()[-1])["alive"]
                except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
                    h.kill()
                    h.wait()
                    self.failure(f"ws-idle / {name}: holder did not finish cleanly: {e}")
            if name in self.results.get("ws-idle", {}):
                self.results["ws-idle"][name]["alive_after_hold"] = alive
                if alive != n * len(holders):
                    self.failure(f"ws-idle / {name}: only {alive} of {n * len(holders)} held WebSockets still echoed")
        self.check_alive()

    # ---------------------------------------------------------------- route lookup

    def route(self) -> None:
        """get-1k-keepalive with 1 registered sandbox, then with N: sandgate's two routes, plus
        direct and nginx in the same rounds so drift can be divided out."""
        a = self.args
        targets = [t for t in ["direct", "sandgate-path", "sandgate-host", "nginx"] if t in self.active_targets()]
        self.run_interleaved("get-1k-keepalive", targets, a.rounds, key="route-1")
        want = a.sandboxes - 1
        log(f"registering {want} more sandboxes (dev_server false: one idle `sleep` process each)")
        rss_before = rss_kib([self.sg.pid]) / 1024
        t0 = time.monotonic()
        deadline = t0 + a.register_budget
        made = 0
        errors = []
        stop = threading.Event()

        def make(_):
            nonlocal made
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                self.create_sandbox(self.sg, dev_server=False)
                made += 1
            except (BenchError, OSError) as e:
                errors.append(str(e))
                if len(errors) > 20:
                    stop.set()

        with ThreadPoolExecutor(a.register_parallel) as ex:
            list(ex.map(make, range(want)))
        took = time.monotonic() - t0
        total = made + 1
        self.route_info = {"registered": total, "requested": a.sandboxes, "register_seconds": took,
                           "register_per_s": made / took if took > 0 else None,
                           "sandgate_rss_mib_before": rss_before,
                           "sandgate_rss_mib_with_n": rss_kib([self.sg.pid]) / 1024}
        log(f"{total} sandboxes registered in {took:.1f}s ({made / max(took, 1e-9):.0f}/s); "
            f"sandgate RSS now {self.route_info['sandgate_rss_mib_with_n']:.1f} MiB")
        if errors:
            self.failure(f"registering sandboxes: {len(errors)} errors, e.g. {errors[0]}")
        if total < a.sandboxes:
            self.notes.append(f"route lookup measured with {total} registered sandboxes, not {a.sandboxes} "
                              f"({'time budget' if not errors else 'errors'} stopped registration)")
        self.check_target(self.targets["sandgate-path"])
        self.run_interleaved("get-1k-keepalive", targets, a.rounds, key="route-n")

    # ---------------------------------------------------------------- all

    def run(self) -> None:
        self.setup()
        targets = self.active_targets()
        for sc in self.args.scenarios:
            if sc in ("ws-idle", "route"):
                continue
            log(f"=== {sc}")
            self.run_interleaved(sc, scenario_targets(sc, targets), self.args.rounds)
        if "ws-idle" in self.args.scenarios:
            log("=== ws-idle")
            self.ws_idle(scenario_targets("ws-idle", targets))
        if "route" in self.args.scenarios and "sandgate-path" in targets:
            log("=== route")
            self.route()
        self.post_idle_rss = {n: rss_kib(self.targets[n].proxy_pids()) / 1024 for n in targets}
        if self.args.profile and "sandgate-path" in targets:
            log("=== profile")
            try:
                self.profile()
            except BenchError as e:
                self.failure(f"profile: {e}")

    # ---------------------------------------------------------------- profile

    def profile(self) -> None:
        """perf (software cpu-clock event, call graphs) on sandgate during one more
        get-1k-keepalive run through the path route; summarised by DSO, by system call and by
        user-space symbol."""
        perf = shutil.which("perf")
        if perf is None:
            raise BenchError("perf is not installed (Debian: linux-perf)")
        data = self.tmp / "perf.data"
        dur = self.args.duration
        rec = subprocess.Popen([perf, "record", "-q", "-e", "cpu-clock", "-F", "2999", "-g", "-p", str(self.sg.pid),
                                "-o", str(data), "--", "sleep", str(dur + 1)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        fig = self.wrk(self.targets["sandgate-path"], "/1k", 64, dur)
        try:
            _, err = rec.communicate(timeout=dur + 60)
        except subprocess.TimeoutExpired:
            rec.kill()
            rec.wait()
            raise BenchError("perf record did not finish")
        if rec.returncode != 0 or not data.exists():
            raise BenchError(f"perf record failed: {err.strip()[-400:]}")

        def report(*extra):
            p = run_cmd([perf, "report", "-i", str(data), "--stdio", "-g", "none", *extra], timeout=120)
            rows = []
            for line in p.stdout.splitlines():
                m = re.match(r"\s*([\d.]+)%\s+(?:([\d.]+)%\s+)?(.*\S)", line)
                if m and not line.lstrip().startswith("#"):
                    pct = float(m.group(1))
                    name = re.sub(r"(\s+-)+$", "", m.group(3))
                    rows.append((pct, re.sub(r"\s{2,}", " ", name).strip()))
            return rows

        by_dso = report("--no-children", "--sort", "dso")
        syscalls = [(pct, name) for pct, name in report("--children", "--sort", "symbol")
                    if re.search(r"\b__x64_sys_\w+", name)]
        flat = report("--no-children", "--sort", "dso,symbol")
        user = [(pct, name) for pct, name in flat if "[k]" not in name][:25]
        kernel = [(pct, name) for pct, name in flat if "[k]" in name][:15]
        self.profile_info = {
            "scenario": "get-1k-keepalive via sandgate-path, wrk -t2 -c64",
            "wrk": {k: fig[k] for k in ("rps", "cpu_us_per_req")},
            "by_dso": by_dso[:8], "syscalls": syscalls[:12], "user_symbols": user, "kernel_symbols": kernel,
        }
        log("profile: " + ", ".join(f"{n} {p:.0f}%" for p, n in by_dso[:4]))


SHOWN = {"rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_vs_upstream", "rss_load_mib", "mib_per_s",
         "cpu_us_per_mib", "rt_per_s", "p50_us", "p99_us", "cpu_us_per_rt"}

NGINX_CONF = """\
# nginx as a reverse proxy with keep-alive upstream pooling, tuned as an operator would for
# this benchmark: no access log, keep-alive to the upstream, WebSocket upgrades, unbuffered SSE
# and request bodies streamed (not spooled to disk) for the upload.
{user}
worker_processes auto;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
daemon off;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/client_body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  keepalive_requests 1000000;
  upstream fixture {{
    server 127.0.0.1:{upstream};
    keepalive 128;
    keepalive_requests 1000000;
  }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096 reuseport;
    proxy_http_version 1.1;
    proxy_set_header Host $host;
    proxy_set_header Connection $connection_upgrade;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
    location / {{ proxy_pass http://fixture; }}
    location /sse {{ proxy_pass http://fixture; proxy_buffering off; }}
    location /upload {{ proxy_pass http://fixture; proxy_request_buffering off; client_max_body_size 0; }}
  }}
}}
"""


# --------------------------------------------------------------------------------------------
# report

# scenario -> (title, [(metric, column header)])
COLUMNS = {
    "get-1k-keepalive": ("Small GET (1 KiB), keep-alive, 64 connections (wrk)", [
        ("rps", "req/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("cpu_us_per_req", "CPU µs/req"),
        ("cpu_vs_upstream", "CPU ÷ upstream"), ("rss_load_mib", "RSS under load MiB")]),
    "get-1k-close": ("Small GET (1 KiB), `Connection: close`, 64 connections (wrk)", [
        ("rps", "req/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("cpu_us_per_req", "CPU µs/req"),
        ("cpu_vs_upstream", "CPU ÷ upstream"), ("rss_load_mib", "RSS under load MiB")]),
    "get-1m": ("1 MiB responses, keep-alive (wrk)", [
        ("mib_per_s", "MiB/s (= req/s)"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
        ("cpu_us_per_req", "CPU µs/req"), ("cpu_vs_upstream", "CPU ÷ upstream"), ("rss_load_mib", "RSS under load MiB")]),
    "upload": ("Streaming upload, one POST", [
        ("mib_per_s", "MiB/s"), ("seconds", "seconds"), ("cpu_us_per_mib", "CPU µs/MiB"),
        ("cpu_vs_upstream", "CPU ÷ upstream"), ("rss_load_mib", "peak RSS MiB")]),
    "ws-echo-1": ("WebSocket echo, 1 connection", [
        ("rt_per_s", "round trips/s"), ("p50_us", "p50 µs"), ("p99_us", "p99 µs"),
        ("cpu_us_per_rt", "CPU µs/round trip"), ("cpu_vs_upstream", "CPU ÷ upstream")]),
    "ws-echo-16": ("WebSocket echo, 16 connections", [
        ("rt_per_s", "round trips/s"), ("p50_us", "p50 µs"), ("p99_us", "p99 µs"),
        ("cpu_us_per_rt", "CPU µs/round trip"), ("cpu_vs_upstream", "CPU ÷ upstream")]),
    "sse-first": ("Time to first SSE event (new connection each time, `/sse-hold`)", [
        ("p50_us", "p50 µs"), ("p99_us", "p99 µs")]),
    "ws-idle": ("Idle WebSockets held open", [
        ("kib_per_ws", "RSS KiB per idle WebSocket"), ("rss_with_all_mib", "RSS holding every batch MiB")]),
}


def aggregate(results: dict) -> None:
    """Adds per-metric medians and the medians of per-round ratios to direct and to nginx."""
    for scenario, by_target in results.items():
        for target, entry in by_target.items():
            rounds = [r for r in entry["rounds"] if r]
            metrics = sorted({k for r in rounds for k, v in r.items() if isinstance(v, (int, float))})
            figs = {}
            for m in metrics:
                vals = [r.get(m) for r in rounds]
                f = {"median": median(vals), "rounds": vals}
                for ref in ("direct", "nginx"):
                    ref_rounds = by_target.get(ref, {}).get("rounds", [])
                    ratios = []
                    for i, r in enumerate(entry["rounds"]):
                        rr = ref_rounds[i] if i < len(ref_rounds) else None
                        if r and rr and r.get(m) is not None and rr.get(m):
                            ratios.append(r[m] / rr[m])
                    f[f"vs_{ref}"] = median(ratios)
                figs[m] = f
            entry["figures"] = figs


def cell(entry: dict | None, metric: str, ratios=True) -> str:
    if not entry or metric not in entry.get("figures", {}):
        return "–"
    f = entry["figures"][metric]
    s = fmt(f["median"])
    if ratios:
        d = fmt(f["vs_direct"]) if f.get("vs_direct") is not None else "–"
        n = fmt(f["vs_nginx"]) if f.get("vs_nginx") is not None else "–"
        s += f" ({d} · {n})"
    return s


def report(b: Bench, meta: dict) -> str:
    res = b.results
    out = []
    a = b.args
    out.append(f"## sandgate benchmark{' (smoke)' if a.smoke else ''}: {meta['date']}\n")
    out.append(f"Machine: {meta['machine']['summary']}  ")
    out.append(f"sandgate {meta['versions']['sandgate']} (`{meta['versions']['sandgate_bin']}`); "
               f"{meta['versions']['nginx']}; "
               f"configurable-http-proxy {meta['versions']['chp']} (node {meta['versions']['node']}); "
               f"{meta['versions']['wrk']}  ")
    out.append(f"Load average {meta['loadavg_start']} at the start, {meta['loadavg_end']} at the end "
               f"(anything above ~0.5 means other work shared the cores); the run took {fmt(meta['seconds'])} s.  ")
    if b.sg is not None:
        out.append(f"sandgate-path and sandgate-host: one sandgate with `--isolation {b.sg.isolation or '(flag absent)'}`, "
                   "its sandbox's fixture being the upstream of every target but sandgate-netns, which is a second "
                   "sandgate with `--isolation netns` and its own fixture inside the sandbox's network namespace.  ")
    out.append(f"Median of {a.rounds} interleaved round(s); {a.duration}s per wrk run; pinning: {a.pin}. "
               "Each cell: **median (× direct · × nginx)**, the ratios being medians of same-round ratios.\n")

    head = None
    ka = res.get("get-1k-keepalive", {})
    if "sandgate-path" in ka and "nginx" in ka:
        sg = ka["sandgate-path"]["figures"]
        head = (f"**Headline (small keep-alive GETs, sandgate path route vs nginx):** "
                f"req/s {fmt(sg['rps']['vs_nginx'])}×, p99 {fmt(sg['p99_ms']['vs_nginx'])}×, "
                f"CPU/request {fmt(sg['cpu_us_per_req']['vs_nginx'])}× "
                f"(CPU ÷ upstream {fmt(sg['cpu_vs_upstream']['median'])} vs nginx's "
                f"{fmt(ka['nginx']['figures']['cpu_vs_upstream']['median'])}).\n")
        out.append(head)
    for num, den, title in [
        ("sandgate-path", "sandgate-quiet",
         "Metrics and access log (sandgate-path, both on, ÷ sandgate-quiet, both off; "
         "medians of same-round ratios; issue 17's target: CPU within 3%)"),
        ("sandgate-replicas", "sandgate-path",
         "Load balancing (a sandbox of 2 instances, round-robin, ÷ one instance, "
         "sandgate-replicas ÷ sandgate-path, medians of same-round ratios)"),
        ("sandgate-key", "sandgate-path",
         "Authentication (an API key verified on every request, sandgate-key ÷ sandgate-path, "
         "medians of same-round ratios)"),
    ]:
        cost = paired_cost(res, num, den)
        if cost:
            out.append(f"**{title}:** " + "; ".join(
                f"{sc}: CPU/request {fmt(r['cpu'])}×, req/s {fmt(r['rps'])}×" for sc, r in cost.items()) + ".\n")

    for sc, (title, cols) in COLUMNS.items():
        if sc not in res:
            continue
        out.append(f"### {sc}: {title}\n")
        out.append("| target | " + " | ".join(h for _, h in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for t in TARGETS:
            if t in res[sc]:
                out.append(f"| {t} | " + " | ".join(cell(res[sc][t], m) for m, _ in cols) + " |")
        out.append("")

    out.append("### Idle memory\n")
    out.append("| target | RSS at idle MiB | RSS after the run MiB | idle WebSockets still echoing after the hold |")
    out.append("|---|---|---|---|")
    for t in TARGETS:
        if t in b.idle_rss:
            alive = res.get("ws-idle", {}).get(t, {}).get("alive_after_hold", "–")
            rounds = len([r for r in res.get("ws-idle", {}).get(t, {}).get("rounds", []) if r])
            total = f"{alive} / {rounds * a.idle_ws}" if rounds else "–"
            idle_d = b.idle_rss[t] / b.idle_rss["direct"] if b.idle_rss.get("direct") else None
            idle_n = b.idle_rss[t] / b.idle_rss["nginx"] if b.idle_rss.get("nginx") else None
            out.append(f"| {t} | {fmt(b.idle_rss[t])} ({fmt(idle_d)} · {fmt(idle_n)}) | "
                       f"{fmt(getattr(b, 'post_idle_rss', {}).get(t))} | {total} |")
    out.append("")
    if "route-1" in res and "route-n" in res:
        info = getattr(b, "route_info", {})
        n = info.get("registered", "?")
        out.append(f"### route: small keep-alive GETs with 1 vs {n} registered sandboxes\n")
        out.append(f"{n} sandboxes registered in {fmt(info.get('register_seconds'))} s "
                   f"({fmt(info.get('register_per_s'))}/s); sandgate RSS went from "
                   f"{fmt(info.get('sandgate_rss_mib_before'))} to {fmt(info.get('sandgate_rss_mib_with_n'))} MiB "
                   f"while they were registered (idle with one, at the start: {fmt(b.idle_rss.get('sandgate-path'))} MiB).\n")
        cols = [("rps", "req/s"), ("p99_ms", "p99 ms"), ("cpu_us_per_req", "CPU µs/req"), ("cpu_vs_upstream", "CPU ÷ upstream")]
        out.append("| target | sandboxes | " + " | ".join(h for _, h in cols) + " |")
        out.append("|---|---|" + "---|" * len(cols))
        for t in TARGETS:
            for key, label in (("route-1", "1"), ("route-n", str(n))):
                if t in res[key]:
                    out.append(f"| {t} | {label} | " + " | ".join(cell(res[key][t], m) for m, _ in cols) + " |")
        rl = b.route_summary()
        if rl:
            out.append("")
            out.append(f"{n} vs 1 sandbox (sandgate's figure ÷ nginx's, at N over at 1; 1.00 = no cost): " +
                       "; ".join(f"{t}: " + ", ".join(f"{k} {fmt(v)}" for k, v in d.items()) for t, d in rl.items()))
        out.append("")
    prof = getattr(b, "profile_info", None)
    if prof:
        out.append(f"### Profile: where sandgate's CPU goes ({prof['scenario']}; perf, cpu-clock)\n")
        out.append("By binary: " + ", ".join(f"{n.strip()} {p:.1f}%" for p, n in prof["by_dso"] if p >= 0.5) + ".  ")
        sys_re = re.compile(r"__x64_sys_(\w+)")
        out.append("By system call (inclusive; loopback receive work runs as softirq on its own stack and is "
                   "attributed to no call): " + ", ".join(
                       f"{sys_re.search(n).group(1)} {p:.1f}%" for p, n in prof["syscalls"] if p >= 0.1) + ".  ")
        out.append("Top kernel symbols (self): " + "; ".join(
            f"{sym_name(n)[:60]} {p:.1f}%" for p, n in prof.get("kernel_symbols", [])[:8]) + ".  ")
        out.append("Top user-space symbols (self): " + "; ".join(
            f"{sym_name(n)[:90]} {p:.1f}%" for p, n in prof["user_symbols"][:12]) + ".\n")
    if b.notes:
        out.append("Notes: " + " ".join(b.notes) + "\n")
    if b.failures:
        out.append("**Failures:**\n")
        out += [f"- {f}" for f in b.failures]
        out.append("")
    return "\n".join(out)


def paired_cost(res: dict, num: str, den: str) -> dict:
    """Per HTTP scenario: target `num`'s CPU per request and req/s ÷ target `den`'s, the median
    of same-round ratios."""
    out = {}
    for sc in HTTP_SCENARIOS:
        key, path = res.get(sc, {}).get(num), res.get(sc, {}).get(den)
        if not key or not path:
            continue
        pairs = [(k, p) for k, p in zip(key.get("rounds", []), path.get("rounds", [])) if k and p]
        if not pairs:
            continue
        out[sc] = {
            "cpu": median([k["cpu_us_per_req"] / p["cpu_us_per_req"] for k, p in pairs]),
            "rps": median([k["rps"] / p["rps"] for k, p in pairs]),
        }
    return out


def sym_name(row: str) -> str:
    """`dso [k] symbol` (perf's dso,symbol sort) → `symbol`."""
    return re.sub(r"^.*?\[[.kgu]\]\s*", "", row)


def route_summary(self: Bench) -> dict:
    """For each sandgate route: figure at N ÷ figure at 1, both first divided by nginx's in the
    same phase (so machine drift between the phases cancels)."""
    res = self.results
    out = {}
    for t in ("sandgate-path", "sandgate-host"):
        one, many = res.get("route-1", {}).get(t), res.get("route-n", {}).get(t)
        if not one or not many:
            continue
        d = {}
        for m in ("rps", "p99_ms", "cpu_us_per_req", "cpu_vs_upstream"):
            a, b = one["figures"].get(m, {}), many["figures"].get(m, {})
            ra = a.get("vs_nginx") if m != "cpu_vs_upstream" else a.get("median")
            rb = b.get("vs_nginx") if m != "cpu_vs_upstream" else b.get("median")
            d[m] = rb / ra if ra and rb else None
        out[t] = d
    return out


Bench.route_summary = route_summary


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    distro = "?"
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    cores = os.cpu_count()
    summary = f"{cores} cores ({cpu}), {mem_gib:.0f} GiB RAM, {distro}, Linux {platform.release()}"
    return {"cores": cores, "cpu": cpu, "mem_gib": round(mem_gib, 1), "os": distro,
            "kernel": platform.release(), "summary": summary}


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def git_describe() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "crates"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}{'+dirty' if dirty else ''}" if rev else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def scenario_targets(scenario: str, targets: list[str]) -> list[str]:
    """The targets a scenario measures: those in HEADER_TARGETS only over wrk."""
    return [t for t in targets if scenario in HTTP_SCENARIOS or t not in HEADER_TARGETS]


def check_complete(b: Bench) -> list[str]:
    """Every figure of every (scenario, target) present: what CI checks (never a speed)."""
    missing = []
    targets = b.active_targets()
    for sc in b.args.scenarios:
        if sc == "route":
            if "sandgate-path" not in targets:
                continue
            for key in ("route-1", "route-n"):
                for t in ["direct", "sandgate-path", "sandgate-host", "nginx"]:
                    if t in targets and not b.results.get(key, {}).get(t, {}).get("figures"):
                        missing.append(f"{key}/{t}")
            continue
        cols = COLUMNS[sc][1]
        for t in scenario_targets(sc, targets):
            figs = b.results.get(sc, {}).get(t, {}).get("figures", {})
            for m, _ in cols:
                if figs.get(m, {}).get("median") is None and not (m == "cpu_vs_upstream" and t == "direct"):
                    missing.append(f"{sc}/{t}/{m}")
    return missing


def parse_args(argv):
    p = argparse.ArgumentParser(description="sandgate vs direct, nginx and configurable-http-proxy (see bench/README.md)")
    p.add_argument("--smoke", action="store_true", help="seconds, not minutes: tiny durations, 1 round, 100 sandboxes")
    p.add_argument("--rounds", type=int, help="interleaved rounds per scenario (default 3; smoke 1)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 8; smoke 1)")
    p.add_argument("--warmup", type=int, help="seconds of unrecorded wrk load before a scenario's first round (default 1; smoke 0)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of: " + ",".join(SCENARIOS))
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of: " + ",".join(TARGETS))
    p.add_argument("--sandboxes", type=int, help="registered sandboxes for the route scenario (default 10000; smoke 100)")
    p.add_argument("--register-budget", type=float, help="seconds allowed for registering them (default 600; smoke 30)")
    p.add_argument("--register-parallel", type=int, default=8)
    p.add_argument("--idle-ws", type=int, help="idle WebSockets per batch (default 1000; smoke 250)")
    p.add_argument("--idle-settle", type=float, default=1.0, help="seconds between opening a batch and reading RSS")
    p.add_argument("--upload-mib", type=int, default=256)
    p.add_argument("--big-conns", type=int, default=16, help="wrk connections for 1 MiB responses")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--ws-seconds", type=float, help="measured seconds per WebSocket echo run (default 5; smoke 1)")
    p.add_argument("--ws-warmup", type=float, help="unmeasured seconds before them (default 0.5; smoke 0.2)")
    p.add_argument("--sse-count", type=int, help="first events timed per run (default 300; smoke 30)")
    p.add_argument("--pin", choices=["none", "split"], default="none",
                   help="split: load generators on --client-cpu, proxy and upstream on --server-cpu (taskset)")
    p.add_argument("--client-cpu", type=int, default=0)
    p.add_argument("--server-cpu", type=int, default=1)
    p.add_argument("--port-range", default="21000-21099", help="sandgate's --port-range (only dev-server sandboxes use it)")
    p.add_argument("--netns-port-range", default="21100-21199", help="--port-range of the sandgate-netns instance")
    p.add_argument("--quiet-port-range", default="21200-21299",
                   help="--port-range of the sandgate-quiet instance (metrics and access log off)")
    p.add_argument("--sandgate-arg", action="append", default=[], help="extra argument for `sandgate serve` (repeatable)")
    p.add_argument("--sandgate-bin", type=Path, default=ROOT / "target/release/sandgate")
    p.add_argument("--fixture-bin", type=Path, default=ROOT / "target/release/sandgate-fixture")
    p.add_argument("--loadgen-bin", type=Path, default=ROOT / "target/bench-loadgen/release/sandgate-loadgen")
    p.add_argument("--out", type=Path, help="JSON results file (default bench/results/<date>[-smoke].json)")
    p.add_argument("--markdown-out", type=Path, help="also write the markdown table to this file")
    p.add_argument("--max-seconds", type=float, help="hard bound on the whole run (default 3600; smoke 300)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory with all logs")
    p.add_argument("--profile", action="store_true",
                   help="at the end, profile sandgate with perf (cpu-clock) during one more keep-alive run")
    a = p.parse_args(argv)
    s = a.smoke
    defaults = {"rounds": 1 if s else 3, "duration": 1 if s else 8, "warmup": 0 if s else 1,
                "sandboxes": 100 if s else 10000, "register_budget": 30 if s else 600,
                "idle_ws": 250 if s else 1000, "ws_seconds": 1.0 if s else 5.0, "ws_warmup": 0.2 if s else 0.5, "sse_count": 30 if s else 300,
                "max_seconds": 300 if s else 3600}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.scenarios = [x for x in a.scenarios.split(",") if x]
    a.targets = [x for x in a.targets.split(",") if x]
    for x in a.scenarios:
        if x not in SCENARIOS:
            p.error(f"unknown scenario {x}")
    for x in a.targets:
        if x not in TARGETS:
            p.error(f"unknown target {x}")
    if "direct" not in a.targets:
        p.error("the direct target is always needed (it is the reference)")
    for b in ("sandgate_bin", "fixture_bin", "loadgen_bin"):
        path = getattr(a, b).resolve()
        setattr(a, b, path)
        if not path.is_file():
            p.error(f"{path} does not exist (bench/run builds it)")
    if a.pin == "split" and (os.cpu_count() or 1) < 2:
        p.error("--pin split needs at least 2 CPUs")
    return a


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    # Room for thousands of sockets (idle WebSockets) in us and every process we start.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            break
        except (ValueError, OSError):
            continue

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(signum, frame):
        raise BenchError(f"the run exceeded --max-seconds {args.max_seconds}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.max_seconds))

    b = Bench(args)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "versions": {
            "sandgate": git_describe(),
            "sandgate_bin": os.path.relpath(args.sandgate_bin, ROOT),
            "nginx": tool_version(["nginx", "-v"]),
            "chp": tool_version(["configurable-http-proxy", "--version"]),
            "node": tool_version(["node", "--version"]),
            "wrk": tool_version(["wrk", "--version"]).split(" Copyright")[0],
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    meta["loadavg_start"] = loadavg()
    interrupted = None
    try:
        b.run()
    except (BenchError, KeyboardInterrupt) as e:
        interrupted = e
        b.failure(f"run stopped: {e}")
    except Exception as e:  # noqa: BLE001 - report, clean up, fail
        interrupted = e
        b.failure(f"run stopped by an internal error: {e!r}\n{traceback.format_exc()}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(120)  # cleanup is bounded too
        try:
            b.stop_all()
        except BenchError as e:
            b.failure(f"cleanup: {e}")
        signal.alarm(0)
    meta["loadavg_end"] = loadavg()
    meta["seconds"] = round(time.monotonic() - START, 1)
    aggregate(b.results)
    missing = check_complete(b)
    if missing:
        b.failure(f"missing figures: {', '.join(missing[:30])}{' …' if len(missing) > 30 else ''}")
    md = report(b, meta)
    print(md, flush=True)
    out = args.out or BENCH / "results" / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-smoke" if args.smoke else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(meta, results=b.results, idle_rss_mib=b.idle_rss,
               post_run_rss_mib=getattr(b, "post_idle_rss", {}), route=getattr(b, "route_info", {}),
               route_n_vs_1=b.route_summary(), profile=getattr(b, "profile_info", None),
               notes=b.notes, failures=b.failures)
    out.write_text(json.dumps(doc, indent=2))
    if args.markdown_out:
        args.markdown_out.write_text(md + "\n")
    log(f"results written to {out}")
    if b.failures or interrupted:
        log(f"{len(b.failures)} failure(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
