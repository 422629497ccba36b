"""The proxy controller against the real HAProxy: desired state in, running HAProxy out.

What each change costs: an `active` flip, a weight change and a member added to or
removed from an existing pool go through the runtime API (no reload: the master's reload
counter and worker stay), with no failed request under load and the config file staged to
match (a reload afterwards changes nothing the workers show); a new pool reloads; a broken
template or an invalid `active` never takes traffic away from the last good state.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import HttpBackends, KeepAliveLoad, free_port, haproxy_servers, wait_for

from reconciler.errors import HaproxyError
from reconciler.model import DesiredState, KVEntry, parse_kv
from reconciler.observe.metrics import Metrics
from reconciler.proxy.controller import ProxyController
from reconciler.settings import ProxySettings

pytestmark = pytest.mark.integration
P = "t/"


@pytest.fixture
def backends(http_backends: HttpBackends) -> dict[str, int]:
    """Three members' backends, each answering its own name: name -> port."""
    return {name: http_backends.start(name).port
            for name in ("blue1", "blue2", "green1", "red1")}


def state(bind: int, ports: dict[str, int], active: bytes = b"blue",
          weights: dict[str, int] | None = None, pools: tuple[str, ...] = ("blue1", "green1"),
          states: dict[str, str] | None = None) -> DesiredState:
    weights = weights or {}
    states = states or {}
    items = [KVEntry(P + "services/web/config", json.dumps({"bind": f"127.0.0.1:{bind}"})
                     .encode(), 1),
             KVEntry(P + "services/web/active", active, 2)]
    for i, m in enumerate(pools):
        pool = m.rstrip("0123456789")
        items.append(KVEntry(P + f"services/web/pools/{pool}/{m}", json.dumps(
            {"address": "127.0.0.1", "port": ports[m], "weight": weights.get(m, 100),
             "state": states.get(m, "ready")})
            .encode(), 3 + i))
    return parse_kv(P, items)


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[ProxyController]:
    c = ProxyController(ProxySettings(state_dir=str(tmp_path / "state"), quiet_min=0,
                                      quiet_max=0))
    yield c
    c.hap.stop()


def get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def reloads(c: ProxyController) -> int:
    return c.hap.show_proc().reloads


def test_flip_weights_and_members_without_reload_new_pool_with_reload(
        ctl: ProxyController, backends: dict[str, int]) -> None:
    bind = free_port()
    ctl.set_state(state(bind, backends))
    st = ctl.reconcile()
    assert st["active"] == {"web": "blue"} and st["last_reload"] == "ok"
    wait_for(lambda: get(bind) == "blue1", timeout=10)
    base = reloads(ctl)
    config = ctl.hap.config_path.read_bytes()

    ctl.set_state(state(bind, backends, active=b"green"))
    assert ctl.reconcile()["active"] == {"web": "green"}
    assert {get(bind) for _ in range(4)} == {"green1"}
    assert reloads(ctl) == base, "an active flip must not reload"
    assert ctl.hap.config_path.read_bytes() == config, "the config bytes are stable"
    assert ctl.hap.map_path.read_text() == "web be_web:green\n"

    ctl.set_state(state(bind, backends, active=b"green", weights={"green1": 7}))
    ctl.reconcile()
    assert reloads(ctl) == base, "a weight change goes through the runtime API"
    servers = haproxy_servers(ctl.hap)
    assert servers[("be_web:green", "green1")].weight == 7
    assert b"weight 7" in ctl.hap.config_path.read_bytes()  # the file agrees

    ctl.set_state(state(bind, backends, active=b"blue", weights={"green1": 7},
                        pools=("blue1", "blue2", "green1")))
    ctl.reconcile()
    assert reloads(ctl) == base, "a new member of a pool is a dynamic server"
    assert {get(bind) for _ in range(6)} == {"blue1", "blue2"}
    assert b"server blue2 " in ctl.hap.config_path.read_bytes()  # the file agrees

    ctl.set_state(state(bind, backends, active=b"blue", weights={"green1": 7},
                        pools=("blue1", "blue2", "green1", "red1")))
    ctl.reconcile()
    assert reloads(ctl) == base + 1, "a new pool (a new backend) reloads, once"
    assert {get(bind) for _ in range(6)} == {"blue1", "blue2"}
    # The weight set at runtime survived the reload (server-state file + same config).
    assert haproxy_servers(ctl.hap)[("be_web:green", "green1")].weight == 7


