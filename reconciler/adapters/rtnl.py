"""A lean rtnetlink client: the requests the netlink adapter makes, on one raw socket.

Owns the rtnetlink wire format (message and attribute packing, dump parsing) for the few
requests reconciler needs: links (get, dump, veth/bridge create, set, delete), addresses
and routes (dump, add, delete). `reconciler.adapters.netlink` builds on it; nothing else
should.

Why not pyroute2's IPRoute for these: pyroute2 0.9 runs an asyncio event loop for every
synchronous call and decodes every attribute of every reply, ~0.3-0.5 ms of Python per
request; an attachment takes about a dozen requests, which made the daemon's own CPU the
bound when hundreds of containers attach at once (docs/performance.md). Here a request is
one ``send`` and the replies are parsed only for the attributes asked for (~20-40 µs).
pyroute2 remains the reference these layouts were checked against (tests compare both).

A `Rtnl` is bound to the network namespace its socket was created in (see
`netlink.ContainerNetns`); it is thread-safe (one request at a time).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

__all__ = [
    "INET_CONF_ARP_NOTIFY",
    "INET_CONF_PROMOTE_SECONDARIES",
    "Addr",
    "Link",
    "RouteEntry",
    "Rtnl",
    "RtnlError",
    "parse_link",
    "parse_link_events",
]

# message types
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
_RTM_NEWNSID, _RTM_GETNSID = 88, 90
_NETNSA_NSID, _NETNSA_FD = 1, 3
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
# flags
_F_REQUEST, _F_ACK, _F_ECHO = 0x1, 0x4, 0x8
_F_DUMP = 0x300
_F_REPLACE, _F_EXCL, _F_CREATE = 0x100, 0x200, 0x400
# link attributes
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MTU, _IFLA_LINK = 1, 3, 4, 5
_IFLA_MASTER, _IFLA_LINKINFO, _IFLA_IFALIAS, _IFLA_AF_SPEC = 10, 18, 20, 26
_IFLA_GROUP, _IFLA_NET_NS_FD, _IFLA_EXT_MASK = 27, 28, 29
_IFLA_INFO_KIND, _IFLA_INFO_DATA = 1, 2
_VETH_INFO_PEER = 1
_IFLA_INET_CONF = 1
_IFLA_INET6_ADDR_GEN_MODE = 8
_IN6_ADDR_GEN_MODE_NONE = 1
_RTEXT_FILTER_SKIP_STATS = 1 << 3
_IFF_UP = 0x1
_NLA_F_NESTED = 0x8000
# address attributes
_IFA_ADDRESS, _IFA_LOCAL, _IFA_BROADCAST, _IFA_FLAGS = 1, 2, 4, 8
# route attributes / values
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_TABLE = 1, 4, 5, 15
_RT_TABLE_MAIN, _RTPROT_BOOT, _RT_SCOPE_UNIVERSE, _RTN_UNICAST = 254, 3, 0, 1

INET_CONF_PROMOTE_SECONDARIES = 20
"""IPV4_DEVCONF_PROMOTE_SECONDARIES (index into IFLA_INET_CONF, 1-based as the kernel's)."""
INET_CONF_ARP_NOTIFY = 22
"""IPV4_DEVCONF_ARP_NOTIFY."""

_HDR = struct.Struct("=IHHII")  # nlmsghdr
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg
_ATTR = struct.Struct("=HH")


class RtnlError(OSError):
    """A request the kernel refused: `code` is the errno (as pyroute2's NetlinkError)."""

    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}" if what else os.strerror(code))
        self.code = code


