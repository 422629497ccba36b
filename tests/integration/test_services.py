"""What `make services` (scripts/services.sh) sets up on the host beyond the daemons: the
blackhole routes for the test and benchmark ranges, so that an address of theirs that is
on no bridge a test made never leaves through the default route."""

from __future__ import annotations

import errno
import ipaddress
import json
import secrets
import socket
import subprocess

import pytest

from .daemon_helpers import free_subnet_octets, run

pytestmark = pytest.mark.integration

BLACKHOLES = {"10.77.0.0/16", "198.18.0.0/15"}


def _route_get(addr: str) -> subprocess.CompletedProcess[str]:
    return run(["ip", "-j", "route", "get", addr], check=False)


def _assert_blackholed(addr: str) -> None:
    # An output lookup that ends in a blackhole route fails with EINVAL (it would
    # succeed via the default route without one), and so does a connect() to it.
    got = _route_get(addr)
    assert got.returncode != 0 and "Invalid argument" in got.stderr, (addr, got)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
            pytest.raises(OSError) as info:
        s.connect((addr, 9))
    assert info.value.errno == errno.EINVAL, info.value


def test_blackhole_routes_for_the_test_ranges() -> None:
    routes = json.loads(run(["ip", "-j", "route", "show", "type", "blackhole"]).stdout)
    assert {r["dst"] for r in routes} >= BLACKHOLES, (
        f"{routes}: run `make services` (scripts/services.sh installs them)")


def test_blackhole_catches_only_what_no_more_specific_route_does(
        cleanup_links: list[str]) -> None:
    bridge_octet, probe_octet = free_subnet_octets(2, secrets.randbelow(230))
    _assert_blackholed(f"10.77.{probe_octet}.1")
    _assert_blackholed("198.19.254.77")

    bridge = f"rbh{secrets.token_hex(4)}"
    cleanup_links.append(bridge)
    run(["ip", "link", "add", bridge, "type", "bridge"])
    run(["ip", "addr", "add", f"10.77.{bridge_octet}.1/24", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])
    target = f"10.77.{bridge_octet}.5"
    got = _route_get(target)
    assert got.returncode == 0, got
    (route,) = json.loads(got.stdout)
    assert route["dev"] == bridge and ipaddress.ip_address(route["prefsrc"]) == \
        ipaddress.ip_address(f"10.77.{bridge_octet}.1"), route
    # ...and the rest of the range stays blackholed.
    _assert_blackholed(f"10.77.{probe_octet}.1")
