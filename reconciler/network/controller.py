"""The network controller: makes one container's interfaces equal to its spec.

Owns the pipeline of one container's reconcile — resolve its addresses (address book),
observe (netlink, the drivers), plan (network.plan, pure), apply (network.execute) or,
in a dry run, report the plan — and the last result per container. Level-based: every
reconcile reads the container, the spec and the actual interfaces, so a missed event is
repaired by the next one or by the periodic resync. The parts it composes each own
their state: drivers (segments, ports), the port batcher, the address book, the dirty
tracker, the segment memory, the sweeper.

Ownership: every OVS port the daemon creates carries external_ids (owner, node,
container, container interface, network); host veths are named `rv<hash>` with an
ifalias naming the node; OVS bridges carry external_ids (owner, node, network), Linux
bridges the ifalias `reconciler:<net>@<node>`; gateway ports are `rg<hash>`. Nothing
without those marks is ever touched.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from reconciler.adapters import netlink
from reconciler.adapters.docker_engine import ContainerInfo
from reconciler.errors import AddressConflict, ContainerError, NetlinkError, ReconcilerError
from reconciler.ipam import DEFAULT_RECLAIM_GRACE, Allocation
from reconciler.kvlayout import Layout
from reconciler.model import ContainerSpec, DesiredState, InterfaceSpec, IPAddress, Network
from reconciler.network import execute, plan
from reconciler.network.addresses import AddressBook
from reconciler.network.drift import DirtyTracker
from reconciler.network.drivers.base import PortOwner, overlay_mac
from reconciler.network.execute import AttachResult, Executor
from reconciler.network.peers import PeerProgrammer
from reconciler.network.portbatch import Committed, PendingPort, PortBatcher
from reconciler.network.segments import Segments
from reconciler.network.sweep import Sweeper

log = logging.getLogger(__name__)

NAME_LABEL = "reconciler.name"


def spec_for(state: DesiredState, name: str, labels: Mapping[str, str]) -> ContainerSpec | None:
    """The entry for a container: by its name, else by its `reconciler.name` label."""
    spec = state.containers.get(name)
    if spec is None and labels.get(NAME_LABEL):
        spec = state.containers.get(labels[NAME_LABEL])
    return spec


def spec_key_for(layout: Layout, name: str, labels: Mapping[str, str], state: DesiredState,
                 ) -> str | None:
    """The KV key whose entry (valid or not) applies to a container."""
    for n in (name, labels.get(NAME_LABEL, "")):
        key = layout.container(n) if n else ""
        if n and (n in state.containers or key in state.invalid_keys):
            return key
    return None


def _open_netns(pid: int, start_time: int | None, container: str) -> netlink.ContainerNetns:
    """The container's namespace, checked to be its process's: by the start time read
    when Docker was asked (a pid with its start time names one process), or where that
    is unknown, by the container's id in the process's cgroup (one more file to read)."""
    if start_time is not None:
        return netlink.ContainerNetns.open(pid, expected_start_time=start_time)
    return netlink.ContainerNetns.open(pid, container_id=container)


class NetworkController:
    """Applies networking for containers on this node."""

    def __init__(self, *, node: str, nl: netlink.NetlinkAdapter, segments: Segments,
                 addresses: AddressBook, batcher: PortBatcher,
                 inspect: Callable[[str], ContainerInfo | None], dry_run: bool = False,
                 reclaim_grace: float = DEFAULT_RECLAIM_GRACE,
                 netns_watcher: netlink.NetnsWatcher | None = None,
                 tunnels: Any = None) -> None:
        self.node = node
        self.dry_run = dry_run
        self.netns_watcher = netns_watcher
        self._nl = nl
        self._segments = segments
        self._addresses = addresses
        self._batcher = batcher
        self._inspect = inspect
        self._dirty = DirtyTracker()
        self._executor = Executor(node=node, nl=nl, segments=segments, batcher=batcher)
        self._sweeper = Sweeper(node=node, nl=nl, segments=segments, addresses=addresses,
                                inspect=inspect, reclaim_grace=reclaim_grace,
                                tunnels=tunnels)
        self._peers = PeerProgrammer(tunnels, node) if tunnels is not None else None
        self._lock = threading.Lock()  # guards state, _reserved, _results, planned
        self._state = DesiredState()
        self._reserved: tuple[IPAddress, ...] = ()
        self._results: dict[str, AttachResult] = {}  # container id -> last result
        self.planned: list[str] = []  # dry run: what would change

    # ------------------------------------------------------------------ inputs

    def set_state(self, state: DesiredState) -> None:
        with self._lock:
            if state.networks != self._state.networks:
                self._segments.forget()
            self._state = state
            # Static addresses are never handed out from a pool.
            self._reserved = tuple(i.address.ip for s in state.containers.values()
                                   for i in s.interfaces if i.address is not None)

    def set_ipam_view(self, view: Mapping[str, Any], covered: Collection[str] | None = None
                      ) -> None:
        self._addresses.set_view(view, covered)

    def wanted(self, info: ContainerInfo) -> list[InterfaceSpec]:
        spec = spec_for(self._state, info.name, info.labels)
        return list(spec.interfaces) if spec is not None else []

    def mark_dirty(self, cid: str) -> None:
        self._dirty.mark_dirty(cid)

    def mark_all_dirty(self) -> None:
        """The deep pass: look inside every container, and at every segment, again."""
        self._dirty.mark_all_dirty()
        self._segments.forget()

    def dirty_ids(self) -> list[str]:
        return self._dirty.dirty_ids()

    # ------------------------------------------------------------------ results

    def result(self, cid: str) -> AttachResult | None:
        with self._lock:
            return self._results.get(cid)

    def results(self) -> dict[str, AttachResult]:
        with self._lock:
            return dict(self._results)

    def veth_owner(self, name: str) -> str | None:
        """The container whose host veth is `name`, among the attached ones."""
        for cid, res in self.results().items():
            if any(netlink.host_veth_name(cid, i) == name for i in res.interfaces):
                return cid
        return None

    def _store(self, cid: str, res: AttachResult | None) -> None:
        with self._lock:
            if res is None:
                self._results.pop(cid, None)
            else:
                self._results[cid] = res

    # ------------------------------------------------------------------ reconcile

    def _fingerprint(self, info: ContainerInfo, wanted: list[InterfaceSpec],
                     state: DesiredState) -> tuple[Any, ...]:
        return (info.pid, info.start_time, tuple(wanted),
                tuple(state.networks.get(w.network) for w in wanted))

    def is_clean(self, info: ContainerInfo) -> bool:
        """Whether a reconcile of this running container would find nothing to do: it was
        reconciled with this process, spec and networks, and no event marked it since."""
        with self._lock:
            state = self._state
        if self.dry_run or self.netns_watcher is None or not info.running or not info.pid \
                or self.result(info.id) is None:
            return False  # without a watch, a change inside the container goes unseen
        return self._dirty.is_clean(info.id, self._fingerprint(info, self.wanted(info), state))

    def reconcile_container(self, cid: str, info: ContainerInfo | None) -> AttachResult:
        """Level-based: make container `cid`'s interfaces equal to its spec (or none).
        `info`: the container as just inspected or cached by the caller (None: gone)."""
        with self._lock:
            state = self._state
        if info is None or not info.running or not info.pid:
            return self._stopped(cid, info)
        wanted = self.wanted(info)
        last = self.result(cid)
        fp = self._fingerprint(info, wanted, state)
        if not self.dry_run and self.netns_watcher is not None and last is not None \
                and self._dirty.is_clean(cid, fp):
            return AttachResult(addresses=dict(last.addresses),
                                interfaces=set(last.interfaces))  # nothing to do
        self._dirty.begin(cid)
        res = AttachResult()
        try:
            ns = _open_netns(info.pid, info.start_time, info.id)
        except NetlinkError as e:
            res.errors.append(f"{info.name}: {e}")
            self._store(cid, res)
            raise ContainerError("; ".join(res.errors)) from e
        try:
            self._watch(info, ns)
            self._reconcile_in(ns, info, wanted, state, last, res)
            if self.netns_watcher is not None and not self.dry_run:
                # From now on the kernel's own reports of these links (MTU, MAC, up/down
                # changed by anyone) are compared with this.
                self.netns_watcher.expect(info.id, {
                    w.link.ifname: netlink.LinkExpect(mtu=w.link.mtu, mac=w.link.mac)
                    for w in res.wanted})
        finally:
            ns.close()
        self._store(cid, res)
        if res.errors:
            raise ContainerError("; ".join(res.errors))
        if not self.dry_run and not self._addresses.unclaimed(cid):
            self._dirty.record_clean(cid, fp)
        return res

    def claim_pending(self, cid: str) -> bool:
        """A static address of `cid` is in use but not yet claimed in Consul (it was
        unreachable): reconcile it again soon."""
        return self._addresses.unclaimed(cid)

    def _watch(self, info: ContainerInfo, ns: netlink.ContainerNetns) -> None:
        if self.netns_watcher is None or self.dry_run:
            return
        try:
            self.netns_watcher.add(info.id, ns)  # kept across reconciles; replaced on restart
        except NetlinkError as e:  # drift then waits for the deep resync
            log.warning("%s: cannot watch its namespace: %s", info.name, e)

    def _reconcile_in(self, ns: netlink.ContainerNetns, info: ContainerInfo,
                      wanted: list[InterfaceSpec], state: DesiredState,
                      last: AttachResult | None, res: AttachResult) -> None:
        plans: list[plan.Wanted] = []
        blocked: list[plan.Blocked] = []
        for itf in wanted:
            net = state.networks[itf.network]
            try:
                w = self._resolve(info, itf, net, res)
            except AddressConflict as e:
                res.errors.append(f"{info.name} {itf.name}: {e}")
                continue
            except ReconcilerError as e:  # an IPAM error: this interface waits as it is
                res.errors.append(f"{info.name} {itf.name}: {e}")
                if last is not None and itf.name in last.interfaces:
                    res.interfaces.add(itf.name)  # still ours: detached if unwanted later
                continue
            if isinstance(w, plan.Blocked):
                blocked.append(w)
            else:
                plans.append(w)
        # An interface this process never attached is planned as new without reading it
        # first: its two reads (one in each namespace), at 500 containers, were ~15 % of
        # an attach's kernel time, most of it waiting for the rtnl lock (bench/attach.py).
        # If an end exists after all (the daemon restarted, someone raced us), nothing is
        # done to it and the container is planned again, observed. A dry run reads all.
        known = set(last.interfaces) if last else set()
        keep = {itf.name for itf in wanted}
        try:
            self._plan_and_apply(ns, info, plans, blocked, keep, last, res,
                                 observe=None if self.dry_run else known)
        except execute.EndExists:
            self._plan_and_apply(ns, info, plans, blocked, keep, last, res, observe=None)

    def _plan_and_apply(self, ns: netlink.ContainerNetns, info: ContainerInfo,
                        plans: list[plan.Wanted], blocked: list[plan.Blocked],
                        keep: set[str], last: AttachResult | None, res: AttachResult,
                        observe: Collection[str] | None) -> None:
        """Observe (the interfaces in `observe`; None: all), plan and apply (or, in a dry
        run, report) one container's interfaces; `keep`: every interface of the spec."""
        observed = {w.link.ifname: self._observe(ns, info, w) for w in plans
                    if observe is None or w.link.ifname in observe}
        segments = {w.network.name: self._segments.missing(w.network, fresh=self.dry_run)
                    for w in plans}
        # Ours and no longer in the spec. A dry run has no previous result: it reads the
        # owner records of the host veths (one listing; the daemon never needs it).
        ours = set(last.interfaces) if last else set()
        if self.dry_run:
            ours |= self._nl.host_veth_interfaces(self.node, info.id)
        unwanted = [(i, netlink.host_veth_name(info.id, i)) for i in sorted(ours - keep)]
        actions: list[plan.Action] = [*blocked, *plan.plan_container(plans, observed, segments,
                                                                     unwanted)]
        if self.dry_run:
            self._report(info.name, actions)
            return
        if unwanted and self.netns_watcher is not None:
            # Their removal, reported inside the namespace, is ours: no drift to look at.
            self.netns_watcher.forget_links(info.id, [i for i, _ in unwanted])
        res.wanted = plans
        self._executor.apply(ns, info.id, info.name, plans, actions, res)

    def _report(self, name: str, actions: Sequence[plan.Action]) -> None:
        with self._lock:
            for a in actions:
                line = a.describe()
                self.planned.append(line if isinstance(a, plan.EnsureSegment)
                                    else f"{name} {line}")

    def _resolve(self, info: ContainerInfo, itf: InterfaceSpec, net: Network,
                 res: AttachResult) -> plan.Wanted | plan.Blocked:
        """The interface's address: claimed (static) or allocated (auto); in a dry run
        only read. A static address held by another container blocks it."""
        allocate = False
        if itf.address is not None:
            addr: netlink.IpInterface | None = itf.address
            if self.dry_run:
                holder = self._addresses.holder(net, itf.address.ip, info.id)
            else:
                holder = self._addresses.claim(net, itf.address.ip, info.id, itf.name,
                                               self._spec_name(info))
            if holder is not None:
                why = (f"static address {itf.address.ip} on network {net.name!r} is held by "
                       f"container {holder.container[:12]} ({holder.interface}) on node "
                       f"{holder.node}")
                if self.dry_run:
                    return plan.Blocked(itf.name, "conflict: " + why)
                # The loser must not keep (or get) the address.
                self._executor.detach(info.id, itf.name,
                                      netlink.host_veth_name(info.id, itf.name), res)
                raise AddressConflict(why)
        elif self.dry_run:
            ip = self._addresses.find(net, info.id, itf.name)
            allocate = ip is None
            addr = None if ip is None else ipaddress.ip_interface(
                f"{ip}/{net.subnet.prefixlen}")
        else:
            with self._lock:
                reserved = self._reserved
            ip = self._addresses.allocate(net, info.id, itf.name, reserved,
                                          self._spec_name(info))
            addr = ipaddress.ip_interface(f"{ip}/{net.subnet.prefixlen}")
        driver = self._segments.driver(net)
        mac = itf.mac
        if net.overlay is not None and addr is not None:
            mac = overlay_mac(addr.ip)  # every host derives it from the allocation
        link = netlink.InterfaceSpec(
            container_id=info.id, ifname=itf.name, addresses=() if addr is None else (addr,),
            mac=mac, mtu=itf.mtu or driver.mtu(net), gateway=itf.gateway,
            routes=tuple(netlink.Route(r.dst, r.via) for r in itf.routes),
            owner=netlink.host_veth_alias(self.node, info.id, itf.name),
            tx_checksum=driver.tx_checksum(net),
            # Announced by the executor once the host end is on its switch: before that
            # nobody hears.
            announce=False)
        return plan.Wanted(net, link, driver.port_want(net), allocate=allocate)

    def _spec_name(self, info: ContainerInfo) -> str:
        """The name of the entry `info` matches, recorded in its allocations (every host
        then knows a remote container's group: the group policy, issue 12)."""
        with self._lock:
            spec = spec_for(self._state, info.name, info.labels)
        return spec.name if spec is not None else ""

    def _observe(self, ns: netlink.ContainerNetns, info: ContainerInfo, w: plan.Wanted,
                 ) -> plan.Observed:
        link = self._nl.observe(ns, info.id, w.link.ifname,
                                tx_checksum=w.link.tx_checksum is not None)
        if not link.host_present:
            return plan.Observed(link, plan.PortObs())
        owner = PortOwner(self.node, info.id, w.link.ifname, w.network.name)
        port = self._segments.driver(w.network).observe_port(
            w.network, w.link.host_veth, owner, link.host_ifindex, link.host_master)
        return plan.Observed(link, port)

    def _stopped(self, cid: str, info: ContainerInfo | None) -> AttachResult:
        """A container that stopped or is gone: its interfaces go; a removed one's
        addresses go back to the pool."""
        self._dirty.begin(cid)
        if self.netns_watcher is not None:
            self.netns_watcher.remove(cid)
        res = AttachResult()
        last = self.result(cid)
        ours = set(last.interfaces) if last else set()
        if self.dry_run:
            ours |= self._nl.host_veth_interfaces(self.node, cid)
        for ifname in sorted(ours):
            veth = netlink.host_veth_name(cid, ifname)
            if self.dry_run:
                with self._lock:
                    self.planned.append(f"{cid[:12]} {ifname}: detach ({veth})")
            else:
                self._executor.detach(cid, ifname, veth, res)
        self._addresses.forget(cid)
        if info is None:
            if not self.dry_run:
                n = self._addresses.release_container(cid)
                if n:
                    res.changes.append(f"released {n} address(es)")
            self._store(cid, None)
        else:
            self._store(cid, res)
        return res

    # ------------------------------------------------------------------ batches

    def preallocate(self, containers: Iterable[ContainerInfo]) -> int:
        """Allocate the `auto` addresses of many containers at once, before their
        reconciles run (see AddressBook.allocate_many)."""
        if self.dry_run:
            return 0
        with self._lock:
            state, reserved = self._state, self._reserved
        wants: list[tuple[Network, str, str]] = []
        specs: dict[str, str] = {}
        for info in containers:
            if not info.running:
                continue
            spec = spec_for(state, info.name, info.labels)
            if spec is None:
                continue
            for itf in spec.interfaces:
                net = state.networks.get(itf.network)
                if itf.address is None and net is not None and net.pool is not None:
                    wants.append((net, info.id, itf.name))
                    specs[info.id] = spec.name
        return self._addresses.allocate_many(wants, reserved, specs)

    def flush_ports(self) -> Committed:
        return self._batcher.flush()

    def program_peers(self, allocations: list[Allocation], hosts: Mapping[str, str],
                      ) -> list[str]:
        """Program the remote endpoints of this host's overlay tunnels."""
        if self._peers is None:
            return []
        with self._lock:
            nets = list(self._state.networks.values())
        changes = self._peers.reconcile(nets, allocations, hosts, dry_run=self.dry_run)
        if self.dry_run:
            with self._lock:
                self.planned += [f"overlay {c}" for c in changes]
        return changes

    def allocation_counts(self) -> Mapping[str, int]:
        """Network -> addresses this node holds in it (as allocated or last swept)."""
        return self._addresses.counts()

    def peer_counts(self) -> Mapping[str, int]:
        """Overlay network -> remote endpoints its tunnel here knows (as last programmed)."""
        return self._peers.counts if self._peers is not None else {}

    def host_address(self, net: Network) -> netlink.IpInterface:
        """This host's own address on an overlay network (the overlay driver asks)."""
        with self._lock:
            reserved = self._reserved
        ip = self._addresses.host_address(net, reserved)
        return ipaddress.ip_interface(f"{ip}/{net.subnet.prefixlen}")

    def release_host_address(self, net: Network) -> None:
        self._addresses.release_host_address(net)

    def queued_containers(self) -> list[str]:
        return self._batcher.queued_containers()

    def announce_committed(self, ports: Sequence[PendingPort]) -> None:
        """Neighbours (the host's gateway too) learn a MAC only once the port is on the
        switch: announce now. The container may be gone meanwhile."""
        for p in ports:
            try:
                with _open_netns(p.pid, p.start_time, p.container) as ns:
                    self._nl.announce(ns, p.ifname, addresses=p.addresses or None)
            except NetlinkError as e:
                log.debug("announce %s %s: %s", p.container[:12], p.ifname, e)

    def sweep(self, running: Iterable[ContainerInfo], full: bool = True) -> list[str]:
        """Remove what this node's daemon owns and has no reason to exist any more
        (`full`: also look at every network's allocations, see `AddressBook.sweep`)."""
        with self._lock:
            state = self._state
        reconciled = {cid: dict(r.addresses) for cid, r in self.results().items()}
        out = self._sweeper.sweep(state, running, self.wanted, reconciled,
                                  dry_run=self.dry_run, full=full)
        for cid in out.readdress:
            self._dirty.mark_dirty(cid)
        if self.dry_run:
            with self._lock:
                self.planned += [f"remove orphan {what}" for what in out.done]
        return out.done
