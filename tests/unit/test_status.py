"""`reconciler status` renders whatever nodes wrote, never crashes on an odd document."""

from __future__ import annotations

from typing import Any

from reconciler.status import NodeStatus, format_table, parse_status


def test_table_from_real_documents() -> None:
    doc = parse_status(NodeStatus("h1", index=42, updated=100.0,
                                  counts={"containers": 3, "interfaces": 4},
                                  errors={"reconciler/networks/x": ["vlan: bad"]},
                                  proxy={"active": {"web": "green"}, "last_reload": "ok"},
                                  address="198.18.0.1").to_json())
    assert doc is not None
    out = format_table({"h1": doc}, now=103.0).splitlines()
    assert out[0].split() == ["NODE", "ADDRESS", "INDEX", "AGE", "CONTAINERS", "INTERFACES",
                              "ERRORS", "ACTIVE", "RELOAD"]
    assert out[1].split() == ["h1", "198.18.0.1", "42", "3s", "3", "4", "1", "web=green", "ok"]
    assert out[2] == "  h1: reconciler/networks/x: vlan: bad"


def test_odd_documents_do_not_crash_the_table() -> None:
    odd: dict[str, dict[str, Any]] = {
        "a": {"updated": "x", "counts": [1], "proxy": "x", "errors": {"k": "v\nforged"}},
        "b": {"errors": [], "proxy": {"active": "web"}}, "c": {}}
    out = format_table(odd, now=0.0)
    assert "forged" in out and "\nforged" not in out  # one line per error
    assert format_table({}) .endswith("(no node has reported status)")
    assert parse_status(b"not json") is None and parse_status(b"[1]") is None


def test_hosts_are_the_live_statuses_with_a_valid_address() -> None:
    from reconciler.kvlayout import KVEntry
    from reconciler.status import hosts_from

    def entry(key: str, doc: Any) -> KVEntry:
        import json
        return KVEntry("p/" + key, json.dumps(doc).encode(), 1, "s")

    items = [entry("nodes/h1/status", {"address": "198.18.0.1"}),
             entry("nodes/h2/status", {"address": "not an address"}),
             entry("nodes/h3/status", {"address": None}),
             entry("nodes/h4/other", {"address": "198.18.0.4"}),
             entry("ipam/n/10.77.0.5", {"address": "198.18.0.5"})]
    assert hosts_from("p/", items) == {"h1": "198.18.0.1"}
