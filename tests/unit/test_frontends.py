"""Unit tests of issue 13's pure parts: the service config's routing and TLS fields and
shared-bind rules (model), frontends and their routes (view), what the templates make of
them (render), the stats/log settings, and the progressive cutover's judgement."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from reconciler.errors import ConfigurationError, ValidationError
from reconciler.model import KVEntry, parse_kv
from reconciler.progressive import (
    MIN_SAMPLE,
    NodeSample,
    StepCounters,
    judge,
    parse_duration,
    parse_rate,
    parse_steps,
    samples,
    step_counters,
)
from reconciler.proxy import GlobalView, PoolView, ProxyView, ServiceView, render
from reconciler.proxy.render import render_canary_maps
from reconciler.proxy.view import frontends
from reconciler.settings import parse_log_target, parse_stats_bind, read_stats_auth

P = "reconciler/"
G = GlobalView.for_state_dir("/var/lib/reconciler")


def state(*entries: tuple[str, Any]) -> Any:
    return parse_kv(P, [KVEntry(P + k, v if isinstance(v, bytes) else json.dumps(v).encode(),
                                i + 1) for i, (k, v) in enumerate(entries)])


def problems(*entries: tuple[str, Any]) -> list[str]:
    return [str(p) for p in state(*entries).problems]


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize(("cfg", "expected"), [
    ({"hosts": "a.test"}, "hosts: must be a non-empty array of host names"),
    ({"hosts": []}, "hosts: must be a non-empty array"),
    ({"hosts": ["a.test\nserver x"]}, "hosts[0]: must be a host name"),
    ({"hosts": ["a b"]}, "hosts[0]: must be a host name"),
    ({"hosts": ["*.a.*"]}, "hosts[0]: must be a host name"),
    ({"hosts": ["a.test", "A.TEST"]}, "hosts[1]: listed twice"),
    ({"hosts": [7]}, "hosts[0]: must be a string"),
    ({"path_prefix": "api"}, "path_prefix: must start with /"),
    ({"path_prefix": "/a b"}, "path_prefix: must start with /"),
    ({"path_prefix": "/a?x=1"}, "path_prefix: must start with /"),
    ({"path_prefix": "/a//b"}, "path_prefix: must start with /"),
    ({"mode": "tcp", "hosts": ["a.test"]}, "hosts: routing by host or path needs mode http"),
    ({"tls": {"certs": "certs"}}, "tls.certs: must be an absolute directory path"),
    ({"tls": {"certs": "/etc/../root"}}, "tls.certs: must be an absolute directory path"),
    ({"tls": {"certs": "/c", "redirect_http": 0}}, "tls.redirect_http: must be true"),
    ({"tls": {"certs": "/c", "pem": "x"}}, "tls.pem: unknown field"),
    ({"tls": {}}, "tls.certs: required"),
    ({"mode": "tcp", "tls": {"certs": "/c", "redirect_http": True}},
     "tls.redirect_http: needs mode http"),
    ({"forwardfor": "yes"}, "forwardfor: must be true or false"),
])
def test_routing_and_tls_fields_are_validated(cfg: dict[str, Any], expected: str) -> None:
    got = problems(("services/s/config", {"bind": "127.0.0.1:80", **cfg}))
    assert any(g.startswith("reconciler/services/s/config: " + expected) for g in got), got


def test_valid_routing_fields_are_normalised() -> None:
    st = state(("services/s/config", {"bind": "*:443", "hosts": ["WWW.Example.com",
                                                                 "*.example.com"],
                                      "path_prefix": "/api/", "forwardfor": False,
                                      "tls": {"certs": "/etc/certs/", "redirect_http": True}}))
    cfg = st.services["s"].config
    assert cfg.hosts == ("*.example.com", "www.example.com")
    assert cfg.path_prefix == "/api"
    assert cfg.tls is not None and cfg.tls.certs == "/etc/certs" and cfg.tls.redirect_http == 80
    assert cfg.forwardfor is False


def test_shared_bind_rules_name_both_keys() -> None:
    bind = "127.0.0.1:8080"
    got = problems(
        ("services/a/config", {"bind": bind, "hosts": ["a.test"]}),
        ("services/b/config", {"bind": bind, "hosts": ["b.test", "a.test"]}),
        ("services/c/config", {"bind": bind}),
        ("services/d/config", {"bind": bind}),
        ("services/e/config", {"bind": bind, "path_prefix": "/x"}),
        ("services/f/config", {"bind": bind, "path_prefix": "/x/"}),
        ("services/g/config", {"bind": bind, "mode": "tcp"}),
        ("services/h/config", {"bind": bind, "hosts": ["h.test"], "tls": {"certs": "/c"}}),
        ("services/i/config", {"bind": "*:8080", "hosts": ["i.test"]}))
    assert got == [
        "reconciler/services/b/config: hosts: host 'a.test' on bind 127.0.0.1:8080 is "
        "already routed to reconciler/services/a/config",
        "reconciler/services/d/config: bind: already used by reconciler/services/c/config "
        "(got 127.0.0.1:8080)",
        "reconciler/services/f/config: path_prefix: the default (no hosts) with path_prefix "
        "/x on bind 127.0.0.1:8080 is already routed to reconciler/services/e/config",
        "reconciler/services/g/config: bind: already used by reconciler/services/a/config "
        "(only http services share a bind) (got 127.0.0.1:8080)",
        "reconciler/services/h/config: tls: differs from reconciler/services/a/config, which "
        "shares bind 127.0.0.1:8080 (services on one bind share its TLS settings)",
        "reconciler/services/i/config: bind: already used by reconciler/services/a/config "
        "(got *:8080)"]


def test_cutover_document_and_its_share() -> None:
    doc = {"to": "green", "weight": 30, "state": "running", "steps": [30, 100]}
    held = parse_kv(P, [KVEntry(P + "services/s/config", b'{"bind": "127.0.0.1:1"}', 1),
                        KVEntry(P + "services/s/cutover", json.dumps(doc).encode(), 2,
                                session="sid")])
    canary = held.services["s"].canary
    assert canary is not None and canary.share == 30
    orphan = state(("services/s/config", {"bind": "127.0.0.1:1"}), ("services/s/cutover", doc))
    assert orphan.services["s"].canary is not None
    assert orphan.services["s"].canary.share == 0  # no session: its command is gone
    done = state(("services/s/config", {"bind": "127.0.0.1:1"}),
                 ("services/s/cutover", {**doc, "state": "done"}))
    assert done.services["s"].canary is not None and done.services["s"].canary.share == 0
    bad = problems(("services/s/config", {"bind": "127.0.0.1:1"}),
                   ("services/s/cutover", {"to": "g\nx", "weight": 101, "state": "maybe"}))
    assert bad == [
        'reconciler/services/s/cutover: state: must be one of running, done, rolled_back, '
        'aborted (got "maybe")',
        'reconciler/services/s/cutover: to: must name a pool: 1-63 characters of '
        '[A-Za-z0-9_.-] (got "g\\nx")',
        "reconciler/services/s/cutover: weight: must be between 0 and 100 (got 101)"]


# --------------------------------------------------------------------------- view, render


def svc(name: str, **over: Any) -> ServiceView:
    base = ServiceView(name, "*", 8080, "blue", (PoolView("blue"), PoolView("green")))
    return dataclasses.replace(base, **over)


def test_routes_are_ordered_most_specific_first() -> None:
    view = ProxyView(G, (svc("dflt"), svc("wild", hosts=("*.example.com",)),
                         svc("deep", hosts=("*.a.example.com",)),
                         svc("api", hosts=("www.example.com",), path_prefix="/api"),
                         svc("www", hosts=("www.example.com",)),
                         svc("any_api", path_prefix="/api/v2")))
    [fe] = frontends(view)
    assert fe.name == "fe_bind:any:8080" and fe.default is not None
    assert fe.default.name == "dflt"
    assert [(r.service.name, r.hosts, r.suffix, r.path_prefix) for r in fe.routes] == [
        ("api", ("www.example.com",), None, "/api"),
        ("www", ("www.example.com",), None, None),
        ("deep", (), ".a.example.com", None),
        ("wild", (), ".example.com", None),
        ("any_api", (), None, "/api/v2")]


def test_one_service_keeps_the_v1_frontend() -> None:
    [fe] = frontends(ProxyView(G, (svc("web"),)))
    assert fe.name == "fe_web" and not fe.shared and fe.routes == ()


def test_render_shared_bind_tls_logs_and_stats() -> None:
    g = dataclasses.replace(G, log_target="127.0.0.1:514", stats_host="127.0.0.1",
                            stats_user="ops", stats_password="s3cret-pass")
    view = ProxyView(g, (svc("a", hosts=("a.test",), tls_certs="/var/lib/reconciler/certs/x",
                             redirect_http_port=80),
                         svc("b", hosts=("*.b.test",), path_prefix="/p",
                             tls_certs="/var/lib/reconciler/certs/x", redirect_http_port=80,
                             forwardfor=False)))
    cfg = render(view).decode()
    assert "    log 127.0.0.1:514 format rfc3164 local0\n" in cfg
    assert "    log global\n" in cfg
    assert "    user ops insecure-password s3cret-pass\n" in cfg
    assert "http-request use-service prometheus-exporter if { path /metrics }" in cfg
    assert "http-request auth realm haproxy unless { http_auth(reconciler_stats) }" in cfg
    assert "    bind *:8080 ssl crt /var/lib/reconciler/certs/x\n    bind *:80\n" in cfg
    assert "http-request redirect scheme https code 301 unless { ssl_fc }" in cfg
    assert "    option httplog\n" in cfg
    assert "acl r0_host req.hdr(host),field(1,:),lower -m str a.test" in cfg
    assert "acl r1_host req.hdr(host),field(1,:),lower -m end .b.test" in cfg
    assert "acl r1_path path /p\n    acl r1_path path_beg /p/\n" in cfg
    assert ("use_backend %[str(b),map(/var/lib/reconciler/active.map,be_b:blue)] "
            "if r1_host r1_path") in cfg
    assert "default_backend" not in cfg.split("frontend fe_bind")[1].split("backend be_")[0]
    a_backend = cfg.split("backend be_a:blue\n")[1].split("\n\n")[0]
    b_backend = cfg.split("backend be_b:blue\n")[1].split("\n\n")[0]
    assert "option forwardfor" in a_backend and "option forwardfor" not in b_backend


def test_values_that_could_inject_are_refused() -> None:
    for bad in ({"hosts": ("a.test\n  server x 1.2.3.4:80",)}, {"path_prefix": "/a b"},
                {"tls_certs": "/c crt /etc"}, {"canary": "g x"}, {"canary_weight": 101}):
        with pytest.raises(ValidationError):
            render(ProxyView(G, (svc("a", **bad),)))
    bad_globals = (dataclasses.replace(G, log_target="127.0.0.1:514\n  x"),
                   dataclasses.replace(G, stats_host="127.0.0.1", stats_user="a",
                                       stats_password="has space x"))
    for g in bad_globals:
        with pytest.raises(ValidationError) as info:
            render(ProxyView(g, (svc("a"),)))
        assert "has space" not in str(info.value)  # a secret is never shown


def test_canary_maps_only_for_a_running_share_of_an_existing_pool() -> None:
    view = ProxyView(G, (svc("a", canary="green", canary_weight=10),
                         svc("b", canary="nope", canary_weight=10, bind_port=8081),
                         svc("c", bind_port=8082)))
    assert render_canary_maps(view) == (b"a be_a:green\n", b"a 10\n")


# --------------------------------------------------------------------------- settings


def test_log_and_stats_settings(tmp_path: Any) -> None:
    assert parse_log_target("stdout") == "stdout" and parse_log_target("off") is None
    assert parse_log_target("[::1]:514") == "[::1]:514"
    assert parse_log_target("/dev/log") == "/dev/log"
    for bad in ("syslog.example:514", "127.0.0.1", "1.2.3.4:99999", "/a b"):
        with pytest.raises(ConfigurationError):
            parse_log_target(bad)
    assert parse_stats_bind("127.0.0.1:8404") == ("127.0.0.1", 8404)
    with pytest.raises(ConfigurationError):
        parse_stats_bind("localhost:8404")
    f = tmp_path / "auth"
    f.write_text("ops:correct-horse\n")
    assert read_stats_auth(str(f)) == ("ops", "correct-horse")
    f.write_text("ops:short\n")
    with pytest.raises(ConfigurationError) as info:
        read_stats_auth(str(f))
    assert "short" not in str(info.value)


# --------------------------------------------------------------------------- progressive


def test_cutover_arguments() -> None:
    assert parse_steps("10,50,100") == (10, 50, 100)
    for bad in ("10,50", "50,10,100", "0,100", "x", "10,10,100"):
        with pytest.raises(ConfigurationError):
            parse_steps(bad)
    assert parse_duration("30s") == 30 and parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120 and parse_duration("7") == 7
    assert parse_rate("1%") == 0.01 and parse_rate("0.05") == 0.05
    for bad in ("101%", "-1", "x%"):
        with pytest.raises(ConfigurationError):
            parse_rate(bad)


def test_samples_read_only_nodes_that_apply_the_step() -> None:
    def node(weight: int, req: int) -> dict[str, Any]:
        return {"proxy": {"cutover": {"web": {"to": "green", "weight": weight, "worker": 7,
                                              "pools": {"green": {"requests": req,
                                                                  "errors": 1, "up": 2,
                                                                  "servers": 2}}}}}}
    got = samples({"n1": node(10, 100), "n2": node(50, 5), "n3": {"proxy": "junk"}},
                  "web", "green", 10)
    assert got == {"n1": NodeSample(7, 100, 1, 2, 2)}


def test_step_counters_and_judgement() -> None:
    base = {"n1": NodeSample(1, 100, 2, 2, 2), "n2": NodeSample(5, 50, 0, 1, 1)}
    now = {"n1": NodeSample(1, 300, 4, 2, 2),
           "n2": NodeSample(6, 30, 0, 1, 1)}  # n2 reloaded: counts from zero
    c = step_counters(base, now, None)
    assert c == StepCounters(230, 2, 2, ())
    assert judge(c, 0.01, False) == judge(c, 0.01, False)
    assert judge(c, 0.01, False).final is False
    assert judge(c, 0.01, True).ok and judge(c, 0.01, True).final
    bad = StepCounters(MIN_SAMPLE, 3, 1)
    v = judge(bad, 0.01, False)
    assert not v.ok and v.final and "error rate 15.0% > 1%" in v.reason
    few = StepCounters(MIN_SAMPLE - 1, 3, 1)
    assert judge(few, 0.01, False).final is False  # too few to judge mid-step
    assert not judge(few, 0.01, True).ok  # ...but judged at the end
    down = step_counters({}, {"n1": NodeSample(1, 0, 0, 1, 2)}, None)
    assert down.down == ("n1",) and "health gate" in judge(down, 0.5, False).reason
    assert step_counters({}, {"n1": NodeSample(1, 0, 0, 1, 2)}, 1).down == ()
