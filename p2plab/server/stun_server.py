"""An embedded asyncio STUN server (RFC 8489 Binding), RFC 5780 capable with a second address.

Sockets: one on ``(host, port)``; with ``alt_host`` and/or ``alt_port`` one for every combination
of ``{host, alt_host} x {port, alt_port}`` (the four sockets RFC 5780 needs when both are given).
What to answer, from which socket, to where, is decided by the sans-I/O
:class:`~p2plab.core.stun_server.StunResponder` (which also serves the simulator); this module
only owns the sockets, learns which address a wildcard socket was reached on (``IP_PKTINFO``)
and counts what the network did (datagrams in, responses sent, send errors).

Secure defaults (issue 14, finding 9) live in the responder: a per-source-IP rate limit
(``rate_per_s``/``burst``, 20/s burst 40), no answer to reflection-service source ports, no
SOFTWARE unless ``software`` is given, answers no larger than the request's flavour needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from p2plab.core.stun_server import (
    DEFAULT_BURST,
    DEFAULT_MAX_SOURCES,
    DEFAULT_RATE_PER_S,
    DEFAULT_SOFTWARE,
    StunResponder,
)
from p2plab.errors import ConfigError, LocalProtocolError

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_RATE_PER_S",
    "DEFAULT_SOFTWARE",
    "StunServer",
    "run_stun_server",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]

_RECV_SIZE = 2048
_MAX_READS_PER_WAKEUP = 256
_BIND_ATTEMPTS = 50
# Linux values; some Python builds lack the names.
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
# What the socket side counts; the responder counts the rest (RESPONDER_COUNTERS).
_IO_COUNTERS = ("datagrams_in", "responses", "error_responses", "send_errors", "handler_errors")


@dataclass
class _Socket:
    sock: socket.socket
    ip_index: int
    port_index: int
    ip: str
    port: int
    wildcard: bool


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class StunServer:
    """A running STUN server; create it with ``await StunServer.start(...)``."""

    def __init__(self, sockets: list[_Socket], responder: StunResponder) -> None:
        self._sockets = sockets
        self._by_index = {(s.ip_index, s.port_index): s for s in sockets}
        self.responder = responder
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._io: dict[str, int] = dict.fromkeys(_IO_COUNTERS, 0)
        for s in sockets:
            self._loop.add_reader(s.sock.fileno(), self._on_readable, s)

    @classmethod
    async def start(
        cls,
        host: str = "0.0.0.0",
        port: int = 3478,
        alt_host: str | None = None,
        alt_port: int | None = None,
        *,
        software: str | None = None,
        rate_per_s: float | None = DEFAULT_RATE_PER_S,
        burst: float = DEFAULT_BURST,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> StunServer:
        """Bind the sockets and start answering.  Port 0 (for ``port`` or ``alt_port``) lets the
        OS choose; the other sockets then reuse the chosen numbers (retrying on clashes).

        ``software``: SOFTWARE text to send (opt-in, e.g. :data:`DEFAULT_SOFTWARE`).
        ``rate_per_s``/``burst``: answers per second and burst per source IP (None: no limit);
        ``max_sources``: source IPs remembered for that."""
        if alt_host is not None:
            if _is_wildcard(host):
                raise ConfigError(
                    f"STUN server: with an alternate host ({alt_host}) the primary host must be "
                    f"a concrete address, not {host}"
                )
            if _family(alt_host) != _family(host) or alt_host == host:
                raise ConfigError(
                    f"STUN server: alternate host {alt_host} must be a different address of the "
                    f"same family as {host}"
                )
        if alt_port is not None and port != 0 and alt_port == port:
            raise ConfigError(f"STUN server: alternate port {alt_port} equals the primary port")
        for name, value in (("port", port), ("alt_port", alt_port)):
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"STUN server: {name} {value} is out of range")
        attempts = _BIND_ATTEMPTS if (port == 0 or alt_port == 0) else 1
        last_error: OSError | None = None
        for _ in range(attempts):
            try:
                sockets = _bind_all(host, port, alt_host, alt_port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                last_error = exc
                continue
            by_index = {(s.ip_index, s.port_index): (s.ip, s.port) for s in sockets}
            try:
                responder = StunResponder(
                    by_index,
                    software=software,
                    rate_per_s=rate_per_s,
                    burst=burst,
                    max_sources=max_sources,
                )
            except LocalProtocolError as exc:
                for s in sockets:
                    s.sock.close()
                raise ConfigError(f"STUN server: {exc}") from None
            return cls(sockets, responder)
        assert last_error is not None
        raise last_error

    # -- introspection ----------------------------------------------------------------------

    @property
    def addresses(self) -> list[Address]:
        """Bound ``(ip, port)`` of every socket, primary first."""
        return [(s.ip, s.port) for s in self._sockets]

    @property
    def primary_address(self) -> Address:
        return self.addresses[0]

    @property
    def other_address(self) -> Address | None:
        """The alternate address (OTHER-ADDRESS) seen from the primary socket, if any."""
        other = self.responder.other_slot((0, 0))
        return None if other is None else self.responder.addresses[other]

    @property
    def stats(self) -> dict[str, int]:
        """Counters: the socket side's (datagrams in, responses, errors sent, send errors) and
        the responder's (requests, change requests, dropped junk), as one dict."""
        io, core = self._io, self.responder.stats
        return {
            "datagrams_in": io["datagrams_in"],
            "requests": core["requests"],
            "legacy_requests": core["legacy_requests"],
            "responses": io["responses"],
            "error_responses": io["error_responses"],
            "change_requests": core["change_requests"],
            "change_unsupported": core["change_unsupported"],
            # A datagram the responder failed on (a bug) is dropped like junk.
            "malformed_dropped": core["malformed_dropped"] + io["handler_errors"],
            "not_request_dropped": core["not_request_dropped"],
            "send_errors": io["send_errors"],
            "reflection_port_dropped": core["reflection_port_dropped"],
            "rate_limited": core["rate_limited"],
            "oversize_dropped": core["oversize_dropped"],
            "sources_forgotten": core["sources_forgotten"],
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._sockets:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(s.sock.fileno())
            s.sock.close()

    async def __aenter__(self) -> StunServer:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    # -- datagram path ----------------------------------------------------------------------

    def _on_readable(self, s: _Socket) -> None:
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                if s.wildcard:
                    data, ancdata, _flags, addr = s.sock.recvmsg(_RECV_SIZE, 256)
                    local_ip = _pktinfo_destination(ancdata) or s.ip
                else:
                    data, addr = s.sock.recvfrom(_RECV_SIZE)
                    local_ip = s.ip
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("STUN server recv on %s:%d: %s", s.ip, s.port, exc)
                continue
            self._io["datagrams_in"] += 1
            try:
                self._handle(s, local_ip, data, (str(addr[0]), int(addr[1])))
            except Exception:  # a bug here must not kill the reader
                self._io["handler_errors"] += 1
                log.exception("STUN server failed on %d bytes from %s", len(data), addr)

    def _handle(self, s: _Socket, local_ip: str, data: bytes, addr: Address) -> None:
        reply = self.responder.handle_datagram(
            data, (s.ip_index, s.port_index), addr, local_ip, now=time.monotonic()
        )
        if reply is None:
            return
        try:
            self._by_index[reply.slot].sock.sendto(reply.data, reply.destination)
        except OSError as exc:
            self._io["send_errors"] += 1
            log.debug("STUN server: send to %s failed: %s", reply.destination, exc)
            return
        self._io["error_responses" if reply.error else "responses"] += 1


def _pktinfo_destination(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    for level, kind, cdata in ancdata:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
            if len(cdata) >= 12:
                return socket.inet_ntop(socket.AF_INET, cdata[8:12])
        if level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO:
            if len(cdata) >= 16:
                return socket.inet_ntop(socket.AF_INET6, cdata[:16])
    return None


def _open(host: str, port: int) -> tuple[socket.socket, int]:
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if _is_wildcard(host):
            # Learn which of our addresses a request was sent to (RESPONSE-ORIGIN).
            with contextlib.suppress(AttributeError, OSError):
                if family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock, int(sock.getsockname()[1])


def _bind_all(host: str, port: int, alt_host: str | None, alt_port: int | None) -> list[_Socket]:
    opened: list[_Socket] = []
    try:
        sock, primary_port = _open(host, port)
        opened.append(_Socket(sock, 0, 0, host, primary_port, _is_wildcard(host)))
        second_port: int | None = None
        if alt_port is not None:
            sock, second_port = _open(host, alt_port)
            if second_port == primary_port:
                sock.close()
                raise OSError(errno.EADDRINUSE, "alternate port equals primary port")
            opened.append(_Socket(sock, 0, 1, host, second_port, _is_wildcard(host)))
        if alt_host is not None:
            sock, _ = _open(alt_host, primary_port)
            opened.append(_Socket(sock, 1, 0, alt_host, primary_port, False))
            if second_port is not None:
                sock, _ = _open(alt_host, second_port)
                opened.append(_Socket(sock, 1, 1, alt_host, second_port, False))
    except OSError:
        for s in opened:
            s.sock.close()
        raise
    return opened


async def run_stun_server(
    host: str = "0.0.0.0",
    port: int = 3478,
    alt_host: str | None = None,
    alt_port: int | None = None,
    *,
    software: str | None = None,
    rate_per_s: float | None = DEFAULT_RATE_PER_S,
    burst: float = DEFAULT_BURST,
) -> None:
    """Run a STUN server until cancelled; logs where it listens."""
    server = await StunServer.start(
        host, port, alt_host, alt_port, software=software, rate_per_s=rate_per_s, burst=burst
    )
    try:
        listening = ", ".join(f"{ip}:{p}" for ip, p in server.addresses)
        other = server.other_address
        log.info(
            "STUN server listening on UDP %s%s",
            listening,
            "" if other is None else f" (RFC 5780 alternate address {other[0]}:{other[1]})",
        )
        await asyncio.Event().wait()
    finally:
        server.close()
        log.info("STUN server stopped: %s", server.stats)
