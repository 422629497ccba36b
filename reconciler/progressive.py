"""Progressive cutover: a share of new requests moves to the new pool in steps, judged by
HAProxy's own counters on every node, with automatic rollback (issue 13).

`reconciler cutover web --to green --steps 10,50,100 --interval 30s --max-error-rate 1%`

Owns the cutover document at ``services/<s>/cutover`` (kvlayout; the model reads `to`,
`weight`, `state` from it and every daemon applies ``weight`` percent to `to` through
its canary maps, without a reload), the pure judgement of a step (`judge`, over
`StepCounters` built by `step_counters` from the nodes' status documents) and the
driver (`Progressive.run`): it writes each step, waits for every live node to apply it,
watches the error rate (5xx + connection + response errors of the new pool's backend
over its requests) and HAProxy's health checks for one interval, then advances; after
the last step it switches `active` and ends the cutover in one transaction. A failed
judgement rolls back at once (share 0: the old pool takes everything again).

The document is held by the driving command's Consul session (behavior ``release``): if
the command dies, its session ends, the key loses its holder and every daemon stops
sending a share — the cutover is aborted cleanly, the old pool serves. A daemon
restarted meanwhile reads the document and keeps the current step. A second command
cannot drive the same service (it cannot acquire the key). Every step, the finish, the
rollback and an abort get an audit record (``audit/<service>/``, like `cutover`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.adapters.consul_kv import TxnOp
from reconciler.cutover import (
    AUDIT_KEEP,
    Probe,
    _who,
    probe_member,
    services_state,
    serving,
)
from reconciler.errors import CasConflict, ConfigurationError, ConsulError, CutoverRefused
from reconciler.kvlayout import Layout
from reconciler.model import Member, Service
from reconciler.status import read_statuses

MIN_SAMPLE = 20
"""Requests to the new pool (all nodes) before an error rate is judged on its own; fewer
requests with errors are judged when the interval ends."""
SESSION_TTL = "10s"


# --------------------------------------------------------------------------- parsing


def parse_steps(text: str) -> tuple[int, ...]:
    """``10,50,100``: strictly increasing percentages 1-100 ending in 100."""
    try:
        steps = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigurationError(f"--steps {text!r}: comma-separated percentages, e.g. "
                                 "10,50,100") from None
    if not steps or any(not 1 <= s <= 100 for s in steps) or steps[-1] != 100 or \
            any(a >= b for a, b in itertools.pairwise(steps)):
        raise ConfigurationError(f"--steps {text!r}: increasing percentages 1-100 ending "
                                 "with 100")
    return steps


def parse_duration(text: str) -> float:
    """``30s``, ``500ms``, ``2m`` or a number of seconds (> 0)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text.strip())
    if not m:
        raise ConfigurationError(f"--interval {text!r}: e.g. 30s, 500ms, 2m")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    if value <= 0:
        raise ConfigurationError(f"--interval {text!r}: must be > 0")
    return value


def parse_rate(text: str) -> float:
    """``1%`` or ``0.01``: a fraction 0-1."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigurationError(f"--max-error-rate {text!r}: e.g. 1% or 0.01") from None
    if not 0 <= value <= 1:
        raise ConfigurationError(f"--max-error-rate {text!r}: between 0% and 100%")
    return value


# --------------------------------------------------------------------------- judgement


@dataclass(frozen=True)
class NodeSample:
    """One node's counters of the new pool's backend, as its status reports them."""

    worker: int | None
    requests: int
    errors: int
    up: int
    servers: int


@dataclass(frozen=True)
class StepCounters:
    """What the new pool did during a step, summed over the nodes that applied it."""

    requests: int = 0
    errors: int = 0
    nodes: int = 0
    down: tuple[str, ...] = ()
    """Nodes where fewer of the pool's servers are up than required."""


