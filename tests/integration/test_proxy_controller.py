"""The proxy controller against the real HAProxy: desired state in, running HAProxy out.

What each change costs: an `active` flip and a weight change go through the runtime API
(no reload: the master's reload counter stays), a new member reloads; a broken template
or an invalid `active` never takes traffic away from the last good state.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import HttpBackends, free_port, haproxy_servers, wait_for

from reconciler.errors import HaproxyError
from reconciler.model import DesiredState, KVEntry, parse_kv
from reconciler.proxy.controller import ProxyController
from reconciler.settings import ProxySettings

pytestmark = pytest.mark.integration
P = "t/"


@pytest.fixture
def backends(http_backends: HttpBackends) -> dict[str, int]:
    """Three members' backends, each answering its own name: name -> port."""
    return {name: http_backends.start(name).port for name in ("blue1", "blue2", "green1")}


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


def test_flip_and_weights_without_reload_member_with_reload(
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
    st = ctl.reconcile()
    assert reloads(ctl) == base + 1, "a new member reloads (once)"
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

    # A reload (a new member) keeps blue1 drained: the staged file and the server-state
    # file agree with what was set at runtime.
    ports["blue3"] = http_backends.start("blue3").port
    ctl.set_state(state(bind, ports, pools=(*pools, "blue3"), states={"blue1": "drain"}))
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
    # While `far` stays as it is, it is not tried again: a new member of web costs
    # exactly one (successful) reload.
    before = reloads(ctl)
    items.append(KVEntry(P + "services/web/pools/green/blue2", json.dumps(
        {"address": "127.0.0.1", "port": backends["blue2"]}).encode(), 6))
    ctl.set_state(parse_kv(P, items))
    ctl.reconcile()
    assert reloads(ctl) == before + 1
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
