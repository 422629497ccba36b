"""The lean rtnetlink client (reconciler.adapters.rtnl) against the real kernel, checked
with pyroute2 (the reference codec) and iproute2: what one writes the others read."""

from __future__ import annotations

import errno
import json
import secrets
import socket
import struct
import subprocess

import pytest
from helpers import NetnsFactory, nsexec
from pyroute2 import IPRoute

from reconciler.adapters.netlink import ContainerNetns
from reconciler.adapters.rtnl import (
    INET_CONF_ARP_NOTIFY,
    INET_CONF_PROMOTE_SECONDARIES,
    Rtnl,
    RtnlError,
)

pytestmark = pytest.mark.integration


def _name() -> str:
    return f"rvt{secrets.token_hex(5)}"[:15]


def test_veth_into_namespace_matches_pyroute2_and_iproute2(
        netns_factory: NetnsFactory, cleanup_links: list[str]) -> None:
    ns: ContainerNetns = netns_factory()
    host, mac = _name(), "02:00:00:00:77:01"
    cleanup_links.append(host)
    with Rtnl() as r:
        r.add_veth(host, "eth7", peer_netns_fd=ns.fd, mtu=1380, peer_mac=mac, up=True)
        link = r.get_link(host)
        assert link is not None and link.kind == "veth" and link.mtu == 1380 and link.up
        r.set_link(link.index, alias="reconciler:test/x/eth7")
        with IPRoute() as ipr:
            ref = ipr.link("get", index=link.index)[0]
            assert ref.get_attr("IFLA_IFNAME") == host
            assert ref.get_attr("IFLA_IFALIAS") == "reconciler:test/x/eth7"
            assert ref.get_attr("IFLA_MTU") == 1380
            assert ref.get_attr("IFLA_ADDRESS") == link.mac
        assert host in {lk.name for lk in r.links()}
        assert r.get_link("no-such-link0") is None
        with pytest.raises(RtnlError) as exc:
            r.add_veth(host, "eth7", peer_netns_fd=ns.fd)  # exists
        assert exc.value.code == errno.EEXIST

    peer_rtnl = ns.iproute()
    peer = peer_rtnl.get_link("eth7")
    assert peer is not None and peer.mac == mac and peer.peer_index == link.index
    assert link.peer_index == peer.index and not peer.up
    peer_rtnl.set_link(peer.index, up=True, inet_conf={INET_CONF_ARP_NOTIFY: 1,
                                                       INET_CONF_PROMOTE_SECONDARIES: 1})
    peer_rtnl.add_addr(peer.index, "10.77.251.9", 24)
    peer_rtnl.add_addr(peer.index, "fd77:fb::9", 64, flags=0x02)
    peer_rtnl.replace_route("0.0.0.0/0", "10.77.251.1", peer.index)
    peer_rtnl.replace_route("10.77.98.0/24", "10.77.251.2", peer.index)

    for knob in ("arp_notify", "promote_secondaries"):
        assert nsexec(ns.pid, "sysctl", "-n", f"net.ipv4.conf.eth7.{knob}").stdout.strip() == "1"
    again = peer_rtnl.get_link("eth7")
    assert again is not None and again.up
    assert again.inet(INET_CONF_ARP_NOTIFY) == 1
    shown = json.loads(nsexec(ns.pid, "ip", "-j", "addr", "show", "dev", "eth7").stdout)[0]
    got = {(a["local"], a["prefixlen"]) for a in shown["addr_info"]}
    assert {("10.77.251.9", 24), ("fd77:fb::9", 64)} <= got
    assert "brd 10.77.251.255" in nsexec(ns.pid, "ip", "addr", "show", "dev", "eth7").stdout
    ours = {(a.address, a.prefixlen) for a in peer_rtnl.addrs(peer.index)}
    assert ours == got
    routes = nsexec(ns.pid, "ip", "route").stdout
    assert "default via 10.77.251.1 dev eth7" in routes
    assert "10.77.98.0/24 via 10.77.251.2 dev eth7" in routes
    gw = {(r.dst, r.dst_len, r.gateway) for r in peer_rtnl.routes()
          if r.oif == peer.index and r.gateway and r.family == socket.AF_INET}
    assert gw == {(None, 0, "10.77.251.1"), ("10.77.98.0", 24, "10.77.251.2")}

    peer_rtnl.del_route("10.77.98.0/24", "10.77.251.2", peer.index)
    peer_rtnl.del_addr(peer.index, "10.77.251.9", 24)
    assert "10.77.98.0" not in nsexec(ns.pid, "ip", "route").stdout
    assert ("10.77.251.9", 24) not in {(a.address, a.prefixlen)
                                       for a in peer_rtnl.addrs(peer.index)}
    with Rtnl() as r:
        assert r.del_link(name=host) is True
        assert r.del_link(name=host) is False
    assert peer_rtnl.get_link("eth7") is None  # the peer went with it


