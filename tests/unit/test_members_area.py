"""Members nodes publish live in their own area (issue 9): `members/<service>/<pool>/<m>`
with a generation key per service. What the publisher reads and writes, how the watch
merges them into the desired state, and that `apply --prune` leaves them alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from reconciler.adapters.consul_kv import KVItem, KVSnapshot
from reconciler.kvlayout import KeyRef, KVEntry, Layout, member_bucket
from reconciler.kvsync import CurrentKey, diff_kv
from reconciler.members import MemberPublisher, Wanted
from reconciler.runtime.kvwatch import KVWatcher

P = "reconciler/"
L = Layout(P)
SVC = json.dumps({"bind": "127.0.0.1:18080"}).encode()


def member(port: int) -> bytes:
    return json.dumps({"address": "127.0.0.1", "port": port, "weight": 100}).encode()


@dataclass
class SessionKV:
    """KV with sessions and indices, recording reads and writes."""

    data: dict[str, KVItem] = field(default_factory=dict)
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    n: int = 10

    def put(self, key: str, value: bytes, *, cas: int | None = None,
            acquire: str | None = None) -> bool:
        self.writes.append(key)
        self.n += 1
        self.data[key] = KVItem(key, value, modify_index=self.n, create_index=self.n,
                                session=acquire)
        return True

    def delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        self.writes.append(f"delete {key}")
        self.data.pop(key, None)
        return True

    def read_prefix(self, prefix: str, *, index: int | None = None, wait: str | None = None,
                    consistent: bool = False) -> KVSnapshot:
        self.reads.append(prefix)
        items = {k: v for k, v in self.data.items() if k.startswith(prefix)}
        return KVSnapshot(max([v.modify_index for v in items.values()] + [1]),
                          MappingProxyType(items))


def test_published_members_are_members_but_daemon_owned() -> None:
    key = L.published_member("web", "blue", "h1_c1")
    assert key == P + "members/web/blue/h1_c1"
    assert L.parse(key) == KeyRef("member", "web", "blue", "h1_c1")
    assert L.is_daemon_owned(key)
    assert L.members_index("web") == P + "index/member-buckets/" + member_bucket("web")
    assert L.parse(P + "members/web/blue") is None  # not a member's shape: ignored
    # `apply --prune` never deletes them, held by a session or not.
    current = {key: CurrentKey(member(1), 5, None),
               L.member("web", "blue", "old"): CurrentKey(member(2), 6, None)}
    deletes = [c.key for c in diff_kv({}, current, P, prune=True) if c.op == "delete"]
    assert deletes == [L.member("web", "blue", "old")]


def test_publisher_writes_the_members_area_and_bumps_the_service_generation() -> None:
    kv = SessionKV()
    # A daemon of the previous version published under services/ with this session.
    kv.put(L.member("web", "blue", "h1_old"), member(1), acquire="s1")
    kv.put(L.member("web", "blue", "users"), member(2))  # a user's member: not ours
    kv.put(L.published_member("api", "blue", "h2_x"), member(3), acquire="s2")  # other node
    pub = MemberPublisher(kv, P, "h1")
    want = {L.published_member("web", "blue", "h1_c1"):
            Wanted(L.published_member("web", "blue", "h1_c1"), member(4))}
    changes = pub.sync("s1", want)
    assert changes == ["published members/web/blue/h1_c1",
                       "withdrew services/web/pools/blue/h1_old"]
    assert L.member("web", "blue", "users") in kv.data
    assert L.published_member("api", "blue", "h2_x") in kv.data
    assert L.members_index("web") in kv.data  # others learn which service moved
    # The first sync read everything once; later ones only this node's services.
    kv.reads.clear()
    kv.writes.clear()
    assert pub.sync("s1", want) == []
    assert kv.reads == [L.members_prefix("web")]
    assert kv.writes == []  # nothing changed: no write, no bump


def entry(key: str, value: bytes, index: int, session: str | None = None) -> KVEntry:
    return KVEntry(key, value, index, session, index)


def test_watch_merges_published_members_parsing_only_the_services_that_moved() -> None:
    kv = SessionKV()
    kv.put(L.service_config("web"), SVC)
    kv.put(L.service_config("api"), SVC.replace(b"18080", b"18081"))
    kv.put(L.member("web", "blue", "u1"), member(1))
    w = KVWatcher(kv, P, lambda s: None, areas=L.desired_areas())
    web = {L.published_member("web", "blue", "h1_a"):
           entry(L.published_member("web", "blue", "h1_a"), member(2), 20, "s1")}
    api = {L.published_member("api", "green", "h2_b"):
           entry(L.published_member("api", "green", "h2_b"), member(3), 21, "s2")}
    w.set_published({"web": web, "api": api}, {"web", "api"}, deliver=False)
    snap = w.poll(consistent=True)
    assert snap is not None
    assert set(snap.state.services["web"].pools["blue"]) == {"u1", "h1_a"}
    assert set(snap.state.services["api"].pools["green"]) == {"h2_b"}
    desired = snap.desired_digest
    # Another node's member of api changes: the desired areas are not read, the state
    # has it, and the desired digest says only published members moved.
    got: list[Any] = []
    w.on_change = got.append
    reads = len(kv.reads)
    api2 = {**api, L.published_member("api", "green", "h3_c"):
            entry(L.published_member("api", "green", "h3_c"), member(4), 22, "s3")}
    w.set_published({"web": {"broken": entry("x", b"{", 1)}, "api": api2}, {"api"})
    assert len(kv.reads) == reads
    assert len(got) == 1 and got[0].desired_digest == desired
    assert set(got[0].state.services["api"].pools["green"]) == {"h2_b", "h3_c"}
    # web was not in `changed`: what was parsed for it stays (the junk given is unseen).
    assert set(got[0].state.services["web"].pools["blue"]) == {"u1", "h1_a"}
    # A service whose published members are all gone has only the user's.
    w.set_published({}, {"web"})
    assert set(got[-1].state.services["web"].pools["blue"]) == {"u1"}


def test_published_members_of_a_service_without_config_are_reported_at_its_config() -> None:
    kv = SessionKV()
    kv.put(L.service_config("web"), SVC)
    w = KVWatcher(kv, P, lambda s: None, areas=L.desired_areas())
    orphan = {L.published_member("ghost", "blue", "h1_a"):
              entry(L.published_member("ghost", "blue", "h1_a"), member(2), 20, "s1")}
    w.set_published({"ghost": orphan}, {"ghost"}, deliver=False)
    snap = w.poll(consistent=True)
    assert snap is not None and "ghost" not in snap.state.services
    assert [str(p) for p in snap.state.problems] == [
        f"{L.service_config('ghost')}: missing: the service has pools or an active pool "
        "but no config"]
    parsed = w.memo.parsed
    got: list[Any] = []
    w.on_change = got.append
    w.set_published({}, {"ghost"})
    assert len(got) == 1 and got[0].state.problems == ()
    assert w.memo.parsed == parsed  # the desired areas were not parsed again