def samples(statuses: Mapping[str, Mapping[str, Any]], service: str, to: str, weight: int
            ) -> dict[str, NodeSample]:
    """Per node that applies `weight` percent to `to` for `service`: its counters."""
    out: dict[str, NodeSample] = {}
    for node, doc in statuses.items():
        proxy = doc.get("proxy")
        cut = proxy.get("cutover") if isinstance(proxy, dict) else None
        mine = cut.get(service) if isinstance(cut, dict) else None
        if not isinstance(mine, dict) or mine.get("to") != to or mine.get("weight") != weight:
            continue
        pools = mine.get("pools")
        c = pools.get(to) if isinstance(pools, dict) else None
        if not isinstance(c, dict):
            continue
        vals = [c.get(k) for k in ("requests", "errors", "up", "servers")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            continue
        worker = mine.get("worker")
        out[node] = NodeSample(worker if isinstance(worker, int) else None,
                               *vals)  # type: ignore[arg-type]
    return out


def step_counters(base: Mapping[str, NodeSample], now: Mapping[str, NodeSample],
                  min_up: int | None) -> StepCounters:
    """The step's counters: `now` minus the `base` taken when each node applied it (a
    node whose HAProxy reloaded since — another worker, or counters that went back —
    counts from zero). `min_up` None: every server must be up."""
    req = err = 0
    down = []
    for node, s in now.items():
        b = base.get(node)
        if b is None or b.worker != s.worker or s.requests < b.requests or \
                s.errors < b.errors:
            b = NodeSample(s.worker, 0, 0, 0, 0)
        req += s.requests - b.requests
        err += s.errors - b.errors
        need = s.servers if min_up is None else min(min_up, s.servers)
        if s.servers and s.up < max(need, 1):
            down.append(node)
    return StepCounters(req, err, len(now), tuple(sorted(down)))


@dataclass(frozen=True)
class Verdict:
    ok: bool
    """False: roll back."""
    final: bool
    """The judgement holds for the whole step (failed, or the interval is over)."""
    reason: str


def judge(c: StepCounters, max_error_rate: float, interval_over: bool) -> Verdict:
    """Pure: roll back when HAProxy's health checks have the pool down on some node, or
    the error rate is above the limit (over at least MIN_SAMPLE requests, or at the end
    of the interval over whatever came); pass when the interval is over."""
    if c.down:
        return Verdict(False, True, f"health gate: servers of the new pool down on "
                                    f"{', '.join(c.down)} (HAProxy's checks)")
    rate = c.errors / c.requests if c.requests else 0.0
    if c.errors and rate > max_error_rate and (c.requests >= MIN_SAMPLE or interval_over):
        return Verdict(False, True, f"error rate {100 * rate:.1f}% > "
                                    f"{100 * max_error_rate:g}% ({c.errors} of "
                                    f"{c.requests} requests failed)")
    if interval_over:
        return Verdict(True, True, f"{c.requests} requests, {c.errors} errors "
                                   f"({100 * rate:.2f}%)")
    return Verdict(True, False, "")


# --------------------------------------------------------------------------- the driver


@dataclass
class Progressive:
    kv: Any
    prefix: str
    out: Callable[[str], None] = print
    prober: Callable[[Member, str | None], Probe] = probe_member
    poll: float = 0.2
    """Seconds between reads of the nodes' statuses (capped by interval/5)."""
    apply_timeout: float = 30.0
    """How long every live node gets to apply a step."""
    clock: Callable[[], float] = time.monotonic
    session: str | None = field(default=None, init=False)

    @property
    def layout(self) -> Layout:
        return Layout(self.prefix)

    # -- the document -----------------------------------------------------------------

    def _put_doc(self, service: str, doc: dict[str, Any]) -> None:
        doc["updated"] = round(time.time(), 3)
        key = self.layout.service_cutover(service)
        if not self.kv.put(key, json.dumps(doc, sort_keys=True).encode(),
                           acquire=self.session):
            raise CasConflict(f"{key} is held by another session: someone else drives "
                              "this cutover")

    def _renew(self) -> None:
        if self.session is not None and not self.kv.session_renew(self.session):
            self.session = None
            raise CutoverRefused("this command's Consul session expired: the daemons "
                                 "stopped the share (aborted)")

    def _audit(self, service: str, record: dict[str, Any]) -> None:
        at = time.time()
        record = {"time": round(at, 3), "who": _who(), "host": socket.gethostname(),
                  "rollback": False, **record}
        self.kv.put(self.layout.audit_record(service, at),
                    json.dumps(record, sort_keys=True).encode())
        keys = sorted(self.kv.read_prefix(self.layout.audit_prefix(service)).items)
        for old in keys[:-AUDIT_KEEP]:
            self.kv.delete(old)

    # -- run --------------------------------------------------------------------------

    def run(self, service: str, to: str, steps: Sequence[int], interval: float,
            max_error_rate: float = 0.01, min_healthy: int | None = None) -> int:
        items, state = services_state(self.kv, self.prefix)
        svc: Service | None = state.services.get(service)
        if svc is None:
            raise CutoverRefused(f"service {service!r} does not exist or is invalid")
        active_key = self.layout.service_active(service)
        item = items.get(active_key)
        frm = item.value.decode(errors="replace").strip() if item is not None else None
        if frm is None or frm not in svc.pools:
            raise CutoverRefused(f"service {service!r} has no valid active pool to move "
                                 "from: use a plain cutover")
        if to not in svc.pools:
            raise CutoverRefused(f"pool {to!r} of service {service!r} does not exist "
                                 f"(pools: {', '.join(sorted(svc.pools))})")
        if to == frm:
            raise CutoverRefused(f"{to} is already active")
        if svc.canary is not None and svc.canary.state == "running" and svc.canary.held:
            raise CutoverRefused(f"a progressive cutover of {service!r} to "
                                 f"{svc.canary.to} is running (see reconciler status)")
        members = list(svc.pools[to].values())
        health = svc.config.health.path if svc.config.health else None
        probes = [self.prober(m, health) for m in members]
        for p in probes:
            self.out(f"  {to}/{p.member}: {'healthy' if p.healthy else 'UNHEALTHY'} "
                     f"({p.detail})")
        need = len(members) if min_healthy is None else min_healthy
        healthy = sum(p.healthy for p in probes)
        if not members or healthy < max(need, 1):
            raise CutoverRefused(f"pool {to!r} has {healthy} healthy of {len(members)} "
                                 f"member(s); {max(need, 1)} required: nothing changed")
        self.session = self.kv.session_create(f"reconciler-cutover-{service}",
                                              ttl=SESSION_TTL, behavior="release")
        started = time.time()
        doc: dict[str, Any] = {
            "id": f"{int(started * 1000)}", "from": frm, "to": to, "steps": list(steps),
            "step": 0, "weight": steps[0], "interval_s": interval,
            "max_error_rate": max_error_rate, "state": "running", "started": round(started, 3),
            "step_started": round(started, 3), "by": f"{_who()}@{socket.gethostname()}",
            "reason": "", "history": []}
        try:
            return self._drive(service, doc, active_key, item.modify_index if item else 0,
                               steps, interval, max_error_rate, min_healthy)
        except KeyboardInterrupt:
            self._end(service, doc, "aborted", "interrupted (Ctrl-C)")
            self.out(f"{service}: aborted; {frm} takes every request again")
            raise
        except BaseException:
            # Whatever failed: the session goes, so the daemons stop the share.
            self._destroy_session()
            raise

    def _drive(self, service: str, doc: dict[str, Any], active_key: str, active_index: int,
               steps: Sequence[int], interval: float, max_error_rate: float,
               min_healthy: int | None) -> int:
        frm, to = str(doc["from"]), str(doc["to"])
        t0 = self.clock()
        for i, weight in enumerate(steps):
            doc.update(step=i, weight=weight, step_started=round(time.time(), 3))
            self._put_doc(service, doc)
            self.out(f"{service}: step {i + 1}/{len(steps)}: {weight}% of new requests "
                     f"to {to}")
            base, lagging = self._wait_applied(service, to, weight)
            if lagging:
                self.out(f"  not applied within {self.apply_timeout:g}s by: "
                         f"{', '.join(sorted(lagging))} (judged on the others)")
            verdict, counters = self._watch(service, to, weight, base, interval,
                                            max_error_rate, min_healthy, active_key,
                                            active_index, frm)
            entry = {"step": i + 1, "weight": weight, "requests": counters.requests,
                     "errors": counters.errors, "nodes": counters.nodes,
                     "verdict": verdict.reason}
            doc["history"] = [*doc["history"], entry]
            if not verdict.ok:
                t_fail = self.clock()
                self._end(service, doc, "rolled_back", verdict.reason)
                took = self._wait_share_gone(service)
                self.out(f"{service}: ROLLED BACK at {weight}%: {verdict.reason}; {frm} "
                         f"takes every request again (all nodes in "
                         f"{self.clock() - t_fail:.2f}s{'' if took else ', some lagging'})")
                return 1
            self.out(f"  {weight}%: ok ({verdict.reason})")
            self._audit(service, {"from": frm, "to": to, "outcome": "step",
                                  "weight": weight, "requests": counters.requests,
                                  "errors": counters.errors})
        # Done: `active` and the end of the cutover in one transaction (no moment where
        # the share is gone and `active` still names the old pool).
        doc.update(state="done", weight=0, reason="", updated=round(time.time(), 3))
        ckey = self.layout.service_cutover(service)
        cur = self.kv.get(ckey)
        try:
            self.kv.txn([TxnOp.cas(active_key, to.encode(), active_index),
                         TxnOp.cas(ckey, json.dumps(doc, sort_keys=True).encode(),
                                   cur.modify_index if cur is not None else 0)])
        except CasConflict as e:
            self._end(service, doc, "aborted", f"{active_key} changed meanwhile")
            raise CasConflict(f"{active_key} changed while cutting over (someone else "
                              f"switched it): the cutover stopped, nothing switched ({e})"
                              ) from None
        self._destroy_session()
        self._audit(service, {"from": frm, "to": to, "outcome": "ok", "progressive":
                              list(steps)})
        self.out(f"{service}: {to} is active ({self.clock() - t0:.1f}s)")
        return 0

    def _end(self, service: str, doc: dict[str, Any], state: str, reason: str) -> None:
        doc.update(state=state, weight=0, reason=reason)
        with contextlib.suppress(ConsulError):  # the session's end stops the share anyway
            self._put_doc(service, doc)
        self._destroy_session()
        self._audit(service, {"from": doc["from"], "to": doc["to"], "outcome": state,
                              "rollback": state == "rolled_back", "reason": reason,
                              "weight": doc["history"][-1]["weight"] if doc["history"]
                              else doc.get("steps", [0])[0]})

    def _destroy_session(self) -> None:
        if self.session is not None:
            with contextlib.suppress(ConsulError):
                self.kv.session_destroy(self.session)
            self.session = None

    def _statuses(self) -> dict[str, dict[str, Any]]:
        return read_statuses(self.kv, self.prefix)

    def _wait_applied(self, service: str, to: str, weight: int
                      ) -> tuple[dict[str, NodeSample], set[str]]:
        """The counters of each node when it first reports the step applied, and the
        nodes that did not within apply_timeout."""
        deadline = self.clock() + self.apply_timeout
        base: dict[str, NodeSample] = {}
        while True:
            self._renew()
            statuses = serving(self._statuses(), service)
            for node, s in samples(statuses, service, to, weight).items():
                base.setdefault(node, s)
            lagging = set(statuses) - set(base)
            if not lagging or self.clock() >= deadline:
                return base, lagging
            time.sleep(self.poll)

    def _watch(self, service: str, to: str, weight: int, base: dict[str, NodeSample],
               interval: float, max_error_rate: float, min_healthy: int | None,
               active_key: str, active_index: int, frm: str
               ) -> tuple[Verdict, StepCounters]:
        end = self.clock() + interval
        poll = min(self.poll, interval / 5)
        while True:
            self._renew()
            over = self.clock() >= end
            now = samples(serving(self._statuses(), service), service, to, weight)
            for node, s in now.items():
                base.setdefault(node, s)  # a node that applied the step late
            counters = step_counters(base, now, min_healthy)
            verdict = judge(counters, max_error_rate, over)
            if verdict.final:
                return verdict, counters
            item = self.kv.get(active_key)
            if item is None or item.modify_index != active_index:
                return Verdict(False, True, f"{active_key} changed meanwhile (now "
                               f"{item.value.decode(errors='replace') if item else 'gone'})"
                               ), counters
            time.sleep(poll)

    def _wait_share_gone(self, service: str) -> bool:
        deadline = self.clock() + self.apply_timeout
        while self.clock() < deadline:
            statuses = serving(self._statuses(), service)
            if all(service not in (_cut(doc) or {}) for doc in statuses.values()):
                return True
            time.sleep(0.05)
        return False


def _cut(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    proxy = doc.get("proxy")
    cut = proxy.get("cutover") if isinstance(proxy, dict) else None
    return cut if isinstance(cut, dict) else None


def describe(kv: Any, prefix: str) -> list[str]:
    """`reconciler status`: one line per progressive cutover document."""
    layout = Layout(prefix)
    snap = kv.read_prefix(layout.services_prefix())
    lines = []
    for key in sorted(snap.items):
        ref = layout.parse(key)
        if ref is None or ref.kind != "service_cutover":
            continue
        item = snap.items[key]
        try:
            doc = json.loads(item.value)
        except ValueError:
            lines.append(f"cutover {ref.name}: unreadable document")
            continue
        if not isinstance(doc, dict):
            continue
        state = str(doc.get("state"))
        raw_steps = doc.get("steps")
        steps: list[Any] = raw_steps if isinstance(raw_steps, list) else []
        head = f"cutover {ref.name}: {doc.get('from')} -> {doc.get('to')}"
        if state == "running" and not item.session:
            line = f"{head}: ABORTED (its command went away at {doc.get('weight')}%)"
        elif state == "running":
            step = doc.get("step")
            line = (f"{head}: running, step {step + 1 if isinstance(step, int) else '?'}/"
                    f"{len(steps)} ({doc.get('weight')}%), by {doc.get('by')}")
        else:
            line = f"{head}: {state}" + (f" ({doc.get('reason')})" if doc.get("reason")
                                         else "")
        lines.append("".join(c if c.isprintable() else " " for c in line)[:300])
        raw_hist = doc.get("history")
        history: list[Any] = raw_hist if isinstance(raw_hist, list) else []
        for h in history[-len(steps) or None:]:
            if isinstance(h, dict):
                lines.append("".join(c if c.isprintable() else " " for c in
                                     f"    {h.get('weight')}%: {h.get('verdict')}")[:300])
    return lines
