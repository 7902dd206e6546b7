"""RFC 5780 section 4 NAT behaviour discovery as sans-I/O transactions: one procedure for all.

:class:`Rfc5780Discovery` decides which Binding requests to make (to which address, with which
CHANGE-REQUEST flags), takes each transaction's outcome, and ends in a :class:`DiscoveryResult`
(the :class:`~p2plab.core.nat.BehaviorTests` and everything a
:class:`~p2plab.core.nat.NatReport` needs).  Its drivers supply only the transport:
:meth:`p2plab.aio.stun.StunProbe.nat_report` on a real socket, the simulator's
:meth:`p2plab.lab.sim.Simulation.probe` on a simulated one::

    discovery = Rfc5780Discovery(servers, local_towards=local_address_towards)
    while not discovery.done:
        tests = discovery.next_tests()                 # one phase, to run in parallel
        for test in tests:                             # ... start a StunTransaction each, wait
            discovery.receive(test, outcome_from_transaction(test.server, target, tx, source))
    report = discovery.result().report()

The ordering (one, for every driver), in three phases whose tests run in parallel:

1. **first**: test I (plain Binding) to every configured server.  The behaviour tests then use
   the first server whose OTHER-ADDRESS differs from it in both IP and port.
2. **filtering** (section 4.4): test II (change IP and port) and test III (change port), plus
   the hairpin test (section 4.5: a request to our own mapped address) when behind a NAT.
3. **mapping** (section 4.3), only behind a NAT: test II to (alternate IP, primary port) and
   test III to (alternate IP, alternate port), both always.

Why this order: the mapping tests send to the server's alternate IP, which opens the very
pinholes the filtering tests look for on NATs that filter per remote IP host-wide (the kernel
lab's "restricted" recipe); so filtering comes first, before anything was sent to the alternate
IP (a driver that also runs the RFC 3489 sequence, whose own test II needs the alternate IP
unseen too, runs it when :attr:`Rfc5780Discovery.phase` reaches MAPPING).  On the same socket,
which is also what makes a leaky NAT show its remapping: the filtering tests' unsolicited answers
leave conntrack entries behind, and mapping test III then leaves by another port.  The tests of
one phase do not influence each other's outcome, so they run in parallel: a phase costs one
round trip (or one timeout) instead of two, and in the simulator's virtual time nothing at all.
Mapping test III runs even when test II already shows endpoint-independent mapping, for the
same reason (its answer is then simply not needed by the classification).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from p2plab.core.nat import (
    BehaviorTests,
    NatReport,
    ServerAnswer,
    classic_from_behavior,
    classic_name,
    derive_behavior,
)
from p2plab.core.stun import Address, StunTransaction, TransactionState
from p2plab.errors import LocalProtocolError

__all__ = [
    "BindingOutcome",
    "BindingTest",
    "DiscoveryPhase",
    "DiscoveryResult",
    "Rfc5780Discovery",
    "outcome_from_transaction",
]


class DiscoveryPhase(enum.Enum):
    """Where :class:`Rfc5780Discovery` is."""

    FIRST = "first"
    FILTERING = "filtering"
    MAPPING = "mapping"
    DONE = "done"


@dataclass(frozen=True)
class BindingTest:
    """One Binding request the procedure wants made."""

    name: str
    """Which test: ``"I"``, ``"filtering II"``, ``"filtering III"``, ``"hairpin"``,
    ``"mapping II"`` or ``"mapping III"`` (for logs and notes)."""
    server: Address
    """The server as configured (reported in :class:`ServerAnswer`)."""
    target: Address | None
    """Where to send the request; None: to ``server`` itself (the driver resolves its name)."""
    change_ip: bool = False
    """CHANGE-REQUEST "change IP"."""
    change_port: bool = False
    """CHANGE-REQUEST "change port"."""
    expect_echo: bool = False
    """The request may come back to us unanswered (hairpin test): that counts as success."""


@dataclass(frozen=True)
class BindingOutcome:
    """What one :class:`BindingTest` gave."""

    answer: ServerAnswer
    """The server's answer (``ok`` False on timeout, error response or resolution failure)."""
    source: Address | None = None
    """Where the answer (or the echoed request) came from, when the driver knows."""
    refused: bool = False
    """The server sent an error response (e.g. 420 to a CHANGE-REQUEST it cannot honour)."""


