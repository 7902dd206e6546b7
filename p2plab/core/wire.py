"""The p2p datagram format spoken between two workers on the punched UDP path.

Every datagram starts with a 4-byte header::

     0       1       2         3
    +-------+-------+---------+------+-----------------------------
    | 0xD7  | 0x50  | version | type | body (type specific)
    +-------+-------+---------+------+-----------------------------

The first byte has its two top bits set, so a p2p datagram can never be taken for STUN (RFC 8489
section 6 and RFC 7983: STUN starts with two zero bits and carries the magic cookie at offset 4),
nor for DTLS (20..63) or RTP (128..191).  ``version`` is :data:`VERSION`.

Session types (below 0x20) share a body prefix, the ids of both ends, so a datagram for another
session is recognised and dropped::

    sender_id: str8   receiver_id: str8   <type fields>

where ``str8`` is one length byte then that many UTF-8 bytes, ``u16``/``u32``/``f64`` are
big-endian, ``addr`` is ``str8`` host then ``u16`` port, and ``text16``/``bytes16`` are a ``u16``
length then the bytes.  The type fields are in :data:`FIELDS` (the table this codec is driven by).

Types 0x20..0x2F are reserved for the benchmark data path (:data:`BENCH_TYPES`): only the 4-byte
header is defined here; the body belongs to the benchmark layer, which the I/O layer routes to
before the session (use :func:`datagram_type`).  :func:`parse_datagram` returns them as
:class:`BenchDatagram` with the raw body.

Authentication hook: :func:`encode_datagram` and :func:`parse_datagram` take an optional
:class:`Sealer`; with one, the body is replaced by ``sealer.seal(header, body)`` on the way out and
recovered with ``sealer.open(header, sealed)`` on the way in, the header serving as associated data
(:class:`p2plab.core.crypto.PeerCipher` is the ChaCha20-Poly1305 sealer the worker uses).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar, Protocol

from p2plab.errors import RemoteProtocolError

__all__ = [
    "BENCH_TYPES",
    "FIELDS",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CHAT_BYTES",
    "MAX_SELECTIVE_ACKS",
    "VERSION",
    "Ack",
    "Address",
    "BenchDatagram",
    "Bye",
    "Chat",
    "Control",
    "Datagram",
    "Keepalive",
    "KeepaliveAck",
    "MessageType",
    "Probe",
    "ProbeAck",
    "Sealer",
    "SessionDatagram",
    "UnknownDatagramType",
    "datagram_type",
    "encode_body",
    "encode_datagram",
    "is_p2p_datagram",
    "parse_datagram",
]

Address = tuple[str, int]

MAGIC = b"\xd7\x50"
"""First two bytes of every p2p datagram."""

VERSION = 1
"""The wire version this module speaks."""

HEADER_SIZE = 4
"""Magic (2), version (1), type (1)."""

MAX_CHAT_BYTES = 4096
"""Largest chat text, in UTF-8 bytes (the 4 KiB contract)."""

MAX_SELECTIVE_ACKS = 64
"""Most selective acknowledgements one ACK carries."""


class MessageType(IntEnum):
    """Datagram types (the 4th header byte)."""

    PROBE = 0x01
    PROBE_ACK = 0x02
    KEEPALIVE = 0x03
    KEEPALIVE_ACK = 0x04
    CHAT = 0x10
    CONTROL = 0x11
    ACK = 0x12
    BYE = 0x13
    BENCH_DATA = 0x20
    """First of the benchmark types; 0x20..0x2F are all reserved for the benchmark layer."""


BENCH_TYPES = range(0x20, 0x30)
"""Type numbers reserved for the benchmark data path (body format owned by the benchmark)."""


class UnknownDatagramType(RemoteProtocolError):
    """A well-formed header names a type this version does not know."""


class Sealer(Protocol):
    """Authentication hook: seals a body on the way out, opens it on the way in."""

    def seal(self, header: bytes, body: bytes) -> bytes:
        """Return the sealed form of ``body``; ``header`` is associated data."""
        ...

    def open(self, header: bytes, sealed: bytes) -> bytes:
        """Return the body; raise :class:`RemoteProtocolError` if it does not authenticate."""
        ...


# --------------------------------------------------------------------------------------------
# datagram classes


@dataclass(frozen=True)
class Datagram:
    """Base class of every parsed datagram."""

    TYPE: ClassVar[int]

    def __bytes__(self) -> bytes:
        return encode_datagram(self)


@dataclass(frozen=True)
class SessionDatagram(Datagram):
    """A datagram of the peer session: carries both ends' ids."""

    sender_id: str
    """Id of the worker that sent the datagram."""

    receiver_id: str
    """Id of the worker the datagram is for."""


