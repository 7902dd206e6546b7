"""Birthday-paradox punching for hard NATs: who probes, who sprays, when, and the odds (issue 16).

A NAT that maps per destination ("hard") gives every new destination a new random port, so the
peer cannot know where to send.  With one side easy (endpoint-independent mapping), the hard
side opens ``k`` sockets and sends from each towards the easy side's endpoint ("spray"): k
mappings out of ``P`` ports are open.  The easy side sends ``n`` probes to random ports of the
hard side's public IP ("probe"); each one that lands on an open mapping gets in, and the easy
NAT, which mapped the probe's socket once for everyone, lets the answer back.  One probe hits
with probability k/P, so n probes hit at least once with ``1 - (1 - k/P)**n``
(:func:`birthday_success`: k = 256, P = 65536, n = 1024 -> 98.3%).

Two hard sides must both guess: n probes per side over P ports meet with ``1 - exp(-n*n/P**2)``
(:func:`hard_pair_success`), 0.03% for 1024 each, so that pair goes to the relay unless the
user sets a budget (``BirthdayConfig.hard_budget``).

:func:`plan_traversal` is the design's table (both engines compute it from their own hint and
the offer's ``peer_nat``, so they agree without a message); :class:`RandomPortProber` is the
probe side's schedule and :class:`SpraySchedule` the spray side's.  Pure: the ports come from an
injected ``rand_bytes``, the clock from ``now`` arguments.

Security: the prober only ever yields addresses on the one IP it was built with (the offer's
``peer_udp_ip``), at most ``budget`` of them, never two at the same port, and never more than
``floor(elapsed * rate) + 1`` by any time; the peer's hint only reorders (predicted ports first,
at most :data:`~p2plab.core.signaling.MAX_PREDICTED_PORTS` of them, inside the budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from p2plab.config import BirthdayConfig
from p2plab.core.signaling import MAX_PREDICTED_PORTS, NatHint

__all__ = [
    "Plan",
    "RandomPortProber",
    "Role",
    "SpraySchedule",
    "birthday_success",
    "hard_pair_success",
    "nat_kind",
    "plan_traversal",
    "port_count",
    "spray_times",
]

Address = tuple[str, int]
Role = Literal["plain", "probe", "spray", "hard-relay", "hard-try"]

# A rejection-sampling draw is retried at most this often before a (negligibly) biased modulo is
# accepted: a broken rand_bytes must not hang the engine.
_MAX_REJECTIONS = 64


def port_count(config: BirthdayConfig) -> int:
    """P: how many ports ``config.port_range`` holds (both ends included)."""
    low, high = config.port_range
    return high - low + 1


def birthday_success(k: int, n: int, port_count: int) -> float:
    """Chance that ``n`` random probes (no repeats ignored) hit one of ``k`` open mappings among
    ``port_count`` ports: ``1 - (1 - k/P)**n``."""
    if port_count <= 0 or k <= 0 or n <= 0:
        return 0.0
    miss = max(0.0, 1.0 - min(k, port_count) / port_count)
    return 1.0 - miss**n


def hard_pair_success(n: int, port_count: int) -> float:
    """Chance that two hard sides sending ``n`` random probes each over ``port_count`` ports
    meet (a probe of one lands on a mapping the other opened): ``1 - exp(-n*n / P**2)``."""
    if port_count <= 0 or n <= 0:
        return 0.0
    return 1.0 - math.exp(-(n * n) / (port_count * port_count))


@dataclass(frozen=True)
class Plan:
    """How this side punches with its peer (:func:`plan_traversal`)."""

    role: Role
    """``plain`` (today's punching only), ``probe`` (probe random ports of the peer's IP),
    ``spray`` (open the socket pool and send from every socket), ``hard-relay`` (both hard, no
    budget: relay at once) or ``hard-try`` (both hard, probe from the pool up to hard_budget)."""

    spray_delay: float = 0.0
    """Seconds to wait before the first spray (the leaky prober's whole probe window)."""

    reason: str | None = None
    """The sentence shown to the user (hard-relay, hard-try), else None."""

    expected: float | None = None
    """Expected success of the birthday part with the local budget, None for plain."""

    punch_extension: float = 0.0
    """Seconds added to the session's punch deadline so that the whole window fits (the probe
    window, plus the sprayer's delay when the prober is leaky)."""


def nat_kind(hint: NatHint | None) -> Literal["easy", "leaky", "hard", "unknown"]:
    """The design's classification of one side's hint."""
    if hint is None:
        return "unknown"
    if hint.mapping == "endpoint-dependent":
        return "hard"
    if hint.mapping == "endpoint-independent":
        return "leaky" if hint.remaps_on_clash else "easy"
    return "unknown"


def _pct(p: float) -> str:
    return f"{100.0 * p:.2f}%"


def plan_traversal(own: NatHint | None, peer: NatHint | None, config: BirthdayConfig) -> Plan:
    """The design's table (``docs/protocol.md``, "Hard NATs"): my role from both hints.

    Both sides apply it to the same two hints, mirrored, so one probes while the other sprays.
    """
    me, other = nat_kind(own), nat_kind(peer)
    if not config.enabled or "unknown" in (me, other):
        return Plan("plain")
    ports = port_count(config)
    one_sided = birthday_success(config.sockets, config.probe_budget, ports)
    window = config.probe_budget / config.probe_rate
    if me == "easy":
        if other == "easy":
            return Plan("plain")
        # A leaky peer sprays at once too (only a leaky *prober* needs the sprayer to wait).
        return Plan("probe", expected=one_sided, punch_extension=window)
    if other == "easy":
        return Plan("spray", expected=one_sided, punch_extension=window)
    if me == "leaky" and other == "hard":
        # The hard peer sprays only after my window: my probes must have left first.
        return Plan("probe", expected=one_sided, punch_extension=2 * window)
    if me == "hard" and other == "leaky":
        # The leaky prober's NAT must see its own probes leave before any spray reaches it.
        return Plan("spray", spray_delay=window, expected=one_sided, punch_extension=2 * window)
    # Both hard (leaky x leaky counts too: neither keeps one port for everyone).
    if config.hard_budget > 0:
        p = hard_pair_success(config.hard_budget, ports)
        reason = (
            f"both NATs map per destination: trying {config.hard_budget} probes per side "
            f"(expected success {_pct(p)})"
        )
        extension = config.hard_budget / config.probe_rate
        return Plan("hard-try", reason=reason, expected=p, punch_extension=extension)
    p = hard_pair_success(config.probe_budget, ports)
    reason = (
        "both NATs map per destination: expected success with the default budget "
        f"({config.probe_budget} probes per side) is {_pct(p)}; relaying "
        "(set --hard-nat-budget N to try)"
    )
    return Plan("hard-relay", reason=reason, expected=p)


def _uniform(rand_bytes: Callable[[int], bytes], m: int) -> int:
    """A uniform integer in [0, m) from 4-byte draws (rejection sampling, m <= 2**32)."""
    limit = (1 << 32) - (1 << 32) % m
    u = 0
    for _ in range(_MAX_REJECTIONS):
        u = int.from_bytes(rand_bytes(4), "big")
        if u < limit:
            break
    return u % m


class RandomPortProber:
    """Which address the probe side probes next, and when.

    Predicted ports first (valid ones, at most 16, no repeats), then ports drawn uniformly from
    ``config.port_range`` without replacement (a lazy Fisher-Yates shuffle: O(1) per draw and
    memory only for the ports drawn).  Probe ``j`` (0-based) is due at ``start + j / rate``, so
    by any time ``t`` at most ``floor((t - start) * rate) + 1`` are out; never more than
    ``budget`` (``config.probe_budget`` unless given, e.g. ``hard_budget``), never more than
    the ports there are.  Every address is on ``ip``.
    """

    def __init__(
        self,
        ip: str,
        config: BirthdayConfig,
        rand_bytes: Callable[[int], bytes],
        start: float,
        predicted: Iterable[int] = (),
        *,
        budget: int | None = None,
    ) -> None:
        self.ip = ip
        """The only IP probed (the offer's ``peer_udp_ip``)."""
        self._rate = config.probe_rate
        self._low, high = config.port_range
        self._range = high - self._low + 1
        self._rand_bytes = rand_bytes
        self._start = start
        self._predicted: list[int] = []
        for port in predicted:
            if len(self._predicted) >= MAX_PREDICTED_PORTS:
                break
            if isinstance(port, int) and 1 <= port <= 65535 and port not in self._predicted:
                self._predicted.append(port)
        in_range = sum(1 for p in self._predicted if self._low <= p <= high)
        limit = config.probe_budget if budget is None else budget
        self._budget = max(0, min(limit, len(self._predicted) + self._range - in_range))
        self._drawn = 0  # positions of the lazy shuffle used so far
        self._swaps: dict[int, int] = {}
        self.sent = 0
        """Probes handed out so far."""
        self.predicted_sent: set[Address] = set()
        """The predicted addresses handed out (to tell a predicted win from a random one)."""

    @property
    def budget_left(self) -> int:
        """Probes this prober may still hand out."""
        return self._budget - self.sent

    def _due_at(self, index: int) -> float:
        return self._start + index / self._rate

    def next_deadline(self) -> float | None:
        """When the next probe is due, None once the budget is spent."""
        if self.sent >= self._budget:
            return None
        return self._due_at(self.sent)

    def _next_random_port(self) -> int:
        while True:
            i = self._drawn
            j = i + _uniform(self._rand_bytes, self._range - i)
            value = self._swaps.get(j, j)
            self._swaps[j] = self._swaps.pop(i, i)
            self._drawn += 1
            port = self._low + value
            if port not in self._predicted:  # sent already, first
                return port

    def due(self, now: float) -> list[Address]:
        """The addresses to probe now (empty when none is due)."""
        out: list[Address] = []
        while self.sent < self._budget and now >= self._due_at(self.sent):
            if self.sent < len(self._predicted):
                addr = (self.ip, self._predicted[self.sent])
                self.predicted_sent.add(addr)
            else:
                addr = (self.ip, self._next_random_port())
            self.sent += 1
            out.append(addr)
        return out


class SpraySchedule:
    """When the spray side sends one probe from every pool socket: at ``start + delay``, then
    every ``interval``.  A late caller gets one round, not a burst of the missed ones."""

    def __init__(self, start: float, delay: float, interval: float) -> None:
        self._first = start + max(0.0, delay)
        self._interval = interval
        self._next = self._first
        self.rounds = 0
        """Rounds sprayed so far."""

    def next_deadline(self) -> float:
        """When the next round is due."""
        return self._next

    def due(self, now: float) -> bool:
        """Whether a round is due now (and, if so, count it and schedule the next one)."""
        if now < self._next:
            return False
        self.rounds += 1
        missed = math.floor((now - self._next) / self._interval)
        self._next += (missed + 1) * self._interval
        return True


def spray_times(start: float, delay: float, interval: float, until: float) -> list[float]:
    """The times of the spray rounds in ``[start, until)`` for a caller that is never late."""
    schedule = SpraySchedule(start, delay, interval)
    times: list[float] = []
    while schedule.next_deadline() < until:
        t = schedule.next_deadline()
        schedule.due(t)
        times.append(t)
    return times
