"""The link engine's settings and the commands it gives its driver (see :mod:`p2plab.core.link`).

The driver drains commands with ``engine.next_command()`` after every input:

- :class:`SendToRendezvous`: send ``message`` on the rendezvous WebSocket (dropped if down).
  The ``register`` message is one: the engine answers the rendezvous's ``challenge`` with it,
  carrying the proof that it holds its private key (the driver fills in ``http_public_ip``).
  So is ``error`` (code ``offer_refused``): a refused offer is answered, not only logged.
- :class:`RelayDatagram`: send ``data`` to peer ``to`` as a rendezvous ``relay`` message.  Relayed
  sessions address their datagrams to the pseudo-address :data:`RELAY`; they never appear in
  ``datagrams_to_send``.
- :class:`DiscoverEndpoint`: learn the socket's public endpoint (STUN, else the observed address
  ``observed_ip`` with the local port), then call ``engine.discovered``.

Birthday punching (issue 16) adds a *socket pool* beside the link's socket:

- :class:`OpenSocketPool`: bind ``count`` more UDP sockets on the link socket's local address
  (port 0), numbered 1..count, and feed every datagram one of them receives to
  ``engine.receive_datagram(data, addr, now, pool=index)``.  A socket that cannot be bound is
  left out (the engine never learns of it: it only sends, and it only hears from bound ones).
- :class:`SendFromPool`: send ``data`` to ``addr`` from pool socket ``index`` (skip it if that
  socket is gone).
- :class:`AdoptPoolSocket`: pool socket ``index`` won: make it the link's socket (peer datagrams,
  STUN refreshes, benchmarks all move to it), close the old link socket and every other pool
  socket, then call ``engine.pool_socket_adopted(index, now)`` and run the output steps again
  (until then the engine holds its datagrams, so that none leaves by the old socket).
- :class:`ClosePool`: close every pool socket (the link stays on its own socket).

TURN (issue 17, :mod:`p2plab.core.link_turn`): over UDP the allocation lives on the link's
socket (its datagrams are in ``datagrams_to_send``, addressed to the TURN server, and the driver
feeds whatever comes from the server's address to ``receive_datagram`` as usual: its own STUN
client must not take those).  Over TCP:

- :class:`OpenTurnTcp`: connect to ``host:port`` (resolving a name off the loop), then call
  ``engine.turn_tcp_connected(now)``, or ``engine.turn_tcp_closed(now, error)`` if it fails;
  feed every byte received to ``engine.turn_tcp_received(data, now)`` and call
  ``turn_tcp_closed`` when the connection ends.
- :class:`SendTurnTcp`: write ``data`` on that connection (drop it if there is none).
- :class:`CloseTurnTcp`: close it (no ``turn_tcp_closed`` needed afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from p2plab.config import BirthdayConfig, SessionConfig
from p2plab.core.paths import RELAY_ADDRESS
from p2plab.core.session import PeerSession
from p2plab.core.signaling import (
    Candidate,
    CandidatesOut,
    ErrorMessage,
    NatHint,
    PortMapping,
    Register,
    UpdateUdpEndpoint,
)

__all__ = [
    "LINK_COUNTERS",
    "RELAY",
    "SECURITY_COUNTERS",
    "AdoptPoolSocket",
    "ClosePool",
    "CloseTurnTcp",
    "Command",
    "DiscoverEndpoint",
    "LinkConfig",
    "OpenSocketPool",
    "OpenTurnTcp",
    "RelayDatagram",
    "SendFromPool",
    "SendToRendezvous",
    "SendTurnTcp",
    "endpoint_update",
    "session_security_counts",
]

#: Pseudo-address of the relay path: a session whose only candidate is RELAY talks to its peer
#: through the rendezvous.  The session is address-agnostic; the port is 1 because the session
#: ignores candidates with port 0.  (Defined in :mod:`p2plab.core.paths` with the TURN ones.)
RELAY: Final[tuple[str, int]] = RELAY_ADDRESS

#: The engine's counters of its decisions and drops (``LinkEngine.stats``, shown in ``status``).
LINK_COUNTERS: Final = (
    "offers",
    "offers_refused",
    "challenges",
    "challenges_refused",
    "peer_key_changes",
    "candidates_refused",
    "offer_updates",
    "candidates_other_family",
    "chats_in",
    "relay_in",
    "relay_dropped",
    "relay_unauthenticated",
    "relay_switches",
    "udp_dropped_while_relayed",
    "udp_dropped_no_link",
    "peer_disconnected_ignored",
    "rendezvous_unexpected",
    "rendezvous_errors",
    "birthday_probes",
    "spray_datagrams",
    "pool_dropped",
    "pool_adoptions",
    "turn_allocations",
    "turn_failures",
    "turn_data_in",
    "turn_dropped",
    "turn_urls_unusable",
    "candidates_in",
    "candidates_in_dropped",
    "relay_upgrades",
    "bench_in",
    "bench_out",
    "bench_dropped",
)

#: The drop counters of ``security()``, summed over every link the engine had.
SECURITY_COUNTERS: Final = (
    "auth_failures",
    "replays",
    "unexpected_source",
    "peer_restarts",
    "new_sessions_limited",
)


@dataclass(frozen=True)
class LinkConfig:
    """How the engine keeps a link (the worker fills it in from its WorkerConfig)."""

    session: SessionConfig = field(default_factory=SessionConfig)
    """Timers of each peer session (punch timeout, keep-alive, peer timeout, chat)."""

    relay: bool = True
    """Fall back to the rendezvous relay when the first punch times out."""

    repunch: bool = True
    """After a peer timeout on a link that was up, punch the same peer again (with backoff)."""

    repunch_initial_delay_s: float = 0.5
    """Pause before the second re-punch attempt (the first one starts at once); doubles after."""

    repunch_max_delay_s: float = 10.0
    """Longest pause between two re-punch attempts."""

    room: str = "default"
    """The rendezvous room named in ``register``."""

    token: str | None = None
    """The rendezvous token named in ``register``, if it asks for one."""

    peer_key: bytes | str | None = None
    """The pinned peer key (``--peer-key``, parsed by
    :func:`~p2plab.core.crypto.parse_peer_key`: raw key or hex fingerprint); an offer with any
    other key is refused.  None: any usable key (trust on first use)."""

    birthday: BirthdayConfig = field(default_factory=BirthdayConfig)
    """Birthday punching and predicted ports, for pairs with a hard NAT (issue 16)."""

    turn: bool = True
    """Allocate a TURN relay when an offer carries TURN servers (issue 17), in parallel with
    punching, and trickle its address to the peer."""


@dataclass(frozen=True)
class Command:
    """Base class of what the engine asks its driver to do."""


@dataclass(frozen=True)
class SendToRendezvous(Command):
    """Send ``message`` to the rendezvous (nothing happens if it is down)."""

    message: UpdateUdpEndpoint | Register | ErrorMessage | CandidatesOut
    """The message to send."""


@dataclass(frozen=True)
class RelayDatagram(Command):
    """Send one (sealed) peer datagram through the rendezvous relay."""

    to: str
    """The peer's worker id."""

    data: bytes
    """The datagram, exactly as the session produced it."""


