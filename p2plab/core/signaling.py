"""Rendezvous message models, shared by the worker and ``rendezvous_service_code``.

Every message is a JSON object with a string ``type`` (see contracts.md).  Unknown fields are
ignored; unknown types raise :class:`~p2plab.errors.RemoteProtocolError` from
:func:`parse_message`, and the receiver replies with an ``error`` message.
"""

from __future__ import annotations

import binascii
import ipaddress
import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from p2plab.core.addresses import is_ip_literal
from p2plab.core.crypto.keys import decode_public_key
from p2plab.core.turn_config import MAX_TURN_URL_LENGTH, parse_turn_url
from p2plab.errors import ConfigError, RemoteProtocolError

__all__ = [
    "ERROR_ANSWER_INTERVAL",
    "MAX_LOCAL_CANDIDATES",
    "MAX_MAPPING_LIFETIME_S",
    "MAX_MESSAGE_BYTES",
    "MAX_PREDICTED_PORTS",
    "MAX_RELAY_BYTES",
    "MAX_TRICKLED_CANDIDATES",
    "MAX_TURN_URLS",
    "BadMessage",
    "Candidate",
    "CandidatesIn",
    "CandidatesOut",
    "Challenge",
    "ErrorAnswers",
    "ErrorMessage",
    "NatHint",
    "P2PConnectionOffer",
    "PeerDisconnected",
    "PortMapping",
    "Register",
    "Registered",
    "RelayCandidate",
    "RelayIn",
    "RelayOut",
    "RendezvousMessage",
    "RendezvousToWorker",
    "TurnOffer",
    "UpdateUdpEndpoint",
    "WorkerMessage",
    "WorkerToRendezvous",
    "decode_relay_data",
    "dump_message",
    "encode_relay_data",
    "parse_rendezvous_message",
    "parse_worker_message",
]