@dataclass(frozen=True)
class Link:
    """The parts of an RTM_NEWLINK message reconciler reads."""

    index: int
    name: str
    flags: int
    mtu: int | None = None
    mac: str | None = None
    alias: str | None = None
    master: int | None = None
    peer_index: int | None = None  # IFLA_LINK: a veth's other end
    kind: str | None = None
    inet_conf: tuple[int, ...] | None = None  # IFLA_INET_CONF values (index 0 = conf 1)

    @property
    def up(self) -> bool:
        return bool(self.flags & _IFF_UP)

    def inet(self, conf: int) -> int | None:
        """An IPv4 devconf value (e.g. `INET_CONF_ARP_NOTIFY`), None if not reported."""
        if self.inet_conf is None or not 1 <= conf <= len(self.inet_conf):
            return None
        return self.inet_conf[conf - 1]


@dataclass(frozen=True)
class Addr:
    """One address of an interface."""

    index: int
    family: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class RouteEntry:
    """One route (only what the adapter compares)."""

    family: int
    dst: str | None
    dst_len: int
    table: int
    oif: int | None
    gateway: str | None


# --------------------------------------------------------------------------- packing


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _ATTR.pack(n, kind) + payload + b"\0" * (-n & 3)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(attrs))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _mac(value: str) -> bytes:
    raw = bytes.fromhex(value.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"invalid MAC address {value!r}")
    return raw


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0, family: int = 0) -> bytes:
    return _IFINFO.pack(family, 0, index, flags, change)


def _attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, bytes]]:
    while off + 4 <= end:
        n, kind = _ATTR.unpack_from(data, off)
        if n < 4:
            return
        yield kind & 0x3FFF, data[off + 4 : off + n]
        off += (n + 3) & ~3


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _ip(family: int, raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw) if family == socket.AF_INET
               else ipaddress.IPv6Address(raw))


