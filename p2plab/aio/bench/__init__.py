"""Benchmarks over a worker's punched link: UDP throughput and RTT (one subpackage).

- :mod:`~p2plab.aio.bench.extension`: :class:`BenchmarkExtension`, the benchmark as a worker
  extension (``worker.benchmark``); every worker built with the defaults has one.
- :mod:`~p2plab.aio.bench.api`: :class:`Benchmark`, ``Benchmark(worker, **options)``.
- :mod:`~p2plab.aio.bench.runs`: the driving end (throughput stream, RTT pinger, sweeps).
- :mod:`~p2plab.aio.bench.answering`: the answering end (receiver, responder, reports).
- :mod:`~p2plab.aio.bench.receiver`, :mod:`~p2plab.aio.bench.rtt`: the data paths.
- :mod:`~p2plab.aio.bench.common`: constants, the sealer protocol, result rows.
- :mod:`~p2plab.aio.bench.ui`, :mod:`~p2plab.aio.bench.cli`: the UI's messages, ``p2plab bench``.

The control protocol itself is sans-I/O, in :mod:`p2plab.core.bench.control`.
"""

from __future__ import annotations

from p2plab.aio.bench.api import Benchmark
from p2plab.aio.bench.common import BenchSealer
from p2plab.aio.bench.extension import BenchmarkExtension
from p2plab.aio.bench.runs import RunOptions
from p2plab.aio.bench.ui import start_benchmark_from_ui, stop_benchmark_from_ui
from p2plab.results import BenchResult, RttResult

__all__ = [
    "BenchResult",
    "BenchSealer",
    "Benchmark",
    "BenchmarkExtension",
    "RttResult",
    "RunOptions",
    "start_benchmark_from_ui",
    "stop_benchmark_from_ui",
]
