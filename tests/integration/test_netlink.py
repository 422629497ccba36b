"""Integration tests of reconciler.adapters.netlink against the real kernel.

Targets are plain processes in new network namespaces (``unshare --net sleep``), so these
tests do not depend on docker. Subnets are in 10.77.0.0/16 with a per-run third octet;
everything created is removed in fixtures.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
from helpers import NetnsFactory, ip_if, nsexec, pings, wait_for

from reconciler.adapters.netlink import (
    _NETNS_GROUPS,
    _WATCH_FILTER,
    RETIRED_GROUP,
    RETIRED_VETH_PREFIX,
    Change,
    ContainerNetns,
    InterfaceSpec,
    LinkEvent,
    LinkExpect,
    LinkWatcher,
    NetlinkAdapter,
    NetnsWatcher,
    Route,
    _attach_filter,
    _inside,
    host_veth_name,
    process_start_time,
    watch_links,
)
from reconciler.adapters.rtnl import Rtnl
from reconciler.errors import NetlinkError

pytestmark = pytest.mark.integration


def host_ns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


@pytest.fixture(scope="module")
def octet() -> int:
    """A per-run third octet for 10.77.<octet>.0/24 (low clash risk with other runs)."""
    return 130 + secrets.randbelow(100)


def full_spec(cid: str, octet: int) -> InterfaceSpec:
    return InterfaceSpec(
        container_id=cid,
        ifname="eth1",
        addresses=(ip_if(f"10.77.{octet}.10/24"), ip_if(f"fd77:{octet:x}::10/64")),
        mac="02:00:00:00:4d:0a",
        mtu=1400,
        gateway=ipaddress.ip_address(f"10.77.{octet}.1"),
        routes=(
            Route(ipaddress.ip_network("10.77.99.0/24"), ipaddress.ip_address(f"10.77.{octet}.2")),
        ),
    )


def attach_full(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> tuple[ContainerNetns, InterfaceSpec]:
    """A fresh netns with `full_spec` attached (host veth deleted at teardown)."""
    ns = netns_factory()
    spec = full_spec(f"test-{secrets.token_hex(4)}", octet)
    cleanup_links.append(spec.host_veth)
    nl.ensure_interface(ns, spec)
    return ns, spec


def assert_matches(nl: NetlinkAdapter, ns: ContainerNetns, spec: InterfaceSpec) -> None:
    obs = nl.observe(ns, spec.container_id, spec.ifname)
    assert obs.exists and obs.host_present and obs.paired
    assert obs.mac == spec.mac
    assert obs.mtu == spec.mtu and obs.host_mtu == spec.mtu
    assert obs.up and obs.host_up
    assert obs.addresses == frozenset(spec.addresses)
    assert obs.routes == spec.wanted_routes()
    assert obs.arp_notify is True


@pytest.mark.parametrize("fresh", [False, True])
def test_attach_observe_idempotent_detach(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str],
    fresh: bool,
) -> None:
    """Also with `fresh` (the caller saw neither end: made without reading first, the
    host end's index from the kernel's echo of the creation, the IPv4 settings with the
    first up): the same result, down to the kernel's view."""
    ns = netns_factory()
    cid = f"test-{secrets.token_hex(4)}"
    spec = dataclasses.replace(full_spec(cid, octet), tx_checksum=False)
    cleanup_links.append(spec.host_veth)

    changes = nl.ensure_interface(ns, spec, fresh=fresh)
    assert Change.CREATED in changes and Change.GARP in changes and Change.ROUTES in changes
    assert changes.host_index == nl.link_index(spec.host_veth)
    assert_matches(nl, ns, spec)
    obs = nl.observe(ns, cid, "eth1", tx_checksum=True)
    assert obs.promote_secondaries is True and obs.tx_checksum is False
    # the kernel agrees (checked with iproute2 from inside the namespace)
    out = nsexec(ns.pid, "ip", "-o", "addr", "show", "dev", "eth1").stdout
    assert f"10.77.{octet}.10/24" in out and f"fd77:{octet:x}::10/64" in out
    routes = nsexec(ns.pid, "ip", "route").stdout
    assert f"default via 10.77.{octet}.1 dev eth1" in routes
    assert f"10.77.99.0/24 via 10.77.{octet}.2 dev eth1" in routes
    assert spec.host_veth in nl.list_owned_host_veths()
    # The host end is a switch port, up, with no IPv6 address (no addrconf work for it).
    host = subprocess.run(["ip", "-o", "addr", "show", "dev", spec.host_veth],
                          capture_output=True, text=True, check=True).stdout
    assert "inet" not in host, host
    assert "addrgenmode none" in subprocess.run(
        ["ip", "-d", "link", "show", spec.host_veth], capture_output=True, text=True).stdout

    assert nl.ensure_interface(ns, spec) == ()
    # Told fresh while the pair exists (it appeared since the caller looked): the
    # creation fails and the full path finds nothing to change.
    again = nl.ensure_interface(ns, spec, fresh=True)
    assert again.host_index == changes.host_index
    assert again == ()

    assert nl.detach(cid, "eth1") is True
    assert nl.detach(cid, "eth1") is False  # already gone is fine
    obs = nl.observe(ns, cid, "eth1")
    assert not obs.exists and not obs.host_present
    assert spec.host_veth not in nl.list_owned_host_veths()


