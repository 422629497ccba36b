"""The area watches of issue 9: which change wakes which area, what is read and parsed
again, with an in-memory KV (Consul's prefix-index semantics) as the seam."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from reconciler.adapters.consul_kv import KVItem, KVSnapshot
from reconciler.kvlayout import MEMBER_BUCKETS, Layout, member_bucket
from reconciler.runtime.areawatch import AreaWatch, IndexedArea, TokenBucket
from reconciler.runtime.kvwatch import KVWatcher

P = "reconciler/"
L = Layout(P)
NET = json.dumps({"subnet": "10.77.1.0/24", "bridge": "br-a"}).encode()
SVC = json.dumps({"bind": "127.0.0.1:18080"}).encode()
MEMBER = json.dumps({"address": "127.0.0.2", "port": 8080}).encode()


@dataclass
class MemKV:
    """Keys with Consul's indices: a prefix read answers with the highest ModifyIndex
    under the prefix (as Consul's KV list does); every read is recorded."""

    data: dict[str, KVItem] = field(default_factory=dict)
    reads: list[str] = field(default_factory=list)
    _n: Any = field(default_factory=lambda: itertools.count(10))
    tombstones: dict[str, int] = field(default_factory=dict)

    def put(self, key: str, value: bytes) -> None:
        old = self.data.get(key)
        if old is not None and old.value == value:
            return  # Consul skips a write that changes nothing: no index moves
        i = next(self._n)
        self.data[key] = KVItem(key, value, modify_index=i,
                                create_index=old.create_index if old else i)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)
        self.tombstones[key] = next(self._n)

    def read_prefix(self, prefix: str, *, index: int | None = None, wait: str | None = None,
                    consistent: bool = False) -> KVSnapshot:
        self.reads.append(prefix)
        items = {k: v for k, v in self.data.items() if k.startswith(prefix)}
        idx = max([v.modify_index for v in items.values()]
                  + [i for k, i in self.tombstones.items() if k.startswith(prefix)] + [1])
        return KVSnapshot(idx, MappingProxyType(items))


def desired_watch(kv: MemKV) -> KVWatcher:
    return KVWatcher(kv, P, lambda s: None, areas=L.desired_areas())


def test_desired_areas_are_the_user_areas_and_the_policy_key() -> None:
    assert L.desired_areas() == [P + "networks/", P + "containers/", P + "services/",
                                 P + "policy"]
    for area in L.desired_areas():
        # Nothing daemon-owned lives under a desired area: their churn wakes none.
        for key in (L.allocation("n", "10.77.1.5"), L.node_status("h"), L.host("h"),
                    L.ipam_index("n"), L.audit_record("web", 1.0)):
            assert not key.startswith(area)


def test_other_hosts_status_and_allocations_wake_no_desired_area() -> None:
    kv = MemKV()
    kv.put(L.network("a"), NET)
    kv.put(L.service_config("web"), SVC)
    w = desired_watch(kv)
    assert w.poll(consistent=True) is not None
    kv.put(L.node_status("h2"), b'{"node":"h2"}')
    kv.put(L.allocation("a", "10.77.1.9"), b'{"node":"h2","container":"c","interface":"e"}')
    kv.put(L.ipam_index("a"), b"")
    for area in w.areas:
        assert area.poll(block=False) is None  # each area's own index did not move
    kv.put(L.member("web", "blue", "m1"), MEMBER)
    changes = {a.prefix: a.poll(block=False) for a in w.areas}
    assert {p for p, c in changes.items() if c is not None} == {P + "services/"}
    ch = changes[P + "services/"]
    assert ch is not None and ch.changed == {L.member("web", "blue", "m1")}


def test_unchanged_entries_are_not_parsed_again() -> None:
    kv = MemKV()
    kv.put(L.network("a"), NET)
    kv.put(L.service_config("web"), SVC)
    for i in range(50):
        kv.put(L.member("web", "blue", f"m{i}"), MEMBER)
    w = desired_watch(kv)
    first = w.poll(consistent=True)
    assert first is not None and len(first.state.services["web"].pools["blue"]) == 50
    parsed = w.memo.parsed
    assert parsed >= 52
    kv.put(L.member("web", "blue", "m50"), MEMBER)  # one new entry
    kv.put(L.member("web", "blue", "m3"), MEMBER + b" ")  # one rewritten
    snap = w.poll(consistent=True)
    assert snap is not None and len(snap.state.services["web"].pools["blue"]) == 51
    assert w.memo.parsed - parsed == 2  # only those two
    kv.delete(L.member("web", "blue", "m0"))
    snap = w.poll(consistent=True)
    assert snap is not None and "m0" not in snap.state.services["web"].pools["blue"]
    assert w.memo.parsed - parsed == 2


