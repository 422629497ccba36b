"""Table-driven tests for every validation rule of the desired-state model."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from reconciler.model import (
    KVEntry,
    build_state,
    classify_key,
    load_state_file,
    parse_kv,
    validate_entries,
)

P = "reconciler/"
NET1 = {"subnet": "10.77.1.0/24", "bridge": "br-vnet1", "vlan": 101, "gateway": "10.77.1.1",
        "mtu": 1450, "pool": {"start": "10.77.1.100", "end": "10.77.1.200"}}
SVC = {"bind": "127.0.0.1:18080", "mode": "http", "balance": "roundrobin",
       "health": {"path": "/health", "interval_ms": 2000}}


def kv(*pairs: tuple[str, Any]) -> list[KVEntry]:
    out = []
    for i, (k, v) in enumerate(pairs):
        raw = v if isinstance(v, bytes) else json.dumps(v).encode()
        out.append(KVEntry(P + k, raw, create_index=i + 1))
    return out


def problems(*pairs: tuple[str, Any]) -> list[str]:
    return [str(p) for p in parse_kv(P, kv(*pairs)).problems]


def with_net(**over: Any) -> dict[str, Any]:
    d = dict(NET1)
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


# ----------------------------------------------------------------- the happy path


def test_contract_example_parses() -> None:
    st = parse_kv(P, kv(
        ("networks/vnet1", NET1),
        ("networks/vnet3", {"subnet": "10.77.3.0/24", "bridge": "br-vnet3", "driver": "linux",
                            "gateway": "10.77.3.1"}),
        ("containers/web", {"interfaces": [
            {"name": "eth1", "network": "vnet1", "address": "auto"},
            {"name": "eth2", "network": "vnet3", "address": "10.77.3.10/24",
             "mac": "02:00:00:00:03:0A", "gateway": "10.77.3.1",
             "routes": [{"dst": "10.99.0.0/16", "via": "10.77.3.1"}], "mtu": 1400}]}),
        ("services/web/config", SVC),
        ("services/web/active", b"blue"),
        ("services/web/pools/blue/web-1", {"address": "10.77.1.101", "port": 8080}),
        ("services/web/pools/green/web-2", {"address": "10.77.1.102", "port": 8080,
                                            "weight": 0}),
    ))
    assert st.problems == ()
    net = st.networks["vnet1"]
    assert net.vlan == 101 and net.mtu == 1450 and net.driver == "ovs"
    assert net.pool is not None and net.pool.size == 101
    web = st.containers["web"]
    assert web.interfaces[0].address is None  # auto
    eth2 = web.interfaces[1]
    assert eth2.address == ipaddress.ip_interface("10.77.3.10/24")
    assert eth2.mac == "02:00:00:00:03:0a"
    assert eth2.gateway == ipaddress.ip_address("10.77.3.1")
    assert eth2.routes[0].dst == ipaddress.ip_network("10.99.0.0/16")
    svc = st.services["web"]
    assert svc.active == "blue" and svc.config.bind == "127.0.0.1:18080"
    assert svc.pools["green"]["web-2"].weight == 0
    assert svc.pools["blue"]["web-1"].weight == 100


def test_gateway_true_resolves_to_network_gateway() -> None:
    st = parse_kv(P, kv(("networks/vnet1", NET1), ("containers/c", {"interfaces": [
        {"name": "eth1", "network": "vnet1", "gateway": True}]})))
    assert st.containers["c"].interfaces[0].gateway == ipaddress.ip_address("10.77.1.1")


def test_ipv6_network_and_interface() -> None:
    st = parse_kv(P, kv(
        ("networks/v6", {"subnet": "fd00:77::/64", "bridge": "br-v6", "gateway": "fd00:77::1",
                         "pool": {"start": "fd00:77::100", "end": "fd00:77::1ff"}}),
        ("containers/c", {"interfaces": [{"name": "eth1", "network": "v6",
                                          "address": "fd00:77::10/64", "gateway": True}]}),
        ("services/s/config", {"bind": "[::1]:18081"}),
    ))
    assert st.problems == ()
    assert st.services["s"].config.bind == "[::1]:18081"


# ------------------------------------------------------------- one rule per row

NETWORK_CASES = [
    ("subnet missing", {"bridge": "br0"}, "subnet: required"),
    ("bridge missing", {"subnet": "10.77.1.0/24"}, "bridge: required"),
    ("bad cidr", with_net(subnet="10.77.1.0/33"), "subnet: not a valid IPv4 or IPv6 CIDR"),
    ("host bits", with_net(subnet="10.77.1.5/24"), "host bits set"),
    ("bridge too long", with_net(bridge="br-0123456789abc"), "bridge: must be 1-15"),
    ("bridge chars", with_net(bridge="br 0"), "bridge: must be 1-15"),
    ("driver", with_net(driver="vxlan"), "driver: must be one of ovs, linux"),
    ("vlan 0", with_net(vlan=0), "vlan: must be between 1 and 4094"),
    ("vlan 4095", with_net(vlan=4095), "vlan: must be between 1 and 4094"),
    ("vlan type", with_net(vlan="101"), "vlan: must be an integer"),
    ("vlan bool", with_net(vlan=True), "vlan: must be an integer"),
    ("vlan on linux", with_net(driver="linux"), "vlan: only the ovs driver supports vlan"),
    ("mtu low", with_net(mtu=575), "mtu: must be between 576 and 9000"),
    ("mtu high", with_net(mtu=9001), "mtu: must be between 576 and 9000"),
    ("gateway outside", with_net(gateway="10.77.2.1"), "gateway: must be inside the subnet"),
    ("gateway family", with_net(gateway="fd00::1"), "gateway: must be inside the subnet"),
    ("gateway network addr", with_net(gateway="10.77.1.0"), "network or broadcast"),
    ("gateway bad", with_net(gateway="nope"), "gateway: not a valid IPv4 or IPv6 address"),
    ("pool outside", with_net(pool={"start": "10.77.1.100", "end": "10.77.2.5"}),
     "pool.end: must be inside the subnet"),
    ("pool reversed", with_net(pool={"start": "10.77.1.200", "end": "10.77.1.100"}),
     "pool: start must not be after end"),
    ("pool missing end", with_net(pool={"start": "10.77.1.200"}), "pool.end: required"),
    ("pool unknown field", with_net(pool={"start": "10.77.1.2", "end": "10.77.1.9", "x": 1}),
     "pool.x: unknown field"),
    ("unknown field", with_net(colour="blue"), "colour: unknown field"),
    ("not an object", [1, 2], "must be a JSON object, not an array"),
]


@pytest.mark.parametrize(("label", "value", "expected"), NETWORK_CASES,
                         ids=[c[0] for c in NETWORK_CASES])
def test_network_rules(label: str, value: Any, expected: str) -> None:
    got = problems(("networks/n", value))
    assert any(expected in g for g in got), got
    assert all(g.startswith("reconciler/networks/n") for g in got)


def iface(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "eth1", "network": "vnet1", "address": "10.77.1.10/24"}
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


CONTAINER_CASES = [
    ("name missing", {"network": "vnet1"}, "interfaces[0].name: required"),
    ("name too long", iface(name="eth0123456789abc"), "interfaces[0].name: must be 1-15"),
    ("name slash", iface(name="a/b"), "interfaces[0].name: must be 1-15"),
    ("name lo", iface(name="lo"), "lo is the loopback"),
    ("unknown network", iface(network="nope"), "interfaces[0].network: unknown network"),
    ("address outside", iface(address="10.77.2.10/24"), "must be inside the network's subnet"),
    ("address prefix", iface(address="10.77.1.10/16"), "same prefix length"),
    ("address no prefix", iface(address="10.77.1.10"), "an address with prefix length"),
    ("address garbage", iface(address="x"), "interfaces[0].address: must be \"auto\""),
    ("address broadcast", iface(address="10.77.1.255/24"), "network or broadcast"),
    ("address is gateway", iface(address="10.77.1.1/24"), "is the network's gateway"),
    ("mac multicast", iface(mac="01:00:5e:00:00:01"), "must be a unicast MAC"),
    ("mac format", iface(mac="02:00:00:00:03"), "six colon-separated hex bytes"),
    ("mac zero", iface(mac="00:00:00:00:00:00"), "must not be all zeros"),
    ("gateway outside", iface(gateway="10.77.9.1"), "interfaces[0].gateway: must be inside"),
    ("route dst", iface(routes=[{"dst": "10.99.0.1/16", "via": "10.77.1.1"}]),
     "routes[0].dst: not a valid CIDR"),
    ("route via outside", iface(routes=[{"dst": "10.99.0.0/16", "via": "10.55.0.1"}]),
     "routes[0].via: must be inside the network's subnet"),
    ("route family", iface(routes=[{"dst": "fd00::/64", "via": "10.77.1.1"}]),
     "different IP versions"),
    ("route missing via", iface(routes=[{"dst": "10.99.0.0/16"}]), "routes[0].via: required"),
    ("routes not array", iface(routes={"dst": "x"}), "routes: must be an array"),
    ("mtu", iface(mtu=100), "interfaces[0].mtu: must be between 576 and 9000"),
    ("unknown iface field", iface(vlan=3), "interfaces[0].vlan: unknown field"),
]


@pytest.mark.parametrize(("label", "value", "expected"), CONTAINER_CASES,
                         ids=[c[0] for c in CONTAINER_CASES])
def test_interface_rules(label: str, value: Any, expected: str) -> None:
    got = problems(("networks/vnet1", NET1), ("containers/c", {"interfaces": [value]}))
    assert any(expected in g for g in got), got
    assert all(g.startswith("reconciler/containers/c: ") for g in got)


def test_two_gateways_in_one_container() -> None:
    got = problems(("networks/vnet1", NET1), ("containers/c", {"interfaces": [
        iface(name="eth1", address="auto", gateway=True),
        iface(name="eth2", address="auto", gateway="10.77.1.1")]}))
    assert got == ["reconciler/containers/c: interfaces: at most one interface per container "
                   "may set gateway (interfaces[0] and interfaces[1] both do)"]


def test_duplicate_interface_name() -> None:
    got = problems(("networks/vnet1", NET1), ("containers/c", {"interfaces": [
        iface(address="auto"), iface(address="auto")]}))
    assert got == ['reconciler/containers/c: interfaces[1].name: duplicate interface name '
                   'in this container (got "eth1")']


def test_auto_without_pool() -> None:
    got = problems(("networks/vnet1", with_net(pool=None)),
                   ("containers/c", {"interfaces": [iface(address="auto")]}))
    assert got == ["reconciler/containers/c: interfaces[0].address: is auto but network "
                   "'vnet1' has no pool (got \"auto\")"]


def test_static_address_used_twice_older_key_keeps_it() -> None:
    st = parse_kv(P, kv(("networks/vnet1", NET1),
                        ("containers/zeta", {"interfaces": [iface()]}),
                        ("containers/alpha", {"interfaces": [iface()]})))
    assert "zeta" in st.containers and "alpha" not in st.containers
    assert [str(p) for p in st.problems] == [
        "reconciler/containers/alpha: interfaces[0].address: address already used in network "
        "'vnet1' by reconciler/containers/zeta (got 10.77.1.10/24)"]


def test_overlapping_subnets() -> None:
    same_bridge_no_vlan = parse_kv(P, kv(
        ("networks/a", {"subnet": "10.77.0.0/16", "bridge": "br-x"}),
        ("networks/b", {"subnet": "10.77.5.0/24", "bridge": "br-x"})))
    assert list(same_bridge_no_vlan.networks) == ["a"]
    assert "overlaps network 'a'" in str(same_bridge_no_vlan.problems[0])
    one_vlan_missing = parse_kv(P, kv(
        ("networks/a", {"subnet": "10.77.1.0/24", "bridge": "br-x", "vlan": 5}),
        ("networks/b", {"subnet": "10.77.1.0/24", "bridge": "br-x"})))
    assert list(one_vlan_missing.networks) == ["a"]
    same_vlan = parse_kv(P, kv(
        ("networks/a", {"subnet": "10.77.1.0/24", "bridge": "br-x", "vlan": 5}),
        ("networks/b", {"subnet": "10.77.1.0/24", "bridge": "br-x", "vlan": 5})))
    assert list(same_vlan.networks) == ["a"]
    isolated = parse_kv(P, kv(
        ("networks/a", {"subnet": "10.77.1.0/24", "bridge": "br-x", "vlan": 5}),
        ("networks/b", {"subnet": "10.77.1.0/24", "bridge": "br-x", "vlan": 6}),
        ("networks/c", {"subnet": "10.77.1.0/24", "bridge": "br-y"})))
    assert isolated.problems == () and len(isolated.networks) == 3


def test_bridge_shared_by_two_drivers() -> None:
    got = problems(("networks/a", {"subnet": "10.77.1.0/24", "bridge": "br-x"}),
                   ("networks/b", {"subnet": "10.77.2.0/24", "bridge": "br-x",
                                   "driver": "linux"}))
    assert got == ["reconciler/networks/b: bridge: bridge 'br-x' is already used by network "
                   "'a' with driver ovs"]


def test_invalid_network_invalidates_dependents_only() -> None:
    st = parse_kv(P, kv(("networks/vnet1", NET1),
                        ("networks/bad", {"subnet": "nope", "bridge": "br-b"}),
                        ("containers/ok", {"interfaces": [iface(address="auto")]}),
                        ("containers/dep", {"interfaces": [iface(network="bad")]})))
    assert set(st.containers) == {"ok"}
    assert "network 'bad' is invalid (see reconciler/networks/bad)" in \
        str(next(p for p in st.problems if p.key == "reconciler/containers/dep"))


SERVICE_CASES = [
    ("bind missing", {}, "bind: required"),
    ("bind no port", {"bind": "127.0.0.1"}, "bind: must be host:port"),
    ("bind port 0", {"bind": "127.0.0.1:0"}, "port must be between 1 and 65535"),
    ("bind port big", {"bind": "127.0.0.1:70000"}, "port must be between 1 and 65535"),
    ("bind hostname", {"bind": "example.com:80"}, "host must be an IP address or *"),
    ("bind v6 no brackets", {"bind": "::1:80"}, "bind: must be host:port"),
    ("bind newline", {"bind": "127.0.0.1:80\nlisten x"}, "bind: must be host:port"),
    ("mode", {"bind": "127.0.0.1:80", "mode": "udp"}, "mode: must be one of http, tcp"),
    ("balance", {"bind": "127.0.0.1:80", "balance": "random"}, "balance: must be one of"),
    ("health path", {"bind": "127.0.0.1:80", "health": {"path": "health"}},
     "health.path: must start with /"),
    ("health injection", {"bind": "127.0.0.1:80", "health": {"path": "/h\n  server x"}},
     "health.path: must start with /"),
    ("health hash", {"bind": "127.0.0.1:80", "health": {"path": "/h#c"}},
     "health.path: must start with /"),
    ("health trailing newline", {"bind": "127.0.0.1:80", "health": {"path": "/h\n"}},
     "health.path: must start with /"),
    ("health colon", {"bind": "127.0.0.1:80", "health": {"path": "/health:ready"}},
     "health.path: must start with /"),
    ("health interval", {"bind": "127.0.0.1:80", "health": {"path": "/", "interval_ms": 5}},
     "health.interval_ms: must be between 100"),
    ("unknown", {"bind": "127.0.0.1:80", "timeout": 3}, "timeout: unknown field"),
]


@pytest.mark.parametrize(("label", "value", "expected"), SERVICE_CASES,
                         ids=[c[0] for c in SERVICE_CASES])
def test_service_config_rules(label: str, value: Any, expected: str) -> None:
    got = problems(("services/s/config", value))
    assert any(expected in g for g in got), got
    assert all(g.startswith("reconciler/services/s/config: ") for g in got)


MEMBER_CASES = [
    ("address missing", {"port": 80}, "address: required"),
    ("address hostname", {"address": "web1", "port": 80}, "address: not a valid IPv4 or IPv6"),
    ("address injection", {"address": "10.0.0.1 check\n", "port": 80}, "not a valid"),
    ("address unspecified", {"address": "0.0.0.0", "port": 80}, "must be a unicast"),
    ("address zone", {"address": "fe80::1%x;shutdown sessions", "port": 80},
     "must not carry an IPv6 zone"),
    ("port", {"address": "10.77.1.5", "port": 0}, "port: must be between 1 and 65535"),
    ("port string", {"address": "10.77.1.5", "port": "80"}, "port: must be an integer"),
    ("weight", {"address": "10.77.1.5", "port": 80, "weight": 257},
     "weight: must be between 0 and 256"),
    ("unknown", {"address": "10.77.1.5", "port": 80, "backup": True}, "backup: unknown field"),
    ("state", {"address": "10.77.1.5", "port": 80, "state": "down"},
     "state: must be one of ready, drain, maint"),
    ("state type", {"address": "10.77.1.5", "port": 80, "state": 1}, "state: must be a string"),
]


@pytest.mark.parametrize(("label", "value", "expected"), MEMBER_CASES,
                         ids=[c[0] for c in MEMBER_CASES])
def test_member_rules(label: str, value: Any, expected: str) -> None:
    st = parse_kv(P, kv(("services/s/config", SVC), ("services/s/active", b"blue"),
                        ("services/s/pools/blue/m", value)))
    got = [str(p) for p in st.problems]
    assert any(expected in g for g in got), got
    assert any(g.startswith("reconciler/services/s/pools/blue/m: ") for g in got)
    assert "s" in st.services  # one bad member never takes the service down


def test_two_services_on_one_bind() -> None:
    st = parse_kv(P, kv(("services/a/config", {"bind": "127.0.0.1:18080"}),
                        ("services/b/config", {"bind": "127.0.0.1:18080"}),
                        ("services/c/config", {"bind": "*:18081"}),
                        ("services/d/config", {"bind": "127.0.0.1:18081"})))
    assert set(st.services) == {"a", "c"}
    assert [str(p) for p in st.problems] == [
        'reconciler/services/b/config: bind: already used by reconciler/services/a/config '
        '(got 127.0.0.1:18080)',
        'reconciler/services/d/config: bind: already used by reconciler/services/c/config '
        '(got 127.0.0.1:18081)']


def test_active_rules() -> None:
    # A pool without members yet (they come from container labels) is allowed.
    st = parse_kv(P, kv(("services/s/config", SVC), ("services/s/active", b"pink"),
                        ("services/s/pools/blue/m", {"address": "10.77.1.5", "port": 80})))
    assert st.services["s"].active == "pink" and st.problems == ()
    bad = problems(("services/s/config", SVC), ("services/s/active", b"blue\nx"))
    assert any("must name a pool" in g for g in bad)


def test_service_without_config() -> None:
    got = problems(("services/s/active", b"blue"),
                   ("services/s/pools/blue/m", {"address": "10.77.1.5", "port": 80}))
    assert got == ["reconciler/services/s/config: missing: the service has pools or an active "
                   "pool but no config"]


@pytest.mark.parametrize(("raw", "expected"), [
    (b"{", "invalid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    (b"", "value is empty; expected a JSON object"),
    (b"\xff\xfe", "value is not UTF-8"),
    (b"NaN", "invalid JSON"),
    (b"[]", "must be a JSON object, not an array"),
])
def test_undecodable_values(raw: bytes, expected: str) -> None:
    got = problems(("networks/n", raw), ("networks/ok", NET1))
    assert len(got) == 1 and expected in got[0], got
    assert got[0].startswith("reconciler/networks/n")


def test_names_with_a_trailing_newline_are_refused() -> None:
    # `$` matches before a final newline; the name rules must not.
    assert "invalid name" in str(classify_key("services/u\n/config"))
    assert "invalid name" in str(classify_key("networks/n\n"))
    got = problems(("networks/vnet1", NET1), ("containers/c", {"interfaces": [
        iface(name="eth1\n")]}))
    assert any("interfaces[0].name: must be 1-15" in g for g in got), got


def test_key_layout() -> None:
    assert classify_key("nodes/h1/status") is None
    assert classify_key("ipam/vnet1/10.77.1.100") is None
    assert "not part of the layout" in str(classify_key("stuff/x"))
    assert "invalid name" in str(classify_key("networks/bad name"))
    assert "not part of the layout" in str(classify_key("services/web/weird"))
    st = parse_kv(P, kv(("networks/a b", NET1)))
    assert [str(p) for p in st.problems] == [
        "reconciler/networks/a b: invalid name 'a b': names are 1-63 characters of "
        "[A-Za-z0-9_.-]"]


def test_collects_every_error_of_a_key() -> None:
    got = problems(("networks/n", {"subnet": "x", "bridge": "b" * 20, "vlan": 0, "mtu": 1,
                                   "extra": 1}))
    fields = sorted(g.split(": ")[1] for g in got)
    assert fields == ["bridge", "extra", "mtu", "subnet", "vlan"]


# ------------------------------------------------------------------ state files


def test_state_file_yaml(tmp_path: Any) -> None:
    f = tmp_path / "state.yaml"
    f.write_text("""
