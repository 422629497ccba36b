"""The network controller: makes one container's interfaces equal to its spec.

Owns the mapping from desired state (networks, container specs) plus a running container
to netlink/OVS calls, the gateway ports of networks, and the orphan sweep. Level-based:
`reconcile_container(id)` reads the container, the spec and the actual interfaces every
time, so a missed event is repaired by the next one or by the periodic resync.

Ownership: every OVS port the daemon creates carries external_ids (owner, node, container,
container interface, network) written in the transaction that creates it; host veths are
named `rv<hash>` (netlink.host_veth_name); OVS bridges carry external_ids (owner, node,
network) and Linux bridges ifalias `reconciler:<net>@<node>`; gateway ports are `rg<hash>`.
Nothing without those marks is ever touched; a bridge is deleted only by the daemon of the
node that made it, once no network names it and nothing is plugged into it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.adapters import netlink
from reconciler.adapters.docker_engine import ContainerInfo
from reconciler.adapters.ovs import NewPort
from reconciler.errors import AdapterError, NetlinkError, ReconcilerError
from reconciler.ipam import DEFAULT_RECLAIM_GRACE, Allocation, Ipam
from reconciler.model import ContainerSpec, DesiredState, InterfaceSpec, IPAddress, Network

log = logging.getLogger(__name__)

NAME_LABEL = "reconciler.name"
GATEWAY_PREFIX = "rg"


def gateway_port_name(network: str) -> str:
    return GATEWAY_PREFIX + hashlib.sha256(f"gw/{network}".encode()).hexdigest()[:13]


def spec_for(state: DesiredState, name: str, labels: Mapping[str, str]) -> ContainerSpec | None:
    """The entry for a container: by its name, else by its `reconciler.name` label."""
    spec = state.containers.get(name)
    if spec is None and labels.get(NAME_LABEL):
        spec = state.containers.get(labels[NAME_LABEL])
    return spec


def spec_key_for(prefix: str, name: str, labels: Mapping[str, str], state: DesiredState,
                 ) -> str | None:
    """The KV key whose entry (valid or not) applies to a container."""
    for n in (name, labels.get(NAME_LABEL, "")):
        key = f"{prefix}containers/{n}"
        if n and (n in state.containers or key in state.invalid_keys):
            return key
    return None


@dataclass
class AttachResult:
    """What one reconcile of a container did."""

    changes: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)  # ifname -> address/prefix
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PendingPort:
    """An OVS port to commit with the next batch, and whom to announce after."""

    port: NewPort
    container: str
    ifname: str
    pid: int
    announce: bool
    addresses: tuple[netlink.IpInterface, ...] = field(default=(), hash=False)


_ANNOUNCE_AFTER = frozenset({netlink.Change.CREATED, netlink.Change.RECREATED,
                             netlink.Change.ADDRESSES, netlink.Change.MAC})


class AddressConflict(ReconcilerError):
    """A static address is held by another container (on this or another node)."""


class ContainerError(ReconcilerError):
    """Some interfaces of a container could not be made right (temporary: retried)."""


class NetworkController:
    """Applies networking for containers on this node."""

    def __init__(self, *, node: str, prefix: str, nl: netlink.NetlinkAdapter, ovs: Any,
                 ipam: Ipam, inspect: Callable[[str], ContainerInfo | None],
                 dry_run: bool = False, reclaim_grace: float = DEFAULT_RECLAIM_GRACE,
                 netns_watcher: netlink.NetnsWatcher | None = None) -> None:
        self.node = node
        self.prefix = prefix
        self.nl = nl
        self.ovs = ovs
        self.ipam = ipam
        self.inspect = inspect
        self.dry_run = dry_run
        self.reclaim_grace = reclaim_grace
        self._addr_cache: dict[tuple[str, str, str], IPAddress] = {}
        self.netns_watcher = netns_watcher
        # The resync fast path: a container whose inputs are unchanged since its last
        # clean reconcile, and that no event marked dirty since, is not looked at again.
        # Drift reaches us as events instead: netlink inside each container netns
        # (NetnsWatcher), host veth deletions, OVS port deletions, Docker events; and a
        # deep pass (mark_all_dirty) every few resyncs is the safety net.
        self._clean: dict[str, tuple[Any, ...]] = {}
        self._dirty: set[str] = set()
        self._pending_ports: dict[str, PendingPort] = {}
        self._pending_deletes: set[str] = set()  # OVS ports to delete with the next batch
        # Called when ports are queued; the daemon enqueues its `ovs-ports` key. None:
        # commit at once (one-shot use).
        self.on_ports_pending: Callable[[], None] | None = None
        self.ipam_view: Mapping[str, Any] | None = None  # ipam/ keys as last watched
        self.state = DesiredState()
        self._lock = threading.Lock()
        self._networks_done: dict[str, Network] = {}
        self.attached: dict[str, AttachResult] = {}  # container id -> last result
        self.planned: list[str] = []  # dry-run: what would change

    # ------------------------------------------------------------------ state

    def set_state(self, state: DesiredState) -> None:
        with self._lock:
            if state.networks != self.state.networks:
                self._networks_done = {}
            self.state = state

    # ------------------------------------------------------------------ networks

    def ensure_network(self, net: Network) -> list[str]:
        """Bridge (and gateway address on the host) for a network; cached until it changes."""
        if self._networks_done.get(net.name) == net:
            return []
        changes: list[str] = []
        if self.dry_run:
            self._plan_network(net)
            self._networks_done[net.name] = net
            return changes
        gw_cidr = None
        if net.gateway is not None:
            gw_cidr = ipaddress.ip_interface(f"{net.gateway}/{net.subnet.prefixlen}")
        if net.driver == "ovs":
            if self.ovs.ensure_bridge(net.bridge, external_ids=self._ids(network=net.name)):
                changes.append(f"bridge {net.bridge} created")
            if gw_cidr is not None:
                port = gateway_port_name(net.name)
                if self.ovs.ensure_internal_port(net.bridge, port, net.vlan, self._ids(
                        network=net.name, role="gateway"), mtu=net.mtu):
                    changes.append(f"gateway port {port}")
                self._wait_link(port)
                changes += [f"gateway {c}" for c in self.nl.ensure_host_address(port, gw_cidr)]
        else:
            changes += [f"bridge {c}" for c in self.nl.ensure_linux_bridge(
                net.bridge, net.name, net.mtu, node=self.node)]
            if gw_cidr is not None:
                changes += [f"gateway {c}" for c in self.nl.ensure_host_address(
                    net.bridge, gw_cidr)]
        self._networks_done[net.name] = net
        return changes

    def _plan_network(self, net: Network) -> None:
        exists = self.ovs.bridge_exists(net.bridge) if net.driver == "ovs" \
            else self.nl.link_exists(net.bridge)
        if not exists:
            self.planned.append(f"network {net.name}: create {net.driver} bridge {net.bridge}")
        if net.gateway is not None:
            dev = gateway_port_name(net.name)
            if net.driver == "ovs" and not self.nl.link_exists(dev):
                self.planned.append(f"network {net.name}: create gateway port {dev} "
                                    f"(vlan {net.vlan})")

    def _wait_link(self, name: str, timeout: float = 5.0) -> None:
        # vswitchd creates an internal port's netdev asynchronously after the commit.
        ev = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self.nl.link_exists(name):
                return
            ev.wait(0.02)
        raise NetlinkError(f"internal port {name} did not appear as a host link")

    def _ids(self, **extra: str) -> dict[str, str]:
        ids = {"reconciler-node": self.node}
        ids.update({f"reconciler-{k}": v for k, v in extra.items()})
        return ids

    # ------------------------------------------------------------------ containers

    def wanted(self, info: ContainerInfo) -> list[InterfaceSpec]:
        spec = spec_for(self.state, info.name, info.labels)
        return list(spec.interfaces) if spec is not None else []

    def mark_dirty(self, cid: str) -> None:
        self._dirty.add(cid)

    def mark_all_dirty(self) -> None:
        self._dirty.update(self._clean)

    def dirty_ids(self) -> list[str]:
        return list(self._dirty)

    def is_dirty(self, cid: str) -> bool:
        return cid in self._dirty or cid not in self._clean

    def _fingerprint(self, info: ContainerInfo, wanted: list[InterfaceSpec],
                     state: DesiredState) -> tuple[Any, ...]:
        return (info.pid, info.start_time, tuple(wanted),
                tuple(state.networks.get(w.network) for w in wanted))

    def reconcile_container(self, cid: str, info: ContainerInfo | None = None,
                            *, inspected: bool = False) -> AttachResult:
        """Level-based: make container `cid`'s interfaces equal to its spec (or none).

        `info`: the container as just inspected (`inspected=True`) or as cached by the
        caller; None to inspect here."""
        if info is None and not inspected:
            info = self.inspect(cid)
        if info is not None and info.running and info.pid and not self.dry_run:
            fp = self._fingerprint(info, self.wanted(info), self.state)
            last = self.attached.get(cid)
            if cid not in self._dirty and self._clean.get(cid) == fp and last is not None:
                return AttachResult(addresses=dict(last.addresses))  # nothing to do
        self._dirty.discard(cid)  # an event arriving from now on marks it again
        self._clean.pop(cid, None)
        if info is None or not info.running or not info.pid:
            if self.netns_watcher is not None:
                self.netns_watcher.remove(cid)
            res = AttachResult()
            self._detach_all(cid, res)
            self._forget(cid)
            if info is None:  # removed: its addresses go back to the pool
                if not self.dry_run:
                    n = self.ipam.release_container(cid)
                    if n:
                        res.changes.append(f"released {n} address(es)")
                self.attached.pop(cid, None)
            else:
                self.attached[cid] = res
            return res
        state = self.state
        wanted = self.wanted(info)
        res = AttachResult()
        if wanted:
            self._attach(info, wanted, state, res)
        self._detach_unwanted(cid, {w.name for w in wanted}, res)
        self.attached[cid] = res
        if res.errors:
            raise ContainerError("; ".join(res.errors))
        if not self.dry_run:
            self._clean[cid] = self._fingerprint(info, wanted, state)
        return res

    def _attach(self, info: ContainerInfo, wanted: list[InterfaceSpec], state: DesiredState,
                res: AttachResult) -> None:
        try:
            ns = netlink.ContainerNetns.open(info.pid, container_id=info.id)
        except NetlinkError as e:
            res.errors.append(f"{info.name}: {e}")
            return
        watcher = None if self.dry_run else self.netns_watcher
        try:
            if watcher is not None:
                try:
                    watcher.add(info.id, ns)  # kept across reconciles; replaced on restart
                except NetlinkError as e:  # drift then waits for the deep resync
                    log.warning("%s: cannot watch its namespace: %s", info.name, e)
            reserved = [i.address.ip for s in state.containers.values() for i in s.interfaces
                        if i.address is not None]
            for itf in wanted:
                net = state.networks[itf.network]
                try:
                    self._attach_one(ns, info, itf, net, reserved, res)
                except (AdapterError, ReconcilerError) as e:
                    res.errors.append(f"{info.name} {itf.name}: {e}")
            if watcher is not None:
                # From now on the kernel's own reports of these links (MTU, MAC, up/down
                # changed by anyone) are compared with this.
                watcher.expect(info.id, {itf.name: netlink.LinkExpect(
                    mtu=itf.mtu or state.networks[itf.network].mtu, mac=itf.mac)
                    for itf in wanted})
        finally:
            ns.close()

    def _attach_one(self, ns: netlink.ContainerNetns, info: ContainerInfo, itf: InterfaceSpec,
                    net: Network, reserved: Iterable[IPAddress], res: AttachResult) -> None:
        res.changes += self.ensure_network(net)
        if itf.address is not None:
            addr = itf.address
            if self.dry_run:
                holder = next((a for a in self.ipam.allocations(net.name)
                               if a.address == addr.ip and a.container != info.id), None)
                if holder is not None:
                    self.planned.append(
                        f"{info.name} {itf.name}: conflict: {addr.ip} is held by container "
                        f"{holder.container[:12]} on node {holder.node}")
                    return
            holder = None if self.dry_run else self._claim(net, addr.ip, info.id, itf.name)
            if holder is not None:
                # The loser must not keep (or get) the address.
                self._detach(info.id, itf.name, netlink.host_veth_name(info.id, itf.name)
                             if net.driver == "ovs" else None, res)
                raise AddressConflict(
                    f"static address {addr.ip} on network {net.name!r} is held by container "
                    f"{holder.container[:12]} ({holder.interface}) on node {holder.node}")
        elif self.dry_run:
            held = self.ipam.find(net.name, info.id, itf.name)
            if held is None:
                self.planned.append(f"{info.name} {itf.name}: allocate an address from "
                                    f"{net.name} and attach")
                return
            addr = ipaddress.ip_interface(f"{held.address}/{net.subnet.prefixlen}")
        else:
            ip = self._allocate(net, info.id, itf.name, reserved)
            addr = ipaddress.ip_interface(f"{ip}/{net.subnet.prefixlen}")
        spec = netlink.InterfaceSpec(
            container_id=info.id, ifname=itf.name, addresses=(addr,), mac=itf.mac,
            mtu=itf.mtu or net.mtu, gateway=itf.gateway,
            routes=tuple(netlink.Route(r.dst, r.via) for r in itf.routes),
            owner=netlink.host_veth_alias(self.node, info.id, itf.name),
            # OVS's userspace (netdev) datapath does not complete checksums that the
            # veth leaves to "hardware": TCP from the container would be dropped (ping
            # works, TCP does not). So the container computes them itself there.
            tx_checksum=False if net.driver == "ovs" and self.ovs.datapath == "netdev"
            else None,
            # Announced below, once the host end is on its switch: before that nobody hears.
            announce=False)
        res.addresses[itf.name] = str(addr)
        if self.dry_run:
            obs = self.nl.observe(ns, info.id, itf.name)
            if not obs.exists:
                self.planned.append(f"{info.name} {itf.name}: attach {addr} on {net.name}")
            else:
                drift = [what for what, bad in (
                    ("addresses", set(obs.addresses) != {addr}),
                    ("mtu", spec.mtu is not None and obs.mtu != spec.mtu),
                    ("mac", spec.mac is not None and obs.mac != spec.mac),
                    ("routes", set(obs.routes) != set(spec.wanted_routes())),
                    ("host veth", not obs.host_present)) if bad]
                if drift:
                    self.planned.append(f"{info.name} {itf.name}: repair {', '.join(drift)}")
            return
        changed = self.nl.ensure_interface(ns, spec)
        res.changes += [f"{itf.name} {c}" for c in changed]
        # Neighbours (the host's gateway too) must learn a new address or MAC: announce
        # (a gratuitous ARP) once the port is on the switch.
        readdressed = any(c in _ANNOUNCE_AFTER for c in changed)
        if net.driver == "ovs":
            # The ifindex lets ensure_port notice a veth recreated under the same name:
            # the userspace datapath keeps reading the dead device until the port is
            # re-added (seen with datapath_type=netdev).
            ifindex = self.nl.link_index(spec.host_veth)
            new = NewPort(net.bridge, spec.host_veth, net.vlan, self._ids(
                container=info.id, interface=itf.name, network=net.name), ifindex)
            if self.ovs.port_differs(new.bridge, new.name, new.vlan, new.external_ids, ifindex):
                # Queued, and committed with every other port queued meanwhile in ONE
                # OVSDB transaction (flush_ports): vswitchd reconfigures the bridge once
                # per transaction, at a cost that grows with its port count, so one port
                # per transaction made attaching N containers O(N^2) (bench/attach.py).
                with self._lock:
                    self._pending_deletes.discard(new.name)
                    self._pending_ports[new.name] = PendingPort(
                        new, info.id, itf.name, info.pid, bool(changed), spec.addresses)
                if self.on_ports_pending is not None:
                    self.on_ports_pending()
                else:
                    self.flush_ports()
                res.changes.append(f"{itf.name} port")
                return
            attached = False
        else:
            attached = self.nl.enslave(spec.host_veth, net.bridge)
            if attached:
                res.changes.append(f"{itf.name} bridge")
        if (attached and changed) or readdressed:
            self.nl.announce(ns, itf.name, spec.mac, spec.addresses)
            res.changes.append(f"{itf.name} garp")

    def flush_ports(self) -> list[str]:
        """Commit every queued OVS port deletion, then every queued port, each kind in one
        transaction; announce the containers whose interface was (re)created, once their
        port is on the switch."""
        with self._lock:
            pending = dict(self._pending_ports)
            deletes, self._pending_deletes = self._pending_deletes, set()
        if deletes:
            # One transaction for all: one per port cost ~20 ms each (the commit waits
            # for ovs-vswitchd), which made removing 200 replicas take seconds.
            try:
                with self.ovs.transaction():
                    for name in deletes:
                        self.ovs.delete_port(name)
            except AdapterError:
                with self._lock:  # retried with the next flush
                    self._pending_deletes |= deletes - set(self._pending_ports)
                raise
        if not pending:
            return sorted(deletes)
        # New ports (the common case: containers scaled out) go in one transaction sent
        # straight to ovsdb-server; anything else (a port to fix, a race) goes through
        # the replica, which compares and repairs.
        fresh = [p.port for p in pending.values() if not self.ovs.port_exists(p.port.name)]
        if not (fresh and self.ovs.add_ports(fresh)):
            fresh = []
        with self.ovs.transaction():
            for p in pending.values():
                if p.port not in fresh:
                    n = p.port
                    self.ovs.ensure_port(n.bridge, n.name, n.vlan, n.external_ids,
                                         ifindex=n.ifindex)
        with self._lock:
            for name, p in pending.items():
                if self._pending_ports.get(name) is p:
                    del self._pending_ports[name]
        for p in pending.values():
            if not p.announce:
                continue
            # Neighbours (the host's gateway too) learn the MAC only once the port is on
            # the switch: announce again now. The container may be gone meanwhile.
            try:
                with netlink.ContainerNetns.open(p.pid, container_id=p.container) as ns:
                    self.nl.announce(ns, p.ifname, addresses=p.addresses or None)
            except NetlinkError as e:
                log.debug("announce %s %s: %s", p.container[:12], p.ifname, e)
        return [p.port.name for p in pending.values()] + sorted(deletes)

    def _sweep_bridges(self, state: DesiredState) -> list[str]:
        """Bridges this node's daemon created for networks that no longer exist, once
        nothing is plugged into them (ours were just swept; anyone else's keeps the
        bridge). A bridge another network still names is kept, whoever made it."""
        used = {n.bridge for n in state.networks.values()}
        done: list[str] = []
        for br in self.ovs.list_owned_bridges(node=self.node):
            if br not in used and not self.ovs.bridge_port_names(br):
                done.append(f"bridge {br}")
                if not self.dry_run:
                    self.ovs.delete_bridge(br)
        for br in self.nl.list_owned_bridges(node=self.node):
            if br not in used and not self.nl.bridge_has_ports(br):
                done.append(f"bridge {br}")
                if not self.dry_run:
                    self.nl.delete_linux_bridge(br)
        return done

    def _reassert(self, running: list[ContainerInfo],
                  held: dict[tuple[str, str, str], IPAddress]) -> list[str]:
        """Addresses configured on running containers whose allocation key is gone
        (e.g. reclaimed while this daemon was away longer than the grace period): create
        the key again; if another container holds the address now, re-address ours."""
        out: list[str] = []
        for info in running:
            res = self.attached.get(info.id)
            if res is None:
                continue
            for itf in self.wanted(info):
                cidr = res.addresses.get(itf.name)
                if cidr is None or (info.id, itf.network, itf.name) in held:
                    continue
                ip = ipaddress.ip_interface(cidr).ip
                if self.ipam.reassert(itf.network, ip, info.id, itf.name):
                    held[(info.id, itf.network, itf.name)] = ip
                    out.append(f"re-asserted allocation {itf.network}/{ip}")
                else:
                    log.error("%s %s: address %s was reclaimed and is now held by another "
                              "container: re-addressing", info.name, itf.name, ip)
                    self._dirty.add(info.id)
                    out.append(f"lost allocation {itf.network}/{ip}")
        return out

    def pending_ports(self) -> int:
        with self._lock:
            return len(self._pending_ports) + len(self._pending_deletes)

    # IPAM answers are cached per (container, network, interface) so that a resync of
    # unchanged containers costs no Consul read; every sweep (each resync) drops the
    # cache, so an allocation removed behind our back is noticed within one period.
    def _claim(self, net: Network, ip: IPAddress, cid: str, ifname: str) -> Allocation | None:
        ck = (cid, net.name, ifname)
        if self._addr_cache.get(ck) == ip:
            return None
        holder = self.ipam.claim(net, ip, cid, ifname)
        if holder is None:
            self._addr_cache[ck] = ip
        return holder

    def _allocate(self, net: Network, cid: str, ifname: str,
                  reserved: Iterable[IPAddress]) -> IPAddress:
        ck = (cid, net.name, ifname)
        ip = self._addr_cache.get(ck)
        if ip is None or net.pool is None or ip not in net.pool:
            ip = self.ipam.allocate(net, cid, ifname, reserved, known=self.ipam_view)
            self._addr_cache[ck] = ip
        return ip

    def preallocate(self, containers: Iterable[ContainerInfo]) -> int:
        """Allocate the `auto` addresses of many containers in a few Consul transactions
        (up to 64 addresses each), before their reconciles run: with 200 replicas
        scaled out at once, one create round trip each was the largest cost of attaching
        (bench/attach.py). Best effort: whatever it leaves (a lost race, an error) is
        allocated one by one by the reconcile. Returns how many it allocated."""
        view = self.ipam_view
        if self.dry_run or view is None:
            return 0
        state = self.state
        wants: list[tuple[Network, str, str]] = []
        for info in containers:
            if not info.running:
                continue
            for itf in self.wanted(info):
                net = state.networks.get(itf.network)
                if itf.address is not None or net is None or net.pool is None \
                        or (info.id, net.name, itf.name) in self._addr_cache:
                    continue
                wants.append((net, info.id, itf.name))
        if len(wants) < 2:
            return 0  # one alone: the reconcile's own allocation costs the same
        reserved = [i.address.ip for s in state.containers.values() for i in s.interfaces
                    if i.address is not None]
        try:
            got = self.ipam.allocate_many(wants, reserved, view)
        except (AdapterError, ReconcilerError) as e:
            log.warning("batch address allocation failed (one by one instead): %s", e)
            return 0
        self._addr_cache.update(got)
        return len(got)

    def _forget(self, cid: str) -> None:
        for ck in [k for k in self._addr_cache if k[0] == cid]:
            del self._addr_cache[ck]

    def _owned_ports_of(self, cid: str) -> list[Any]:
        # Looked up by name (the interfaces of the last reconcile), not by listing every
        # owned port: a listing converts every OVSDB row, and one per container made each
        # resync O(N^2) — 26% of a core idle with 200 containers attached, 70% of a resync
        # in list_owned_ports (bench/attach.py, docs/performance.md). Ports of interfaces
        # this process never attached (e.g. removed from the spec while the daemon was
        # down) are left to the sweep, which lists once per pass.
        last = self.attached.get(cid)
        out = []
        for ifname in sorted(last.addresses) if last else []:
            p = self.ovs.get_port(netlink.host_veth_name(cid, ifname))
            if p is not None and p.external_ids.get("reconciler-container") == cid \
                    and p.external_ids.get("reconciler-node") == self.node:
                out.append(p)
        return out

    def _detach_unwanted(self, cid: str, keep: set[str], res: AttachResult) -> None:
        for p in self._owned_ports_of(cid):
            ifname = p.external_ids.get("reconciler-interface", "")
            if ifname not in keep:
                self._detach(cid, ifname, p.name, res)

    def _detach_all(self, cid: str, res: AttachResult) -> None:
        for p in self._owned_ports_of(cid):
            self._detach(cid, p.external_ids.get("reconciler-interface", ""), p.name, res)
        # Linux-bridge attachments have no OVS row: the known interfaces of the last spec.
        last = self.attached.get(cid)
        for ifname in list(last.addresses) if last else []:
            if self.nl.link_exists(netlink.host_veth_name(cid, ifname)):
                self._detach(cid, ifname, None, res)

    def _detach(self, cid: str, ifname: str, port: str | None, res: AttachResult) -> None:
        if self.dry_run:
            self.planned.append(f"{cid[:12]} {ifname}: detach")
            return
        if ifname and self.nl.detach(cid, ifname):
            res.changes.append(f"{ifname} detached")
        if port is not None:
            # The port row goes with the next batch (the veth it names is gone already).
            with self._lock:
                self._pending_ports.pop(port, None)
                self._pending_deletes.add(port)
            if self.on_ports_pending is not None:
                self.on_ports_pending()
            else:
                self.flush_ports()

    # ------------------------------------------------------------------ sweep

    def sweep(self, running: Iterable[ContainerInfo]) -> list[str]:
        """Remove what the daemon owns on this node but no longer has a reason to exist."""
        state = self.state
        wanted_veths: set[str] = set()
        wanted_ports: set[str] = set()
        running = list(running)
        for info in running:
            for itf in self.wanted(info):
                v = netlink.host_veth_name(info.id, itf.name)
                wanted_veths.add(v)
                wanted_ports.add(v)
        gw_ports = {gateway_port_name(n.name) for n in state.networks.values()
                    if n.gateway is not None and n.driver == "ovs"}
        done: list[str] = []
        orphans = [p.name for p in self.ovs.list_owned_ports(node=self.node)
                   if p.name not in wanted_ports and p.name not in gw_ports]
        done += [f"port {name}" for name in orphans]
        if orphans and not self.dry_run:
            with self.ovs.transaction():  # one commit for all of them
                for name in orphans:
                    self.ovs.delete_port(name)
        for v in self.nl.list_owned_host_veths(node=self.node):
            if v not in wanted_veths:
                done.append(f"veth {v}")
                if not self.dry_run:
                    self.nl.delete_host_veth(v)
        done += self._sweep_bridges(state)
        if not self.dry_run:
            for a in self.ipam.reclaim_dead_nodes(self.reclaim_grace):
                done.append(f"reclaimed {a.network}/{a.address} of node {a.node}")
            running_ids = {i.id for i in running}
            cache: dict[tuple[str, str, str], IPAddress] = {}
            for a in self.ipam.allocations():
                if a.node != self.node:
                    continue
                if a.container not in running_ids and self.inspect(a.container) is None:
                    self.ipam.release(a)
                    done.append(f"allocation {a.network}/{a.address}")
                else:
                    cache[(a.container, a.network, a.interface)] = a.address
            # Rebuilt from this consistent read: an allocation removed behind our back
            # is noticed within one resync, and ours are known without a read per attach.
            self._addr_cache = cache
            done += self._reassert(running, cache)
        if self.dry_run:
            self.planned += [f"remove orphan {what}" for what in done]
        elif done:
            self._networks_done = {}
        return done