#: Largest signaling message accepted, in bytes (bounded to protect the services).
MAX_MESSAGE_BYTES = 16 * 1024
#: Largest datagram carried by a ``relay`` message, in bytes after base64 decoding (a sealed chat
#: datagram is at most about 4.2 KiB).
MAX_RELAY_BYTES = 8 * 1024
_MAX_RELAY_B64 = 4 * ((MAX_RELAY_BYTES + 2) // 3)
#: Most LAN candidates a worker may announce (an offer carries these plus the public endpoint).
MAX_LOCAL_CANDIDATES = 8
#: Most predicted ports a worker may announce (``NatHint.predicted_ports``).
MAX_PREDICTED_PORTS = 16
#: Most TURN server URLs an offer carries.
MAX_TURN_URLS = 4
#: Longest port-mapping lease a worker may announce, in seconds (a week: RFC 6886 allows
#: 2**32 - 1 s, but nothing honest asks for more than hours; an absurd one is refused).
MAX_MAPPING_LIFETIME_S = 604800.0
#: A worker answers at most one ``error`` per kind of bad message per this many seconds.
ERROR_ANSWER_INTERVAL = 1.0


class BadMessage(RemoteProtocolError):
    """A signaling message that does not parse; ``kind`` says which sort (a bounded set)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
        """The message's ``type`` when it is a known one, ``"unknown_type"`` for a type the
        receiver does not know, ``"malformed"`` for no JSON object with a string type."""


class ErrorAnswers:
    """When a worker answers a bad message with ``error``: once per kind per interval.

    So a rendezvous (or whoever holds the connection) sending junk by the thousand gets a
    handful of answers, not a flood; the kinds are a bounded set (:attr:`BadMessage.kind`).
    """

    def __init__(self, interval: float = ERROR_ANSWER_INTERVAL) -> None:
        self.interval = interval
        """Seconds between two answers about the same kind."""
        self._last: dict[str, float] = {}

    def allow(self, kind: str, now: float) -> bool:
        """Whether to answer a bad message of ``kind`` at ``now`` (if so, it is remembered)."""
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            return False
        self._last[kind] = now
        return True


def _ip_literal(value: str) -> str:
    """``value`` if it is an IPv4 or IPv6 literal.  Host names are refused here, in the shared
    models, so nothing a peer or the rendezvous sends can make either end resolve a name
    (a blocking lookup froze a worker's loop for ~54 s: issue 14 finding 3).

    A scoped IPv6 literal (``fe80::1%eth0``) is refused too: the zone names an interface of the
    sender's host, meaningless (or worse, another interface) on the receiver's.  So is an
    IPv4-mapped IPv6 one (``::ffff:192.0.2.1``): IPv4 addresses travel as IPv4 literals, or
    one address would compare unequal to itself across families."""
    if "%" in value or not is_ip_literal(value):
        raise ValueError(f"not an IP address: {value[:64]!r}")
    if ":" in value and ipaddress.IPv6Address(value).ipv4_mapped is not None:
        raise ValueError(f"IPv4-mapped IPv6 address: {value[:64]!r} (send the IPv4 literal)")
    return value


def _public_key(value: str | None) -> str | None:
    """``value`` if None or a usable base64 X25519 public key (32 bytes, not a low-order point:
    issue 14 finding 13)."""
    if value is None:
        return None
    try:
        decode_public_key(value)
    except RemoteProtocolError as exc:
        raise ValueError(str(exc)) from None
    return value


def decode_relay_data(text: str) -> bytes:
    """The datagram carried in a ``relay`` message's ``data`` (strict base64).

    Raises ValueError when ``text`` is not base64 or decodes to more than MAX_RELAY_BYTES.
    """
    try:
        raw = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"data is not base64: {exc}") from None
    if len(raw) > MAX_RELAY_BYTES:
        raise ValueError(f"relayed datagram too large: {len(raw)} bytes > {MAX_RELAY_BYTES}")
    return raw


def encode_relay_data(data: bytes) -> str:
    """Base64 text for a ``relay`` message's ``data``."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Candidate(_Model):
    """One transport address a peer may be reached at."""

    ip: str = Field(max_length=64)
    """An IP literal (never a host name)."""
    port: int = Field(ge=0, le=65535)

    _check_ip = field_validator("ip")(_ip_literal)


class Register(_Model):
    """First message of a worker: who it is and where it thinks it is."""

    type: Literal["register"] = "register"
    http_public_ip: str | None = Field(default=None, max_length=64)
    room: str = Field(default="default", min_length=1, max_length=64)
    token: str | None = Field(default=None, max_length=256)
    public_key: str | None = Field(default=None, max_length=128)
    """Base64 X25519 public key (None: plaintext mode); low-order points are refused."""
    proof: str | None = Field(default=None, max_length=64)
    """Base64 of ``registration_proof(identity, server_key, nonce, worker_id)`` answering the
    rendezvous's :class:`Challenge`; required when ``public_key`` is given."""

    _check_key = field_validator("public_key")(_public_key)


def _ipv6_candidate(value: Candidate | None) -> Candidate | None:
    """``value`` if None or an IPv6 candidate (``udp6`` names the IPv6 endpoint only)."""
    if value is not None and ":" not in value.ip:
        raise ValueError(f"not an IPv6 address: {value.ip[:64]!r}")
    return value


class NatHint(_Model):
    """What a worker learnt of its own NAT's port mapping, passed on to its peer in the offer.

    It only chooses how the pair punches (plain, birthday, predicted ports; issue 16): the
    receiver never probes another IP than the peer's announced one, nor more than its own budget.
    """

    mapping: Literal["endpoint-independent", "endpoint-dependent", "unknown"] = "unknown"
    """RFC 4787 mapping seen by STUN from the punching socket to two or more destinations."""
    remaps_on_clash: bool = False
    """The NAT gives the socket a new port when an unsolicited packet reached its mapping
    first (natlab.md's "leaky" profile): it maps endpoint-independently but punches as hard."""
    sequential: bool = False
    """The mappings seen grew by a constant stride (port prediction applies)."""
    predicted_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=list, max_length=MAX_PREDICTED_PORTS
    )
    """The ports the NAT will probably give the next mappings, most likely first."""


class PortMapping(_Model):
    """A port the worker's NAT opened for its UDP socket when asked (issue 18), announced to the
    peer as a candidate ranked above the STUN endpoint."""

    protocol: Literal["nat-pmp", "pcp", "upnp"]
    """Which protocol obtained the mapping (NAT-PMP, PCP or UPnP IGD)."""
    ip: str = Field(max_length=64)
    """The mapping's external address (an IP literal)."""
    port: int = Field(ge=1, le=65535)
    """The mapping's external port."""
    lifetime_s: float = Field(gt=0, le=MAX_MAPPING_LIFETIME_S)
    """The lease the NAT granted, in seconds (the worker renews it at half-life)."""

    _check_ip = field_validator("ip")(_ip_literal)


class UpdateUdpEndpoint(_Model):
    """The worker's STUN-learnt UDP endpoint and its LAN candidates."""

    type: Literal["update_udp_endpoint"] = "update_udp_endpoint"
    udp_ip: str = Field(max_length=64)
    udp_port: int = Field(ge=0, le=65535)
    local_candidates: list[Candidate] = Field(default_factory=list, max_length=MAX_LOCAL_CANDIDATES)
    """LAN addresses of the socket, IPv4 and IPv6 host addresses alike (IP literals)."""
    nat: NatHint | None = None
    """What the worker learnt of its NAT's mapping (None: it did not test)."""
    mapped: PortMapping | None = None
    """The port its NAT mapped for it on request (None: no port mapping)."""
    udp6: Candidate | None = None
    """Its IPv6 endpoint as STUN over IPv6 saw it (no NAT: the host's own global address);
    None: no IPv6."""

    _check_ip = field_validator("udp_ip")(_ip_literal)
    _check_udp6 = field_validator("udp6")(_ipv6_candidate)


class RelayOut(_Model):
    """A worker asks the rendezvous to pass one peer datagram to its paired peer.

    Optional extension (relay fallback when hole punching fails): ``data`` is the base64 of the
    datagram, which stays sealed end to end; the rendezvous forwards it only between the two
    workers of a pair and only up to MAX_RELAY_BYTES.
    """

    type: Literal["relay"] = "relay"
    to: str = Field(min_length=1, max_length=64)
    data: str = Field(max_length=_MAX_RELAY_B64)

    @field_validator("data")
    @classmethod
    def _check_data(cls, value: str) -> str:
        decode_relay_data(value)
        return value

    def payload(self) -> bytes:
        """The relayed datagram."""
        return decode_relay_data(self.data)


class RelayIn(_Model):
    """The rendezvous passes on a datagram the paired peer ``from`` relayed (see RelayOut)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    type: Literal["relay"] = "relay"
    from_: str = Field(alias="from", min_length=1, max_length=64)
    data: str = Field(max_length=_MAX_RELAY_B64)

    @field_validator("data")
    @classmethod
    def _check_data(cls, value: str) -> str:
        decode_relay_data(value)
        return value

    def payload(self) -> bytes:
        """The relayed datagram."""
        return decode_relay_data(self.data)


#: Most candidates one ``candidates`` message may carry.
MAX_TRICKLED_CANDIDATES = 4


class RelayCandidate(_Model):
    """A TURN relayed address of a worker, trickled to its peer after the offer (issue 17)."""

    ip: str = Field(max_length=64)
    """An IP literal (the XOR-RELAYED-ADDRESS of the worker's allocation)."""
    port: int = Field(ge=1, le=65535)
    transport: Literal["udp", "tcp"] = "udp"
    """How the worker reaches its TURN server (names the path: ``turn-udp`` or ``turn-tcp``)."""

    _check_ip = field_validator("ip")(_ip_literal)


class CandidatesOut(_Model):
    """A worker gives its paired peer more candidates (its TURN relayed addresses).

    Forwarded by the rendezvous only to the worker's current peer, as ``relay`` messages are;
    the peer probes them like the offer's candidates (sealed, authenticated PROBEs)."""

    type: Literal["candidates"] = "candidates"
    to: str = Field(min_length=1, max_length=64)
    candidates: list[RelayCandidate] = Field(min_length=1, max_length=MAX_TRICKLED_CANDIDATES)


class CandidatesIn(_Model):
    """The rendezvous passes on the candidates the paired peer ``from`` sent (see CandidatesOut)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    type: Literal["candidates"] = "candidates"
    from_: str = Field(alias="from", min_length=1, max_length=64)
    candidates: list[RelayCandidate] = Field(min_length=1, max_length=MAX_TRICKLED_CANDIDATES)


class Challenge(_Model):
    """First message of the rendezvous on a new connection: prove you hold your key."""

    type: Literal["challenge"] = "challenge"
    nonce: str = Field(min_length=1, max_length=64)
    server_key: str = Field(min_length=1, max_length=64)


class Registered(_Model):
    """The rendezvous's answer to ``register``, with the address it saw."""

    type: Literal["registered"] = "registered"
    worker_id: str
    observed_ip: str | None = None
    observed_port: int | None = None


def _turn_url(value: str) -> str:
    """``value`` if it is a ``turn:`` URL :func:`parse_turn_url` takes (host names allowed:
    the worker resolves them off its loop; ``turns:`` refused)."""
    try:
        parse_turn_url(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return value


class TurnOffer(_Model):
    """TURN servers and short-lived credentials for the worker an offer is sent to (issue 17).

    Made by the rendezvous for that worker only (coturn's REST form: the username names the
    worker and its expiry, the password is an HMAC of it with the secret the rendezvous shares
    with coturn); a worker uses them to allocate a relay when no direct pair works.
    """

    urls: list[Annotated[str, Field(max_length=MAX_TURN_URL_LENGTH)]] = Field(
        min_length=1, max_length=MAX_TURN_URLS
    )
    """``turn:host:port?transport=udp|tcp`` URLs, most preferred first."""
    username: str = Field(min_length=1, max_length=128)
    """``"<unix expiry>:<worker id>"``."""
    password: str = Field(min_length=1, max_length=128)
    """base64(HMAC-SHA1(secret, username))."""
    ttl_s: float = Field(gt=0, le=86400)
    """Seconds the credentials were valid for when the offer was made (for new allocations)."""

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        return [_turn_url(url) for url in value]


class P2PConnectionOffer(_Model):
    """Sent to both workers of a new pair."""

    type: Literal["p2p_connection_offer"] = "p2p_connection_offer"
    peer_worker_id: str
    peer_udp_ip: str = Field(max_length=64)
    peer_udp_port: int = Field(ge=0, le=65535)
    peer_candidates: list[Candidate] = Field(
        default_factory=list, max_length=MAX_LOCAL_CANDIDATES + 1
    )
    role: Literal["controlling", "controlled"] = "controlling"
    peer_public_key: str | None = Field(default=None, max_length=128)
    peer_nat: NatHint | None = None
    """The peer's :class:`NatHint` as it reported it (None: unknown)."""
    turn: TurnOffer | None = None
    """TURN servers and credentials for the receiving worker (None: the rendezvous has none)."""
    peer_mapped: PortMapping | None = None
    """The peer's port mapping as it reported it (``UpdateUdpEndpoint.mapped``)."""
    peer_udp6: Candidate | None = None
    """The peer's IPv6 STUN endpoint as it reported it (``UpdateUdpEndpoint.udp6``)."""

    _check_ip = field_validator("peer_udp_ip")(_ip_literal)
    _check_udp6 = field_validator("peer_udp6")(_ipv6_candidate)
    _check_key = field_validator("peer_public_key")(_public_key)


class PeerDisconnected(_Model):
    """The worker's peer left the rendezvous."""

    type: Literal["peer_disconnected"] = "peer_disconnected"
    peer_worker_id: str


class ErrorMessage(_Model):
    """A request could not be handled.

    Both ways: the rendezvous answers a worker's bad message with it; a worker sends it when it
    refuses an offer (``offer_refused``) or cannot parse a message (``bad_message``, at most one
    per kind of message per second).  Nobody answers an ``error`` (no error ping-pong).
    """

    type: Literal["error"] = "error"
    code: str = "bad_message"
    message: str = ""


WorkerToRendezvous = Annotated[
    Register | UpdateUdpEndpoint | RelayOut | CandidatesOut | ErrorMessage,
    Field(discriminator="type"),
]
RendezvousToWorker = Annotated[
    Challenge
    | Registered
    | P2PConnectionOffer
    | PeerDisconnected
    | ErrorMessage
    | RelayIn
    | CandidatesIn,
    Field(discriminator="type"),
]

WorkerMessage = Register | UpdateUdpEndpoint | RelayOut | CandidatesOut | ErrorMessage
"""Any message a worker sends to the rendezvous."""
RendezvousMessage = (
    Challenge
    | Registered
    | P2PConnectionOffer
    | PeerDisconnected
    | ErrorMessage
    | RelayIn
    | CandidatesIn
)
"""Any message the rendezvous sends to a worker."""

_worker_adapter: TypeAdapter[WorkerMessage] = TypeAdapter(WorkerToRendezvous)
_rendezvous_adapter: TypeAdapter[RendezvousMessage] = TypeAdapter(RendezvousToWorker)


def _load(raw: str | bytes) -> dict[str, Any]:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"message too large: {len(raw)} bytes > {MAX_MESSAGE_BYTES}", "malformed")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessage(f"message is not JSON: {exc}", "malformed") from None
    except RecursionError:  # a 16,000-deep array
        raise BadMessage("message is not JSON: nested too deeply", "malformed") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise BadMessage("message must be a JSON object with a string 'type'", "malformed")
    return obj


def _validate(adapter: TypeAdapter[Any], raw: str | bytes) -> Any:
    obj = _load(raw)
    try:
        return adapter.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first.get("type") == "union_tag_invalid":
            raise BadMessage(f"unknown message type {obj['type']!r}", "unknown_type") from None
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise BadMessage(
            f"invalid {obj['type']!r} message: {where}: {first.get('msg')}", obj["type"]
        ) from None


def parse_worker_message(raw: str | bytes) -> WorkerMessage:
    """Parse a message a worker sent to the rendezvous (raises :class:`BadMessage`)."""
    result: WorkerMessage = _validate(_worker_adapter, raw)
    return result


def parse_rendezvous_message(raw: str | bytes) -> RendezvousMessage:
    """Parse a message the rendezvous sent to a worker (raises :class:`BadMessage`)."""
    result: RendezvousMessage = _validate(_rendezvous_adapter, raw)
    return result


def dump_message(msg: BaseModel) -> str:
    """Serialise a message model to JSON text."""
    return msg.model_dump_json(by_alias=True)
