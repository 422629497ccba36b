"""The policy backend interface: what every kind of bridge's enforcement must do.

Owns the `PolicyBackend` protocol and nothing else. A backend translates the compiled
model (reconciler.policy.compiled) of the bridges of its kind into its data path, owns
only what it created there, and repairs drift: `apply` is level-based (it observes,
compares with what it last installed, and rewrites only on difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from reconciler.policy.compiled import BridgeRules, CutBlock

Denied = dict[tuple[str, str, str], int]
"""(bridge, source group label, destination group label) -> packets denied."""


class PolicyBackend(Protocol):
    kind: str
    """The network driver whose bridges it enforces on (`linux`, `ovs`)."""

    def apply(self, bridges: Sequence[BridgeRules], *, dry_run: bool = False) -> list[str]:
        """Make the data path of these bridges (all bridges of this kind that need
        rules; the others lose ours) equal to the rules; what changed (or would)."""
        ...

    def denied(self) -> Denied:
        """Packets denied so far (monotonic across rule replacements)."""
        ...

    def cut(self, bridge: str, blocks: Sequence[CutBlock]) -> int:
        """Forget the tracked connections of `bridge`'s networks that `blocks` name
        (their original direction), so their replies no longer pass; how many."""
        ...
