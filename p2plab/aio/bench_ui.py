"""The UI and command-line entry points of :mod:`p2plab.aio.bench` (re-exported there)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from p2plab.core import bench as cb

if TYPE_CHECKING:
    from p2plab.aio.worker import Worker

log = logging.getLogger(__name__)

__all__ = ["register_cli", "start_benchmark_from_ui", "stop_benchmark_from_ui"]


# -- UI entry points (called by p2plab.server.worker_app) --------------------------------------


async def start_benchmark_from_ui(worker: Worker, msg: dict[str, Any]) -> dict[str, Any] | None:
    """Start a run in the background for a ``start_benchmark`` UI message; error dict or None."""
    from p2plab.aio.bench import Benchmark
    from p2plab.aio.bench_state import _BenchState

    try:
        duration = float(msg.get("duration_s", 5))
        size = int(msg.get("payload_size", 1200))
        rate = float(msg.get("rate_mbps", 0) or 0)
        cb.validate_params(size, rate, duration)
    except (TypeError, ValueError) as exc:
        return {"type": "error", "message": f"start_benchmark: {exc}"}
    if worker.state == "relayed":
        return {
            "type": "error",
            "message": "start_benchmark: the link is relayed through the rendezvous; "
            "benchmarks need a direct path",
        }
    if worker.state != "connected" or worker.punch is None:
        return {"type": "error", "message": "start_benchmark: no peer connected"}
    state = _BenchState.of(worker)
    if state.sending is not None and not state.sending.done():
        return {"type": "error", "message": "start_benchmark: a benchmark is already running"}

    async def _go() -> None:
        try:
            await Benchmark(worker).run(duration, size, rate)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("benchmark failed: %s", exc)
            worker.publish({"type": "error", "message": f"benchmark failed: {exc}"})

    state.sending = asyncio.get_running_loop().create_task(_go(), name="benchmark")
    return None


async def stop_benchmark_from_ui(worker: Worker) -> dict[str, Any] | None:
    """Stop the running run early (its result is still published); error dict or None."""
    from p2plab.aio.bench_state import _BenchState

    state = _BenchState.of(worker)
    if state.sending is None or state.sending.done():
        if state.receiving is not None:
            state._control({"type": "bench_stop", "run_id": state.receiving.run_id})
            return None
        return {"type": "error", "message": "stop_benchmark: no benchmark is running"}
    state.stop_requested = True  # the sender ends its stream and still collects the report
    return None


# -- command line ------------------------------------------------------------------------------


def register_cli(subparsers: Any) -> None:
    """Add ``p2plab bench`` to the CLI (the command lives in :mod:`p2plab.aio.bench_cli`)."""
    from p2plab.aio.bench_cli import register_cli as _register

    _register(subparsers)
