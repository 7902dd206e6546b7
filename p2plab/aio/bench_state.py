"""The benchmark's state on each worker (``worker.benchmark``): the peer-side protocol.

:class:`_BenchState` answers the peer's control messages (``bench_start``, ``bench_end``,
``bench_request``, ``bench_stop``, ...): it arms the receiver of a throughput run
(:mod:`p2plab.aio.bench_receiver`) or the responder of an RTT run (:mod:`p2plab.aio.bench_rtt`),
publishes the receiver's intervals, sends reports back, and queues control messages until the
worker calls itself connected.  :class:`p2plab.aio.bench.Benchmark`, the public API, drives runs
from the other end.  Importing this module registers its control handlers on
:class:`~p2plab.aio.worker.Worker`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from p2plab.aio.bench_common import (
    _CONTROL_PATIENCE_S,
    _CONTROL_RETRY_S,
    _CREDIT_TIMER_S,
    _MAX_REPORT_BYTES,
    _RCVBUF,
    _RTT_BLOCK_S,
    _RTT_IDLE_S,
    _RTT_SPIN_MAX_US,
    _SKB_OVERHEAD,
    BenchSealer,
    _link_sealer,
    _peer_on_loop,
    _receiver_row,
    _sender_row,
)
from p2plab.aio.bench_receiver import _Receiving
from p2plab.aio.bench_rtt import _Pinger, _Responder
from p2plab.core import bench as cb
from p2plab.errors import BenchmarkError, NotConnected, P2PLabError
from p2plab.results import BenchResult

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address
    from p2plab.aio.worker import Worker

__all__: list[str] = []

log = logging.getLogger(__name__)


class _BenchState:
    """What p2plab.aio.bench keeps on a worker (``worker.benchmark``)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.receiving: _Receiving | None = None
        self.sending: asyncio.Task[Any] | None = None
        self.waiters: dict[tuple[str, int], asyncio.Future[dict[str, Any]]] = {}
        self.received_results: dict[int, asyncio.Future[BenchResult]] = {}
        self.pinger: _Pinger | None = None
        self.responder: _Responder | None = None
        self.rtt_task: asyncio.Task[None] | None = None
        """The responder's blocking ping-pong loop of the current RTT run, if any."""
        self.sealer_override: BenchSealer | None = None
        """A sealer given to :class:`Benchmark` (else the link's own is used)."""
        self.late = 0
        """Benchmark datagrams that arrived outside any run (dropped)."""
        self.stop_requested = False
        self.pending_control: list[dict[str, Any]] = []
        """Control messages waiting for the worker to call itself connected (in order)."""
        worker.datagram_hooks.insert(0, self.hook)

    @staticmethod
    def of(worker: Worker) -> _BenchState:
        state = getattr(worker, "benchmark", None)
        if not isinstance(state, _BenchState):
            state = _BenchState(worker)
            worker.benchmark = state
        return state

    def sealer(self) -> BenchSealer | None:
        """The encrypting sealer runs use by default (None: the link has none)."""
        if self.sealer_override is not None:
            return self.sealer_override
        return _link_sealer(self.worker)

    def peer_address(self) -> Address | None:
        punch = self.worker.punch
        return punch.peer_address if punch is not None else None

    # -- datagrams ----------------------------------------------------------------------------

    def hook(self, data: bytes, addr: Address) -> bool:
        """Benchmark datagrams that did not take a fast path (no run armed for them)."""
        if len(data) < 4 or data[0] != 0xD7 or data[1] != 0x50 or data[3] not in range(0x20, 0x30):
            return False
        rec = self.receiving
        if data[3] == cb.BENCH_DATA and rec is not None and not rec.done:
            # Only when the bulk sink is not armed (it normally takes these).
            _ = rec.sink(memoryview(data), [(0, len(data), len(data), time.monotonic_ns())])
            return True
        self.late += 1
        return True

    # -- control messages ----------------------------------------------------------------------

    def wait_for(self, kind: str, run_id: int) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[(kind, run_id)] = fut
        return fut

    def resolve(self, kind: str, obj: dict[str, Any]) -> None:
        try:
            run_id = int(obj["run_id"])
        except (KeyError, TypeError, ValueError):
            log.debug("dropping %s without a run id", kind)
            return
        fut = self.waiters.pop((kind, run_id), None)
        if fut is not None and not fut.done():
            fut.set_result(obj)

    def on_start(self, obj: dict[str, Any]) -> None:
        try:
            run_id = int(obj["run_id"])
            mode = str(obj.get("mode", "throughput"))
            want_sealed = bool(obj.get("encrypted", False))
            size = int(obj.get("payload_size", 1200))
        except (KeyError, TypeError, ValueError):
            log.debug("bad bench_start %r", obj)
            return
        ep = self.worker.endpoint
        if ep is None:
            return
        sealer = self.sealer() if want_sealed else None
        if want_sealed and sealer is None:
            self._control(
                {
                    "type": "bench_ready",
                    "run_id": run_id,
                    "error": "this end has no encrypting sealer for the link",
                }
            )
            return
        addr = self.peer_address()
        ready: dict[str, Any] = {
            "type": "bench_ready",
            "run_id": run_id,
            "gro": ep.gro,
            "encrypted": sealer is not None,
        }
        if mode == "throughput":
            self._disarm()
            rec = _Receiving(self, run_id, obj, sealer, addr)
            self.receiving = rec
            rcvbuf, _ = ep.set_buffer_sizes(_RCVBUF)
            # The kernel reports twice the size set and charges each datagram its payload plus
            # overhead against that; the window fills at most half of it.
            ready["window"] = max(16, (rcvbuf // 2) // (max(size, 64) + _SKB_OVERHEAD))
            ep.set_bulk_sink({cb.BENCH_DATA}, rec.sink)
            loop = asyncio.get_running_loop()
            rec.ticker = loop.create_task(self._tick(rec))
            rec.credit_timer = loop.call_later(_CREDIT_TIMER_S, rec.credit_tick)
        elif mode == "rtt" and addr is not None:
            resp = _Responder(ep, addr, run_id, sealer)
            self.responder = resp
            ep.set_fast_handler(cb.BENCH_PING, resp)
            try:
                count = int(obj.get("count", 0))
                idle_s = min(max(float(obj.get("idle_s", _RTT_IDLE_S)), 0.1), 60.0)
                spin_us = min(max(float(obj.get("busy_poll_us", 0.0)), 0.0), _RTT_SPIN_MAX_US)
            except (TypeError, ValueError):
                count, idle_s, spin_us = 0, _RTT_IDLE_S, 0.0
            blocking = bool(obj.get("blocking", False)) and count > 0
            if blocking and not _peer_on_loop(ep, addr):
                ready["blocking"] = True
                ready["busy_poll_us"] = spin_us
                self.rtt_task = asyncio.get_running_loop().create_task(
                    self._respond_blocking(resp, count, idle_s, spin_us / 1e6)
                )
        self._control(ready)

    async def _respond_blocking(
        self, resp: _Responder, count: int, idle_s: float, spin_s: float = 0.0
    ) -> None:
        """Answer pings blocked on the socket (chunks of ``_RTT_BLOCK_S``) until the run ends."""
        ep = self.worker.endpoint
        if ep is None:
            return
        await asyncio.sleep(0)  # let bench_ready leave first

        def over() -> bool:
            return resp.answered >= count or self.responder is not resp

        last, since = resp.answered, time.perf_counter()
        while not over() and not ep.closed:
            ep.read_blocking(over, _RTT_BLOCK_S, spin_s)
            await asyncio.sleep(0)
            now = time.perf_counter()
            if resp.answered != last:
                last, since = resp.answered, now
            elif now - since > idle_s:
                log.debug("rtt responder: no ping for %.1f s, back to the loop", idle_s)
                return

    def _disarm(self) -> None:
        rec = self.receiving
        if rec is not None:
            rec.done = True
            if rec.ticker is not None:
                rec.ticker.cancel()
            if rec.credit_timer is not None:
                rec.credit_timer.cancel()
        self.receiving = None
        if self.worker.endpoint is not None:
            self.worker.endpoint.set_bulk_sink(set(), None)

    async def _tick(self, rec: _Receiving) -> None:
        """Publish the receiver's intervals as they close (and relay them to the sender)."""
        interval = rec.rx.interval_ns / 1e9
        while not rec.done:
            await asyncio.sleep(interval / 4)
            self._publish_intervals(rec, rec.rx.advance(time.monotonic_ns()))

    def _publish_intervals(self, rec: _Receiving, records: Sequence[cb.IntervalRecord]) -> None:
        for iv in records:
            rec.published += 1
            msg = {
                "type": "benchmark_progress",
                "role": "receiver",
                "elapsed_s": round(iv.t_end, 6),
                "mbps": round(iv.mbps, 3),
                "lost": iv.lost,
                "jitter_ms": round(iv.jitter_ms, 6),
                "run_id": str(rec.run_id),
            }
            self.worker.publish(msg)
            self._control({"type": "bench_interval", "run_id": rec.run_id, **iv.to_dict()})

    def on_end(self, obj: dict[str, Any]) -> None:
        if obj.get("mode") == "rtt":
            resp = self.responder
            ep = self.worker.endpoint
            if resp is not None and str(obj.get("run_id")) == str(
                int.from_bytes(resp.run_id, "big")
            ):
                self.responder = None
                if ep is not None:
                    ep.set_fast_handler(cb.BENCH_PING, None)
            return
        rec = self.receiving
        try:
            run_id = int(obj["run_id"])
            sent = int(obj["packets_sent"])
        except (KeyError, TypeError, ValueError):
            return
        if rec is None or rec.run_id != run_id or rec.done:
            return
        rtt = self.worker.rtt or 0.0
        # Datagrams still in flight on the path: wait a little (ordered paths need none).
        asyncio.get_running_loop().call_later(
            min(0.05 + 2 * rtt, 1.0), self._finish, rec, obj, sent
        )

    def _finish(self, rec: _Receiving, end: dict[str, Any], sent: int) -> None:
        if rec.done:
            return
        self._disarm()
        report = rec.rx.report(packets_sent=sent)
        self._publish_intervals(rec, report.intervals[rec.published :])
        d = report.to_dict()
        while len(json.dumps(d)) > _MAX_REPORT_BYTES and d["intervals"]:
            d["intervals"] = d["intervals"][: len(d["intervals"]) // 2]
        self._control({"type": "bench_report", "run_id": rec.run_id, "report": d})
        w = self.worker
        ep = w.endpoint
        theirs = _sender_row(w, rec.run_id, rec.started_at, rec.params, end, report, local=False)
        mine = _receiver_row(
            w,
            rec.run_id,
            rec.started_at,
            {**rec.params, "sent_mbps": theirs.mbps},
            report,
            gro=bool(ep and ep.gro),
        )
        mine = replace(mine, peer_view=replace(theirs, peer_view=None))
        for row in (theirs, mine):
            w.publish(row.to_message())
        fut = self.received_results.pop(rec.run_id, None)
        if fut is not None and not fut.done():
            fut.set_result(mine)

    def on_request(self, obj: dict[str, Any]) -> None:
        """The peer asks us to send to it (``direction="receive"`` on its side).

        A request we cannot serve is answered with ``bench_refused`` (and the reason), so the
        asking side fails at once instead of at its timeout.
        """
        if self.sending is not None and not self.sending.done():
            self._refuse(obj, "a benchmark is already running on this end")
            return
        try:
            kwargs = {
                "duration_s": float(obj["duration_s"]),
                "payload_size": int(obj["payload_size"]),
                "rate_mbps": float(obj.get("rate_mbps", 0)),
                "interval_s": float(obj.get("interval_s", 1.0)),
                "run_id": int(obj["run_id"]),
            }
            encrypt = obj.get("encrypt")
            flow = bool(obj.get("flow_control", True))
            cb.validate_params(
                int(kwargs["payload_size"]), kwargs["rate_mbps"], kwargs["duration_s"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.info("refusing bench_request: %s", exc)
            self._refuse(obj, f"bad request: {exc}")
            return
        from p2plab.aio.bench import Benchmark  # the public API builds on this module

        bench = Benchmark(
            self.worker,
            encrypt=None if encrypt is None else bool(encrypt),
            flow_control=flow,
        )
        self.sending = asyncio.get_running_loop().create_task(
            bench.run(**kwargs)  # type: ignore[arg-type]
        )

    def _refuse(self, obj: dict[str, Any], reason: str) -> None:
        run_id = obj.get("run_id")
        if isinstance(run_id, int):
            self._control({"type": "bench_refused", "run_id": run_id, "error": reason})

    def on_refused(self, obj: dict[str, Any]) -> None:
        try:
            fut = self.received_results.get(int(obj["run_id"]))
        except (KeyError, TypeError, ValueError):
            return
        if fut is not None and not fut.done():
            fut.set_exception(BenchmarkError(f"the peer refused to send: {obj.get('error')}"))

    def on_stop(self, obj: dict[str, Any]) -> None:
        """The receiving end's UI stopped the run: end the stream, still collect the report."""
        self.stop_requested = True

    def _control(self, obj: dict[str, Any]) -> None:
        """Send a control message; while the worker is not connected yet, queue and retry.

        A peer's ``bench_start`` can arrive in the instant between its session connecting and
        this worker calling itself connected (``send_control`` refuses then): the answer is
        queued, in order, and retried every ``_CONTROL_RETRY_S`` for ``_CONTROL_PATIENCE_S``.
        """
        if self.pending_control:
            self.pending_control.append(obj)
            return
        try:
            self.worker.send_control(obj)
        except NotConnected as exc:
            log.debug("queueing %s until the worker is connected: %s", obj.get("type"), exc)
            self.pending_control.append(obj)
            loop = asyncio.get_running_loop()
            loop.call_later(_CONTROL_RETRY_S, self._retry_control, loop.time())
        except P2PLabError as exc:
            log.info("cannot send %s: %s", obj.get("type"), exc)

    def _retry_control(self, since: float) -> None:
        loop = asyncio.get_running_loop()
        while self.pending_control:
            obj = self.pending_control[0]
            try:
                self.worker.send_control(obj)
            except NotConnected as exc:
                if loop.time() - since > _CONTROL_PATIENCE_S:
                    log.info("cannot send %d control messages: %s", len(self.pending_control), exc)
                    self.pending_control.clear()
                    return
                loop.call_later(_CONTROL_RETRY_S, self._retry_control, since)
                return
            except P2PLabError as exc:
                log.info("cannot send %s: %s", obj.get("type"), exc)
            self.pending_control.pop(0)


def _on_control(kind: str) -> Any:
    def handler(worker: Worker, obj: dict[str, Any]) -> None:
        state = _BenchState.of(worker)
        if kind == "bench_start":
            state.on_start(obj)
        elif kind == "bench_end":
            state.on_end(obj)
        elif kind == "bench_request":
            state.on_request(obj)
        elif kind == "bench_stop":
            state.on_stop(obj)
        elif kind == "bench_refused":
            state.on_refused(obj)
        elif kind == "bench_interval":
            state.resolve(kind, obj)  # only the sender's progress relay waits on these
            _relay_interval(worker, obj)
        else:
            state.resolve(kind, obj)

    return handler


def _relay_interval(worker: Worker, obj: dict[str, Any]) -> None:
    try:
        worker.publish(
            {
                "type": "benchmark_progress",
                "role": "receiver",
                "elapsed_s": round(float(obj["t_end"]), 6),
                "mbps": round(float(obj["mbps"]), 3),
                "lost": int(obj["lost"]),
                "jitter_ms": round(float(obj.get("jitter_ms", 0.0)), 6),
                "run_id": str(obj.get("run_id")),
            }
        )
    except (KeyError, TypeError, ValueError):
        log.debug("bad bench_interval %r", obj)


def _register_handlers() -> None:
    from p2plab.aio.worker import Worker

    for kind in (
        "bench_start",
        "bench_ready",
        "bench_end",
        "bench_report",
        "bench_interval",
        "bench_request",
        "bench_stop",
        "bench_refused",
        "bench_finished",
    ):
        Worker.control_handlers[kind] = _on_control(kind)


_register_handlers()