def test_containers_are_parsed_again_only_when_they_or_the_networks_moved() -> None:
    kv = MemKV()
    kv.put(L.network("a"), NET)
    for i in range(20):
        kv.put(L.container(f"app{i}"), json.dumps({"interfaces": [
            {"name": "eth1", "network": "a", "address": f"10.77.1.{10 + i}/24"}]}).encode())
    w = desired_watch(kv)
    first = w.poll(consistent=True)
    assert first is not None and len(first.state.containers) == 20
    parsed = w.memo.parsed
    kv.put(L.container("app3"), json.dumps({"interfaces": [
        {"name": "eth2", "network": "a", "address": "10.77.1.13/24"}]}).encode())
    snap = w.poll(consistent=True)
    assert snap is not None and snap.state.containers["app3"].interfaces[0].name == "eth2"
    assert w.memo.parsed - parsed == 1  # that entry alone: the networks were kept whole
    # A network changes: every container is checked against it again.
    parsed = w.memo.parsed
    kv.put(L.network("a"), NET.replace(b"}", b', "mtu": 1400}'))
    snap = w.poll(consistent=True)
    assert snap is not None and snap.state.networks["a"].mtu == 1400
    assert w.memo.parsed - parsed == 1 + 20
    # ... and a typo in it keeps its last valid value, the containers theirs.
    kv.put(L.network("a"), b"{")
    snap = w.poll(consistent=True)
    assert snap is not None and snap.state.networks["a"].mtu == 1400
    assert len(snap.state.containers) == 20 and snap.state.problems


def test_area_reports_changed_and_removed_keys_and_resets_a_backwards_index() -> None:
    kv = MemKV()
    kv.put(P + "networks/a", NET)
    a = AreaWatch(kv, P + "networks/")
    first = a.poll()
    assert first is not None and first.changed == {P + "networks/a"}
    assert a.poll() is None  # nothing moved
    kv.put(P + "networks/b", NET)
    kv.delete(P + "networks/a")
    ch = a.poll()
    assert ch is not None and ch.changed == {P + "networks/b"}
    assert ch.removed == {P + "networks/a"}
    a.index = 10**9  # e.g. a snapshot restore: Consul's index is now lower
    a.poll()
    assert a.index == 0


def test_suddenly_empty_area_is_confirmed_before_it_is_believed() -> None:
    calls: list[bool] = []

    class Flaky(MemKV):
        def read_prefix(self, prefix: str, *, index: int | None = None,
                        wait: str | None = None, consistent: bool = False) -> KVSnapshot:
            calls.append(consistent)
            if len(calls) == 2:  # a stale, empty answer (agent restart, election)
                return KVSnapshot(99, MappingProxyType({}))
            return super().read_prefix(prefix, consistent=consistent)

    kv = Flaky()
    kv.put(P + "containers/c", b"{}")
    a = AreaWatch(kv, P + "containers/", confirm_empty=True)
    a.poll()
    assert a.poll() is None and calls[-1] is True  # confirmed: still there
    assert P + "containers/c" in a.entries


def test_indexed_area_reads_only_wanted_pieces_whose_generation_moved() -> None:
    kv = MemKV()
    gen = itertools.count()

    def bump(net: str) -> None:  # as Ipam._bump: a new value each time
        kv.put(L.ipam_index(net), str(next(gen)).encode())

    for net in ("a", "b", "c"):
        kv.put(L.allocation(net, "10.77.1.5"), b"{}")
        bump(net)
    wanted = {"a", "b"}
    area = IndexedArea(kv, L.ipam_prefix(), L.ipam_index_prefix(), wanted=lambda: wanted)
    assert area.poll() == {"a", "b"}
    assert set(area.pieces()) == {"a", "b"} and area.piece_reads == 2
    # Another host allocates in a network this host does not have: one index read.
    kv.put(L.allocation("c", "10.77.1.6"), b"{}")
    bump("c")
    kv.reads.clear()
    assert area.poll() == set()
    assert kv.reads == [L.ipam_index_prefix()]
    # ... and in one it has: that piece alone is read.
    kv.put(L.allocation("b", "10.77.1.6"), b"{}")
    bump("b")
    kv.reads.clear()
    assert area.poll() == {"b"}
    assert kv.reads == [L.ipam_index_prefix(), L.ipam_prefix("b")]
    assert L.allocation("b", "10.77.1.6") in area.entries()
    # The host leaves network a: it is dropped without a read.
    wanted.discard("a")
    kv.reads.clear()
    assert area.sync() == {"a"} and kv.reads == []
    # A missed bump (written without the index) is caught by the periodic refresh.
    kv.put(L.allocation("b", "10.77.1.7"), b"{}")
    assert area.poll() == set()
    assert area.refresh() == {"b"}
    assert L.allocation("b", "10.77.1.7") in area.entries()


@dataclass
class ListingKV(MemKV):
    """MemKV that can list the names under a prefix, as ConsulKV.list_children."""

    def list_children(self, prefix: str) -> list[str]:
        self.reads.append(f"list {prefix}")
        return sorted({k[len(prefix):].split("/", 1)[0] for k in self.data
                       if k.startswith(prefix) and "/" in k[len(prefix):]})


