"""Test helpers shared by unit and integration tests.

Owns polling (`wait_for`, used instead of sleeping), the `ContainerFactory` call
signature of the `container_factory` fixture, and detection of the OVS datapath type
this machine supports (`system` needs the kernel module; `netdev` is the userspace
fallback). Import as ``from helpers import wait_for`` (``tests/`` is on sys.path
through the root conftest).
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """`wait_for` gave up: the predicate never returned a truthy value in time."""


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns a truthy value, and return that value.

    The return type drops ``None``/``False`` from the predicate's, so
    ``event = wait_for(lambda: find_event())`` is typed as the event itself.

    Exceptions of the types in `ignore` count as "not yet"; any other exception
    propagates at once. On timeout raise `WaitTimeout` naming `message` (or the
    predicate), the last value returned and the last ignored exception.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last_exc = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            detail = f"last value {last!r}"
            if last_exc is not None:
                detail += f", last error {last_exc!r}"
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what} ({detail})")
        time.sleep(interval)


class ContainerFactory(Protocol):
    """Signature of the `container_factory` fixture (see tests/conftest.py)."""

    def __call__(
        self,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        command: Sequence[str] | str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run a detached `--net none` container from the test image and return it.

        `name` defaults to a unique ``rt-<run_id>-<n>``; `command` defaults to
        ``sleep 3600``; `kwargs` go to ``docker.containers.run``. The container is
        running when this returns and is force-removed at the test's teardown.
        """
        ...


def ovs_vsctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ovs-vsctl --timeout=10 <args>`` and return the completed process."""
    return subprocess.run(
        ["ovs-vsctl", "--timeout=10", *args],
        check=check,
        capture_output=True,
        text=True,
        timeout=30,
    )


def link_exists(name: str) -> bool:
    """True if a network interface called `name` exists in the host namespace."""
    proc = subprocess.run(
        ["ip", "link", "show", "dev", name], capture_output=True, text=True, timeout=10
    )
    return proc.returncode == 0


def detect_ovs_datapath() -> str:
    """Return ``"system"`` if a kernel-datapath bridge works here, else ``"netdev"``.

    Probes with a throwaway bridge; raises `RuntimeError` if neither type yields a
    bridge device.
    """
    for dp_type in ("system", "netdev"):
        probe = f"rtdp{secrets.token_hex(4)}"
        try:
            ovs_vsctl("add-br", probe, "--", "set", "bridge", probe, f"datapath_type={dp_type}")
            try:
                wait_for(partial(link_exists, probe), timeout=2.0, interval=0.05)
            except WaitTimeout:
                continue
            return dp_type
        finally:
            ovs_vsctl("--if-exists", "del-br", probe, check=False)
    raise RuntimeError("OVS: neither a 'system' nor a 'netdev' bridge comes up")
