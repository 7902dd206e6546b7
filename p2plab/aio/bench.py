"""Benchmark: UDP throughput and RTT over a worker's punched link (issue 4).

Runs over the established path: the worker's own socket (so through the NAT mapping the link
uses), to ``worker.punch.peer_address``.  Coordination rides the session's reliable control
messages, so chat and keep-alives keep flowing during a run::

    sender                                   receiver
    bench_start {run_id, params}    ->       arms accounting (bulk sink on the endpoint)
                                    <-       bench_ready {run_id}
    BENCH_DATA datagrams ...        ->       counted (vectorised, exact)
                                    <-       bench_interval {run_id, record}   (each interval)
    bench_end {run_id, packets_sent, ...} -> closes the books after a short grace
                                    <-       bench_report {run_id, report}

Both ends then hold both views and publish ``benchmark_result`` for both roles; each publishes
``benchmark_progress`` once per interval (the sender also relays the receiver's).  RTT mode sends
``BENCH_PING`` datagrams one at a time; the peer echoes them as ``BENCH_PONG`` straight from its
reader callback, and the next ping leaves from ours (no task switch per round trip).

Data path: the sender fills headers of a pre-built batch in place (numpy), sends with UDP GSO when
the kernel has it (``UdpEndpoint.send_segments``), paces with a token bucket and loop timers, and
waits for writability on EAGAIN.  The receiver gets reads in batches from the endpoint (GRO
aware) and parses and counts them with numpy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from p2plab.core import bench as cb
from p2plab.errors import NotConnected, P2PLabError
from p2plab.results import BenchResult, RttResult

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address, UdpEndpoint
    from p2plab.aio.worker import Worker

__all__ = [
    "BenchResult",
    "Benchmark",
    "RttResult",
    "register_cli",
    "start_benchmark_from_ui",
    "stop_benchmark_from_ui",
]

log = logging.getLogger(__name__)

_PATH_MTU_PAYLOAD = 1472  # 1500 - IPv4 20 - UDP 8: larger datagrams fragment on Ethernet paths
_MAX_REPORT_BYTES = 12_000  # the session caps control messages at 16 KiB
_YIELD_NS = 2_000_000  # a sender yields to the loop at least this often


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def _new_run_id() -> int:
    return int.from_bytes(os.urandom(4), "big") or 1


# -- per-worker state ---------------------------------------------------------------------------


class _Receiving:
    """A run this worker receives."""

    def __init__(self, state: _BenchState, run_id: int, params: dict[str, Any]) -> None:
        self.state = state
        self.run_id = run_id
        self.params = params
        self.rx = cb.BenchReceiver(run_id, interval_s=float(params.get("interval_s", 1.0)))
        self.started_at = str(params.get("started_at") or _now_iso())
        self.ticker: asyncio.Task[None] | None = None
        self.done = False
        self.published = 0

    def sink(
        self, buf: memoryview, reads: list[tuple[int, int, int, int]]
    ) -> list[tuple[int, int, int]]:
        return _account(self.rx, buf, reads)


def _account(
    rx: cb.BenchReceiver, buf: memoryview, reads: list[tuple[int, int, int, int]]
) -> list[tuple[int, int, int]]:
    """Bulk sink body: split GRO reads, parse headers, count BENCH_DATA; return the rest."""
    np = cb.np
    left: list[tuple[int, int, int]] = []
    if np is None:
        for i, (off, n, seg, arr) in enumerate(reads):
            for s in range(off, off + n, seg):
                e = min(s + seg, off + n)
                h = cb.parse_bench(buf[s:e])
                if h is None or h.type != cb.BENCH_DATA:
                    left.append((i, s, e))
                else:
                    rx.receive(h.run_id, h.seq, h.send_ts_ns, e - s, arr)
        return left
    r = np.array(reads, dtype=np.int64)
    off, n, seg, arr = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
    if bool((seg >= n).all()):
        ridx = np.arange(len(reads))
        offs, lens, arrs = off, n, arr
    else:
        counts = -(-n // seg)
        ridx = np.repeat(np.arange(len(reads)), counts)
        first = np.cumsum(counts) - counts
        k = np.arange(int(counts.sum())) - first[ridx]
        offs = off[ridx] + k * seg[ridx]
        lens = np.minimum(seg[ridx], off[ridx] + n[ridx] - offs)
        arrs = arr[ridx]
    ok = lens >= cb.HEADER_SIZE
    kinds, runs, seqs, ts = cb.parse_headers(buf, np.where(ok, offs, 0))
    data = ok & (kinds == cb.BENCH_DATA)
    if bool(data.all()):
        rx.receive_batch(runs, seqs, ts, lens, arrs)
        return left
    rx.receive_batch(runs[data], seqs[data], ts[data], lens[data], arrs[data])
    for j in np.flatnonzero(~data).tolist():
        left.append((int(ridx[j]), int(offs[j]), int(offs[j] + lens[j])))
    return left


class _Pinger:
    """Callback-driven ping-pong: each pong sends the next ping from the reader callback."""

    def __init__(
        self, endpoint: UdpEndpoint, addr: Address, run_id: int, count: int, size: int
    ) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.run_id = run_id
        self.count = count
        self.size = size
        self.packet = bytearray(cb.encode_bench(cb.BENCH_PING, run_id, 0, 0, size))
        self.seq = -1
        self.samples: list[float] = []
        self.lost = 0
        self.done: asyncio.Future[None] = endpoint.loop.create_future()

    def send_next(self) -> None:
        self.seq += 1
        if self.seq >= self.count:
            if not self.done.done():
                self.done.set_result(None)
            return
        cb._TAIL.pack_into(self.packet, 8, self.seq, time.perf_counter_ns())
        self.endpoint.sendto(bytes(self.packet), self.addr)

    def on_pong(self, h: cb.BenchHeader) -> None:
        if h.run_id != self.run_id or h.seq != self.seq:
            return  # a late pong of a ping we gave up on
        self.samples.append((time.perf_counter_ns() - h.send_ts_ns) / 1e9)
        self.send_next()


class _BenchState:
    """What p2plab.aio.bench keeps on a worker (``worker.benchmark``)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.receiving: _Receiving | None = None
        self.sending: asyncio.Task[Any] | None = None
        self.waiters: dict[tuple[str, int], asyncio.Future[dict[str, Any]]] = {}
        self.received_results: dict[int, asyncio.Future[BenchResult]] = {}
        self.pinger: _Pinger | None = None
        self.late = 0
        """Benchmark datagrams that arrived outside any run (dropped)."""
        self.stop_requested = False
        worker.datagram_hooks.insert(0, self.hook)

    @staticmethod
    def of(worker: Worker) -> _BenchState:
        state = getattr(worker, "benchmark", None)
        if not isinstance(state, _BenchState):
            state = _BenchState(worker)
            worker.benchmark = state
        return state

    # -- datagrams ----------------------------------------------------------------------------

    def hook(self, data: bytes, addr: Address) -> bool:
        if len(data) < 4 or data[0] != 0xD7 or data[1] != 0x50 or data[3] not in range(0x20, 0x30):
            return False
        h = cb.parse_bench(data)
        if h is not None and h.type == cb.BENCH_PING:
            # Echo at once: the pong is the ping with its type changed.
            ep = self.worker.endpoint
            if ep is not None:
                ep.sendto(data[:3] + bytes((cb.BENCH_PONG,)) + data[4:], addr)
            return True
        if h is not None and h.type == cb.BENCH_PONG and self.pinger is not None:
            self.pinger.on_pong(h)
            return True
        if h is not None and h.type == cb.BENCH_DATA and self.receiving is not None:
            self.receiving.rx.receive(h.run_id, h.seq, h.send_ts_ns, len(data), time.monotonic_ns())
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
        except (KeyError, TypeError, ValueError):
            log.debug("bad bench_start %r", obj)
            return
        ep = self.worker.endpoint
        if ep is None:
            return
        if mode == "throughput":
            self._disarm()
            rec = _Receiving(self, run_id, obj)
            self.receiving = rec
            ep.set_bulk_sink({cb.BENCH_DATA}, rec.sink)
            rec.ticker = asyncio.get_running_loop().create_task(self._tick(rec))
        self._control({"type": "bench_ready", "run_id": run_id, "gro": ep.gro})

    def _disarm(self) -> None:
        rec = self.receiving
        if rec is not None and rec.ticker is not None:
            rec.ticker.cancel()
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
        rec.done = True
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
        """The peer asks us to send to it (``direction="receive"`` on its side)."""
        if self.sending is not None and not self.sending.done():
            return
        try:
            kwargs = {
                "duration_s": float(obj["duration_s"]),
                "payload_size": int(obj["payload_size"]),
                "rate_mbps": float(obj.get("rate_mbps", 0)),
                "interval_s": float(obj.get("interval_s", 1.0)),
                "run_id": int(obj["run_id"]),
            }
            cb.validate_params(kwargs["payload_size"], kwargs["rate_mbps"], kwargs["duration_s"])
        except (KeyError, TypeError, ValueError) as exc:
            log.info("refusing bench_request: %s", exc)
            return
        self.sending = asyncio.get_running_loop().create_task(
            Benchmark(self.worker).run(**kwargs)  # type: ignore[arg-type]
        )

    def on_stop(self, obj: dict[str, Any]) -> None:
        self.stop_requested = True
        if self.sending is not None:
            self.sending.cancel()

    def _control(self, obj: dict[str, Any]) -> None:
        try:
            self.worker.send_control(obj)
        except (NotConnected, P2PLabError) as exc:
            log.info("cannot send %s: %s", obj.get("type"), exc)


