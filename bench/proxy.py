"""Benchmark: HAProxy blue-green through the daemon, against a consul-template-style baseline.

Owns the proxy figures of docs/performance.md. Both setups are driven the same way, by
Consul KV writes under their own prefix (one service ``web`` on a free 127.0.0.1 port,
pools ``blue`` and ``green`` of ``--members`` busybox httpd backends each, answering
``<pool> <member>``; members are put by hand as KV keys):

- reconciler: ``reconciler --prefix P run --node N --state-dir D`` (its own process,
  default settings), which runs HAProxy master-worker with the active pool in a map;
- baseline: the classic consul-template setup, here a small watcher process (this file,
  ``_baseline`` mode) doing a blocking query on its prefix and, on every change, rendering
  a full config where the active pool's servers are the ONE backend (no map), writing it
  atomically and running ``haproxy -D -f cfg -p pid -sf <old pids>``, the soft reload
  consul-template's reload command does.

Figures, for each setup:

(a) flip: the clock starts before the KV put of ``active`` and stops at the answer of the
    first of ``--run`` consecutive fresh-connection requests (one every ~2 ms) answered
    by the new pool; p50/p95 over ``--flips`` flips;
(b) add: a member put into the active pool -> the first answer from it; p50/p95 over
    ``--adds`` additions (each removed again, and its absence confirmed, before the next),
    with the failed requests of the polling client (fresh connections every ~2 ms
    throughout the additions and removals) and the reloads they caused. The reconciler
    adds and removes members through HAProxy's runtime API (dynamic servers, no reload);
    the baseline reloads for each;
(c) failed requests while ``--flips`` flips and ``--changes`` member changes (add/remove
    in the active pool; a reload each in the baseline) are applied, one every
    ``--interval`` s, under
    each client profile separately: ``wrk -t2 -c20`` (keep-alive; non-2xx + socket
    errors), ``hey -disable-keepalive`` (a new connection per request, rate-bounded;
    non-2xx + errors), and ``idle``: keep-alive connections with a random 50-500 ms think
    time, no retries (exceptions + non-200).

(d) progressive cutover (reconciler only; ``--progressive``, or ``--progressive-only``):
    ``reconciler cutover web --to <other> --steps 10,50,100 --interval 3s`` under
    keep-alive load (failed requests: 0 expected), then the same towards a pool whose
    member answers 500 to requests (healthy checks) with ``--steps 20,100 --interval 5s
    --max-error-rate 1%``: failed requests (only the bad pool's own answers) and the time
    from its first 500 to its last (the rollback), and the command's exit status (1).

Prints figures; asserts nothing about time (it fails only if something does not work).
Loopback only, bounded loads. Every process it starts (daemon, both HAProxies, the
watcher, backends, load clients) and its KV prefixes are removed at the end, also on
failure. Needs Consul (``make services``), haproxy, busybox, wrk and hey.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _machine import describe  # bench/_machine.py (they run as scripts)
from _proc import free_port, pct, sh, stop_popen

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
from reconciler.errors import ConsulError

REPO = Path(__file__).resolve().parents[1]
SERVICE = "web"
POOLS = ("blue", "green")
HEALTH_MS = 1000
PROFILES = ("wrk", "hey", "idle")
TARGETS = {"flip_p95_ms": 50.0, "add_p95_ms": 50.0, "failures": 0.0}


# --------------------------------------------------------------------------- helpers


def fetch(port: int, timeout: float = 1.0) -> str | None:
    """One GET / on a fresh connection (HTTP/1.0); the body, or None on any failure."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    break
                chunks.append(data)
    except OSError:
        return None
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
        return None
    return body.decode("utf-8", "replace").strip()


@dataclass
class Counts:
    """Requests a poller made, and how many of them failed (no 200 answer)."""

    requests: int = 0
    failures: int = 0