def outcome_from_transaction(
    server: Address, resolved: Address, tx: StunTransaction, source: Address | None = None
) -> BindingOutcome:
    """The outcome of a finished (or cancelled) Binding transaction sent to ``resolved``."""
    if tx.state is TransactionState.SUCCEEDED and tx.response is not None:
        attrs = tx.response.attributes
        mapped = attrs.get("XOR-MAPPED-ADDRESS") or attrs.get("MAPPED-ADDRESS")
        if mapped is None:
            answer = ServerAnswer(
                server,
                False,
                rtt_s=tx.rtt,
                attempts=tx.attempts,
                error="response without a mapped address",
                resolved=resolved,
            )
            return BindingOutcome(answer, source)
        other = attrs.get("OTHER-ADDRESS") or attrs.get("CHANGED-ADDRESS")
        software = attrs.get("SOFTWARE")
        answer = ServerAnswer(
            server,
            True,
            rtt_s=tx.rtt,
            mapped=(str(mapped[0]), int(mapped[1])),
            attempts=tx.attempts,
            other_address=None if other is None else (str(other[0]), int(other[1])),
            software=software if isinstance(software, str) else None,
            resolved=resolved,
        )
        return BindingOutcome(answer, source)
    if tx.state is TransactionState.FAILED:
        code, reason = tx.error or (0, "")
        answer = ServerAnswer(
            server,
            False,
            rtt_s=tx.rtt,
            attempts=tx.attempts,
            error=f"error response {code} {reason}".strip(),
            resolved=resolved,
        )
        return BindingOutcome(answer, source, refused=True)
    answer = ServerAnswer(
        server,
        False,
        attempts=tx.attempts,
        error=f"no answer after {tx.attempts} requests",
        resolved=resolved,
    )
    return BindingOutcome(answer)


@dataclass(frozen=True)
class DiscoveryResult:
    """Everything the procedure found out."""

    first: tuple[ServerAnswer, ...]
    """Every server's answer to test I, in configured order, failures included."""
    mapped: Address | None
    """Our mapped address (from the chosen server, else the first that answered); None when no
    server answered."""
    tests: BehaviorTests
    """The RFC 5780 test outcomes."""
    other_address: Address | None
    """The alternate address the behaviour tests used (None: no server had one)."""
    hairpin: bool | None
    """Whether our request to our own mapped address came back (None: not tested)."""
    notes: tuple[str, ...]
    """Anything the reader should know, in the order it happened."""

    def report(self, classic_raw: str | None = None) -> NatReport:
        """The :class:`NatReport` (with pystun3's words ``classic_raw`` when it ran)."""
        mapping, filtering, behind = derive_behavior(self.tests)
        return NatReport(
            mapped=self.mapped,
            local=self.tests.local,
            mapping=mapping,
            filtering=filtering,
            classic=classic_name(classic_raw),
            classic_raw=classic_raw,
            classic_rfc5780=classic_from_behavior(mapping, filtering, behind),
            behind_nat=behind,
            servers=self.first,
            other_address=self.other_address,
            hairpin=self.hairpin,
            notes=self.notes,
        )


