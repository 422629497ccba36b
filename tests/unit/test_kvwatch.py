"""The Consul watch loop's index discipline, with a scripted fake reader (timing seam)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from reconciler.adapters.consul_kv import KVItem, KVSnapshot
from reconciler.errors import ConsulUnavailable
from reconciler.runtime.kvwatch import KVWatcher

P = "reconciler/"
NET = b'{"subnet":"10.77.1.0/24","bridge":"br-a"}'


def snap(index: int, **kv: bytes) -> KVSnapshot:
    return KVSnapshot(index, MappingProxyType(
        {P + k: KVItem(P + k, v, modify_index=1, create_index=1) for k, v in kv.items()}))


@dataclass
class ScriptedReader:
    answers: list[Any]
    calls: list[dict[str, Any]] = field(default_factory=list)

    def read_prefix(self, prefix: str, *, index: int | None = None, wait: str | None = None,
                    consistent: bool = False) -> object:
        self.calls.append({"index": index, "wait": wait, "consistent": consistent})
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a


def test_unchanged_content_is_dropped_and_index_advances() -> None:
    r = ScriptedReader([snap(10, **{"networks/a": NET}), snap(11, **{"networks/a": NET}),
                        snap(12, **{"networks/a": NET, "networks/b": b"{"})])
    seen: list[Any] = []
    w = KVWatcher(r, P, seen.append)
    assert w.poll() is not None
    assert w.poll() is None  # index moved, content did not
    s = w.poll()
    assert s is not None and s.index == 12
    assert [c["index"] for c in r.calls] == [None, 10, 11]
    assert all(c["wait"] == "30s" for c in r.calls[1:])
    assert "reconciler/networks/b" in s.state.invalid_keys


def test_index_going_backwards_resets_to_zero() -> None:
    r = ScriptedReader([snap(50, **{"networks/a": NET}), snap(7, **{"networks/a": NET}),
                        snap(8, **{"networks/a": NET})])
    w = KVWatcher(r, P, lambda s: None)
    w.poll()
    w.poll()
    assert w.index == 0
    w.poll()
    assert r.calls[2]["index"] is None  # restarted without a blocking index
    assert w.index == 8


def test_sudden_empty_is_confirmed_consistently() -> None:
    # The stale read says empty; the consistent read still sees the key: no teardown.
    r = ScriptedReader([snap(5, **{"networks/a": NET}), snap(6), snap(6, **{"networks/a": NET})])
    w = KVWatcher(r, P, lambda s: None)
    w.poll()
    assert w.poll() is None
    assert r.calls[-1]["consistent"] is True
    # The confirmation does not wait for the next change (it blocked for the whole wait
    # time, 30 s, before a mass deletion was believed).
    assert r.calls[-1]["index"] is None and r.calls[-1]["wait"] is None
    assert w.last is not None and "a" in w.last.state.networks
    # A confirmed empty prefix is believed.
    r.answers += [snap(9), snap(9)]
    s = w.poll()
    assert s is not None and s.state.networks == {}


def test_unreachable_consul_keeps_last_state_and_retries() -> None:
    stop = threading.Event()
    errors: list[Exception] = []
    changes: list[Any] = []
    r = ScriptedReader([snap(3, **{"networks/a": NET}), ConsulUnavailable("down"),
                        ConsulUnavailable("down")])

    def on_error(e: Exception) -> None:
        errors.append(e)
        if len(errors) == 2:
            stop.set()

    w = KVWatcher(r, P, changes.append, on_error=on_error, min_interval=0.001, max_backoff=0.01)
    w.run(stop)
    assert len(changes) == 1 and len(errors) == 2
    assert w.last is not None and "a" in w.last.state.networks
    assert not w.healthy.is_set()


SPEC = b'{"interfaces":[{"name":"eth1","network":"a","address":"10.77.1.5/24"}]}'
SVC = b'{"bind":"127.0.0.1:18080"}'


def test_a_key_turned_invalid_keeps_its_last_valid_value() -> None:
    # A typo in `consul kv put` must not tear down what the key describes.
    r = ScriptedReader([
        snap(1, **{"networks/a": NET, "containers/c": SPEC, "services/web/config": SVC}),
        snap(2, **{"networks/a": b'{"subnet":"10.77.1.0/24","bridge":"br-a","vlan":0}',
                   "containers/c": SPEC, "services/web/config": b'{"bind":"nope"}',
                   "networks/new": b"{"}),
        snap(3, **{"containers/c": SPEC, "services/web/config": SVC}),
    ])
    w = KVWatcher(r, P, lambda s: None)
    w.poll()
    s = w.poll()
    assert s is not None
    st = s.state
    assert "a" in st.networks and st.networks["a"].vlan is None  # the last valid value
    assert "c" in st.containers  # its dependent stays valid too
    assert "web" in st.services and st.services["web"].config.bind_port == 18080
    msgs = [str(p) for p in st.problems]
    assert "reconciler/networks/a: vlan: must be between 1 and 4094; keeping its last " \
        "valid value (got 0)" in msgs
    assert not any(m.startswith("reconciler/containers/c") for m in msgs), msgs
    assert any(m.startswith("reconciler/services/web/config: bind:") and
               "keeping its last valid value" in m for m in msgs)
    # A key that never was valid has nothing to keep.
    assert any(m.startswith("reconciler/networks/new: invalid JSON") and
               "keeping" not in m for m in msgs)
    # A deleted key is gone (intended), and its dependents with it.
    s3 = w.poll()
    assert s3 is not None and "a" not in s3.state.networks
    assert "c" not in s3.state.containers
