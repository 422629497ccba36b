"""conntrack adapter: the kernel's connection tracking table, through the `conntrack`
tool (conntrack-tools).

Owns every `conntrack` process reconciler runs (the group policy cuts connections that
became denied on Linux bridges, reconciler.policy.nft). Argument lists, never a shell;
addresses are passed as parsed addresses, never as text from Consul. Works in the
current network namespace. Takes and returns plain values; raises only
`reconciler.errors.FirewallError`.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess

from reconciler.errors import FirewallError

_TIMEOUT = 30.0
_TUPLE_RE = re.compile(r"\bsrc=(\S+) dst=(\S+)")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Conntrack:
    def __init__(self, binary: str = "conntrack", timeout: float = _TIMEOUT) -> None:
        self.binary = binary
        self.timeout = timeout

    def flows(self, version: int) -> set[tuple[Address, Address]]:
        """(original source, original destination) of every tracked connection of one
        IP version."""
        out = self._run(["-L", "-f", "ipv4" if version == 4 else "ipv6"])
        got: set[tuple[Address, Address]] = set()
        for line in out.splitlines():
            m = _TUPLE_RE.search(line)  # the first tuple is the original direction
            if m is None:
                continue
            try:
                got.add((ipaddress.ip_address(m.group(1)), ipaddress.ip_address(m.group(2))))
            except ValueError:
                continue
        return got

    def delete(self, src: Address, dst: Address) -> int:
        """Forget every connection whose original direction is src -> dst; how many."""
        out = self._run(["-D", "-f", "ipv4" if src.version == 4 else "ipv6",
                         "-s", str(src), "-d", str(dst)], none_ok=True)
        m = re.search(r"(\d+) flow entries have been deleted", out)
        return int(m.group(1)) if m else 0

    def _run(self, args: list[str], none_ok: bool = False) -> str:
        argv = [self.binary, *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=self.timeout)
        except FileNotFoundError as exc:
            raise FirewallError(f"{self.binary} is not installed (make deps): {exc}") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FirewallError(f"{' '.join(argv)}: {exc}") from exc
        # conntrack exits 1 when a delete matched nothing ("0 flow entries ...").
        if proc.returncode != 0 and not (none_ok and " 0 flow entries" in proc.stderr):
            err = " ".join(proc.stderr.split())[:500]
            raise FirewallError(f"{' '.join(argv)} exited {proc.returncode}: {err}")
        return proc.stdout + proc.stderr
