"""Which path a :class:`~p2plab.core.session.PeerSession` is on, and when it changes path:
upgrade to direct and downgrade to TURN (issue 17), sans-I/O.

The session connects on the first pair that passes a round trip, whatever its path (as before:
a relayed link now beats a perfect one in ten seconds).  Then, by the rank of
:data:`~p2plab.core.paths.PATH_NAMES` (direct, turn-udp, turn-tcp, relay):

* **Upgrade.** Connected on a TURN path, both sides probe their direct candidates (the offer's
  and the learnt ones, one probe each) every ``upgrade_interval``: both must send for two NATs'
  filters to open.  When one answers, the controlling side moves to it and nominates it (the
  session's path change and its flagged probes); the controlled side follows the nomination.
* **Downgrade.** Connected direct, both sides probe their TURN candidates every
  ``warm_interval`` (a validated TURN path stays ready: the NAT mapping towards the TURN server
  and the server's permission stay open).  When nothing came from the peer on the direct path for
  ``downgrade_after``, the controlling side moves to the best validated TURN path and nominates
  it; the controlled side follows the nomination, which arrives over that path.
* **From the rendezvous relay.** A relayed session also knows the offer's candidates (not
  probed while it punches over the relay) and the peer's TURN ones: once connected on the relay,
  its upgrade rounds probe every candidate of a better path (TURN or direct), and the link moves
  as above.
* **Between families** (issue 19). Within ``direct``, IPv6 ranks above IPv4
  (:func:`~p2plab.core.paths.family_rank`): connected direct over IPv4 while the peer offered
  IPv6 candidates, both sides probe those in the upgrade rounds, and the link moves to IPv6 as
  it moves from TURN to direct (a ``PathChanged`` whose path stays ``direct``).  Connected
  direct over IPv6, the peer's direct IPv4 addresses are the first fallback: the warm-up rounds
  probe them too (the offer's, and validated ones), a warm-up probe from one is checked back at
  once, and when the IPv6 path falls silent the controlling side moves to the best validated
  IPv4 one before any TURN path.  Between two direct addresses of one family the first to
  validate keeps the link (the probing order gave the better-ranked one its head start).
* **No flapping.** Traffic from another validated path of the peer (in flight while both sides
  switch) is taken, authenticated and de-duplicated by the reliable stream as always, but it
  moves the path only if that path is not worse: the old path's late datagrams never undo a
  switch.  Only an explicit nomination (or the downgrade above) moves a link to a worse path.

:class:`PathBook` keeps the names of the peer's relayed addresses (the session sees its own
allocation's paths as pseudo-addresses, :func:`~p2plab.core.paths.turn_address`), when the
current path was last heard and the schedule of both kinds of probing rounds.
"""

from __future__ import annotations

from collections.abc import Callable

from p2plab.config import SessionConfig
from p2plab.core.paths import (
    DIRECT,
    RELAY_PATH,
    TURN_TCP,
    TURN_UDP,
    Address,
    address_family,
    family_rank,
    path_name,
    path_rank,
    turn_path,
)
from p2plab.core.punch import Candidate, Checklist
from p2plab.core.wire import Datagram, Probe

__all__ = ["MAX_PROBE_TARGETS", "MAX_UPGRADE_PROBES", "PathBook", "SessionPaths"]

#: Most candidates one upgrade or warm-up round probes (one probe each).
MAX_UPGRADE_PROBES = 16
#: Most peer source addresses whose probes' targets are remembered (:meth:`PathBook.targeted`).
MAX_PROBE_TARGETS = 16

_TURN = (TURN_UDP, TURN_TCP)
_UPGRADABLE = (TURN_UDP, TURN_TCP, RELAY_PATH)  # paths whose sessions look for better ones


