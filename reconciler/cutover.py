"""`reconciler cutover`: switch a service's live pool safely, audit it, wait for the nodes.

Owns the health gate (direct HTTP/TCP probes of the target pool's members, from where the
command runs), the check-and-set switch of `services/<s>/active`, the audit trail under
`<prefix>audit/<service>/` (the last `AUDIT_KEEP` kept), the wait for every live node's
status to report the new pool applied, and `--rollback` from the audit trail.

If some node has not applied the switch by the timeout, the switch STAYS in place (the
key is the desired state; lagging nodes converge when they can): the command reports
the lagging nodes and exits 1. Run `--rollback` to go back.
"""

from __future__ import annotations

import getpass
import http.client
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reconciler.errors import CasConflict, CutoverRefused
from reconciler.kvlayout import Layout, kv_entries
from reconciler.model import Member, Service, parse_kv
from reconciler.settings import serves
from reconciler.status import read_statuses


def serving(statuses: dict[str, dict[str, Any]], service: str) -> dict[str, dict[str, Any]]:
    """The nodes' statuses of those whose HAProxy serves `service` (a node started with
    `--serve` says which in its status; one that says nothing serves every service)."""
    out = {}
    for node, st in statuses.items():
        proxy = st.get("proxy")
        pats = proxy.get("serves") if isinstance(proxy, dict) else None
        if isinstance(pats, list) and not serves(tuple(str(p) for p in pats), service):
            continue
        out[node] = st
    return out


def services_state(kv: Any, prefix: str) -> tuple[dict[str, Any], Any]:
    """The `services/` keys and the state they make with the members nodes publish
    (`members/`), read consistently: what a cutover judges a pool by."""
    layout = Layout(prefix)
    items = dict(kv.read_prefix(layout.services_prefix(), consistent=True).items)
    published = kv.read_prefix(layout.members_prefix(), consistent=True).items
    return items, parse_kv(prefix, kv_entries([*items.values(), *published.values()]))

AUDIT_KEEP = 50


@dataclass(frozen=True)
class Probe:
    member: str
    healthy: bool
    detail: str


def probe_member(m: Member, health_path: str | None, timeout: float = 2.0) -> Probe:
    host = str(m.address)
    try:
        if health_path is None:
            with socket.create_connection((host, m.port), timeout=timeout):
                return Probe(m.name, True, "tcp connect ok")
        conn = http.client.HTTPConnection(host, m.port, timeout=timeout)
        try:
            conn.request("GET", health_path, headers={"User-Agent": "reconciler-cutover"})
            status = conn.getresponse().status
        finally:
            conn.close()
        ok = 200 <= status < 400
        return Probe(m.name, ok, f"HTTP {status}")
    except OSError as e:
        return Probe(m.name, False, e.strerror or str(e))
    except (http.client.HTTPException, ValueError) as e:  # e.g. a TLS-only backend
        return Probe(m.name, False, f"not an HTTP answer ({type(e).__name__})")