def test_invalid_active_keeps_last_pool(ctl: ProxyController,
                                        backends: dict[str, int]) -> None:
    bind = free_port()
    ctl.set_state(state(bind, backends, active=b"green"))
    ctl.reconcile()
    bad = state(bind, backends, active=b"gr een\nx")
    assert any(p.key.endswith("/active") for p in bad.problems)
    ctl.set_state(bad)
    assert ctl.reconcile()["active"] == {"web": "green"}
    assert get(bind) == "green1"


def test_restart_keeps_last_pool_while_active_is_invalid(
        tmp_path: Path, backends: dict[str, int]) -> None:
    bind = free_port()
    first = ProxyController(ProxySettings(state_dir=str(tmp_path / "s")))
    try:
        first.set_state(state(bind, backends, active=b"green"))
        first.reconcile()
        wait_for(lambda: get(bind) == "green1", timeout=10)
        # The daemon restarts while `active` holds garbage: green must keep serving,
        # not the alphabetically first pool (blue).
        again = ProxyController(ProxySettings(state_dir=str(tmp_path / "s")))
        assert again.last_active == {"web": "green"}
        again.set_state(state(bind, backends, active=b"gr!een"))
        assert again.reconcile()["active"] == {"web": "green"}
        assert {get(bind) for _ in range(4)} == {"green1"}
    finally:
        first.hap.stop()


def test_broken_template_keeps_last_good(tmp_path: Path, backends: dict[str, int]) -> None:
    bind = free_port()
    good = ProxyController(ProxySettings(state_dir=str(tmp_path / "s")))
    try:
        good.set_state(state(bind, backends))
        good.reconcile()
        wait_for(lambda: get(bind) == "blue1", timeout=10)
        config = good.hap.config_path.read_bytes()
        tdir = tmp_path / "tpl"
        tdir.mkdir()
        # Renders fine but HAProxy refuses it: never swapped in.
        (tdir / "haproxy.cfg.j2").write_text("global\n    no-such-keyword yes\n")
        broken = ProxyController(ProxySettings(state_dir=str(tmp_path / "s"),
                                               templates_dir=str(tdir)))
        broken.set_state(state(bind, backends, pools=("blue1", "blue2", "green1")))
        with pytest.raises(HaproxyError):
            broken.reconcile()
        assert "haproxy" in broken.errors()
        assert good.hap.config_path.read_bytes() == config
        assert get(bind) == "blue1"
        # A template that does not even render is reported, nothing is touched.
        (tdir / "haproxy.cfg.j2").write_text("{{ no_such_variable }}\n")
        broken2 = ProxyController(ProxySettings(state_dir=str(tmp_path / "s"),
                                                templates_dir=str(tdir)))
        broken2.set_state(state(bind, backends))
        st: dict[str, Any] = broken2.reconcile()
        assert "render failed" in st["last_reload"] and "templates" in broken2.errors()
        assert good.hap.config_path.read_bytes() == config
        assert get(bind) == "blue1"
    finally:
        good.hap.stop()


