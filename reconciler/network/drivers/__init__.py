"""Segment drivers, one module each, and the registry that maps a network's `driver`
field to its driver (the one place that knows every kind)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reconciler.adapters import netlink
from reconciler.network.drivers.base import SegmentDriver
from reconciler.network.drivers.linux import LinuxBridgeDriver
from reconciler.network.drivers.ovs import OvsDriver
from reconciler.network.portbatch import PortBatcher


def build_drivers(*, node: str, nl: netlink.NetlinkAdapter, ovs: Any, fw: Any,
                  batcher: PortBatcher) -> Mapping[str, SegmentDriver]:
    """kind -> driver, for every kind the model accepts."""
    drivers: list[SegmentDriver] = [
        OvsDriver(node=node, ovs=ovs, nl=nl, batcher=batcher),
        LinuxBridgeDriver(node=node, nl=nl, fw=fw),
    ]
    return {d.kind: d for d in drivers}
