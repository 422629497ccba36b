"""Turning a validated state file into KV writes: pure diff + ordering, no I/O.

`diff_kv(desired, current, prefix, prune)` compares the user keys a file wants with what
Consul holds and returns the changes, ordered so that a reader between two transactions
(a file can need more than one: Consul caps a transaction at 64 operations) never sees a
reference to something not yet written: networks, then containers, then the policy (it
names the containers' groups), then service configs, then members, then `active` last;
deletions run in the opposite order, after the writes.

`--prune` only ever deletes user keys (networks/, containers/, services/...): never a
daemon-owned key (nodes/, ipam/, audit/, locks/), and never a member that a node
published under its Consul session.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from reconciler.kvlayout import KeyRef, Layout
from reconciler.model import RawEntry, entry_kv_value

# The policy after the containers (whose groups it names), before the services.
_RANK = {"network": 0, "container": 1, "policy": 2, "service_config": 3, "member": 4,
         "service_active": 5, "service_cutover": 6}


@dataclass(frozen=True)
class CurrentKey:
    """What apply needs to know of a key Consul holds."""

    value: bytes
    modify_index: int
    session: str | None = None


@dataclass(frozen=True)
class Change:
    """One KV change. `index` is the ModifyIndex seen (0: the key must not exist yet), used
    for check-and-set so a concurrent writer makes the apply fail instead of being lost."""

    op: Literal["create", "update", "delete"]
    key: str
    value: bytes = b""
    index: int = 0


def desired_kv(entries: list[RawEntry], prefix: str) -> dict[str, tuple[KeyRef, bytes]]:
    layout = Layout(prefix)
    return {layout.key(e.ref): (e.ref, entry_kv_value(e)) for e in entries}


def diff_kv(
    desired: Mapping[str, tuple[KeyRef, bytes]],
    current: Mapping[str, CurrentKey],
    prefix: str,
    prune: bool,
) -> list[Change]:
    writes: list[tuple[int, Change]] = []
    for key, (ref, value) in desired.items():
        cur = current.get(key)
        if cur is None:
            writes.append((_RANK[ref.kind], Change("create", key, value, 0)))
        elif cur.value != value:
            writes.append((_RANK[ref.kind], Change("update", key, value, cur.modify_index)))
    deletes: list[tuple[int, Change]] = []
    if prune:
        layout = Layout(prefix)
        for key, cur in current.items():
            if key in desired:
                continue
            found = None if layout.is_daemon_owned(key) else layout.parse(key)
            if found is None:  # daemon-owned, not part of the layout, outside the prefix
                continue  # never pruned
            if found.kind in ("member", "service_cutover") and cur.session:
                continue  # published by a node, or a cutover running: held by a session
            deletes.append((-_RANK[found.kind], Change("delete", key, b"", cur.modify_index)))
    writes.sort(key=lambda rc: (rc[0], rc[1].key))
    deletes.sort(key=lambda rc: (rc[0], rc[1].key))
    return [c for _, c in writes] + [c for _, c in deletes]
