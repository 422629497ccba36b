"""The policy controller: compiles the group policy for this host and hands each kind of
bridge's rules to its backend.

Owns the one reconcile of the policy (`reconcile`: compile, then every backend applies
the bridges of its kind, level-based, then cuts the tracked connections that became
denied both ways since the last applied rules: `compiled.cuts`) and the sum of what the
backends deny (metrics).
Every bridge of every network of a backend's kind is handed to it, with empty rules when
nothing applies there, so rules of a bridge that no longer needs any are removed. In a
dry run nothing is applied and `planned` says what would change.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from reconciler.adapters.netlink import host_veth_name
from reconciler.adapters.nftables import Nftables
from reconciler.adapters.openflow import OpenFlow
from reconciler.errors import AdapterError
from reconciler.ipam import Allocation
from reconciler.model import DesiredState
from reconciler.policy.base import Denied, PolicyBackend
from reconciler.policy.compiled import (
    BridgeRules,
    CompiledPolicy,
    LocalPort,
    compile_policy,
    cuts,
)
from reconciler.policy.nft import NftBackend
from reconciler.policy.openflow import OpenFlowBackend

log = logging.getLogger(__name__)


def default_backends(node: str) -> list[PolicyBackend]:
    """nftables for Linux bridges, OpenFlow for OVS, each marked with this node's name
    (several daemons on one host, as in the tests and the lab, never touch each other's
    table or flows)."""
    tag = hashlib.sha256(f"policy/{node}".encode()).hexdigest()
    return [NftBackend(Nftables(), table=f"reconciler_{tag[:8]}"),
            OpenFlowBackend(OpenFlow(), cookie_tag=int(tag[:4], 16))]


class PolicyController:
    def __init__(self, backends: Iterable[PolicyBackend], *, dry_run: bool = False) -> None:
        self._backends = {b.kind: b for b in backends}
        self.dry_run = dry_run
        self.planned: list[str] = []
        self.compiled = CompiledPolicy()
        self._applied = CompiledPolicy()  # what every backend last applied
        self._lock = threading.Lock()

    def reconcile(self, state: DesiredState, allocations: Iterable[Allocation],
                  ports: Iterable[LocalPort], specs: Mapping[str, str]) -> list[str]:
        """Make this host's bridges enforce the policy; what changed."""
        compiled = compile_policy(state, allocations, ports, specs)
        changes: list[str] = []
        with self._lock:
            self.compiled = compiled
            for kind, backend in sorted(self._backends.items()):
                bridges = {b.bridge: b for b in compiled.bridges.values() if b.driver == kind}
                for net in state.networks.values():
                    if net.driver == kind and net.bridge not in bridges:
                        bridges[net.bridge] = BridgeRules(net.bridge, kind)
                changes += backend.apply([b for _, b in sorted(bridges.items())],
                                         dry_run=self.dry_run)
            if self.dry_run:
                self.planned += changes
                return changes
            # The rules are in place (no new entry can be made for a denied pair): now
            # forget the connections that became denied both ways.
            for bridge, blocks in sorted(cuts(self._applied, compiled).items()):
                cutter = self._backends.get(compiled.bridges[bridge].driver)
                if cutter is None:
                    continue
                try:
                    n = cutter.cut(bridge, blocks)
                except AdapterError as e:  # their packets stay dropped; replies pass
                    log.warning("policy: cannot cut the connections now denied on %s: %s",
                                bridge, e)
                    continue
                if n:
                    changes.append(f"policy: {bridge}: cut {n} connection(s) now denied")
            self._applied = compiled
        return changes

    def denied(self) -> Denied:
        """(bridge, source group, destination group) -> packets denied, all backends."""
        out: Denied = {}
        for backend in self._backends.values():
            try:
                got = backend.denied()
            except Exception as e:  # a scrape must not fail on it
                log.debug("policy counters of %s: %s", backend.kind, e)
                continue
            for key, n in got.items():
                out[key] = out.get(key, 0) + n
        return out


class _Link(Protocol):
    @property
    def ifname(self) -> str: ...
    @property
    def mac(self) -> str | None: ...


class _Net(Protocol):
    @property
    def name(self) -> str: ...


class _Wanted(Protocol):
    @property
    def network(self) -> _Net: ...
    @property
    def link(self) -> _Link: ...


class _Result(Protocol):
    @property
    def addresses(self) -> Mapping[str, str]: ...
    @property
    def wanted(self) -> Sequence[_Wanted]: ...


def local_ports(results: Mapping[str, _Result]) -> list[LocalPort]:
    """This host's container ports from the network controller's last results
    (container id -> `AttachResult`): only interfaces that are up and right, with the
    address they were given and the MAC the spec (or the overlay) fixes."""
    out: list[LocalPort] = []
    for cid, res in results.items():
        for w in res.wanted:
            cidr = res.addresses.get(w.link.ifname)
            if cidr is None:
                continue
            out.append(LocalPort(w.network.name, host_veth_name(cid, w.link.ifname), cid,
                                 (ipaddress.ip_interface(cidr).ip,), w.link.mac))
    return out
