"""Sans-I/O PCP codec (RFC 6887): the common header, the ANNOUNCE and MAP opcodes, options.

Table-driven like :mod:`p2plab.core.natpmp`: the request and response headers and the MAP
opcode data are :class:`~p2plab.core.natpmp.Layout` rows; :data:`OPCODE_LAYOUTS` says which
opcode carries which data.  Addresses are IPv6 on the wire; IPv4 ones travel IPv4-mapped
(``::ffff:a.b.c.d``) and come back as plain IPv4 strings.  Options are kept raw, in order, as
``(code, data)`` pairs.  :func:`parse_response` and :func:`parse_request` raise only
:class:`p2plab.errors.PortMapError`.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from p2plab.core.natpmp import REPLY, Field, Layout
from p2plab.errors import PortMapError

__all__ = [
    "ANNOUNCE",
    "MAP",
    "MAP_LAYOUT",
    "MAX_SIZE",
    "NONCE_SIZE",
    "OPCODE_LAYOUTS",
    "PEER",
    "PROTO_TCP",
    "PROTO_UDP",
    "REQUEST_HEADER",
    "RESPONSE_HEADER",
    "VERSION",
    "MapData",
    "Request",
    "Response",
    "ResultCode",
    "parse_request",
    "parse_response",
]

VERSION = 2
ANNOUNCE = 0
MAP = 1
PEER = 2
PROTO_UDP = 17
PROTO_TCP = 6
NONCE_SIZE = 12
#: RFC 6887 section 7: a PCP message is at most 1100 bytes, a multiple of 4.
MAX_SIZE = 1100


class ResultCode(enum.IntEnum):
    """PCP result codes (RFC 6887 section 7.4)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


#: RFC 6887 section 7.1.
REQUEST_HEADER = Layout(
    Field("version", "B"),
    Field("opcode", "B"),
    Field("reserved", "H"),
    Field("lifetime", "I"),
    Field("client_ip", "16s"),
)
#: RFC 6887 section 7.2.
RESPONSE_HEADER = Layout(
    Field("version", "B"),
    Field("opcode", "B"),
    Field("reserved", "B"),
    Field("result", "B"),
    Field("lifetime", "I"),
    Field("epoch", "I"),
    Field("reserved", "12s"),
)
#: RFC 6887 section 11.1 (the same layout in the request and the response).
MAP_LAYOUT = Layout(
    Field("nonce", f"{NONCE_SIZE}s"),
    Field("protocol", "B"),
    Field("reserved", "3s"),
    Field("internal_port", "H"),
    Field("external_port", "H"),
    Field("external_ip", "16s"),
)
#: The opcode-specific data of each opcode we speak (None: none).
OPCODE_LAYOUTS: dict[int, Layout | None] = {ANNOUNCE: None, MAP: MAP_LAYOUT}
_OPTION_HEADER = Layout(Field("code", "B"), Field("reserved", "B"), Field("length", "H"))


