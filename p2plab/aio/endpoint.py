"""One UDP socket per worker, shared by STUN, punching, the peer link and benchmarks (and, in
their cheap ``pool`` form, the birthday pool's sockets: :mod:`p2plab.aio.pool`).

The socket is read by our own reader (``loop.add_reader``) that drains it until ``EAGAIN`` in one
callback: one callback per readable event instead of one per datagram is what keeps the default
asyncio loop fast (natlab.md).  On Linux the socket has UDP GRO (``UDP_GRO``) turned on when the
kernel supports it: one read may then return several coalesced datagrams, and the ``UDP_GRO``
control message gives their segment size; the reader splits every such read, so every user of
the socket still sees single datagrams.  Datagrams are demultiplexed (:meth:`UdpEndpoint.dispatch`):

* STUN messages (RFC 8489 section 6: first two bits zero, magic cookie at offset 4) go to the
  listener registered for their transaction id, else to the STUN fallback handler, else are counted
  as ``stun_unmatched`` and dropped;
* everything else goes to the peer handler (or is counted as ``dropped_no_handler``).

The data fast path that only the benchmark arms lives in :mod:`p2plab.aio.fastpath`: every
endpoint owns one :class:`~p2plab.aio.fastpath.FastPath` (:attr:`UdpEndpoint.fast`), handed the
socket, the stats dict and :meth:`UdpEndpoint.dispatch`.  While it is armed (a bulk sink or a
fast handler set) the reader hands it the readable events; its batched sends, blocking reads and
handlers are also reachable through the endpoint's own methods of the same names
(``set_bulk_sink``, ``set_fast_handler``, ``read_blocking``, ``send_segments``,
``wait_writable``; ``gso`` and ``mmsg``).  The OS-level pieces (GSO/GRO probes, buffer sizes,
the ctypes mmsg calls) are in :mod:`p2plab.aio.udp_os`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from collections.abc import Callable
from typing import Any

from p2plab.aio.fastpath import BulkSink, FastHandler, FastPath
from p2plab.aio.udp_os import (
    CMSG_SPACE,
    MAX_READS_PER_WAKEUP,
    RECV_SIZE,
    SOL_UDP,
    UDP_GRO,
    Address,
    gro_segment,
    gro_supported,
    gso_supported,
    mmsg_supported,
    set_buffer_sizes,
)
from p2plab.core.addresses import is_ip_literal

__all__ = [
    "POOL_RECV_SIZE",
    "Address",
    "BulkSink",
    "DatagramHandler",
    "FastHandler",
    "UdpEndpoint",
    "gro_supported",
    "gso_supported",
    "is_stun_datagram",
    "local_endpoint_for",
    "mmsg_supported",
]

log = logging.getLogger(__name__)

DatagramHandler = Callable[[bytes, Address], None]

_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
_SOCK_BUF = 4 * 1024 * 1024
#: A pool socket's read buffer: it only hears probes (larger datagrams count as ``truncated``).
POOL_RECV_SIZE = 2048


def is_stun_datagram(data: bytes) -> bool:
    """True if ``data`` looks like a STUN message (RFC 8489 section 6 / RFC 7983 demux)."""
    return len(data) >= 20 and data[0] < 4 and data[4:8] == _MAGIC_COOKIE


_ENDPOINTS: weakref.WeakSet[UdpEndpoint] = weakref.WeakSet()


def local_endpoint_for(addr: Address) -> UdpEndpoint | None:
    """An open endpoint of this process bound to ``addr`` (a wildcard bind matches any host).

    Lets a latency path tell a peer in the same process (and so, usually, on the same event
    loop, where blocking for it would stall it) from a peer elsewhere.
    """
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    for ep in list(_ENDPOINTS):
        # a worker's two sockets often share a port number (aio/dualstack.py): the family tells
        if ep.closed or ep.socket.family != family:
            continue
        try:
            host, port = ep.local_address
        except OSError:
            continue
        if port == addr[1] and host in (addr[0], "0.0.0.0", "::"):
            return ep
    return None


class UdpEndpoint:
    """A bound, non-blocking UDP socket with a draining reader and a demultiplexer."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        *,
        gro: bool = True,
        mmsg: bool = True,
        pool: bool = False,
    ) -> None:
        self._sock = sock
        self._loop = loop
        recv_size = POOL_RECV_SIZE if pool else RECV_SIZE
        self._view = memoryview(bytearray(recv_size))
        self._iov = [self._view]  # the plain reader's buffer (the fast path has its own)
        self._stun_listeners: dict[bytes, DatagramHandler] = {}
        self.stun_fallback: DatagramHandler | None = None
        self.peer_handler: DatagramHandler | None = None
        self.stats: dict[str, int] = {
            "datagrams_in": 0,
            "bytes_in": 0,
            "datagrams_out": 0,
            "bytes_out": 0,
            "send_errors": 0,
            "refused_host_names": 0,
            "stun_unmatched": 0,
            "dropped_no_handler": 0,
            "handler_errors": 0,
            "gro_reads": 0,
            "gso_sends": 0,
            "truncated": 0,
            "bulk_datagrams": 0,
            "fast_datagrams": 0,
            "mmsg_sends": 0,
            "mmsg_reads": 0,
        }
        self.fast = (
            FastPath(sock, loop, self.stats, self.dispatch, mmsg=False, buffer_size=recv_size)
            if pool
            else FastPath(sock, loop, self.stats, self.dispatch, mmsg=mmsg)
        )
        """The data fast path: bulk sink, fast handlers, blocking reads, batched sends."""
        self._gro = False
        if gro and not pool:
            self.set_gro(True)
        self._closed = False
        loop.add_reader(sock.fileno(), self._on_readable)
        _ENDPOINTS.add(self)

    @classmethod
    async def bind(
        cls, host: str = "0.0.0.0", port: int = 0, *, gro: bool = True, mmsg: bool = True
    ) -> UdpEndpoint:
        """Create and bind the socket (port 0: let the OS choose); ``gro``: use UDP GRO if any;
        ``mmsg``: batch with sendmmsg/recvmmsg where available."""
        return cls.bind_now(asyncio.get_running_loop(), host, port, gro=gro, mmsg=mmsg)

    @classmethod
    def bind_now(
        cls,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int = 0,
        *,
        gro: bool = True,
        mmsg: bool = True,
        pool: bool = False,
    ) -> UdpEndpoint:
        """:meth:`bind` without awaiting (raises OSError when the bind fails).

        ``pool``: one socket of a birthday pool (issue 16; hundreds at once, each carrying a
        few probes): the kernel's default buffers, no GRO, no batched I/O and a one-datagram
        read buffer.  :meth:`promote` makes the one that wins a full endpoint.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                # one socket per family (aio/dualstack.py): never v4-mapped peers, and the
                # IPv4 socket's port number stays free for it
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if not pool:
                set_buffer_sizes(sock, _SOCK_BUF, _SOCK_BUF)
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return cls(sock, loop, gro=gro, mmsg=mmsg, pool=pool)

    def promote(self, like: UdpEndpoint | None = None) -> UdpEndpoint:
        """A full endpoint (buffers, GRO, batched I/O) on this one's socket, with its handlers
        and counters; this one stops reading and is closed, the socket is not.  The worker
        adopts a birthday pool socket this way: its NAT mapping is the one that reached the
        peer, so the socket itself must live on.  ``like``: the endpoint it replaces, whose
        GRO and batched I/O stay off if they were turned off (``bench --no-mmsg``)."""
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self.fast.close()
        _ENDPOINTS.discard(self)
        set_buffer_sizes(self._sock, _SOCK_BUF, _SOCK_BUF)
        full = UdpEndpoint(
            self._sock,
            self._loop,
            gro=like is None or like.gro,
            mmsg=like is None or like.mmsg,
        )
        for key, value in self.stats.items():
            full.stats[key] = full.stats.get(key, 0) + value
        full.peer_handler = self.peer_handler
        full.stun_fallback = self.stun_fallback
        full._stun_listeners.update(self._stun_listeners)
        return full

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (for latency paths that send on it directly)."""
        return self._sock

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def local_address(self) -> Address:
        host, port = self._sock.getsockname()[:2]
        return (str(host), int(port))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def gro(self) -> bool:
        """UDP GRO is on for this socket (reads may carry several datagrams)."""
        return self._gro

    def set_gro(self, on: bool) -> bool:
        """Turn UDP GRO on or off; returns whether it is on now (False where unsupported)."""
        if not gro_supported(self._sock):
            on = False
        else:
            try:
                self._sock.setsockopt(SOL_UDP, UDP_GRO, 1 if on else 0)
            except OSError as exc:
                log.debug("UDP_GRO not available: %s", exc)
                on = False
        self._gro = self.fast.gro = on  # both readers ask for the segment size while it is on
        return on

    @property
    def gso(self) -> bool:
        """The kernel supports UDP GSO on this socket (:attr:`FastPath.gso`)."""
        return self.fast.gso

    @gso.setter
    def gso(self, on: bool) -> None:
        self.fast.gso = on

    @property
    def mmsg(self) -> bool:
        """Batched ``sendmmsg``/``recvmmsg`` are used (:attr:`FastPath.mmsg`); set False to
        compare with one syscall per datagram."""
        return self.fast.mmsg

    @mmsg.setter
    def mmsg(self, on: bool) -> None:
        self.fast.mmsg = on

    def set_buffer_sizes(self, rcvbuf: int, sndbuf: int = 0) -> tuple[int, int]:
        """:func:`set_buffer_sizes` on this socket (0 leaves that buffer alone)."""
        return set_buffer_sizes(self._sock, rcvbuf, sndbuf)

    # -- the fast path, through the endpoint (see :mod:`p2plab.aio.fastpath`) ------------------

    def set_bulk_sink(self, types: frozenset[int] | set[int], sink: BulkSink | None) -> None:
        """:meth:`FastPath.set_bulk_sink`: reads of these p2p types go to ``sink`` in batches."""
        self.fast.set_bulk_sink(types, sink)

    def set_fast_handler(self, kind: int, handler: FastHandler | None) -> None:
        """:meth:`FastPath.set_fast_handler`: datagrams of type ``kind`` straight from the read."""
        self.fast.set_fast_handler(kind, handler)

    def read_blocking(
        self, until: Callable[[], bool], max_block_s: float, spin_s: float = 0.0
    ) -> None:
        """:meth:`FastPath.read_blocking`: read on this thread until ``until()`` or the limit."""
        self.fast.read_blocking(until, max_block_s, spin_s)

    def send_segments(
        self,
        buf: memoryview | bytearray | bytes,
        size: int,
        count: int,
        addr: Address,
        *,
        gso: bool = True,
    ) -> int:
        """:meth:`FastPath.send_segments`: ``count`` datagrams of ``size`` bytes from ``buf``;
        returns how many went out (fewer: await :meth:`wait_writable`)."""
        if not is_ip_literal(addr[0]):  # as sendto: never a blocking name lookup
            self.stats["refused_host_names"] += 1
            return 0
        return self.fast.send_segments(buf, size, count, addr, gso=gso)

    async def wait_writable(self) -> None:
        """:meth:`FastPath.wait_writable`: until the socket can take more data."""
        await self.fast.wait_writable()

    # -- STUN listeners and single sends -------------------------------------------------------

    def add_stun_listener(self, transaction_id: bytes, handler: DatagramHandler) -> None:
        """Route STUN messages with this 12-byte transaction id to ``handler``."""
        self._stun_listeners[transaction_id] = handler

    def remove_stun_listener(self, transaction_id: bytes) -> None:
        self._stun_listeners.pop(transaction_id, None)

    def sendto(self, data: bytes, addr: Address) -> bool:
        """Send one datagram; returns False (and counts) if the OS refused it.

        ``addr`` must be an IP literal: a host name is refused (``refused_host_names``) because
        ``sendto`` would resolve it with a blocking lookup on the event loop's thread, and a
        peer or rendezvous chooses these addresses.
        """
        if self._closed:
            return False
        if not is_ip_literal(addr[0]):
            self.stats["refused_host_names"] += 1
            log.warning("refusing to send to %r: not an IP address (no name lookups)", addr[0])
            return False
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.stats["send_errors"] += 1
            return False
        except OSError as exc:
            self.stats["send_errors"] += 1
            log.debug("sendto %s failed: %s", addr, exc)
            return False
        self.stats["datagrams_out"] += 1
        self.stats["bytes_out"] += len(data)
        return True

    # -- the plain reader and the demultiplexer ------------------------------------------------

    def _on_readable(self) -> None:
        """Drain the socket, splitting GRO reads and dispatching each datagram (one copy each);
        while the fast path is armed, it reads instead (see :mod:`p2plab.aio.fastpath`)."""
        fast = self.fast
        if fast.armed:
            fast.on_readable()
            return
        sock = self._sock
        iov = self._iov
        view = self._view
        anc = CMSG_SPACE if self._gro else 0
        stats = self.stats
        dispatch = self.dispatch
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                n, ancdata, flags, addr = sock.recvmsg_into(iov, anc)
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
            peer = (addr[0], addr[1])
            if seg >= n:
                dispatch(bytes(view[:n]), peer)
            else:
                for start in range(0, n, seg):
                    dispatch(bytes(view[start : min(start + seg, n)]), peer)
            if fast.armed:  # a handler armed it (a benchmark starts): it reads the rest
                if not self._closed:
                    fast.on_readable()
                return
            if self._closed:  # a handler closed it, or promoted it (the new owner reads on)
                return

    def dispatch(self, data: bytes, addr: Address) -> None:
        """Deliver one datagram (counted in ``datagrams_in``): to the STUN listener of its
        transaction id, else the STUN fallback, else counted as ``stun_unmatched``; anything
        that is not STUN to the peer handler, else counted as ``dropped_no_handler``."""
        self.stats["datagrams_in"] += 1
        self.stats["bytes_in"] += len(data)
        try:
            if is_stun_datagram(data):
                listener = self._stun_listeners.get(data[8:20])
                if listener is not None:
                    listener(data, addr)
                elif self.stun_fallback is not None:
                    self.stun_fallback(data, addr)
                else:
                    self.stats["stun_unmatched"] += 1
                return
            if self.peer_handler is None:
                self.stats["dropped_no_handler"] += 1
                return
            self.peer_handler(data, addr)
        except Exception:  # a handler bug must not kill the reader
            self.stats["handler_errors"] += 1
            log.exception("datagram handler failed for %d bytes from %s", len(data), addr)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._sock.fileno())
        except Exception:  # pragma: no cover - loop already closed
            pass
        self.fast.close()  # before the socket: it lets go of the fd and of a writability waiter
        self._sock.close()

    async def __aenter__(self) -> UdpEndpoint:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
