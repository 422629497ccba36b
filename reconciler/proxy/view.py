"""The renderer's input: frozen dataclasses describing the HAProxy config to write.

Owns `ProxyView` / `ServiceView` / `PoolView` / `MemberView` / `GlobalView`, the grouping
of services into frontends by bind (`FrontendView`, `RouteView`, `frontends`: several
services on one bind are routed by host name and path prefix, most specific first), the
naming of HAProxy sections (`frontend_name`, `backend_name`), and `check_view`, the renderer's
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
HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_RE = re.compile(rf"(?:\*\.)?{HOST_LABEL}(?:\.{HOST_LABEL}){{0,126}}\Z")
"""A routed host name (lower case) or ``*.suffix``."""
PATH_PREFIX_RE = re.compile(r"/[A-Za-z0-9/_.~%+-]{0,255}\Z")
"""A routed path prefix: no query, space, quote, ``#`` or control character."""
LOG_TARGET_RE = re.compile(r"(stdout|stderr|(?:udp@)?[0-9.]{7,15}:\d{1,5}"
                           r"|(?:udp@)?\[[0-9A-Fa-f:.]{2,45}\]:\d{1,5}|/[A-Za-z0-9/_.+-]{1,4095})\Z")
"""Where HAProxy sends its logs: stdout/stderr, a syslog IP:port, a unix socket path."""
STATS_USER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
RUN_AS_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")
STATS_PASSWORD_RE = re.compile(r"[A-Za-z0-9!%&()*+,./:;<=>?@^_{|}~-]{8,128}\Z")
"""Stats credentials: no space, quote, backslash, ``#`` or ``$`` (HAProxy's syntax)."""
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
CANARY_MAP_FILE = "canary.map"
CANARY_WEIGHT_MAP_FILE = "canary-weight.map"


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
    hosts: tuple[str, ...] = ()
    """Host names routed to this service on its bind (``*.suffix`` for any name below
    suffix); empty: the bind's default."""
    path_prefix: str | None = None
    """Only this path and below (``/api``: ``/api`` and ``/api/...``)."""
    tls_certs: str | None = None
    """TLS termination: the directory of PEM files HAProxy loads (``crt``; the daemon's
    validated copy in the state directory)."""
    redirect_http_port: int | None = None
    """With TLS: also listen on this port and redirect plain HTTP to https."""
    forwardfor: bool = True
    """``option forwardfor`` in http mode."""
    canary: str | None = None
    """A progressive cutover: the pool taking `canary_weight` percent of new requests
    (applied through the canary maps, no reload)."""
    canary_weight: int = 0
    """0-100."""


@dataclass(frozen=True)
class RouteView:
    """One routing rule of a shared frontend: requests whose Host is one of `hosts` (or
    ends with `suffix`) and whose path is `path_prefix` or below it go to `service`."""

    service: ServiceView
    hosts: tuple[str, ...] = ()
    """Exact host names (lower case)."""
    suffix: str | None = None
    """``.example.com`` for ``*.example.com``."""
    path_prefix: str | None = None
    index: int = 0
    """Position in the frontend (names its ACLs ``r<index>_host``/``r<index>_path``)."""
    slot: int = 0
    """Position of `service` in the frontend (names its canary variable)."""


@dataclass(frozen=True)
class FrontendView:
    """One ``bind``: one service (named ``fe_<service>``), or several routed apart."""

    name: str
    bind_host: str
    bind_port: int
    mode: str
    services: tuple[ServiceView, ...]
    """Sorted by name; `slot` of a route is an index into this."""
    routes: tuple[RouteView, ...] = ()
    """Rules in match order: exact hosts, then ``*.suffix`` (longest first), then
    path-only; within each, the longest path prefix first. Empty for one service."""
    default: ServiceView | None = None
    """The service without hosts and path prefix (the catch-all), if any."""
    default_slot: int = 0
    tls_certs: str | None = None
    redirect_http_port: int | None = None

    @property
    def shared(self) -> bool:
        return len(self.services) > 1 or bool(self.routes)


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
    canary_map_path: str = ""
    """Progressive cutovers: ``<service> <backend>`` of the pool taking a share."""
    canary_weight_map_path: str = ""
    """Progressive cutovers: ``<service> <percent>``."""
    log_target: str | None = None
    """``--haproxy-log``: stdout, stderr, a syslog ``IP:port`` or a unix socket path;
    None: no access log."""
    stats_host: str | None = None
    """``--haproxy-stats``: the stats page and ``/metrics`` listen here (None: off)."""
    stats_port: int = 8404
    stats_user: str = ""
    """From the credentials file (never from KV)."""
    stats_password: str = ""
    run_as: str | None = None
    """``user``/``group`` the workers drop root to (the master stays root, so reloads
    still read the config and bind low ports); None: workers run as the master does."""

    @classmethod
    def for_state_dir(cls, state_dir: str | os.PathLike[str], **extra: object) -> GlobalView:
        """Settings whose runtime files live in `state_dir` (the adapter's layout)."""
        base = os.path.abspath(os.fspath(state_dir))
        return cls(
            map_path=os.path.join(base, MAP_FILE),
            admin_socket=os.path.join(base, ADMIN_SOCKET),
            server_state_file=os.path.join(base, SERVER_STATE_FILE),
            canary_map_path=os.path.join(base, CANARY_MAP_FILE),
            canary_weight_map_path=os.path.join(base, CANARY_WEIGHT_MAP_FILE),
            **extra,  # type: ignore[arg-type]
        )

    @property
    def log_format(self) -> str:
        """HAProxy's ``log ... format``: raw lines on stdout/stderr, else RFC 3164."""
        return "raw" if self.log_target in ("stdout", "stderr") else "rfc3164"


