"""Node status: what each daemon reports under `<prefix>nodes/<node>/status`.

Owns the status document (JSON), its publication tied to the node's Consul session (so it
disappears when the node does: behavior=delete, TTL renewed by the daemon), and its
rendering as a table for `reconciler status`.

Document fields: node, index (last applied Consul index), updated (unix time), counts
(containers, interfaces, ...), errors ({key: [reason, ...]}), proxy ({config_hash,
last_reload, active: {service: pool}, cutover: {service: {to, weight, worker, pools:
{pool: {requests, errors, up, servers}}}} while a progressive cutover runs}), version.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from reconciler.errors import ConsulError, Problem
from reconciler.kvlayout import Layout

log = logging.getLogger(__name__)

STATUS_VERSION = 1


@dataclass
class NodeStatus:
    node: str
    index: int = 0
    updated: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    proxy: dict[str, Any] = field(default_factory=dict)
    address: str | None = None  # advertised: where other hosts send tunnel traffic

    def to_json(self) -> bytes:
        doc = {"node": self.node, "index": self.index, "updated": round(self.updated, 3),
               "counts": self.counts, "errors": self.errors, "proxy": self.proxy,
               "address": self.address, "version": STATUS_VERSION}
        return json.dumps(doc, sort_keys=True).encode()


def parse_status(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class StatusPublisher:
    """Keeps this node's status key alive under a session; writes only on change."""

    def __init__(self, kv: Any, prefix: str, node: str, ttl: str = "20s",
                 session_file: str | None = None) -> None:
        self.kv = kv
        self.key = Layout(prefix).node_status(node)
        self.prefix = prefix
        self.node = node
        self.ttl = ttl
        self.session_file = session_file
        self.session: str | None = None
        self._last: bytes | None = None
        self._host_last: tuple[str, bytes] | None = None
        self._lock = threading.RLock()

    def ensure_session(self) -> str:
        """The node's session: still-valid current one, else the one a previous run of
        the daemon left in `session_file` (so a restart within the TTL keeps the status
        and the published members — no flapping), else a new one."""
        with self._lock:
            if self.session is not None and self.kv.session_renew(self.session):
                return self.session
            if self.session is None and self.session_file:
                previous = _read_file(self.session_file)
                if previous and self.kv.session_renew(previous):
                    self.session = previous
                    log.info("reusing the node session of the previous run")
                    return previous
            self.session = self.kv.session_create(f"reconciler-{self.node}", ttl=self.ttl,
                                                  behavior="delete")
            self._last = None  # the key went with the old session
            self._host_last = None
            if self.session_file:
                _write_file(self.session_file, self.session)
            return self.session

    def publish(self, status: NodeStatus, force: bool = False) -> bool:
        with self._lock:
            body = status.to_json()
            same = self._last is not None and _strip_time(body) == _strip_time(self._last)
            if same and not force:
                return False
            try:
                sid = self.session or self.ensure_session()
                if not self.kv.put(self.key, body, acquire=sid):
                    sid = self.ensure_session()
                    self.kv.put(self.key, body, acquire=sid)
                self._last = body
                self._register(status.address, sid)
                return True
            except ConsulError as e:
                log.warning("cannot publish node status: %s", e)
                return False

    def _register(self, address: str | None, sid: str) -> None:
        """The host registry entry `hosts/<node>` (what overlay peers watch): written
        under the same session, only when the address or the session changed, so the
        registry does not churn with the status."""
        body = json.dumps({"node": self.node, "address": address}, sort_keys=True).encode()
        if self._host_last == (sid, body):
            return
        if self.kv.put(Layout(self.prefix).host(self.node), body, acquire=sid):
            self._host_last = (sid, body)

    def heartbeat(self) -> None:
        """Renew the session (a new one if it expired: the next publish re-writes)."""
        with self._lock:
            try:
                self.ensure_session()
            except ConsulError as e:
                log.warning("cannot renew the node session: %s", e)

    def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(ConsulError):
                self.kv.session_destroy(self.session)
            self.session = None


