"""Which proxy changes HAProxy can take through its runtime API, and which need a reload.

Owns `plan_runtime`, a pure function: from the config view last applied and the new one,
and both rendered configs, either the runtime operations that take the running HAProxy
from the old config to the new one, or the reason a reload is needed. Also the small
parser of rendered configs it relies on (`split_config`: the backends' ``server`` lines
apart from everything else). No I/O: reconciler.proxy.controller runs the plan through
reconciler.adapters.haproxy.

What goes at runtime (HAProxy 2.6 dynamic servers, no reload):

- a member added to an existing pool: ``add server`` with exactly the options of its
  rendered ``server`` line, preceded by those of the ``default-server`` lines in force
  (a dynamic server does not inherit them), then ``enable health`` (``check``) and
  ``enable server`` (unless rendered ``disabled``: a member in maintenance);
- a member removed: ``set server ... state maint`` then ``del server`` once its sessions
  ended (the adapter waits for them without blocking);
- a member's new address or port (``set server ... addr``), weight or admin state.

Anything else — a new or removed service, pool or bind, another mode, balance, health
check, TLS, template or setting — needs a reload, as does a server option a dynamic
server cannot take (the allow-list below is the 2.6 ``add server`` keyword list minus
what needs more than one word or another runtime step) or a backend whose algorithm is
static (``static-rr``, or hashing without ``hash-type consistent``). The rendered
configs must differ in their backends' ``server`` lines only: a user template that
renders something else from the members makes every member change a reload, so the
file and the running HAProxy never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from reconciler.proxy.view import (
    MemberView,
    PoolView,
    ProxyView,
    ServiceView,
    backend_name,
    format_address,
)

SECTION_KEYWORDS = frozenset((
    "global", "defaults", "frontend", "backend", "listen", "userlist", "peers",
    "resolvers", "cache", "program", "http-errors", "ring", "mailers", "fcgi-app"))
"""Keywords that open a section of haproxy.cfg (at the start of a line)."""

FLAG_OPTIONS = frozenset((
    "allow-0rtt", "backup", "check", "check-send-proxy", "check-ssl", "check-via-socks4",
    "disabled", "enabled", "force-sslv3", "force-tlsv10", "force-tlsv11", "force-tlsv12",
    "force-tlsv13", "no-ssl-reuse", "no-sslv3", "no-tlsv10", "no-tlsv11", "no-tlsv12",
    "no-tlsv13", "no-tls-tickets", "send-proxy", "send-proxy-v2", "send-proxy-v2-ssl",
    "send-proxy-v2-ssl-cn", "ssl", "tfo", "tls-tickets"))
"""Server keywords without an argument that ``add server`` accepts (HAProxy 2.6)."""

VALUE_OPTIONS = frozenset((
    "addr", "alpn", "ca-file", "check-alpn", "check-proto", "check-sni", "ciphers",
    "ciphersuites", "crl-file", "crt", "downinter", "error-limit", "fall", "fastinter",
    "id", "inter", "maxconn", "maxqueue", "minconn", "npn", "observe", "on-error",
    "on-marked-down", "on-marked-up", "pool-low-conn", "pool-max-conn",
    "pool-purge-delay", "port", "proto", "proxy-v2-options", "rise", "slowstart", "sni",
    "ssl-max-ver", "ssl-min-ver", "verify", "verifyhost", "weight", "ws"))
"""Server keywords with one argument that ``add server`` accepts. Left out on purpose:
``track`` (a dynamic server cannot track another one), ``agent-*`` (the agent may
enable the server by itself), ``source``/``usesrc`` (several words)."""

TOKEN_RE = re.compile(r"[A-Za-z0-9_.:/+@,()\[\]%=-]{1,256}\Z")
"""One word of a server line that may go to the CLI: no space, ``;``, ``#``, quote,
backslash or control character (the CLI splits on spaces and chains on ``;``)."""

DYNAMIC_BALANCES = frozenset(("roundrobin", "leastconn", "first", "random"))
"""Algorithms that take new servers at runtime; the hashing ones need ``hash-type
consistent``; ``static-rr`` never does."""

HASHING_BALANCES = frozenset(("source", "uri", "url_param", "hdr", "rdp-cookie", "hash"))


@dataclass(frozen=True)
class AddServer:
    """``add server <backend>/<server> <address> <options...>``, then enable it."""

    backend: str
    server: str
    address: str
    """``host:port`` as rendered (IPv6 in brackets)."""
    options: tuple[str, ...]
    """The rendered options, ``default-server`` ones first, without ``disabled`` and
    ``enabled`` (a dynamic server starts in maintenance; `enable` says what follows)."""
    health: bool
    """Rendered with ``check``: ``enable health`` after adding it."""
    enable: bool
    """Not rendered ``disabled``: ``enable server`` after adding it."""


@dataclass(frozen=True)
class DelServer:
    """Maintenance, then ``del server`` once the server's sessions ended."""

    backend: str
    server: str