def poll_until(port: int, ok: Callable[[str | None], bool], run: int, t0: float,
               timeout: float, what: str, period: float = 0.002,
               counts: Counts | None = None) -> float:
    """Fresh requests every `period` s until `run` consecutive answers satisfy `ok`;
    seconds from `t0` to the answer of the first of them (each request and failure
    counted in `counts`)."""
    first: float | None = None
    streak = 0
    deadline = t0 + timeout
    while True:
        start = time.perf_counter()
        body = fetch(port)
        now = time.perf_counter()
        if counts is not None:
            counts.requests += 1
            counts.failures += body is None
        if ok(body):
            if streak == 0:
                first = now
            streak += 1
            if streak >= run and first is not None:
                return first - t0
        else:
            streak = 0
        if now > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:g}s (last answer {body!r})")
        rest = period - (time.perf_counter() - start)
        if rest > 0:
            time.sleep(rest)


def _running(pid: int) -> bool:
    """`pid` exists and is not a zombie (an orphan may wait a while to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def kill_pid(pid: int, marker: str | None = None) -> None:
    """SIGTERM then SIGKILL one process of ours (if `marker`, only when its command line
    contains it: guards against a reused pid)."""
    if marker is not None:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if marker.encode() not in cmd:
            return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                # Our own children must be reaped; others just vanish.
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                if not _running(pid):
                    return
            time.sleep(0.02)


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str
    port: int
    proc: subprocess.Popen[bytes]


class Backends:
    """busybox httpd processes on 127.0.0.1, each answering ``<label> <name>``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.all: list[Backend] = []

    def start(self, label: str, name: str) -> Backend:
        root = self.workdir / "www" / name
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.html").write_text(f"{label} {name}\n")
        (root / "health").write_text("ok\n")
        port = free_port()
        proc = subprocess.Popen(["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}",
                                 "-h", str(root)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        b = Backend(name, port, proc)
        self.all.append(b)
        return b

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        for b in self.all:
            while fetch(b.port) is None:
                if b.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"backend {b.name} on port {b.port} did not start")
                time.sleep(0.02)

    def stop(self) -> None:
        for b in self.all:
            stop_popen(b.proc)


# --------------------------------------------------------------------------- the baseline


def baseline_render(state: dict[str, dict[str, object]], active: str,
                    config: dict[str, object]) -> str:
    """The classic template: the active pool's servers in the ONE backend, no map."""
    host, _, port = str(config["bind"]).rpartition(":")
    health = config.get("health")
    lines = [
        "global",
        "    maxconn 4096",
        "    hard-stop-after 30s",
        "",
        "defaults",
        "    timeout connect 5000ms",
        "    timeout client 30000ms",
        "    timeout server 30000ms",
        "    timeout http-request 10000ms",
        "    timeout http-keep-alive 10000ms",
        "    timeout check 2000ms",
        "    option redispatch",
        "    retries 3",
        "",
        f"frontend fe_{SERVICE}",
        f"    mode {config.get('mode', 'http')}",
        f"    bind {host}:{port}",
        f"    default_backend be_{SERVICE}",
        "",
        f"backend be_{SERVICE}",
        f"    mode {config.get('mode', 'http')}",
        f"    balance {config.get('balance', 'roundrobin')}",
    ]
    if isinstance(health, dict):
        lines += [f"    option httpchk GET {health.get('path', '/')}",
                  f"    default-server inter {health.get('interval_ms', 2000)}ms"]
    for name, m in sorted(state.get(active, {}).items()):
        assert isinstance(m, dict)
        lines.append(f"    server {name} {m['address']}:{m['port']} "
                     f"weight {m.get('weight', 100)} check")
    return "\n".join(lines) + "\n"


def baseline_watch(prefix: str, workdir: Path) -> int:
    """consul-template in miniature: watch `prefix`, render, write, soft-reload.

    Runs until SIGTERM. The HAProxies it starts are recorded (one pid per line) in
    ``pids.log`` so the bench can end them."""
    kv = ConsulKV(ConsulSettings.from_env())
    cfg_path = workdir / "haproxy.cfg"
    pid_path = workdir / "haproxy.pid"
    pids_log = workdir / "pids.log"
    base = f"{prefix}services/{SERVICE}/"
    index = 0
    while True:
        try:
            snap = kv.read_prefix(prefix, index=index if index > 1 else None, wait="30s")
        except ConsulError as exc:  # keep watching, like consul-template
            print(f"baseline: consul: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.5)
            continue
        index = snap.index if snap.index >= index else 0
        config: dict[str, object] | None = None
        active: str | None = None
        pools: dict[str, dict[str, object]] = {}
        for key, item in snap.items.items():
            rel = key[len(base):] if key.startswith(base) else None
            if rel == "config":
                config = json.loads(item.value)
            elif rel == "active":
                active = item.value.decode().strip()
            elif rel is not None and rel.startswith("pools/"):
                parts = rel.split("/")
                if len(parts) == 3:
                    pools.setdefault(parts[1], {})[parts[2]] = json.loads(item.value)
        if config is None or active is None:
            continue
        text = baseline_render(pools, active, config)
        with contextlib.suppress(FileNotFoundError):
            if cfg_path.read_text() == text:
                continue
        tmp = cfg_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, cfg_path)
        old: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            old = pid_path.read_text().split()
        cmd = ["haproxy", "-D", "-f", str(cfg_path), "-p", str(pid_path)]
        if old:
            cmd += ["-sf", *old]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"baseline: haproxy failed: {proc.stderr.strip()}", file=sys.stderr, flush=True)
            continue
        with contextlib.suppress(FileNotFoundError), open(pids_log, "a") as f:
            f.write(pid_path.read_text())


