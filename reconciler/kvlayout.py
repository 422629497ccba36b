"""The KV layout: which key under the prefix holds what. The one owner of key shapes.

Every Consul key reconciler reads or writes is built and parsed here, and nowhere else
(docs/kv-layout.md is the contract):

    <prefix>networks/<network>                         user: a network definition
    <prefix>containers/<name>                          user: interfaces of matching containers
    <prefix>services/<service>/config                  user: a frontend + health check
    <prefix>services/<service>/active                  user: the live pool
    <prefix>services/<service>/cutover                 `reconciler cutover`: a progressive
                                                       cutover (share of traffic, steps)
    <prefix>services/<service>/pools/<pool>/<member>   user (or a node's session): a backend
    <prefix>policy                                     user: group policy (isolate, allow)
    <prefix>ipam/<network>/<address>                   daemon: one allocated address
    <prefix>nodes/<node>/status                        daemon: a node's status document
    <prefix>hosts/<node>                               daemon: the host registry (address)
    <prefix>members/<service>/<pool>/<member>          daemon: a member a node publishes
    <prefix>index/<area>/<piece>                       daemon: generation of <area>/<piece>/
    <prefix>audit/<service>/<time>                     daemon: cutover audit records
    <prefix>locks/...                                  daemon: reserved for coordination

`Layout(prefix)` builds keys (methods named after the key kind) and read prefixes
(`*_prefix`), and parses full keys back (`parse*`, `service_of`); a parser returns None
for a key that is not of its kind. The prefix is taken as given: normalise it first
(`normalize_prefix`: it ends in exactly one '/', or is empty).

Also here: the name rule of key segments (`NAME_RE`), the daemon-owned areas
(`DAEMON_AREAS`, `Layout.is_daemon_owned`), the conversion of Consul KV items into the
model's adapter-neutral `KVEntry` (`kv_entries`), and the digests of what a read saw
(`kv_digest`, `user_digest`). Pure: imports no adapter and nothing of the model.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Protocol, get_args

MEMBER_BUCKETS = 64
"""How many generation keys the published members of all services share."""


def member_bucket(service: str) -> str:
    """The generation key (of MEMBER_BUCKETS) that service `service` bumps: two hex
    digits of a stable hash of its name."""
    return f"{zlib.crc32(service.encode()) % MEMBER_BUCKETS:02x}"

# \Z, not $: `$` also matches before a trailing newline ("web\n" would pass).
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}\Z")
"""Names in keys (<network>, <name>, <service>, <pool>, <member>): 1-63 of [A-Za-z0-9_.-]."""

DEFAULT_PREFIX = "reconciler/"

UserArea = Literal["networks/", "containers/", "services/"]
DaemonArea = Literal["nodes/", "ipam/", "audit/", "locks/", "hosts/", "index/", "members/"]
Area = UserArea | DaemonArea

USER_AREAS: tuple[UserArea, ...] = get_args(UserArea)
"""Areas under the prefix that hold desired state, written by users."""

DAEMON_AREAS: tuple[DaemonArea, ...] = get_args(DaemonArea)
"""Daemon-owned areas under the prefix. User commands never write or prune these; the
model ignores them; a change in them is not a change of desired state."""

KeyKind = Literal["network", "container", "service_config", "service_active", "member",
                  "service_cutover", "policy"]
POLICY_KEY = "policy"
"""The one group-policy key directly under the prefix (not an area)."""
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_prefix(prefix: str) -> str:
    """`prefix` ending in exactly one '/' ('' stays '')."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


# ------------------------------------------------------------------- user keys


@dataclass(frozen=True)
class KeyRef:
    """What a user key under the prefix is: kind plus the names in its path."""

    kind: KeyKind
    name: str  # the network, container spec or service
    pool: str = ""
    member: str = ""


def classify_key(rel: str) -> KeyRef | str | None:
    """Map a key relative to the prefix to a KeyRef; None for daemon-owned keys; a reason
    string for a key that is not part of the layout. A member a node published
    (`members/<service>/<pool>/<member>`, daemon-owned) is a "member" like a user's.

    Memoised: every parse of the desired state classifies every key (3,000 at K=100k).
    Not a member's key (three slashes or more): members come and go with containers,
    each under a new name, and a cache of them filled with the names of containers long
    gone (bench/soak.py --member-pool: 446 bytes a key, 7 MiB when full)."""
    if rel.count("/") >= 3:
        return _classify_key(rel)
    return _classify_memo(rel)