@dataclass(frozen=True)
class SetAddr:
    """``set server <backend>/<server> addr <address> port <port>``."""

    backend: str
    server: str
    address: str
    """An IP literal (no brackets)."""
    port: int


@dataclass(frozen=True)
class SetState:
    backend: str
    server: str
    state: str
    """ready, drain or maint."""


@dataclass(frozen=True)
class SetWeight:
    backend: str
    server: str
    weight: int


RuntimeOp = AddServer | DelServer | SetAddr | SetState | SetWeight


@dataclass(frozen=True)
class RuntimePlan:
    """What `plan_runtime` found: `ops` to run (empty: nothing to do at runtime), or a
    `reload` reason (then `ops` is empty and the config goes through a reload)."""

    ops: tuple[RuntimeOp, ...] = ()
    reload: str | None = None


@dataclass(frozen=True)
class BackendLines:
    """One ``backend`` section of a rendered config."""

    defaults: tuple[str, ...] = ()
    """Words of the ``default-server`` lines in force (the defaults section's, then the
    backend's own), in order."""
    servers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Server name -> the words after it (the address first)."""
    balance: tuple[str, ...] = ()
    """The ``balance`` line's words in force (the backend's, else the defaults')."""
    hash_type: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplitConfig:
    """A rendered config split into its backends' server lines and everything else."""

    skeleton: tuple[str, ...]
    """Every line but the backends' ``server`` lines, in order."""
    backends: dict[str, BackendLines]


def split_config(text: str) -> SplitConfig:
    """Split `text` (haproxy.cfg as rendered) into its skeleton and backends."""
    skeleton: list[str] = []
    backends: dict[str, BackendLines] = {}
    section = ""
    current: str | None = None
    defaults = BackendLines()
    for line in text.splitlines():
        words = line.split()
        if line[:1] not in ("", " ", "\t", "#") and words and words[0] in SECTION_KEYWORDS:
            section = words[0]
            current = words[1] if section == "backend" and len(words) > 1 else None
            if section == "defaults":
                defaults = BackendLines()
            elif current is not None:
                backends[current] = BackendLines(defaults.defaults, {}, defaults.balance,
                                                 defaults.hash_type)
            skeleton.append(line)
            continue
        if not words or words[0].startswith("#"):
            skeleton.append(line)
            continue
        key, rest = words[0], tuple(words[1:])
        if section == "defaults":
            if key == "default-server":
                defaults = replace(defaults, defaults=defaults.defaults + rest)
            elif key == "balance":
                defaults = replace(defaults, balance=rest)
            elif key == "hash-type":
                defaults = replace(defaults, hash_type=rest)
        elif current is not None:
            be = backends[current]
            if key == "server" and rest:
                be.servers[rest[0]] = rest[1:]
                continue  # not in the skeleton
            if key == "default-server":
                backends[current] = replace(be, defaults=be.defaults + rest)
            elif key == "balance":
                backends[current] = replace(be, balance=rest)
            elif key == "hash-type":
                backends[current] = replace(be, hash_type=rest)
        skeleton.append(line)
    return SplitConfig(tuple(skeleton), backends)


def server_options(words: tuple[str, ...]) -> str | None:
    """Why the server options `words` cannot go to ``add server`` (None: they can)."""
    i = 0
    while i < len(words):
        w = words[i]
        if not TOKEN_RE.match(w):
            return f"option word {w[:40]!r} is not allowed on the CLI"
        if w in FLAG_OPTIONS:
            i += 1
        elif w in VALUE_OPTIONS:
            if i + 1 >= len(words) or not TOKEN_RE.match(words[i + 1]):
                return f"option {w!r} has no usable value"
            i += 2
        else:
            return f"option {w!r} cannot be given to a dynamic server"
    return None


def _dynamic_balance(be: BackendLines) -> str | None:
    """Why `be` cannot take servers at runtime (None: it can)."""
    algo = be.balance[0] if be.balance else "roundrobin"
    if algo in DYNAMIC_BALANCES:
        return None
    if algo in HASHING_BALANCES and be.hash_type[:1] == ("consistent",):
        return None
    return f"balance {algo} is static (dynamic servers need a dynamic algorithm)"


def _strip_members(svc: ServiceView) -> ServiceView:
    return replace(svc, pools=tuple(PoolView(p.name) for p in svc.pools))