def test_drain_and_maint_at_runtime_without_reload(
        ctl: ProxyController, http_backends: Any) -> None:
    ports = {n: http_backends.start(n).port for n in ("blue1", "blue2", "green1")}
    bind = free_port()
    pools = ("blue1", "blue2", "green1")
    ctl.set_state(state(bind, ports, pools=pools))
    ctl.reconcile()
    wait_for(lambda: {get(bind) for _ in range(4)} == {"blue1", "blue2"}, timeout=10)
    base = reloads(ctl)

    ctl.set_state(state(bind, ports, pools=pools, states={"blue2": "maint"}))
    ctl.reconcile()
    assert reloads(ctl) == base, "maintenance goes through the runtime API"
    assert haproxy_servers(ctl.hap)[("be_web:blue", "blue2")].admin == "maint"
    assert {get(bind) for _ in range(6)} == {"blue1"}
    assert b"disabled" in ctl.hap.config_path.read_bytes()

    ctl.set_state(state(bind, ports, pools=pools, states={"blue1": "drain"}))
    ctl.reconcile()
    assert reloads(ctl) == base
    s = haproxy_servers(ctl.hap)
    assert s[("be_web:blue", "blue1")].admin == "drain"
    assert s[("be_web:blue", "blue2")].admin == "ready"
    assert {get(bind) for _ in range(6)} == {"blue2"}

    # A new member goes at runtime too; a reload (a new pool) keeps blue1 drained: the
    # staged file and the server-state file agree with what was set at runtime.
    ports["blue3"] = http_backends.start("blue3").port
    ctl.set_state(state(bind, ports, pools=(*pools, "blue3"), states={"blue1": "drain"}))
    ctl.reconcile()
    assert reloads(ctl) == base
    ports["red1"] = http_backends.start("red1").port
    ctl.set_state(state(bind, ports, pools=(*pools, "blue3", "red1"),
                        states={"blue1": "drain"}))
    ctl.reconcile()
    assert reloads(ctl) == base + 1
    wait_for(lambda: {get(bind) for _ in range(8)} == {"blue2", "blue3"}, timeout=10)
    assert haproxy_servers(ctl.hap)[("be_web:blue", "blue1")].weight == 0


def test_a_service_that_cannot_load_is_held_out_the_rest_applies(
        ctl: ProxyController, backends: dict[str, int]) -> None:
    bind = free_port()
    ctl.set_state(state(bind, backends, active=b"blue"))
    ctl.reconcile()
    wait_for(lambda: get(bind) == "blue1", timeout=10)
    base = ctl.hap.config_path.read_bytes()
    # A second service bound to an address this host does not have: `haproxy -c` passes,
    # the reload fails and is reverted. Meanwhile web is switched to green.
    items = [KVEntry(P + "services/web/config",
                     json.dumps({"bind": f"127.0.0.1:{bind}"}).encode(), 1),
             KVEntry(P + "services/web/active", b"green", 2),
             KVEntry(P + "services/web/pools/blue/blue1", json.dumps(
                 {"address": "127.0.0.1", "port": backends["blue1"]}).encode(), 3),
             KVEntry(P + "services/web/pools/green/green1", json.dumps(
                 {"address": "127.0.0.1", "port": backends["green1"]}).encode(), 4),
             KVEntry(P + "services/far/config",
                     json.dumps({"bind": "198.18.255.1:18099"}).encode(), 5)]
    ctl.set_state(parse_kv(P, items))
    st = ctl.reconcile()  # the reload with `far` fails; `far` is held out, the rest applies
    assert ctl.hap.config_path.read_bytes() == base  # web's config is unchanged
    assert b"fe_far" not in base
    assert st["active"] == {"web": "green"}
    assert {get(bind) for _ in range(4)} == {"green1"}  # the flip went through
    errs = ctl.errors()["services/far/config"]
    assert any("cannot bind socket" in m for m in errs), errs
    # While `far` stays as it is, it is not tried again: a new member of web goes at
    # runtime, no reload (nor a failed one).
    before = ctl.hap.show_proc()
    items.append(KVEntry(P + "services/web/pools/green/blue2", json.dumps(
        {"address": "127.0.0.1", "port": backends["blue2"]}).encode(), 6))
    ctl.set_state(parse_kv(P, items))
    ctl.reconcile()
    after = ctl.hap.show_proc()
    assert (after.reloads, after.failed_reloads) == (before.reloads, before.failed_reloads)
    assert {get(bind) for _ in range(6)} == {"green1", "blue2"}
    assert "services/far/config" in ctl.errors()


