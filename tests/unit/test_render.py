"""Unit tests of reconciler.proxy: the view's allow-lists, rendering and the map."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from reconciler.adapters import haproxy as adapter
from reconciler.errors import ConfigurationError, HaproxyError, ValidationError
from reconciler.proxy import (
    GlobalView,
    MemberView,
    PoolView,
    ProxyView,
    Renderer,
    ServiceView,
    backend_name,
    parse_backend_name,
    render,
    render_map,
)
from reconciler.proxy import view as viewmod

SETTINGS = GlobalView.for_state_dir("/var/lib/reconciler")


def web(**over: object) -> ServiceView:
    svc = ServiceView(
        name="web",
        bind_host="127.0.0.1",
        bind_port=18080,
        active="blue",
        pools=(
            PoolView("green", (MemberView("g2", "10.77.1.12", 8080, 50),
                               MemberView("g1", "10.77.1.11", 8080))),
            PoolView("blue", (MemberView("b1", "10.77.1.21", 8080),)),
        ),
        health_path="/health",
        health_interval_ms=1500,
    )
    return dataclasses.replace(svc, **over)  # type: ignore[arg-type]


def view(*services: ServiceView) -> ProxyView:
    return ProxyView(SETTINGS, services or (web(),))


def text(v: ProxyView) -> str:
    return render(v).decode()


def section(cfg: str, header: str) -> list[str]:
    """The lines of one section (without the header), stripped."""
    lines = cfg.splitlines()
    start = lines.index(header)
    out = []
    for ln in lines[start + 1:]:
        if not ln.startswith(" "):
            break
        out.append(ln.strip())
    return out


def test_render_returns_bytes_with_global_and_defaults() -> None:
    out = render(view())
    assert isinstance(out, bytes)
    cfg = out.decode()
    glob = section(cfg, "global")
    assert "master-worker" in glob
    assert "hard-stop-after 30s" in glob
    assert "mworker-max-reloads 50" in glob
    assert ("stats socket /var/lib/reconciler/admin.sock mode 600 level admin "
            "expose-fd listeners") in glob
    assert "server-state-file /var/lib/reconciler/server-state" in glob
    defaults = section(cfg, "defaults")
    assert "load-server-state-from-file global" in defaults
    assert "option redispatch 1" in defaults  # every retry goes to another member
    assert "retries 3" in defaults
    assert cfg.endswith("\n")


def test_frontend_uses_map_with_active_default() -> None:
    fe = section(text(view()), "frontend fe_web")
    assert "mode http" in fe
    assert "bind 127.0.0.1:18080" in fe
    assert "option idle-close-on-response" in fe
    assert ("use_backend %[str(web),map(/var/lib/reconciler/active.map,be_web:blue)]") in fe
    assert "default_backend be_web:blue" in fe


def test_one_backend_per_pool_sorted_with_members_sorted() -> None:
    cfg = text(view())
    assert cfg.index("backend be_web:blue") < cfg.index("backend be_web:green")
    green = section(cfg, "backend be_web:green")
    assert green == [
        "mode http",
        "balance roundrobin",
        "option forwardfor",
        "option httpchk GET /health",
        "default-server inter 1500ms",
        "server g1 10.77.1.11:8080 weight 100 check",
        "server g2 10.77.1.12:8080 weight 50 check",
    ]


def test_output_is_deterministic_whatever_the_input_order() -> None:
    a = web()
    b = dataclasses.replace(a, pools=tuple(reversed(a.pools)))
    other = ServiceView("api", "127.0.0.1", 18081, "x")
    assert render(view(a, other)) == render(view(other, b))
    cfg = text(view(a, other))
    assert cfg.index("frontend fe_api") < cfg.index("frontend fe_web")


def test_tcp_mode_without_health_uses_connect_check_and_no_http_options() -> None:
    svc = web(mode="tcp", balance="leastconn", health_path=None)
    cfg = text(view(svc))
    fe = section(cfg, "frontend fe_web")
    assert "mode tcp" in fe
    assert not any("idle-close-on-response" in ln for ln in fe)
    be = section(cfg, "backend be_web:blue")
    assert "balance leastconn" in be
    assert not any("httpchk" in ln for ln in be)
    assert "server b1 10.77.1.21:8080 weight 100 check" in be


def test_tcp_mode_with_health_still_http_checks() -> None:
    be = section(text(view(web(mode="tcp"))), "backend be_web:blue")
    assert "option httpchk GET /health" in be


def test_ipv6_members_and_bind_are_bracketed() -> None:
    svc = web(bind_host="::1",
              pools=(PoolView("blue", (MemberView("b1", "fd00:77::5", 80, 1),)),))
    cfg = text(view(svc))
    assert "bind [::1]:18080" in section(cfg, "frontend fe_web")
    assert "server b1 [fd00:77::5]:80 weight 1 check" in section(cfg, "backend be_web:blue")


def test_wildcard_bind() -> None:
    assert "bind *:18080" in section(text(view(web(bind_host="*"))), "frontend fe_web")


def test_active_pool_without_entry_gets_empty_backend() -> None:
    cfg = text(view(web(active="canary")))
    assert section(cfg, "backend be_web:canary") == [
        "mode http", "balance roundrobin", "option forwardfor", "option httpchk GET /health",
        "default-server inter 1500ms",
    ]
    assert "default_backend be_web:canary" in section(cfg, "frontend fe_web")


def test_render_map_sorted_one_line_per_service() -> None:
    v = view(web(active="green"), ServiceView("api", "127.0.0.1", 18081, "x"))
    assert render_map(v) == b"api be_api:x\nweb be_web:green\n"
    assert render_map(ProxyView(SETTINGS)) == b""


def test_backend_names_cannot_collide() -> None:
    assert backend_name("a_b", "c") != backend_name("a", "b_c")
    assert parse_backend_name(backend_name("a_b", "c")) == ("a_b", "c")
    assert parse_backend_name("be_web") is None
    assert parse_backend_name("stats") is None


def test_state_dir_layout_matches_the_adapter(tmp_path: Path) -> None:
    proc = adapter.HaproxyProcess(tmp_path)
    g = GlobalView.for_state_dir(tmp_path)
    assert g.map_path == str(proc.map_path)
    assert g.admin_socket == str(proc.admin_socket)
    assert g.server_state_file == str(proc.server_state_path)


# --- injection attempts through every string field ------------------------------------

EVIL = [
    "x\nserver evil 1.2.3.4:80",
    "x\rfoo",
    "x#comment",
    "x y",
    "x\ty",
    'x"y',
    "x'y",
    "x\\y",
    "x;y",
    "",
    "x" * 64,
    "x%[src]",
    "x,y",
    "é",
]


def _member_view(**over: object) -> ProxyView:
    m = dataclasses.replace(MemberView("b1", "10.77.1.21", 8080), **over)  # type: ignore[arg-type]
    return view(web(pools=(PoolView("blue", (m,)),)))


def _cases() -> list[tuple[object, str, str, str]]:
    out: list[tuple[object, str, str, str]] = []
    builders = {
        "service name": (lambda v: view(web(name=v)), "services/"),
        "pool name": (lambda v: view(web(pools=(PoolView(v),))), "services/web/pools/"),
        "member name": (lambda v: _member_view(name=v), "services/web/pools/blue/"),
        "address": (lambda v: _member_view(address=v), "services/web/pools/blue/b1"),
        "active": (lambda v: view(web(active=v)), "services/web/active"),
        "bind host": (lambda v: view(web(bind_host=v)), "services/web/config"),
        "mode": (lambda v: view(web(mode=v)), "services/web/config"),
        "balance": (lambda v: view(web(balance=v)), "services/web/config"),
        "health.path": (lambda v: view(web(health_path="/" + v)), "services/web/config"),
        "map_path": (lambda v: ProxyView(dataclasses.replace(SETTINGS, map_path="/m" + v),
                                         (web(),)), "haproxy settings"),
        "admin_socket": (lambda v: ProxyView(
            dataclasses.replace(SETTINGS, admin_socket="/s" + v), (web(),)),
            "haproxy settings"),
        "server_state_file": (lambda v: ProxyView(
            dataclasses.replace(SETTINGS, server_state_file="/f" + v), (web(),)),
            "haproxy settings"),
    }
    for fld, (build, key) in builders.items():
        for bad in EVIL:
            if fld in ("health.path", "map_path", "admin_socket", "server_state_file") and (
                bad == "" or bad == "x" * 64
            ):
                continue  # legitimate once prefixed with "/"
            out.append((build, bad, fld, key))
    return out


@pytest.mark.parametrize(("build", "bad", "fld", "key"), _cases())
def test_injection_is_refused_naming_the_field(build: object, bad: str, fld: str,
                                               key: str) -> None:
    assert callable(build)
    v = build(bad)
    with pytest.raises(ValidationError) as info:
        render(v)
    problems = info.value.problems
    assert any(p.field == fld and p.key.startswith(key) for p in problems), problems
    with pytest.raises(ValidationError):
        render_map(v)


@pytest.mark.parametrize("address", ["10.0.0.1 backup", "fe80::1%eth0", "[::1]", "host.example",
                                     "1.2.3.4:80", "999.1.1.1"])
def test_addresses_must_be_plain_ip_literals(address: str) -> None:
    with pytest.raises(ValidationError) as info:
        render(_member_view(address=address))
    assert [p.field for p in info.value.problems] == ["address"]
    assert info.value.problems[0].key == "services/web/pools/blue/b1"


@pytest.mark.parametrize(
    ("over", "fld"),
    [({"port": 0}, "port"), ({"port": 65536}, "port"), ({"weight": 257}, "weight"),
     ({"weight": -1}, "weight"), ({"weight": True}, "weight"), ({"port": "80"}, "port")],
)
def test_member_numbers_are_range_checked(over: dict[str, object], fld: str) -> None:
    with pytest.raises(ValidationError) as info:
        render(_member_view(**over))
    assert [p.field for p in info.value.problems] == [fld]


def test_duplicates_and_shared_binds_are_refused() -> None:
    a = web()
    with pytest.raises(ValidationError, match="already used by service"):
        render(view(a, dataclasses.replace(a, name="web2")))
    with pytest.raises(ValidationError, match="duplicate pool"):
        render(view(web(pools=(PoolView("blue"), PoolView("blue")))))
    m = MemberView("b1", "10.77.1.21", 8080)
    with pytest.raises(ValidationError, match="duplicate member"):
        render(view(web(pools=(PoolView("blue", (m, m)),))))


def test_every_problem_is_reported_at_once() -> None:
    v = view(web(name="bad name", mode="udp", health_interval_ms=0))
    with pytest.raises(ValidationError) as info:
        render(v)
    assert {p.field for p in info.value.problems} == {"service name", "mode",
                                                      "health.interval_ms"}


# --- user templates --------------------------------------------------------------------

def test_user_template_overrides_one_part(tmp_path: Path) -> None:
    (tmp_path / "haproxy").mkdir()
    (tmp_path / "haproxy" / "defaults.j2").write_text(
        "defaults\n    timeout connect 1s\n    # custom\n")
    cfg = Renderer(tmp_path).render(view()).decode()
    assert section(cfg, "defaults") == ["timeout connect 1s", "# custom"]
    assert "frontend fe_web" in cfg  # the other parts still come from the project


def test_user_template_undefined_variable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text("global\n    maxconn {{ nope }}\n")
    with pytest.raises(ConfigurationError, match="nope"):
        Renderer(tmp_path).render(view())


def test_user_template_is_sandboxed(tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text(
        "{{ settings.__class__.__init__.__globals__ }}\n")
    with pytest.raises(ConfigurationError):
        Renderer(tmp_path).render(view())


def test_missing_templates_dir_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        Renderer(tmp_path / "nope")


def test_view_module_names_match_adapter_file_names() -> None:
    assert viewmod.MAP_FILE == adapter.MAP_FILE
    assert viewmod.ADMIN_SOCKET == adapter.ADMIN_SOCKET
    assert viewmod.SERVER_STATE_FILE == adapter.SERVER_STATE_FILE


# --- the adapter's pure parsers (HAProxy 2.6 output captured on this machine) ----------

SHOW_PROC = """\
#<PID>          <type>          <reloads>       <uptime>        <version>
6252            master          2 [failed: 1]   0d00h10m13s     2.6.12-1+deb12u4
# workers
1464            worker          0               0d00h00m06s     2.6.12-1+deb12u4
# old workers
1400            worker          1               0d00h01m06s     2.6.12-1+deb12u4
# programs

"""


def test_parse_show_proc() -> None:
    info = adapter.parse_show_proc(SHOW_PROC)
    assert (info.master_pid, info.reloads, info.failed_reloads) == (6252, 2, 1)
    assert info.workers == (adapter.WorkerInfo(1464, 0),)
    assert info.old_workers == (adapter.WorkerInfo(1400, 1),)
    assert info.current_worker == adapter.WorkerInfo(1464, 0)
    with pytest.raises(HaproxyError):
        adapter.parse_show_proc("Unknown command\n")


def test_parse_map_reads_files_and_show_map() -> None:
    assert adapter.parse_map("web be_web:blue\n# c\n\napi be_api:x\n") == {
        "web": "be_web:blue", "api": "be_api:x"}
    assert adapter.parse_map("0x55f5fd1de3c0 web be_web:green\n") == {"web": "be_web:green"}
