"""``Benchmark(worker)``: the benchmark API on a worker, with per-run options.

A thin front for the worker's :class:`~p2plab.aio.bench.extension.BenchmarkExtension`
(``worker.benchmark``): the runs are the extension's, the options (GSO, encryption, flow
control, timeouts) are this object's.  See :mod:`p2plab.aio.bench.runs` for how runs work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from p2plab.aio.bench.common import RTT_SPIN_US, BenchSealer
from p2plab.aio.bench.extension import BenchmarkExtension
from p2plab.aio.bench.runs import RunOptions
from p2plab.errors import P2PLabError
from p2plab.results import BenchResult, RttResult

__all__ = ["Benchmark", "extension_of"]


def extension_of(worker: Any) -> BenchmarkExtension:
    """The benchmark extension of ``worker`` (P2PLabError if it was built without one)."""
    ext = worker.extension(BenchmarkExtension.name)
    if not isinstance(ext, BenchmarkExtension):
        raise P2PLabError("this worker was built without the benchmark extension")
    return ext


class Benchmark:
    """UDP throughput and RTT measurements over ``worker``'s connected peer link."""

    def __init__(
        self,
        worker: Any,
        *,
        gso: bool | None = None,
        timeout_s: float = 10.0,
        encrypt: bool | None = None,
        sealer: BenchSealer | None = None,
        flow_control: bool = True,
    ) -> None:
        """Measure over ``worker``'s link.

        ``gso``: None uses UDP GSO where the kernel has it; False forces plain sends.
        ``encrypt``: None seals benchmark datagrams when the link has an encrypting sealer; True
        requires one (:class:`~p2plab.errors.P2PLabError` otherwise); False is the explicit
        unencrypted mode.  ``sealer``: use this sealer on this worker instead of the link's (the
        peer must hold the matching one).  ``flow_control``: obey the receiver's credit window.
        """
        self.worker = worker
        self.extension = extension_of(worker)
        self.options = RunOptions(
            gso=gso, timeout_s=timeout_s, encrypt=encrypt, flow_control=flow_control
        )
        if sealer is not None:
            self.extension.set_sealer(sealer)

    async def run(
        self,
        duration_s: float = 5.0,
        payload_size: int = 1200,
        rate_mbps: float = 0.0,
        interval_s: float = 1.0,
        direction: str = "send",
        *,
        run_id: int | None = None,
    ) -> BenchResult:
        """One throughput run; returns this side's view with the peer's in ``peer_view``.

        ``direction="send"``: we send, the peer counts; ``"receive"``: the peer sends to us.
        """
        return await self.extension.run(
            duration_s,
            payload_size,
            rate_mbps,
            interval_s,
            direction,
            run_id=run_id,
            options=self.options,
        )

    async def rtt(
        self,
        count: int = 1000,
        payload_size: int = 64,
        timeout_s: float = 1.0,
        *,
        blocking: bool = True,
        busy_poll_us: float = RTT_SPIN_US,
    ) -> RttResult:
        """Ping-pong ``count`` datagrams one at a time (unanswered in ``timeout_s``: lost).

        ``blocking``: both ends wait for the next datagram on the socket itself (in chunks of
        at most 50 ms, yielding to the event loop between them), as sockperf does; False waits
        through the event loop.  Against a peer in this same process both ends use the loop.
        ``busy_poll_us`` (with ``blocking``): both ends read the socket without sleeping for up
        to this long after each datagram before they sleep in ``poll(2)``, so a reply that
        returns within it is measured without the wake-up of a sleeping process (on an idle
        host that wake-up, not the path, is most of a loopback or LAN round trip).  It keeps a
        core busy on each end for the length of the run; 0 sleeps at once, like sockperf's
        default ping-pong (``-F r --nonblocked`` is sockperf's spinning mode).
        """
        return await self.extension.rtt(
            count,
            payload_size,
            timeout_s,
            blocking=blocking,
            busy_poll_us=busy_poll_us,
            options=self.options,
        )

    async def sweep(
        self,
        sizes: Sequence[int] = (64, 512, 1200, 8000),
        duration_s: float = 2.0,
        rate_mbps: float = 0.0,
        interval_s: float = 1.0,
        *,
        progress: bool = True,
    ) -> list[BenchResult]:
        """One run per payload size, with a tqdm progress bar (a widget in notebooks)."""
        return await self.extension.sweep(
            sizes, duration_s, rate_mbps, interval_s, progress=progress, options=self.options
        )

    def stop(self) -> bool:
        """End the running run early; both ends still get their results (False: none ran)."""
        return self.extension.stop()