def test_a_served_service_changed_to_an_unloadable_bind_keeps_its_last_definition(
        ctl: ProxyController, backends: dict[str, int]) -> None:
    web, api = free_port(), free_port()

    def items(api_bind: str) -> list[KVEntry]:
        return [KVEntry(P + "services/web/config",
                        json.dumps({"bind": f"127.0.0.1:{web}"}).encode(), 1),
                KVEntry(P + "services/web/active", b"blue", 2),
                KVEntry(P + "services/web/pools/blue/blue1", json.dumps(
                    {"address": "127.0.0.1", "port": backends["blue1"]}).encode(), 3),
                KVEntry(P + "services/api/config", json.dumps({"bind": api_bind}).encode(), 4),
                KVEntry(P + "services/api/active", b"green", 5),
                KVEntry(P + "services/api/pools/green/green1", json.dumps(
                    {"address": "127.0.0.1", "port": backends["green1"]}).encode(), 6)]

    ctl.set_state(parse_kv(P, items(f"127.0.0.1:{api}")))
    ctl.reconcile()
    wait_for(lambda: get(web) == "blue1" and get(api) == "green1", timeout=10)
    ctl.set_state(parse_kv(P, items("198.18.255.1:18098")))  # an address the host lacks
    ctl.reconcile()
    assert get(api) == "green1", "the last loaded definition keeps serving"
    assert get(web) == "blue1"
    assert b"198.18.255.1" not in ctl.hap.config_path.read_bytes()
    assert "services/api/config" in ctl.errors()


# --------------------------------------------------------------------------- dynamic members


def members_state(bind: int, members: dict[str, tuple[str, int, int, str]]) -> DesiredState:
    """web on 127.0.0.1:`bind` with a health check every 500 ms; pool blue (active)
    holds `members` (name -> (address, port, weight, state))."""
    items = [KVEntry(P + "services/web/config", json.dumps(
                {"bind": f"127.0.0.1:{bind}", "health": {"path": "/health",
                                                         "interval_ms": 500}}).encode(), 1),
             KVEntry(P + "services/web/active", b"blue", 2)]
    for i, (name, (addr, port, weight, st)) in enumerate(sorted(members.items())):
        items.append(KVEntry(P + f"services/web/pools/blue/{name}", json.dumps(
            {"address": addr, "port": port, "weight": weight, "state": st}).encode(), 3 + i))
    return parse_kv(P, items)


def runtime_servers(ctl: ProxyController) -> dict[tuple[str, str], tuple[str, ...]]:
    """What the current worker shows of each server: address, port and user weight from
    `show servers state` (`show stat` shows 1 for a dynamic server never enabled), admin
    state from `show stat`."""
    text = ctl.hap.worker_command("show servers state")
    addr: dict[tuple[str, str], tuple[str, str, str]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) > 18 and f[0].isdigit():
            addr[(f[1], f[3])] = (f[4], f[18], f[7])
    return {k: (*addr[k], s.admin) for k, s in haproxy_servers(ctl.hap).items()}


class FreshLoad:
    """GET / on a new connection each time, in a thread, until stopped; every exception
    or non-200 is a failure (no retry)."""

    def __init__(self, port: int) -> None:
        self.port, self.requests = port, 0
        self.failures: list[str] = []
        self.ok: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.requests += 1
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read().decode()
                if resp.status != 200:
                    self.failures.append(f"HTTP {resp.status}")
                else:
                    self.ok[body] = self.ok.get(body, 0) + 1
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
            finally:
                conn.close()

    def __enter__(self) -> FreshLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def settle(ctl: ProxyController) -> None:
    """Reconcile again while the controller asks to (removed members still serving),
    as the daemon does, until every removal is done."""
    def done() -> bool:
        if ctl.poll_after() is not None:
            ctl.reconcile()
        return ctl.hap.pending_removals == 0
    wait_for(done, timeout=20, interval=0.02, message="removed members deleted")


def reload_count(m: Metrics) -> float:
    return sum(m.registry.get_sample_value("reconciler_haproxy_reloads_total",
                                           {"result": r}) or 0.0
               for r in ("ok", "failed", "invalid"))


def runtime_count(m: Metrics, result: str) -> float:
    return m.registry.get_sample_value("reconciler_haproxy_runtime_changes_total",
                                       {"result": result}) or 0.0


