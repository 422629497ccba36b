"""Table-driven tests for the group policy in the model: `group` on a container entry,
the `policy` key, state files and the apply order (issue 12)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from reconciler.kvlayout import KeyRef, Layout, classify_key
from reconciler.kvsync import CurrentKey, desired_kv, diff_kv
from reconciler.model import (
    EXTERNAL,
    KVEntry,
    Policy,
    load_state_file,
    parse_kv,
    validate_entries,
)

from .test_model import kv

P = "reconciler/"
NET = {"subnet": "10.77.1.0/24", "bridge": "br-vnet1", "pool": {"start": "10.77.1.100",
                                                                 "end": "10.77.1.200"}}


def box(name: str, group: Any = None) -> tuple[str, Any]:
    spec: dict[str, Any] = {"interfaces": [{"name": "eth1", "network": "n1"}]}
    if group is not None:
        spec["group"] = group
    return f"containers/{name}", spec


def state(policy: Any, *boxes: tuple[str, Any]) -> Any:
    return parse_kv(P, kv(("networks/n1", NET), *boxes, ("policy", policy)))


SEED = {"isolate": ["web", "db"],
        "allow": [["web", "db"], ["web", "web"], ["web", "external"]]}


def test_seed_policy_parses() -> None:
    st = state(SEED, box("web", "web"), box("db", "db"), box("dns", "web"))
    assert st.problems == ()
    assert st.containers["web"].group == "web" and st.containers["dns"].group == "web"
    assert st.policy == Policy(("db", "web"), (("web", "db"), ("web", "external"),
                                               ("web", "web")))
    p = st.policy
    assert p.allows("web", "db") and p.allows("web", "web")
    assert not p.allows("db", "web") and not p.allows(EXTERNAL, "db")
    assert not p.allows(EXTERNAL, "web")  # web is isolated, nothing lets external in
    assert p.allows("db", EXTERNAL) and p.allows("anything", "unlisted")


def test_no_policy_key_isolates_nothing() -> None:
    st = parse_kv(P, kv(("networks/n1", NET), box("web", "web")))
    assert st.problems == () and st.policy == Policy()
    assert st.policy.allows("x", "web")


@pytest.mark.parametrize(("group", "reason"), [
    ("external", "reserved for addresses that are not container interfaces"),
    ("we b", "must be 1-63 characters"),
    ("x" * 64, "must be 1-63 characters"),
    (7, "must be a string, not a number"),
    (["web"], "must be a string, not an array"),
])
def test_bad_group_on_container(group: Any, reason: str) -> None:
    st = parse_kv(P, kv(("networks/n1", NET), box("web", group)))
    assert "web" not in st.containers
    [p] = st.problems
    assert p.key == P + "containers/web" and p.field == "group" and reason in p.reason


@pytest.mark.parametrize(("policy", "field", "reason"), [
    ([], "", "must be a JSON object, not an array"),
    ({"isolate": "web"}, "isolate", "must be an array of group names, not a string"),
    ({"isolate": [3]}, "isolate[0]", "must be a group name, not a number"),
    ({"isolate": ["a b"]}, "isolate[0]", "must be a group name: 1-63"),
    ({"isolate": ["external"]}, "isolate[0]", "'external' has no interfaces to isolate"),
    ({"allow": {"web": "db"}}, "allow", "must be an array of [source, destination] pairs"),
    ({"allow": [["web"]]}, "allow[0]", "must be a pair [source group, destination group]"),
    ({"allow": [["web", "db", "x"]]}, "allow[0]", "must be a pair"),
    ({"allow": ["web"]}, "allow[0]", "must be a pair"),
    ({"allow": [["web", None]]}, "allow[0][1]", "must be a group name, not null"),
    ({"deny": []}, "deny", "unknown field (allowed: allow, isolate)"),
])
def test_malformed_policy_is_invalid(policy: Any, field: str, reason: str) -> None:
    st = state(policy, box("web", "web"), box("db", "db"))
    assert st.policy == Policy()  # a malformed value is not used at all
    assert "web" in st.containers and "db" in st.containers  # nothing else is touched
    assert any(p.key == P + "policy" and p.field == field and reason in p.reason
               for p in st.problems), st.problems


def test_policy_not_json() -> None:
    st = parse_kv(P, kv(("networks/n1", NET), box("web", "web"), ("policy", b"{isolate")))
    [p] = st.problems
    assert p.key == P + "policy" and "invalid JSON" in p.reason
    assert st.policy == Policy()


@pytest.mark.parametrize(("policy", "fields", "kept"), [
    # A typo in a pair: reported, the pair left out, the rest in force.
    ({"isolate": ["db"], "allow": [["web", "db"], ["wbe", "db"]]}, ["allow[1][0]"],
     Policy(("db",), (("web", "db"),))),
    ({"isolate": ["db", "cache"], "allow": [["web", "db"]]}, ["isolate[1]"],
     Policy(("db",), (("web", "db"),))),
    ({"isolate": ["db"], "allow": [["web", "nope"], ["nah", "db"]]},
     ["allow[0][1]", "allow[1][0]"], Policy(("db",), ())),
])
def test_unknown_groups_reported_rest_kept(policy: Any, fields: list[str],
                                           kept: Policy) -> None:
    st = state(policy, box("web", "web"), box("db", "db"))
    got = sorted(p.field for p in st.problems)
    assert got == fields
    assert all(p.key == P + "policy" and "unknown group" in p.reason for p in st.problems)
    assert st.policy == kept


def test_group_of_an_invalid_container_is_unknown() -> None:
    # The db entry is invalid (unknown network): its group is not known either.
    st = parse_kv(P, kv(("networks/n1", NET), box("web", "web"),
                        ("containers/db", {"group": "db", "interfaces": [
                            {"name": "eth1", "network": "nope"}]}),
                        ("policy", {"isolate": ["db", "web"], "allow": [["web", "db"]]})))
    fields = sorted((p.key.rsplit("/", 1)[1], p.field) for p in st.problems)
    assert fields == [("db", "interfaces[0].network"), ("policy", "allow[0][1]"),
                      ("policy", "isolate[0]")]
    assert st.policy == Policy(("web",), ())


def test_duplicates_fold() -> None:
    st = state({"isolate": ["db", "db"], "allow": [["web", "db"], ["web", "db"]]},
               box("web", "web"), box("db", "db"))
    assert st.problems == () and st.policy == Policy(("db",), (("web", "db"),))


# ------------------------------------------------------------------ layout, files


def test_policy_key_in_layout() -> None:
    assert classify_key("policy") == KeyRef("policy", "policy")
    assert "policy" in str(classify_key("policies"))  # the reason names the key
    lay = Layout(P)
    assert lay.policy() == "reconciler/policy"
    assert lay.key(KeyRef("policy", "policy")) == "reconciler/policy"
    assert lay.parse("reconciler/policy") == KeyRef("policy", "policy")
    assert not lay.is_daemon_owned("reconciler/policy")


def test_state_file_carries_policy(tmp_path: Any) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("networks:\n  n1: {subnet: 10.77.1.0/24, bridge: br-x, pool: "
                 "{start: 10.77.1.10, end: 10.77.1.20}}\n"
                 "containers:\n  web: {group: web, interfaces: [{name: eth1, network: n1}]}\n"
                 "  db: {group: db, interfaces: [{name: eth1, network: n1}]}\n"
                 "policy: {isolate: [db], allow: [[web, db], [wbe, db]]}\n")
    entries, probs = load_state_file(str(f))
    assert probs == []
    st = validate_entries(entries, probs)
    assert [str(p) for p in st.problems] == [
        f'{f}: policy: allow[1][0]: unknown group: no containers entry has it (got "wbe")']
    assert st.policy == Policy(("db",), (("web", "db"),))
    kvs = desired_kv(entries, P)
    ref, value = kvs["reconciler/policy"]
    assert ref.kind == "policy"
    assert json.loads(value) == {"isolate": ["db"], "allow": [["web", "db"], ["wbe", "db"]]}


def test_apply_order_policy_after_containers() -> None:
    entries, _ = load_state_file("x.json", json.dumps({
        "networks": {"n1": NET},
        "containers": {"web": {"group": "web", "interfaces": [{"name": "e", "network": "n1"}]}},
        "services": {"s": {"config": {"bind": "127.0.0.1:18080"}}},
        "policy": {"isolate": ["web"]}}))
    changes = diff_kv(desired_kv(entries, P), {}, P, prune=False)
    keys = [c.key for c in changes]
    assert keys.index("reconciler/containers/web") < keys.index("reconciler/policy") \
        < keys.index("reconciler/services/s/config")
    # --prune deletes the policy (a user key) before the containers it names.
    current = {k: CurrentKey(b"{}", 5) for k in keys}
    gone = diff_kv({}, current, P, prune=True)
    order = [c.key for c in gone]
    assert order.index("reconciler/policy") < order.index("reconciler/containers/web")


def test_last_valid_policy_kept_through_the_watch() -> None:
    from reconciler.runtime.kvwatch import snapshot_from

    class Raw:
        def __init__(self, index: int, items: list[KVEntry]) -> None:
            self.index = index
            self.items = {e.key: _Item(e) for e in items}

    good = kv(("networks/n1", NET), box("web", "web"), ("policy", {"isolate": ["web"]}))
    last: dict[str, KVEntry] = {}
    s1 = snapshot_from(P, Raw(5, good), last)
    assert s1.state.policy == Policy(("web",), ())
    bad = kv(("networks/n1", NET), box("web", "web"), ("policy", b"{oops"))
    s2 = snapshot_from(P, Raw(6, bad), last)
    assert s2.state.policy == Policy(("web",), ())  # the typo does not lift the isolation
    assert any("keeping its last valid value" in p.reason for p in s2.state.problems)


class _Item:
    def __init__(self, e: KVEntry) -> None:
        self.key, self.value, self.create_index = e.key, e.value, e.create_index
        self.modify_index, self.session = e.create_index, None
