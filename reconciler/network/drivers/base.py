"""The segment driver interface: what every kind of network segment (an OVS bridge with
VLAN tags, a Linux bridge, later a VXLAN overlay) must do for the network controller.

Owns the `SegmentDriver` protocol and the values it takes; no implementation. Adding a
driver: one module in this package implementing the protocol, registered in
`drivers.build_drivers`, and the model's `driver` field accepting its name
(docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from reconciler.adapters.netlink import IpInterface
from reconciler.model import Network
from reconciler.network.plan import PortObs, PortWant

GATEWAY_PREFIX = "rg"
TUNNEL_PREFIX = "rx"


def gateway_port_name(network: str) -> str:
    """The host link that carries a network's gateway address when the bridge itself
    cannot (an OVS internal port): ``rg`` + 13 hex."""
    return GATEWAY_PREFIX + hashlib.sha256(f"gw/{network}".encode()).hexdigest()[:13]


def tunnel_name(network: str) -> str:
    """The VXLAN device of an overlay network on this host: ``rx`` + 13 hex."""
    return TUNNEL_PREFIX + hashlib.sha256(f"vx/{network}".encode()).hexdigest()[:13]


def overlay_mac(ip: object) -> str:
    """The MAC of an overlay endpoint, derived from its IPv4 address (0a:58 + the
    address, as OVN does): every host knows every endpoint's MAC from the allocations."""
    packed = ipaddress.IPv4Address(str(ip)).packed
    return "0a:58:" + ":".join(f"{b:02x}" for b in packed)


@dataclass(frozen=True)
class PortOwner:
    """Whose host port this is: recorded with the port where the driver can (OVS
    external_ids), so that only the owning node's daemon ever removes it."""

    node: str
    container: str
    ifname: str
    network: str
    pid: int = 0  # the container's process, for announcing once the port is live
    start_time: int | None = None  # of that process (see adapters.procfs.start_time)


@dataclass(frozen=True)
class Plug:
    """A host veth to put on its segment. `ifindex`: its netdev now (a veth recreated
    under the same name must be re-added: OVS's userspace datapath keeps reading the
    dead device). `announce`: the container end was (re)configured and must announce
    itself once the port carries traffic, with `addresses`."""

    net: Network
    host_veth: str
    owner: PortOwner
    ifindex: int | None
    announce: bool
    addresses: tuple[IpInterface, ...] = ()


class SegmentDriver(Protocol):
    """One kind of segment. Every method is level-based and idempotent; `observe_*`
    read only. Nothing without this node's ownership marks is ever changed."""

    kind: str

    def port_want(self, net: Network) -> PortWant:
        """Where a host veth of `net` is plugged, and with which tag."""
        ...

    def tx_checksum(self, net: Network) -> bool | None:
        """The TX checksum offload containers on `net` need (None: leave it alone)."""
        ...

    def mtu(self, net: Network) -> int | None:
        """The MTU of `net`'s interfaces when the spec sets none (None: the kernel's)."""
        ...

    def observe_segment(self, net: Network) -> tuple[str, ...]:
        """What `net`'s segment lacks now (empty: nothing); each item says what."""
        ...

    def ensure_segment(self, net: Network) -> list[str]:
        """Build or repair `net`'s segment; what changed."""
        ...

    def observe_port(self, net: Network, host_veth: str, owner: PortOwner,
                     ifindex: int | None, master: str | None) -> PortObs:
        """Where `host_veth` is plugged. `master`: its Linux master as netlink saw it."""
        ...

    def plug(self, p: Plug) -> bool:
        """Plug a host veth; True when it is done now (the caller announces), False
        when it is queued (the driver has the announcement made after the commit)."""
        ...

    def unplug(self, host_veth: str) -> None:
        """Forget `host_veth`'s port (its veth is deleted by the caller)."""
        ...

    def owned_ports(self, node: str) -> list[str]:
        """Host ports of this node the driver keeps records of (for the sweep)."""
        ...

    def remove_ports(self, names: Collection[str]) -> None:
        """Remove orphan port records, all at once."""
        ...

    def gateway_ports(self, nets: Collection[Network]) -> set[str]:
        """The ports of `nets`' segments themselves: gateways, tunnels (never orphans)."""
        ...

    def gateway_device(self, net: Network) -> str | None:
        """The host link holding `net`'s gateway address (None: no gateway)."""
        ...

    def plug_device(self, net: Network, dev: str, role: str) -> bool:
        """Put a host device of the segment itself (a tunnel) on `net`'s bridge, as an
        access port of its VLAN where there are VLANs; True when it changed."""
        ...

    def device_plugged(self, net: Network, dev: str) -> bool:
        ...

    def unplug_device(self, dev: str) -> None:
        ...

    def release_segment(self, net: Network) -> list[str]:
        """`net` still exists but no container of it runs here: undo what only running
        containers need (what changed)."""
        ...

    def orphan_segments(self, node: str, used_bridges: Collection[str]) -> list[str]:
        """Bridges this node made that no network names any more and nothing uses."""
        ...

    def remove_segment(self, bridge: str) -> None:
        ...
