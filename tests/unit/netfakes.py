"""In-memory fakes of what reconciler.network drives (netlink, OVSDB, the bridge
firewall, IPAM) and a rig that wires them into a NetworkController, for the unit tests
of the network package's decisions.

Each fake holds state (links, ports, rules, allocations) and records every call in
`calls` as a tuple (method name, arguments...); `MUTATING` names the methods that change
something, so a test can assert that a dry run changed nothing. `fail` maps a method
name to the error its next call(s) raise. Not a test module: no tests here.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from reconciler.adapters import netlink
from reconciler.adapters.docker_engine import ContainerInfo
from reconciler.adapters.netlink import (
    Change,
    InterfaceSpec,
    IpInterface,
    ObservedInterface,
)
from reconciler.adapters.ovs import NewPort, OwnedPort
from reconciler.errors import NetlinkError, PoolExhausted
from reconciler.ipam import Allocation, Ipam
from reconciler.model import AddressPool, ContainerSpec, DesiredState, IPAddress, Network
from reconciler.model import InterfaceSpec as ItfSpec
from reconciler.network.addresses import AddressBook
from reconciler.network.controller import NetworkController
from reconciler.network.drivers import build_drivers
from reconciler.network.drivers.ovs import NODE_ID
from reconciler.network.execute import AttachResult
from reconciler.network.portbatch import PendingPort, PortBatcher
from reconciler.network.segments import Segments

NODE = "n1"
OTHER_NODE = "n2"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def cidr(text: str) -> IpInterface:
    return ipaddress.ip_interface(text)


OVS_NET = Network("vnet", ipaddress.ip_network("10.77.1.0/24"), "br-v", "ovs", vlan=101,
                  gateway=ip("10.77.1.1"), mtu=1400,
                  pool=AddressPool(ip("10.77.1.10"), ip("10.77.1.20")))
LNX_NET = Network("lnet", ipaddress.ip_network("10.88.0.0/24"), "br-l", "linux",
                  gateway=ip("10.88.0.1"), mtu=1450,
                  pool=AddressPool(ip("10.88.0.10"), ip("10.88.0.20")))


def cid_of(n: int) -> str:
    """A container id (64 hex digits) that is distinct per `n`."""
    return f"{n:04x}" * 16


def itf(name: str, network: str = "vnet", address: str | None = None,
        **kw: Any) -> ItfSpec:
    return ItfSpec(name, network, None if address is None else cidr(address), **kw)


def state(containers: Mapping[str, Sequence[ItfSpec]],
          nets: Iterable[Network] = (OVS_NET, LNX_NET)) -> DesiredState:
    return DesiredState(networks={n.name: n for n in nets},
                        containers={k: ContainerSpec(k, tuple(v))
                                    for k, v in containers.items()})


def info(cid: str, name: str, *, pid: int = 4242, running: bool = True,
         labels: Mapping[str, str] | None = None) -> ContainerInfo:
    return ContainerInfo(id=cid, name=name, labels=labels or {}, running=running,
                         pid=pid if running else 0, start_time=1)


class Recorder:
    """Records calls; raises what `fail` holds for a method (`fail_times`: how often)."""

    MUTATING: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, Exception] = {}
        self.fail_times: dict[str, int] = {}

    def _rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            left = self.fail_times.get(name)
            if left is not None:
                if left <= 1:
                    self.fail_times.pop(name)
                    err = self.fail.pop(name)
                else:
                    self.fail_times[name] = left - 1
                    err = self.fail[name]
            else:
                err = self.fail[name]
            raise err

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def called(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of every call of `name`."""
        return [c[1:] for c in self.calls if c[0] == name]

    def mutations(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] in self.MUTATING]


class FakeNs:
    """Stands for a netlink.ContainerNetns: a pid, closable."""

    def __init__(self, pid: int, start_time: int | None = None) -> None:
        self.pid = pid
        self.start_time = start_time
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeNs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_ns(ns: FakeNs) -> netlink.ContainerNetns:
    return cast(netlink.ContainerNetns, ns)


