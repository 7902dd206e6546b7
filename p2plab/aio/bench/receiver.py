"""The receiving side of a throughput run (:mod:`p2plab.aio.bench`): a run's state and the
exact, vectorised accounting of the datagrams it receives (sealed or not).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from p2plab.aio.bench.common import (
    BODY,
    CREDIT_NS,
    CREDIT_TIMER_S,
    P2P_HEADER,
    BenchSealer,
    now_iso,
)
from p2plab.aio.bench.common import (
    np as numpy_module,
)
from p2plab.core import bench as cb
from p2plab.core.crypto import SEAL_OVERHEAD

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address, UdpEndpoint

log = logging.getLogger(__name__)

__all__ = ["Receiving", "account", "account_sealed"]


class Receiving:
    """A run this worker receives."""

    def __init__(
        self,
        endpoint: UdpEndpoint,
        run_id: int,
        params: dict[str, Any],
        sealer: BenchSealer | None,
        addr: Address | None,
    ) -> None:
        self.endpoint = endpoint
        self.run_id = run_id
        self.params = params
        self.sealer = sealer
        self.addr = addr
        self.rx = cb.BenchReceiver(run_id, interval_s=float(params.get("interval_s", 1.0)))
        self.started_at = str(params.get("started_at") or now_iso())
        self.ticker: asyncio.Task[None] | None = None
        self.credit_timer: asyncio.TimerHandle | None = None
        self.done = False
        self.published = 0
        self.last_credit = 0
        self.credits_sent = 0
        self.scratch = [bytearray()]  # opened bodies of one drain (sealed runs)

    def sink(
        self, buf: memoryview, reads: list[tuple[int, int, int, int]]
    ) -> list[tuple[int, int, int]]:
        if self.sealer is not None:
            left = account_sealed(self.rx, self.sealer, buf, reads, self.scratch)
        else:
            left = account(self.rx, buf, reads)
        now = time.monotonic_ns()
        if now - self.last_credit >= CREDIT_NS:
            self.send_credit(now)
        return left

    def send_credit(self, now: int | None = None) -> None:
        """Tell the sender how far we have read (a BENCH_CREDIT datagram, sealed if encrypted)."""
        ep = self.endpoint
        if ep.closed or self.addr is None or self.done:
            return
        self.last_credit = time.monotonic_ns() if now is None else now
        data = cb.encode_credit(self.run_id, self.rx.highest + 1, self.rx.packets)
        if self.sealer is not None:
            data = self.sealer.seal_datagram(data)
        if ep.sendto(data, self.addr):
            self.credits_sent += 1

    def credit_tick(self) -> None:
        if self.done:
            return
        if time.monotonic_ns() - self.last_credit >= CREDIT_NS:
            self.send_credit()
        if not self.endpoint.closed:
            self.credit_timer = self.endpoint.loop.call_later(CREDIT_TIMER_S, self.credit_tick)


def _segment_spans(np: Any, reads: list[tuple[int, int, int, int]]) -> tuple[Any, Any, Any, Any]:
    """Expand (offset, length, segment size, arrival) reads into one span per datagram.

    A GRO read holds several datagrams of ``segment size`` bytes (the last may be shorter);
    returns, per datagram, the index of its read, its offset, its length and its arrival time.
    """
    r = np.array(reads, dtype=np.int64)
    off, n, seg, arr = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
    if bool((seg >= n).all()):
        return np.arange(len(reads)), off, n, arr
    counts = -(-n // seg)
    ridx = np.repeat(np.arange(len(reads)), counts)
    first = np.cumsum(counts) - counts
    k = np.arange(int(counts.sum())) - first[ridx]
    offs = off[ridx] + k * seg[ridx]
    lens = np.minimum(seg[ridx], off[ridx] + n[ridx] - offs)
    return ridx, offs, lens, arr[ridx]


def account(
    rx: cb.BenchReceiver, buf: memoryview, reads: list[tuple[int, int, int, int]]
) -> list[tuple[int, int, int]]:
    """Bulk sink body: split GRO reads, parse headers, count BENCH_DATA; return the rest."""
    np = numpy_module()
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
    ridx, offs, lens, arrs = _segment_spans(np, reads)
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


def _account_sealed_np(
    rx: cb.BenchReceiver,
    open_into: Any,
    buf: memoryview,
    reads: list[tuple[int, int, int, int]],
    scratch: list[bytearray],
) -> list[tuple[int, int, int]]:
    """Sealed bulk sink with numpy: spans and types vectorised, bodies opened into ``scratch``
    (``PeerCipher.open_many_into``), their headers parsed as one array."""
    np = numpy_module()
    ridx, offs, lens, arrs = _segment_spans(np, reads)
    raw = np.frombuffer(buf, dtype=np.uint8)
    data = (lens >= 4) & (raw[np.where(lens >= 4, offs + 3, 0)] == cb.BENCH_DATA)
    left: list[tuple[int, int, int]] = []
    if not bool(data.all()):
        for j in np.flatnonzero(~data).tolist():
            left.append((int(ridx[j]), int(offs[j]), int(offs[j] + lens[j])))
        offs, lens, arrs = offs[data], lens[data], arrs[data]
    count = int(offs.size)
    if count == 0:
        return left
    stride = max(int(lens.max()) - P2P_HEADER - SEAL_OVERHEAD, BODY.size)
    if len(scratch[0]) < stride * count:
        scratch[0] = bytearray(stride * count)
    out = scratch[0]
    starts = offs.tolist()
    oks = open_into(buf, list(zip(starts, (offs + lens).tolist(), strict=True)), out, stride)
    ok = np.array(oks, dtype=bool)
    ok &= lens - P2P_HEADER - SEAL_OVERHEAD >= BODY.size
    bodies = np.ndarray(
        shape=(count,),
        dtype=np.dtype([("run", ">u4"), ("seq", ">u8"), ("ts", ">u8")]),
        buffer=out,
        strides=(stride,),
    )
    bad = count - int(np.count_nonzero(ok))
    if bad:
        rx.auth_failures += bad
        bodies, lens, arrs = bodies[ok], lens[ok], arrs[ok]
    if bodies.size:
        rx.receive_batch(
            bodies["run"].astype(np.int64),
            bodies["seq"].astype(np.int64),
            bodies["ts"].astype(np.int64),
            lens,  # the UDP payload, as in plain runs and as iperf3 counts
            arrs,
        )
    return left


def account_sealed(
    rx: cb.BenchReceiver,
    sealer: BenchSealer,
    buf: memoryview,
    reads: list[tuple[int, int, int, int]],
    scratch: list[bytearray] | None = None,
) -> list[tuple[int, int, int]]:
    """Bulk sink body for sealed runs: open every datagram, count those that open."""
    left: list[tuple[int, int, int]] = []
    runs: list[int] = []
    seqs: list[int] = []
    tss: list[int] = []
    sizes: list[int] = []
    arrs: list[int] = []
    open_into = getattr(sealer, "open_many_into", None)
    if open_into is not None and numpy_module() is not None and scratch is not None:
        return _account_sealed_np(rx, open_into, buf, reads, scratch)
    open_many = getattr(sealer, "open_many", None)
    if open_many is not None:
        # Batch API (PeerCipher): one call per drain, the session's fast path inside.
        spans: list[tuple[int, int]] = []
        span_arrs: list[int] = []
        data = cb.BENCH_DATA
        for i, (off, n, seg, arr) in enumerate(reads):
            if seg >= n:
                if buf[off + 3] != data:
                    left.append((i, off, off + n))
                else:
                    spans.append((off, off + n))
                    span_arrs.append(arr)
                continue
            for s in range(off, off + n, seg):
                e = min(s + seg, off + n)
                if buf[s + 3] != data:  # another type carried along in a GRO batch
                    left.append((i, s, e))
                    continue
                spans.append((s, e))
                span_arrs.append(arr)
        if not spans:
            return left
        unpack_body = BODY.unpack_from
        for body, (s, e), arr in zip(open_many(buf, spans), spans, span_arrs, strict=True):
            if body is None or len(body) < BODY.size:
                rx.auth_failures += 1
                continue
            run, seq, ts = unpack_body(body)
            runs.append(run)
            seqs.append(seq)
            tss.append(ts)
            sizes.append(e - s)
            arrs.append(arr)
        if seqs:
            rx.receive_batch(runs, seqs, tss, sizes, arrs)
        return left
    opener = sealer.open_datagram
    unpack = cb.HEADER.unpack_from
    for i, (off, n, seg, arr) in enumerate(reads):
        for s in range(off, off + n, seg):
            e = min(s + seg, off + n)
            if buf[s + 3] != cb.BENCH_DATA:  # another type carried along in a GRO batch
                left.append((i, s, e))
                continue
            pt = opener(bytes(buf[s:e]))
            if pt is None or len(pt) < cb.HEADER_SIZE:
                rx.auth_failures += 1
                continue
            _, _, _, run, seq, ts = unpack(pt)
            runs.append(run)
            seqs.append(seq)
            tss.append(ts)
            sizes.append(e - s)  # the UDP payload, as in plain runs and as iperf3 counts
            arrs.append(arr)
    if seqs:
        rx.receive_batch(runs, seqs, tss, sizes, arrs)
    return left
