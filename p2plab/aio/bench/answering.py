"""The answering end of a benchmark run: what a worker does when its peer drives a run.

On the peer's ``bench_start`` (a :class:`~p2plab.core.bench.control.StartReceived` event) it
arms the receiver of a throughput run (:mod:`p2plab.aio.bench.receiver`) or the responder of an
RTT run (:mod:`p2plab.aio.bench.rtt`) and answers ``bench_ready``; it publishes the receiver's
intervals and relays them to the sender; on ``bench_end`` it closes the books and sends the
report back.  Its control messages go through the extension's
:class:`~p2plab.core.bench.control.BenchControl` (``control``) and ``flush`` sends them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from p2plab.aio.bench.common import (
    CREDIT_TIMER_S,
    MAX_REPORT_BYTES,
    RCVBUF,
    RTT_BLOCK_S,
    RTT_IDLE_S,
    RTT_SPIN_MAX_US,
    SKB_OVERHEAD,
    BenchSealer,
    link_sealer,
    peer_on_loop,
    receiver_row,
    sender_row,
)
from p2plab.aio.bench.receiver import Receiving
from p2plab.aio.bench.route import Routed, is_pseudo
from p2plab.aio.bench.rtt import Responder
from p2plab.core import bench as cb
from p2plab.core.bench.control import BenchControl
from p2plab.core.events import BenchmarkFinished, BenchmarkProgress
from p2plab.core.paths import RELAY_ADDRESS
from p2plab.errors import NotConnected
from p2plab.results import BenchResult

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address
    from p2plab.aio.extension import WorkerHost

__all__ = ["Answering", "progress_message"]

log = logging.getLogger(__name__)


def progress_message(run_id: int, record: dict[str, Any]) -> dict[str, Any]:
    """The UI's ``benchmark_progress`` message (receiver role) for one interval record."""
    return {
        "type": "benchmark_progress",
        "role": "receiver",
        "elapsed_s": round(float(record["t_end"]), 6),
        "mbps": round(float(record["mbps"]), 3),
        "lost": int(record["lost"]),
        "jitter_ms": round(float(record.get("jitter_ms", 0.0)), 6),
        "run_id": str(run_id),
    }


