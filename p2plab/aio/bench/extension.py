"""The benchmark as a worker extension (``worker.benchmark``).

:class:`BenchmarkExtension` is handed to the worker when it is built (the worker's defaults
include one), so a worker answers benchmarks whatever its process imported.  It claims the
benchmark's control messages, drives the sans-I/O control protocol
(:class:`~p2plab.core.bench.control.BenchControl`: sends what it says with the link's reliable
``send_control``, arms its one timer, dispatches its events), offers the answering end the
datagrams no fast path took, and offers the notebook API::

    result = await worker.benchmark.run(duration_s=1, payload_size=1200, rate_mbps=50)
    rtt = await worker.benchmark.rtt(count=100)

It uses only :class:`~p2plab.aio.extension.WorkerHost`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from p2plab.aio.bench.answering import Answering, progress_message
from p2plab.aio.bench.common import RTT_SPIN_US
from p2plab.aio.bench.runs import Driving, RunOptions
from p2plab.aio.extension import Extension, WorkerHost
from p2plab.core import bench as cb
from p2plab.core.bench.control import (
    CONTROL_TYPES,
    BenchControl,
    ControlEvent,
    EndReceived,
    FinishedReceived,
    IntervalReceived,
    ReadyReceived,
    ReportReceived,
    RequestReceived,
    RunFailed,
    StartReceived,
    StopReceived,
)
from p2plab.core.events import BenchmarkProgress
from p2plab.errors import BenchmarkError, NotConnected, P2PLabError
from p2plab.results import BenchResult, RttResult

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address

__all__ = ["BenchmarkExtension"]

log = logging.getLogger(__name__)


class BenchmarkExtension(Extension):
    """UDP throughput and RTT benchmarks over the worker's connected peer link."""

    name = "benchmark"
    control_types = CONTROL_TYPES

    def __init__(self) -> None:
        self._host: WorkerHost | None = None
        self.control = BenchControl()
        """The control protocol's state (sans-I/O)."""
        self._timer: asyncio.TimerHandle | None = None
        self._finished: asyncio.Future[None] | None = None
        self._answering: Answering | None = None
        self._driving: Driving | None = None

    # -- the Extension interface ---------------------------------------------------------------

    def attach(self, host: WorkerHost) -> None:
        self._host = host
        self._answering = Answering(host, self.control, self.flush)
        self._driving = Driving(host, self.control, self.flush, self._answering)

    @property
    def host(self) -> WorkerHost:
        if self._host is None:
            raise P2PLabError("the benchmark extension is not attached to a started worker")
        return self._host

    @property
    def answering(self) -> Answering:
        """The answering end (what this worker does when its peer drives a run)."""
        if self._answering is None:
            raise P2PLabError("the benchmark extension is not attached to a started worker")
        return self._answering

    @property
    def driving(self) -> Driving:
        """The driving end (runs this worker starts)."""
        if self._driving is None:
            raise P2PLabError("the benchmark extension is not attached to a started worker")
        return self._driving

    def on_control(self, obj: dict[str, Any]) -> None:
        before = self.control.stats["dropped"]
        self.control.handle_control(obj, _now())
        if self.control.stats["dropped"] != before:
            self.host.count("bench_bad_controls")
        self.flush()

    def on_datagram(self, data: bytes, addr: Address) -> bool:
        answering = self._answering
        return answering is not None and answering.on_datagram(data, addr)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._answering is not None:
            self._answering.close()
        if self._driving is not None:
            self._driving.close()
            task = self._driving.sending
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.wait([task], timeout=2.0)
        if self._finished is not None and not self._finished.done():
            self._finished.cancel()

    # -- driving the control protocol ----------------------------------------------------------

    def flush(self) -> None:
        """Send what the control protocol has queued, dispatch its events, re-arm its timer."""
        ctl = self.control
        for _ in range(100):  # events may queue messages that queue events...: bounded
            msgs = ctl.controls_to_send()
            for i, msg in enumerate(msgs):
                try:
                    self.host.send_control(msg)
                except NotConnected as exc:
                    log.debug("queueing %s until the link is connected: %s", msg["type"], exc)
                    ctl.send_failed(msgs[i:], _now())
                    break
                except P2PLabError as exc:  # e.g. not JSON (NaN): lost, so said loudly
                    log.warning("cannot send %s: %s", msg.get("type"), exc)
                    self.host.count("bench_unsendable_controls")
            else:
                if msgs:
                    ctl.sent_ok()
            event = ctl.next_event()
            if event is None:
                break
            self._dispatch(event)
        self._arm()

    def _arm(self) -> None:
        when = self.control.get_timer()
        if self._timer is not None:
            if when is not None and self._timer.when() == when:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        stalls = self.control.stats["stalls"]
        self.control.handle_timer(_now())
        if self.control.stats["stalls"] != stalls:
            # The loop was held past a wait's deadline (a blocking call on it): the wait is
            # extended, but whatever held the loop is worth knowing about.
            log.warning("benchmark: the event loop was held past a wait's deadline")
            self.host.count("bench_loop_stalls")
        self.flush()

    def _dispatch(self, event: ControlEvent) -> None:
        driving, answering = self.driving, self.answering
        if isinstance(event, StartReceived):
            answering.on_start(event.run_id, event.params)
        elif isinstance(event, ReadyReceived):
            driving.resolve("bench_ready", event.run_id, event.answer)
        elif isinstance(event, ReportReceived):
            driving.resolve("bench_report", event.run_id, event.report)
        elif isinstance(event, IntervalReceived):
            self._relay_interval(event.run_id, event.record)
        elif isinstance(event, EndReceived):
            answering.on_end(event.run_id, event.params)
        elif isinstance(event, RequestReceived):
            self._on_request(event.run_id, event.params)
        elif isinstance(event, StopReceived):
            driving.stop_requested = True  # the sender ends its stream, still gets the report
        elif isinstance(event, FinishedReceived):
            if self._finished is not None and not self._finished.done():
                self._finished.set_result(None)
        elif isinstance(event, RunFailed):
            if event.waiting_for == "bench_request":
                fut = answering.received_results.get(event.run_id)
                if fut is not None and not fut.done():
                    fut.set_exception(BenchmarkError(event.reason))
            else:
                driving.fail(event.waiting_for, event.run_id, P2PLabError(event.reason))

    def _relay_interval(self, run_id: int, record: dict[str, Any]) -> None:
        """The receiver's interval of a run we send: publish it here too."""
        try:
            msg = progress_message(run_id, record)
        except (KeyError, TypeError, ValueError):
            self.host.count("bench_bad_controls")
            return
        self.host.publish(msg)
        self.host.emit(
            BenchmarkProgress(run_id, "receiver", msg["elapsed_s"], msg["mbps"], msg["lost"])
        )

    def _on_request(self, run_id: int, obj: dict[str, Any]) -> None:
        """The peer asks us to send to it (``direction="receive"`` on its side).

        A request we cannot serve is answered with ``bench_refused`` (and the reason), so the
        asking side fails at once instead of at its timeout.
        """
        driving = self.driving
        if driving.sending is not None and not driving.sending.done():
            self.control.refuse_request(run_id, "a benchmark is already running on this end")
            return
        try:
            duration_s = float(obj["duration_s"])
            payload_size = int(obj["payload_size"])
            rate_mbps = float(obj.get("rate_mbps", 0))
            interval_s = float(obj.get("interval_s", 1.0))
            encrypt = obj.get("encrypt")
            flow = bool(obj.get("flow_control", True))
            cb.validate_params(payload_size, rate_mbps, duration_s)
        except (KeyError, TypeError, ValueError) as exc:
            log.info("refusing bench_request: %s", exc)
            self.control.refuse_request(run_id, f"bad request: {exc}")
            return
        options = RunOptions(encrypt=None if encrypt is None else bool(encrypt), flow_control=flow)
        driving.sending = asyncio.get_running_loop().create_task(
            driving.run(duration_s, payload_size, rate_mbps, interval_s, "send", run_id, options)
        )
        driving.sending.add_done_callback(_log_failure)

    # -- the public API ------------------------------------------------------------------------

    async def run(
        self,
        duration_s: float = 5.0,
        payload_size: int = 1200,
        rate_mbps: float = 0.0,
        interval_s: float = 1.0,
        direction: str = "send",
        *,
        run_id: int | None = None,
        options: RunOptions | None = None,
    ) -> BenchResult:
        """One throughput run; returns this side's view with the peer's in ``peer_view``.

        ``direction="send"``: we send, the peer counts; ``"receive"``: the peer sends to us.
        """
        return await self.driving.run(
            duration_s,
            payload_size,
            rate_mbps,
            interval_s,
            direction,
            run_id,
            options or RunOptions(),
        )

    async def rtt(
        self,
        count: int = 1000,
        payload_size: int = 64,
        timeout_s: float = 1.0,
        *,
        blocking: bool = True,
        busy_poll_us: float = RTT_SPIN_US,
        options: RunOptions | None = None,
    ) -> RttResult:
        """Ping-pong ``count`` datagrams one at a time (see ``Benchmark.rtt``)."""
        return await self.driving.rtt(
            count, payload_size, timeout_s, blocking, busy_poll_us, options or RunOptions()
        )

    async def sweep(
        self,
        sizes: Sequence[int] = (64, 512, 1200, 8000),
        duration_s: float = 2.0,
        rate_mbps: float = 0.0,
        interval_s: float = 1.0,
        *,
        progress: bool = True,
        options: RunOptions | None = None,
    ) -> list[BenchResult]:
        """One run per payload size, with a tqdm progress bar (a widget in notebooks)."""
        return await self.driving.sweep(
            sizes, duration_s, rate_mbps, interval_s, progress, options or RunOptions()
        )

    @property
    def running(self) -> bool:
        """True while this worker sends or receives a throughput run."""
        sending = self.driving.sending
        return (sending is not None and not sending.done()) or self.answering.receiving is not None

    def stop(self) -> bool:
        """End the running run early; both ends still get their results.

        Sending here: the stream ends now and the peer's report is still collected.  Receiving
        here: the peer is asked to end its stream (``bench_stop``).  Returns False when no run
        was running.
        """
        driving, answering = self.driving, self.answering
        if driving.sending is not None and not driving.sending.done():
            driving.stop_requested = True
            return True
        if driving.pinger is not None:
            driving.stop_requested = True
            return True
        if answering.receiving is not None:
            self.control.send({"type": "bench_stop", "run_id": answering.receiving.run_id})
            self.flush()
            return True
        return False

    def finished(self) -> asyncio.Future[None]:
        """Resolves when the peer says it is done with benchmarks (``bench_finished``)."""
        if self._finished is None or self._finished.done():
            self._finished = asyncio.get_running_loop().create_future()
        return self._finished

    def set_sealer(self, sealer: Any) -> None:
        """Use ``sealer`` for this worker's runs instead of the link's (the peer holds the
        matching one); see :class:`~p2plab.aio.bench.common.BenchSealer`."""
        self.answering.sealer_override = sealer


def _now() -> float:
    return asyncio.get_running_loop().time()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("requested benchmark failed: %s", task.exception())
