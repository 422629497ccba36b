"""The daemon's Prometheus metrics: owns the registry and every series name.

The only module importing prometheus_client. One `Metrics` per daemon, built at assembly
(reconciler.app) with its own `CollectorRegistry` (never the library's global one, so two
daemons in one process, or the tests, never share series) and handed to the parts that
report: the work-queue controller (reconciles), the Consul adapter (requests), the proxy
controller (reloads, runtime changes), the daemon (attachments, member changes).

Two kinds of series:
- events, counted where they happen through the methods below (`reconciled`,
  `consul_request`, `haproxy_reload`, ...). On the hot path (one container attach is
  ~3 ms) an update is one dict lookup and prometheus_client's own per-value lock: the
  labelled children are made once here, not looked up by `.labels()` per call.
- state (queue depth, attached interfaces, members, IPAM allocations, overlay peers),
  read only when scraped, from one `StateSample` the daemon computes on demand
  (`set_state_source`): nothing to keep up to date between scrapes.

Naming follows Prometheus: `reconciler_` prefix, base units (`_seconds`), `_total` on
counters (prometheus_client appends it to a Counter's name). No label takes a value per
container, address or key: labels are kinds, results and network names only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from reconciler.errors import ConsulAuthError, ConsulError, ConsulUnavailable

log = logging.getLogger(__name__)

# The `_created` series (one per labelled counter, meant for OpenMetrics) doubled what a
# scrape carries and say nothing a restart counter would not. The switch is the library's
# (process-wide); this is the one module using the library.
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "reconciler"

#: Work key kinds (reconciler.workkeys `kind`) and reconcile results, made up front.
KINDS = ("container", "ports", "sweep", "members", "proxy", "peers", "policy")
RESULTS = ("ok", "requeued", "error", "invalid")
#: Reconcile durations: an attach takes ~3 ms, an HAProxy reload ~0.1-1 s.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
CONSUL_REASONS = ("unavailable", "refused", "failed")
RELOAD_RESULTS = ("ok", "failed", "invalid")
RUNTIME_RESULTS = ("ok", "failed")


@dataclass(frozen=True)
class StateSample:
    """The daemon's state as read at scrape time (reconciler.daemon builds it)."""

    queue_depth: int = 0
    """Keys waiting: ready, delayed, or to run again after the one in flight."""
    in_flight: int = 0
    attached_interfaces: int = 0
    """Container interfaces of ours that are up and right on this host."""
    attached_containers: int = 0
    members_published: int = 0
    """Pool members this node holds under its session."""
    invalid_keys: int = 0
    """User keys whose value is invalid (each reported in `reconciler status`)."""
    applied_index: int = 0
    """The Consul index of the desired state last taken in (`reconciler status` shows it
    too, published at most five times a second)."""
    ipam_allocations: Mapping[str, int] = field(default_factory=dict)
    """Network -> addresses this node holds in it."""
    ipam_pool_size: Mapping[str, int] = field(default_factory=dict)
    """Network -> addresses in its pool (for utilisation: sum of allocations / size)."""
    overlay_peers: Mapping[str, int] = field(default_factory=dict)
    """Overlay network -> remote endpoints this host's tunnel knows."""
    consul_reads: Mapping[str, int] = field(default_factory=dict)
    """Watch (desired, hosts, allocation_index, allocations) -> Consul reads it made."""
    policy_denied: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    """(bridge, source group, destination group) -> packets the group policy dropped
    (from the rule/flow counters; monotonic)."""


def series_name(name: str) -> str:
    """`name` with the project prefix."""
    return f"{PREFIX}_{name}"


