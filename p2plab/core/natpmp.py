"""Sans-I/O NAT-PMP codec (RFC 6886): the external-address and map requests and responses.

Table-driven: each message is a :class:`Layout` (a row of named big-endian fields) in
:data:`REQUEST_LAYOUTS` / :data:`RESPONSE_LAYOUTS` keyed by opcode, and a frozen dataclass that
serialises with ``bytes(msg)``.  :func:`parse_response` and :func:`parse_request` raise
:class:`p2plab.errors.PortMapError` with an exact reason for anything malformed, and nothing else.

The :class:`Layout` helper is shared with the PCP codec (:mod:`p2plab.core.pcp`), whose
fixed headers are rows of fields too.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from p2plab.errors import PortMapError

__all__ = [
    "MAX_LIFETIME_S",
    "OP_EXTERNAL_ADDRESS",
    "OP_MAP_TCP",
    "OP_MAP_UDP",
    "PORT",
    "REPLY",
    "REQUEST_LAYOUTS",
    "RESPONSE_LAYOUTS",
    "VERSION",
    "ExternalAddressRequest",
    "ExternalAddressResponse",
    "Field",
    "Layout",
    "MapRequest",
    "MapResponse",
    "Request",
    "Response",
    "ResultCode",
    "parse_request",
    "parse_response",
]

#: The gateway's NAT-PMP and PCP port (RFC 6886 section 3.1, RFC 6887 section 19.1).
PORT = 5351
VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
#: OR'd into the request's opcode in the response.
REPLY = 0x80
#: A lease longer than a week is absurd (PortMapping's bound on the wire, RFC 6887's advice).
MAX_LIFETIME_S = 604800


class ResultCode(enum.IntEnum):
    """NAT-PMP result codes (RFC 6886 section 3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


@dataclass(frozen=True)
class Field:
    """One fixed-size field of a message, big-endian."""

    name: str
    """The key of the field in the dict :meth:`Layout.unpack` returns."""
    fmt: str
    """A :mod:`struct` code: ``B``, ``H``, ``I`` or ``<n>s`` (raw bytes)."""


class Layout:
    """A row of :class:`Field`: packs a dict into bytes and back (one :class:`struct.Struct`)."""

    def __init__(self, *fields: Field) -> None:
        self.fields = fields
        self._struct = struct.Struct("!" + "".join(f.fmt for f in fields))
        self.size = self._struct.size

    def pack(self, **values: Any) -> bytes:
        """The bytes of ``values`` (one keyword per field; fields named ``reserved`` default
        to zero)."""
        row = []
        for f in self.fields:
            default: Any = bytes(struct.calcsize(f.fmt)) if f.fmt.endswith("s") else 0
            row.append(values.get(f.name, default) if f.name != "reserved" else default)
        return self._struct.pack(*row)

    def unpack(self, data: bytes, offset: int = 0) -> dict[str, Any]:
        """The fields at ``data[offset:]``; the caller checked the length."""
        values = self._struct.unpack_from(data, offset)
        return {f.name: v for f, v in zip(self.fields, values, strict=True)}


_HEADER = (Field("version", "B"), Field("opcode", "B"))
_RESPONSE_HEADER = (*_HEADER, Field("result", "H"), Field("epoch", "I"))

#: Request layouts by opcode (RFC 6886 sections 3.2 and 3.3).
REQUEST_LAYOUTS: dict[int, Layout] = {
    OP_EXTERNAL_ADDRESS: Layout(*_HEADER),
    OP_MAP_UDP: Layout(
        *_HEADER,
        Field("reserved", "H"),
        Field("internal_port", "H"),
        Field("external_port", "H"),
        Field("lifetime", "I"),
    ),
}
REQUEST_LAYOUTS[OP_MAP_TCP] = REQUEST_LAYOUTS[OP_MAP_UDP]

#: Response layouts by request opcode (the response's opcode is ``REPLY | opcode``).
RESPONSE_LAYOUTS: dict[int, Layout] = {
    OP_EXTERNAL_ADDRESS: Layout(*_RESPONSE_HEADER, Field("ip", "4s")),
    OP_MAP_UDP: Layout(
        *_RESPONSE_HEADER,
        Field("internal_port", "H"),
        Field("external_port", "H"),
        Field("lifetime", "I"),
    ),
}
RESPONSE_LAYOUTS[OP_MAP_TCP] = RESPONSE_LAYOUTS[OP_MAP_UDP]

#: An error response may stop after the epoch (miniupnpd sends 8 bytes for a bad version).
_ERROR_SIZE = 8


@dataclass(frozen=True)
class ExternalAddressRequest:
    """Ask the gateway for its external IPv4 address (also the NAT-PMP probe)."""

    def __bytes__(self) -> bytes:
        return REQUEST_LAYOUTS[OP_EXTERNAL_ADDRESS].pack(version=VERSION, opcode=0)


@dataclass(frozen=True)
class MapRequest:
    """Create, renew (same ports) or delete (lifetime 0) a mapping."""

    internal_port: int
    """The client's port the mapping leads to."""
    external_port: int
    """The suggested external port (0: any; the granted one when renewing)."""
    lifetime_s: int
    """Requested lease in seconds; 0 deletes the mapping."""
    opcode: int = OP_MAP_UDP
    """:data:`OP_MAP_UDP` or :data:`OP_MAP_TCP`."""

    def __bytes__(self) -> bytes:
        return REQUEST_LAYOUTS[self.opcode].pack(
            version=VERSION,
            opcode=self.opcode,
            internal_port=self.internal_port,
            external_port=self.external_port,
            lifetime=self.lifetime_s,
        )


@dataclass(frozen=True)
class ExternalAddressResponse:
    """The gateway's answer to :class:`ExternalAddressRequest`."""

    result: int
    """A :class:`ResultCode` value (unknown codes are kept as ints)."""
    epoch: int
    """Seconds since the gateway's mapping table started (reboot detection)."""
    ip: str
    """The external IPv4 address ("0.0.0.0" in error responses)."""

    def __bytes__(self) -> bytes:
        return RESPONSE_LAYOUTS[OP_EXTERNAL_ADDRESS].pack(
            version=VERSION,
            opcode=REPLY | OP_EXTERNAL_ADDRESS,
            result=self.result,
            epoch=self.epoch,
            ip=ipaddress.IPv4Address(self.ip).packed,
        )


@dataclass(frozen=True)
class MapResponse:
    """The gateway's answer to :class:`MapRequest`."""

    opcode: int
    """The request's opcode (:data:`OP_MAP_UDP` or :data:`OP_MAP_TCP`), without :data:`REPLY`."""
    result: int
    """A :class:`ResultCode` value (unknown codes are kept as ints)."""
    epoch: int
    """Seconds since the gateway's mapping table started."""
    internal_port: int
    """The client's port, echoed."""
    external_port: int
    """The granted external port."""
    lifetime_s: int
    """The granted lease in seconds (0: deleted)."""

    def __bytes__(self) -> bytes:
        return RESPONSE_LAYOUTS[self.opcode].pack(
            version=VERSION,
            opcode=REPLY | self.opcode,
            result=self.result,
            epoch=self.epoch,
            internal_port=self.internal_port,
            external_port=self.external_port,
            lifetime=self.lifetime_s,
        )


Request = ExternalAddressRequest | MapRequest
Response = ExternalAddressResponse | MapResponse


def _check_version(data: bytes) -> None:
    if len(data) < 2:
        raise PortMapError(f"NAT-PMP message of {len(data)} bytes, shorter than its header")
    if data[0] != VERSION:
        raise PortMapError(f"NAT-PMP version {data[0]}, expected {VERSION}")


def parse_response(data: bytes) -> Response:
    """Parse a gateway's datagram; raises :class:`PortMapError` for anything else."""
    _check_version(data)
    opcode = data[1]
    if not opcode & REPLY:
        raise PortMapError(f"NAT-PMP opcode {opcode} is a request, not a response")
    layout = RESPONSE_LAYOUTS.get(opcode & ~REPLY)
    if layout is None:
        raise PortMapError(f"NAT-PMP response opcode {opcode} unknown")
    if len(data) < _ERROR_SIZE:
        raise PortMapError(f"NAT-PMP response of {len(data)} bytes, shorter than 8")
    if len(data) < layout.size:
        # only an error response may be short: its other fields are undefined (zero)
        if int.from_bytes(data[2:4], "big") == ResultCode.SUCCESS:
            raise PortMapError(
                f"NAT-PMP response of {len(data)} bytes, expected {layout.size} for opcode {opcode}"
            )
        data = data + bytes(layout.size - len(data))
    f = layout.unpack(data)
    if opcode & ~REPLY == OP_EXTERNAL_ADDRESS:
        return ExternalAddressResponse(f["result"], f["epoch"], str(ipaddress.IPv4Address(f["ip"])))
    return MapResponse(
        opcode & ~REPLY,
        f["result"],
        f["epoch"],
        f["internal_port"],
        f["external_port"],
        f["lifetime"],
    )


def parse_request(data: bytes) -> Request:
    """Parse a client's datagram (the test responder's side); raises :class:`PortMapError`."""
    _check_version(data)
    opcode = data[1]
    layout = REQUEST_LAYOUTS.get(opcode)
    if layout is None:
        raise PortMapError(f"NAT-PMP request opcode {opcode} unknown")
    if len(data) < layout.size:
        raise PortMapError(f"NAT-PMP request of {len(data)} bytes, expected {layout.size}")
    if opcode == OP_EXTERNAL_ADDRESS:
        return ExternalAddressRequest()
    f = layout.unpack(data)
    return MapRequest(f["internal_port"], f["external_port"], f["lifetime"], opcode)
