"""The link engine: a worker's whole lifecycle, sans-I/O (registering ... connected ... stopped).

:class:`LinkEngine` decides everything a worker does about its peer link: when to discover its
public endpoint, which offers to accept, when to punch, when to fall back to the rendezvous
relay, when to re-punch after a peer timeout (with backoff, on its own timer), when to give up.
It owns the :class:`~p2plab.core.session.PeerSession` of the current link and builds its sealer.
Its states and transitions are one table, :data:`p2plab.core.link_table.TRANSITIONS`.

The driver contract (the asyncio worker, the simulator and the unit tests follow it)::

    engine = LinkEngine(worker_id, config=LinkConfig(...), identity=..., rand_bytes=...)
    engine.start(now)

    # inputs, each with the driver's monotonic clock `now`
    engine.rendezvous_up(now) / engine.rendezvous_down(now)
    engine.receive_rendezvous(msg, now)      # Challenge, Registered, P2PConnectionOffer,
                                             # PeerDisconnected, RelayIn, ErrorMessage (parsed)
    engine.discovered(public, local_candidates, now, error=None)   # answer to DiscoverEndpoint
    engine.rendezvous_refused(reason, now)   # the rendezvous refused us for good
    engine.expect_port_mapping(now)          # a port-mapping probe started (reports wait)
    engine.set_port_mapping(mapping, now)    # its result, a renewal or a loss (None)
    engine.set_endpoint6(addr, now)          # the IPv6 endpoint STUN over IPv6 saw (None: none)
    engine.receive_datagram(data, addr, now, pool=0)  # every UDP datagram of the worker's
                                             # socket (pool=i: of pool socket i)
    engine.pool_socket_adopted(index, now)   # AdoptPoolSocket carried out
    engine.turn_tcp_connected(now) / turn_tcp_received(data, now) / turn_tcp_closed(now, error)
                                             # the TURN TCP connection of OpenTurnTcp
    engine.handle_timer(now)                 # when get_timer() is due
    engine.send_chat(text, now, sent_at) / engine.send_control(obj, now, sent_at)
    engine.stop(now)

    # after every input, in this order (aioquic's ``transmit``):
    for data, addr in engine.datagrams_to_send(now):  sock.sendto(data, addr)
    while (cmd := engine.next_command()) is not None: carry it out (see below)
    while (event := engine.next_event()) is not None: hand it on (UI, subscribers, extensions)
    re-arm ONE timer at engine.get_timer() (None: no timer)

Commands (:class:`SendToRendezvous`, :class:`RelayDatagram`, :class:`DiscoverEndpoint`, and the
socket pool's :class:`OpenSocketPool`, :class:`SendFromPool`, :class:`AdoptPoolSocket`,
:class:`ClosePool` of birthday punching, :mod:`p2plab.core.link_birthday`, and TURN over TCP's
:class:`OpenTurnTcp`, :class:`SendTurnTcp`, :class:`CloseTurnTcp`, :mod:`p2plab.core.link_turn`) are
what the engine needs from outside; :mod:`p2plab.core.link_commands` defines them (with
:class:`LinkConfig`) and says what the driver does with each; they are re-exported here.

Events are :mod:`p2plab.core.events` dataclasses: :class:`~p2plab.core.events.StateChanged` for
every state change (intermediate ones like ``lost`` included), the session's events of the
current link (``ChatReceived`` with ``peer_id`` filled in, ``ControlReceived``, ...), and
:class:`~p2plab.core.events.ErrorReported` for things the user should see.

Port mappings and IPv6 (issues 18 and 19: the ``mapped`` and ``udp6`` reports, ``family``,
``method`` port-mapping) are :class:`~p2plab.core.link_families.LinkFamilies`'s; addresses are
plain ``(ip, port)`` 2-tuples in both families.

Inputs are checked against the table; a driver input the table forbids (``start`` twice,
``discovered`` while connected, ``rendezvous_up`` while discovering, anything but ``stop``
after ``stop``) raises :class:`~p2plab.errors.LocalProtocolError`: a driver bug.  Network junk
never raises: a relayed datagram from a stranger, a ``peer_disconnected`` about someone else, a
rendezvous message with no place in the current state (``rendezvous_unexpected``), a datagram
with no link are dropped and counted in :attr:`LinkEngine.stats` before they reach the table.
A stopped engine drops datagrams and timers; the driver feeds it nothing else but ``stop``.

What the engine believes of the rendezvous and of peer keys (the challenge, refused offers,
IP-literal candidates, pinned and remembered keys, relay switches only on authenticated data)
is decided in :mod:`p2plab.core.link_trust`; a refused offer leaves the engine pairable.

Clock and randomness are injected (``now`` on every call, ``rand_bytes`` at construction, and
``wall_ns``, the wall clock in ns that orders session epochs across restarts, default derived
from ``now``): the same engine runs on real sockets, on the simulator's virtual clock and in
memory in the tests (``tests/core/test_core_link.py`` has a complete in-memory driver, ``World``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from p2plab.core import events as ev
from p2plab.core.crypto import Identity
from p2plab.core.known_peers import KnownPeers
from p2plab.core.link_bench import is_bench_datagram
from p2plab.core.link_commands import (
    RELAY,
    SECURITY_COUNTERS,
    AdoptPoolSocket,
    ClosePool,
    CloseTurnTcp,
    Command,
    DiscoverEndpoint,
    LinkConfig,
    OpenSocketPool,
    OpenTurnTcp,
    RelayDatagram,
    SendFromPool,
    SendToRendezvous,
    SendTurnTcp,
    session_security_counts,
)
from p2plab.core.link_families import LinkFamilies, plain_ip
from p2plab.core.link_table import LINK_STATES, STATES_WITH_PEER, TRANSITIONS, Input, next_state
from p2plab.core.link_trust import (
    RelayGate,
    answer_challenge,
    check_offer,
    key_change,
    key_change_warning,
    offer_candidates,
)
from p2plab.core.signaling import (
    CandidatesIn,
    Challenge,
    ErrorMessage,
    NatHint,
    P2PConnectionOffer,
    PeerDisconnected,
    Registered,
    RelayIn,
    RendezvousMessage,
)
from p2plab.errors import NotConnected, RemoteProtocolError

__all__ = [
    "LINK_STATES",
    "RELAY",
    "SECURITY_COUNTERS",
    "TRANSITIONS",
    "AdoptPoolSocket",
    "ClosePool",
    "CloseTurnTcp",
    "Command",
    "DiscoverEndpoint",
    "LinkConfig",
    "LinkEngine",
    "OpenSocketPool",
    "OpenTurnTcp",
    "RelayDatagram",
    "SendFromPool",
    "SendToRendezvous",
    "SendTurnTcp",
]

log = logging.getLogger(__name__)

Address = ev.Address

_ERROR_TEXT = 200  # characters of a refusal sent back to the rendezvous (it only logs them)


class LinkEngine(LinkFamilies):
    """One worker's link lifecycle (see the module docstring for the driver contract).

    This class takes the driver's inputs and the rendezvous's messages; the session of the
    current link (building, pumping, retiring and recovering it) is :class:`LinkSessions`'s,
    birthday punching and the socket pool (``method``, ``pool_socket_adopted``) are
    :class:`~p2plab.core.link_birthday.LinkBirthday`'s, the TURN relay (``turn_tcp_*``) is
    :class:`~p2plab.core.link_turn.LinkTurn`'s."""

    def __init__(
        self,
        worker_id: str,
        *,
        config: LinkConfig | None = None,
        identity: Identity | None = None,
        rand_bytes: Callable[[int], bytes],
        known_peers: KnownPeers | None = None,
        wall_ns: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(
            worker_id, config=config, identity=identity, rand_bytes=rand_bytes, wall_ns=wall_ns
        )
        self.observed_ip: str | None = None
        """The address the rendezvous saw us at."""
        self.public_endpoint: Address | None = None
        """The socket's public UDP endpoint, once discovered."""
        self.local_candidates: list[Address] = []
        """The socket's LAN addresses, reported beside the public endpoint."""
        self.known_peers = known_peers if known_peers is not None else KnownPeers()
        """The keys of the peers paired with before, by id (trust on first use)."""
        self.peer_key_warning: str | None = None
        """A sentence when a known peer id came back with another key or a pinned key did not
        match (cleared by the next offer accepted without either)."""
        self._challenge_answered = False
        self._relay_gate = RelayGate()
        self._discovery_pending = False

    # -- read-only state ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """contracts.md's ``state``: one of :data:`LINK_STATES`."""
        return self._state

    @property
    def path(self) -> str | None:
        """contracts.md's ``path``: ``"direct"``, ``"turn-udp"`` or ``"turn-tcp"`` while
        connected (the session's nominated path, :mod:`p2plab.core.paths`), ``"relay"`` while
        relayed through the rendezvous, else None."""
        if self._state == "relayed":
            return "relay"
        if self._state == "connected" and self.session is not None:
            return self.session.path or "direct"
        return None

    @property
    def peer_address(self) -> Address | None:
        """The peer's address on the current link (:data:`RELAY` when relayed), or None."""
        return self.session.peer_address if self.session is not None else None

    def security_counts(self) -> dict[str, int]:
        """Drop counters (:data:`SECURITY_COUNTERS`) over every link, the current one included."""
        current = session_security_counts(self.session)
        return {k: self._security_totals[k] + current[k] for k in SECURITY_COUNTERS}

    # -- inputs: lifecycle --------------------------------------------------------------------

    def start(self, now: float) -> None:
        """The driver is up (socket bound, rendezvous client running)."""
        self._set_state(next_state(self._state, Input.START))

    def stop(self, now: float) -> None:
        """Say goodbye to the peer (best effort) and stop; every later input but stop raises."""
        target = next_state(self._state, Input.STOP)
        self._drop_peer(now)
        self._set_state(target)

    def rendezvous_up(self, now: float) -> None:
        """The rendezvous WebSocket connected (its ``challenge`` follows, then ``registered``)."""
        self._set_state(next_state(self._state, Input.RENDEZVOUS_UP))
        self._challenge_answered = False
        self._registered = False

    def rendezvous_down(self, now: float) -> None:
        """The rendezvous WebSocket dropped; a punched link keeps going without it."""
        self._set_state(next_state(self._state, Input.RENDEZVOUS_DOWN))
        self._registered = False

    def rendezvous_refused(self, reason: str, now: float) -> None:
        """The rendezvous refused this worker for good (e.g. a wrong token)."""
        target = next_state(self._state, Input.REFUSED)
        self.error = reason
        self._drop_peer(now)
        self._set_state(target)

    def receive_rendezvous(self, msg: RendezvousMessage, now: float) -> None:
        """One parsed message from the rendezvous."""
        if isinstance(msg, RelayIn):
            self._on_relay_in(msg, now)
        elif isinstance(msg, Challenge):
            self._on_challenge(msg)
        elif isinstance(msg, Registered):
            self._on_registered(msg)
        elif isinstance(msg, P2PConnectionOffer):
            self._on_offer(msg, now)
        elif isinstance(msg, PeerDisconnected):
            self._on_peer_disconnected(msg, now)
        elif isinstance(msg, CandidatesIn):
            self._on_candidates(msg, now)
        elif isinstance(msg, ErrorMessage):
            self.stats["rendezvous_errors"] += 1
            log.warning("rendezvous error: %s: %s", msg.code, msg.message)
            self._events.append(ev.ErrorReported(f"rendezvous: {msg.message}"))
        self._pump(now)

    def discovered(
        self,
        public: Address,
        local_candidates: Sequence[Address],
        now: float,
        error: str | None = None,
        nat: NatHint | None = None,
    ) -> None:
        """The answer to :class:`DiscoverEndpoint`: the public endpoint and the LAN addresses.

        ``error`` says why discovery fell back (e.g. STUN failed) and is shown to the user.
        ``nat`` is what the driver learnt of the NAT's mapping (reported to the rendezvous in
        ``update_udp_endpoint``; it chooses between plain and birthday punching).
        """
        self.nat_hint = nat
        target = next_state(self._state, Input.DISCOVERED)
        self._discovery_pending = False
        self.public_endpoint = (str(public[0]), int(public[1]))
        self.local_candidates = [(str(a[0]), int(a[1])) for a in local_candidates]
        if error is not None:
            self.error = error
        if target != "registering":  # while the rendezvous is down, the next register reports
            self._report_endpoint()
        self._set_state(target)

    # -- inputs: data plane -------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float, pool: int = 0) -> None:
        """One datagram from the link's UDP socket, or from pool socket ``pool`` (1..count,
        see :class:`OpenSocketPool`).  Never raises: junk is dropped and counted."""
        if pool:
            self._pool_datagram(data, addr, now, pool)
            return
        if self._state != "stopped" and self._turn_datagram(data, addr, now):
            return  # the TURN server's, for our allocation (its PeerData reach the session)
        if self.session is None or self._state == "stopped":
            self.stats["udp_dropped_no_link"] += 1
            return
        before = self.session.datagrams_accepted
        self.session.receive_datagram(data, addr, now)
        if self.session.datagrams_accepted > before:
            # The peer reached the link socket itself: a pool socket must not take the link
            # away from under a path the peer may already have nominated.
            self._link_socket_heard = True
        self._pump(now)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (the session's and the engine's own)."""
        if self._state == "stopped":
            return None
        timers = (
            self._repunch_at,
            self._birthday_timer(),
            self._turn_timer(),
            self._mapping_timer(),
        )
        when = [t for t in timers if t is not None]
        if self.session is not None:
            t = self.session.get_timer()
            if t is not None:
                when.append(t)
        return min(when) if when else None

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now``: the session's timers, the re-punch timer."""
        if self._state == "stopped":
            return
        self._mapping_service(now)
        if self.session is not None:
            self.session.handle_timer(now)
            self._birthday_service(now)
        self._turn_service(now)
        self._pump(now)
        if self._repunch_at is not None and now >= self._repunch_at:
            self._repunch(now)
            self._pump(now)

    def send_chat(self, text: str, now: float, sent_at: float | None = None) -> str:
        """Send a chat message reliably; returns its id.  Raises NotConnected without a link."""
        if self.session is None or self._state not in ("connected", "relayed"):
            raise NotConnected("no peer connected: chat needs a connected peer")
        msg_id = self.session.send_chat(text, now, sent_at=sent_at)
        self._pump(now)
        return msg_id

    def send_control(self, obj: dict[str, Any], now: float, sent_at: float | None = None) -> str:
        """Send a reliable control message over any path (raises NotConnected without one)."""
        if self.session is None or self._state not in ("connected", "relayed"):
            raise NotConnected("no peer connected")
        msg_id = self.session.send_control(obj, now, sent_at=sent_at)
        self._pump(now)
        return msg_id

    # -- outputs ------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """UDP datagrams to send now, with their destinations (never :data:`RELAY`); none while
        a pool socket is being adopted (:class:`AdoptPoolSocket`)."""
        self._pump(now)
        if self._holding():
            return []
        out, self._outbox = self._outbox, []
        return out

    def next_command(self) -> Command | None:
        """The next command for the driver, or None."""
        return self._commands.popleft() if self._commands else None

    def next_event(self) -> ev.Event | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    # -- rendezvous messages ------------------------------------------------------------------

    def _unexpected(self, kind: str, what: object) -> bool:
        """Whether a rendezvous message of ``kind`` has no place in this state (then counted)."""
        if kind in TRANSITIONS[self._state]:
            return False
        self.stats["rendezvous_unexpected"] += 1
        log.debug("dropping %r in state %s", what, self._state)
        return True

    def _on_challenge(self, msg: Challenge) -> None:
        """Answer the rendezvous's challenge with ``register`` and the proof of our key."""
        if self._unexpected(Input.CHALLENGE, msg):
            return
        if self._challenge_answered:  # one per connection: a second one is junk
            self.stats["rendezvous_unexpected"] += 1
            return
        self.stats["challenges"] += 1
        try:
            register = answer_challenge(
                msg, self.identity, self.worker_id, room=self.config.room, token=self.config.token
            )
        except RemoteProtocolError as exc:
            # No proof, no registration: the driver's register deadline reconnects.
            self.stats["challenges_refused"] += 1
            log.warning("rendezvous: %s", exc)
            self._events.append(ev.ErrorReported(f"rendezvous sent an {exc}"))
            return
        self._challenge_answered = True
        self._set_state(next_state(self._state, Input.CHALLENGE))
        self._commands.append(SendToRendezvous(register))

    def _on_registered(self, msg: Registered) -> None:
        kind = Input.REGISTERED if self.public_endpoint is not None else Input.REGISTERED_DISCOVER
        if self._unexpected(kind, msg):
            return
        self._registered = True
        self.observed_ip = plain_ip(msg.observed_ip)
        if self.public_endpoint is None:
            target = next_state(self._state, Input.REGISTERED_DISCOVER)
            if not self._discovery_pending:
                self._discovery_pending = True
                self._commands.append(DiscoverEndpoint(self.observed_ip))
        else:
            target = next_state(self._state, Input.REGISTERED)
            self._report_endpoint()
        self._set_state(target)

    def _on_offer(self, offer: P2PConnectionOffer, now: float) -> None:
        self.stats["offers"] += 1
        if (
            offer.peer_worker_id == self.peer_id
            and self.session is not None
            and self._state in ("punching", "connected", "relayed")
        ):
            log.info("offer for the current peer %s: keeping the link", self.peer_id)
            self._merge_offer(offer, now)
            self._set_state(next_state(self._state, Input.OFFER_CURRENT))
            return
        check = check_offer(offer, self.worker_id, self.identity, self.config.peer_key)
        refusal, peer_key = check.refusal, check.key
        if check.warning is not None:
            self.peer_key_warning = check.warning
        kind = Input.OFFER_REFUSED if refusal else Input.OFFER
        if self._unexpected(kind, offer):  # before discovery: an honest rendezvous cannot
            return
        self._drop_peer(now)
        candidates, not_ips = offer_candidates(offer)
        candidates = self._reachable(candidates)
        self.stats["candidates_refused"] += not_ips
        if refusal is None and not candidates:
            refusal = f"peer {offer.peer_worker_id} offers no usable address (IP literals only)"
        if refusal is None:
            self.offer = offer
            self.peer_id = offer.peer_worker_id
            self.peer_public_key = peer_key
            self.repunch_attempts = 0
            log.info("offer: peer %s at %s (role %s)", offer.peer_worker_id, candidates, offer.role)
            try:
                self._new_session(candidates, now, relayed=False)
            except Exception as exc:  # any failure to build it refuses the offer
                self._drop_peer(now)
                refusal = f"peer {offer.peer_worker_id}: cannot set up a session: {exc}"
        if refusal is not None:
            log.warning("%s", refusal)
            self.stats["offers_refused"] += 1
            self.error = refusal
            self._events.append(ev.ErrorReported(refusal))
            # Answered, not only logged (issue 14 item 8): the rendezvous counts it, and whoever
            # runs it sees why the pair never formed.
            answer = ErrorMessage(code="offer_refused", message=refusal[:_ERROR_TEXT])
            self._commands.append(SendToRendezvous(answer))
            self._set_state(next_state(self._state, Input.OFFER_REFUSED))
            return
        self._remember_key(offer.peer_worker_id, peer_key)
        self._set_state(next_state(self._state, Input.OFFER))
        self._turn_begin(now)
        self._birthday_begin(now)

    def _remember_key(self, peer_id: str, key: bytes | None) -> None:
        """Trust on first use: remember the key; say loudly when a known id changed its key."""
        self.peer_key_warning = None
        change = key_change(self.known_peers, peer_id, key) if key is not None else None
        if change is None:
            return
        self.stats["peer_key_changes"] += 1
        self.peer_key_warning = key_change_warning(change)
        log.warning("%s", self.peer_key_warning)
        self._events.append(change)
        self._events.append(ev.ErrorReported(self.peer_key_warning))

    def _on_peer_disconnected(self, msg: PeerDisconnected, now: float) -> None:
        if msg.peer_worker_id != self.peer_id or self._state not in STATES_WITH_PEER:
            self.stats["peer_disconnected_ignored"] += 1
            return
        log.info("peer %s left the rendezvous", msg.peer_worker_id)
        target = next_state(self._state, Input.PEER_LEFT)
        self._drop_peer(now)
        self._set_state(target)
        self._set_state(next_state(self._state, Input.SETTLED))

    def _on_relay_in(self, msg: RelayIn, now: float) -> None:
        """A datagram the peer relayed through the rendezvous."""
        if not self.config.relay or self.offer is None or msg.from_ != self.peer_id:
            self.stats["relay_dropped"] += 1
            return
        try:
            payload = msg.payload()
        except ValueError:
            self.stats["relay_dropped"] += 1
            return
        s = self.session
        if s is not None and (self.relayed or s.candidate_kind(RELAY) is not None):
            if is_bench_datagram(payload):  # a benchmark over the relay: the driver's
                self._bench_queue(payload, RELAY)
                return
            # Relayed, or a relayed session that moved to a better path (the peer may still
            # send over the relay until it follows the nomination): the session decides.
            self.stats["relay_in"] += 1
            s.receive_datagram(payload, RELAY, now)
            return
        # The peer gave up punching first: follow it onto the relay, but only if what came
        # through the rendezvous opens with the pair's keys.  A fresh relayed session (not yet
        # ours) takes the payload; anything it drops moves nothing and closes nothing.
        if Input.RELAY_SWITCH not in TRANSITIONS[self._state]:
            self.stats["relay_dropped"] += 1
            return
        candidate = self._relay_gate.follow(
            payload, lambda: self._build_session([RELAY], now), now, self.stats
        )
        if candidate is None:
            return
        target = next_state(self._state, Input.RELAY_SWITCH)
        log.info("peer %s relays through the rendezvous: following it", self.peer_id)
        self._retire(now, bye=True)
        self.stats["relay_switches"] += 1
        self._repunch_at = None
        self.relayed = True
        self.session = candidate
        self._better_paths(candidate, now, relayed=True)
        self.stats["relay_in"] += 1
        self._set_state(target)
