"""nftables adapter: runs `nft` with its JSON API on tables given by the caller.

Owns every `nft` process reconciler runs (the group policy's tables on Linux bridges,
reconciler.policy.nft). Commands are argument lists, never a shell; rule sets go in as
one JSON document on stdin (`nft -j -f -`), so nothing from Consul is ever parsed as nft
syntax: names and addresses are JSON strings, and nft applies the whole document as one
transaction (all of it or none of it). Reads are `nft -j list ...`. Takes and returns
plain values; raises only `reconciler.errors.FirewallError`.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from typing import Any

from reconciler.errors import FirewallError

_TIMEOUT = 30.0


class Nftables:
    """`nft` in the current network namespace."""

    def __init__(self, binary: str = "nft", timeout: float = _TIMEOUT) -> None:
        self.binary = binary
        self.timeout = timeout

    def apply(self, commands: Sequence[dict[str, Any]]) -> None:
        """Run `commands` (nft JSON commands: {"add": ...}, {"delete": ...}) as one
        transaction."""
        doc = json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}},
                                       *commands]})
        self._run(["-j", "-f", "-"], doc)

    def list_table(self, family: str, name: str) -> list[dict[str, Any]] | None:
        """The table's objects as nft lists them (JSON), or None when it does not exist."""
        try:
            out = self._run(["-j", "list", "table", family, name])
        except FirewallError as e:
            if "No such file or directory" in str(e):
                return None
            raise
        return _objects(out)

    def list_counters(self, family: str, name: str) -> dict[str, int] | None:
        """Named counters of a table: name -> packets (None: no such table)."""
        objs = self.list_table(family, name)
        if objs is None:
            return None
        return {o["counter"]["name"]: int(o["counter"].get("packets", 0))
                for o in objs if "counter" in o}

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        argv = [self.binary, *args]
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  check=False, timeout=self.timeout)
        except FileNotFoundError as exc:
            raise FirewallError(f"{self.binary} is not installed (make deps): {exc}") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FirewallError(f"{' '.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            err = " ".join(proc.stderr.split())[:500]
            raise FirewallError(f"{' '.join(argv)} exited {proc.returncode}: {err}")
        return proc.stdout


def _objects(text: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(text) if text.strip() else {"nftables": []}
    except ValueError as e:
        raise FirewallError(f"nft printed something that is not JSON: {e}") from e
    return [o for o in doc.get("nftables", []) if isinstance(o, dict) and "metainfo" not in o]
