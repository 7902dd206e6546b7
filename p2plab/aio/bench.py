"""Benchmark: UDP throughput and RTT over a worker's punched link (issue 4).

Runs over the established path: the worker's own socket (so through the NAT mapping the link
uses), to ``worker.punch.peer_address``.  Coordination rides the session's reliable control
messages, so chat and keep-alives keep flowing during a run::

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
is the driving end (:class:`Benchmark`); the answering end's state is in
:mod:`p2plab.aio.bench_state`, its receiver's accounting in :mod:`p2plab.aio.bench_receiver`, the
ping-pong in :mod:`p2plab.aio.bench_rtt`.

Encryption (issue 8).  By default every benchmark datagram (data, ping, pong, credit) is sealed
whole with the link's sealer (``worker.peer_sealer``, a ChaCha20-Poly1305
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
itself (``UdpEndpoint.read_blocking``, on the loop thread, in chunks of at most ``_RTT_BLOCK_S``,
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
writability on EAGAIN.  The receiver gets reads in batches from the endpoint (``recvmmsg``, GRO
aware), opens sealed ones into one scratch buffer (``PeerCipher.open_many_into``) and parses and
counts them with numpy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from p2plab.aio.bench_common import (
    _CREDIT_TIMEOUT_NS,
    _RTT_BLOCK_S,
    _RTT_IDLE_S,
    _RTT_SPIN_MAX_US,
    _RTT_SPIN_US,
    _YIELD_NS,
    BenchSealer,
    _new_run_id,
    _now_iso,
    _open,
    _overhead,
    _peer_on_loop,
    _receiver_row,
    _same,
    _sender_row,
)
from p2plab.aio.bench_rtt import (
    _Pinger,
)
from p2plab.aio.bench_state import _BenchState
from p2plab.aio.bench_ui import (
    register_cli,
    start_benchmark_from_ui,
    stop_benchmark_from_ui,
)
from p2plab.core import bench as cb
from p2plab.core.crypto import SEAL_OVERHEAD
from p2plab.errors import NotConnected, P2PLabError
from p2plab.results import BenchResult, RttResult

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address, UdpEndpoint
    from p2plab.aio.worker import Worker

__all__ = [
    "BenchResult",
    "BenchSealer",
    "Benchmark",
    "RttResult",
    "register_cli",
    "start_benchmark_from_ui",
    "stop_benchmark_from_ui",
]

log = logging.getLogger(__name__)


# -- per-worker state ---------------------------------------------------------------------------


class _Sending:
    """The sender's side of a run: the credit window, fed by BENCH_CREDIT datagrams."""

    def __init__(
        self,
        endpoint: UdpEndpoint,
        addr: Address,
        run_id: int,
        window: cb.CreditWindow | None,
        sealer: BenchSealer | None,
    ) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.run_id = run_id
        self.window = window
        self.sealer = sealer
        self.waiter: asyncio.Future[None] | None = None
        self.auth_failures = 0
        self.last_credit_ns = time.monotonic_ns()

    def on_credit(self, view: memoryview, addr: Address) -> None:
        """Fast handler for BENCH_CREDIT."""
        if self.window is None or not _same(addr, self.addr):
            return
        pt = _open(self.sealer, view)
        if pt is None:
            self.auth_failures += 1
            return
        if len(pt) < cb.HEADER_SIZE:
            return
        _, _, _, run, consumed, received = cb.HEADER.unpack_from(pt)
        if run != self.run_id:
            return
        self.window.update(consumed, received)
        self.last_credit_ns = time.monotonic_ns()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


# -- the public API ----------------------------------------------------------------------------