class Rfc5780Discovery:
    """The RFC 5780 discovery procedure for one socket (see the module docstring for the order).

    ``servers``: the configured STUN servers (at least one).  ``local_towards(target)``: our
    socket's real source address towards ``target`` (not 0.0.0.0), asked once, after test I, to
    tell whether we are behind a NAT.  ``hairpin``: run the hairpin test.
    """

    def __init__(
        self,
        servers: Sequence[Address],
        *,
        local_towards: Callable[[Address], Address],
        hairpin: bool = True,
    ) -> None:
        if not servers:
            raise LocalProtocolError("RFC 5780 discovery needs at least one STUN server")
        self.servers = tuple(servers)
        self.hairpin = hairpin
        self.phase = DiscoveryPhase.FIRST
        self._local_towards = local_towards
        self._notes: list[str] = []
        self._tests = [BindingTest("I", server, None) for server in self.servers]
        self._handed_out = False
        self._outcomes: dict[int, BindingOutcome] = {}
        self._first: tuple[ServerAnswer, ...] = ()
        self._base: ServerAnswer | None = None  # the answer the behaviour tests build on
        self._chosen: ServerAnswer | None = None  # the same, when it has a usable OTHER-ADDRESS
        self._local: Address | None = None
        self._filter2: bool | None = None
        self._filter3: bool | None = None
        self._hairpin_result: bool | None = None
        self._mapped2: Address | None = None
        self._mapped3: Address | None = None

    @property
    def done(self) -> bool:
        return self.phase is DiscoveryPhase.DONE

    @property
    def primary(self) -> Address | None:
        """Known after the first phase: the server address the behaviour tests use."""
        return None if self._base is None else (self._base.resolved or self._base.server)

    @property
    def local(self) -> Address | None:
        """Known after the first phase: our source address towards :attr:`primary`."""
        return self._local

    @property
    def behind_nat(self) -> bool | None:
        """Known after the first phase: whether test I's mapped address differs from ours."""
        if self._base is None or self._local is None:
            return None
        return self._base.mapped != self._local

    def note(self, text: str) -> None:
        """Add a note of the driver's (e.g. about the RFC 3489 test) to the result, in order."""
        self._notes.append(text)

    def next_tests(self) -> list[BindingTest]:
        """The current phase's tests, each handed out once; run them in parallel and give every
        outcome to :meth:`receive`.  Empty while outcomes are awaited and when done."""
        if self._handed_out or self.done:
            return []
        self._handed_out = True
        return list(self._tests)

    def receive(self, test: BindingTest, outcome: BindingOutcome) -> None:
        """The outcome of a test from :meth:`next_tests`; the phase ends with its last one."""
        index = next(
            (i for i, asked in enumerate(self._tests) if asked == test and i not in self._outcomes),
            None,
        )
        if not self._handed_out or index is None:
            raise LocalProtocolError(f"RFC 5780 discovery did not ask for {test!r} now")
        self._outcomes[index] = outcome
        if len(self._outcomes) < len(self._tests):
            return
        outcomes = [self._outcomes[i] for i in range(len(self._tests))]
        self._outcomes = {}
        self._handed_out = False
        self._tests = []
        if self.phase is DiscoveryPhase.FIRST:
            self._after_first(outcomes)
        elif self.phase is DiscoveryPhase.FILTERING:
            self._after_filtering(outcomes)
        else:
            self._after_mapping(outcomes)

    def result(self) -> DiscoveryResult:
        """What was found; call when :attr:`done`."""
        if not self.done:
            raise LocalProtocolError(f"RFC 5780 discovery is not done (phase {self.phase.value})")
        base = self._base
        return DiscoveryResult(
            first=self._first,
            mapped=None if base is None else base.mapped,
            tests=BehaviorTests(
                local=self._local,
                mapped1=None if base is None else base.mapped,
                mapped2=self._mapped2,
                mapped3=self._mapped3,
                filter2=self._filter2,
                filter3=self._filter3,
            ),
            other_address=None if self._chosen is None else self._chosen.other_address,
            hairpin=self._hairpin_result,
            notes=tuple(self._notes),
        )

    # -- phases -----------------------------------------------------------------------------------

    def _after_first(self, outcomes: list[BindingOutcome]) -> None:
        self._first = tuple(o.answer for o in outcomes)
        answered = [a for a in self._first if a.ok and a.mapped is not None]
        if not answered:
            self._notes.append("no STUN server answered")
            self._finish()
            return
        if len({a.mapped for a in answered}) > 1:
            self._notes.append("servers saw different mapped addresses (address-dependent mapping)")
        for answer in answered:
            other, resolved = answer.other_address, answer.resolved
            if other is not None and resolved is not None:
                if other[0] != resolved[0] and other[1] != resolved[1]:
                    self._chosen = answer
                    break
        base = self._base = self._chosen or answered[0]
        primary = base.resolved or base.server
        self._local = self._local_towards(primary)
        chosen = self._chosen
        if chosen is None or chosen.other_address is None:
            self._notes.append(
                "no server gave an OTHER-ADDRESS with a different IP and port: RFC 5780 "
                "behaviour tests need a server with two addresses (e.g. p2plab stun-server "
                "--alt-host IP --alt-port N)"
            )
            self._finish()
            return
        server = chosen.server
        self._tests = [
            BindingTest("filtering II", server, primary, change_ip=True, change_port=True),
            BindingTest("filtering III", server, primary, change_port=True),
        ]
        if self.hairpin and self.behind_nat and base.mapped is not None:
            self._tests.append(BindingTest("hairpin", server, base.mapped, expect_echo=True))
        self.phase = DiscoveryPhase.FILTERING

    def _after_filtering(self, outcomes: list[BindingOutcome]) -> None:
        chosen = self._chosen
        assert chosen is not None and chosen.other_address is not None
        primary = chosen.resolved or chosen.server
        alt_ip, alt_port = chosen.other_address
        self._filter2 = self._changed_ok(outcomes[0], (alt_ip, alt_port), "II")
        self._filter3 = self._changed_ok(outcomes[1], (primary[0], alt_port), "III")
        if len(outcomes) > 2:
            self._hairpin_result = outcomes[2].answer.ok
        if not self.behind_nat:
            self._finish()
            return
        self._tests = [
            BindingTest("mapping II", chosen.server, (alt_ip, primary[1])),
            BindingTest("mapping III", chosen.server, (alt_ip, alt_port)),
        ]
        self.phase = DiscoveryPhase.MAPPING

    def _after_mapping(self, outcomes: list[BindingOutcome]) -> None:
        m2, m3 = outcomes[0].answer, outcomes[1].answer
        self._mapped2, self._mapped3 = m2.mapped, m3.mapped
        if m2.mapped is None:
            self._notes.append(f"mapping test II failed: {m2.error}")
        if m3.mapped is None:
            self._notes.append(f"mapping test III failed: {m3.error}")
        self._finish()

    def _finish(self) -> None:
        self.phase = DiscoveryPhase.DONE
        if not self.hairpin:
            self._hairpin_result = None
        elif self.behind_nat is False:
            self._notes.append("no NAT: hairpinning not applicable")

    def _changed_ok(self, outcome: BindingOutcome, expected: Address, test: str) -> bool | None:
        """A filtering test's outcome; None when the server did not honour CHANGE-REQUEST."""
        answer = outcome.answer
        if outcome.refused:
            self._notes.append(
                f"filtering test {test}: server refused CHANGE-REQUEST ({answer.error})"
            )
            return None
        if not answer.ok:
            return False
        source = outcome.source
        if source is not None and source != expected:
            self._notes.append(
                f"filtering test {test}: answer came from {source[0]}:{source[1]}, not "
                f"{expected[0]}:{expected[1]}; server ignored CHANGE-REQUEST"
            )
            return None
        return True