@dataclass(frozen=True)
class Probe(SessionDatagram):
    """Connectivity check sent to one candidate address of the peer."""

    TYPE: ClassVar[int] = MessageType.PROBE

    nonce: bytes
    """8 random bytes; the PROBE_ACK echoes them."""

    nominate: bool
    """Set by the controlling side on the path it has chosen (RFC 8445 8.1.1 style)."""

    target: Address
    """The candidate address the probe was sent to."""


@dataclass(frozen=True)
class ProbeAck(SessionDatagram):
    """Answer to a PROBE, sent to the address the probe really came from."""

    TYPE: ClassVar[int] = MessageType.PROBE_ACK

    nonce: bytes
    """The nonce of the probe being answered."""

    nominate: bool
    """Echo of the probe's nominate flag."""

    observed: Address
    """The address the probe came from, as seen by the answering side (its peer-reflexive view)."""


@dataclass(frozen=True)
class Keepalive(SessionDatagram):
    """Keeps NAT mappings open and measures the RTT."""

    TYPE: ClassVar[int] = MessageType.KEEPALIVE

    seq: int
    """Sender's keep-alive counter (u32)."""

    timestamp: float
    """Sender's clock when sent; echoed back."""


@dataclass(frozen=True)
class KeepaliveAck(SessionDatagram):
    """Answer to a KEEPALIVE, echoing its seq and timestamp."""

    TYPE: ClassVar[int] = MessageType.KEEPALIVE_ACK

    seq: int
    """The keep-alive's seq."""

    timestamp: float
    """The keep-alive's timestamp."""


@dataclass(frozen=True)
class Chat(SessionDatagram):
    """A reliable chat message (shares the sequence space with CONTROL)."""

    TYPE: ClassVar[int] = MessageType.CHAT

    seq: int
    """Position in the sender's reliable stream (u32, from 0)."""

    msg_id: str
    """The sender's message id."""

    sent_at: float
    """The sender's timestamp."""

    text: str
    """Up to :data:`MAX_CHAT_BYTES` of UTF-8."""


@dataclass(frozen=True)
class Control(SessionDatagram):
    """A reliable control message: a JSON object, opaque here."""

    TYPE: ClassVar[int] = MessageType.CONTROL

    seq: int
    """Position in the sender's reliable stream (u32, from 0)."""

    msg_id: str
    """The sender's message id."""

    sent_at: float
    """The sender's timestamp."""

    payload: bytes
    """UTF-8 JSON (decoded by the session, not the codec)."""


@dataclass(frozen=True)
class Ack(SessionDatagram):
    """Acknowledges reliable messages: cumulatively and selectively."""

    TYPE: ClassVar[int] = MessageType.ACK

    cumulative: int
    """Every seq below this one has been received."""

    selective: tuple[int, ...]
    """Further seqs received out of order (at most :data:`MAX_SELECTIVE_ACKS`)."""


@dataclass(frozen=True)
class Bye(SessionDatagram):
    """The sender is closing the session."""

    TYPE: ClassVar[int] = MessageType.BYE

    reason: str
    """Free text, possibly empty (at most 255 bytes of UTF-8)."""


@dataclass(frozen=True)
class BenchDatagram(Datagram):
    """A benchmark datagram (types 0x20..0x2F); the body is the benchmark layer's business."""

    type: int
    """The type byte (in :data:`BENCH_TYPES`)."""

    body: bytes
    """Everything after the header."""

    def __bytes__(self) -> bytes:
        return encode_datagram(self)


# --------------------------------------------------------------------------------------------
# the table

