"""The renderer's input: frozen dataclasses describing the HAProxy config to write.

Owns `ProxyView` / `ServiceView` / `PoolView` / `MemberView` / `GlobalView`, the naming
of HAProxy sections (`frontend_name`, `backend_name`), and `check_view`, the renderer's
own defensive allow-list check of every value that reaches a template. Values are
validated upstream (reconciler.model), but a string that could add a line, a comment
or an option to haproxy.cfg must never get through, so every string field is checked
again here against a strict allow-list and refused with a `ValidationError` whose
`Problem` names the service/pool/member (as its KV key) and the field.

Backend names are ``be_<service>:<pool>``: ``:`` cannot occur in a name
(``[A-Za-z0-9_.-]``), so unlike ``be_<service>_<pool>`` two (service, pool) pairs can
never collide (``a_b``/``c`` vs ``a``/``b_c``). HAProxy accepts ``:`` in proxy names.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace

from reconciler.errors import Problem, ValidationError
from reconciler.kvlayout import Layout

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}\Z")
"""Service, pool and member names (CONTRACT.md)."""
HEALTH_PATH_RE = re.compile(r"/[A-Za-z0-9/_.~%?=&+-]{0,1023}\Z")
"""An HTTP check path: no space, quote, backslash, ``#`` or control character."""
FILE_PATH_RE = re.compile(r"/[A-Za-z0-9/_.+-]{0,4095}\Z")
"""Absolute paths of the map, socket and server-state files."""
IP_CHARS_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}\Z")
"""Characters of an IPv4/IPv6 literal (no zone index, no brackets)."""
MODES = ("http", "tcp")
BALANCES = ("roundrobin", "leastconn", "source")
MEMBER_STATES = ("ready", "drain", "maint")
_KEYS = Layout("")
"""Problems name the service/pool/member by its KV key relative to the prefix."""

# File names inside a state directory. reconciler.adapters.haproxy uses the same names
# (tests/unit/test_render.py asserts they agree).
MAP_FILE = "active.map"
ADMIN_SOCKET = "admin.sock"
SERVER_STATE_FILE = "server-state"


@dataclass(frozen=True)
class MemberView:
    """One server of a pool."""

    name: str
    """Member name; the HAProxy server name."""
    address: str
    """IPv4 or IPv6 literal (no brackets)."""
    port: int
    """1-65535."""
    weight: int = 100
    """0-256; 0 takes no new traffic."""
    state: str = "ready"
    """``ready``, ``drain`` (no new connections; rendered as weight 0) or ``maint``
    (out of rotation; rendered ``disabled``). Applied at runtime, no reload."""


@dataclass(frozen=True)
class PoolView:
    """One pool of a service; rendered as backend ``be_<service>:<pool>``."""

    name: str
    members: tuple[MemberView, ...] = ()


@dataclass(frozen=True)
class ServiceView:
    """One service: a frontend, one backend per pool, and the active pool."""

    name: str
    bind_host: str
    """IP literal, or ``*`` for every address."""
    bind_port: int
    active: str
    """The live pool. May name a pool with no entry in `pools` (an empty backend)."""
    pools: tuple[PoolView, ...] = ()
    mode: str = "http"
    """``http`` or ``tcp``."""
    balance: str = "roundrobin"
    """``roundrobin``, ``leastconn`` or ``source``."""
    health_path: str | None = None
    """HTTP check path; None means a TCP connect check."""
    health_interval_ms: int = 2000
    """Check interval, 100 ms - 1 h."""