def memoised_keys() -> int:
    """How many keys `classify_key` holds in its memo."""
    return _classify_memo.cache_info().currsize


def _classify_key(rel: str) -> KeyRef | str | None:
    if rel.startswith("members/"):
        parts = rel.split("/")
        if len(parts) == 4 and all(NAME_RE.match(p) for p in parts[1:]):
            return KeyRef("member", parts[1], parts[2], parts[3])
        return None
    if rel.startswith(DAEMON_AREAS):
        return None
    if rel == POLICY_KEY:
        return KeyRef("policy", POLICY_KEY)
    parts = rel.split("/")
    bad = [p for p in parts if not NAME_RE.match(p)]
    kind = parts[0]
    if kind == "networks" and len(parts) == 2 and not bad:
        return KeyRef("network", parts[1])
    if kind == "containers" and len(parts) == 2 and not bad:
        return KeyRef("container", parts[1])
    if kind == "services" and not bad:
        if len(parts) == 3 and parts[2] == "config":
            return KeyRef("service_config", parts[1])
        if len(parts) == 3 and parts[2] == "active":
            return KeyRef("service_active", parts[1])
        if len(parts) == 3 and parts[2] == "cutover":
            return KeyRef("service_cutover", parts[1])
        if len(parts) == 5 and parts[2] == "pools":
            return KeyRef("member", parts[1], parts[3], parts[4])
    user_area = f"{kind}/" in USER_AREAS
    if bad and user_area:
        return (
            f"invalid name {bad[-1]!r}: names are 1-63 characters of [A-Za-z0-9_.-]"
        )
    if rel.endswith("/") and user_area:
        return None  # a "folder" key created by some UIs; carries nothing
    return f"not part of the layout ({', '.join(USER_AREAS)}, {POLICY_KEY})"


_classify_memo = functools.lru_cache(maxsize=1 << 14)(_classify_key)