def _parse_link(data: bytes, off: int, end: int) -> Link:
    _, _, index, flags, _ = _IFINFO.unpack_from(data, off)
    name, mtu, mac, alias, master, peer, kind, conf = "", None, None, None, None, None, None, None
    for t, v in _attrs(data, off + _IFINFO.size, end):
        if t == _IFLA_IFNAME:
            name = _cstr(v)
        elif t == _IFLA_MTU:
            mtu = struct.unpack("=I", v[:4])[0]
        elif t == _IFLA_ADDRESS:
            mac = v.hex(":")
        elif t == _IFLA_IFALIAS:
            alias = _cstr(v)
        elif t == _IFLA_MASTER:
            master = struct.unpack("=I", v[:4])[0]
        elif t == _IFLA_LINK:
            peer = struct.unpack("=I", v[:4])[0]
        elif t == _IFLA_LINKINFO:
            for it, iv in _attrs(v, 0, len(v)):
                if it == _IFLA_INFO_KIND:
                    kind = _cstr(iv)
        elif t == _IFLA_AF_SPEC:
            for af, av in _attrs(v, 0, len(v)):
                if af == socket.AF_INET:
                    for ct, cv in _attrs(av, 0, len(av)):
                        if ct == _IFLA_INET_CONF:
                            conf = struct.unpack(f"={len(cv) // 4}I", cv[: len(cv) // 4 * 4])
    return Link(index, name, flags, mtu, mac, alias, master, peer, kind, conf)


def _parse_addr(data: bytes, off: int, end: int) -> Addr | None:
    family, prefixlen, _, _, index = _IFADDR.unpack_from(data, off)
    local = address = None
    for t, v in _attrs(data, off + _IFADDR.size, end):
        if t == _IFA_LOCAL:
            local = v
        elif t == _IFA_ADDRESS:
            address = v
    # IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on point-to-point).
    raw = local if local is not None else address
    if raw is None:
        return None
    return Addr(index, family, _ip(family, raw), prefixlen)


def _parse_route(data: bytes, off: int, end: int) -> RouteEntry:
    family, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(data, off)
    dst = gw = None
    oif = None
    for t, v in _attrs(data, off + _RTMSG.size, end):
        if t == _RTA_DST:
            dst = _ip(family, v)
        elif t == _RTA_GATEWAY:
            gw = _ip(family, v)
        elif t == _RTA_OIF:
            oif = struct.unpack("=I", v[:4])[0]
        elif t == _RTA_TABLE:
            table = struct.unpack("=I", v[:4])[0]
    return RouteEntry(family, dst, dst_len, table, oif, gw)


def parse_link(data: bytes, off: int, end: int) -> Link:
    """The link of an RTM_NEWLINK/RTM_DELLINK message whose body (after the netlink
    header) is data[off:end]."""
    return _parse_link(data, off, end)


def parse_link_events(data: bytes) -> list[tuple[int, int, str]]:
    """(message type, ifindex, name) of each RTM_NEWLINK / RTM_DELLINK notification in a
    buffer read from a multicast socket; other messages are skipped."""
    out: list[tuple[int, int, str]] = []
    off = 0
    while off + _HDR.size <= len(data):
        n, t, _, _, _ = _HDR.unpack_from(data, off)
        if n < _HDR.size:
            break
        if t in (RTM_NEWLINK, RTM_DELLINK) and n >= _HDR.size + _IFINFO.size:
            body = off + _HDR.size
            index = _IFINFO.unpack_from(data, body)[2]
            name = ""
            for kind, value in _attrs(data, body + _IFINFO.size, off + n):
                if kind == _IFLA_IFNAME:
                    name = _cstr(value)
                    break
            out.append((t, index, name))
        off += (n + 3) & ~3
    return out


# --------------------------------------------------------------------------- the socket


class Rtnl:
    """One NETLINK_ROUTE socket (in the namespace it was created in) and its requests."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock = sock
        try:
            if sock.getsockname()[0] == 0:
                sock.bind((0, 0))
        except OSError:
            sock.close()
            raise
        self.portid: int = sock.getsockname()[0]
        self._seq = 0
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- transport

    def _request(self, kind: int, flags: int, body: bytes, what: str,
                 ) -> list[tuple[int, bytes, int, int]]:
        """Send one request; return its reply messages as (type, buffer, body offset, end).
        Waits for the ACK (or the end of a dump); raises RtnlError for a refusal."""
        with self._lock:
            self._seq = seq = (self._seq + 1) & 0xFFFFFFFF or 1
            dump = flags & _F_DUMP == _F_DUMP
            self._sock.send(_HDR.pack(_HDR.size + len(body), kind, flags | _F_REQUEST | (
                0 if dump else _F_ACK), seq, 0) + body)
            out: list[tuple[int, bytes, int, int]] = []
            while True:
                data = self._sock.recv(1 << 16 if not dump else 1 << 20)
                off = 0
                while off + _HDR.size <= len(data):
                    n, t, _, s, _ = _HDR.unpack_from(data, off)
                    if n < _HDR.size:
                        raise RtnlError(errno.EBADMSG, what)
                    end = off + n
                    if s != seq:  # a late reply to an earlier, interrupted request
                        off += (n + 3) & ~3
                        continue
                    if t == _NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + _HDR.size)[0]
                        if code:
                            raise RtnlError(code, what)
                        return out  # the ACK
                    if t == _NLMSG_DONE:
                        return out
                    out.append((t, data, off + _HDR.size, end))
                    off += (n + 3) & ~3

    # -------------------------------------------------------------- links

    def get_link(self, name: str | None = None, index: int = 0) -> Link | None:
        """One link by name or index; None if there is none."""
        attrs = _u32(_IFLA_EXT_MASK, _RTEXT_FILTER_SKIP_STATS)
        if name is not None:
            attrs += _str(_IFLA_IFNAME, name)
        try:
            # No ACK on a get: the reply is the link itself, or an error.
            replies = self._request_get(RTM_GETLINK, _ifinfo(index) + attrs,
                                        f"get link {name or index}")
        except RtnlError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        for t, data, off, end in replies:
            if t == RTM_NEWLINK:
                return _parse_link(data, off, end)
        return None

    def _request_get(self, kind: int, body: bytes, what: str
                     ) -> list[tuple[int, bytes, int, int]]:
        with self._lock:
            self._seq = seq = (self._seq + 1) & 0xFFFFFFFF or 1
            self._sock.send(_HDR.pack(_HDR.size + len(body), kind, _F_REQUEST, seq, 0) + body)
            while True:
                data = self._sock.recv(1 << 16)
                off = 0
                while off + _HDR.size <= len(data):
                    n, t, _, s, _ = _HDR.unpack_from(data, off)
                    if n < _HDR.size:
                        raise RtnlError(errno.EBADMSG, what)
                    if s == seq:
                        if t == _NLMSG_ERROR:
                            code = -struct.unpack_from("=i", data, off + _HDR.size)[0]
                            raise RtnlError(code or errno.EBADMSG, what)
                        return [(t, data, off + _HDR.size, off + n)]
                    off += (n + 3) & ~3

    def nsid(self, ns_fd: int) -> int:
        """The id this socket's namespace has for the namespace of `ns_fd`, given one
        first if it has none (what NETLINK_LISTEN_ALL_NSID files reports under)."""
        body = bytes(4) + struct.pack("=HHI", 8, _NETNSA_FD, ns_fd)  # rtgenmsg, padded
        for _ in range(2):
            for _t, data, off, end in self._request_get(_RTM_GETNSID, body, "get nsid"):
                for kind, value in _attrs(data, off + 4, end):
                    if kind == _NETNSA_NSID and len(value) >= 4:
                        nsid = struct.unpack_from("=i", value)[0]
                        if nsid >= 0:
                            return int(nsid)
            try:
                self._request(_RTM_NEWNSID, 0, body + struct.pack("=HHi", 8, _NETNSA_NSID, -1),
                              "assign nsid")
            except RtnlError as exc:
                if exc.code != errno.EEXIST:  # given one meanwhile: read it again
                    raise
        raise RtnlError(errno.ENOENT, "no nsid for the namespace")

    def links(self, *, kind: str | None = None, master: int | None = None) -> list[Link]:
        """Every link of the namespace; with `kind` (e.g. "vxlan") and/or `master` (an
        ifindex), the kernel skips the others before it encodes them (the kernel's dump
        filter; a kernel that does not know the kind sends them all, so the caller
        still checks). Encoding a veth whose peer is in another namespace walks every
        namespace id of the host: listing the vxlan devices or a bridge's ports among
        500 veths no longer costs that."""
        body = _ifinfo() + _u32(_IFLA_EXT_MASK, _RTEXT_FILTER_SKIP_STATS)
        if kind is not None:
            body += _nest(_IFLA_LINKINFO, _str(_IFLA_INFO_KIND, kind))
        if master is not None:
            body += _u32(_IFLA_MASTER, master)
        found = [_parse_link(d, o, e) for t, d, o, e in
                 self._request(RTM_GETLINK, _F_DUMP, body, "list links") if t == RTM_NEWLINK]
        return [lk for lk in found if (kind is None or lk.kind == kind)
                and (master is None or lk.master == master)]

    def add_veth(self, name: str, peer: str, *, peer_netns_fd: int | None = None,
                 mtu: int | None = None, peer_mac: str | None = None, up: bool = False,
                 peer_up: bool = False, alias: str | None = None) -> Link | None:
        """Create veth `name` with its other end `peer` (placed straight into the namespace
        of `peer_netns_fd`, under that name): MAC, MTU and up state set in the same
        request, so nothing sees the pair half-configured.

        Returns `name` as created (its index, and the peer's as `peer_index`), echoed by
        the kernel with the ACK (NLM_F_ECHO: the notification it builds anyway, so no read
        after; a read of a veth whose peer is in another namespace walks every namespace
        id of the host). None from a kernel that does not echo a creation (before 6.3)."""
        peer_attrs = _str(_IFLA_IFNAME, peer)
        if peer_netns_fd is not None:
            peer_attrs += _u32(_IFLA_NET_NS_FD, peer_netns_fd)
        if peer_mac is not None:
            peer_attrs += _attr(_IFLA_ADDRESS, _mac(peer_mac))
        if mtu is not None:
            peer_attrs += _u32(_IFLA_MTU, mtu)
        peer_info = _ifinfo(flags=_IFF_UP if peer_up else 0, change=_IFF_UP) + peer_attrs
        attrs = _str(_IFLA_IFNAME, name)
        if mtu is not None:
            attrs += _u32(_IFLA_MTU, mtu)
        # The peer is an ifinfomsg followed by its attributes, nested as VETH_INFO_PEER.
        attrs += _nest(_IFLA_LINKINFO, _str(_IFLA_INFO_KIND, "veth"),
                       _nest(_IFLA_INFO_DATA, _nest(_VETH_INFO_PEER, peer_info)))
        replies = self._request(RTM_NEWLINK, _F_CREATE | _F_EXCL | _F_ECHO,
                                _ifinfo(flags=_IFF_UP if up else 0, change=_IFF_UP) + attrs,
                                f"create veth {name}/{peer}")
        made = next((lk for lk in (_parse_link(d, o, e) for t, d, o, e in replies
                                   if t == RTM_NEWLINK) if lk.name == name), None)
        if alias is not None:  # not applied by the kernel on create
            link = made or self.get_link(name)
            if link is None:
                raise RtnlError(errno.ENODEV, f"veth {name} vanished after creation")
            self.set_link(link.index, alias=alias)
            if made is not None:
                made = replace(made, alias=alias)
        return made

    def add_bridge(self, name: str) -> None:
        attrs = _str(_IFLA_IFNAME, name) + _nest(_IFLA_LINKINFO, _str(_IFLA_INFO_KIND, "bridge"))
        self._request(RTM_NEWLINK, _F_CREATE | _F_EXCL, _ifinfo() + attrs,
                      f"create bridge {name}")

    def set_link(self, index: int, *, up: bool | None = None, mac: str | None = None,
                 mtu: int | None = None, alias: str | None = None, master: int | None = None,
                 inet_conf: dict[int, int] | None = None,
                 ipv6_addrconf: bool | None = None, name: str | None = None,
                 group: int | None = None) -> None:
        """Change link `index`: only what is given. `ipv6_addrconf=False` (on a link that
        is down, or up without carrier: addrconf waits for the carrier): no IPv6
        link-local address, DAD or router solicitation when it comes up, e.g. for a
        switch port (the kernel ignores this on creation). `name` renames it
        (the kernel renames before it applies `up`), `group` sets its link group."""
        flags = change = 0
        if up is not None:
            change = _IFF_UP
            flags = _IFF_UP if up else 0
        attrs = b""
        if name is not None:
            attrs += _str(_IFLA_IFNAME, name)
        if group is not None:
            attrs += _u32(_IFLA_GROUP, group)
        if mac is not None:
            attrs += _attr(_IFLA_ADDRESS, _mac(mac))
        if mtu is not None:
            attrs += _u32(_IFLA_MTU, mtu)
        if alias is not None:
            attrs += _str(_IFLA_IFALIAS, alias)
        if master is not None:
            attrs += _u32(_IFLA_MASTER, master)
        if inet_conf:
            conf = b"".join(_u32(k, v) for k, v in sorted(inet_conf.items()))
            attrs += _nest(_IFLA_AF_SPEC, _nest(socket.AF_INET, _nest(_IFLA_INET_CONF, conf)))
        if ipv6_addrconf is not None:
            mode = 0 if ipv6_addrconf else _IN6_ADDR_GEN_MODE_NONE  # 0: EUI-64, the default
            attrs += _nest(_IFLA_AF_SPEC, _nest(socket.AF_INET6, _attr(
                _IFLA_INET6_ADDR_GEN_MODE, bytes([mode]))))
        self._request(RTM_NEWLINK, 0, _ifinfo(index, flags, change) + attrs,
                      f"set link {index}")

    def del_link(self, index: int = 0, name: str | None = None, *,
                 group: int | None = None) -> bool:
        """Delete a link; False if it was already gone. With `group` (and neither index
        nor name): every link of that group, in one request — the kernel unregisters
        them as one batch, so they share one RCU grace period (~15-20 ms each when
        deleted one by one); False if the group had no link."""
        attrs = _str(_IFLA_IFNAME, name) if name is not None else b""
        if group is not None:
            attrs += _u32(_IFLA_GROUP, group)
        try:
            self._request(RTM_DELLINK, 0, _ifinfo(index) + attrs,
                          f"delete link {name or index or f'group {group}'}")
        except RtnlError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise
        return True

    # -------------------------------------------------------------- addresses

    def addrs(self, index: int | None = None) -> list[Addr]:
        """Addresses of link `index` (every link's with None)."""
        out = []
        for t, d, o, e in self._request(RTM_GETADDR, _F_DUMP, _IFADDR.pack(0, 0, 0, 0, 0),
                                        "list addresses"):
            if t == RTM_NEWADDR and (a := _parse_addr(d, o, e)) is not None \
                    and (index is None or a.index == index):
                out.append(a)
        return out

    def add_addr(self, index: int, address: str, prefixlen: int, *,
                 flags: int = 0) -> None:
        """Add `address/prefixlen` to link `index` (IPv4: with its broadcast address)."""
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        attrs = _attr(_IFA_LOCAL, ip.packed) + _attr(_IFA_ADDRESS, ip.packed)
        if ip.version == 4 and prefixlen < 31:
            net = ipaddress.ip_network(f"{address}/{prefixlen}", strict=False)
            attrs += _attr(_IFA_BROADCAST, net.broadcast_address.packed)
        if flags:
            attrs += _u32(_IFA_FLAGS, flags)
        self._request(RTM_NEWADDR, _F_CREATE | _F_EXCL,
                      _IFADDR.pack(family, prefixlen, flags & 0xFF, 0, index) + attrs,
                      f"add address {address}/{prefixlen}")

    def del_addr(self, index: int, address: str, prefixlen: int) -> None:
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        self._request(RTM_DELADDR, 0,
                      _IFADDR.pack(family, prefixlen, 0, 0, index)
                      + _attr(_IFA_LOCAL, ip.packed) + _attr(_IFA_ADDRESS, ip.packed),
                      f"delete address {address}/{prefixlen}")

    # -------------------------------------------------------------- routes

    def routes(self) -> list[RouteEntry]:
        """Every route of every table, IPv4 and IPv6."""
        return [_parse_route(d, o, e) for t, d, o, e in
                self._request(RTM_GETROUTE, _F_DUMP, _RTMSG.pack(0, 0, 0, 0, 0, 0, 0, 0, 0),
                              "list routes") if t == RTM_NEWROUTE]

    def _route(self, kind: int, flags: int, dst: str, gateway: str, oif: int) -> None:
        net = ipaddress.ip_network(dst)
        gw = ipaddress.ip_address(gateway)
        family = socket.AF_INET if gw.version == 4 else socket.AF_INET6
        body = _RTMSG.pack(family, net.prefixlen, 0, 0, _RT_TABLE_MAIN, _RTPROT_BOOT,
                           _RT_SCOPE_UNIVERSE, _RTN_UNICAST, 0)
        if net.prefixlen:
            body += _attr(_RTA_DST, net.network_address.packed)
        body += _attr(_RTA_GATEWAY, gw.packed) + _u32(_RTA_OIF, oif)
        self._request(kind, flags, body, f"route {dst} via {gateway}")

    def replace_route(self, dst: str, gateway: str, oif: int) -> None:
        """Route `dst` (CIDR) via `gateway` out of `oif` in the main table (replacing one
        to the same destination)."""
        self._route(RTM_NEWROUTE, _F_CREATE | _F_REPLACE, dst, gateway, oif)

    def del_route(self, dst: str, gateway: str, oif: int) -> None:
        self._route(RTM_DELROUTE, 0, dst, gateway, oif)
