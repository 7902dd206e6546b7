"""A TURN server model (RFC 8656) with coturn's REST credentials, sans-I/O, for the simulator.

:meth:`TurnServerModel.receive` takes one datagram, the address it came from, ``now`` and the
server address it arrived at (the listening address, or a relayed one for data from peers), and
returns the datagrams to send as :class:`Outgoing` (data, from which server address, to whom).
:meth:`TurnServerModel.receive_stream` does the same for the bytes of a client's TCP connection
(RFC 8656 section 7 framing; answers come back with ``stream=True``).  No sockets, no clock:
in-memory tests drive it against the core :class:`~p2plab.core.turn.TurnClient` directly, and
:class:`~p2plab.lab.sim.turn_server.SimTurnServer` puts it on a simulated host.

What it does, as coturn with ``use-auth-secret`` does:

* every request needs the long-term credential mechanism: the first, unauthenticated one gets
  401 with REALM and NONCE; a request with an unknown or outdated NONCE gets 438 with a fresh
  one (nonces are stateless: an expiry and an HMAC of it and the client's IP, so a flood of
  unauthenticated requests costs no memory); MESSAGE-INTEGRITY is checked with
  MD5(username:realm:password) where password = base64(HMAC-SHA1(secret, username));
* the username ``"<unix expiry>:<name>"`` is checked when the allocation is made (an expired one
  gets 401, like coturn); later requests of that allocation must carry the same username (else
  441) and are checked with its key, but not for expiry: coturn keeps refreshing an allocation
  whose credentials have run out (tests/aio/test_turn_coturn.py);
* Allocate (REQUESTED-TRANSPORT UDP only, else 442; a second Allocate from the same client gets
  437 unless it retransmits the first, which gets the same answer again); the relayed address
  is a random free port of the server's IP; Refresh (LIFETIME 0 deletes); CreatePermission
  (300 s); ChannelBind (600 s, installs the permission too; 0x4000-0x4FFF; a channel or a peer
  bound otherwise gets 400); Send and Data indications; ChannelData both ways (padded over TCP);
* from a peer, data reaches the client only if a live permission names the peer's IP; the
  rest is dropped and counted (``no_permission``);
* lifetimes on the caller's clock: default 600 s, at most 3600 s (RFC 8656's rule: the desired
  lifetime is min(requested, max), and never below the default); a TCP client's allocation also
  ends with its connection (:meth:`TurnServerModel.close_stream`).

Limits of the model (say so before reading results off it): no TLS; no RFC 6062 TCP relaying
(the relayed side is UDP); IPv4 only; no bandwidth quota, no per-user allocation quota beyond
``max_allocations`` in total; one XOR-PEER-ADDRESS per CreatePermission; no ALTERNATE-SERVER,
DONT-FRAGMENT, EVEN-PORT or RESERVATION-TOKEN; no FINGERPRINT on answers; Binding requests are
answered (coturn does) without RFC 5780 extras and without a rate limit.  Bad input never
raises: it is dropped and counted in :attr:`TurnServerModel.stats`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2plab.core.stun import Address, Class, Message, Method, long_term_key, parse_message
from p2plab.core.turn_events import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    decode_channel_data,
    encode_channel_data,
)
from p2plab.errors import StunError

__all__ = [
    "CHANNEL_LIFETIME_S",
    "DEFAULT_LIFETIME_S",
    "MAX_LIFETIME_S",
    "NONCE_LIFETIME_S",
    "PERMISSION_LIFETIME_S",
    "RELAY_PORTS",
    "SIM_TURN_REALM",
    "Outgoing",
    "TurnServerModel",
    "coturn_password",
]

#: Lifetime of an allocation when the client asks for less or nothing (RFC 8656 section 3.8).
DEFAULT_LIFETIME_S = 600
#: Longest lifetime granted (coturn's default ``max-allocate-lifetime``).
MAX_LIFETIME_S = 3600
#: A permission lasts this long unless refreshed (RFC 8656 section 9).
PERMISSION_LIFETIME_S = 300.0
#: A channel binding lasts this long unless refreshed (RFC 8656 section 12).
CHANNEL_LIFETIME_S = 600.0
#: How long a nonce is good for (coturn's default ``stale-nonce``).
NONCE_LIFETIME_S = 600.0
#: The REALM of the simulated server.
SIM_TURN_REALM = "p2plab-sim"
#: Relayed ports are drawn from here (the dynamic range, as coturn's default min/max-port).
RELAY_PORTS = (49152, 65535)

_UDP = 17


def coturn_password(secret: str, username: str) -> str:
    """The password coturn expects for ``username`` under ``use-auth-secret``."""
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class Outgoing:
    """One datagram the server sends."""

    data: bytes
    """The datagram."""
    local: Address
    """The server address it leaves from (the listening address or a relayed one)."""
    destination: Address
    """Where it goes (a client or a peer)."""
    stream: bool = False
    """True: bytes for the TCP connection of the client ``destination`` (not a datagram)."""


#: A client: its address and whether it came over TCP (a connection) or UDP (the 5-tuple).
_Client = tuple[Address, bool]


@dataclass
class _Allocation:
    client: _Client
    username: str
    key: bytes
    relayed: Address
    expires_at: float
    allocate_tid: bytes
    allocate_answer: bytes
    permissions: dict[str, float] = field(default_factory=dict)  # peer ip -> expiry
    channels: dict[int, tuple[Address, float]] = field(default_factory=dict)
    peer_channels: dict[Address, int] = field(default_factory=dict)


class TurnServerModel:
    """The TURN server's state and rules (see the module docstring); no I/O."""

    def __init__(
        self,
        address: Address,
        secret: str,
        *,
        rand_bytes: Callable[[int], bytes],
        realm: str = SIM_TURN_REALM,
        max_allocations: int = 1000,
        port_in_use: Callable[[int], bool] | None = None,
    ) -> None:
        self.address = address
        """The listening address (clients send here)."""
        self.realm = realm
        self.max_allocations = max_allocations
        self.stats: Counter[str] = Counter()
        """Requests answered, refusals by reason, data relayed, input dropped."""
        self._secret = secret
        self._rand = rand_bytes
        self._nonce_key = rand_bytes(16)
        self._port_in_use = port_in_use or (lambda _port: False)
        self._by_client: dict[_Client, _Allocation] = {}
        self._streams: dict[Address, bytearray] = {}  # TCP client -> bytes not framed yet
        self._by_relayed: dict[Address, _Allocation] = {}

    # -- queries ------------------------------------------------------------------------------

    def relayed_addresses(self) -> set[Address]:
        """The relayed addresses of the live allocations (a driver keeps a socket on each)."""
        return set(self._by_relayed)

    def allocation_of(self, client: Address, *, tcp: bool = False) -> Address | None:
        """The relayed address of ``client``'s allocation, if it has one."""
        alloc = self._by_client.get((client, tcp))
        return alloc.relayed if alloc is not None else None

    def get_timer(self) -> float | None:
        """When something expires next (allocations, permissions, channels)."""
        times: list[float] = []
        for alloc in self._by_client.values():
            times.append(alloc.expires_at)
            times.extend(alloc.permissions.values())
            times.extend(t for _, t in alloc.channels.values())
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Drop what has expired by ``now``."""
        for alloc in list(self._by_client.values()):
            if now >= alloc.expires_at:
                self._delete(alloc)
                self.stats["expired_allocations"] += 1
                continue
            for ip, until in list(alloc.permissions.items()):
                if now >= until:
                    del alloc.permissions[ip]
            for channel, (peer, until) in list(alloc.channels.items()):
                if now >= until:
                    del alloc.channels[channel]
                    alloc.peer_channels.pop(peer, None)

    # -- input --------------------------------------------------------------------------------

    def receive(
        self, data: bytes, source: Address, now: float, local: Address | None = None
    ) -> list[Outgoing]:
        """One datagram from ``source`` that arrived at ``local`` (default: the listening
        address); returns what to send.  Never raises on bad input."""
        self.handle_timer(now)  # correct whatever the driver's timer precision
        local = self.address if local is None else local
        if local != self.address:
            return self._from_peer(bytes(data), source, local)
        return self._frame(bytes(data), (source, False), now)

    def receive_stream(self, data: bytes, source: Address, now: float) -> list[Outgoing]:
        """Bytes from the TCP connection of ``source`` (RFC 8656 section 7: STUN messages and
        padded ChannelData on one stream); what to send, ``stream=True`` for that connection.
        A stream that stops framing is dropped with its allocation (a real server closes it)."""
        self.handle_timer(now)
        buffer = self._streams.setdefault(source, bytearray())
        buffer += data
        out: list[Outgoing] = []
        while len(buffer) >= 4:
            first = buffer[0] >> 6
            length = int.from_bytes(buffer[2:4], "big")
            if first == 0:
                size = 20 + length
            elif first == 1:
                size = 4 + length + (-length % 4)
            else:
                self.stats["stream_junk"] += 1
                self.close_stream(source)
                return out
            if len(buffer) < size:
                break
            frame = bytes(buffer[:size])
            del buffer[:size]
            out += self._frame(frame, (source, True), now)
        return out

    def close_stream(self, source: Address) -> None:
        """The TCP connection of ``source`` closed: its allocation goes (RFC 8656 section 7)."""
        self._streams.pop(source, None)
        alloc = self._by_client.get((source, True))
        if alloc is not None:
            self._delete(alloc)
            self.stats["closed_stream_allocations"] += 1

    def _frame(self, data: bytes, client: _Client, now: float) -> list[Outgoing]:
        if not data:
            self.stats["junk"] += 1
            return []
        if data[0] >> 6 == 1:
            return self._channel_data_from_client(data, client)
        try:
            message = parse_message(data)
        except StunError:
            self.stats["junk"] += 1
            return []
        if message.legacy:
            self.stats["junk"] += 1
            return []
        if message.message_class is Class.INDICATION:
            if message.message_method is Method.SEND:
                return self._send_indication(message, client)
            self.stats["junk"] += 1
            return []
        if message.message_class is not Class.REQUEST:
            self.stats["junk"] += 1
            return []
        if message.message_method is Method.BINDING:
            self.stats["binding"] += 1
            answer = Message(
                Method.BINDING,
                Class.RESPONSE,
                message.transaction_id,
                {"XOR-MAPPED-ADDRESS": client[0]},
            )
            return [self._to(client, bytes(answer))]
        return self._request(message, data, client, now)

    # -- requests -----------------------------------------------------------------------------

    def _request(self, message: Message, raw: bytes, client: _Client, now: float) -> list[Outgoing]:
        attrs = message.attributes
        if "MESSAGE-INTEGRITY" not in attrs:
            self.stats["challenged"] += 1
            return self._error(message, client, 401, "Unauthorized", now)
        username, realm, nonce = attrs.get("USERNAME"), attrs.get("REALM"), attrs.get("NONCE")
        if not isinstance(username, str) or not isinstance(realm, str) or realm != self.realm:
            self.stats["refused_credentials"] += 1
            return self._error(message, client, 401, "Unauthorized", now)
        if not isinstance(nonce, str) or not self._nonce_ok(nonce, client[0], now):
            self.stats["stale_nonce"] += 1
            return self._error(message, client, 438, "Stale Nonce", now)
        alloc = self._by_client.get(client)
        if alloc is not None:
            # An allocation's requests are checked with its own key and username, not expiry.
            if username != alloc.username:
                self.stats["wrong_credentials"] += 1
                return self._error(message, client, 441, "Wrong Credentials", now)
            key = alloc.key
        else:
            key = long_term_key(username, self.realm, coturn_password(self._secret, username))
        try:
            parse_message(raw, key)
        except StunError:
            self.stats["bad_integrity"] += 1
            return self._error(message, client, 401, "Unauthorized", now)
        method = message.message_method
        if method is Method.ALLOCATE:
            return self._allocate(message, client, username, key, now)
        if alloc is None:
            self.stats["no_allocation"] += 1
            return self._error(message, client, 437, "Allocation Mismatch", now, key)
        if method is Method.REFRESH:
            return self._refresh(message, alloc, now)
        if method is Method.CREATE_PERMISSION:
            return self._create_permission(message, alloc, now)
        if method is Method.CHANNEL_BIND:
            return self._channel_bind(message, alloc, now)
        self.stats["bad_request"] += 1
        return self._error(message, client, 400, "Bad Request", now, key)

    def _allocate(
        self, message: Message, client: _Client, username: str, key: bytes, now: float
    ) -> list[Outgoing]:
        existing = self._by_client.get(client)
        if existing is not None:
            if existing.allocate_tid == message.transaction_id:
                self.stats["allocate_retransmit"] += 1
                return [self._to(client, existing.allocate_answer)]
            self.stats["allocation_mismatch"] += 1
            return self._error(message, client, 437, "Allocation Mismatch", now, key)
        expiry_text, sep, _name = username.partition(":")
        if not sep or not expiry_text.isdigit() or int(expiry_text) < now:
            # coturn: the REST username's timestamp is checked when allocating.
            self.stats["expired_credentials"] += 1
            return self._error(message, client, 401, "Unauthorized", now)
        transport = message.attributes.get("REQUESTED-TRANSPORT")
        if transport is None:
            self.stats["bad_request"] += 1
            return self._error(message, client, 400, "Bad Request", now, key)
        if transport != _UDP:
            self.stats["unsupported_transport"] += 1
            return self._error(message, client, 442, "Unsupported Transport Protocol", now, key)
        if len(self._by_client) >= self.max_allocations:
            self.stats["quota"] += 1
            return self._error(message, client, 486, "Allocation Quota Reached", now, key)
        port = self._free_port()
        if port is None:
            self.stats["no_ports"] += 1
            return self._error(message, client, 508, "Insufficient Capacity", now, key)
        lifetime = _lifetime(message.attributes.get("LIFETIME"))
        relayed = (self.address[0], port)
        answer = self._answer(
            message,
            key,
            {"XOR-RELAYED-ADDRESS": relayed, "XOR-MAPPED-ADDRESS": client[0], "LIFETIME": lifetime},
        )
        alloc = _Allocation(
            client, username, key, relayed, now + lifetime, message.transaction_id, answer
        )
        self._by_client[client] = alloc
        self._by_relayed[relayed] = alloc
        self.stats["allocations"] += 1
        return [self._to(client, answer)]

    def _refresh(self, message: Message, alloc: _Allocation, now: float) -> list[Outgoing]:
        requested = message.attributes.get("LIFETIME")
        if requested == 0:
            self._delete(alloc)
            self.stats["released"] += 1
            return [self._to(alloc.client, self._answer(message, alloc.key, {"LIFETIME": 0}))]
        lifetime = _lifetime(requested)
        alloc.expires_at = now + lifetime
        self.stats["refreshed"] += 1
        answer = self._answer(message, alloc.key, {"LIFETIME": lifetime})
        return [self._to(alloc.client, answer)]

    def _create_permission(
        self, message: Message, alloc: _Allocation, now: float
    ) -> list[Outgoing]:
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        if not isinstance(peer, tuple):
            self.stats["bad_request"] += 1
            return self._error(message, alloc.client, 400, "Bad Request", now, alloc.key)
        alloc.permissions[peer[0]] = now + PERMISSION_LIFETIME_S
        self.stats["permissions"] += 1
        return [self._to(alloc.client, self._answer(message, alloc.key, {}))]

    def _channel_bind(self, message: Message, alloc: _Allocation, now: float) -> list[Outgoing]:
        channel = message.attributes.get("CHANNEL-NUMBER")
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        if (
            not isinstance(channel, int)
            or not CHANNEL_MIN <= channel <= CHANNEL_MAX
            or not isinstance(peer, tuple)
        ):
            self.stats["bad_request"] += 1
            return self._error(message, alloc.client, 400, "Bad Request", now, alloc.key)
        bound = alloc.channels.get(channel)
        other = alloc.peer_channels.get(peer)
        if (bound is not None and bound[0] != peer) or (other is not None and other != channel):
            # RFC 8656 section 12.2: one channel per peer and one peer per channel.
            self.stats["channel_conflict"] += 1
            return self._error(message, alloc.client, 400, "Bad Request", now, alloc.key)
        alloc.channels[channel] = (peer, now + CHANNEL_LIFETIME_S)
        alloc.peer_channels[peer] = channel
        alloc.permissions[peer[0]] = now + PERMISSION_LIFETIME_S
        self.stats["channel_binds"] += 1
        return [self._to(alloc.client, self._answer(message, alloc.key, {}))]

    # -- data ---------------------------------------------------------------------------------

    def _send_indication(self, message: Message, client: _Client) -> list[Outgoing]:
        alloc = self._by_client.get(client)
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        data = message.attributes.get("DATA")
        if alloc is None or not isinstance(peer, tuple) or not isinstance(data, bytes):
            self.stats["dropped_send"] += 1
            return []
        if peer[0] not in alloc.permissions:
            self.stats["no_permission"] += 1
            return []
        self.stats["relayed_to_peer"] += 1
        return [Outgoing(data, alloc.relayed, peer)]

    def _channel_data_from_client(self, frame: bytes, client: _Client) -> list[Outgoing]:
        alloc = self._by_client.get(client)
        try:
            channel, data = decode_channel_data(frame)
        except ValueError:
            self.stats["junk"] += 1
            return []
        bound = alloc.channels.get(channel) if alloc is not None else None
        if alloc is None or bound is None:
            self.stats["unknown_channel"] += 1
            return []
        self.stats["relayed_to_peer"] += 1
        return [Outgoing(data, alloc.relayed, bound[0])]

    def _from_peer(self, data: bytes, source: Address, local: Address) -> list[Outgoing]:
        alloc = self._by_relayed.get(local)
        if alloc is None:
            self.stats["no_allocation_for_peer"] += 1
            return []
        if source[0] not in alloc.permissions:
            # RFC 8656 section 11: no permission for the peer's IP, no relaying (the filter
            # that makes a relayed address no open proxy).
            self.stats["no_permission"] += 1
            return []
        self.stats["relayed_to_client"] += 1
        channel = alloc.peer_channels.get(source)
        if channel is not None:
            # Padded to 4 bytes over TCP (RFC 8656 section 12.5), as the client frames them.
            frame = encode_channel_data(channel, data, pad=alloc.client[1])
            return [self._to(alloc.client, frame)]
        indication = Message(
            Method.DATA,
            Class.INDICATION,
            self._rand(12),
            {"XOR-PEER-ADDRESS": source, "DATA": data},
        )
        return [self._to(alloc.client, bytes(indication))]

    # -- helpers ------------------------------------------------------------------------------

    def _to(self, client: _Client, data: bytes) -> Outgoing:
        """``data`` for ``client``: a datagram, or bytes on its TCP connection."""
        return Outgoing(data, self.address, client[0], client[1])

    def _answer(self, request: Message, key: bytes, attributes: dict[str, Any]) -> bytes:
        reply = Message(request.message_method, Class.RESPONSE, request.transaction_id, attributes)
        reply.add_message_integrity(key)
        return bytes(reply)

    def _error(
        self,
        request: Message,
        client: _Client,
        code: int,
        reason: str,
        now: float,
        key: bytes | None = None,
    ) -> list[Outgoing]:
        attrs: dict[str, Any] = {"ERROR-CODE": (code, reason)}
        if code in (401, 438):
            attrs["REALM"] = self.realm
            attrs["NONCE"] = self._nonce(client[0], now)
        reply = Message(request.message_method, Class.ERROR, request.transaction_id, attrs)
        if key is not None:
            reply.add_message_integrity(key)
        self.stats[f"error_{code}"] += 1
        return [self._to(client, bytes(reply))]

    def _nonce(self, source: Address, now: float) -> str:
        expiry = int(now + NONCE_LIFETIME_S)
        return f"{expiry:x}-{self._nonce_mac(expiry, source)}"

    def _nonce_mac(self, expiry: int, source: Address) -> str:
        text = f"{expiry}|{source[0]}".encode()
        return hmac.new(self._nonce_key, text, hashlib.sha256).hexdigest()[:24]

    def _nonce_ok(self, nonce: str, source: Address, now: float) -> bool:
        expiry_hex, sep, mac = nonce.partition("-")
        if not sep or not expiry_hex or len(expiry_hex) > 12:
            return False
        try:
            expiry = int(expiry_hex, 16)
        except ValueError:
            return False
        return expiry > now and hmac.compare_digest(mac, self._nonce_mac(expiry, source))

    def _free_port(self) -> int | None:
        low, high = RELAY_PORTS
        span = high - low + 1
        start = int.from_bytes(self._rand(2), "big") % span
        for i in range(span):
            port = low + (start + i) % span
            if (self.address[0], port) not in self._by_relayed and not self._port_in_use(port):
                return port
        return None

    def _delete(self, alloc: _Allocation) -> None:
        self._by_client.pop(alloc.client, None)
        self._by_relayed.pop(alloc.relayed, None)


def _lifetime(requested: object) -> int:
    """RFC 8656 section 7.2: min(requested, max), and never below the default."""
    if not isinstance(requested, int):
        return DEFAULT_LIFETIME_S
    return max(DEFAULT_LIFETIME_S, min(requested, MAX_LIFETIME_S))