class NetnsLog:
    """Replaces ContainerNetns.open: records (pid, what the process was checked by: the
    container id or the expected start time); `dead` pids fail."""

    def __init__(self) -> None:
        self.opened: list[tuple[int, str | int | None]] = []
        self.handles: list[FakeNs] = []
        self.dead: set[int] = set()

    def open(self, pid: int, *, expected_start_time: int | None = None,
             container_id: str | None = None) -> FakeNs:
        self.opened.append((pid, container_id if container_id is not None
                            else expected_start_time))
        if pid in self.dead:
            raise NetlinkError(f"cannot open netns of pid {pid}: No such process")
        ns = FakeNs(pid, expected_start_time)
        self.handles.append(ns)
        return ns


def patch_netns(monkeypatch: pytest.MonkeyPatch) -> NetnsLog:
    log = NetnsLog()
    monkeypatch.setattr(netlink.ContainerNetns, "open", log.open)
    return log


# --------------------------------------------------------------------------- netlink


@dataclass
class HostLink:
    index: int
    kind: str = "veth"
    alias: str | None = None
    master: str | None = None
    mtu: int | None = None
    up: bool = True
    addresses: set[IpInterface] = field(default_factory=set)
    mac: str | None = None


class FakeNetlink(Recorder):
    """Host links by name; container interfaces as last configured (by spec)."""

    MUTATING = frozenset({"ensure_interface", "create_interface", "announce", "detach",
                          "delete_host_veth", "ensure_linux_bridge", "ensure_host_address",
                          "enslave", "delete_linux_bridge"})

    def __init__(self) -> None:
        super().__init__()
        self.host: dict[str, HostLink] = {}
        self.inside: dict[tuple[str, str], InterfaceSpec] = {}  # (cid, ifname) -> spec
        self.retired: dict[str, HostLink] = {}  # retire_host_veth: deleted by reap_retired
        self.foreign: set[tuple[str, str]] = set()  # a link of that name, not our veth
        self.fail_ifnames: set[str] = set()  # ensure_interface fails for these
        self.fresh_creates = 0  # ensure_interface(fresh=True) calls
        self.index_lookups = 0  # link_index calls
        self._index = 100

    def add_link(self, name: str, kind: str = "veth", **kw: Any) -> HostLink:
        self._index += 1
        link = HostLink(self._index, kind, **kw)
        self.host[name] = link
        return link

    def add_owned_veth(self, cid: str, ifname: str, node: str = NODE) -> str:
        name = netlink.host_veth_name(cid, ifname)
        self.add_link(name, alias=netlink.host_veth_alias(node, cid, ifname))
        return name

    # container side

    def observe(self, ns: netlink.ContainerNetns, container_id: str, ifname: str, *,
                tx_checksum: bool = False) -> ObservedInterface:
        self._rec("observe", ifname)
        hv = netlink.host_veth_name(container_id, ifname)
        host = self.host.get(hv)
        hf: dict[str, Any] = {} if host is None else {
            "host_ifindex": host.index, "host_mtu": host.mtu, "host_up": host.up,
            "host_master": host.master, "host_alias": host.alias}
        key = (container_id, ifname)
        if key in self.foreign:
            return ObservedInterface(ifname, hv, exists=True, host_present=host is not None,
                                     paired=False, up=True, **hf)
        spec = self.inside.get(key)
        if spec is None:
            return ObservedInterface(ifname, hv, exists=False, host_present=host is not None,
                                     **hf)
        return ObservedInterface(
            ifname, hv, exists=True, host_present=host is not None, paired=host is not None,
            mac=spec.mac, mtu=spec.mtu, up=True, addresses=frozenset(spec.addresses),
            routes=spec.wanted_routes(), arp_notify=True, promote_secondaries=True,
            tx_checksum=spec.tx_checksum if tx_checksum else None, **hf)

    def ensure_interface(self, ns: netlink.ContainerNetns, spec: InterfaceSpec, *,
                         fresh: bool = False) -> netlink.Changes:
        self._rec("ensure_interface", spec.ifname, spec)
        if spec.ifname in self.fail_ifnames:
            raise NetlinkError(f"ensure {spec.ifname}: File exists")
        key = (spec.container_id, spec.ifname)
        old = self.inside.get(key)
        changes: list[Change] = []
        if old is None:
            stale = spec.host_veth in self.host
            changes.append(Change.RECREATED if stale else Change.CREATED)
            self.add_link(spec.host_veth, alias=spec.owner, mtu=spec.mtu)
        else:
            if frozenset(old.addresses) != frozenset(spec.addresses):
                changes.append(Change.ADDRESSES)
            if old.mtu != spec.mtu:
                changes.append(Change.MTU)
                self.host[spec.host_veth].mtu = spec.mtu
        self.inside[key] = spec
        if fresh:
            self.fresh_creates += 1
        return netlink.Changes(changes, self.host[spec.host_veth].index)

    def create_interface(self, ns: netlink.ContainerNetns, spec: InterfaceSpec
                         ) -> netlink.Changes | None:
        """As the real one: None, having done nothing, when either end exists."""
        self._rec("create_interface", spec.ifname, spec)
        key = (spec.container_id, spec.ifname)
        if spec.host_veth in self.host or key in self.inside or key in self.foreign:
            return None
        if spec.ifname in self.fail_ifnames:
            raise NetlinkError(f"create {spec.ifname}: injected failure")
        self.add_link(spec.host_veth, alias=spec.owner, mtu=spec.mtu)
        self.inside[key] = spec
        self.fresh_creates += 1
        return netlink.Changes([Change.CREATED], self.host[spec.host_veth].index)

    def announce(self, ns: netlink.ContainerNetns, ifname: str, mac: str | None = None,
                 addresses: tuple[IpInterface, ...] | None = None) -> int:
        self._rec("announce", ifname, addresses)
        return len(addresses or ())

    def detach(self, container_id: str, ifname: str) -> bool:
        self._rec("detach", container_id, ifname)
        self.inside.pop((container_id, ifname), None)
        return self.host.pop(netlink.host_veth_name(container_id, ifname), None) is not None

    def delete_host_veth(self, name: str) -> bool:
        self._rec("delete_host_veth", name)
        return self.host.pop(name, None) is not None

    def retire_host_veth(self, name: str) -> bool:
        self._rec("retire_host_veth", name)
        link = self.host.pop(name, None)
        if link is None:
            return False
        self.retired[netlink.RETIRED_VETH_PREFIX + name[2:]] = link
        return True

    def reap_retired(self) -> bool:
        self._rec("reap_retired")
        had = bool(self.retired)
        gone = {name[2:] for name in self.retired}
        self.retired.clear()
        self.inside = {k: v for k, v in self.inside.items()
                       if netlink.host_veth_name(*k)[2:] not in gone}
        return had

    def list_owned_host_veths(self, node: str | None = None) -> list[str]:
        self._rec("list_owned_host_veths", node)
        want = netlink.OWNER_ALIAS_PREFIX + (node or "")
        return sorted(n for n, lk in self.host.items()
                      if lk.kind == "veth" and netlink.is_owned_host_veth_name(n)
                      and (lk.alias or "").startswith(want))

    def host_veth_interfaces(self, node: str, container_id: str) -> set[str]:
        self._rec("host_veth_interfaces", node, container_id)
        want = f"{netlink.OWNER_ALIAS_PREFIX}{node}/{container_id}/"
        return {(lk.alias or "")[len(want):] for lk in self.host.values()
                if lk.kind == "veth" and (lk.alias or "").startswith(want)}

    def link_exists(self, name: str) -> bool:
        return name in self.host

    def link_index(self, name: str) -> int | None:
        self.index_lookups += 1
        link = self.host.get(name)
        return None if link is None else link.index

    # bridges and host addresses

    def ensure_linux_bridge(self, name: str, network: str, mtu: int | None = None,
                            node: str | None = None) -> tuple[Change, ...]:
        self._rec("ensure_linux_bridge", name)
        out: list[Change] = []
        link = self.host.get(name)
        if link is None:
            link = self.add_link(name, "bridge", up=False,
                                 alias=f"{netlink.OWNER_ALIAS_PREFIX}{network}@{node}")
            out.append(Change.CREATED)
        if mtu is not None and link.mtu != mtu:
            link.mtu = mtu
            out.append(Change.MTU)
        if not link.up:
            link.up = True
            out.append(Change.UP)
        return tuple(out)

    def ensure_host_address(self, ifname: str, cidr: IpInterface) -> tuple[Change, ...]:
        self._rec("ensure_host_address", ifname, cidr)
        link = self.host.get(ifname)
        if link is None:
            raise NetlinkError(f"no link {ifname} for address {cidr}")
        if cidr in link.addresses:
            return ()
        link.addresses.add(cidr)
        return (Change.ADDRESSES,)

    def ensure_host_mac(self, ifname: str, mac: str) -> bool:
        self._rec("ensure_host_mac", ifname, mac)
        link = self.host.get(ifname)
        if link is None:
            raise NetlinkError(f"no link {ifname} for mac {mac}")
        changed = link.mac != mac
        link.mac = mac
        return changed

    def master_of(self, ifname: str) -> str | None:
        link = self.host.get(ifname)
        return None if link is None else link.master

    def has_host_address(self, ifname: str, cidr: IpInterface) -> bool:
        link = self.host.get(ifname)
        return link is not None and link.up and cidr in link.addresses

    def bridge_state(self, name: str) -> tuple[bool, int | None, bool] | None:
        link = self.host.get(name)
        return None if link is None else (link.kind == "bridge", link.mtu, link.up)

    def enslave(self, ifname: str, bridge: str) -> bool:
        self._rec("enslave", ifname, bridge)
        link = self.host.get(ifname)
        if link is None or bridge not in self.host:
            raise NetlinkError(f"enslave {ifname} to {bridge}: no such link")
        changed = link.master != bridge
        link.master = bridge
        return changed

    def list_owned_bridges(self, node: str | None = None) -> dict[str, str]:
        out = {}
        for name, lk in self.host.items():
            alias = lk.alias or ""
            if lk.kind == "bridge" and alias.startswith(netlink.OWNER_ALIAS_PREFIX):
                net, _, owner = alias[len(netlink.OWNER_ALIAS_PREFIX):].partition("@")
                if node is None or owner == node:
                    out[name] = net
        return out

    def bridge_has_ports(self, name: str) -> bool:
        return any(lk.master == name for lk in self.host.values())

    def delete_linux_bridge(self, name: str) -> bool:
        self._rec("delete_linux_bridge", name)
        if name not in self.list_owned_bridges():
            return False
        del self.host[name]
        return True


