"""Sans-I/O STUN codec (RFC 8489) with the RFC 5780, RFC 3489 and TURN (RFC 8656) attributes,
and the client retransmission schedule of RFC 8489 section 6.2.1 as a core timer.

Codec: a table of attributes ``(type, name, pack, unpack)``, a :class:`Message` that serialises
with ``bytes(msg)``, and :func:`parse_message` that raises :class:`p2plab.errors.StunError` with
an exact message for anything malformed.  Unknown attributes are kept raw under the key
``"UNKNOWN-0xTTTT"`` (see :func:`unknown_attribute_name`) in their original position, so a parsed
message serialises back to the same bytes.

Messages without the magic cookie (RFC 3489 clients such as pystun3) parse too: their 16-byte
transaction id is split into ``magic_cookie`` (first 4 bytes) and ``transaction_id`` (12 bytes),
and :attr:`Message.legacy` is true.

:class:`StunTransaction` is a client transaction in the style of aioquic: ``start(now)``,
``datagrams_to_send(now)``, ``get_timer()``, ``handle_timer(now)``, ``receive(message, now)``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2plab.errors import ConfigError, LocalProtocolError, StunError

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTES_BY_NAME",
    "ATTRIBUTES_BY_TYPE",
    "CHANGE_IP",
    "CHANGE_PORT",
    "DEFAULT_STUN_PORT",
    "FINGERPRINT_XOR",
    "HEADER_LENGTH",
    "MAGIC_COOKIE",
    "Address",
    "AttributeSpec",
    "Class",
    "Message",
    "Method",
    "RetransmissionPolicy",
    "StunTransaction",
    "TransactionState",
    "decode_message_type",
    "encode_message_type",
    "long_term_key",
    "make_binding_request",
    "parse_message",
    "parse_server_address",
    "unknown_attribute_name",
]

Address = tuple[str, int]

MAGIC_COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E
HEADER_LENGTH = 20
DEFAULT_STUN_PORT = 3478

#: CHANGE-REQUEST flags (RFC 5780 section 7.2, RFC 3489 section 11.2.4).
CHANGE_IP = 0x04
CHANGE_PORT = 0x02

_MI_LENGTH = 20
_UNKNOWN_PREFIX = "UNKNOWN-0x"


class Class(enum.IntEnum):
    """Message class bits, already in their place in the message type (RFC 8489 section 5)."""

    REQUEST = 0x000
    INDICATION = 0x010
    RESPONSE = 0x100
    ERROR = 0x110


class Method(enum.IntEnum):
    """Message methods: Binding (RFC 8489), Shared Secret (RFC 3489), TURN (RFC 8656)."""

    BINDING = 0x001
    SHARED_SECRET = 0x002
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


def encode_message_type(method: int, message_class: int) -> int:
    """Interleave the 12 method bits with the 2 class bits (RFC 8489 section 5, figure 3)."""
    m = int(method)
    return (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | int(message_class)


def decode_message_type(message_type: int) -> tuple[int, int]:
    """Split a 14-bit message type into ``(method, class)`` integers."""
    message_class = message_type & 0x0110
    method = (
        (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    )
    return method, message_class


# ---------------------------------------------------------------------------------------------
# attribute packers: pack(value, xor_key) -> bytes, unpack(data, xor_key) -> value, where
# xor_key is the 16 bytes magic cookie + transaction id; unpack raises ValueError with a reason.


def _pack_address(value: Address, xor_key: bytes) -> bytes:
    host, port = value
    ip = ipaddress.ip_address(host)
    family = 1 if ip.version == 4 else 2
    return struct.pack("!xBH", family, port) + ip.packed


def _unpack_address(data: bytes, xor_key: bytes) -> Address:
    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes is too short for an address")
    family, port = struct.unpack("!xBH", data[:4])
    if family == 1:
        if len(data) != 8:
            raise ValueError(f"IPv4 address needs 8 bytes, got {len(data)}")
        return (str(ipaddress.IPv4Address(data[4:8])), port)
    if family == 2:
        if len(data) != 20:
            raise ValueError(f"IPv6 address needs 20 bytes, got {len(data)}")
        return (str(ipaddress.IPv6Address(data[4:20])), port)
    raise ValueError(f"bad address family 0x{family:02x}")


def _xor(data: bytes, key: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, key, strict=False))


def _xor_address_bytes(data: bytes, xor_key: bytes) -> bytes:
    # Port XOR the cookie's top 16 bits; IPv4 XOR the cookie; IPv6 XOR cookie + transaction id
    # (RFC 8489 section 14.2).
    return data[:2] + _xor(data[2:4], xor_key[:2]) + _xor(data[4:], xor_key[: len(data) - 4])


def _pack_xor_address(value: Address, xor_key: bytes) -> bytes:
    return _xor_address_bytes(_pack_address(value, xor_key), xor_key)


def _unpack_xor_address(data: bytes, xor_key: bytes) -> Address:
    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes is too short for an address")
    return _unpack_address(_xor_address_bytes(data, xor_key), xor_key)


def _pack_string(value: str, xor_key: bytes) -> bytes:
    return value.encode("utf-8")


def _unpack_string(data: bytes, xor_key: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 ({exc.reason})") from None


def _pack_bytes(value: bytes, xor_key: bytes) -> bytes:
    return bytes(value)


def _unpack_bytes(data: bytes, xor_key: bytes) -> bytes:
    return bytes(data)


def _pack_mi(value: bytes, xor_key: bytes) -> bytes:
    return bytes(value)


def _unpack_mi(data: bytes, xor_key: bytes) -> bytes:
    if len(data) != _MI_LENGTH:
        raise ValueError(f"needs 20 bytes, got {len(data)}")
    return bytes(data)


def _pack_u32(value: int, xor_key: bytes) -> bytes:
    return struct.pack("!I", value)


def _unpack_u32(data: bytes, xor_key: bytes) -> int:
    if len(data) != 4:
        raise ValueError(f"needs 4 bytes, got {len(data)}")
    return int(struct.unpack("!I", data)[0])


def _pack_u64(value: int, xor_key: bytes) -> bytes:
    return struct.pack("!Q", value)


def _unpack_u64(data: bytes, xor_key: bytes) -> int:
    if len(data) != 8:
        raise ValueError(f"needs 8 bytes, got {len(data)}")
    return int(struct.unpack("!Q", data)[0])


def _pack_port(value: int, xor_key: bytes) -> bytes:
    return struct.pack("!HH", value, 0)


def _unpack_port(data: bytes, xor_key: bytes) -> int:
    if len(data) != 4:
        raise ValueError(f"needs 4 bytes, got {len(data)}")
    return int(struct.unpack("!HH", data)[0])


def _pack_transport(value: int, xor_key: bytes) -> bytes:
    # REQUESTED-TRANSPORT: the IP protocol number then 3 RFFU bytes (RFC 8656 section 18.7).
    return struct.pack("!B3x", value)


def _unpack_transport(data: bytes, xor_key: bytes) -> int:
    if len(data) != 4:
        raise ValueError(f"needs 4 bytes, got {len(data)}")
    return data[0]


def _pack_family(value: int, xor_key: bytes) -> bytes:
    # REQUESTED-ADDRESS-FAMILY: 0x01 IPv4 or 0x02 IPv6 then 3 RFFU bytes (RFC 8656 18.10).
    return struct.pack("!B3x", value)


def _unpack_family(data: bytes, xor_key: bytes) -> int:
    if len(data) != 4:
        raise ValueError(f"needs 4 bytes, got {len(data)}")
    if data[0] not in (1, 2):
        raise ValueError(f"bad address family 0x{data[0]:02x}")
    return data[0]


def _pack_none(value: None, xor_key: bytes) -> bytes:
    return b""


def _unpack_none(data: bytes, xor_key: bytes) -> None:
    if data:
        raise ValueError(f"must be empty, got {len(data)} bytes")
    return None


def _pack_error_code(value: tuple[int, str], xor_key: bytes) -> bytes:
    code, reason = value
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode("utf-8")


def _unpack_error_code(data: bytes, xor_key: bytes) -> tuple[int, str]:
    if len(data) < 4:
        raise ValueError(f"needs at least 4 bytes, got {len(data)}")
    _, code_class, number = struct.unpack("!HBB", data[:4])
    return ((code_class & 0x07) * 100 + number, _unpack_string(data[4:], xor_key))


def _pack_attribute_list(value: tuple[int, ...], xor_key: bytes) -> bytes:
    return b"".join(struct.pack("!H", t) for t in value)


def _unpack_attribute_list(data: bytes, xor_key: bytes) -> tuple[int, ...]:
    if len(data) % 2:
        raise ValueError(f"length {len(data)} is odd")
    return tuple(int(t) for (t,) in struct.iter_unpack("!H", data))


@dataclass(frozen=True)
class AttributeSpec:
    """One row of the attribute table."""

    type: int
    """The 16-bit attribute type."""
    name: str
    """The RFC's name, used as the key in :attr:`Message.attributes`."""
    pack: Callable[[Any, bytes], bytes]
    """Value to bytes; the second argument is the 16-byte XOR key (cookie + transaction id)."""
    unpack: Callable[[bytes, bytes], Any]
    """Bytes to value; raises ValueError with a reason when the bytes are malformed."""


ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec(0x0001, "MAPPED-ADDRESS", _pack_address, _unpack_address),
    AttributeSpec(0x0003, "CHANGE-REQUEST", _pack_u32, _unpack_u32),
    AttributeSpec(0x0004, "SOURCE-ADDRESS", _pack_address, _unpack_address),
    AttributeSpec(0x0005, "CHANGED-ADDRESS", _pack_address, _unpack_address),
    AttributeSpec(0x0006, "USERNAME", _pack_string, _unpack_string),
    AttributeSpec(0x0008, "MESSAGE-INTEGRITY", _pack_mi, _unpack_mi),
    AttributeSpec(0x0009, "ERROR-CODE", _pack_error_code, _unpack_error_code),
    AttributeSpec(0x000A, "UNKNOWN-ATTRIBUTES", _pack_attribute_list, _unpack_attribute_list),
    # TURN (RFC 8656 section 18): CHANNEL-NUMBER is a 16-bit number and 2 RFFU bytes, the same
    # layout as RESPONSE-PORT.
    AttributeSpec(0x000C, "CHANNEL-NUMBER", _pack_port, _unpack_port),
    AttributeSpec(0x000D, "LIFETIME", _pack_u32, _unpack_u32),
    AttributeSpec(0x0012, "XOR-PEER-ADDRESS", _pack_xor_address, _unpack_xor_address),
    AttributeSpec(0x0013, "DATA", _pack_bytes, _unpack_bytes),
    AttributeSpec(0x0014, "REALM", _pack_string, _unpack_string),
    AttributeSpec(0x0015, "NONCE", _pack_string, _unpack_string),
    AttributeSpec(0x0016, "XOR-RELAYED-ADDRESS", _pack_xor_address, _unpack_xor_address),
    AttributeSpec(0x0017, "REQUESTED-ADDRESS-FAMILY", _pack_family, _unpack_family),
    AttributeSpec(0x0019, "REQUESTED-TRANSPORT", _pack_transport, _unpack_transport),
    AttributeSpec(0x001A, "DONT-FRAGMENT", _pack_none, _unpack_none),
    AttributeSpec(0x0020, "XOR-MAPPED-ADDRESS", _pack_xor_address, _unpack_xor_address),
    AttributeSpec(0x0024, "PRIORITY", _pack_u32, _unpack_u32),
    AttributeSpec(0x0025, "USE-CANDIDATE", _pack_none, _unpack_none),
    AttributeSpec(0x0026, "PADDING", _pack_bytes, _unpack_bytes),
    AttributeSpec(0x0027, "RESPONSE-PORT", _pack_port, _unpack_port),
    AttributeSpec(0x8022, "SOFTWARE", _pack_string, _unpack_string),
    AttributeSpec(0x8023, "ALTERNATE-SERVER", _pack_address, _unpack_address),
    AttributeSpec(0x8028, "FINGERPRINT", _pack_u32, _unpack_u32),
    AttributeSpec(0x8029, "ICE-CONTROLLED", _pack_u64, _unpack_u64),
    AttributeSpec(0x802A, "ICE-CONTROLLING", _pack_u64, _unpack_u64),
    AttributeSpec(0x802B, "RESPONSE-ORIGIN", _pack_address, _unpack_address),
    AttributeSpec(0x802C, "OTHER-ADDRESS", _pack_address, _unpack_address),
)
ATTRIBUTES_BY_TYPE: dict[int, AttributeSpec] = {a.type: a for a in ATTRIBUTES}
ATTRIBUTES_BY_NAME: dict[str, AttributeSpec] = {a.name: a for a in ATTRIBUTES}