def _peer_worker(w: Worker) -> str:
    return w.peer_id or ""


def _path(w: Worker) -> str | None:
    try:
        return str(w.status().get("path"))
    except Exception:  # status is best effort here
        return None


def _rtt_ms(w: Worker) -> float | None:
    rtt = w.rtt
    return round(rtt * 1000, 3) if rtt is not None else None


def _receiver_row(
    w: Worker,
    run_id: int,
    started_at: str,
    params: dict[str, Any],
    report: cb.ReceiverReport,
    *,
    gro: bool,
) -> BenchResult:
    size = int(params.get("payload_size", 0))
    return BenchResult(
        role="receiver",
        payload_size=size,
        duration_s=report.duration_s,
        packets_sent=report.packets_sent,
        packets_received=report.packets_received,
        lost=report.lost,
        lost_percent=report.lost_percent,
        out_of_order=report.out_of_order,
        duplicates=report.duplicates,
        jitter_ms=report.jitter_ms,
        mbps=report.mbps,
        rtt_ms=_rtt_ms(w),
        run_id=str(run_id),
        started_at=started_at,
        local_worker=w.worker_id,
        peer_worker=_peer_worker(w),
        path=_path(w),
        rate_mbps=float(params.get("rate_mbps", 0)),
        bytes_received=report.bytes_received,
        sent_mbps=float(params.get("sent_mbps", 0.0)),
        received_mbps=report.mbps,
        gso=bool(params.get("gso", False)),
        gro=gro,
        fragmented=size > _PATH_MTU_PAYLOAD,
        note="over the path MTU: IP fragments" if size > _PATH_MTU_PAYLOAD else "",
        intervals=report.intervals,
    )


