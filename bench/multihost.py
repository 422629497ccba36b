"""Benchmark: many hosts, in the multi-host lab (`scripts/lab`, three hosts).

Owns the "Many hosts" figures of docs/performance.md. Brings the lab up with
``Lab().up()`` when it is not up (and leaves it up). Three parts, each against a baseline
measured in the same run:

1. attach across hosts: a container started on host2 (`docker run` returns) -> the first
   ICMP echo reply to its address from a container already running on host1 (remote),
   and, at the same time, from a container already running on host2 (local: the same
   waiter on the same host, which separates the overlay's propagation from the attach
   itself). One container after the other, ``--attach-n`` of them per network, on a
   Linux-bridge overlay and on an OVS overlay (vlan). Each container has its own spec
   with a static address, so the waiters ping it before it exists.
2. flips under load: one service, pools blue and green, members (labelled containers) on
   hosts 1, 2 and 3 on the Linux overlay; `hey` against every host's HAProxy at once while
   ``--cutovers`` cutovers (`reconciler cutover` on host1) and ``--changes`` member
   changes (a member of the live pool started, then stopped, on host2 or host3) are done;
   requests, non-2xx and errors per host.
3. cross-host TCP: one connection from a container on host1 to one on host2 through each
   overlay (sockets this process creates inside the two containers' namespaces, 1 MiB
   per send/recv: the image's busybox `nc` copies 1 KiB per system call and measures
   itself), against the same over a plain veth pair between two fresh namespaces; MB/s,
   the ratio, TCP segments retransmitted, ovs-vswitchd's CPU.

Prints figures; asserts nothing about time (it fails only if something does not work).
Its networks, containers, services, specs and namespaces carry a run id and are removed at
the end, also on failure. Needs root and `make deps` (the lab's tools, hey).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import re
import secrets
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from _machine import describe  # bench/_machine.py (they run as scripts)
from _proc import cpu_seconds, pct, sh

REPO = Path(__file__).resolve().parents[1]
IMAGE = "reconciler-test/busybox:latest"
CONSUL = "198.18.0.1:8500"  # host1's agent, from the root namespace
PREFIX = "reconciler/"
HOSTS = (1, 2, 3)
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
T = TypeVar("T")


# --------------------------------------------------------------------------- the lab


class LabLike(Protocol):
    """What this bench uses of tests/lab.py's `Lab` (imported at run time from tests/)."""

    hosts: int

    def up(self, hosts: int | None = None, *, daemon: bool = True, timeout: float = 600.0
           ) -> subprocess.CompletedProcess[str]: ...

    def status(self) -> subprocess.CompletedProcess[str]: ...

    def exec(self, host: str | int, *cmd: str, check: bool = False, timeout: float = 120.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]: ...

    def docker(self, host: str | int, *args: str, check: bool = True, timeout: float = 120.0
               ) -> subprocess.CompletedProcess[str]: ...

    def daemon_pid(self, host: str | int) -> int | None: ...


def lab_up() -> LabLike:
    """tests/lab.py's Lab, with the lab up (reused as it is when healthy; never taken down:
    `up` with another host count than the lab's would take it down first)."""
    sys.path.insert(0, str(REPO / "tests"))
    mod: Any = importlib.import_module("lab")
    recorded = mod.Lab.recorded_hosts()
    lab = cast(LabLike, mod.Lab(hosts=max(3, recorded or 3)))
    if recorded is None or recorded < 3 or lab.status().returncode != 0:
        print(f"--- bringing the lab up ({lab.hosts} hosts)", flush=True)
        t0 = time.monotonic()
        lab.up()
        print(f"  up in {time.monotonic() - t0:.0f}s", flush=True)
    return lab


# --------------------------------------------------------------------------- helpers


