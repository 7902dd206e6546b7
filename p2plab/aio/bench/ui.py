"""The UI's benchmark messages (``start_benchmark``, ``stop_benchmark``; called by
:mod:`p2plab.aio.ui_server`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from p2plab.aio.bench.api import Benchmark, extension_of
from p2plab.core import bench as cb

log = logging.getLogger(__name__)

__all__ = ["start_benchmark_from_ui", "stop_benchmark_from_ui"]


async def start_benchmark_from_ui(worker: Any, msg: dict[str, Any]) -> dict[str, Any] | None:
    """Start a run in the background for a ``start_benchmark`` UI message; error dict or None."""
    try:
        duration = float(msg.get("duration_s", 5))
        size = int(msg.get("payload_size", 1200))
        rate = float(msg.get("rate_mbps", 0) or 0)
        cb.validate_params(size, rate, duration)
    except (TypeError, ValueError) as exc:
        return {"type": "error", "message": f"start_benchmark: {exc}"}
    ext = extension_of(worker)
    # Every path runs (direct, TURN, the relay at its budget: the row names the path).
    if worker.state not in ("connected", "relayed") or ext.host.peer_address is None:
        return {"type": "error", "message": "start_benchmark: no peer connected"}
    driving = ext.driving
    if driving.sending is not None and not driving.sending.done():
        return {"type": "error", "message": "start_benchmark: a benchmark is already running"}

    async def _go() -> None:
        try:
            await Benchmark(worker).run(duration, size, rate)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("benchmark failed: %s", exc)
            worker.publish({"type": "error", "message": f"benchmark failed: {exc}"})

    driving.sending = asyncio.get_running_loop().create_task(_go(), name="benchmark")
    return None


async def stop_benchmark_from_ui(worker: Any) -> dict[str, Any] | None:
    """Stop the running run early (its result is still published); error dict or None."""
    if not extension_of(worker).stop():
        return {"type": "error", "message": "stop_benchmark: no benchmark is running"}
    return None