class Metrics:
    """Every series of the daemon, in its own registry."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        r = self.registry
        self._reconciles = Counter(
            series_name("reconciles"), "Reconciles of work keys, by kind of key and result "
            "(ok, requeued: deferred or waiting, error: retried with backoff, invalid: "
            "terminal, not retried).", ["kind", "result"], registry=r)
        self._duration = Histogram(
            series_name("reconcile_duration_seconds"), "Time one reconcile took, by kind.",
            ["kind"], buckets=DURATION_BUCKETS, registry=r)
        self._consul_errors = Counter(
            series_name("consul_errors"), "Consul requests that failed, by reason "
            "(unavailable: no answer or no leader, refused: ACL, failed: any other).",
            ["reason"], registry=r)
        self._haproxy_reloads = Counter(
            series_name("haproxy_reloads"), "HAProxy reloads, by result (failed: reverted "
            "to the last good config; invalid: refused by the config check, not swapped "
            "in).", ["result"], registry=r)
        self._haproxy_runtime = Counter(
            series_name("haproxy_runtime_changes"), "Changes applied through HAProxy's "
            "runtime API without a reload (active pool switches; members added, removed "
            "or re-addressed; member weights and states), by result (failed: a member "
            "change then applied with a reload).", ["result"], registry=r)
        self._attached = Counter(
            series_name("interfaces_attached"), "Container interfaces that became attached "
            "(created, or re-created after the container restarted).", registry=r)
        self._detached = Counter(
            series_name("interfaces_detached"), "Container interfaces detached (no longer "
            "wanted, or their container stopped).", registry=r)
        self._member_changes = Counter(
            series_name("member_changes"), "Pool members this node published or withdrew.",
            ["change"], registry=r)
        self._docker_connects = Counter(
            series_name("docker_event_stream_connects"), "Subscriptions to Docker's event "
            "stream (the first, then one per reconnect).", registry=r)
        # Children made once: an update is then a dict lookup and the value's own lock.
        self._reconcile_children = {(k, res): self._reconciles.labels(k, res)
                                    for k in KINDS for res in RESULTS}
        self._duration_children = {k: self._duration.labels(k) for k in KINDS}
        self._consul_children = {why: self._consul_errors.labels(why)
                                 for why in CONSUL_REASONS}
        self._reload_children = {res: self._haproxy_reloads.labels(res)
                                 for res in RELOAD_RESULTS}
        self._runtime_children = {res: self._haproxy_runtime.labels(res)
                                  for res in RUNTIME_RESULTS}
        for change in ("published", "withdrawn"):
            self._member_changes.labels(change)
        # Written by whichever thread talked to Consul last: one float assignment (atomic
        # under the GIL), read at scrape time.
        self._consul_ok_at: float | None = None
        self._state_lock = threading.Lock()
        self._state: Callable[[], StateSample] | None = None
        r.register(_StateCollector(self))

    # ------------------------------------------------------------------ events

    def reconciled(self, kind: str, result: str, seconds: float) -> None:
        """One reconcile of a key of `kind` ended with `result` after `seconds`."""
        child = self._reconcile_children.get((kind, result))
        if child is None:  # a kind added without a label here: still counted
            child = self._reconciles.labels(kind, result)
        child.inc()
        hist = self._duration_children.get(kind)
        if hist is None:
            hist = self._duration.labels(kind)
        hist.observe(seconds)

    def consul_request(self, error: ConsulError | None) -> None:
        """One Consul request ended: answered (None), or failed with `error`."""
        if error is None:
            self._consul_ok_at = self._clock()
            return
        if isinstance(error, ConsulUnavailable):
            reason = "unavailable"
        elif isinstance(error, ConsulAuthError):
            reason = "refused"
            self._consul_ok_at = self._clock()  # it answered
        else:
            reason = "failed"
            self._consul_ok_at = self._clock()
        self._consul_children[reason].inc()

    def consul_contact_age(self) -> float:
        """Seconds since Consul last answered (+Inf: never since the start)."""
        at = self._consul_ok_at
        return math.inf if at is None else max(0.0, self._clock() - at)

    def haproxy_reload(self, result: str) -> None:
        """A reload ended: ok, failed (reverted) or invalid (config check refused it)."""
        self._reload_children[result].inc()

    def haproxy_runtime_change(self, result: str, count: int = 1) -> None:
        """`count` runtime API changes ended with `result` (ok or failed)."""
        if count > 0:
            self._runtime_children[result].inc(count)

    def interfaces_changed(self, attached: int, detached: int) -> None:
        if attached:
            self._attached.inc(attached)
        if detached:
            self._detached.inc(detached)

    def members_changed(self, published: int, withdrawn: int) -> None:
        if published:
            self._member_changes.labels("published").inc(published)
        if withdrawn:
            self._member_changes.labels("withdrawn").inc(withdrawn)

    def docker_connected(self) -> None:
        self._docker_connects.inc()

    # ------------------------------------------------------------------ state

    def set_state_source(self, source: Callable[[], StateSample]) -> None:
        """Where the state series are read from at scrape time (the daemon)."""
        with self._state_lock:
            self._state = source

    def sample(self) -> StateSample:
        with self._state_lock:
            source = self._state
        if source is None:
            return StateSample()
        try:
            return source()
        except Exception:
            # A scrape must not fail because the daemon is mid-change: the state series
            # are left out of this one (the event counters are still there).
            log.warning("metrics: reading the daemon's state failed", exc_info=True)
            raise

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every series, and its content type: announced as 0.0.4, the
        version every scraper reads (our names are plain ASCII: the bytes are the same)."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


class _StateCollector(Collector):
    """The state series, read from the daemon when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # not known before the first collect; nothing to check at register

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield GaugeMetricFamily(
            series_name("consul_last_contact_age_seconds"), "Seconds since Consul last "
            "answered a request (the status heartbeat asks every 5 s); +Inf before the "
            "first answer.", value=m.consul_contact_age())
        try:
            s = m.sample()
        except Exception:
            return
        for name, text, value in (
            ("queue_depth", "Work keys waiting (ready, delayed or to run again).",
             s.queue_depth),
            ("reconciles_in_flight", "Reconciles running now.", s.in_flight),
            ("attached_interfaces", "Container interfaces of ours up and right on this "
             "host.", s.attached_interfaces),
            ("attached_containers", "Containers with at least one interface of ours on "
             "this host.", s.attached_containers),
            ("members_published", "Pool members this node publishes under its session.",
             s.members_published),
            ("invalid_keys", "User keys in Consul whose value is invalid.", s.invalid_keys),
            ("applied_index", "Consul index of the desired state last taken in.",
             s.applied_index),
        ):
            yield GaugeMetricFamily(series_name(name), text, value=value)
        for name, text, values in (
            ("ipam_allocations", "Addresses this node holds, by network.",
             s.ipam_allocations),
            ("ipam_pool_size", "Addresses in the network's pool, by network.",
             s.ipam_pool_size),
            ("overlay_peers", "Remote endpoints this host's overlay tunnel knows, by "
             "network.", s.overlay_peers),
        ):
            family = GaugeMetricFamily(series_name(name), text, labels=["network"])
            for network, n in sorted(values.items()):
                family.add_metric([network], n)
            yield family
        reads = CounterMetricFamily(
            series_name("consul_watch_reads"), "Consul reads made by the watches, by "
            "watch: desired (the user areas), hosts (the host registry), allocation_index "
            "(generations of every network's allocations) and allocations (the networks "
            "of this host whose generation moved).", labels=["watch"])
        for watch, n in sorted(s.consul_reads.items()):
            reads.add_metric([watch], n)
        yield reads
        denied = CounterMetricFamily(
            series_name("policy_denied_packets"), "Packets the group policy dropped, by "
            "bridge, source group and destination group (issue 12).",
            labels=["bridge", "source", "destination"])
        for (bridge, src, dst), n in sorted(s.policy_denied.items()):
            denied.add_metric([bridge, src, dst], n)
        yield denied
