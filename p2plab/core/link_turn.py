"""The link engine's TURN path, sans-I/O (issue 17; a base of
:class:`~p2plab.core.link.LinkEngine`).

On an accepted offer that carries ``turn`` (and ``LinkConfig.turn``), the engine owns one
:class:`~p2plab.core.turn.TurnClient` and allocates at once, in parallel with punching (ICE
gathers its relay candidates up front: a relay found only after the punch timeout would cost
those seconds every time):

* on the offer's first ``?transport=udp`` URL, through the **link socket**: the client's
  datagrams leave by ``datagrams_to_send`` to the server's address, and the driver feeds what
  comes from that address to ``receive_datagram`` like any other datagram.  Over UDP the URL's
  host must be an IP literal for now (the engine never resolves; names are counted in
  ``turn_urls_unusable``);
* if that allocation fails (or there is no usable UDP URL), on the first ``?transport=tcp`` URL,
  through :class:`~p2plab.core.link_commands.OpenTurnTcp` (the driver resolves and connects,
  then ``turn_tcp_connected``/``turn_tcp_received``/``turn_tcp_closed``).

Once allocated: a permission for each IP the peer announced (the offer's ``peer_udp_ip`` and
candidates), and the relayed address trickled to the peer in a ``candidates`` message
(:class:`~p2plab.core.signaling.CandidatesOut`).  The client refreshes the allocation,
permissions and channels by itself; the engine releases the allocation when it drops the peer.

Datagrams the peer sends to our relayed address arrive as ``PeerData`` and go to the session
from the pseudo-address :func:`~p2plab.core.paths.turn_address` (``("turn-udp|ip", port)``);
what the session sends there goes back through the allocation (ChannelData once the channel
for that peer is bound: the first datagram binds it).  The peer's relayed addresses (a
``candidates`` message from the current peer only, IP literals only, at most
``MAX_TRICKLED_CANDIDATES``) become session candidates of kind ``relay``, probed from the link
socket like the offer's.  Everything on a TURN path is sealed end to end like on the direct path:
the TURN server sees only ciphertext, and a datagram from a peer we gave no permission is
dropped by the client (and again here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from p2plab.core import events as ev
from p2plab.core.addresses import is_ip_literal
from p2plab.core.crypto import Identity
from p2plab.core.link_birthday import LinkBirthday
from p2plab.core.link_commands import (
    CloseTurnTcp,
    LinkConfig,
    OpenTurnTcp,
    SendToRendezvous,
    SendTurnTcp,
)
from p2plab.core.link_table import Input, next_state
from p2plab.core.link_trust import offer_candidates
from p2plab.core.paths import RELAY_PATH, TURN_TCP, TURN_UDP, parse_turn_address, turn_address
from p2plab.core.session import PeerSession
from p2plab.core.signaling import (
    MAX_TRICKLED_CANDIDATES,
    CandidatesIn,
    CandidatesOut,
    RelayCandidate,
)
from p2plab.core.stun import Class, Message, Method
from p2plab.core.turn import (
    Allocated,
    AllocationFailed,
    PeerData,
    PermissionFailed,
    TurnClient,
    TurnState,
)
from p2plab.core.turn_config import TurnServer, parse_turn_url
from p2plab.errors import ConfigError, LocalProtocolError

__all__ = ["TURN_KEEPALIVE_S", "TURN_TCP_GRACE_S", "TURN_UDP_WAIT_S", "LinkTurn"]

log = logging.getLogger("p2plab.core.link")

#: Seconds an allocation over UDP may take before the TCP URL is tried instead.  A TURN server
#: answers in one round trip (two with the 401 round); if four requests (0.5 + 1 + 2 s of
#: retransmissions) got nothing back, UDP to the server is blocked, and RFC 8489's 39.5 s would
#: leave TCP no time before the punch timeout hands the pair to the WebSocket relay.
TURN_UDP_WAIT_S = 5.0
#: Longest silence towards the TURN server over UDP before a STUN Binding indication goes there:
#: the NAT mapping and filter entry towards the server must outlive a NAT's 30 s UDP timeout
#: while the link runs direct (the allocation's own refreshes come every few minutes), or the
#: warm TURN path dies unnoticed; 15 s as ICE's keepalives (RFC 8445 section 11).
TURN_KEEPALIVE_S = 15.0
#: Seconds added to the punching deadline when the TCP fallback starts while punching: the time
#: to connect, allocate and trickle.
TURN_TCP_GRACE_S = 5.0

Address = ev.Address


class LinkTurn(LinkBirthday):
    """The TURN part of the engine (see the module docstring)."""

    def __init__(
        self,
        worker_id: str,
        *,
        config: LinkConfig | None,
        identity: Identity | None,
        rand_bytes: Callable[[int], bytes],
        wall_ns: Callable[[], int] | None,
    ) -> None:
        super().__init__(
            worker_id, config=config, identity=identity, rand_bytes=rand_bytes, wall_ns=wall_ns
        )
        self.turn: TurnClient | None = None
        """The TURN client of the current offer (None: no TURN, or it failed)."""
        self._turn_tcp: TurnServer | None = None  # the TCP fallback, not tried yet
        self._tcp_open = False  # OpenTurnTcp given and not closed
        self._udp_deadline: float | None = None  # the UDP allocation's last moment
        self._keepalive_at: float | None = None  # next Binding indication to the server (UDP)
        self._peer_ips: set[str] = set()  # the IPs we gave permissions to
        self._peer_relays: dict[Address, str] = {}  # the peer's relayed addresses -> transport

    # -- read-only state ----------------------------------------------------------------------

    @property
    def turn_relayed(self) -> Address | None:
        """Our allocation's relayed address, once allocated."""
        t = self.turn
        return t.relayed if t is not None and t.state is TurnState.ALLOCATED else None

    @property
    def method(self) -> str | None:
        """As :class:`~p2plab.core.link_birthday.LinkBirthday`'s, and ``relay`` on a TURN path
        too (the path says which relay)."""
        s = self.session
        if self._state == "connected" and s is not None and s.path in (TURN_UDP, TURN_TCP):
            return "relay"
        return super().method

    @property
    def peer_relays(self) -> list[Address]:
        """The peer's relayed addresses it trickled (at most ``MAX_TRICKLED_CANDIDATES``)."""
        return list(self._peer_relays)

    # -- driver inputs (TURN over TCP) --------------------------------------------------------

    def turn_tcp_connected(self, now: float) -> None:
        """The connection :class:`OpenTurnTcp` asked for is up: allocate over it."""
        t = self.turn
        if t is None or t.transport != "tcp" or t.state is not TurnState.IDLE:
            log.debug("turn_tcp_connected without a TCP allocation waiting: ignored")
            return
        t.allocate(now)
        self._pump(now)

    def turn_tcp_received(self, data: bytes, now: float) -> None:
        """Bytes from the TURN server on the TCP connection."""
        t = self.turn
        if t is None or t.transport != "tcp":
            self.stats["turn_dropped"] += 1
            return
        t.receive(data, t.server, now)
        self._pump(now)

    def turn_tcp_closed(self, now: float, error: str | None = None) -> None:
        """The TCP connection failed or ended: that allocation is gone."""
        self._tcp_open = False
        t = self.turn
        if t is None or t.transport != "tcp":
            return
        log.info("TURN over TCP closed: %s", error or "closed")
        self.stats["turn_failures"] += 1
        self.turn = None
        self._pump(now)

    def pool_socket_adopted(self, index: int, now: float) -> None:
        """As :class:`~p2plab.core.link_birthday.LinkBirthday`'s; an allocation over UDP lived
        on the old link socket, which the driver closed: allocate again on the new one (a TURN
        server knows its clients by their address; the old allocation expires by itself)."""
        adopting = self._adopting
        super().pool_socket_adopted(index, now)
        t = self.turn
        if index == adopting and t is not None and t.transport == "udp":
            log.info("peer %s: TURN allocation again on the adopted socket", self.peer_id)
            self.turn = self._client(t.server, "udp")
            self.turn.allocate(now)
            self._udp_deadline = now + TURN_UDP_WAIT_S
            self._pump(now)

    # -- the engine's hooks -------------------------------------------------------------------

    def _turn_expected(self) -> bool:
        return self.turn is not None

    def _turn_begin(self, now: float) -> None:
        """Allocate for the offer just accepted (the session is in place)."""
        offer = self.offer
        self._peer_relays = {}
        if not self.config.turn or offer is None or offer.turn is None:
            return
        udp: TurnServer | None = None
        for url in offer.turn.urls:
            try:
                server = parse_turn_url(url)
            except ConfigError:
                self.stats["turn_urls_unusable"] += 1
                continue
            if server.transport == "tcp":
                self._turn_tcp = self._turn_tcp or server
            elif not is_ip_literal(server.host):
                self.stats["turn_urls_unusable"] += 1  # names over UDP: not resolved yet
            else:
                udp = udp or server
        self._peer_ips = {offer.peer_udp_ip} | {
            c.ip for c in offer.peer_candidates if is_ip_literal(c.ip)
        }
        mapped = offer.peer_mapped
        if mapped is not None and is_ip_literal(mapped.ip):
            self._peer_ips.add(mapped.ip)  # its NAT's port mapping may be another address
        if udp is not None:
            log.info("peer %s: allocating a TURN relay at %s", self.peer_id, udp.url)
            self.turn = self._client((udp.host, udp.port), "udp")
            self.turn.allocate(now)
            self._udp_deadline = now + TURN_UDP_WAIT_S
        else:
            self._turn_tcp_start(now)

    def _client(self, server: Address, transport: str) -> TurnClient:
        assert self.offer is not None and self.offer.turn is not None
        t = self.offer.turn
        mode: Literal["udp", "tcp"] = "tcp" if transport == "tcp" else "udp"
        return TurnClient(
            server, t.username, t.password, rand_bytes=self._rand_bytes, transport=mode
        )

    def _turn_tcp_start(self, now: float) -> None:
        server, self._turn_tcp = self._turn_tcp, None
        udp_failed, self._udp_deadline = self._udp_deadline is not None, None
        if server is None:
            return
        s = self.session
        if udp_failed and s is not None and s.state == "punching":
            s.extend_punching(TURN_TCP_GRACE_S)  # UDP failed: give TCP its chance
        log.info("peer %s: allocating a TURN relay at %s", self.peer_id, server.url)
        self.turn = self._client((server.host, server.port), "tcp")
        self._tcp_open = True
        self._commands.append(OpenTurnTcp(server.host, server.port))

    def _turn_end(self, now: float) -> None:
        """Release the allocation (best effort: one Refresh with LIFETIME 0) and forget it."""
        t, self.turn = self.turn, None
        self._turn_tcp = None
        self._udp_deadline = self._keepalive_at = None
        self._peer_relays = {}
        self._peer_ips = set()
        if t is not None:
            t.release(now)
            self._turn_output(t, now)
        if self._tcp_open:
            self._tcp_open = False
            self._commands.append(CloseTurnTcp())

    def _turn_datagram(self, data: bytes, addr: Address, now: float) -> bool:
        """Whether a datagram on the link socket is the TURN server's (then it is taken)."""
        t = self.turn
        if t is None or t.transport != "udp" or addr != t.server:
            return False
        t.receive(data, addr, now)
        self._pump(now)
        return True

    def _turn_timer(self) -> float | None:
        t = self.turn
        if t is None:
            return None  # nothing to time: a stale deadline must not spin the driver
        keepalive = self._keepalive_at if self._keeping_alive(t) else None
        when = [x for x in (t.get_timer(), self._udp_deadline, keepalive) if x is not None]
        return min(when) if when else None

    def _keeping_alive(self, t: TurnClient) -> bool:
        return t.transport == "udp" and t.state is TurnState.ALLOCATED

    def _turn_service(self, now: float) -> None:
        t = self.turn
        if t is None:
            return
        if self._udp_deadline is not None and now >= self._udp_deadline:
            if t.transport == "udp" and t.state is TurnState.ALLOCATING:
                log.info("no answer from the TURN server over UDP: trying TCP")
                self.stats["turn_failures"] += 1
                t.release(now)  # nothing was allocated: forget the transaction
                self.turn = None
                self._turn_tcp_start(now)
                return
            self._udp_deadline = None
        t.handle_timer(now)
        at = self._keepalive_at
        if self._keeping_alive(t) and (at is None or now >= at):
            ping = Message(Method.BINDING, Class.INDICATION, self._rand_bytes(12))
            self._outbox.append((bytes(ping), t.server))
            self._keepalive_at = now + TURN_KEEPALIVE_S

    def _on_candidates(self, msg: CandidatesIn, now: float) -> None:
        """The peer's relayed addresses, passed on by the rendezvous."""
        s = self.session
        if msg.from_ != self.peer_id or s is None or self.offer is None:
            self.stats["candidates_in_dropped"] += 1
            return
        for c in msg.candidates:
            addr = (str(c.ip), int(c.port))
            fresh = addr not in self._peer_relays
            full = len(self._peer_relays) >= MAX_TRICKLED_CANDIDATES
            if not is_ip_literal(c.ip) or not 0 < addr[1] < 65536 or (fresh and full):
                self.stats["candidates_in_dropped"] += 1
                continue
            self.stats["candidates_in"] += 1
            transport = "tcp" if c.transport == "tcp" else "udp"
            self._peer_relays[addr] = transport
            log.info("peer %s: relay candidate %s (%s)", self.peer_id, addr, transport)
            if not self._birthday_busy():  # else held: the session learns it when done
                s.add_relay_candidate(addr, transport, now)
                self._relay_pair(addr, now)

    def _birthday_busy(self) -> bool:
        """Whether a birthday attempt runs on the punching session: the TURN candidates wait
        for it (both sides' plans mirror, so both wait).  A TURN pair validates in a round trip,
        a birthday one in seconds; connected on TURN, the pool would close and the hard pair
        would never go direct (upgrade rounds probe from the link socket, not the pool).  If the
        attempt fails, the rendezvous relay's session takes the TURN candidates and upgrades."""
        s, plan = self.session, self.plan
        return (
            s is not None
            and s.state == "punching"
            and not self.relayed
            and plan is not None
            and plan.role in ("probe", "spray", "hard-try")
        )

    def _relay_pair(self, addr: Address, now: float) -> None:
        """Pair the peer's relayed address ``addr`` with our own allocation too (ICE's
        relay-relay pair): when UDP from the link socket to the TURN servers is blocked and our
        allocation runs over TCP, that is the only way through.  Its permission is for the
        peer's TURN server's IP."""
        t, s = self.turn, self.session
        if t is None or t.state is not TurnState.ALLOCATED or s is None or self._birthday_busy():
            return
        try:
            t.create_permission(addr[0], now)
        except LocalProtocolError:
            return
        self._peer_ips.add(addr[0])
        s.add_relay_candidate(turn_address(addr, t.transport), t.transport, now)

    # -- overrides of the session plumbing ----------------------------------------------------

    def _new_session(self, candidates: list[Address], now: float, *, relayed: bool) -> None:
        super()._new_session(candidates, now, relayed=relayed)
        s = self.session
        if s is not None:
            self._better_paths(s, now, relayed=relayed)

    def _better_paths(self, s: PeerSession, now: float, *, relayed: bool) -> None:
        """What a new session of the current peer knows besides its own candidates: the peer's
        relayed addresses (a re-punch keeps them), and on the rendezvous relay the offer's
        candidates too, which its upgrade rounds probe (:mod:`p2plab.core.session_paths`)."""
        if relayed and self.offer is not None:
            s.add_upgrade_candidates(offer_candidates(self.offer)[0])
        for addr, transport in self._peer_relays.items():
            s.add_relay_candidate(addr, transport, now)
            self._relay_pair(addr, now)

    def _drop_peer(self, now: float) -> None:
        super()._drop_peer(now)
        self._turn_end(now)

    def _on_session_event(self, s: PeerSession, event: ev.Event, now: float) -> None:
        if self.relayed and isinstance(event, ev.PeerConnected) and event.path != RELAY_PATH:
            self.relayed = False  # a relayed session's first round trip was a better path
        held = isinstance(event, ev.PeerConnected) and self._birthday_busy()
        super()._on_session_event(s, event, now)
        if held and self.session is s:  # the TURN candidates held for birthday punching
            self._better_paths(s, now, relayed=False)
        if (
            self.relayed
            and self.session is s
            and isinstance(event, ev.PathChanged)
            and event.previous_path == RELAY_PATH
            and event.path != RELAY_PATH
        ):
            log.info("peer %s: off the rendezvous relay, now %s", self.peer_id, event.path)
            self.relayed = False
            self.stats["relay_upgrades"] += 1
            self._set_state(next_state(self._state, Input.RELAY_UPGRADE))

    def _route(self, s: PeerSession, datagrams: list[tuple[bytes, Address]], now: float) -> None:
        rest: list[tuple[bytes, Address]] = []
        for data, addr in datagrams:
            parsed = parse_turn_address(addr)
            if parsed is None:
                rest.append((data, addr))
            else:
                self._turn_send(parsed[1], data, now)
        super()._route(s, rest, now)

    def _turn_send(self, peer: Address, data: bytes, now: float) -> None:
        t = self.turn
        if t is None or t.state is not TurnState.ALLOCATED:
            self.stats["turn_dropped"] += 1
            return
        try:
            if t.bound_channel(peer) is None:
                t.bind_channel(peer, now)  # at once or pending: idempotent per peer
            t.send(peer, data, now)
        except LocalProtocolError as exc:  # no channel numbers left, or a payload too big
            self.stats["turn_dropped"] += 1
            log.debug("TURN send to %s dropped: %s", peer, exc)

    def _pump(self, now: float) -> None:
        """The session's output and events, then the TURN client's, until nothing moves (a
        datagram relayed to the session makes more session output)."""
        while True:
            super()._pump(now)
            t = self.turn
            if t is None:
                return
            fed = self._turn_events(t, now)
            if self.turn is not None:
                self._turn_output(self.turn, now)
            if not fed:
                return

    def _turn_output(self, t: TurnClient, now: float) -> None:
        for data, server in t.datagrams_to_send(now):
            if t.transport == "tcp":
                self._commands.append(SendTurnTcp(data))
            else:
                self._outbox.append((data, server))
                self._keepalive_at = now + TURN_KEEPALIVE_S  # the mapping was just used

    def _turn_events(self, t: TurnClient, now: float) -> bool:
        """Act on the client's events; True if a datagram went to the session."""
        fed = False
        while (event := t.next_event()) is not None:
            if isinstance(event, PeerData):
                fed = self._turn_peer_data(t, event, now) or fed
            elif isinstance(event, Allocated):
                self._turn_allocated(t, event, now)
            elif isinstance(event, AllocationFailed):
                log.warning("TURN allocation (%s) failed: %s", t.transport, event.reason)
                self.stats["turn_failures"] += 1
                self._turn_output(t, now)
                if self.turn is t:
                    self.turn = None
                    if t.transport == "tcp":
                        self._tcp_open = False
                        self._commands.append(CloseTurnTcp())
                    else:
                        self._turn_tcp_start(now)
            elif isinstance(event, PermissionFailed):
                log.info("TURN permission for %s failed: %s", event.peer_ip, event.reason)
        return fed

    def _turn_allocated(self, t: TurnClient, event: Allocated, now: float) -> None:
        self.stats["turn_allocations"] += 1
        self._udp_deadline = None
        log.info("TURN relay allocated: %s (%s)", event.relayed, t.transport)
        relayed_v6 = ":" in str(event.relayed[0])
        for ip in sorted(self._peer_ips):
            if (":" in ip) != relayed_v6:
                continue  # a relay of one family reaches peers of that family (RFC 6156)
            try:
                t.create_permission(ip, now)
            except LocalProtocolError:
                continue
        if self.peer_id is not None and is_ip_literal(event.relayed[0]):
            cand = RelayCandidate(ip=event.relayed[0], port=event.relayed[1], transport=t.transport)
            out = CandidatesOut(to=self.peer_id, candidates=[cand])
            self._commands.append(SendToRendezvous(out))
        for addr in self._peer_relays:
            self._relay_pair(addr, now)

    def _turn_peer_data(self, t: TurnClient, event: PeerData, now: float) -> bool:
        s = self.session
        known = event.peer[0] in self._peer_ips or t.bound_channel(event.peer) is not None
        if s is None or not known:
            self.stats["turn_dropped"] += 1
            return False
        self.stats["turn_data_in"] += 1
        s.receive_datagram(event.data, turn_address(event.peer, t.transport), now)
        return True