def test_members_share_a_fixed_number_of_generation_keys() -> None:
    services = [f"svc{i:04d}" for i in range(1000)]
    keys = {L.members_index(s) for s in services}
    assert len(keys) == MEMBER_BUCKETS  # however many services: the index read is fixed
    assert all(k.startswith(L.members_index_prefix()) for k in keys)
    assert L.members_index("web") == L.members_index_prefix() + member_bucket("web")
    assert member_bucket("web") == member_bucket("web")  # stable (not Python's hash)


def test_bucketed_area_reads_the_wanted_pieces_of_a_moved_bucket_only() -> None:
    kv = ListingKV()
    gen = itertools.count()

    def publish(svc: str, m: str) -> None:  # as MemberPublisher: write, then bump
        kv.put(L.published_member(svc, "blue", m), b"{}")
        kv.put(L.members_index(svc), str(next(gen)).encode())

    # Two services in one bucket, one in another.
    by_bucket: dict[str, list[str]] = {}
    for i in range(500):
        by_bucket.setdefault(member_bucket(f"s{i}"), []).append(f"s{i}")
    b1, b2 = list(by_bucket.values())[:2]
    served, neighbour, other = b1[0], b1[1], b2[0]
    for svc in (served, neighbour, other):
        publish(svc, "h1_a")
    wanted: set[str] | None = {served}
    area = IndexedArea(kv, L.members_prefix(), L.members_index_prefix(),
                       wanted=lambda: wanted, bucket_of=member_bucket)
    assert area.poll() == {served} and set(area.pieces()) == {served}
    # A service of another bucket changes: the index alone is read.
    publish(other, "h2_b")
    kv.reads.clear()
    assert area.poll() == set() and kv.reads == [L.members_index_prefix()]
    # One of the same bucket: the served piece is read again, and found unchanged.
    publish(neighbour, "h2_b")
    kv.reads.clear()
    assert area.poll() == set()
    assert kv.reads == [L.members_index_prefix(), L.members_prefix(served)]
    publish(served, "h2_b")
    assert area.poll() == {served}
    assert L.published_member(served, "blue", "h2_b") in area.entries()
    # Every service (--serve '*'): the pieces that exist are listed when a bucket moved.
    wanted = None
    kv.reads.clear()
    assert area.sync() == {neighbour, other}
    assert kv.reads[0] == f"list {L.members_prefix()}"
    kv.reads.clear()
    assert area.sync() == set() and kv.reads == []  # no bucket moved: no listing
    publish("brand-new", "h3_c")
    assert "brand-new" in area.poll()
    assert area.refresh() == set()


def test_token_bucket_lets_a_burst_through_and_spaces_a_storm() -> None:
    now = [0.0]
    b = TokenBucket(rate=10.0, burst=3.0, clock=lambda: now[0])
    assert [b.delay() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert abs(b.delay() - 0.1) < 1e-9  # then one read per 1/rate
    now[0] += 10.0
    assert b.delay() == 0.0  # refilled after a quiet while


def test_a_flip_alone_is_applied_without_parsing_the_desired_state() -> None:
    kv = MemKV()
    kv.put(L.network("a"), NET)
    for s in ("web", "api"):
        kv.put(L.service_config(s), SVC.replace(b"18080", b"18081") if s == "api" else SVC)
        kv.put(L.service_active(s), b"blue")
    got: list[Any] = []
    w = KVWatcher(kv, P, got.append, areas=L.desired_areas())
    first = w.poll(consistent=True)
    assert first is not None and first.state.services["web"].active == "blue"
    services = next(a for a in w.areas if a.prefix == P + "services/")

    def deliver() -> Any:
        change = services.poll(block=False)
        assert change is not None
        w._area_changed(change)
        return got[-1]

    parsed = w.memo.parsed
    kv.put(L.service_active("web"), b"green")
    snap = deliver()
    assert snap.state.services["web"].active == "green"
    assert snap.state.services["api"].active == "blue"
    assert w.memo.parsed == parsed  # nothing parsed: the fast path
    assert snap.desired_digest != first.desired_digest
    # A typo is not a flip: the full parse reports it and keeps the last valid pool.
    kv.put(L.service_active("web"), b"gr een")
    snap = deliver()
    assert snap.state.services["web"].active == "green"
    assert any("keeping its last valid value" in str(p) for p in snap.state.problems)
    # ... and the next valid flip clears the problem (full parse: the key was invalid).
    kv.put(L.service_active("web"), b"blue")
    snap = deliver()
    assert snap.state.services["web"].active == "blue" and snap.state.problems == ()
    # Any other change (a config) is parsed.
    parsed = w.memo.parsed
    kv.put(L.service_config("api"), SVC.replace(b"18080", b"18082"))
    snap = deliver()
    assert snap.state.services["api"].config.bind_port == 18082
    assert w.memo.parsed > parsed
