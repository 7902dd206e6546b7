"""What the security audit's probes share: results, loopback JSON over WebSockets, waiting."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # measure the code of this checkout, whatever is installed
    sys.path.insert(0, str(ROOT))

Result = dict[str, Any]
WAIT = 5.0  # seconds any single exchange may take before the probe gives up on it
CHALLENGE_WAIT = 0.5  # a rendezvous that sends a challenge sends it at once


def result(finding: int, key: str, value: Any, text: str) -> Result:
    """One measured line."""
    return {"finding": finding, "key": key, "value": value, "text": text}


def not_available(finding: int, key: str, reason: str) -> Result:
    """A line for a probe that could not measure (the reason in one line)."""
    return {"finding": finding, "key": key, "value": None, "text": f"n/a ({reason})"}


def failed(finding: int, key: str, exc: BaseException) -> Result:
    """A line for a probe that raised: the APIs change under the audit, so say what broke."""
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return not_available(finding, key, f"{type(exc).__name__}: {first}")


async def recv_json(ws: Any, wait: float) -> dict[str, Any] | None:
    """The next JSON object from ``ws``; None after ``wait`` s (or for a non-object)."""
    try:
        raw = await asyncio.wait_for(ws.recv(), wait)
    except TimeoutError:
        return None
    msg = json.loads(raw)
    return msg if isinstance(msg, dict) else None


async def settle(cond: Callable[[], bool], limit: float = 1.0, step: float = 0.01) -> None:
    """Wait until ``cond()`` or ``limit`` seconds passed."""
    deadline = time.monotonic() + limit
    while not cond() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls foreign state
        await asyncio.sleep(step)
