"""Candidate addresses and the probe schedule of hole punching (sans-I/O).

A much reduced ICE (RFC 8445): one local socket, so a "pair" is just a peer address.  The
candidates of the offer (the peer's public endpoint and its LAN addresses, at most
``max_candidates``) are probed with paced, backed-off retries, each at most
``probes_per_candidate`` times, and one punching attempt sends at most ``probe_budget`` probes in
all: whatever the rendezvous or the peer announces, one offer cannot turn the worker into a
probe cannon (issue 14, finding 11: 238 probes to 17 addresses before).

A probe arriving from an address we did not know adds that address as a peer-reflexive
candidate (RFC 8445 section 7.3.1.3) and triggers an immediate probe to it (section 7.3.1.4):
behind a symmetric NAT that is the only address that works.  At most ``max_prflx_candidates``
are learnt so; a triggered check may go past an address's own budget (it answers the peer's
probe one for one), never past the attempt's.  A candidate *succeeds* only when a PROBE_ACK
echoing one of our nonces comes back from the very address the probe went to (the symmetric-path
rule of section 7.2.5.2.1).

:class:`Checklist` only keeps state and answers "whom to probe now"; the session builds and sends
the datagrams and decides about nomination.  :class:`AmplificationLimit` is QUIC's
anti-amplification rule (RFC 9000 section 8.1) for the addresses nobody vouched for, and
:class:`SourceRateLimit` caps how often one source may make the cipher try a new peer session.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2plab.config import SessionConfig
from p2plab.core.paths import HAPPY_EYEBALLS_DELAY, address_family
from p2plab.core.ratelimit import RateLimiter

__all__ = ["Address", "AmplificationLimit", "Candidate", "Checklist", "SourceRateLimit"]

Address = tuple[str, int]

_MAX_OUTSTANDING_NONCES = 64
_MAX_TRACKED_ADDRESSES = 64  # unvalidated addresses whose byte counts we keep
_MAX_RATE_SOURCES = 64  # sources whose token buckets we keep (least recently used go first)


@dataclass
class Candidate:
    """One peer address being checked."""

    address: Address
    """Where probes go."""

    kind: str
    """``"given"`` (from the rendezvous), ``"prflx"`` (learnt from a probe's source),
    ``"birthday"`` (a random port of the peer's announced IP, :mod:`p2plab.core.birthday`) or
    ``"relay"`` (the peer's TURN relayed address, trickled after the offer)."""

    next_probe_at: float
    """When the next probe to this address is due (``inf`` when not probing)."""

    interval: float
    """Current retry interval (grows by ``probe_backoff`` up to ``probe_max_interval``)."""

    probes_sent: int = 0
    """Probes sent to this address."""

    succeeded: bool = False
    """A PROBE_ACK echoing our nonce came back from this address."""

    rtt: float | None = None
    """Round-trip time of the first successful probe."""

    budget: int | None = None
    """Scheduled probes left before this address is given up (None: no limit of its own)."""


@dataclass
class _Sent:
    address: Address
    sent_at: float
    nominate: bool


@dataclass
class Checklist:
    """The peer addresses we probe, when, and which probes are still unanswered."""

    config: SessionConfig
    """Probe timing settings."""

    candidates: dict[Address, Candidate] = field(default_factory=dict)
    """All candidates, in the order they were learnt."""

    dropped: int = 0
    """Candidates refused: beyond ``max_candidates`` given, or ``max_prflx_candidates`` learnt."""

    budget_left: int = 0
    """Probes this punching attempt may still send (``probe_budget`` at the start)."""

    birthday: dict[Address, Candidate] = field(default_factory=dict)
    """Birthday candidates probed once and not heard from: kept apart from :attr:`candidates`
    so that a thousand of them cost nothing in :meth:`due` and :meth:`next_deadline` (they have
    nothing scheduled); one that the peer answers or probes moves into :attr:`candidates`."""

    _sent: dict[bytes, _Sent] = field(default_factory=dict)

    @classmethod
    def start(cls, addresses: list[Address], config: SessionConfig, now: float) -> Checklist:
        """A checklist probing the first ``max_candidates`` of ``addresses`` in order, paced
        ``probe_pacing`` apart (the rest are dropped and counted in :attr:`dropped`).

        Happy eyeballs (issue 19): when any of them is IPv6, the IPv4 ones start
        :data:`~p2plab.core.paths.HAPPY_EYEBALLS_DELAY` later (paced among themselves), so a
        working IPv6 pair usually validates first and a broken one delays IPv4 by that much only.
        """
        checklist = cls(config, budget_left=config.probe_budget)
        kept: list[Address] = []
        for address in addresses:
            if address in kept:
                continue
            if len(kept) >= config.max_candidates:
                checklist.dropped += 1
                continue
            kept.append(address)
        has_v6 = any(address_family(a) == "ipv6" for a in kept)
        paced = {False: 0, True: 0}  # how many started so far, per wave (waits or not)
        for address in kept:
            waits = has_v6 and address_family(address) != "ipv6"
            delay = HAPPY_EYEBALLS_DELAY if waits else 0.0
            checklist.candidates[address] = Candidate(
                address=address,
                kind="given",
                next_probe_at=now + delay + paced[waits] * config.probe_pacing,
                interval=config.probe_interval,
                budget=config.probes_per_candidate,
            )
            paced[waits] += 1
        return checklist

    def get(self, address: Address) -> Candidate | None:
        """The candidate at ``address`` (birthday ones included), or None."""
        cand = self.candidates.get(address)
        return cand if cand is not None else self.birthday.get(address)

    def _promote(self, address: Address) -> Candidate | None:
        """Move a birthday candidate into :attr:`candidates` (it is being probed again)."""
        cand = self.birthday.pop(address, None)
        if cand is not None:
            self.candidates[address] = cand
        return cand

    def add_birthday(self, address: Address) -> Candidate | None:
        """A birthday candidate at ``address`` for one probe, sent by the caller at once (see
        :meth:`record_probe`); None if the address is known already (it is probed anyway).

        Birthday probes are paced and capped by :class:`~p2plab.core.birthday.RandomPortProber`,
        not by :attr:`budget_left` nor ``max_prflx_candidates``."""
        if address in self.candidates or address in self.birthday:
            return None
        cand = Candidate(address, "birthday", float("inf"), self.config.probe_interval, budget=1)
        self.birthday[address] = cand
        return cand

    def add_relay(self, address: Address, now: float) -> Candidate:
        """The peer's TURN relayed address, probed from now on like the offer's candidates
        (``probes_per_candidate``, outside :attr:`budget_left`: the engine takes at most
        ``MAX_TRICKLED_CANDIDATES`` of them, and they are the last way through when the
        attempt's budget went to addresses that never answered)."""
        self._promote(address)
        cand = self.candidates.get(address)
        if cand is None:
            cand = Candidate(
                address,
                "relay",
                now,
                self.config.probe_interval,
                budget=self.config.probes_per_candidate,
            )
            self.candidates[address] = cand
        cand.kind = "relay"
        cand.next_probe_at = min(cand.next_probe_at, now)
        return cand

    def add_dormant(self, address: Address) -> bool:
        """Know ``address`` as one of the offer's candidates without probing it (a relayed
        session's upgrade rounds probe it later); False if known or ``max_candidates`` are."""
        if self.get(address) is not None or len(self.candidates) >= self.config.max_candidates:
            return False
        self.candidates[address] = Candidate(
            address, "given", float("inf"), self.config.probe_interval, budget=0
        )
        return True

    def add(self, address: Address, kind: str, now: float) -> tuple[Candidate | None, bool]:
        """Learn ``address`` (if new) and schedule a triggered probe to it now.

        Returns the candidate and whether it was new; ``(None, False)`` when it is new but
        ``max_prflx_candidates`` were learnt already (counted in :attr:`dropped`).
        """
        self._promote(address)
        cand = self.candidates.get(address)
        if cand is None:
            learnt = sum(1 for c in self.candidates.values() if c.kind == "prflx")
            if kind == "prflx" and learnt >= self.config.max_prflx_candidates:
                self.dropped += 1
                return None, False
            cand = Candidate(
                address=address,
                kind=kind,
                next_probe_at=now,
                interval=self.config.probe_interval,
                budget=self.config.probes_per_candidate,
            )
            self.candidates[address] = cand
            return cand, True
        self.trigger(address, now)
        return cand, False

    def trigger(self, address: Address, now: float) -> None:
        """Probe ``address`` now (a triggered check) unless it already succeeded.

        Past the address's own budget this still sends one probe per trigger: a trigger answers
        a probe of the peer, so it is one for one with what the peer sent, and the attempt's
        :attr:`budget_left` bounds it (see :meth:`take_budget`).
        """
        cand = self.candidates.get(address) or self._promote(address)
        if cand is not None and not cand.succeeded:
            cand.next_probe_at = min(cand.next_probe_at, now)

    def take_budget(self, cand: Candidate) -> bool:
        """Spend one probe of the attempt's budget on ``cand``; False (and ``cand`` stops) when
        the budget is spent.  Only punching spends it: once connected, probes go to a validated
        address or fall under the :class:`AmplificationLimit`.  A birthday candidate (probed
        again: a trigger answering the peer's probe one for one) is outside the budget."""
        if cand.kind in ("birthday", "relay"):
            return True
        if self.budget_left <= 0:
            cand.next_probe_at = float("inf")
            return False
        self.budget_left -= 1
        return True

    def due(self, now: float) -> list[Candidate]:
        """Candidates whose next probe is due."""
        return [c for c in self.candidates.values() if c.next_probe_at <= now]

    def record_probe(self, cand: Candidate, nonce: bytes, now: float, nominate: bool) -> None:
        """Note that a probe with ``nonce`` went to ``cand`` and schedule the retry."""
        cand.probes_sent += 1
        cand.next_probe_at = now + cand.interval
        if cand.budget is not None:
            cand.budget -= 1
            if cand.budget <= 0:
                cand.next_probe_at = float("inf")
        cand.interval = min(
            cand.interval * self.config.probe_backoff, self.config.probe_max_interval
        )
        self._sent[nonce] = _Sent(cand.address, now, nominate)
        # Room for a birthday candidate's one nonce each, not 64: a thousand of them would
        # otherwise let 64,000 nonces pile up.
        cap = _MAX_OUTSTANDING_NONCES * max(1, len(self.candidates)) + len(self.birthday)
        while len(self._sent) > cap:
            del self._sent[next(iter(self._sent))]

    def match_ack(
        self, nonce: bytes, source: Address, now: float
    ) -> tuple[Candidate, float, bool] | None:
        """Match a PROBE_ACK: returns ``(candidate, rtt, nominate)`` or None if it is not ours.

        An ack coming from another address than the probe went to does not validate anything
        (RFC 8445 section 7.2.5.2.1); the caller may still learn the source as a candidate.
        """
        sent = self._sent.get(nonce)
        if sent is None or sent.address != source:
            return None
        del self._sent[nonce]
        cand = self._promote(sent.address) or self.candidates[sent.address]
        rtt = max(0.0, now - sent.sent_at)
        if not cand.succeeded:
            cand.succeeded = True
            cand.rtt = rtt
        return cand, rtt, sent.nominate

    def stop_all(self) -> None:
        """Stop probing every candidate (the link is up, or we gave up)."""
        for cand in self.candidates.values():
            cand.next_probe_at = float("inf")

    def restart(self, address: Address, now: float, budget: int | None = None) -> Candidate:
        """(Re)start probing one address from the initial interval, at most ``budget`` times.

        Used once the link is up: for nomination and to check a new address of the peer.
        """
        self._promote(address)
        cand = self.candidates.get(address)
        if cand is None:
            # Not add(): a path check once connected follows an authenticated datagram and is
            # bounded by the AmplificationLimit, not by the punching cap on learnt addresses.
            cand = Candidate(address, "prflx", now, self.config.probe_interval)
            self.candidates[address] = cand
        cand.interval = self.config.probe_interval
        cand.next_probe_at = now
        cand.budget = budget
        return cand

    def stop(self, address: Address) -> None:
        """Stop probing one address."""
        cand = self.get(address)
        if cand is not None:
            cand.next_probe_at = float("inf")

    def next_deadline(self) -> float | None:
        """The earliest due probe, or None."""
        when = min((c.next_probe_at for c in self.candidates.values()), default=float("inf"))
        return None if when == float("inf") else when

    def given(self, address: Address) -> bool:
        """Whether ``address`` is one of the offer's own candidates (not one learnt since), a
        birthday candidate (a port of the peer's announced IP, within the birthday budget) or
        the peer's relayed address (trickled through the rendezvous)."""
        cand = self.get(address)
        return cand is not None and cand.kind in ("given", "birthday", "relay")

    def succeeded(self) -> list[Candidate]:
        """Candidates that passed a round trip, in the order they were learnt."""
        return [c for c in self.candidates.values() if c.succeeded]


@dataclass
class _PathBytes:
    received: int = 0
    sent: int = 0


@dataclass
class AmplificationLimit:
    """At most ``factor`` times what came from an address may go back to it until it is validated.

    QUIC's rule (RFC 9000 section 8.1).  An address is *validated* by a round trip: a PROBE_ACK
    echoing one of our random nonces came back from it, so the peer really receives there.
    Until then the bytes sent there are capped at ``factor`` times the bytes of authenticated
    datagrams received from it; a captured datagram replayed first from a spoofed source (finding
    17) buys that much and no more.  Only a bounded number of unvalidated addresses is tracked;
    forgetting one forgets its credit too, so eviction never lets more out.
    """

    factor: int
    """The multiple (3 in QUIC and by default)."""

    validated: set[Address] = field(default_factory=set)
    """Addresses that passed a round trip: no limit."""

    _paths: dict[Address, _PathBytes] = field(default_factory=dict)

    def validate(self, address: Address) -> None:
        """``address`` passed a round trip."""
        self.validated.add(address)
        self._paths.pop(address, None)

    def received(self, address: Address, size: int) -> None:
        """An authenticated datagram of ``size`` bytes came from ``address``."""
        if address in self.validated:
            return
        path = self._paths.get(address)
        if path is None:
            path = self._paths[address] = _PathBytes()
            while len(self._paths) > _MAX_TRACKED_ADDRESSES:
                del self._paths[next(iter(self._paths))]
        path.received += size

    def allow(self, address: Address, size: int) -> bool:
        """Whether ``size`` more bytes may go to ``address`` now (if so, they are counted)."""
        if address in self.validated:
            return True
        path = self._paths.get(address)
        if path is None or path.sent + size > self.factor * path.received:
            return False
        path.sent += size
        return True


class SourceRateLimit(RateLimiter):
    """A token bucket per source host: at most ``burst`` at once, then ``rate`` per second.

    Keyed by the source's host, not its port: a port costs an attacker nothing.  Only
    ``_MAX_RATE_SOURCES`` buckets are kept (:class:`~p2plab.core.ratelimit.RateLimiter`).
    """

    def __init__(self, rate: float, burst: int) -> None:
        super().__init__(rate, burst, _MAX_RATE_SOURCES)