# --------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    profile: str
    requests: int = 0
    failures: int = 0
    detail: str = ""


def parse_wrk(out: str) -> LoadResult:
    r = LoadResult("wrk")
    m = re.search(r"(\d+) requests in", out)
    r.requests = int(m.group(1)) if m else 0
    details = []
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r.failures += sum(int(x) for x in m.groups())
        details.append(m.group(0))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r.failures += int(m.group(1))
        details.append(m.group(0))
    if not m and "requests in" not in out:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    r.detail = "; ".join(details)
    return r


def parse_hey(out: str) -> LoadResult:
    r = LoadResult("hey")
    status = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    if not status and "Error distribution" not in out:
        raise RuntimeError(f"cannot read hey's output:\n{out}")
    errors: list[tuple[int, str]] = []
    if "Error distribution:" in out:
        for line in out.split("Error distribution:", 1)[1].splitlines():
            m = re.match(r"\s*\[(\d+)\]\s+(.*)", line)
            if m:
                errors.append((int(m.group(1)), m.group(2).strip()))
    non2xx = sum(n for c, n in status.items() if not 200 <= c < 400)
    r.requests = sum(status.values()) + sum(n for n, _ in errors)
    r.failures = non2xx + sum(n for n, _ in errors)
    # hey lists each error with its connection's ports: group them by the reason.
    reasons: dict[str, int] = {}
    for n, msg in errors:
        reason = msg.rsplit(": ", 1)[-1]
        reasons[reason] = reasons.get(reason, 0) + n
    parts = [f"non-2xx {non2xx}"] if non2xx else []
    parts += [f"{n}x {reason}" for reason, n in sorted(reasons.items())]
    r.detail = "; ".join(parts)
    return r


class IdleClients:
    """Keep-alive connections with think time, no retries: each failure counts."""

    def __init__(self, port: int, connections: int) -> None:
        self.port = port
        self.connections = connections
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0
        self.failures = 0
        self.errors: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(connections)]

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures += 1
            self.errors[what] = self.errors.get(what, 0) + 1

    def _run(self, i: int) -> None:
        rnd = random.Random(i)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            while not self.stop.is_set():
                with self.lock:
                    self.requests += 1
                try:
                    conn.request("GET", "/", headers={"Host": "bench"})
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        self._fail(f"HTTP {resp.status}")
                except (OSError, http.client.HTTPException) as exc:
                    self._fail(type(exc).__name__)
                    conn.close()  # the next request opens a new connection; no retry
                self.stop.wait(rnd.uniform(0.05, 0.5))
        finally:
            conn.close()

    def __enter__(self) -> IdleClients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def result(self) -> LoadResult:
        detail = "; ".join(f"{n}x {k}" for k, n in sorted(self.errors.items()))
        return LoadResult("idle", self.requests, self.failures, detail)


