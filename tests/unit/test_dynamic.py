"""Unit tests of reconciler.proxy.dynamic: which member changes go through HAProxy's
runtime API (and with which commands), and which need a reload."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from reconciler.proxy import GlobalView, MemberView, PoolView, ProxyView, ServiceView, render
from reconciler.proxy.controller import config_view
from reconciler.proxy.dynamic import (
    AddServer,
    DelServer,
    RuntimePlan,
    SetAddr,
    SetState,
    SetWeight,
    describe,
    plan_runtime,
    server_options,
    split_config,
)

SETTINGS = GlobalView.for_state_dir("/var/lib/reconciler")
BLUE = "be_web:blue"


def svc(blue: tuple[MemberView, ...] = (MemberView("b1", "10.77.1.21", 8080),),
        **over: object) -> ServiceView:
    s = ServiceView(
        name="web", bind_host="127.0.0.1", bind_port=18080, active="blue",
        pools=(PoolView("blue", blue),
               PoolView("green", (MemberView("g1", "10.77.1.11", 8080),))),
        health_path="/health", health_interval_ms=1500)
    return dataclasses.replace(s, **over)  # type: ignore[arg-type]


def view(*services: ServiceView) -> ProxyView:
    return config_view(ProxyView(SETTINGS, services))


def plan(old: ProxyView, new: ProxyView, templates: str | None = None) -> RuntimePlan:
    return plan_runtime(old, new, render(old, templates).decode(),
                        render(new, templates).decode())


def test_a_member_added_goes_at_runtime_with_its_rendered_options() -> None:
    old = view(svc())
    new = view(svc((MemberView("b1", "10.77.1.21", 8080), MemberView("b2", "10.77.1.22", 8081,
                                                                      30))))
    p = plan(old, new)
    assert p.reload is None
    # default-server's `inter` first: a dynamic server does not inherit it.
    assert p.ops == (AddServer(BLUE, "b2", "10.77.1.22:8081",
                               ("inter", "1500ms", "weight", "30", "check"), True, True),)
    assert describe(p.ops[0]) == "be_web:blue/b2 added"


def test_a_member_removed_goes_at_runtime() -> None:
    old = view(svc((MemberView("b1", "10.77.1.21", 8080), MemberView("b2", "10.77.1.22", 80))))
    p = plan(old, view(svc()))
    assert p == RuntimePlan(ops=(DelServer(BLUE, "b2"),))


def test_a_new_member_in_maintenance_or_drain_is_added_as_rendered() -> None:
    old = view(svc())
    new = view(svc((MemberView("b1", "10.77.1.21", 8080),
                    MemberView("b2", "10.77.1.22", 80, state="maint"),
                    MemberView("b3", "10.77.1.23", 80, state="drain"))))
    ops = plan(old, new).ops
    assert ops == (
        AddServer(BLUE, "b2", "10.77.1.22:80", ("inter", "1500ms", "weight", "100", "check"),
                  True, False),  # rendered `disabled`: stays in maintenance
        AddServer(BLUE, "b3", "10.77.1.23:80", ("inter", "1500ms", "weight", "0", "check"),
                  True, True))
    assert describe(ops[0]).endswith("(maint)")


def test_adds_come_first_removals_last_changes_between() -> None:
    old = view(svc((MemberView("a", "10.77.1.1", 80), MemberView("b", "10.77.1.2", 80))))
    new = view(svc((MemberView("b", "10.77.1.2", 80, 5), MemberView("c", "10.77.1.3", 80))))
    ops = plan(old, new).ops
    assert [type(op) for op in ops] == [AddServer, SetWeight, DelServer]
    assert ops[1] == SetWeight(BLUE, "b", 5) and ops[2] == DelServer(BLUE, "a")


def test_address_weight_and_state_changes_of_a_member() -> None:
    old = view(svc((MemberView("b1", "10.77.1.21", 8080, state="drain"),)))
    new = view(svc((MemberView("b1", "fd00::21", 9090, 100, "ready"),)))
    ops = plan(old, new).ops
    # Leaving drain sets the weight again (the config rendered it 0).
    assert ops == (SetAddr(BLUE, "b1", "fd00::21", 9090), SetState(BLUE, "b1", "ready"),
                   SetWeight(BLUE, "b1", 100))
    assert describe(ops[0]) == "be_web:blue/b1 addr [fd00::21]:9090"
    to_maint = plan(old, view(svc((MemberView("b1", "10.77.1.21", 8080, state="maint"),))))
    # From drain to maint: the file renders its weight again (with `disabled`).
    assert to_maint.ops == (SetState(BLUE, "b1", "maint"), SetWeight(BLUE, "b1", 100))
    ready = view(svc((MemberView("b1", "10.77.1.21", 8080),)))
    assert plan(ready, view(svc((MemberView("b1", "10.77.1.21", 8080, state="drain"),)))
                ).ops == (SetState(BLUE, "b1", "drain"),)


def test_members_of_several_pools_and_services_at_once() -> None:
    api = dataclasses.replace(svc(), name="api", bind_port=18081)
    old = view(svc(), api)
    new = view(svc((MemberView("b1", "10.77.1.21", 8080), MemberView("b9", "10.77.1.29", 80))),
               dataclasses.replace(api, pools=(PoolView("blue"), api.pools[1])))
    ops = plan(old, new).ops
    assert {(type(op).__name__, op.backend, op.server) for op in ops} == {
        ("AddServer", BLUE, "b9"), ("DelServer", "be_api:blue", "b1")}


def test_nothing_changed_is_an_empty_plan() -> None:
    assert plan(view(svc()), view(svc())) == RuntimePlan()


@pytest.mark.parametrize(("change", "why"), [
    (lambda: view(svc(), dataclasses.replace(svc(), name="api", bind_port=1)),
     "services added"),
    (lambda: view(svc(bind_port=18090)), "service web changed"),
    (lambda: view(svc(mode="tcp", health_path=None)), "service web changed"),
    (lambda: view(svc(health_interval_ms=3000)), "service web changed"),
    (lambda: view(svc(balance="leastconn")), "service web changed"),
    (lambda: view(svc(pools=(PoolView("blue", (MemberView("b1", "10.77.1.21", 8080),)),
                             PoolView("green", (MemberView("g1", "10.77.1.11", 8080),)),
                             PoolView("red", (MemberView("r1", "10.77.1.31", 8080),))))),
     "service web changed"),
    (lambda: config_view(ProxyView(dataclasses.replace(SETTINGS, retries=5),
                                   (svc(),))), "global settings"),
])
def test_changes_beyond_members_need_a_reload(change: object, why: str) -> None:
    new = change()  # type: ignore[operator]
    p = plan(view(svc()), new)
    assert p.ops == () and p.reload is not None and why in p.reload, p


def test_a_static_algorithm_needs_a_reload_source_hashes_consistently() -> None:
    two = (MemberView("b1", "10.77.1.21", 8080), MemberView("b2", "10.77.1.22", 80))
    src = plan(view(svc(balance="source")), view(svc(two, balance="source")))
    assert src.reload is None and len(src.ops) == 1  # rendered `hash-type consistent`
    cfg = split_config(render(view(svc(balance="source"))).decode())
    assert cfg.backends[BLUE].hash_type == ("consistent",)
    text = render(view(svc())).decode().replace("balance roundrobin", "balance static-rr")
    new_text = render(view(svc(two))).decode().replace("balance roundrobin",
                                                       "balance static-rr")
    p = plan_runtime(view(svc()), view(svc(two)), text, new_text)
    assert p.reload is not None and "static" in p.reload


def _template(tmp_path: Path, server_line: str) -> str:
    """A templates dir whose backend.j2 renders `server_line` for each member."""
    d = tmp_path / "tpl"
    (d / "haproxy").mkdir(parents=True)
    (d / "haproxy" / "backend.j2").write_text(
        "backend {{ backend_name(service.name, pool.name) }}\n"
        "    mode {{ service.mode }}\n"
        "    balance {{ service.balance }}\n"
        "{% for member in pool.members %}\n"
        f"    {server_line}\n"
        "{% endfor %}\n")
    return str(d)


def test_a_user_template_server_line_is_given_as_is(tmp_path: Path) -> None:
    tpl = _template(tmp_path, "server {{ member.name }} "
                    "{{ format_address(member.address, member.port) }} maxconn 50 "
                    "slowstart 10s check inter 3s")
    two = (MemberView("b1", "10.77.1.21", 8080), MemberView("b2", "10.77.1.22", 80))
    p = plan(view(svc()), view(svc(two)), tpl)
    assert p.ops == (AddServer(BLUE, "b2", "10.77.1.22:80",
                               ("maxconn", "50", "slowstart", "10s", "check", "inter", "3s"),
                               True, True),)


@pytest.mark.parametrize("line", [
    # An option a dynamic server cannot take.
    "server {{ member.name }} {{ format_address(member.address, member.port) }} cookie c1",
    "server {{ member.name }} {{ format_address(member.address, member.port) }} track x/y",
    # Something else of the config depends on the members.
    "server {{ member.name }} {{ format_address(member.address, member.port) }}\n"
    "    # member {{ member.name }}",
    # The address is not where HAProxy's CLI expects it.
    "server {{ member.name }} weight 1 {{ format_address(member.address, member.port) }}",
])
def test_a_user_template_dynamic_servers_cannot_follow_reloads(tmp_path: Path,
                                                               line: str) -> None:
    tpl = _template(tmp_path, line)
    two = (MemberView("b1", "10.77.1.21", 8080), MemberView("b2", "10.77.1.22", 80))
    p = plan(view(svc()), view(svc(two)), tpl)
    assert p.ops == () and p.reload, p


def test_a_member_line_changed_beyond_address_weight_state_needs_a_reload(
        tmp_path: Path) -> None:
    tpl = _template(tmp_path, "server {{ member.name }} "
                    "{{ format_address(member.address, member.port) }} "
                    "maxconn {{ member.port }}")
    old = view(svc((MemberView("b1", "10.77.1.21", 8080),)))
    new = view(svc((MemberView("b1", "10.77.1.21", 9090),)))
    p = plan(old, new, tpl)
    assert p.reload is not None and "server line" in p.reload


@pytest.mark.parametrize("words", [
    ("check;", ), ("weight", "1;quit"), ("check", "#x"), ("weight",), ("init-addr", "none"),
    ("agent-check",), ("source", "10.0.0.1"), ("check", "inter", "1s\nshow"),
])
def test_server_options_allow_list(words: tuple[str, ...]) -> None:
    assert server_options(words) is not None


def test_server_options_accepted() -> None:
    assert server_options(("check", "inter", "1500ms", "weight", "0", "ssl", "verify",
                           "none", "sni", "str(example.com)")) is None


def test_split_config_keeps_everything_but_backend_server_lines() -> None:
    text = ("global\n    maxconn 10\n\ndefaults\n    default-server inter 2s\n"
            "    balance leastconn\n"
            "listen st\n    server keep 127.0.0.1:1\n"
            "backend be_a:b\n    mode http\n    default-server fall 2\n"
            "    server s1 10.0.0.1:80 weight 3 check\n    server s2 [fd00::1]:80\n")
    cfg = split_config(text)
    assert "    server keep 127.0.0.1:1" in cfg.skeleton  # only backends' servers go
    assert not any("s1" in ln or "s2" in ln for ln in cfg.skeleton)
    be = cfg.backends["be_a:b"]
    assert be.defaults == ("inter", "2s", "fall", "2")
    assert be.balance == ("leastconn",)
    assert be.servers == {"s1": ("10.0.0.1:80", "weight", "3", "check"),
                          "s2": ("[fd00::1]:80",)}
