"""Netlink adapter: veth pairs into container network namespaces, Linux bridges, host links.

Owns everything reconciler does through rtnetlink, and is the only module importing pyroute2.
It takes and returns plain values (``str``, ``ipaddress`` objects and the frozen dataclasses
below), never the desired-state model, and raises only `reconciler.errors.NetlinkError`.

Design notes
- No ``ip``/``nsenter`` processes, and no pyroute2 ``netns=`` either: pyroute2 0.9 forks a
  helper process for every namespaced socket (~10 ms). Instead the calling *thread* briefly
  ``setns(2)``-es into the container namespace (setns of CLONE_NEWNET is per thread), opens a
  netlink socket (and, when needed, an AF_PACKET socket or a sysctl file) there, and returns
  at once; sockets keep working in the namespace they were created in. Cost: ~1 ms.
- A namespace is opened once as an fd (`ContainerNetns`), then checked against the expected
  process start time / container id, so a reused PID can never send us into the wrong
  container.
- The veth pair is created in one RTM_NEWLINK with the peer placed directly in the container
  namespace under its final name (IFLA_NET_NS_FD in the peer info), so a crash can never
  leave a half-moved peer with a temporary name on the host.
- Host veth names are ``rv`` + 13 hex digits of sha256(container id / ifname): deterministic,
  15 characters, recognisable for the orphan sweep (`list_owned_host_veths`).
- Linux bridges we create carry ``ifalias = "reconciler:<network>"``; only those are deleted.
- Requests go through `reconciler.adapters.rtnl` (a lean client on a raw socket), not
  pyroute2's IPRoute, whose sync API runs an asyncio loop per call (~0.3-0.5 ms of Python
  each, the bound when hundreds of containers attach at once). pyroute2 supplies the
  rtnetlink constants and is the reference codec the tests check `rtnl` against.
- IPv4 interface settings (arp_notify, promote_secondaries) are set and read through
  netlink (IFLA_AF_SPEC), not /proc/sys: no namespace switch for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import errno
import fcntl
import hashlib
import io
import ipaddress
import logging
import os
import queue
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.rtnl import RTM_NEWLINK, RTMGRP_LINK

from reconciler.adapters.procfs import HOST_PROC, cgroup, parse_start_time, read_proc_file
from reconciler.adapters.rtnl import (
    INET_CONF_ARP_NOTIFY,
    INET_CONF_PROMOTE_SECONDARIES,
    Link,
    Rtnl,
    RtnlError,
    parse_link,
    parse_link_events,
)
from reconciler.errors import NetlinkError

log = logging.getLogger(__name__)

# The IPv4 settings of a container's interface: arp_notify (announce on link-up) and
# promote_secondaries (deleting one address of a subnet keeps the others).
_INET_CONF = ((INET_CONF_ARP_NOTIFY, 1), (INET_CONF_PROMOTE_SECONDARIES, 1))

__all__ = [
    "HOST_VETH_PREFIX",
    "OWNER_ALIAS_PREFIX",
    "RETIRED_GROUP",
    "RETIRED_VETH_PREFIX",
    "Change",
    "ContainerNetns",
    "InterfaceSpec",
    "IpAddress",
    "IpInterface",
    "IpNetwork",
    "LinkEvent",
    "LinkExpect",
    "LinkWatcher",
    "NetlinkAdapter",
    "NetnsWatcher",
    "ObservedInterface",
    "Route",
    "host_veth_alias",
    "host_veth_name",
    "process_start_time",
]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOST_VETH_PREFIX = "rv"
"""Every host-side veth reconciler creates is named ``rv`` + 13 lowercase hex digits."""
_HOST_VETH_RE = re.compile(r"^rv[0-9a-f]{13}$")
RETIRED_VETH_PREFIX = "rx"
"""A host veth retired by `NetlinkAdapter.retire_host_veth` is renamed ``rx`` + its hash."""
RETIRED_GROUP = 0x72780001
"""The link group of retired host veths (``rx``, 1): `reap_retired` deletes the group."""
OWNER_ALIAS_PREFIX = "reconciler:"
"""Linux bridges created by reconciler have ``ifalias`` = this prefix + the network name."""

_CLONE_NEWNET = 0x40000000
_IFA_F_NODAD = 0x02
_RT_TABLE_MAIN = 254
_ETH_P_ARP = 0x0806
_MAX_IFNAME = 15
_LINK_LOCAL_V6 = ipaddress.IPv6Network("fe80::/10")

_libc = ctypes.CDLL(None, use_errno=True)


class Change(enum.StrEnum):
    """What `NetlinkAdapter.ensure_interface` (and the bridge helpers) changed."""

    CREATED = "created"
    RECREATED = "recreated"  # a stale host veth (peer not in this netns) was replaced
    MAC = "mac"
    MTU = "mtu"
    HOST_MTU = "host_mtu"
    ADDRESSES = "addresses"
    SYSCTL = "sysctl"  # arp_notify / disable_ipv6 inside the netns
    UP = "up"
    HOST_UP = "host_up"
    GARP = "garp"  # a gratuitous ARP was sent after (re)addressing
    ROUTES = "routes"
    ALIAS = "alias"
    MASTER = "master"


class Changes(tuple[Change, ...]):
    """What `NetlinkAdapter.ensure_interface` changed (a tuple of `Change`), and the host
    end's ifindex (for plugging it without looking it up again)."""

    host_index: int | None

    def __new__(cls, changes: Iterable[Change] = (), host_index: int | None = None
                ) -> Changes:
        obj = super().__new__(cls, changes)
        obj.host_index = host_index
        return obj