networks:
  vnet1: {subnet: 10.77.1.0/24, bridge: br-vnet1, vlan: 101,
          pool: {start: 10.77.1.100, end: 10.77.1.200}}
containers:
  web: {interfaces: [{name: eth1, network: vnet1}]}
services:
  web:
    config: {bind: "127.0.0.1:18080"}
    active: blue
    pools:
      blue:
        web-1: {address: 10.77.1.101, port: 8080}
""")
    entries, probs = load_state_file(str(f))
    st = validate_entries(entries, probs)
    assert st.problems == ()
    assert st.services["web"].active == "blue"


def test_state_file_errors_name_locations(tmp_path: Any) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("""
networks:
  vnet1: {subnet: 10.77.1.0/24, bridge: br-vnet1, vlan: 9999}
extra: 1
services:
  web:
    config: {bind: "127.0.0.1:18080"}
    pools: {blue: {w: {address: 10.77.1.5, port: 80, weight: -1}}}
""")
    entries, probs = load_state_file(str(f))
    got = [str(p) for p in validate_entries(entries, probs).problems]
    assert f"{f}: extra: unknown section (allowed: containers, networks, policy, services)" in got
    assert f"{f}: networks.vnet1: vlan: must be between 1 and 4094 (got 9999)" in got
    assert f"{f}: services.web.pools.blue.w: weight: must be between 0 and 256 (got -1)" in got


@pytest.mark.parametrize("text", [
    "{", "- a\n- b", "networks: [1]", "a: b: c",
    "networks: {n: {2024-01-01: x}}",  # a date key: no JSON equivalent
    "networks: {n: &a {x: *a}}",  # a recursive alias
    "networks: {n: " + "[" * 3000 + "]" * 3000 + "}",  # nested too deeply
])
def test_state_file_unparseable(tmp_path: Any, text: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    entries, probs = load_state_file(str(f))
    assert probs and not entries
    assert all(str(p).startswith(str(f)) for p in probs)


def test_file_and_kv_agree() -> None:
    """The same object gives the same verdict through a file or through KV."""
    bad_net = {"subnet": "10.77.1.0/24", "bridge": "br", "mtu": 10}
    from reconciler.model import KeyRef, RawEntry
    from_file = build_state([RawEntry("f: networks.n", KeyRef("network", "n"), bad_net)])
    from_kv = parse_kv(P, kv(("networks/n", bad_net)))
    assert [p.reason for p in from_file.problems] == [p.reason for p in from_kv.problems]
