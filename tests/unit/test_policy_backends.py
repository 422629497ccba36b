"""The policy backends' translation (nft JSON, OpenFlow flows) and the controller's
dispatch, over fakes of `nft` and `ovs-ofctl` (the real ones: tests/integration/
test_policy.py)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.adapters.openflow import Connection, parse_conntrack
from reconciler.model import KVEntry, parse_kv
from reconciler.policy.base import Denied
from reconciler.policy.compiled import (
    BridgeRules,
    CutBlock,
    LocalPort,
    NetworkRules,
    PortRules,
)
from reconciler.policy.controller import PolicyController, local_ports
from reconciler.policy.nft import NftBackend
from reconciler.policy.openflow import OpenFlowBackend

ip = ipaddress.ip_address
NET = NetworkRules("n1", 7, "10.77.9.0/24",
                   {"db": (ip("10.77.9.11"),), "web": (ip("10.77.9.10"),)},
                   {"web": (ip("10.77.9.10"),), "db": (ip("10.77.9.11"),)},
                   frozenset({("web", "db"), ("web", "web")}))
BR = BridgeRules("br-x", "linux", (
    PortRules("rva", "n1", "web", (ip("10.77.9.10"),), "02:00:00:00:09:0a"),
    PortRules("rvb", "n1", "db", (ip("10.77.9.11"),))), (NET,))


class FakeNft:
    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.applied: list[list[dict[str, Any]]] = []

    def apply(self, commands: Sequence[dict[str, Any]]) -> None:
        self.applied.append(list(commands))
        for c in commands:
            verb, obj = next(iter(c.items()))
            kind, body = next(iter(obj.items()))
            if kind == "table":
                key = (body["family"], body["name"])
                if verb == "delete":
                    self.tables.pop(key, None)
                else:
                    self.tables.setdefault(key, [])
            else:
                self.tables[(body["family"], body["table"])].append({kind: body})

    def list_table(self, family: str, name: str) -> list[dict[str, Any]] | None:
        return self.tables.get((family, name))

    def list_counters(self, family: str, name: str) -> dict[str, int] | None:
        objs = self.tables.get((family, name))
        return None if objs is None else {o["counter"]["name"]: 3 for o in objs
                                          if "counter" in o}


def test_nft_replaces_atomically_repairs_drift_and_removes() -> None:
    nft = FakeNft()
    be = NftBackend(nft, table="t")  # type: ignore[arg-type]
    assert be.apply([BR]) == ["policy nftables: br-x: 2 port(s), 2 isolated group(s)"]
    assert len(nft.applied) == 1  # one transaction
    first = nft.applied[0]
    assert first[:4] == [{"add": {"table": {"family": "bridge", "name": "t"}}},
                         {"delete": {"table": {"family": "bridge", "name": "t"}}},
                         {"add": {"table": {"family": "inet", "name": "t"}}},
                         {"delete": {"table": {"family": "inet", "name": "t"}}}]
    text = json.dumps(first)
    assert '"rva"' in text and '"02:00:00:00:09:0a"' in text and "10.77.9.11" in text
    assert be.apply([BR]) == []  # equal: nothing run
    # Drift: a rule deleted by hand.
    nft.tables[("inet", "t")].pop()
    assert be.apply([BR]) and len(nft.applied) == 2
    # Denied per pair (db -> db, external -> db, db -> web, external -> web), monotonic
    # across a replace: the replaced table's 3 each plus the new table's 3.
    got = be.denied()
    assert got == {("br-x", "db", "db"): 6, ("br-x", "external", "db"): 6,
                   ("br-x", "db", "web"): 6, ("br-x", "external", "web"): 6}
    be.apply([BridgeRules("br-x", "linux")])  # rules not needed any more: tables go
    assert nft.tables == {}
    assert be.denied()[("br-x", "db", "web")] == 6  # counted before, kept
    assert be.apply([BridgeRules("br-x", "linux")]) == []


@dataclass
class FakeOfctl:
    flows: dict[str, list[str]] = field(default_factory=lambda: {"br-x": []})
    replaced: int = 0

    def replace(self, bridge: str, cookie: int, mask: int, flows: Sequence[str]) -> None:
        self.replaced += 1
        self.flows[bridge] = list(flows)

    def dump(self, bridge: str, cookie: int, mask: int) -> list[str] | None:
        return sorted(self.flows[bridge]) if bridge in self.flows else None

    def packets(self, bridge: str, cookie: int, mask: int) -> dict[int, int] | None:
        out: dict[int, int] = {}
        for f in self.flows.get(bridge, []):
            c = int(f.split(",")[0].split("=")[1], 16)
            out[c] = out.get(c, 0) + 1
        return out


def test_openflow_flows_and_drift() -> None:
    of = FakeOfctl()
    be = OpenFlowBackend(of, cookie_tag=0x1234)  # type: ignore[arg-type]
    br = BridgeRules("br-x", "ovs", BR.ports, BR.networks)
    assert be.apply([br, BridgeRules("br-gone", "ovs")])[0].startswith(
        "policy openflow: br-x:")
    flows = of.flows["br-x"]
    assert all(f.startswith("cookie=0x72631234") for f in flows)
    assert any("in_port=rva,dl_src=02:00:00:00:09:0a,priority=300,ip,nw_src=10.77.9.10"
               in f for f in flows)
    assert any("priority=290,in_port=rvb,actions=drop" in f for f in flows)
    assert sum("actions=drop" in f and "table=62,priority=100" in f for f in flows) == 4
    assert be.apply([br]) == [] and of.replaced == 1
    of.flows["br-x"] = flows[:-3]  # deleted by hand
    assert be.apply([br]) and of.replaced == 2
    # Monotonic: what the surviving flows counted before the repair (1 each in the
    # fake) is kept, plus the new flows' counts; the flows deleted by hand took theirs.
    got = be.denied()
    assert sorted(got) == [("br-x", "db", "db"), ("br-x", "db", "web"),
                           ("br-x", "external", "db"), ("br-x", "external", "web")]
    assert sorted(got.values()) == [1, 1, 1, 2]  # three of the four were deleted
    assert be.apply([BridgeRules("br-x", "ovs")]) == ["policy openflow: br-x: flows removed"]
    assert of.flows["br-x"] == []


class RecordingBackend:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.seen: list[list[BridgeRules]] = []
        self.cuts: list[tuple[str, list[CutBlock]]] = []

    def apply(self, bridges: Sequence[BridgeRules], *, dry_run: bool = False) -> list[str]:
        self.seen.append(list(bridges))
        return [f"{self.kind} {b.bridge}" for b in bridges if b.ports] if dry_run else []

    def denied(self) -> Denied:
        return {("b", "s", "d"): 2}

    def cut(self, bridge: str, blocks: Sequence[CutBlock]) -> int:
        self.cuts.append((bridge, list(blocks)))
        return len(blocks)


def test_controller_dispatches_by_kind_and_plans() -> None:
    nets = {"a": {"subnet": "10.77.1.0/24", "bridge": "br-a"},
            "b": {"subnet": "10.77.2.0/24", "bridge": "br-b", "driver": "linux"}}
    entries = [KVEntry(f"p/networks/{n}", json.dumps(v).encode(), i + 1)
               for i, (n, v) in enumerate(nets.items())]
    entries += [KVEntry("p/containers/w", json.dumps({"group": "web", "interfaces": [
        {"name": "eth1", "network": "a", "address": "10.77.1.5/24"}]}).encode(), 9),
        KVEntry("p/policy", b'{"isolate": ["web"]}', 10)]
    st = parse_kv("p/", entries)
    assert st.problems == ()
    ovs, lnx = RecordingBackend("ovs"), RecordingBackend("linux")
    ctl = PolicyController([ovs, lnx], dry_run=True)
    ports = [LocalPort("a", "rv1", "c1", (ip("10.77.1.5"),))]
    assert ctl.reconcile(st, [], ports, {"c1": "w"}) == ["ovs br-a"]
    assert ctl.planned == ["ovs br-a"]
    assert [b.bridge for b in lnx.seen[0]] == ["br-b"] and not lnx.seen[0][0].ports
    assert ctl.denied() == {("b", "s", "d"): 4}


def test_local_ports_from_results() -> None:
    @dataclass
    class Link:
        ifname: str
        mac: str | None

    @dataclass
    class Net:
        name: str

    @dataclass
    class W:
        network: Net
        link: Link

    @dataclass
    class R:
        addresses: dict[str, str]
        wanted: list[W]

    res = {"c" * 64: R({"eth1": "10.77.1.5/24"}, [W(Net("a"), Link("eth1", None)),
                                                   W(Net("b"), Link("eth2", "02:00:00:00:00:01"))])}
    [p] = local_ports(res)  # eth2 is not up and right: no rules for it
    assert p.network == "a" and p.port.startswith("rv") and p.addresses == (ip("10.77.1.5"),)


# ------------------------------------------------------------------ cutting connections

W, D, X = ip("10.77.9.10"), ip("10.77.9.11"), ip("10.77.9.99")
BLOCK = CutBlock("n1", 7, frozenset({W}), frozenset({D}))


class FakeConntrack:
    def __init__(self, flows: set[tuple[Any, Any]]) -> None:
        self.table = set(flows)
        self.deleted: list[tuple[Any, Any]] = []

    def flows(self, version: int) -> set[tuple[Any, Any]]:
        return {f for f in self.table if f[0].version == version}

    def delete(self, src: Any, dst: Any) -> int:
        self.deleted.append((src, dst))
        gone = {f for f in self.table if f == (src, dst)}
        self.table -= gone
        return len(gone)


def test_nft_cut_deletes_only_the_flows_named() -> None:
    ct = FakeConntrack({(W, D), (D, W), (X, D), (W, X)})
    be = NftBackend(FakeNft(), table="t", conntrack=ct)  # type: ignore[arg-type]
    assert be.cut("br-x", [BLOCK]) == 1
    assert ct.deleted == [(W, D)]
    assert ct.table == {(D, W), (X, D), (W, X)}


def test_ovs_conntrack_dump_parsed_and_flushed_by_full_tuple() -> None:
    dump = (
        "tcp,orig=(src=10.77.9.10,dst=10.77.9.11,sport=40000,dport=8080),reply=(src=10.77.9"
        ".11,dst=10.77.9.10,sport=8080,dport=40000),zone=7,protoinfo=(state=ESTABLISHED)\n"
        "icmp,orig=(src=10.77.9.10,dst=10.77.9.11,id=9,type=8,code=0),reply=(src=10.77.9.11"
        ",dst=10.77.9.10,id=9,type=0,code=0),zone=7\n"
        "udp,orig=(src=10.77.9.99,dst=10.77.9.11,sport=5,dport=53),reply=(...),zone=7\n"
        "tcp,orig=(src=fd00::1,dst=fd00::2,sport=1,dport=2),reply=(...),zone=7\n"
        "garbage line\n")
    conns = parse_conntrack(dump)
    assert [c.tuple() for c in conns] == [
        "ct_nw_src=10.77.9.10,ct_nw_dst=10.77.9.11,ct_nw_proto=6,ct_tp_src=40000,"
        "ct_tp_dst=8080",
        "ct_nw_src=10.77.9.10,ct_nw_dst=10.77.9.11,ct_nw_proto=1,icmp_id=9,icmp_type=8,"
        "icmp_code=0",
        "ct_nw_src=10.77.9.99,ct_nw_dst=10.77.9.11,ct_nw_proto=17,ct_tp_src=5,ct_tp_dst=53",
        "ct_ipv6_src=fd00::1,ct_ipv6_dst=fd00::2,ct_nw_proto=6,ct_tp_src=1,ct_tp_dst=2"]

    class Of(FakeOfctl):
        forgotten: list[tuple[int, Connection]] = []

        def connections(self, zone: int) -> list[Connection]:
            return conns if zone == 7 else []

        def forget(self, zone: int, conn: Connection) -> bool:
            self.forgotten.append((zone, conn))
            return True

    of = Of()
    be = OpenFlowBackend(of, cookie_tag=1)  # type: ignore[arg-type]
    assert be.cut("br-x", [BLOCK, CutBlock("n2", 8, frozenset({X}), frozenset({D}))]) == 2
    assert [c.proto for _, c in of.forgotten] == [6, 1]  # the udp one is of zone 8's block


def test_controller_cuts_after_applying_and_not_in_a_dry_run() -> None:
    nets = {"a": {"subnet": "10.77.1.0/24", "bridge": "br-a",
                  "pool": {"start": "10.77.1.5", "end": "10.77.1.9"}}}

    def state(allow: list[list[str]]) -> Any:
        entries = [KVEntry("p/networks/a", json.dumps(nets["a"]).encode(), 1)]
        for i, (name, g) in enumerate((("w", "web"), ("d", "db"))):
            entries.append(KVEntry(f"p/containers/{name}", json.dumps({"group": g,
                "interfaces": [{"name": "eth1", "network": "a"}]}).encode(), 2 + i))
        entries.append(KVEntry("p/policy", json.dumps({"isolate": ["web", "db"],
                                                         "allow": allow}).encode(), 9))
        st = parse_kv("p/", entries)
        assert st.problems == ()
        return st

    ports = [LocalPort("a", "rv1", "c1", (ip("10.77.1.5"),)),
             LocalPort("a", "rv2", "c2", (ip("10.77.1.6"),))]
    specs = {"c1": "w", "c2": "d"}
    ovs = RecordingBackend("ovs")
    dry = PolicyController([ovs], dry_run=True)
    dry.reconcile(state([]), [], ports, specs)
    assert ovs.cuts == []
    ctl = PolicyController([ovs])
    selves = [["web", "web"], ["db", "db"]]
    ctl.reconcile(state([["web", "db"], *selves]), [], ports, specs)
    # First rules of the daemon: what is denied both ways is cut (none here: db -> web
    # is denied but web -> db is allowed).
    assert ovs.cuts == []
    ctl.reconcile(state(selves), [], ports, specs)
    # web -> db is denied now, and so is db -> web still: both ways (db -> web has no
    # connection to cut, it was denied before, but it is cut both ways only now).
    w, d = ip("10.77.1.5"), ip("10.77.1.6")
    assert [(b, sorted((str(*x.sources), str(*x.destinations)) for x in bl))
            for b, bl in ovs.cuts] == [("br-a", [(str(w), str(d)), (str(d), str(w))])]
    ctl.reconcile(state(selves), [], ports, specs)
    assert len(ovs.cuts) == 1  # nothing changed: nothing more to cut
