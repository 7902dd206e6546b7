"""The driving end of benchmark runs: UDP throughput and RTT over a worker's punched link.

Runs over the established path: the worker's own socket (so through the NAT mapping the link
uses), to ``WorkerHost.peer_address``; when that is a pseudo-address (a TURN path through our
own allocation, or the rendezvous relay), through the engine (:mod:`p2plab.aio.bench.route`;
over the relay paced under its budget).  Every row names the path.  Coordination rides the
session's reliable control messages, so chat and keep-alives keep flowing during a run::

    sender                                   receiver
    bench_start {run_id, params}    ->       arms accounting (bulk sink on the endpoint)
                                    <-       bench_ready {run_id, window, encrypted}
    BENCH_DATA datagrams ...        ->       counted (vectorised, exact)
                                    <-       BENCH_CREDIT datagrams (every ~2 ms: flow control)
                                    <-       bench_interval {run_id, record}   (each interval)
    bench_end {run_id, packets_sent, ...} -> closes the books after a short grace
                                    <-       bench_report {run_id, report}

Both ends then hold both views and publish ``benchmark_result`` for both roles; each publishes
``benchmark_progress`` once per interval (the sender also relays the receiver's).  This module
is the driving end (:class:`Driving`, used through :class:`~p2plab.aio.bench.Benchmark` and
``worker.benchmark``); the answering end is :mod:`p2plab.aio.bench.answering`, its receiver's
accounting :mod:`p2plab.aio.bench.receiver`, the ping-pong :mod:`p2plab.aio.bench.rtt`, and the
control messages' waits and retries :mod:`p2plab.core.bench.control`.

Encryption (issue 8).  By default every benchmark datagram (data, ping, pong, credit) is sealed
whole with the link's sealer (``WorkerHost.peer_sealer``, a ChaCha20-Poly1305
:class:`~p2plab.core.crypto.PeerCipher`) and opened by the receiver; datagrams that do not open
are counted (``auth_failures``) and never enter the accounting.  The UDP payload keeps the size
asked for (the sealed plaintext is ``SEAL_OVERHEAD`` bytes shorter).  ``Benchmark(worker,
encrypt=False)`` is the explicit unencrypted mode; every result says which mode it measured
(``encrypted``).  A link without an encrypting sealer runs unencrypted and says so.

Flow control.  The receiver sizes its socket buffer (``SO_RCVBUFFORCE`` as root), grants the
sender a window of datagrams that fits in it (``bench_ready.window``), and reports how far it has
read the stream in ``BENCH_CREDIT`` datagrams; the sender never has more than the window beyond
that point (:class:`p2plab.core.bench.CreditWindow`).  So "as fast as possible" (``rate_mbps=0``)
means as fast as the receiver reads, without overrunning it; a target rate is paced on top.
``flow_control=False`` drops the window (the sender then overruns a slower receiver, as iperf3
does).

RTT mode sends ``BENCH_PING`` datagrams one at a time.  Both ends handle ping and pong in the
endpoint's *fast handler* (straight from the read, no copy or demultiplexing, no task switch): the
peer answers a ping with a ``sock.sendto`` from its read, and our next ping leaves from ours when
the pong arrives.  For the length of a run both ends wait for the next datagram on the socket
itself (``UdpEndpoint.read_blocking``, on the loop thread, in chunks of at most ``RTT_BLOCK_S``,
with a yield to the event loop between chunks), not through the event loop's wake-up for every
datagram.  By default they busy-poll: after each datagram each end keeps reading without sleeping
for ``busy_poll_us`` (1 ms) before it sleeps in ``poll(2)``, so a loopback or LAN round trip is
measured without the scheduler's wake-up of a sleeping process and the CPU's exit from its idle
state, which on an idle host are most of such a round trip (sockperf's spinning mode, ``-F r
--nonblocked``, does the same; ``busy_poll_us=0`` sleeps at once like its default ping-pong).
Results say which (``RttResult.wait``).  The responder learns the run's ``count`` from
``bench_start`` and stops once it has answered that many pings, on ``bench_end``, or after
``idle_s`` without a ping.  Every other datagram read meanwhile (chat, keep-alives, control, STUN)
takes its usual path at once; timers and other sockets wait at most one chunk.  When the peer is
an endpoint on this same event loop (two workers on one loop), blocking would stall the peer
itself, so both ends then stay on the event loop's reader (``wait="event-loop"``).

Data path: the sender fills headers of a pre-built batch in place (numpy), seals the batch
straight into the send buffer when encrypted (``PeerCipher.seal_many``: one counter range, one
cipher), sends with UDP GSO when the kernel has it and with ``sendmmsg`` otherwise
(``UdpEndpoint.send_segments``), paces with a token bucket and loop timers, and waits for
writability on EAGAIN.  The receiver gets reads in batches from the endpoint's fast path (a bulk
sink: ``recvmmsg``, GRO aware), opens sealed ones into one scratch buffer
(``PeerCipher.open_many_into``) and parses and counts them with numpy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from p2plab.aio.bench.answering import Answering
from p2plab.aio.bench.common import (
    RTT_BLOCK_S,
    RTT_IDLE_S,
    RTT_SPIN_MAX_US,
    BenchSealer,
    new_run_id,
    now_iso,
    overhead,
    peer_on_loop,
    receiver_row,
    sender_row,
)
from p2plab.aio.bench.route import Routed, is_pseudo, relay_clamp
from p2plab.aio.bench.rtt import Pinger
from p2plab.aio.bench.sender import Sending, stream
from p2plab.core import bench as cb
from p2plab.core.bench.control import BenchControl
from p2plab.core.events import BenchmarkFinished, BenchmarkProgress
from p2plab.core.paths import RELAY_ADDRESS, TURN_TCP, TURN_UDP
from p2plab.errors import NotConnected, P2PLabError
from p2plab.results import BenchResult, RttResult

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address, UdpEndpoint
    from p2plab.aio.extension import WorkerHost

__all__ = ["TURN_WINDOW", "Driving", "RunOptions"]

#: The most datagrams a run to the peer's TURN relayed address has in flight (the peer reads
#: them through its engine, TURN framing in Python); on loopback with coturn 64 lost ~1%, 128
#: ~14%, 256 ~37% (the window sized to the receiver's socket buffer: ~22-45%).
TURN_WINDOW = 64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How the driving end runs (``Benchmark(worker, ...)``'s keyword arguments)."""

    gso: bool | None = None
    """None uses UDP GSO where the kernel has it; False forces plain sends."""

    timeout_s: float = 10.0
    """How long to wait for the peer's answers (``bench_ready``, ``bench_report``)."""

    encrypt: bool | None = None
    """None seals when the link has an encrypting sealer; True requires one; False never."""

    flow_control: bool = True
    """Obey the receiver's credit window."""

    note: str = ""
    """A note for the run's rows (e.g. the relay's budget clamped the rate)."""