def host_veth_name(container_id: str, ifname: str) -> str:
    """The host-side veth name for interface `ifname` of a container: ``rv`` + 13 hex."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_VETH_PREFIX + digest[:13]


def host_veth_alias(node: str, container_id: str, ifname: str) -> str:
    """The ifalias recorded on a host veth: which node's daemon owns it, for what.

    The name alone (``rv<hash>``) cannot tell two daemons on one host apart (tests,
    or a node renamed): the orphan sweep only removes veths whose alias names its node."""
    return f"{OWNER_ALIAS_PREFIX}{node}/{container_id}/{ifname}"


def is_owned_host_veth_name(name: str) -> bool:
    """Whether `name` has the shape of a host veth reconciler created."""
    return bool(_HOST_VETH_RE.match(name))


@dataclass(frozen=True)
class Route:
    """A route inside a container: `dst` via gateway `via`."""

    dst: IpNetwork
    via: IpAddress


@dataclass(frozen=True)
class InterfaceSpec:
    """One interface wanted inside a container netns (plain values, no model objects)."""

    container_id: str
    ifname: str
    addresses: tuple[IpInterface, ...] = ()
    mac: str | None = None
    mtu: int | None = None
    gateway: IpAddress | None = None
    routes: tuple[Route, ...] = ()
    owner: str | None = None  # recorded as the host veth's ifalias (see host_veth_alias)
    tx_checksum: bool | None = None  # TX checksum offload inside; None leaves it alone
    # A gratuitous ARP after (re)addressing. False when the caller announces itself once
    # the host end is on its switch (before that, nobody would hear it).
    announce: bool = True

    def __post_init__(self) -> None:
        if not 1 <= len(self.ifname) <= _MAX_IFNAME or "/" in self.ifname:
            raise NetlinkError(f"invalid interface name {self.ifname!r}")

    @property
    def host_veth(self) -> str:
        return host_veth_name(self.container_id, self.ifname)

    def wanted_routes(self) -> frozenset[Route]:
        """Extra routes plus the default route via `gateway`."""
        wanted = set(self.routes)
        if self.gateway is not None:
            default = ipaddress.ip_network("0.0.0.0/0" if self.gateway.version == 4 else "::/0")
            wanted.add(Route(default, self.gateway))
        return frozenset(wanted)


@dataclass(frozen=True)
class ObservedInterface:
    """The actual state of one container interface and its host veth."""

    ifname: str
    host_veth: str
    exists: bool
    host_present: bool
    paired: bool = False  # the container interface is the peer of our host veth
    mac: str | None = None
    mtu: int | None = None
    up: bool = False
    addresses: frozenset[IpInterface] = frozenset()  # IPv6 link-local excluded
    routes: frozenset[Route] = frozenset()  # main-table routes with a gateway via this iface
    arp_notify: bool | None = None
    promote_secondaries: bool | None = None
    tx_checksum: bool | None = None  # read only when observe() is asked to
    host_ifindex: int | None = None
    host_alias: str | None = None
    host_mtu: int | None = None
    host_up: bool = False
    host_master: str | None = None


@dataclass(frozen=True)
class LinkEvent:
    """A host link notification. kind: "new", "del", or "overflow" (events were lost)."""

    kind: str
    ifname: str = ""
    index: int = 0


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    """Turn rtnetlink / OS errors into NetlinkError naming the operation."""
    try:
        yield
    except NetlinkError:
        raise
    except RtnlError as exc:
        raise NetlinkError(f"{what}: {os.strerror(exc.code)} (errno {exc.code})") from exc
    except (OSError, ValueError, KeyError, TimeoutError) as exc:
        raise NetlinkError(f"{what}: {exc}") from exc


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


# .home: the thread's own netns, a file closed with the thread; .depth: _inside's.
_threads = threading.local()


@contextlib.contextmanager
def _inside(ns_fd: int) -> Iterator[None]:
    """Run the body with the *calling thread* in netns `ns_fd`; always switch back.

    The thread's own namespace is opened once per thread and kept (not once per entry:
    the daemon enters every container it attaches, and twice for some); a nested entry
    returns to the namespace it was entered from."""
    depth: int = getattr(_threads, "depth", 0)
    home: io.FileIO | None = getattr(_threads, "home", None) if depth == 0 else None
    kept = home is not None or depth == 0
    if home is None:
        home = io.FileIO("/proc/thread-self/ns/net", "r")  # O_CLOEXEC, closed when freed
        if depth == 0:
            _threads.home = home
    try:
        _setns(ns_fd)
        _threads.depth = depth + 1
        try:
            yield
        finally:
            _threads.depth = depth
            # If this failed the thread would stay in the container's netns: make it loud.
            _setns(home.fileno())
    finally:
        if not kept:
            home.close()


_SIOCETHTOOL = 0x8946
_SIOCGIFHWADDR = 0x8927  # ifreq: name[16], then sockaddr (family u16, MAC in sa_data)
_ETHTOOL_GTXCSUM = 0x16
_ETHTOOL_STXCSUM = 0x17


def _ethtool_value(fd: int, ifname: str, cmd: int, data: int = 0) -> int:
    """One legacy `struct ethtool_value` ioctl on socket `fd`; returns the value's data."""
    buf = ctypes.create_string_buffer(struct.pack("II", cmd, data), 8)
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(buf))
    fcntl.ioctl(fd, _SIOCETHTOOL, ifr)
    return int(struct.unpack("II", buf.raw)[1])


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); OSError if
    the process is gone."""
    start = parse_start_time(read_proc_file(f"{HOST_PROC}/{pid}/stat", one_record=True))
    if start is None:
        raise OSError(errno.EINVAL, f"unreadable /proc/{pid}/stat")
    return start


def _addresses(ipr: Rtnl, index: int) -> frozenset[IpInterface]:
    out: set[IpInterface] = set()
    for a in ipr.addrs(index):
        iface = ipaddress.ip_interface(f"{a.address}/{a.prefixlen}")
        if iface.version == 6 and iface.ip in _LINK_LOCAL_V6:
            continue  # kernel-managed; never flushed
        out.add(iface)
    return frozenset(out)


def _gateway_routes(ipr: Rtnl, index: int) -> frozenset[Route]:
    """Main-table routes with a gateway that leave through interface `index`."""
    out: set[Route] = set()
    for r in ipr.routes():  # IPv4 and IPv6 in one dump
        if r.table != _RT_TABLE_MAIN or r.oif != index or r.gateway is None:
            continue
        zero = "0.0.0.0" if r.family == socket.AF_INET else "::"  # noqa: S104
        out.add(Route(ipaddress.ip_network(f"{r.dst or zero}/{r.dst_len}"),
                      ipaddress.ip_address(r.gateway)))
    return frozenset(out)


def _garp_frame(mac: str, ip: ipaddress.IPv4Address) -> bytes:
    hw = bytes.fromhex(mac.replace(":", ""))
    eth = b"\xff" * 6 + hw + struct.pack("!H", _ETH_P_ARP)
    # ARP request, sender = target = our IP (RFC 5227 "ARP announcement").
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip.packed + b"\x00" * 6 + ip.packed
    return eth + arp


_closing: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
_closer_started = threading.Lock()
_closer: list[threading.Thread] = []


def _close_later(sock: socket.socket) -> None:
    """Close `sock` on one long-lived background thread (not a thread per socket)."""
    _closing.put(sock)
    with _closer_started:
        if not _closer:
            t = threading.Thread(target=_close_forever, name="netns-socket-closer",
                                 daemon=True)
            t.start()
            _closer.append(t)


def _close_forever() -> None:
    while True:
        sock = _closing.get()
        with contextlib.suppress(OSError):
            sock.close()


# --------------------------------------------------------------------------- namespaces


class ContainerNetns:
    """A container's network namespace, held open as an fd and verified against PID reuse.

    Use `open`; close with `close()` or a ``with`` block. Holds one netlink socket created
    inside the namespace (lazily) for all rtnetlink work there.
    """

    def __init__(self, fd: int, pid: int, start_time: int) -> None:
        self.fd = fd
        self.pid = pid
        self.start_time = start_time
        self.inode = os.fstat(fd).st_ino
        self._ipr: Rtnl | None = None
        self._packet: socket.socket | None = None
        self._lock = threading.RLock()

    @classmethod
    def open(
        cls,
        pid: int,
        *,
        expected_start_time: int | None = None,
        container_id: str | None = None,
    ) -> ContainerNetns:
        """Open /proc/<pid>/ns/net, then check the process is still the one meant.

        The checks run *after* the fd is open, so the namespace held is the one of the
        process that matched: `expected_start_time` (see `process_start_time`) and/or
        `container_id` (must occur in /proc/<pid>/cgroup, as with docker's cgroup paths).
        """
        try:
            fd = os.open(f"{HOST_PROC}/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetlinkError(f"cannot open netns of pid {pid}: {exc.strerror}") from exc
        try:
            start = process_start_time(pid)
            if expected_start_time is not None and start != expected_start_time:
                raise NetlinkError(
                    f"pid {pid} was reused: start time {start} != expected {expected_start_time}"
                )
            if container_id is not None and container_id not in cgroup(pid):
                raise NetlinkError(f"pid {pid} does not belong to container {container_id}")
        except OSError as exc:
            os.close(fd)
            raise NetlinkError(f"pid {pid} vanished while opening its netns: {exc}") from exc
        except NetlinkError:
            os.close(fd)
            raise
        return cls(fd, pid, start)

    def iproute(self) -> Rtnl:
        """The rtnetlink socket inside this namespace."""
        with self._lock:
            if self._ipr is None:
                with _translate(f"netlink socket in netns of pid {self.pid}"):
                    with _inside(self.fd):
                        sock = socket.socket(
                            socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE
                        )
                    self._ipr = Rtnl(sock)  # binds: we know its port id (see NetnsWatcher)
                    OWN_PORTIDS.add(self._ipr.portid)
            return self._ipr

    def read_sysctl(self, path: str) -> str | None:
        """Read /proc/sys/<path> as seen inside this namespace; None if absent."""
        with _translate(f"read sysctl {path}"), _inside(self.fd):
            try:
                with open(f"/proc/sys/{path}", encoding="ascii") as f:
                    return f.read().strip()
            except FileNotFoundError:
                return None

    def write_sysctl(self, path: str, value: str) -> None:
        with (
            _translate(f"write sysctl {path}"),
            _inside(self.fd),
            open(f"/proc/sys/{path}", "w", encoding="ascii") as f,
        ):
            f.write(value)

    def tx_checksum(self, ifname: str, enable: bool | None = None) -> bool:
        """Read (and with `enable`, set) TX checksum offload of `ifname` in this netns,
        through the ethtool ioctl (no process). Returns the state before any change."""
        # Any socket of the namespace takes device ioctls: the netlink one, no setns.
        fd = self.iproute().fileno()
        with _translate(f"ethtool tx checksum on {ifname}"):
            current = bool(_ethtool_value(fd, ifname, _ETHTOOL_GTXCSUM))
            if enable is not None and enable != current:
                _ethtool_value(fd, ifname, _ETHTOOL_STXCSUM, int(enable))
            return current

    def set_tx_checksum(self, ifname: str, enable: bool) -> None:
        """Set TX checksum offload of `ifname` in this netns without reading it first."""
        with _translate(f"ethtool tx checksum on {ifname}"):
            _ethtool_value(self.iproute().fileno(), ifname, _ETHTOOL_STXCSUM, int(enable))

    def send_garp(self, ifname: str, mac: str | None, ips: list[ipaddress.IPv4Address]
                  ) -> None:
        """Send one gratuitous ARP per address out of `ifname` inside the namespace;
        `mac` None: the interface's own, asked of the kernel with one ioctl."""
        with self._lock, _translate(f"gratuitous ARP on {ifname}"):
            if self._packet is None:
                with _inside(self.fd):
                    # Protocol 0: send-only, no receive hook. Kept for the life of the handle:
                    # closing a packet socket waits for an RCU grace period (~12 ms).
                    self._packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            if not mac:
                # Any socket of the namespace takes device ioctls: no netlink socket (and
                # its two namespace switches) only to read the MAC.
                ifr = fcntl.ioctl(self._packet.fileno(), _SIOCGIFHWADDR,
                                  struct.pack("16s16x", ifname.encode()))
                mac = ":".join(f"{b:02x}" for b in ifr[18:24])
            for ip in ips:
                self._packet.sendto(_garp_frame(mac, ip), (ifname, _ETH_P_ARP))

    def close(self) -> None:
        with self._lock:
            if self._ipr is not None:
                with contextlib.suppress(Exception):
                    self._ipr.close()
                self._ipr = None
            if self._packet is not None:
                # close() blocks in synchronize_net() (~12 ms): off the caller's thread.
                _close_later(self._packet)
                self._packet = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> ContainerNetns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- adapter


@dataclass
class NetlinkAdapter:
    """Host-side rtnetlink (one persistent socket) plus work inside `ContainerNetns`."""

    # One host socket per thread: workers attaching different containers do not wait for
    # each other's kernel work (a veth creation takes ~0.5 ms in the kernel). `_lock`
    # serialises host-wide changes (bridges, host addresses) only.
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False)
    _sockets: list[Rtnl] = field(default_factory=list, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    def _host(self) -> Rtnl:
        ipr: Rtnl | None = getattr(self._local, "rtnl", None)
        if ipr is None:
            with _translate("open host netlink socket"):
                ipr = Rtnl()
            # Its port id, for NetnsWatcher (the veth is created from the host).
            OWN_PORTIDS.add(ipr.portid)
            self._local.rtnl = ipr
            with self._lock:
                self._sockets.append(ipr)
        return ipr

    def close(self) -> None:
        with self._lock:
            for ipr in self._sockets:
                with contextlib.suppress(Exception):
                    ipr.close()
            self._sockets.clear()
            self._local = threading.local()

    def __enter__(self) -> NetlinkAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- container side

    def observe(self, ns: ContainerNetns, container_id: str, ifname: str, *,
                tx_checksum: bool = False) -> ObservedInterface:
        """Read the actual state of `ifname` in `ns` and of its host veth (with
        `tx_checksum`, also its TX checksum offload: one more ioctl)."""
        host_name = host_veth_name(container_id, ifname)
        with _translate(f"observe {ifname} ({host_name})"):
            hipr = self._host()
            nipr = ns.iproute()
            host = hipr.get_link(host_name)
            peer = nipr.get_link(ifname)
            host_fields: dict[str, Any] = {}
            if host is not None:
                master = None
                if host.master:
                    m = hipr.get_link(index=host.master)
                    master = m.name if m else None
                host_fields = {
                    "host_ifindex": host.index,
                    "host_mtu": host.mtu,
                    "host_up": host.up,
                    "host_master": master,
                    "host_alias": host.alias,
                }
            if peer is None:
                return ObservedInterface(
                    ifname=ifname,
                    host_veth=host_name,
                    exists=False,
                    host_present=host is not None,
                    **host_fields,
                )
            arp = peer.inet(INET_CONF_ARP_NOTIFY)
            promote = peer.inet(INET_CONF_PROMOTE_SECONDARIES)
            return ObservedInterface(
                ifname=ifname,
                host_veth=host_name,
                exists=True,
                host_present=host is not None,
                paired=host is not None and _is_pair(host, peer),
                mac=peer.mac,
                mtu=peer.mtu,
                up=peer.up,
                addresses=_addresses(nipr, peer.index),
                routes=_gateway_routes(nipr, peer.index),
                arp_notify=None if arp is None else arp == 1,
                promote_secondaries=None if promote is None else promote == 1,
                tx_checksum=ns.tx_checksum(ifname) if tx_checksum else None,
                **host_fields,
            )

    def ensure_interface(self, ns: ContainerNetns, spec: InterfaceSpec, *,
                         fresh: bool = False) -> Changes:
        """Make `spec.ifname` in `ns` exactly as specified; return what had to change.

        Creates the veth pair if missing, repairs drift (MAC, MTU on both ends, addresses —
        others on the interface are flushed, IPv6 link-local kept —, link state, routes via
        the interface, arp_notify, promote_secondaries) and, with `spec.announce`, sends a
        gratuitous ARP after (re)addressing. An existing interface of that name that is not
        our veth peer is an error.

        `fresh`: the caller has just seen neither end (a first attach). The pair is then
        made without reading anything first, and set up from what was asked for on
        creation: 6 requests instead of 11. Each read of a veth whose peer is in another
        namespace costs the kernel a walk over every namespace id the host has assigned,
        so at 500 containers the reads were a good part of the attach (bench/attach.py).
        If either end appeared meanwhile, the creation fails and the full path runs.
        """
        host_name = spec.host_veth
        changes: list[Change] = []
        with _translate(f"ensure {spec.ifname} ({host_name}) in pid {ns.pid}"):
            hipr = self._host()
            nipr = ns.iproute()
            if fresh:
                made = self._create(ns, hipr, nipr, spec)
                if made is not None:
                    return made
            host = hipr.get_link(host_name)
            peer = nipr.get_link(spec.ifname)
            paired = host is not None and peer is not None and _is_pair(host, peer)
            if peer is not None and not paired and self._retired_peer(peer):
                # The interface was detached a moment ago (retired, not deleted yet): its
                # end in the container still holds the name. Reap now.
                self.reap_retired()
                peer = nipr.get_link(spec.ifname)
            if peer is not None and not paired:
                raise NetlinkError(
                    f"{spec.ifname} exists in netns of pid {ns.pid} and is not reconciler's "
                    f"veth {host_name}"
                )
            if not paired:
                if host is not None:
                    hipr.del_link(host.index)
                    changes.append(Change.RECREATED)
                else:
                    changes.append(Change.CREATED)
                # MAC and MTU are set on creation (the peer cannot be brought up before the
                # pair is registered; both ends go up below).
                hipr.add_veth(host_name, spec.ifname, peer_netns_fd=ns.fd, mtu=spec.mtu,
                              peer_mac=spec.mac.lower() if spec.mac else None)
                host = hipr.get_link(host_name)
                peer = nipr.get_link(spec.ifname)
                if host is None or peer is None:
                    raise NetlinkError(f"veth {host_name}/{spec.ifname} vanished after creation")
                # The host end is a switch port: no IPv6 link-local address on it, set
                # while it is down (the kernel's addrconf work for every new veth, DAD and
                # router solicitations, competed with attaching the next containers).
                hipr.set_link(host.index, alias=spec.owner, ipv6_addrconf=False)
                host = dataclasses.replace(host, alias=spec.owner)
            assert host is not None and peer is not None
            index = peer.index
            created = bool(changes)

            # Interface settings first: arp_notify makes the kernel announce on link-up too.
            if self._ensure_sysctls(ns, nipr, peer.index, peer, spec):
                changes.append(Change.SYSCTL)

            peer_up = peer.up
            mac = (peer.mac or "").lower()
            if spec.mac is not None and mac != spec.mac.lower():
                if peer_up:  # not every driver allows a live MAC change
                    nipr.set_link(index, up=False)
                    peer_up = False
                nipr.set_link(index, mac=spec.mac.lower())
                mac = spec.mac.lower()
                changes.append(Change.MAC)
            if spec.mtu is not None and peer.mtu != spec.mtu:
                nipr.set_link(index, mtu=spec.mtu)
                changes.append(Change.MTU)
            if spec.mtu is not None and host.mtu != spec.mtu:
                hipr.set_link(host.index, mtu=spec.mtu)
                changes.append(Change.HOST_MTU)

            # A veth made a moment ago has no address and no route yet (IPv6 link-local
            # aside, which is never touched): nothing to read before adding.
            readdressed = self._ensure_addresses(nipr, index, spec.addresses, fresh=created)
            if readdressed:
                changes.append(Change.ADDRESSES)

            if not host.up:
                hipr.set_link(host.index, up=True)
                changes.append(Change.HOST_UP)
            if not peer_up:
                nipr.set_link(index, up=True)
                changes.append(Change.UP)

            v4 = [a.ip for a in spec.addresses if isinstance(a, ipaddress.IPv4Interface)]
            if spec.announce and v4 and (created or readdressed or Change.MAC in changes):
                ns.send_garp(spec.ifname, mac, v4)
                changes.append(Change.GARP)

            if self._ensure_routes(nipr, index, spec.wanted_routes(), fresh=created):
                changes.append(Change.ROUTES)
            if spec.owner is not None and host.alias != spec.owner:
                hipr.set_link(host.index, alias=spec.owner)
                changes.append(Change.ALIAS)
        return Changes(changes, host.index)

    def create_interface(self, ns: ContainerNetns, spec: InterfaceSpec) -> Changes | None:
        """Make `spec.ifname` in `ns` as a new veth pair, set up as `ensure_interface`
        would, without reading either end first; None, having changed nothing, when
        either end exists (EEXIST): then observe it and use `ensure_interface`."""
        with _translate(f"create {spec.ifname} ({spec.host_veth}) in pid {ns.pid}"):
            return self._create(ns, self._host(), ns.iproute(), spec)

    def _create(self, ns: ContainerNetns, hipr: Rtnl, nipr: Rtnl, spec: InterfaceSpec
                ) -> Changes | None:
        """The fresh path of `ensure_interface`; None when an end exists (EEXIST)."""
        try:
            # The host end goes up on creation: without its peer up it has no carrier,
            # so IPv6 addrconf does not start before it is switched off below. The kernel
            # echoes the new link (its index and the peer's): nothing is read after.
            host = hipr.add_veth(spec.host_veth, spec.ifname, peer_netns_fd=ns.fd,
                                 mtu=spec.mtu, peer_mac=spec.mac.lower() if spec.mac else None,
                                 up=True)
        except RtnlError as exc:
            if exc.code == errno.EEXIST:
                return None
            raise
        if host is None:  # a kernel that does not echo a creation
            host = hipr.get_link(spec.host_veth)
        if host is None:
            raise NetlinkError(f"veth {spec.host_veth}/{spec.ifname} vanished after creation")
        index = host.peer_index  # IFLA_LINK: the peer's index in its namespace
        if not index:  # left out when both ends' indexes are equal; 0: peer gone
            peer = nipr.get_link(spec.ifname)
            if peer is None:
                raise NetlinkError(f"veth {spec.host_veth}/{spec.ifname} vanished after "
                                   f"creation")
            index = peer.index
        changes = [Change.CREATED]
        # A switch port: no IPv6 link-local address, DAD or router solicitations.
        hipr.set_link(host.index, alias=spec.owner, ipv6_addrconf=False)
        self._ensure_sysctls(ns, nipr, index, None, spec, fresh=True)
        changes.append(Change.SYSCTL)
        if self._ensure_addresses(nipr, index, spec.addresses, fresh=True):
            changes.append(Change.ADDRESSES)
        changes.append(Change.HOST_UP)
        # Up, and arp_notify and promote_secondaries in the same request (the kernel
        # applies them after the flags: its own announcement at this first up, before
        # the port is on a switch, went nowhere; ours follows once it is).
        nipr.set_link(index, up=True, inet_conf=dict(_INET_CONF))
        changes.append(Change.UP)
        v4 = [a.ip for a in spec.addresses if isinstance(a, ipaddress.IPv4Interface)]
        if spec.announce and v4:
            ns.send_garp(spec.ifname, spec.mac.lower() if spec.mac else None, v4)
            changes.append(Change.GARP)
        if self._ensure_routes(nipr, index, spec.wanted_routes(), fresh=True):
            changes.append(Change.ROUTES)
        return Changes(changes, host.index)

    def announce(self, ns: ContainerNetns, ifname: str,
                 mac: str | None = None, addresses: tuple[IpInterface, ...] | None = None,
                 ) -> int:
        """Send a gratuitous ARP for every IPv4 address of `ifname`; returns how many.

        For after the host end was (re)attached to a switch, e.g. when OVS re-opened a
        recreated veth after `ensure_interface` already announced: neighbours (the host's
        gateway address included) otherwise keep the old MAC until their entry times out.
        `addresses`, when the caller knows them, spare reading the interface (its MAC,
        unless given, is then asked of the kernel by the announcing socket).
        """
        with _translate(f"announce {ifname} in pid {ns.pid}"):
            if addresses is None:
                nipr = ns.iproute()
                link = nipr.get_link(ifname)
                if link is None:
                    raise NetlinkError(f"announce: no {ifname} in netns of pid {ns.pid}")
                mac = mac or link.mac or ""
                if addresses is None:
                    addresses = tuple(_addresses(nipr, link.index))
            v4 = [a.ip for a in addresses if isinstance(a, ipaddress.IPv4Interface)]
            if v4:
                ns.send_garp(ifname, mac, v4)
            return len(v4)

    @staticmethod
    def _ensure_sysctls(ns: ContainerNetns, ipr: Rtnl, index: int, peer: Link | None,
                        spec: InterfaceSpec, *, fresh: bool = False) -> bool:
        """Set the interface's sysctls; `peer` None: not read. `fresh`: a veth made just
        now, whose IPv4 settings the caller sets with its first up, and whose TX checksum
        is the driver's default (set without reading it first)."""
        changed = False
        # arp_notify: announce on link-up; promote_secondaries: deleting one address of a
        # subnet (someone else's, being replaced by ours) must not take ours with it.
        conf = {} if fresh else {k: v for k, v in _INET_CONF
                                 if peer is None or peer.inet(k) != v}
        if conf:
            ipr.set_link(index, inet_conf=conf)
            changed = True
        if spec.tx_checksum is not None:
            if fresh:
                ns.set_tx_checksum(spec.ifname, spec.tx_checksum)
                changed = True
            elif ns.tx_checksum(spec.ifname, spec.tx_checksum) != spec.tx_checksum:
                changed = True
        if any(a.version == 6 for a in spec.addresses):
            # docker disables IPv6 in some namespaces; an IPv6 address needs it on.
            path = f"net/ipv6/conf/{spec.ifname}/disable_ipv6"
            if ns.read_sysctl(path) == "1":
                ns.write_sysctl(path, "0")
                changed = True
        return changed

    @staticmethod
    def _ensure_addresses(ipr: Rtnl, index: int, wanted: tuple[IpInterface, ...],
                          fresh: bool = False) -> bool:
        want = frozenset(wanted)
        if fresh:
            # Created by us just now: add without reading first. Someone racing us on an
            # interface that did not exist a moment ago shows up in its netns watch.
            for missing in want:
                ipr.add_addr(index, str(missing.ip), missing.network.prefixlen,
                             flags=_IFA_F_NODAD if missing.version == 6 else 0)
            return bool(want)
        changed = False
        # Someone may change the addresses while we do (and the kernel's side effects of
        # our own requests come back under our port id, which the netns watcher ignores):
        # read back after changing, and go again until they hold (a few rounds at most).
        for _ in range(4):
            have = _addresses(ipr, index)
            if have == want:
                return changed
            changed = True
            # Delete before adding: deleting a subnet's primary address deletes its
            # secondaries too where promote_secondaries is off (it is set on, see
            # _ensure_sysctls, but someone may switch it off again).
            for extra in have - want:
                with contextlib.suppress(RtnlError):  # may be gone already
                    ipr.del_addr(index, str(extra.ip), extra.network.prefixlen)
            left = have if not have - want else _addresses(ipr, index)
            for missing in want - left:
                # IPv6 without DAD: usable at once; we own the address plan.
                with contextlib.suppress(RtnlError):  # read back: next round
                    ipr.add_addr(index, str(missing.ip), missing.network.prefixlen,
                                 flags=_IFA_F_NODAD if missing.version == 6 else 0)
        if _addresses(ipr, index) != want:
            raise NetlinkError("addresses keep changing under us; will retry")
        return changed

    @staticmethod
    def _ensure_routes(ipr: Rtnl, index: int, wanted: frozenset[Route],
                       fresh: bool = False) -> bool:
        if fresh and not wanted:
            return False
        have = frozenset() if fresh else _gateway_routes(ipr, index)
        for extra in have - wanted:
            with contextlib.suppress(RtnlError):  # may already be gone with an addr
                ipr.del_route(str(extra.dst), str(extra.via), index)
        for missing in wanted - have:
            # replace: a default route through another interface is taken over.
            ipr.replace_route(str(missing.dst), str(missing.via), index)
        return have != wanted

    # ---------------------------------------------------------------- host veths

    def detach(self, container_id: str, ifname: str) -> bool:
        """Remove the host veth of (container, ifname), which removes its peer too."""
        return self.delete_host_veth(host_veth_name(container_id, ifname))

    def delete_host_veth(self, name: str) -> bool:
        """Delete host link `name`; False if it was already gone."""
        if not is_owned_host_veth_name(name):
            raise NetlinkError(f"refusing to delete {name!r}: not a reconciler veth name")
        return self._delete_link(name)

    def retire_host_veth(self, name: str) -> bool:
        """Take host veth `name` (and so its peer) out of service now, and leave the
        deletion to `reap_retired`; False if it was already gone.

        Deleting a veth waits for an RCU grace period (~15-20 ms here), one after the
        other: removing 500 took 8-10 s. Retired, it is down, renamed ``rx<hash>`` (its
        name is free at once for a new interface of that container) and in
        `RETIRED_GROUP`; one group delete then removes all of them in one batch."""
        if not is_owned_host_veth_name(name):
            raise NetlinkError(f"refusing to retire {name!r}: not a reconciler veth name")
        retired = RETIRED_VETH_PREFIX + name[len(HOST_VETH_PREFIX):]
        ipr = self._host()
        with _translate(f"retire link {name}"):
            link = ipr.get_link(name)
            if link is None:
                return False
            try:
                # Off its Linux bridge as well (master 0): a bridge left with only retired
                # ports must read as empty to the sweep, which removes unused bridges.
                ipr.set_link(link.index, up=False, name=retired, group=RETIRED_GROUP,
                             master=0)
            except RtnlError as exc:
                if exc.code == errno.ENODEV:
                    return False
                if exc.code == errno.EEXIST:  # retired before, not reaped yet
                    self.reap_retired()
                elif exc.code != errno.EBUSY:  # EBUSY: a kernel that renames only down
                    raise
                ipr.set_link(link.index, up=False, master=0)
                ipr.set_link(link.index, name=retired, group=RETIRED_GROUP)
        return True

    def _retired_peer(self, peer: Link) -> bool:
        """Whether container link `peer` is the peer of a retired host veth."""
        if peer.kind != "veth" or not peer.peer_index:
            return False
        host = self._host().get_link(index=peer.peer_index)
        return host is not None and host.name.startswith(RETIRED_VETH_PREFIX) \
            and host.peer_index == peer.index

    def reap_retired(self) -> bool:
        """Delete every retired host veth, in one request; whether there was any."""
        with _translate("delete retired links"):
            return self._host().del_link(group=RETIRED_GROUP)

    def _delete_link(self, name: str) -> bool:
        OWN_LINK_DELETES.add(name)  # before: the report may come before the answer
        deleted = False
        try:
            with _translate(f"delete link {name}"):
                deleted = self._host().del_link(name=name)
        finally:
            if not deleted:
                OWN_LINK_DELETES.discard(name)
        return deleted

    def list_owned_host_veths(self, node: str | None = None) -> list[str]:
        """Names of host veths that reconciler created (by name shape and kind); with
        `node`, only those whose ifalias says that node's daemon owns them."""
        want = None if node is None else f"{OWNER_ALIAS_PREFIX}{node}/"
        with self._lock, _translate("list host links"):
            out = []
            for link in self._host().links(kind="veth"):
                if not (is_owned_host_veth_name(link.name) and link.kind == "veth"):
                    continue
                if want is not None and not (link.alias or "").startswith(want):
                    continue
                out.append(link.name)
            return sorted(out)

    def host_veth_interfaces(self, node: str, container_id: str) -> set[str]:
        """The container interfaces whose host veths record `node`'s daemon as owner
        (their ifalias, see host_veth_alias): one listing of the host's links."""
        want = f"{OWNER_ALIAS_PREFIX}{node}/{container_id}/"
        with self._lock, _translate("list host links"):
            return {(link.alias or "")[len(want):] for link in self._host().links(kind="veth")
                    if link.kind == "veth" and (link.alias or "").startswith(want)}

    def link_exists(self, name: str) -> bool:
        return self.link_index(name) is not None

    def link_index(self, name: str) -> int | None:
        """The ifindex of host link `name` (e.g. for `OvsAdapter.ensure_port`), or None."""
        with _translate(f"get link {name}"):
            link = self._host().get_link(name)
            return None if link is None else link.index

    # ---------------------------------------------------------------- Linux bridges

    def ensure_linux_bridge(
        self, name: str, network: str, mtu: int | None = None, node: str | None = None
    ) -> tuple[Change, ...]:
        """Create bridge `name` (owned by `network`, made by `node`'s daemon) if missing;
        set MTU; bring it up. Its ifalias records both: ``reconciler:<network>@<node>``.

        A pre-existing bridge that is not ours is used as it is and never re-labelled.
        """
        changes: list[Change] = []
        with self._lock, _translate(f"ensure bridge {name}"):
            ipr = self._host()
            link = ipr.get_link(name)
            if link is None:
                ipr.add_bridge(name)
                link = ipr.get_link(name)
                if link is None:
                    raise NetlinkError(f"bridge {name} vanished after creation")
                # Pin the MAC: otherwise the bridge takes the lowest port MAC and changes it
                # as ports come and go, breaking neighbours' ARP entries for the gateway.
                alias = OWNER_ALIAS_PREFIX + network + (f"@{node}" if node else "")
                ipr.set_link(link.index, mac=link.mac, alias=alias)
                changes.append(Change.CREATED)
            elif link.kind != "bridge":
                raise NetlinkError(f"{name} exists and is not a bridge ({link.kind})")
            if mtu is not None and link.mtu != mtu:
                ipr.set_link(link.index, mtu=mtu)
                changes.append(Change.MTU)
            if not link.up:
                ipr.set_link(link.index, up=True)
                changes.append(Change.UP)
        return tuple(changes)

    def bridge_owner(self, name: str) -> str | None:
        """The network that owns Linux bridge `name`, or None if absent / not ours."""
        with self._lock, _translate(f"get link {name}"):
            link = self._host().get_link(name)
        owner = _bridge_alias(link.alias) if link is not None else None
        return owner[0] if owner is not None else None

    def list_owned_bridges(self, node: str | None = None) -> dict[str, str]:
        """{bridge name: network} for every Linux bridge reconciler created (with `node`:
        that node's daemon created)."""
        with self._lock, _translate("list bridges"):
            out = {}
            for link in self._host().links(kind="bridge"):
                owner = _bridge_alias(link.alias) if link.kind == "bridge" else None
                if owner is not None and (node is None or owner[1] == node):
                    out[link.name] = owner[0]
            return out

    def bridge_state(self, name: str) -> tuple[bool, int | None, bool] | None:
        """(is a bridge, MTU, up) of link `name`; None when there is no such link."""
        with self._lock, _translate(f"read link {name}"):
            link = self._host().get_link(name)
            return None if link is None else (link.kind == "bridge", link.mtu, link.up)

    def bridge_has_ports(self, name: str) -> bool:
        """Whether any link has Linux bridge `name` as its master."""
        with self._lock, _translate(f"list ports of {name}"):
            ipr = self._host()
            br = ipr.get_link(name)
            return br is not None and bool(ipr.links(master=br.index))

    def delete_linux_bridge(self, name: str) -> bool:
        """Delete bridge `name` if reconciler created it; False if absent or not ours."""
        if self.bridge_owner(name) is None:
            return False
        return self._delete_link(name)

    def enslave(self, ifname: str, bridge: str) -> bool:
        """Make Linux bridge `bridge` the master of `ifname`; True if it changed."""
        with _translate(f"enslave {ifname} to {bridge}"):
            ipr = self._host()
            link = ipr.get_link(ifname)
            br = ipr.get_link(bridge)
            if link is None or br is None:
                raise NetlinkError(f"enslave {ifname} to {bridge}: no such link")
            if link.master == br.index:
                return False
            ipr.set_link(link.index, master=br.index)
            return True

    def ensure_host_address(self, ifname: str, cidr: IpInterface) -> tuple[Change, ...]:
        """Give host link `ifname` address `cidr` (others kept) and bring it up."""
        changes: list[Change] = []
        with self._lock, _translate(f"address {cidr} on {ifname}"):
            ipr = self._host()
            link = ipr.get_link(ifname)
            if link is None:
                raise NetlinkError(f"no link {ifname} for address {cidr}")
            if cidr not in _addresses(ipr, link.index):
                ipr.add_addr(link.index, str(cidr.ip), cidr.network.prefixlen,
                             flags=_IFA_F_NODAD if cidr.version == 6 else 0)
                changes.append(Change.ADDRESSES)
            if not link.up:
                ipr.set_link(link.index, up=True)
                changes.append(Change.UP)
        return tuple(changes)

    def ensure_host_mac(self, ifname: str, mac: str) -> bool:
        """Give host link `ifname` MAC `mac`; True when it changed."""
        with self._lock, _translate(f"mac {mac} on {ifname}"):
            ipr = self._host()
            link = ipr.get_link(ifname)
            if link is None:
                raise NetlinkError(f"no link {ifname} for mac {mac}")
            if (link.mac or "").lower() == mac.lower():
                return False
            ipr.set_link(link.index, mac=mac.lower())
            return True

    def master_of(self, ifname: str) -> str | None:
        """The name of host link `ifname`'s master (bridge), if any."""
        with self._lock, _translate(f"read link {ifname}"):
            ipr = self._host()
            link = ipr.get_link(ifname)
            if link is None or not link.master:
                return None
            m = ipr.get_link(index=link.master)
            return m.name if m else None

    def has_host_address(self, ifname: str, cidr: IpInterface) -> bool:
        """Whether host link `ifname` exists, is up and has address `cidr`."""
        with self._lock, _translate(f"read addresses of {ifname}"):
            ipr = self._host()
            link = ipr.get_link(ifname)
            return link is not None and link.up and cidr in _addresses(ipr, link.index)


def _bridge_alias(alias: str | None) -> tuple[str, str | None] | None:
    """(network, node) from an owned bridge's ifalias (node None: made before it was
    recorded); None when the bridge is not ours."""
    if not alias or not alias.startswith(OWNER_ALIAS_PREFIX):
        return None
    network, _, node = alias[len(OWNER_ALIAS_PREFIX):].partition("@")
    return network, node or None


def _is_pair(host: Link, peer: Link) -> bool:
    """Whether host veth `host` and container link `peer` are the two ends of one veth."""
    return peer.kind == "veth" and peer.peer_index == host.index \
        and host.peer_index == peer.index


# --------------------------------------------------------------------------- notifications


_RTM_DELLINK = 17
_SO_ATTACH_FILTER = 26
_BPF_LD_H_ABS = 0x28
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06


def _only_message_type(sock: socket.socket, kind: int) -> None:
    """Attach a classic BPF filter: the kernel queues to `sock` only netlink messages of
    type `kind` (a notification is one message per datagram). BPF loads read network
    byte order; the netlink header is in host order."""
    want = int.from_bytes(struct.pack("=H", kind), "big")
    prog = [(_BPF_LD_H_ABS, 0, 0, 4),           # A = nlmsg_type
            (_BPF_JEQ_K, 0, 1, want),           # A == kind ?
            (_BPF_RET_K, 0, 0, 0xFFFFFFFF),     # keep it all
            (_BPF_RET_K, 0, 0, 0)]              # drop
    insns = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(insns))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