def test_retired_veths_free_their_name_at_once_and_go_in_one_group_delete(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> None:
    specs = []
    for _ in range(3):
        ns, spec = attach_full(nl, netns_factory, octet, cleanup_links)
        specs.append((ns, spec))
    for _, spec in specs:
        cleanup_links.append(RETIRED_VETH_PREFIX + spec.host_veth[2:])

    for _, spec in specs:
        assert nl.retire_host_veth(spec.host_veth) is True
    assert nl.retire_host_veth(specs[0][1].host_veth) is False  # already retired
    ns0, spec0 = specs[0]
    retired = RETIRED_VETH_PREFIX + spec0.host_veth[2:]
    shown = subprocess.run(["ip", "-d", "link", "show", retired], capture_output=True,
                           text=True, check=True).stdout
    assert f"group {RETIRED_GROUP}" in shown and ",UP" not in shown, shown
    assert spec0.host_veth not in nl.list_owned_host_veths()
    # its peer is still in the container, cut off (no carrier), until reaped
    assert nl.observe(ns0, spec0.container_id, "eth1").exists
    # the name is free: the same interface can be attached again before the reap
    assert Change.CREATED in nl.ensure_interface(ns0, spec0)
    assert_matches(nl, ns0, spec0)
    # ... and retired again while the first retired one still waits (reaped first)
    assert nl.retire_host_veth(spec0.host_veth) is True

    assert nl.reap_retired() is True
    assert nl.reap_retired() is False  # the group is empty
    for ns, spec in specs:
        obs = nl.observe(ns, spec.container_id, "eth1")
        assert not obs.exists and not obs.host_present
    left = subprocess.run(["ip", "-o", "link", "show", "group", str(RETIRED_GROUP)],
                          capture_output=True, text=True, check=True).stdout
    assert left.strip() == ""
    with pytest.raises(NetlinkError, match="not a reconciler veth name"):
        nl.retire_host_veth("eth0")


def test_drift_is_repaired(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> None:
    ns, spec = attach_full(nl, netns_factory, octet, cleanup_links)

    # address drift: a foreign address added, ours removed
    nsexec(ns.pid, "ip", "addr", "del", f"10.77.{octet}.10/24", "dev", "eth1")
    nsexec(ns.pid, "ip", "addr", "add", f"10.77.{octet}.55/24", "dev", "eth1")
    changes = nl.ensure_interface(ns, spec)
    assert Change.ADDRESSES in changes and Change.GARP in changes
    assert Change.ROUTES in changes  # the default route went with the address
    assert_matches(nl, ns, spec)

    # MTU drift inside, MAC drift, link down
    nsexec(ns.pid, "ip", "link", "set", "eth1", "mtu", "1300")
    nsexec(ns.pid, "ip", "link", "set", "eth1", "down")
    nsexec(ns.pid, "ip", "link", "set", "eth1", "address", "02:00:00:00:ff:ff")
    changes = nl.ensure_interface(ns, spec)
    assert {Change.MTU, Change.MAC, Change.UP} <= set(changes)
    assert_matches(nl, ns, spec)

    # host MTU drift and a deleted extra route
    subprocess.run(["ip", "link", "set", spec.host_veth, "mtu", "1500"], check=True)
    nsexec(ns.pid, "ip", "route", "del", "10.77.99.0/24")
    changes = nl.ensure_interface(ns, spec)
    assert set(changes) == {Change.HOST_MTU, Change.ROUTES}
    assert_matches(nl, ns, spec)

    # the host veth deleted (takes the peer with it) -> recreated in full
    subprocess.run(["ip", "link", "del", spec.host_veth], check=True)
    assert not nl.observe(ns, spec.container_id, "eth1").exists
    changes = nl.ensure_interface(ns, spec)
    assert Change.CREATED in changes
    assert_matches(nl, ns, spec)


def test_our_address_survives_when_a_foreign_primary_is_removed(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> None:
    """Someone adds an address of the same subnet just before ours is put back: theirs is
    the primary, ours a secondary. Removing theirs must not take ours with it (the
    kernel's deletion would come back under our own port id, unseen by the watcher)."""
    ns, spec = attach_full(nl, netns_factory, octet, cleanup_links)
    ours, theirs = f"10.77.{octet}.10/24", f"10.77.{octet}.55/24"
    assert nsexec(ns.pid, "sysctl", "-n", "net.ipv4.conf.eth1.promote_secondaries"
                  ).stdout.strip() == "1"
    # With promotion switched off again, the read-back must still catch the loss.
    for promote in ("1", "0"):
        nsexec(ns.pid, "sysctl", "-w", f"net.ipv4.conf.eth1.promote_secondaries={promote}")
        nsexec(ns.pid, "ip", "-4", "addr", "flush", "dev", "eth1")
        nsexec(ns.pid, "ip", "addr", "add", theirs, "dev", "eth1")
        nsexec(ns.pid, "ip", "addr", "add", ours, "dev", "eth1")  # a secondary now
        assert "secondary" in nsexec(ns.pid, "ip", "addr", "show", "dev", "eth1").stdout
        assert Change.ADDRESSES in nl.ensure_interface(ns, spec)
        assert nl.observe(ns, spec.container_id, "eth1").addresses == set(spec.addresses)
        assert ip_if(ours) in spec.addresses


def test_spec_change_flushes_old_addresses_and_routes(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> None:
    ns, spec = attach_full(nl, netns_factory, octet, cleanup_links)
    smaller = InterfaceSpec(spec.container_id, "eth1", (ip_if(f"10.77.{octet}.11/24"),))
    # both routes go via 10.77.<octet>.x: the kernel drops them with the old address, and
    # the new spec wants none, so only the addresses change
    assert set(nl.ensure_interface(ns, smaller)) == {Change.ADDRESSES, Change.GARP}
    obs = nl.observe(ns, spec.container_id, "eth1")
    assert obs.addresses == {ip_if(f"10.77.{octet}.11/24")}
    assert obs.routes == frozenset()
    assert "default" not in nsexec(ns.pid, "ip", "route").stdout


def test_gratuitous_arp_is_sent(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> None:
    ns = netns_factory()
    spec = InterfaceSpec(
        f"test-{secrets.token_hex(4)}", "eth1", (ip_if(f"10.77.{octet}.20/24"),), mtu=1400
    )
    cleanup_links.append(spec.host_veth)
    nl.ensure_interface(ns, spec)
    # capture ARP on the host end, then re-address inside and let ensure repair it
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    cap.bind((spec.host_veth, 0x0806))
    cap.settimeout(0.2)
    try:
        nsexec(ns.pid, "ip", "addr", "flush", "dev", "eth1")
        assert Change.GARP in nl.ensure_interface(ns, spec)
        want = ipaddress.ip_address(f"10.77.{octet}.20").packed

        def garp_seen() -> bool:
            try:
                frame = cap.recv(2048)
            except TimeoutError:
                return False
            arp = frame[14:42]
            spa, tpa = arp[14:18], arp[24:28]
            return struct.unpack("!H", arp[6:8])[0] == 1 and spa == want and tpa == want

        wait_for(garp_seen, timeout=3, interval=0, message="gratuitous ARP on the host veth")
    finally:
        cap.close()


def test_announce_without_a_mac_sends_the_interfaces_own(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> None:
    """The announcement after a port's commit knows the addresses but not the MAC (the
    kernel chose it): the frames carry the interface's own, asked of the kernel."""
    ns = netns_factory()
    spec = InterfaceSpec(f"test-{secrets.token_hex(4)}", "eth1",
                         (ip_if(f"10.77.{octet}.21/24"),))
    cleanup_links.append(spec.host_veth)
    nl.ensure_interface(ns, spec)
    mac = nl.observe(ns, spec.container_id, spec.ifname).mac
    assert mac
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    cap.bind((spec.host_veth, 0x0806))
    cap.settimeout(3)
    try:
        assert nl.announce(ns, "eth1", addresses=spec.addresses) == 1
        frame = cap.recv(2048)
    finally:
        cap.close()
    raw = bytes.fromhex(mac.replace(":", ""))
    assert frame[6:12] == raw and frame[14 + 8:14 + 14] == raw  # Ethernet and ARP sender
    assert frame[14 + 14:14 + 18] == ipaddress.ip_address(f"10.77.{octet}.21").packed


def test_inside_goes_back_where_it_was_entered_from(netns_factory: NetnsFactory) -> None:
    """Entering a namespace keeps the thread's own one open for the way back; an entry
    made from inside another returns there, and every thread has its own way home,
    closed when the thread ends."""
    outer, inner = netns_factory(), netns_factory()

    def here() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    def visit() -> list[int]:
        seen = [here()]
        with _inside(outer.fd):
            seen.append(here())
            with _inside(inner.fd):
                seen.append(here())
            seen.append(here())
        seen.append(here())
        with _inside(inner.fd):
            seen.append(here())
        seen.append(here())
        return seen

    home = host_ns_inode()
    want = [home, outer.inode, inner.inode, outer.inode, home, inner.inode, home]
    assert visit() == want
    assert visit() == want  # the kept way home serves again
    other: list[list[int]] = []
    fds = len(os.listdir("/proc/self/fd"))
    thread = threading.Thread(target=lambda: other.append(visit()))
    thread.start()
    thread.join(timeout=10)
    assert other == [want]
    assert len(os.listdir("/proc/self/fd")) == fds  # its way home closed with it


def test_create_interface_does_nothing_when_an_end_exists(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str],
) -> None:
    """The daemon's first attach makes the pair without reading (`create_interface`).
    When an end is there after all — the pair made by an earlier run, or someone's eth1
    — it answers None and leaves everything as it was (the caller then observes)."""
    ns, spec = attach_full(nl, netns_factory, octet, cleanup_links)
    before = nl.observe(ns, spec.container_id, spec.ifname)
    assert nl.create_interface(ns, spec) is None
    assert nl.observe(ns, spec.container_id, spec.ifname) == before
    assert_matches(nl, ns, spec)

    other = netns_factory()
    nsexec(other.pid, "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
    stranger = InterfaceSpec(f"test-{secrets.token_hex(4)}", "eth1")
    cleanup_links.append(stranger.host_veth)
    assert nl.create_interface(other, stranger) is None
    assert not nl.link_exists(stranger.host_veth)  # no half-made pair on the host
    assert "eth1@eth1p" in nsexec(other.pid, "ip", "link", "show", "eth1").stdout

    fresh = netns_factory()
    new = full_spec(f"test-{secrets.token_hex(4)}", octet)
    cleanup_links.append(new.host_veth)
    made = nl.create_interface(fresh, new)
    assert made is not None and Change.CREATED in made
    assert made.host_index == nl.link_index(new.host_veth)
    assert_matches(nl, fresh, new)


def test_foreign_interface_of_same_name_is_an_error(
    nl: NetlinkAdapter, netns_factory: NetnsFactory
) -> None:
    ns = netns_factory()
    nsexec(ns.pid, "ip", "link", "add", "eth3", "type", "veth", "peer", "name", "eth3p")
    with pytest.raises(NetlinkError, match="not reconciler's"):
        nl.ensure_interface(ns, InterfaceSpec(f"test-{secrets.token_hex(4)}", "eth3"))
    assert nsexec(ns.pid, "ip", "link", "show", "eth3").returncode == 0  # left alone


def test_pid_reuse_guard(netns_factory: NetnsFactory) -> None:
    ns = netns_factory()
    start = process_start_time(ns.pid)
    with pytest.raises(NetlinkError, match="reused"):
        ContainerNetns.open(ns.pid, expected_start_time=start + 1)
    with pytest.raises(NetlinkError, match="does not belong"):
        ContainerNetns.open(ns.pid, container_id="f" * 64)
    with ContainerNetns.open(ns.pid, expected_start_time=start) as again:
        assert again.inode == ns.inode != host_ns_inode()
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(NetlinkError):
        ContainerNetns.open(proc.pid, expected_start_time=0)


def test_linux_bridge_with_host_gateway(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> None:
    bridge = f"rtlb{secrets.token_hex(4)}"
    cleanup_links.append(bridge)
    network = f"net-{bridge}"
    assert Change.CREATED in nl.ensure_linux_bridge(bridge, network, mtu=1400, node="n1")
    assert nl.ensure_linux_bridge(bridge, network, mtu=1400, node="n1") == ()
    assert nl.bridge_owner(bridge) == network
    assert nl.list_owned_bridges()[bridge] == network
    assert nl.list_owned_bridges(node="n1")[bridge] == network
    assert bridge not in nl.list_owned_bridges(node="n2")
    assert nl.bridge_has_ports(bridge) is False
    gw = ip_if(f"10.77.{octet}.1/24")
    assert Change.ADDRESSES in nl.ensure_host_address(bridge, gw)
    assert nl.ensure_host_address(bridge, gw) == ()

    ns = netns_factory()
    spec = InterfaceSpec(
        f"test-{secrets.token_hex(4)}",
        "eth1",
        (ip_if(f"10.77.{octet}.30/24"),),
        mtu=1400,
        gateway=gw.ip,
    )
    cleanup_links.append(spec.host_veth)
    nl.ensure_interface(ns, spec)
    assert nl.enslave(spec.host_veth, bridge) is True
    assert nl.enslave(spec.host_veth, bridge) is False
    assert nl.bridge_has_ports(bridge) is True
    assert nl.observe(ns, spec.container_id, "eth1").host_master == bridge

    assert wait_for(lambda: pings(None, f"10.77.{octet}.30"), timeout=10)
    assert pings(ns.pid, gw.ip.compressed)  # and back via the gateway address

    assert nl.delete_linux_bridge(bridge) is True
    assert nl.delete_linux_bridge(bridge) is False
    assert not nl.link_exists(bridge)


def test_foreign_bridge_is_never_deleted(nl: NetlinkAdapter, cleanup_links: list[str]) -> None:
    bridge = f"rtfb{secrets.token_hex(4)}"
    cleanup_links.append(bridge)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    assert Change.UP in nl.ensure_linux_bridge(bridge, "somenet")  # usable, not claimed
    assert nl.bridge_owner(bridge) is None
    assert nl.delete_linux_bridge(bridge) is False
    assert nl.link_exists(bridge)
    with pytest.raises(NetlinkError, match="not a reconciler veth"):
        nl.delete_host_veth(bridge)


def test_link_watcher_reports_deleted_host_veth(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, cleanup_links: list[str]
) -> None:
    ns = netns_factory()
    spec = InterfaceSpec(f"test-{secrets.token_hex(4)}", "eth1")
    cleanup_links.append(spec.host_veth)
    with LinkWatcher() as watcher:
        nl.ensure_interface(ns, spec)
        seen: list[LinkEvent] = []

        def saw(kind: str) -> bool:
            seen.extend(watcher.read(timeout=0.2))
            return any(e.kind == kind and e.ifname == spec.host_veth for e in seen)

        wait_for(lambda: saw("new"), timeout=2, interval=0, message="RTM_NEWLINK")
        subprocess.run(["ip", "link", "del", spec.host_veth], check=True)
        wait_for(lambda: saw("del"), timeout=2, interval=0, message="RTM_DELLINK")


def test_link_watcher_deletions_only_gets_no_other_message(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, cleanup_links: list[str]
) -> None:
    """With the socket filter the kernel queues only RTM_DELLINK: a veth made, changed and
    deleted gives one event, its deletion (and the link group's marker link too)."""
    spec = InterfaceSpec(f"test-{secrets.token_hex(4)}", "eth1")
    cleanup_links.append(spec.host_veth)
    with LinkWatcher(deletions_only=True) as watcher:
        nl.ensure_interface(netns_factory(), spec)
        subprocess.run(["ip", "link", "set", spec.host_veth, "mtu", "1300"], check=True)
        subprocess.run(["ip", "link", "del", spec.host_veth], check=True)
        seen: list[LinkEvent] = []

        def saw_del() -> bool:
            seen.extend(watcher.read(timeout=0.2))
            return any(e.kind == "del" and e.ifname == spec.host_veth for e in seen)

        wait_for(saw_del, timeout=2, interval=0, message="RTM_DELLINK")
        assert [e for e in seen if e.kind != "del"] == []


def test_link_watcher_skips_deletions_of_this_process(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, cleanup_links: list[str]
) -> None:
    """The kernel reports every deletion with port id 0: the daemon's own (detaches)
    are told apart by name, so only someone else's deletion is drift."""
    ours, theirs = (InterfaceSpec(f"test-{secrets.token_hex(4)}", "eth1") for _ in range(2))
    cleanup_links += [ours.host_veth, theirs.host_veth]
    with LinkWatcher() as watcher:
        nl.ensure_interface(netns_factory(), ours)
        nl.ensure_interface(netns_factory(), theirs)
        seen: list[LinkEvent] = []

        def saw_del(name: str) -> bool:
            seen.extend(watcher.read(timeout=0.2))
            return any(e.kind == "del" and e.ifname == name for e in seen)

        assert nl.delete_host_veth(ours.host_veth) is True
        subprocess.run(["ip", "link", "del", theirs.host_veth], check=True)
        wait_for(lambda: saw_del(theirs.host_veth), timeout=2, interval=0,
                 message="RTM_DELLINK of someone else's deletion")
    assert not [e for e in seen if e.kind == "del" and e.ifname == ours.host_veth]


def test_watch_links_callback_loop(nl: NetlinkAdapter, cleanup_links: list[str]) -> None:
    name = f"rtdm{secrets.token_hex(4)}"
    cleanup_links.append(name)
    events: list[LinkEvent] = []
    stop = threading.Event()
    thread = threading.Thread(target=watch_links, args=(events.append, stop))
    thread.start()
    try:
        # the watcher binds asynchronously: keep poking until it sees our link
        def seen() -> bool:
            subprocess.run(
                ["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"],
                capture_output=True,
            )
            subprocess.run(["ip", "link", "del", name], capture_output=True)
            return any(e.kind == "del" and e.ifname == name for e in list(events))

        wait_for(seen, timeout=5, interval=0.1, message="watch_links callback")
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_attach_cost(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> None:
    """~ms per attach: reported, and bounded generously so a regression to processes shows."""
    import time

    handles = [netns_factory() for _ in range(20)]
    specs = []
    for i, _ns in enumerate(handles):
        spec = InterfaceSpec(
            f"test-{secrets.token_hex(4)}",
            "eth1",
            (ip_if(f"10.77.{octet}.{100 + i}/24"),),
            mtu=1400,
            gateway=ipaddress.ip_address(f"10.77.{octet}.1"),
        )
        specs.append(spec)
        cleanup_links.append(spec.host_veth)
    t0 = time.perf_counter()
    for ns, spec in zip(handles, specs, strict=True):
        nl.ensure_interface(ns, spec)
    per_attach = (time.perf_counter() - t0) / len(specs) * 1000
    t0 = time.perf_counter()
    for ns, spec in zip(handles, specs, strict=True):
        assert nl.ensure_interface(ns, spec) == ()
    per_check = (time.perf_counter() - t0) / len(specs) * 1000
    print(f"netlink attach: {per_attach:.1f} ms each; idempotent re-check {per_check:.1f} ms")
    assert per_attach < 100
    assert host_veth_name(specs[0].container_id, "eth1") in nl.list_owned_host_veths()


def test_netns_watcher_reports_foreign_changes_only(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str]
) -> None:
    ns, spec = attach_full(nl, netns_factory, octet, cleanup_links)
    other = netns_factory()
    seen: list[str] = []
    got = threading.Event()

    def on_change(key: str) -> None:
        seen.append(key)
        got.set()

    watcher = NetnsWatcher()
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(on_change, stop), daemon=True)
    thread.start()
    try:
        watcher.add("c1", ns)
        watcher.add("c1", ns)  # the same namespace again: no second socket
        watcher.add("c2", other)
        assert watcher.keys() == {"c1", "c2"}
        # Someone else changes c1's address: reported, under c1 only.
        nsexec(ns.pid, "ip", "addr", "add", f"10.77.{octet}.77/24", "dev", "eth1")
        wait_for(got.is_set, timeout=5, interval=0.01, message="foreign change reported")
        assert set(seen) == {"c1"}
        # Our own repair (this process's sockets) is not reported back as work.
        seen.clear()
        got.clear()
        assert Change.ADDRESSES in nl.ensure_interface(ns, spec)
        nsexec(other.pid, "ip", "addr", "add", "127.0.0.2/8", "dev", "lo")  # a marker
        wait_for(got.is_set, timeout=5, interval=0.01, message="marker reported")
        assert seen == ["c2"]
        # MTU and up/down changes are reported by the kernel itself (port id 0): they
        # count once the watcher knows what the link should look like.
        watcher.expect("c1", {"eth1": LinkExpect(mtu=1400, mac=spec.mac)})
        for change in (["mtu", "1300"], ["down"]):
            seen.clear()
            got.clear()
            nsexec(ns.pid, "ip", "link", "set", "eth1", *change)
            wait_for(got.is_set, timeout=5, interval=0.01, message=f"{change} reported")
            assert set(seen) == {"c1"}
            nl.ensure_interface(ns, spec)
        # Removed: changes there are no longer reported.
        watcher.remove("c2")
        got.clear()
        seen.clear()
        nsexec(other.pid, "ip", "addr", "del", "127.0.0.2/8", "dev", "lo")
        nsexec(ns.pid, "ip", "link", "set", "eth1", "address", "02:00:00:00:ee:01")
        wait_for(got.is_set, timeout=5, interval=0.01, message="c1 still watched")
        assert set(seen) == {"c1"}
        assert watcher.keys() == {"c1"}
    finally:
        stop.set()
        thread.join(timeout=5)
        watcher.close()


@pytest.mark.parametrize("forget", [True, False])
def test_netns_watcher_detach_by_the_daemon_is_no_drift(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str],
    forget: bool,
) -> None:
    """An expected link the daemon removes itself (`forget_links` first) is not reported
    when the kernel says it is gone; without `forget_links` it is (drift)."""
    ns, spec = attach_full(nl, netns_factory, octet, cleanup_links)
    other = netns_factory()
    watcher = NetnsWatcher()
    watcher.add("c1", ns)  # after the attach: none of its reports are in flight
    watcher.add("c2", other)
    watcher.expect("c1", {"eth1": LinkExpect(mtu=1400, mac=spec.mac)})
    seen: list[str] = []  # keys reported, in order
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(seen.append, stop), daemon=True)
    thread.start()
    try:
        if forget:
            watcher.forget_links("c1", ["eth1"])
        assert nl.detach(spec.container_id, "eth1") is True
        nsexec(other.pid, "ip", "addr", "add", "127.0.0.3/8", "dev", "lo")  # a marker
        wait_for(lambda: "c2" in seen, timeout=5, interval=0.01, message="marker reported")
        if forget:
            assert seen == ["c2"]
        else:
            wait_for(lambda: "c1" in seen, timeout=5, interval=0.01,
                     message="removal of an expected link reported")
    finally:
        stop.set()
        thread.join(timeout=5)
        watcher.close()


def test_netns_watcher_attach_reports_queued_before_expect_are_no_drift(
    nl: NetlinkAdapter, netns_factory: NetnsFactory, octet: int, cleanup_links: list[str],
) -> None:
    """The daemon watches a container's namespace before attaching it, and its watcher may
    read the attach's reports only after the reconcile set what it expects: the kernel's
    report of the new veth end (down, at creation) is then no drift. Someone else's
    change queued in the same window still is."""
    ns = netns_factory()
    other = netns_factory()
    spec = full_spec(f"test-{secrets.token_hex(4)}", octet)
    cleanup_links.append(spec.host_veth)
    watcher = NetnsWatcher()
    watcher.add("c1", ns)  # as in the daemon: before the attach, the watcher not reading
    watcher.add("c2", other)
    seen: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(seen.append, stop), daemon=True)
    try:
        assert Change.CREATED in nl.ensure_interface(ns, spec)
        watcher.expect("c1", {"eth1": LinkExpect(mtu=spec.mtu, mac=spec.mac)})
        thread.start()  # behind: everything the attach caused is queued by now
        nsexec(other.pid, "ip", "addr", "add", "127.0.0.4/8", "dev", "lo")  # a marker
        wait_for(lambda: "c2" in seen, timeout=5, interval=0.01, message="marker reported")
        assert "c1" not in seen
        # Someone else's change made before the next expect is still reported: a request
        # of another process, and an ioctl (the kernel's own report, port id 0).
        for change in (["ip", "addr", "add", f"10.77.{octet}.78/24", "dev", "eth1"],
                       ["busybox", "ifconfig", "eth1", "mtu", "1300"]):
            stop.set()
            thread.join(timeout=5)
            seen.clear()
            nsexec(ns.pid, *change)
            watcher.expect("c1", {"eth1": LinkExpect(mtu=spec.mtu, mac=spec.mac)})
            stop = threading.Event()
            thread = threading.Thread(target=watcher.run, args=(seen.append, stop),
                                      daemon=True)
            thread.start()
            wait_for(lambda: "c1" in seen, timeout=5, interval=0.01,
                     message=f"a foreign change queued before expect reported: {change}")
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        watcher.close()


def test_netns_watcher_watches_many_namespaces_on_one_socket(
        netns_factory: NetnsFactory) -> None:
    """Watching a namespace opens nothing per namespace (no socket in it: each one
    joined to a report group would make every report of the kernel, anywhere on the
    host, cost more), and a change in each is still reported under its own key."""
    namespaces = {f"c{i}": netns_factory() for i in range(5)}
    watcher = NetnsWatcher()
    seen: set[str] = set()
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(seen.add, stop), daemon=True)
    try:
        before = len(os.listdir("/proc/self/fd"))
        for key, ns in namespaces.items():
            watcher.add(key, ns)
        assert len(os.listdir("/proc/self/fd")) == before
        assert watcher.keys() == set(namespaces)
        thread.start()
        for i, ns in enumerate(namespaces.values()):
            nsexec(ns.pid, "ip", "addr", "add", f"127.0.0.{10 + i}/8", "dev", "lo")
        wait_for(lambda: seen == set(namespaces), timeout=5, interval=0.01,
                 message=f"a change in every namespace reported (seen {sorted(seen)})")
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        watcher.close()


@pytest.mark.parametrize("batch", [0.0, 1.0])
def test_netns_watcher_reads_a_burst_of_reports_together(
        netns_factory: NetnsFactory, monkeypatch: pytest.MonkeyPatch, batch: float) -> None:
    """After a wake the watch lets reports gather for `batch` seconds: changes in five
    namespaces, made one after another, are read in two wakes (the first change's and
    the rest's), not one each. With no batch each change is a wake of its own."""
    namespaces = {f"b{i}": netns_factory() for i in range(5)}
    watcher = NetnsWatcher()
    seen: set[str] = set()
    wakes: list[bool] = []
    poll = watcher._poll_once

    def counted(callback: Callable[[str], None]) -> bool:
        woke = poll(callback)
        if woke:
            wakes.append(woke)
        return woke

    monkeypatch.setattr(watcher, "_poll_once", counted)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(seen.add, stop),
                              kwargs={"batch": batch}, daemon=True)
    try:
        for key, ns in namespaces.items():
            watcher.add(key, ns)
        thread.start()
        for ns in namespaces.values():
            before = len(wakes)
            nsexec(ns.pid, "ip", "addr", "add", "127.0.0.9/8", "dev", "lo")
            if not batch:  # each read before the next change: a wake of its own
                wait_for(functools.partial(lambda n: len(wakes) > n, before), timeout=5,
                         interval=0.005, message="the watch woke for a change")
        wait_for(lambda: seen == set(namespaces), timeout=5, interval=0.01,
                 message=f"a change in every namespace reported (seen {sorted(seen)})")
        assert len(wakes) == (2 if batch else 5)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        watcher.close()


def _reports(sock: socket.socket, nsid: int, marker: bytes) -> list[tuple[int, int]]:
    """(type, port id) of every report from namespace `nsid` read from `sock`, up to the
    one whose body holds `marker` (an address added last, by a process)."""
    out: list[tuple[int, int]] = []
    while True:
        data, anc, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(4))
        if not any(level == 270 and struct.unpack_from("=i", value)[0] == nsid
                   for level, _, value in anc):
            continue
        off = 0
        while off + 16 <= len(data):
            length, kind, _, _, pid = struct.unpack_from("=IHHII", data, off)
            out.append((kind, pid))
            if marker in data[off:off + length]:
                return out
            off += (length + 3) & ~3


