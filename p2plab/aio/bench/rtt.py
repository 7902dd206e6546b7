"""The RTT ping-pong of :mod:`p2plab.aio.bench`: the pinger and the responder."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from p2plab.aio.bench.common import BenchSealer, open_sealed, overhead, same_address
from p2plab.core import bench as cb

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address, UdpEndpoint

log = logging.getLogger(__name__)

__all__ = ["Pinger", "Responder"]


class Pinger:
    """Callback-driven ping-pong: each pong sends the next ping from the reader callback.

    The next ping is built and sealed while the current one is in flight, so a pong is answered
    by a ``sendto`` of ready bytes.  Its send time is kept here (the ping's timestamp field is
    0, which makes pings predictable for :class:`Responder`'s ready pongs).
    """

    def __init__(
        self,
        endpoint: UdpEndpoint,
        addr: Address,
        run_id: int,
        count: int,
        size: int,
        sealer: BenchSealer | None,
    ) -> None:
        self.endpoint = endpoint
        self.sock = endpoint.socket
        self.addr = addr
        self.run_id = run_id
        self.count = count
        self.sealer = sealer
        plain = size - overhead(sealer)
        self.packet = bytearray(cb.encode_bench(cb.BENCH_PING, run_id, 0, 0, plain))
        self.seq = -1
        self.sent_at = 0
        self.ready: tuple[int, bytes] | None = None  # (seq, datagram) built ahead
        self.samples: list[int] = []
        self.lost = 0
        self.auth_failures = 0
        self.foreign = 0
        self.done: asyncio.Future[None] = endpoint.loop.create_future()

    def _build(self, seq: int) -> bytes:
        cb.TAIL.pack_into(self.packet, 8, seq, 0)
        data = bytes(self.packet)
        return self.sealer.seal_datagram(data) if self.sealer is not None else data

    def send_next(self) -> None:
        self.seq += 1
        seq = self.seq
        if seq >= self.count:
            if not self.done.done():
                self.done.set_result(None)
            return
        ready = self.ready
        data = ready[1] if ready is not None and ready[0] == seq else self._build(seq)
        self.sent_at = time.perf_counter_ns()
        try:
            self.sock.sendto(data, self.addr)
        except OSError as exc:  # counted as lost by the timeout
            self.endpoint.stats["send_errors"] += 1
            log.debug("ping send failed: %s", exc)
            return
        self.endpoint.stats["datagrams_out"] += 1
        self.endpoint.stats["bytes_out"] += len(data)
        self.ready = (seq + 1, self._build(seq + 1)) if seq + 1 < self.count else None

    def on_pong(self, view: memoryview, addr: Address) -> None:
        """Fast handler for BENCH_PONG."""
        now = time.perf_counter_ns()
        if not same_address(addr, self.addr):
            self.foreign += 1
            return
        pt = open_sealed(self.sealer, view)
        if pt is None:
            self.auth_failures += 1
            return
        if len(pt) < cb.HEADER_SIZE:
            return
        _, _, _, run, seq, _ts = cb.HEADER.unpack_from(pt)
        if run != self.run_id or seq != self.seq:
            return  # a late pong of a ping we gave up on
        self.samples.append(now - self.sent_at)
        self.send_next()


class Responder:
    """Answers one run's pings from the endpoint's fast handler (the pong is sent at once).

    After each answer the pong for the next ping (the same ping with the next seq, which is
    what :class:`Pinger` sends) is built and sealed ahead; a ping that opens to exactly that
    gets the ready pong, anything else is answered with a pong built for it.
    """

    def __init__(
        self, endpoint: UdpEndpoint, addr: Address, run_id: int, sealer: BenchSealer | None
    ) -> None:
        self.endpoint = endpoint
        self.sock = endpoint.socket
        self.addr = addr
        self.run_id = run_id.to_bytes(4, "big")
        self.sealer = sealer
        self.answered = 0
        self.dropped = 0
        """Pings not answered: other source, other run, or (sealed) not opening."""
        self.expect: bytes | None = None  # the next ping's plaintext, predicted
        self.ready = b""  # and its pong, built ahead

    def _pong(self, ping: bytes | bytearray | memoryview) -> bytes:
        pong = bytearray(ping)
        pong[3] = cb.BENCH_PONG
        return self.sealer.seal_datagram(bytes(pong)) if self.sealer is not None else bytes(pong)

    def __call__(self, view: memoryview, addr: Address) -> None:
        if not same_address(addr, self.addr):
            self.dropped += 1
            return
        ping = open_sealed(self.sealer, view)
        if ping is None:
            self.dropped += 1
            return
        if len(ping) < cb.HEADER_SIZE or ping[4:8] != self.run_id:
            self.dropped += 1
            return
        out = self.ready if self.expect is not None and ping == self.expect else self._pong(ping)
        try:
            self.sock.sendto(out, addr)
        except OSError as exc:
            self.endpoint.stats["send_errors"] += 1
            log.debug("pong send failed: %s", exc)
            return
        self.answered += 1
        self.endpoint.stats["datagrams_out"] += 1
        self.endpoint.stats["bytes_out"] += len(out)
        nxt = bytearray(ping)
        seq = int.from_bytes(nxt[8:16], "big")
        nxt[8:16] = ((seq + 1) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
        self.expect = bytes(nxt)
        self.ready = self._pong(nxt)