def _line_rest(words: tuple[str, ...]) -> tuple[str, ...]:
    """A server line's words without the address, weight and disabled (what a runtime
    change of a member may change)."""
    out: list[str] = []
    skip = False
    for w in words[1:]:
        if skip:
            skip = False
        elif w == "weight":
            skip = True
        elif w != "disabled":
            out.append(w)
    return tuple(out)


def _add(backend: str, m: MemberView, be: BackendLines) -> AddServer | str:
    words = be.servers.get(m.name)
    if words is None:
        return f"no server line for {backend}/{m.name} in the rendered config"
    if not words or words[0] != format_address(m.address, m.port):
        return f"the server line of {backend}/{m.name} does not start with its address"
    options = be.defaults + words[1:]
    why = server_options(options)
    if why is not None:
        return f"{backend}/{m.name}: {why}"
    why = _dynamic_balance(be)
    if why is not None:
        return f"{backend}: {why}"
    enable = True
    for w in options:
        if w in ("disabled", "enabled"):
            enable = w == "enabled"
    kept = tuple(w for w in options if w not in ("disabled", "enabled"))
    return AddServer(backend, m.name, words[0], kept, "check" in kept, enable)


def _member_ops(backend: str, ma: MemberView, mb: MemberView) -> list[RuntimeOp]:
    ops: list[RuntimeOp] = []
    if (ma.address, ma.port) != (mb.address, mb.port):
        ops.append(SetAddr(backend, mb.name, mb.address, mb.port))
    if mb.state != ma.state:
        ops.append(SetState(backend, mb.name, mb.state))
    # Leaving drain (rendered weight 0) sets the weight again: a member that came in
    # drained through the config file has weight 0 in HAProxy, not its own.
    if mb.weight != ma.weight or (ma.state == "drain" and mb.state != "drain"):
        ops.append(SetWeight(backend, mb.name, mb.weight))
    return ops


def plan_runtime(old: ProxyView, new: ProxyView, old_cfg: str, new_cfg: str
                 ) -> RuntimePlan:
    """The runtime operations taking HAProxy from (`old`, `old_cfg`) to (`new`,
    `new_cfg`), or why that needs a reload. `old`/`new` are the config views (pools
    and members sorted, see `config_view`) the configs were rendered from."""
    if old.settings != new.settings:
        return RuntimePlan(reload="global settings changed")
    if [s.name for s in old.services] != [s.name for s in new.services]:
        return RuntimePlan(reload="services added or removed")
    for a, b in zip(old.services, new.services, strict=True):
        if _strip_members(a) != _strip_members(b):
            return RuntimePlan(reload=f"service {b.name} changed beyond its members")
    if old_cfg == new_cfg:
        return RuntimePlan()
    before, after = split_config(old_cfg), split_config(new_cfg)
    if before.skeleton != after.skeleton:
        return RuntimePlan(reload="the config differs outside its server lines")
    adds: list[RuntimeOp] = []
    changes: list[RuntimeOp] = []
    removals: list[RuntimeOp] = []
    for svc_a, svc_b in zip(old.services, new.services, strict=True):
        for pa, pb in zip(svc_a.pools, svc_b.pools, strict=True):
            backend = backend_name(svc_b.name, pb.name)
            be_a, be_b = before.backends.get(backend), after.backends.get(backend)
            if be_a is None or be_b is None:
                return RuntimePlan(reload=f"no backend {backend} in the rendered config")
            old_m = {m.name: m for m in pa.members}
            new_m = {m.name: m for m in pb.members}
            for name, m in new_m.items():
                if name in old_m:
                    ma = old_m[name]
                    if _line_rest(be_a.servers.get(name, ())) != \
                            _line_rest(be_b.servers.get(name, ())):
                        return RuntimePlan(reload=f"the server line of {backend}/{name} "
                                           "changed beyond address, weight and state")
                    changes += _member_ops(backend, ma, m)
                    continue
                op = _add(backend, m, be_b)
                if isinstance(op, str):
                    return RuntimePlan(reload=op)
                adds.append(op)
            removals += [DelServer(backend, name) for name in old_m if name not in new_m]
    # New members first (capacity before it is taken away), removals last.
    return RuntimePlan(ops=(*adds, *changes, *removals))


def describe(op: RuntimeOp) -> str:
    """One op for the log: ``be_web:blue/b2 added`` and the like."""
    where = f"{op.backend}/{op.server}"
    if isinstance(op, AddServer):
        return f"{where} added" + ("" if op.enable else " (maint)")
    if isinstance(op, DelServer):
        return f"{where} removed"
    if isinstance(op, SetAddr):
        return f"{where} addr {format_address(op.address, op.port)}"
    if isinstance(op, SetState):
        return f"{where} {op.state}"
    return f"{where} weight {op.weight}"