class LinkWatcher:
    """Host RTM_NEWLINK/RTM_DELLINK notifications from a netlink multicast socket.

    ``fileno()`` lets an event loop wait for readability (``loop.add_reader``); `read`
    returns the pending events. On socket overflow a single ``LinkEvent("overflow")``
    tells the caller to resynchronise everything.
    """

    def __init__(self, *, deletions_only: bool = False) -> None:
        """`deletions_only`: the kernel passes only RTM_DELLINK to the socket (a socket
        filter): new and changed links are neither queued nor read. The daemon acts on
        deletions only, and every attach and port change makes several RTM_NEWLINK: their
        reading was an eighth of the daemon's busy time attaching 500 containers
        (bench/attach.py)."""
        with _translate("open link watcher"):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if deletions_only:
                _only_message_type(self._sock, _RTM_DELLINK)
            self._sock.bind((0, RTMGRP_LINK))

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, timeout: float | None = 0.0) -> list[LinkEvent]:
        """Events available within `timeout` seconds (None: wait until some arrive)."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return []
        events: list[LinkEvent] = []
        while True:
            try:
                data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    events.append(LinkEvent("overflow"))
                    continue
                raise NetlinkError(f"link watcher: {exc}") from exc
            # Only the name and index: decoding every attribute (pyroute2's Marshal) cost
            # ~150 µs a message, several per attached container (bench/attach.py).
            for t, index, name in parse_link_events(data):
                if t != RTM_NEWLINK and OWN_LINK_DELETES.take(name):
                    continue  # this process deleted it: not drift
                events.append(LinkEvent("new" if t == RTM_NEWLINK else "del", name, index))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LinkWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Link, IPv4/IPv6 address and route changes: what drift inside a container looks like.
_NETNS_GROUPS = 0x1 | 0x10 | 0x40 | 0x100 | 0x400
_SOL_NETLINK, _NETLINK_LISTEN_ALL_NSID = 270, 8
_SO_RCVBUFFORCE = 33
_SO_ATTACH_FILTER = 26
_NSID_CMSG_SPACE = socket.CMSG_SPACE(4)


def _be16(value: int) -> int:
    """A host-order u16 of a message as a classic BPF half-word load sees it (BPF loads
    are big-endian; netlink headers are in host order)."""
    return int.from_bytes(struct.pack("=H", value), "big")


# Classic BPF on the watch socket: let through what `_foreign_change` can count (every
# report a request caused: nlmsg_pid != 0; the kernel's own reports of links), drop the
# kernel's own address and route reports (pid 0: the local, broadcast and subnet routes
# that follow an address, IPv6 link-local addresses and routes), which it never counts.
# Half of an attach's reports (7 of 14 in a namespace with IPv6), each a receive and a
# parse by the daemon, not made. One report per message: the kernel sends reports one to
# a buffer. Instructions: (code, jump if true, jump if false, k).
_WATCH_FILTER = (
    (0x20, 0, 0, 12),                      # ld  nlmsg_pid
    (0x15, 0, 4, 0),                       # jeq #0 ? next : accept
    (0x28, 0, 0, 4),                       # ldh nlmsg_type
    (0x15, 2, 0, _be16(RTM_NEWLINK)),      # jeq RTM_NEWLINK ? accept : next
    (0x15, 1, 0, _be16(_RTM_DELLINK)),     # jeq RTM_DELLINK ? accept : drop
    (0x06, 0, 0, 0),                       # ret 0: drop
    (0x06, 0, 0, 0xFFFFFFFF),              # ret all: accept
)


def _attach_filter(sock: socket.socket, program: Iterable[tuple[int, int, int, int]]
                   ) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program before setsockopt returns."""
    code = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER,
                    struct.pack("@HP", len(code) // 8, ctypes.addressof(buf)))


class _RecentPorts:
    """The netlink port ids of this process's own rtnetlink sockets (the most recent
    4096): a notification carries the port id of the socket whose request caused it."""

    def __init__(self, keep: int = 4096) -> None:
        self._ids: dict[int, None] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def add(self, portid: int) -> None:
        with self._lock:
            self._ids.pop(portid, None)
            self._ids[portid] = None
            while len(self._ids) > self._keep:
                del self._ids[next(iter(self._ids))]

    def __contains__(self, portid: object) -> bool:
        return portid in self._ids


OWN_PORTIDS = _RecentPorts()


class RecentNames:
    """Names this process marked a moment ago (for `ttl` seconds), each taken by the
    first report about it: links or OVS ports it is deleting. The kernel reports every
    link deletion with port id 0 and OVSDB every row deletion alike, so the daemon's own
    deletions came back as drift — two more looks at each of N containers detached at
    once (bench/attach.py)."""

    def __init__(self, ttl: float = 10.0, keep: int = 8192) -> None:
        self._names: dict[str, float] = {}
        self._ttl = ttl
        self._keep = keep
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)
            self._names[name] = time.monotonic() + self._ttl
            while len(self._names) > self._keep:
                del self._names[next(iter(self._names))]

    def discard(self, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)

    def take(self, name: str) -> bool:
        """Whether `name` was marked (and not expired); unmarks it."""
        if name not in self._names:  # the common case, without the lock
            return False
        with self._lock:
            deadline = self._names.pop(name, None)
        return deadline is not None and deadline >= time.monotonic()


