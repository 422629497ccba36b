"""VXLAN tunnel devices and their static forwarding entries, through netlink (pyroute2).

Owns, in the host's network namespace: kernel `vxlan` devices reconciler made (ifalias
``reconciler:<network>@<node>``), and on each the remote endpoints programmed from
Consul — one FDB entry (MAC -> remote host) and one permanent neighbour entry (IP ->
MAC, answered locally by the device's ARP proxy) per remote endpoint. Learning is off
and there is no all-zeros FDB entry, so nothing is ever flooded to every host. Takes
and returns plain values; called rarely (per overlay change, not per packet), so the
convenience of pyroute2 is worth its cost here — except `owned`, which every sweep calls
and which lists every link of the host (hundreds of veths): it reads them through the
lean client of `reconciler.adapters.rtnl` (pyroute2 decoded 1,000 links in ~150 ms).
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as Pyroute2Error

from reconciler.adapters.rtnl import Rtnl
from reconciler.errors import NetlinkError

OWNER_ALIAS = "reconciler:"
NUD_PERMANENT = 0x80
AF_INET = 2


@dataclass(frozen=True)
class VxlanSpec:
    name: str
    vni: int
    port: int
    local: str
    mtu: int
    alias: str  # reconciler:<network>@<node>


@dataclass(frozen=True)
class Peer:
    """A remote endpoint: its overlay address and MAC, and the host it is behind."""

    ip: str
    mac: str
    host: str


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    try:
        yield
    except (Pyroute2Error, OSError) as e:
        raise NetlinkError(f"{what}: {e}") from e


class VxlanAdapter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ipr: Any = None
        self._rtnl: Rtnl | None = None

    def _api(self) -> Any:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        with self._lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None

    def _index(self, name: str) -> int | None:
        found = self._api().link_lookup(ifname=name)
        return int(found[0]) if found else None

    def observe(self, name: str) -> VxlanSpec | None:
        """The device as it is (None: absent or not a vxlan device)."""
        with self._lock, _translate(f"read vxlan {name}"):
            idx = self._index(name)
            if idx is None:
                return None
            link = self._api().get_links(idx)[0]
            info = link.get_attr("IFLA_LINKINFO")
            if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
                return None
            data = info.get_attr("IFLA_INFO_DATA")
            return VxlanSpec(name, int(data.get_attr("IFLA_VXLAN_ID")),
                             int(data.get_attr("IFLA_VXLAN_PORT")),
                             str(data.get_attr("IFLA_VXLAN_LOCAL")),
                             int(link.get_attr("IFLA_MTU")),
                             str(link.get_attr("IFLA_IFALIAS") or ""))

    def is_up(self, name: str) -> bool:
        with self._lock, _translate(f"read vxlan {name}"):
            idx = self._index(name)
            if idx is None:
                return False
            return bool(self._api().get_links(idx)[0]["flags"] & 1)

    def ensure(self, spec: VxlanSpec) -> list[str]:
        """Create (or re-create, when VNI, port or local address differ) and bring up."""
        changes: list[str] = []
        current = self.observe(spec.name)
        with self._lock, _translate(f"ensure vxlan {spec.name}"):
            api = self._api()
            if current is not None and (current.vni, current.port, current.local) != (
                    spec.vni, spec.port, spec.local):
                api.link("del", index=self._index(spec.name))
                changes.append("re-created")
                current = None
            if current is None and self._index(spec.name) is not None:
                raise NetlinkError(f"{spec.name} exists and is not a vxlan device")
            if current is None:
                api.link("add", ifname=spec.name, kind="vxlan", vxlan_id=spec.vni,
                         vxlan_port=spec.port, vxlan_local=spec.local, vxlan_learning=0,
                         vxlan_proxy=1)
                changes.append("created")
            idx = self._index(spec.name)
            link = api.get_links(idx)[0]
            if link.get_attr("IFLA_MTU") != spec.mtu:
                api.link("set", index=idx, mtu=spec.mtu)
                changes.append("mtu")
            if (link.get_attr("IFLA_IFALIAS") or "") != spec.alias:
                api.link("set", index=idx, ifalias=spec.alias)
            if not link["flags"] & 1:
                api.link("set", index=idx, state="up")
                changes.append("up")
        return changes

    def delete(self, name: str) -> bool:
        with self._lock, _translate(f"delete vxlan {name}"):
            idx = self._index(name)
            if idx is None:
                return False
            self._api().link("del", index=idx)
            return True

    def owned(self, node: str) -> dict[str, str]:
        """{device: network} of vxlan devices this node's daemon made."""
        out: dict[str, str] = {}
        with self._lock, _translate("list vxlan devices"):
            if self._rtnl is None:
                self._rtnl = Rtnl()
            for link in self._rtnl.links(kind="vxlan"):
                alias = link.alias or ""
                if link.kind != "vxlan" or not alias.startswith(OWNER_ALIAS):
                    continue
                net, _, who = alias[len(OWNER_ALIAS):].rpartition("@")
                if who == node and net:
                    out[link.name] = net
        return out

    def peers(self, name: str) -> set[Peer]:
        """The remote endpoints programmed on the device: FDB entries with a remote
        host, joined with the permanent neighbour entries of the same MAC."""
        with self._lock, _translate(f"read peers of {name}"):
            api = self._api()
            idx = self._index(name)
            if idx is None:
                return set()
            hosts: dict[str, str] = {}
            for m in api.fdb("dump", ifindex=idx):
                dst = m.get_attr("NDA_DST")
                mac = m.get_attr("NDA_LLADDR")
                if dst and mac and mac != "00:00:00:00:00:00" and m["ifindex"] == idx:
                    hosts[str(mac)] = str(dst)
            out: set[Peer] = set()
            neigh_macs: set[str] = set()
            for m in api.neigh("dump", ifindex=idx, family=AF_INET):
                ip, mac = m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR")
                if ip and mac and m["ifindex"] == idx:
                    neigh_macs.add(str(mac))
                    out.add(Peer(str(ip), str(mac), hosts.get(str(mac), "")))
            # An FDB entry without its neighbour entry is a peer to repair too.
            out |= {Peer("", mac, host) for mac, host in hosts.items() if mac not in neigh_macs}
            return out

    def set_peers(self, name: str, add: Iterable[Peer], remove: Iterable[Peer]) -> None:
        """Remove, then add (replace) peers' FDB and neighbour entries."""
        with self._lock, _translate(f"program peers of {name}"):
            api = self._api()
            idx = self._index(name)
            if idx is None:
                raise NetlinkError(f"no vxlan device {name}")
            for p in remove:
                if p.ip:
                    with contextlib.suppress(Pyroute2Error):
                        api.neigh("del", ifindex=idx, dst=p.ip, lladdr=p.mac)
                if p.host:
                    with contextlib.suppress(Pyroute2Error):
                        api.fdb("del", ifindex=idx, lladdr=p.mac, dst=p.host)
            for p in add:
                ipaddress.ip_address(p.ip)  # plain values only: never a name or a flag
                ipaddress.ip_address(p.host)
                # One remote per MAC: whatever pointed elsewhere goes first (a vxlan FDB
                # entry would otherwise keep a list of remotes).
                with contextlib.suppress(Pyroute2Error):
                    api.fdb("del", ifindex=idx, lladdr=p.mac)
                api.fdb("append", ifindex=idx, lladdr=p.mac, dst=p.host)
                api.neigh("replace", ifindex=idx, dst=p.ip, lladdr=p.mac,
                          state=NUD_PERMANENT)


