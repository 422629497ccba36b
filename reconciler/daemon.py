"""The daemon (`reconciler run`): watchers feed work keys to one work queue; controllers
apply.

Owns the wiring and nothing else:
- the Consul watches (issue 9: what a host needs, not the whole prefix): the desired
  state, one blocking query per user area (runtime.kvwatch) -> new DesiredState ->
  ProxyKey first, then every local ContainerKey, MembersKey and SweepKey (reconciles are
  level-based and cheap when nothing differs; a change of services only enqueues the
  proxy and members); the host registry `hosts/` and the allocations of the networks
  this host has (runtime.areawatch.IndexedArea over `index/ipam/`) -> PeersKey; other
  hosts' status documents, audit records and the allocations of networks this host
  does not have are watched by nobody;
- Docker events (subscribed before the list, adapters.docker_engine.EventWatcher) ->
  ContainerKey (and MembersKey when one stops);
- netlink deletions of our host veths, OVS deletions of our ports, and netlink changes
  made by others inside a container's namespace -> that container, marked dirty (drift
  repaired at once, not only at the next resync);
- the work queue (runtime.workqueue): de-duplicated keys, one key never twice at once,
  per-key exponential backoff, terminal errors reported not retried, periodic resync
  (which skips containers that are clean; every DEEP_EVERY-th looks inside all);
- node status under a Consul session (status.StatusPublisher), members published under
  the same session (members.MemberSync);
- what it tells the outside (reconciler.observe): every reconcile's outcome and duration
  to the `Metrics` given at assembly and to the readiness trackers, the state series
  read at scrape time (`sample`), the facts /livez and /readyz check (`loops`,
  `consul_watch_ok`, ...), and the log context (work key, container) of each reconcile.

Work keys are typed (reconciler.workkeys); `_handlers` maps each type to its handler,
for `run` and `run --once` alike. A failure is reported under the user's Consul key
that caused it (a container's spec key), else under the work key's name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from reconciler.adapters.docker_engine import (
    ContainerEvent,
    ContainerInfo,
    DockerEngine,
    EventWatcher,
)
from reconciler.adapters.procfs import start_time
from reconciler.errors import ConsulError, DockerError, ReconcilerError
from reconciler.ipam import parse_allocations
from reconciler.kvlayout import Layout, member_bucket, user_digest
from reconciler.members import MemberSync
from reconciler.model import DesiredState
from reconciler.network.controller import NetworkController, spec_for, spec_key_for
from reconciler.observe import logs
from reconciler.observe.health import FailureClock, FirstSync
from reconciler.observe.metrics import Metrics, StateSample
from reconciler.policy.compiled import source_networks
from reconciler.policy.controller import PolicyController, local_ports
from reconciler.runtime import alloc
from reconciler.runtime.areawatch import AreaWatch, IndexedArea
from reconciler.runtime.kvwatch import KVWatcher, Snapshot
from reconciler.runtime.workqueue import Controller, Result
from reconciler.settings import serves
from reconciler.status import NodeStatus, StatusPublisher, build_status, hosts_from
from reconciler.workkeys import (
    MEMBERS,
    PEERS,
    POLICY,
    PORTS,
    PROXY,
    SWEEP,
    ContainerKey,
    MembersKey,
    PeersKey,
    PolicyKey,
    PortsKey,
    ProxyKey,
    SweepKey,
    WorkKey,
)

log = logging.getLogger(__name__)

DEEP_EVERY = 10  # every 10th resync looks inside every container, events or not


def _summarize(items: list[str], show: int = 3) -> str:
    """'12 port, 3 veth (port rv1..., port rv2..., ...)': readable at 200 items too."""
    kinds: dict[str, int] = {}
    for it in items:
        kind = it.split(" ", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    more = ", ..." if len(items) > show else ""
    return f"{counts} ({', '.join(items[:show])}{more})"


def _same_process(info: ContainerInfo) -> bool:
    """The cached container's process still runs (PIDs get reused: compare start time)."""
    return bool(info.pid) and info.start_time is not None \
        and start_time(info.pid) == info.start_time


@dataclass(frozen=True)
class _Deferred(Result):
    """Nothing done yet: look at the key again after `requeue_after` seconds. Unlike a
    reconcile that did its work and asks to look again, it does not count for the first
    full pass (readiness)."""


class ProxyPart(Protocol):
    """What the daemon needs of the HAProxy side (reconciler.proxy.controller)."""

    def set_state(self, state: DesiredState) -> None: ...
    def quiet_delay(self) -> float: ...
    def reconcile(self) -> dict[str, Any]: ...
    def errors(self) -> dict[str, list[str]]: ...
    def status(self) -> dict[str, Any]: ...
    def poll_after(self) -> float | None: ...