# ------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Layout:
    """Keys under one prefix (normalised: ends in '/', or is '' for relative keys)."""

    prefix: str = DEFAULT_PREFIX

    # --- user keys

    def network(self, name: str) -> str:
        return f"{self.prefix}networks/{name}"

    def container(self, name: str) -> str:
        return f"{self.prefix}containers/{name}"

    def service(self, service: str) -> str:
        """The service as a whole (`services/<s>`; names it in reports, holds no value)."""
        return f"{self.prefix}services/{service}"

    def service_config(self, service: str) -> str:
        return f"{self.service(service)}/config"

    def service_active(self, service: str) -> str:
        return f"{self.service(service)}/active"

    def service_cutover(self, service: str) -> str:
        """`services/<s>/cutover`: the state of a progressive cutover (written by
        `reconciler cutover --steps`, held by its session while it runs)."""
        return f"{self.service(service)}/cutover"

    def pool(self, service: str, pool: str) -> str:
        """A pool as a whole (`services/<s>/pools/<p>`; names it in reports)."""
        return f"{self.service(service)}/pools/{pool}"

    def member(self, service: str, pool: str, member: str) -> str:
        return f"{self.pool(service, pool)}/{member}"

    def policy(self) -> str:
        """`policy`: the group policy (which groups are isolated, which pairs allowed)."""
        return f"{self.prefix}{POLICY_KEY}"

    def key(self, ref: KeyRef) -> str:
        """The key of a user entry."""
        if ref.kind == "policy":
            return self.policy()
        if ref.kind == "network":
            return self.network(ref.name)
        if ref.kind == "container":
            return self.container(ref.name)
        if ref.kind == "service_config":
            return self.service_config(ref.name)
        if ref.kind == "service_active":
            return self.service_active(ref.name)
        if ref.kind == "service_cutover":
            return self.service_cutover(ref.name)
        return self.member(ref.name, ref.pool, ref.member)

    # --- daemon-owned keys

    def allocation(self, network: str, address: IPAddress | str) -> str:
        """`ipam/<network>/<address>`: one allocated (or statically claimed) address."""
        return f"{self.ipam_prefix(network)}{address}"

    def node_status(self, node: str) -> str:
        return f"{self.nodes_prefix()}{node}/status"

    def host(self, node: str) -> str:
        """`hosts/<node>`: the host registry entry (its underlay address), held by the
        node's session. Apart from `nodes/<node>/status`, which changes with every
        reconcile, so that the overlay peers of every host need not watch the status."""
        return f"{self.hosts_prefix()}{node}"

    def published_member(self, service: str, pool: str, member: str) -> str:
        """`members/<service>/<pool>/<member>`: a member a node publishes for a labelled
        container (held by its session). Apart from the user's `services/` so that the
        churn of every node's containers does not wake every host's desired state, and
        read per service through `index/member-buckets/` (issue 9)."""
        return f"{self.members_prefix(service)}{pool}/{member}"

    def members_index(self, service: str) -> str:
        """`index/member-buckets/<bucket>`, the bucket of `service`
        (`member_bucket`): bumped with every write under `members/<service>/`."""
        return f"{self.members_index_prefix()}{member_bucket(service)}"

    def ipam_index(self, network: str) -> str:
        """`index/ipam/<network>`: bumped with every write under `ipam/<network>/`, so a
        host learns which networks' allocations changed from one small read."""
        return f"{self.ipam_index_prefix()}{network}"

    def audit_record(self, service: str, at: float) -> str:
        """`audit/<service>/<microseconds since the epoch, 20 digits>` (sorts by time)."""
        return f"{self.audit_prefix(service)}{int(at * 1e6):020d}"

    def lock(self, name: str) -> str:
        """`locks/<name>` (`name` may hold '/')."""
        return f"{self.locks_prefix()}{name}"

    # --- read prefixes (end in '/')

    def area(self, area: Area) -> str:
        """The read prefix of an area (one of USER_AREAS or DAEMON_AREAS)."""
        return self.prefix + area

    def networks_prefix(self) -> str:
        return self.area("networks/")

    def containers_prefix(self) -> str:
        return self.area("containers/")

    def services_prefix(self) -> str:
        return self.area("services/")

    def ipam_prefix(self, network: str | None = None) -> str:
        """`ipam/`, or `ipam/<network>/` for one network's allocations."""
        base = self.area("ipam/")
        return base if network is None else f"{base}{network}/"

    def nodes_prefix(self) -> str:
        return self.area("nodes/")

    def hosts_prefix(self) -> str:
        return self.area("hosts/")

    def ipam_index_prefix(self) -> str:
        return self.area("index/") + "ipam/"

    def members_prefix(self, service: str | None = None) -> str:
        """`members/`, or `members/<service>/` for one service's published members."""
        base = self.area("members/")
        return base if service is None else f"{base}{service}/"

    def members_index_prefix(self) -> str:
        """`index/member-buckets/`: MEMBER_BUCKETS generation keys, whatever the number
        of services, so that the read every host makes after every member change
        anywhere stays the same size as the cluster grows (per service, `index/members/`
        before: 1,000 keys, 122 kB a read at 1,000 services)."""
        return self.area("index/") + "member-buckets/"

    def desired_areas(self) -> list[str]:
        """The read prefixes of the desired state, each watched apart (issue 9): the user
        areas and the policy key. Nothing daemon-owned is under any of them."""
        return [*(self.area(a) for a in USER_AREAS), self.policy()]

    def audit_prefix(self, service: str | None = None) -> str:
        """`audit/`, or `audit/<service>/` for one service's records."""
        base = self.area("audit/")
        return base if service is None else f"{base}{service}/"

    def locks_prefix(self) -> str:
        return self.area("locks/")

    # --- parsers (of full keys; None: not under the prefix, or not of that kind)

    def relative(self, key: str) -> str | None:
        """`key` without the prefix; None when it is not under the prefix."""
        return key[len(self.prefix):] if key.startswith(self.prefix) else None

    def classify(self, key: str) -> KeyRef | str | None:
        """`classify_key` of a full key: a KeyRef for a user key, a reason string for a key
        that is not part of the layout, None for a daemon-owned key, a "folder" key, the
        prefix itself or a key outside the prefix."""
        rel = self.relative(key)
        if not rel:
            return None
        return classify_key(rel)

    def parse(self, key: str) -> KeyRef | None:
        """The KeyRef of a valid user key, else None."""
        ref = self.classify(key)
        return ref if isinstance(ref, KeyRef) else None

    def service_of(self, key: str) -> str | None:
        """<service> of any key below `services/<service>/` (names not checked)."""
        rel = self.relative(key)
        if rel is None or not rel.startswith("services/"):
            return None
        service, slash, _ = rel[len("services/"):].partition("/")
        return service if service and slash else None

    def parse_allocation(self, key: str) -> tuple[str, IPAddress] | None:
        """(network, address) of an `ipam/<network>/<address>` key whose last segment is
        an address, else None."""
        rel = self.relative(key)
        if rel is None or not rel.startswith("ipam/"):
            return None
        parts = rel[len("ipam/"):].split("/")
        if len(parts) != 2 or not parts[0]:
            return None
        try:
            return parts[0], ipaddress.ip_address(parts[1])
        except ValueError:
            return None

    def parse_node_status(self, key: str) -> str | None:
        """<node> of a `nodes/<node>/status` key, else None."""
        rel = self.relative(key)
        if rel is None or not rel.startswith("nodes/"):
            return None
        parts = rel[len("nodes/"):].split("/")
        if len(parts) == 2 and parts[1] == "status" and parts[0]:
            return parts[0]
        return None

    def parse_host(self, key: str) -> str | None:
        """<node> of a `hosts/<node>` key, else None."""
        rel = self.relative(key)
        if rel is None or not rel.startswith("hosts/"):
            return None
        node = rel[len("hosts/"):]
        return node if node and "/" not in node else None

    def parse_audit(self, key: str) -> tuple[str, str] | None:
        """(service, record id) of an `audit/<service>/<id>` key, else None."""
        rel = self.relative(key)
        if rel is None or not rel.startswith("audit/"):
            return None
        parts = rel[len("audit/"):].split("/")
        if len(parts) != 2 or not all(parts):
            return None
        return parts[0], parts[1]

    def parse_lock(self, key: str) -> str | None:
        """<name> of a `locks/<name>` key, else None."""
        rel = self.relative(key)
        if rel is None or not rel.startswith("locks/") or rel == "locks/":
            return None
        return rel[len("locks/"):]

    # --- ownership

    @cached_property
    def _daemon_prefixes(self) -> tuple[str, ...]:
        return tuple(self.prefix + a for a in DAEMON_AREAS)

    def is_daemon_owned(self, key: str) -> bool:
        """True for a key in a daemon-owned area (nodes/, ipam/, audit/, locks/)."""
        return key.startswith(self._daemon_prefixes)