# --------------------------------------------------------------------------- OVS


class FakeOvs(Recorder):
    """Bridges (name -> external_ids) and ports (name -> OwnedPort). A transaction shows
    in `calls` as ("begin",) ... ("commit",), or ("abort",) when its body raised."""

    MUTATING = frozenset({"add_ports", "ensure_port", "delete_port", "ensure_bridge",
                          "ensure_internal_port", "delete_bridge"})

    def __init__(self, nl: FakeNetlink | None = None, datapath: str = "system") -> None:
        super().__init__()
        self.datapath = datapath
        self.nl = nl  # internal ports appear there as host links
        self.bridges: dict[str, dict[str, str]] = {}
        self.ports: dict[str, OwnedPort] = {}
        self.recorded_ifindex: dict[str, int | None] = {}  # as in external_ids, real one
        self.add_ports_ok = True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.calls.append(("begin",))
        try:
            yield
        except BaseException:
            self.calls.append(("abort",))
            raise
        self.calls.append(("commit",))

    def add_port(self, name: str, bridge: str, tag: int | None = None, *,
                 node: str = NODE, **ids: str) -> OwnedPort:
        p = OwnedPort(name, bridge, tag, {NODE_ID: node, **ids})
        self.ports[name] = p
        return p

    def add_ports(self, ports: Sequence[NewPort]) -> bool:
        self._rec("add_ports", tuple(p.name for p in ports))
        if not self.add_ports_ok:
            return False
        for p in ports:
            self.ports[p.name] = OwnedPort(p.name, p.bridge, p.vlan, dict(p.external_ids))
            self.recorded_ifindex[p.name] = p.ifindex
        return True

    def port_differs(self, bridge: str, port_name: str, vlan: int | None,
                     external_ids: Mapping[str, str], ifindex: int | None = None) -> bool:
        p = self.ports.get(port_name)
        return p is None or p.bridge != bridge or p.tag != vlan \
            or any(p.external_ids.get(k) != v for k, v in external_ids.items()) \
            or (ifindex is not None
                and self.recorded_ifindex.get(port_name) not in (None, ifindex))

    def ensure_port(self, bridge: str, port_name: str, vlan: int | None,
                    external_ids: Mapping[str, str], ifindex: int | None = None) -> bool:
        self._rec("ensure_port", port_name)
        changed = self.port_differs(bridge, port_name, vlan, external_ids, ifindex)
        self.ports[port_name] = OwnedPort(port_name, bridge, vlan, dict(external_ids))
        self.recorded_ifindex[port_name] = ifindex
        return changed

    def delete_port(self, name: str) -> bool:
        self._rec("delete_port", name)
        self.recorded_ifindex.pop(name, None)
        return self.ports.pop(name, None) is not None

    def delete_ports(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        self._rec("delete_ports", tuple(names))
        for n in names:
            self.recorded_ifindex.pop(n, None)
        return [n for n in names if self.ports.pop(n, None) is not None]

    def get_port(self, name: str) -> OwnedPort | None:
        return self.ports.get(name)

    def port_exists(self, name: str) -> bool:
        return name in self.ports

    def list_owned_ports(self, owner: str = "reconciler", node: str | None = None,
                         ) -> list[OwnedPort]:
        return [p for p in self.ports.values()
                if node is None or p.external_ids.get(NODE_ID) == node]

    def ensure_bridge(self, name: str, datapath_type: str | None = None,
                      external_ids: Mapping[str, str] | None = None) -> bool:
        self._rec("ensure_bridge", name, dict(external_ids or {}))
        created = name not in self.bridges
        self.bridges[name] = dict(external_ids or {})
        return created

    def ensure_internal_port(self, bridge: str, name: str, vlan: int | None,
                             external_ids: Mapping[str, str], mtu: int | None = None) -> bool:
        self._rec("ensure_internal_port", bridge, name, vlan)
        changed = self.port_differs(bridge, name, vlan, external_ids)
        self.ports[name] = OwnedPort(name, bridge, vlan, dict(external_ids), type="internal")
        if self.nl is not None and name not in self.nl.host:
            self.nl.add_link(name, "internal", mtu=mtu)
        return changed

    def bridge_exists(self, name: str) -> bool:
        self._rec("bridge_exists", name)
        return name in self.bridges

    def list_owned_bridges(self, node: str | None = None) -> list[str]:
        return sorted(b for b, ids in self.bridges.items()
                      if node is None or ids.get(NODE_ID) == node)

    def bridge_port_names(self, name: str) -> list[str]:
        return sorted(p.name for p in self.ports.values() if p.bridge == name)

    def delete_bridge(self, name: str) -> bool:
        self._rec("delete_bridge", name)
        for p in [p for p in self.ports.values() if p.bridge == name]:
            del self.ports[p.name]
        return self.bridges.pop(name, None) is not None


# --------------------------------------------------------------------------- firewall


class FakeFirewall(Recorder):
    """BridgeForwarding: the set of bridges that have our FORWARD rule."""

    MUTATING = frozenset({"ensure", "remove"})

    def __init__(self) -> None:
        super().__init__()
        self.rules: set[str] = set()

    def ensure(self, bridge: str) -> bool:
        self._rec("ensure", bridge)
        new = bridge not in self.rules
        self.rules.add(bridge)
        return new

    def in_place(self, bridge: str) -> bool:
        return bridge in self.rules

    def remove(self, bridge: str) -> bool:
        self._rec("remove", bridge)
        had = bridge in self.rules
        self.rules.discard(bridge)
        return had

    def owned(self) -> list[str]:
        return sorted(self.rules)


# --------------------------------------------------------------------------- IPAM


class FakeIpam(Recorder):
    """Allocations in a list; `allocate` takes the lowest free pool address."""

    MUTATING = frozenset({"allocate", "allocate_many", "claim", "release",
                          "release_container", "reclaim_dead_nodes", "reassert"})

    def __init__(self, node: str = NODE) -> None:
        super().__init__()
        self.node = node
        self.allocs: list[Allocation] = []
        self.dead: list[Allocation] = []  # what reclaim_dead_nodes releases
        self.reassert_ok = True

    def hold(self, net: Network, address: str, container: str, ifname: str = "eth1",
             node: str = NODE, spec: str = "") -> Allocation:
        a = Allocation(net.name, ip(address), node, container, ifname, spec=spec)
        self.allocs.append(a)
        return a

    def held(self) -> set[tuple[str, str, str, str]]:
        """(network, address, container, interface) of every allocation."""
        return {(a.network, str(a.address), a.container, a.interface) for a in self.allocs}

    def allocations(self, network: str | None = None) -> list[Allocation]:
        self._rec("allocations", network)
        return [a for a in self.allocs if network is None or a.network == network]

    def _free(self, net: Network, reserved: Iterable[IPAddress]) -> Iterator[IPAddress]:
        assert net.pool is not None
        taken = {a.address for a in self.allocs if a.network == net.name} | set(reserved)
        for n in range(int(net.pool.start), int(net.pool.end) + 1):
            addr = ipaddress.ip_address(n)
            if addr not in taken and addr != net.gateway:
                yield addr

    def allocate(self, net: Network, container: str, interface: str,
                 reserved: Iterable[IPAddress] = (),
                 known: Mapping[str, Any] | None = None, spec: str = "") -> IPAddress:
        self._rec("allocate", net.name, container, interface)
        for a in self.allocs:
            if (a.network, a.container, a.interface) == (net.name, container, interface):
                return a.address
        addr = next(self._free(net, reserved), None)
        if addr is None:
            raise PoolExhausted(f"network {net.name}: pool exhausted")
        self.allocs.append(Allocation(net.name, addr, self.node, container, interface,
                                      spec=spec))
        return addr

    def allocate_many(self, wants: Sequence[tuple[Network, str, str]],
                      reserved: Iterable[IPAddress], known: Mapping[str, Any],
                      batch: int = 64, covered: Any = None,
                      specs: Mapping[str, str] | None = None,
                      ) -> dict[tuple[str, str, str], IPAddress]:
        self._rec("allocate_many", [(n.name, c, i) for n, c, i in wants])
        return {(c, n.name, i): self.allocate(n, c, i, reserved, spec=(specs or {}).get(c, ""))
                for n, c, i in wants}

    def find(self, network: str, container: str, interface: str) -> Allocation | None:
        self._rec("find", network, container, interface)
        return next((a for a in self.allocs if (a.network, a.container, a.interface)
                     == (network, container, interface)), None)

    def claim(self, net: Network, address: IPAddress, container: str, interface: str,
              spec: str = "") -> Allocation | None:
        self._rec("claim", net.name, str(address), container, interface)
        for a in self.allocs:
            if a.network == net.name and a.address == address:
                return None if (a.container, a.interface) == (container, interface) else a
        self.allocs.append(Allocation(net.name, address, self.node, container, interface,
                                      spec=spec))
        return None

    def release(self, allocation: Allocation) -> bool:
        self._rec("release", allocation.network, str(allocation.address))
        if allocation in self.allocs:
            self.allocs.remove(allocation)
            return True
        return False

    def release_container(self, container: str, networks: Any = None) -> int:
        self._rec("release_container", container)
        mine = [a for a in self.allocs if a.container == container and a.node == self.node
                and (networks is None or a.network in networks)]
        for a in mine:
            self.allocs.remove(a)
        return len(mine)

    def reclaim_dead_nodes(self, grace: float = 3600.0,
                           now: float | None = None) -> list[Allocation]:
        self._rec("reclaim_dead_nodes", grace)
        gone, self.dead = self.dead, []
        for a in gone:
            if a in self.allocs:
                self.allocs.remove(a)
        return gone

    def reassert(self, network: str, address: IPAddress, container: str, interface: str,
                 spec: str = "") -> bool:
        self._rec("reassert", network, str(address), container, interface)
        if not self.reassert_ok:
            return False
        self.allocs.append(Allocation(network, address, self.node, container, interface,
                                      spec=spec))
        return True


def as_ipam(fake: FakeIpam) -> Ipam:
    return cast(Ipam, fake)


def as_nl(fake: FakeNetlink) -> netlink.NetlinkAdapter:
    return cast(netlink.NetlinkAdapter, fake)


class FakeWatcher(Recorder):
    """NetnsWatcher: which containers are watched, and what is expected of them."""

    def __init__(self) -> None:
        super().__init__()
        self.expected: dict[str, dict[str, netlink.LinkExpect]] = {}

    def add(self, key: str, ns: Any) -> None:
        self._rec("add", key)

    def expect(self, key: str, links: Mapping[str, netlink.LinkExpect]) -> None:
        self.expected[key] = dict(links)

    def forget_links(self, key: str, ifnames: Any) -> None:
        for name in ifnames:
            self.expected.get(key, {}).pop(name, None)

    def remove(self, key: str) -> None:
        self._rec("remove", key)


# --------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    """A NetworkController over the fakes. `kicks` counts batcher notifications (with
    `notify`; without, every queued port change is committed at once)."""

    nl: FakeNetlink
    ovs: FakeOvs
    fw: FakeFirewall
    ipam: FakeIpam
    netns: NetnsLog
    batcher: PortBatcher
    segments: Segments
    addresses: AddressBook
    ctrl: NetworkController
    infos: dict[str, ContainerInfo]
    kicks: list[int]
    watcher: FakeWatcher | None

    def reconcile(self, i: ContainerInfo) -> AttachResult:
        return self.ctrl.reconcile_container(i.id, i)

    def mutations(self) -> list[tuple[Any, ...]]:
        return (self.nl.mutations() + self.ovs.mutations() + self.fw.mutations()
                + self.ipam.mutations())

    def clear(self) -> None:
        for r in (self.nl, self.ovs, self.fw, self.ipam):
            r.calls.clear()
        self.netns.opened.clear()


def make_rig(monkeypatch: pytest.MonkeyPatch, *, dry_run: bool = False,
             notify: bool = True, datapath: str = "system",
             watcher: FakeWatcher | None = None, watch: bool = True) -> Rig:
    """`watcher`: the fake watch of container namespaces (one is made if none is given);
    `watch=False`: none at all, as for a daemon without CAP_NET_BROADCAST."""
    if watcher is None and watch:
        watcher = FakeWatcher()
    nl = FakeNetlink()
    ovs = FakeOvs(nl, datapath)
    fw = FakeFirewall()
    ipam = FakeIpam()
    netns = patch_netns(monkeypatch)
    kicks: list[int] = []
    infos: dict[str, ContainerInfo] = {}
    holder: list[NetworkController] = []

    def committed(ports: Sequence[PendingPort]) -> None:
        holder[0].announce_committed(ports)

    batcher = PortBatcher(ovs, notify=(lambda: kicks.append(1)) if notify else None,
                          after_commit=committed)
    segments = Segments(build_drivers(node=NODE, nl=as_nl(nl), ovs=ovs, fw=fw,
                                      batcher=batcher))
    addresses = AddressBook(as_ipam(ipam), NODE)
    ctrl = NetworkController(node=NODE, nl=as_nl(nl), segments=segments, addresses=addresses,
                             batcher=batcher, inspect=infos.get, dry_run=dry_run,
                             netns_watcher=cast(netlink.NetnsWatcher, watcher))
    holder.append(ctrl)
    return Rig(nl, ovs, fw, ipam, netns, batcher, segments, addresses, ctrl, infos, kicks,
               watcher)