@dataclass(frozen=True)
class GlobalView:
    """Process-wide settings: where the runtime files are, timeouts, reload limits."""

    map_path: str
    """The active-pool map file (`render_map` writes its content)."""
    admin_socket: str
    """The worker's stats socket (``level admin expose-fd listeners``)."""
    server_state_file: str
    """Where server weights/states are dumped before a reload and loaded after it."""
    hard_stop_after_s: int = 30
    """Old workers are killed this long after a reload even with connections left."""
    mworker_max_reloads: int = 50
    """Old workers that survived this many reloads are killed."""
    maxconn: int = 4096
    timeout_connect_ms: int = 1000
    timeout_client_ms: int = 30000
    timeout_server_ms: int = 30000
    timeout_http_request_ms: int = 10000
    timeout_http_keep_alive_ms: int = 10000
    timeout_check_ms: int = 2000
    retries: int = 3

    @classmethod
    def for_state_dir(cls, state_dir: str | os.PathLike[str]) -> GlobalView:
        """Settings whose runtime files live in `state_dir` (the adapter's layout)."""
        base = os.path.abspath(os.fspath(state_dir))
        return cls(
            map_path=os.path.join(base, MAP_FILE),
            admin_socket=os.path.join(base, ADMIN_SOCKET),
            server_state_file=os.path.join(base, SERVER_STATE_FILE),
        )


@dataclass(frozen=True)
class ProxyView:
    """Everything the HAProxy config is rendered from."""

    settings: GlobalView
    services: tuple[ServiceView, ...] = field(default=())


def frontend_name(service: str) -> str:
    """The HAProxy frontend of `service`."""
    return f"fe_{service}"


def backend_name(service: str, pool: str) -> str:
    """The HAProxy backend of `pool` of `service` (unambiguous: names have no ``:``)."""
    return f"be_{service}:{pool}"


def parse_backend_name(backend: str) -> tuple[str, str] | None:
    """(service, pool) of a backend named by `backend_name`, else None."""
    if not backend.startswith("be_"):
        return None
    service, sep, pool = backend[3:].partition(":")
    if not sep or not NAME_RE.match(service) or not NAME_RE.match(pool):
        return None
    return service, pool


