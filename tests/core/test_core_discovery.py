"""The RFC 5780 discovery procedure in memory: scripted Binding outcomes for every NAT type."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from p2plab.core.discovery import (
    BindingOutcome,
    BindingTest,
    DiscoveryPhase,
    Rfc5780Discovery,
)
from p2plab.core.nat import FilteringBehavior, MappingBehavior, ServerAnswer
from p2plab.errors import LocalProtocolError

Address = tuple[str, int]

PRIMARY = ("192.0.2.1", 3478)
OTHER = ("192.0.2.2", 3479)
LOCAL = ("10.0.0.2", 5000)
PUBLIC_IP = "198.51.100.1"

EI, AD, APD = (
    MappingBehavior.ENDPOINT_INDEPENDENT,
    MappingBehavior.ADDRESS_DEPENDENT,
    MappingBehavior.ADDRESS_AND_PORT_DEPENDENT,
)
F_EI, F_AD, F_APD = (
    FilteringBehavior.ENDPOINT_INDEPENDENT,
    FilteringBehavior.ADDRESS_DEPENDENT,
    FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT,
)


def _slot(addr: Address) -> tuple[int, int]:
    return (0 if addr[0] == PRIMARY[0] else 1, 0 if addr[1] == PRIMARY[1] else 1)


def _address(slot: tuple[int, int]) -> Address:
    return ((PRIMARY[0], OTHER[0])[slot[0]], (PRIMARY[1], OTHER[1])[slot[1]])


class ScriptedNet:
    """Answers each BindingTest as a two-address server seen through a NAT would.

    ``mapping``: "none" (no NAT), "ei", "ad" or "apd"; ``filtering``: "ei", "ad" or "apd" (an
    answer from an address we never sent to is dropped accordingly).  Knobs: ``other`` (the
    OTHER-ADDRESS the server gives, None for none), ``refuse_change`` (420 to CHANGE-REQUEST),
    ``ignore_change`` (answers from the arrival address), ``dead`` (servers that never answer),
    ``hairpins``.
    """

    def __init__(self, mapping: str = "ei", filtering: str = "ei") -> None:
        self.mapping, self.filtering = mapping, filtering
        self.other: Address | None = OTHER
        self.refuse_change = False
        self.ignore_change = False
        self.dead: set[Address] = set()
        self.hairpins = False
        self.sent_to: list[Address] = []

    def mapped(self, target: Address) -> Address:
        ip, port = _slot(target)
        offset = {"none": 0, "ei": 0, "ad": ip, "apd": ip * 2 + port}[self.mapping]
        return LOCAL if self.mapping == "none" else (PUBLIC_IP, 40000 + offset)

    def answer(self, test: BindingTest) -> BindingOutcome:
        target = test.target or test.server
        self.sent_to.append(target)
        if test.expect_echo:
            ok = self.hairpins
            return BindingOutcome(ServerAnswer(test.server, ok, resolved=target))
        if test.server in self.dead:
            return BindingOutcome(ServerAnswer(test.server, False, error="no answer"))
        changed = test.change_ip or test.change_port
        if changed and self.refuse_change:
            answer = ServerAnswer(test.server, False, error="error response 420 Unknown Attribute")
            return BindingOutcome(answer, target, refused=True)
        arrival = _slot(target)
        out = arrival
        if changed and not self.ignore_change:
            out = (arrival[0] ^ test.change_ip, arrival[1] ^ test.change_port)
        source = _address(out)
        if self.filtering == "apd":
            allowed = source in self.sent_to
        elif self.filtering == "ad":
            allowed = any(a[0] == source[0] for a in self.sent_to)
        else:
            allowed = True
        if not allowed:
            return BindingOutcome(ServerAnswer(test.server, False, error="no answer"))
        answer = ServerAnswer(
            test.server,
            True,
            mapped=self.mapped(target),
            other_address=self.other,
            resolved=target,
        )
        return BindingOutcome(answer, source)


def run(
    net: ScriptedNet,
    servers: tuple[Address, ...] = (PRIMARY,),
    *,
    hairpin: bool = False,
    between: Callable[[Rfc5780Discovery], None] | None = None,
) -> tuple[Rfc5780Discovery, list[tuple[DiscoveryPhase, list[BindingTest]]]]:
    discovery = Rfc5780Discovery(servers, local_towards=lambda _: LOCAL, hairpin=hairpin)
    phases: list[tuple[DiscoveryPhase, list[BindingTest]]] = []
    while not discovery.done:
        if between is not None:
            between(discovery)
        tests = discovery.next_tests()
        assert tests, "a phase that is not done hands out tests"
        assert discovery.next_tests() == []  # each test is handed out once
        phases.append((discovery.phase, tests))
        outcomes = [net.answer(t) for t in tests]  # "in parallel": all sent, then all answered
        for test, outcome in zip(tests, outcomes, strict=True):
            discovery.receive(test, outcome)
    return discovery, phases


@pytest.mark.parametrize(
    ("mapping", "filtering", "expected", "classic"),
    [
        ("ei", "ei", (EI, F_EI), "Full Cone"),
        ("ei", "ad", (EI, F_AD), "Restricted Cone"),
        ("ei", "apd", (EI, F_APD), "Port-Restricted Cone"),
        ("ad", "ad", (AD, F_AD), "Symmetric NAT"),
        ("ad", "apd", (AD, F_APD), "Symmetric NAT"),
        ("apd", "apd", (APD, F_APD), "Symmetric NAT"),
    ],
)
def test_every_nat_type_is_classified(
    mapping: str,
    filtering: str,
    expected: tuple[MappingBehavior, FilteringBehavior],
    classic: str,
) -> None:
    discovery, phases = run(ScriptedNet(mapping, filtering))
    report = discovery.result().report()
    assert (report.mapping, report.filtering) == expected
    assert report.behind_nat is True
    assert report.classic_rfc5780 == classic
    assert report.mapped == (PUBLIC_IP, 40000)
    assert report.other_address == OTHER
    assert [p for p, _ in phases] == [
        DiscoveryPhase.FIRST,
        DiscoveryPhase.FILTERING,
        DiscoveryPhase.MAPPING,
    ]
    assert report.notes == ()


def test_filtering_runs_before_anything_is_sent_to_the_alternate_ip() -> None:
    net = ScriptedNet("apd", "apd")
    _, phases = run(net)
    first, filtering, mapping = (tests for _, tests in phases)
    assert [t.name for t in first] == ["I"]
    assert {t.name for t in filtering} == {"filtering II", "filtering III"}
    assert all(t.target == PRIMARY for t in filtering)
    assert {(t.change_ip, t.change_port) for t in filtering} == {(True, True), (False, True)}
    # Mapping tests II and III both run (in parallel), to the alternate IP.
    assert [(t.name, t.target) for t in mapping] == [
        ("mapping II", (OTHER[0], PRIMARY[1])),
        ("mapping III", OTHER),
    ]


def test_open_internet_skips_mapping_tests_and_notes_hairpin() -> None:
    discovery, phases = run(ScriptedNet("none", "ei"), hairpin=True)
    result = discovery.result()
    report = result.report()
    assert report.behind_nat is False
    assert (report.mapping, report.filtering) == (EI, F_EI)
    assert report.classic_rfc5780 == "Open Internet"
    assert [p for p, _ in phases] == [DiscoveryPhase.FIRST, DiscoveryPhase.FILTERING]
    assert all(t.name != "hairpin" for _, tests in phases for t in tests)
    assert report.hairpin is None
    assert "no NAT: hairpinning not applicable" in report.notes


def test_firewall_without_nat_is_symmetric_udp_firewall() -> None:
    discovery, _ = run(ScriptedNet("none", "apd"))
    assert discovery.result().report().classic_rfc5780 == "Symmetric UDP Firewall"


@pytest.mark.parametrize("hairpins", [True, False])
def test_hairpin_runs_with_the_filtering_tests_behind_a_nat(hairpins: bool) -> None:
    net = ScriptedNet("ei", "ei")
    net.hairpins = hairpins
    discovery, phases = run(net, hairpin=True)
    filtering = phases[1][1]
    assert [t.target for t in filtering if t.expect_echo] == [(PUBLIC_IP, 40000)]
    assert discovery.result().hairpin is hairpins


def test_no_answer_ends_after_test_one() -> None:
    net = ScriptedNet()
    net.dead = {PRIMARY}
    discovery, phases = run(net, hairpin=True)
    result = discovery.result()
    assert len(phases) == 1
    assert result.mapped is None and result.tests.local is None
    report = result.report()
    assert report.mapping is MappingBehavior.UNKNOWN
    assert report.filtering is FilteringBehavior.UNKNOWN
    assert not report.servers[0].ok
    assert report.notes == ("no STUN server answered",)


def test_no_other_address_stops_after_test_one_with_a_note() -> None:
    net = ScriptedNet("ei", "apd")
    net.other = None
    discovery, phases = run(net)
    report = discovery.result().report()
    assert len(phases) == 1
    assert report.mapped == (PUBLIC_IP, 40000) and report.behind_nat is True
    assert report.mapping is MappingBehavior.UNKNOWN
    assert report.filtering is FilteringBehavior.UNKNOWN
    assert report.other_address is None
    assert any("OTHER-ADDRESS" in n for n in report.notes)


def test_other_address_sharing_the_primary_port_is_not_used() -> None:
    net = ScriptedNet()
    net.other = (OTHER[0], PRIMARY[1])
    discovery, phases = run(net)
    assert len(phases) == 1 and discovery.result().other_address is None


def test_refused_change_request_gives_unknown_filtering() -> None:
    net = ScriptedNet("ei", "ei")
    net.refuse_change = True
    report = run(net)[0].result().report()
    assert report.filtering is FilteringBehavior.UNKNOWN
    assert report.mapping is EI
    assert sum("refused CHANGE-REQUEST" in n for n in report.notes) == 2


def test_ignored_change_request_gives_unknown_filtering() -> None:
    net = ScriptedNet("ei", "ei")
    net.ignore_change = True
    report = run(net)[0].result().report()
    assert report.filtering is FilteringBehavior.UNKNOWN
    assert sum("ignored CHANGE-REQUEST" in n for n in report.notes) == 2


def test_dead_server_and_a_two_address_one() -> None:
    dead = ("192.0.2.99", 3478)
    net = ScriptedNet("ei", "apd")
    net.dead = {dead}
    discovery, phases = run(net, servers=(dead, PRIMARY))
    result = discovery.result()
    assert [t.server for t in phases[0][1]] == [dead, PRIMARY]
    assert [a.ok for a in result.first] == [False, True]
    assert all(t.server == PRIMARY for _, tests in phases[1:] for t in tests)
    report = result.report()
    assert (report.mapping, report.filtering) == (EI, F_APD)


def test_servers_seeing_different_mappings_are_noted() -> None:
    second = ("192.0.2.50", 3478)

    class TwoServers(ScriptedNet):
        def mapped(self, target: Address) -> Address:
            if target == second:
                return (PUBLIC_IP, 49999)
            return super().mapped(target)

    discovery, _ = run(TwoServers("ei", "ei"), servers=(PRIMARY, second))
    assert any("different mapped addresses" in n for n in discovery.result().notes)


def test_mapping_test_failure_is_noted_and_mapping_unknown() -> None:
    class LosesMapping(ScriptedNet):
        def answer(self, test: BindingTest) -> BindingOutcome:
            if test.name.startswith("mapping"):
                return BindingOutcome(ServerAnswer(test.server, False, error="no answer"))
            return super().answer(test)

    report = run(LosesMapping("apd", "apd"))[0].result().report()
    assert report.mapping is MappingBehavior.UNKNOWN
    assert "mapping test II failed: no answer" in report.notes


def test_driver_notes_land_in_order_and_phase_marks_the_classic_slot() -> None:
    seen: list[DiscoveryPhase] = []

    def between(d: Rfc5780Discovery) -> None:
        seen.append(d.phase)
        if d.phase is DiscoveryPhase.MAPPING:
            d.note("classic ran here")

    discovery, _ = run(ScriptedNet("apd", "apd"), between=between)
    assert seen == [DiscoveryPhase.FIRST, DiscoveryPhase.FILTERING, DiscoveryPhase.MAPPING]
    assert discovery.result().notes == ("classic ran here",)
    assert discovery.primary == PRIMARY and discovery.local == LOCAL


def test_misuse_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        Rfc5780Discovery((), local_towards=lambda _: LOCAL)
    discovery = Rfc5780Discovery((PRIMARY,), local_towards=lambda _: LOCAL)
    with pytest.raises(LocalProtocolError):
        discovery.result()
    stray = BindingTest("I", PRIMARY, None)
    with pytest.raises(LocalProtocolError):  # not handed out yet
        discovery.receive(stray, ScriptedNet().answer(stray))
    (test,) = discovery.next_tests()
    discovery.receive(test, ScriptedNet().answer(test))
    with pytest.raises(LocalProtocolError):  # answered twice
        discovery.receive(test, ScriptedNet().answer(test))


def test_a_server_answer_names_an_ipv6_server_in_brackets() -> None:
    """``probe --json``'s per-server ``server``: an IPv6 host is bracketed, so its port is
    not read as part of the address (issue 19)."""
    v6 = ServerAnswer(("2001:db8:1::10", 3478), True).to_dict()
    v4 = ServerAnswer(("203.0.113.10", 3478), True).to_dict()
    assert (v6["server"], v4["server"]) == ("[2001:db8:1::10]:3478", "203.0.113.10:3478")