def wait_value(fn: Callable[[], T | None], timeout: float, what: str,
               interval: float = 0.2) -> T:
    """Call `fn` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s: {what}")
        time.sleep(interval)


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.2) -> None:
    wait_value(lambda: pred() or None, timeout, what, interval)


def kv_url(key: str) -> str:
    return f"http://{CONSUL}/v1/kv/{PREFIX}{key}"


def kv_put(key: str, value: Any) -> None:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    req = urllib.request.Request(kv_url(key), data=raw, method="PUT")
    with _OPENER.open(req, timeout=10) as resp:
        if resp.read().strip() != b"true":
            raise RuntimeError(f"KV put {key} refused")


def kv_txn_put(items: dict[str, Any]) -> None:
    """Put up to 64 keys in one Consul transaction."""
    import base64

    ops = [{"KV": {"Verb": "set", "Key": PREFIX + k,
                   "Value": base64.b64encode(json.dumps(v).encode()).decode()}}
           for k, v in items.items()]
    for i in range(0, len(ops), 64):
        req = urllib.request.Request(f"http://{CONSUL}/v1/txn",
                                     data=json.dumps(ops[i:i + 64]).encode(), method="PUT")
        with _OPENER.open(req, timeout=10) as resp:
            resp.read()


def kv_delete(key: str, recurse: bool = False) -> None:
    q = "?recurse=true" if recurse else ""
    req = urllib.request.Request(kv_url(key) + q, method="DELETE")
    with _OPENER.open(req, timeout=10) as resp:
        resp.read()


def kv_values(prefix: str) -> dict[str, bytes]:
    """Every key under `prefix` (relative to the reconciler prefix) and its raw value."""
    import base64

    try:
        with _OPENER.open(kv_url(prefix) + "?recurse=true", timeout=10) as resp:
            items = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise
    return {i["Key"][len(PREFIX):]: base64.b64decode(i["Value"] or "") for i in items}


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in_netns(netns_path: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created in another network namespace (it stays bound to that one)."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
        try:
            return socket.socket(family, kind, proto)
        finally:
            _setns(home)
    finally:
        os.close(home)
        os.close(fd)


def tcp_ext(netns_path: str, name: str) -> int:
    """A TcpExt counter (/proc/net/netstat) of that network namespace."""
    out = sh("nsenter", f"--net={netns_path}", "cat", "/proc/net/netstat").stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("TcpExt:")]
    return int(dict(zip(rows[0], rows[1], strict=True))[name])


# --------------------------------------------------------------------------- ping


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class Pinger:
    """ICMP echo requests from inside a container's network namespace (a raw socket
    created there by this process: no `docker exec` per probe)."""

    def __init__(self, pid: int, ident: int) -> None:
        self.sock = socket_in_netns(f"/proc/{pid}/ns/net", socket.AF_INET, socket.SOCK_RAW,
                                    socket.IPPROTO_ICMP)
        self.sock.setblocking(False)
        self.ident = ident & 0xFFFF
        self.seq = 0

    def _send(self, addr: str) -> None:
        self.seq = (self.seq + 1) & 0xFFFF
        head = struct.pack("!BBHHH", 8, 0, 0, self.ident, self.seq)
        payload = b"multihost-bench!" * 2
        packet = struct.pack("!BBHHH", 8, 0, _icmp_checksum(head + payload), self.ident,
                             self.seq) + payload
        with contextlib.suppress(OSError):  # no route / neighbour failed yet: try again
            self.sock.sendto(packet, (addr, 0))

    def _drain_for(self, addr: str) -> bool:
        got = False
        while True:
            try:
                data, (src, _) = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return got
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8 or src != addr:
                continue
            typ, _, _, ident, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if typ == 0 and ident == self.ident:
                got = True

    def first_reply(self, addr: str, timeout: float, stop: threading.Event,
                    period: float = 0.005) -> float | None:
        """Ping `addr` every `period` s; perf_counter() of the first reply (None: none)."""
        self._drain_for(addr)
        deadline = time.perf_counter() + timeout
        while not stop.is_set():
            self._send(addr)
            next_at = time.perf_counter() + period
            while True:
                rest = next_at - time.perf_counter()
                if rest <= 0:
                    break
                ready, _, _ = select.select([self.sock], [], [], rest)
                if ready and self._drain_for(addr):
                    return time.perf_counter()
            if time.perf_counter() > deadline:
                return None
        return None

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- the run


@dataclass
class Net:
    name: str
    driver: str
    octet: int
    vni: int
    vlan: int | None = None

    @property
    def label(self) -> str:
        return "Linux bridge" if self.driver == "linux" else "OVS (vlan)"

    @property
    def bridge(self) -> str:
        return self.name.replace("-", "")

    def addr(self, last: int) -> str:
        return f"10.77.{self.octet}.{last}"

    def value(self) -> dict[str, Any]:
        v: dict[str, Any] = {
            "subnet": f"10.77.{self.octet}.0/24", "bridge": self.bridge, "driver": self.driver,
            "gateway": self.addr(1),
            "pool": {"start": self.addr(100), "end": self.addr(199)},
            "overlay": {"vni": self.vni}}
        if self.vlan is not None:
            v["vlan"] = self.vlan
        return v


@dataclass
class Run:
    """What this run created (removed by `cleanup`)."""

    lab: LabLike
    rid: str
    nets: list[Net] = field(default_factory=list)
    containers: dict[str, int] = field(default_factory=dict)  # name -> host
    specs: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # what cleanup could not remove

    def container(self, host: int, name: str, spec: str, *cmd: str, **labels: str) -> str:
        args = ["run", "-d", "--name", name, "--net", "none", "-l", f"reconciler.name={spec}",
                "-l", f"reconciler-bench.run={self.rid}"]
        for k, v in labels.items():
            args += ["-l", f"reconciler.{k}={v}"]
        self.containers[name] = host
        self.lab.docker(host, *args, IMAGE, *(cmd or ("sleep", "86400")))
        return name

    def httpd(self, host: int, name: str, spec: str, text: str, **labels: str) -> str:
        return self.container(
            host, name, spec, "sh", "-c",
            f"mkdir -p /w && echo '{text}' >/w/index.html && echo ok >/w/health"
            " && exec httpd -f -p 8080 -h /w", **labels)

    def pid(self, name: str) -> int:
        out = self.lab.docker(self.containers[name], "inspect", "-f", "{{.State.Pid}}", name)
        return int(out.stdout.strip())

    def address(self, name: str, ifname: str = "eth1") -> str | None:
        out = self.lab.docker(self.containers[name], "exec", name, "ip", "-4", "-o", "addr",
                              "show", ifname, check=False).stdout.split()
        return out[out.index("inet") + 1].split("/")[0] if "inet" in out else None

    def remove(self, names: Sequence[str]) -> None:
        def rm(name: str) -> None:
            host = self.containers.get(name)
            if host is not None:
                self.lab.docker(host, "rm", "-f", name, check=False)
                self.containers.pop(name, None)

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(rm, list(names)))

    def settle(self, limit: float = 30.0) -> float:
        """Wait until every host's daemon is quiet (< 5 % of a core over 1 s)."""
        t0 = time.monotonic()
        pids = [p for p in (self.lab.daemon_pid(h) for h in HOSTS) if p is not None]
        while time.monotonic() - t0 < limit:
            try:
                before = sum(cpu_seconds(p) for p in pids)
                time.sleep(1.0)
                if sum(cpu_seconds(p) for p in pids) - before < 0.05:
                    break
            except OSError:
                break
        return time.monotonic() - t0

    def container_addresses(self) -> list[str]:
        """ipam keys of this run's networks held by a container (not by a host)."""
        return [k for n in self.nets for k, v in kv_values(f"ipam/{n.name}/").items()
                if b'"host:' not in v]

    def cleanup(self) -> None:
        # Also containers of this run a failure left untracked.
        for h in HOSTS:
            out = self.lab.docker(h, "ps", "-aq", "--filter",
                                  f"label=reconciler-bench.run={self.rid}", check=False)
            for cid in out.stdout.split():
                self.containers.setdefault(cid, h)
        self.remove(list(self.containers))
        for svc in self.services:
            for what in ("services", "audit"):
                with contextlib.suppress(Exception):
                    kv_delete(f"{what}/{svc}", recurse=True)
        for spec in self.specs:
            with contextlib.suppress(Exception):
                kv_delete(f"containers/{spec}")
        with contextlib.suppress(Exception):
            # The daemons release the containers' addresses (not the hosts' own).
            wait_until(lambda: not self.container_addresses(), 30, "addresses released")
        for net in self.nets:
            with contextlib.suppress(Exception):
                kv_delete(f"networks/{net.name}")
        time.sleep(1.0)
        for net in self.nets:  # the hosts' own addresses in the pool stay otherwise
            with contextlib.suppress(Exception):
                kv_delete(f"ipam/{net.name}/", recurse=True)
        for ns in self.netns:
            if sh("ip", "netns", "del", ns, check=False).returncode != 0:
                self.kept.append(f"netns {ns}")
        for h in HOSTS:
            left = self.lab.docker(h, "ps", "-aq", "--filter",
                                   f"label=reconciler-bench.run={self.rid}", check=False)
            self.kept += [f"host{h} container {c}" for c in left.stdout.split()]


