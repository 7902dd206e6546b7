"""Events, states and ChannelData framing of the TURN client (:mod:`p2plab.core.turn`).

Small frozen dataclasses, one docstring per field, like :mod:`p2plab.core.events`; kept apart so
the client module stays readable.  :mod:`p2plab.core.turn` re-exports every name.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from p2plab.core.stun import Address

__all__ = [
    "CHANNEL_ACCEPT_MAX",
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "CHANNEL_REFRESH_S",
    "MAX_PEER_DATA",
    "PERMISSION_REFRESH_S",
    "Allocated",
    "AllocationFailed",
    "ChannelBindFailed",
    "ChannelBound",
    "PeerData",
    "PermissionCreated",
    "PermissionFailed",
    "Refreshed",
    "Released",
    "TurnEvent",
    "TurnState",
    "decode_channel_data",
    "encode_channel_data",
]

#: First and last channel numbers (RFC 8656 section 12 allows 0x4000..0x4FFF; RFC 5766 allowed
#: up to 0x7FFE, which we still accept from a server).
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
CHANNEL_ACCEPT_MAX = 0x7FFE
#: A permission lasts 300 s (RFC 8656 section 9): refresh it a minute before.
PERMISSION_REFRESH_S = 240.0
#: A channel binding lasts 600 s (RFC 8656 section 12): bind it again a minute before.
CHANNEL_REFRESH_S = 540.0
#: Largest payload to or from a peer (the DATA attribute and ChannelData carry 16-bit lengths).
MAX_PEER_DATA = 65535 - 36


class TurnState(enum.Enum):
    """Where the allocation is."""

    IDLE = "idle"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    RELEASING = "releasing"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True)
class TurnEvent:
    """Base class of the client's events."""


@dataclass(frozen=True)
class Allocated(TurnEvent):
    """The server allocated a relayed address."""

    relayed: Address
    """The relayed transport address peers send to (XOR-RELAYED-ADDRESS)."""
    mapped: Address | None
    """Our address as the server saw it (XOR-MAPPED-ADDRESS), if it said."""
    lifetime: int
    """Seconds the allocation lasts unless refreshed (refreshes happen by themselves)."""


@dataclass(frozen=True)
class AllocationFailed(TurnEvent):
    """No allocation (refused, no answer, or lost: refresh refused, expired, stream broken)."""

    reason: str
    """One line saying why."""
    code: int | None
    """The server's ERROR-CODE when it refused, else None."""


@dataclass(frozen=True)
class Refreshed(TurnEvent):
    """A Refresh was answered: the allocation lasts ``lifetime`` more seconds."""

    lifetime: int
    """Seconds granted from now."""


@dataclass(frozen=True)
class Released(TurnEvent):
    """The allocation was released (Refresh with LIFETIME 0 answered or timed out)."""


@dataclass(frozen=True)
class PermissionCreated(TurnEvent):
    """The server now relays data from and to ``peer_ip``."""

    peer_ip: str
    """The peer IP the permission is for."""


@dataclass(frozen=True)
class PermissionFailed(TurnEvent):
    """A CreatePermission failed; the peer IP has no permission."""

    peer_ip: str
    """The peer IP."""
    reason: str
    """One line saying why."""


@dataclass(frozen=True)
class ChannelBound(TurnEvent):
    """Data to and from ``peer`` now travels as ChannelData on ``channel``."""

    peer: Address
    """The peer transport address."""
    channel: int
    """The channel number."""


@dataclass(frozen=True)
class ChannelBindFailed(TurnEvent):
    """A ChannelBind failed; data to ``peer`` keeps going as Send indications."""

    peer: Address
    """The peer transport address."""
    reason: str
    """One line saying why."""


@dataclass(frozen=True)
class PeerData(TurnEvent):
    """A datagram from a peer, relayed by the server."""

    peer: Address
    """The peer's transport address as the server saw it."""
    data: bytes
    """The payload."""
    channel: int | None
    """The channel it came on, None for a Data indication."""


def encode_channel_data(channel: int, data: bytes, *, pad: bool) -> bytes:
    """A ChannelData message (RFC 8656 section 12.4); ``pad`` to 4 bytes (required over TCP)."""
    frame = struct.pack("!HH", channel, len(data)) + data
    return frame + b"\x00" * (-len(data) % 4) if pad else frame


def decode_channel_data(datagram: bytes) -> tuple[int, bytes]:
    """``(channel, data)`` of one ChannelData datagram, padded or not; raises ValueError."""
    if len(datagram) < 4:
        raise ValueError(f"ChannelData needs 4 bytes, got {len(datagram)}")
    channel, length = struct.unpack("!HH", datagram[:4])
    if not CHANNEL_MIN <= channel <= CHANNEL_ACCEPT_MAX:
        raise ValueError(f"0x{channel:04x} is not a channel number")
    if not 4 + length <= len(datagram) <= 4 + length + 3:
        raise ValueError(f"ChannelData length {length} does not fit {len(datagram)} bytes")
    return channel, bytes(datagram[4 : 4 + length])