def unknown_attribute_name(attr_type: int) -> str:
    """The key under which an attribute not in the table is kept (raw bytes)."""
    return f"{_UNKNOWN_PREFIX}{attr_type:04X}"


def _attribute_type(name: str) -> int:
    spec = ATTRIBUTES_BY_NAME.get(name)
    if spec is not None:
        return spec.type
    if name.startswith(_UNKNOWN_PREFIX):
        try:
            return int(name[len(_UNKNOWN_PREFIX) :], 16)
        except ValueError:
            pass
    raise LocalProtocolError(f"unknown STUN attribute name {name!r}")


class Message:
    """A STUN message: method, class, 12-byte transaction id and ordered attributes."""

    def __init__(
        self,
        message_method: Method,
        message_class: Class,
        transaction_id: bytes,
        attributes: dict[str, Any] | None = None,
        *,
        magic_cookie: int = MAGIC_COOKIE,
        pad: bytes = b"\x00",
    ) -> None:
        if len(transaction_id) != 12:
            raise LocalProtocolError(
                f"STUN transaction id must be 12 bytes, got {len(transaction_id)}"
            )
        if len(pad) != 1:
            raise LocalProtocolError("pad must be a single byte")
        self.message_method = message_method
        self.message_class = message_class
        self.transaction_id = bytes(transaction_id)
        self.attributes: dict[str, Any] = dict(attributes or {})
        #: The magic cookie field; anything else than MAGIC_COOKIE means an RFC 3489 message.
        self.magic_cookie = magic_cookie
        #: Byte used for attribute padding (RFC 8489 section 14 lets it be any value; the RFC
        #: 5769 vectors use spaces in places).
        self.pad = pad

    @property
    def legacy(self) -> bool:
        """True for an RFC 3489 message (no magic cookie)."""
        return self.magic_cookie != MAGIC_COOKIE

    @property
    def xor_key(self) -> bytes:
        """Magic cookie followed by the transaction id: the XOR key of XOR-*-ADDRESS."""
        return struct.pack("!I", self.magic_cookie) + self.transaction_id

    def _encode(self, extra_length: int = 0) -> bytes:
        key = self.xor_key
        body = bytearray()
        for name, value in self.attributes.items():
            attr_type = _attribute_type(name)
            spec = ATTRIBUTES_BY_TYPE.get(attr_type)
            raw = spec.pack(value, key) if spec is not None else bytes(value)
            body += struct.pack("!HH", attr_type, len(raw)) + raw
            body += self.pad * (-len(raw) % 4)
        header = struct.pack(
            "!HHI",
            encode_message_type(self.message_method, self.message_class),
            len(body) + extra_length,
            self.magic_cookie,
        )
        return header + self.transaction_id + bytes(body)

    def __bytes__(self) -> bytes:
        return self._encode()

    def add_message_integrity(self, key: bytes) -> None:
        """(Re)compute MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 section 14.5) as the last
        attribute; removes a FINGERPRINT, which must be added again after it."""
        self.attributes.pop("MESSAGE-INTEGRITY", None)
        self.attributes.pop("FINGERPRINT", None)
        data = self._encode(extra_length=4 + _MI_LENGTH)
        self.attributes["MESSAGE-INTEGRITY"] = hmac.new(key, data, hashlib.sha1).digest()

    def add_fingerprint(self) -> None:
        """(Re)compute FINGERPRINT (CRC-32 XOR 0x5354554E, RFC 8489 section 14.7), last."""
        self.attributes.pop("FINGERPRINT", None)
        data = self._encode(extra_length=8)
        self.attributes["FINGERPRINT"] = (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF

    def unknown_comprehension_required(self) -> tuple[int, ...]:
        """Types of unknown attributes in the comprehension-required range (< 0x8000)."""
        result = []
        for name in self.attributes:
            if name.startswith(_UNKNOWN_PREFIX):
                attr_type = _attribute_type(name)
                if attr_type < 0x8000:
                    result.append(attr_type)
        return tuple(result)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.message_method == other.message_method
            and self.message_class == other.message_class
            and self.transaction_id == other.transaction_id
            and self.magic_cookie == other.magic_cookie
            and self.attributes == other.attributes
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        method = getattr(self.message_method, "name", self.message_method)
        cls = getattr(self.message_class, "name", self.message_class)
        return (
            f"Message(message_method=Method.{method}, message_class=Class.{cls}, "
            f"transaction_id={self.transaction_id!r}, attributes={self.attributes!r})"
        )


def _patched_header(data: bytes, end: int, attr_total: int) -> bytes:
    """The message up to ``end`` with its length field covering up to the end of the
    attribute that starts at ``end`` and is ``attr_total`` bytes long."""
    return data[:2] + struct.pack("!H", end - HEADER_LENGTH + attr_total) + data[4:end]


def parse_message(data: bytes, integrity_key: bytes | None = None) -> Message:
    """Parse one STUN message (a whole datagram).

    Checks the header (RFC 8489 section 5), every known attribute's format and FINGERPRINT when
    present; checks MESSAGE-INTEGRITY when ``integrity_key`` is given (and then requires it).
    Attributes after MESSAGE-INTEGRITY other than FINGERPRINT are ignored (section 14.5); the
    first of duplicated attributes wins.  Raises :class:`StunError` on anything malformed.
    """
    data = bytes(data)
    if len(data) < HEADER_LENGTH:
        raise StunError(f"STUN message too short: {len(data)} bytes, the header needs 20")
    message_type, length, cookie = struct.unpack("!HHI", data[:8])
    if message_type & 0xC000:
        raise StunError("not a STUN message: the two most significant bits are not zero")
    if length % 4:
        raise StunError(f"STUN message length {length} is not a multiple of 4")
    if len(data) != HEADER_LENGTH + length:
        raise StunError(
            f"STUN message length {length} does not match the {len(data) - HEADER_LENGTH} "
            "bytes after the header"
        )
    method_value, class_value = decode_message_type(message_type)
    try:
        method = Method(method_value)
    except ValueError:
        raise StunError(f"unknown STUN method 0x{method_value:03x}") from None
    message = Message(method, Class(class_value), data[8:20], magic_cookie=cookie)
    key = data[4:20]
    attributes = message.attributes
    integrity_seen = False
    fingerprint_seen = False
    pos = HEADER_LENGTH
    end = len(data)
    while pos < end:
        attr_type, attr_len = struct.unpack("!HH", data[pos : pos + 4])
        value_end = pos + 4 + attr_len
        if value_end > end:
            raise StunError(
                f"STUN attribute 0x{attr_type:04x} of length {attr_len} runs past the end "
                "of the message"
            )
        if fingerprint_seen:
            raise StunError("STUN FINGERPRINT is not the last attribute")
        raw = data[pos + 4 : value_end]
        spec = ATTRIBUTES_BY_TYPE.get(attr_type)
        name = spec.name if spec is not None else unknown_attribute_name(attr_type)
        if spec is None:
            value: Any = raw
        else:
            try:
                value = spec.unpack(raw, key)
            except ValueError as exc:
                raise StunError(
                    f"STUN attribute {spec.name} (0x{attr_type:04x}) is malformed: {exc}"
                ) from None
        if attr_type == 0x8028:  # FINGERPRINT
            fingerprint_seen = True
            expected = (zlib.crc32(_patched_header(data, pos, 8)) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if value != expected:
                raise StunError(
                    f"STUN FINGERPRINT mismatch: got 0x{value:08x}, expected 0x{expected:08x}"
                )
            attributes.setdefault(name, value)
        elif attr_type == 0x0008 and not integrity_seen:  # MESSAGE-INTEGRITY
            integrity_seen = True
            if integrity_key is not None:
                digest = hmac.new(
                    integrity_key, _patched_header(data, pos, 4 + _MI_LENGTH), hashlib.sha1
                ).digest()
                if not hmac.compare_digest(digest, value):
                    raise StunError("STUN MESSAGE-INTEGRITY check failed")
            attributes[name] = value
        elif not integrity_seen:
            attributes.setdefault(name, value)
        pos = value_end + (-attr_len % 4)
    if integrity_key is not None and not integrity_seen:
        raise StunError("STUN message has no MESSAGE-INTEGRITY")
    return message


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """Long-term credential key MD5(username ":" realm ":" password) (RFC 8489 section 9.2.2).

    The password must already be SASLprep'ed (OpaqueString profile); this does not do it.
    """
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def make_binding_request(
    random_bytes: Callable[[int], bytes],
    *,
    change_ip: bool = False,
    change_port: bool = False,
    software: str | None = None,
    fingerprint: bool = True,
) -> Message:
    """A Binding request with a fresh transaction id from ``random_bytes(12)`` (inject
    ``os.urandom`` or ``secrets.token_bytes``); optional RFC 5780 CHANGE-REQUEST."""
    transaction_id = random_bytes(12)
    message = Message(Method.BINDING, Class.REQUEST, transaction_id)
    if software:
        message.attributes["SOFTWARE"] = software
    if change_ip or change_port:
        message.attributes["CHANGE-REQUEST"] = (CHANGE_IP if change_ip else 0) | (
            CHANGE_PORT if change_port else 0
        )
    if fingerprint:
        message.add_fingerprint()
    return message


def parse_server_address(
    spec: str | tuple[str, int], default_port: int = DEFAULT_STUN_PORT
) -> Address:
    """``"host:port"``, ``"host"``, ``"[v6]:port"``, ``"stun:host:port"`` or ``(host, port)`` to
    ``(host, port)``; raises :class:`ConfigError` saying what is wrong."""
    if isinstance(spec, tuple):
        if len(spec) != 2 or not isinstance(spec[0], str) or not spec[0]:
            raise ConfigError(f"bad STUN server {spec!r}: expected (host, port)")
        port_value: object = spec[1]
        if isinstance(port_value, bool) or not isinstance(port_value, int):
            raise ConfigError(f"bad STUN server {spec!r}: port must be an integer")
        if not 1 <= port_value <= 65535:
            raise ConfigError(f"bad STUN server {spec!r}: port {port_value} is out of range")
        return (spec[0], port_value)
    if not isinstance(spec, str):
        raise ConfigError(f"bad STUN server {spec!r}: expected 'host:port'")
    text = spec.strip()
    if text.lower().startswith("stun:"):
        text = text[5:]
    port_text: str | None = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"bad STUN server {spec!r}: missing ']' after the IPv6 address")
        host = text[1:close]
        rest = text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad STUN server {spec!r}: expected ':port' after ']'")
            port_text = rest[1:]
    elif text.count(":") > 1:
        host = text  # a bare IPv6 literal
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    else:
        host = text
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ConfigError(f"bad STUN server {spec!r}: expected 'host:port'")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"bad STUN server {spec!r}: {host!r} is not an IPv6 address"
            ) from None
    if port_text is None:
        return (host, default_port)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(
            f"bad STUN server {spec!r}: port {port_text!r} is not a number from 1 to 65535"
        )
    return (host, int(port_text))


