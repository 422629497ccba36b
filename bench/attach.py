"""Benchmark: how fast the daemon attaches and detaches label-matched replicas.

Owns the attach figures of docs/performance.md. For each N (``--n 50,200``):

1. N containers run with ``--net none`` from the local test image, all labelled
   ``reconciler.name=<spec>``; one OVS network (vlan 100, a /21 pool: N up to 1000) is
   in Consul.
2. `reconciler run` starts (its own process, default settings: resync 30 s, a worker per
   CPU between 2 and 4) and settles (its start-up pass over N unattached containers is
   not measured); then the machine settles too (dockerd and containerd finish starting
   the containers).
3. Attach: the clock starts just before ONE put of ``containers/<spec>`` (``auto``
   address) and stops when every container's eth1 is up (IFF_UP and carrier) with an
   address of the subnet, as read from inside each namespace: per container, a netlink
   socket opened in its netns before the put reads the state (the lean client of
   reconciler.adapters.rtnl, checked against pyroute2 and iproute2 by the tests); ONE
   socket of the host's namespace, listening to every namespace's link and address
   reports (NETLINK_LISTEN_ALL_NSID), wakes the waiter — polling 200 namespaces with
   pyroute2 took most of a core from the daemon measured, and a subscribed socket in
   each namespace made every report of the kernel, the daemon's included, cost more.
   Reported beside: the time until every port is on the OVS bridge as well.
4. Daemon RSS (VmRSS) and, for the largest N, its idle CPU over ``--idle`` seconds
   (utime+stime from /proc/<pid>/stat).
5. Detach: the clock starts before the delete of the spec key and stops when eth1 is
   gone from every namespace and the bridge has no port left.
6. Baseline on the same containers: ``ovs-docker add-port BRIDGE eth1 CONTAINER
   --ipaddress=...`` sequentially (then verified the same way), and ``ovs-docker
   del-port``. ovs-docker sets no VLAN tag and does no IPAM: it only does the plumbing.
   ``--baseline-max K`` runs it on the first K containers only (~0.1 s per call).
   ``--rounds R`` repeats 2-6 on the same containers (a fresh daemon each round; the
   median round is the figure). Before each clock: ovs-vswitchd has applied everything
   before, the machine is quiet, and a fixed piece of Python is timed (how fast the
   machine is at that moment: the same VM has run at half speed for minutes).
7. Where the time goes, over the attach (until every port is on the bridge) and the
   detach: CPU seconds of the daemon (user; system = the kernel's work in its netlink
   requests), ovs-vswitchd, ovsdb-server, Consul, Docker, kernel threads, this waiter,
   and the rest of the (shared) machine, from /proc (bench/_machine.py); and the
   daemon's own threads over the attach (/proc/<pid>/task, named by ``py-spy dump``:
   the workers' user and system time, the watches, the OVSDB replica). ``--profile
   DIR`` also records the daemon with py-spy and the machine with `perf` (perturbs).

Prints figures; asserts nothing about time (it fails only if something does not work).
Everything it creates (containers, bridges, the KV prefix) is removed at the end, also on
failure. Needs `make services` (Consul, dockerd, OVS, the test image) and root.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _machine import (  # bench/_machine.py (run as scripts)
    CpuAccounts,
    describe,
    machine_cpu,
    pid_of,
)
from _proc import cpu_seconds, pct, python_thread_names, rss_mib, sh, thread_cpu

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
from reconciler.adapters.ovs import detect_datapath
from reconciler.adapters.rtnl import Rtnl

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("RECONCILER_TEST_IMAGE", "reconciler-test/busybox:latest")
IFNAME = "eth1"
_CLONE_NEWNET = 0x40000000
_IFF_UP = 0x1
_IFF_LOWER_UP = 0x10000
_RTMGRP_LINK = 0x1
_RTM_NEWLINK, _RTM_DELLINK, _RTM_NEWADDR = 16, 17, 20
_RTMGRP_IPV4_IFADDR = 0x10
_SOL_NETLINK, _NETLINK_LISTEN_ALL_NSID = 270, 8
_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------- helpers


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetnsProbe:
    """A netlink socket created inside a container's netns: reads eth1's state cheaply.
    It joins no multicast group: the namespace's reports reach the waiter through the
    one `NsEvents` socket, under the namespace's id (`nsid`)."""

    def __init__(self, pid: int, events: NsEvents) -> None:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd)
            try:
                query = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            finally:
                _setns(home)
            self.nsid = events.nsid_of(fd)
        finally:
            os.close(home)
            os.close(fd)
        self.rtnl = Rtnl(query)

    def address(self, ifname: str) -> str | None:
        """`ifname`'s IPv4 address if the link is up with carrier; else None."""
        link = self.rtnl.get_link(ifname)
        if link is None or link.flags & (_IFF_UP | _IFF_LOWER_UP) != (_IFF_UP | _IFF_LOWER_UP):
            return None
        for a in self.rtnl.addrs(link.index):
            if a.family == socket.AF_INET:
                return f"{a.address}/{a.prefixlen}"
        return None

    def exists(self, ifname: str) -> bool:
        return self.rtnl.get_link(ifname) is not None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.rtnl.close()