def underlay_mtu(local: str) -> int | None:
    """The MTU of the host link holding address `local` (None: no such address)."""
    with IPRoute() as ipr, _translate(f"find the link of {local}"):
        for a in ipr.get_addr(family=AF_INET):
            if a.get_attr("IFA_ADDRESS") == local:
                links = ipr.get_links(a["index"])
                return int(links[0].get_attr("IFLA_MTU")) if links else None
    return None


def ensure_subnet_source(dev: str, subnet: str, src: str) -> bool:
    """The connected route of `subnet` on `dev` prefers source `src` (the host's own
    overlay address, not the gateway address every host shares, so that replies from
    remote containers come back to this host). True when it changed."""
    with IPRoute() as ipr, _translate(f"route {subnet} dev {dev} src {src}"):
        found = ipr.link_lookup(ifname=dev)
        if not found:
            raise NetlinkError(f"no link {dev}")
        idx = found[0]
        net = ipaddress.ip_network(subnet)
        for r in ipr.get_routes(family=AF_INET, dst=str(net.network_address),
                                dst_len=net.prefixlen, table=254):
            if r.get_attr("RTA_OIF") == idx and r.get_attr("RTA_PREFSRC") == src:
                return False
        ipr.route("replace", dst=str(net), oif=idx, prefsrc=src, scope=253, proto=2,
                  table=254)
        return True
