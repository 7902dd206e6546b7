"""An embedded asyncio STUN server (RFC 8489 Binding), RFC 5780 capable with a second address.

Sockets: one on ``(host, port)``; with ``alt_host`` and/or ``alt_port`` one for every combination
of ``{host, alt_host} x {port, alt_port}`` (the four sockets RFC 5780 needs when both are given).
A request is answered from the socket it arrived on, or, with CHANGE-REQUEST, from the socket
whose IP and/or port differ from that one as asked.

Answers carry XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, RESPONSE-ORIGIN, SOFTWARE and FINGERPRINT,
plus OTHER-ADDRESS and the RFC 3489 CHANGED-ADDRESS when an alternate address exists.  RFC 3489
clients (no magic cookie, e.g. pystun3) get MAPPED-ADDRESS, SOURCE-ADDRESS and CHANGED-ADDRESS
only, with their 16-byte transaction id echoed (RFC 8489 section 12 / RFC 5389 section 12.2):
pystun3 walks attributes without padding, so nothing with an unaligned length is sent to them.

A CHANGE-REQUEST this server cannot honour (e.g. "change IP" with no ``alt_host``): RFC 5780
section 6.1 asks for a 420 (Unknown Attribute) error response listing CHANGE-REQUEST, which is
what RFC 5389+ clients get.  RFC 3489 clients get no answer instead: that is what an RFC 3489
server without the alternate address looked like to them, and pystun3 resends forever when it
gets an error response.  Both cases are counted in ``stats["change_unsupported"]``.

Malformed datagrams and anything that is not a Binding request are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from p2plab.core.stun import (
    CHANGE_IP,
    CHANGE_PORT,
    Class,
    Message,
    Method,
    parse_message,
)
from p2plab.errors import ConfigError, StunError

__all__ = ["DEFAULT_SOFTWARE", "StunServer", "run_stun_server"]

log = logging.getLogger(__name__)

Address = tuple[str, int]

DEFAULT_SOFTWARE = "p2plab STUN server"
_RECV_SIZE = 2048
_MAX_READS_PER_WAKEUP = 256
_BIND_ATTEMPTS = 50
# Linux values; some Python builds lack the names.
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)


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

    def __init__(self, sockets: list[_Socket], software: str | None) -> None:
        self._sockets = sockets
        self._by_index = {(s.ip_index, s.port_index): s for s in sockets}
        self._software = software
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self.stats: dict[str, int] = {
            "datagrams_in": 0,
            "requests": 0,
            "legacy_requests": 0,
            "responses": 0,
            "error_responses": 0,
            "change_requests": 0,
            "change_unsupported": 0,
            "malformed_dropped": 0,
            "not_request_dropped": 0,
            "send_errors": 0,
        }
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
        software: str | None = DEFAULT_SOFTWARE,
    ) -> StunServer:
        """Bind the sockets and start answering.  Port 0 (for ``port`` or ``alt_port``) lets the
        OS choose; the other sockets then reuse the chosen numbers (retrying on clashes)."""
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
            return cls(sockets, software)
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
        other = self._other(self._sockets[0])
        return None if other is None else (other.ip, other.port)

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
            self.stats["datagrams_in"] += 1
            try:
                self._handle(s, local_ip, data, (str(addr[0]), int(addr[1])))
            except Exception:  # a bug here must not kill the reader
                self.stats["malformed_dropped"] += 1
                log.exception("STUN server failed on %d bytes from %s", len(data), addr)

    def _other(self, s: _Socket) -> _Socket | None:
        """The socket differing in IP and port (or in whichever of the two has an alternate)."""
        ips = {k[0] for k in self._by_index}
        ports = {k[1] for k in self._by_index}
        if len(ips) == 1 and len(ports) == 1:
            return None
        key = (
            s.ip_index ^ (1 if len(ips) > 1 else 0),
            s.port_index ^ (1 if len(ports) > 1 else 0),
        )
        return self._by_index.get(key)

    @staticmethod
    def _public(s: _Socket, local_ip: str) -> Address:
        """Address to advertise for socket ``s``.  Wildcard binds happen only without an
        alternate IP, so every socket shares the IP the request was sent to."""
        return (local_ip if s.wildcard else s.ip, s.port)

    def _handle(self, s: _Socket, local_ip: str, data: bytes, addr: Address) -> None:
        try:
            request = parse_message(data)
        except StunError as exc:
            self.stats["malformed_dropped"] += 1
            log.debug("STUN server: dropped %d bytes from %s: %s", len(data), addr, exc)
            return
        if request.message_method != Method.BINDING or request.message_class != Class.REQUEST:
            self.stats["not_request_dropped"] += 1
            log.debug("STUN server: dropped %r from %s", request, addr)
            return
        self.stats["requests"] += 1
        legacy = request.legacy
        if legacy:
            self.stats["legacy_requests"] += 1

        unknown = request.unknown_comprehension_required()
        if unknown:
            self._send_error(s, request, addr, 420, "Unknown Attribute", unknown)
            return

        target = s
        change = request.attributes.get("CHANGE-REQUEST", 0)
        if change & (CHANGE_IP | CHANGE_PORT):
            self.stats["change_requests"] += 1
            key = (
                s.ip_index ^ (1 if change & CHANGE_IP else 0),
                s.port_index ^ (1 if change & CHANGE_PORT else 0),
            )
            found = self._by_index.get(key)
            if found is None:
                self.stats["change_unsupported"] += 1
                if legacy:
                    log.debug("STUN server: cannot honour CHANGE-REQUEST %#x (RFC 3489)", change)
                    return
                self._send_error(s, request, addr, 420, "Unknown Attribute", (0x0003,))
                return
            target = found

        destination = addr
        response_port = request.attributes.get("RESPONSE-PORT")
        if isinstance(response_port, int) and response_port > 0 and not legacy:
            destination = (addr[0], response_port)  # RFC 5780 section 7.5

        origin = self._public(target, local_ip)
        other = self._other(s)
        other_address = None if other is None else self._public(other, local_ip)
        response = Message(
            Method.BINDING,
            Class.RESPONSE,
            request.transaction_id,
            magic_cookie=request.magic_cookie,
        )
        attrs = response.attributes
        if legacy:
            attrs["MAPPED-ADDRESS"] = addr
            attrs["SOURCE-ADDRESS"] = origin
            if other_address is not None:
                attrs["CHANGED-ADDRESS"] = other_address
        else:
            attrs["XOR-MAPPED-ADDRESS"] = addr
            attrs["MAPPED-ADDRESS"] = addr
            attrs["RESPONSE-ORIGIN"] = origin
            if other_address is not None:
                attrs["OTHER-ADDRESS"] = other_address
                attrs["CHANGED-ADDRESS"] = other_address
            if self._software:
                attrs["SOFTWARE"] = self._software
            response.add_fingerprint()
        if self._sendto(target, bytes(response), destination):
            self.stats["responses"] += 1

    def _send_error(
        self,
        s: _Socket,
        request: Message,
        addr: Address,
        code: int,
        reason: str,
        unknown: tuple[int, ...] = (),
    ) -> None:
        response = Message(
            Method.BINDING,
            Class.ERROR,
            request.transaction_id,
            {"ERROR-CODE": (code, reason)},
            magic_cookie=request.magic_cookie,
        )
        if unknown:
            response.attributes["UNKNOWN-ATTRIBUTES"] = unknown
        if not request.legacy:
            if self._software:
                response.attributes["SOFTWARE"] = self._software
            response.add_fingerprint()
        if self._sendto(s, bytes(response), addr):
            self.stats["error_responses"] += 1

    def _sendto(self, s: _Socket, data: bytes, addr: Address) -> bool:
        try:
            s.sock.sendto(data, addr)
        except OSError as exc:
            self.stats["send_errors"] += 1
            log.debug("STUN server: send to %s failed: %s", addr, exc)
            return False
        return True


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
    software: str | None = DEFAULT_SOFTWARE,
) -> None:
    """Run a STUN server until cancelled; logs where it listens."""
    server = await StunServer.start(host, port, alt_host, alt_port, software=software)
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
