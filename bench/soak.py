"""Soak: one daemon under container churn, pool flips and member churn, with HTTP load on
its HAProxy, for `--minutes`; reports whether it stays flat and loses nothing.

Owns the soak figures of docs/performance.md. Under a fresh prefix it puts one OVS network
(vlan 200, a /24 pool of a free 10.77.X.0/24), one label-matched container spec
(``auto`` address) and one blue-green service whose pools hold busybox httpd backends on
127.0.0.1 (three per pool: one stable, two churned). Then, until the time is up:

- container churn: every `--churn-every` seconds the oldest of `--containers` running
  containers is removed and a new one started (Docker events drive attach and detach);
- member churn: every second one churnable member is deleted or put back;
- flips: every 5 s the active pool switches; the time until a fresh request is answered
  by the new pool is recorded;
- load: two keep-alive clients and one new-connection-per-request client send GET / to
  HAProxy all the time (a 5 ms think time); any exception or non-200 is a failed request;
- every 5 s the daemon's RSS (VmRSS, and its RssAnon and RssFile parts) and open fds
  (/proc/PID/fd) are sampled (`--samples CSV` writes them out).

Reported: RSS and fd count after the warm-up (the first fifth, at least 20 s) and at the
end, with their growth; the RSS slope (least squares) over each half of the time after
the warm-up, per hour and per 1,000 container cycles (memory that levels off has a
smaller slope in the second half; a leak the same per cycle), the same for RSS and
RssAnon (allocated memory, apart from mapped code) over each quarter, and the fds' median
per half; reconcile duration p50/p99 by kind from the daemon's /metrics
histogram ``reconciler_reconcile_duration_seconds`` (deltas over the run, upper bucket
bounds); flip-to-served p50/p99; requests and failures.

`--member-pool` makes every churned container a member (a new name each time) of a pool
that is never active; `--tracemalloc PREFIX` runs the daemon with
reconciler.observe.memtrace on (snapshots at the end of the warm-up, every
$BENCH_SOAK_TRACE_EVERY s and at the end; RECONCILER_TRACEMALLOC_FRAMES=0 for the
allocator figures alone). `--churn-every 0.3 --member-pool` shows in 5 minutes what the
default shows in half an hour. At the end every live container
must be attached with a distinct address, then with everything removed nothing may be
left: no OVS port, host veth, IPAM allocation, status error, or the bridge itself.

Exits 1 when something does not work: a failed request, a leak, a daemon that died, fd
growth after the warm-up above 5, or RSS growth after the warm-up above 25 % (it asserts
nothing about time). Everything it creates is removed at the end, also on failure.
Needs `make services` (Consul, dockerd, OVS, HAProxy, the test image) and root.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _machine import describe  # bench/_machine.py (they run as scripts)
from _proc import free_port, kill_pid, open_fds, pct, rss_mib, rss_parts_mib, sh, stop_popen
from prometheus_client.parser import text_string_to_metric_families

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
from reconciler.adapters.netlink import host_veth_name

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("RECONCILER_TEST_IMAGE", "reconciler-test/busybox:latest")
IFNAME = "eth1"
POOLS = ("blue", "green")
MEMBER_POOL = "churn"  # --member-pool: the churned containers publish themselves here
HISTOGRAM = "reconciler_reconcile_duration_seconds"
FD_GROWTH_LIMIT = 5
RSS_GROWTH_LIMIT = 0.25


# --------------------------------------------------------------------------- helpers


def fetch(port: int, timeout: float = 1.0) -> str | None:
    """One GET / on a fresh connection; the body, or None on any failure."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace").strip()
            return body if resp.status == 200 else None
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None


