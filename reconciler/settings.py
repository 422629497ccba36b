"""Settings: grouped, frozen dataclasses with a default and a docstring per field.

Built from the command line and `RECONCILER_*` environment variables by the CLI; the Consul
connection itself follows Consul's own variables (see `adapters.consul_kv.ConsulSettings`).
"""

from __future__ import annotations

import fnmatch
import functools
import grp
import ipaddress
import os
import pwd
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.errors import ConfigurationError
from reconciler.model import DEFAULT_PREFIX, NAME_RE, normalize_prefix


def env_prefix(environ: Mapping[str, str] = os.environ) -> str:
    """The KV prefix from RECONCILER_PREFIX, normalised to end in '/'."""
    return normalize_prefix(environ.get("RECONCILER_PREFIX", DEFAULT_PREFIX))


def default_workers(cpus: int | None = None) -> int:
    """How many keys the daemon reconciles at once: one per CPU, at least 2 (one Docker
    or Consul call that waits does not stop everything) and at most 4. The work is
    Python's under one GIL plus short system calls: on 2 CPUs, 4 workers attached 500
    containers no faster than 2, with a tenth more of the daemon's CPU, a fifth more of
    ovs-vswitchd's, and the ports on the bridge a fifth later (bench/attach.py, seven
    alternating pairs, docs/performance.md). CPUs: those this process may run on (a
    daemon pinned by its container or unit counts its own, not the host's)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) or 2
    return min(4, max(2, cpus))


def default_node(environ: Mapping[str, str] = os.environ) -> str:
    """The node name: RECONCILER_NODE, else the host name (first label)."""
    node = environ.get("RECONCILER_NODE") or socket.gethostname().split(".")[0]
    if not NAME_RE.match(node):
        raise ConfigurationError(
            f"node name {node!r} is not 1-63 characters of [A-Za-z0-9_.-]; pass --node")
    return node


def default_ovs_db(environ: Mapping[str, str] = os.environ) -> str:
    """RECONCILER_OVS_DB, else the socket in $OVS_RUNDIR (as ovs-vsctl finds it), else
    the system's."""
    rundir = environ.get("OVS_RUNDIR") or "/var/run/openvswitch"
    return environ.get("RECONCILER_OVS_DB") or f"unix:{rundir}/db.sock"


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of an environment file as systemd's ``EnvironmentFile=`` reads
    them (``#``/``;`` comments, optional ``export``, one level of quotes)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"environment file {path}: cannot read it "
                                 f"({getattr(e, 'strerror', None) or type(e).__name__})"
                                 ) from None
    env: dict[str, str] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        line = line.removeprefix("export ").lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigurationError(f"environment file {path}, line {n}: not KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def default_haproxy_user(environ: Mapping[str, str] = os.environ) -> str | None:
    """RECONCILER_HAPROXY_USER (``root`` or empty: None), else ``haproxy`` when that user
    and group exist (as Debian's haproxy package makes them), else None."""
    value = environ.get("RECONCILER_HAPROXY_USER")
    if value is not None:
        return None if value in ("", "root") else value
    try:
        pwd.getpwnam("haproxy")
        grp.getgrnam("haproxy")
    except KeyError:
        return None
    return "haproxy"


@dataclass(frozen=True)
class NetworkSettings:
    """How container networking is applied on this host."""

    ovs_db: str = "unix:/var/run/openvswitch/db.sock"
    """OVSDB connection string."""
    ovs_datapath: str = "auto"
    """`auto` (kernel datapath when its module works, else `netdev`), `system` or `netdev`."""
    advertise: str | None = None
    """This host's underlay address for overlays (None: the source address towards
    Consul, found at start)."""


@dataclass(frozen=True)
class ProxySettings:
    """How HAProxy is run and reloaded."""

    state_dir: str = "/var/lib/reconciler"
    """Where the daemon keeps haproxy.cfg, the map and server-state files, sockets."""
    templates_dir: str | None = None
    """User templates; None uses the project's templates/."""
    haproxy_bin: str = "haproxy"
    """The HAProxy binary."""
    master_socket: str | None = None
    """Drive an HAProxy run by someone else (systemd) through this master socket."""
    config_path: str | None = None
    """With master_socket: the config file that HAProxy loads."""
    quiet_min: float = 0.05
    """Quiescence window: wait this long after a change for more changes."""
    quiet_max: float = 0.5
    """...but never longer than this after the first change."""
    log_target: str | None = None
    """`--haproxy-log`: HAProxy's access log goes to `stdout` (of the HAProxy process:
    haproxy.log in the state dir), `stderr`, a syslog `IP:port` (UDP) or a unix socket
    path; None: no access log."""
    stats_bind: tuple[str, int] | None = None
    """`--haproxy-stats HOST:PORT`: the stats page and `/metrics` listen here."""
    stats_auth_file: str | None = None
    """`--haproxy-stats-auth FILE`: one line `user:password` (never from KV or argv)."""
    serve: tuple[str, ...] = ("*",)
    """`--serve`: the services this host's HAProxy serves (shell patterns of names; all by
    default). The members of the others are not even read (issue 9)."""
    run_as: str | None = None
    """`--haproxy-user`: HAProxy's workers drop root to this user and its group of the
    same name (Debian's package creates `haproxy`); None: they keep the master's user."""
    cutover_poll: float = 0.5
    """While a progressive cutover runs: seconds between reads of HAProxy's counters
    (published in the node status for the command driving it)."""


_SERVE_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,63}\Z")


