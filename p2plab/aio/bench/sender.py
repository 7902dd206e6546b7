"""The sender's data path of a throughput run: pacing, credit window, batched sealed sends.

See :mod:`p2plab.aio.bench.runs` for the whole run; this is the loop that fills headers of a
pre-built batch in place, seals the batch into the send buffer when encrypted, sends with GSO or
``sendmmsg`` (``UdpEndpoint.send_segments``), paces with a token bucket and obeys the receiver's
credit (``BENCH_CREDIT`` datagrams, :class:`Sending`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from p2plab.aio.bench.common import (
    CREDIT_TIMEOUT_NS,
    YIELD_NS,
    BenchSealer,
    open_sealed,
    overhead,
    same_address,
)
from p2plab.core import bench as cb
from p2plab.core.crypto import SEAL_OVERHEAD

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address, UdpEndpoint

__all__ = ["Sending", "stream"]


class Sending:
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
        if self.window is None or not same_address(addr, self.addr):
            return
        pt = open_sealed(self.sealer, view)
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


async def stream(
    ep: UdpEndpoint,
    rid: int,
    size: int,
    duration_s: float,
    interval_s: float,
    gso: bool,
    sending: Sending,
    rate: float,
    stopped: Callable[[], bool],
    progress: Callable[[int, float, float, float], None],
) -> tuple[int, float]:
    """Send BENCH_DATA for ``duration_s`` or until ``stopped()``; returns (datagrams sent,
    seconds spent).  ``progress(run_id, elapsed_s, mbps, duration_s)`` once per interval."""
    addr = sending.addr
    sealer = sending.sealer
    window = sending.window
    plain = size - overhead(sealer)
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
    while now < deadline and not stopped():
        allow = pacer.allowance((now - t0) / 1e9)
        if allow == 0:
            wait = pacer.next_time() - (now - t0) / 1e9
            await asyncio.sleep(wait if wait > 0.0002 else 0)
            last_yield = now = clock()
            continue
        if window is not None:
            credit = window.allowance(seq)
            if credit == 0:
                if now - sending.last_credit_ns > CREDIT_TIMEOUT_NS:
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
        elif now - last_yield > YIELD_NS:
            await asyncio.sleep(0)
            last_yield = now = clock()
        if now >= next_report:
            secs = (now - iv_start) / 1e9
            mbps = iv_sent * size * 8 / secs / 1e6 if secs else 0.0
            progress(rid, (now - t0) / 1e9, mbps, duration_s)
            iv_sent, iv_start = 0, now
            next_report += int(interval_s * 1e9)
    end = clock()
    if iv_sent and end > iv_start:
        mbps = iv_sent * size * 8 / ((end - iv_start) / 1e9) / 1e6
        progress(rid, (end - t0) / 1e9, mbps, duration_s)
    return seq, (end - t0) / 1e9
