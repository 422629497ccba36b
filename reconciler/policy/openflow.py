"""The Open vSwitch policy backend: OpenFlow flows of our own cookie, OVS conntrack.

Owns the flows whose cookie is this node's (COOKIE with the node's tag) under
COOKIE_MASK on the bridges of `ovs`
networks, nothing else: the bridge's own `priority=0 actions=NORMAL` stays, and every
flow of ours ends in NORMAL for what the policy does not deny, so forwarding (VLAN
tags, learning) is unchanged. Filtering happens in the bridge: OVS bypasses a host
veth's own ingress filtering.

Pipeline (table 0 is shared, our flows sit above NORMAL; 60-62 are ours alone):
- table 0, per local container port: only its allocated addresses (IP source, ARP
  sender; IPv6 link-local and unspecified for neighbour discovery) and, when known, its
  MAC leave it (else drop); its IP packets get the network's zone in reg6 and go on to
  60 (only on a bridge where some local port is isolated; elsewhere to NORMAL). IP from
  any other port (gateway, tunnel) goes to 60 too.
- 60, destination: an isolated local address loads its group id into reg5 (and its
  network's zone into reg6 when unknown); every IP packet goes through conntrack in the
  zone reg6 (`ct(table=61)`).
- 61: destinations not isolated (reg5=0): committed and forwarded; replies and related
  packets of tracked connections: forwarded; otherwise the source address is classified
  into reg7 (a group id, else `external`), on to 62.
- 62: allowed (source, destination) pairs are committed and forwarded; denied pairs are
  dropped by one flow each, whose cookie's low bits number it: its packet count is the
  metric. Every original-direction packet is judged, so a policy change cuts a
  now-denied connection at once. When the pair is denied both ways, its connections
  are also forgotten one by one (`cut`: dump the zone, flush each by its tuple), so
  their replies stop too; a whole zone is never flushed (connections that stay allowed
  would lose their state).

Each bridge's flows are replaced in one bundle when they differ from what the last
install left (a dump taken right after it), which also repairs flows deleted by hand.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence

from reconciler.adapters.openflow import OpenFlow
from reconciler.model import EXTERNAL, IPAddress
from reconciler.policy.base import Denied
from reconciler.policy.compiled import BridgeRules, CutBlock, PortRules, group_label

log = logging.getLogger(__name__)

COOKIE = 0x7263_0000_0000_0000  # "rc" in the high 16 bits, then the node's tag
COOKIE_MASK = 0xFFFF_FFFF_0000_0000
T_DST, T_CT, T_PAIR = 60, 61, 62
EXTERNAL_ID = 0xFFFF
_CT_ZONE = "zone=NXM_NX_REG6[0..15]"
_EMPTY = "empty"


def _ip(a: IPAddress, field: str) -> str:
    """`ip,nw_src=A` / `ipv6,ipv6_src=A` for field `src` or `dst`."""
    return f"ip,nw_{field}={a}" if a.version == 4 else f"ipv6,ipv6_{field}={a}"


class OpenFlowBackend:
    kind = "ovs"

    def __init__(self, ofctl: OpenFlow, cookie_tag: int = 0x6E70) -> None:
        self._of = ofctl
        self.cookie = COOKIE | ((cookie_tag & 0xFFFF) << 32)
        self._lock = threading.Lock()
        self._installed: dict[str, str] = {}  # bridge -> digest of want + dump after
        self._labels: dict[str, dict[int, tuple[str, str, str]]] = {}  # bridge -> cookie
        self._base: dict[tuple[str, str, str], int] = {}

    # ------------------------------------------------------------------ build

    def flows(self, b: BridgeRules) -> tuple[list[str], dict[int, tuple[str, str, str]]]:
        """The flows of one bridge, and the labels of each counting (deny) flow."""
        c = f"cookie={self.cookie:#x}"
        out: list[str] = []
        labels: dict[int, tuple[str, str, str]] = {}
        zones = {n.network: n.zone for n in b.networks}
        for p in b.ports:
            out += self._port(c, p, zones.get(p.network, 0), b.enforcing)
        if not b.enforcing:
            return out, labels
        out.append(f"{c},table=0,priority=100,ip,actions=resubmit(,{T_DST})")
        out.append(f"{c},table=0,priority=100,ipv6,actions=resubmit(,{T_DST})")
        for l3 in ("ip", "ipv6"):  # conntrack needs an L3 match
            out.append(f"{c},table={T_DST},priority=0,{l3},actions=ct(table={T_CT},"
                       f"{_CT_ZONE})")
            out.append(f"{c},table={T_CT},priority=300,reg5=0,{l3},actions=ct(commit,"
                       f"{_CT_ZONE}),NORMAL")
        out.append(f"{c},table={T_CT},priority=250,ct_state=+trk+rpl,actions=NORMAL")
        out.append(f"{c},table={T_CT},priority=250,ct_state=+trk+rel,actions=NORMAL")
        out.append(f"{c},table={T_CT},priority=100,actions=load:{EXTERNAL_ID:#x}->"
                   f"NXM_NX_REG7[],resubmit(,{T_PAIR})")
        out.append(f"{c},table={T_PAIR},priority=0,actions=drop")
        first_dst: set[str] = set()
        for n in b.networks:
            ids = {g: i + 1 for i, g in enumerate(sorted(set(n.sources) | set(n.isolated)))}
            ids[EXTERNAL] = EXTERNAL_ID
            z = n.zone
            for d, addrs in sorted(n.isolated.items()):
                for a in addrs:
                    load = f"load:{ids[d]}->NXM_NX_REG5[]"
                    out.append(f"{c},table={T_DST},priority=200,reg6={z},{_ip(a, 'dst')},"
                               f"actions={load},ct(table={T_CT},{_CT_ZONE})")
                    if str(a) not in first_dst:  # from the gateway or a tunnel: reg6=0
                        first_dst.add(str(a))
                        out.append(f"{c},table={T_DST},priority=200,reg6=0,{_ip(a, 'dst')},"
                                   f"actions=load:{z}->NXM_NX_REG6[],{load},"
                                   f"ct(table={T_CT},{_CT_ZONE})")
            for s, addrs in sorted(n.sources.items()):
                for a in addrs:
                    out.append(f"{c},table={T_CT},priority=200,reg6={z},{_ip(a, 'src')},"
                               f"actions=load:{ids[s]}->NXM_NX_REG7[],resubmit(,{T_PAIR})")
            for s, d in sorted(n.allowed):
                if s in ids:
                    for l3 in ("ip", "ipv6"):
                        out.append(f"{c},table={T_PAIR},priority=200,{l3},reg6={z},"
                                   f"reg5={ids[d]},reg7={ids[s]},actions=ct(commit,"
                                   f"{_CT_ZONE}),NORMAL")
            for s, d in n.denied():
                cookie = self.cookie | (len(labels) + 1)
                labels[cookie] = (b.bridge, group_label(s), d)
                out.append(f"cookie={cookie:#x},table={T_PAIR},priority=100,reg6={z},"
                           f"reg5={ids[d]},reg7={ids[s]},actions=drop")
        return out, labels

    def _port(self, c: str, p: PortRules, zone: int, enforcing: bool) -> list[str]:
        m = f"{c},table=0,in_port={p.port}" + (f",dl_src={p.mac}" if p.mac else "")
        onward = f"load:{zone}->NXM_NX_REG6[],resubmit(,{T_DST})" if enforcing \
            else "NORMAL"
        out = [f"{c},table=0,priority=290,in_port={p.port},actions=drop"]
        for a in p.addresses:
            out.append(f"{m},priority=300,{_ip(a, 'src')},actions={onward}")
            if a.version == 4:
                out.append(f"{m},priority=300,arp,arp_spa={a},actions=NORMAL")
        out.append(f"{m},priority=300,ipv6,ipv6_src=fe80::/10,actions=NORMAL")
        out.append(f"{m},priority=300,ipv6,ipv6_src=::,actions=NORMAL")
        return out

    # ------------------------------------------------------------------ apply

    def apply(self, bridges: Sequence[BridgeRules], *, dry_run: bool = False) -> list[str]:
        changes: list[str] = []
        with self._lock:
            for b in bridges:
                flows, labels = self.flows(b)
                if not flows and self._installed.get(b.bridge) == _EMPTY:
                    continue  # seen without flows of ours, none installed since
                want = hashlib.sha256("\n".join(flows).encode()).hexdigest()
                now = self._of.dump(b.bridge, self.cookie, COOKIE_MASK)
                if now is None:
                    continue  # no bridge (yet): the network's reconcile makes it
                seen = hashlib.sha256("\n".join(now).encode()).hexdigest()
                if not flows and not now:
                    self._installed[b.bridge] = _EMPTY
                    continue
                if self._installed.get(b.bridge) == f"{want}/{seen}":
                    continue
                what = (f"{b.bridge}: {len(flows)} flow(s), {len(b.ports)} port(s)"
                        if flows else f"{b.bridge}: flows removed")
                changes.append(f"policy openflow: {what}")
                if dry_run:
                    continue
                self._fold(b.bridge)
                self._of.replace(b.bridge, self.cookie, COOKIE_MASK, flows)
                self._labels[b.bridge] = labels
                after = self._of.dump(b.bridge, self.cookie, COOKIE_MASK) or []
                self._installed[b.bridge] = \
                    f"{want}/{hashlib.sha256(chr(10).join(after).encode()).hexdigest()}"
                log.info("policy: openflow %s", what)
        return changes

    def _fold(self, bridge: str) -> None:
        got = self._of.packets(bridge, self.cookie, COOKIE_MASK) or {}
        for cookie, packets in got.items():
            key = self._labels.get(bridge, {}).get(cookie)
            if key is not None:
                self._base[key] = self._base.get(key, 0) + packets

    def cut(self, bridge: str, blocks: Sequence[CutBlock]) -> int:
        """Per network zone: one dump of the datapath's connections, then one flush per
        connection found, by its full tuple (OVS 3.1 flushes one connection only that
        way; a zone flush would also forget connections that stay allowed)."""
        n = 0
        for zone in sorted({b.zone for b in blocks}):
            mine = [b for b in blocks if b.zone == zone]
            for conn in self._of.connections(zone):
                if any(b.matches(conn.src, conn.dst) for b in mine):
                    n += self._of.forget(zone, conn)
        if n:
            log.info("policy: %s: cut %d connection(s) now denied", bridge, n)
        return n

    def denied(self) -> Denied:
        with self._lock:
            out = dict(self._base)
            for bridge, labels in self._labels.items():
                got = self._of.packets(bridge, self.cookie, COOKIE_MASK) or {}
                for cookie, packets in got.items():
                    key = labels.get(cookie)
                    if key is not None:
                        out[key] = out.get(key, 0) + packets
        return out