@contextlib.contextmanager
def load(profile: str, port: int, duration: float, hey_conc: int, hey_qps: int,
         idle_conns: int, out: list[LoadResult]) -> Iterator[None]:
    """Run one client profile for `duration` s around the body; append its result."""
    url = f"http://127.0.0.1:{port}/"
    dur = f"{max(1, round(duration))}s"
    if profile == "idle":
        clients = IdleClients(port, idle_conns)
        with clients:
            yield
        out.append(clients.result())
        return
    if profile == "wrk":
        cmd = ["wrk", "-t2", "-c20", f"-d{dur}", url]
    else:
        cmd = ["hey", "-z", dur, "-c", str(hey_conc), "-q", str(hey_qps),
               "-disable-keepalive", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        yield
        text, _ = proc.communicate(timeout=duration + 60)
    finally:
        stop_popen(proc)
    output = text.decode("utf-8", "replace")
    out.append(parse_wrk(output) if profile == "wrk" else parse_hey(output))


# --------------------------------------------------------------------------- the setups


class Setup:
    """One blue-green service driven through KV under its own prefix."""

    label = "?"

    def __init__(self, rid: str, workdir: Path, kv: ConsulKV,
                 pools: dict[str, list[Backend]]) -> None:
        self.rid = rid
        self.workdir = workdir
        self.kv = kv
        self.pools = pools
        self.port = free_port()
        self.prefix = ""
        self.active = POOLS[0]

    @property
    def svc(self) -> str:
        return f"{self.prefix}services/{SERVICE}/"

    def put_state(self) -> None:
        self.kv.put(self.svc + "config", json.dumps({
            "bind": f"127.0.0.1:{self.port}", "mode": "http", "balance": "roundrobin",
            "health": {"path": "/health", "interval_ms": HEALTH_MS}}).encode())
        self.kv.put(self.svc + "active", self.active.encode())
        for pool, members in self.pools.items():
            for b in members:
                self.add(pool, b.name, b.port)

    def flip(self, pool: str) -> None:
        self.kv.put(self.svc + "active", pool.encode())
        self.active = pool

    def add(self, pool: str, member: str, port: int) -> None:
        self.kv.put(f"{self.svc}pools/{pool}/{member}",
                    json.dumps({"address": "127.0.0.1", "port": port}).encode())

    def remove(self, pool: str, member: str) -> None:
        self.kv.delete(f"{self.svc}pools/{pool}/{member}")

    def wait_serving(self, timeout: float = 60.0) -> None:
        t0 = time.perf_counter()
        poll_until(self.port, answered_by(self.active + " "), 20, t0, timeout,
                   f"{self.label}: serving {self.active}", period=0.05)

    def start(self) -> None:
        raise NotImplementedError

    def reloads(self) -> int | None:
        """Reloads so far (None: unknown)."""
        return None

    def stop(self) -> None:
        raise NotImplementedError

    def log_tail(self) -> str:
        return ""


class ReconcilerSetup(Setup):
    label = "reconciler"

    def __init__(self, rid: str, workdir: Path, kv: ConsulKV,
                 pools: dict[str, list[Backend]]) -> None:
        super().__init__(rid, workdir, kv, pools)
        self.prefix = f"rbp-{rid}/"
        self.node = f"rbpnode-{self.rid}"
        self.state_dir = self.workdir / "reconciler"
        self.log_path = self.workdir / "daemon.log"
        self.daemon: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.put_state()
        exe = REPO / ".venv" / "bin" / "reconciler"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "reconciler"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.daemon = subprocess.Popen(
            [*cmd, "--prefix", self.prefix, "run", "--node", self.node,
             "--state-dir", str(self.state_dir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.wait_serving()

    def reloads(self) -> int | None:
        item = self.kv.get(f"{self.prefix}nodes/{self.node}/status")
        if item is None:
            return None
        value = json.loads(item.value).get("proxy", {}).get("reloads")
        return int(value) if isinstance(value, int) else None

    def stop(self) -> None:
        stop_popen(self.daemon, 20)
        self.daemon = None
        # The daemon leaves HAProxy running on purpose (it keeps serving): end it here.
        pid_file = self.state_dir / "haproxy.pid"
        with contextlib.suppress(OSError, ValueError):
            for word in pid_file.read_text().split():
                kill_pid(int(word), "haproxy")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""


class BaselineSetup(Setup):
    label = "baseline"

    def __init__(self, rid: str, workdir: Path, kv: ConsulKV,
                 pools: dict[str, list[Backend]]) -> None:
        super().__init__(rid, workdir, kv, pools)
        self.prefix = f"rbb-{rid}/"
        self.dir = self.workdir / "baseline"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "baseline.log"
        self.watcher: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.put_state()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.watcher = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_baseline", self.prefix,
             str(self.dir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        log.close()
        self.wait_serving()

    def reloads(self) -> int | None:
        with contextlib.suppress(OSError):
            return len((self.dir / "pids.log").read_text().split()) - 1
        return None

    def stop(self) -> None:
        stop_popen(self.watcher)
        self.watcher = None
        pids: set[int] = set()
        for name in ("pids.log", "haproxy.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(w) for w in (self.dir / name).read_text().split())
        for pid in sorted(pids):
            kill_pid(pid, str(self.dir))

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""


# --------------------------------------------------------------------------- phases


@dataclass
class Figures:
    label: str
    flips_ms: list[float] = field(default_factory=list)
    adds_ms: list[float] = field(default_factory=list)
    adds_counts: Counts = field(default_factory=Counts)
    adds_reloads: int | None = None
    loads: dict[str, LoadResult] = field(default_factory=dict)
    reloads: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Params:
    flips: int
    adds: int
    changes: int
    interval: float
    run: int
    lead: float
    tail: float
    profiles: tuple[str, ...]
    hey_conc: int
    hey_qps: int
    idle_conns: int


def other(pool: str) -> str:
    return POOLS[1] if pool == POOLS[0] else POOLS[0]


def answered_by(text: str, suffix: bool = False) -> Callable[[str | None], bool]:
    """A check of an answer: it starts (or ends) with `text`."""
    def ok(body: str | None) -> bool:
        if body is None:
            return False
        return body.endswith(text) if suffix else body.startswith(text)
    return ok


def measure_flips(s: Setup, p: Params, fig: Figures) -> None:
    rnd = random.Random(1)
    for i in range(p.flips):
        new = other(s.active)
        t0 = time.perf_counter()
        s.flip(new)
        dt = poll_until(s.port, answered_by(new + " "), p.run, t0, 10.0,
                        f"{s.label}: flip {i + 1} to {new}")
        fig.flips_ms.append(1000 * dt)
        time.sleep(rnd.uniform(0.2, 0.7))  # operators do not flip back-to-back


def measure_adds(s: Setup, p: Params, extra: list[Backend], fig: Figures) -> None:
    rnd = random.Random(2)
    r0 = s.reloads()
    counts = fig.adds_counts
    for i in range(p.adds):
        b = extra[i % len(extra)]
        member = f"add-{i}"
        t0 = time.perf_counter()
        s.add(s.active, member, b.port)
        dt = poll_until(s.port, answered_by(" " + b.name, suffix=True), 1, t0, 10.0,
                        f"{s.label}: add {member}", counts=counts)
        fig.adds_ms.append(1000 * dt)
        s.remove(s.active, member)
        # Gone: a long run of answers without it (roundrobin would have hit it).
        poll_until(s.port, answered_by(s.active + " "), 10 * (len(s.pools[s.active]) + 1),
                   time.perf_counter(), 10.0, f"{s.label}: remove {member}", counts=counts)
        time.sleep(rnd.uniform(0.2, 0.5))
    r1 = s.reloads()
    fig.adds_reloads = r1 - r0 if r0 is not None and r1 is not None else None


def schedule(flips: int, changes: int) -> list[str]:
    """`flips` flips with `changes`/2 add+remove pairs spread among them."""
    pairs = max(0, changes // 2)
    if pairs == 0:
        return ["flip"] * flips
    out: list[str] = []
    per, extra = divmod(flips, pairs)
    for i in range(pairs):
        out += ["flip"] * (per + (1 if i < extra else 0)) + ["add", "remove"]
    return out


def measure_failures(s: Setup, p: Params, extra: list[Backend], fig: Figures) -> None:
    events = schedule(p.flips, p.changes)
    duration = p.lead + len(events) * p.interval + p.tail
    for profile in p.profiles:
        results: list[LoadResult] = []
        r0 = s.reloads()
        with load(profile, s.port, duration, p.hey_conc, p.hey_qps, p.idle_conns, results):
            start = time.perf_counter()
            time.sleep(p.lead)
            added: tuple[str, str] | None = None
            for i, ev in enumerate(events):
                if ev == "flip":
                    s.flip(other(s.active))
                elif ev == "add":
                    b = extra[i % len(extra)]
                    added = (s.active, f"churn-{i}")
                    s.add(added[0], added[1], b.port)
                elif added is not None:
                    s.remove(*added)
                    added = None
                next_at = start + p.lead + (i + 1) * p.interval
                time.sleep(max(0.0, next_at - time.perf_counter()))
            time.sleep(max(0.0, start + duration - time.perf_counter()))
        fig.loads[profile] = results[0]
        r1 = s.reloads()
        fig.reloads[profile] = r1 - r0 if r0 is not None and r1 is not None else None
        s.wait_serving(10)  # the last state took effect, and it still serves
        r = results[0]
        print(f"  {s.label} {profile}: {r.failures} failed of {r.requests}"
              f"{' (' + r.detail + ')' if r.detail else ''}, reloads {fig.reloads[profile]}",
              flush=True)


def run_setup(s: Setup, p: Params, extra: list[Backend]) -> Figures:
    fig = Figures(s.label)
    ok = False
    try:
        s.start()
        print(f"--- {s.label}: flips", flush=True)
        measure_flips(s, p, fig)
        print(f"  p50 {pct(fig.flips_ms, .5):.1f} ms, p95 {pct(fig.flips_ms, .95):.1f} ms",
              flush=True)
        print(f"--- {s.label}: member additions", flush=True)
        measure_adds(s, p, extra, fig)
        print(f"  p50 {pct(fig.adds_ms, .5):.1f} ms, p95 {pct(fig.adds_ms, .95):.1f} ms, "
              f"failed {fig.adds_counts.failures} of {fig.adds_counts.requests}, "
              f"reloads {fig.adds_reloads}", flush=True)
        print(f"--- {s.label}: failed requests under load", flush=True)
        measure_failures(s, p, extra, fig)
        ok = True
        return fig
    finally:
        if not ok:
            print(f"--- {s.label} log, last lines:\n{s.log_tail()}", file=sys.stderr)
        s.stop()


# --------------------------------------------------------------------------- progressive


class _Failing(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code, body = (200, b"ok\n") if self.path.startswith("/health") else \
            (500, b"bad b-1\n")
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # HAProxy's checks hang up early


class KeepAlive:
    """Keep-alive GET / in a thread; records (time, status or None) of every answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[tuple[float, int | None, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/")
                r = conn.getresponse()
                body = r.read().decode(errors="replace")
                self.answers.append((time.perf_counter(), r.status, body.split(" ")[0]))
            except (OSError, http.client.HTTPException):
                self.answers.append((time.perf_counter(), None, ""))
                conn.close()
            self.stop.wait(0.002)
        conn.close()

    def __enter__(self) -> KeepAlive:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def measure_progressive(s: ReconcilerSetup) -> dict[str, str]:
    exe = REPO / ".venv" / "bin" / "reconciler"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "reconciler"]
    out: dict[str, str] = {}
    to = other(s.active)
    with KeepAlive(s.port) as load:
        time.sleep(1.0)
        t0 = time.perf_counter()
        proc = sh(*cmd, "--prefix", s.prefix, "cutover", SERVICE, "--to", to, "--steps",
                  "10,50,100", "--interval", "3s", check=False, timeout=120)
        s.active = to if proc.returncode == 0 else s.active
        time.sleep(1.0)
    failed = [a for a in load.answers if a[1] != 200]
    out["(d) progressive 10/50/100, 3 s steps: exit, wall time"] = \
        f"{proc.returncode}, {time.perf_counter() - t0:.1f} s"
    out["(d) progressive 10/50/100: failed / requests"] = \
        f"{len(failed)} / {len(load.answers)}"
    bad = _QuietServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=bad.serve_forever, daemon=True).start()
    try:
        s.add("bad", "b-1", int(bad.server_address[1]))
        time.sleep(1.5)  # the member is in HAProxy's config and checked
        with KeepAlive(s.port) as load:
            time.sleep(1.0)
            proc = sh(*cmd, "--prefix", s.prefix, "cutover", SERVICE, "--to", "bad",
                      "--steps", "20,100", "--interval", "5s", "--max-error-rate", "1%",
                      check=False, timeout=120)
            time.sleep(1.0)
        errs = [a for a in load.answers if a[1] != 200]
        not_bad = [a for a in errs if a[2] != "bad"]
        window = (errs[-1][0] - errs[0][0]) if errs else 0.0
        out["(d) failing pool: exit (1 = rolled back)"] = str(proc.returncode)
        out["(d) failing pool: failed / requests (all from the bad pool?)"] = \
            f"{len(errs)} / {len(load.answers)} ({'yes' if not not_bad else 'NO'})"
        out["(d) failing pool: first error -> last error (rollback)"] = f"{window:.2f} s"
        tail = [ln for ln in proc.stdout.splitlines() if "ROLLED BACK" in ln]
        out["(d) failing pool: command says"] = tail[0][:120] if tail else proc.stdout[-200:]
    finally:
        s.remove("bad", "b-1")
        bad.shutdown()
        bad.server_close()
    return out


# --------------------------------------------------------------------------- report


def machine() -> str:
    return describe("haproxy", "-v")


def report(p: Params, figs: Sequence[Figures]) -> None:
    rec, base = figs[0], figs[1] if len(figs) > 1 else None

    def cell(f: Figures | None, fn: Callable[[Figures], str]) -> str:
        return fn(f) if f is not None else "-"

    def ms(q: float, attr: str) -> Callable[[Figures], str]:
        return lambda f: f"{pct(getattr(f, attr), q):.1f} ms"

    def fails(profile: str) -> Callable[[Figures], str]:
        def one(f: Figures) -> str:
            r = f.loads.get(profile)
            return f"{r.failures} / {r.requests}" if r else "-"
        return one

    rows = [
        (f"(a) flip -> 100% new pool, p50 ({p.flips} flips)", ms(.5, "flips_ms"), ""),
        (f"(a) flip -> 100% new pool, p95 ({p.flips} flips)", ms(.95, "flips_ms"),
         f"<= {TARGETS['flip_p95_ms']:.0f} ms"),
        (f"(b) new member -> traffic, p50 ({p.adds} adds)", ms(.5, "adds_ms"), ""),
        (f"(b) new member -> traffic, p95 ({p.adds} adds)", ms(.95, "adds_ms"),
         f"<= {TARGETS['add_p95_ms']:.0f} ms, < baseline"),
        ("(b) failed / requests during the adds and removals",
         lambda f: f"{f.adds_counts.failures} / {f.adds_counts.requests}", "0"),
        ("(b) reloads during the adds and removals",
         lambda f: str(f.adds_reloads), "0"),
    ]
    for profile in p.profiles:
        rows.append((f"(c) failed / requests, {profile}", fails(profile), "0"))
    head = ("metric", "reconciler", "baseline", "target")
    table = [head] + [(m, cell(rec, fn), cell(base, fn), t) for m, fn, t in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    print()
    print(f"machine: {machine()}")
    print("load average (1/5/15 min) at the end: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"(c): {p.flips} flips + {p.changes} member changes, one every "
          f"{p.interval:g} s; wrk -t2 -c20; hey -c {p.hey_conc} -q {p.hey_qps} "
          f"-disable-keepalive; idle: {p.idle_conns} keep-alive connections, 50-500 ms think")
    print()
    for i, r in enumerate(table):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    for f in figs:
        print(f"{f.label} reloads during (c): "
              + ", ".join(f"{k} {v}" for k, v in f.reloads.items()))
    if base is not None and rec.adds_ms and base.adds_ms:
        print(f"(b) new member -> traffic, p95: baseline / reconciler = "
              f"{pct(base.adds_ms, .95) / pct(rec.adds_ms, .95):.1f}x")


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["_baseline"]:
        return baseline_watch(args_in[1], Path(args_in[2]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 10 flips, 5 adds, 6 changes, short loads")
    ap.add_argument("--flips", type=int, default=None, help="flips for (a) and (c) (50)")
    ap.add_argument("--adds", type=int, default=None, help="member additions for (b) (20)")
    ap.add_argument("--changes", type=int, default=None,
                    help="member changes for (c), add+remove pairs (20)")
    ap.add_argument("--interval", type=float, default=0.25,
                    help="seconds between changes in (c) (0.25)")
    ap.add_argument("--run", type=int, default=20,
                    help="consecutive new-pool answers that make a flip complete (20)")
    ap.add_argument("--members", type=int, default=3, help="backends per pool (3)")
    ap.add_argument("--profiles", default=",".join(PROFILES),
                    help=f"client profiles for (c), of {','.join(PROFILES)}")
    ap.add_argument("--hey-conc", type=int, default=8, help="hey connections (8)")
    ap.add_argument("--hey-qps", type=int, default=100, help="hey rate per connection (100)")
    ap.add_argument("--idle-conns", type=int, default=10, help="idle-profile connections (10)")
    ap.add_argument("--no-baseline", action="store_true", help="measure the reconciler only")
    ap.add_argument("--progressive", action="store_true",
                    help="also (d): progressive cutovers, one failing (reconciler only)")
    ap.add_argument("--progressive-only", action="store_true",
                    help="only (d), on the reconciler")
    ap.add_argument("--keep-log", action="store_true", help="keep the work directory")
    args = ap.parse_args(args_in)
    quick = args.quick
    profiles = tuple(x for x in args.profiles.split(",") if x)
    if any(x not in PROFILES for x in profiles):
        ap.error(f"--profiles: of {', '.join(PROFILES)}")
    p = Params(
        flips=args.flips if args.flips is not None else (10 if quick else 50),
        adds=args.adds if args.adds is not None else (5 if quick else 20),
        changes=args.changes if args.changes is not None else (6 if quick else 20),
        interval=args.interval, run=args.run, lead=1.0 if quick else 2.0,
        tail=2.0 if quick else 3.0, profiles=profiles, hey_conc=args.hey_conc,
        hey_qps=args.hey_qps, idle_conns=args.idle_conns)
    if p.flips < 1 or p.adds < 1 or p.changes < 0 or args.members < 1:
        ap.error("--flips, --adds, --members: at least 1; --changes: at least 0")
    for tool in ("haproxy", "busybox", *(t for t in ("wrk", "hey") if t in profiles)):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (make deps)", file=sys.stderr)
            return 1

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the cleanup below

    signal.signal(signal.SIGTERM, on_term)
    rid = secrets.token_hex(3)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-proxy-{rid}-"))
    kv = ConsulKV(ConsulSettings.from_env())
    backends = Backends(workdir)
    setups: list[Setup] = []
    keep = args.keep_log
    try:
        pools = {pool: [backends.start(pool, f"{pool}-{i + 1}") for i in range(args.members)]
                 for pool in POOLS}
        extra = [backends.start("extra", f"x-{i + 1}") for i in range(2)]
        backends.wait_ready()
        figs: list[Figures] = []
        if args.progressive_only:
            rs = ReconcilerSetup(rid, workdir, kv, pools)
            setups.append(rs)
            rs.start()
            print("--- reconciler: progressive cutovers", flush=True)
            for k, v in measure_progressive(rs).items():
                print(f"{k}: {v}")
            return 0
        classes: list[type[Setup]] = [ReconcilerSetup]
        if not args.no_baseline:
            classes.append(BaselineSetup)
        for cls in classes:
            s = cls(rid, workdir, kv, pools)
            setups.append(s)
            try:
                figs.append(run_setup(s, p, extra))
            except BaseException:
                keep = True
                raise
        report(p, figs)
        if args.progressive:
            rs = ReconcilerSetup(rid, workdir, kv, pools)
            rs.prefix, rs.node = f"rbq-{rid}/", f"rbqnode-{rid}"
            rs.state_dir = workdir / "reconciler-progressive"
            setups.append(rs)
            rs.start()
            print("--- reconciler: progressive cutovers", flush=True)
            for k, v in measure_progressive(rs).items():
                print(f"{k}: {v}")
        return 0
    finally:
        for s in setups:
            with contextlib.suppress(Exception):
                s.stop()
            with contextlib.suppress(Exception):
                kv.delete(s.prefix, recurse=True)
        backends.stop()
        kv.close()
        if keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