def free_octets(count: int) -> list[int]:
    """Third octets X of 10.77.X.0/24 (230-238) no network in the lab's KV uses."""
    used: set[int] = set()
    for raw in kv_values("networks/").values():
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            used.add(int(json.loads(raw)["subnet"].split(".")[2]))
    free = [x for x in range(230, 239) if x not in used]
    if len(free) < count:
        raise RuntimeError(f"no {count} free 10.77.230-238.0/24 subnets in the lab's KV")
    start = secrets.randbelow(len(free))
    return (free[start:] + free[:start])[:count]


def free_vnis(rid: str, count: int) -> list[int]:
    used: set[int] = set()
    for raw in kv_values("networks/").values():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            used.add(int(json.loads(raw)["overlay"]["vni"]))
    base = 300000 + int(rid, 16) % 100000 * 10
    out = [v for v in range(base, base + 10) if v not in used]
    return out[:count]


# --------------------------------------------------------------------------- part 1


@dataclass
class AttachFigures:
    net: Net
    remote_s: list[float] = field(default_factory=list)
    local_s: list[float] = field(default_factory=list)
    run_s: list[float] = field(default_factory=list)  # `docker run` itself
    propagation_s: list[float] = field(default_factory=list)  # remote - local, paired


def watcher_ready(run: Run, name: str, neighbour_retrans_ms: int) -> Pinger:
    """The waiter in container `name`: its neighbour retransmit time lowered (the kernel
    default of 1 s between ARP attempts would dominate), a raw ICMP socket in its netns."""
    pid = run.pid(name)
    sh("nsenter", f"--net=/proc/{pid}/ns/net", "sysctl", "-q", "-w",
       f"net.ipv4.neigh.eth1.retrans_time_ms={neighbour_retrans_ms}")
    return Pinger(pid, secrets.randbelow(0xFFFF))


def _wait_reply(pinger: Pinger, addr: str, stop: threading.Event,
                got: dict[str, float | None], which: str) -> None:
    got[which] = pinger.first_reply(addr, 30, stop)


def attach_part(run: Run, nets: Sequence[Net], n: int) -> list[AttachFigures]:
    figs: list[AttachFigures] = []
    for net in nets:
        fig = AttachFigures(net)
        figs.append(fig)
        wspec = f"{net.name}-w"
        kv_put(f"containers/{wspec}", {"interfaces": [
            {"name": "eth1", "network": net.name, "address": "auto"}]})
        run.specs.append(wspec)
        remote_w = run.container(1, f"{net.name}-w1", wspec)
        local_w = run.container(2, f"{net.name}-w2", wspec)
        addrs = {w: wait_value(partial(run.address, w), 60, f"{w} addressed")
                 for w in (remote_w, local_w)}
        pingers = {"remote": watcher_ready(run, remote_w, 10),
                   "local": watcher_ready(run, local_w, 10)}
        stop = threading.Event()
        try:
            # The waiters reach each other (so both hosts' tunnels are up) first.
            if pingers["remote"].first_reply(addrs[local_w], 30, stop) is None:
                raise RuntimeError(f"{net.label}: {remote_w} (host1) does not reach "
                                   f"{local_w} (host2) at {addrs[local_w]}")
            specs = {f"{net.name}-{i}": net.addr(10 + i) for i in range(n)}
            kv_txn_put({f"containers/{s}": {"interfaces": [
                {"name": "eth1", "network": net.name, "address": f"{a}/24"}]}
                for s, a in specs.items()})
            run.specs += list(specs)
            run.settle()
            print(f"--- attach across hosts, {net.label} overlay {net.name}: {n} containers "
                  "on host2, one after the other", flush=True)
            started: list[str] = []
            for i, (spec, addr) in enumerate(specs.items()):
                got: dict[str, float | None] = {}
                threads = [threading.Thread(target=_wait_reply,
                                            args=(pingers[w], addr, stop, got, w), daemon=True)
                           for w in pingers]
                for t in threads:
                    t.start()
                t_call = time.perf_counter()
                started.append(run.container(2, f"{spec}-c", spec))
                t_ret = time.perf_counter()
                for t in threads:
                    t.join(40)
                if got.get("remote") is None or got.get("local") is None:
                    raise RuntimeError(
                        f"{net.label}: container {i + 1} ({addr}) never answered "
                        f"{'host1' if got.get('remote') is None else 'host2'}'s waiter")
                remote = cast(float, got["remote"]) - t_ret
                local = cast(float, got["local"]) - t_ret
                fig.remote_s.append(remote)
                fig.local_s.append(local)
                fig.run_s.append(t_ret - t_call)
                fig.propagation_s.append(remote - local)
                time.sleep(0.1)  # let the daemons finish their tail (member sync, status)
            print(f"  remote (host1) p50 {1000 * pct(fig.remote_s, .5):.0f} ms, p95 "
                  f"{1000 * pct(fig.remote_s, .95):.0f} ms; local (host2) p50 "
                  f"{1000 * pct(fig.local_s, .5):.0f} ms, p95 "
                  f"{1000 * pct(fig.local_s, .95):.0f} ms; docker run p50 "
                  f"{1000 * pct(fig.run_s, .5):.0f} ms", flush=True)
            run.remove([*started, remote_w, local_w])
            run.settle()
        finally:
            stop.set()
            for p in pingers.values():
                p.close()
    return figs