def _sender_row(
    w: Worker,
    run_id: int,
    started_at: str,
    params: dict[str, Any],
    end: dict[str, Any],
    report: cb.ReceiverReport | None,
    *,
    local: bool,
    gro: bool = False,
) -> BenchResult:
    size = int(params.get("payload_size", 0))
    sent = int(end.get("packets_sent", 0))
    send_s = float(end.get("duration_s", 0.0))
    sent_mbps = sent * size * 8 / send_s / 1e6 if send_s > 0 else 0.0
    note = "over the path MTU: IP fragments" if size > _PATH_MTU_PAYLOAD else ""
    if report is None:
        note = (note + "; " if note else "") + "no report from the receiver"
    me, peer = (w.worker_id, _peer_worker(w)) if local else (_peer_worker(w), w.worker_id)
    return BenchResult(
        role="sender",
        payload_size=size,
        duration_s=send_s,
        packets_sent=sent,
        packets_received=report.packets_received if report else 0,
        lost=report.lost if report else sent,
        lost_percent=report.lost_percent if report else (100.0 if sent else 0.0),
        out_of_order=report.out_of_order if report else 0,
        duplicates=report.duplicates if report else 0,
        jitter_ms=report.jitter_ms if report else 0.0,
        mbps=sent_mbps,
        rtt_ms=_rtt_ms(w),
        run_id=str(run_id),
        started_at=started_at,
        local_worker=me,
        peer_worker=peer,
        path=_path(w),
        rate_mbps=float(params.get("rate_mbps", 0)),
        bytes_received=report.bytes_received if report else 0,
        sent_mbps=sent_mbps,
        received_mbps=report.mbps if report else 0.0,
        gso=bool(end.get("gso", False)),
        gro=bool(gro),
        fragmented=size > _PATH_MTU_PAYLOAD,
        note=note,
        intervals=report.intervals if report else (),
    )


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
        "bench_finished",
    ):
        Worker.control_handlers[kind] = _on_control(kind)


