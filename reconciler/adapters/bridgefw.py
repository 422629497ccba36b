"""Bridge forwarding adapter: lets frames through the iptables FORWARD chain between the
ports of the Linux bridges reconciler makes.

Why: Docker sets the filter FORWARD policy to DROP and loads br_netfilter
(net.bridge.bridge-nf-call-iptables=1), so frames *bridged* between two containers on a
Linux bridge traverse FORWARD and are dropped; container <-> host is not affected. What
Docker (libnetwork's ``setIcc``) does for its own bridges, we do for ours: one rule per
bridge and address family, inserted at the top of the filter table's FORWARD chain,
matching only frames that enter *and* leave through that bridge (L2 switching, nothing
routed)::

    -I FORWARD -i <bridge> -o <bridge> -m comment --comment reconciler:<bridge>@<node> -j ACCEPT

Owns exactly those rules: the ones whose comment is ``reconciler:<bridge>@<node>`` for
this adapter's node, in the FORWARD chain of ``iptables`` and (when the kernel has IPv6)
``ip6tables``. Nothing else is ever added, changed or deleted: no chain of our own, no
DOCKER-USER, no policy change. Rules are found by their comment, so several daemons (node
names) on one host and everyone else's rules coexist.

- Level-triggered: `ensure` re-reads the chain each call and repairs what is missing or
  duplicated, so it also recovers from Docker restarts (dockerd never flushes FORWARD, it
  only re-inserts its own jumps above ours, which return for our bridges), a flush, or a
  rule deleted by hand. Harmless when Docker is not running or the policy is ACCEPT.
- The same ``iptables`` binary as Docker's (the one on PATH, iptables-nft on Debian 12),
  so the rule lands in the same backend and table as Docker's DROP policy; an accept in a
  separate nft table would not override that drop.
- Commands are argument lists (never a shell) with ``-w`` (the xtables lock); bridge and
  node names are checked against the interface/node name alphabets and only ever passed as
  separate argv items. Raises only `reconciler.errors.FirewallError`.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import threading
from collections.abc import Sequence

from reconciler.errors import FirewallError

log = logging.getLogger(__name__)

CHAIN = "FORWARD"
COMMENT_PREFIX = "reconciler:"
"""Our rules' comment is this prefix + ``<bridge>@<node>``."""

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
_NODE_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}\Z")
_WAIT = ("-w", "10")  # wait up to 10 s for the xtables lock (legacy backend)
_TIMEOUT = 30.0


def default_commands() -> tuple[str, ...]:
    """``iptables``, plus ``ip6tables`` when this kernel has IPv6 (bridged IPv6 frames go
    through ip6tables' FORWARD when bridge-nf-call-ip6tables=1)."""
    if os.path.exists("/proc/net/if_inet6"):
        return ("iptables", "ip6tables")
    return ("iptables",)