def test_members_come_and_go_at_runtime_under_load_without_reload(
        ctl: ProxyController, http_backends: HttpBackends) -> None:
    metrics = ctl.metrics
    bind = free_port()
    # Members on distinct loopback addresses, each answering its own name.
    members: dict[str, tuple[str, int, int, str]] = {}
    for i, name in enumerate(("m1", "m2")):
        host = f"127.0.93.{i + 1}"
        members[name] = (host, http_backends.start(name, host=host).port, 100, "ready")
    ctl.set_state(members_state(bind, members))
    ctl.reconcile()
    wait_for(lambda: {get(bind) for _ in range(6)} == {"m1", "m2"}, timeout=10)
    before = ctl.hap.show_proc()
    worker = before.current_worker
    reloads_before = reload_count(metrics)
    with contextlib.ExitStack() as loads:
        keep = [loads.enter_context(KeepAliveLoad(bind, think=0.001)) for _ in range(3)]
        fresh = loads.enter_context(FreshLoad(bind))
        for r in range(6):
            name = f"n{r}"
            host = f"127.0.93.{10 + r}"
            srv = http_backends.start(name, host=host)
            # Every other one comes weighted, drained or in maintenance.
            weight, st = [(100, "ready"), (30, "ready"), (100, "drain"),
                          (100, "ready"), (100, "maint"), (50, "ready")][r]
            members[name] = (host, srv.port, weight, st)
            ctl.set_state(members_state(bind, members))
            assert ctl.reconcile()["last_reload"] == "ok"
            if st == "ready":  # the new member takes traffic
                wait_for(lambda: fresh.ok.get(name, 0) > 0,  # noqa: B023
                         timeout=10, message=f"{name} answering")
            # The oldest one goes (its backend keeps serving until it is deleted).
            gone = sorted(members)[0]
            del members[gone]
            ctl.set_state(members_state(bind, members))
            ctl.reconcile()
            settle(ctl)
            assert ("be_web:blue", gone) not in haproxy_servers(ctl.hap)
        # An address change of a member (`set server ... addr`).
        moved = http_backends.start("n5", host="127.0.93.50")
        members["n5"] = ("127.0.93.50", moved.port, 50, "ready")
        ctl.set_state(members_state(bind, members))
        ctl.reconcile()
        time.sleep(0.3)  # a little more load after the last change
    after = ctl.hap.show_proc()
    requests = fresh.requests + sum(k.requests for k in keep)
    failures = fresh.failures + [f for k in keep for f in k.failures]
    assert failures == [], f"{len(failures)} failed of {requests}: {failures[:5]}"
    assert requests >= 300, requests
    assert (after.reloads, after.failed_reloads) == (before.reloads, before.failed_reloads)
    assert after.current_worker == worker, "the same worker served throughout"
    assert reload_count(metrics) == reloads_before
    assert runtime_count(metrics, "ok") >= 13 and runtime_count(metrics, "failed") == 0
    assert {sv for (_, sv) in haproxy_servers(ctl.hap)} == set(members) == {"n4", "n5"}

    # The file matches what the worker has: a reload changes nothing visible.
    runtime = runtime_servers(ctl)
    assert {k[1] for k in runtime if k[0] == "be_web:blue"} == set(members)
    assert runtime[("be_web:blue", "n4")][3] == "maint"
    assert runtime[("be_web:blue", "n5")][2] == "50"
    assert runtime[("be_web:blue", "n5")][:2] == ("127.0.93.50", str(moved.port))
    info = ctl.hap.reload()
    assert info.current_worker != worker
    assert runtime_servers(ctl) == runtime
    wait_for(lambda: {get(bind) for _ in range(6)} == {"n5"}, timeout=10)
    # And the next reconcile finds nothing to do (the file is what it renders).
    config = ctl.hap.config_path.read_bytes()
    ctl.reconcile()
    assert ctl.hap.config_path.read_bytes() == config
    assert ctl.hap.show_proc().reloads == info.reloads


