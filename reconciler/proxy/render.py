"""Rendering of haproxy.cfg and the active-pool map from a `ProxyView`; writes nothing.

Owns the Jinja2 environment (sandboxed, `StrictUndefined`, no autoescape, trailing
newline kept) and the template lookup: a user ``--templates DIR`` first, then the
project's ``templates/``, so a user may override the whole ``haproxy.cfg.j2`` or just one
part of it (``haproxy/backend.j2``...). Output is deterministic: services, pools and
members are sorted by name. Every value is checked by `check_view` before any template
sees it. Writing the files, validating them with ``haproxy -c`` and reloading is
reconciler.adapters.haproxy's job.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from reconciler.errors import ConfigurationError, Problem, ValidationError
from reconciler.proxy.view import (
    PoolView,
    ProxyView,
    backend_name,
    check_view,
    format_address,
    frontend_name,
    frontends,
    sorted_view,
)

MAIN_TEMPLATE = "haproxy.cfg.j2"
DEFAULT_TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
"""The project's templates/ (a source checkout or an editable install)."""


class Renderer:
    """Renders a `ProxyView` with the project's templates, or a user's over them."""

    def __init__(self, templates_dir: str | os.PathLike[str] | None = None) -> None:
        search: list[str] = []
        if templates_dir is not None:
            user = Path(templates_dir)
            if not user.is_dir():
                raise ConfigurationError(f"templates directory {user} does not exist")
            search.append(str(user))
        search.append(str(DEFAULT_TEMPLATES_DIR))
        self.search_path: tuple[str, ...] = tuple(search)
        self._env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader(search),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.globals.update(
            backend_name=backend_name,
            frontend_name=frontend_name,
            format_address=format_address,
        )

    def render(self, view: ProxyView) -> bytes:
        """haproxy.cfg for `view`, as bytes. Raises ValidationError on unsafe values."""
        check_view(view)
        view = _with_active_pools(sorted_view(view))
        try:
            template = self._env.get_template(MAIN_TEMPLATE)
            text = template.render(settings=view.settings, services=view.services,
                                   frontends=frontends(view))
        except jinja2.TemplateError as exc:
            # A broken user template is a configuration problem, not bad desired state.
            raise ConfigurationError(f"rendering {MAIN_TEMPLATE} failed: {exc}") from exc
        _check_output(text)
        return text.encode("utf-8")


def _with_active_pools(view: ProxyView) -> ProxyView:
    """Give every service a (possibly empty) pool for its active name, so its backend
    exists and the frontend's default is valid even before the pool has members."""
    services = []
    for svc in view.services:
        if any(p.name == svc.active for p in svc.pools):
            services.append(svc)
            continue
        pools = tuple(sorted((*svc.pools, PoolView(svc.active)), key=lambda p: p.name))
        services.append(replace(svc, pools=pools))
    return replace(view, services=tuple(services))


def _check_output(text: str) -> None:
    # Last line of defence against a user template passing something odd through.
    if "\r" in text or "\x00" in text:
        raise ValidationError(
            [Problem("haproxy.cfg", "", "rendered config contains CR or NUL characters")]
        )


_default: Renderer | None = None


def _default_renderer() -> Renderer:
    global _default
    if _default is None:
        _default = Renderer()
    return _default


def render(view: ProxyView, templates_dir: str | os.PathLike[str] | None = None) -> bytes:
    """haproxy.cfg for `view` with the project's templates (or `templates_dir` over them)."""
    renderer = _default_renderer() if templates_dir is None else Renderer(templates_dir)
    return renderer.render(view)


def render_map(view: ProxyView) -> bytes:
    """The active-pool map file: one ``<service> <backend>`` line per service, sorted."""
    check_view(view)
    lines = [
        f"{svc.name} {backend_name(svc.name, svc.active)}\n"
        for svc in sorted(view.services, key=lambda s: s.name)
    ]
    return "".join(lines).encode("utf-8")


def render_canary_maps(view: ProxyView) -> tuple[bytes, bytes]:
    """The progressive-cutover maps: ``<service> <backend>`` of the canary pool and
    ``<service> <percent>``, for services with a share above 0 whose canary pool exists
    (sorted). Applied with `set map`, like the active map."""
    check_view(view)
    pools, weights = [], []
    for svc in sorted(view.services, key=lambda s: s.name):
        if svc.canary is None or svc.canary_weight <= 0 or \
                not any(p.name == svc.canary for p in svc.pools):
            continue
        pools.append(f"{svc.name} {backend_name(svc.name, svc.canary)}\n")
        weights.append(f"{svc.name} {svc.canary_weight}\n")
    return "".join(pools).encode(), "".join(weights).encode()