class NsEvents:
    """Link and IPv4 address reports of every container namespace, on ONE socket of the
    host's namespace (NETLINK_LISTEN_ALL_NSID; each report carries the id the host gave
    the namespace it comes from).

    Not a socket per namespace: every rtnetlink report the kernel sends, in any
    namespace, walks every socket of the host that joined a group. 500 such sockets of
    the waiter made creating and deleting one veth cost 0.4 ms more CPU (1.45 -> 1.88 ms,
    500 namespaces, the daemon's own watch sockets present): the benchmark taxed what it
    measured (0.07 ms with this socket instead)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
        self.sock.setsockopt(_SOL_NETLINK, _NETLINK_LISTEN_ALL_NSID, 1)
        self.sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR))
        self.sock.setblocking(False)
        self._rtnl = Rtnl()

    def nsid_of(self, ns_fd: int) -> int:
        """The id the host's namespace has for the namespace of `ns_fd`, given one
        first if it has none (reports come only from namespaces with an id)."""
        return self._rtnl.nsid(ns_fd)

    def drain(self) -> set[int] | None:
        """Ids of the namespaces whose reports since the last call can have completed an
        attach or a detach: an IPv4 address added, a link up with carrier, a link
        deleted. The others (a link made, still down; the kernel's own reports) are not
        worth the two requests of a check: the waiter shares the two cores it measures.
        None: reports were lost (the socket overflowed), check everyone."""
        out: set[int] = set()
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(4))
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    return None
                raise
            nsid = next((struct.unpack("=i", d[:4])[0] for level, kind, d in anc
                         if level == _SOL_NETLINK and kind == _NETLINK_LISTEN_ALL_NSID), None)
            if nsid is None:  # the host's own namespace
                continue
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind in (_RTM_NEWADDR, _RTM_DELLINK):
                    out.add(nsid)
                elif kind == _RTM_NEWLINK and off + 32 <= len(data):
                    flags = struct.unpack_from("=I", data, off + 24)[0]
                    if flags & (_IFF_UP | _IFF_LOWER_UP) == _IFF_UP | _IFF_LOWER_UP:
                        out.add(nsid)
                off += max(16, (length + 3) & ~3)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sock.close()
            self._rtnl.close()


BLOCK = 8  # a /21 of eight /24s: pools from x.10 of the first to .250 of the last
PREFIXLEN = 24 - (BLOCK - 1).bit_length()
PER_24 = 241  # .10-.250
MAX_N = 1000  # containers per run (the /21 pool holds 8 x 241)


def free_octets(count: int) -> list[int]:
    """First third octets X of blocks 10.77.X.0/21 (X a multiple of 8, 24 <= X < 240) of
    which no /24 is used by a host route (the host is shared)."""
    used: set[int] = set()
    for word in sh("ip", "-4", "route", "show", "table", "all").stdout.split():
        if word.startswith("10.77.") and word != "10.77.0.0/16":
            with contextlib.suppress(ValueError, IndexError):
                net = ipaddress.ip_network(word if "/" in word else f"{word}/32",
                                           strict=False)
                first = int(net.network_address.packed[2])
                last = int(net.broadcast_address.packed[2])
                used.update(range(first, last + 1))
    starts = list(range(24, 240, BLOCK))
    seed = secrets.randbelow(len(starts))  # concurrent runs rarely pick the same
    starts = starts[seed:] + starts[:seed]
    out = [x for x in starts if not used & set(range(x, x + BLOCK))]
    if len(out) < count:
        raise RuntimeError(f"no {count} free 10.77.X.0/{PREFIXLEN}")
    return out[:count]


def block_address(first_octet: int, i: int) -> str:
    """The i-th address (0-based) of a block's pool: x.10-x.250 of each /24."""
    return f"10.77.{first_octet + i // PER_24}.{10 + i % PER_24}"


def wait_all(events: NsEvents, probes: dict[str, NetnsProbe],
             done: Callable[[NetnsProbe], bool], t0: float, timeout: float, what: str,
             ) -> dict[str, float]:
    """Wait until `done(probe)` for every container; seconds since t0 per container.
    A container is checked once at the start, then when its namespace reports something
    that can have completed it, and every second whatever the reports (a safety net)."""
    pending = dict(probes)
    by_nsid = {p.nsid: cid for cid, p in probes.items()}
    seen: dict[str, float] = {}
    deadline = t0 + timeout
    check = list(pending)
    last_full = time.perf_counter()
    while True:
        for cid in check:
            p = pending.get(cid)
            if p is not None and done(p):
                seen[cid] = time.perf_counter() - t0
                del pending[cid]
        if not pending:
            return seen
        now = time.perf_counter()
        if now > deadline:
            raise TimeoutError(f"{what}: {len(pending)} of {len(probes)} containers not "
                               f"done after {timeout:g}s")
        if now - last_full > 1.0:
            check, last_full = list(pending), now
            continue
        select.select([events.sock], [], [], 0.1)
        nsids = events.drain()
        check = list(pending) if nsids is None else [
            by_nsid[i] for i in nsids if i in by_nsid]


def settle(pid: int, limit: float = 45.0) -> float:
    """Wait until a 2 s window of the daemon is quiet (< 2% of a core; `limit` seconds at
    most); return how long that took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        c = cpu_seconds(pid)
        time.sleep(2)
        if (cpu_seconds(pid) - c) / 2 < 0.02:
            break
    return time.perf_counter() - t0


def quiet_machine(limit: float = 60.0, busy: float = 0.15) -> float:
    """Wait until the whole machine is quiet: a 1 s window in which all cores together were
    busy less than `busy` of the time (`limit` seconds at most); return how long that
    took. The 500 containers started just before leave dockerd and containerd working
    for seconds after `docker run` returns, and the runs of one invocation follow each
    other: measured on top of that, the same code gave 2.9 to 5.3 ms/if."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        b0, i0 = machine_cpu()
        time.sleep(1.0)
        b1, i1 = machine_cpu()
        total = (b1 - b0) + (i1 - i0)
        if total > 0 and (b1 - b0) / total < busy:
            break
    return time.perf_counter() - t0


def cpu_probe_ms() -> float:
    """Wall time of a fixed piece of pure-Python work (~25 ms on the machines here), taken
    right before a clock starts: how fast the machine is at that moment. The same code
    on the same VM has run at half its speed for minutes (neighbours on the physical
    host): a slow round shows here, not only in the figures it inflates."""
    t0 = time.perf_counter()
    x = 0
    for i in range(400_000):
        x ^= i * i
    return 1000 * (time.perf_counter() - t0) + 0 * x


# --------------------------------------------------------------------------- one run


@dataclass
class Figures:
    n: int
    round: int = 1  # of --rounds: each a fresh daemon, its attach, detach and baseline
    probe_ms: float = 0.0  # the fixed CPU probe, just before the daemon's clock
    attach_s: float = 0.0
    attach_p50_s: float = 0.0
    attach_cpu_s: float = 0.0
    ports_s: float = 0.0  # until every port is on the bridge too (after attach_s)
    start_settle_s: float = 0.0
    quiet_s: float = 0.0  # waited for a quiet machine before the attach
    base_quiet_s: float = 0.0  # and before the baseline
    detach_inside_s: float = 0.0
    detach_s: float = 0.0
    rss_mib: float = 0.0
    idle_window_s: float = 0.0
    settle_s: float = 0.0
    idle_cpu_pct: float | None = None
    base_attach_s: float = 0.0
    base_detach_s: float = 0.0
    base_n: int = 0  # containers the baseline ran on (a sample of N when capped)
    datapath: str = ""
    attach_cpu: dict[str, float] = field(default_factory=dict)  # until the ports are on
    attach_wall_s: float = 0.0
    detach_cpu: dict[str, float] = field(default_factory=dict)
    attach_others: dict[str, float] = field(default_factory=dict)  # comm -> CPU s
    detach_others: dict[str, float] = field(default_factory=dict)
    detach_wall_s: float = 0.0
    # The daemon's threads over the attach (until every eth1 is up): name -> (user, sys).
    attach_threads: dict[str, tuple[float, float]] = field(default_factory=dict)

    def per(self, total: float) -> float:
        return 1000 * total / self.n

    def base_ms(self) -> float:
        """ovs-docker's attach, ms per container (over the containers it ran on)."""
        return 1000 * self.base_attach_s / self.base_n if self.base_n else float("nan")

    def ratio(self) -> float:
        """ovs-docker's time per container over the daemon's (higher: daemon faster)."""
        return self.base_ms() / self.per(self.attach_s) if self.attach_s else float("nan")


class Profiler:
    """py-spy recording the daemon over one phase (``--profile DIR``), as collapsed
    stacks (flamegraph.pl / speedscope input), with idle (blocked) samples too."""

    def __init__(self, directory: Path | None, pid: int, name: str) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        if directory is None:
            return
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        directory.mkdir(parents=True, exist_ok=True)
        self.procs.append(subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "200", "--idle", "--threads",
             "--format", "raw", "--output", str(directory / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        perf = shutil.which("perf")
        if perf is not None:  # the kernel's side, every CPU (`perf report -i ...`)
            self.procs.append(subprocess.Popen(
                [perf, "record", "-a", "-g", "-F", "499", "-o",
                 str(directory / f"{name}.perf.data")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # attached before the clock starts

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)


class Bench:
    def __init__(self, n: int, idle: float, keep_log: bool, *, base_max: int = 0,
                 profile: Path | None = None, rounds: int = 1) -> None:
        import docker

        self.n = n
        self.base_max = base_max
        self.profile = profile
        self.idle = idle
        self.keep_log = keep_log
        self.rid = secrets.token_hex(3)
        self.prefix = f"rb-{self.rid}/"
        self.node = f"rbnode-{self.rid}"
        self.spec = f"bench-{self.rid}"
        self.bridge_d = f"rbd{self.rid}"  # the daemon's (created by it)
        self.bridge_b = f"rbb{self.rid}"  # ovs-docker's
        self.octet_d, self.octet_b = free_octets(2)
        self.datapath = detect_datapath()  # as the daemon's "auto" picks it
        self.kv = ConsulKV(ConsulSettings.from_env())
        self.docker = docker.from_env(timeout=120)
        self.containers: list[Any] = []
        self.probes: dict[str, NetnsProbe] = {}
        self.events = NsEvents()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-attach-{self.rid}-"))
        self.log_path = self.workdir / "daemon.log"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.rounds = rounds
        self.fig = Figures(n)  # the round being measured

    # ---------------------------------------------------------------- setup

    def start_containers(self) -> None:
        def one(i: int) -> Any:
            return self.docker.containers.run(
                IMAGE, command=["sleep", "86400"], name=f"rb-{self.rid}-{i}", detach=True,
                network_mode="none",
                labels={"reconciler.name": self.spec, "reconciler-bench.run": self.rid})

        with ThreadPoolExecutor(8) as pool:
            for c in pool.map(one, range(self.n)):
                self.containers.append(c)
        for c in self.containers:
            c.reload()
            if c.status != "running":
                raise RuntimeError(f"container {c.name} is {c.status}")
            self.probes[c.id] = NetnsProbe(int(c.attrs["State"]["Pid"]), self.events)

    def put(self, rel: str, value: Any) -> None:
        self.kv.put(self.prefix + rel, json.dumps(value).encode())

    def start_daemon(self) -> int:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "--prefix", self.prefix, "run", "--node",
             self.node, "--state-dir", str(self.workdir / "state")],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        deadline = time.monotonic() + 60
        key = f"{self.prefix}nodes/{self.node}/status"
        while self.kv.get(key) is None:
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not come up; log: {self.log_path}")
            time.sleep(0.05)
        return self.daemon.pid

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(10)
        self.daemon = None

    def sync_vswitchd(self) -> float:
        """Wait until ovs-vswitchd has applied everything before (a change to the bench's
        own bridge returns once vswitchd reconfigured). After a detach of 500 it closes
        their packet sockets for seconds, each close waiting for an RCU grace period:
        blocked, not busy, so a quiet machine does not show it, and an `ovs-vsctl
        add-port` meanwhile waits behind it (ovs-docker measured at 300-400 ms/if instead
        of 120-150 right after the daemon's detach)."""
        t0 = time.perf_counter()
        sh("ovs-vsctl", "--timeout=120", "--may-exist", "add-br", self.bridge_b, "--", "set",
           "bridge", self.bridge_b, f"datapath_type={self.datapath}", "--",
           "br-set-external-id", self.bridge_b, "reconciler-bench-sync", str(time.time_ns()))
        return time.perf_counter() - t0

    def ports(self, bridge: str) -> list[str]:
        out = sh("ovs-vsctl", "--timeout=10", "list-ports", bridge, check=False).stdout
        return out.split()

    # ---------------------------------------------------------------- phases

    def daemon_phase(self) -> None:
        subnet = ipaddress.ip_network(f"10.77.{self.octet_d}.0/{PREFIXLEN}")
        self.put(f"networks/bn-{self.rid}", {
            "subnet": str(subnet), "bridge": self.bridge_d, "driver": "ovs", "vlan": 100,
            "pool": {"start": f"10.77.{self.octet_d}.10",
                     "end": f"10.77.{self.octet_d + BLOCK - 1}.250"}})
        pid = self.start_daemon()
        # The daemon's own start (listing and inspecting N unattached containers, its first
        # sweep) is not part of the attach: put the spec into a settled daemon, as when
        # replicas are scaled out on a running host.
        self.fig.start_settle_s = settle(pid)
        self.fig.quiet_s = self.sync_vswitchd() + quiet_machine()
        self.fig.probe_ms = cpu_probe_ms()

        def attached(p: NetnsProbe) -> bool:
            a = p.address(IFNAME)
            return a is not None and ipaddress.ip_interface(a).network == subnet

        acct = CpuAccounts({"daemon": pid, **pid_of("ovs-vswitchd", "ovsdb-server",
                                                    "consul", "dockerd", "containerd")})
        prof = Profiler(self.profile, pid, f"attach-{self.n}-{self.fig.round}")
        acct.start()
        cpu0 = cpu_seconds(pid)
        threads0 = thread_cpu(pid)
        t0 = time.perf_counter()
        self.put(f"containers/{self.spec}", {"interfaces": [
            {"name": IFNAME, "network": f"bn-{self.rid}", "address": "auto"}]})
        seen = wait_all(self.events, self.probes, attached, t0, 60 + self.n, "attach")
        self.fig.attach_s = max(seen.values())
        self.fig.attach_p50_s = pct(seen.values(), 0.5)
        self.fig.attach_cpu_s = cpu_seconds(pid) - cpu0
        threads1 = thread_cpu(pid)
        # And until the last port is on the bridge (reported beside, not the figure).
        deadline = time.monotonic() + 60
        while len(self.ports(self.bridge_d)) < self.n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ports missing on {self.bridge_d}")
            time.sleep(0.05)  # each look is an ovs-vsctl process and a dump of the database
        self.fig.ports_s = time.perf_counter() - t0
        self.fig.attach_cpu = acct.stop()
        self.fig.attach_wall_s = acct.wall
        self.fig.attach_others = acct.others
        prof.stop()
        self.fig.attach_threads = by_thread_name(threads0, threads1, python_thread_names(pid))
        addrs = {p.address(IFNAME) for p in self.probes.values()}
        if len(addrs) != self.n:
            raise RuntimeError(f"{len(addrs)} distinct addresses for {self.n} containers")
        self.fig.rss_mib = rss_mib(pid)

        if self.idle > 0:
            # Idle means steady state: the attach leaves a tail (the members sync, the
            # first sweep, the port batch's announcements).
            self.fig.settle_s = settle(pid)
            prof = Profiler(self.profile, pid, f"idle-{self.n}-{self.fig.round}")
            c1 = cpu_seconds(pid)
            time.sleep(self.idle)  # the measurement window itself
            self.fig.idle_window_s = self.idle
            self.fig.idle_cpu_pct = 100 * (cpu_seconds(pid) - c1) / self.idle
            prof.stop()

        prof = Profiler(self.profile, pid, f"detach-{self.n}-{self.fig.round}")
        acct.start()
        t0 = time.perf_counter()
        self.kv.delete(f"{self.prefix}containers/{self.spec}")
        seen = wait_all(self.events, self.probes, lambda p: not p.exists(IFNAME), t0, 60 + self.n,
                        "detach")
        self.fig.detach_inside_s = max(seen.values())
        deadline = time.monotonic() + 60
        while self.ports(self.bridge_d):
            if time.monotonic() > deadline:
                raise RuntimeError(f"ports left on {self.bridge_d}")
            time.sleep(0.02)
        self.fig.detach_s = time.perf_counter() - t0
        self.fig.detach_cpu = acct.stop()
        self.fig.detach_wall_s = acct.wall
        self.fig.detach_others = acct.others
        prof.stop()
        self.stop_daemon()

    def baseline_phase(self) -> None:
        datapath = sh("ovs-vsctl", "--timeout=10", "get", "bridge", self.bridge_d,
                      "datapath_type").stdout.strip().strip('"') or "netdev"
        self.fig.datapath = datapath
        sh("ovs-vsctl", "--timeout=10", "--may-exist", "add-br", self.bridge_b, "--", "set",
           "bridge", self.bridge_b, f"datapath_type={datapath}")
        subnet = ipaddress.ip_network(f"10.77.{self.octet_b}.0/{PREFIXLEN}")
        # ovs-docker takes ~0.1 s per container and per call: `--baseline-max` runs it on
        # the first K containers only (its cost per container does not grow with N: each
        # call is a handful of processes).
        sample = self.containers[:self.base_max] if self.base_max else self.containers
        probes = {c.id: self.probes[c.id] for c in sample}
        self.fig.base_n = len(sample)
        self.fig.base_quiet_s = self.sync_vswitchd() + quiet_machine()  # as for the daemon
        t0 = time.perf_counter()
        for i, c in enumerate(sample):
            sh("ovs-docker", "add-port", self.bridge_b, IFNAME, c.id,
               f"--ipaddress={block_address(self.octet_b, i)}/{PREFIXLEN}")

        def attached(p: NetnsProbe) -> bool:
            a = p.address(IFNAME)
            return a is not None and ipaddress.ip_interface(a).network == subnet

        seen = wait_all(self.events, probes, attached, t0, 60, "ovs-docker attach")
        self.fig.base_attach_s = max(seen.values())
        t0 = time.perf_counter()
        for c in sample:
            sh("ovs-docker", "del-port", self.bridge_b, IFNAME, c.id)
        wait_all(self.events, probes, lambda p: not p.exists(IFNAME), t0, 60, "ovs-docker detach")
        self.fig.base_detach_s = time.perf_counter() - t0

    # ---------------------------------------------------------------- cleanup

    def cleanup(self) -> None:
        import docker.errors
        import requests.exceptions

        self.stop_daemon()
        for p in self.probes.values():
            p.close()
        self.events.close()

        def rm(c: Any) -> None:
            # dockerd removing hundreds of containers at once on a busy machine can take
            # longer than a request's timeout: what is left is found again below.
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError,
                                     requests.exceptions.RequestException):
                c.remove(force=True)

        todo: list[Any] = list(self.containers)
        for _ in range(5):
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(rm, {c.id: c for c in todo}.values()))
            # Also containers of this run that a failure left untracked.
            with contextlib.suppress(requests.exceptions.RequestException):
                todo = self.docker.containers.list(
                    all=True, filters={"label": f"reconciler-bench.run={self.rid}"})
                if not todo:
                    break
        else:
            print(f"containers labelled reconciler-bench.run={self.rid} may be left",
                  file=sys.stderr)
        for br in (self.bridge_d, self.bridge_b):
            sh("ovs-vsctl", "--timeout=10", "--if-exists", "del-br", br, check=False)
        with contextlib.suppress(Exception):
            self.kv.delete(self.prefix, recurse=True)
        self.kv.close()
        self.docker.close()
        if not self.keep_log:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self) -> list[Figures]:
        """Start the N containers once; then, per round, a fresh daemon's attach (with the
        idle window in the last round) and detach, and ovs-docker's on the same
        containers right after (the daemon stopped): each round's ratio is of two clocks
        a minute apart, not of a slow moment against a fast one."""
        ok = False
        figs: list[Figures] = []
        try:
            self.start_containers()
            idle = self.idle
            for r in range(1, self.rounds + 1):
                self.fig = Figures(self.n, round=r)
                self.idle = idle if r == self.rounds else 0.0
                self.daemon_phase()
                self.baseline_phase()
                figs.append(self.fig)
                print(row(self.fig), flush=True)  # kept if a later round fails
            ok = True
            return figs
        finally:
            if not ok:
                print(f"--- daemon log ({self.log_path}), last lines:", file=sys.stderr)
                with contextlib.suppress(OSError):
                    print(self.log_path.read_text(errors="replace")[-6000:], file=sys.stderr)
                self.keep_log = True
            self.cleanup()


# --------------------------------------------------------------------------- report


def machine() -> str:
    return describe("ovs-vsctl", "--version")


def _groups(cpu: dict[str, float]) -> list[tuple[str, float]]:
    """CPU seconds of one window by component, in report order (`other`: the machine's
    busy time nobody above accounts for: softirqs, other users of this shared machine)."""
    def get(*keys: str) -> float:
        return sum(cpu.get(k, 0.0) for k in keys)

    rows = [
        ("daemon, Python (user)", get("daemon user")),
        ("daemon, kernel (sys: netlink requests = veth creation/deletion, moves, "
         "addresses; sockets)", get("daemon sys")),
        ("ovs-vswitchd (user+sys)", get("ovs-vswitchd user", "ovs-vswitchd sys")),
        ("ovsdb-server", get("ovsdb-server user", "ovsdb-server sys")),
        ("consul", get("consul user", "consul sys")),
        ("dockerd + containerd", get("dockerd user", "dockerd sys", "containerd user",
                                     "containerd sys")),
        ("kernel threads (kworkers, RCU, softirqd)", get("kernel threads")),
        ("bench waiter (this process)", get("bench (waiter)")),
    ]
    busy = get("machine busy")
    rows.append(("other (exited processes, interrupts: other users of the machine)",
                 max(0.0, busy - sum(v for _, v in rows))))
    rows.append(("machine idle (all cores)", get("machine idle")))
    return rows


def by_thread_name(before: dict[int, tuple[float, float]],
                   after: dict[int, tuple[float, float]], names: dict[int, str],
                   ) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds between two `thread_cpu` readings, summed per thread
    name (an unnamed thread: "other")."""
    out: dict[str, tuple[float, float]] = {}
    for tid, (u, s) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        name = names.get(tid, "other")
        have = out.get(name, (0.0, 0.0))
        out[name] = (have[0] + u - u0, have[1] + s - s0)
    return dict(sorted(out.items(), key=lambda kv: -sum(kv[1])))


def report_breakdown(f: Figures) -> None:
    cores = os.cpu_count() or 1
    print(f"\nwhere the time goes, N={f.n}: CPU seconds (ms per interface) over the attach "
          f"until every port was on the bridge ({f.attach_wall_s:.2f} s wall x {cores} cores"
          f" = {f.attach_wall_s * cores:.2f} CPU-s) and over the detach "
          f"({f.detach_wall_s:.2f} s x {cores} = {f.detach_wall_s * cores:.2f} CPU-s)")
    print("component | attach CPU s | attach ms/if | detach CPU s | detach ms/if")
    det = dict(_groups(f.detach_cpu))
    for name, v in _groups(f.attach_cpu):
        d = det.get(name, 0.0)
        print(f"{name} | {v:.2f} | {f.per(v):.2f} | {d:.2f} | {f.per(d):.2f}")
    for what, others in (("attach", f.attach_others), ("detach", f.detach_others)):
        top = [f"{c} {v:.2f}" for c, v in list(others.items())[:6] if v >= 0.01]
        print(f"busiest other processes during the {what} (CPU s): "
              + (", ".join(top) or "none"))
    # Per thread, from the kernel's accounting: a sampling profiler's view of who holds
    # the GIL charged the OVSDB replica's thread with the daemon's idle moments.
    shown = [f"{n} {u:.2f} + {s:.2f}" for n, (u, s) in f.attach_threads.items()
             if u + s >= 0.01]
    print("the daemon's threads over the attach until every eth1 was up (CPU s, user + "
          "system; names from py-spy dump): " + (", ".join(shown) or "not read"))


def row(f: Figures) -> str:
    return " | ".join([
        str(f.n), str(f.round), f"{f.probe_ms:.0f}", f"{f.per(f.attach_s):.1f}",
        f"{f.attach_p50_s:.2f}", f"{f.attach_s:.2f}", f"{f.ports_s:.2f}",
        f"{f.attach_cpu_s:.2f}", f"{f.base_ms():.1f} ({f.base_n})",
        f"{f.ratio():.1f}x", f"{f.per(f.detach_s):.1f} (inside {f.per(f.detach_inside_s):.1f})",
        f"{1000 * f.base_detach_s / max(1, f.base_n):.1f}", f"{f.rss_mib:.1f}"])


def median_round(figs: Sequence[Figures]) -> Figures:
    """The round whose attach is the median (the lower one of an even count)."""
    ranked = sorted(figs, key=lambda f: f.attach_s)
    return ranked[(len(ranked) - 1) // 2]


def _spread(values: Sequence[float], fmt: str) -> str:
    vals = sorted(values)
    mid = vals[(len(vals) - 1) // 2]
    if len(vals) == 1:
        return format(mid, fmt)
    return f"{format(mid, fmt)} ({format(vals[0], fmt)}-{format(vals[-1], fmt)})"


def report(figs: Sequence[Figures]) -> None:
    print(f"machine: {machine()}")
    print(f"OVS datapath: {', '.join(sorted({f.datapath for f in figs}))}")
    print()
    hdr = ("N", "round", "CPU probe ms", "daemon attach ms/if", "p50 s", "total s",
           "ports on bridge s", "daemon CPU s", "ovs-docker ms/if (containers)", "ratio",
           "daemon detach ms/if", "ovs-docker del ms/if", "RSS MiB")
    print(" | ".join(hdr))
    for f in figs:
        print(row(f))
    print("waited for ovs-vswitchd to have applied everything before, then for a quiet machine "
          "(1 s < 15 % busy), before each clock started: " + ", ".join(
        f"N={f.n}/{f.round} {f.quiet_s:.0f} s (daemon), {f.base_quiet_s:.0f} s (ovs-docker)"
        for f in figs))
    ns = sorted({f.n for f in figs})
    by_n = {n: [f for f in figs if f.n == n] for n in ns}
    print("\nmedian (min-max) over the rounds: N | rounds | attach ms/if | ratio | "
          "detach ms/if")
    for n, rs in by_n.items():
        print(f"{n} | {len(rs)} | {_spread([f.per(f.attach_s) for f in rs], '.1f')} | "
              f"{_spread([f.ratio() for f in rs], '.1f')}x | "
              f"{_spread([f.per(f.detach_s) for f in rs], '.1f')}")
    for f in figs:
        if f.idle_cpu_pct is not None:
            print(f"idle CPU with N={f.n} attached over {f.idle_window_s:g}s: "
                  f"{f.idle_cpu_pct:.2f}% of one core (after settling for {f.settle_s:.1f}s)")
    for rs in by_n.values():
        med = median_round(rs)
        if len(rs) > 1:
            print(f"\n(the median round of N={med.n}: round {med.round})", end="")
        report_breakdown(med)
    rs = by_n[ns[-1]]
    big, idle = median_round(rs), [f.idle_cpu_pct for f in rs if f.idle_cpu_pct is not None]
    print(f"\ntargets at N={big.n} (issue 9: for N=500; median of {len(rs)} round(s)): "
          f"attach <= 3 ms/if: {_spread([f.per(f.attach_s) for f in rs], '.1f')} ms; "
          f">= 40x ovs-docker: {_spread([f.ratio() for f in rs], '.1f')}x; "
          f"detach <= 10 ms/if: {_spread([f.per(f.detach_s) for f in rs], '.1f')} ms; "
          "idle CPU < 1%: " + (f"{idle[0]:.2f}%" if idle else "not measured")
          + f"; RSS {big.rss_mib * 1.048576:.1f} MB")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", default=os.environ.get("BENCH_ATTACH_N", "50,200"),
                   help="comma-separated container counts (default 50,200)")
    p.add_argument("--idle", type=float, default=float(os.environ.get("BENCH_IDLE", "60")),
                   help="idle CPU window in seconds, measured at the largest N (0: skip)")
    p.add_argument("--keep-log", action="store_true", help="keep the daemon log directory")
    p.add_argument("--baseline-max", type=int,
                   default=int(os.environ.get("BENCH_BASELINE_MAX", "0")),
                   help="run ovs-docker on the first K containers only (0: all)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="record the daemon with py-spy during each attach and detach "
                        "(collapsed stacks in DIR; perturbs the figures)")
    p.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "1")),
                   help="rounds per N on the same containers, each a fresh daemon and the "
                        "baseline right after; the median round is the figure (default 1)")
    args = p.parse_args(argv)
    ns = [int(x) for x in args.n.split(",") if x.strip()]
    if not ns or min(ns) < 1 or max(ns) > MAX_N:
        p.error(f"--n: counts between 1 and {MAX_N} (a /{PREFIXLEN} pool: .10-.250 of "
                f"{BLOCK} /24s)")
    if shutil.which("ovs-docker") is None:
        print("ovs-docker is missing (it ships with openvswitch-common)", file=sys.stderr)
        return 1
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    figs: list[Figures] = []
    for n in ns:
        print(f"--- N={n}", flush=True)
        figs += Bench(n, args.idle if n == max(ns) else 0.0, args.keep_log,
                      base_max=args.baseline_max, profile=args.profile,
                      rounds=args.rounds).run()
    print()
    report(figs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
