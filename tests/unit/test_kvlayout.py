"""The KV layout (reconciler.kvlayout): builders and parsers agree, daemon-owned areas are
told apart, and the user digest sees user keys only."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from reconciler.kvlayout import (
    DAEMON_AREAS,
    USER_AREAS,
    KeyRef,
    KVEntry,
    Layout,
    classify_key,
    kv_digest,
    kv_entries,
    normalize_prefix,
    user_digest,
)

P = "rt/"
L = Layout(P)
ip = ipaddress.ip_address

# (built key, expected full key, parsed back)
USER_KEYS: list[tuple[str, str, KeyRef]] = [
    (L.network("vnet1"), "rt/networks/vnet1", KeyRef("network", "vnet1")),
    (L.container("web"), "rt/containers/web", KeyRef("container", "web")),
    (L.service_config("web"), "rt/services/web/config", KeyRef("service_config", "web")),
    (L.service_active("web"), "rt/services/web/active", KeyRef("service_active", "web")),
    (L.member("web", "blue", "h1_c1"), "rt/services/web/pools/blue/h1_c1",
     KeyRef("member", "web", "blue", "h1_c1")),
]


@pytest.mark.parametrize(("key", "expected", "ref"), USER_KEYS)
def test_user_keys_round_trip(key: str, expected: str, ref: KeyRef) -> None:
    assert key == expected
    assert L.parse(key) == ref
    assert L.classify(key) == ref
    assert L.key(ref) == key
    assert not L.is_daemon_owned(key)


# (built key, expected full key, parser, parsed back)
DAEMON_KEYS: list[tuple[str, str, Callable[[str], object], object]] = [
    (L.allocation("vnet1", ip("10.77.1.100")), "rt/ipam/vnet1/10.77.1.100",
     L.parse_allocation, ("vnet1", ip("10.77.1.100"))),
    (L.allocation("v6", ip("fd00::5")), "rt/ipam/v6/fd00::5",
     L.parse_allocation, ("v6", ip("fd00::5"))),
    (L.node_status("h1"), "rt/nodes/h1/status", L.parse_node_status, "h1"),
    (L.audit_record("web", 1700000000.25), "rt/audit/web/00001700000000250000",
     L.parse_audit, ("web", "00001700000000250000")),
    (L.lock("cutover/web"), "rt/locks/cutover/web", L.parse_lock, "cutover/web"),
]


@pytest.mark.parametrize(("key", "expected", "parser", "parsed"), DAEMON_KEYS)
def test_daemon_keys_round_trip(key: str, expected: str, parser: Callable[[str], object],
                                parsed: object) -> None:
    assert key == expected
    assert parser(key) == parsed
    assert L.is_daemon_owned(key)
    assert L.classify(key) is None and L.parse(key) is None  # never desired state


PARSERS: dict[str, Callable[[str], object]] = {
    "parse": L.parse, "parse_allocation": L.parse_allocation,
    "parse_node_status": L.parse_node_status, "parse_audit": L.parse_audit,
    "parse_lock": L.parse_lock, "service_of": L.service_of,
}


@pytest.mark.parametrize("key", [k for k, *_ in USER_KEYS] + [k for k, *_ in DAEMON_KEYS])
def test_each_parser_takes_only_its_own_kind(key: str) -> None:
    accepted = {name for name, parse in PARSERS.items() if parse(key) is not None}
    if key.startswith(P + "services/"):
        assert accepted == {"parse", "service_of"}
    elif key.startswith(P + "ipam/"):
        assert accepted == {"parse_allocation"}
    elif key.startswith(P + "nodes/"):
        assert accepted == {"parse_node_status"}
    elif key.startswith(P + "audit/"):
        assert accepted == {"parse_audit"}
    elif key.startswith(P + "locks/"):
        assert accepted == {"parse_lock"}
    else:
        assert accepted == {"parse"}


@pytest.mark.parametrize(("parser", "key"), [
    # outside the prefix, or the wrong kind
    (L.parse, "other/networks/vnet1"),
    (L.parse, "rt/"),
    (L.parse, "rt/networks/"),  # a "folder" key
    (L.parse, "rt/networks/bad name"),
    (L.parse, "rt/services/web/weird"),
    (L.parse, "rt/stuff/x"),
    (L.parse_allocation, "other/ipam/vnet1/10.77.1.100"),
    (L.parse_allocation, "rt/ipam/vnet1/not-an-address"),
    (L.parse_allocation, "rt/ipam//10.77.1.100"),
    (L.parse_allocation, "rt/ipam/vnet1/x/10.77.1.100"),
    (L.parse_allocation, "rt/ipam/vnet1/"),
    (L.parse_node_status, "rt/nodes/h1/other"),
    (L.parse_node_status, "rt/nodes/h1/status/x"),
    (L.parse_node_status, "rt/nodes//status"),
    (L.parse_node_status, "rt/nodes/a/b/status"),
    (L.parse_node_status, "other/nodes/h1/status"),
    (L.parse_audit, "rt/audit/web/"),
    (L.parse_audit, "rt/audit/web"),
    (L.parse_lock, "rt/locks/"),
    (L.service_of, "rt/services/web"),
    (L.service_of, "rt/services//config"),
    (L.service_of, "rt/networks/web/x"),
])
def test_parsers_return_none_for_other_keys(parser: Callable[[str], object], key: str) -> None:
    assert parser(key) is None


def test_service_of_names_the_service_of_any_key_below_it() -> None:
    assert L.service_of("rt/services/web/pools/bad name/m") == "web"
    assert Layout("").service_of("services/web/config") == "web"


def test_read_prefixes() -> None:
    assert L.ipam_prefix() == "rt/ipam/"
    assert L.ipam_prefix("vnet1") == "rt/ipam/vnet1/"
    assert L.allocation("vnet1", "x").startswith(L.ipam_prefix("vnet1"))
    assert L.nodes_prefix() == "rt/nodes/"
    assert L.audit_prefix() == "rt/audit/"
    assert L.audit_prefix("web") == "rt/audit/web/"
    assert L.locks_prefix() == "rt/locks/"
    assert (L.networks_prefix(), L.containers_prefix(), L.services_prefix()) == (
        "rt/networks/", "rt/containers/", "rt/services/")
    assert [L.area(a) for a in USER_AREAS + DAEMON_AREAS] == [
        P + a for a in USER_AREAS + DAEMON_AREAS]
    assert L.service("web") == "rt/services/web"
    assert L.pool("web", "blue") == "rt/services/web/pools/blue"


def test_audit_records_sort_by_time() -> None:
    times = [9.5, 10.0, 1e9, 1.7e9 + 0.000001]
    keys = [L.audit_record("web", t) for t in times]
    assert sorted(keys) == keys


def test_empty_prefix_gives_relative_keys() -> None:
    rel = Layout("")
    assert rel.service_config("web") == "services/web/config"
    assert rel.parse("services/web/pools/p/m") == KeyRef("member", "web", "p", "m")
    assert rel.is_daemon_owned("nodes/h1/status")


@pytest.mark.parametrize(("raw", "normal"), [
    ("reconciler", "reconciler/"), ("reconciler/", "reconciler/"), ("/a/b//", "a/b/"),
    ("", ""), ("/", ""),
])
def test_normalize_prefix(raw: str, normal: str) -> None:
    assert normalize_prefix(raw) == normal


# ------------------------------------------------------------- daemon-owned areas


@pytest.mark.parametrize(("rel", "owned"), [
    ("nodes/h1/status", True),
    ("ipam/vnet1/10.77.1.100", True),
    ("ipam/", True),
    ("audit/web/1", True),
    ("locks/cutover/web", True),
    ("networks/vnet1", False),
    ("containers/web", False),
    ("services/web/config", False),
    ("services/nodes/config", False),
    ("nodesx/h1", False),
    ("stuff/x", False),
])
def test_daemon_area_classification(rel: str, owned: bool) -> None:
    assert L.is_daemon_owned(P + rel) is owned
    assert (classify_key(rel) is None) is owned  # the model ignores exactly these
    assert not L.is_daemon_owned(rel)  # outside the prefix: not the daemon's either


def test_areas_are_disjoint_and_cover_the_documented_layout() -> None:
    assert set(DAEMON_AREAS) == {"nodes/", "ipam/", "audit/", "locks/", "hosts/", "index/",
                                 "members/"}
    assert set(USER_AREAS) == {"networks/", "containers/", "services/"}
    assert not set(DAEMON_AREAS) & set(USER_AREAS)


# ------------------------------------------------------------------ digests


@dataclass(frozen=True)
class Item:
    """A Consul KV item (as adapters.consul_kv.KVItem)."""

    key: str
    value: bytes
    modify_index: int = 1
    create_index: int = 1
    session: str | None = None


BASE = (
    KVEntry(P + "networks/vnet1", b'{"subnet":"10.77.1.0/24"}'),
    KVEntry(P + "services/web/active", b"blue"),
    KVEntry(P + "services/web/pools/blue/h1_c", b"{}", session="s1"),
    KVEntry(P + "nodes/h1/status", b'{"index":1}', session="s1"),
    KVEntry(P + "ipam/vnet1/10.77.1.100", b"{}"),
)


def _with(*changed: KVEntry) -> tuple[KVEntry, ...]:
    keys = {e.key for e in changed}
    return tuple(e for e in BASE if e.key not in keys) + changed


@pytest.mark.parametrize("daemon_change", [
    KVEntry(P + "nodes/h1/status", b'{"index":2}', session="s1"),
    KVEntry(P + "nodes/h2/status", b"{}", session="s2"),
    KVEntry(P + "ipam/vnet1/10.77.1.101", b"{}"),
    KVEntry(P + "audit/web/00000000000000000001", b"{}"),
    KVEntry(P + "locks/x", b""),
])
def test_user_digest_ignores_daemon_owned_keys(daemon_change: KVEntry) -> None:
    assert user_digest(P, _with(daemon_change)) == user_digest(P, BASE)
    assert kv_digest(_with(daemon_change)) != kv_digest(BASE)
    user_only = [e for e in BASE if not L.is_daemon_owned(e.key)]
    assert user_digest(P, BASE) == kv_digest(user_only)


@pytest.mark.parametrize("user_change", [
    KVEntry(P + "networks/vnet2", b"{}"),  # a new key
    KVEntry(P + "services/web/active", b"green"),  # a value
    KVEntry(P + "services/web/pools/blue/h1_c", b"{}", session="s2"),  # the session
    KVEntry(P + "services/web/pools/blue/h1_c", b"{}"),  # released
    KVEntry(P + "stuff/x", b"?"),  # not part of the layout: still not the daemon's
])
def test_user_digest_changes_on_user_key_value_or_session(user_change: KVEntry) -> None:
    assert user_digest(P, _with(user_change)) != user_digest(P, BASE)


def test_user_digest_sees_a_deleted_user_key() -> None:
    fewer = tuple(e for e in BASE if e.key != P + "networks/vnet1")
    assert user_digest(P, fewer) != user_digest(P, BASE)


def test_user_digest_is_of_its_own_prefix() -> None:
    # Under another prefix, "rt/nodes/..." is nobody's daemon area: it counts.
    assert user_digest("other/", _with(KVEntry(P + "nodes/h9/status", b"{}"))) != \
        user_digest("other/", BASE)


# ------------------------------------------------------------- KV items -> entries


def test_kv_entries_keep_what_the_model_needs_sorted_by_key() -> None:
    items = [Item(P + "services/web/active", b"blue", 7, 3, "s1"),
             Item(P + "networks/a", b"{}", 5, 2)]
    assert kv_entries(items) == (
        KVEntry(P + "networks/a", b"{}", create_index=2, session=None, modify_index=5),
        KVEntry(P + "services/web/active", b"blue", create_index=3, session="s1",
                modify_index=7),
    )
    assert kv_entries([]) == ()


def test_member_keys_are_classified_but_not_memoised() -> None:
    """Members come and go with containers under new names: classifying theirs must not
    grow the memo (it filled with dead containers' names in bench/soak.py); the other
    keys are memoised."""
    from reconciler.kvlayout import KeyRef, classify_key, memoised_keys

    before = memoised_keys()
    for i in range(200):
        assert classify_key(f"members/web/blue/m{i}") == KeyRef("member", "web", "blue", f"m{i}")
        assert classify_key(f"services/web/pools/blue/u{i}") == \
            KeyRef("member", "web", "blue", f"u{i}")
    assert memoised_keys() == before
    assert classify_key("containers/memo-probe") == KeyRef("container", "memo-probe")
    assert memoised_keys() == before + 1
