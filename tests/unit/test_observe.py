"""Unit tests of reconciler.observe: the readiness and liveness logic, the trackers the
daemon feeds, metric names and values as scraped, the JSON log format, `--listen`
parsing, the HTTP routes (a real server on a free loopback port), and the outcomes the
work-queue controller reports to its `observe` hook."""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping

import pytest
from helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families

from reconciler.errors import (
    ConfigurationError,
    ConsulAuthError,
    ConsulError,
    ConsulUnavailable,
    ValidationError,
)
from reconciler.observe import logs
from reconciler.observe.health import (
    FailureClock,
    FirstSync,
    Probe,
    liveness,
    readiness,
    report,
)
from reconciler.observe.metrics import KINDS, Metrics, StateSample
from reconciler.observe.server import HealthServer, parse_listen
from reconciler.runtime.workqueue import Controller, Result
from reconciler.workkeys import (
    MEMBERS,
    PEERS,
    PORTS,
    PROXY,
    SWEEP,
    ContainerKey,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Facts:
    """ReadinessFacts and LivenessFacts, set by each test."""

    def __init__(self) -> None:
        self.consul = True
        self.docker = True
        self.remaining: int | None = 0
        self.failures = FailureClock(clock := Clock())
        self.clock = clock
        self.loop_state: dict[str, bool] = {"kv-watch": True, "workers": True}
        self.oldest: tuple[str, float] | None = None

    def consul_watch_ok(self) -> bool:
        return self.consul

    def docker_events_ok(self) -> bool:
        return self.docker

    def first_sync_remaining(self) -> int | None:
        return self.remaining

    def failing(self, longer_than: float) -> list[tuple[str, float]]:
        return self.failures.failing(longer_than)

    def loops(self) -> Mapping[str, bool]:
        return self.loop_state

    def oldest_in_flight(self) -> tuple[str, float] | None:
        return self.oldest


def _ready(facts: Facts, age: float = math.inf) -> tuple[int, str]:
    probe = readiness(facts, failing_after=60, consul_age=lambda: age)
    return report(probe.name, probe.run(), verbose=False)


# --------------------------------------------------------------------------- readiness


def test_ready_when_every_check_passes() -> None:
    assert _ready(Facts()) == (200, "ok\n")


def test_consul_down_fails_naming_only_that_check() -> None:
    f = Facts()
    f.consul = False
    status, body = _ready(f, age=12.4)
    assert status == 503
    assert body == ("[-]consul-watch failed: Consul unreachable (last answer 12s ago)\n"
                    "readyz check failed\n")
    f2 = Facts()
    f2.consul = False
    assert "Consul not reached yet" in _ready(f2)[1]


def test_each_failing_check_is_listed() -> None:
    f = Facts()
    f.docker = False
    f.remaining = None
    status, body = _ready(f)
    assert status == 503
    assert body.splitlines() == [
        "[-]docker-events failed: not subscribed to Docker's events",
        "[-]initial-sync failed: waiting for the desired state and Docker's container list",
        "readyz check failed"]
    f.remaining = 3
    assert "3 key(s) of the first pass not reconciled yet" in _ready(f)[1]


def test_verbose_lists_every_check() -> None:
    f = Facts()
    probe = readiness(f, failing_after=60)
    status, body = report(probe.name, probe.run(), verbose=True)
    assert status == 200
    assert body.splitlines() == ["[+]consul-watch ok", "[+]docker-events ok",
                                 "[+]initial-sync ok", "[+]reconcile-failures ok",
                                 "readyz check passed"]


def test_a_key_failing_longer_than_the_limit_makes_it_unready() -> None:
    f = Facts()
    f.failures.failed(ContainerKey("a" * 64))
    f.clock.t += 59
    f.failures.failed(ContainerKey("a" * 64))  # still failing: the first time counts
    assert _ready(f)[0] == 200
    f.clock.t += 2
    status, body = _ready(f)
    assert status == 503
    assert "[-]reconcile-failures failed: 1 key(s) failing for more than 60s: " \
        "container:aaaaaaaaaaaa for 61s" in body
    f.failures.succeeded(ContainerKey("a" * 64))
    assert _ready(f)[0] == 200


def test_many_failing_keys_are_summed_up_longest_first() -> None:
    f = Facts()
    for i, key in enumerate([SWEEP, MEMBERS, PROXY, PEERS, PORTS]):
        f.failures.failed(key)
        f.clock.t += 10 * (i + 1)
    failing = f.failures.failing(0)
    assert [k for k, _ in failing] == ["sweep", "members", "proxy", "peers", "ovs-ports"]
    body = _ready(f)[1]
    assert "5 key(s) failing for more than 60s" not in body  # 150 s, 140 s, 120 s ...
    f.clock.t += 100
    assert "5 key(s) failing for more than 60s: sweep for 250s, members for 240s, " \
        "proxy for 220s and 2 more" in _ready(f)[1]


def test_a_check_that_raises_fails_without_its_message() -> None:
    def boom() -> str | None:
        raise RuntimeError("token=s3cr3t at 10.0.0.1")

    probe = Probe("readyz", [("boom", boom)])
    status, body = report(probe.name, probe.run(), verbose=True)
    assert status == 503
    assert body == "[-]boom failed: check raised RuntimeError\nreadyz check failed\n"


# --------------------------------------------------------------------------- liveness


def test_liveness_fails_on_a_stopped_loop_or_a_stuck_reconcile() -> None:
    f = Facts()
    probe = liveness(f, stuck_after=300)
    assert report("livez", probe.run(), False) == (200, "ok\n")
    f.loop_state = {"kv-watch": False, "workers": True, "docker-watch": False}
    status, body = report("livez", probe.run(), False)
    assert (status, body) == (503, "[-]loops failed: stopped: docker-watch, kv-watch\n"
                                   "livez check failed\n")
    f.loop_state = {}
    f.oldest = ("proxy", 299.0)
    assert report("livez", probe.run(), False)[0] == 200
    f.oldest = ("proxy", 301.0)
    assert "[-]reconcile-stuck failed: proxy running for 301s (more than 300s)" in \
        report("livez", probe.run(), False)[1]


# --------------------------------------------------------------------------- first sync


def test_first_sync_waits_for_every_expected_key() -> None:
    s = FirstSync()
    s.reconciled(SWEEP)  # before the pass is known: does not count
    assert not s.done and s.remaining() is None
    s.expect([SWEEP, ContainerKey("c1"), PROXY])
    assert s.remaining() == 3
    s.reconciled(ContainerKey("c1"))
    s.reconciled(ContainerKey("other"))
    assert (s.done, s.remaining()) == (False, 2)
    s.expect([ContainerKey("late")])  # only the first call sets the pass
    s.reconciled(SWEEP)
    s.reconciled(PROXY)
    assert s.done and s.remaining() == 0


def test_first_sync_with_nothing_to_do_is_done() -> None:
    s = FirstSync()
    s.expect([])
    assert s.done


# --------------------------------------------------------------------------- metrics


def _scrape(m: Metrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name of sample -> labels -> value, from the text exposition parsed back."""
    body, ctype = m.exposition()
    assert ctype.startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metric_names_follow_prometheus_conventions() -> None:
    m = Metrics()
    m.set_state_source(lambda: StateSample(ipam_allocations={"vnet1": 3},
                                           ipam_pool_size={"vnet1": 101},
                                           overlay_peers={"ov1": 2}))
    body = m.exposition()[0].decode()
    families = list(text_string_to_metric_families(body))
    names = {f.name: f for f in families}
    assert len(names) >= 18
    for name, fam in names.items():
        assert name.startswith("reconciler_"), name
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), name
        if any(w in name for w in ("duration", "age")):
            assert name.endswith("_seconds"), name
        for s in fam.samples:  # never a label per container, address or key
            assert set(s.labels) <= {"kind", "result", "reason", "change", "network", "le"}
    assert "_created" not in body
    for expected in ("reconciler_reconciles", "reconciler_reconcile_duration_seconds",
                     "reconciler_queue_depth", "reconciler_consul_errors",
                     "reconciler_consul_last_contact_age_seconds",
                     "reconciler_haproxy_reloads", "reconciler_haproxy_runtime_changes",
                     "reconciler_attached_interfaces", "reconciler_interfaces_attached",
                     "reconciler_members_published", "reconciler_ipam_allocations",
                     "reconciler_overlay_peers"):
        assert expected in names, expected


def test_metric_values_as_scraped() -> None:
    clock = Clock()
    m = Metrics(clock=clock)
    m.reconciled("container", "ok", 0.003)
    m.reconciled("container", "ok", 0.004)
    m.reconciled("proxy", "error", 0.2)
    m.reconciled("newkind", "ok", 0.1)  # a kind added later is still counted
    m.haproxy_reload("ok")
    m.haproxy_runtime_change("ok", 2)
    m.haproxy_runtime_change("ok", 0)
    m.interfaces_changed(attached=3, detached=1)
    m.members_changed(published=2, withdrawn=1)
    m.set_state_source(lambda: StateSample(queue_depth=7, attached_interfaces=3,
                                           ipam_allocations={"vnet1": 3}))
    s = _scrape(m)
    assert s["reconciler_reconciles_total"][(("kind", "container"), ("result", "ok"))] == 2
    assert s["reconciler_reconciles_total"][(("kind", "proxy"), ("result", "error"))] == 1
    assert s["reconciler_reconciles_total"][(("kind", "newkind"), ("result", "ok"))] == 1
    assert s["reconciler_reconcile_duration_seconds_count"][(("kind", "container"),)] == 2
    assert s["reconciler_reconcile_duration_seconds_bucket"][
        (("kind", "container"), ("le", "0.005"))] == 2
    assert s["reconciler_reconcile_duration_seconds_bucket"][
        (("kind", "proxy"), ("le", "0.1"))] == 0
    assert s["reconciler_haproxy_reloads_total"][(("result", "ok"),)] == 1
    assert s["reconciler_haproxy_runtime_changes_total"][(("result", "ok"),)] == 2
    assert s["reconciler_interfaces_attached_total"][()] == 3
    assert s["reconciler_interfaces_detached_total"][()] == 1
    assert s["reconciler_member_changes_total"][(("change", "withdrawn"),)] == 1
    assert s["reconciler_queue_depth"][()] == 7
    assert s["reconciler_ipam_allocations"][(("network", "vnet1"),)] == 3
    assert set(k for k in KINDS) <= {dict(lbl)["kind"] for lbl in
                                     s["reconciler_reconciles_total"]}


def test_consul_errors_by_reason_and_the_age_of_the_last_answer() -> None:
    clock = Clock()
    m = Metrics(clock=clock)
    assert m.consul_contact_age() == math.inf
    assert _scrape(m)["reconciler_consul_last_contact_age_seconds"][()] == math.inf
    m.consul_request(None)
    clock.t += 4.5
    m.consul_request(ConsulUnavailable("cannot reach Consul"))
    m.consul_request(ConsulUnavailable("cannot reach Consul"))
    assert m.consul_contact_age() == 4.5
    m.consul_request(ConsulAuthError("refused"))  # an answer: contact
    assert m.consul_contact_age() == 0
    m.consul_request(ConsulError("500"))
    s = _scrape(m)["reconciler_consul_errors_total"]
    assert s == {(("reason", "unavailable"),): 2, (("reason", "refused"),): 1,
                 (("reason", "failed"),): 1}


def test_a_state_source_that_fails_leaves_only_the_state_series_out(
        caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    m.reconciled("sweep", "ok", 0.01)

    def broken() -> StateSample:
        raise RuntimeError("mid-change")

    m.set_state_source(broken)
    s = _scrape(m)
    assert "reconciler_queue_depth" not in s
    assert s["reconciler_reconciles_total"][(("kind", "sweep"), ("result", "ok"))] == 1
    assert "reading the daemon's state failed" in caplog.text


def test_each_daemon_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.reconciled("sweep", "ok", 0.01)
    assert _scrape(b)["reconciler_reconciles_total"][
        (("kind", "sweep"), ("result", "ok"))] == 0


# --------------------------------------------------------------------------- controller


def test_the_controller_reports_each_outcome_and_duration() -> None:
    seen: list[tuple[str, str, float]] = []
    outcomes = {"ok": None, "later": Result(requeue_after=5), "retry": Result(requeue=True)}

    def reconcile(key: str) -> Result | None:
        if key == "bad":
            raise ValidationError([])
        if key == "boom":
            raise RuntimeError("boom")
        return outcomes[key]

    c: Controller[str] = Controller(reconcile, observe=lambda k, o, s: seen.append((k, o, s)))
    for key in ("ok", "later", "retry", "bad", "boom"):
        c.queue.add(key)
        assert c.process_next(timeout=0)
    assert [(k, o) for k, o, _ in seen] == [("ok", "ok"), ("later", "requeued"),
                                           ("retry", "requeued"), ("bad", "invalid"),
                                           ("boom", "error")]
    assert all(0 <= s < 1 for _, _, s in seen)
    assert c.oldest_in_flight() is None
    assert c.workers_alive() == 0


def test_a_reconcile_in_flight_is_seen_by_liveness() -> None:
    entered, release = threading.Event(), threading.Event()

    def reconcile(key: str) -> None:
        entered.set()
        release.wait(5)

    c: Controller[str] = Controller(reconcile)
    c.queue.add("slow")
    t = threading.Thread(target=c.process_next, args=(0,))
    t.start()
    try:
        assert entered.wait(5)
        oldest = c.oldest_in_flight()
        assert oldest is not None and oldest[0] == "slow" and oldest[1] >= 0
    finally:
        release.set()
        t.join(5)
    assert c.oldest_in_flight() is None


# --------------------------------------------------------------------------- logs


def _json_lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_log_lines_carry_the_fields_and_the_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("reconciler.network.controller")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.DEBUG)
    try:
        log.warning("plain %s", "line")
        token = logs.set_context(key="container:abcdef123456")
        try:
            logs.bind(container="web-1")
            log.info("attached\nsecond line")
            log.info("about a network", extra={"network": "vnet1"})
            try:
                raise ValueError("bad")
            except ValueError:
                log.exception("failed")
        finally:
            logs.reset_context(token)
        log.warning("after")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    lines = _json_lines(stream)
    assert len(lines) == 5  # the newline inside a message stays inside its line
    first = lines[0]
    assert set(first) == {"time", "level", "component", "message"}
    assert first["level"] == "warning" and first["component"] == "network.controller"
    assert first["message"] == "plain line"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert lines[1]["key"] == "container:abcdef123456"
    assert lines[1]["container"] == "web-1"
    assert lines[1]["message"] == "attached\nsecond line"
    assert lines[2]["network"] == "vnet1" and lines[2]["container"] == "web-1"
    assert "ValueError: bad" in lines[3]["exception"]
    assert "key" not in lines[4] and "container" not in lines[4]


def test_configure_leaves_handlers_of_others_alone() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    logs.configure("debug", "json")  # pytest's handlers are there: nothing changes
    assert root.handlers == before
    with pytest.raises(ValueError):
        logs.configure("info", "xml")


# --------------------------------------------------------------------------- server


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:9901", ("127.0.0.1", 9901)), ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:9901", ("::1", 9901)), ("off", None), (" OFF ", None)])
def test_parse_listen(value: str, expected: tuple[str, int] | None) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9901", "127.0.0.1", "127.0.0.1:x", ":9901",
                                   "127.0.0.1:70000", ""])
def test_parse_listen_refuses(value: str) -> None:
    with pytest.raises(ConfigurationError, match="HOST:PORT"):
        parse_listen(value)


@pytest.fixture
def served() -> Iterator[tuple[str, Facts, Metrics]]:
    facts, metrics = Facts(), Metrics()
    server = HealthServer(("127.0.0.1", 0), live=liveness(facts, stuck_after=300),
                          ready=readiness(facts, failing_after=60), metrics=metrics)
    stop = threading.Event()
    t = threading.Thread(target=server.run, args=(stop,))
    t.start()
    assert server.bound.wait(5)
    try:
        yield f"http://127.0.0.1:{server.port}", facts, metrics
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def _get(url: str, method: str = "GET") -> tuple[int, str, str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_server_routes(served: tuple[str, Facts, Metrics]) -> None:
    url, facts, metrics = served
    assert _get(url + "/livez")[::2] == (200, "ok\n")
    assert _get(url + "/readyz")[::2] == (200, "ok\n")
    facts.consul = False
    status, ctype, body = _get(url + "/readyz")
    assert status == 503 and ctype.startswith("text/plain")
    assert body.startswith("[-]consul-watch failed")
    status, _, body = _get(url + "/readyz?verbose")
    assert status == 503 and "[+]docker-events ok" in body
    metrics.reconciled("container", "ok", 0.003)
    status, ctype, body = _get(url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert 'reconciler_reconciles_total{kind="container",result="ok"} 1.0' in body
    assert _get(url + "/metrics", "HEAD")[:2] == (200, ctype)
    assert _get(url + "/")[0] == 404
    assert _get(url + "/livez", "POST")[0] == 501


def test_server_answers_500_without_detail_when_a_route_fails(
        served: tuple[str, Facts, Metrics], monkeypatch: pytest.MonkeyPatch) -> None:
    url, _, metrics = served

    def broken() -> tuple[bytes, str]:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(metrics, "exposition", broken)
    status, _, body = _get(url + "/metrics")
    assert (status, body) == (500, "internal error\n")
    assert _get(url + "/livez")[0] == 200  # the server goes on


def test_server_retries_a_taken_port(caplog: pytest.LogCaptureFixture) -> None:
    facts, metrics = Facts(), Metrics()
    first = HealthServer(("127.0.0.1", 0), live=liveness(facts, stuck_after=1),
                         ready=readiness(facts, failing_after=1), metrics=metrics)
    first.bind()
    assert first.port is not None
    second = HealthServer(("127.0.0.1", first.port), live=liveness(facts, stuck_after=1),
                          ready=readiness(facts, failing_after=1), metrics=metrics,
                          retry=0.05)
    stop = threading.Event()
    t = threading.Thread(target=second.run, args=(stop,))
    t.start()
    try:
        wait_for(lambda: "cannot listen on 127.0.0.1" in caplog.text, timeout=5)
        assert not second.bound.is_set()
    finally:
        stop.set()
        t.join(5)
        first.close()
    assert not t.is_alive()