class Driving:
    """The driving end of a worker's runs; its answers come as events through :meth:`resolve`."""

    def __init__(
        self,
        host: WorkerHost,
        control: BenchControl,
        flush: Callable[[], None],
        answering: Answering,
    ) -> None:
        self.host = host
        self.control = control
        self.flush = flush
        self.answering = answering
        self.waiters: dict[tuple[str, int], asyncio.Future[dict[str, Any]]] = {}
        self.sending: asyncio.Task[Any] | None = None
        """The throughput run this worker sends, if any (one at a time)."""
        self.stop_requested = False
        """Set to end the stream of the run being sent (it still collects the report)."""
        self.pinger: Pinger | None = None

    # -- answers from the control protocol ---------------------------------------------------

    def expect(self, kind: str, run_id: int) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[(kind, run_id)] = fut
        return fut

    def resolve(self, kind: str, run_id: int, answer: dict[str, Any]) -> None:
        fut = self.waiters.pop((kind, run_id), None)
        if fut is not None and not fut.done():
            fut.set_result(answer)

    def fail(self, kind: str, run_id: int, exc: BaseException) -> None:
        fut = self.waiters.pop((kind, run_id), None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    async def _wait(self, fut: asyncio.Future[dict[str, Any]], kind: str, rid: int) -> Any:
        try:
            return await fut  # the control protocol ends every wait (answer or timeout)
        finally:
            self.waiters.pop((kind, rid), None)
            if fut.cancelled():  # our caller gave up: so does the protocol
                self.control.cancel(rid)

    def close(self) -> None:
        """The worker stops: fail every wait."""
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(NotConnected("the worker stopped"))
                fut.exception()  # a run cancelled before it awaited this: nobody will; no log
        self.waiters.clear()
        self.stop_requested = True

    # -- the link ------------------------------------------------------------------------------

    def link(self) -> tuple[UdpEndpoint, Address]:
        """The endpoint a run sends from and the peer's address, on whatever path the link
        is (direct, TURN, the relay: a pseudo-address is reached through the engine,
        :class:`~p2plab.aio.bench.route.Routed`)."""
        h = self.host
        addr = h.peer_address
        if h.endpoint is None or addr is None or h.state not in ("connected", "relayed"):
            raise NotConnected("no peer connected: a benchmark needs a connected peer")
        if is_pseudo(addr):
            return Routed(h.endpoint, h), addr  # type: ignore[return-value]
        return h.endpoint, addr

    def sealer(self, options: RunOptions) -> BenchSealer | None:
        """The sealer a run uses (None: unencrypted)."""
        if options.encrypt is False:
            return None
        sealer = self.answering.sealer()
        if sealer is None and options.encrypt:
            raise P2PLabError("encrypt=True but the link has no encrypting sealer")
        return sealer

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _start(self, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send bench_start, return the peer's bench_ready (P2PLabError if refused or silent)."""
        rid = int(params["run_id"])
        fut = self.expect("bench_ready", rid)
        self.control.start(params, self._now(), timeout_s)
        self.flush()
        answer: dict[str, Any] = await self._wait(fut, "bench_ready", rid)
        return answer

    # -- throughput ----------------------------------------------------------------------------

    async def run(
        self,
        duration_s: float,
        payload_size: int,
        rate_mbps: float,
        interval_s: float,
        direction: str,
        run_id: int | None,
        options: RunOptions,
    ) -> BenchResult:
        cb.validate_params(payload_size, rate_mbps, duration_s)
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        _, addr = self.link()
        if addr == RELAY_ADDRESS:
            # The rendezvous's budget, not a crash nor a silent loss: paced under it, and the
            # row says so (the receiving end clamps a run it is asked to send the same way).
            rate_mbps, note = relay_clamp(rate_mbps, payload_size)
            options = replace(options, flow_control=False, note=note)
        rid = run_id if run_id is not None else new_run_id()
        if direction == "receive":
            return await self._receive(
                rid, duration_s, payload_size, rate_mbps, interval_s, options
            )
        if direction != "send":
            raise ValueError(f"direction must be 'send' or 'receive', got {direction!r}")
        task = asyncio.current_task()
        borrowed = self.sending is None or self.sending.done()
        if borrowed:
            self.sending = task
        try:
            return await self._send(rid, duration_s, payload_size, rate_mbps, interval_s, options)
        finally:
            # A caller's task outlives its run: forget it, or closing the extension later would
            # cancel whatever that task does next (a notebook cell, a script's main).  A task the
            # extension made for a requested run stays, so its result can still be read.
            if borrowed and self.sending is task:
                self.sending = None

    async def _receive(
        self,
        rid: int,
        duration_s: float,
        size: int,
        rate: float,
        interval_s: float,
        options: RunOptions,
    ) -> BenchResult:
        fut: asyncio.Future[BenchResult] = asyncio.get_running_loop().create_future()
        self.answering.received_results[rid] = fut
        self.control.request(
            {
                "run_id": rid,
                "duration_s": duration_s,
                "payload_size": size,
                "rate_mbps": rate,
                "interval_s": interval_s,
                "encrypt": options.encrypt,
                "flow_control": options.flow_control,
            },
            self._now(),
            options.timeout_s,
        )
        self.flush()
        try:
            return await asyncio.wait_for(fut, duration_s + 2 * options.timeout_s)
        finally:
            self.answering.received_results.pop(rid, None)
            self.control.cancel(rid)

    async def _send(
        self,
        rid: int,
        duration_s: float,
        size: int,
        rate: float,
        interval_s: float,
        options: RunOptions,
    ) -> BenchResult:
        h = self.host
        ep, addr = self.link()
        sealer = self.sealer(options)
        extra = overhead(sealer)
        if size - extra < cb.HEADER_SIZE:
            raise ValueError(
                f"payload_size must be >= {cb.HEADER_SIZE + extra} bytes when encrypted"
            )
        started_at = now_iso()
        use_gso = ep.gso if options.gso is None else (options.gso and ep.gso)
        use_gso = use_gso and h.path not in (TURN_UDP, TURN_TCP)  # bursts of 64 overrun TURN
        params: dict[str, Any] = {
            "mode": "throughput",
            "run_id": rid,
            "duration_s": duration_s,
            "payload_size": size,
            "rate_mbps": rate,
            "interval_s": interval_s,
            "started_at": started_at,
            "gso": use_gso,
            "encrypted": sealer is not None,
            "flow_control": options.flow_control,
            "note": options.note,
        }
        # Reset before the handshake, not after it: a stop() that comes while we wait for
        # bench_ready must end the run, not be lost (the stream then ends at once).
        self.stop_requested = False
        # The path the run measures.  Its datagrams go to the address of that path (ep, addr
        # above), which the engine stops serving when it switches (up to direct, down to a
        # relay): the run ends there rather than count the switch as loss or mix two paths.
        path = h.path
        ready = await self._start(params, options.timeout_s)
        window = ready.get("window") if options.flow_control else None
        if isinstance(window, int) and h.path in (TURN_UDP, TURN_TCP) and not is_pseudo(addr):
            # To the peer's relayed address: the peer reads through its engine (TURN framing
            # in Python), much slower than its socket buffer suggests, while the TURN server
            # forwards at full speed; a window sized to that buffer is lost in between.
            window = min(window, TURN_WINDOW)
        if options.flow_control and not isinstance(window, int):
            params["flow_control"] = False  # a peer without credit reports
        sending = Sending(
            ep,
            addr,
            rid,
            cb.CreditWindow(window) if params["flow_control"] and isinstance(window, int) else None,
            sealer,
        )
        if sending.window is not None:
            ep.set_fast_handler(cb.BENCH_CREDIT, sending.on_credit)
        sent, send_s = 0, 0.0
        try:
            sent, send_s = await stream(
                ep,
                rid,
                size,
                duration_s,
                interval_s,
                use_gso,
                sending,
                rate,
                lambda: self.stop_requested or h.path != path,
                self._progress,
            )
        finally:
            ep.set_fast_handler(cb.BENCH_CREDIT, None)
            end = {
                "run_id": rid,
                "packets_sent": sent,
                "bytes_sent": sent * size,
                "duration_s": send_s,
                "gso": use_gso,
            }
            report_fut = self.expect("bench_report", rid)
            self.control.end(end, self._now(), options.timeout_s + 2 * (h.rtt or 0))
            self.flush()
        report: cb.ReceiverReport | None = None
        try:
            reply = await self._wait(report_fut, "bench_report", rid)
            report = cb.ReceiverReport.from_dict(reply)
        except (P2PLabError, KeyError, TypeError, ValueError) as exc:
            log.warning("run %s: no usable report from the receiver: %s", rid, exc)
        gro = bool(ready.get("gro", False))
        switched = h.path is not None and h.path != path
        if switched:
            # A clear result: the figures are those of the run's first path, up to the switch.
            ended = f"ended early: the path switched from {path} to {h.path} during the run"
            params["note"] = f"{params['note']}; {ended}" if params["note"] else ended
        mine = sender_row(h, rid, started_at, params, end, report, local=True, gro=gro)
        rows = [mine]
        if report is not None:
            theirs = receiver_row(
                h, rid, started_at, {**params, "sent_mbps": mine.mbps}, report, gro=gro
            )
            theirs = replace(theirs, local_worker=h.peer_id or "", peer_worker=h.worker_id)
            rows.append(theirs)
            mine = replace(mine, peer_view=theirs)
        if switched:  # the rows name the path they measured, not the one the link is on now
            rows = [replace(r, path=path) for r in rows]
            mine = replace(mine, path=path, peer_view=rows[-1] if report is not None else None)
        for row in rows:
            h.publish(row.to_message())
        h.emit(BenchmarkFinished(rid, mine.to_dict()))
        return mine

    def _progress(self, rid: int, elapsed_s: float, mbps: float, duration_s: float) -> None:
        self.host.publish(
            {
                "type": "benchmark_progress",
                "role": "sender",
                "elapsed_s": round(elapsed_s, 6),
                "mbps": round(mbps, 3),
                "lost": 0,
                "run_id": str(rid),
                "duration_s": duration_s,
            }
        )
        self.host.emit(BenchmarkProgress(rid, "sender", elapsed_s, mbps, 0))

    # -- RTT -----------------------------------------------------------------------------------

    async def rtt(
        self,
        count: int,
        payload_size: int,
        timeout_s: float,
        blocking: bool,
        busy_poll_us: float,
        options: RunOptions,
    ) -> RttResult:
        if count < 1:
            raise ValueError("count must be >= 1")
        if not 0 <= busy_poll_us <= RTT_SPIN_MAX_US:
            raise ValueError(f"busy_poll_us must be between 0 and {RTT_SPIN_MAX_US:g}")
        cb.validate_params(payload_size, 0, 1)
        ep, addr = self.link()
        blocking = blocking and not is_pseudo(addr)  # those pongs come through the engine
        sealer = self.sealer(options)
        if payload_size - overhead(sealer) < cb.HEADER_SIZE:
            raise ValueError(f"payload_size too small for sealed pings: {payload_size}")
        rid = new_run_id()
        started_at = now_iso()
        self.stop_requested = False
        ready = await self._start(
            {
                "mode": "rtt",
                "run_id": rid,
                "payload_size": payload_size,
                "encrypted": sealer is not None,
                "count": count,
                "blocking": blocking,
                "busy_poll_us": busy_poll_us,
                "idle_s": max(RTT_IDLE_S, 3 * timeout_s),
            },
            options.timeout_s,
        )
        blocking = blocking and not is_pseudo(addr) and not peer_on_loop(ep, addr)
        # Busy-polling only counts when both ends do it (a peer that sleeps adds its wake-up).
        try:
            peer_spin_us = float(ready.get("busy_poll_us", 0.0)) if ready.get("blocking") else 0.0
        except (TypeError, ValueError):
            peer_spin_us = 0.0
        spin_us = min(busy_poll_us, peer_spin_us) if blocking else 0.0
        wait = ("busy-poll" if spin_us else "blocking") if blocking else "event-loop"
        pinger = Pinger(ep, addr, rid, count, payload_size, sealer)
        self.pinger = pinger
        ep.set_fast_handler(cb.BENCH_PONG, pinger.on_pong)
        done = pinger.done.done
        try:
            pinger.send_next()
            last, since = pinger.seq, time.perf_counter()
            while not done():
                if blocking:
                    ep.read_blocking(done, min(RTT_BLOCK_S, timeout_s), spin_us / 1e6)
                    await asyncio.sleep(0)
                    if ep.closed:
                        raise NotConnected("the endpoint closed during an RTT run")
                else:
                    try:
                        await asyncio.wait_for(asyncio.shield(pinger.done), timeout_s)
                    except TimeoutError:
                        pass
                if done() or self.stop_requested:
                    break
                now = time.perf_counter()
                if pinger.seq != last:
                    last, since = pinger.seq, now
                elif now - since >= timeout_s:  # no progress: that ping is lost
                    pinger.lost += 1
                    pinger.send_next()
                    last, since = pinger.seq, now
        finally:
            ep.set_fast_handler(cb.BENCH_PONG, None)
            self.pinger = None
            self.control.end({"mode": "rtt", "run_id": rid}, self._now(), 0.0)
            self.flush()
        samples = [ns / 1e9 for ns in pinger.samples]
        stats = cb.rtt_percentiles(samples)
        return RttResult(
            count=count,
            received=len(samples),
            lost=pinger.lost,
            payload_size=payload_size,
            run_id=str(rid),
            started_at=started_at,
            local_worker=self.host.worker_id,
            peer_worker=self.host.peer_id or "",
            encrypted=sealer is not None,
            auth_failures=pinger.auth_failures,
            wait=wait,
            busy_poll_us=spin_us,
            samples_ms=tuple(s * 1000 for s in samples),
            **stats,
        )

    async def sweep(
        self,
        sizes: Sequence[int],
        duration_s: float,
        rate_mbps: float,
        interval_s: float,
        progress: bool,
        options: RunOptions,
    ) -> list[BenchResult]:
        """One run per payload size, with a tqdm progress bar (a widget in notebooks)."""
        for size in sizes:
            cb.validate_params(size, rate_mbps, duration_s)
        results: list[BenchResult] = []
        bar: Any = None
        if progress:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]

            bar = tqdm(total=len(sizes), desc="sweep", unit="run")
        try:
            for size in sizes:
                if bar is not None:
                    bar.set_postfix(size=size)
                r = await self.run(duration_s, size, rate_mbps, interval_s, "send", None, options)
                results.append(r)
                if bar is not None:
                    got = r.peer_view.mbps if r.peer_view else 0.0
                    bar.set_postfix(size=size, mbps=f"{got:.0f}", lost=f"{r.lost_percent:.2f}%")
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results