def format_address(host: str, port: int) -> str:
    """``host:port`` as HAProxy reads it; IPv6 literals in brackets."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def sorted_view(view: ProxyView) -> ProxyView:
    """The same view with services, pools and members sorted by name (deterministic)."""
    services = []
    for svc in sorted(view.services, key=lambda s: s.name):
        pools = tuple(
            replace(p, members=tuple(sorted(p.members, key=lambda m: m.name)))
            for p in sorted(svc.pools, key=lambda p: p.name)
        )
        services.append(replace(svc, pools=pools))
    return replace(view, services=tuple(services))


# --- the allow-list check -------------------------------------------------------------


def _shown(value: object) -> str:
    return repr(value)[:80]


def _check_name(problems: list[Problem], key: str, fld: str, value: object) -> bool:
    if isinstance(value, str) and NAME_RE.match(value):
        return True
    problems.append(Problem(key, fld, "must be 1-63 characters of [A-Za-z0-9_.-]", _shown(value)))
    return False


def _check_int(
    problems: list[Problem], key: str, fld: str, value: object, lo: int, hi: int
) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        problems.append(Problem(key, fld, f"must be an integer {lo}-{hi}", _shown(value)))


def _is_ip(value: object) -> bool:
    if not isinstance(value, str) or not IP_CHARS_RE.match(value):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _check_ip(problems: list[Problem], key: str, fld: str, value: object) -> None:
    if not _is_ip(value):
        problems.append(Problem(key, fld, "must be an IPv4 or IPv6 literal", _shown(value)))


def _check_choice(
    problems: list[Problem], key: str, fld: str, value: object, choices: tuple[str, ...]
) -> None:
    if value not in choices:
        problems.append(Problem(key, fld, f"must be one of {', '.join(choices)}", _shown(value)))


def _safe_key(name: object) -> str:
    return name if isinstance(name, str) and NAME_RE.match(name) else _shown(name)


def _check_settings(problems: list[Problem], g: GlobalView) -> None:
    key = "haproxy settings"
    for fld in ("map_path", "admin_socket", "server_state_file"):
        value = getattr(g, fld)
        if not isinstance(value, str) or not FILE_PATH_RE.match(value) or "/../" in value:
            problems.append(
                Problem(key, fld, "must be an absolute path of [A-Za-z0-9/_.+-]", _shown(value))
            )
    _check_int(problems, key, "hard_stop_after_s", g.hard_stop_after_s, 1, 86400)
    _check_int(problems, key, "mworker_max_reloads", g.mworker_max_reloads, 1, 10000)
    _check_int(problems, key, "maxconn", g.maxconn, 1, 10_000_000)
    for fld in (
        "timeout_connect_ms",
        "timeout_client_ms",
        "timeout_server_ms",
        "timeout_http_request_ms",
        "timeout_http_keep_alive_ms",
        "timeout_check_ms",
    ):
        _check_int(problems, key, fld, getattr(g, fld), 1, 86_400_000)
    _check_int(problems, key, "retries", g.retries, 0, 100)


def _check_service(problems: list[Problem], svc: ServiceView) -> None:
    sname = _safe_key(svc.name)
    key = _KEYS.service_config(sname)
    _check_name(problems, _KEYS.service(sname), "service name", svc.name)
    if not (svc.bind_host == "*" or _is_ip(svc.bind_host)):
        problems.append(
            Problem(key, "bind host", "must be an IP literal or *", _shown(svc.bind_host))
        )
    _check_int(problems, key, "bind port", svc.bind_port, 1, 65535)
    _check_choice(problems, key, "mode", svc.mode, MODES)
    _check_choice(problems, key, "balance", svc.balance, BALANCES)
    if svc.health_path is not None and not (
        isinstance(svc.health_path, str) and HEALTH_PATH_RE.match(svc.health_path)
    ):
        problems.append(
            Problem(
                key,
                "health.path",
                "must start with / and use only [A-Za-z0-9/_.~%?=&+-]",
                _shown(svc.health_path),
            )
        )
    _check_int(problems, key, "health.interval_ms", svc.health_interval_ms, 100, 3_600_000)
    _check_name(problems, _KEYS.service_active(sname), "active", svc.active)
    seen_pools: set[str] = set()
    for pool in svc.pools:
        pname = _safe_key(pool.name)
        pkey = _KEYS.pool(sname, pname)
        if _check_name(problems, pkey, "pool name", pool.name):
            if pool.name in seen_pools:
                problems.append(Problem(pkey, "pool name", "duplicate pool", _shown(pool.name)))
            seen_pools.add(pool.name)
        seen_members: set[str] = set()
        for m in pool.members:
            mkey = _KEYS.member(sname, pname, _safe_key(m.name))
            if _check_name(problems, mkey, "member name", m.name):
                if m.name in seen_members:
                    problems.append(
                        Problem(mkey, "member name", "duplicate member", _shown(m.name))
                    )
                seen_members.add(m.name)
            _check_ip(problems, mkey, "address", m.address)
            _check_int(problems, mkey, "port", m.port, 1, 65535)
            _check_int(problems, mkey, "weight", m.weight, 0, 256)
            if m.state not in MEMBER_STATES:
                problems.append(Problem(mkey, "state", f"must be one of "
                                        f"{', '.join(MEMBER_STATES)}", _shown(m.state)))


def check_view(view: ProxyView) -> None:
    """Raise `ValidationError` listing every value that may not reach the template."""
    problems: list[Problem] = []
    _check_settings(problems, view.settings)
    seen: set[str] = set()
    binds: dict[tuple[str, int], str] = {}
    for svc in view.services:
        _check_service(problems, svc)
        if svc.name in seen:
            problems.append(
                Problem(_KEYS.service(_safe_key(svc.name)), "service name", "duplicate service")
            )
        seen.add(svc.name)
        bind = (str(svc.bind_host), svc.bind_port)
        other = binds.get(bind)
        if other is not None and other != svc.name:
            problems.append(
                Problem(
                    _KEYS.service_config(_safe_key(svc.name)),
                    "bind",
                    f"already used by service {_safe_key(other)}",
                    _shown(f"{bind[0]}:{bind[1]}"),
                )
            )
        binds.setdefault(bind, svc.name)
    if problems:
        raise ValidationError(problems)
