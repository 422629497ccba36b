"""apply's diff: writes only what differs, in dependency order; prune spares daemon keys."""

from __future__ import annotations

from reconciler.kvsync import CurrentKey, desired_kv, diff_kv
from reconciler.model import KeyRef, RawEntry

P = "reconciler/"


def entries() -> list[RawEntry]:
    return [
        RawEntry("f: services.web.active", KeyRef("service_active", "web"), "blue", 1),
        RawEntry("f: services.web.config", KeyRef("service_config", "web"),
                 {"bind": "127.0.0.1:1"}, 2),
        RawEntry("f: containers.c", KeyRef("container", "c"), {"interfaces": []}, 3),
        RawEntry("f: networks.n", KeyRef("network", "n"), {"subnet": "10.77.1.0/24",
                                                            "bridge": "b"}, 4),
        RawEntry("f: ...", KeyRef("member", "web", "blue", "m1"), {"port": 1}, 5),
    ]


def test_creates_in_dependency_order() -> None:
    changes = diff_kv(desired_kv(entries(), P), {}, P, prune=False)
    assert [c.key for c in changes] == [
        P + "networks/n", P + "containers/c", P + "services/web/config",
        P + "services/web/pools/blue/m1", P + "services/web/active"]
    assert all(c.op == "create" and c.index == 0 for c in changes)
    assert changes[-1].value == b"blue"
    assert changes[0].value == b'{"bridge":"b","subnet":"10.77.1.0/24"}'


def test_only_differences_with_their_index() -> None:
    want = desired_kv(entries(), P)
    current = {k: CurrentKey(v, 10 + i) for i, (k, (_, v)) in enumerate(want.items())}
    current[P + "services/web/active"] = CurrentKey(b"green", 99)
    changes = diff_kv(want, current, P, prune=False)
    assert [(c.op, c.key, c.value, c.index) for c in changes] == [
        ("update", P + "services/web/active", b"blue", 99)]


def test_prune_spares_daemon_and_published_keys() -> None:
    want = desired_kv(entries(), P)
    current = {k: CurrentKey(v, 1) for k, (_, v) in want.items()}
    current.update({
        P + "networks/old": CurrentKey(b"{}", 5),
        P + "services/web/pools/green/m9": CurrentKey(b"{}", 6),
        P + "services/web/pools/green/pub": CurrentKey(b"{}", 7, session="abc"),
        P + "nodes/h1/status": CurrentKey(b"{}", 8),
        P + "ipam/n/10.77.1.100": CurrentKey(b"{}", 9),
        P + "audit/web/1": CurrentKey(b"{}", 10),
        P + "unknown/thing": CurrentKey(b"{}", 11),
        "other/networks/x": CurrentKey(b"{}", 12),
    })
    changes = diff_kv(want, current, P, prune=True)
    assert [(c.op, c.key, c.index) for c in changes] == [
        ("delete", P + "services/web/pools/green/m9", 6),
        ("delete", P + "networks/old", 5)]
    assert diff_kv(want, current, P, prune=False) == []
