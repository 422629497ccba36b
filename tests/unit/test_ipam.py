"""Unit tests of the pure parts of `reconciler.ipam` (candidate order, parsing) and of
`Ipam`'s logic against an in-memory fake of the Consul KV (check-and-set semantics
included). The real-Consul behaviour, races included, is in tests/integration/test_ipam.py.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from reconciler.errors import PoolExhausted
from reconciler.ipam import (
    Allocation,
    Ipam,
    candidates,
    parse_allocations,
)
from reconciler.model import AddressPool, Network

P = "rt/"
ip = ipaddress.ip_address


@dataclass(frozen=True)
class FakeItem:
    key: str
    value: bytes
    modify_index: int


@dataclass(frozen=True)
class FakeSnapshot:
    items: Mapping[str, FakeItem]


class FakeKV:
    """Consul KV semantics IPAM relies on: create-only cas=0, cas on ModifyIndex."""

    def __init__(self) -> None:
        self.data: dict[str, FakeItem] = {}
        self._index = itertools.count(10)
        self.puts = 0
        self.steal: set[str] = set()  # keys "another host" creates just before our put
        self.txns = 0
        self.reads = 0

    def read_prefix(self, prefix: str, *, consistent: bool = False) -> FakeSnapshot:
        self.reads += 1
        return FakeSnapshot({k: v for k, v in self.data.items() if k.startswith(prefix)})

    def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        self.puts += key.startswith(f"{P}ipam/")  # allocation writes (not index bumps)
        if key in self.steal:
            self.steal.discard(key)
            self.data[key] = FakeItem(key, b'{"node":"thief","container":"c","interface":"i"}',
                                      next(self._index))
        cur = self.data.get(key)
        if cas is not None and (cur.modify_index if cur else 0) != cas:
            return False
        self.data[key] = FakeItem(key, value, next(self._index))
        return True

    def delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        cur = self.data.get(key)
        if cas is not None and (cur is None or cur.modify_index != cas):
            return False
        self.data.pop(key, None)
        return True

    def raw_put(self, key: str, value: bytes) -> None:
        self.data[key] = FakeItem(key, value, next(self._index))

    def create_many(self, entries: Sequence[tuple[str, bytes]]) -> bool:
        self.txns += 1
        for key in self.steal & {k for k, _ in entries}:
            self.steal.discard(key)
            self.raw_put(key, b'{"node":"thief","container":"c","interface":"i"}')
        if any(k in self.data for k, _ in entries):
            return False  # atomic: none of them
        for key, value in entries:
            self.raw_put(key, value)
        return True


def pool(start: str, end: str) -> AddressPool:
    return AddressPool(ip(start), ip(end))


def net(name: str = "vnet1", start: str = "10.77.1.1", end: str = "10.77.1.4",
        gateway: str | None = "10.77.1.1") -> Network:
    return Network(name, ipaddress.ip_network("10.77.1.0/24"), "br-t", pool=pool(start, end),
                   gateway=ip(gateway) if gateway else None)


def alloc_value(node: str, container: str, interface: str = "eth1") -> bytes:
    return json.dumps({"node": node, "container": container, "interface": interface}).encode()


# ------------------------------------------------------------------ candidates


def test_candidates_cover_the_pool_once_wrapping_from_a_seeded_offset() -> None:
    p = pool("10.77.1.10", "10.77.1.19")
    got = list(candidates(p, [], "node-a/c1/eth1"))
    assert sorted(int(a) for a in got) == list(range(int(p.start), int(p.end) + 1))
    first = int(got[0]) - int(p.start)
    # consecutive from the offset, wrapping to the start
    assert [int(a) - int(p.start) for a in got] == [(first + i) % 10 for i in range(10)]


def test_candidates_are_deterministic_and_seed_dependent() -> None:
    p = pool("10.77.2.0", "10.77.2.255")
    assert list(candidates(p, [], "s")) == list(candidates(p, [], "s"))
    firsts = {next(iter(candidates(p, [], f"node-{i}/c/eth1"))) for i in range(20)}
    assert len(firsts) >= 15  # different hosts mostly start at different addresses


def test_candidates_skip_taken_and_other_versions() -> None:
    p = pool("10.77.1.1", "10.77.1.5")
    taken = [ip("10.77.1.2"), ip("10.77.1.4"), ip("10.77.9.9"), ip("::a")]
    got = set(candidates(p, taken, "x"))
    assert got == {ip("10.77.1.1"), ip("10.77.1.3"), ip("10.77.1.5")}
    assert list(candidates(p, [ip(f"10.77.1.{i}") for i in range(1, 6)], "x")) == []


def test_candidates_keep_the_pool_family_for_small_ipv6_numbers() -> None:
    got = list(candidates(pool("::10", "::13"), [], "x"))
    assert len(got) == 4
    assert all(isinstance(a, ipaddress.IPv6Address) for a in got)


def test_single_address_pool() -> None:
    assert list(candidates(pool("10.77.1.7", "10.77.1.7"), [], "anything")) == [
        ip("10.77.1.7")
    ]


# ------------------------------------------------------------------ parsing


def test_parse_allocations_keeps_good_and_skips_garbage() -> None:
    good = FakeItem(f"{P}ipam/vnet1/10.77.1.5", alloc_value("n1", "c1"), 42)
    items = {
        good.key: good,
        f"{P}ipam/vnet1/fd00::5": FakeItem("", alloc_value("n1", "c2", "eth2"), 43),
        f"{P}ipam/vnet1/10.77.1.6": FakeItem("", b"{not json", 1),
        f"{P}ipam/vnet1/10.77.1.7": FakeItem("", b"[1, 2]", 1),
        f"{P}ipam/vnet1/10.77.1.8": FakeItem("", b'"a string"', 1),
        f"{P}ipam/vnet1/10.77.1.9": FakeItem("", b'{"node": "n"}', 1),
        f"{P}ipam/vnet1/10.77.1.10": FakeItem("", b'{"node":1,"container":"c","interface":"i"}',
                                              1),
        f"{P}ipam/vnet1/10.77.1.11": FakeItem("", b"\xff\xfe", 1),
        f"{P}ipam/vnet1/10.77.1.12": FakeItem("", b"", 1),
        f"{P}ipam/vnet1/10.77.1.13": FakeItem("", b"[" * 100_000, 1),
        f"{P}ipam/vnet1/not-an-ip": FakeItem("", alloc_value("n1", "c3"), 1),
        f"{P}ipam/vnet1/10.77.1.14/extra": FakeItem("", alloc_value("n1", "c4"), 1),
        f"{P}ipam/10.77.1.15": FakeItem("", alloc_value("n1", "c5"), 1),
        "other/ipam/vnet1/10.77.1.16": FakeItem("", alloc_value("n1", "c6"), 1),
        f"{P}nodes/n1/status": FakeItem("", b"{}", 1),
    }
    got = parse_allocations(P, items)
    assert got == [
        Allocation("vnet1", ip("10.77.1.5"), "n1", "c1", "eth1", 42, good.key),
        Allocation("vnet1", ip("fd00::5"), "n1", "c2", "eth2", 43, f"{P}ipam/vnet1/fd00::5"),
    ]


def test_parse_allocations_of_objects_without_attributes() -> None:
    assert parse_allocations(P, {f"{P}ipam/n/10.0.0.1": object()}) == []


# ------------------------------------------------------------------ Ipam on a fake


def test_allocate_is_stable_and_skips_gateway_and_reserved() -> None:
    kv = FakeKV()
    ipam = Ipam(kv, P, "node-a")
    n = net(start="10.77.1.1", end="10.77.1.4", gateway="10.77.1.1")
    a = ipam.allocate(n, "c1", "eth1", reserved=[ip("10.77.1.2")])
    assert a in {ip("10.77.1.3"), ip("10.77.1.4")}
    assert ipam.allocate(n, "c1", "eth1", reserved=[ip("10.77.1.2")]) == a
    b = ipam.allocate(n, "c2", "eth1", reserved=[ip("10.77.1.2")])
    assert {a, b} == {ip("10.77.1.3"), ip("10.77.1.4")}
    full = r"10\.77\.1\.1-10\.77\.1\.4 of network 'vnet1' is full"
    with pytest.raises(PoolExhausted, match=full):
        ipam.allocate(n, "c3", "eth1", reserved=[ip("10.77.1.2")])
    doc = json.loads(kv.data[f"{P}ipam/vnet1/{a}"].value)
    assert (doc["node"], doc["container"], doc["interface"]) == ("node-a", "c1", "eth1")
    assert isinstance(doc["allocated_at"], int)


def test_allocate_many_batches_distinct_addresses_that_allocate_then_keeps() -> None:
    kv = FakeKV()
    ipam = Ipam(kv, P, "node-a")
    n = net(start="10.77.1.1", end="10.77.1.200", gateway="10.77.1.1")
    kv.raw_put(f"{P}ipam/vnet1/10.77.1.7", alloc_value("node-b", "held", "eth1"))
    wants = [(n, f"c{i}", "eth1") for i in range(150)] + [(n, "held", "eth1")]
    got = ipam.allocate_many(wants, [ip("10.77.1.2")], kv.data)
    assert kv.txns == 3 and kv.puts == 0  # 64 + 64 + 22 creates, no single puts
    assert len(got) == 150 and ("held", "vnet1", "eth1") not in got
    addrs = set(got.values())
    assert len(addrs) == 150
    assert not addrs & {ip("10.77.1.1"), ip("10.77.1.2"), ip("10.77.1.7")}
    assert all(a in n.pool for a in addrs)  # type: ignore[operator]
    for (c, _, i), a in list(got.items())[:5]:  # stable: `allocate` finds the same key
        assert ipam.allocate(n, c, i, known=kv.data) == a
        doc = json.loads(kv.data[f"{P}ipam/vnet1/{a}"].value)
        assert (doc["node"], doc["container"], doc["interface"]) == ("node-a", c, i)
    assert kv.puts == 0


def test_allocate_many_returns_what_is_held_already_with_one_read() -> None:
    """A spec put again for containers that kept their addresses, before the watch holds
    their network: one read of the network, no write; each held address is in the
    result as `allocate` would return it, so no reconcile reads the network again.
    Those that need more than that (another node's record, another entry's, out of the
    pool) are left to `allocate`."""
    kv = FakeKV()
    n = net(start="10.77.1.10", end="10.77.1.200", gateway="10.77.1.1")
    first = Ipam(kv, P, "node-a")
    wants = [(n, f"c{i}", "eth1") for i in range(100)]
    made = first.allocate_many(wants, [], kv.data, specs={f"c{i}": "web" for i in range(100)})
    assert len(made) == 100
    kv.raw_put(f"{P}ipam/vnet1/10.77.1.5", alloc_value("node-a", "low", "eth1"))  # not in pool
    kv.raw_put(f"{P}ipam/vnet1/10.77.1.250", alloc_value("node-b", "theirs", "eth1"))
    specs = {f"c{i}": "web" for i in range(100)} | {"c99": "api"}  # c99: another entry now
    again = Ipam(kv, P, "node-a")  # a new daemon: nothing cached, the network not watched
    reads, txns, puts = kv.reads, kv.txns, kv.puts
    more = [(n, "low", "eth1"), (n, "theirs", "eth1")]
    got = again.allocate_many(wants + more, [], {}, covered=set(), specs=specs)
    assert kv.reads == reads + 1 and kv.txns == txns and kv.puts == puts
    assert got == {k: v for k, v in made.items() if k[0] != "c99"}
    for (c, _, i), a in list(got.items())[:5]:
        assert again.allocate(n, c, i, known=kv.data, spec="web") == a
    assert kv.puts == puts  # nothing to write for them either


def test_allocate_many_leaves_a_lost_batch_to_allocate() -> None:
    kv = FakeKV()
    ipam = Ipam(kv, P, "node-a")
    n = net(start="10.77.1.1", end="10.77.1.200", gateway=None)
    wants = [(n, f"c{i}", "eth1") for i in range(100)]
    # Which addresses the first batch will try (the order is seeded by node and network).
    tried = sorted(Ipam(FakeKV(), P, "node-a").allocate_many(wants[:64], [], {}).values())
    # Another host takes one of them just before our transaction: the batch is created
    # whole or not at all, and the allocations left go one by one.
    kv.steal = {f"{P}ipam/vnet1/{tried[0]}"}
    got = ipam.allocate_many(wants, [], {})
    assert got == {} and kv.txns == 1
    assert not any("node-a" in v.value.decode() for v in kv.data.values())
    singles = {ipam.allocate(n, c, i) for _, c, i in wants}
    assert len(singles) == 100 and tried[0] not in singles


def test_allocate_many_stops_at_a_full_pool() -> None:
    kv = FakeKV()
    ipam = Ipam(kv, P, "node-a")
    n = net(start="10.77.1.1", end="10.77.1.4", gateway="10.77.1.1")
    got = ipam.allocate_many([(n, f"c{i}", "eth1") for i in range(5)], [], {})
    assert set(got.values()) == {ip("10.77.1.2"), ip("10.77.1.3"), ip("10.77.1.4")}
    with pytest.raises(PoolExhausted):
        ipam.allocate(n, "c4", "eth1", known=kv.data)


def test_no_pool_is_exhausted() -> None:
    n = Network("np", ipaddress.ip_network("10.77.1.0/24"), "br-t")
    with pytest.raises(PoolExhausted, match="has no pool"):
        Ipam(FakeKV(), P, "a").allocate(n, "c", "eth1")


def test_unreadable_key_is_never_handed_out() -> None:
    kv = FakeKV()
    n = net(start="10.77.1.2", end="10.77.1.3", gateway=None)
    kv.raw_put(f"{P}ipam/vnet1/10.77.1.2", b"garbage")
    got = Ipam(kv, P, "a").allocate(n, "c1", "eth1")
    assert got == ip("10.77.1.3")
    assert kv.puts == 1  # it did not even try the unreadable one


def test_lost_race_moves_to_the_next_candidate() -> None:
    kv = FakeKV()
    n = net(start="10.77.1.2", end="10.77.1.9", gateway=None)
    first = next(iter(candidates(n.pool, [], "a/c1/eth1")))  # type: ignore[arg-type]
    kv.steal.add(f"{P}ipam/vnet1/{first}")
    got = Ipam(kv, P, "a").allocate(n, "c1", "eth1")
    assert got != first
    assert json.loads(kv.data[f"{P}ipam/vnet1/{first}"].value)["node"] == "thief"


def test_allocation_outside_a_shrunk_pool_or_now_reserved_is_replaced() -> None:
    kv = FakeKV()
    ipam = Ipam(kv, P, "a")
    kv.raw_put(f"{P}ipam/vnet1/10.77.1.50", alloc_value("a", "c1"))
    got = ipam.allocate(net(start="10.77.1.2", end="10.77.1.3", gateway=None), "c1", "eth1")
    assert got in {ip("10.77.1.2"), ip("10.77.1.3")}
    assert f"{P}ipam/vnet1/10.77.1.50" not in kv.data
    again = ipam.allocate(net(start="10.77.1.2", end="10.77.1.3", gateway=None), "c1", "eth1",
                          reserved=[got])
    assert again != got
    assert [a.address for a in ipam.allocations("vnet1")] == [again]


def test_release_and_release_container_only_touch_this_node() -> None:
    kv = FakeKV()
    a, b = Ipam(kv, P, "a"), Ipam(kv, P, "b")
    n = net(start="10.77.1.2", end="10.77.1.20", gateway=None)
    a.allocate(n, "c1", "eth1")
    a.allocate(n, "c1", "eth2")
    b.allocate(n, "c2", "eth1")
    assert b.release_container("c1") == 0  # c1 is held by node a
    assert a.release_container("c1") == 2
    assert [(x.node, x.container) for x in a.allocations()] == [("b", "c2")]


def test_a_renamed_node_adopts_its_containers_allocations() -> None:
    kv = FakeKV()
    n = net(start="10.77.1.2", end="10.77.1.20", gateway=None)
    addr = Ipam(kv, P, "old-name").allocate(n, "c1", "eth1")
    new = Ipam(kv, P, "new-name")
    assert new.allocate(n, "c1", "eth1") == addr
    assert [(x.node, x.address) for x in new.allocations()] == [("new-name", addr)]
    assert new.reclaim_dead_nodes(grace=0, now=0.0) == []
    assert new.reclaim_dead_nodes(grace=0, now=1.0) == []


def test_release_is_check_and_set() -> None:
    kv = FakeKV()
    ipam = Ipam(kv, P, "a")
    n = net(start="10.77.1.2", end="10.77.1.2", gateway=None)
    ipam.allocate(n, "c1", "eth1")
    (old,) = ipam.allocations()
    kv.raw_put(old.key, alloc_value("b", "c9"))  # rewritten by someone else since
    assert ipam.release(old) is False
    assert old.key in kv.data


# ------------------------------------------------------------------ reclaim


def _held(kv: FakeKV, node: str, addr: str) -> None:
    kv.raw_put(f"{P}ipam/vnet1/{addr}", alloc_value(node, f"c-{addr}"))


def test_reclaim_waits_for_the_grace_period_then_releases() -> None:
    kv = FakeKV()
    ipam = Ipam(kv, P, "me")
    _held(kv, "dead", "10.77.1.2")
    _held(kv, "dead", "10.77.1.3")
    _held(kv, "alive", "10.77.1.4")
    _held(kv, "me", "10.77.1.5")  # own status key missing: never reclaimed
    kv.raw_put(f"{P}nodes/alive/status", b"{}")
    assert ipam.reclaim_dead_nodes(grace=60, now=1000.0) == []
    assert ipam.reclaim_dead_nodes(grace=60, now=1060.0) == []  # exactly the grace
    released = ipam.reclaim_dead_nodes(grace=60, now=1060.5)
    assert sorted(str(a.address) for a in released) == ["10.77.1.2", "10.77.1.3"]
    assert {a.node for a in ipam.allocations()} == {"alive", "me"}
    assert ipam.reclaim_dead_nodes(grace=60, now=5000.0) == []


def test_reclaim_forgets_a_node_that_came_back() -> None:
    kv = FakeKV()
    ipam = Ipam(kv, P, "me")
    _held(kv, "flaky", "10.77.1.2")
    ipam.reclaim_dead_nodes(grace=10, now=0.0)
    kv.raw_put(f"{P}nodes/flaky/status", b"{}")
    assert ipam.reclaim_dead_nodes(grace=10, now=5.0) == []
    del kv.data[f"{P}nodes/flaky/status"]
    assert ipam.reclaim_dead_nodes(grace=10, now=11.0) == []  # clock restarted at 11
    assert ipam.reclaim_dead_nodes(grace=10, now=21.0) == []
    assert [str(a.address) for a in ipam.reclaim_dead_nodes(grace=10, now=21.5)] == [
        "10.77.1.2"
    ]


def test_reclaim_default_grace_is_an_hour() -> None:
    # Long: a daemon that is merely away (upgrade, crash loop) must not lose addresses
    # its containers still use; it also re-asserts its keys when back.
    kv = FakeKV()
    ipam = Ipam(kv, P, "me")
    _held(kv, "dead", "10.77.1.2")
    assert ipam.reclaim_dead_nodes(now=0.0) == []
    assert ipam.reclaim_dead_nodes(now=3600.0) == []
    assert len(ipam.reclaim_dead_nodes(now=3600.1)) == 1


def test_status_key_shapes() -> None:
    kv = FakeKV()
    for key in ("nodes/n1/status", "nodes/n2/other", "nodes/n3/status/x", "nodes//status"):
        kv.raw_put(P + key, b"{}")
    assert Ipam(kv, P, "me").alive_nodes() == {"n1"}


# ------------------------------------------------------------------ the entry name (issue 12)


def test_records_name_the_entry_and_old_records_still_parse() -> None:
    items = {
        f"{P}ipam/v/10.77.1.5": FakeItem("", json.dumps(
            {"node": "n", "container": "c1", "interface": "eth1", "spec": "web"}).encode(), 1),
        f"{P}ipam/v/10.77.1.6": FakeItem("", alloc_value("n", "c2"), 1),  # an older daemon
        f"{P}ipam/v/10.77.1.7": FakeItem("", json.dumps(
            {"node": "n", "container": "c3", "interface": "eth1", "spec": ["x"]}).encode(), 1),
    }
    got = {a.container: a.spec for a in parse_allocations(P, items)}
    assert got == {"c1": "web", "c2": "", "c3": ""}


def test_allocate_claim_reassert_and_batches_record_the_entry() -> None:
    kv = FakeKV()
    ipam = Ipam(kv, P, "a")
    n = net(start="10.77.1.2", end="10.77.1.100", gateway=None)

    def spec_of(addr: object) -> object:
        return json.loads(kv.data[f"{P}ipam/vnet1/{addr}"].value).get("spec")

    one = ipam.allocate(n, "c1", "eth1", spec="web")
    assert spec_of(one) == "web"
    assert ipam.claim(n, ip("10.77.1.150"), "c2", "eth1", "db") is None
    assert spec_of("10.77.1.150") == "db"
    got = ipam.allocate_many([(n, "c3", "eth1"), (n, "c4", "eth1")], [], kv.data,
                             specs={"c3": "web"})
    assert spec_of(got[("c3", "vnet1", "eth1")]) == "web"
    assert spec_of(got[("c4", "vnet1", "eth1")]) is None  # not told: no field at all
    assert ipam.reassert("vnet1", ip("10.77.1.160"), "c5", "eth1", "web")
    assert spec_of("10.77.1.160") == "web"


def test_an_old_record_gets_the_entry_name_and_keeps_its_address() -> None:
    kv = FakeKV()
    n = net(start="10.77.1.2", end="10.77.1.20", gateway=None)
    kv.raw_put(f"{P}ipam/vnet1/10.77.1.9", alloc_value("a", "c1"))  # no "spec"
    ipam = Ipam(kv, P, "a")
    assert ipam.allocate(n, "c1", "eth1", spec="web") == ip("10.77.1.9")
    [a] = ipam.allocations()
    assert (a.node, a.container, a.spec) == ("a", "c1", "web")
    puts = kv.puts
    assert ipam.allocate(n, "c1", "eth1", spec="web") == ip("10.77.1.9")
    assert kv.puts == puts  # recorded once, not rewritten again
    # A static claim of an old record too.
    kv.raw_put(f"{P}ipam/vnet1/10.77.1.150", alloc_value("a", "c2"))
    assert ipam.claim(n, ip("10.77.1.150"), "c2", "eth1", "db") is None
    assert {x.container: x.spec for x in ipam.allocations()} == {"c1": "web", "c2": "db"}