# --------------------------------------------------------------------------- part 2


@dataclass
class HeyResult:
    host: int
    requests: int = 0
    non2xx: int = 0
    errors: int = 0
    rps: float = 0.0
    slowest_s: float = 0.0
    p99_s: float = 0.0
    slow: int = 0  # in hey's histogram buckets of 0.5 s and more
    detail: str = ""


def parse_hey(host: int, out: str) -> HeyResult:
    r = HeyResult(host)
    status = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    if "Summary:" not in out:
        raise RuntimeError(f"host{host}: cannot read hey's output:\n{out}")
    errors: list[tuple[int, str]] = []
    if "Error distribution:" in out:
        for line in out.split("Error distribution:", 1)[1].splitlines():
            m = re.match(r"\s*\[(\d+)\]\s+(.*)", line)
            if m:
                errors.append((int(m.group(1)), m.group(2).strip()))
    r.non2xx = sum(n for c, n in status.items() if not 200 <= c < 300)
    r.errors = sum(n for n, _ in errors)
    r.requests = sum(status.values()) + r.errors
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r.rps = float(m.group(1)) if m else 0.0
    m = re.search(r"Slowest:\s+([\d.]+) secs", out)
    r.slowest_s = float(m.group(1)) if m else 0.0
    m = re.search(r"99%+ in ([\d.]+) secs", out)
    r.p99_s = float(m.group(1)) if m else 0.0
    if "Response time histogram:" in out:  # buckets "  <upper bound s> [<count>] |■■"
        hist = out.split("Response time histogram:", 1)[1].split("Latency distribution", 1)[0]
        r.slow = sum(int(n) for b, n in re.findall(r"([\d.]+) \[(\d+)\]", hist)
                     if float(b) >= 0.5)
    reasons: dict[str, int] = {}
    for n, msg in errors:  # hey names each connection: group by the reason
        reason = msg.rsplit(": ", 1)[-1]
        reasons[reason] = reasons.get(reason, 0) + n
    parts = [f"{n}x HTTP {c}" for c, n in sorted(status.items()) if not 200 <= c < 300]
    parts += [f"{n}x {reason}" for reason, n in sorted(reasons.items())]
    r.detail = "; ".join(parts)
    return r


@dataclass
class FlipFigures:
    cutovers_s: list[float] = field(default_factory=list)  # the command, start to exit
    applied_s: list[float] = field(default_factory=list)  # as it reports: switch -> applied
    refused: list[str] = field(default_factory=list)  # cutovers refused (then retried)
    served_s: dict[int, list[float]] = field(default_factory=dict)  # switch -> host serves
    watch_failed: int = 0  # the serve watches' own requests without a 200
    listen_drops_members: int = 0  # SYNs dropped by full accept queues during the load
    listen_drops_hosts: int = 0
    syn_retrans_hosts: int = 0  # SYNs sent again (1 s later) by the hosts (HAProxy)
    changes: list[str] = field(default_factory=list)
    loads: list[HeyResult] = field(default_factory=list)
    duration_s: float = 0.0
    conc: int = 0
    qps: int = 0
    late_events: int = 0


def serves(run: Run, host: int, port: int, tries: int = 12) -> set[str]:
    out = set()
    for _ in range(tries):
        body = run.lab.exec(host, "curl", "-s", "-m", "3", f"http://127.0.0.1:{port}/",
                            timeout=10).stdout.strip()
        if body:
            out.add(body)
    return out


