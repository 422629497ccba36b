"""Which containers must be looked at again: the resync fast path and its dirty marks.

Owns the fingerprints of containers whose last reconcile was clean and the set marked
dirty by events since. A container whose inputs (process, spec, networks) are unchanged
since its last clean reconcile, and that no event marked, is not looked at again. Drift
reaches the daemon as events instead (netlink inside each container's namespace, host
veth and OVS port deletions, Docker events), and a deep pass (`mark_all_dirty`) every
few resyncs is the safety net. Thread-safe: the daemon's workers share it.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable


class DirtyTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clean: dict[str, Hashable] = {}
        self._dirty: set[str] = set()

    def is_clean(self, cid: str, fingerprint: Hashable) -> bool:
        with self._lock:
            return cid not in self._dirty and self._clean.get(cid) == fingerprint

    def begin(self, cid: str) -> None:
        """A reconcile of `cid` starts: an event arriving from now on marks it again."""
        with self._lock:
            self._dirty.discard(cid)
            self._clean.pop(cid, None)

    def record_clean(self, cid: str, fingerprint: Hashable) -> None:
        with self._lock:
            self._clean[cid] = fingerprint

    def mark_dirty(self, cid: str) -> None:
        with self._lock:
            self._dirty.add(cid)

    def mark_all_dirty(self) -> None:
        with self._lock:
            self._dirty.update(self._clean)

    def dirty_ids(self) -> list[str]:
        with self._lock:
            return list(self._dirty)