@dataclass(frozen=True)
class DiscoverEndpoint(Command):
    """Learn the public endpoint of the worker's UDP socket, then call ``discovered``."""

    observed_ip: str | None
    """The address the rendezvous saw us at (the fallback when there is no STUN server)."""


@dataclass(frozen=True)
class OpenSocketPool(Command):
    """Bind ``count`` extra UDP sockets (pool sockets 1..count) beside the link's socket."""

    count: int
    """How many sockets (``BirthdayConfig.sockets``)."""


@dataclass(frozen=True)
class SendFromPool(Command):
    """Send one datagram from pool socket ``index``."""

    index: int
    """The pool socket (1..count)."""

    data: bytes
    """The datagram, exactly as the engine built it."""

    addr: tuple[str, int]
    """Its destination."""


@dataclass(frozen=True)
class AdoptPoolSocket(Command):
    """Pool socket ``index`` reached the peer: make it the link's socket and close the rest,
    then call ``engine.pool_socket_adopted(index, now)``."""

    index: int
    """The winning pool socket."""


@dataclass(frozen=True)
class ClosePool(Command):
    """Close every pool socket; the link keeps its own socket."""


def endpoint_update(
    public: tuple[str, int],
    local_candidates: list[tuple[str, int]],
    nat: NatHint | None = None,
    *,
    mapped: PortMapping | None = None,
    udp6: tuple[str, int] | None = None,
) -> UpdateUdpEndpoint:
    """The ``update_udp_endpoint`` message: the public endpoint, up to 8 LAN addresses (IPv4
    and IPv6), what the worker learnt of its NAT's mapping, the port its NAT mapped on request
    and its IPv6 STUN endpoint."""
    lan = [a for a in local_candidates if a != public and a != udp6][:8]
    return UpdateUdpEndpoint(
        udp_ip=public[0],
        udp_port=public[1],
        local_candidates=[Candidate(ip=a[0], port=a[1]) for a in lan],
        nat=nat,
        mapped=mapped,
        udp6=Candidate(ip=udp6[0], port=udp6[1]) if udp6 is not None else None,
    )


def session_security_counts(s: PeerSession | None) -> dict[str, int]:
    """One session's :data:`SECURITY_COUNTERS` (its sealer's drops and unexpected sources)."""
    counts = dict.fromkeys(SECURITY_COUNTERS, 0)
    if s is None:
        return counts
    stats = getattr(s.sealer, "stats", {})
    for k in ("auth_failures", "replays", "peer_restarts"):
        counts[k] = int(stats.get(k, 0))
    for k in ("unexpected_source", "new_sessions_limited"):
        counts[k] = s.stats.get(k, 0)
    return counts


@dataclass(frozen=True)
class OpenTurnTcp(Command):
    """Open the TCP connection to a TURN server (then ``engine.turn_tcp_connected``)."""

    host: str
    """The server's host from its ``turn:`` URL (a name is resolved by the driver)."""

    port: int
    """The server's port."""


@dataclass(frozen=True)
class SendTurnTcp(Command):
    """Write bytes of the TURN stream on the connection :class:`OpenTurnTcp` opened."""

    data: bytes
    """Stream bytes (framed STUN messages and padded ChannelData)."""


@dataclass(frozen=True)
class CloseTurnTcp(Command):
    """Close the TURN TCP connection."""