def fetch(port: int, timeout: float = 1.0) -> str | None:
    """GET / from 127.0.0.1:`port` of this thread's namespace (fresh connection,
    HTTP/1.0); the body of a 200, else None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            chunks = []
            while data := sock.recv(4096):
                chunks.append(data)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
        return None
    return body.decode("utf-8", "replace").strip()


class ServeWatch(threading.Thread):
    """In host K's namespace (this thread only enters it): fresh requests to the
    service every `period` s until `streak` answers in a row come from `pool`; keeps
    the wall-clock time of the first of them."""

    def __init__(self, host: int, port: int, pool: str, timeout: float = 40.0,
                 streak: int = 5, period: float = 0.01) -> None:
        super().__init__(daemon=True, name=f"serve-watch-host{host}")
        self.host, self.port, self.pool = host, port, pool
        self.timeout, self.streak, self.period = timeout, streak, period
        self.first: float | None = None
        self.failed = 0  # requests without a 200 answer within 250 ms

    def run(self) -> None:
        fd = os.open(f"/run/netns/lab-host{self.host}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd)  # for this thread, which ends with the watch
        finally:
            os.close(fd)
        deadline = time.monotonic() + self.timeout
        run, first = 0, 0.0
        while time.monotonic() < deadline:
            now = time.time()
            # A request not answered within 250 ms is abandoned and counted (a SYN lost
            # somewhere waits 1 s for its retransmission): it would delay what is measured.
            body = fetch(self.port, timeout=0.25)
            if body is None:
                self.failed += 1
            elif body.startswith(self.pool + " "):
                if run == 0:
                    first = now
                run += 1
                if run >= self.streak:
                    self.first = first
                    return
            else:
                run = 0
            time.sleep(self.period)


def switched_at(svc: str, to: str) -> float | None:
    """When the last cutover of `svc` to `to` switched `active` (its audit record)."""
    recs = [json.loads(v) for v in kv_values(f"audit/{svc}/").values()]
    times = [float(r["time"]) for r in recs if r.get("to") == to and "time" in r]
    return max(times) if times else None


def serves_all(run: Run, host: int, port: int, want: set[str]) -> bool:
    return serves(run, host, port) >= want


def serves_only(run: Run, host: int, port: int, want: set[str]) -> bool:
    return serves(run, host, port) == want


def flips_part(run: Run, net: Net, cutovers: int, changes: int, interval: float, conc: int,
               qps: int) -> FlipFigures:
    lab = run.lab
    fig = FlipFigures(conc=conc, qps=qps)
    svc, port = f"mbs{run.rid}", 19000 + int(run.rid, 16) % 1000
    run.services.append(svc)
    spec = f"{net.name}-m"
    kv_put(f"containers/{spec}", {"interfaces": [
        {"name": "eth1", "network": net.name, "address": "auto", "gateway": True}]})
    run.specs.append(spec)
    kv_put(f"services/{svc}/config", {"bind": f"127.0.0.1:{port}", "mode": "http",
                                      "health": {"path": "/health", "interval_ms": 500}})
    kv_put(f"services/{svc}/active", b"blue")
    labels = {"service": svc, "port": "8080", "network": net.name}
    members: dict[str, set[str]] = {"blue": set(), "green": set()}
    for pool in members:
        for h in HOSTS:
            name = f"{net.name}-{pool}{h}"
            run.httpd(h, name, spec, f"{pool} {name}", pool=pool, **labels)
            members[pool].add(f"{pool} {name}")
    print(f"--- flips under load: service {svc} on 127.0.0.1:{port} of every host, pools "
          f"blue and green, one member of each on hosts 1, 2, 3 ({net.label} overlay)",
          flush=True)
    for h in HOSTS:
        try:
            wait_until(partial(serves_all, run, h, port, members["blue"]), 90,
                       f"host{h}'s HAProxy serves the blue members of hosts 1, 2 and 3", 0.5)
        except RuntimeError as exc:
            status = lab.exec(1, "reconciler", "status", timeout=30)
            raise RuntimeError(f"{exc}; it answers {sorted(serves(run, h, port, 6))}; "
                               f"reconciler status:\n{status.stdout}{status.stderr}") from None
    run.settle()

    # Events: cutovers, with a start + stop pair of a live-pool member between some of
    # them (never a cutover while the extra member exists: a cutover to a pool refuses
    # unless all its members are healthy).
    pairs = max(0, changes // 2)
    events: list[str] = []
    per, extra = divmod(cutovers, pairs) if pairs else (cutovers, 0)
    for i in range(max(pairs, 1)):
        events += ["cutover"] * (per + (1 if i < extra else 0))
        if pairs:
            events += ["start", "stop"]
    lead, tail = 3.0, 3.0
    duration = lead + len(events) * interval + tail
    fig.duration_s = duration
    results: dict[int, HeyResult] = {}
    failures: list[str] = []

    def load(h: int) -> None:
        cmd = ["hey", "-z", f"{duration:.0f}s", "-c", str(conc)]
        if qps > 0:
            cmd += ["-q", str(qps)]
        proc = lab.exec(h, *cmd, f"http://127.0.0.1:{port}/", timeout=duration + 120)
        if proc.returncode != 0:
            failures.append(f"host{h}: hey exited {proc.returncode}: {proc.stderr[-500:]}")
            return
        results[h] = parse_hey(h, proc.stdout)

    member_ns = [f"/proc/{run.pid(n)}/ns/net" for n in run.containers
                 if n.startswith(f"{net.name}-blue") or n.startswith(f"{net.name}-green")]
    host_ns = [f"/run/netns/lab-host{h}" for h in HOSTS]
    drops0 = [sum(tcp_ext(ns, "ListenDrops") for ns in nss) for nss in (member_ns, host_ns)]
    syn0 = sum(tcp_ext(ns, "TCPSynRetrans") for ns in host_ns)
    threads = [threading.Thread(target=load, args=(h,), daemon=True) for h in HOSTS]
    active = "blue"
    extra_member: tuple[int, str] | None = None
    n_started = 0
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(lead)
    for i, ev in enumerate(events):
        if ev == "cutover":
            to = "green" if active == "blue" else "blue"
            watches = [ServeWatch(h, port, to) for h in HOSTS]
            for w in watches:
                w.start()
            for _ in range(3):  # refused (its one-shot health probe failed): once more
                t0 = time.perf_counter()
                proc = lab.exec(1, "reconciler", "cutover", svc, "--to", to, "--timeout",
                                "30", timeout=60)
                text = (proc.stdout + proc.stderr).strip()
                if proc.returncode == 0 or "refused" not in text:
                    break
                fig.refused.append(" ".join(line.strip() for line in text.splitlines()
                                            if "UNHEALTHY" in line or "refused" in line))
                time.sleep(1.0)
            if proc.returncode != 0:
                failures.append(f"cutover {active} -> {to} exited {proc.returncode}: "
                                f"{text[-500:]}")
            else:
                fig.cutovers_s.append(time.perf_counter() - t0)
                m = re.search(r"every live node serves \S+ \(([\d.]+)s\)", proc.stdout)
                if m:
                    fig.applied_s.append(float(m.group(1)))
                active = to
            at = switched_at(svc, to)
            for w in watches:
                w.join(45)
                fig.watch_failed += w.failed
                if w.first is None or at is None:
                    failures.append(f"host{w.host} did not serve {to} within "
                                    f"{w.timeout:g}s of the cutover")
                else:
                    fig.served_s.setdefault(w.host, []).append(w.first - at)
        elif ev == "start":
            h = 2 + n_started % 2
            n_started += 1
            name = f"{net.name}-x{n_started}"
            t0 = time.perf_counter()
            run.httpd(h, name, spec, f"{active} {name}", pool=active, **labels)
            extra_member = (h, name)
            fig.changes.append(f"start {name} ({active}) on host{h}: docker run "
                               f"{time.perf_counter() - t0:.2f}s")
        elif extra_member is not None:
            h, name = extra_member
            t0 = time.perf_counter()
            lab.docker(h, "stop", "-t", "1", name)
            fig.changes.append(f"stop {name} on host{h}: docker stop -t 1 "
                               f"{time.perf_counter() - t0:.2f}s")
            run.remove([name])
            extra_member = None
        next_at = start + lead + (i + 1) * interval
        if time.perf_counter() > next_at + interval:
            fig.late_events += 1
        time.sleep(max(0.0, next_at - time.perf_counter()))
    for t in threads:
        t.join(duration + 180)
    fig.listen_drops_members, fig.listen_drops_hosts = (
        sum(tcp_ext(ns, "ListenDrops") for ns in nss) - d0
        for nss, d0 in zip((member_ns, host_ns), drops0, strict=True))
    fig.syn_retrans_hosts = sum(tcp_ext(ns, "TCPSynRetrans") for ns in host_ns) - syn0
    fig.loads = [results[h] for h in HOSTS if h in results]
    if failures:
        raise RuntimeError("; ".join(failures))
    if len(fig.loads) != len(HOSTS):
        raise RuntimeError("a load client did not finish")
    for r in fig.loads:
        print(f"  host{r.host}: {r.requests} requests ({r.rps:.0f}/s), non-2xx {r.non2xx}, "
              f"errors {r.errors}{' (' + r.detail + ')' if r.detail else ''}; slowest "
              f"{1000 * r.slowest_s:.0f} ms, p99 {1000 * r.p99_s:.0f} ms, {r.slow} took "
              ">= 0.5 s", flush=True)
    print(f"  {len(fig.cutovers_s)} cutovers: `reconciler cutover` p50 "
          f"{1000 * pct(fig.cutovers_s, .5):.0f} ms, max {1000 * max(fig.cutovers_s):.0f} ms; "
          f"of which switch -> all 3 nodes applied (as it reports) p50 "
          f"{1000 * pct(fig.applied_s, .5):.0f} ms, max "
          f"{1000 * max(fig.applied_s, default=float('nan')):.0f} ms", flush=True)
    served = [x for v in fig.served_s.values() for x in v]
    print(f"  switch -> every answer from the new pool (5 in a row, fresh connections every "
          f"10 ms in each host): p50 {1000 * pct(served, .5):.0f} ms, max "
          f"{1000 * max(served, default=float('nan')):.0f} ms; "
          + ", ".join(f"host{h} max {1000 * max(v):.0f} ms"
                      for h, v in sorted(fig.served_s.items()))
          + f"; {fig.watch_failed} of their requests unanswered within 250 ms (abandoned)",
          flush=True)
    print(f"  SYNs dropped by full accept queues (TcpExt ListenDrops): members "
          f"{fig.listen_drops_members}, hosts {fig.listen_drops_hosts}; SYNs retransmitted "
          f"by the hosts (TcpExt TCPSynRetrans) {fig.syn_retrans_hosts}", flush=True)
    for c in fig.changes:
        print(f"  {c}", flush=True)
    for c in fig.refused:
        print(f"  cutover refused, retried 1 s later: {c}", flush=True)
    want = members[active]
    for h in HOSTS:
        wait_until(partial(serves_only, run, h, port, want), 30,
                   f"host{h} serves exactly the {active} members after the run", 0.5)
    return fig


# --------------------------------------------------------------------------- part 3

def transfer(src_ns: str, dst_ns: str, addr: str, port: int, mib: int) -> float:
    """Send `mib` MiB over one TCP connection from a socket created in `src_ns` to one
    listening in `dst_ns` (1 MiB per send/recv call); seconds from connect() until the
    receiver has read the end of the stream (it checks it got every byte)."""
    srv = socket_in_netns(dst_ns, socket.AF_INET, socket.SOCK_STREAM)
    cli = socket_in_netns(src_ns, socket.AF_INET, socket.SOCK_STREAM)
    got: dict[str, float] = {}
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(1)
        srv.settimeout(30)

        def receive() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(60)
                buf = bytearray(1 << 20)
                total = 0
                while n := conn.recv_into(buf):
                    total += n
                got["end"] = time.perf_counter()
                got["bytes"] = total

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        block = memoryview(bytes(1 << 20))
        cli.settimeout(60)
        t0 = time.perf_counter()
        cli.connect((addr, port))
        for _ in range(mib):
            cli.sendall(block)
        cli.shutdown(socket.SHUT_WR)
        t.join(120)
    finally:
        cli.close()
        srv.close()
    if got.get("bytes") != mib << 20:
        raise RuntimeError(f"TCP to {addr}:{port}: {got.get('bytes')} bytes arrived of "
                           f"{mib << 20}")
    return got["end"] - t0


def tcp_counters(netns_path: str) -> tuple[int, int]:
    """(OutSegs, RetransSegs) of that namespace's TCP (its /proc/net/snmp)."""
    out = sh("nsenter", f"--net={netns_path}", "cat", "/proc/net/snmp").stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("Tcp:")]
    values = dict(zip(rows[0], rows[1], strict=True))
    return int(values["OutSegs"]), int(values["RetransSegs"])


