"""The compiled model of the group policy (reconciler.policy.compiled): table-driven."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from reconciler.ipam import Allocation
from reconciler.model import EXTERNAL, DesiredState, KVEntry, parse_kv
from reconciler.policy.compiled import (
    UNGROUPED,
    LocalPort,
    compile_policy,
    cuts,
    group_label,
    source_networks,
    zone_of,
)

P = "reconciler/"
N1 = {"subnet": "10.77.1.0/24", "bridge": "br-a", "vlan": 1, "gateway": "10.77.1.1",
      "pool": {"start": "10.77.1.100", "end": "10.77.1.200"}}
N2 = {"subnet": "10.77.2.0/24", "bridge": "br-b", "driver": "linux",
      "pool": {"start": "10.77.2.100", "end": "10.77.2.200"}}
# The same subnet as N1, isolated from it by a VLAN on the same bridge.
N3 = {"subnet": "10.77.1.0/24", "bridge": "br-a", "vlan": 3,
      "pool": {"start": "10.77.1.100", "end": "10.77.1.200"}}
SEED = {"isolate": ["web", "db"], "allow": [["web", "db"], ["web", "web"],
                                            ["web", "external"]]}


def desired(policy: Any, nets: dict[str, Any] | None = None, **groups: str | None
            ) -> DesiredState:
    nets = nets or {"n1": N1, "n2": N2}
    pairs: list[tuple[str, Any]] = [(f"networks/{n}", v) for n, v in nets.items()]
    first = next(iter(nets))
    for name, g in groups.items():
        spec: dict[str, Any] = {"interfaces": [{"name": "eth1", "network": first}]}
        if g is not None:
            spec["group"] = g
        pairs.append((f"containers/{name}", spec))
    if policy is not None:
        pairs.append(("policy", policy))
    st = parse_kv(P, [KVEntry(P + k, json.dumps(v).encode(), i + 1)
                      for i, (k, v) in enumerate(pairs)])
    assert st.problems == (), st.problems
    return st


def ip(s: str) -> Any:
    return ipaddress.ip_address(s)


def alloc(net: str, addr: str, cid: str, node: str = "h1") -> Allocation:
    return Allocation(net, ip(addr), node, cid, "eth1")


def port(net: str, addr: str, cid: str, mac: str | None = None) -> LocalPort:
    return LocalPort(net, f"rv-{cid}", cid, (ip(addr),), mac)


def test_no_isolation_compiles_nothing() -> None:
    st = desired({"allow": [["web", "db"]]}, web="web", db="db")
    got = compile_policy(st, [alloc("n1", "10.77.1.100", "c1")],
                         [port("n1", "10.77.1.100", "c1")], {"c1": "web"})
    assert got.bridges == {}


def test_seed_scenario() -> None:
    st = desired(SEED, web="web", db="db", dns="web", other=None)
    allocs = [alloc("n1", "10.77.1.100", "w1"), alloc("n1", "10.77.1.101", "d1"),
              alloc("n1", "10.77.1.102", "w2", node="h2"),  # a remote web
              alloc("n1", "10.77.1.103", "o1"),  # a container without a group
              alloc("n1", "10.77.1.104", "host:h2"),  # a host's overlay address
              alloc("n1", "10.77.1.105", "x9", node="h3")]  # remote, spec unknown here
    ports = [port("n1", "10.77.1.100", "w1", "02:00:00:00:00:01"),
             port("n1", "10.77.1.101", "d1")]
    specs = {"w1": "web", "d1": "db", "w2": "dns", "o1": "other"}
    got = compile_policy(st, allocs, ports, specs)
    assert list(got.bridges) == ["br-a"]
    br = got.bridges["br-a"]
    assert br.driver == "ovs" and br.enforcing
    assert [(p.port, p.group, p.addresses, p.mac) for p in br.ports] == [
        ("rv-d1", "db", (ip("10.77.1.101"),), None),
        ("rv-w1", "web", (ip("10.77.1.100"),), "02:00:00:00:00:01")]
    [n1] = br.networks
    assert n1.zone == zone_of("n1")
    assert dict(n1.isolated) == {"db": (ip("10.77.1.101"),), "web": (ip("10.77.1.100"),)}
    assert dict(n1.sources) == {
        "web": (ip("10.77.1.100"), ip("10.77.1.102")), "db": (ip("10.77.1.101"),),
        UNGROUPED: (ip("10.77.1.103"), ip("10.77.1.105"))}
    assert n1.allowed == {("web", "db"), ("web", "web")}
    assert n1.denied() == [
        (UNGROUPED, "db"), ("db", "db"), (UNGROUPED, "web"), ("db", "web"),
        (EXTERNAL, "db"), (EXTERNAL, "web")]


@pytest.mark.parametrize(("policy", "allowed", "denied_external"), [
    ({"isolate": ["db"], "allow": [["external", "db"]]}, {(EXTERNAL, "db")}, []),
    ({"isolate": ["db"]}, set(), [(EXTERNAL, "db")]),
    ({"isolate": ["web"], "allow": [["web", "db"]]}, set(), []),  # no isolated db here
])
def test_external_and_pairs(policy: Any, allowed: set[tuple[str, str]],
                            denied_external: list[tuple[str, str]]) -> None:
    st = desired(policy, web="web", db="db")
    got = compile_policy(st, [], [port("n1", "10.77.1.101", "d1")], {"d1": "db"})
    if not denied_external and not allowed:
        [n] = got.bridges["br-a"].networks
        assert not n.isolated and n.denied() == []  # db not isolated: ports only
        assert [p.port for p in got.bridges["br-a"].ports] == ["rv-d1"]
        return
    [n] = got.bridges["br-a"].networks
    assert n.allowed == allowed
    assert [d for d in n.denied() if d[0] == EXTERNAL] == denied_external


def test_anti_spoofing_on_every_bridge_with_ports() -> None:
    # db is isolated on br-a; a web port on br-b is not isolated but must not spoof.
    st = desired(SEED, web="web", db="db")
    got = compile_policy(st, [], [port("n1", "10.77.1.101", "d1"),
                                  port("n2", "10.77.2.100", "w1")],
                         {"d1": "db", "w1": "web"})
    assert sorted(got.bridges) == ["br-a", "br-b"]
    b = got.bridges["br-b"]
    assert b.driver == "linux" and [p.addresses for p in b.ports] == [(ip("10.77.2.100"),)]
    assert b.enforcing and dict(b.networks[0].isolated) == {"web": (ip("10.77.2.100"),)}
    # Without any isolated group on the bridge it only keeps ports honest.
    st2 = desired({"isolate": ["db"]}, web="web", db="db")
    b2 = compile_policy(st2, [], [port("n2", "10.77.2.100", "w1")], {"w1": "web"})
    assert not b2.bridges["br-b"].enforcing and b2.bridges["br-b"].ports


def test_sources_own_network_inside_subnet_others_outside() -> None:
    # n1 and n3 share a subnet (isolated by vlan): n1's ports classify 10.77.1.x only by
    # n1's allocations; n2 (routed through the host) by its own.
    nets = {"n1": N1, "n2": N2, "n3": N3}
    st = desired(SEED, nets, web="web", db="db", bad=None)
    allocs = [alloc("n1", "10.77.1.100", "w1"), alloc("n3", "10.77.1.100", "b1"),
              alloc("n1", "10.77.1.101", "d1"), alloc("n2", "10.77.2.100", "w2")]
    ports = [port("n1", "10.77.1.101", "d1")]
    got = compile_policy(st, allocs, ports, {"w1": "web", "b1": "bad", "d1": "db",
                                             "w2": "web"})
    [n1] = got.bridges["br-a"].networks
    assert dict(n1.sources) == {"web": (ip("10.77.1.100"), ip("10.77.2.100")),
                                "db": (ip("10.77.1.101"),)}


def test_ambiguous_address_is_in_every_group() -> None:
    # The same routed address held by two groups in two other networks: both sets hold
    # it, so the deny of either applies (ambiguity never allows).
    nets = {"n1": N1, "n2": N2, "n4": {**N2, "bridge": "br-c"}}
    st = parse_kv(P, [KVEntry(P + k, json.dumps(v).encode(), i + 1) for i, (k, v) in
                      enumerate([*((f"networks/{n}", v) for n, v in nets.items()),
                                 ("containers/web", {"group": "web", "interfaces": [
                                     {"name": "e", "network": "n1"}]}),
                                 ("containers/db", {"group": "db", "interfaces": [
                                     {"name": "e", "network": "n1"}]}),
                                 ("policy", SEED)])])
    # n2 and n4 overlap without isolation on different bridges: allowed (distinct bridges)
    assert st.problems == ()
    allocs = [alloc("n2", "10.77.2.100", "w"), alloc("n4", "10.77.2.100", "d")]
    got = compile_policy(st, allocs, [port("n1", "10.77.1.101", "d1")],
                         {"w": "web", "d": "db", "d1": "db"})
    [n1] = got.bridges["br-a"].networks
    assert ip("10.77.2.100") in n1.sources["web"] and ip("10.77.2.100") in n1.sources["db"]
    assert ("db", "db") in n1.denied()


def test_group_change_moves_addresses_and_digest() -> None:
    ports = [port("n1", "10.77.1.101", "d1")]
    a = compile_policy(desired(SEED, web="web", db="db"), [], ports, {"d1": "db"})
    b = compile_policy(desired(SEED, web="web", db="web", d2="db"), [], ports, {"d1": "db"})
    assert a.digest() != b.digest()
    assert dict(b.bridges["br-a"].networks[0].isolated) == {"web": (ip("10.77.1.101"),)}
    again = compile_policy(desired(SEED, web="web", db="db"), [], ports, {"d1": "db"})
    assert again.digest() == a.digest()


def test_labels_and_zones() -> None:
    assert group_label(UNGROUPED) == "(none)" and group_label("web") == "web"
    assert zone_of("n1") == zone_of("n1") and 1 <= zone_of("x") <= 65000
    assert zone_of("n1") != zone_of("n2")


def test_source_networks_only_when_a_local_group_is_isolated() -> None:
    st = desired(SEED, nets={"n1": N1, "n2": N2, "n3": N3}, web="web", db="db", other=None)
    assert source_networks(st, []) == set()
    assert source_networks(st, ["other"]) == set()  # not isolated: no extra cost
    assert source_networks(st, ["db"]) == {"n1"}  # the networks with a gateway
    assert source_networks(desired(None, web="web"), ["web"]) == set()


def test_remote_holder_classified_by_the_entry_its_allocation_names() -> None:
    # web on another host (allocation only), db here: web -> db allowed, so web's address
    # is in web's source set, not UNGROUPED.
    st = desired(SEED, web="web", db="db")
    allocs = [alloc("n1", "10.77.1.100", "remote-web", node="h2"),
              alloc("n1", "10.77.1.101", "local-db"),
              alloc("n1", "10.77.1.102", "unknown", node="h2")]
    got = compile_policy(st, allocs, [port("n1", "10.77.1.101", "local-db")],
                         {"local-db": "db", "remote-web": "web"})
    [rules] = got.bridges["br-a"].networks
    assert rules.sources["web"] == (ip("10.77.1.100"),)
    assert rules.sources[UNGROUPED] == (ip("10.77.1.102"),)
    assert ("web", "db") in rules.allowed and (UNGROUPED, "db") in rules.denied()


def _cut_pairs(got: Any) -> set[tuple[str, str]]:
    return {(str(s), str(d)) for blocks in got.values() for b in blocks
            for s in b.sources for d in b.destinations}


def test_cuts_only_what_became_denied_both_ways() -> None:
    both = {"isolate": ["web", "db"], "allow": [["web", "db"], ["web", "web"]]}
    ports = [port("n1", "10.77.1.100", "w1"), port("n1", "10.77.1.101", "d1")]
    allocs = [alloc("n1", "10.77.1.100", "w1"), alloc("n1", "10.77.1.101", "d1")]
    specs = {"w1": "web", "d1": "db", "w2": "web"}
    before = compile_policy(desired(both, web="web", db="db"), allocs, ports, specs)
    # web -> db now denied; db -> web was and is denied: both pairs are denied both ways
    # now, so both are cut (an entry db -> web opened before db -> web was denied would
    # let web's packets through as its replies).
    after = compile_policy(desired({**both, "allow": [["web", "web"]]}, web="web", db="db"),
                           allocs, ports, specs)
    assert _cut_pairs(cuts(before, after)) == {("10.77.1.100", "10.77.1.101"),
                                               ("10.77.1.101", "10.77.1.100")}
    assert cuts(after, after) == {}
    # The same change while db may reach web: nothing is cut (the entry stays; web's
    # packets stay dropped, db's are allowed anyway).
    lax = {"isolate": ["web", "db"], "allow": [["web", "db"], ["db", "web"]]}
    b2 = compile_policy(desired(lax, web="web", db="db"), allocs, ports, specs)
    a2 = compile_policy(desired({**lax, "allow": [["db", "web"]]}, web="web", db="db"),
                        allocs, ports, specs)
    assert cuts(b2, a2) == {}
    # A container that just started has nothing to cut; nothing known before: all.
    more = compile_policy(desired({**both, "allow": [["web", "web"]]}, web="web", db="db"),
                          [*allocs, alloc("n1", "10.77.1.102", "w2", node="h2")], ports, specs)
    assert cuts(after, more) == {}
    assert _cut_pairs(cuts(compile_policy(desired(None), [], [], {}), more)) == {
        ("10.77.1.100", "10.77.1.101"), ("10.77.1.102", "10.77.1.101"),
        ("10.77.1.101", "10.77.1.100"), ("10.77.1.101", "10.77.1.101")}  # db -> db too


def test_cuts_an_address_that_moved_into_a_denied_group() -> None:
    pol = {"isolate": ["web", "db", "batch"],
           "allow": [["web", "db"], ["web", "web"], ["batch", "batch"]]}
    ports = [port("n1", "10.77.1.101", "d1")]
    allocs = [alloc("n1", "10.77.1.100", "x1", node="h2"), alloc("n1", "10.77.1.101", "d1")]
    st = desired(pol, web="web", db="db", batch="batch")
    before = compile_policy(st, allocs, ports, {"x1": "web", "d1": "db"})
    after = compile_policy(st, allocs, ports, {"x1": "batch", "d1": "db"})
    assert _cut_pairs(cuts(before, after)) == {("10.77.1.100", "10.77.1.101")}
