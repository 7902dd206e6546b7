"""Shared test settings.

``TIMEOUT_UNIT`` scales every test timeout (one constant instead of scattered sleeps); raise it on
a slow machine with ``P2PLAB_TIMEOUT_UNIT=2``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

TIMEOUT_UNIT = float(os.environ.get("P2PLAB_TIMEOUT_UNIT", "1"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, what: str) -> None:
    """Skip outside CI when a real part is missing; in CI a missing part is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI (CI=true) but is missing")
    pytest.skip(f"{what} is missing")


async def until(cond: Callable[[], Any], what: str = "a condition", timeout: float = 20.0) -> None:
    """Poll ``cond`` (state no event reports) until it holds; else fail naming ``what``."""
    try:
        async with asyncio.timeout(timeout * TIMEOUT_UNIT):
            while not cond():  # noqa: ASYNC110 - polls state that no event reports
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port, killed afterwards."""
    exe = shutil.which("redis-server")
    require(exe is not None, "redis-server")
    assert exe is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10 * TIMEOUT_UNIT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


# `make test` runs the suite in several processes (pytest-xdist).  Tests that share a
# machine-wide resource run one after another in one process: the kernel lab (each lab has its
# own namespaces, but lab tests measure throughput, loss and punch timing, which a second lab on
# the same two cores would disturb) and headless Chromium (one browser at a time).  Every other
# test is scheduled on its own.  (A scheduler rather than xdist_group marks: pytest 9.2 moved
# the node id that xdist 3.8's loadgroup rewrites, so those marks no longer group anything.)
_SERIAL_GROUPS = {
    "tests/lab/test_lab_": "netns",
    "tests/lab/test_recovery_lab": "netns",
    "tests/ui/test_browser": "browser",
}


def _serial_group(nodeid: str) -> str:
    """The scheduling unit of a test: its group, or the test itself."""
    for prefix, group in _SERIAL_GROUPS.items():
        if nodeid.startswith(prefix):
            return group
    return nodeid


if importlib.util.find_spec("xdist") is not None:
    from xdist.scheduler import LoadScopeScheduling

    class _GroupScheduling(LoadScopeScheduling):
        """LoadScope over :func:`_serial_group`: the groups go whole to one worker, largest
        first, and the rest is balanced test by test."""

        def _split_scope(self, nodeid: str) -> str:
            return _serial_group(nodeid)

    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> _GroupScheduling:
        return _GroupScheduling(config, log)
