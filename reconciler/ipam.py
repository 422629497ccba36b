"""Cluster-wide IP address management for `"address": "auto"` interfaces.

Owns the daemon area `<prefix>ipam/<network>/<address>`: one key per allocated address,
created with check-and-set index 0 (create-only), so two hosts racing for one address
can never both get it — Consul accepts exactly one create. The value records who holds
it: `{"node": ..., "container": ..., "interface": ..., "allocated_at": ...}`.

An allocation is stable for the container's life: a restarted container (same id) finds
its key again and keeps its address. It is released when the container is removed, and
reclaimed from nodes that have been gone longer than a grace period.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from reconciler.errors import ReconcilerError
from reconciler.model import AddressPool, IPAddress, Network


class PoolExhausted(ReconcilerError):
    """Every address of a network's pool is taken. Reported for the container, retried
    later (an address may be released)."""


@dataclass(frozen=True)
class Allocation:
    network: str
    address: IPAddress
    node: str
    container: str
    interface: str
    modify_index: int = 0


class KVStore(Protocol):
    """What IPAM needs of the Consul adapter (structural, so tests may pass a real one)."""

    def read_prefix(self, prefix: str, *, consistent: bool = False) -> object: ...
    def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool: ...
    def delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool: ...


def ipam_prefix(prefix: str, network: str) -> str:
    return f"{prefix}ipam/{network}/"


def parse_allocations(prefix: str, items: Mapping[str, object]) -> list[Allocation]:
    """Allocations among KV items (`KVItem`-like: .key, .value, .modify_index)."""
    out: list[Allocation] = []
    base = f"{prefix}ipam/"
    for key, item in items.items():
        if not key.startswith(base):
            continue
        parts = key[len(base):].split("/")
        if len(parts) != 2:
            continue
        try:
            addr = ipaddress.ip_address(parts[1])
            data = json.loads(getattr(item, "value", b"") or b"{}")
            out.append(Allocation(parts[0], addr, str(data["node"]), str(data["container"]),
                                  str(data["interface"]), int(getattr(item, "modify_index", 0))))
        except (ValueError, KeyError, TypeError):
            continue  # not ours to interpret; never reused as free either (key exists)
    return out


def candidates(pool: AddressPool, taken: Iterable[IPAddress], seed: str) -> Iterable[IPAddress]:
    """Free addresses of `pool`, starting at an offset derived from `seed`, so that hosts
    allocating at the same moment mostly try different addresses first."""
    used = {int(a) for a in taken}
    size = pool.size
    start = int(pool.start)
    offset = int(hashlib.sha256(seed.encode()).hexdigest()[:12], 16) % size
    factory = ipaddress.ip_address
    for i in range(size):
        n = start + (offset + i) % size
        if n not in used:
            yield factory(n)


class Ipam:
    """Allocates, finds and releases addresses in Consul for one node."""

    def __init__(self, kv: KVStore, prefix: str, node: str) -> None:
        self.kv = kv
        self.prefix = prefix
        self.node = node

    def _items(self, network: str) -> Mapping[str, object]:
        snap = self.kv.read_prefix(ipam_prefix(self.prefix, network), consistent=True)
        items: Mapping[str, object] = getattr(snap, "items")  # noqa: B009 - structural
        return items

    def allocations(self, network: str | None = None) -> list[Allocation]:
        base = ipam_prefix(self.prefix, network) if network else f"{self.prefix}ipam/"
        snap = self.kv.read_prefix(base, consistent=True)
        return parse_allocations(self.prefix, getattr(snap, "items"))  # noqa: B009

    def allocate(self, net: Network, container: str, interface: str,
                 reserved: Iterable[IPAddress] = ()) -> IPAddress:
        """The address held by (container, interface) on `net`, allocating one if needed.

        `reserved`: addresses not to hand out (static addresses in use, the gateway)."""
        if net.pool is None:
            raise PoolExhausted(f"network {net.name!r} has no pool")
        existing = parse_allocations(self.prefix, self._items(net.name))
        for a in existing:
            if a.container == container and a.interface == interface and a.address in net.pool:
                return a.address
        taken = [a.address for a in existing] + list(reserved)
        if net.gateway is not None:
            taken.append(net.gateway)
        value = json.dumps({"node": self.node, "container": container, "interface": interface,
                            "allocated_at": int(time.time())}, sort_keys=True).encode()
        for addr in candidates(net.pool, taken, f"{self.node}/{container}/{interface}"):
            if self.kv.put(f"{ipam_prefix(self.prefix, net.name)}{addr}", value, cas=0):
                return addr
            # Lost the race for this address to another host: try the next one.
        raise PoolExhausted(f"pool {net.pool.start}-{net.pool.end} of network {net.name!r} "
                            "is full")

    def release(self, allocation: Allocation) -> bool:
        key = f"{ipam_prefix(self.prefix, allocation.network)}{allocation.address}"
        return self.kv.delete(key, cas=allocation.modify_index or None)

    def release_container(self, container: str) -> int:
        """Release every allocation of a removed container (on this node)."""
        n = 0
        for a in self.allocations():
            if a.container == container and a.node == self.node and self.release(a):
                n += 1
        return n