class Answering:
    """The answering end of a worker's benchmark runs (one run of each kind at a time)."""

    def __init__(self, host: WorkerHost, control: BenchControl, flush: Callable[[], None]) -> None:
        self.host = host
        self.control = control
        self.flush = flush
        self.receiving: Receiving | None = None
        """The throughput run this worker receives, if any."""
        self.responder: Responder | None = None
        """The responder of the current RTT run, if any."""
        self.rtt_task: asyncio.Task[None] | None = None
        """The responder's blocking ping-pong loop of the current RTT run, if any."""
        self.sealer_override: BenchSealer | None = None
        """A sealer given to :class:`~p2plab.aio.bench.Benchmark` (else the link's is used)."""
        self.received_results: dict[int, asyncio.Future[BenchResult]] = {}
        """Runs we asked the peer to send (``direction="receive"``), by run id."""
        self.late = 0
        """Benchmark datagrams that arrived outside any run (dropped)."""

    def sealer(self) -> BenchSealer | None:
        """The encrypting sealer runs use by default (None: the link has none)."""
        if self.sealer_override is not None:
            return self.sealer_override
        return link_sealer(self.host)

    # -- datagrams that took no fast path ------------------------------------------------------

    def on_datagram(self, data: bytes, addr: Address) -> bool:
        """Benchmark datagrams that no fast handler or bulk sink took (no run armed for them)."""
        if len(data) < 4 or data[0] != 0xD7 or data[1] != 0x50 or data[3] not in range(0x20, 0x30):
            return False
        rec = self.receiving
        if data[3] == cb.BENCH_DATA and rec is not None and not rec.done:
            # Only when the bulk sink is not armed (it normally takes these).
            _ = rec.sink(memoryview(data), [(0, len(data), len(data), time.monotonic_ns())])
            return True
        self.late += 1
        self.host.count("bench_late")
        return True

    # -- a run the peer starts -----------------------------------------------------------------

    def on_start(self, run_id: int, obj: dict[str, Any]) -> None:
        try:
            mode = str(obj.get("mode", "throughput"))
            want_sealed = bool(obj.get("encrypted", False))
            size = int(obj.get("payload_size", 1200))
        except (TypeError, ValueError):
            self.host.count("bench_bad_controls")
            log.debug("bad bench_start %r", obj)
            return
        ep = self.host.endpoint
        if ep is None:
            return
        sealer = self.sealer() if want_sealed else None
        if want_sealed and sealer is None:
            self.control.answer_start(
                run_id, {"error": "this end has no encrypting sealer for the link"}
            )
            return
        addr = self.host.peer_address
        ready: dict[str, Any] = {"gro": ep.gro, "encrypted": sealer is not None}
        # Answers to a peer behind a pseudo-address (our TURN allocation, the relay) go
        # through the engine; over the relay no credits at all (its budget; the run is paced).
        out: Any = Routed(ep, self.host) if is_pseudo(addr) else ep
        if mode == "throughput":
            self.disarm()
            credit_to = None if addr == RELAY_ADDRESS else addr
            rec = Receiving(out, run_id, obj, sealer, credit_to)
            self.receiving = rec
            rcvbuf, _ = ep.set_buffer_sizes(RCVBUF)
            # The kernel reports twice the size set and charges each datagram its payload plus
            # overhead against that; the window fills at most half of it.
            ready["window"] = max(16, (rcvbuf // 2) // (max(size, 64) + SKB_OVERHEAD))
            ep.set_bulk_sink({cb.BENCH_DATA}, rec.sink)
            loop = asyncio.get_running_loop()
            rec.ticker = loop.create_task(self._tick(rec))
            rec.credit_timer = loop.call_later(CREDIT_TIMER_S, rec.credit_tick)
        elif mode == "rtt" and addr is not None:
            resp = Responder(out, addr, run_id, sealer)
            self.responder = resp
            ep.set_fast_handler(cb.BENCH_PING, resp)
            try:
                count = int(obj.get("count", 0))
                idle_s = min(max(float(obj.get("idle_s", RTT_IDLE_S)), 0.1), 60.0)
                spin_us = min(max(float(obj.get("busy_poll_us", 0.0)), 0.0), RTT_SPIN_MAX_US)
            except (TypeError, ValueError):
                count, idle_s, spin_us = 0, RTT_IDLE_S, 0.0
            blocking = bool(obj.get("blocking", False)) and count > 0 and out is ep
            if blocking and not peer_on_loop(ep, addr):
                ready["blocking"] = True
                ready["busy_poll_us"] = spin_us
                self.rtt_task = asyncio.get_running_loop().create_task(
                    self._respond_blocking(resp, count, idle_s, spin_us / 1e6)
                )
        self.control.answer_start(run_id, ready)

    async def _respond_blocking(
        self, resp: Responder, count: int, idle_s: float, spin_s: float = 0.0
    ) -> None:
        """Answer pings blocked on the socket (chunks of ``RTT_BLOCK_S``) until the run ends."""
        ep = self.host.endpoint
        if ep is None:
            return
        await asyncio.sleep(0)  # let bench_ready leave first

        def over() -> bool:
            return resp.answered >= count or self.responder is not resp

        last, since = resp.answered, time.perf_counter()
        while not over() and not ep.closed:
            ep.read_blocking(over, RTT_BLOCK_S, spin_s)
            await asyncio.sleep(0)
            now = time.perf_counter()
            if resp.answered != last:
                last, since = resp.answered, now
            elif now - since > idle_s:
                log.debug("rtt responder: no ping for %.1f s, back to the loop", idle_s)
                return

    def disarm(self) -> None:
        """End the receiving run, if any (its datagrams take the usual path again)."""
        rec = self.receiving
        if rec is not None:
            rec.done = True
            if rec.ticker is not None:
                rec.ticker.cancel()
            if rec.credit_timer is not None:
                rec.credit_timer.cancel()
        self.receiving = None
        if self.host.endpoint is not None:
            self.host.endpoint.set_bulk_sink(set(), None)

    def close(self) -> None:
        """The worker stops: disarm everything."""
        self.disarm()
        self.responder = None
        if self.host.endpoint is not None:
            self.host.endpoint.set_fast_handler(cb.BENCH_PING, None)
        for fut in self.received_results.values():
            if not fut.done():
                fut.set_exception(NotConnected("the worker stopped"))

    async def _tick(self, rec: Receiving) -> None:
        """Publish the receiver's intervals as they close (and relay them to the sender)."""
        interval = rec.rx.interval_ns / 1e9
        while not rec.done:
            await asyncio.sleep(interval / 4)
            rec.rx.advance(time.monotonic_ns())
            # every interval closed since the last tick: arriving datagrams close them too
            # (``receive`` advances the clock), and those are not in ``advance``'s answer here
            self._publish_intervals(rec, rec.rx.intervals[rec.published :])

    def _publish_intervals(self, rec: Receiving, records: Sequence[cb.IntervalRecord]) -> None:
        for iv in records:
            rec.published += 1
            record = iv.to_dict()
            self.host.publish(progress_message(rec.run_id, record))
            self.host.emit(BenchmarkProgress(rec.run_id, "receiver", iv.t_end, iv.mbps, iv.lost))
            self.control.send({"type": "bench_interval", "run_id": rec.run_id, **record})
        if records:
            self.flush()

    def on_end(self, run_id: int, obj: dict[str, Any]) -> None:
        if obj.get("mode") == "rtt":
            resp = self.responder
            ep = self.host.endpoint
            if resp is not None and run_id == int.from_bytes(resp.run_id, "big"):
                self.responder = None
                if ep is not None:
                    ep.set_fast_handler(cb.BENCH_PING, None)
            return
        rec = self.receiving
        try:
            sent = int(obj["packets_sent"])
        except (KeyError, TypeError, ValueError):
            self.host.count("bench_bad_controls")
            return
        if rec is None or rec.run_id != run_id or rec.done:
            # Not the run we receive (a repeat, or one we never armed): no report from here.
            log.debug("bench_end of run %s ignored (receiving %s)", run_id, rec and rec.run_id)
            self.host.count("bench_ends_ignored")
            return
        rtt = self.host.rtt or 0.0
        # Datagrams still in flight on the path: wait a little (ordered paths need none).
        asyncio.get_running_loop().call_later(
            min(0.05 + 2 * rtt, 1.0), self._finish, rec, obj, sent
        )

    def _finish(self, rec: Receiving, end: dict[str, Any], sent: int) -> None:
        if rec.done:
            return
        self.disarm()
        # Goodput over the same window as the sending rate (core.bench.rates): the sender's
        # send window comes in bench_end; a missing or absurd one falls back to arrivals only.
        try:
            send_s: float | None = float(end.get("duration_s", 0.0))
        except (TypeError, ValueError):
            send_s = None
        if send_s is not None and not 0 < send_s < 1e6:
            send_s = None
        report = rec.rx.report(packets_sent=sent, send_window_s=send_s)
        self._publish_intervals(rec, report.intervals[rec.published :])
        d = report.to_dict()
        while len(json.dumps(d)) > MAX_REPORT_BYTES and d["intervals"]:
            d["intervals"] = d["intervals"][: len(d["intervals"]) // 2]
        self.control.send({"type": "bench_report", "run_id": rec.run_id, "report": d})
        self.flush()
        h = self.host
        ep = h.endpoint
        theirs = sender_row(h, rec.run_id, rec.started_at, rec.params, end, report, local=False)
        mine = receiver_row(
            h,
            rec.run_id,
            rec.started_at,
            {**rec.params, "sent_mbps": theirs.mbps},
            report,
            gro=bool(ep and ep.gro),
        )
        mine = replace(mine, peer_view=replace(theirs, peer_view=None))
        for row in (theirs, mine):
            h.publish(row.to_message())
        h.emit(BenchmarkFinished(rec.run_id, mine.to_dict()))
        fut = self.received_results.pop(rec.run_id, None)
        if fut is not None and not fut.done():
            fut.set_result(mine)