@dataclass(frozen=True)
class ProxyView:
    """Everything the HAProxy config is rendered from."""

    settings: GlobalView
    services: tuple[ServiceView, ...] = field(default=())


def frontend_name(service: str) -> str:
    """The HAProxy frontend of `service`."""
    return f"fe_{service}"


def shared_frontend_name(host: str, port: int) -> str:
    """The frontend of a bind several services share: ``fe_bind:<host>:<port>``
    (``any`` for ``*``). ``:`` never occurs in a service name, so it cannot collide."""
    return f"fe_bind:{'any' if host == '*' else host}:{port}"


def _route_order(r: RouteView) -> tuple[int, int, int, str]:
    rank = 0 if r.hosts else (1 if r.suffix else 2)
    return (rank, -len(r.suffix or ""), -len(r.path_prefix or ""), r.service.name)


def frontends(view: ProxyView) -> tuple[FrontendView, ...]:
    """The services grouped by bind (host, port), in the order of their first service's
    name (a bind of one service stays where v1 had its frontend); each group's routes in
    match order. A bind with one service and no routing is rendered as before."""
    groups: dict[tuple[str, int], list[ServiceView]] = {}
    for svc in sorted(view.services, key=lambda s: s.name):
        groups.setdefault((svc.bind_host, svc.bind_port), []).append(svc)
    out = []
    for (host, port), svcs in sorted(groups.items(), key=lambda kv: kv[1][0].name):
        first = svcs[0]
        if len(svcs) == 1 and not first.hosts and first.path_prefix is None:
            out.append(FrontendView(frontend_name(first.name), host, port, first.mode,
                                    (first,), (), first, 0, first.tls_certs,
                                    first.redirect_http_port))
            continue
        routes: list[RouteView] = []
        default: ServiceView | None = None
        default_slot = 0
        for slot, svc in enumerate(svcs):
            exact = tuple(h for h in svc.hosts if not h.startswith("*."))
            if exact:
                routes.append(RouteView(svc, exact, None, svc.path_prefix, 0, slot))
            for h in svc.hosts:
                if h.startswith("*."):
                    routes.append(RouteView(svc, (), h[1:], svc.path_prefix, 0, slot))
            if not svc.hosts:
                if svc.path_prefix is None:
                    default, default_slot = svc, slot
                else:
                    routes.append(RouteView(svc, (), None, svc.path_prefix, 0, slot))
        ordered = tuple(replace(r, index=i) for i, r in enumerate(sorted(routes,
                                                                          key=_route_order)))
        name = shared_frontend_name(host, port) if len(svcs) > 1 else frontend_name(first.name)
        out.append(FrontendView(name, host, port, first.mode, tuple(svcs), ordered, default,
                                default_slot, first.tls_certs, first.redirect_http_port))
    return tuple(out)


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
    for fld in ("map_path", "admin_socket", "server_state_file", "canary_map_path",
                "canary_weight_map_path"):
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
    if g.run_as is not None and not (isinstance(g.run_as, str)
                                     and RUN_AS_RE.match(g.run_as)):
        problems.append(Problem(key, "run_as", "must be a user name of [a-z_][a-z0-9_-]",
                                _shown(g.run_as)))
    if g.log_target is not None and not (isinstance(g.log_target, str)
                                         and LOG_TARGET_RE.match(g.log_target)):
        problems.append(Problem(key, "log_target", "must be stdout, stderr, IP:port or an "
                                "absolute socket path", _shown(g.log_target)))
    if g.stats_host is not None:
        if not _is_ip(g.stats_host):
            problems.append(Problem(key, "stats_host", "must be an IP literal",
                                    _shown(g.stats_host)))
        _check_int(problems, key, "stats_port", g.stats_port, 1, 65535)
        if not (isinstance(g.stats_user, str) and STATS_USER_RE.match(g.stats_user)):
            problems.append(Problem(key, "stats_user", "must be 1-64 of [A-Za-z0-9_.-]"))
        if not (isinstance(g.stats_password, str)
                and STATS_PASSWORD_RE.match(g.stats_password)):
            # Never shown: it is a secret.
            problems.append(Problem(key, "stats_password", "must be 8-128 printable "
                                    "characters without space, quote, backslash, # or $"))


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
    if not isinstance(svc.hosts, tuple):
        problems.append(Problem(key, "hosts", "must be a tuple", _shown(svc.hosts)))
    else:
        for h in svc.hosts:
            if not (isinstance(h, str) and len(h) <= 253 and HOST_RE.match(h)):
                problems.append(Problem(key, "hosts", "must be lower-case host names or "
                                        "*.name", _shown(h)))
    if svc.path_prefix is not None and not (
            isinstance(svc.path_prefix, str) and PATH_PREFIX_RE.match(svc.path_prefix)):
        problems.append(Problem(key, "path_prefix", "must start with / and use only "
                                "[A-Za-z0-9/_.~%+-]", _shown(svc.path_prefix)))
    if (svc.hosts or svc.path_prefix is not None) and svc.mode != "http":
        problems.append(Problem(key, "hosts", "routing by host or path needs mode http"))
    if svc.tls_certs is not None and not (
            isinstance(svc.tls_certs, str) and FILE_PATH_RE.match(svc.tls_certs)
            and "/../" not in svc.tls_certs + "/"):
        problems.append(Problem(key, "tls.certs", "must be an absolute path of "
                                "[A-Za-z0-9/_.+-]", _shown(svc.tls_certs)))
    if svc.redirect_http_port is not None:
        _check_int(problems, key, "tls.redirect_http", svc.redirect_http_port, 1, 65535)
        if svc.tls_certs is None or svc.mode != "http":
            problems.append(Problem(key, "tls.redirect_http", "needs tls and mode http"))
    if not isinstance(svc.forwardfor, bool):
        problems.append(Problem(key, "forwardfor", "must be a boolean", _shown(svc.forwardfor)))
    if svc.canary is not None:
        _check_name(problems, _KEYS.service_cutover(sname), "to", svc.canary)
    _check_int(problems, _KEYS.service_cutover(sname), "weight", svc.canary_weight, 0, 100)
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


