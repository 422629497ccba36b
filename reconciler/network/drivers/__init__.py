"""Segment drivers, one module each, and the registry that maps a network's `driver`
field (and `overlay`) to its driver (the one place that knows every kind)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from reconciler.adapters import netlink
from reconciler.model import Network
from reconciler.network.drivers.base import SegmentDriver
from reconciler.network.drivers.linux import LinuxBridgeDriver
from reconciler.network.drivers.overlay import OverlayDriver
from reconciler.network.drivers.ovs import OvsDriver
from reconciler.network.portbatch import PortBatcher


def build_drivers(*, node: str, nl: netlink.NetlinkAdapter, ovs: Any, fw: Any,
                  batcher: PortBatcher, vx: Any = None, advertise: str | None = None,
                  host_address: Callable[[Network], netlink.IpInterface] | None = None,
                  release_host_address: Callable[[Network], None] | None = None,
                  on_tunnel: Callable[[], None] | None = None,
                  ) -> Mapping[str, SegmentDriver]:
    """kind -> driver, for every kind the model accepts; `<kind>/overlay` for overlay
    networks on that kind of bridge (when `vx`, the VXLAN adapter, is given)."""
    drivers: list[SegmentDriver] = [
        OvsDriver(node=node, ovs=ovs, nl=nl, batcher=batcher),
        LinuxBridgeDriver(node=node, nl=nl, fw=fw),
    ]
    if vx is not None and host_address is not None and release_host_address is not None:
        drivers += [OverlayDriver(d, node=node, vx=vx, nl=nl, advertise=advertise,
                                  host_address=host_address,
                                  release_host_address=release_host_address,
                                  on_tunnel=on_tunnel) for d in list(drivers)]
    return {d.kind: d for d in drivers}