def test_bridge_and_master(cleanup_links: list[str]) -> None:
    br, port = _name(), _name()
    cleanup_links += [port, br]
    with Rtnl() as r:
        r.add_bridge(br)
        subprocess.run(["ip", "link", "add", port, "type", "veth", "peer", "name", port + "p"],
                       check=True)
        b, p = r.get_link(br), r.get_link(port)
        assert b is not None and b.kind == "bridge" and p is not None and p.master is None
        r.set_link(p.index, master=b.index, mtu=1300)
        p = r.get_link(port)
        assert p is not None and p.master == b.index and p.mtu == 1300
        assert f"master {br}" in subprocess.run(["ip", "link", "show", port],
                                                capture_output=True, text=True).stdout


def test_links_filtered_by_kind_and_master(cleanup_links: list[str]) -> None:
    """The dump filters: what they return is exactly what an unfiltered listing says."""
    br, port, other = _name(), _name(), _name()
    cleanup_links += [port, other, br]
    with Rtnl() as r:
        r.add_bridge(br)
        for name in (port, other):
            subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name",
                            name + "p"], check=True)
        b, p = r.get_link(br), r.get_link(port)
        assert b is not None and p is not None
        r.set_link(p.index, master=b.index)
        every = r.links()
        assert {lk.name for lk in r.links(kind="bridge")} == \
            {lk.name for lk in every if lk.kind == "bridge"} >= {br}
        veths = {lk.name for lk in r.links(kind="veth")}
        assert veths == {lk.name for lk in every if lk.kind == "veth"}
        assert {port, other, port + "p"} <= veths and br not in veths
        assert [lk.name for lk in r.links(master=b.index)] == [port]
        assert [lk.name for lk in r.links(kind="veth", master=b.index)] == [port]
        assert r.links(kind="bridge", master=b.index) == []
    # And the kernel did the filtering (its replies say so): a bridge-only dump holds
    # the bridges and nothing else.
    names, flags = _raw_dump_by_kind("bridge")
    assert br in names and port not in names and other not in names
    assert flags and all(f & _NLM_F_DUMP_FILTERED for f in flags), flags


_NLM_F_DUMP_FILTERED = 0x20


def _raw_dump_by_kind(kind: str) -> tuple[list[str], list[int]]:
    """RTM_GETLINK dump with IFLA_LINKINFO/IFLA_INFO_KIND = `kind`, written by hand:
    (names of the links in the replies, nlmsg_flags of each reply)."""
    def attr(t: int, payload: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(payload), t) + payload
        return raw + b"\0" * (-len(raw) % 4)

    body = struct.pack("=BxHiII", 0, 0, 0, 0, 0) + attr(18, attr(1, kind.encode() + b"\0"))
    msg = struct.pack("=IHHII", 16 + len(body), 18, 0x1 | 0x300, 1, 0) + body
    names: list[str] = []
    flags: list[int] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(msg)
        while True:
            data = sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                n, t, f, _, _ = struct.unpack_from("=IHHII", data, off)
                if t == 3:  # NLMSG_DONE
                    return names, flags
                if t == 16:  # RTM_NEWLINK
                    flags.append(f)
                    a = off + 16 + 16
                    while a + 4 <= off + n:
                        alen, atype = struct.unpack_from("=HH", data, a)
                        if atype == 3:  # IFLA_IFNAME
                            names.append(data[a + 4:a + alen].rstrip(b"\0").decode())
                        a += (alen + 3) & ~3
                off += (n + 3) & ~3


def test_nsid_gives_a_namespace_an_id_once_and_reads_it_back(
        netns_factory: NetnsFactory) -> None:
    """`nsid`: the id the host has for a namespace, given one if it had none (a fresh
    namespace with no veth to the host has none); the same id on every later call, as
    pyroute2's RTM_GETNSID reads it."""
    ns: ContainerNetns = netns_factory()
    with Rtnl() as rt, IPRoute() as ipr:
        assert _signed(ipr.get_netnsid(fd=ns.fd)["nsid"]) == -1  # none yet
        nsid = rt.nsid(ns.fd)
        assert nsid >= 0
        assert rt.nsid(ns.fd) == nsid
        assert _signed(ipr.get_netnsid(fd=ns.fd)["nsid"]) == nsid
        other: ContainerNetns = netns_factory()
        assert rt.nsid(other.fd) not in (nsid, -1)


def _signed(nsid: int) -> int:
    """pyroute2 decodes NETNSA_NSID (an s32) as unsigned."""
    return nsid - (1 << 32) if nsid >= 1 << 31 else nsid