_CLASSES: dict[int, type[SessionDatagram]] = {
    cls.TYPE: cls for cls in (Probe, ProbeAck, Keepalive, KeepaliveAck, Chat, Control, Ack, Bye)
}

FIELDS: dict[int, tuple[tuple[str, str], ...]] = {
    MessageType.PROBE: (("nonce", "nonce8"), ("nominate", "bool"), ("target", "addr")),
    MessageType.PROBE_ACK: (("nonce", "nonce8"), ("nominate", "bool"), ("observed", "addr")),
    MessageType.KEEPALIVE: (("seq", "u32"), ("timestamp", "f64")),
    MessageType.KEEPALIVE_ACK: (("seq", "u32"), ("timestamp", "f64")),
    MessageType.CHAT: (("seq", "u32"), ("msg_id", "str8"), ("sent_at", "f64"), ("text", "text16")),
    MessageType.CONTROL: (
        ("seq", "u32"),
        ("msg_id", "str8"),
        ("sent_at", "f64"),
        ("payload", "bytes16"),
    ),
    MessageType.ACK: (("cumulative", "u32"), ("selective", "u32list8")),
    MessageType.BYE: (("reason", "str8"),),
}
"""Per session type, its fields after the two ids as ``(name, kind)`` in wire order."""

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_F64 = struct.Struct("!d")


def _type_name(t: int) -> str:
    try:
        return MessageType(t).name
    except ValueError:
        return f"0x{t:02x}"


# -- encoding --------------------------------------------------------------------------------


def _put_str8(out: bytearray, value: str, what: str) -> None:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"{what} too long: {len(raw)} bytes (max 255)")
    out.append(len(raw))
    out += raw


def _put(out: bytearray, kind: str, value: Any, what: str) -> None:
    if kind == "str8":
        _put_str8(out, value, what)
    elif kind == "u32":
        out += _U32.pack(value)
    elif kind == "f64":
        out += _F64.pack(value)
    elif kind == "bool":
        out.append(1 if value else 0)
    elif kind == "nonce8":
        if len(value) != 8:
            raise ValueError(f"{what} must be 8 bytes, got {len(value)}")
        out += value
    elif kind == "addr":
        host, port = value
        _put_str8(out, host, what)
        out += _U16.pack(port)
    elif kind == "text16":
        raw = value.encode("utf-8")
        if len(raw) > MAX_CHAT_BYTES:
            raise ValueError(f"{what} too long: {len(raw)} bytes (max {MAX_CHAT_BYTES})")
        out += _U16.pack(len(raw))
        out += raw
    elif kind == "bytes16":
        out += _U16.pack(len(value))
        out += value
    elif kind == "u32list8":
        if len(value) > MAX_SELECTIVE_ACKS:
            raise ValueError(f"{what} has {len(value)} entries (max {MAX_SELECTIVE_ACKS})")
        out.append(len(value))
        for v in value:
            out += _U32.pack(v)
    else:  # pragma: no cover - table error
        raise AssertionError(kind)


def encode_body(datagram: Datagram) -> bytes:
    """The body of ``datagram`` (everything after the 4-byte header), unsealed."""
    if isinstance(datagram, BenchDatagram):
        return datagram.body
    if not isinstance(datagram, SessionDatagram):
        raise TypeError(f"not a datagram: {datagram!r}")
    out = bytearray()
    _put_str8(out, datagram.sender_id, "sender_id")
    _put_str8(out, datagram.receiver_id, "receiver_id")
    for name, kind in FIELDS[datagram.TYPE]:
        _put(out, kind, getattr(datagram, name), name)
    return bytes(out)


def encode_datagram(datagram: Datagram, sealer: Sealer | None = None) -> bytes:
    """Serialise ``datagram`` (``bytes(datagram)`` is the same without a sealer)."""
    if isinstance(datagram, BenchDatagram):
        if datagram.type not in BENCH_TYPES:
            raise ValueError(f"not a benchmark type: 0x{datagram.type:02x}")
        t = datagram.type
    else:
        t = datagram.TYPE
    header = MAGIC + bytes((VERSION, t))
    body = encode_body(datagram)
    if sealer is not None:
        body = sealer.seal(header, body)
    return header + body


