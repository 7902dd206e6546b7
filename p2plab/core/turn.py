"""Sans-I/O TURN client (RFC 8656): one allocation on one TURN server, over UDP or TCP.

Why a client of our own in the core rather than aioice's: the simulator must drive the very
same client as the worker (issue 17 item 6), and the link engine owns the relay candidate as
one more candidate source on its own clock; aioice's client is asyncio and owns its socket.
This one is built on the table-driven STUN codec of :mod:`p2plab.core.stun` and its client
transactions (RFC 8489 retransmissions: RTO 0.5 s doubling, 7 requests over UDP; one request
and a 39.5 s timeout over TCP).

In the aioquic style: the driver calls :meth:`TurnClient.allocate`, then feeds everything that
arrives from the server to :meth:`TurnClient.receive`, sends what
:meth:`TurnClient.datagrams_to_send` returns to the server, calls
:meth:`TurnClient.handle_timer` at :meth:`TurnClient.get_timer`, and reads
:meth:`TurnClient.next_event` (:class:`Allocated`, :class:`PeerData`...).

What it does: Allocate (REQUESTED-TRANSPORT UDP) with the long-term credential mechanism (the
first request goes unauthenticated, the 401 brings REALM and NONCE, the retry carries USERNAME,
REALM, NONCE and MESSAGE-INTEGRITY with key MD5(username:realm:password)); a 438 (stale nonce)
takes the new nonce and retries; Refresh before expiry and Refresh with LIFETIME 0 to release;
CreatePermission per peer IP, refreshed before its 300 s run out; ChannelBind (numbers from
0x4000) refreshed before its 600 s; data to a peer as ChannelData once the channel is bound, as a
Send indication before; data from peers out of Data indications and ChannelData.

Over TCP (RFC 8656 section 7 to the server, not RFC 6062) the same messages travel on one
stream: :meth:`TurnClient.receive` takes stream bytes and frames them (a STUN message is 20
bytes plus its length, ChannelData 4 plus its length padded to 4), and ChannelData is padded.

Hostile input: anything not from the server's address, not STUN or ChannelData, a response
matching no request, a success response without a valid MESSAGE-INTEGRITY, data from a peer
without a permission or on an unknown channel: dropped and counted in :attr:`TurnClient.stats`.
A TCP stream that stops framing cannot be resynchronised: the allocation fails.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from p2plab.core.stun import (
    Address,
    Class,
    Message,
    Method,
    RetransmissionPolicy,
    StunTransaction,
    TransactionState,
    long_term_key,
    parse_message,
)
from p2plab.core.turn_events import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    CHANNEL_REFRESH_S,
    MAX_PEER_DATA,
    PERMISSION_REFRESH_S,
    Allocated,
    AllocationFailed,
    ChannelBindFailed,
    ChannelBound,
    PeerData,
    PermissionCreated,
    PermissionFailed,
    Refreshed,
    Released,
    TurnEvent,
    TurnState,
    decode_channel_data,
    encode_channel_data,
)
from p2plab.errors import LocalProtocolError, StunError

__all__ = [
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "CHANNEL_REFRESH_S",
    "MAX_PEER_DATA",
    "PERMISSION_REFRESH_S",
    "TCP_POLICY",
    "Allocated",
    "AllocationFailed",
    "ChannelBindFailed",
    "ChannelBound",
    "PeerData",
    "PermissionCreated",
    "PermissionFailed",
    "Refreshed",
    "Released",
    "TurnClient",
    "TurnEvent",
    "TurnState",
    "decode_channel_data",
    "encode_channel_data",
]

#: Over TCP a request is sent once and answered within 39.5 s (RFC 8489 section 6.2.2).
TCP_POLICY = RetransmissionPolicy(rto=39.5, rc=1, rm=1)

_UDP = 17
_STALE_NONCE_RETRIES = 3
_TCP_BUFFER_MAX = 20 + 65535 + 4


def _peer_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise LocalProtocolError(f"not an IP address: {ip[:64]!r}") from None


@dataclass
class _Request:
    """One request in flight, with what is needed to send it again with fresh credentials."""

    kind: Literal["allocate", "refresh", "permission", "channel"]
    method: Method
    attributes: dict[str, Any]
    transaction: StunTransaction
    authenticated: bool
    peer_ip: str | None = None
    peer: Address | None = None
    channel: int | None = None
    stale_retries: int = 0


_STAT_NAMES = (
    "junk",
    "not_from_server",
    "unmatched",
    "bad_integrity",
    "unknown_channel",
    "unpermitted_peer",
    "sent_channel",
    "sent_indication",
    "received_channel",
    "received_indication",
)


class TurnClient:
    """One TURN allocation for one client socket (see the module docstring)."""

    def __init__(
        self,
        server: Address,
        username: str,
        password: str,
        *,
        rand_bytes: Callable[[int], bytes],
        transport: Literal["udp", "tcp"] = "udp",
        lifetime: int | None = None,
        policy: RetransmissionPolicy | None = None,
        software: str | None = None,
    ) -> None:
        if transport not in ("udp", "tcp"):
            raise LocalProtocolError(f"TURN transport must be udp or tcp, got {transport!r}")
        self.server = server
        """The server's transport address; nothing from another address is accepted."""
        self.transport = transport
        """``"udp"`` (one datagram per message) or ``"tcp"`` (one framed stream)."""
        self.state = TurnState.IDLE
        self.relayed: Address | None = None
        """The relayed address, once allocated."""
        self.mapped: Address | None = None
        """Our address as the server saw it, once allocated."""
        self.lifetime = 0
        """Seconds granted by the latest Allocate or Refresh answer."""
        self.expires_at: float | None = None
        """When the allocation runs out unless refreshed."""
        self.stats: dict[str, int] = dict.fromkeys(_STAT_NAMES, 0)
        """Counters of dropped input and relayed data (see the module docstring)."""
        self._username = username
        self._password = password
        self._rand = rand_bytes
        self._requested_lifetime = lifetime
        self._policy = policy or (TCP_POLICY if transport == "tcp" else RetransmissionPolicy())
        self._software = software
        self._realm: str | None = None
        self._nonce: str | None = None
        self._key: bytes | None = None
        self._requests: dict[bytes, _Request] = {}
        self._out: list[bytes] = []
        self._events: deque[TurnEvent] = deque()
        self._refresh_at: float | None = None
        self._permissions: dict[str, float | None] = {}  # ip -> refresh time (None: pending)
        self._granted: set[str] = set()  # ips whose PermissionCreated was reported
        self._channels: dict[int, Address] = {}
        self._peer_channel: dict[Address, int] = {}
        self._bound: dict[int, float] = {}  # channel -> rebind time
        self._next_channel = CHANNEL_MIN
        self._stream = bytearray()

    # -- commands ------------------------------------------------------------------------------

    def allocate(self, now: float) -> None:
        """Start the Allocate transaction (once)."""
        if self.state is not TurnState.IDLE:
            raise LocalProtocolError(f"TURN allocate in state {self.state.value}")
        self.state = TurnState.ALLOCATING
        attributes: dict[str, Any] = {"REQUESTED-TRANSPORT": _UDP}
        if self._requested_lifetime is not None:
            attributes["LIFETIME"] = self._requested_lifetime
        self._start("allocate", Method.ALLOCATE, attributes, now)

    def set_credentials(self, username: str, password: str) -> None:
        """New credentials for the next requests (coturn's REST credentials expire)."""
        self._username = username
        self._password = password
        if self._realm is not None:
            self._key = long_term_key(username, self._realm, password)

    def create_permission(self, peer_ip: str, now: float) -> None:
        """Ask the server to relay from and to ``peer_ip``; refreshed until release."""
        self._require_allocated()
        ip = _peer_ip(peer_ip)
        if ip in self._permissions:
            return
        self._permissions[ip] = None
        self._start(
            "permission", Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": (ip, 0)}, now, peer_ip=ip
        )

    def bind_channel(self, peer: Address, now: float) -> int:
        """Bind a channel to ``peer`` (also its permission); returns the channel number."""
        self._require_allocated()
        peer = (_peer_ip(peer[0]), int(peer[1]))
        existing = self._peer_channel.get(peer)
        if existing is not None:
            return existing
        if self._next_channel > CHANNEL_MAX:
            raise LocalProtocolError("no TURN channel numbers left")
        channel = self._next_channel
        self._next_channel += 1
        self._channels[channel] = peer
        self._peer_channel[peer] = channel
        self._send_bind(channel, now)
        return channel

    def has_permission(self, peer_ip: str) -> bool:
        """Whether the server confirmed a permission for ``peer_ip`` (still held)."""
        return _peer_ip(peer_ip) in self._granted

    def channel_peer(self, channel: int) -> Address | None:
        """The peer a bound channel number leads to, or None."""
        return self._channels.get(channel) if channel in self._bound else None

    def bound_channel(self, peer: Address) -> int | None:
        """The channel the server confirmed for ``peer``, or None."""
        channel = self._peer_channel.get((_peer_ip(peer[0]), int(peer[1])))
        return channel if channel is not None and channel in self._bound else None

    def send(self, peer: Address, data: bytes, now: float) -> None:
        """Send ``data`` to ``peer`` through the relay (ChannelData once bound)."""
        self._require_allocated()
        if len(data) > MAX_PEER_DATA:
            raise LocalProtocolError(f"TURN payload of {len(data)} bytes > {MAX_PEER_DATA}")
        peer = (_peer_ip(peer[0]), int(peer[1]))
        channel = self._peer_channel.get(peer)
        if channel is not None and channel in self._bound:
            self._out.append(encode_channel_data(channel, data, pad=self.transport == "tcp"))
            self.stats["sent_channel"] += 1
            return
        message = Message(
            Method.SEND, Class.INDICATION, self._rand(12), {"XOR-PEER-ADDRESS": peer, "DATA": data}
        )
        self._out.append(bytes(message))
        self.stats["sent_indication"] += 1

    def refresh(self, now: float) -> None:
        """Refresh the allocation now (say after :meth:`set_credentials`); the client also
        refreshes by itself before expiry."""
        self._require_allocated()
        if any(r.kind == "refresh" for r in self._requests.values()):
            return
        self._refresh_at = None
        self._start("refresh", Method.REFRESH, self._refresh_attributes(), now)

    def release(self, now: float) -> None:
        """Release the allocation (Refresh with LIFETIME 0); ends in :class:`Released`."""
        if self.state is TurnState.ALLOCATING:
            self._close(TurnState.CLOSED)
            self._events.append(Released())
            return
        if self.state is not TurnState.ALLOCATED:
            return
        for request in list(self._requests.values()):
            request.transaction.cancel()
        self._requests.clear()
        self.state = TurnState.RELEASING
        self._refresh_at = None
        self._start("refresh", Method.REFRESH, {"LIFETIME": 0}, now)

    # -- driver interface ----------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """What to send to the server now, as ``(data, server)`` (stream chunks over TCP)."""
        out = [(data, self.server) for data in self._out]
        self._out = []
        for request in self._requests.values():
            out.extend(request.transaction.datagrams_to_send(now))
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next (None: nothing scheduled)."""
        times = [t for r in self._requests.values() if (t := r.transaction.get_timer()) is not None]
        if self.state is TurnState.ALLOCATED:
            times += [t for t in self._permissions.values() if t is not None]
            times += self._bound.values()
            if self._refresh_at is not None:
                times.append(self._refresh_at)
            if self.expires_at is not None:
                times.append(self.expires_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Retransmit, time out, and refresh the allocation, permissions and channels."""
        for tid, request in list(self._requests.items()):
            request.transaction.handle_timer(now)
            if request.transaction.state is TransactionState.TIMED_OUT:
                del self._requests[tid]
                self._timed_out(request, now)
        if self.state is not TurnState.ALLOCATED:
            return
        if self.expires_at is not None and now >= self.expires_at:
            self._fail("the allocation expired (no refresh answered)", None)
            return
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._start("refresh", Method.REFRESH, self._refresh_attributes(), now)
        for ip, at in list(self._permissions.items()):
            if at is not None and now >= at:
                self._permissions[ip] = None
                self._start(
                    "permission",
                    Method.CREATE_PERMISSION,
                    {"XOR-PEER-ADDRESS": (ip, 0)},
                    now,
                    peer_ip=ip,
                )
        for channel, at in list(self._bound.items()):
            if now >= at:
                # Due again only if this bind is lost: data keeps flowing on the channel.
                self._bound[channel] = now + CHANNEL_REFRESH_S
                self._send_bind(channel, now)

    def next_event(self) -> TurnEvent | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    def receive(self, data: bytes, addr: Address, now: float) -> None:
        """Feed a datagram (UDP) or stream bytes (TCP) that came from ``addr``."""
        if addr != self.server:
            self.stats["not_from_server"] += 1
            return
        if self.transport == "udp":
            self._receive_frame(bytes(data), now)
            return
        if self.state in (TurnState.FAILED, TurnState.CLOSED):
            return
        self._stream += data
        while len(self._stream) >= 4:
            first = self._stream[0] >> 6
            length = struct.unpack("!H", self._stream[2:4])[0]
            if first == 0:
                size = 20 + length
            elif first == 1:
                size = 4 + length + (-length % 4)
            else:
                self.stats["junk"] += 1
                self._fail("the TCP stream from the TURN server is not TURN", None)
                return
            if len(self._stream) < size:
                break
            frame = bytes(self._stream[:size])
            del self._stream[:size]
            self._receive_frame(frame, now)
        if len(self._stream) > _TCP_BUFFER_MAX:  # cannot happen with the sizes above
            self._fail("the TCP stream from the TURN server is not TURN", None)

    # -- internals -----------------------------------------------------------------------------

    def _require_allocated(self) -> None:
        if self.state is not TurnState.ALLOCATED:
            raise LocalProtocolError(f"no TURN allocation (state {self.state.value})")

    def _refresh_attributes(self) -> dict[str, Any]:
        if self._requested_lifetime is not None:
            return {"LIFETIME": self._requested_lifetime}
        return {}

    def _send_bind(self, channel: int, now: float) -> None:
        peer = self._channels[channel]
        self._start(
            "channel",
            Method.CHANNEL_BIND,
            {"CHANNEL-NUMBER": channel, "XOR-PEER-ADDRESS": peer},
            now,
            peer=peer,
            channel=channel,
        )

    def _start(
        self,
        kind: Literal["allocate", "refresh", "permission", "channel"],
        method: Method,
        attributes: dict[str, Any],
        now: float,
        *,
        peer_ip: str | None = None,
        peer: Address | None = None,
        channel: int | None = None,
        stale_retries: int = 0,
    ) -> None:
        message = Message(method, Class.REQUEST, self._rand(12), dict(attributes))
        if self._software:
            message.attributes["SOFTWARE"] = self._software
        authenticated = self._key is not None
        if self._key is not None and self._realm is not None and self._nonce is not None:
            message.attributes["USERNAME"] = self._username
            message.attributes["REALM"] = self._realm
            message.attributes["NONCE"] = self._nonce
            message.add_message_integrity(self._key)
        transaction = StunTransaction(message, self.server, self._policy)
        transaction.start(now)
        self._requests[message.transaction_id] = _Request(
            kind, method, dict(attributes), transaction, authenticated, peer_ip, peer, channel,
            stale_retries,
        )  # fmt: skip

    def _retry(self, request: _Request, now: float, stale_retries: int) -> None:
        self._start(
            request.kind,
            request.method,
            request.attributes,
            now,
            peer_ip=request.peer_ip,
            peer=request.peer,
            channel=request.channel,
            stale_retries=stale_retries,
        )

    def _receive_frame(self, frame: bytes, now: float) -> None:
        if frame and frame[0] >> 6 == 1:
            self._receive_channel_data(frame)
            return
        try:
            message = parse_message(frame)
        except StunError:
            self.stats["junk"] += 1
            return
        if message.legacy:
            self.stats["junk"] += 1
        elif message.message_class is Class.INDICATION and message.message_method is Method.DATA:
            self._receive_data_indication(message)
        elif message.message_class in (Class.RESPONSE, Class.ERROR):
            self._receive_response(message, frame, now)
        else:
            self.stats["junk"] += 1

    def _receive_channel_data(self, frame: bytes) -> None:
        try:
            channel, data = decode_channel_data(frame)
        except ValueError:
            self.stats["junk"] += 1
            return
        peer = self._channels.get(channel)
        if peer is None or self.state is not TurnState.ALLOCATED:
            self.stats["unknown_channel"] += 1
            return
        self.stats["received_channel"] += 1
        self._events.append(PeerData(peer, data, channel))

    def _receive_data_indication(self, message: Message) -> None:
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        data = message.attributes.get("DATA")
        if not isinstance(peer, tuple) or not isinstance(data, bytes):
            self.stats["junk"] += 1
            return
        permitted = peer[0] in self._permissions or any(
            self._channels[c][0] == peer[0] for c in self._bound
        )
        if self.state is not TurnState.ALLOCATED or not permitted:
            self.stats["unpermitted_peer"] += 1
            return
        self.stats["received_indication"] += 1
        self._events.append(PeerData(peer, data, None))

    def _receive_response(self, message: Message, frame: bytes, now: float) -> None:
        request = self._requests.get(message.transaction_id)
        if request is None or message.message_method is not request.method:
            self.stats["unmatched"] += 1
            return
        if message.message_class is Class.RESPONSE and not request.authenticated:
            # We always hold credentials: a success to a request sent before the server's 401
            # proves nothing (a real server with use-auth-secret never sends one).
            self.stats["bad_integrity"] += 1
            return
        if request.authenticated and self._key is not None:
            # A success must prove the server knows our key; an error may come without
            # MESSAGE-INTEGRITY (RFC 8489 section 9.2.5) but must not carry a wrong one.
            if message.message_class is Class.RESPONSE or "MESSAGE-INTEGRITY" in message.attributes:
                try:
                    parse_message(frame, self._key)
                except StunError:
                    self.stats["bad_integrity"] += 1
                    return
        if not request.transaction.receive(message, now):
            self.stats["unmatched"] += 1
            return
        del self._requests[message.transaction_id]
        if message.message_class is Class.ERROR:
            self._error(request, message, now)
        else:
            self._success(request, message, now)

    def _error(self, request: _Request, message: Message, now: float) -> None:
        code, reason = request.transaction.error or (0, "")
        realm = message.attributes.get("REALM")
        nonce = message.attributes.get("NONCE")
        if code == 401 and not request.authenticated and realm and nonce:
            self._realm, self._nonce = realm, nonce
            self._key = long_term_key(self._username, realm, self._password)
            self._retry(request, now, request.stale_retries)
            return
        if code == 438 and nonce and request.stale_retries < _STALE_NONCE_RETRIES:
            self._nonce = nonce
            if realm and realm != self._realm:
                self._realm = realm
                self._key = long_term_key(self._username, realm, self._password)
            self._retry(request, now, request.stale_retries + 1)
            return
        what = f"{code} {reason}".strip()
        if code == 401:
            what += " (credentials refused: expired, or not made with this server's secret)"
        self._failed(request, f"refused: {what}", code, now)

    def _timed_out(self, request: _Request, now: float) -> None:
        if request.kind == "refresh" and self.state is TurnState.ALLOCATED:
            # The allocation holds until it expires: try again at once while there is time.
            self._refresh_at = now
            return
        self._failed(request, "no answer from the TURN server", None, now)

    def _failed(self, request: _Request, why: str, code: int | None, now: float) -> None:
        if request.kind == "allocate":
            self._fail(f"Allocate {why}", code)
        elif request.kind == "refresh":
            if self.state is TurnState.RELEASING:
                self._close(TurnState.CLOSED)
                self._events.append(Released())
            else:
                self._fail(f"Refresh {why}", code)
        elif request.kind == "permission" and request.peer_ip is not None:
            self._permissions.pop(request.peer_ip, None)
            self._events.append(PermissionFailed(request.peer_ip, f"CreatePermission {why}"))
        elif request.kind == "channel" and request.channel is not None:
            peer = self._channels.pop(request.channel, None)
            self._bound.pop(request.channel, None)
            if peer is not None:
                self._peer_channel.pop(peer, None)
                self._events.append(ChannelBindFailed(peer, f"ChannelBind {why}"))

    def _success(self, request: _Request, message: Message, now: float) -> None:
        if request.kind == "allocate":
            relayed = message.attributes.get("XOR-RELAYED-ADDRESS")
            if not isinstance(relayed, tuple):
                self._fail("Allocate answer without XOR-RELAYED-ADDRESS", None)
                return
            mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
            self.relayed = relayed
            self.mapped = mapped if isinstance(mapped, tuple) else None
            self.state = TurnState.ALLOCATED
            self._set_lifetime(message, now)
            self._events.append(Allocated(relayed, self.mapped, self.lifetime))
        elif request.kind == "refresh":
            if self.state is TurnState.RELEASING:
                self._close(TurnState.CLOSED)
                self._events.append(Released())
            else:
                self._set_lifetime(message, now)
                self._events.append(Refreshed(self.lifetime))
        elif request.kind == "permission" and request.peer_ip is not None:
            if request.peer_ip in self._permissions:
                first = request.peer_ip not in self._granted
                self._permissions[request.peer_ip] = now + PERMISSION_REFRESH_S
                if first:
                    self._granted.add(request.peer_ip)
                    self._events.append(PermissionCreated(request.peer_ip))
        elif request.kind == "channel" and request.channel is not None:
            peer = self._channels.get(request.channel)
            if peer is not None:
                first = request.channel not in self._bound
                self._bound[request.channel] = now + CHANNEL_REFRESH_S
                if first:
                    self._events.append(ChannelBound(peer, request.channel))

    def _set_lifetime(self, message: Message, now: float) -> None:
        lifetime = message.attributes.get("LIFETIME")
        self.lifetime = lifetime if isinstance(lifetime, int) else 600
        self.expires_at = now + self.lifetime
        # Refresh a minute before expiry (half-way for short lifetimes), RFC 8656 section 8.
        self._refresh_at = self.expires_at - min(60.0, self.lifetime / 2)

    def _fail(self, reason: str, code: int | None) -> None:
        self._close(TurnState.FAILED)
        self._events.append(AllocationFailed(reason, code))

    def _close(self, state: TurnState) -> None:
        for request in self._requests.values():
            request.transaction.cancel()
        self._requests.clear()
        self.state = state
        self._refresh_at = None
        self._permissions.clear()
        self._granted.clear()
        self._bound.clear()
        self._stream.clear()