@dataclass
class Cutover:
    kv: Any
    prefix: str
    out: Callable[[str], None] = print
    prober: Callable[[Member, str | None], Probe] = probe_member

    @property
    def layout(self) -> Layout:
        return Layout(self.prefix)

    def _service(self) -> tuple[dict[str, Any], Any]:
        return services_state(self.kv, self.prefix)

    def run(self, service: str, to: str | None, *, timeout: float = 30.0,
            min_healthy: int | None = None, rollback: bool = False,
            dry_run: bool = False) -> int:
        raw, state = self._service()
        svc: Service | None = state.services.get(service)
        if svc is None:
            why = [str(p) for p in state.problems if self.layout.service_of(p.key) == service]
            raise CutoverRefused(f"service {service!r} does not exist or is invalid: "
                                 f"{'; '.join(why) or 'no config'}")
        active_key = self.layout.service_active(service)
        item = raw.get(active_key)
        current = item.value.decode(errors="replace").strip() if item is not None else None
        index = item.modify_index if item is not None else 0
        if rollback:
            to = self._previous(service, current)
        if to is None:
            raise CutoverRefused("say which pool: --to POOL (or --rollback)")
        if to not in svc.pools:
            raise CutoverRefused(f"pool {to!r} of service {service!r} does not exist "
                                 f"(pools: {', '.join(sorted(svc.pools)) or 'none'})")
        if to == current:
            self.out(f"{service}: {to} is already active")
            return 0
        members = list(svc.pools[to].values())
        health = svc.config.health.path if svc.config.health else None
        if svc.config.mode == "tcp" and svc.config.health is None:
            health = None
        probes = [self.prober(m, health) for m in members]
        healthy = sum(p.healthy for p in probes)
        for p in probes:
            verdict = "healthy" if p.healthy else "UNHEALTHY"
            self.out(f"  {to}/{p.member}: {verdict} ({p.detail})")
        need = len(members) if min_healthy is None else min_healthy
        if not members or healthy < max(need, 1):
            raise CutoverRefused(
                f"pool {to!r} has {healthy} healthy of {len(members)} member(s); "
                f"{max(need, 1)} required: nothing changed")
        if dry_run:
            self.out(f"{service}: would switch {current} -> {to} (dry run)")
            return 0
        if not self.kv.put(active_key, to.encode(), cas=index):
            raise CasConflict(f"{active_key} changed while cutting over (someone else "
                              "switched it): nothing changed; look and try again")
        started = time.time()
        self.out(f"{service}: switched {current} -> {to}")
        lagging = self._wait(service, to, timeout)
        outcome = "ok" if not lagging else f"lagging: {', '.join(sorted(lagging))}"
        self._audit(service, current, to, outcome, started, rollback)
        if lagging:
            self.out(f"{service}: {len(lagging)} node(s) had not applied {to} after "
                     f"{timeout:g}s: {', '.join(sorted(lagging))}. The switch stays in "
                     f"place; they converge when they can. Undo with --rollback.")
            return 1
        self.out(f"{service}: every live node serves {to} "
                 f"({time.time() - started:.2f}s)")
        return 0

    def _wait(self, service: str, to: str, timeout: float) -> set[str]:
        deadline = time.monotonic() + timeout
        reported: dict[str, str] = {}
        lagging: set[str] = set()
        while True:
            statuses = read_statuses(self.kv, self.prefix)
            lagging = set()
            for node, st in serving(statuses, service).items():
                proxy = st.get("proxy")
                act = proxy.get("active") if isinstance(proxy, dict) else None
                applied = act.get(service) if isinstance(act, dict) else None
                if applied != to:
                    lagging.add(node)
                elif reported.get(node) != to:
                    reported[node] = to
                    self.out(f"  {node}: applied {to}")
            if not lagging or time.monotonic() >= deadline:
                return lagging
            time.sleep(0.05)

    def _audit(self, service: str, frm: str | None, to: str, outcome: str, at: float,
               rollback: bool) -> None:
        record = {"time": round(at, 3), "who": _who(), "host": socket.gethostname(),
                  "from": frm, "to": to, "outcome": outcome, "rollback": rollback}
        key = self.layout.audit_record(service, at)
        self.kv.put(key, json.dumps(record, sort_keys=True).encode())
        snap = self.kv.read_prefix(self.layout.audit_prefix(service))
        keys = sorted(snap.items)
        for old in keys[:-AUDIT_KEEP]:
            self.kv.delete(old)

    def history(self, service: str) -> list[dict[str, Any]]:
        snap = self.kv.read_prefix(self.layout.audit_prefix(service), consistent=True)
        out = []
        for key in sorted(snap.items):
            try:
                out.append(json.loads(snap.items[key].value))
            except ValueError:
                continue
        return out

    def _previous(self, service: str, current: str | None) -> str:
        for rec in reversed(self.history(service)):
            if isinstance(rec, dict) and rec.get("to") == current and rec.get("from"):
                return str(rec["from"])
        raise CutoverRefused(f"no audit record of a cutover of {service!r} to {current!r}: "
                             "nothing to roll back to")


def _who() -> str:
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