_register_handlers()


# -- the public API ----------------------------------------------------------------------------


class Benchmark:
    """UDP throughput and RTT measurements over ``worker``'s connected peer link."""

    def __init__(self, worker: Worker, *, gso: bool | None = None, timeout_s: float = 10.0) -> None:
        """``gso``: None uses UDP GSO where the kernel has it; False forces plain sends."""
        self.worker = worker
        self.gso = gso
        self.timeout_s = timeout_s
        self.state = _BenchState.of(worker)

    def _link(self) -> tuple[UdpEndpoint, Address]:
        w = self.worker
        addr = w.punch.peer_address if w.punch is not None else None
        if w.endpoint is None or addr is None or w.state not in ("connected", "relayed"):
            raise NotConnected("no peer connected: a benchmark needs a connected peer")
        return w.endpoint, addr

    async def _ask(self, obj: dict[str, Any], reply: str, timeout: float) -> dict[str, Any]:
        fut = self.state.wait_for(reply, int(obj["run_id"]))
        self.worker.send_control(obj)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise P2PLabError(
                f"peer did not answer {obj['type']} with {reply} in {timeout} s"
            ) from None
        finally:
            self.state.waiters.pop((reply, int(obj["run_id"])), None)

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
        }
        ready = await self._ask(params, "bench_ready", self.timeout_s)
        sent, send_s = 0, 0.0
        self.state.stop_requested = False
        try:
            sent, send_s = await self._stream(
                ep, addr, rid, size, rate, duration_s, interval_s, use_gso
            )
        finally:
            end = {
                "type": "bench_end",
                "run_id": rid,
                "packets_sent": sent,
                "bytes_sent": sent * size,
                "duration_s": send_s,
                "gso": use_gso,
            }
            with contextlib.suppress(P2PLabError):
                w.send_control(end)
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
    ) -> tuple[int, float]:
        """Send BENCH_DATA for ``duration_s``; returns (datagrams sent, seconds spent)."""
        # The report future must exist before bench_end can be answered.
        self.state.wait_for("bench_report", rid)
        per_call = min(64, 65507 // size) if gso else 1
        batch = max(1, min(256, (256 * 1024) // size)) if not gso else per_call * 4
        template = cb.make_template(cb.BENCH_DATA, rid, size, batch)
        view = memoryview(template)
        clock = time.monotonic_ns
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
            n = min(allow, batch)
            cb.fill_headers(template, size, n, seq, now)
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
        self, count: int = 1000, payload_size: int = 64, timeout_s: float = 1.0
    ) -> RttResult:
        """Ping-pong ``count`` datagrams one at a time (unanswered in ``timeout_s``: lost)."""
        if count < 1:
            raise ValueError("count must be >= 1")
        cb.validate_params(payload_size, 0, 1)
        ep, addr = self._link()
        rid = _new_run_id()
        started_at = _now_iso()
        await self._ask(
            {"type": "bench_start", "mode": "rtt", "run_id": rid, "payload_size": payload_size},
            "bench_ready",
            self.timeout_s,
        )
        pinger = _Pinger(ep, addr, rid, count, payload_size)
        self.state.pinger = pinger
        try:
            pinger.send_next()
            last = -1
            while not pinger.done.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pinger.done), timeout_s)
                if pinger.done.done():
                    break
                if pinger.seq == last:  # no progress: that ping is lost
                    pinger.lost += 1
                    pinger.send_next()
                last = pinger.seq
        finally:
            self.state.pinger = None
        stats = cb.rtt_percentiles(pinger.samples)
        return RttResult(
            count=count,
            received=len(pinger.samples),
            lost=pinger.lost,
            payload_size=payload_size,
            run_id=str(rid),
            started_at=started_at,
            local_worker=self.worker.worker_id,
            peer_worker=self.worker.peer_id or "",
            samples_ms=tuple(s * 1000 for s in pinger.samples),
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
            from tqdm.auto import tqdm

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


# -- UI entry points (called by p2plab.server.worker_app) --------------------------------------


async def start_benchmark_from_ui(worker: Worker, msg: dict[str, Any]) -> dict[str, Any] | None:
    """Start a run in the background for a ``start_benchmark`` UI message; error dict or None."""
    try:
        duration = float(msg.get("duration_s", 5))
        size = int(msg.get("payload_size", 1200))
        rate = float(msg.get("rate_mbps", 0) or 0)
        cb.validate_params(size, rate, duration)
    except (TypeError, ValueError) as exc:
        return {"type": "error", "message": f"start_benchmark: {exc}"}
    if worker.state not in ("connected", "relayed") or worker.punch is None:
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
    """Add ``p2plab bench`` to the CLI."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="run UDP benchmarks against a peer worker (both sides run this command)"
    )
    p.add_argument("--rendezvous", required=True, help="ws://HOST:PORT of the rendezvous")
    p.add_argument("--stun", action="append", default=[], help="STUN server HOST:PORT")
    p.add_argument("--room", default="default")
    p.add_argument("--token", default=None)
    p.add_argument("--udp-port", type=int, default=0)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    p.add_argument("--size", type=int, default=1200, help="UDP payload bytes (64..65507)")
    p.add_argument("--rate", type=float, default=0.0, help="target Mbit/s (0: as fast as possible)")
    p.add_argument("--interval", type=float, default=1.0, help="report interval, seconds")
    p.add_argument("--sweep", default=None, help="comma-separated payload sizes, one run each")
    p.add_argument("--rtt", type=int, default=0, help="also ping-pong this many times")
    p.add_argument("--no-gso", action="store_true", help="plain sends even where GSO exists")
    p.add_argument(
        "--role",
        choices=("auto", "send", "receive"),
        default="auto",
        help="auto: the worker with the smaller id sends, the other answers",
    )
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--csv", default=None, help="write the results (both views) to this CSV")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_bench)


def _table(results: Sequence[BenchResult]) -> str:
    head = f"{'size':>6} {'sent':>9} {'recv':>9} {'lost%':>7} {'ooo':>5} {'dup':>4} "
    head += f"{'jit ms':>7} {'send Mb/s':>10} {'recv Mb/s':>10} {'gso':>4} {'gro':>4}"
    lines = [head]
    for r in results:
        lines.append(
            f"{r.payload_size:>6} {r.packets_sent:>9} {r.packets_received:>9} "
            f"{r.lost_percent:>7.3f} {r.out_of_order:>5} {r.duplicates:>4} {r.jitter_ms:>7.3f} "
            f"{r.sent_mbps:>10.1f} {r.received_mbps:>10.1f} {r.gso!s:>4} {r.gro!s:>4}"
        )
    return "\n".join(lines)


async def _cmd_bench(args: argparse.Namespace) -> int:
    from p2plab.aio.worker import Worker, WorkerConfig
    from p2plab.results import results_to_json, write_csv

    config = WorkerConfig(
        rendezvous_url=args.rendezvous,
        stun_servers=tuple(s for v in args.stun for s in v.split(",") if s),
        udp_port=args.udp_port,
        http_port=None,
        room=args.room,
        token=args.token,
        nat_report=False,
    )
    worker = Worker(config)
    await worker.start()
    try:
        await worker.wait_connected(timeout=args.connect_timeout)
        state = _BenchState.of(worker)
        role = args.role
        if role == "auto":
            role = "send" if worker.worker_id < (worker.peer_id or "") else "receive"
        if role == "receive":
            done = state.wait_for("bench_finished", 0)
            print(f"worker {worker.worker_id}: answering benchmarks", file=sys.stderr, flush=True)
            await done
            return 0
        bench = Benchmark(worker, gso=False if args.no_gso else None)
        sizes = [int(s) for s in args.sweep.split(",")] if args.sweep else [args.size]
        if len(sizes) > 1:
            results = await bench.sweep(sizes, args.duration, args.rate, args.interval)
        else:
            results = [await bench.run(args.duration, sizes[0], args.rate, args.interval)]
        rtt = await bench.rtt(args.rtt) if args.rtt else None
        with contextlib.suppress(P2PLabError):
            worker.send_control({"type": "bench_finished", "run_id": 0})
            await asyncio.sleep(0.2)
        if args.csv:
            write_csv(results, args.csv, both_views=True)
        if args.json:
            out: dict[str, Any] = {"results": json.loads(results_to_json(results))}
            if rtt is not None:
                out["rtt"] = rtt.to_dict()
            print(json.dumps(out, indent=2))
        else:
            print(_table(results))
            if rtt is not None:
                print(
                    f"rtt: {rtt.received}/{rtt.count} p50 {rtt.p50_ms:.3f} ms "
                    f"p90 {rtt.p90_ms:.3f} ms p99 {rtt.p99_ms:.3f} ms min {rtt.min_ms:.3f} ms"
                )
        return 0
    finally:
        await worker.stop()
