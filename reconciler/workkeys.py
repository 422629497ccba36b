"""The daemon's work keys: one small immutable type per kind of work.

Owns the key types and nothing else. A key names what to reconcile, never how: the
daemon maps each type to its handler in one registry (reconciler.daemon), used by both
`run` and `run --once`. Keys are hashable, so the work queue de-duplicates them. Each
type's `kind` names it in metrics (a label with one value per type, never per key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class ContainerKey:
    """One container's interfaces (and its member, through MembersKey)."""

    kind: ClassVar[str] = "container"

    cid: str

    def __str__(self) -> str:
        return f"container:{self.cid[:12]}"


@dataclass(frozen=True)
class PortsKey:
    """Commit the OVS ports queued by container reconciles, in one transaction."""

    kind: ClassVar[str] = "ports"

    def __str__(self) -> str:
        return "ovs-ports"


@dataclass(frozen=True)
class SweepKey:
    """Remove what this node owns and has no reason to exist."""

    kind: ClassVar[str] = "sweep"

    def __str__(self) -> str:
        return "sweep"


@dataclass(frozen=True)
class MembersKey:
    """Publish this node's pool members, withdraw the rest."""

    kind: ClassVar[str] = "members"

    def __str__(self) -> str:
        return "members"


@dataclass(frozen=True)
class ProxyKey:
    """Make HAProxy equal to the services."""

    kind: ClassVar[str] = "proxy"

    def __str__(self) -> str:
        return "proxy"


@dataclass(frozen=True)
class PeersKey:
    """Program the remote endpoints of this host's overlay tunnels."""

    kind: ClassVar[str] = "peers"

    def __str__(self) -> str:
        return "peers"


@dataclass(frozen=True)
class PolicyKey:
    """Make this host's bridges enforce the group policy (issue 12)."""

    kind: ClassVar[str] = "policy"

    def __str__(self) -> str:
        return "policy"


WorkKey = ContainerKey | PortsKey | SweepKey | MembersKey | ProxyKey | PeersKey | PolicyKey

PORTS = PortsKey()
SWEEP = SweepKey()
MEMBERS = MembersKey()
PROXY = ProxyKey()
PEERS = PeersKey()
POLICY = PolicyKey()