class PathBook:
    """Path names, the current path's liveness and the upgrade/downgrade schedule."""

    def __init__(self, config: SessionConfig, now: float) -> None:
        self.config = config
        self.relays: dict[Address, str] = {}
        """The peer's relayed addresses (its TURN candidates) and their path names."""
        self.last_on_path = now
        """When an authenticated datagram last came from the current path."""
        self._next_upgrade = now + config.upgrade_interval
        self._next_warm = now + config.warm_interval
        self._targets: dict[Address, Address] = {}  # peer source -> where its probe was sent

    def targeted(self, source: Address, target: Address) -> None:
        """An authenticated PROBE from ``source`` says the peer sent it to ``target`` (one of our
        addresses as the peer knows it: our STUN endpoint, a LAN address, our NAT's mapping)."""
        self._targets.pop(source, None)
        self._targets[source] = target
        while len(self._targets) > MAX_PROBE_TARGETS:
            del self._targets[next(iter(self._targets))]

    def target_of(self, source: Address | None) -> Address | None:
        """Where the peer's last probe from ``source`` was sent (None: no probe seen)."""
        return self._targets.get(source) if source is not None else None

    @property
    def downgrade_after(self) -> float:
        """Silence on a direct path before the controlling side moves to TURN."""
        return min(self.config.downgrade_after, 0.8 * self.config.peer_timeout)

    def name(self, addr: Address | None) -> str | None:
        """The path name of the peer address ``addr`` (None for None)."""
        return path_name(addr, self.relays)

    def is_turn(self, addr: Address | None) -> bool:
        """Whether ``addr`` is a TURN path (ours or the peer's allocation)."""
        return self.name(addr) in _TURN

    def better(self, a: Address | None, b: Address | None) -> bool:
        """Whether the path to ``a`` ranks strictly better than the path to ``b`` (by path
        name; between two direct ones, IPv6 above IPv4)."""
        name_a, name_b = self.name(a), self.name(b)
        if name_a is None or name_b is None:
            return False
        if name_a == name_b == DIRECT:
            return family_rank(a) < family_rank(b)
        return path_rank(name_a) < path_rank(name_b)

    def _upgradable(self, current: Address | None, checklist: Checklist) -> bool:
        """Whether a session on ``current`` looks for better paths: on TURN or the relay, or
        direct over IPv4 while the peer offered IPv6 candidates."""
        name = self.name(current)
        if name in _UPGRADABLE:
            return True
        return (
            name == DIRECT
            and address_family(current) == "ipv4"
            and any(self.better(a, current) for a in checklist.candidates)
        )

    def fallback(self, addr: Address | None, current: Address | None) -> bool:
        """Whether ``addr`` is a direct IPv4 path of a session connected direct over IPv6 (the
        first fallback when IPv6 falls silent)."""
        return (
            self.name(current) == DIRECT
            and self.name(addr) == DIRECT
            and address_family(current) == "ipv6"
            and address_family(addr) == "ipv4"
        )

    def check_back(
        self, addr: Address, current: Address | None, checklist: Checklist, now: float
    ) -> None:
        """A probe of the peer came from ``addr`` (not necessarily ``current``) while connected:
        if it is the peer's upgrade round on a better path, probe it back at once (one for one),
        so an upgrade takes one round, not two; the same for its IPv4 warm-up probes while on
        IPv6, until that path is validated (then the two sides' rounds stop answering)."""
        cand = checklist.get(addr)
        idle = cand is None or cand.next_probe_at == float("inf")
        if self.better(addr, current):
            if idle:
                checklist.restart(addr, now, budget=1)
        elif self.fallback(addr, current) and idle and (cand is None or not cand.succeeded):
            checklist.restart(addr, now, budget=1)

    def side_path(self, addr: Address, current: Address | None, succeeded: bool) -> bool:
        """Whether traffic from ``addr`` (not the current path) is taken anyway: a validated
        path of the peer while one of the two is a relay, TURN or the rendezvous's (the other
        side is mid-switch).  Between two direct addresses the old rule stays: only the
        nominated one carries traffic (a rebinding NAT is checked by a round trip first)."""
        return succeeded and (self.name(addr) != DIRECT or self.name(current) != DIRECT)

    def heard(self, addr: Address, current: Address | None, now: float) -> None:
        """An authenticated datagram came from ``addr``."""
        if addr == current:
            self.last_on_path = now

    def moved(self, now: float) -> None:
        """The session connected or changed path: a new path starts its schedule."""
        self.last_on_path = now
        self._next_upgrade = now + self.config.upgrade_interval
        self._next_warm = now + self.config.warm_interval

    def _downgrade_target(self, current: Address | None, checklist: Checklist) -> Address | None:
        """The best validated fallback of ``current``: a direct IPv4 path (only from direct
        IPv6), then TURN; None if there is none."""
        ok = [
            c.address
            for c in checklist.succeeded()
            if self.is_turn(c.address) or self.fallback(c.address, current)
        ]
        ok.sort(key=lambda a: (path_rank(self.name(a) or ""), family_rank(a)))
        return ok[0] if ok else None

    def deadline(self, current: Address | None, controlling: bool, checklist: Checklist) -> float:
        """When :meth:`service` has work next (``inf``: none) for a session connected to
        ``current``."""
        name = self.name(current)
        if name in _UPGRADABLE:
            return self._next_upgrade
        if name != DIRECT:
            return float("inf")
        when = self._next_warm
        if self._upgradable(current, checklist):
            when = min(when, self._next_upgrade)
        if controlling and self._downgrade_target(current, checklist) is not None:
            when = min(when, self.last_on_path + self.downgrade_after)
        return when

    def service(
        self, now: float, current: Address | None, controlling: bool, checklist: Checklist
    ) -> Address | None:
        """Schedule the probing rounds due at ``now`` (in ``checklist``); returns the TURN path
        the controlling side must move to now (a downgrade), or None."""
        name = self.name(current)
        if now >= self._next_upgrade and self._upgradable(current, checklist):
            self._next_upgrade = now + self.config.upgrade_interval
            better = [
                c.address
                for c in checklist.candidates.values()
                if c.address != current and self.better(c.address, current)
            ]
            for addr in better[:MAX_UPGRADE_PROBES]:
                checklist.restart(addr, now, budget=1)
        if name != DIRECT:
            return None
        if now >= self._next_warm:
            self._next_warm = now + self.config.warm_interval
            # The peer's relayed addresses always (vouched for, at most four); our own
            # allocation's paths only once validated (the anti-amplification rule); on IPv6,
            # the peer's direct IPv4 addresses it offered or that were validated.
            warm = [
                c.address
                for c in checklist.candidates.values()
                if (self.is_turn(c.address) and (c.kind == "relay" or c.succeeded))
                or (self.fallback(c.address, current) and (c.kind == "given" or c.succeeded))
            ]
            for addr in warm[:MAX_UPGRADE_PROBES]:
                checklist.restart(addr, now, budget=1)
        if controlling and now >= self.last_on_path + self.downgrade_after:
            return self._downgrade_target(current, checklist)
        return None