OWN_LINK_DELETES = RecentNames()  # host links this process is deleting


@dataclass(frozen=True)
class LinkExpect:
    """How a watched container link should look (None: any), see `NetnsWatcher.expect`."""

    mtu: int | None = None
    mac: str | None = None
    up: bool = True

    def differs(self, link: Link) -> bool:
        return (self.mtu is not None and link.mtu != self.mtu) \
            or (self.mac is not None and (link.mac or "").lower() != self.mac.lower()) \
            or (self.up and not link.up)


def _foreign_change(data: bytes, expected: Mapping[str, LinkExpect] | None = None,
                    last: dict[str, tuple[int, Link]] | None = None) -> bool:
    """Whether a batch of rtnetlink notifications holds one caused by someone else.

    A notification carries the port id of the socket whose request caused it: ours are
    ignored (they would echo back as work). Port id 0 is the kernel's own report of a
    link change — an MTU, MAC or up/down change made by anyone (through ioctl or sysfs
    too), or carrier and link-local changes that follow our own actions: it counts when
    it shows a link of `expected` gone or different from what is expected of it.
    `last` (instead of `expected`): collects the last report of each link, whoever
    caused it, for the caller to judge."""
    off = 0
    while off + 16 <= len(data):
        length, kind, _, _, pid = struct.unpack_from("=IHHII", data, off)
        if length < 16:
            return True  # malformed: look rather than guess
        if pid != 0 and pid not in OWN_PORTIDS:
            return True
        if kind in (RTM_NEWLINK, _RTM_DELLINK) and length >= 32 \
                and (last is not None or (pid == 0 and expected)):
            link = parse_link(data, off + 16, off + length)
            if last is not None:
                last[link.name] = (kind, link)
            elif expected:
                want = expected.get(link.name)
                if want is not None and (kind == _RTM_DELLINK or want.differs(link)):
                    return True
        off += (length + 3) & ~3
    return False