def _read_file(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if len(text) == 36 and text.count("-") == 4 else None


def _write_file(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="ascii") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot record the session id in %s: %s", path, e.strerror)


def _strip_time(body: bytes) -> bytes:
    doc = json.loads(body)
    doc.pop("updated", None)
    return json.dumps(doc, sort_keys=True).encode()


def read_statuses(kv: Any, prefix: str) -> dict[str, dict[str, Any]]:
    layout = Layout(prefix)
    snap = kv.read_prefix(layout.nodes_prefix())
    out: dict[str, dict[str, Any]] = {}
    for key, item in snap.items.items():
        node = layout.parse_node_status(key)
        if node is not None:
            doc = parse_status(item.value)
            out[node] = doc if doc is not None else {"node": node, "errors": {
                key: ["status is not valid JSON"]}}
    return out


def hosts_from(prefix: str, items: Iterable[Any]) -> dict[str, str]:
    """node -> advertised address, of every node whose host registry entry
    (`hosts/<node>`) or status (`nodes/<node>/status`; both session-held: they go when the
    node does) names a valid IPv4 address. `items`: KV entries."""
    layout = Layout(prefix)
    out: dict[str, str] = {}
    for e in items:
        node = layout.parse_host(e.key) or layout.parse_node_status(e.key)
        if node is None:
            continue
        doc = parse_status(e.value)
        addr = doc.get("address") if doc is not None else None
        if isinstance(addr, str):
            try:
                out[node] = str(ipaddress.IPv4Address(addr))
            except ValueError:
                continue
    return out


def _dict(v: Any) -> dict[str, Any]:
    """Status documents are read from KV: anything else than the expected shape is
    shown as empty rather than crashing the table."""
    return v if isinstance(v, dict) else {}


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:300]


def format_table(statuses: Mapping[str, Mapping[str, Any]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [("NODE", "ADDRESS", "INDEX", "AGE", "CONTAINERS", "INTERFACES", "ERRORS", "ACTIVE",
             "RELOAD")]
    for node in sorted(statuses):
        s = statuses[node]
        counts, proxy = _dict(s.get("counts")), _dict(s.get("proxy"))
        cut = _dict(proxy.get("cutover"))
        active = ",".join(
            f"{k}={v}" + (f"+{_dict(cut[k]).get('to')}:{_dict(cut[k]).get('weight')}%"
                          if k in cut else "")
            for k, v in sorted(_dict(proxy.get("active")).items()))
        try:
            age = f"{now - float(s.get('updated') or now):.0f}s"
        except (TypeError, ValueError):
            age = "?"
        rows.append((node, _one_line(str(s.get("address") or "-")), str(s.get("index", "")), age,
                     str(counts.get("containers", 0)), str(counts.get("interfaces", 0)),
                     str(sum(len(v) if isinstance(v, list) else 1
                             for v in _dict(s.get("errors")).values())),
                     active or "-", _one_line(str(proxy.get("last_reload") or "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    for node in sorted(statuses):
        errs = _dict(statuses[node].get("errors"))
        for key in sorted(errs, key=str):
            reasons = errs[key] if isinstance(errs[key], list) else [errs[key]]
            for reason in reasons:
                lines.append(_one_line(f"  {node}: {key}: {reason}"))
    if len(rows) == 1:
        lines.append("(no node has reported status)")
    return "\n".join(lines)


class _Attached(Protocol):
    @property
    def addresses(self) -> Mapping[str, str]: ...


def build_status(st: NodeStatus, *, problems: Iterable[Problem],
                 errors: Iterable[Mapping[str, list[str]]], results: Iterable[_Attached],
                 running: int, proxy_errors: Mapping[str, list[str]]) -> NodeStatus:
    """Fill `st` for publication: every problem and error under the key it is about,
    and the counts."""
    st.updated = time.time()
    out: dict[str, list[str]] = {}
    for p in problems:
        out.setdefault(p.key, []).append(str(p)[len(p.key):].lstrip(": "))
    for per in errors:
        for where, msgs in per.items():
            out.setdefault(where, []).extend(msgs)
    attached = list(results)
    st.counts = {
        "containers": sum(1 for r in attached if r.addresses),
        "interfaces": sum(len(r.addresses) for r in attached),
        "running": running,
        "errors": sum(len(v) for v in out.values()),
    }
    for k, v in proxy_errors.items():
        out.setdefault(k, []).extend(v)
    st.errors = out
    return st
