"""A TURN server model (RFC 8656 over UDP) with coturn's REST credentials, for the simulator.

Two layers:

* :class:`TurnServerModel`, sans-I/O: :meth:`~TurnServerModel.receive` takes one datagram, the
  address it came from, the server address it arrived at and ``now``, and returns the datagrams
  to send as :class:`Outgoing` (data, from which server address, to whom).  No sockets, no clock:
  in-memory tests drive it against the core :class:`~p2plab.core.turn.TurnClient` directly.
* :class:`SimTurnServer`, the same model on a simulated :class:`~p2plab.lab.simnet.Host`: the
  listening socket, one socket per relayed address (bound when the allocation is made, closed
  when it goes), and expiry timers on the simulation's clock.

What it does, as coturn with ``use-auth-secret`` does:

* every request needs the long-term credential mechanism: the first, unauthenticated one gets
  401 with REALM and NONCE; a request with an unknown or outdated NONCE gets 438 with a fresh
  one (nonces are stateless: an expiry and an HMAC of it and the client's IP, so a flood of
  unauthenticated requests costs no memory); MESSAGE-INTEGRITY is checked with
  MD5(username:realm:password) where password = base64(HMAC-SHA1(secret, username));
* the username ``"<unix expiry>:<name>"`` is checked when the allocation is made (an expired one
  gets 401, like coturn); later requests of that allocation must carry the same username and are
  checked with its key, but not for expiry: coturn keeps refreshing an allocation whose
  credentials have run out (tests/aio/test_turn_coturn.py);
* Allocate (REQUESTED-TRANSPORT UDP only, else 442; a second Allocate from the same client gets
  437 unless it retransmits the first, which gets the same answer again), the relayed address
  is a random free port of the server's IP; Refresh (LIFETIME 0 deletes); CreatePermission
  (300 s); ChannelBind (600 s, installs the permission too; 0x4000-0x4FFF; a channel or a peer
  bound otherwise gets 400); Send and Data indications; ChannelData both ways;
* from a peer, data reaches the client only if a live permission names the peer's IP; the
  rest is dropped and counted (``no_permission``);
* lifetimes on the caller's clock: default 600 s, at most 3600 s (RFC 8656's rule: the desired
  lifetime is min(requested, max), and never below the default).

Limits of the model (say so before reading results off it): UDP to the server only (no TCP or
TLS listener, so a client's TCP fallback has nobody to talk to); IPv4 only; no bandwidth quota,
no per-user allocation quota beyond ``max_allocations`` in total; one XOR-PEER-ADDRESS per
CreatePermission; no ALTERNATE-SERVER, no DONT-FRAGMENT, no EVEN-PORT/RESERVATION-TOKEN; no
FINGERPRINT on answers; Binding requests are answered (coturn does) without RFC 5780 extras.
Bad input never raises: it is dropped and counted in :attr:`TurnServerModel.stats`.
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
from p2plab.lab.simnet import Host, Scheduler, SimSocket, TimerHandle

__all__ = [
    "CHANNEL_LIFETIME_S",
    "DEFAULT_LIFETIME_S",
    "MAX_LIFETIME_S",
    "NONCE_LIFETIME_S",
    "PERMISSION_LIFETIME_S",
    "RELAY_PORTS",
    "SIM_TURN_REALM",
    "Outgoing",
    "SimTurnServer",
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


@dataclass
class _Allocation:
    client: Address
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
        self._by_client: dict[Address, _Allocation] = {}
        self._by_relayed: dict[Address, _Allocation] = {}

    # -- queries ------------------------------------------------------------------------------

    def relayed_addresses(self) -> set[Address]:
        """The relayed addresses of the live allocations (a driver keeps a socket on each)."""
        return set(self._by_relayed)

    def allocation_of(self, client: Address) -> Address | None:
        """The relayed address of ``client``'s allocation, if it has one."""
        alloc = self._by_client.get(client)
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
        if not data:
            self.stats["junk"] += 1
            return []
        if data[0] >> 6 == 1:
            return self._channel_data_from_client(bytes(data), source)
        try:
            message = parse_message(bytes(data))
        except StunError:
            self.stats["junk"] += 1
            return []
        if message.legacy:
            self.stats["junk"] += 1
            return []
        if message.message_class is Class.INDICATION:
            if message.message_method is Method.SEND:
                return self._send_indication(message, source)
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
                {"XOR-MAPPED-ADDRESS": source},
            )
            return [Outgoing(bytes(answer), self.address, source)]
        return self._request(message, bytes(data), source, now)

    # -- requests -----------------------------------------------------------------------------

    def _request(self, message: Message, raw: bytes, source: Address, now: float) -> list[Outgoing]:
        attrs = message.attributes
        if "MESSAGE-INTEGRITY" not in attrs:
            self.stats["challenged"] += 1
            return self._error(message, source, 401, "Unauthorized", now)
        username, realm, nonce = attrs.get("USERNAME"), attrs.get("REALM"), attrs.get("NONCE")
        if not isinstance(username, str) or not isinstance(realm, str) or realm != self.realm:
            self.stats["refused_credentials"] += 1
            return self._error(message, source, 401, "Unauthorized", now)
        if not isinstance(nonce, str) or not self._nonce_ok(nonce, source, now):
            self.stats["stale_nonce"] += 1
            return self._error(message, source, 438, "Stale Nonce", now)
        alloc = self._by_client.get(source)
        if alloc is not None:
            # An allocation's requests are checked with its own key and username, not expiry.
            if username != alloc.username:
                self.stats["wrong_credentials"] += 1
                return self._error(message, source, 441, "Wrong Credentials", now)
            key = alloc.key
        else:
            key = long_term_key(username, self.realm, coturn_password(self._secret, username))
        try:
            parse_message(raw, key)
        except StunError:
            self.stats["bad_integrity"] += 1
            return self._error(message, source, 401, "Unauthorized", now)
        method = message.message_method
        if method is Method.ALLOCATE:
            return self._allocate(message, source, username, key, now)
        if alloc is None:
            self.stats["no_allocation"] += 1
            return self._error(message, source, 437, "Allocation Mismatch", now, key)
        if method is Method.REFRESH:
            return self._refresh(message, alloc, now)
        if method is Method.CREATE_PERMISSION:
            return self._create_permission(message, alloc, now)
        if method is Method.CHANNEL_BIND:
            return self._channel_bind(message, alloc, now)
        self.stats["bad_request"] += 1
        return self._error(message, source, 400, "Bad Request", now, key)

    def _allocate(
        self, message: Message, source: Address, username: str, key: bytes, now: float
    ) -> list[Outgoing]:
        existing = self._by_client.get(source)
        if existing is not None:
            if existing.allocate_tid == message.transaction_id:
                self.stats["allocate_retransmit"] += 1
                return [Outgoing(existing.allocate_answer, self.address, source)]
            self.stats["allocation_mismatch"] += 1
            return self._error(message, source, 437, "Allocation Mismatch", now, key)
        expiry_text, sep, _name = username.partition(":")
        if not sep or not expiry_text.isdigit() or int(expiry_text) < now:
            # coturn: the REST username's timestamp is checked when allocating.
            self.stats["expired_credentials"] += 1
            return self._error(message, source, 401, "Unauthorized", now)
        transport = message.attributes.get("REQUESTED-TRANSPORT")
        if transport is None:
            self.stats["bad_request"] += 1
            return self._error(message, source, 400, "Bad Request", now, key)
        if transport != _UDP:
            self.stats["unsupported_transport"] += 1
            return self._error(message, source, 442, "Unsupported Transport Protocol", now, key)
        if len(self._by_client) >= self.max_allocations:
            self.stats["quota"] += 1
            return self._error(message, source, 486, "Allocation Quota Reached", now, key)
        port = self._free_port()
        if port is None:
            self.stats["no_ports"] += 1
            return self._error(message, source, 508, "Insufficient Capacity", now, key)
        lifetime = _lifetime(message.attributes.get("LIFETIME"))
        relayed = (self.address[0], port)
        answer = self._answer(
            message,
            key,
            {"XOR-RELAYED-ADDRESS": relayed, "XOR-MAPPED-ADDRESS": source, "LIFETIME": lifetime},
        )
        alloc = _Allocation(
            source, username, key, relayed, now + lifetime, message.transaction_id, answer
        )
        self._by_client[source] = alloc
        self._by_relayed[relayed] = alloc
        self.stats["allocations"] += 1
        return [Outgoing(answer, self.address, source)]

    def _refresh(self, message: Message, alloc: _Allocation, now: float) -> list[Outgoing]:
        requested = message.attributes.get("LIFETIME")
        if requested == 0:
            self._delete(alloc)
            self.stats["released"] += 1
            return [Outgoing(self._answer(message, alloc.key, {"LIFETIME": 0}), *self._to(alloc))]
        lifetime = _lifetime(requested)
        alloc.expires_at = now + lifetime
        self.stats["refreshed"] += 1
        answer = self._answer(message, alloc.key, {"LIFETIME": lifetime})
        return [Outgoing(answer, *self._to(alloc))]

    def _create_permission(
        self, message: Message, alloc: _Allocation, now: float
    ) -> list[Outgoing]:
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        if not isinstance(peer, tuple):
            self.stats["bad_request"] += 1
            return self._error(message, alloc.client, 400, "Bad Request", now, alloc.key)
        alloc.permissions[peer[0]] = now + PERMISSION_LIFETIME_S
        self.stats["permissions"] += 1
        return [Outgoing(self._answer(message, alloc.key, {}), *self._to(alloc))]

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
        return [Outgoing(self._answer(message, alloc.key, {}), *self._to(alloc))]

    # -- data ---------------------------------------------------------------------------------

    def _send_indication(self, message: Message, source: Address) -> list[Outgoing]:
        alloc = self._by_client.get(source)
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

    def _channel_data_from_client(self, frame: bytes, source: Address) -> list[Outgoing]:
        alloc = self._by_client.get(source)
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
            frame = encode_channel_data(channel, data, pad=False)
            return [Outgoing(frame, self.address, alloc.client)]
        indication = Message(
            Method.DATA,
            Class.INDICATION,
            self._rand(12),
            {"XOR-PEER-ADDRESS": source, "DATA": data},
        )
        return [Outgoing(bytes(indication), self.address, alloc.client)]

    # -- helpers ------------------------------------------------------------------------------

    def _to(self, alloc: _Allocation) -> tuple[Address, Address]:
        return self.address, alloc.client

    def _answer(self, request: Message, key: bytes, attributes: dict[str, Any]) -> bytes:
        reply = Message(request.message_method, Class.RESPONSE, request.transaction_id, attributes)
        reply.add_message_integrity(key)
        return bytes(reply)

    def _error(
        self,
        request: Message,
        source: Address,
        code: int,
        reason: str,
        now: float,
        key: bytes | None = None,
    ) -> list[Outgoing]:
        attrs: dict[str, Any] = {"ERROR-CODE": (code, reason)}
        if code in (401, 438):
            attrs["REALM"] = self.realm
            attrs["NONCE"] = self._nonce(source, now)
        reply = Message(request.message_method, Class.ERROR, request.transaction_id, attrs)
        if key is not None:
            reply.add_message_integrity(key)
        self.stats[f"error_{code}"] += 1
        return [Outgoing(bytes(reply), self.address, source)]

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