class SessionPaths:
    """The peer session's paths and the candidates added after the offer (a base of
    :class:`~p2plab.core.session.PeerSession`, kept here to keep that module short)."""

    _paths: PathBook
    _checklist: Checklist
    _peer_address: Address | None
    _state: str
    _punch_deadline: float
    _rand_bytes: Callable[[int], bytes]
    local_id: str
    peer_id: str
    config: SessionConfig

    def _probe(self, cand: Candidate, now: float, nominate: bool) -> None:
        raise NotImplementedError  # the session's

    def _encode(self, datagram: Datagram) -> bytes:
        raise NotImplementedError  # the session's

    @property
    def path(self) -> str | None:
        """The name of the nominated path (``direct``, ``turn-udp``, ``turn-tcp``, ``relay``;
        :mod:`p2plab.core.paths`), None until connected."""
        return self._paths.name(self._peer_address)

    @property
    def family(self) -> str | None:
        """``"ipv6"`` or ``"ipv4"``: the family of the nominated path's peer address (None
        until connected, and on the rendezvous relay)."""
        return address_family(self._peer_address)

    def probe_target(self, source: Address | None) -> Address | None:
        """Where the peer sent its last authenticated probe from ``source`` (which of our
        addresses it reaches us at on that path), or None."""
        return self._paths.target_of(source)

    def path_of(self, addr: Address | None) -> str | None:
        """The path name of the peer address ``addr`` as this session sees it."""
        return self._paths.name(addr)

    @property
    def candidates(self) -> list[Address]:
        """Every peer address known (given, peer-reflexive, relay), in the order learnt."""
        return list(self._checklist.candidates)

    def add_upgrade_candidates(self, addrs: list[Address]) -> int:
        """Know the offer's candidates ``addrs`` without probing them now (a session on the
        rendezvous relay probes them in its upgrade rounds); how many were added."""
        return sum(1 for a in addrs if self._checklist.add_dormant(a))

    def add_offer_candidates(self, addrs: list[Address], now: float) -> int:
        """The peer's addresses from a fresh offer about it (a port mapping replaced at another
        port, a new IPv6 endpoint), known from now on as the offer's own: probed at once while
        punching, else kept for the upgrade rounds and the next re-punch; how many were new."""
        added = 0
        for addr in addrs:
            if self._checklist.add_dormant(addr):
                added += 1
                if self._state == "punching":
                    self._checklist.restart(addr, now, budget=self.config.probes_per_candidate)
        return added

    def extend_punching(self, seconds: float) -> None:
        """Move the punch deadline ``seconds`` later (a birthday window, or the TURN TCP
        fallback, must fit in it)."""
        self._punch_deadline += max(0.0, seconds)

    def add_relay_candidate(self, addr: Address, transport: str, now: float) -> bool:
        """Probe the peer's TURN relayed address ``addr`` (reached by the peer over
        ``transport``; or a pseudo-address of our own allocation) like the offer's candidates;
        False once the session is over.

        Connected, it is probed a few times so that a TURN path is validated for a downgrade.
        The engine takes at most ``MAX_TRICKLED_CANDIDATES`` per peer."""
        if self._state in ("lost", "closed"):
            return False
        self._paths.relays[addr] = turn_path(transport)
        cand = self._checklist.add_relay(addr, now)
        if self._state == "connected" and not cand.succeeded:
            self._checklist.restart(addr, now, budget=3)
            cand.kind = "relay"
        return True

    def candidate_kind(self, addr: Address) -> str | None:
        """``given``, ``prflx``, ``birthday`` or ``relay`` for a known address, else None."""
        cand = self._checklist.get(addr)
        return None if cand is None else cand.kind

    # -- birthday punching (issue 16; the engine's p2plab.core.link_birthday drives these) ----

    def add_birthday_target(self, addr: Address, now: float) -> bool:
        """Probe ``addr`` once now as a birthday candidate (False: not punching, or known).

        Outside ``probe_budget`` and ``max_prflx_candidates``: the caller's
        :class:`~p2plab.core.birthday.RandomPortProber` bounds and paces these."""
        cand = self._checklist.add_birthday(addr) if self._state == "punching" else None
        if cand is None:
            return False
        self._probe(cand, now, nominate=False)
        return True

    def spray_probe(self, addr: Address, now: float) -> bytes:
        """A sealed PROBE to ``addr`` for a pool socket, not recorded (its answer, if any, is an
        unmatched PROBE_ACK: what counts is that it opens the pool socket's mapping)."""
        probe = Probe(
            self.local_id, self.peer_id, nonce=self._rand_bytes(8), nominate=False, target=addr
        )
        return self._encode(probe)
