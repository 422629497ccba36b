"""The desired-state model: frozen dataclasses parsed and validated once at the boundary.

Owns the parsing of KV values and state files into `DesiredState`, and every validation
rule of the contract (../docs/kv-layout.md lists them). Which key holds what is
reconciler.kvlayout's (re-exported here: NAME_RE, KeyRef, classify_key, KVEntry, ...).

Parsing never raises for bad input: each invalid key becomes one or more `Problem`s naming
the key (or file location), the field, the bad value and the reason, and only that key
(and what depends on it) is left out of the model. The rest stays usable, because the
daemon reconciles everything that is valid and reports the rest.

When two valid keys conflict (overlapping subnets that are not isolated, one static
address used twice, two services on one bind), the *older* key keeps its claim (lower
Consul CreateIndex; file order for state files) and the newer one is reported, so adding
a bad key never tears down something that already works.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, TypeVar, cast

from reconciler.errors import Problem
from reconciler.kvlayout import DEFAULT_PREFIX as DEFAULT_PREFIX
from reconciler.kvlayout import NAME_RE as NAME_RE
from reconciler.kvlayout import POLICY_KEY, Layout
from reconciler.kvlayout import KeyRef as KeyRef
from reconciler.kvlayout import KVEntry as KVEntry
from reconciler.kvlayout import classify_key as classify_key
from reconciler.kvlayout import normalize_prefix as normalize_prefix

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# \Z, not $: `$` also matches before a trailing newline ("web\n" would pass).
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")  # IFNAMSIZ 16 incl. NUL
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")
# The same set the renderer accepts (proxy/view.py): what is valid here must render.
HEALTH_PATH_RE = re.compile(r"/[A-Za-z0-9/_.~%?=&+-]{0,255}\Z")
# Host names routed on a shared bind: lower-case DNS labels, or `*.` + a name (issue 13).
HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_RE = re.compile(rf"(?:\*\.)?{HOST_LABEL}(?:\.{HOST_LABEL})*\Z")
# A path prefix: URL path characters only (no query, spaces, quotes, # or controls).
PATH_PREFIX_RE = re.compile(r"/[A-Za-z0-9/_.~%+-]{0,255}\Z")
# A directory on the host (certificates): absolute, plain characters, no `..`.
DIR_RE = re.compile(r"/[A-Za-z0-9/_.+-]{0,4095}\Z")
CUTOVER_STATES = ("running", "done", "rolled_back", "aborted")

DRIVERS = ("ovs", "linux")
MODES = ("http", "tcp")
BALANCES = ("roundrobin", "leastconn", "source")
MEMBER_STATES = ("ready", "drain", "maint")
MTU_MIN, MTU_MAX = 576, 9000
VLAN_MIN, VLAN_MAX = 1, 4094
WEIGHT_MIN, WEIGHT_MAX = 0, 256
HEALTH_INTERVAL_MIN_MS, HEALTH_INTERVAL_MAX_MS = 100, 3_600_000
AUTO = "auto"
EXTERNAL = "external"
"""The reserved group of every address that is not a container interface."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class AddressPool:
    """Inclusive range of addresses handed out to `auto` interfaces."""

    start: IPAddress
    end: IPAddress

    def __contains__(self, addr: object) -> bool:
        if not isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return addr.version == self.start.version and self.start <= addr <= self.end  # type: ignore[operator]

    @property
    def size(self) -> int:
        return int(self.end) - int(self.start) + 1


VNI_MIN, VNI_MAX = 1, 16777215
VXLAN_PORT = 4789


@dataclass(frozen=True)
class Overlay:
    """`overlay` of a network: a VXLAN segment spanning every host that has the network."""

    vni: int
    port: int = VXLAN_PORT


@dataclass(frozen=True)
class Network:
    """`networks/<name>`: an L2 segment on a host bridge (with `overlay`, one segment
    across hosts)."""

    name: str
    subnet: IPNetwork
    bridge: str
    driver: Literal["ovs", "linux"] = "ovs"
    vlan: int | None = None
    gateway: IPAddress | None = None
    mtu: int | None = None
    pool: AddressPool | None = None
    overlay: Overlay | None = None

    def isolated_from(self, other: Network) -> bool:
        """True when traffic cannot cross between the two networks at L2."""
        if self.bridge != other.bridge:
            return True
        return self.vlan is not None and other.vlan is not None and self.vlan != other.vlan


@dataclass(frozen=True)
class Route:
    """An extra route inside a container."""

    dst: IPNetwork
    via: IPAddress


@dataclass(frozen=True)
class InterfaceSpec:
    """One interface wanted inside matching containers."""

    name: str
    network: str
    address: IPInterface | None  # None means "auto" (allocated from the network's pool)
    mac: str | None = None
    gateway: IPAddress | None = None  # resolved: `true` becomes the network's gateway
    routes: tuple[Route, ...] = ()
    mtu: int | None = None


@dataclass(frozen=True)
class ContainerSpec:
    """`containers/<name>`: interfaces for containers named <name> or labelled with it."""

    name: str
    interfaces: tuple[InterfaceSpec, ...]
    group: str | None = None
    """The policy group of every interface of the matching containers (None: none)."""


@dataclass(frozen=True)
class Policy:
    """`policy`: group isolation. A group not in `isolate` talks to anyone; an isolated
    group's interfaces accept new connections only from the groups `allow` pairs with it
    (`(a, b)`: a may open connections to b; one-way; replies always pass)."""

    isolate: tuple[str, ...] = ()
    allow: tuple[tuple[str, str], ...] = ()

    def allows(self, src: str, dst: str) -> bool:
        """Whether group `src` may open a connection to group `dst`."""
        return dst not in self.isolate or (src, dst) in self.allow


@dataclass(frozen=True)
class HealthCheck:
    path: str
    interval_ms: int = 2000


@dataclass(frozen=True)
class TlsConfig:
    """`tls` of a service config: TLS termination on its bind (issue 13)."""

    certs: str
    """A directory on the host holding PEM files (certificate + key each); SNI picks."""
    redirect_http: int | None = None
    """Also listen on this port of the bind's host and redirect plain HTTP to https."""


@dataclass(frozen=True)
class ServiceConfig:
    """`services/<name>/config`: one HAProxy frontend (or a share of one: several
    services may route on one bind by host name and path) and its health check."""

    bind_host: str  # an IP literal, or "*" for every address
    bind_port: int
    mode: Literal["http", "tcp"] = "http"
    balance: Literal["roundrobin", "leastconn", "source"] = "roundrobin"
    health: HealthCheck | None = None
    hosts: tuple[str, ...] = ()
    """Host names (lower case; `*.suffix` for any name below suffix) routed to this
    service on a shared bind; empty: the bind's default service."""
    path_prefix: str | None = None
    """Only requests whose path is this prefix or below it (`/api`: `/api`, `/api/x`)."""
    tls: TlsConfig | None = None
    forwardfor: bool = True
    """`option forwardfor` (X-Forwarded-For) in http mode."""

    @property
    def bind(self) -> str:
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"{host}:{self.bind_port}"


