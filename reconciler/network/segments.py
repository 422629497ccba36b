"""Segments of networks on this node: built through their driver, remembered as done
until the network's definition changes or a sweep or deep resync forgets them.

Owns that memory (and its lock) and nothing else: the drivers own how a segment is
built and observed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from reconciler.errors import ReconcilerError
from reconciler.model import Network
from reconciler.network.drivers.base import SegmentDriver


class Segments:
    def __init__(self, drivers: Mapping[str, SegmentDriver]) -> None:
        self.drivers = drivers
        self._lock = threading.Lock()
        self._done: dict[str, Network] = {}

    def driver(self, net: Network) -> SegmentDriver:
        """The driver of `net`: its bridge kind's, wrapped for an overlay."""
        kind = f"{net.driver}/overlay" if net.overlay is not None else net.driver
        d = self.drivers.get(kind)
        if d is None:
            raise ReconcilerError(f"network {net.name}: no driver {kind!r}")
        return d

    def missing(self, net: Network, *, fresh: bool = False) -> tuple[str, ...]:
        """What `net`'s segment lacks; () without looking when it was built and its
        definition is unchanged (unless `fresh`: always look)."""
        with self._lock:
            if not fresh and self._done.get(net.name) == net:
                return ()
        missing = self.driver(net).observe_segment(net)
        if not missing:
            with self._lock:
                self._done[net.name] = net
        return missing

    def ensure(self, net: Network) -> list[str]:
        changes = self.driver(net).ensure_segment(net)
        with self._lock:
            self._done[net.name] = net
        return changes

    def forget(self) -> None:
        with self._lock:
            self._done = {}
