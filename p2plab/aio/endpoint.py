"""One UDP socket per worker, shared by STUN, punching, the peer link and benchmarks.

The socket is read by our own reader (``loop.add_reader``) that drains it until ``EAGAIN`` in one
callback: one callback per readable event instead of one per datagram is what keeps the default
asyncio loop fast (natlab.md).  Datagrams are demultiplexed:

* STUN messages (RFC 8489 section 6: first two bits zero, magic cookie at offset 4) go to the
  listener registered for their transaction id, else to the STUN fallback handler, else are counted
  as ``stun_unmatched`` and dropped;
* everything else goes to the peer handler (or is counted as ``dropped_no_handler``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["Address", "UdpEndpoint", "is_stun_datagram"]

log = logging.getLogger(__name__)

Address = tuple[str, int]
DatagramHandler = Callable[[bytes, Address], None]

_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
_RECV_SIZE = 65535
_MAX_READS_PER_WAKEUP = 512


def is_stun_datagram(data: bytes) -> bool:
    """True if ``data`` looks like a STUN message (RFC 8489 section 6 / RFC 7983 demux)."""
    return len(data) >= 20 and data[0] < 4 and data[4:8] == _MAGIC_COOKIE


class UdpEndpoint:
    """A bound, non-blocking UDP socket with a draining reader and a demultiplexer."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._loop = loop
        self._stun_listeners: dict[bytes, DatagramHandler] = {}
        self.stun_fallback: DatagramHandler | None = None
        self.peer_handler: DatagramHandler | None = None
        self.stats: dict[str, int] = {
            "datagrams_in": 0,
            "bytes_in": 0,
            "datagrams_out": 0,
            "bytes_out": 0,
            "send_errors": 0,
            "stun_unmatched": 0,
            "dropped_no_handler": 0,
            "handler_errors": 0,
        }
        self._closed = False
        loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def bind(cls, host: str = "0.0.0.0", port: int = 0) -> UdpEndpoint:
        """Create and bind the socket (port 0: let the OS choose)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        except OSError:  # pragma: no cover - platform limits
            pass
        sock.setblocking(False)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return cls(sock, loop)

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (for fast paths such as benchmarks)."""
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

    def add_stun_listener(self, transaction_id: bytes, handler: DatagramHandler) -> None:
        """Route STUN messages with this 12-byte transaction id to ``handler``."""
        self._stun_listeners[transaction_id] = handler

    def remove_stun_listener(self, transaction_id: bytes) -> None:
        self._stun_listeners.pop(transaction_id, None)

    def sendto(self, data: bytes, addr: Address) -> bool:
        """Send one datagram; returns False (and counts) if the OS refused it."""
        if self._closed:
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

    def _on_readable(self) -> None:
        sock = self._sock
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                data, addr = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # ICMP port unreachable surfaces as ECONNREFUSED on Linux: not fatal for UDP.
                log.debug("recvfrom: %s", exc)
                continue
            self._dispatch(data, (addr[0], addr[1]))

    def _dispatch(self, data: bytes, addr: Address) -> None:
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
        self._sock.close()

    async def __aenter__(self) -> UdpEndpoint:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