# ---------------------------------------------------------------------------------------------
# client transaction (RFC 8489 section 6.2.1)


@dataclass(frozen=True)
class RetransmissionPolicy:
    """Retransmission settings of a client transaction over UDP (RFC 8489 section 6.2.1)."""

    rto: float = 0.5
    """Initial retransmission timeout in seconds; doubled after every retransmission."""
    rc: int = 7
    """Total number of requests sent (the first plus Rc - 1 retransmissions)."""
    rm: int = 16
    """After the last request, wait Rm times the initial RTO before timing out."""
    max_rto: float | None = None
    """Optional upper bound for the doubled RTO (RFC 8489 allows capping it)."""
    timeout: float | None = None
    """Optional overall deadline in seconds after the first send, whichever comes first."""

    def __post_init__(self) -> None:
        if not self.rto > 0:
            raise ConfigError(f"STUN rto must be positive, got {self.rto!r}")
        if self.rc < 1:
            raise ConfigError(f"STUN rc must be at least 1, got {self.rc!r}")
        if self.rm < 1:
            raise ConfigError(f"STUN rm must be at least 1, got {self.rm!r}")
        if self.max_rto is not None and self.max_rto < self.rto:
            raise ConfigError(f"STUN max_rto {self.max_rto!r} is below rto {self.rto!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"STUN timeout must be positive, got {self.timeout!r}")


class TransactionState(enum.Enum):
    """Where a client transaction is."""

    NEW = "new"
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class StunTransaction:
    """A STUN client transaction: sends, retransmits on a timer, matches the response."""

    def __init__(
        self, request: Message, addr: Address, policy: RetransmissionPolicy | None = None
    ) -> None:
        if request.message_class != Class.REQUEST:
            raise LocalProtocolError("a STUN transaction needs a request")
        self.request = request
        self.addr = addr
        self.policy = policy or RetransmissionPolicy()
        self.state = TransactionState.NEW
        #: The matching response (success or error), once received.
        self.response: Message | None = None
        #: ERROR-CODE of an error response, as ``(code, reason)``.
        self.error: tuple[int, str] | None = None
        #: Requests sent so far.
        self.attempts = 0
        self.first_sent_at: float | None = None
        self.last_sent_at: float | None = None
        #: Time from the latest transmission to the response (Karn: ambiguous if attempts > 1).
        self.rtt: float | None = None
        self._data = bytes(request)
        self._pending: list[tuple[bytes, Address]] = []
        self._timer: float | None = None
        self._interval = self.policy.rto

    @property
    def transaction_id(self) -> bytes:
        return self.request.transaction_id

    @property
    def done(self) -> bool:
        return self.state not in (TransactionState.NEW, TransactionState.PENDING)

    def start(self, now: float) -> None:
        """Queue the first request."""
        if self.state is not TransactionState.NEW:
            raise LocalProtocolError("STUN transaction already started")
        self.state = TransactionState.PENDING
        self.first_sent_at = now
        self._send(now, now)

    def _send(self, now: float, scheduled: float) -> None:
        self._pending.append((self._data, self.addr))
        self.attempts += 1
        self.last_sent_at = now
        if self.attempts < self.policy.rc:
            # Next retransmission RTO after this one, then 2*RTO, 4*RTO, ... (section 6.2.1).
            next_at = scheduled + self._interval
            self._interval *= 2
            if self.policy.max_rto is not None:
                self._interval = min(self._interval, self.policy.max_rto)
        else:
            next_at = scheduled + self.policy.rm * self.policy.rto
        if self.policy.timeout is not None and self.first_sent_at is not None:
            next_at = min(next_at, self.first_sent_at + self.policy.timeout)
        self._timer = next_at

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams the driver must send now, as ``(data, addr)``."""
        pending, self._pending = self._pending, []
        return pending

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next (None when done)."""
        return self._timer

    def handle_timer(self, now: float) -> None:
        """Retransmit or time out when the timer is due; earlier calls do nothing."""
        if self.state is not TransactionState.PENDING or self._timer is None:
            return
        if now < self._timer:
            return
        deadline_hit = (
            self.policy.timeout is not None
            and self.first_sent_at is not None
            and now >= self.first_sent_at + self.policy.timeout
        )
        if self.attempts >= self.policy.rc or deadline_hit:
            self.state = TransactionState.TIMED_OUT
            self._timer = None
            return
        self._send(now, self._timer)

    def receive(self, message: Message, now: float) -> bool:
        """Offer a parsed message; True if it is this transaction's response (consumed)."""
        if (
            self.state is not TransactionState.PENDING
            or message.transaction_id != self.request.transaction_id
            or message.magic_cookie != self.request.magic_cookie
            or message.message_method != self.request.message_method
            or message.message_class not in (Class.RESPONSE, Class.ERROR)
        ):
            return False
        self.response = message
        if self.last_sent_at is not None:
            self.rtt = max(0.0, now - self.last_sent_at)
        self._timer = None
        self._pending = []
        if message.message_class == Class.ERROR:
            self.state = TransactionState.FAILED
            error = message.attributes.get("ERROR-CODE")
            self.error = error if isinstance(error, tuple) else (0, "error response without code")
        else:
            self.state = TransactionState.SUCCEEDED
        return True

    def cancel(self) -> None:
        """Stop retransmitting; the transaction ends in CANCELLED unless already done."""
        if not self.done:
            self.state = TransactionState.CANCELLED
        self._timer = None
        self._pending = []
