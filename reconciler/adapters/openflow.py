"""OpenFlow adapter: runs `ovs-ofctl` and `ovs-appctl` for flows of our own cookie.

Owns every `ovs-ofctl`/`ovs-appctl` process reconciler runs (the group policy on OVS
bridges, reconciler.policy.openflow). Argument lists, never a shell; flows go in on stdin
as one OpenFlow 1.4 bundle (`--bundle add-flows`), which the switch applies atomically:
all of it or none of it. Only flows whose cookie matches ours under the cookie mask are
ever deleted (`delete cookie=C/M` inside the bundle); flows of anyone else, and the
bridge's own NORMAL flow, are never touched. Takes and returns plain values; raises only
`reconciler.errors.OvsError`.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.errors import OvsError

_TIMEOUT = 30.0
_PROTO = "OpenFlow14"
_COOKIE_RE = re.compile(r"cookie=(0x[0-9a-f]+)")
_PACKETS_RE = re.compile(r"n_packets=(\d+)")
_CT_RE = re.compile(r"^(\w+),orig=\(([^)]*)\)")
_CT_PROTOS = {"tcp": 6, "udp": 17, "sctp": 132, "udplite": 136, "icmp": 1, "icmpv6": 58,
              "icmp6": 58}
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Connection:
    """One entry of the datapath's connection tracker, by its original direction."""

    src: _Address
    dst: _Address
    proto: int
    fields: tuple[tuple[str, int], ...] = ()
    """sport/dport, or id/type/code (ICMP), as OVS prints them."""

    def tuple(self) -> str:
        """The `ct-orig-tuple` of dpctl/flush-conntrack (every field: OVS 3.1 flushes
        one connection by its full tuple)."""
        fam = "nw" if self.src.version == 4 else "ipv6"
        out = [f"ct_{fam}_src={self.src}", f"ct_{fam}_dst={self.dst}",
               f"ct_nw_proto={self.proto}"]
        names = {"sport": "ct_tp_src", "dport": "ct_tp_dst", "id": "icmp_id",
                 "type": "icmp_type", "code": "icmp_code"}
        out += [f"{names[k]}={v}" for k, v in self.fields if k in names]
        return ",".join(out)


def parse_conntrack(text: str) -> list[Connection]:
    """`ovs-appctl dpctl/dump-conntrack` output -> its connections (lines it cannot read
    are skipped)."""
    out: list[Connection] = []
    for line in text.splitlines():
        m = _CT_RE.match(line.strip())
        if m is None or m.group(1) not in _CT_PROTOS:
            continue
        kv = dict(part.split("=", 1) for part in m.group(2).split(",") if "=" in part)
        try:
            src, dst = ipaddress.ip_address(kv.pop("src")), ipaddress.ip_address(kv.pop("dst"))
            fields = tuple((k, int(v)) for k, v in kv.items())
        except (KeyError, ValueError):
            continue
        out.append(Connection(src, dst, _CT_PROTOS[m.group(1)], fields))
    return out


class OpenFlow:
    def __init__(self, timeout: float = _TIMEOUT) -> None:
        self.timeout = timeout

    def replace(self, bridge: str, cookie: int, mask: int, flows: Sequence[str]) -> None:
        """Atomically: delete our flows (cookie/mask) on `bridge`, add `flows`."""
        lines = [f"delete cookie={cookie:#x}/{mask:#x}", *(f"add {f}" for f in flows)]
        self._run("ovs-ofctl", ["-O", _PROTO, "--bundle", "add-flows", bridge, "-"],
                  "\n".join(lines) + "\n")

    def dump(self, bridge: str, cookie: int, mask: int) -> list[str] | None:
        """Our flows on `bridge`, without statistics, sorted (None: no such bridge)."""
        out = self._dump(bridge, cookie, mask, stats=False)
        if out is None:
            return None
        return sorted(line.strip() for line in out.splitlines()
                      if "cookie=" in line)

    def packets(self, bridge: str, cookie: int, mask: int) -> dict[int, int] | None:
        """cookie -> packets of our flows on `bridge` (None: no such bridge)."""
        out = self._dump(bridge, cookie, mask, stats=True)
        if out is None:
            return None
        got: dict[int, int] = {}
        for line in out.splitlines():
            c, p = _COOKIE_RE.search(line), _PACKETS_RE.search(line)
            if c and p:
                got[int(c.group(1), 16)] = got.get(int(c.group(1), 16), 0) + int(p.group(1))
        return got

    def flush_conntrack(self, zone: int) -> None:
        """Forget the datapath's connections of one conntrack zone."""
        self._run("ovs-appctl", ["dpctl/flush-conntrack", f"zone={zone}"])

    def connections(self, zone: int) -> list[Connection]:
        """The datapath's tracked connections in one zone."""
        return parse_conntrack(self._run("ovs-appctl", ["dpctl/dump-conntrack",
                                                        f"zone={zone}"]))

    def forget(self, zone: int, conn: Connection) -> bool:
        """Forget one connection (both directions); False when it was gone already."""
        try:
            self._run("ovs-appctl", ["dpctl/flush-conntrack", f"zone={zone}", conn.tuple()])
        except OvsError as e:
            if "No such file or directory" in str(e):
                return False
            raise
        return True

    def _dump(self, bridge: str, cookie: int, mask: int, stats: bool) -> str | None:
        args = ["-O", _PROTO, "dump-flows", bridge, f"cookie={cookie:#x}/{mask:#x}"]
        if not stats:
            args.insert(2, "--no-stats")
        try:
            return self._run("ovs-ofctl", args)
        except OvsError as e:
            if "is not a bridge" in str(e) or "No such file" in str(e):
                return None
            raise

    def _run(self, cmd: str, args: list[str], stdin: str | None = None) -> str:
        argv = [cmd, *args]
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  check=False, timeout=self.timeout)
        except FileNotFoundError as exc:
            raise OvsError(f"{cmd} is not installed: {exc}") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OvsError(f"{' '.join(argv[:4])}: {exc}") from exc
        if proc.returncode != 0:
            err = " ".join(proc.stderr.split())[:500]
            raise OvsError(f"{' '.join(argv[:5])} exited {proc.returncode}: {err}")
        return proc.stdout