class NetnsWatcher:
    """Netlink notifications from inside many container namespaces, on one socket.

    The socket is in the daemon's own namespace and listens to the link, address and
    route reports of every namespace the host has an id for (NETLINK_LISTEN_ALL_NSID:
    each report comes with that id). `add(key, ns)` gives `ns` an id if it has none and
    files its reports under `key`; `run(callback, stop)` calls `callback(key)` once per
    burst of reports from that namespace. So a changed address, MTU, MAC or route inside
    a container is noticed at once instead of at the next resync, and the resync need
    not enter every namespace. The daemon's own changes come back as reports too (one
    extra, no-op look per change): stopping the watch while changing would lose a
    change someone else makes meanwhile.

    One socket, not one inside each namespace: every report the kernel sends, in any
    namespace, walks every socket of the host that joined a report group. With a socket
    per container that was O(containers) per report, and creating and deleting one veth
    with 500 such sockets (a benchmark's) cost 0.4 ms more CPU than without them. A
    socket filter (`_WATCH_FILTER`) drops in the kernel the reports it never counts.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            try:  # every container's reports share it: room for a burst of attaches
                self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 1 << 24)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
            self._sock.setsockopt(_SOL_NETLINK, _NETLINK_LISTEN_ALL_NSID, 1)
            _attach_filter(self._sock, _WATCH_FILTER)
            self._sock.bind((0, _NETNS_GROUPS))
            self._sock.setblocking(False)
            self._ids = Rtnl()  # asks the kernel for namespace ids
        except OSError:
            self._sock.close()
            raise
        self._keys: dict[int, str] = {}  # nsid -> key
        self._nsids: dict[str, int] = {}  # key -> nsid
        self._inodes: dict[str, int] = {}
        self._expect: dict[str, dict[str, LinkExpect]] = {}
        self._held: dict[str, list[bytes]] = {}  # reports read, not judged yet, by key
        self._pending: set[str] = set()  # foreign changes found by `expect`
        self._lock = threading.Lock()
        self._ep = select.epoll()
        self._ep.register(self._sock.fileno(), select.EPOLLIN)
        # Wakes the poll for keys `expect` found changed.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, select.EPOLLIN)

    def add(self, key: str, ns: ContainerNetns) -> None:
        """Watch `ns` under `key`; a no-op if it is watched already, and a replacement if
        `key` watched another namespace (the container restarted)."""
        with self._lock:
            if key in self._nsids and self._inodes.get(key) == ns.inode:
                return
            with _translate(f"netns watch of pid {ns.pid}"):
                nsid = self._ids.nsid(ns.fd)
            self._read()  # reports so far go to whom they were for
            self._drop(key)
            stale = self._keys.get(nsid)  # a namespace gone, its id given again
            if stale is not None:
                self._drop(stale)
            self._keys[nsid] = key
            self._nsids[key] = nsid
            self._inodes[key] = ns.inode

    def _read(self) -> bool:
        """File every report queued on the socket under its key (lock held); True when
        some were lost (the socket overflowed): then every key is to be looked at."""
        while True:
            try:
                data, anc, _, _ = self._sock.recvmsg(1 << 16, _NSID_CMSG_SPACE)
            except BlockingIOError:
                return False
            except OSError:  # ENOBUFS
                return True
            for level, kind, value in anc:
                if level == _SOL_NETLINK and kind == _NETLINK_LISTEN_ALL_NSID:
                    key = self._keys.get(struct.unpack_from("=i", value)[0])
                    if key is not None:
                        self._held.setdefault(key, []).append(data)
                    break

    def expect(self, key: str, links: Mapping[str, LinkExpect]) -> None:
        """What `key`'s links should look like now that they were reconciled: the kernel's
        own link reports (MTU, MAC, up/down changes by anyone) then count as changes when
        they differ from it.

        Reports already queued span what the reconcile read and did: they are read now,
        and of each link only the last one is held against the new expectation (the
        kernel reports a veth end it creates in the namespace as down, and our own
        request to bring it up comes after). Judged one by one, later, by a watcher
        running behind, a freshly attached container looked changed and was reconciled
        again (bench/attach.py: 57 of 300). Someone else's requests among them count as
        always; a change by sysfs or ioctl after our last request shows in the last
        report."""
        with self._lock:
            if key not in self._nsids:
                return
            lost = self._read()
            foreign = False
            last: dict[str, tuple[int, Link]] = {}
            for data in self._held.pop(key, ()):
                foreign = _foreign_change(data, last=last) or foreign
            for name, want in links.items():
                kind, link = last.get(name, (0, None))
                if link is not None and (kind == _RTM_DELLINK or want.differs(link)):
                    foreign = True
            self._expect[key] = dict(links)
            if foreign:
                self._pending.add(key)
            if lost:  # "look again", for everyone
                self._pending.update(self._nsids)
            if foreign or lost:
                os.eventfd_write(self._wake, 1)

    def forget_links(self, key: str, ifnames: Iterable[str]) -> None:
        """`key`'s links `ifnames` are being removed by the daemon itself: their
        disappearance (reported by the kernel, not by our socket) is no drift."""
        with self._lock:
            expected = self._expect.get(key)
            if expected is not None:
                for name in ifnames:
                    expected.pop(name, None)

    def _drop(self, key: str) -> None:
        nsid = self._nsids.pop(key, None)
        if nsid is not None and self._keys.get(nsid) == key:
            del self._keys[nsid]
        self._inodes.pop(key, None)
        self._expect.pop(key, None)
        self._held.pop(key, None)
        self._pending.discard(key)

    def remove(self, key: str) -> None:
        with self._lock:
            self._read()
            self._drop(key)

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._nsids)

    def run(self, callback: Callable[[str], None], stop: threading.Event, *,
            batch: float = 0.02) -> None:
        """Call `callback(key)` for the keys whose namespaces changed, until `stop`.
        Reports are read at most every `batch` seconds: an attach makes several reports
        per container, and waking (the GIL, the lock `expect` takes) for each of 500
        containers' cost more than reading them together. Drift waits that long more."""
        while not stop.is_set():
            try:
                if self._poll_once(callback) and batch > 0:
                    stop.wait(batch)
            except Exception:
                log.exception("netns watch failed (continuing)")
                stop.wait(0.5)

    def _poll_once(self, callback: Callable[[str], None]) -> bool:
        """One wait for reports (0.5 s at most) and their judgement; whether any came."""
        try:
            ready = self._ep.poll(0.5)
        except OSError:
            return False
        if any(fd == self._wake for fd, _ in ready):
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake)
        with self._lock:
            found, self._pending = self._pending, set()
            if self._read():
                found.update(self._nsids)
            held, self._held = self._held, {}
            for key, reports in held.items():
                expected = self._expect.get(key)
                if key not in found and any(_foreign_change(d, expected) for d in reports):
                    found.add(key)
        for key in found:
            callback(key)
        return bool(ready)

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
            self._nsids.clear()
            self._inodes.clear()
            self._held.clear()
        self._sock.close()
        self._ids.close()
        self._ep.close()
        os.close(self._wake)


def watch_links(callback: Callable[[LinkEvent], None], stop: threading.Event, *,
                deletions_only: bool = False) -> None:
    """Call `callback` for every host link event (`deletions_only`: every deletion) until
    `stop` is set (checked every 0.5 s). Survives errors (logged; the socket is reopened
    after a pause, and an "overflow" event tells the caller to look at everything
    again)."""
    while not stop.is_set():
        try:
            with LinkWatcher(deletions_only=deletions_only) as watcher:
                while not stop.is_set():
                    for event in watcher.read(timeout=0.5):
                        callback(event)
        except Exception:
            log.exception("host link watch failed; reopening")
            stop.wait(1.0)
            if not stop.is_set():
                callback(LinkEvent("overflow"))
