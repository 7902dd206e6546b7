"""One exception tree for p2plab.

::

    P2PLabError
     +-- ConfigError            a setting given by the user is invalid
     +-- LocalProtocolError     this side tried something the protocol forbids (h11 style)
     |    +-- ChatTooLong       a chat message over the 4 KiB limit
     |    +-- NotConnected      an operation needs a connected peer
     +-- RemoteProtocolError    the peer or a server sent something malformed
     |    +-- StunError         a STUN message could not be parsed / error response
 |    +-- PortMapError      a NAT-PMP or PCP message could not be parsed
     +-- StunTimeout            no STUN server answered in time
     +-- RendezvousError        the rendezvous service refused or dropped us
     +-- LabError               the kernel NAT lab could not be set up (e.g. not root)
     +-- BenchmarkError         a benchmark could not run or was aborted
     +-- ChatFailedError        a chat message was given up (``Worker.chat``)

Bad input from the network is never raised through the event loop: it is dropped, counted
and logged.  ``RemoteProtocolError`` is what parsers raise, and callers at the I/O edge catch it.
"""

from __future__ import annotations

__all__ = [
    "BenchmarkError",
    "ChatFailedError",
    "ChatTooLong",
    "ConfigError",
    "LabError",
    "LocalProtocolError",
    "NotConnected",
    "P2PLabError",
    "PortMapError",
    "RemoteProtocolError",
    "RendezvousError",
    "StunError",
    "StunTimeout",
]


class P2PLabError(Exception):
    """Root of every exception p2plab raises on purpose."""


class ConfigError(P2PLabError, ValueError):
    """A user-supplied setting is invalid."""


class LocalProtocolError(P2PLabError):
    """This side attempted something the protocol does not allow."""


class ChatTooLong(LocalProtocolError, ValueError):
    """A chat message exceeds the maximum encoded size."""


class NotConnected(LocalProtocolError):
    """The operation needs an established peer link."""


class RemoteProtocolError(P2PLabError):
    """The peer or a server sent something malformed."""


class StunError(RemoteProtocolError):
    """A STUN message could not be parsed, or a server answered with an error."""


class PortMapError(RemoteProtocolError):
    """A NAT-PMP (RFC 6886) or PCP (RFC 6887) message could not be parsed."""


class StunTimeout(P2PLabError, TimeoutError):
    """No STUN server answered within the retransmission schedule."""


class RendezvousError(P2PLabError):
    """The rendezvous service refused the worker or the connection failed."""


class LabError(P2PLabError):
    """The kernel NAT lab cannot run (missing root, missing tools, setup failure)."""


class BenchmarkError(P2PLabError):
    """A benchmark could not run or was aborted."""


class ChatFailedError(P2PLabError):
    """A chat message was given up before the peer acknowledged it (``Worker.chat``)."""

    def __init__(self, msg_id: str, reason: str) -> None:
        super().__init__(f"chat message {msg_id} failed: {reason}")
        self.msg_id = msg_id
        """The id of the message that failed."""
        self.reason = reason
        """Why (:attr:`p2plab.core.events.ChatFailed.reason`)."""