def parse_serve(value: str | None) -> tuple[str, ...]:
    """`--serve web,api-*`: comma-separated shell patterns of service names (`*`, `?`,
    `[...]`); empty or None: every service. Raises ConfigurationError for anything else."""
    if not value or not value.strip():
        return ("*",)
    out: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if not _SERVE_RE.match(part):
            raise ConfigurationError(f"--serve {part!r}: a service name or pattern of "
                                     "[A-Za-z0-9_.-] and *, ?, [...] (comma-separated)")
        out.append(part)
    return tuple(out)


@functools.lru_cache(maxsize=1 << 16)
def serves(patterns: tuple[str, ...], service: str) -> bool:
    """Whether `service` is among the services `patterns` (`--serve`) name (memoised:
    asked for every service at every read of the members' index)."""
    return patterns == ("*",) or any(fnmatch.fnmatchcase(service, p) for p in patterns)


_LOG_TARGET_RE = re.compile(r"(?:udp@)?(\[[0-9A-Fa-f:.]+\]|[0-9.]+):(\d{1,5})\Z")


def parse_log_target(value: str | None) -> str | None:
    """`--haproxy-log`: stdout, stderr, IP:port / [IPv6]:port (syslog over UDP), or an
    absolute unix socket path; '' / off / None: no access log."""
    if value is None or value in ("", "off", "none"):
        return None
    if value in ("stdout", "stderr"):
        return value
    if value.startswith("/"):
        if not re.fullmatch(r"/[A-Za-z0-9/_.+-]{1,4095}", value) or "/../" in value:
            raise ConfigurationError(f"--haproxy-log {value!r}: a socket path of "
                                     "[A-Za-z0-9/_.+-]")
        return value
    m = _LOG_TARGET_RE.match(value)
    if m:
        try:
            ipaddress.ip_address(m.group(1).strip("[]"))
        except ValueError:
            m = None
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ConfigurationError(f"--haproxy-log {value!r}: stdout, stderr, IP:port, "
                                 "[IPv6]:port or an absolute socket path")
    return value


def parse_stats_bind(value: str | None) -> tuple[str, int] | None:
    """`--haproxy-stats`: IP:port or [IPv6]:port; '' / off / None: no stats listener."""
    if value is None or value in ("", "off"):
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", value)
    try:
        if not m:
            raise ValueError(value)
        host = str(ipaddress.ip_address(m.group(1) or m.group(3)))
        port = int(m.group(2) or m.group(4))
        if not 1 <= port <= 65535:
            raise ValueError(value)
    except ValueError:
        raise ConfigurationError(f"--haproxy-stats {value!r}: IP:port, e.g. "
                                 "127.0.0.1:8404") from None
    return host, port


def read_stats_auth(path: str) -> tuple[str, str]:
    """(user, password) from the credentials file: one line `user:password`. The
    password is never put in an error message."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"--haproxy-stats-auth {path}: cannot read it "
                                 f"({getattr(e, 'strerror', None) or type(e).__name__})"
                                 ) from None
    user, sep, password = line.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", user) or not re.fullmatch(
            r"[A-Za-z0-9!%&()*+,./:;<=>?@^_{|}~-]{8,128}", password):
        raise ConfigurationError(
            f"--haproxy-stats-auth {path}: must hold one line user:password (user 1-64 of "
            "[A-Za-z0-9_.-]; password 8-128 printable characters without space, quote, "
            "backslash, # or $)")
    return user, password


@dataclass(frozen=True)
class ObserveSettings:
    """What the daemon tells the outside: health, metrics (reconciler.observe)."""

    listen: tuple[str, int] | None = ("127.0.0.1", 9901)
    """Where /livez, /readyz and /metrics are served (None: nowhere)."""
    unready_after: float = 60.0
    """A key failing for longer than this many seconds makes /readyz fail."""
    stuck_after: float = 300.0
    """A reconcile running for longer than this many seconds makes /livez fail."""


@dataclass(frozen=True)
class Settings:
    """Everything the daemon and the CLI need, grouped."""

    prefix: str = DEFAULT_PREFIX
    """KV prefix, ending in '/'."""
    node: str = field(default_factory=lambda: default_node())
    """This host's node name in status, allocations and published members."""
    resync: float = 30.0
    """Seconds between full resyncs."""
    workers: int = field(default_factory=default_workers)
    """Keys reconciled at once (`default_workers`)."""
    network: NetworkSettings = field(default_factory=NetworkSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    observe: ObserveSettings = field(default_factory=ObserveSettings)