class BridgeForwarding:
    """ACCEPT rules in FORWARD for the Linux bridges of one node's daemon."""

    def __init__(self, node: str, commands: Sequence[str] | None = None,
                 timeout: float = _TIMEOUT) -> None:
        if not _NODE_RE.match(node):
            raise FirewallError(f"invalid node name {node!r}")
        self.node = node
        self.commands = tuple(commands) if commands is not None else default_commands()
        self.timeout = timeout
        self._lock = threading.Lock()  # list-then-change is one step per adapter

    # ------------------------------------------------------------------ public

    def comment(self, bridge: str) -> str:
        """The comment that marks our rule for `bridge`."""
        return f"{COMMENT_PREFIX}{_checked(bridge)}@{self.node}"

    def rule(self, bridge: str) -> list[str]:
        """The rule specification (without chain) for `bridge`."""
        return ["-i", bridge, "-o", bridge, "-m", "comment", "--comment",
                self.comment(bridge), "-j", "ACCEPT"]

    def ensure(self, bridge: str) -> bool:
        """Exactly one rule for `bridge` in each family's FORWARD; True if it changed any."""
        spec = self.rule(bridge)
        changed = False
        with self._lock:
            for cmd in self.commands:
                ours = self._ours(cmd, bridge)
                if self._right(cmd, ours, spec):
                    continue
                # Missing, duplicated (e.g. two ensures raced before the lock, or a copy
                # added by hand) or altered: delete every copy, insert the one rule.
                for args in ours:
                    self._delete(cmd, args)
                self._run(cmd, "-I", CHAIN, "1", *spec)
                log.info("%s: %s forwarding rule for bridge %s %s", cmd, self.node, bridge,
                         "repaired" if ours else "added")
                changed = True
        return changed

    def in_place(self, bridge: str) -> bool:
        """Whether `ensure(bridge)` would change nothing (an observation for planning:
        one right rule in every family; `owned` only says that some rule is there)."""
        spec = self.rule(bridge)
        with self._lock:
            return all(self._right(cmd, self._ours(cmd, bridge), spec)
                       for cmd in self.commands)

    def remove(self, bridge: str) -> bool:
        """Delete our rules for `bridge` (all families); True if there were any."""
        self.comment(bridge)  # validates the name
        removed = False
        with self._lock:
            for cmd in self.commands:
                for args in self._ours(cmd, bridge):
                    self._delete(cmd, args)
                    removed = True
        if removed:
            log.info("removed %s forwarding rules for bridge %s", self.node, bridge)
        return removed

    def owned(self) -> list[str]:
        """Bridges that have a rule of this node's daemon in any family, sorted."""
        found: set[str] = set()
        with self._lock:
            for cmd in self.commands:
                for br, _ in self._listed(cmd):
                    found.add(br)
        return sorted(found)

    # ------------------------------------------------------------------ internals

    def _listed(self, cmd: str) -> list[tuple[str, list[str]]]:
        """(bridge, rule args after ``-A FORWARD``) for every rule of this node."""
        out = self._run(cmd, "-S", CHAIN)
        suffix = f"@{self.node}"
        rules: list[tuple[str, list[str]]] = []
        for line in out.splitlines():
            if COMMENT_PREFIX not in line:
                continue
            try:
                words = shlex.split(line)
            except ValueError:  # unbalanced quotes in someone else's comment
                continue
            if words[:2] != ["-A", CHAIN]:
                continue
            for i, w in enumerate(words[:-1]):
                if w != "--comment":
                    continue
                text = words[i + 1]
                if text.startswith(COMMENT_PREFIX) and text.endswith(suffix):
                    br = text[len(COMMENT_PREFIX):-len(suffix)]
                    if _IFNAME_RE.match(br):
                        rules.append((br, words[2:]))
                break
        return rules

    def _ours(self, cmd: str, bridge: str) -> list[list[str]]:
        return [args for br, args in self._listed(cmd) if br == bridge]

    def _right(self, cmd: str, ours: list[list[str]], spec: Sequence[str]) -> bool:
        # One rule with our mark, and it is the rule we mean (-C matches the whole spec).
        return len(ours) == 1 and self._exists(cmd, spec)

    def _exists(self, cmd: str, spec: Sequence[str]) -> bool:
        proc = self._proc(cmd, "-C", CHAIN, *spec)
        if proc.returncode == 0:
            return True
        if proc.returncode == 1:  # "Bad rule (does a matching rule exist in that chain?)"
            return False
        raise FirewallError(_failure(cmd, ("-C", CHAIN, *spec), proc))

    def _delete(self, cmd: str, args: Sequence[str]) -> None:
        proc = self._proc(cmd, "-D", CHAIN, *args)
        if proc.returncode != 0 and self._exists(cmd, args):
            raise FirewallError(_failure(cmd, ("-D", CHAIN, *args), proc))
        # else deleted, or gone meanwhile (someone flushed the chain): either way absent

    def _run(self, cmd: str, *args: str) -> str:
        proc = self._proc(cmd, *args)
        if proc.returncode != 0:
            raise FirewallError(_failure(cmd, args, proc))
        return proc.stdout

    def _proc(self, cmd: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [cmd, *_WAIT, *args]
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=self.timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise FirewallError(f"{cmd} is not installed (make deps): {exc}") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FirewallError(f"{shlex.join(argv)}: {exc}") from exc


def _checked(bridge: str) -> str:
    if not _IFNAME_RE.match(bridge):
        raise FirewallError(f"invalid bridge name {bridge!r}")
    return bridge


def _failure(cmd: str, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> str:
    err = " ".join(line for line in proc.stderr.splitlines()
                   if "legacy tables present" not in line).strip()
    return f"{shlex.join([cmd, *args])} exited {proc.returncode}: {err or proc.stdout.strip()}"