@dataclass(frozen=True)
class Member:
    """`services/<s>/pools/<p>/<name>`: one backend server."""

    name: str
    address: IPAddress
    port: int
    weight: int = 100
    published_by: str | None = None  # Consul session of the node that published it
    state: Literal["ready", "drain", "maint"] = "ready"


@dataclass(frozen=True)
class Canary:
    """`services/<s>/cutover`: a progressive cutover's share of new requests."""

    to: str
    """The pool taking the share."""
    weight: int
    """Percent of new requests sent to `to` (0-100)."""
    state: Literal["running", "done", "rolled_back", "aborted"] = "running"
    held: bool = True
    """The key is held by the session of the command driving it. A running cutover
    whose driver is gone (session invalidated) sends nothing to `to`: it is aborted."""

    @property
    def share(self) -> int:
        """The percentage HAProxy applies (0 unless running and driven)."""
        return self.weight if self.state == "running" and self.held else 0


@dataclass(frozen=True)
class Service:
    """A service: its config, the live pool, and every pool's members."""

    name: str
    config: ServiceConfig
    active: str | None  # None when missing or invalid; see Problems
    pools: Mapping[str, Mapping[str, Member]] = field(default_factory=dict)
    canary: Canary | None = None


@dataclass(frozen=True)
class DesiredState:
    """Everything valid under the prefix, plus a Problem for everything that is not."""

    networks: Mapping[str, Network] = field(default_factory=dict)
    containers: Mapping[str, ContainerSpec] = field(default_factory=dict)
    services: Mapping[str, Service] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()
    policy: Policy = field(default_factory=Policy)

    @property
    def invalid_keys(self) -> frozenset[str]:
        return frozenset(p.key for p in self.problems)


# ------------------------------------------------------------------- validation


_NO_VALUE: Any = object()


