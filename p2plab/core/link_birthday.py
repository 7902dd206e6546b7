"""The link engine's birthday punching for hard NATs, sans-I/O (issue 16; a base of
:class:`~p2plab.core.link.LinkEngine`).

On an accepted offer the engine asks :func:`~p2plab.core.birthday.plan_traversal` what to do with
its own :class:`~p2plab.core.signaling.NatHint` and the offer's ``peer_nat``, on top of the plain
punching that always runs:

* ``probe``: a :class:`~p2plab.core.birthday.RandomPortProber` on the offer's ``peer_udp_ip``
  (never another IP) hands the session one address at a time, at ``probe_rate``, at most
  ``probe_budget`` (the *local* config's); each is a sealed PROBE from the link socket to a
  checklist candidate of kind ``birthday``.  A PROBE_ACK from one connects as usual.
* ``spray``: :class:`~p2plab.core.link_commands.OpenSocketPool` with the local ``sockets``
  count, then every ``spray_interval`` (after ``spray_delay``) one sealed PROBE from each pool
  socket to the peer's announced endpoint.  The first datagram on a pool socket that the session
  accepts (it authenticated as the peer's) wins: the engine holds its UDP output, emits
  :class:`~p2plab.core.link_commands.AdoptPoolSocket` and releases the output when the driver
  calls ``pool_socket_adopted``: the session's answer leaves by the winning socket.
* ``hard-relay``: both sides hard and no ``hard_budget``: the relay at once, with the sentence.
* ``hard-try``: both open the pool and probe random ports of the peer's IP from pool socket
  ``(j mod k) + 1``, at most ``hard_budget``; adoption as for ``spray``.

The pool closes (:class:`~p2plab.core.link_commands.ClosePool`) when the link comes up on the
link socket, and whenever the session ends (relay, stop, punch timeout, re-punch).  A re-punch
after a link loss is plain punching on the (possibly adopted) link socket: its mapping is still
there; birthday punching starts again only with a new offer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from p2plab.core import events as ev
from p2plab.core.birthday import Plan, RandomPortProber, SpraySchedule, plan_traversal
from p2plab.core.crypto import Identity
from p2plab.core.link_commands import (
    RELAY,
    AdoptPoolSocket,
    ClosePool,
    LinkConfig,
    OpenSocketPool,
    SendFromPool,
)
from p2plab.core.link_sessions import LinkSessions
from p2plab.core.link_table import Input, next_state
from p2plab.core.session import PeerSession
from p2plab.core.signaling import NatHint

__all__ = ["LinkBirthday"]

log = logging.getLogger("p2plab.core.link")

Address = ev.Address


class LinkBirthday(LinkSessions):
    """The birthday part of the engine (see the module docstring)."""

    public_endpoint: Address | None
    """The link socket's public UDP endpoint, once discovered (set by the engine)."""

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
        self.nat_hint: NatHint | None = None
        """What the driver learnt of this worker's NAT mapping (see ``discovered``)."""
        self.plan: Plan | None = None
        """The plan of the current offer (None before one)."""
        self._prober: RandomPortProber | None = None
        self._spray: SpraySchedule | None = None
        self._spray_to: Address | None = None
        self._pool = 0  # pool sockets open (0: no pool)
        self._adopting: int | None = None  # AdoptPoolSocket sent, output held until adopted
        self._adopted: int | None = None  # the pool socket the link runs on
        self._method: str | None = None  # how the current direct link was made
        self._link_socket_heard = False  # the peer's datagrams reached the link socket

    # -- read-only state ----------------------------------------------------------------------

    @property
    def method(self) -> str | None:
        """How the current link was made: ``direct`` (plain punching), ``birthday`` (a random
        port probe or an adopted pool socket won), ``predicted`` (a predicted port won) or
        ``relay``; None without a link.  A re-punched link keeps the method of its offer."""
        if self._state == "relayed":
            return "relay"
        if self._state == "connected":
            return self._method or "direct"
        return None

    @property
    def pool_size(self) -> int:
        """Pool sockets the driver holds open for this engine (0: none)."""
        return self._pool

    # -- driver inputs ------------------------------------------------------------------------

    def pool_socket_adopted(self, index: int, now: float) -> None:
        """The driver carried out :class:`AdoptPoolSocket` (``index`` is the link's socket now):
        the held output is released and leaves by it."""
        if index != self._adopting:
            log.debug("pool socket %d adopted, expected %s: ignored", index, self._adopting)
            return
        self._adopting = None
        self._adopted = index
        self._pump(now)

    def _pool_datagram(self, data: bytes, addr: Address, now: float, index: int) -> None:
        """A datagram on pool socket ``index``: adopt the socket on the first one the session
        accepts; anything else (junk, strangers, no pool, after adoption) is dropped."""
        s = self.session
        if (
            s is None
            or self.relayed
            or not 1 <= index <= self._pool
            or self._adopting is not None
            or s.state != "punching"
            or self._link_socket_heard
        ):
            self.stats["pool_dropped"] += 1
            return
        before = s.datagrams_accepted
        s.receive_datagram(data, addr, now)
        if s.datagrams_accepted == before or s.state not in ("punching", "connected"):
            self.stats["pool_dropped"] += 1
        else:
            log.info(
                "pool socket %d reached peer %s from %s: adopting it", index, self.peer_id, addr
            )
            self.stats["pool_adoptions"] += 1
            self._adopting = index
            self._pool = 0  # the driver closes the others with the adoption
            self._prober = self._spray = None
            self._commands.append(AdoptPoolSocket(index))
        self._pump(now)

    # -- the attempt --------------------------------------------------------------------------

    def _holding(self) -> bool:
        """Whether UDP output waits for ``pool_socket_adopted`` (none may leave by the old
        socket)."""
        return self._adopting is not None

    def _birthday_begin(self, now: float) -> None:
        """Plan the accepted offer's traversal and start its birthday part (the session of the
        offer is in place, the state is ``punching``)."""
        s, offer = self.session, self.offer
        assert s is not None and offer is not None
        cfg = self.config.birthday
        plan = plan_traversal(self.nat_hint, offer.peer_nat, cfg)
        own = self.public_endpoint
        if own is not None and own[0] == offer.peer_udp_ip:
            plan = Plan("plain")  # one NAT for both: the LAN candidates need no birthday
        if self._direct_without_birthday():
            plan = Plan("plain")  # a port mapping or IPv6 on both sides: see the hook
        if plan.role == "hard-relay" and self._turn_expected():
            # A TURN relay carries a hard pair at full speed: punch plainly (the LAN, a NAT
            # kinder than its hint) while it comes up, never the WebSocket relay at once.
            plan = Plan("plain")
        self._link_socket_heard = False
        self.plan = plan
        self._method = None
        self._adopted = None
        if plan.role == "plain":
            return
        log.info("peer %s: %s (expected %s)", self.peer_id, plan.role, plan.expected)
        if plan.reason is not None:
            self.error = plan.reason
            self._events.append(ev.ErrorReported(plan.reason))
        if plan.role == "hard-relay":
            if self.config.relay:
                self._relay_now(now)
            return
        s.extend_punching(plan.punch_extension)
        predicted = offer.peer_nat.predicted_ports if offer.peer_nat is not None else []
        if plan.role in ("probe", "hard-try"):
            budget = cfg.hard_budget if plan.role == "hard-try" else cfg.probe_budget
            ip = offer.peer_udp_ip
            self._prober = RandomPortProber(
                ip, cfg, self._rand_bytes, now, predicted, budget=budget
            )
        if plan.role in ("spray", "hard-try"):
            self._pool = cfg.sockets
            self._commands.append(OpenSocketPool(cfg.sockets))
        if plan.role == "spray":
            self._spray = SpraySchedule(now, plan.spray_delay, cfg.spray_interval)
            self._spray_to = (offer.peer_udp_ip, offer.peer_udp_port)
        self._birthday_service(now)

    def _direct_without_birthday(self) -> bool:
        """Whether the offer has a direct way that needs no birthday punching (the engine says
        so: a NAT's port mapping on either side, or IPv6 on both; issues 18 and 19)."""
        return False

    def _turn_expected(self) -> bool:
        """Whether a TURN relay is being set up for the current offer (the TURN part of the
        engine, :mod:`p2plab.core.link_turn`, says so)."""
        return False

    def _relay_now(self, now: float) -> None:
        """Both hard: the relayed session at once (no BYE: the peer does the same)."""
        self._retire(now, bye=False)
        self.stats["relay_switches"] += 1
        self._new_session([RELAY], now, relayed=True)
        self._set_state(next_state(self._state, Input.RELAY_FALLBACK))

    def _birthday_timer(self) -> float | None:
        """The next birthday deadline (probe or spray round), or None."""
        s = self.session
        if s is None or s.state != "punching" or self.relayed:
            return None  # nothing would be sent: a deadline would only spin the driver
        when = [
            t
            for t in (
                self._prober.next_deadline() if self._prober is not None else None,
                self._spray.next_deadline() if self._spray is not None else None,
            )
            if t is not None
        ]
        return min(when) if when else None

    def _birthday_service(self, now: float) -> None:
        """Send the probes and spray rounds due at ``now`` (only while punching)."""
        s = self.session
        if s is None or s.state != "punching" or self.relayed:
            return
        if self._prober is not None:
            for addr in self._prober.due(now):
                if self._pool:  # hard-try: from the pool, round robin
                    index = (self._prober.sent - 1) % self._pool + 1
                    self._commands.append(SendFromPool(index, s.spray_probe(addr, now), addr))
                    self.stats["birthday_probes"] += 1
                elif s.add_birthday_target(addr, now):
                    self.stats["birthday_probes"] += 1
        if self._spray is not None and self._spray_to is not None and self._spray.due(now):
            to = self._spray_to
            for index in range(1, self._pool + 1):
                self._commands.append(SendFromPool(index, s.spray_probe(to, now), to))
            self.stats["spray_datagrams"] += self._pool

    def _birthday_stop(self) -> None:
        """No more probes nor sprays; close the pool (an adoption under way goes on)."""
        self._prober = self._spray = None
        self._spray_to = None
        if self._pool:
            self._pool = 0
            self._commands.append(ClosePool())

    def _decide_method(self, s: PeerSession, addr: Address) -> str:
        plan = self.plan
        if plan is None:
            return "direct"
        if self._adopted is not None or self._adopting is not None:
            return "birthday"
        if plan.role in ("probe", "hard-try") and s.candidate_kind(addr) == "birthday":
            predicted = self._prober is not None and addr in self._prober.predicted_sent
            return "predicted" if predicted else "birthday"
        hint = self.nat_hint
        if plan.role == "spray" and hint is not None and hint.predicted_ports:
            return "predicted"  # the peer probed my predicted ports; my link socket won
        return "direct"

    # -- hooks into the session's lifecycle ---------------------------------------------------

    def _on_session_event(self, s: PeerSession, event: ev.Event, now: float) -> None:
        if isinstance(event, ev.PeerConnected) and not self.relayed:
            if self._method is None:  # a re-punch keeps the method of its offer
                self._method = self._decide_method(s, event.address)
            self._birthday_stop()
        super()._on_session_event(s, event, now)
        plan = self.plan
        if isinstance(event, ev.PeerConnected) and plan is not None and plan.role == "hard-relay":
            self.error = plan.reason  # the link is up, but the user should still see why relayed

    def _retire(self, now: float, *, bye: bool) -> None:
        super()._retire(now, bye=bye)
        self._birthday_stop()
        self._adopting = None  # nothing left to hold the output for
