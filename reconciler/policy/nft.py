"""The Linux bridge policy backend: nftables, two tables of our own.

Owns the tables `bridge reconciler` and `inet reconciler` (named after the daemon's
node when several daemons share a host: `reconciler_<n>`), nothing else: no other table,
chain or rule is read for changing, so Docker's and everyone's rules stay as they are.

- `bridge <table>`, hook prerouting: every local container port (its host veth, the
  bridge port) may send only its allocated addresses (IPv4 source and ARP sender; IPv6
  source, or link-local/unspecified for neighbour discovery) and, when known, its MAC.
  The bridge family sees the port; it has no conntrack in this kernel, which it does not
  need here.
- `inet <table>`, hooks forward (bridged frames through br_netfilter, and routed ones)
  and output (the host's own packets): for packets leaving into a bridge
  (`oifname`) towards an isolated group's address: replies and related packets pass
  (conntrack, stateful); every other packet, i.e. the original direction of a
  connection, is dropped when its source group is denied, counted per (source group,
  destination group) in a named counter. Judging every original-direction packet (not
  only `ct state new`) cuts a connection the moment its pair is denied; when the pair is
  denied both ways its conntrack entries are deleted too (`cut`, the conntrack tool),
  so its replies stop as well.

Both tables are replaced in ONE nft transaction (`add table; delete table; add ...`) when
what is installed differs from what the rules say, so there is never a moment without
rules; drift (a rule or set element deleted by hand, a table flushed) is found by
comparing nft's own listing with the listing taken right after our last install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from reconciler.adapters.conntrack import Conntrack
from reconciler.adapters.nftables import Nftables
from reconciler.model import EXTERNAL, IPAddress
from reconciler.policy.base import Denied
from reconciler.policy.compiled import (
    BridgeRules,
    CutBlock,
    NetworkRules,
    PortRules,
    group_label,
)

log = logging.getLogger(__name__)

PRIORITY = -5  # before the filter tables (order does not matter for drops)
ND_TYPES = ["nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit",
            "nd-neighbor-advert"]


def _m(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _pl(proto: str, fld: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": fld}}


def _addrs(addrs: Sequence[IPAddress], version: int) -> list[str]:
    return [str(a) for a in addrs if a.version == version]


class NftBackend:
    kind = "linux"

    def __init__(self, nft: Nftables, table: str = "reconciler",
                 conntrack: Conntrack | None = None) -> None:
        self._nft = nft
        self._ct = conntrack if conntrack is not None else Conntrack()
        self.table = table
        self._lock = threading.Lock()
        self._installed: str | None = None  # digest of nft's listing after our install
        self._counters: dict[str, tuple[str, str, str]] = {}  # counter -> labels
        self._base: dict[tuple[str, str, str], int] = {}  # totals of replaced counters

    # ------------------------------------------------------------------ build

    def ruleset(self, bridges: Sequence[BridgeRules]) -> tuple[list[dict[str, Any]],
                                                                dict[str, tuple[str, str, str]]]:
        """The commands that replace our tables with `bridges`' rules, and the labels of
        each named counter."""
        t = self.table
        cmds: list[dict[str, Any]] = []
        for fam in ("bridge", "inet"):
            cmds += [{"add": {"table": {"family": fam, "name": t}}},
                     {"delete": {"table": {"family": fam, "name": t}}}]
        ports = [p for b in bridges for p in b.ports]
        enforcing = [b for b in bridges if b.enforcing]
        if not ports:
            return cmds, {}
        # --- bridge family: anti-spoofing per port
        cmds.append({"add": {"table": {"family": "bridge", "name": t}}})
        cmds.append({"add": {"chain": {"family": "bridge", "table": t, "name": "ports",
                                       "type": "filter", "hook": "prerouting",
                                       "prio": -200, "policy": "accept"}}})
        vmap: list[Any] = []
        for i, p in enumerate(ports):
            chain = f"p{i}"
            cmds.append({"add": {"chain": {"family": "bridge", "table": t, "name": chain}}})
            cmds += [{"add": {"rule": {"family": "bridge", "table": t, "chain": chain,
                                       "expr": e}}} for e in self._port_rules(p)]
            vmap.append([p.port, {"jump": {"target": chain}}])
        cmds.append({"add": {"rule": {"family": "bridge", "table": t, "chain": "ports",
                                      "expr": [{"vmap": {"key": _meta("iifname"),
                                                         "data": {"set": vmap}}}]}}})
        counters: dict[str, tuple[str, str, str]] = {}
        if not enforcing:
            return cmds, counters
        # --- inet family: isolation, stateful
        cmds.append({"add": {"table": {"family": "inet", "name": t}}})
        for hook in ("forward", "output"):
            cmds.append({"add": {"chain": {"family": "inet", "table": t, "name": hook,
                                           "type": "filter", "hook": hook,
                                           "prio": PRIORITY, "policy": "accept"}}})
        dispatch: list[Any] = []
        for bi, b in enumerate(enforcing):
            chain = f"b{bi}"
            cmds.append({"add": {"chain": {"family": "inet", "table": t, "name": chain}}})
            head = [[_m({"ct": {"key": "direction"}}, "reply"), {"accept": None}],
                    [_m({"ct": {"key": "state"}}, ["related"], "in"), {"accept": None}],
                    [_m(_pl("icmpv6", "type"), {"set": ND_TYPES}), {"accept": None}]]
            cmds += [{"add": {"rule": {"family": "inet", "table": t, "chain": chain,
                                       "expr": e}}} for e in head]
            for ni, n in enumerate(b.networks):
                cmds += self._network(chain, f"{bi}_{ni}", b.bridge, n, counters)
            dispatch.append([b.bridge, {"jump": {"target": chain}}])
        for hook in ("forward", "output"):
            cmds.append({"add": {"rule": {"family": "inet", "table": t, "chain": hook,
                                          "expr": [{"vmap": {"key": _meta("oifname"),
                                                             "data": {"set": dispatch}}}]}}})
        return cmds, counters

    def _port_rules(self, p: PortRules) -> list[list[dict[str, Any]]]:
        drop: dict[str, Any] = {"drop": None}
        out: list[list[dict[str, Any]]] = []
        if p.mac:
            out.append([_m(_pl("ether", "saddr"), p.mac, "!="), drop])
        v4, v6 = _addrs(p.addresses, 4), _addrs(p.addresses, 6)
        if v4:
            out.append([_m(_pl("arp", "saddr ip"), {"set": v4}, "!="), drop])
            out.append([_m(_pl("ip", "saddr"), {"set": v4}, "!="), drop])
        else:
            out.append([_m(_pl("ether", "type"), {"set": ["arp", "ip"]}), drop])
        six: list[Any] = [*v6, {"prefix": {"addr": "fe80::", "len": 10}}, "::"]
        out.append([_m(_pl("ip6", "saddr"), {"set": six}, "!="), drop])
        return out

    def _network(self, chain: str, tag: str, bridge: str, n: NetworkRules,
                 counters: dict[str, tuple[str, str, str]]) -> list[dict[str, Any]]:
        t = self.table
        cmds: list[dict[str, Any]] = []
        src_sets: dict[str, list[tuple[str, str]]] = {}  # group -> [(set, proto)]
        for gi, (g, addrs) in enumerate(sorted(n.sources.items())):
            for v, typ, proto in ((4, "ipv4_addr", "ip"), (6, "ipv6_addr", "ip6")):
                elems = _addrs(addrs, v)
                if not elems:
                    continue
                name = f"s{tag}_{gi}_{v}"
                cmds.append({"add": {"set": {"family": "inet", "table": t, "name": name,
                                             "type": typ, "elem": elems}}})
                src_sets.setdefault(g, []).append((name, proto))
        for di, (d, addrs) in enumerate(sorted(n.isolated.items())):
            target = f"t{tag}_{di}"
            cmds.append({"add": {"chain": {"family": "inet", "table": t, "name": target}}})
            for v, typ, proto in ((4, "ipv4_addr", "ip"), (6, "ipv6_addr", "ip6")):
                elems = _addrs(addrs, v)
                if not elems:
                    continue
                name = f"d{tag}_{di}_{v}"
                cmds.append({"add": {"set": {"family": "inet", "table": t, "name": name,
                                             "type": typ, "elem": elems}}})
                cmds.append({"add": {"rule": {"family": "inet", "table": t, "chain": chain,
                                              "expr": [_m(_pl(proto, "daddr"), f"@{name}"),
                                                       {"jump": {"target": target}}]}}})
            rules: list[list[dict[str, Any]]] = []
            for s, d2 in n.denied():
                if d2 != d or s == EXTERNAL:
                    continue
                cname = f"c{tag}_{di}_{len(counters)}"
                counters[cname] = (bridge, group_label(s), d)
                cmds.append({"add": {"counter": {"family": "inet", "table": t,
                                                 "name": cname}}})
                for name, proto in src_sets.get(s, []):
                    rules.append([_m(_pl(proto, "saddr"), f"@{name}"), {"counter": cname},
                                  {"drop": None}])
            for s in sorted(n.sources):
                if (s, d) in n.allowed:
                    for name, proto in src_sets.get(s, []):
                        rules.append([_m(_pl(proto, "saddr"), f"@{name}"), {"accept": None}])
            if (EXTERNAL, d) not in n.allowed:
                cname = f"c{tag}_{di}_{len(counters)}"
                counters[cname] = (bridge, EXTERNAL, d)
                cmds.append({"add": {"counter": {"family": "inet", "table": t,
                                                 "name": cname}}})
                rules.append([{"counter": cname}, {"drop": None}])
            cmds += [{"add": {"rule": {"family": "inet", "table": t, "chain": target,
                                       "expr": e}}} for e in rules]
        return cmds

    # ------------------------------------------------------------------ apply

    def _listing(self) -> str:
        """A digest of our tables as nft lists them, without handles and counter values."""
        parts = []
        for fam in ("bridge", "inet"):
            objs = self._nft.list_table(fam, self.table)
            parts.append(json.dumps(_strip(objs), sort_keys=True))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def apply(self, bridges: Sequence[BridgeRules], *, dry_run: bool = False) -> list[str]:
        cmds, counters = self.ruleset(bridges)
        want = hashlib.sha256(json.dumps(cmds, sort_keys=True).encode()).hexdigest()
        with self._lock:
            empty = not any(b.ports for b in bridges)
            if empty and self._installed == _ABSENT:
                return []  # seen absent, nothing installed since: no nft process at all
            current = self._listing()
            if empty and current == _ABSENT:
                self._installed = _ABSENT
                return []
            if self._installed == f"{want}/{current}":
                return []
            what = self._describe(bridges) if not empty else "rules removed"
            if dry_run:
                return [f"policy nftables: {what}"]
            self._fold_counters()
            self._nft.apply(cmds)
            self._counters = counters
            self._installed = f"{want}/{self._listing()}"
        log.info("policy: nftables %s", what)
        return [f"policy nftables: {what}"]

    def _describe(self, bridges: Sequence[BridgeRules]) -> str:
        ports = sum(len(b.ports) for b in bridges)
        iso = sum(len(n.isolated) for b in bridges for n in b.networks)
        names = ", ".join(b.bridge for b in bridges)
        return f"{names}: {ports} port(s), {iso} isolated group(s)"

    def _fold_counters(self) -> None:
        """Before a replace: what the counters counted goes into the base totals."""
        got = self._nft.list_counters("inet", self.table) or {}
        for name, packets in got.items():
            key = self._counters.get(name)
            if key is not None:
                self._base[key] = self._base.get(key, 0) + packets

    def cut(self, bridge: str, blocks: Sequence[CutBlock]) -> int:
        """The kernel's table is the host's (br_netfilter tracks bridged packets in it,
        without zones): one listing per IP version, then one delete per (source,
        destination) pair found. Overlapping subnets on two bridges share it: a flow of
        the other bridge with the very same addresses is forgotten too, and picked up
        again by its next packet (its own rules judge it)."""
        found: set[tuple[IPAddress, IPAddress]] = set()
        for version in sorted({a.version for b in blocks for a in b.destinations}):
            found |= {(s, d) for s, d in self._ct.flows(version)
                      if any(b.matches(s, d) for b in blocks)}
        n = sum(self._ct.delete(s, d) for s, d in sorted(found, key=str))
        if n:
            log.info("policy: %s: cut %d connection(s) now denied", bridge, n)
        return n

    def denied(self) -> Denied:
        with self._lock:
            out = dict(self._base)
            got = self._nft.list_counters("inet", self.table) or {}
            for name, packets in got.items():
                key = self._counters.get(name)
                if key is not None:
                    out[key] = out.get(key, 0) + packets
        return out


_ABSENT = hashlib.sha256("\n".join(["null", "null"]).encode()).hexdigest()


def _strip(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in ("handle", "packets", "bytes")}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o
