"""Shared test settings.

``TIMEOUT_UNIT`` scales every test timeout (one constant instead of scattered sleeps); raise it on
a slow machine with ``P2PLAB_TIMEOUT_UNIT=2``.
"""

from __future__ import annotations

import os

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
