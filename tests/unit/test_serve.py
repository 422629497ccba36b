"""`--serve`: which services a host's HAProxy serves (issue 9), and which nodes a cutover
waits for."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.cutover import serving
from reconciler.errors import ConfigurationError
from reconciler.settings import parse_serve, serves


def test_parse_serve_patterns_and_refusals() -> None:
    assert parse_serve(None) == ("*",) and parse_serve(" ") == ("*",)
    assert parse_serve("web, api-*") == ("web", "api-*")
    for bad in ("web;rm", "a b", "x,,y", "../etc"):
        with pytest.raises(ConfigurationError, match="--serve"):
            parse_serve(bad)


def test_serves_matches_names_and_shell_patterns() -> None:
    assert serves(("*",), "anything")
    assert serves(("web", "api-*"), "api-v2") and serves(("web",), "web")
    assert not serves(("web", "api-*"), "webx") and not serves(("api-?",), "api-10")


def test_a_cutover_waits_only_for_nodes_serving_the_service() -> None:
    statuses: dict[str, dict[str, Any]] = {
        "all": {"proxy": {"active": {}}},                       # no --serve: every service
        "web-only": {"proxy": {"active": {}, "serves": ["web"]}},
        "api-only": {"proxy": {"active": {}, "serves": ["api-*"]}},
        "no-proxy": {},
    }
    assert set(serving(statuses, "web")) == {"all", "web-only", "no-proxy"}
    assert set(serving(statuses, "api-1")) == {"all", "api-only", "no-proxy"}
