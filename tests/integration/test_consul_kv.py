"""Integration tests of `reconciler.adapters.consul_kv` against the real Consul dev agent.

Every test writes under its own random prefix and deletes it at teardown.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import wait_for

from reconciler.adapters.consul_kv import (
    MAX_TXN_OPS,
    ConsulKV,
    ConsulSettings,
    KVSnapshot,
    TxnOp,
)
from reconciler.errors import CasConflict, ConsulError, ConsulUnavailable

pytestmark = pytest.mark.integration


@pytest.fixture
def kv(consul_addr: str) -> Iterator[ConsulKV]:
    client = ConsulKV(ConsulSettings.from_env({"CONSUL_HTTP_ADDR": consul_addr}))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix(kv: ConsulKV, run_id: str) -> Iterator[str]:
    p = f"reconciler-test/{run_id}-{secrets.token_hex(4)}/"
    try:
        yield p
    finally:
        kv.delete(p, recurse=True)


def test_put_get_roundtrip(kv: ConsulKV, prefix: str) -> None:
    key = prefix + "a"
    assert kv.get(key) is None
    assert kv.put(key, b"\x00binary\xff") is True
    item = kv.get(key)
    assert item is not None
    assert item.key == key
    assert item.value == b"\x00binary\xff"
    assert isinstance(item.modify_index, int) and item.modify_index > 0
    assert item.create_index == item.modify_index
    assert item.session is None
    assert kv.put(prefix + "empty", b"")
    empty = kv.get(prefix + "empty")
    assert empty is not None and empty.value == b""
    assert kv.delete(key) is True
    assert kv.get(key) is None
    assert kv.delete(key) is True  # deleting a missing key is fine


def test_read_prefix_is_recursive_and_scoped(kv: ConsulKV, prefix: str) -> None:
    kv.put(prefix + "x/1", b"one")
    kv.put(prefix + "x/deep/2", b"two")
    kv.put(prefix + "y", b"why")
    kv.put(prefix.rstrip("/") + "-sibling", b"not mine")
    try:
        snap = kv.read_prefix(prefix + "x/")
        assert set(snap.items) == {prefix + "x/1", prefix + "x/deep/2"}
        assert snap.items[prefix + "x/deep/2"].value == b"two"
        whole = kv.read_prefix(prefix)
        assert set(whole.items) == {prefix + "x/1", prefix + "x/deep/2", prefix + "y"}
        with pytest.raises(TypeError):
            whole.items[prefix + "z"] = whole.items[prefix + "y"]  # type: ignore[index]
    finally:
        kv.delete(prefix.rstrip("/") + "-sibling")


def test_read_prefix_empty(kv: ConsulKV, prefix: str) -> None:
    snap = kv.read_prefix(prefix + "nothing-here/")
    assert snap.items == {}
    assert isinstance(snap.index, int) and snap.index > 0


def test_index_is_int_and_increases(kv: ConsulKV, prefix: str) -> None:
    kv.put(prefix + "a", b"1")
    first = kv.read_prefix(prefix)
    assert type(first.index) is int
    kv.put(prefix + "a", b"2")
    second = kv.read_prefix(prefix, consistent=True)
    assert second.index > first.index
    assert second.items[prefix + "a"].modify_index == second.index


def test_blocking_query_returns_on_change(kv: ConsulKV, prefix: str) -> None:
    kv.put(prefix + "a", b"1")
    start = kv.read_prefix(prefix)
    result: list[KVSnapshot] = []
    began = time.monotonic()
    watcher = threading.Thread(
        target=lambda: result.append(kv.read_prefix(prefix, index=start.index, wait="20s"))
    )
    watcher.start()
    kv.put(prefix + "b", b"2")
    watcher.join(timeout=15)
    assert not watcher.is_alive(), "blocking query did not return after a change"
    assert time.monotonic() - began < 15
    assert result[0].index > start.index
    assert result[0].items[prefix + "b"].value == b"2"


def test_blocking_query_times_out_with_same_index(kv: ConsulKV, prefix: str) -> None:
    kv.put(prefix + "a", b"1")
    start = kv.read_prefix(prefix)
    began = time.monotonic()
    again = kv.read_prefix(prefix, index=start.index, wait="1s")
    elapsed = time.monotonic() - began
    assert again.index == start.index
    assert again.items == start.items
    assert 0.5 <= elapsed < 5, elapsed


def test_txn_more_than_64_ops_all_written(kv: ConsulKV, prefix: str) -> None:
    ops = [TxnOp.set(f"{prefix}many/{i:03d}", f"v{i}".encode()) for i in range(150)]
    kv.txn(ops)
    snap = kv.read_prefix(prefix + "many/")
    assert len(snap.items) == 150
    assert all(snap.items[f"{prefix}many/{i:03d}"].value == f"v{i}".encode() for i in range(150))
    kv.txn([TxnOp.delete_tree(prefix + "many/")])
    assert kv.read_prefix(prefix + "many/").items == {}


def test_txn_ops_cas_delete_check(kv: ConsulKV, prefix: str) -> None:
    kv.put(prefix + "a", b"1")
    kv.put(prefix + "gone", b"x")
    a = kv.get(prefix + "a")
    gone = kv.get(prefix + "gone")
    assert a is not None and gone is not None
    kv.txn(
        [
            TxnOp.check_index(prefix + "a", a.modify_index),
            TxnOp.cas(prefix + "a", b"2", a.modify_index),
            TxnOp.cas(prefix + "new", b"n", 0),
            TxnOp.check_not_exists(prefix + "never"),
            TxnOp.delete_cas(prefix + "gone", gone.modify_index),
            TxnOp.delete(prefix + "missing-is-fine"),
        ]
    )
    snap = kv.read_prefix(prefix)
    assert {k: v.value for k, v in snap.items.items()} == {
        prefix + "a": b"2",
        prefix + "new": b"n",
    }


def test_txn_failure_names_the_key_and_rolls_back_the_chunk(kv: ConsulKV, prefix: str) -> None:
    kv.put(prefix + "guarded", b"1")
    ops = [TxnOp.set(f"{prefix}w/{i}", b"x") for i in range(5)]
    ops.append(TxnOp.cas(prefix + "guarded", b"2", 1))  # stale index
    with pytest.raises(CasConflict) as info:
        kv.txn(ops)
    message = str(info.value)
    assert f"op 5 (cas '{prefix}guarded')" in message
    assert "\n" not in message
    assert kv.read_prefix(prefix + "w/").items == {}
    guarded = kv.get(prefix + "guarded")
    assert guarded is not None and guarded.value == b"1"


def test_txn_failure_in_second_chunk_reports_what_stayed_applied(kv: ConsulKV, prefix: str) -> None:
    ops = [TxnOp.set(f"{prefix}c/{i:03d}", b"x") for i in range(MAX_TXN_OPS + 6)]
    ops.append(TxnOp.check_index(prefix + "absent", 42))
    with pytest.raises(CasConflict) as info:
        kv.txn(ops)
    message = str(info.value)
    assert f"op {MAX_TXN_OPS + 6} (check-index '{prefix}absent')" in message
    assert "chunk 2 of 2 rolled back" in message
    assert f"{MAX_TXN_OPS} earlier op(s)" in message
    assert len(kv.read_prefix(prefix + "c/").items) == MAX_TXN_OPS


def test_txn_non_cas_failure_is_consul_error(kv: ConsulKV, prefix: str) -> None:
    sid = kv.session_create(f"rt-{prefix}", ttl="10s")
    kv.session_destroy(sid)
    # A lock with a session that no longer exists is not a lost race: plain ConsulError.
    with pytest.raises(ConsulError) as info:
        kv.txn([TxnOp.set(prefix + "s", b"1"), TxnOp.lock(prefix + "l", b"", sid)])
    assert not isinstance(info.value, CasConflict)
    assert f"op 1 (lock '{prefix}l'): invalid session" in str(info.value)
    with pytest.raises(ConsulError, match=r"op 0 \(set ''\): Must provide key"):
        kv.txn([TxnOp.set("", b"1")])
    assert kv.get(prefix + "s") is None


def test_txn_chunks_by_size_too(kv: ConsulKV, prefix: str) -> None:
    big = b"x" * (100 * 1024)  # 8 of these exceed one request's 512 KiB
    kv.txn([TxnOp.set(f"{prefix}big/{i}", big) for i in range(8)])
    snap = kv.read_prefix(prefix + "big/")
    assert len(snap.items) == 8
    assert all(item.value == big for item in snap.items.values())


def test_create_many_is_all_or_nothing(kv: ConsulKV, prefix: str) -> None:
    first = [(f"{prefix}ipam/a/{i}", f"v{i}".encode()) for i in range(64)]
    assert kv.create_many(first) is True
    snap = kv.read_prefix(f"{prefix}ipam/a/", consistent=True)
    assert {k: v.value for k, v in snap.items.items()} == dict(first)
    # One key of the next batch exists: none of the others is created, nothing changes.
    second = [(f"{prefix}ipam/b/{i}", b"new") for i in range(10)] + [(first[3][0], b"x")]
    assert kv.create_many(second) is False
    assert kv.read_prefix(f"{prefix}ipam/b/", consistent=True).items == {}
    item = kv.get(first[3][0], consistent=True)
    assert item is not None and item.value == b"v3"
    with pytest.raises(ValueError, match="at most 64"):
        kv.create_many([(f"{prefix}ipam/c/{i}", b"") for i in range(65)])


def test_put_cas_success_and_conflict(kv: ConsulKV, prefix: str) -> None:
    key = prefix + "cas"
    assert kv.put(key, b"first", cas=0) is True
    assert kv.put(key, b"again", cas=0) is False  # exists already
    item = kv.get(key)
    assert item is not None
    assert kv.put(key, b"second", cas=item.modify_index) is True
    assert kv.put(key, b"stale", cas=item.modify_index) is False
    now = kv.get(key)
    assert now is not None and now.value == b"second"
    assert kv.delete(key, cas=item.modify_index) is False
    assert kv.delete(key, cas=now.modify_index) is True
    assert kv.get(key) is None


def test_delete_recurse(kv: ConsulKV, prefix: str) -> None:
    kv.txn([TxnOp.set(f"{prefix}r/{i}", b"x") for i in range(3)] + [TxnOp.set(prefix + "k", b"")])
    assert kv.delete(prefix + "r/", recurse=True)
    assert set(kv.read_prefix(prefix).items) == {prefix + "k"}


def test_session_delete_behavior_removes_acquired_key(kv: ConsulKV, prefix: str) -> None:
    sid = kv.session_create(f"rt-{prefix}", ttl="15s", behavior="delete")
    key = prefix + "published"
    try:
        assert kv.session_renew(sid) is True
        assert kv.put(key, b"member", acquire=sid) is True
        item = kv.get(key)
        assert item is not None and item.session == sid and item.lock_index == 1
        other = kv.session_create(f"rt-other-{prefix}", ttl="15s")
        try:
            assert kv.put(key, b"stolen", acquire=other) is False
        finally:
            kv.session_destroy(other)
    finally:
        kv.session_destroy(sid)
    wait_for(lambda: kv.get(key) is None, timeout=5, message="key of destroyed session")
    assert kv.session_renew(sid) is False  # gone
    kv.session_destroy(sid)  # idempotent


def test_txn_lock_and_unlock(kv: ConsulKV, prefix: str) -> None:
    sid = kv.session_create(f"rt-{prefix}", behavior="release")
    key = prefix + "lock"
    try:
        kv.txn([TxnOp.lock(key, b"mine", sid), TxnOp.check_session(key, sid)])
        held = kv.get(key)
        assert held is not None and held.session == sid
        kv.txn([TxnOp.unlock(key, b"free", sid)])
        released = kv.get(key)
        assert released is not None and released.session is None
        assert released.value == b"free"
    finally:
        kv.session_destroy(sid)


def test_key_with_leading_slash_is_refused(kv: ConsulKV) -> None:
    with pytest.raises(ValueError, match="do not start"):
        kv.get("/bad")


def test_unreachable_agent_is_consul_unavailable_quickly() -> None:
    client = ConsulKV(ConsulSettings.from_env({"CONSUL_HTTP_ADDR": "127.0.0.1:1"}))
    began = time.monotonic()
    for call in (
        lambda: client.get("x"),
        lambda: client.read_prefix("x/"),
        lambda: client.txn([TxnOp.delete("x")]),
    ):
        with pytest.raises(ConsulUnavailable) as info:
            call()
        message = str(info.value)
        assert message.startswith("cannot reach Consul at http://127.0.0.1:1: ")
        assert "refused" in message.lower()
        assert "\n" not in message and "HTTPConnectionPool" not in message
        assert info.value.__cause__ is None
    assert time.monotonic() - began < 3


def test_silent_agent_times_out_as_consul_unavailable() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # accepts connections, never answers
        port = server.getsockname()[1]
        client = ConsulKV(ConsulSettings(port=port, timeout=0.5))
        began = time.monotonic()
        with pytest.raises(ConsulUnavailable, match=r"no answer within the timeout \(0\.5s\)"):
            client.get("x")
        assert time.monotonic() - began < 3
