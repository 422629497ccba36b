"""The HAProxy side of reconciler: what to render (view), and rendering it (render).

`view` defines the renderer's input as frozen dataclasses and checks every value against
strict allow-lists; `render` turns a view into haproxy.cfg and active.map bytes.
Running, validating and reloading HAProxy is reconciler.adapters.haproxy.
"""

from reconciler.proxy.render import Renderer, render, render_canary_maps, render_map
from reconciler.proxy.view import (
    GlobalView,
    MemberView,
    PoolView,
    ProxyView,
    ServiceView,
    backend_name,
    check_view,
    frontend_name,
    parse_backend_name,
)

__all__ = [
    "GlobalView",
    "MemberView",
    "PoolView",
    "ProxyView",
    "Renderer",
    "ServiceView",
    "backend_name",
    "check_view",
    "frontend_name",
    "parse_backend_name",
    "render",
    "render_canary_maps",
    "render_map",
]