def _pack_ip(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return bytes(10) + b"\xff\xff" + addr.packed
    return addr.packed


def _unpack_ip(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


@dataclass(frozen=True)
class MapData:
    """The MAP opcode's data (the same fields in the request and the response)."""

    nonce: bytes
    """12 random bytes chosen by the client; the response must echo them."""
    protocol: int
    """IP protocol number (:data:`PROTO_UDP`)."""
    internal_port: int
    """The client's port the mapping leads to."""
    external_port: int
    """Suggested (request) or assigned (response) external port."""
    external_ip: str
    """Suggested (request; "0.0.0.0" or "::" for any) or assigned (response) external IP."""

    def pack(self) -> bytes:
        """The 36 bytes of the MAP data."""
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"a PCP nonce is {NONCE_SIZE} bytes, not {len(self.nonce)}")
        return MAP_LAYOUT.pack(
            nonce=self.nonce,
            protocol=self.protocol,
            internal_port=self.internal_port,
            external_port=self.external_port,
            external_ip=_pack_ip(self.external_ip),
        )


def _pack_options(options: tuple[tuple[int, bytes], ...]) -> bytes:
    out = b""
    for code, data in options:
        out += _OPTION_HEADER.pack(code=code, length=len(data)) + data + bytes(-len(data) % 4)
    return out


@dataclass(frozen=True)
class Request:
    """A PCP request: ANNOUNCE (the probe) or MAP (create, renew, delete with lifetime 0)."""

    opcode: int
    """:data:`ANNOUNCE` or :data:`MAP`."""
    lifetime_s: int
    """Requested lifetime in seconds (0 for ANNOUNCE, and for a MAP that deletes)."""
    client_ip: str
    """The client's own address as it sends (the server checks it: ADDRESS_MISMATCH)."""
    map: MapData | None = None
    """The MAP data (None for ANNOUNCE)."""
    options: tuple[tuple[int, bytes], ...] = ()
    """Options as ``(code, data)`` pairs."""

    def __bytes__(self) -> bytes:
        head = REQUEST_HEADER.pack(
            version=VERSION,
            opcode=self.opcode,
            lifetime=self.lifetime_s,
            client_ip=_pack_ip(self.client_ip),
        )
        body = self.map.pack() if self.map is not None else b""
        return head + body + _pack_options(self.options)


@dataclass(frozen=True)
class Response:
    """A PCP response."""

    opcode: int
    """The request's opcode, without :data:`~p2plab.core.natpmp.REPLY`."""
    result: int
    """A :class:`ResultCode` value (unknown codes are kept as ints)."""
    lifetime_s: int
    """Granted lifetime (MAP), or how long an error holds."""
    epoch: int
    """The server's epoch time in seconds (reboot detection, RFC 6887 section 8.5)."""
    map: MapData | None = None
    """The MAP data (None for ANNOUNCE; None too in a MAP error response cut short)."""
    options: tuple[tuple[int, bytes], ...] = ()
    """Options as ``(code, data)`` pairs."""

    def __bytes__(self) -> bytes:
        head = RESPONSE_HEADER.pack(
            version=VERSION,
            opcode=REPLY | self.opcode,
            result=self.result,
            lifetime=self.lifetime_s,
            epoch=self.epoch,
        )
        body = self.map.pack() if self.map is not None else b""
        return head + body + _pack_options(self.options)


def _check_size(data: bytes, header: Layout, what: str) -> None:
    if len(data) < 2:
        raise PortMapError(f"PCP {what} of {len(data)} bytes, shorter than its version")
    if data[0] != VERSION:
        raise PortMapError(f"PCP version {data[0]}, expected {VERSION}")
    if len(data) < header.size:
        raise PortMapError(f"PCP {what} of {len(data)} bytes, shorter than its header")
    if len(data) > MAX_SIZE or len(data) % 4:
        raise PortMapError(f"PCP {what} of {len(data)} bytes (at most 1100, a multiple of 4)")


def _parse_body(
    data: bytes, offset: int, opcode: int, what: str, *, optional: bool
) -> tuple[MapData | None, tuple[tuple[int, bytes], ...]]:
    if opcode not in OPCODE_LAYOUTS:
        raise PortMapError(f"PCP {what} opcode {opcode} unknown")
    layout = OPCODE_LAYOUTS[opcode]
    body: MapData | None = None
    if layout is not None:
        if len(data) < offset + layout.size:
            if not optional:
                raise PortMapError(f"PCP {what} opcode {opcode} cut short ({len(data)} bytes)")
            return None, ()
        f = layout.unpack(data, offset)
        body = MapData(
            f["nonce"], f["protocol"], f["internal_port"], f["external_port"],
            _unpack_ip(f["external_ip"]),
        )  # fmt: skip
        offset += layout.size
    options: list[tuple[int, bytes]] = []
    while offset < len(data):
        if len(data) < offset + _OPTION_HEADER.size:
            raise PortMapError(f"PCP {what}: option header cut short at byte {offset}")
        o = _OPTION_HEADER.unpack(data, offset)
        start = offset + _OPTION_HEADER.size
        end = start + o["length"]
        if end > len(data):
            raise PortMapError(f"PCP {what}: option {o['code']} longer than the message")
        options.append((o["code"], data[start:end]))
        offset = end + (-o["length"] % 4)
    return body, tuple(options)


def parse_response(data: bytes) -> Response:
    """Parse a server's datagram; raises :class:`PortMapError` for anything else."""
    _check_size(data, RESPONSE_HEADER, "response")
    h = RESPONSE_HEADER.unpack(data)
    if not h["opcode"] & REPLY:
        raise PortMapError(f"PCP opcode {h['opcode']} is a request, not a response")
    opcode = h["opcode"] & ~REPLY
    # an error response may carry the header only (RFC 6887 section 7.2: "if the result code
    # is not SUCCESS ... the response MAY omit the opcode data")
    body, options = _parse_body(
        data, RESPONSE_HEADER.size, opcode, "response", optional=h["result"] != 0
    )
    return Response(opcode, h["result"], h["lifetime"], h["epoch"], body, options)


def parse_request(data: bytes) -> Request:
    """Parse a client's datagram (the test responder's side); raises :class:`PortMapError`."""
    _check_size(data, REQUEST_HEADER, "request")
    h = REQUEST_HEADER.unpack(data)
    if h["opcode"] & REPLY:
        raise PortMapError(f"PCP opcode {h['opcode']} is a response, not a request")
    body, options = _parse_body(data, REQUEST_HEADER.size, h["opcode"], "request", optional=False)
    return Request(h["opcode"], h["lifetime"], _unpack_ip(h["client_ip"]), body, options)