# -- decoding --------------------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "name", "pos")

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.name = name
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise RemoteProtocolError(
                f"truncated {self.name}: {what} needs {n} bytes at offset {self.pos}, "
                f"{len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def str8(self, what: str) -> str:
        (n,) = self.take(1, what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"invalid UTF-8 in {self.name} {what}") from None

    def get(self, kind: str, what: str) -> Any:
        if kind == "str8":
            return self.str8(what)
        if kind == "u32":
            return _U32.unpack(self.take(4, what))[0]
        if kind == "f64":
            return _F64.unpack(self.take(8, what))[0]
        if kind == "bool":
            (b,) = self.take(1, what)
            if b > 1:
                raise RemoteProtocolError(f"bad {self.name} {what} flag: {b}")
            return b == 1
        if kind == "nonce8":
            return self.take(8, what)
        if kind == "addr":
            host = self.str8(what)
            (port,) = _U16.unpack(self.take(2, what))
            return (host, port)
        if kind == "text16":
            (n,) = _U16.unpack(self.take(2, what))
            if n > MAX_CHAT_BYTES:
                raise RemoteProtocolError(
                    f"{self.name} {what} too long: {n} bytes (max {MAX_CHAT_BYTES})"
                )
            raw = self.take(n, what)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RemoteProtocolError(f"invalid UTF-8 in {self.name} {what}") from None
        if kind == "bytes16":
            (n,) = _U16.unpack(self.take(2, what))
            return self.take(n, what)
        if kind == "u32list8":
            (n,) = self.take(1, what)
            if n > MAX_SELECTIVE_ACKS:
                raise RemoteProtocolError(
                    f"{self.name} {what} has {n} entries (max {MAX_SELECTIVE_ACKS})"
                )
            raw = self.take(4 * n, what)
            return tuple(v for (v,) in _U32.iter_unpack(raw))
        raise AssertionError(kind)  # pragma: no cover - table error


def is_p2p_datagram(data: bytes) -> bool:
    """Cheap peek: does ``data`` start like a p2p datagram (magic and a full header)?"""
    return len(data) >= HEADER_SIZE and data[0] == 0xD7 and data[1] == 0x50


def datagram_type(data: bytes) -> int | None:
    """Cheap peek: the type byte of a p2p datagram, or None if ``data`` is not one."""
    if len(data) >= HEADER_SIZE and data[0] == 0xD7 and data[1] == 0x50:
        return data[3]
    return None


def parse_datagram(data: bytes, sealer: Sealer | None = None) -> Datagram:
    """Parse one datagram; raises :class:`RemoteProtocolError` (and only that) if malformed.

    An unknown type raises the subclass :class:`UnknownDatagramType`.
    """
    if len(data) < HEADER_SIZE:
        raise RemoteProtocolError(f"datagram too short: {len(data)} bytes")
    if data[0:2] != MAGIC:
        raise RemoteProtocolError(f"bad magic: 0x{data[0]:02x}{data[1]:02x}")
    if data[2] != VERSION:
        raise RemoteProtocolError(f"unsupported version: {data[2]}")
    t = data[3]
    header = bytes(data[:HEADER_SIZE])
    body = bytes(data[HEADER_SIZE:])
    if sealer is not None:
        body = sealer.open(header, body)
    if t in BENCH_TYPES:
        return BenchDatagram(type=t, body=body)
    cls = _CLASSES.get(t)
    if cls is None:
        raise UnknownDatagramType(f"unknown datagram type: 0x{t:02x}")
    r = _Reader(body, _type_name(t))
    values: dict[str, Any] = {
        "sender_id": r.str8("sender_id"),
        "receiver_id": r.str8("receiver_id"),
    }
    for name, kind in FIELDS[t]:
        values[name] = r.get(kind, name)
    if r.pos != len(body):
        raise RemoteProtocolError(f"trailing bytes after {_type_name(t)}: {len(body) - r.pos}")
    return cls(**values)


def _check_table() -> None:
    # The table and the dataclasses must agree; checked once at import.
    for t, cls in _CLASSES.items():
        names = [f.name for f in fields(cls)][2:]
        assert names == [n for n, _ in FIELDS[t]], (cls, names)


_check_table()
