"""Unit tests of the daemon's worker count: its default and how it is set."""

from __future__ import annotations

import os

import pytest

from reconciler.cli import build_parser, settings_from
from reconciler.settings import default_workers


@pytest.mark.parametrize(("cpus", "workers"), [(1, 2), (2, 2), (3, 3), (4, 4), (64, 4)])
def test_default_is_one_worker_per_cpu_between_2_and_4(cpus: int, workers: int) -> None:
    assert default_workers(cpus) == workers


def test_default_counts_the_cpus_this_process_may_run_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_workers() == 3


def _settings(argv: list[str]) -> int:
    args = build_parser().parse_args(["run", *argv])
    args.prefix = "reconciler/"
    return settings_from(args).workers


def test_workers_from_the_flag_the_environment_or_the_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECONCILER_WORKERS", raising=False)
    assert _settings(["--node", "h1"]) == default_workers()
    assert _settings(["--node", "h1", "--workers", "3"]) == 3
    monkeypatch.setenv("RECONCILER_WORKERS", "5")
    assert _settings(["--node", "h1"]) == 5
    assert _settings(["--node", "h1", "--workers", "1"]) == 1  # the flag wins


@pytest.mark.parametrize("bad", ["0", "-2", "many", "2.5"])
def test_a_bad_worker_count_is_a_usage_error_naming_the_flag(
        bad: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RECONCILER_WORKERS", bad)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run"])
    assert exc.value.code == 2
    assert "--workers" in capsys.readouterr().err
    monkeypatch.delenv("RECONCILER_WORKERS")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "--workers", bad])
    assert exc.value.code == 2 and "--workers" in capsys.readouterr().err