def wait(cond: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s (last {value!r})")
        time.sleep(interval)


def free_octet() -> int:
    """A third octet X of 10.77.X.0/24 that no host route uses (the host is shared)."""
    used: set[int] = set()
    for word in sh("ip", "-4", "route", "show", "table", "all").stdout.split():
        if word.startswith("10.77."):
            with contextlib.suppress(ValueError, IndexError):
                used.add(int(word.split(".")[2].split("/")[0]))
    seed = secrets.randbelow(200)
    for x in (20 + (seed + i * 13) % 230 for i in range(230)):
        if x not in used:
            return x
    raise RuntimeError("no free 10.77.X.0/24")


def histogram(text: str) -> dict[str, dict[float, float]]:
    """kind -> {upper bound: cumulative count} of the reconcile duration histogram."""
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != HISTOGRAM:
            continue
        for s in family.samples:
            if s.name == HISTOGRAM + "_bucket":
                out.setdefault(s.labels["kind"], {})[float(s.labels["le"])] = s.value
    return out


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile `q` (None: no observation)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    for b in bounds:
        if buckets[b] >= q * total:
            return b
    return bounds[-1]


# --------------------------------------------------------------------------- load


class Load:
    """HTTP clients against HAProxy: `keepalive` reusing a connection, `fresh` opening one
    per request; 5 ms think time, no retry. Any exception or non-200 is a failure."""

    def __init__(self, port: int, keepalive: int = 2, fresh: int = 1) -> None:
        self.port = port
        self.requests = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(True,), daemon=True)
                         for _ in range(keepalive)]
        self._threads += [threading.Thread(target=self._run, args=(False,), daemon=True)
                          for _ in range(fresh)]

    def _run(self, keepalive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            failure = None
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    failure = f"HTTP {resp.status}: {body[:80]!r}"
            except (OSError, http.client.HTTPException) as exc:
                failure = repr(exc)
            if failure is not None or not keepalive:
                conn.close()
                conn = None
            with self._lock:
                self.requests += 1
                if failure is not None:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {failure}")
            self._stop.wait(0.005)
        if conn is not None:
            conn.close()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


# --------------------------------------------------------------------------- the soak


@dataclass
class Sample:
    t: float
    rss_mib: float
    fds: int
    cycles: int = 0  # containers replaced so far
    anon_mib: float = 0.0  # RssAnon: what the daemon allocated (a leak grows this)
    file_mib: float = 0.0  # RssFile + RssShmem: mapped code and libraries


@dataclass(frozen=True)
class Trend:
    """A least-squares line through samples: growth per hour and per 1,000 container
    cycles (replacements), and how far the samples stray from it."""

    start: float  # the window's first sample time, from the run's start (s)
    per_hour: float
    per_kcycles: float | None
    residual: float  # the largest distance of a sample from the line


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ys over xs (0 with fewer than two distinct xs)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def trend(samples: Sequence[Sample], value: Any, t0: float) -> Trend:
    """The trend of `value(sample)` over `samples` (at least two)."""
    ts = [s.t for s in samples]
    ys = [float(value(s)) for s in samples]
    per_s = slope(ts, ys)
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    residual = max(abs(y - (my + per_s * (t - mt))) for t, y in zip(ts, ys, strict=True))
    cycles = [float(s.cycles) for s in samples]
    per_cycle = slope(cycles, ys) if cycles[-1] > cycles[0] else None
    return Trend(samples[0].t - t0, per_s * 3600,
                 None if per_cycle is None else per_cycle * 1000, residual)


@dataclass
class Figures:
    minutes: float = 0.0
    containers_started: int = 0
    containers_removed: int = 0
    flips: int = 0
    member_changes: int = 0
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    warmup_s: float = 0.0
    flip_s: list[float] = field(default_factory=list)
    p50: dict[str, float | None] = field(default_factory=dict)
    p99: dict[str, float | None] = field(default_factory=dict)
    reconciles: dict[str, int] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, minutes: float, containers: int, churn_every: float,
                 keep_log: bool, tracemalloc: str | None = None,
                 member_pool: bool = False) -> None:
        import docker

        self.minutes = minutes
        self.n = containers
        self.churn_every = churn_every
        self.keep_log = keep_log
        self.tracemalloc = tracemalloc
        self.member_pool = member_pool
        self.rid = secrets.token_hex(3)
        self.prefix = f"rs-{self.rid}/"
        self.node = f"rsnode-{self.rid}"
        self.spec = f"soak-{self.rid}"
        self.net = f"sn-{self.rid}"
        self.bridge = f"rsb{self.rid}"
        self.octet = free_octet()
        self.subnet = ipaddress.ip_network(f"10.77.{self.octet}.0/24")
        self.bind = free_port()
        self.metrics_port = free_port()
        self.kv = ConsulKV(ConsulSettings.from_env())
        self.docker = docker.from_env(timeout=120)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-soak-{self.rid}-"))
        self.log_path = self.workdir / "daemon.log"
        self.state_dir = self.workdir / "state"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.backends: dict[str, tuple[str, int, subprocess.Popen[bytes]]] = {}
        self.live: list[Any] = []
        self.ever: list[str] = []  # ids of every container started
        self.counter = 0
        self.members: dict[str, bool] = {}  # "pool/name" -> published
        self.active = POOLS[0]
        self.fig = Figures(minutes=minutes)

    # ---------------------------------------------------------------- setup

    def svc(self) -> str:
        return f"{self.prefix}services/web/"

    def put(self, key: str, value: Any) -> None:
        raw = value.encode() if isinstance(value, str) else json.dumps(value).encode()
        self.kv.put(key, raw)

    def start_backend(self, pool: str, name: str) -> None:
        root = self.workdir / "www" / name
        root.mkdir(parents=True)
        (root / "index.html").write_text(f"{pool} {name}\n")
        (root / "health").write_text("ok\n")
        port = free_port()
        proc = subprocess.Popen(["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}",
                                 "-h", str(root)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.backends[f"{pool}/{name}"] = (pool, port, proc)
        wait(lambda: fetch(port) is not None, 10, f"backend {name}", 0.02)

    def put_member(self, member: str) -> None:
        _, port, _ = self.backends[member]
        self.put(f"{self.svc()}pools/{member}", {"address": "127.0.0.1", "port": port})
        self.members[member] = True

    def delete_member(self, member: str) -> None:
        self.kv.delete(f"{self.svc()}pools/{member}")
        self.members[member] = False

    def start_daemon(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "--prefix", self.prefix, "run", "--node",
             self.node, "--state-dir", str(self.state_dir),
             "--listen", f"127.0.0.1:{self.metrics_port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.trace_env()})
        log.close()

    def trace_env(self) -> dict[str, str]:
        if not self.tracemalloc:
            return {}
        return {"RECONCILER_TRACEMALLOC": self.tracemalloc,
                "RECONCILER_TRACEMALLOC_EVERY": os.environ.get("BENCH_SOAK_TRACE_EVERY",
                                                               "60")}

    def snapshot(self) -> None:
        """Ask a traced daemon for a tracemalloc snapshot (reconciler.observe.memtrace)."""
        if self.tracemalloc and self.daemon is not None and self.alive():
            self.daemon.send_signal(signal.SIGUSR2)

    def start_container(self) -> None:
        self.counter += 1
        labels = {"reconciler.name": self.spec, "reconciler-bench.run": self.rid}
        if self.member_pool:
            # A member of a pool that is never active, named after the container: a new
            # member name for every container (served by nobody: its health check fails).
            labels |= {"reconciler.service": "web", "reconciler.pool": MEMBER_POOL,
                       "reconciler.port": "80", "reconciler.network": self.net}
        c = self.docker.containers.run(
            IMAGE, command=["sleep", "86400"], name=f"rs-{self.rid}-{self.counter}",
            detach=True, network_mode="none", labels=labels)
        self.live.append(c)
        self.ever.append(c.id)
        self.fig.containers_started += 1

    def remove_oldest(self) -> None:
        c = self.live.pop(0)
        c.remove(force=True)
        self.fig.containers_removed += 1

    def setup(self) -> None:
        for pool in POOLS:
            for i in range(3):
                self.start_backend(pool, f"{pool[0]}{i}")
        self.put(f"{self.prefix}networks/{self.net}", {
            "subnet": str(self.subnet), "bridge": self.bridge, "driver": "ovs", "vlan": 200,
            "gateway": f"10.77.{self.octet}.1",
            "pool": {"start": f"10.77.{self.octet}.10", "end": f"10.77.{self.octet}.250"}})
        self.put(f"{self.prefix}containers/{self.spec}", {"interfaces": [
            {"name": IFNAME, "network": self.net, "address": "auto"}]})
        self.put(self.svc() + "config", {
            "bind": f"127.0.0.1:{self.bind}", "mode": "http", "balance": "roundrobin",
            "health": {"path": "/health", "interval_ms": 1000}})
        self.put(self.svc() + "active", self.active)
        for member in self.backends:
            self.put_member(member)
        self.start_daemon()
        wait(lambda: (fetch(self.bind) or "").startswith(self.active + " "), 60,
             "HAProxy serving")
        for _ in range(self.n):
            self.start_container()
        self.wait_converged(60)

    # ---------------------------------------------------------------- checks

    def ipam(self) -> dict[str, dict[str, Any]]:
        base = f"{self.prefix}ipam/{self.net}/"
        items = self.kv.read_prefix(base, consistent=True).items
        return {k[len(base):]: json.loads(i.value) for k, i in items.items()}

    def ports(self) -> set[str]:
        proc = sh("ovs-vsctl", "--timeout=10", "list-ports", self.bridge, check=False)
        return set(proc.stdout.split()) if proc.returncode == 0 else set()

    def address_of(self, c: Any) -> str | None:
        c.reload()
        pid = c.attrs["State"]["Pid"]
        proc = sh("nsenter", "-t", str(pid), "-n", "ip", "-j", "-4", "addr", "show", "dev",
                  IFNAME, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        for link in json.loads(proc.stdout):
            if "UP" not in link.get("flags", []):
                return None
            for a in link.get("addr_info", []):
                return f"{a['local']}/{a['prefixlen']}"
        return None

    def status(self) -> dict[str, Any]:
        item = self.kv.get(f"{self.prefix}nodes/{self.node}/status")
        return json.loads(item.value) if item is not None else {}

    def converged(self) -> bool:
        want = {host_veth_name(c.id, IFNAME) for c in self.live}
        if {p for p in self.ports() if p.startswith("rv")} != want:
            return False
        if {v["container"] for v in self.ipam().values()} != {c.id for c in self.live}:
            return False
        addrs = [self.address_of(c) for c in self.live]
        return None not in addrs and len(set(addrs)) == len(addrs) and all(
            ipaddress.ip_interface(a).network == self.subnet for a in addrs if a)

    def wait_converged(self, timeout: float) -> None:
        wait(self.converged, timeout, "every live container attached, nothing else", 0.5)

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    # ---------------------------------------------------------------- the run

    def flip(self) -> None:
        new = POOLS[1] if self.active == POOLS[0] else POOLS[0]
        t0 = time.monotonic()
        self.put(self.svc() + "active", new)
        self.active = new
        wait(lambda: (fetch(self.bind) or "").startswith(new + " "), 30, f"flip to {new}",
             0.01)
        self.fig.flip_s.append(time.monotonic() - t0)
        self.fig.flips += 1

    def churn_member(self, rng: random.Random) -> None:
        member = rng.choice([m for m in self.backends if not m.endswith("0")])
        if self.members[member]:
            self.delete_member(member)
        else:
            self.put_member(member)
        self.fig.member_changes += 1

    def sample(self) -> None:
        assert self.daemon is not None
        pid = self.daemon.pid
        anon, file = rss_parts_mib(pid)
        self.fig.samples.append(Sample(time.monotonic(), rss_mib(pid), open_fds(pid),
                                       self.fig.containers_removed, anon, file))

    def soak(self) -> None:
        rng = random.Random(int(self.rid, 16))
        duration = self.minutes * 60
        self.fig.warmup_s = max(20.0, duration / 5)
        hist0 = histogram(self.metrics())
        load = Load(self.bind)
        load.start()
        t0 = time.monotonic()
        next_churn = next_flip = next_sample = next_member = t0
        warm = False
        try:
            while (now := time.monotonic()) < t0 + duration:
                if not self.alive():
                    raise RuntimeError("the daemon died")
                if not warm and now - t0 >= self.fig.warmup_s:
                    warm = True
                    self.snapshot()
                if now >= next_sample:
                    self.sample()
                    next_sample += 5
                if now >= next_churn:
                    self.remove_oldest()
                    self.start_container()
                    # Never more than one replacement behind (docker run may be slower).
                    next_churn = max(next_churn + self.churn_every, time.monotonic())
                if now >= next_flip:
                    self.flip()
                    next_flip += 5
                if now >= next_member:
                    self.churn_member(rng)
                    next_member += 1
                time.sleep(max(0.0, min(next_churn, next_flip, next_sample, next_member)
                               - time.monotonic()))
        finally:
            load.stop()
            self.fig.requests = load.requests
            self.fig.failures = list(load.failures)
        self.sample()
        self.snapshot()
        self.wait_converged(60)
        hist1 = histogram(self.metrics())
        allb: dict[float, float] = {}
        for kind, b1 in hist1.items():
            delta = {le: v - hist0.get(kind, {}).get(le, 0.0) for le, v in b1.items()}
            if max(delta.values(), default=0) <= 0:
                continue
            self.fig.reconciles[kind] = int(delta[max(delta)])
            self.fig.p50[kind] = quantile(delta, 0.50)
            self.fig.p99[kind] = quantile(delta, 0.99)
            for le, v in delta.items():
                allb[le] = allb.get(le, 0.0) + v
        self.fig.p50["all"] = quantile(allb, 0.50)
        self.fig.p99["all"] = quantile(allb, 0.99)
        errors = self.status().get("errors") or {}
        self.fig.errors = [f"{k}: {v}" for k, v in errors.items()]

    def teardown_checks(self) -> None:
        """Remove everything through the daemon; nothing may be left behind."""
        self.kv.delete(f"{self.prefix}containers/{self.spec}")
        while self.live:
            self.remove_oldest()
        deadline = time.monotonic() + 30
        veths = [host_veth_name(cid, IFNAME) for cid in self.ever]
        leaks: list[str] = []
        while time.monotonic() < deadline:
            leaks = []
            if ports := {p for p in self.ports() if p.startswith("rv")}:
                leaks.append(f"OVS ports {sorted(ports)}")
            if alloc := self.ipam():
                leaks.append(f"IPAM allocations {sorted(alloc)}")
            host = set(os.listdir("/sys/class/net"))
            if left := [v for v in veths if v in host]:
                leaks.append(f"host veths {left}")
            if not leaks:
                break
            time.sleep(0.5)
        self.kv.delete(f"{self.prefix}networks/{self.net}")
        with contextlib.suppress(TimeoutError):
            wait(lambda: sh("ovs-vsctl", "--timeout=10", "br-exists", self.bridge,
                            check=False).returncode == 2, 20, "bridge removed", 0.2)
        if sh("ovs-vsctl", "--timeout=10", "br-exists", self.bridge,
              check=False).returncode != 2:
            leaks.append(f"bridge {self.bridge} of the deleted network")
        self.fig.leaks = leaks

    def cleanup(self) -> None:
        import docker.errors

        stop_popen(self.daemon, 20)
        self.daemon = None
        with contextlib.suppress(OSError, ValueError):
            for word in (self.state_dir / "haproxy.pid").read_text().split():
                kill_pid(int(word), "haproxy")
        for _, _, proc in self.backends.values():
            stop_popen(proc)
        # Docker last among the processes: a dockerd that does not answer (its API timed
        # out at setup once, on a shared machine) must not leave the backends running.
        try:
            leftovers = self.docker.containers.list(
                all=True, filters={"label": f"reconciler-bench.run={self.rid}"})
            for c in leftovers:
                with contextlib.suppress(docker.errors.NotFound):
                    c.remove(force=True)
        except (docker.errors.DockerException, OSError) as e:  # timeouts are OSErrors
            print(f"cleanup: containers labelled reconciler-bench.run={self.rid} may be "
                  f"left: {e}", file=sys.stderr)
        sh("ovs-vsctl", "--timeout=10", "--if-exists", "del-br", self.bridge, check=False)
        with contextlib.suppress(Exception):
            self.kv.delete(self.prefix, recurse=True)
        self.kv.close()
        self.docker.close()
        if not self.keep_log:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self) -> Figures:
        ok = False
        try:
            self.setup()
            self.soak()
            self.teardown_checks()
            ok = True
            return self.fig
        finally:
            if not ok:
                with contextlib.suppress(OSError):
                    print("--- daemon /metrics (queue):", *[
                        line for line in self.metrics().splitlines()
                        if "queue" in line or "in_flight" in line], sep="\n", file=sys.stderr)
                print(f"--- daemon log ({self.log_path}), last lines:", file=sys.stderr)
                with contextlib.suppress(OSError):
                    print(self.log_path.read_text(errors="replace")[-6000:], file=sys.stderr)
                self.keep_log = True
            self.cleanup()


# --------------------------------------------------------------------------- report


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v * 1000:.1f}" if v < 1 else f"{v * 1000:.0f}")


def report(f: Figures) -> list[str]:
    """Print the figures; the list of what did not work (empty: it worked)."""
    print(f"machine: {describe('haproxy', '-v')}")
    print(f"duration {f.minutes:g} min: {f.containers_started} containers started, "
          f"{f.containers_removed} removed, {f.flips} flips, {f.member_changes} member "
          f"changes; {f.requests} requests, {len(f.failures)} failed")
    after = [s for s in f.samples if s.t - f.samples[0].t >= f.warmup_s] or f.samples[-1:]
    first, last = after[0], f.samples[-1]
    rss_growth = last.rss_mib - first.rss_mib
    fd_growth = last.fds - first.fds
    print(f"daemon RSS MiB: start {f.samples[0].rss_mib:.1f}, after {f.warmup_s:.0f}s warm-up "
          f"{first.rss_mib:.1f}, end {last.rss_mib:.1f} (growth {rss_growth:+.1f}), max "
          f"{max(s.rss_mib for s in f.samples):.1f}")
    print(f"daemon open fds: start {f.samples[0].fds}, after warm-up {first.fds}, end "
          f"{last.fds} (growth {fd_growth:+d}), max {max(s.fds for s in f.samples)}")
    # Warm-up against steady state: a line through each half of the run after the
    # warm-up. Memory that levels off shows a smaller slope in the second half than in
    # the first; a leak grows at the same rate (per container cycle) in both. fds come
    # and go in bursts (sockets of containers being attached): their medians.
    halves = [h for h in (after[: len(after) // 2], after[len(after) // 2:]) if len(h) >= 2]
    t0 = f.samples[0].t
    parts = []
    for name, half in zip(("first", "second"), halves, strict=False):
        tr = trend(half, lambda s: s.rss_mib, t0)
        per_k = "-" if tr.per_kcycles is None else f"{tr.per_kcycles:+.2f}"
        parts.append(f"{name} half (from {tr.start:.0f}s) {tr.per_hour:+.1f} MiB/h, "
                     f"{per_k} MiB/1,000 cycles (scatter {tr.residual:.1f})")
    if parts:
        print("daemon RSS slope after the warm-up: " + "; ".join(parts))
        print("daemon open fds after the warm-up, median: " + ", ".join(
            f"{name} half {pct([s.fds for s in half], 0.5):.0f}"
            for name, half in zip(("first", "second"), halves, strict=False)))
    # Where RSS went: anonymous memory (allocations: a leak grows this) against mapped
    # files (code and libraries: pages touched once, as code paths first run), each
    # over the quarters after the warm-up: what levels off reaches ~0 in the last ones.
    quarters = [after[i * len(after) // 4:(i + 1) * len(after) // 4] for i in range(4)]
    quarters = [q for q in quarters if len(q) >= 2]
    if len(quarters) == 4:
        print(f"daemon RssAnon MiB: after warm-up {first.anon_mib:.1f}, end {last.anon_mib:.1f}"
              f" ({last.anon_mib - first.anon_mib:+.1f}); RssFile+Shmem {first.file_mib:.1f}"
              f" -> {last.file_mib:.1f} ({last.file_mib - first.file_mib:+.1f})")
        for name, value in (("RssAnon", lambda s: s.anon_mib), ("RSS", lambda s: s.rss_mib)):
            cells = []
            for i, q in enumerate(quarters):
                tr = trend(q, value, t0)
                per_k = "-" if tr.per_kcycles is None else f"{tr.per_kcycles:+.2f}"
                cells.append(f"Q{i + 1} {tr.per_hour:+.1f} MiB/h, {per_k}/1,000 cycles")
            print(f"daemon {name} slope by quarter after the warm-up: " + "; ".join(cells))
    print("reconcile duration (daemon /metrics histogram, upper bucket bounds), ms:")
    for kind in sorted(f.p99, key=lambda k: (k == "all", k)):
        n = f.reconciles.get(kind, sum(f.reconciles.values()))
        print(f"  {kind:10s} n={n:6d}  p50 <= {_ms(f.p50[kind])}  p99 <= {_ms(f.p99[kind])}")
    if f.flip_s:
        print(f"flip to served by the new pool (fresh requests): p50 {pct(f.flip_s, .5)*1000:.0f}"
              f" ms, p99 {pct(f.flip_s, .99)*1000:.0f} ms, max {max(f.flip_s)*1000:.0f} ms")
    problems: list[str] = []
    if f.failures:
        problems.append(f"{len(f.failures)} failed requests, first: {f.failures[:5]}")
    if fd_growth > FD_GROWTH_LIMIT:
        problems.append(f"open fds grew by {fd_growth} after the warm-up")
    if first.rss_mib and rss_growth / first.rss_mib > RSS_GROWTH_LIMIT:
        problems.append(f"RSS grew by {rss_growth:.1f} MiB after the warm-up")
    if f.errors:
        problems.append(f"status errors: {f.errors}")
    problems += [f"leak: {leak}" for leak in f.leaks]
    print("leaks after removing everything: " + ("none" if not f.leaks else "; ".join(f.leaks)))
    print("verdict: " + ("OK (flat, nothing failed, nothing leaked)" if not problems
                         else "FAILED: " + "; ".join(problems)))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float,
                   default=float(os.environ.get("BENCH_SOAK_MINUTES", "1")),
                   help="how long to soak (default 1, $BENCH_SOAK_MINUTES)")
    p.add_argument("--containers", type=int, default=10,
                   help="containers kept running while churning (default 10)")
    p.add_argument("--churn-every", type=float, default=3.0,
                   help="seconds between container replacements (default 3)")
    p.add_argument("--keep-log", action="store_true", help="keep the daemon log directory")
    p.add_argument("--member-pool", action="store_true",
                   help=f"the churned containers publish themselves as members of an idle "
                        f"pool {MEMBER_POOL!r} (a new member name per container)")
    p.add_argument("--tracemalloc", metavar="PREFIX",
                   help="trace the daemon's allocations: snapshots PREFIX.NNN.snap at the "
                        "end of the warm-up, every $BENCH_SOAK_TRACE_EVERY s (60) and at the "
                        "end (compare with python -m reconciler.observe.memtrace)")
    p.add_argument("--samples", metavar="CSV",
                   help="write every RSS/fd sample (t, cycles, RSS, RssAnon, RssFile, fds)")
    args = p.parse_args(argv)
    if not 1 <= args.containers <= 200:
        p.error("--containers: 1 to 200")
    soak = Soak(args.minutes, args.containers, args.churn_every, args.keep_log,
                args.tracemalloc, args.member_pool)
    print(f"--- soak {args.minutes:g} min, prefix {soak.prefix}, log {soak.log_path}",
          flush=True)
    fig = soak.run()
    if args.samples:
        with open(args.samples, "w", encoding="ascii") as out:
            out.write("t_s,cycles,rss_mib,anon_mib,file_mib,fds\n")
            t0 = fig.samples[0].t if fig.samples else 0.0
            for smp in fig.samples:
                out.write(f"{smp.t - t0:.1f},{smp.cycles},{smp.rss_mib:.2f},"
                          f"{smp.anon_mib:.2f},{smp.file_mib:.2f},{smp.fds}\n")
    return 1 if report(fig) else 0


if __name__ == "__main__":
    raise SystemExit(main())