def test_a_removed_member_finishes_its_requests_before_it_is_deleted(
        ctl: ProxyController, http_backends: HttpBackends) -> None:
    slow = http_backends.start("slow", host="127.0.94.1")
    fast = http_backends.start("fast", host="127.0.94.2")
    bind = free_port()
    ctl.set_state(members_state(bind, {"s1": ("127.0.94.1", slow.port, 100, "ready")}))
    ctl.reconcile()
    wait_for(lambda: get(bind) == "slow", timeout=10)
    reloads = ctl.hap.show_proc().reloads
    answers: list[str] = []

    def slow_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", bind, timeout=10)
        conn.request("GET", "/slow")
        resp = conn.getresponse()
        answers.append(f"{resp.status} {resp.read().decode()}")
        conn.close()

    t = threading.Thread(target=slow_request)
    t.start()
    wait_for(lambda: _scur(ctl, "s1") > 0, timeout=5, interval=0.01,
             message="the slow request under way")
    # s1 replaced by f1 while its request runs: it leaves rotation at once...
    ctl.set_state(members_state(bind, {"f1": ("127.0.94.2", fast.port, 100, "ready")}))
    ctl.reconcile()
    assert ctl.hap.pending_removals == 1 and ctl.poll_after() is not None
    assert haproxy_servers(ctl.hap)[("be_web:blue", "s1")].admin == "maint"
    assert {get(bind) for _ in range(4)} == {"fast"}
    # ...and is deleted once its request is answered, which did not fail.
    t.join(10)
    assert answers == ["200 slow"]
    settle(ctl)
    assert ("be_web:blue", "s1") not in haproxy_servers(ctl.hap)
    assert ctl.hap.show_proc().reloads == reloads and ctl.poll_after() is None


def _scur(ctl: ProxyController, server: str) -> int:
    text = ctl.hap.worker_command("show stat")
    lines = text.splitlines()
    col = {n: i for i, n in enumerate(lines[0][2:].split(","))}
    for line in lines[1:]:
        row = line.split(",")
        if len(row) > col["scur"] and row[col["svname"]] == server:
            return int(row[col["scur"]] or 0)
    return 0


def test_a_failed_runtime_change_falls_back_to_a_reload_counted(
        ctl: ProxyController, http_backends: HttpBackends) -> None:
    metrics = ctl.metrics
    bind = free_port()
    a = http_backends.start("a", host="127.0.95.1")
    b = http_backends.start("b", host="127.0.95.2")
    members = {"a": ("127.0.95.1", a.port, 100, "ready")}
    ctl.set_state(members_state(bind, members))
    ctl.reconcile()
    wait_for(lambda: get(bind) == "a", timeout=10)
    reloads, ok = ctl.hap.show_proc().reloads, reload_count(metrics)
    # Drift: someone added a server named b by hand (pointing elsewhere). The
    # runtime `add server` is refused, so the member goes in with a reload.
    out = ctl.hap.worker_command("add server be_web:blue/b 127.0.95.3:1")
    assert "New server" in out
    members["b"] = ("127.0.95.2", b.port, 100, "ready")
    ctl.set_state(members_state(bind, members))
    assert ctl.reconcile()["last_reload"] == "ok"
    assert ctl.hap.show_proc().reloads == reloads + 1
    assert reload_count(metrics) == ok + 1
    assert runtime_count(metrics, "failed") == 1
    # The reload did not carry the hand-made server's state (maintenance, its address)
    # into the new worker: b serves from its own address.
    wait_for(lambda: {get(bind) for _ in range(6)} == {"a", "b"}, timeout=10)
    assert runtime_servers(ctl)[("be_web:blue", "b")][:2] == ("127.0.95.2", str(b.port))


def test_plan_says_member_changes_go_at_runtime(ctl: ProxyController,
                                                backends: dict[str, int],
                                                tmp_path: Path) -> None:
    bind = free_port()
    ctl.set_state(state(bind, backends))
    ctl.reconcile()
    plan = ProxyController(ProxySettings(state_dir=str(tmp_path / "state")), dry_run=True)
    plan.set_state(state(bind, backends, pools=("blue1", "blue2", "green1")))
    plan.reconcile()
    plan.set_state(state(bind, backends, pools=("blue1", "green1", "red1")))
    plan.reconcile()
    assert plan.planned[0].startswith("change members at runtime (no reload)"), plan.planned
    assert "+    server blue2 " in plan.planned[0]
    assert plan.planned[1].startswith("reload HAProxy"), plan.planned  # a new pool