# ------------------------------------------------------------- KV items, digests


class _ItemLike(Protocol):
    """A Consul KV item as the adapter returns it (`adapters.consul_kv.KVItem`)."""

    @property
    def key(self) -> str: ...
    @property
    def value(self) -> bytes: ...
    @property
    def create_index(self) -> int: ...
    @property
    def modify_index(self) -> int: ...
    @property
    def session(self) -> str | None: ...


class _EntryLike(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def value(self) -> bytes: ...
    @property
    def session(self) -> str | None: ...


@dataclass(frozen=True)
class KVEntry:
    """What the model needs of one KV pair (adapter-neutral)."""

    key: str
    value: bytes
    create_index: int = 0
    session: str | None = None
    modify_index: int = 0


def kv_entries(items: Iterable[_ItemLike]) -> tuple[KVEntry, ...]:
    """Consul KV items (e.g. `KVSnapshot.items.values()`) as KVEntries, sorted by key."""
    return tuple(sorted(
        (KVEntry(i.key, i.value, i.create_index, i.session, i.modify_index) for i in items),
        key=lambda e: e.key))


def kv_digest(items: Iterable[_EntryLike]) -> str:
    """Digest of (key, value, session) of `items`, in the order given."""
    h = hashlib.sha256()
    for e in items:
        h.update(e.key.encode() + b"\0" + e.value + b"\0" + (e.session or "").encode() + b"\0")
    return h.hexdigest()


def user_digest(prefix: str, items: Iterable[_EntryLike]) -> str:
    """Digest of the user keys among `items` only (key, value, session): daemon-owned
    keys (a node's status, ipam allocations, audit, locks) do not change it."""
    layout = Layout(prefix)
    return kv_digest(e for e in items if not layout.is_daemon_owned(e.key))
