"""The proxy's side of a progressive cutover: canary maps out, HAProxy's counters in.

Owns what the proxy controller hands the adapter for the canary maps (`canary_maps`,
keyed by the adapter's file names) and the counters it publishes in the node status
for the command that drives the cutover (`cutover_status`: per service with a running
cutover, the applied share and, per pool, HAProxy's requests, errors and servers up in
the current worker). Pure: takes views and counters, returns plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from reconciler.proxy.render import render_canary_maps
from reconciler.proxy.view import (
    CANARY_MAP_FILE,
    CANARY_WEIGHT_MAP_FILE,
    ProxyView,
    backend_name,
)


class Counters(Protocol):
    """One backend's counters (adapters.haproxy.BackendCounters)."""

    @property
    def requests(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def up(self) -> int: ...
    @property
    def servers(self) -> int: ...


def canary_maps(view: ProxyView) -> dict[str, bytes]:
    """The canary map files' contents, by file name (the adapter syncs them)."""
    pools, weights = render_canary_maps(view)
    return {CANARY_MAP_FILE: pools, CANARY_WEIGHT_MAP_FILE: weights}


def running(view: ProxyView) -> list[str]:
    """Services with a canary share applied (sorted)."""
    return sorted(s.name for s in view.services if s.canary is not None and s.canary_weight)


def cutover_status(view: ProxyView, worker: int | None,
                   counters: Mapping[str, Counters]) -> dict[str, Any]:
    """``{service: {"to", "weight", "worker", "pools": {pool: {requests, errors, up,
    servers}}}}`` for every service with a running cutover."""
    out: dict[str, Any] = {}
    for svc in view.services:
        if svc.canary is None or not svc.canary_weight:
            continue
        pools: dict[str, Any] = {}
        for pool in sorted({svc.active, svc.canary}):
            c = counters.get(backend_name(svc.name, pool))
            if c is not None:
                pools[pool] = {"requests": c.requests, "errors": c.errors, "up": c.up,
                               "servers": c.servers}
        out[svc.name] = {"to": svc.canary, "weight": svc.canary_weight, "worker": worker,
                         "pools": pools}
    return out
