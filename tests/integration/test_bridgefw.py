"""Integration tests of reconciler.adapters.bridgefw against the real iptables/ip6tables.

Each test uses its own node name and bridge names (``rtf<run_id><x>``, <= 15 characters);
the bridges need not exist for a rule to name them. Rules of "others" (another comment,
another node) are added by the tests themselves, beside ours in the same FORWARD chains,
and everything a test adds is deleted in its teardown by exact rule specification; no
chain is flushed and no policy changed.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
from collections.abc import Callable, Iterator

import pytest

from reconciler.adapters.bridgefw import BridgeForwarding
from reconciler.errors import FirewallError

pytestmark = pytest.mark.integration

_seq = itertools.count()


def ipt(cmd: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cmd, "-w", "10", *args], capture_output=True, text=True,
                          check=check, timeout=30)


def lines_with(cmd: str, comment: str) -> list[str]:
    """`-S FORWARD` lines whose comment is exactly `comment`."""
    found = []
    for line in ipt(cmd, "-S", "FORWARD").stdout.splitlines():
        words = shlex.split(line)
        if "--comment" in words[:-1] and words[words.index("--comment") + 1] == comment:
            found.append(line)
    return found


def accept_spec(bridge: str, comment: str) -> list[str]:
    return ["-i", bridge, "-o", bridge, "-m", "comment", "--comment", comment,
            "-j", "ACCEPT"]


@pytest.fixture
def names(run_id: str) -> Callable[[], str]:
    """Fresh bridge names for this test."""
    return lambda: f"rtf{run_id}{next(_seq)}"


@pytest.fixture
def node(run_id: str) -> str:
    return f"rtnode-{run_id}-{next(_seq)}"


@pytest.fixture
def fws(node: str) -> Iterator[Callable[[str], BridgeForwarding]]:
    """BridgeForwarding per node name; all their rules removed at teardown."""
    made: list[BridgeForwarding] = []

    def make(n: str = node) -> BridgeForwarding:
        fw = BridgeForwarding(n)
        made.append(fw)
        return fw

    yield make
    for fw in made:
        for br in fw.owned():
            fw.remove(br)
        assert fw.owned() == []


@pytest.fixture
def foreign() -> Iterator[Callable[[str, str], None]]:
    """Add a rule of someone else (an ACCEPT for `bridge` with `comment`) to every family's
    FORWARD; each deleted at teardown (tolerating a rule already gone: that is what the
    test then reports)."""
    added: list[tuple[str, list[str]]] = []

    def add(bridge: str, comment: str) -> None:
        for cmd in BridgeForwarding("probe").commands:
            spec = accept_spec(bridge, comment)
            ipt(cmd, "-A", "FORWARD", *spec)
            added.append((cmd, spec))

    yield add
    for cmd, spec in added:
        ipt(cmd, "-D", "FORWARD", *spec, check=False)


def test_both_families_when_the_kernel_has_ipv6() -> None:
    fw = BridgeForwarding("probe")
    want = ("iptables", "ip6tables") if os.path.exists("/proc/net/if_inet6") \
        else ("iptables",)
    assert fw.commands == want


def test_ensure_is_idempotent(fws: Callable[..., BridgeForwarding],
                              names: Callable[[], str]) -> None:
    fw = fws()
    br = names()
    assert fw.ensure(br) is True
    for cmd in fw.commands:
        assert len(lines_with(cmd, fw.comment(br))) == 1
        # Exactly the rule we mean: in, out, comment, ACCEPT.
        assert ipt(cmd, "-C", "FORWARD", *accept_spec(br, fw.comment(br)),
                   check=False).returncode == 0
    assert fw.ensure(br) is False
    assert fw.ensure(br) is False
    for cmd in fw.commands:
        assert len(lines_with(cmd, fw.comment(br))) == 1
    assert fw.owned() == [br]


def test_foreign_rules_survive_ensure_and_remove(
        fws: Callable[..., BridgeForwarding], names: Callable[[], str],
        foreign: Callable[[str, str], None], node: str) -> None:
    fw = fws()
    br = names()
    other_node = f"{node}-other"
    others = [f"someone-else:{br}", f"reconciler:{br}@{other_node}"]
    for comment in others:
        foreign(br, comment)  # same bridge, same chain, same action: only the mark differs

    assert fw.ensure(br) is True
    assert fw.ensure(br) is False  # the foreign rules do not count as ours
    for cmd in fw.commands:
        assert len(lines_with(cmd, fw.comment(br))) == 1
        for comment in others:
            assert len(lines_with(cmd, comment)) == 1, (cmd, comment)
    assert fw.owned() == [br]
    assert BridgeForwarding(other_node).owned() == [br]  # the other node's rule is its own

    assert fw.remove(br) is True
    assert fw.remove(br) is False
    assert fw.owned() == []
    for cmd in fw.commands:
        assert lines_with(cmd, fw.comment(br)) == []
        for comment in others:
            assert len(lines_with(cmd, comment)) == 1, (cmd, comment)


def test_remove_removes_only_that_bridge(fws: Callable[..., BridgeForwarding],
                                         names: Callable[[], str]) -> None:
    fw = fws()
    a, b = names(), names()
    assert fw.ensure(a) and fw.ensure(b)
    assert fw.owned() == sorted([a, b])
    assert fw.remove(a) is True
    assert fw.owned() == [b]
    for cmd in fw.commands:
        assert lines_with(cmd, fw.comment(a)) == []
        assert len(lines_with(cmd, fw.comment(b))) == 1


def test_owned_lists_this_nodes_bridges_only(fws: Callable[..., BridgeForwarding],
                                             names: Callable[[], str], node: str) -> None:
    mine, theirs = fws(), fws(f"{node}-b")
    a, b, c = names(), names(), names()
    mine.ensure(a)
    mine.ensure(b)
    theirs.ensure(c)
    theirs.ensure(a)  # the same bridge, another node: two rules, one each
    assert mine.owned() == sorted([a, b])
    assert theirs.owned() == sorted([a, c])
    mine.remove(a)
    assert theirs.owned() == sorted([a, c])
    for cmd in mine.commands:
        assert len(lines_with(cmd, theirs.comment(a))) == 1


def test_rule_deleted_or_duplicated_by_hand_is_repaired(
        fws: Callable[..., BridgeForwarding], names: Callable[[], str]) -> None:
    fw = fws()
    br = names()
    assert fw.in_place(br) is False
    fw.ensure(br)
    assert fw.in_place(br) is True
    spec = accept_spec(br, fw.comment(br))
    for cmd in fw.commands:
        ipt(cmd, "-D", "FORWARD", *spec)
        assert lines_with(cmd, fw.comment(br)) == []
    assert fw.owned() == []
    assert fw.in_place(br) is False
    assert fw.ensure(br) is True
    assert fw.in_place(br) is True
    # Gone from one family only: still "owned" (a rule is there), but not in place.
    ipt(fw.commands[-1], "-D", "FORWARD", *spec)
    assert fw.owned() == [br]
    assert fw.in_place(br) is (len(fw.commands) == 1)
    assert fw.ensure(br) is True
    for cmd in fw.commands:
        assert len(lines_with(cmd, fw.comment(br))) == 1

    # A second copy (e.g. added by hand) is folded back into one.
    cmd = fw.commands[0]
    ipt(cmd, "-A", "FORWARD", *spec)
    assert len(lines_with(cmd, fw.comment(br))) == 2
    assert fw.in_place(br) is False
    assert fw.ensure(br) is True
    assert len(lines_with(cmd, fw.comment(br))) == 1
    assert fw.ensure(br) is False

    # Our mark on an altered rule (DROP instead of ACCEPT) is replaced by the right one.
    ipt(cmd, "-D", "FORWARD", *spec)
    drop = [*spec[:-1], "DROP"]
    ipt(cmd, "-I", "FORWARD", *drop)
    assert fw.owned() == [br] and fw.in_place(br) is False
    assert fw.ensure(br) is True
    assert ipt(cmd, "-C", "FORWARD", *drop, check=False).returncode == 1
    assert ipt(cmd, "-C", "FORWARD", *spec, check=False).returncode == 0
    assert len(lines_with(cmd, fw.comment(br))) == 1


def test_bad_names_and_a_missing_tool_raise_firewall_error(
        names: Callable[[], str]) -> None:
    fw = BridgeForwarding("probe")
    for bad in ("", "x" * 16, "br 0", "br;rm", "a/b", "br\n0", "ü"):
        with pytest.raises(FirewallError):
            fw.ensure(bad)
        with pytest.raises(FirewallError):
            fw.remove(bad)
    with pytest.raises(FirewallError):
        BridgeForwarding("bad node")
    missing = BridgeForwarding("probe", commands=["/nonexistent/iptables"])
    with pytest.raises(FirewallError, match="not installed"):
        missing.ensure(names())
    with pytest.raises(FirewallError, match="not installed"):
        missing.owned()


def test_a_name_that_looks_like_an_option_stays_an_argument(
        fws: Callable[..., BridgeForwarding], run_id: str) -> None:
    """Linux (and the model) allow a leading '-'; passed as its own argv item after -i/-o
    it is the option's value, never an option."""
    fw = fws()
    br = f"-j{run_id}"
    assert fw.ensure(br) is True
    assert fw.ensure(br) is False
    assert fw.owned() == [br]
    for cmd in fw.commands:
        assert ipt(cmd, "-C", "FORWARD", *accept_spec(br, fw.comment(br)),
                   check=False).returncode == 0
    assert fw.remove(br) is True
    assert fw.owned() == []
