"""Candidate addresses and the probe schedule of hole punching (sans-I/O).

A much reduced ICE (RFC 8445): one local socket, so a "pair" is just a peer address.  Every
candidate the rendezvous gave us (the peer's public endpoint and its LAN addresses) is probed with
paced, backed-off retries.  A probe arriving from an address we did not know adds that address as a
peer-reflexive candidate (RFC 8445 section 7.3.1.3) and triggers an immediate probe to it
(section 7.3.1.4): behind a symmetric NAT that is the only address that works.  A candidate
*succeeds* only when a PROBE_ACK echoing one of our nonces comes back from the very address the
probe went to (the symmetric-path rule of section 7.2.5.2.1).

:class:`Checklist` only keeps state and answers "whom to probe now"; the session builds and sends
the datagrams and decides about nomination.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2plab.config import SessionConfig

__all__ = ["Address", "Candidate", "Checklist"]

Address = tuple[str, int]

_MAX_OUTSTANDING_NONCES = 64


@dataclass
class Candidate:
    """One peer address being checked."""

    address: Address
    """Where probes go."""

    kind: str
    """``"given"`` (from the rendezvous) or ``"prflx"`` (learnt from a probe's source)."""

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
    """Probes left before this address is given up (None: until the punch timeout)."""


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

    _sent: dict[bytes, _Sent] = field(default_factory=dict)

    @classmethod
    def start(cls, addresses: list[Address], config: SessionConfig, now: float) -> Checklist:
        """A checklist probing ``addresses`` in order, paced ``probe_pacing`` apart."""
        checklist = cls(config)
        for i, address in enumerate(addresses):
            if address not in checklist.candidates:
                checklist.candidates[address] = Candidate(
                    address=address,
                    kind="given",
                    next_probe_at=now + i * config.probe_pacing,
                    interval=config.probe_interval,
                )
        return checklist

    def add(self, address: Address, kind: str, now: float) -> tuple[Candidate, bool]:
        """Learn ``address`` (if new) and schedule a triggered probe to it now.

        Returns the candidate and whether it was new.
        """
        cand = self.candidates.get(address)
        if cand is None:
            cand = Candidate(
                address=address, kind=kind, next_probe_at=now, interval=self.config.probe_interval
            )
            self.candidates[address] = cand
            return cand, True
        self.trigger(address, now)
        return cand, False

    def trigger(self, address: Address, now: float) -> None:
        """Probe ``address`` now (a triggered check) unless it already succeeded."""
        cand = self.candidates.get(address)
        if cand is not None and not cand.succeeded:
            cand.next_probe_at = min(cand.next_probe_at, now)

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
        while len(self._sent) > _MAX_OUTSTANDING_NONCES * max(1, len(self.candidates)):
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
        cand = self.candidates[sent.address]
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
        cand = self.candidates.get(address)
        if cand is None:
            cand, _ = self.add(address, "prflx", now)
        cand.interval = self.config.probe_interval
        cand.next_probe_at = now
        cand.budget = budget
        return cand

    def stop(self, address: Address) -> None:
        """Stop probing one address."""
        cand = self.candidates.get(address)
        if cand is not None:
            cand.next_probe_at = float("inf")

    def next_deadline(self) -> float | None:
        """The earliest due probe, or None."""
        when = min((c.next_probe_at for c in self.candidates.values()), default=float("inf"))
        return None if when == float("inf") else when

    def succeeded(self) -> list[Candidate]:
        """Candidates that passed a round trip, in the order they were learnt."""
        return [c for c in self.candidates.values() if c.succeeded]
