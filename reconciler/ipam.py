"""Cluster-wide IP address management for `"address": "auto"` interfaces.

Owns the daemon area `<prefix>ipam/<network>/<address>`: one key per allocated address,
created with check-and-set index 0 (create-only), so two hosts racing for one address
can never both get it — Consul accepts exactly one create. The value records who holds
it: `{"node": ..., "container": ..., "interface": ..., "spec": ..., "allocated_at": ...}`
(unix time; `spec`: the name of the `containers/<name>` entry the container matches, so
that every host knows a remote holder's group for the group policy; absent in records of
older daemons and for a host's own addresses).

An allocation is stable for the container's life: a restarted container (same id) finds
its key again and keeps its address. It is released when the container is removed
(`release_container`), and reclaimed from nodes that have been gone longer than a grace
period (`reclaim_dead_nodes`).

Rules worth knowing:
- Every key under `ipam/<network>/` whose last segment parses as an address counts as
  taken, even when its value is unreadable: an address is never handed out twice because
  someone wrote a value we do not understand.
- Addresses outside the current pool, the network's gateway and `reserved` (static
  addresses) are never handed out. An allocation that no longer fits (the pool shrank,
  a static address now claims it) is released and a new address is allocated.
- The holder is (container, interface); a container id is unique across hosts. When the
  daemon's node name changes, `allocate` rewrites the holder's node name (check-and-set)
  and keeps the address.
- A node is alive while `<prefix>nodes/<node>/status` exists (the key is tied to the
  node's Consul session, see `reconciler.status`). `reclaim_dead_nodes` remembers, in
  memory and per `Ipam` instance, when it first saw a node holding allocations without a
  status key, and releases those allocations once the node has been absent longer than
  the grace period. A daemon restart restarts the clock: reclaim is late, never early.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from reconciler.errors import CasConflict, ConsulError, PoolExhausted
from reconciler.kvlayout import Layout
from reconciler.model import AddressPool, IPAddress, Network

log = logging.getLogger(__name__)

DEFAULT_RECLAIM_GRACE = 3600.0
"""Seconds a node must have been gone before `reclaim_dead_nodes` frees its addresses."""


@dataclass(frozen=True)
class Allocation:
    """One `ipam/<network>/<address>` key: who holds the address."""

    network: str
    address: IPAddress
    node: str
    container: str
    interface: str
    modify_index: int = 0
    key: str = ""
    """The exact KV key (empty: derived from network and address)."""
    spec: str = ""
    """The `containers/<name>` entry the holder matched when it was recorded (empty:
    unknown, e.g. a record of an older daemon)."""


class _KVItemLike(Protocol):
    @property
    def value(self) -> bytes: ...
    @property
    def modify_index(self) -> int: ...


class _SnapshotLike(Protocol):
    @property
    def items(self) -> Mapping[str, _KVItemLike]: ...


class KVStore(Protocol):
    """What IPAM needs of the Consul adapter (structural, so tests may pass a fake)."""

    def read_prefix(self, prefix: str, *, consistent: bool = False) -> _SnapshotLike: ...
    def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool: ...
    def delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool: ...
    def create_many(self, entries: Sequence[tuple[str, bytes]]) -> bool: ...


def parse_allocations(prefix: str, items: Mapping[str, object]) -> list[Allocation]:
    """Allocations among KV items (`KVItem`-like: .value, .modify_index). Keys that are
    not `ipam/<network>/<address>` or whose value is not an allocation document are
    skipped (never raises)."""
    layout = Layout(prefix)
    out: list[Allocation] = []
    for key, item in items.items():
        where = layout.parse_allocation(key)
        if where is None:
            continue
        try:
            raw = getattr(item, "value", b"") or b""
            data = json.loads(raw)
            fields = [data["node"], data["container"], data["interface"]]
            index = int(getattr(item, "modify_index", 0))
        except (ValueError, KeyError, TypeError, RecursionError):
            continue  # not ours to interpret; never reused as free either (key exists)
        if not all(isinstance(f, str) and f for f in fields):
            continue
        spec = data.get("spec")
        out.append(Allocation(where[0], where[1], fields[0], fields[1], fields[2], index, key,
                              spec if isinstance(spec, str) else ""))
    out.sort(key=lambda a: (a.network, a.address.version, int(a.address)))
    return out


def candidates(pool: AddressPool, taken: Iterable[IPAddress], seed: str) -> Iterable[IPAddress]:
    """Free addresses of `pool`, each once, starting at an offset derived from `seed` and
    wrapping around, so that hosts allocating at the same moment mostly try different
    addresses first. Deterministic for a given (pool, taken, seed)."""
    used = {int(a) for a in taken if a.version == pool.start.version}
    size = pool.size
    start = int(pool.start)
    offset = int(hashlib.sha256(seed.encode()).hexdigest()[:12], 16) % size
    factory = type(pool.start)  # ip_address(int) would make an IPv4Address of a small v6 int
    for i in range(size):
        n = start + (offset + i) % size
        if n not in used:
            yield factory(n)


def _record(node: str, container: str, interface: str, spec: str, at: int,
            static: bool = False) -> bytes:
    """The value of an allocation key."""
    doc: dict[str, object] = {"node": node, "container": container, "interface": interface,
                              "allocated_at": at}
    if spec:
        doc["spec"] = spec
    if static:
        doc["static"] = True
    return json.dumps(doc, sort_keys=True).encode()


class Ipam:
    """Allocates, finds and releases addresses in Consul for one node."""

    def __init__(self, kv: KVStore, prefix: str, node: str) -> None:
        self.kv = kv
        self.prefix = prefix
        self.layout = Layout(prefix)
        self.node = node
        self._absent_since: dict[str, float] = {}  # node -> first seen without status

    def _items(self, base: str) -> Mapping[str, _KVItemLike]:
        return self.kv.read_prefix(base, consistent=True).items

    def _bump(self, *networks: str) -> None:
        """Move the generation key `index/ipam/<network>` of networks whose allocations
        this node just changed: other hosts watch the index, not the allocations (issue
        9). After the write, not in it: a bump lost to a crash is caught by the watchers'
        periodic refresh, and costs nothing but that delay."""
        # A new value each time: Consul skips a write that changes nothing (the
        # ModifyIndex would not move).
        stamp = f"{self.node} {time.time_ns()}".encode()
        for network in sorted(set(networks)):
            try:
                self.kv.put(self.layout.ipam_index(network), stamp)
            except ConsulError as e:
                log.debug("cannot bump the allocation index of %s: %s", network, e)

    def allocations(self, network: str | None = None) -> list[Allocation]:
        """Every allocation (of every node), or only those of `network`."""
        base = self.layout.ipam_prefix(network or None)
        return parse_allocations(self.prefix, self._items(base))

    def allocate(self, net: Network, container: str, interface: str,
                 reserved: Iterable[IPAddress] = (),
                 known: Mapping[str, _KVItemLike] | None = None, spec: str = ""
                 ) -> IPAddress:
        """The address held by (container, interface) on `net`, allocating one if needed.

        `reserved`: addresses not to hand out (static addresses in use). The gateway is
        never handed out. `spec`: the container's entry name, recorded in the key (an
        existing record that names another, or none, is rewritten). Raises
        `PoolExhausted` when every pool address is taken (or the network has no pool);
        `ConsulError` when Consul fails."""
        if net.pool is None:
            raise PoolExhausted(f"network {net.name!r} has no pool")
        pool = net.pool
        blocked = {a for a in reserved if a.version == pool.start.version}
        if net.gateway is not None:
            blocked.add(net.gateway)
        base = self.layout.ipam_prefix(net.name)
        # `known`: the allocations as the daemon's watch last saw them, which spares a
        # consistent read per allocation (bench/attach.py: 12 ms of 60 per attach). A stale
        # view is safe: creates are check-and-set, and the first lost create re-reads.
        items = {k: v for k, v in known.items() if k.startswith(base)} \
            if known is not None else self._items(base)
        for a in parse_allocations(self.prefix, items):
            if a.network != net.name or a.container != container or a.interface != interface:
                continue
            if a.address in pool and a.address not in blocked:
                if a.node != self.node or (spec and a.spec != spec):
                    self._adopt(a, spec)
                return a.address
            # The pool shrank or a static address took it over: give it back, then
            # allocate a fitting one below.
            log.info("releasing %s/%s of %s %s: no longer in the pool or now reserved",
                     net.name, a.address, container[:12], interface)
            self.release(a)
        taken = {w[1] for k in items if (w := self.layout.parse_allocation(k))} | blocked
        value = _record(self.node, container, interface, spec, int(time.time()))
        fresh = known is None
        for addr in candidates(pool, taken, f"{self.node}/{container}/{interface}"):
            if addr in taken:
                continue  # learnt from a re-read below
            if self.kv.put(self.layout.allocation(net.name, addr), value, cas=0):
                self._bump(net.name)
                return addr
            # Lost the race for this address to another host (or our view was stale):
            # learn what is taken now, once, and go on with the next free candidates.
            if not fresh:
                fresh = True
                return self.allocate(net, container, interface, reserved, spec=spec)
        raise PoolExhausted(f"pool {pool.start}-{pool.end} of network {net.name!r} is full")

    def allocate_many(self, wants: Sequence[tuple[Network, str, str]],
                      reserved: Iterable[IPAddress], known: Mapping[str, _KVItemLike],
                      batch: int = 64, covered: Collection[str] | None = None,
                      specs: Mapping[str, str] | None = None,
                      ) -> dict[tuple[str, str, str], IPAddress]:
        """Allocate for many (network, container, interface) at once: the ones that hold
        no address in `known` (the watched view) get distinct free candidates, created
        with create-only writes in transactions of `batch` keys — one Consul round trip
        per batch instead of one per address (bench/attach.py: 200 replicas scaled out).

        A batch is atomic: if any of its keys exists by now (another host was faster, or
        the view was stale), none of it is created and its requests are left out of the
        result, for `allocate` to do one by one. `covered`: the networks `known` holds
        (None: all); another network's allocations are read once. Requests that already
        hold an address as `allocate` would return it (this node's, in the pool, not
        reserved, recorded under the same entry) are in the result too: a spec put again
        for 500 containers that kept their addresses, before the watch holds their
        network, made each reconcile read the whole network (bench/attach.py, a second
        round: 4x slower). Those that need more than a plain create (adopting, replacing)
        are left out. `specs`: container -> its entry name, recorded in the keys.
        Returns {(container, network, interface): address} for what was created or is
        held."""
        by_net: dict[str, list[tuple[Network, str, str]]] = {}
        for w in wants:
            if w[0].pool is not None:
                by_net.setdefault(w[0].name, []).append(w)
        reserved = list(reserved)
        out: dict[tuple[str, str, str], IPAddress] = {}
        for name, group in by_net.items():
            net = group[0][0]
            pool = net.pool
            assert pool is not None
            base = self.layout.ipam_prefix(name)
            items = {k: v for k, v in known.items() if k.startswith(base)} \
                if covered is None or name in covered else dict(self._items(base))
            blocked = {a for a in reserved if a.version == pool.start.version}
            if net.gateway is not None:
                blocked.add(net.gateway)
            wanted = {(c, i) for _, c, i in group}
            holders: set[tuple[str, str]] = set()
            for a in parse_allocations(self.prefix, items):
                if a.network != name or (a.container, a.interface) not in wanted:
                    continue
                if (a.container, a.interface) in holders:
                    continue  # the first, as `allocate` would find it
                holders.add((a.container, a.interface))
                spec = (specs or {}).get(a.container, "")
                if a.address in pool and a.address not in blocked and a.node == self.node \
                        and (not spec or a.spec == spec):
                    out[(a.container, name, a.interface)] = a.address
            taken = {at[1] for k in items if (at := self.layout.parse_allocation(k))}
            taken |= blocked
            todo = [(c, i) for _, c, i in group if (c, i) not in holders]
            free = candidates(pool, taken, f"{self.node}/{name}")
            now = int(time.time())
            for first in range(0, len(todo), batch):
                chunk: list[tuple[str, str, IPAddress]] = []
                for container, interface in todo[first:first + batch]:
                    addr = next(iter(free), None)
                    if addr is None:
                        break  # full: the rest reports PoolExhausted through `allocate`
                    chunk.append((container, interface, addr))
                if not chunk:
                    break
                entries = [(self.layout.allocation(name, addr),
                            _record(self.node, c, i, (specs or {}).get(c, ""), now))
                           for c, i, addr in chunk]
                if self.kv.create_many(entries):
                    self._bump(name)
                    out.update({(c, name, i): addr for c, i, addr in chunk})
                else:
                    log.debug("batch allocation on %s lost a race; one by one", name)
                    break  # our view is stale: the rest goes through `allocate`
        return out

    def find(self, network: str, container: str, interface: str) -> Allocation | None:
        """The allocation held by (container, interface) on `network`, read-only."""
        for a in self.allocations(network):
            if a.container == container and a.interface == interface:
                return a
        return None

    def reassert(self, network: str, address: IPAddress, container: str, interface: str,
                 spec: str = "") -> bool:
        """Re-create the key of an address this node has configured but whose key is
        gone (reclaimed while the node was away). False: someone else holds it now."""
        value = _record(self.node, container, interface, spec, int(time.time()))
        if self.kv.put(self.layout.allocation(network, address), value, cas=0):
            self._bump(network)
            return True
        return False

    def claim(self, net: Network, address: IPAddress, container: str, interface: str,
              spec: str = "") -> Allocation | None:
        """Claim a static address cluster-wide, under the same keys as `allocate`.

        Returns None when (container, interface) holds it (already, or now), else the
        other holder's allocation: the contract's "a static address matched by several
        running containers is a conflict: one keeps it, the others report an error".
        Allocations this interface held at other addresses (the spec changed) are
        released first."""
        key = self.layout.allocation(net.name, address)
        for _ in range(3):
            holder = None
            for a in parse_allocations(self.prefix,
                                       self._items(self.layout.ipam_prefix(net.name))):
                if a.address == address:
                    holder = a
                elif a.container == container and a.interface == interface:
                    self.release(a)
            if holder is not None:
                if holder.container != container or holder.interface != interface:
                    return holder
                if holder.node != self.node or (spec and holder.spec != spec):
                    self._adopt(holder, spec)
                return None
            value = _record(self.node, container, interface, spec, int(time.time()),
                            static=True)
            if self.kv.put(key, value, cas=0):
                self._bump(net.name)
                return None
            # Someone claimed it between our read and our create: read who.
        raise CasConflict(f"{key} keeps changing; will retry")

    def _adopt(self, a: Allocation, spec: str = "") -> None:
        """Record this node as the holder of an allocation another node name made for the
        same container (the daemon's node name changed): otherwise `reclaim_dead_nodes`
        would free an address still in use once the old name's grace period ends. Also
        records the container's entry name `spec` (a record of an older daemon has
        none; the container may match another entry now)."""
        value = _record(self.node, a.container, a.interface, spec or a.spec,
                        int(time.time()))
        key = a.key or self.layout.allocation(a.network, a.address)
        if not self.kv.put(key, value, cas=a.modify_index):
            raise CasConflict(f"allocation {key} changed while node {self.node!r} adopted it")
        self._bump(a.network)

    def release(self, allocation: Allocation) -> bool:
        """Delete the allocation's key, only if it was not rewritten since it was read.
        True when the key is gone."""
        key = allocation.key or self.layout.allocation(allocation.network, allocation.address)
        if self.kv.delete(key, cas=allocation.modify_index or None):
            self._bump(allocation.network)
            return True
        return False

    def release_container(self, container: str, networks: Collection[str] | None = None
                          ) -> int:
        """Release every allocation of a removed container (on this node) in `networks`
        (None: in every network, a read that grows with the cluster); how many."""
        n = 0
        found = self.allocations() if networks is None else \
            [a for net in sorted(networks) for a in self.allocations(net)]
        for a in found:
            if a.container == container and a.node == self.node and self.release(a):
                n += 1
        return n

    def alive_nodes(self) -> set[str]:
        """Nodes whose `<prefix>nodes/<node>/status` key exists."""
        alive: set[str] = set()
        for key in self._items(self.layout.nodes_prefix()):
            node = self.layout.parse_node_status(key)
            if node is not None:
                alive.add(node)
        return alive

    def reclaim_dead_nodes(self, grace: float = DEFAULT_RECLAIM_GRACE,
                           now: float | None = None) -> list[Allocation]:
        """Release the allocations of nodes gone (no status key) for longer than `grace`
        seconds, as measured by this instance; return what was released.

        `now` is a monotonic clock reading (default `time.monotonic()`). The first call
        that sees a node's allocations without its status key starts that node's clock;
        a node that comes back (or whose allocations disappear) is forgotten. This
        node's own allocations are never reclaimed. Deletes are check-and-set, so an
        allocation rewritten meanwhile is left alone."""
        if now is None:
            now = time.monotonic()
        # Allocations first, then status keys: a node that appears in between is seen
        # alive; one that dies in between is caught by the next call.
        allocs = self.allocations()
        alive = self.alive_nodes()
        holders = {a.node for a in allocs} - alive - {self.node}
        for node in list(self._absent_since):
            if node not in holders:
                del self._absent_since[node]
        released: list[Allocation] = []
        for node in sorted(holders):
            since = self._absent_since.setdefault(node, now)
            if now - since <= grace:
                continue
            for a in allocs:
                if a.node == node and self.release(a):
                    released.append(a)
            log.info("reclaimed %d address(es) of node %s, gone for %.0fs",
                     sum(1 for a in released if a.node == node), node, now - since)
        return released
