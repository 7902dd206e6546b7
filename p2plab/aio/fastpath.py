"""The data fast path of a UDP socket: batched, zero-copy receives and batched sends.

:class:`~p2plab.aio.endpoint.UdpEndpoint` owns the socket, its plain reader and the demultiplexer
every worker needs, and one :class:`FastPath`, which only the benchmark arms (natlab.md, issue
4).  The endpoint hands it the socket, its stats dict and its ``dispatch``, called for every
datagram that is not fast-path traffic.  Nothing here knows about STUN or peers.

Receives.  While :attr:`FastPath.armed` the endpoint's reader hands readable events to
:meth:`FastPath.on_readable`, which reads into one pre-allocated 4 MiB buffer.  A *bulk sink*
gets reads of chosen p2p types (GRO batches included) in batches, once per drain, with no copy
or callback per datagram; with ``recvmmsg(2)`` (:class:`p2plab.aio.udp_os.MmsgIO`) it reads 64
datagrams per call into 256 slots of 64 KiB and its batches span several calls.  Pending
batches are flushed before any other datagram is dispatched: every path sees arrival order.
A *fast handler* gets p2p datagrams of one type straight from the read buffer (the benchmark's
ping-pong answers from there), after which the reader returns to the loop rather than read
once more for an ``EAGAIN`` (the loop's readiness check is level-triggered: nothing is missed).
:meth:`FastPath.read_blocking` reads on the calling thread, blocked in the socket or
busy-polling, for ping-pong without the event loop's wake-up.

Sends.  :meth:`FastPath.send_segments` sends many equal-sized datagrams with UDP GSO
(``UDP_SEGMENT`` per call: the socket is not connected) when available, else ``sendmmsg(2)``
64 per call (still one datagram, one skb each: "plain" in the benchmark), else one ``sendto``
each.  ``mmsg=False`` (or :attr:`FastPath.mmsg` set False) keeps one syscall per datagram, as a
platform without them does.  Everything falls back cleanly where the kernel lacks a feature.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from p2plab.aio.udp_os import (
    CMSG_SPACE,
    MAX_READS_PER_WAKEUP,
    MMSG_BATCH,
    MMSG_FLUSH_BYTES,
    MMSG_RECV_SLOTS,
    RECV_SIZE,
    SOL_UDP,
    U16,
    UDP_MAX_SEGMENTS,
    UDP_SEGMENT,
    Address,
    MmsgIO,
    gro_segment,
    gso_supported,
    mmsg_supported,
    timeval,
)

__all__ = ["FAST_STATS", "BulkSink", "Dispatch", "FastHandler", "FastPath"]

log = logging.getLogger(__name__)

Dispatch = Callable[[bytes, Address], None]
"""The owner's demultiplexer: gets every datagram that is not fast-path traffic (and counts it)."""
FastHandler = Callable[[memoryview, Address], None]
"""Gets one datagram as a view into the read buffer (valid only during the call)."""

FAST_STATS = tuple(
    "datagrams_in bytes_in datagrams_out bytes_out send_errors handler_errors gro_reads gso_sends"
    " truncated bulk_datagrams fast_datagrams mmsg_sends mmsg_reads".split()
)
"""The counters a :class:`FastPath` keeps in the stats dict it is handed (added if missing)."""

_BUF_SIZE = 4 * 1024 * 1024  # the batched reader's buffer: many reads per drain
_P2P_MAGIC0, _P2P_MAGIC1 = 0xD7, 0x50  # the p2p header's magic (p2plab.core.wire)


class BulkSink(Protocol):
    """Receives batched reads of chosen p2p datagram types (see :meth:`FastPath.set_bulk_sink`).

    ``reads`` are ``(offset, nbytes, segment_size, arrival_ns)`` into ``buf``: ``nbytes`` bytes
    holding datagrams of ``segment_size`` bytes back to back (the last may be shorter).  Return the
    ``(read_index, start, end)`` spans the sink did not take (datagrams of other types that a GRO
    batch carried along); the fast path dispatches them normally.
    """

    def __call__(
        self, buf: memoryview, reads: list[tuple[int, int, int, int]]
    ) -> list[tuple[int, int, int]]: ...