@dataclass
class TcpFigures:
    label: str
    mbps: list[float] = field(default_factory=list)  # one per repetition
    out_segs: int = 0
    retrans_segs: int = 0
    cpu_pct: dict[str, float] = field(default_factory=dict)  # % of one core, while sending

    def measure(self, src_ns: str, dst_ns: str, addr: str, mib: int, reps: int,
                watch: dict[str, int] | None = None) -> None:
        """`reps` transfers; `watch`: processes (label -> pid) whose CPU is reported."""
        out0, re0 = tcp_counters(src_ns)
        cpu0 = {k: cpu_seconds(p) for k, p in (watch or {}).items()}
        busy = 0.0
        for rep in range(reps):
            seconds = transfer(src_ns, dst_ns, addr, 5201 + rep, mib)
            busy += seconds
            self.mbps.append((mib << 20) / seconds / 1e6)
        out1, re1 = tcp_counters(src_ns)
        self.out_segs, self.retrans_segs = out1 - out0, re1 - re0
        self.cpu_pct = {k: 100 * (cpu_seconds(p) - cpu0[k]) / busy
                        for k, p in (watch or {}).items()}

    @property
    def retrans_pct(self) -> float:
        return 100 * self.retrans_segs / self.out_segs if self.out_segs else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.mbps) if self.mbps else float("nan")