@dataclass
class DaemonOptions:
    node: str
    prefix: str
    resync: float = 30.0
    workers: int = 4
    status_interval: float = 5.0
    dry_run: bool = False
    session_file: str | None = None
    advertise: str | None = None  # this host's underlay address (tunnel endpoint)
    serve: tuple[str, ...] = ("*",)  # services this host's HAProxy serves (patterns)
    freeze_heap: bool = False  # a daemon process of its own: `alloc.freeze_heap` at first sync


@dataclass
class _Known:
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    # work key -> user key it is reported under -> messages
    errors: dict[WorkKey, dict[str, list[str]]] = field(default_factory=dict)


class Daemon:
    def __init__(self, opts: DaemonOptions, *, kv: Any, docker: DockerEngine,
                 netctl: NetworkController, proxy: ProxyPart | None = None,
                 metrics: Metrics | None = None, policy: PolicyController | None = None,
                 ) -> None:
        self.opts = opts
        self.metrics = metrics if metrics is not None else Metrics()
        self.failures = FailureClock()  # keys failing, and since when (readiness)
        self.first_sync = FirstSync()
        self._heap_frozen = False
        self.events: EventWatcher | None = None  # the Docker event watcher, once running
        self._threads: list[threading.Thread] = []  # the main loops, once running
        self.kv = kv
        self.docker = docker
        self.netctl = netctl
        self.proxy = proxy
        self.policy = policy  # the group policy (None: not enforced by this daemon)
        self.layout = Layout(opts.prefix)
        self.known = _Known()
        self._lock = threading.Lock()
        self.snapshot: Snapshot | None = None
        self.watcher = KVWatcher(kv, opts.prefix, self._on_snapshot,
                                 areas=self.layout.desired_areas())
        self.hosts = AreaWatch(kv, self.layout.hosts_prefix())
        self.allocations = IndexedArea(kv, self.layout.ipam_prefix(),
                                       self.layout.ipam_index_prefix(),
                                       wanted=self._networks_here)
        # The members nodes publish (`members/`), by service: read per service whose
        # generation moved, and handed to the desired-state watch (issue 9).
        self.published = IndexedArea(kv, self.layout.members_prefix(),
                                     self.layout.members_index_prefix(),
                                     wanted=self._served_services, bucket_of=member_bucket)
        self._refresh_allocations = False
        self._legacy_hosts: dict[str, str] = {}  # see _unregistered_hosts
        self.status = NodeStatus(opts.node, address=opts.advertise)
        self.publisher = StatusPublisher(kv, opts.prefix, opts.node,
                                         session_file=opts.session_file)
        self.members = MemberSync(kv, opts.prefix, opts.node)
        self._status_dirty = threading.Event()
        self._handlers: dict[type, Callable[[Any], Result | None]] = {
            ContainerKey: self._handle_container,
            PortsKey: self._handle_ports,
            SweepKey: self._handle_sweep,
            MembersKey: self._handle_members,
            ProxyKey: self._handle_proxy,
            PeersKey: self._handle_peers,
            PolicyKey: self._handle_policy,
        }
        self.controller: Controller[WorkKey] = Controller(
            self._reconcile, name="reconciler", workers=opts.workers,
            list_keys=self._resync_keys, resync=opts.resync,
            on_error=self._on_error, on_success=self._on_success, observe=self._observed)
        self.metrics.set_state_source(self.sample)
        self.ready = threading.Event()
        self._acted_digest = ""  # of the user keys of the last snapshot acted on
        self._listed = threading.Event()  # Docker's container list was received once
        self._stale: set[str] = set()  # containers with Docker events not inspected yet
        self._resyncs = 0
        self._swept_full = False
        self._once = False  # run_once: keys run in order, one at a time, no waits

    def on_tunnel(self) -> None:
        """An overlay tunnel was (re)built here: program its remote endpoints."""
        self.controller.queue.add(PEERS)

    def on_ports_pending(self) -> None:
        """The network controller queued OVS ports: commit them (with any others queued
        meanwhile) from a worker."""
        self.controller.queue.add(PORTS)

    # ------------------------------------------------------------------ inputs

    def _on_snapshot(self, snap: Snapshot) -> None:
        # Only user keys are desired state. Our own status write lands under the watched
        # prefix (nodes/) and wakes the watch: treating that as a change moved
        # `status.index`, which re-published the status, which woke the watch again — a
        # loop of ~5 status writes/s and a full reconcile of every key each time (15% of
        # a core with no container at all; found by bench/attach.py and
        # tests/integration/test_daemon_network.py). Daemon-owned areas are not even
        # watched here (issue 9).
        digest = snap.digest if snap.desired_digest else user_digest(self.opts.prefix,
                                                                     snap.items)
        if self.snapshot is not None and digest == self._acted_digest:
            self.snapshot = snap
            return
        self._acted_digest = digest
        previous = self.snapshot if self.snapshot is not None else None
        self.snapshot = snap
        if previous is not None and snap.desired_digest \
                and snap.desired_digest == previous.desired_digest:
            # Only the members other nodes publish changed: the proxy's business alone
            # (no member of ours, no container, no status index moved).
            if self.proxy is not None:
                self.proxy.set_state(self._served(snap.state))
                self.controller.queue.add(PROXY)
            return
        self.netctl.set_state(snap.state)
        if self.proxy is not None:
            self.proxy.set_state(self._served(snap.state))
        self.status.index = snap.index
        for p in snap.state.problems:
            log.warning("invalid: %s", p)
        self._status_dirty.set()
        keys = self._all_keys()
        if previous is not None and previous.state.networks == snap.state.networks \
                and previous.state.containers == snap.state.containers:
            # Only services changed: no container's interfaces can differ, so neither
            # reconcile every container of the host nor sweep (a flip of `active` waited
            # behind them, and competed with them for the GIL; found by bench/proxy.py).
            # The periodic resync still looks at every one.
            keys = [k for k in keys if not isinstance(k, SweepKey | ContainerKey | PeersKey)]
        else:
            self._preallocate()
        for key in keys:
            self.controller.queue.add(key)

    def _networks_here(self) -> set[str]:
        """The networks whose allocations this host watches: those of its containers, and
        when one of them is in an isolated group, every network with a gateway (the
        group policy classifies routed sources by their allocations: issue 12)."""
        running = self._running()
        nets = {itf.network for info in running for itf in self.netctl.wanted(info)}
        snap = self.snapshot
        if self.policy is not None and snap is not None and snap.state.policy.isolate:
            groups = {s.group for c in running
                      if (s := spec_for(snap.state, c.name, c.labels)) and s.group}
            nets |= source_networks(snap.state, groups)
        return nets

    def _set_ipam_view(self) -> None:
        self.netctl.set_ipam_view(self.allocations.entries(),
                                  covered=set(self.allocations.pieces()))

    def _on_allocations(self, networks: set[str]) -> None:
        """Allocations of networks this host has changed (somewhere in the cluster)."""
        self._set_ipam_view()
        self.controller.queue.add(PEERS)
        if self.policy is not None:
            self.controller.queue.add(POLICY)  # sources are classified by allocation

    def _served_services(self) -> set[str] | None:
        """The services whose published members this host reads: those its HAProxy
        serves (`--serve`; None: every one)."""
        if self.opts.serve == ("*",):
            return None
        snap = self.snapshot
        names = snap.state.services if snap is not None else {}
        return {s for s in names if serves(self.opts.serve, s)}

    def _served(self, state: DesiredState) -> DesiredState:
        """The state as this host's HAProxy sees it: only the services it serves."""
        if self.opts.serve == ("*",):
            return state
        return replace(state, services={k: v for k, v in state.services.items()
                                        if serves(self.opts.serve, k)})

    def _on_published(self, services: set[str]) -> None:
        """Members published by nodes (this one too) changed in these services."""
        self.watcher.set_published(self.published.pieces(), services)

    def _on_hosts(self, _: Any) -> None:
        """A host joined, left or moved: its tunnel endpoints follow."""
        self.controller.queue.add(PEERS)

    def _running(self) -> list[ContainerInfo]:
        with self._lock:
            return list(self.known.containers.values())

    def _preallocate(self) -> None:
        """Many containers may need addresses at once (a spec put for 200 replicas):
        allocate them in a few transactions before their keys are reconciled."""
        n = self.netctl.preallocate(self._running())
        if n:
            log.debug("allocated %d address(es) in a batch", n)

    def _on_docker_list(self, containers: list[ContainerInfo]) -> None:
        self.metrics.docker_connected()
        with self._lock:
            self.known.containers = {c.id: c for c in containers if c.running}
        if self._listed.is_set():
            # Docker's stream came back (dockerd restarted?): look inside every container
            # again, not only at those whose process changed.
            self.netctl.mark_all_dirty()
        self._listed.set()
        if self.snapshot is not None:
            self._preallocate()
        if self.snapshot is not None and self.first_sync.remaining() is None:
            # The first full pass (readiness): every key, expected before it is enqueued.
            first = [*self._all_keys(), *(ContainerKey(c.id) for c in containers)]
            self.first_sync.expect(first)
            for key in first:
                self.controller.queue.add(key)
        for c in containers:
            self.controller.queue.add(ContainerKey(c.id))
        self.controller.queue.add(SWEEP)
        self.controller.queue.add(MEMBERS)

    def _on_docker_event(self, ev: ContainerEvent) -> None:
        self._stale.add(ev.id)  # what Docker says about it may have changed: inspect again
        self.netctl.mark_dirty(ev.id)
        self.controller.queue.add(ContainerKey(ev.id))
        if ev.action in ("destroy", "die", "stop", "kill"):
            self.controller.queue.add(MEMBERS)

    def _on_link_deleted(self, cid: str | None) -> None:
        if cid:
            self.netctl.mark_dirty(cid)
            self.controller.queue.add(ContainerKey(cid))
        else:
            self.netctl.mark_all_dirty()
            for key in self._container_keys():
                self.controller.queue.add(key)

    def on_netns_event(self, cid: str) -> None:
        """Something changed inside a container's netns (link, address, route)."""
        self.netctl.mark_dirty(cid)
        self.controller.queue.add(ContainerKey(cid))

    def on_link_event(self, ev: Any) -> None:
        """netlink: a deleted host veth of ours (or lost events) -> repair now."""
        if ev.kind == "overflow":
            self._on_link_deleted(None)
        elif ev.kind == "del" and ev.ifname.startswith("rv"):
            cid = self.netctl.veth_owner(ev.ifname)
            if cid:
                self._on_link_deleted(cid)

    def on_port_event(self, ev: Any) -> None:
        """OVSDB: a port of ours was deleted (by someone else, or by us) -> look again.
        (Changed tags/ids are repaired by the resync; reacting to our own updates would
        only echo.)"""
        if ev.kind == "delete" and ev.owned and ev.table == "Port":
            cid = ev.external_ids.get("reconciler-container")
            if cid:
                self.netctl.mark_dirty(cid)
                self.controller.queue.add(ContainerKey(cid))

    # ------------------------------------------------------------------ keys

    def _container_keys(self) -> list[WorkKey]:
        with self._lock:
            return [ContainerKey(cid) for cid in self.known.containers]

    def _resync_keys(self) -> list[WorkKey]:
        """The controller's periodic resync: every key; every DEEP_EVERY-th time, also look
        inside every container (the safety net under the event-driven repairs).

        In between, a container whose reconcile would find nothing to do (the same
        process, clean since its last reconcile) is checked here rather than queued:
        500 no-op reconciles through the queue and the workers cost ~0.13 s of CPU per
        resync, most of the idle CPU with 500 attached (bench/attach.py)."""
        if self.snapshot is None:
            return []
        self._resyncs += 1
        self._refresh_allocations = True  # an index bump may have been lost
        keys = self._all_keys()
        if self._resyncs % DEEP_EVERY == 0:
            self.netctl.mark_all_dirty()
            return keys
        return [k for k in keys if not isinstance(k, ContainerKey) or self._looks_changed(k)]

    def _looks_changed(self, key: ContainerKey) -> bool:
        """Whether a light resync queues this container: unknown, told stale by Docker,
        another process, or not clean (an event, an error, a changed spec)."""
        with self._lock:
            info = self.known.containers.get(key.cid)
        return info is None or key.cid in self._stale or not _same_process(info) \
            or not self.netctl.is_clean(info) or self.netctl.claim_pending(key.cid)

    def _all_keys(self) -> list[WorkKey]:
        if self.snapshot is None:
            return []  # nothing is known to be desired yet: touch nothing
        # The proxy first: the queue is FIFO, and behind one key per running container a
        # KV flip of `active` waited for all of them (~1 s with 200 containers on the
        # host; found by bench/proxy.py).
        keys: list[WorkKey] = [PROXY] if self.proxy is not None else []
        keys += [*self._container_keys(), SWEEP, PEERS]
        if not self.opts.dry_run:
            keys.append(MEMBERS)
        if self.policy is not None:
            keys.append(POLICY)
        return keys

    # ------------------------------------------------------------------ handlers

    def _reconcile(self, key: WorkKey) -> Result | None:
        if self.snapshot is None:
            return _Deferred(requeue_after=1.0)
        # Every line logged during this reconcile says which key it is about.
        token = logs.set_context(key=str(key))
        try:
            result = self._handlers[type(key)](key)
        finally:
            logs.reset_context(token)
        if not isinstance(result, _Deferred):
            self.first_sync.reconciled(key)
            if self.first_sync.done and self.opts.freeze_heap and not self._heap_frozen:
                self._heap_frozen = True
                alloc.freeze_heap()  # the long-lived state is built
        self._status_dirty.set()
        return result

    def _observed(self, key: WorkKey, outcome: str, seconds: float) -> None:
        """The controller's report of each reconcile: metrics and readiness."""
        self.metrics.reconciled(key.kind, outcome, seconds)
        if outcome == "error":
            self.failures.failed(key)
        else:
            self.failures.succeeded(key)
        if outcome in ("error", "invalid"):  # tried: it counts for the first pass
            self.first_sync.reconciled(key)

    def _handle_container(self, key: ContainerKey) -> Result | None:
        cid = key.cid
        with self._lock:
            cached = self.known.containers.get(cid)
        # Docker is asked again only when one of its events concerns the container, or
        # its process is not the one we know: a change in desired state, a netns or OVS
        # event, or a resync only needs to look at the interfaces.
        stale = cid in self._stale
        self._stale.discard(cid)
        if cached is not None and not stale and _same_process(cached):
            info: ContainerInfo | None = cached
        else:
            info = self.docker.inspect(cid)
        self._reconcile_container(cid, info)
        if self.netctl.claim_pending(cid) and not self._once:
            # Attached from the cached state while Consul was away: claim it when Consul
            # answers (tried every second; a backoff would delay convergence).
            return Result(requeue_after=1.0)
        return None

    def _reconcile_container(self, cid: str, info: ContainerInfo | None) -> None:
        logs.bind(container=info.name if info is not None else cid[:12])
        with self._lock:
            if info is not None and info.running:
                self.known.containers[cid] = info
            else:
                self.known.containers.pop(cid, None)
        before = self.netctl.result(cid)
        try:
            res = self.netctl.reconcile_container(cid, info)
        finally:
            # What is published follows what is attached, failures included: an
            # interface that could not be made withdraws its member.
            after = self.netctl.result(cid)
            if (before.addresses if before else {}) != (after.addresses if after else {}):
                self.controller.queue.add(MEMBERS)
                if self.policy is not None:
                    self.controller.queue.add(POLICY)  # its ports' rules follow
            was = set(before.addresses) if before else set()
            now = set(after.addresses) if after else set()
            self.metrics.interfaces_changed(len(now - was), len(was - now))
        if res.changes:
            log.info("container %s: %s", info.name if info else cid[:12],
                     ", ".join(res.changes))
        if res.changes or info is None or not info.running:
            self.controller.queue.add(MEMBERS)
        if info is None and not self._once:
            # Gone: what only its presence kept (an overlay's tunnel on this host, when it
            # was the network's last container here) goes with the next quiet sweep (the
            # queue folds a burst of removals into one).
            self.controller.queue.add(SWEEP)

    def _handle_ports(self, key: PortsKey) -> None:
        self.netctl.flush_ports()

    def _handle_sweep(self, key: SweepKey) -> Result | None:
        if not self._listed.is_set():
            # Before Docker's first list, "running" is empty and the sweep would tear
            # down every attachment of the node (a restart cut every container off
            # until re-attached; found by test_orphans_swept_after_crash). The list
            # enqueues the sweep again when it arrives.
            return None
        q = self.controller.queue
        if not self._once and any(isinstance(k, ContainerKey)
                                  for k in q.in_flight() | q.pending()):
            # A container being attached right now may own a fresh veth/port that
            # the sweep's "running" list does not know yet: sweep when it is quiet.
            return _Deferred(requeue_after=1.0)
        self._sweep()
        return None

    def _sweep(self) -> None:
        # Every network's allocations (a read that grows with the cluster) only at the
        # first sweep and at deep resyncs; otherwise this host's networks only.
        full = self._resyncs % DEEP_EVERY == 0 or not self._swept_full
        done = self.netctl.sweep(self._running(), full=full)
        self._swept_full = self._swept_full or full
        for cid in self.netctl.dirty_ids():  # e.g. an address lost while we were away
            self.controller.queue.add(ContainerKey(cid))
        if done:
            log.info("sweep: %s", _summarize(done))
            log.debug("sweep removed: %s", ", ".join(done))

    def _handle_members(self, key: MembersKey) -> None:
        if not self._listed.is_set():
            # Before Docker's first list no container is known and every member this
            # node published would be withdrawn (members flapped on every restart; found
            # by tests/integration/test_daemon_proxy.py). The list enqueues MEMBERS.
            return
        if self.opts.dry_run:
            return
        session = self.publisher.ensure_session()
        changes, problems = self.members.sync(session, self._running(),
                                              self.netctl.results(), self.netctl.wanted)
        if changes:
            log.info("members: %s", ", ".join(changes))
            self.controller.queue.add(PROXY)
            published = sum(1 for c in changes if c.startswith("published"))
            self.metrics.members_changed(published, len(changes) - published)
        with self._lock:
            if problems:
                self.known.errors[MEMBERS] = problems
            else:
                self.known.errors.pop(MEMBERS, None)

    def _handle_peers(self, key: PeersKey) -> None:
        if self.snapshot is None:
            return
        # The networks this host has may have changed (a container came or went): read
        # those newly wanted, drop the others; at a resync, read them all again.
        refresh = self._refresh_allocations
        self._refresh_allocations = False
        if refresh:
            self.allocations.refresh()
        else:
            self.allocations.sync()
        self._set_ipam_view()
        if not self.netctl.peer_counts() and not any(
                n.overlay is not None for n in self.snapshot.state.networks.values()):
            return  # no overlay, nothing programmed: parsing 500 allocations found nothing
        allocations = parse_allocations(self.opts.prefix, self.allocations.entries())
        hosts = hosts_from(self.opts.prefix, self.hosts.entries.values())
        if refresh:
            self._legacy_hosts = self._unregistered_hosts(
                {a.node for a in allocations} - set(hosts) - {self.opts.node})
        changes = self.netctl.program_peers(allocations, {**self._legacy_hosts, **hosts})
        if changes:
            log.info("overlay: %s", _summarize(changes, show=4))

    def _handle_policy(self, key: PolicyKey) -> None:
        snap = self.snapshot
        if self.policy is None or snap is None:
            return
        try:  # a policy change may widen the networks watched (_networks_here)
            if self.allocations.sync():
                self._set_ipam_view()
        except ConsulError as e:
            log.debug("allocations not read for the policy: %s", e)
        allocations = parse_allocations(self.opts.prefix, self.allocations.entries())
        # Remote holders by the entry their allocation records; local ones as matched here.
        specs = {a.container: a.spec for a in allocations if a.spec}
        specs.update({c.id: s.name for c in self._running()
                      if (s := spec_for(snap.state, c.name, c.labels)) is not None})
        changes = self.policy.reconcile(snap.state, allocations,
                                        local_ports(self.netctl.results()), specs)
        if changes:
            log.info("%s", "; ".join(changes))

    def _unregistered_hosts(self, nodes: set[str]) -> dict[str, str]:
        """Addresses of nodes holding allocations here but absent from `hosts/`: daemons
        of an older version, which publish their address only in their status (read
        one by one at a resync; none once every host is upgraded)."""
        found: dict[str, str] = {}
        for node in sorted(nodes):
            try:
                item = self.kv.get(self.layout.node_status(node))
            except ConsulError:
                continue
            if item is not None:
                found.update(hosts_from(self.opts.prefix, [item]))
        return found

    def _handle_proxy(self, key: ProxyKey) -> Result | None:
        if self.proxy is None:
            return None
        delay = 0.0 if self._once else self.proxy.quiet_delay()
        if delay > 0:  # coalesce a burst of changes into one reload
            return _Deferred(requeue_after=delay)
        if self.opts.serve != ("*",):
            # The services served may have changed (a config came or went): read the
            # published members of those newly served (the snapshot this hands on sets
            # the proxy's state at once).
            changed = self.published.sync()
            if changed:
                self.watcher.set_published(self.published.pieces(), changed)
        try:
            self.status.proxy = self.proxy.reconcile()
        finally:
            # A failed reload shows in `reconciler status` too (last_reload).
            self.status.proxy = self.proxy.status()
            if self.opts.serve != ("*",):  # `reconciler cutover` waits only for these
                self.status.proxy = {**self.status.proxy, "serves": list(self.opts.serve)}
        again = None if self._once else self.proxy.poll_after()
        # While a progressive cutover runs, HAProxy's counters are re-read and published
        # this often (the command driving it judges each step by them; issue 13).
        return Result(requeue_after=again) if again is not None else None

    # ------------------------------------------------------------------ errors

    def _error_key(self, key: WorkKey) -> str:
        """The user's Consul key a failure of `key` is about (else the work key)."""
        cid = key.cid if isinstance(key, ContainerKey) else None
        if cid is not None and self.snapshot is not None:
            with self._lock:
                info = self.known.containers.get(cid)
            if info is not None:
                k = spec_key_for(self.layout, info.name, info.labels, self.snapshot.state)
                if k:
                    return k
        return str(key)

    def _on_error(self, key: WorkKey, exc: BaseException, terminal: bool) -> None:
        msg = str(exc) if isinstance(exc, ReconcilerError) else f"{type(exc).__name__}: {exc}"
        by_where: dict[str, list[str]] = {}
        if isinstance(key, PortsKey):
            # A batch holds ports of many containers: each is reported at its own spec.
            for cid in self.netctl.queued_containers() or [""]:
                where = self._error_key(ContainerKey(cid)) if cid else str(key)
                by_where.setdefault(where, []).append(msg)
        else:
            by_where[self._error_key(key)] = [msg]
        for where in by_where:
            log.warning("%s (%s): %s%s", where, key, msg, "" if terminal else " (will retry)")
        with self._lock:
            self.known.errors[key] = by_where
        self._status_dirty.set()

    def _on_success(self, key: WorkKey) -> None:
        if key == MEMBERS:
            # `_handle_members` sets and clears its own entry: the members it could not
            # publish (held by another node's session...) are problems of a successful
            # run, and were dropped here before the status could show them.
            return
        with self._lock:
            if self.known.errors.pop(key, None) is not None:
                self._status_dirty.set()

    # ------------------------------------------------------------------ status

    def build_status(self) -> NodeStatus:
        with self._lock:
            known = [dict(per) for per in self.known.errors.values()]
            running = len(self.known.containers)
        return build_status(
            self.status,
            problems=self.snapshot.state.problems if self.snapshot is not None else (),
            errors=known, results=self.netctl.results().values(), running=running,
            proxy_errors=self.proxy.errors() if self.proxy is not None else {})

    # ------------------------------------------------------------------ observed

    def sample(self) -> StateSample:
        """The state series of the metrics, read at scrape time."""
        q = self.controller.queue
        results = self.netctl.results()
        allocations: dict[str, int] = {}
        pools: dict[str, int] = {}
        invalid = 0
        snap = self.snapshot
        if snap is not None:
            allocations.update(self.netctl.allocation_counts())
            for name, net in snap.state.networks.items():
                allocations.setdefault(name, 0)
                if net.pool is not None:
                    pools[name] = int(net.pool.end) - int(net.pool.start) + 1
            invalid = len(snap.state.invalid_keys)
        return StateSample(
            queue_depth=len(q.pending()), in_flight=len(q.in_flight()),
            attached_interfaces=sum(len(r.addresses) for r in results.values()),
            attached_containers=sum(1 for r in results.values() if r.addresses),
            members_published=self.members.publisher.published, invalid_keys=invalid,
            applied_index=self.status.index,
            ipam_allocations=allocations, ipam_pool_size=pools,
            overlay_peers=dict(self.netctl.peer_counts()),
            policy_denied=self.policy.denied() if self.policy is not None else {},
            consul_reads=self.consul_reads())

    def consul_watch_ok(self) -> bool:
        return self.watcher.healthy.is_set() and self.hosts.healthy.is_set() \
            and self.allocations.healthy.is_set() and self.published.healthy.is_set()

    def consul_reads(self) -> dict[str, int]:
        """Consul reads made by each watch (/metrics; tests, bench/scale.py)."""
        return {"desired": self.watcher.reads, "hosts": self.hosts.reads,
                "allocation_index": self.allocations.index.reads,
                "allocations": self.allocations.piece_reads,
                "members_index": self.published.index.reads,
                "members": self.published.piece_reads}

    def _read_other_areas(self) -> None:
        """First reads of the host registry and the allocation index (each retried by
        its own loop when Consul fails here)."""
        for poll in (self.hosts.poll, self.allocations.index.poll):
            try:
                poll(consistent=True)
            except ConsulError as e:
                log.warning("waiting for Consul: %s", e)
        try:
            changed = self.published.poll(consistent=True)
            self.watcher.set_published(self.published.pieces(), changed, deliver=False)
        except ConsulError as e:
            log.warning("waiting for Consul: %s", e)

    def docker_events_ok(self) -> bool:
        return self.events is not None and self.events.connected

    def first_sync_remaining(self) -> int | None:
        return 0 if self.first_sync.done else self.first_sync.remaining()

    def failing(self, longer_than: float) -> list[tuple[str, float]]:
        return self.failures.failing(longer_than)

    def loops(self) -> dict[str, bool]:
        """The main loops (empty while waiting for Consul's first answer at start)."""
        out = {t.name: t.is_alive() for t in self._threads}
        if self._threads:
            out["workers"] = self.controller.workers_alive() == self.opts.workers
        return out

    def oldest_in_flight(self) -> tuple[str, float] | None:
        oldest = self.controller.oldest_in_flight()
        return None if oldest is None else (str(oldest[0]), oldest[1])

    def _status_loop(self, stop: threading.Event) -> None:
        last_beat = 0.0
        while not stop.is_set():
            self._status_dirty.wait(self.opts.status_interval)
            if stop.is_set():
                break
            self._status_dirty.clear()
            try:
                now = time.monotonic()
                if now - last_beat >= self.opts.status_interval:
                    self.publisher.heartbeat()
                    last_beat = now
                    if self.members.session is not None \
                            and self.publisher.session != self.members.session:
                        # The session expired (Consul was away): members went with it.
                        self.controller.queue.add(MEMBERS)
                if self.snapshot is not None:
                    self.publisher.publish(self.build_status())
            except ReconcilerError as e:
                log.warning("status: %s", e)
            except Exception:
                # This thread renews the node's session: if it died, the node's status
                # and members would expire and its addresses be reclaimed by others.
                log.exception("status: unexpected error (continuing)")
            stop.wait(0.2)  # at most five status writes a second

    # ------------------------------------------------------------------ run

    def initial_read(self, stop: threading.Event) -> bool:
        """Block until the first snapshot is read (retrying while Consul is down)."""
        delay = 0.5
        while not stop.is_set():
            try:
                self._read_other_areas()
                snap = self.watcher.poll(consistent=True)
                if snap is not None:
                    self._on_snapshot(snap)
                return True
            except ConsulError as e:
                log.warning("waiting for Consul: %s", e)
                stop.wait(delay)
                delay = min(delay * 2, 15.0)
        return False

    def run(self, stop: threading.Event, extra: Iterable[Callable[[threading.Event], None]] = ()
            ) -> None:
        if not self.initial_read(stop):
            return
        watcher = EventWatcher(self.docker, self._on_docker_event, self._on_docker_list)
        self.events = watcher
        threads = [
            threading.Thread(target=self.watcher.run, args=(stop,), name="kv-watch",
                             daemon=True),
            threading.Thread(target=self.hosts.run, args=(stop, self._on_hosts),
                             name="kv-hosts", daemon=True),
            threading.Thread(target=self.allocations.run, args=(stop, self._on_allocations),
                             name="kv-allocations", daemon=True),
            threading.Thread(target=self.published.run, args=(stop, self._on_published),
                             name="kv-members", daemon=True),
            threading.Thread(target=watcher.run, args=(stop,), name="docker-watch",
                             daemon=True),
            threading.Thread(target=self._status_loop, args=(stop,), name="status",
                             daemon=True),
        ] + [threading.Thread(target=f, args=(stop,), daemon=True,
                              name=getattr(f, "__name__", "watch")) for f in extra]
        self._threads = threads
        for t in threads:
            t.start()
        self.ready.set()
        try:
            self.controller.run(stop)
        finally:
            stop.set()
            self._status_dirty.set()  # the status loop sleeps on it, not on `stop`
            # The watchers only read. The Consul one may sit in a blocking query for up to
            # its wait time and is not waited for at all (it is a daemon thread); the
            # others wake on `stop` and get a moment. Waiting 1 s for the Consul one and
            # for the status loop's sleep made SIGTERM -> exit take 1.2-2.9 s (issue 10).
            deadline = time.monotonic() + 1.0
            for t in threads:
                if not t.name.startswith("kv-"):
                    t.join(timeout=max(0.0, deadline - time.monotonic()))

    def reconfigure(self, proxy: Any) -> None:
        """SIGHUP: hand the proxy part its new settings (`ProxySettings`) and render
        again. Raises ConfigurationError, changing nothing, if they cannot be used."""
        reconfigure = getattr(self.proxy, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(proxy)
            self.controller.queue.add(PROXY)

    def run_once(self) -> int:
        """Reconcile everything once, in order, through the same handlers as `run`;
        0 when every key applied, 1 otherwise."""
        self._read_other_areas()
        snap = self.watcher.poll(consistent=True)
        if snap is not None:
            self._on_snapshot(snap)
        try:
            running = [c for c in self.docker.list_containers() if c.running]
        except DockerError as e:
            log.error("%s", e)
            return 1
        self._on_docker_list(running)
        self._once = True
        keys: list[WorkKey] = [ContainerKey(c.id) for c in running]
        keys += [PORTS, SWEEP, PEERS]
        if self.policy is not None:
            keys.append(POLICY)
        if not self.opts.dry_run:
            keys.append(MEMBERS)
        if self.proxy is not None:
            keys.append(PROXY)
        failed = 0
        for key in keys:
            try:
                self._reconcile(key)
                self._on_success(key)
            except Exception as e:  # reported per key, like the daemon does
                failed += 1
                self._on_error(key, e, True)
        if not self.opts.dry_run:
            self.publisher.publish(self.build_status(), force=True)
        return 1 if failed else 0
