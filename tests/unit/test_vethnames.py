"""Unit tests of host veth naming (reconciler.adapters.netlink.host_veth_name)."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.adapters.netlink import (
    InterfaceSpec,
    Route,
    host_veth_name,
    is_owned_host_veth_name,
)
from reconciler.errors import NetlinkError

CID = "3f2a" * 16


def test_deterministic_and_known_value() -> None:
    assert host_veth_name(CID, "eth1") == host_veth_name(CID, "eth1")
    # Pinned: a change of the scheme would orphan every veth already on a host.
    assert host_veth_name("abc", "eth1") == "rv" + hashlib.sha256(b"abc/eth1").hexdigest()[:13]


@given(cid=st.text(min_size=1, max_size=80), ifname=st.text(min_size=1, max_size=15))
def test_shape(cid: str, ifname: str) -> None:
    name = host_veth_name(cid, ifname)
    assert len(name) == 15
    assert name.startswith("rv")
    assert is_owned_host_veth_name(name)


def test_distinct() -> None:
    names = {host_veth_name(f"container-{i}", f"eth{j}") for i in range(500) for j in range(4)}
    assert len(names) == 2000
    # the separator matters: ("a/b", "c") and ("a", "b/c") are different interfaces
    assert host_veth_name("ab", "c") != host_veth_name("a", "bc")


@pytest.mark.parametrize(
    "name", ["eth0", "rv123", "rvXXXXXXXXXXXXX", "rv0123456789abcd", "xv0123456789abc", ""]
)
def test_foreign_names_not_owned(name: str) -> None:
    assert not is_owned_host_veth_name(name)


def test_spec_wanted_routes_adds_default() -> None:
    spec = InterfaceSpec(
        "c",
        "eth1",
        (ipaddress.ip_interface("10.77.1.10/24"),),
        gateway=ipaddress.ip_address("10.77.1.1"),
        routes=(Route(ipaddress.ip_network("10.99.0.0/16"), ipaddress.ip_address("10.77.1.2")),),
    )
    assert spec.wanted_routes() == {
        Route(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("10.77.1.1")),
        Route(ipaddress.ip_network("10.99.0.0/16"), ipaddress.ip_address("10.77.1.2")),
    }
    v6 = InterfaceSpec("c", "eth1", gateway=ipaddress.ip_address("fd77::1"))
    assert v6.wanted_routes() == {
        Route(ipaddress.ip_network("::/0"), ipaddress.ip_address("fd77::1"))
    }


@pytest.mark.parametrize("ifname", ["", "a" * 16, "a/b"])
def test_spec_rejects_bad_ifname(ifname: str) -> None:
    with pytest.raises(NetlinkError):
        InterfaceSpec("c", ifname)


def test_netns_notifications_from_others_are_foreign() -> None:
    """The netns watch ignores notifications our own sockets (or the kernel) caused."""
    import struct

    from reconciler.adapters.netlink import OWN_PORTIDS, _foreign_change

    def msg(pid: int, payload: bytes = b"\0" * 5) -> bytes:
        body = struct.pack("=IHHII", 16 + len(payload), 16, 0, 1, pid) + payload
        return body + b"\0" * (-len(body) % 4)  # NLMSG_ALIGN

    OWN_PORTIDS.add(4242)
    assert not _foreign_change(msg(4242))  # our own change echoing back
    assert not _foreign_change(msg(0))  # the kernel's (carrier, link-local)
    assert not _foreign_change(msg(4242) + msg(0) + msg(4242))
    assert _foreign_change(msg(4242) + msg(31337))  # someone else in the same batch
    assert _foreign_change(struct.pack("=IHHII", 8, 16, 0, 1, 4242))  # malformed: look