def vswitchd_pids(hosts: Iterable[int]) -> dict[str, int]:
    out = {}
    for h in hosts:
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(f"/run/lab/host{h}/ovs/ovs-vswitchd.pid").read_text().strip())
            out[f"host{h} ovs-vswitchd"] = pid
    return out


def tcp_containers(run: Run, net: Net, mib: int, reps: int) -> TcpFigures:
    lab = run.lab
    fig = TcpFigures(f"{net.label} overlay, host1 -> host2")
    spec = f"{net.name}-t"
    kv_put(f"containers/{spec}", {"interfaces": [
        {"name": "eth1", "network": net.name, "address": "auto"}]})
    run.specs.append(spec)
    src = run.container(1, f"{net.name}-t1", spec)
    dst = run.container(2, f"{net.name}-t2", spec)
    addr = wait_value(lambda: run.address(dst), 60, f"{dst} addressed")
    wait_until(lambda: lab.docker(1, "exec", src, "ping", "-c", "1", "-W", "1", addr,
                                  check=False).returncode == 0, 30, f"{src} reaches {dst}")
    src_ns, dst_ns = f"/proc/{run.pid(src)}/ns/net", f"/proc/{run.pid(dst)}/ns/net"
    run.settle()
    fig.measure(src_ns, dst_ns, addr, mib, reps, watch=vswitchd_pids((1, 2)))
    run.remove([src, dst])
    return fig