def _share_refused(a: ServiceView, b: ServiceView) -> str | None:
    """Why `a` and `b` cannot share one bind (None when they can; the model explains it
    better: this is the renderer's own line of defence)."""
    if a.mode != "http" or b.mode != "http":
        return " (only http services share a bind)"
    if (a.tls_certs, a.redirect_http_port) != (b.tls_certs, b.redirect_http_port):
        return " (with other TLS settings)"
    if a.path_prefix == b.path_prefix:
        if not a.hosts and not b.hosts:
            return "" if a.path_prefix is None else " (same path_prefix)"
        if set(a.hosts) & set(b.hosts):
            return " (same host and path)"
    return None


def check_view(view: ProxyView) -> None:
    """Raise `ValidationError` listing every value that may not reach the template."""
    problems: list[Problem] = []
    _check_settings(problems, view.settings)
    seen: set[str] = set()
    binds: dict[tuple[str, int], list[ServiceView]] = {}
    for svc in view.services:
        _check_service(problems, svc)
        if svc.name in seen:
            problems.append(
                Problem(_KEYS.service(_safe_key(svc.name)), "service name", "duplicate service")
            )
        seen.add(svc.name)
        bind = (str(svc.bind_host), svc.bind_port)
        for other in binds.get(bind, ()):
            why = _share_refused(svc, other)
            if why is not None:
                problems.append(Problem(_KEYS.service_config(_safe_key(svc.name)), "bind",
                                        f"already used by service {_safe_key(other.name)}"
                                        f"{why}", _shown(f"{bind[0]}:{bind[1]}")))
                break
        binds.setdefault(bind, []).append(svc)
    if problems:
        raise ValidationError(problems)