class _Checker:
    """Collects problems for one key while converting its raw value."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.problems: list[Problem] = []

    def add(self, fld: str, reason: str, value: Any = _NO_VALUE) -> None:
        shown = "" if value is _NO_VALUE else _show(value)
        self.problems.append(Problem(self.where, fld, reason, shown))

    @property
    def ok(self) -> bool:
        return not self.problems

    def obj(self, raw: Any, fld: str, allowed: Iterable[str], required: Iterable[str] = ()
            ) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.add(fld, f"must be a JSON object, not {_typename(raw)}", raw)
            return None
        allowed_set = set(allowed)
        for k in raw:
            if k not in allowed_set:
                allowed_s = ", ".join(sorted(allowed_set))
                self.add(_join(fld, str(k)), f"unknown field (allowed: {allowed_s})")
        for k in required:
            if k not in raw or raw[k] is None:
                self.add(_join(fld, k), "required")
        return raw

    def string(self, raw: dict[str, Any], fld: str, path: str) -> str | None:
        v = raw.get(fld)
        if v is None:
            return None
        if not isinstance(v, str):
            self.add(_join(path, fld), f"must be a string, not {_typename(v)}", v)
            return None
        return v

    def integer(self, raw: dict[str, Any], fld: str, path: str, lo: int, hi: int) -> int | None:
        v = raw.get(fld)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.add(_join(path, fld), f"must be an integer, not {_typename(v)}", v)
            return None
        if not lo <= v <= hi:
            self.add(_join(path, fld), f"must be between {lo} and {hi}", v)
            return None
        return v


def _join(path: str, fld: str) -> str:
    return f"{path}.{fld}" if path else fld


def _typename(v: Any) -> str:
    return {
        dict: "an object", list: "an array", str: "a string", bool: "a boolean",
        int: "a number", float: "a number", type(None): "null",
    }.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    try:
        s = json.dumps(v, ensure_ascii=True)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def decode_json(where: str, raw: bytes) -> tuple[Any, list[Problem]]:
    """KV bytes → JSON value, or a Problem naming the key and the decode error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [Problem(where, "", f"value is not UTF-8 ({e.reason} at byte {e.start})")]
    if not text.strip():
        return None, [Problem(where, "", "value is empty; expected a JSON object")]
    try:
        return json.loads(text, parse_constant=_reject_constant), []
    except (ValueError, RecursionError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        pos = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        return None, [Problem(where, "", f"invalid JSON: {msg}{pos}")]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_ip(c: _Checker, v: Any, fld: str) -> IPAddress | None:
    if not isinstance(v, str):
        c.add(fld, f"must be an IP address string, not {_typename(v)}", v)
        return None
    try:
        addr = ipaddress.ip_address(v)
    except ValueError:
        c.add(fld, "not a valid IPv4 or IPv6 address", v)
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        c.add(fld, "must not carry an IPv6 zone (%...)", v)
        return None
    return addr


def parse_network(where: str, name: str, raw: Any) -> tuple[Network | None, list[Problem]]:
    c = _Checker(where)
    d = c.obj(raw, "", ("subnet", "bridge", "driver", "vlan", "gateway", "mtu", "pool",
                        "overlay"), required=("subnet", "bridge"))
    if d is None:
        return None, c.problems
    subnet: IPNetwork | None = None
    s = c.string(d, "subnet", "")
    if s is not None:
        try:
            if "%" in s:
                raise ValueError("zone")
            subnet = ipaddress.ip_network(s, strict=True)
        except ValueError as e:
            reason = "host bits set; use the network address" if "host bits" in str(e) \
                else "not a valid IPv4 or IPv6 CIDR"
            c.add("subnet", reason, s)
    bridge = c.string(d, "bridge", "")
    if bridge is not None and not IFNAME_RE.match(bridge):
        c.add("bridge", "must be 1-15 characters of [A-Za-z0-9_.-] (a Linux interface name)",
              bridge)
    driver = c.string(d, "driver", "") or "ovs"
    if driver not in DRIVERS:
        c.add("driver", f"must be one of {', '.join(DRIVERS)}", driver)
    vlan = c.integer(d, "vlan", "", VLAN_MIN, VLAN_MAX)
    if vlan is not None and driver == "linux":
        c.add("vlan", "only the ovs driver supports vlan", vlan)
    mtu = c.integer(d, "mtu", "", MTU_MIN, MTU_MAX)
    gateway = None
    if d.get("gateway") is not None:
        gateway = _parse_ip(c, d["gateway"], "gateway")
        if gateway is not None and subnet is not None:
            _check_host_in_subnet(c, "gateway", gateway, subnet)
    pool = None
    if d.get("pool") is not None:
        p = c.obj(d["pool"], "pool", ("start", "end"), required=("start", "end"))
        if p is not None and "start" in p and "end" in p:
            start = _parse_ip(c, p["start"], "pool.start")
            end = _parse_ip(c, p["end"], "pool.end")
            if start is not None and end is not None and subnet is not None:
                for f, a in (("pool.start", start), ("pool.end", end)):
                    _check_host_in_subnet(c, f, a, subnet)
                if start.version == end.version and start > end:  # type: ignore[operator]
                    c.add("pool", "start must not be after end", d["pool"])
                elif c.ok:
                    pool = AddressPool(start, end)
    overlay = None
    if d.get("overlay") is not None:
        o = c.obj(d["overlay"], "overlay", ("vni", "port"), required=("vni",))
        if o is not None:
            vni = c.integer(o, "vni", "overlay", VNI_MIN, VNI_MAX)
            port = c.integer(o, "port", "overlay", 1, 65535)
            if subnet is not None and subnet.version != 4:
                c.add("overlay", "overlay networks are IPv4 only", d["overlay"])
            if gateway is not None and pool is None:
                # Each host takes its own address from the pool, to reach remote
                # containers with (the gateway address is the same on every host).
                c.add("pool", "an overlay network with a gateway needs a pool (each host "
                      "takes its own address from it)")
            if vni is not None:
                overlay = Overlay(vni, port if port is not None else VXLAN_PORT)
    if not c.ok or subnet is None or bridge is None:
        return None, c.problems
    return Network(name, subnet, bridge, driver, vlan, gateway, mtu, pool,  # type: ignore[arg-type]
                   overlay), []


def _check_host_in_subnet(c: _Checker, fld: str, addr: IPAddress, subnet: IPNetwork) -> bool:
    if addr.version != subnet.version or addr not in subnet:
        c.add(fld, f"must be inside the subnet {subnet}", str(addr))
        return False
    if subnet.version == 4 and subnet.prefixlen < 31 and addr in (
        subnet.network_address, subnet.broadcast_address
    ):
        c.add(fld, f"is the network or broadcast address of {subnet}", str(addr))
        return False
    if subnet.version == 6 and subnet.prefixlen < 127 and addr == subnet.network_address:
        c.add(fld, f"is the subnet-router anycast address of {subnet}", str(addr))
        return False
    return True


def parse_container(
    where: str, name: str, raw: Any, networks: Mapping[str, Network],
    invalid_networks: Mapping[str, str],
) -> tuple[ContainerSpec | None, list[Problem]]:
    c = _Checker(where)
    d = c.obj(raw, "", ("interfaces", "group"), required=("interfaces",))
    if d is None or d.get("interfaces") is None:
        return None, c.problems
    group = c.string(d, "group", "")
    if group is not None:
        if not NAME_RE.match(group):
            c.add("group", "must be 1-63 characters of [A-Za-z0-9_.-]", group)
        elif group == EXTERNAL:
            c.add("group", f"{EXTERNAL!r} is reserved for addresses that are not container "
                  "interfaces", group)
    ifaces_raw = d["interfaces"]
    if not isinstance(ifaces_raw, list):
        c.add("interfaces", f"must be an array, not {_typename(ifaces_raw)}", ifaces_raw)
        return None, c.problems
    if not ifaces_raw:
        c.add("interfaces", "must list at least one interface")
    out: list[InterfaceSpec] = []
    seen_names: set[str] = set()
    gateways: list[str] = []
    for i, r in enumerate(ifaces_raw):
        path = f"interfaces[{i}]"
        spec = _parse_interface(c, path, r, networks, invalid_networks)
        if spec is None:
            continue
        if spec.name in seen_names:
            c.add(f"{path}.name", "duplicate interface name in this container", spec.name)
        seen_names.add(spec.name)
        if spec.gateway is not None:
            gateways.append(path)
        out.append(spec)
    if len(gateways) > 1:
        c.add("interfaces", "at most one interface per container may set gateway "
              f"({' and '.join(gateways)} both do)")
    if not c.ok:
        return None, c.problems
    return ContainerSpec(name, tuple(out), group), []


def parse_policy(where: str, raw: Any, groups: Iterable[str]
                 ) -> tuple[Policy | None, list[Problem]]:
    """The `policy` key. `groups`: the groups of the valid container entries. A malformed
    value makes the key invalid (None); a group no entry has (a typo, or not deployed
    yet) is reported, and only the isolation or pair naming it is left out."""
    c = _Checker(where)
    d = c.obj(raw, "", ("isolate", "allow"))
    if d is None:
        return None, c.problems
    known = set(groups) | {EXTERNAL}
    unknown: list[Problem] = []

    def name(v: Any, fld: str) -> str | None:
        if not isinstance(v, str):
            c.add(fld, f"must be a group name, not {_typename(v)}", v)
            return None
        if not NAME_RE.match(v):
            c.add(fld, "must be a group name: 1-63 characters of [A-Za-z0-9_.-]", v)
            return None
        if v not in known:
            unknown.append(Problem(where, fld, "unknown group: no containers entry has it",
                                   _show(v)))
            return None
        return v

    isolate: set[str] = set()
    iso_raw = d.get("isolate")
    if iso_raw is not None and not isinstance(iso_raw, list):
        c.add("isolate", f"must be an array of group names, not {_typename(iso_raw)}", iso_raw)
    for i, v in enumerate(iso_raw if isinstance(iso_raw, list) else []):
        g = name(v, f"isolate[{i}]")
        if g == EXTERNAL:
            c.add(f"isolate[{i}]", f"{EXTERNAL!r} has no interfaces to isolate", v)
        elif g is not None:
            isolate.add(g)
    allow: set[tuple[str, str]] = set()
    allow_raw = d.get("allow")
    if allow_raw is not None and not isinstance(allow_raw, list):
        c.add("allow", f"must be an array of [source, destination] pairs, not "
              f"{_typename(allow_raw)}", allow_raw)
    for i, pair in enumerate(allow_raw if isinstance(allow_raw, list) else []):
        if not isinstance(pair, list) or len(pair) != 2:
            c.add(f"allow[{i}]", "must be a pair [source group, destination group]", pair)
            continue
        src, dst = name(pair[0], f"allow[{i}][0]"), name(pair[1], f"allow[{i}][1]")
        if src is not None and dst is not None:
            allow.add((src, dst))
    if not c.ok:
        return None, c.problems + unknown
    return Policy(tuple(sorted(isolate)), tuple(sorted(allow))), unknown


def _parse_interface(
    c: _Checker, path: str, r: Any, networks: Mapping[str, Network],
    invalid_networks: Mapping[str, str],
) -> InterfaceSpec | None:
    before = len(c.problems)
    d = c.obj(r, path, ("name", "network", "address", "mac", "gateway", "routes", "mtu"),
              required=("name", "network"))
    if d is None:
        return None
    ifname = c.string(d, "name", path)
    if ifname is not None and (not IFNAME_RE.match(ifname) or ifname in (".", "..")):
        c.add(f"{path}.name", "must be 1-15 characters of [A-Za-z0-9_.-] (IFNAMSIZ)", ifname)
    if ifname == "lo":
        c.add(f"{path}.name", "lo is the loopback interface and cannot be managed", ifname)
    netname = c.string(d, "network", path)
    net: Network | None = None
    if netname is not None:
        net = networks.get(netname)
        if net is None:
            if netname in invalid_networks:
                c.add(f"{path}.network", f"network {netname!r} is invalid "
                      f"(see {invalid_networks[netname]})", netname)
            else:
                c.add(f"{path}.network", "unknown network", netname)
    address: IPInterface | None = None
    a = d.get("address", AUTO)
    if a != AUTO:
        if not isinstance(a, str):
            c.add(f"{path}.address", f"must be \"auto\" or a CIDR string, not {_typename(a)}", a)
        else:
            try:
                if "%" in a:
                    raise ValueError("an IPv6 zone is not allowed")
                address = ipaddress.ip_interface(a)
                if "/" not in a:
                    raise ValueError("no prefix length")
            except ValueError:
                c.add(f"{path}.address", "must be \"auto\" or an address with prefix length "
                      "like 10.77.3.10/24", a)
                address = None
            if address is not None and net is not None:
                if address.network != net.subnet:
                    c.add(f"{path}.address", f"must be inside the network's subnet {net.subnet} "
                          "with the same prefix length", a)
                else:
                    _check_host_in_subnet(c, f"{path}.address", address.ip, net.subnet)
                    if net.gateway is not None and address.ip == net.gateway:
                        c.add(f"{path}.address", "is the network's gateway address", a)
    elif net is not None and net.pool is None:
        c.add(f"{path}.address", f"is auto but network {net.name!r} has no pool", a)
    mac = c.string(d, "mac", path)
    if mac is not None:
        if not MAC_RE.match(mac):
            c.add(f"{path}.mac", "must be six colon-separated hex bytes like "
                  "02:00:00:00:03:0a", mac)
        elif int(mac[:2], 16) & 1:
            c.add(f"{path}.mac", "must be a unicast MAC (the first byte's lowest bit is 0)", mac)
        elif mac.lower() == "00:00:00:00:00:00":
            c.add(f"{path}.mac", "must not be all zeros", mac)
        elif net is not None and net.overlay is not None:
            c.add(f"{path}.mac", f"network {net.name!r} is an overlay: every interface's MAC "
                  "is derived from its address (so every host knows it)", mac)
        else:
            mac = mac.lower()
    gateway: IPAddress | None = None
    g = d.get("gateway")
    if g is True:
        if net is not None:
            if net.gateway is None:
                c.add(f"{path}.gateway", f"is true but network {net.name!r} has no gateway", g)
            else:
                gateway = net.gateway
    elif g is not None and g is not False:
        gateway = _parse_ip(c, g, f"{path}.gateway")
        if gateway is not None and net is not None:
            _check_host_in_subnet(c, f"{path}.gateway", gateway, net.subnet)
    routes: list[Route] = []
    rr = d.get("routes")
    if rr is not None:
        if not isinstance(rr, list):
            c.add(f"{path}.routes", f"must be an array, not {_typename(rr)}", rr)
        else:
            for j, rt in enumerate(rr):
                rp = f"{path}.routes[{j}]"
                before_r = len(c.problems)
                rd = c.obj(rt, rp, ("dst", "via"), required=("dst", "via"))
                if rd is None or len(c.problems) > before_r:
                    continue
                dst_s = c.string(rd, "dst", rp)
                dst = None
                if dst_s is not None:
                    try:
                        if "%" in dst_s:
                            raise ValueError("zone")
                        dst = ipaddress.ip_network(dst_s, strict=True)
                    except ValueError:
                        c.add(f"{rp}.dst", "not a valid CIDR (host bits must be zero)", dst_s)
                via = _parse_ip(c, rd["via"], f"{rp}.via")
                if dst is not None and via is not None:
                    if dst.version != via.version:
                        c.add(rp, "dst and via are of different IP versions", rt)
                    elif net is not None and via.version == net.subnet.version \
                            and via not in net.subnet:
                        c.add(f"{rp}.via", f"must be inside the network's subnet {net.subnet}",
                              str(via))
                    elif net is not None and via.version != net.subnet.version:
                        c.add(f"{rp}.via", "is of another IP version than the network", str(via))
                    else:
                        routes.append(Route(dst, via))
    mtu = c.integer(d, "mtu", path, MTU_MIN, MTU_MAX)
    if len(c.problems) > before or ifname is None or netname is None:
        return None
    return InterfaceSpec(ifname, netname, address, mac, gateway, tuple(routes), mtu)


def parse_service_config(where: str, raw: Any) -> tuple[ServiceConfig | None, list[Problem]]:
    c = _Checker(where)
    d = c.obj(raw, "", ("bind", "mode", "balance", "health", "hosts", "path_prefix", "tls",
                        "forwardfor"), required=("bind",))
    if d is None:
        return None, c.problems
    host, port = None, None
    b = c.string(d, "bind", "")
    if b is not None:
        host, port = _parse_bind(c, b)
    mode = c.string(d, "mode", "") or "http"
    if mode not in MODES:
        c.add("mode", f"must be one of {', '.join(MODES)}", mode)
    balance = c.string(d, "balance", "") or "roundrobin"
    if balance not in BALANCES:
        c.add("balance", f"must be one of {', '.join(BALANCES)}", balance)
    health = None
    if d.get("health") is not None:
        h = c.obj(d["health"], "health", ("path", "interval_ms"), required=("path",))
        if h is not None and "path" in h:
            path = c.string(h, "path", "health")
            if path is not None and not HEALTH_PATH_RE.match(path):
                c.add("health.path", "must start with / and hold only URL path characters "
                      "(no spaces, quotes, # or control characters)", path)
            interval = c.integer(h, "interval_ms", "health",
                                 HEALTH_INTERVAL_MIN_MS, HEALTH_INTERVAL_MAX_MS)
            if path is not None:
                health = HealthCheck(path, interval if interval is not None else 2000)
    hosts = _parse_hosts(c, d.get("hosts"))
    prefix = _parse_path_prefix(c, d.get("path_prefix"))
    if (hosts or prefix is not None) and mode != "http":
        c.add("hosts" if hosts else "path_prefix", "routing by host or path needs mode http")
    tls = _parse_tls(c, d.get("tls"), mode)
    forwardfor = d.get("forwardfor", True)
    if not isinstance(forwardfor, bool):
        c.add("forwardfor", f"must be true or false, not {_typename(forwardfor)}", forwardfor)
    if not c.ok or host is None or port is None:
        return None, c.problems
    return ServiceConfig(host, port, mode, balance, health, hosts, prefix,  # type: ignore[arg-type]
                         tls, bool(forwardfor)), []


def _parse_hosts(c: _Checker, raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        c.add("hosts", "must be a non-empty array of host names", raw)
        return ()
    out: list[str] = []
    for i, h in enumerate(raw):
        if not isinstance(h, str):
            c.add(f"hosts[{i}]", f"must be a string, not {_typename(h)}", h)
            continue
        name = h.lower()
        if len(name) > 253 or not HOST_RE.match(name):
            c.add(f"hosts[{i}]", "must be a host name (letters, digits, '-' in dot-separated "
                  "labels) or *.name", h)
            continue
        if name in out:
            c.add(f"hosts[{i}]", "listed twice", h)
            continue
        out.append(name)
    return tuple(sorted(out))


def _parse_path_prefix(c: _Checker, raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not PATH_PREFIX_RE.match(raw) or "//" in raw:
        c.add("path_prefix", "must start with / and hold only [A-Za-z0-9/_.~%+-] (no "
              "query, spaces, quotes, # or //)", raw)
        return None
    trimmed = raw.rstrip("/")
    return trimmed or None  # "/" is every path: the same as no prefix


def _parse_tls(c: _Checker, raw: Any, mode: str) -> TlsConfig | None:
    if raw is None:
        return None
    t = c.obj(raw, "tls", ("certs", "redirect_http"), required=("certs",))
    if t is None or t.get("certs") is None:
        return None
    certs = c.string(t, "certs", "tls")
    if certs is None:
        return None
    if not DIR_RE.match(certs) or "/../" in certs + "/" or "/./" in certs + "/":
        c.add("tls.certs", "must be an absolute directory path of [A-Za-z0-9/_.+-] "
              "(certificates are read from the host, never from KV)", certs)
        return None
    red = t.get("redirect_http")
    port: int | None = None
    if red is True:
        port = 80
    elif red is None or red is False:
        port = None
    elif isinstance(red, int) and not isinstance(red, bool) and 1 <= red <= 65535:
        port = red
    else:
        c.add("tls.redirect_http", "must be true (port 80) or a port number 1-65535", red)
        return None
    if port is not None and mode != "http":
        c.add("tls.redirect_http", "needs mode http")
        return None
    return TlsConfig(certs.rstrip("/") or "/", port)


def parse_cutover(where: str, raw: Any, session: str | None) -> tuple[Canary | None,
                                                                       list[Problem]]:
    """`services/<s>/cutover`, written by `reconciler cutover --steps`. The daemon uses
    `to`, `weight` and `state`; the other fields are the command's bookkeeping."""
    c = _Checker(where)
    d = c.obj(raw, "", ("id", "from", "to", "weight", "state", "steps", "step", "interval_s",
                        "max_error_rate", "started", "step_started", "updated", "by",
                        "reason", "history"), required=("to", "weight", "state"))
    if d is None:
        return None, c.problems
    to = c.string(d, "to", "")
    if to is not None and not NAME_RE.match(to):
        c.add("to", "must name a pool: 1-63 characters of [A-Za-z0-9_.-]", to)
    weight = c.integer(d, "weight", "", 0, 100)
    state = c.string(d, "state", "")
    if state is not None and state not in CUTOVER_STATES:
        c.add("state", f"must be one of {', '.join(CUTOVER_STATES)}", state)
    if not c.ok or to is None or weight is None or state is None:
        return None, c.problems
    return Canary(to, weight, state, session is not None), []  # type: ignore[arg-type]


def _parse_bind(c: _Checker, b: str) -> tuple[str | None, int | None]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", b)
    if not m:
        c.add("bind", "must be host:port, e.g. 127.0.0.1:18080 or [::1]:18080", b)
        return None, None
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if host != "*":
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            c.add("bind", "host must be an IP address or *", b)
            return None, None
        if m.group(3) and ip.version == 6:
            c.add("bind", "IPv6 hosts go in brackets, e.g. [::1]:18080", b)
            return None, None
        host = str(ip)
    if not 1 <= port <= 65535:
        c.add("bind", "port must be between 1 and 65535", b)
        return None, None
    return host, port


def parse_member(where: str, name: str, raw: Any, session: str | None = None
                 ) -> tuple[Member | None, list[Problem]]:
    c = _Checker(where)
    d = c.obj(raw, "", ("address", "port", "weight", "state"), required=("address", "port"))
    if d is None:
        return None, c.problems
    addr = _parse_ip(c, d["address"], "address") if d.get("address") is not None else None
    if addr is not None and (addr.is_unspecified or addr.is_multicast):
        c.add("address", "must be a unicast host address", str(addr))
    port = c.integer(d, "port", "", 1, 65535)
    weight = c.integer(d, "weight", "", WEIGHT_MIN, WEIGHT_MAX)
    state = c.string(d, "state", "") or "ready"
    if state not in MEMBER_STATES:
        c.add("state", f"must be one of {', '.join(MEMBER_STATES)}", state)
    if not c.ok or addr is None or port is None:
        return None, c.problems
    return Member(name, addr, port, 100 if weight is None else weight, session,
                  state), []  # type: ignore[arg-type]


def parse_active(where: str, raw: bytes) -> tuple[str | None, list[Problem]]:
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, [Problem(where, "", "value is not UTF-8")]
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        text = text[1:-1]  # tolerate a JSON string
    if not NAME_RE.match(text):
        return None, [Problem(where, "", "must name a pool: 1-63 characters of [A-Za-z0-9_.-]",
                              _show(text))]
    return text, []


# ---------------------------------------------------------- whole-state assembly


@dataclass(frozen=True)
class RawEntry:
    """One user value: where it came from (KV key or file location), its KeyRef, its value.

    `value` is bytes for KV entries and an already-decoded object for file entries.
    `order` ranks claims in conflicts: lower is older (Consul CreateIndex, file position).
    """

    where: str
    ref: KeyRef
    value: bytes | Any
    order: int = 0
    session: str | None = None
    version: int = 0  # Consul ModifyIndex (0: unknown, never memoised)


def _decode(e: RawEntry) -> tuple[Any, list[Problem]]:
    if isinstance(e.value, bytes | bytearray):
        return decode_json(e.where, bytes(e.value))
    return e.value, []


_T = TypeVar("_T")


class ParseMemo:
    """What parsing each KV entry gave, by (key, ModifyIndex, session): an entry is
    decoded and parsed again only when its ModifyIndex moved (issue 9: a change re-parses
    what it touched, not the whole prefix). Only parses that depend on the entry alone are
    kept; the rules across entries run every time, on the parsed objects. `sweep()` drops
    what the last builds did not use (deleted or rewritten keys)."""

    def __init__(self) -> None:
        # (key, session, what) -> (ModifyIndex, value, result)
        self._done: dict[tuple[str, str | None, str], tuple[int, Any, Any]] = {}
        self._used: set[tuple[str, str | None, str]] = set()
        self.parsed = 0  # entries parsed (not served from the memo): tests, bench
        self._generation = 0  # of the `block` results

    def get(self, e: RawEntry, what: str, parse: Callable[[], _T]) -> _T:
        if not e.version:
            return parse()
        key = (e.where, e.session, what)
        self._used.add(key)
        hit = self._done.get(key)
        if hit is not None and hit[0] == e.version and hit[1] == e.value:
            return cast(_T, hit[2])
        self.parsed += 1
        out = parse()
        self._done[key] = (e.version, e.value, out)
        return out

    def block(self, what: str, inputs: tuple[Any, ...], build: Callable[[], _T]
              ) -> tuple[_T, int]:
        """`build()` for a part of the parse that depends on several entries (`inputs`:
        their keys, versions and values), kept while they are the same; with the
        generation of that result, which moves when it is built again (the parses that
        depend on it are kept per generation)."""
        key = ("", None, what)
        self._used.add(key)
        hit = self._done.get(key)
        if hit is not None and hit[1] == inputs:
            return cast(_T, hit[2]), hit[0]
        self._generation += 1
        out = build()
        self._done[key] = (self._generation, inputs, out)
        return out, self._generation

    def sweep(self) -> None:
        self._done = {k: v for k, v in self._done.items() if k in self._used}
        self._used = set()


def _parsed(memo: ParseMemo | None, e: RawEntry, what: str,
            parse: Callable[[Any], tuple[_T | None, list[Problem]]]
            ) -> tuple[_T | None, list[Problem]]:
    """Decode `e` and `parse` it (a function of the entry alone), through `memo`."""
    def run() -> tuple[_T | None, tuple[Problem, ...]]:
        raw, probs = _decode(e)
        obj = None
        if not probs:
            obj, probs = parse(raw)
        return obj, tuple(probs)
    obj, probs = run() if memo is None else memo.get(e, what, run)
    return obj, list(probs)


def _decoded(memo: ParseMemo | None, e: RawEntry) -> tuple[Any, list[Problem]]:
    """`_decode(e)` through `memo` (the decoded value is shared: parsers only read it)."""
    if memo is None:
        return _decode(e)
    raw, probs = memo.get(e, "decode", lambda: _decode(e))
    return raw, list(probs)


PublishedPools = Mapping[str, tuple[Mapping[str, Mapping[str, "Member"]], str]]
"""service -> (pool -> member name -> Member, the service's config key): the members
nodes publish (`members/`), parsed per service by the watch (reconciler.runtime.kvwatch)."""


def with_published(state: DesiredState, published: PublishedPools) -> DesiredState:
    """`state` with the members nodes publish merged into its services' pools (a user's
    member of the same name wins). A service with published members but no config is
    reported at its config key (unless that key is there and invalid). Costs the services
    and members published, not a parse of the desired state (issue 9)."""
    if not published:
        return state
    services = dict(state.services)
    problems = set(state.problems)
    bad = state.invalid_keys
    for name, (pools, config_key) in published.items():
        svc = services.get(name)
        if svc is None:
            if config_key not in bad:
                problems.add(Problem(config_key, "", "missing: the service has pools or an "
                                     "active pool but no config"))
            continue
        merged = {p: dict(m) for p, m in pools.items()}
        for p, m in svc.pools.items():
            merged.setdefault(p, {}).update(m)
        services[name] = replace(svc, pools=merged)
    return replace(state, services=services, problems=tuple(sorted(problems)))


def _build_networks(entries: list[RawEntry], memo: ParseMemo | None
                    ) -> tuple[dict[str, Network], dict[str, str], list[Problem]]:
    """The valid networks (by name), the invalid ones (name -> key) and the problems."""
    networks: dict[str, Network] = {}
    invalid_networks: dict[str, str] = {}
    problems: list[Problem] = []
    for e in entries:
        net, probs = _parsed(memo, e, "network",
                             partial(parse_network, e.where, e.ref.name))
        if net is not None:
            clash = _network_clash(net, networks.values())
            if clash is not None:
                probs = [Problem(e.where, clash[0], clash[1])]
                net = None
        if net is None:
            problems.extend(probs)
            invalid_networks[e.ref.name] = e.where
            continue
        networks[net.name] = net
    return networks, invalid_networks, problems


def build_state(entries: Iterable[RawEntry], memo: ParseMemo | None = None) -> DesiredState:
    """Validate every entry, then the cross-object rules, into a DesiredState (entries
    parsed before are taken from `memo`)."""
    problems: list[Problem] = []
    ents = sorted(entries, key=lambda e: (e.order, e.where))
    by_kind: dict[str, list[RawEntry]] = {}
    for e in ents:
        by_kind.setdefault(e.ref.kind, []).append(e)

    # Networks, then isolation between them (older claim wins): kept as a whole while no
    # network entry changed (the clash rules compare every pair of networks).
    net_entries = by_kind.get("network", [])

    def build_networks() -> tuple[dict[str, Network], dict[str, str], list[Problem]]:
        return _build_networks(net_entries, memo)

    if memo is None:
        nets_gen = 0
        networks, invalid_networks, net_problems = build_networks()
    else:
        (networks, invalid_networks, net_problems), nets_gen = memo.block(
            "networks", tuple((e.where, e.version, e.session, e.value) for e in net_entries),
            build_networks)
    problems.extend(net_problems)

    # Containers, then static addresses claimed twice in one network. A container entry
    # is parsed again when it moved or the networks did (its checks read them).
    containers: dict[str, ContainerSpec] = {}
    claimed: dict[tuple[str, IPAddress], str] = {}
    for e in by_kind.get("container", []):
        spec, probs = _parsed(memo, e, f"container@{nets_gen}", partial(
            parse_container, e.where, e.ref.name, networks=networks,
            invalid_networks=invalid_networks))
        if spec is not None:
            for i, itf in enumerate(spec.interfaces):
                if itf.address is None:
                    continue
                other = claimed.get((itf.network, itf.address.ip))
                if other is not None and other != e.where:
                    probs.append(Problem(
                        e.where, f"interfaces[{i}].address",
                        f"address already used in network {itf.network!r} by {other}",
                        str(itf.address)))
            if probs:
                spec = None
            else:
                for itf in spec.interfaces:
                    if itf.address is not None:
                        claimed[(itf.network, itf.address.ip)] = e.where
        if spec is None:
            problems.extend(probs)
            continue
        containers[spec.name] = spec

    # The group policy, against the groups of the valid container entries.
    policy = Policy()
    for e in by_kind.get("policy", []):
        raw, probs = _decoded(memo, e)
        pol = None
        if not probs:
            pol, probs = parse_policy(e.where, raw, (s.group for s in containers.values()
                                                     if s.group is not None))
        problems.extend(probs)
        if pol is not None:
            policy = pol

    # Services: config, active, members.
    configs: dict[str, ServiceConfig] = {}
    # port -> host -> claims: a service is checked against its port's claims only (over
    # every bind, parsing 1,000 services was quadratic: ~40 ms a parse; issue 9)
    binds: dict[int, dict[str, list[tuple[str, ServiceConfig]]]] = {}
    config_seen: set[str] = set()  # has a config key, valid or not
    for e in by_kind.get("service_config", []):
        config_seen.add(e.ref.name)
        cfg, probs = _parsed(memo, e, "config",
                             partial(parse_service_config, e.where))
        if cfg is not None:
            probs = _bind_clash(e.where, cfg, binds)
            if probs:
                cfg = None
        if cfg is None:
            problems.extend(probs)
            continue
        configs[e.ref.name] = cfg
        binds.setdefault(cfg.bind_port, {}).setdefault(cfg.bind_host, []).append(
            (e.where, cfg))

    actives: dict[str, tuple[str | None, str]] = {}
    for e in by_kind.get("service_active", []):
        if isinstance(e.value, bytes | bytearray):
            act, probs = parse_active(e.where, bytes(e.value))
        elif isinstance(e.value, str):
            act, probs = parse_active(e.where, e.value.encode())
        else:
            act, probs = None, [Problem(e.where, "", "must be a string naming a pool",
                                        _show(e.value))]
        problems.extend(probs)
        actives[e.ref.name] = (act, e.where)

    canaries: dict[str, Canary] = {}
    for e in by_kind.get("service_cutover", []):
        can, probs = _parsed(memo, e, "cutover",
                             partial(parse_cutover, e.where, session=e.session))
        problems.extend(probs)
        if can is not None:
            canaries[e.ref.name] = can

    pools: dict[str, dict[str, dict[str, Member]]] = {}
    for e in by_kind.get("member", []):
        mem, probs = _parsed(memo, e, "member",
                             partial(parse_member, e.where, e.ref.member, session=e.session))
        if mem is None:
            problems.extend(probs)
            # An invalid member still makes its pool exist (so `active` can name it).
            pools.setdefault(e.ref.name, {}).setdefault(e.ref.pool, {})
            continue
        pools.setdefault(e.ref.name, {}).setdefault(e.ref.pool, {})[mem.name] = mem

    services: dict[str, Service] = {}
    for name in sorted(set(configs) | set(actives) | set(pools)):
        cfg = configs.get(name)
        act, act_where = actives.get(name, (None, ""))
        svc_pools = pools.get(name, {})
        if cfg is None:
            where = _sibling_where(act_where or _first_member_where(ents, name), "config")
            # (a state file reports a missing config itself, at its own location)
            if name not in config_seen and ": services." not in where:
                problems.append(Problem(where, "", "missing: the service has pools or an "
                                        "active pool but no config"))
            continue
        # `active` may name a pool with no members yet: members published from container
        # labels arrive after the key is written. HAProxy then answers 503 for it, and
        # `reconciler cutover` refuses to switch to such a pool.
        services[name] = Service(name, cfg, act, {p: dict(m) for p, m in svc_pools.items()},
                                 canaries.get(name))

    return DesiredState(networks, containers, services, tuple(sorted(set(problems))),
                        policy)


def _network_clash(net: Network, existing: Iterable[Network]) -> tuple[str, str] | None:
    for other in existing:
        if net.overlay is not None and other.overlay is not None \
                and net.overlay.vni == other.overlay.vni:
            return ("overlay.vni", f"vni {net.overlay.vni} is already used by network "
                    f"{other.name!r}")
        if other.bridge == net.bridge and other.driver != net.driver:
            return ("bridge", f"bridge {net.bridge!r} is already used by network "
                    f"{other.name!r} with driver {other.driver}")
        if net.subnet.version == other.subnet.version and net.subnet.overlaps(other.subnet) \
                and not net.isolated_from(other):
            return ("subnet", f"overlaps network {other.name!r} ({other.subnet}) on the same "
                    f"bridge {net.bridge!r} without distinct vlans")
        if net.gateway is not None and net.gateway == other.gateway \
                and net.bridge == other.bridge and net.vlan == other.vlan:
            return ("gateway", f"already the gateway of network {other.name!r}")
    return None


def _bind_clash(where: str, cfg: ServiceConfig,
                binds: Mapping[int, Mapping[str, list[tuple[str, ServiceConfig]]]]
                ) -> list[Problem]:
    """Why `cfg` cannot take its bind next to the older claims (empty: it can). Services
    share a bind only on exactly the same host:port, all in http mode with the same
    TLS settings, and routed apart by hosts/path_prefix."""
    for host, claims in binds.get(cfg.bind_port, {}).items():
        other = claims[0][0]
        if host != cfg.bind_host and "*" in (host, cfg.bind_host):
            return [Problem(where, "bind", f"already used by {other}", cfg.bind)]
        if host != cfg.bind_host:
            continue
        for owhere, ocfg in claims:
            if cfg.mode != "http" or ocfg.mode != "http":
                return [Problem(where, "bind", f"already used by {owhere} (only http "
                                "services share a bind)", cfg.bind)]
            if cfg.tls != ocfg.tls:
                return [Problem(where, "tls", f"differs from {owhere}, which shares bind "
                                f"{cfg.bind} (services on one bind share its TLS settings)")]
            if not (cfg.hosts or cfg.path_prefix or ocfg.hosts or ocfg.path_prefix):
                # Both the bind's default (contract v1's message: no routing asked for).
                return [Problem(where, "bind", f"already used by {owhere}", cfg.bind)]
            overlap = _route_overlap(cfg, ocfg)
            if overlap is not None:
                fld, what = overlap
                return [Problem(where, fld, f"{what} on bind {cfg.bind} is already routed "
                                f"to {owhere}", cfg.bind if fld == "bind" else "")]
    return []


def _route_overlap(a: ServiceConfig, b: ServiceConfig) -> tuple[str, str] | None:
    """(field, what) when a request could match both `a` and `b` at the same rank."""
    if a.path_prefix != b.path_prefix:
        return None
    path = f" with path_prefix {a.path_prefix}" if a.path_prefix else ""
    if not a.hosts and not b.hosts:
        return ("bind" if not path else "path_prefix",
                f"the default (no hosts){path}")
    common = sorted(set(a.hosts) & set(b.hosts))
    if common:
        return "hosts", f"host {common[0]!r}{path}"
    return None


def _sibling_where(where: str, leaf: str) -> str:
    # ".../services/web/active" or ".../services/web/pools/p/m" → ".../services/web/<leaf>"
    # (a member a node published, ".../members/web/p/m", too)
    if "/services/" not in where and "/members/" in where:
        where = where.replace("/members/", "/services/", 1)
    marker = "/services/" if "/services/" in where else "services/"
    head, _, tail = where.rpartition(marker)
    svc = tail.split("/", 1)[0]
    return f"{head}{marker}{svc}/{leaf}"


def _first_member_where(ents: list[RawEntry], service: str) -> str:
    for e in ents:
        if e.ref.kind == "member" and e.ref.name == service:
            return e.where
    return f"services/{service}/pools"


# ------------------------------------------------------------------ from KV


def parse_kv(prefix: str, items: Iterable[KVEntry], memo: ParseMemo | None = None
             ) -> DesiredState:
    """Parse every key under `prefix` (already normalised, ending in '/'); with `memo`,
    an entry whose ModifyIndex did not move is not parsed again."""
    layout = Layout(prefix)
    entries: list[RawEntry] = []
    extra: list[Problem] = []
    for it in items:
        ref = layout.classify(it.key)
        if ref is None:
            continue
        if isinstance(ref, str):
            extra.append(Problem(it.key, "", ref))
            continue
        entries.append(RawEntry(it.key, ref, it.value, it.create_index, it.session,
                                it.modify_index))
    st = build_state(entries, memo)
    if extra:
        st = replace(st, problems=tuple(sorted(set(st.problems) | set(extra))))
    return st


# ------------------------------------------------------------- from state files


def load_state_file(path: str, text: str | None = None) -> tuple[list[RawEntry], list[Problem]]:
    """Read a YAML/JSON state file into raw entries (with file locations), or problems.

    The file holds `networks`, `containers` and `services` (each service with `config`,
    `active`, `pools`), and `policy`: the same objects as the KV values.
    """
    import yaml  # local: only the CLI reads files

    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            return [], [Problem(path, "", f"cannot read file: {e.strerror}")]
        except UnicodeDecodeError:
            return [], [Problem(path, "", "file is not UTF-8")]
    try:
        doc = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
        return _file_entries(path, doc)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as e:
        # YAML can hold what JSON cannot: date keys, recursive aliases, deep nesting.
        reason = "nested too deeply" if isinstance(e, RecursionError) else _one_line(str(e))
        return [], [Problem(path, "", f"cannot parse: {reason}")]


def _file_entries(path: str, doc: Any) -> tuple[list[RawEntry], list[Problem]]:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        return [], [Problem(path, "", f"the top level must be a mapping, not {_typename(doc)}")]
    problems: list[Problem] = []
    entries: list[RawEntry] = []
    order = 0
    for top in doc:
        if top not in ("networks", "containers", "services", "policy"):
            problems.append(Problem(path, str(top), "unknown section (allowed: containers, "
                                    "networks, policy, services)"))
    for section, kind in (("networks", "network"), ("containers", "container")):
        sec = doc.get(section) or {}
        if not isinstance(sec, dict):
            problems.append(Problem(path, section, f"must be a mapping of name to object, "
                                    f"not {_typename(sec)}"))
            continue
        for name, val in sec.items():
            where = f"{path}: {section}.{name}"
            if not isinstance(name, str) or not NAME_RE.match(name):
                problems.append(_bad_name(where))
                continue
            order += 1
            entries.append(RawEntry(where, KeyRef(kind, name), _plain(val), order))  # type: ignore[arg-type]
    if doc.get("policy") is not None:
        order += 1
        entries.append(RawEntry(f"{path}: policy", KeyRef("policy", POLICY_KEY),
                                _plain(doc["policy"]), order))
    svcs = doc.get("services") or {}
    if not isinstance(svcs, dict):
        problems.append(Problem(path, "services", f"must be a mapping, not {_typename(svcs)}"))
        svcs = {}
    for sname, sval in svcs.items():
        swhere = f"{path}: services.{sname}"
        if not isinstance(sname, str) or not NAME_RE.match(sname):
            problems.append(_bad_name(swhere))
            continue
        if not isinstance(sval, dict):
            problems.append(Problem(swhere, "", f"must be a mapping with config, active, pools, "
                                    f"not {_typename(sval)}"))
            continue
        for k in sval:
            if k not in ("config", "active", "pools"):
                problems.append(Problem(swhere, str(k),
                                        "unknown field (allowed: active, config, pools)"))
        order += 1
        if "config" in sval:
            entries.append(RawEntry(f"{swhere}.config", KeyRef("service_config", sname),
                                    _plain(sval["config"]), order))
        else:
            problems.append(Problem(swhere, "config", "required"))
        if sval.get("active") is not None:
            entries.append(RawEntry(f"{swhere}.active", KeyRef("service_active", sname),
                                    _plain(sval["active"]), order))
        pools = sval.get("pools") or {}
        if not isinstance(pools, dict):
            problems.append(Problem(swhere, "pools", f"must be a mapping of pool name to "
                                    f"members, not {_typename(pools)}"))
            continue
        for pname, members in pools.items():
            pwhere = f"{swhere}.pools.{pname}"
            if not isinstance(pname, str) or not NAME_RE.match(pname):
                problems.append(_bad_name(pwhere, "pool "))
                continue
            if members is None:
                members = {}
            if not isinstance(members, dict):
                problems.append(Problem(pwhere, "", f"must be a mapping of member name to "
                                        f"object, not {_typename(members)}"))
                continue
            for mname, mval in members.items():
                mwhere = f"{pwhere}.{mname}"
                if not isinstance(mname, str) or not NAME_RE.match(mname):
                    problems.append(_bad_name(mwhere, "member "))
                    continue
                order += 1
                entries.append(RawEntry(mwhere, KeyRef("member", sname, pname, mname),
                                        _plain(mval), order))
    return entries, problems


def _bad_name(where: str, what: str = "") -> Problem:
    return Problem(where, "", f"invalid {what}name: names are 1-63 characters of "
                   "[A-Za-z0-9_.-]")


def _plain(v: Any) -> Any:
    """YAML may produce dates, sets, non-str keys: make it JSON-shaped so rules apply
    exactly as they do to KV values (and it can be written to KV)."""
    return json.loads(json.dumps(v, default=str))


def _one_line(s: str) -> str:
    return " ".join(s.split())


def entry_kv_value(e: RawEntry) -> bytes:
    """The bytes a file entry is written as: canonical JSON; `active` as a plain string."""
    if e.ref.kind == "service_active":
        return str(e.value).encode()
    return json.dumps(e.value, sort_keys=True, separators=(",", ":")).encode()


def validate_entries(entries: list[RawEntry], extra: Iterable[Problem] = ()) -> DesiredState:
    st = build_state(entries)
    extra = list(extra)
    if extra:
        st = replace(st, problems=tuple(sorted(set(st.problems) | set(extra))))
    return st