def tcp_veth(run: Run, mib: int, reps: int) -> TcpFigures:
    fig = TcpFigures("plain veth pair between two namespaces")
    a, b = f"mbva{run.rid}", f"mbvb{run.rid}"
    for ns in (a, b):
        sh("ip", "netns", "add", ns)
        run.netns.append(ns)
    dev_a, dev_b = f"mbv{run.rid}", f"mbw{run.rid}"
    sh("ip", "link", "add", dev_a, "netns", a, "type", "veth", "peer", "name", dev_b,
       "netns", b)
    for ns, dev, ip in ((a, dev_a, "10.77.239.1/24"), (b, dev_b, "10.77.239.2/24")):
        sh("ip", "-n", ns, "addr", "add", ip, "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    fig.measure(f"/run/netns/{a}", f"/run/netns/{b}", "10.77.239.2", mib, reps)
    return fig


# --------------------------------------------------------------------------- report


def report(attach: Sequence[AttachFigures], flips: FlipFigures | None,
           tcp: Sequence[TcpFigures], args: argparse.Namespace, total_s: float) -> None:
    print()
    print(f"machine: {describe('docker', '--version')}")
    ovs = sh("ovs-vsctl", "--version", check=False).stdout.splitlines()
    print(f"lab: 3 hosts (netns), each with dockerd, OVS ({ovs[0] if ovs else '?'}, "
          "datapath netdev), a Consul server, the reconciler daemon; load average at the "
          "end " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if attach:
        print()
        print(f"1. attach across hosts: docker run returned on host2 -> first ping reply; "
              f"{args.attach_n} containers one after the other, static addresses, waiters "
              "ping every 5 ms (neighbour retransmit 10 ms)")
        head = ("network", "host1 (remote) p50", "p95", "host2 (local) p50", "p95",
                "remote - local p50", "ratio p50", "docker run p50")
        rows: list[Sequence[str]] = [head]
        for f in attach:
            lp50 = pct(f.local_s, .5)
            rows.append((f.net.label, f"{1000 * pct(f.remote_s, .5):.0f} ms",
                         f"{1000 * pct(f.remote_s, .95):.0f} ms", f"{1000 * lp50:.0f} ms",
                         f"{1000 * pct(f.local_s, .95):.0f} ms",
                         f"{1000 * pct(f.propagation_s, .5):.0f} ms",
                         f"{pct(f.remote_s, .5) / lp50:.1f}x" if lp50 > 0 else "-",
                         f"{1000 * pct(f.run_s, .5):.0f} ms"))
        _table(rows)
    if flips is not None:
        print()
        print(f"2. flips under load: hey -c {flips.conc}"
              + (f" -q {flips.qps}" if flips.qps else "") + f" on every host for "
              f"{flips.duration_s:.0f}s, {len(flips.cutovers_s)} cutovers, "
              f"{len(flips.changes)} member changes (live pool, host2/host3)")
        rows = [("host", "requests", "req/s", "non-2xx", "errors", "p99", "slowest",
                 ">= 0.5 s")]
        for r in flips.loads:
            rows.append((f"host{r.host}", str(r.requests), f"{r.rps:.0f}", str(r.non2xx),
                         str(r.errors), f"{1000 * r.p99_s:.0f} ms",
                         f"{1000 * r.slowest_s:.0f} ms", str(r.slow)))
        _table(rows)
        failed = sum(r.non2xx + r.errors for r in flips.loads)
        print(f"failed requests: {failed} of {sum(r.requests for r in flips.loads)}"
              + "".join(f"; host{r.host}: {r.detail}" for r in flips.loads if r.detail))
        print(f"`reconciler cutover` on host1 (process start to exit): p50 "
              f"{1000 * pct(flips.cutovers_s, .5):.0f} ms, max "
              f"{1000 * max(flips.cutovers_s):.0f} ms; switch -> all 3 nodes applied it "
              f"(as it reports): p50 {1000 * pct(flips.applied_s, .5):.0f} ms, max "
              f"{1000 * max(flips.applied_s, default=float('nan')):.0f} ms"
              + (f"; {flips.late_events} events late" if flips.late_events else ""))
        served = [x for v in flips.served_s.values() for x in v]
        print(f"cutover -> that host's HAProxy answers from the new pool only (audit time of "
              f"the switch -> first of 5 such answers in a row): p50 "
              f"{1000 * pct(served, .5):.0f} ms, p95 {1000 * pct(served, .95):.0f} ms, max "
              f"{1000 * max(served, default=float('nan')):.0f} ms over "
              f"{len(flips.served_s)} hosts x {len(flips.cutovers_s)} cutovers; probe "
              f"requests unanswered within 250 ms: {flips.watch_failed}")
        print("connection requests dropped by a full accept queue during the load "
              f"(TcpExt ListenDrops): in the members {flips.listen_drops_members}, in the "
              f"hosts (HAProxy) {flips.listen_drops_hosts}; SYNs retransmitted by the hosts "
              f"(TcpExt TCPSynRetrans, HAProxy -> members) {flips.syn_retrans_hosts}")
        print(f"cutovers refused (then retried): {len(flips.refused)}"
              + "".join(f"\n  {r}" for r in flips.refused))
    if tcp:
        print()
        print(f"3. TCP throughput: one connection, {args.tcp_mib} MiB in 1 MiB send/recv "
              f"calls from sockets created in the two namespaces, median of {args.tcp_reps} "
              "(MB = 10^6 bytes)")
        base = next((t for t in tcp if t.label.startswith("plain")), None)
        rows = [("path", "MB/s (median)", "runs", "vs veth", "retransmitted segments",
                 "ovs-vswitchd CPU host1 / host2")]
        for t in tcp:
            ratio = f"{t.median / base.median:.2f}" if base is not None else "-"
            cpu = " / ".join(f"{v:.0f} %" for v in t.cpu_pct.values()) or "-"
            rows.append((t.label, f"{t.median:.0f}", ", ".join(f"{x:.0f}" for x in t.mbps),
                         ratio, f"{t.retrans_pct:.1f} %", cpu))
        _table(rows)
    print()
    print(f"total: {total_s:.0f}s")


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the cleanup

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


PARTS = ("attach", "flips", "tcp")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="10 containers per network, 4 cutovers + 2 changes, 64 MiB x 2")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
    ap.add_argument("--attach-n", type=int, default=None,
                    help="containers per network for part 1 (50; 1-90)")
    ap.add_argument("--cutovers", type=int, default=None, help="cutovers in part 2 (12)")
    ap.add_argument("--changes", type=int, default=None,
                    help="member changes in part 2: half starts, half stops (6)")
    ap.add_argument("--interval", type=float, default=2.0,
                    help="seconds between the events of part 2 (2)")
    ap.add_argument("--conc", type=int, default=8, help="hey connections per host (8)")
    ap.add_argument("--qps", type=int, default=25,
                    help="hey rate per connection (25; 0: unbounded)")
    ap.add_argument("--tcp-mib", type=int, default=None, help="MiB per transfer (256)")
    ap.add_argument("--tcp-reps", type=int, default=None, help="transfers per path (3)")
    args = ap.parse_args(argv)
    q = args.quick
    args.attach_n = args.attach_n if args.attach_n is not None else (10 if q else 50)
    args.cutovers = args.cutovers if args.cutovers is not None else (4 if q else 12)
    args.changes = args.changes if args.changes is not None else (2 if q else 6)
    args.tcp_mib = args.tcp_mib if args.tcp_mib is not None else (64 if q else 256)
    args.tcp_reps = args.tcp_reps if args.tcp_reps is not None else (2 if q else 3)
    parts = [p for p in args.parts.split(",") if p]
    if any(p not in PARTS for p in parts):
        ap.error(f"--parts: of {', '.join(PARTS)}")
    if not 1 <= args.attach_n <= 90 or args.cutovers < 1 or args.changes < 0 \
            or args.tcp_mib < 1 or args.tcp_reps < 1:
        ap.error("--attach-n 1-90, --cutovers >= 1, --changes >= 0, --tcp-* >= 1")
    if os.geteuid() != 0:
        print("multihost.py needs root (the lab, namespaces)", file=sys.stderr)
        return 1

    t_start = time.monotonic()
    lab = lab_up()
    rid = secrets.token_hex(3)
    run = Run(lab, rid)
    octets, vnis = free_octets(2), free_vnis(rid, 2)
    run.nets = [Net(f"mbl-{rid}", "linux", octets[0], vnis[0]),
                Net(f"mbo-{rid}", "ovs", octets[1], vnis[1], vlan=octets[1])]
    print(f"run {rid}: networks " + ", ".join(f"{n.name} 10.77.{n.octet}.0/24 vni {n.vni}"
                                              for n in run.nets), flush=True)
    attach: list[AttachFigures] = []
    flips: FlipFigures | None = None
    tcp: list[TcpFigures] = []
    with sigterm_unwinds():
        try:
            for net in run.nets:
                kv_put(f"networks/{net.name}", net.value())
            if "attach" in parts:
                attach = attach_part(run, run.nets, args.attach_n)
            if "flips" in parts:
                flips = flips_part(run, run.nets[0], args.cutovers, args.changes,
                                   args.interval, args.conc, args.qps)
            if "tcp" in parts:
                print(f"--- TCP throughput, {args.tcp_mib} MiB x {args.tcp_reps}", flush=True)
                tcp.append(tcp_veth(run, args.tcp_mib, args.tcp_reps))
                for net in run.nets:
                    tcp.append(tcp_containers(run, net, args.tcp_mib, args.tcp_reps))
                for t in tcp:
                    print(f"  {t.label}: {', '.join(f'{x:.0f}' for x in t.mbps)} MB/s, "
                          f"{t.retrans_pct:.1f} % of segments retransmitted"
                          + "".join(f", {k} {v:.0f} % of a core" for k, v in t.cpu_pct.items()),
                          flush=True)
        finally:
            print("--- cleanup", flush=True)
            run.cleanup()
            if run.kept:
                print(f"left behind: {', '.join(run.kept)}", file=sys.stderr)
    report(attach, flips, tcp, args, time.monotonic() - t_start)
    return 1 if run.kept else 0


if __name__ == "__main__":
    raise SystemExit(main())