def test_netns_watch_socket_is_not_sent_the_kernels_own_address_and_route_reports(
        netns_factory: NetnsFactory, octet: int) -> None:
    """The watch socket's filter drops, in the kernel, the reports the watch never
    counts (the kernel's own address and route reports: port id 0, not a link), and lets
    through every report a request caused and every link report, as a socket without
    it sees them."""
    ns = netns_factory()
    with Rtnl() as ids:
        nsid = ids.nsid(ns.fd)
    socks = []
    for filtered in (False, True):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.setsockopt(270, 8, 1)  # NETLINK_LISTEN_ALL_NSID
        if filtered:
            _attach_filter(sock, _WATCH_FILTER)
        sock.bind((0, _NETNS_GROUPS))
        sock.settimeout(5)
        socks.append(sock)
    try:
        nsexec(ns.pid, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        nsexec(ns.pid, "ip", "addr", "add", f"10.77.{octet}.5/24", "dev", "d0")
        nsexec(ns.pid, "ip", "link", "set", "d1", "up")
        nsexec(ns.pid, "ip", "link", "set", "d0", "up")
        nsexec(ns.pid, "ip", "route", "add", "10.77.99.0/24", "via", f"10.77.{octet}.1")
        nsexec(ns.pid, "ip", "addr", "add", "127.0.0.77/8", "dev", "lo")  # the marker
        marker = ipaddress.ip_address("127.0.0.77").packed
        plain, kept = (_reports(sock, nsid, marker) for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    links = (16, 17)  # RTM_NEWLINK, RTM_DELLINK
    kernels = [r for r in plain if r[1] == 0 and r[0] not in links]
    assert len(kernels) >= 3, plain  # local, broadcast and subnet routes of the address
    assert [r for r in kept if r[1] == 0 and r[0] not in links] == []
    requested = [r for r in plain if r[1] != 0]
    assert len(requested) >= 3 and [r for r in kept if r[1] != 0] == requested
    assert any(kind in links for kind, _ in kept)


@pytest.mark.parametrize("broadcast", [True, False])
def test_netns_watch_needs_cap_net_broadcast_and_the_daemon_does_without(
        broadcast: bool) -> None:
    """The one socket for every namespace's reports needs CAP_NET_BROADCAST. A daemon
    without it (a deployment that drops it) warns, naming the capability, and runs
    without the watch instead of failing to start."""
    code = ("import logging; logging.basicConfig(level=logging.WARNING); "
            "from reconciler import app; w = app._netns_watcher(); "
            "print(type(w).__name__); w is None or w.close()")
    argv = [sys.executable, "-c", code]
    if not broadcast:
        argv = ["setpriv", "--bounding-set=-net_broadcast", "--inh-caps=-net_broadcast",
                "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    if broadcast:
        assert out.stdout.strip() == "NetnsWatcher", out.stderr
    else:
        assert out.stdout.strip() == "NoneType", out.stderr
        assert "CAP_NET_BROADCAST" in out.stderr and "resyncs only" in out.stderr
