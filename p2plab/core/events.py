"""Events a :class:`~p2plab.core.session.PeerSession` hands to its driver (``next_event()``).

Small frozen dataclasses, one docstring per field (the aioquic ``events.py`` style).  Times are
in the driver's clock (the ``now`` it passes in), except ``ChatReceived.sent_at`` which is
whatever the sender chose to stamp (normally its wall clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "Address",
    "BenchmarkFinished",
    "BenchmarkProgress",
    "ChatDelivered",
    "ChatFailed",
    "ChatReceived",
    "ControlDelivered",
    "ControlFailed",
    "ControlReceived",
    "ErrorReported",
    "Event",
    "PathChanged",
    "PeerClosed",
    "PeerConnected",
    "PeerKeyChanged",
    "PeerLost",
    "PeerRestarted",
    "RttUpdated",
    "StateChanged",
]

Address = tuple[str, int]


@dataclass(frozen=True)
class Event:
    """Base class of every session event."""


@dataclass(frozen=True)
class PeerConnected(Event):
    """A path to the peer passed a full probe round trip and is nominated."""

    address: Address
    """The peer's address on the nominated path (where our datagrams now go)."""

    rtt: float | None
    """Round-trip time of the probe exchange that validated the path, in seconds."""

    path: str = "direct"
    """The path's name: ``direct``, ``turn-udp``, ``turn-tcp`` or ``relay``
    (:mod:`p2plab.core.paths`)."""


@dataclass(frozen=True)
class PathChanged(Event):
    """The nominated path moved to another peer address (NAT rebinding, re-nomination, an
    upgrade to direct or a downgrade to TURN)."""

    address: Address
    """The new peer address."""

    previous: Address | None
    """The peer address used before the change."""

    path: str = "direct"
    """The new path's name: ``direct``, ``turn-udp``, ``turn-tcp`` or ``relay``."""

    previous_path: str | None = None
    """The name of the path used before the change."""


@dataclass(frozen=True)
class ChatReceived(Event):
    """A chat message from the peer, delivered exactly once and in order."""

    msg_id: str
    """The sender's id of the message."""

    text: str
    """The message text."""

    sent_at: float
    """The sender's timestamp of the message (its wall clock, as the sender's driver chose)."""

    peer_id: str = ""
    """The sender's worker id (filled in by the link engine; empty from a bare session)."""


@dataclass(frozen=True)
class ChatDelivered(Event):
    """The peer acknowledged one of our chat messages."""

    msg_id: str
    """The id returned by ``send_chat``."""

    latency: float
    """Seconds from the message's first transmission to its acknowledgement."""


@dataclass(frozen=True)
class ChatFailed(Event):
    """One of our chat messages was given up (never acknowledged)."""

    msg_id: str
    """The id returned by ``send_chat``."""

    reason: str
    """Why: ``"retransmit limit"``, ``"timeout"``, ``"peer lost"``, ``"peer closed"``,
    ``"closed"`` or ``"punch timeout"``."""


@dataclass(frozen=True)
class ControlReceived(Event):
    """A control message (a JSON object) from the peer, exactly once and in order with chat."""

    msg_id: str
    """The sender's id of the message."""

    obj: dict[str, Any]
    """The decoded JSON object."""


@dataclass(frozen=True)
class ControlDelivered(Event):
    """The peer acknowledged one of our control messages."""

    msg_id: str
    """The id returned by ``send_control``."""

    latency: float
    """Seconds from the message's first transmission to its acknowledgement."""


@dataclass(frozen=True)
class ControlFailed(Event):
    """One of our control messages was given up."""

    msg_id: str
    """The id returned by ``send_control``."""

    reason: str
    """Why (same values as :attr:`ChatFailed.reason`)."""


@dataclass(frozen=True)
class RttUpdated(Event):
    """A keep-alive round trip produced a new RTT sample."""

    rtt: float
    """Smoothed round-trip time (RFC 6298 SRTT), in seconds."""

    latest: float
    """The sample just taken, in seconds."""

    min_rtt: float
    """The smallest sample seen on this session, in seconds."""


@dataclass(frozen=True)
class PeerLost(Event):
    """The link is down for good: punching failed or the peer fell silent."""

    reason: str
    """``"punch timeout"`` or ``"peer timeout"``."""


@dataclass(frozen=True)
class PeerClosed(Event):
    """The peer said goodbye (BYE); the session is now ``closed``."""

    reason: str = ""
    """The reason the peer gave, possibly empty."""


@dataclass(frozen=True)
class PeerRestarted(Event):
    """The peer started a new session on the same link (it re-punched, e.g. after its NAT lost
    the mapping); the reliable stream starts over and unacknowledged messages are sent again."""


# -- worker-level events (the link engine and extensions emit these; ``Worker.subscribe``) ------


@dataclass(frozen=True)
class StateChanged(Event):
    """The worker's lifecycle state changed (contracts.md's ``state`` values)."""

    state: str
    """The new state."""

    previous: str
    """The state before the change."""


@dataclass(frozen=True)
class ErrorReported(Event):
    """Something the user should see went wrong (a refused offer, a rendezvous error, ...);
    the worker shows it as contracts.md's ``{"type": "error", "message": ...}``."""

    message: str
    """A sentence saying what went wrong."""


@dataclass(frozen=True)
class PeerKeyChanged(Event):
    """A peer id this worker has seen before came back with another public key: either the
    peer made a new key (a reinstall) or someone (the rendezvous) sits in the middle.  The
    worker pairs anyway unless its peer key is pinned; the user compares the authentication
    string out of band."""

    peer_id: str
    """The peer's worker id."""

    old_fingerprint: str
    """Fingerprint of the key remembered for that id."""

    new_fingerprint: str
    """Fingerprint of the key it offers now."""


@dataclass(frozen=True)
class BenchmarkProgress(Event):
    """One interval of a running benchmark, on the end that measures it."""

    run_id: int
    """The run this interval belongs to."""

    role: str
    """``"sender"`` or ``"receiver"``: which end's view this is."""

    elapsed_s: float
    """Seconds since the run started."""

    mbps: float
    """Throughput over the interval, in Mbit/s."""

    lost: int
    """Datagrams lost so far (receiver's view; 0 on the sender)."""


@dataclass(frozen=True)
class BenchmarkFinished(Event):
    """A benchmark ended; ``result`` is its row (contracts.md's ``benchmark_result`` columns)."""

    run_id: int
    """The run that ended."""

    result: dict[str, Any]
    """The result row of this end (``role`` says which view)."""

    error: str | None = None
    """Why the run ended early, or None when it ran to its end."""