class FastPath:
    """The batched and zero-copy paths of one non-blocking UDP socket (see the module doc).

    ``stats`` is the owner's counters dict (shared: the fast path counts into it) and
    ``dispatch`` the owner's demultiplexer for everything that is not fast-path traffic.
    """

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        stats: dict[str, int],
        dispatch: Dispatch,
        *,
        mmsg: bool = True,
        buffer_size: int = _BUF_SIZE,
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._dispatch = dispatch
        for name in FAST_STATS:
            stats.setdefault(name, 0)
        self.stats = stats
        # ``buffer_size``: a socket that never carries bulk data (a birthday pool's) asks for
        # little: 256 of them at the full size would touch 1 GiB
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._one_iov = [self._view[:RECV_SIZE]]  # the read buffer of :meth:`_read_one`
        self._bulk_sink: BulkSink | None = None
        self._bulk_types: frozenset[int] = frozenset()
        self._fast: dict[int, FastHandler] = {}
        self.armed = False
        """A bulk sink or a fast handler is set: the owner's reader hands reads to
        :meth:`on_readable`."""
        self._writable: asyncio.Future[None] | None = None
        self.gso = gso_supported(sock)
        """The kernel supports UDP GSO on this socket (``send_segments`` may use it)."""
        self.gro = False
        """UDP GRO is on for the socket (reads may carry several datagrams); the owner turns it
        on and off (``UdpEndpoint.set_gro``) and keeps this in step."""
        self._mm: MmsgIO | None = None
        if mmsg and mmsg_supported() and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                self._mm = MmsgIO(sock, RECV_SIZE)
            except (OSError, ValueError, TypeError) as exc:  # pragma: no cover - odd platforms
                log.debug("sendmmsg/recvmmsg not usable: %s", exc)
        self.mmsg = self._mm is not None
        """Batched ``sendmmsg``/``recvmmsg`` are used (plain sends of many datagrams, and reads
        while a bulk sink is armed); set False to compare with one syscall per datagram."""
        self._closed = False
        self._poller: Any = None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """The socket is closing: stop, and release a :meth:`wait_writable` waiter."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_writer(self._sock.fileno())
        except Exception:  # pragma: no cover - loop already closed
            pass
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def set_bulk_sink(self, types: frozenset[int] | set[int], sink: BulkSink | None) -> None:
        """Hand reads of p2p datagrams whose type is in ``types`` to ``sink`` in batches.

        ``None`` removes the sink.  Datagrams of other types keep their usual path, in order:
        pending batched reads are flushed before any other datagram is dispatched.
        """
        self._bulk_sink = sink
        self._bulk_types = frozenset(types) if sink is not None else frozenset()
        self.armed = bool(self._bulk_types or self._fast)

    def set_fast_handler(self, kind: int, handler: FastHandler | None) -> None:
        """Hand p2p datagrams of type ``kind`` to ``handler`` straight from the read.

        The handler gets a memoryview into the read buffer (copy what it keeps) and the source
        address; it runs before any other demultiplexing, so it must check the source itself.
        ``None`` removes it.  Meant for latency-critical single datagrams (ping-pong).
        """
        if handler is None:
            self._fast.pop(kind, None)
        else:
            self._fast[kind] = handler
        self.armed = bool(self._bulk_types or self._fast)

    def deliver(
        self, datagrams: list[tuple[bytes, Address]], arrival_ns: int
    ) -> list[tuple[bytes, Address]]:
        """Hand datagrams that did not come from this socket (benchmark datagrams the engine
        received through TURN or the relay) to the fast handler or the bulk sink of their
        type, as if read here: the bulk ones in one batch (the sink's per-call cost is what
        limits a run that arrives through the engine); returns those nobody took."""
        left: list[tuple[bytes, Address]] = []
        bulk: list[tuple[bytes, Address]] = []
        for data, addr in datagrams:
            kind = data[3] if len(data) >= 4 else -1
            handler = self._fast.get(kind)
            if handler is not None:
                try:
                    handler(memoryview(data), addr)
                except Exception:
                    self.stats["handler_errors"] += 1
                    log.exception("fast handler failed on a delivered datagram from %s", addr)
            elif self._bulk_sink is not None and kind in self._bulk_types:
                bulk.append((data, addr))
            else:
                left.append((data, addr))
        sink = self._bulk_sink
        if bulk and sink is not None:
            buf = b"".join(d for d, _ in bulk)
            reads: list[tuple[int, int, int, int]] = []
            off = 0
            for d, _ in bulk:
                reads.append((off, len(d), len(d), arrival_ns))
                off += len(d)
            try:
                rest = sink(memoryview(buf), reads)
            except Exception:
                self.stats["handler_errors"] += 1
                log.exception("bulk sink failed on %d delivered datagrams", len(bulk))
                return left
            left.extend((buf[s:e], bulk[i][1]) for i, s, e in rest)
        return left

    def read_blocking(
        self, until: Callable[[], bool], max_block_s: float, spin_s: float = 0.0
    ) -> None:
        """Run the reader on the calling (loop) thread, blocked in the socket read.

        Returns once ``until()`` is true (checked after every wake-up) or after ``max_block_s``
        seconds (up to twice that: one read may start just before the limit).  Every datagram
        read meanwhile takes its usual path (fast handlers, bulk sink, STUN listeners, peer
        handler), exactly as from the event loop's reader; only the wake-up differs: a blocking
        ``recvmsg`` on the socket alone (blocking mode and ``SO_RCVTIMEO`` set once per call,
        non-blocking again on return), as a ping-pong tool does, instead of a trip through the
        event loop.  The loop is stalled meanwhile, so keep ``max_block_s`` short and yield to
        the loop between calls (the benchmark's RTT mode uses 50 ms).  While a bulk sink is
        armed (its batched reader never blocks) it waits in ``poll(2)`` instead.

        ``spin_s`` > 0 busy-polls: after each datagram (and on entry) the socket is read without
        sleeping for up to ``spin_s`` seconds before falling back to ``poll(2)``, so a reply
        that comes back within that window is read without the scheduler's wake-up (and the
        CPU's idle-state exit) in its latency.  It costs a core while it spins.
        """
        if self._closed:
            return
        sock = self._sock
        clock = time.perf_counter
        deadline = clock() + max_block_s
        if self._bulk_types or spin_s > 0:
            # The batched reader never blocks (MSG_DONTWAIT), and a spinning one must not: the
            # socket stays non-blocking and sleeps, if at all, in poll(2).
            if self._poller is None:
                self._poller = select.poll()
                self._poller.register(sock.fileno(), select.POLLIN)
            poll = self._poller.poll
            read = self._read_one if spin_s > 0 and not self._bulk_types else self.on_readable
            while not until() and not self._closed:
                now = clock()
                left = deadline - now
                if left <= 0:
                    return
                if spin_s > 0:
                    # poll(2) with a zero timeout is the cheapest "anything there?" (~0.5 us
                    # here, a quarter of an empty read through the reader).
                    spin_end = now + min(spin_s, left)
                    while not (ready := bool(poll(0))) and clock() < spin_end:
                        pass
                    if ready:
                        read()
                        continue
                    left = deadline - clock()
                    if left <= 0:
                        return
                if poll(left * 1000.0):
                    read()
            return
        # Blocking reads that give up after max_block_s each (SO_RCVTIMEO: EAGAIN then), set
        # once per call: no extra syscall per datagram (a call may so last up to twice as long).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(max_block_s))
        sock.setblocking(True)
        try:
            while not until() and not self._closed and clock() < deadline:
                self._read_one()  # one datagram per read, so until() is checked after each
        finally:
            if not self._closed:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(0.0))

    def send_segments(
        self,
        buf: memoryview | bytearray | bytes,
        size: int,
        count: int,
        addr: Address,
        *,
        gso: bool = True,
    ) -> int:
        """Send ``count`` datagrams of ``size`` bytes laid out back to back in ``buf``.

        Uses UDP GSO (one ``sendmsg`` per up to 64 datagrams) when ``gso`` and the kernel allow,
        plain ``sendto`` otherwise.  Returns how many went out; fewer than ``count`` means the
        socket buffer is full (await :meth:`wait_writable`) or the OS refused (counted).
        """
        if self._closed or count <= 0:
            return 0
        mv = buf if isinstance(buf, memoryview) else memoryview(buf)
        sock = self._sock
        sent = 0
        per = min(UDP_MAX_SEGMENTS, 65507 // size) if gso and self.gso else 1
        try:
            if per > 1:
                cmsg = [(SOL_UDP, UDP_SEGMENT, U16.pack(size))]
                while sent < count:
                    n = min(per, count - sent)
                    chunk = mv[sent * size : (sent + n) * size]
                    if n == 1:
                        sock.sendto(chunk, addr)
                    else:
                        sock.sendmsg([chunk], cmsg, 0, addr)
                        self.stats["gso_sends"] += 1
                    sent += n
            else:
                mm = self._mm if self.mmsg and count > 1 and not mv.readonly else None
                if mm is not None:
                    while sent < count:
                        got = mm.sendmmsg(mv[sent * size :], size, count - sent, addr)
                        self.stats["mmsg_sends"] += 1
                        sent += got
                        if got == 0:
                            break
                    count = sent  # what is left waits for writability
                sendto = sock.sendto
                while sent < count:
                    sendto(mv[sent * size : (sent + 1) * size], addr)
                    sent += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EIO, errno.EMSGSIZE) and per > 1:
                # GSO refused for this path (segment over the MTU, or no checksum offload):
                # turn it off for this socket and carry on with plain sends.
                log.info("UDP GSO refused (%s); falling back to plain sends", exc)
                self.gso = False
                return sent + self.send_segments(
                    mv[sent * size :], size, count - sent, addr, gso=False
                )
            self.stats["send_errors"] += 1
            log.debug("send to %s failed: %s", addr, exc)
        self.stats["datagrams_out"] += sent
        self.stats["bytes_out"] += sent * size
        return sent

    async def wait_writable(self) -> None:
        """Wait until the socket can take more data (after a short ``send_segments``)."""
        if self._closed:
            return
        if self._writable is None or self._writable.done():
            fut: asyncio.Future[None] = self._loop.create_future()
            self._writable = fut
            fd = self._sock.fileno()

            def ready() -> None:
                self._loop.remove_writer(fd)
                if not fut.done():
                    fut.set_result(None)

            self._loop.add_writer(fd, ready)
        await asyncio.shield(self._writable)

    def _read_one(self) -> None:
        """Read one datagram (if any) and deliver it: the reader of :meth:`read_blocking`.

        Only while no bulk sink is armed.  A datagram of a fast type (not GRO-merged) goes
        straight from the read to its handler, with none of the batching set-up of
        :meth:`on_readable` (which costs ~2 us per wake-up here); anything else takes the
        same route as from there.
        """
        try:
            n, ancdata, flags, addr = self._sock.recvmsg_into(
                self._one_iov, CMSG_SPACE if self.gro else 0
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("recvmsg: %s", exc)
            return
        stats = self.stats
        if flags & socket.MSG_TRUNC:
            stats["truncated"] += 1
            return
        buf = self._buf
        peer = (addr[0], addr[1])
        if not ancdata and n >= 4 and buf[0] == _P2P_MAGIC0 and buf[1] == _P2P_MAGIC1:
            handler = self._fast.get(buf[3])
            if handler is not None:
                stats["datagrams_in"] += 1
                stats["bytes_in"] += n
                stats["fast_datagrams"] += 1
                try:
                    handler(self._view[:n], peer)
                except Exception:
                    stats["handler_errors"] += 1
                    log.exception("fast handler failed for %d bytes from %s", n, peer)
                return
        seg = gro_segment(ancdata, n, stats) if ancdata else n
        if n >= 4 and buf[0] == _P2P_MAGIC0 and buf[1] == _P2P_MAGIC1 and buf[3] in self._fast:
            self._fast_dispatch(0, n, seg, peer)
            return
        view = self._view
        for start in range(0, n, seg):
            self._dispatch(bytes(view[start : min(start + seg, n)]), peer)

    def on_readable(self) -> None:
        """Drain the socket (the owner's reader calls this while :attr:`armed`).

        Reads of the bulk sink's types are batched in the buffer and handed over once per drain
        (with ``recvmmsg`` when :attr:`mmsg`); a fast type goes to its handler and ends the
        drain; anything else is dispatched, after the pending batch.
        """
        if self._bulk_types and self._mm is not None and self.mmsg:
            self._on_readable_mmsg(self._mm)
            return
        sock = self._sock
        view = self._view
        limit = len(self._buf) - RECV_SIZE
        anc = CMSG_SPACE if self.gro else 0
        bulk_types = self._bulk_types
        fast = self._fast
        buf = self._buf
        reads: list[tuple[int, int, int, int]] = []
        addrs: list[Address] = []
        pos = 0
        stats = self.stats
        clock = time.monotonic_ns
        try:
            for _ in range(MAX_READS_PER_WAKEUP):
                try:
                    n, ancdata, flags, addr = sock.recvmsg_into([view[pos : pos + RECV_SIZE]], anc)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    # ICMP port unreachable surfaces as ECONNREFUSED on Linux: not fatal for UDP.
                    log.debug("recvmsg: %s", exc)
                    continue
                if flags & socket.MSG_TRUNC:
                    stats["truncated"] += 1
                    continue
                seg = gro_segment(ancdata, n, stats) if ancdata else n
                if (
                    fast
                    and n >= 4
                    and buf[pos] == _P2P_MAGIC0
                    and buf[pos + 1] == _P2P_MAGIC1
                    and buf[pos + 3] in fast
                ):
                    if reads:
                        self._flush(reads, addrs)
                        reads = []
                        addrs = []
                    peer = (addr[0], addr[1])
                    self._fast_dispatch(pos, n, seg, peer)
                    return  # level-triggered: the loop calls again if more is queued
                if (
                    bulk_types
                    and n >= 4
                    and buf[pos] == _P2P_MAGIC0
                    and buf[pos + 1] == _P2P_MAGIC1
                    and buf[pos + 3] in bulk_types
                ):
                    reads.append((pos, n, seg, clock()))
                    addrs.append((addr[0], addr[1]))
                    pos += n
                    if pos > limit:
                        self._flush(reads, addrs)
                        reads = []
                        addrs = []
                        pos = 0
                    continue
                if reads:
                    # Keep arrival order: batched datagrams go first.  The flush does not touch
                    # the bytes of this read (they lie after every batched read).
                    self._flush(reads, addrs)
                    reads = []
                    addrs = []
                peer = (addr[0], addr[1])
                if seg >= n:
                    self._dispatch(bytes(view[pos : pos + n]), peer)
                else:
                    for start in range(pos, pos + n, seg):
                        self._dispatch(bytes(view[start : min(start + seg, pos + n)]), peer)
                pos = 0
        finally:
            if reads:
                self._flush(reads, addrs)

    def _on_readable_mmsg(self, mm: MmsgIO) -> None:
        """The reader while a bulk sink is armed: ``recvmmsg`` of up to 64 datagrams per call.

        Each message lands in its own 64 KiB slot of the receive buffer (a GRO read fits);
        reads of the sink's types accumulate over up to ``MMSG_RECV_SLOTS`` slots and go to the
        sink in one batch (earlier if another datagram must be dispatched first, to keep the
        order).  Every datagram of one call shares one arrival time (as the datagrams of one GRO
        read do).
        """
        mm.setup_receive()
        np = mm.np
        slot = mm.slot
        buf = mm.rbuf
        assert buf is not None
        view = mm.rview
        heads = mm.rnp
        stats = self.stats
        bulk_list = list(self._bulk_types)
        fast = self._fast
        trunc = int(socket.MSG_TRUNC)
        reads: list[tuple[int, int, int, int]] = []
        addrs: list[Address] = []
        first = 0
        filled = 0  # bytes in the slots since the last flush: keep the batch cache-sized
        try:
            for _ in range(MAX_READS_PER_WAKEUP // MMSG_BATCH):
                if first + MMSG_BATCH > MMSG_RECV_SLOTS or filled > MMSG_FLUSH_BYTES:
                    if reads:
                        self._flush(reads, addrs, view)
                        reads, addrs = [], []
                    first = filled = 0
                try:
                    k = mm.recvmmsg(first)
                except OSError as exc:
                    log.debug("recvmmsg: %s", exc)  # e.g. ECONNREFUSED from an ICMP error
                    continue
                if k <= 0:
                    return
                stats["mmsg_reads"] += 1
                arrival = time.monotonic_ns()
                end = first + k
                lens = mm.r_u32[first:end, 14].tolist()
                filled += sum(lens)
                flags = mm.r_u32[first:end, 12].tolist()
                segs = list(lens)
                if self.gro:
                    stats["gro_reads"] += mm.gro_segments(first, end, segs)
                h = heads[first:end, :4]
                names = mm.names[first:end, :8]
                if (
                    not fast
                    and not any(flags)
                    and bool((names == names[0]).all())
                    and bool(
                        (
                            (h[:, 0] == _P2P_MAGIC0)
                            & (h[:, 1] == _P2P_MAGIC1)
                            & np.isin(h[:, 3], bulk_list)
                            & (mm.r_u32[first:end, 14] >= 4)
                        ).all()
                    )
                ):
                    # The common case at full speed: benchmark data only, from one source.
                    reads.extend(
                        zip(
                            range(first * slot, end * slot, slot),
                            lens,
                            segs,
                            [arrival] * k,
                            strict=True,
                        )
                    )
                    addrs.extend([mm.address(first)] * k)
                    first = end
                    continue
                for i in range(k):
                    pos = (first + i) * slot
                    n = lens[i]
                    if flags[i] & trunc:
                        stats["truncated"] += 1
                        continue
                    addr = mm.address(first + i)
                    kind = buf[pos + 3] if n >= 4 else -1
                    is_p2p = n >= 4 and buf[pos] == _P2P_MAGIC0 and buf[pos + 1] == _P2P_MAGIC1
                    if is_p2p and kind in fast:
                        if reads:
                            self._flush(reads, addrs, view)
                            reads, addrs = [], []
                        self._fast_dispatch(pos, n, segs[i], addr, view)
                        continue
                    if is_p2p and kind in self._bulk_types:
                        reads.append((pos, n, segs[i], arrival))
                        addrs.append(addr)
                        continue
                    if reads:
                        self._flush(reads, addrs, view)
                        reads, addrs = [], []
                    seg = segs[i]
                    for start in range(pos, pos + n, seg):
                        self._dispatch(bytes(buf[start : min(start + seg, pos + n)]), addr)
                first = end
        finally:
            if reads:
                self._flush(reads, addrs, view)

    def _fast_dispatch(
        self, pos: int, n: int, seg: int, addr: Address, view: memoryview | None = None
    ) -> None:
        view = self._view if view is None else view
        stats = self.stats
        for start in range(pos, pos + n, seg):
            end = min(start + seg, pos + n)
            handler = self._fast.get(view[start + 3]) if end - start >= 4 else None
            if handler is None:  # another type inside the same GRO batch
                self._dispatch(bytes(view[start:end]), addr)
                continue
            stats["datagrams_in"] += 1
            stats["bytes_in"] += end - start
            stats["fast_datagrams"] += 1
            try:
                handler(view[start:end], addr)
            except Exception:
                stats["handler_errors"] += 1
                log.exception("fast handler failed for %d bytes from %s", end - start, addr)

    def _flush(
        self,
        reads: list[tuple[int, int, int, int]],
        addrs: list[Address],
        view: memoryview | None = None,
    ) -> None:
        sink = self._bulk_sink
        view = self._view if view is None else view
        if sink is None:  # removed mid-drain: dispatch as usual
            rest = [(i, off, off + n) for i, (off, n, _, _) in enumerate(reads)]
            left = [
                (i, s, min(s + reads[i][2], e))
                for i, a, e in rest
                for s in range(a, e, reads[i][2])
            ]
        else:
            try:
                left = sink(view, reads)
            except Exception:
                self.stats["handler_errors"] += 1
                log.exception("bulk sink failed on %d reads", len(reads))
                return
        total = sum(-(-n // seg) for _, n, seg, _ in reads)
        nbytes = sum(n for _, n, _, _ in reads)
        self.stats["bulk_datagrams"] += total - len(left)
        self.stats["datagrams_in"] += total - len(left)
        self.stats["bytes_in"] += nbytes - sum(e - s for _, s, e in left)
        for i, start, end in left:
            self._dispatch(bytes(view[start:end]), addrs[i])