class Benchmark:
    """UDP throughput and RTT measurements over ``worker``'s connected peer link."""

    def __init__(
        self,
        worker: Worker,
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
        self.gso = gso
        self.timeout_s = timeout_s
        self.encrypt = encrypt
        self.flow_control = flow_control
        self.state = _BenchState.of(worker)
        if sealer is not None:
            self.state.sealer_override = sealer

    def _link(self) -> tuple[UdpEndpoint, Address]:
        w = self.worker
        addr = w.punch.peer_address if w.punch is not None else None
        if w.state == "relayed":
            raise NotConnected(
                "the link is relayed through the rendezvous: benchmarks need a direct path"
            )
        if w.endpoint is None or addr is None or w.state != "connected":
            raise NotConnected("no peer connected: a benchmark needs a connected peer")
        return w.endpoint, addr

    def _sealer(self) -> BenchSealer | None:
        """The sealer this run uses (None: unencrypted)."""
        if self.encrypt is False:
            return None
        sealer = self.state.sealer()
        if sealer is None and self.encrypt:
            raise P2PLabError("encrypt=True but the link has no encrypting sealer")
        return sealer

    async def _ask(self, obj: dict[str, Any], reply: str, timeout: float) -> dict[str, Any]:
        fut = self.state.wait_for(reply, int(obj["run_id"]))
        self.worker.send_control(obj)
        try:
            answer = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise P2PLabError(
                f"peer did not answer {obj['type']} with {reply} in {timeout} s"
            ) from None
        finally:
            self.state.waiters.pop((reply, int(obj["run_id"])), None)
        if answer.get("error"):
            raise P2PLabError(f"peer refused {obj['type']}: {answer['error']}")
        return answer

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
        cb.validate_params(payload_size, rate_mbps, duration_s)
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._link()
        rid = run_id if run_id is not None else _new_run_id()
        if direction == "receive":
            return await self._receive(rid, duration_s, payload_size, rate_mbps, interval_s)
        if direction != "send":
            raise ValueError(f"direction must be 'send' or 'receive', got {direction!r}")
        task = asyncio.current_task()
        if self.state.sending is None or self.state.sending.done():
            self.state.sending = task
        return await self._send(rid, duration_s, payload_size, rate_mbps, interval_s)

    async def _receive(
        self, rid: int, duration_s: float, size: int, rate: float, interval_s: float
    ) -> BenchResult:
        fut: asyncio.Future[BenchResult] = asyncio.get_running_loop().create_future()
        self.state.received_results[rid] = fut
        self.worker.send_control(
            {
                "type": "bench_request",
                "run_id": rid,
                "duration_s": duration_s,
                "payload_size": size,
                "rate_mbps": rate,
                "interval_s": interval_s,
                "encrypt": self.encrypt,
                "flow_control": self.flow_control,
            }
        )
        try:
            return await asyncio.wait_for(fut, duration_s + 2 * self.timeout_s)
        finally:
            self.state.received_results.pop(rid, None)

    async def _send(
        self, rid: int, duration_s: float, size: int, rate: float, interval_s: float
    ) -> BenchResult:
        w = self.worker
        ep, addr = self._link()
        sealer = self._sealer()
        overhead = _overhead(sealer)
        if size - overhead < cb.HEADER_SIZE:
            raise ValueError(
                f"payload_size must be >= {cb.HEADER_SIZE + overhead} bytes when encrypted"
            )
        started_at = _now_iso()
        use_gso = ep.gso if self.gso is None else (self.gso and ep.gso)
        params = {
            "type": "bench_start",
            "mode": "throughput",
            "run_id": rid,
            "duration_s": duration_s,
            "payload_size": size,
            "rate_mbps": rate,
            "interval_s": interval_s,
            "started_at": started_at,
            "gso": use_gso,
            "encrypted": sealer is not None,
            "flow_control": self.flow_control,
        }
        ready = await self._ask(params, "bench_ready", self.timeout_s)
        window = ready.get("window") if self.flow_control else None
        if self.flow_control and not isinstance(window, int):
            params["flow_control"] = False  # a peer without credit reports
        sending = _Sending(
            ep,
            addr,
            rid,
            cb.CreditWindow(window) if params["flow_control"] and isinstance(window, int) else None,
            sealer,
        )
        if sending.window is not None:
            ep.set_fast_handler(cb.BENCH_CREDIT, sending.on_credit)
        sent, send_s = 0, 0.0
        self.state.stop_requested = False
        try:
            sent, send_s = await self._stream(
                ep, addr, rid, size, rate, duration_s, interval_s, use_gso, sending
            )
        finally:
            ep.set_fast_handler(cb.BENCH_CREDIT, None)
            end = {
                "type": "bench_end",
                "run_id": rid,
                "packets_sent": sent,
                "bytes_sent": sent * size,
                "duration_s": send_s,
                "gso": use_gso,
            }
            try:
                w.send_control(end)
            except P2PLabError as exc:
                log.info("cannot send bench_end: %s", exc)
        report: cb.ReceiverReport | None = None
        try:
            reply = await self._ask_wait("bench_report", rid, self.timeout_s + 2 * (w.rtt or 0))
            report = cb.ReceiverReport.from_dict(reply["report"])
        except (P2PLabError, KeyError, TypeError, ValueError) as exc:
            log.warning("run %s: no usable report from the receiver: %s", rid, exc)
        gro = bool(ready.get("gro", False))
        mine = _sender_row(w, rid, started_at, params, end, report, local=True, gro=gro)
        rows = [mine]
        if report is not None:
            theirs = _receiver_row(
                w, rid, started_at, {**params, "sent_mbps": mine.mbps}, report, gro=gro
            )
            theirs = replace(theirs, local_worker=w.peer_id or "", peer_worker=w.worker_id)
            rows.append(theirs)
            mine = replace(mine, peer_view=theirs)
        for row in rows:
            w.publish(row.to_message())
        return mine

    async def _ask_wait(self, reply: str, rid: int, timeout: float) -> dict[str, Any]:
        fut = self.state.waiters.get((reply, rid))
        if fut is None:
            fut = self.state.wait_for(reply, rid)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise P2PLabError(f"no {reply} within {timeout:.1f} s") from None
        finally:
            self.state.waiters.pop((reply, rid), None)

    async def _stream(
        self,
        ep: UdpEndpoint,
        addr: Address,
        rid: int,
        size: int,
        rate: float,
        duration_s: float,
        interval_s: float,
        gso: bool,
        sending: _Sending,
    ) -> tuple[int, float]:
        """Send BENCH_DATA for ``duration_s``; returns (datagrams sent, seconds spent)."""
        # The report future must exist before bench_end can be answered.
        self.state.wait_for("bench_report", rid)
        sealer = sending.sealer
        window = sending.window
        plain = size - _overhead(sealer)
        per_call = min(64, 65507 // size) if gso else 1
        batch = max(1, min(256, (256 * 1024) // size)) if not gso else per_call * 4
        template = cb.make_template(cb.BENCH_DATA, rid, plain, batch)
        tview = memoryview(template)
        out = bytearray(size * batch) if sealer is not None else template
        # The batch API (PeerCipher.seal_many) seals straight into ``out``; it needs the overhead
        # it was measured with (a sealer with another layout takes the per-datagram path).
        seal_many = getattr(sealer, "seal_many", None)
        if size - plain != SEAL_OVERHEAD:
            seal_many = None
        view = memoryview(out)
        clock = time.monotonic_ns
        loop = asyncio.get_running_loop()
        t0 = clock()
        deadline = t0 + int(duration_s * 1e9)
        pacer = cb.Pacer(rate, size, start=0.0, burst=8 * batch)
        seq = 0
        last_yield = t0
        next_report = t0 + int(interval_s * 1e9)
        iv_sent = 0
        iv_start = t0
        now = t0
        while now < deadline and not self.state.stop_requested:
            allow = pacer.allowance((now - t0) / 1e9)
            if allow == 0:
                wait = pacer.next_time() - (now - t0) / 1e9
                await asyncio.sleep(wait if wait > 0.0002 else 0)
                last_yield = now = clock()
                continue
            if window is not None:
                credit = window.allowance(seq)
                if credit == 0:
                    if now - sending.last_credit_ns > _CREDIT_TIMEOUT_NS:
                        # No credit for long: what is in flight is lost; start afresh.
                        window.update(seq, window.received)
                        sending.last_credit_ns = now
                        continue
                    fut: asyncio.Future[None] = loop.create_future()
                    sending.waiter = fut
                    try:
                        await asyncio.wait_for(fut, max(0.001, (deadline - now) / 1e9))
                    except TimeoutError:
                        pass
                    sending.waiter = None
                    last_yield = now = clock()
                    continue
                allow = min(allow, credit)
            n = min(allow, batch)
            cb.fill_headers(template, plain, n, seq, now)
            if seal_many is not None:
                seal_many(template, plain, n, out)
            elif sealer is not None:
                seal = sealer.seal_datagram
                for i in range(n):
                    out[i * size : (i + 1) * size] = seal(bytes(tview[i * plain : (i + 1) * plain]))
            got = ep.send_segments(view, size, n, addr, gso=gso)
            seq += got
            iv_sent += got
            pacer.consumed(got)
            now = clock()
            if got < n:
                if ep.closed:
                    break
                await ep.wait_writable()
                last_yield = now = clock()
            elif now - last_yield > _YIELD_NS:
                await asyncio.sleep(0)
                last_yield = now = clock()
            if now >= next_report:
                secs = (now - iv_start) / 1e9
                self.worker.publish(
                    {
                        "type": "benchmark_progress",
                        "role": "sender",
                        "elapsed_s": round((now - t0) / 1e9, 6),
                        "mbps": round(iv_sent * size * 8 / secs / 1e6, 3) if secs else 0.0,
                        "lost": 0,
                        "run_id": str(rid),
                        "duration_s": duration_s,
                    }
                )
                iv_sent, iv_start = 0, now
                next_report += int(interval_s * 1e9)
        end = clock()
        if iv_sent and end > iv_start:
            self.worker.publish(
                {
                    "type": "benchmark_progress",
                    "role": "sender",
                    "elapsed_s": round((end - t0) / 1e9, 6),
                    "mbps": round(iv_sent * size * 8 / ((end - iv_start) / 1e9) / 1e6, 3),
                    "lost": 0,
                    "run_id": str(rid),
                    "duration_s": duration_s,
                }
            )
        return seq, (end - t0) / 1e9

    async def rtt(
        self,
        count: int = 1000,
        payload_size: int = 64,
        timeout_s: float = 1.0,
        *,
        blocking: bool = True,
        busy_poll_us: float = _RTT_SPIN_US,
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
        if count < 1:
            raise ValueError("count must be >= 1")
        if not 0 <= busy_poll_us <= _RTT_SPIN_MAX_US:
            raise ValueError(f"busy_poll_us must be between 0 and {_RTT_SPIN_MAX_US:g}")
        cb.validate_params(payload_size, 0, 1)
        ep, addr = self._link()
        sealer = self._sealer()
        if payload_size - _overhead(sealer) < cb.HEADER_SIZE:
            raise ValueError(f"payload_size too small for sealed pings: {payload_size}")
        rid = _new_run_id()
        started_at = _now_iso()
        ready = await self._ask(
            {
                "type": "bench_start",
                "mode": "rtt",
                "run_id": rid,
                "payload_size": payload_size,
                "encrypted": sealer is not None,
                "count": count,
                "blocking": blocking,
                "busy_poll_us": busy_poll_us,
                "idle_s": max(_RTT_IDLE_S, 3 * timeout_s),
            },
            "bench_ready",
            self.timeout_s,
        )
        blocking = blocking and not _peer_on_loop(ep, addr)
        # Busy-polling only counts when both ends do it (a peer that sleeps adds its wake-up).
        try:
            peer_spin_us = float(ready.get("busy_poll_us", 0.0)) if ready.get("blocking") else 0.0
        except (TypeError, ValueError):
            peer_spin_us = 0.0
        spin_us = min(busy_poll_us, peer_spin_us) if blocking else 0.0
        wait = ("busy-poll" if spin_us else "blocking") if blocking else "event-loop"
        pinger = _Pinger(ep, addr, rid, count, payload_size, sealer)
        self.state.pinger = pinger
        ep.set_fast_handler(cb.BENCH_PONG, pinger.on_pong)
        done = pinger.done.done
        try:
            pinger.send_next()
            last, since = pinger.seq, time.perf_counter()
            while not done():
                if blocking:
                    ep.read_blocking(done, min(_RTT_BLOCK_S, timeout_s), spin_us / 1e6)
                    await asyncio.sleep(0)
                    if ep.closed:
                        raise NotConnected("the endpoint closed during an RTT run")
                else:
                    try:
                        await asyncio.wait_for(asyncio.shield(pinger.done), timeout_s)
                    except TimeoutError:
                        pass
                if done():
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
            self.state.pinger = None
            self.state._control({"type": "bench_end", "mode": "rtt", "run_id": rid})
        samples = [ns / 1e9 for ns in pinger.samples]
        stats = cb.rtt_percentiles(samples)
        return RttResult(
            count=count,
            received=len(samples),
            lost=pinger.lost,
            payload_size=payload_size,
            run_id=str(rid),
            started_at=started_at,
            local_worker=self.worker.worker_id,
            peer_worker=self.worker.peer_id or "",
            encrypted=sealer is not None,
            auth_failures=pinger.auth_failures,
            wait=wait,
            busy_poll_us=spin_us,
            samples_ms=tuple(s * 1000 for s in samples),
            **stats,
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
                r = await self.run(duration_s, size, rate_mbps, interval_s)
                results.append(r)
                if bar is not None:
                    got = r.peer_view.mbps if r.peer_view else 0.0
                    bar.set_postfix(size=size, mbps=f"{got:.0f}", lost=f"{r.lost_percent:.2f}%")
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results