class SimTurnServer:
    """A :class:`TurnServerModel` listening on ``port`` of a simulated ``host``."""

    def __init__(
        self,
        host: Host,
        clock: Scheduler,
        secret: str,
        *,
        port: int = 3478,
        rand_bytes: Callable[[int], bytes],
        realm: str = SIM_TURN_REALM,
    ) -> None:
        self.host = host
        self.clock = clock
        self.listener = host.bind(port)
        self.listener.on_datagram = self._on_listener
        self.model = TurnServerModel(
            self.listener.address,
            secret,
            rand_bytes=rand_bytes,
            realm=realm,
            port_in_use=lambda p: (host.ip, p) in host.sockets,
        )
        self._relays: dict[Address, SimSocket] = {}
        self._timer: TimerHandle | None = None

    @property
    def address(self) -> Address:
        """The listening address (what a ``turn:`` URL names)."""
        return self.listener.address

    @property
    def url(self) -> str:
        """``turn:ip:port?transport=udp``."""
        return f"turn:{self.address[0]}:{self.address[1]}?transport=udp"

    @property
    def stats(self) -> Counter[str]:
        """The model's counters."""
        return self.model.stats

    def _on_listener(self, data: bytes, source: Address) -> None:
        self._carry_out(self.model.receive(data, source, self.clock.now))

    def _relay_handler(self, local: Address) -> Callable[[bytes, Address], None]:
        def on_datagram(data: bytes, source: Address) -> None:
            self._carry_out(self.model.receive(data, source, self.clock.now, local))

        return on_datagram

    def _carry_out(self, out: list[Outgoing]) -> None:
        self._sync()
        for item in out:
            sock = self.listener if item.local == self.address else self._relays.get(item.local)
            if sock is not None:
                sock.sendto(item.data, item.destination)

    def _sync(self) -> None:
        """Sockets for the live relayed addresses, and the next expiry timer."""
        live = self.model.relayed_addresses()
        for address in list(self._relays):
            if address not in live:
                self._relays.pop(address).close()
        for address in live - set(self._relays):
            sock = self.host.bind(address[1], address[0])
            sock.on_datagram = self._relay_handler(address)
            self._relays[address] = sock
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.model.get_timer()
        if when is not None:
            self._timer = self.clock.call_at(max(when, self.clock.now), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.model.handle_timer(self.clock.now)
        self._sync()
