"""The address book: this node's view of its IPAM allocations, cached per interface.

Owns the cache of (container, network, interface) -> address and every call into IPAM
(reconciler.ipam, which owns the allocation keys in Consul): allocating `auto`
addresses (one by one, or many in a few transactions), claiming static ones, releasing,
and the sweep's part (allocations of dead containers and dead nodes, the re-assertion
of allocation keys lost while the daemon was away). A resync of unchanged containers
costs no Consul read; every sweep rebuilds the cache from one consistent read, so an
allocation removed behind our back is noticed within one period.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from reconciler.errors import AdapterError, ConsulError, ReconcilerError
from reconciler.ipam import Allocation, Ipam
from reconciler.model import IPAddress, Network

log = logging.getLogger(__name__)

IfaceKey = tuple[str, str, str]  # (container id, network, interface)
HOST_HOLDER = "host:"  # allocations of a host itself (its overlay address): "host:<node>"


class AddressBook:
    def __init__(self, ipam: Ipam, node: str) -> None:
        self._ipam = ipam
        self._node = node
        self._lock = threading.Lock()
        self._cache: dict[IfaceKey, IPAddress] = {}
        # container -> networks it holds addresses on, kept while it is stopped (the
        # cache forgets it), so that its removal reads only those networks (issue 9)
        self._networks: dict[str, set[str]] = {}
        self._view: Mapping[str, Any] | None = None  # ipam/ keys as last watched
        self._covered: Collection[str] | None = None  # the networks the view holds
        self._unclaimed: dict[IfaceKey, IPAddress] = {}  # used while Consul was away
        # container -> the name of the entry it matches, recorded in its allocations (the
        # group policy classifies remote holders by it; issue 12)
        self._specs: dict[str, str] = {}

    def set_view(self, view: Mapping[str, Any], covered: Collection[str] | None = None
                 ) -> None:
        """The allocation keys as the daemon's watch last saw them (saves a read), of the
        networks `covered` (None: every network); another network's are read."""
        self._view = view
        self._covered = covered

    def _view_of(self, network: str) -> Mapping[str, Any] | None:
        covered = self._covered
        return self._view if covered is None or network in covered else None

    def counts(self) -> dict[str, int]:
        """Network -> addresses this node holds in it (its cache: what it allocated or
        claimed, and what the last sweep found held)."""
        out: dict[str, int] = {}
        with self._lock:
            for _, network, _ in self._cache:
                out[network] = out.get(network, 0) + 1
        return out

    def cached(self, key: IfaceKey) -> IPAddress | None:
        with self._lock:
            return self._cache.get(key)

    def _remember(self, key: IfaceKey, ip: IPAddress) -> None:
        with self._lock:
            self._cache[key] = ip
            self._networks.setdefault(key[0], set()).add(key[1])

    def claim(self, net: Network, ip: IPAddress, cid: str, ifname: str, spec: str = ""
              ) -> Allocation | None:
        """Claim a static address; the holder when another container has it.

        While Consul is unreachable the address is the user's own, from the cached
        desired state: it is used at once (unless another container of this node uses
        it) and claimed when Consul answers again (`unclaimed`); if someone else claimed
        it meanwhile, that one keeps it and this container gives way."""
        key = (cid, net.name, ifname)
        if self.cached(key) == ip and self._same_spec(cid, spec):
            return None
        try:
            holder = self._ipam.claim(net, ip, cid, ifname, spec)
        except ConsulError as e:
            with self._lock:
                local = next((k for k, v in self._cache.items() if v == ip
                              and k[1] == net.name and k[0] != cid), None)
                local = local or next((k for k, v in self._unclaimed.items()
                                       if v == ip and k[1] == net.name and k[0] != cid), None)
                if local is not None:
                    return Allocation(net.name, ip, self._node, local[0], local[2])
                self._unclaimed[key] = ip
            log.warning("%s %s: Consul unreachable (%s): %s attached from the cached state, "
                        "claimed when Consul answers", cid[:12], ifname, e, ip)
            return None
        with self._lock:
            self._unclaimed.pop(key, None)
        if holder is None:
            self._remember(key, ip)
        return holder

    def unclaimed(self, cid: str) -> bool:
        """Whether a static address of `cid` is in use but not claimed in Consul yet."""
        with self._lock:
            return any(k[0] == cid for k in self._unclaimed)

    def holder(self, net: Network, ip: IPAddress, cid: str) -> Allocation | None:
        """Read only: the allocation of `ip` by another container, if any."""
        return next((a for a in self._ipam.allocations(net.name)
                     if a.address == ip and a.container != cid), None)

    def allocate(self, net: Network, cid: str, ifname: str,
                 reserved: Iterable[IPAddress], spec: str = "") -> IPAddress:
        key = (cid, net.name, ifname)
        ip = self.cached(key)
        if ip is None or net.pool is None or ip not in net.pool \
                or not self._same_spec(cid, spec):
            ip = self._ipam.allocate(net, cid, ifname, reserved, known=self._view_of(net.name),
                                     spec=spec)
            self._remember(key, ip)
        return ip

    def _same_spec(self, cid: str, spec: str) -> bool:
        """Whether `spec` is what `cid`'s allocations record (as far as this book knows);
        remembers it. A cached allocation of a container whose entry name changed (or
        was never recorded: the first run after an upgrade) is looked at again once."""
        with self._lock:
            same = self._specs.get(cid) == spec or not spec
            if spec:
                self._specs[cid] = spec
        return same

    def find(self, net: Network, cid: str, ifname: str) -> IPAddress | None:
        """Read only: the address allocated to this interface, if any."""
        held = self._ipam.find(net.name, cid, ifname)
        return None if held is None else held.address

    def allocate_many(self, wants: list[tuple[Network, str, str]],
                      reserved: Iterable[IPAddress], specs: Mapping[str, str] | None = None
                      ) -> int:
        """Allocate many `auto` addresses in a few Consul transactions (up to 64 each):
        with 200 replicas scaled out at once, one create round trip each was the largest
        cost of attaching (bench/attach.py). Best effort: whatever it leaves (a lost race,
        an error) is allocated one by one by the reconcile. Returns how many it allocated
        or found held already (both cached: their reconciles read nothing)."""
        view, covered = self._view, self._covered
        if view is None:
            # No watched view yet (a network this host had no container on until this
            # spec: its allocations are being watched from now on): read each network
            # once here rather than once per reconcile (bench/attach.py: 500 reads of a
            # growing network, O(N^2), most of the daemon's CPU when they held addresses).
            view, covered = {}, ()
        with self._lock:
            wants = [w for w in wants if (w[1], w[0].name, w[2]) not in self._cache]
        if len(wants) < 2:
            return 0  # one alone: the reconcile's own allocation costs the same
        try:
            got = self._ipam.allocate_many(wants, list(reserved), view, covered=covered,
                                           specs=specs)
        except (AdapterError, ReconcilerError) as e:
            log.warning("batch address allocation failed (one by one instead): %s", e)
            return 0
        with self._lock:
            self._cache.update(got)
            for cid, network, _ in got:
                self._networks.setdefault(cid, set()).add(network)
                if specs and specs.get(cid):
                    self._specs[cid] = specs[cid]
        return len(got)

    def host_address(self, net: Network, reserved: Iterable[IPAddress]) -> IPAddress:
        """This host's own address on `net` (an overlay), from its pool."""
        return self.allocate(net, HOST_HOLDER + self._node, "host", reserved)

    def release_host_address(self, net: Network) -> bool:
        held = self._ipam.find(net.name, HOST_HOLDER + self._node, "host")
        self.forget(HOST_HOLDER + self._node)
        return held is not None and self._ipam.release(held)

    def forget(self, cid: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == cid]:
                del self._cache[key]
            for key in [k for k in self._unclaimed if k[0] == cid]:
                del self._unclaimed[key]
            self._specs.pop(cid, None)

    def release_container(self, cid: str) -> int:
        """Release the addresses of a removed container: only the networks it held
        addresses on are read (none known: nothing to release; the full sweep at start
        and at deep resyncs catches what a previous run left)."""
        with self._lock:
            networks = self._networks.pop(cid, set())
        return self._ipam.release_container(cid, networks) if networks else 0

    def sweep(self, running_ids: set[str], is_gone: Callable[[str], bool],
              reclaim_grace: float, overlays: Collection[str] = (), *, full: bool = True,
              networks: Collection[str] = ()) -> tuple[list[str], dict[IfaceKey, IPAddress]]:
        """Release the allocations of this node's containers that are gone and rebuild
        the cache from that read. Returns (what it did, the allocations held by this
        node's containers).

        `full`: read every network's allocations, and reclaim dead nodes' (a cost that
        grows with the cluster: the daemon does it at its first sweep and at every deep
        resync). Otherwise only the networks this node holds addresses on (its cache),
        and those in `networks` (its containers') are read (issue 9)."""
        done: list[str] = []
        if full:
            done = [f"reclaimed {a.network}/{a.address} of node {a.node}"
                    for a in self._ipam.reclaim_dead_nodes(reclaim_grace)]
            allocations = self._ipam.allocations()
        else:
            with self._lock:
                mine = {n for nets in self._networks.values() for n in nets}
            allocations = [a for n in sorted(mine | set(networks))
                           for a in self._ipam.allocations(n)]
        held: dict[IfaceKey, IPAddress] = {}
        specs: dict[str, str] = {}  # container -> the entry its allocations record
        for a in allocations:
            if a.node != self._node:
                continue
            if a.container.startswith(HOST_HOLDER):
                if a.network not in overlays:  # the network is gone, or no overlay now
                    self._ipam.release(a)
                    done.append(f"allocation {a.network}/{a.address}")
                continue  # else the host's own: released with its overlay segment
            if a.container not in running_ids and is_gone(a.container):
                self._ipam.release(a)
                done.append(f"allocation {a.network}/{a.address}")
            else:
                held[(a.container, a.network, a.interface)] = a.address
                if a.spec:
                    specs[a.container] = a.spec
        with self._lock:
            self._cache = dict(held)
            # What the records say: a held address is not read again for its spec (a
            # spec put again for 500 containers that kept their addresses read their
            # network once per container, O(N^2); bench/attach.py, a second round).
            self._specs.update(specs)
            if full:
                self._networks = {}
            for cid, network, _ in held:
                self._networks.setdefault(cid, set()).add(network)
        return done, held

    def reassert(self, cid: str, network: str, ifname: str, cidr: str) -> bool:
        """An address configured on a running container whose allocation key is gone
        (reclaimed while this daemon was away longer than the grace period): create the
        key again. False when another container holds the address now."""
        ip = ipaddress.ip_interface(cidr).ip
        with self._lock:
            spec = self._specs.get(cid, "")
        if self._ipam.reassert(network, ip, cid, ifname, spec):
            self._remember((cid, network, ifname), ip)
            return True
        return False
