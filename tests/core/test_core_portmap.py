"""The sans-I/O PortMapper against an in-memory gateway, with a fake clock."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2plab.core import natpmp, pcp
from p2plab.core.portmap import (
    MappingFailed,
    MappingGranted,
    MappingLost,
    PortMapper,
    ProbeDone,
    UpnpDelete,
    UpnpMap,
    UpnpProbe,
)
from tests.portmap_gateway import FakeGateway

GW = "192.168.1.1"
ME = "192.168.1.2"
PORT = 5000


class World:
    """One mapper, one gateway, a clock; the gateway's answers come back at once."""

    def __init__(self, gw: FakeGateway | None = None, *, upnp: bool | None = None) -> None:
        """``upnp``: whether the driver's SSDP search finds an IGD (None: it never ends)."""
        self.now = 100.0
        self.gw = gw if gw is not None else FakeGateway(booted_at=0.0)
        self.upnp = upnp
        self.mapper = PortMapper(lambda n: bytes(range(7, 7 + n)))
        self.events: list[object] = []
        self.commands: list[object] = []
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.silent = False

    def flush(self) -> None:
        while True:
            out = self.mapper.datagrams_to_send(self.now)
            while (cmd := self.mapper.next_command()) is not None:
                self.commands.append(cmd)
                if isinstance(cmd, UpnpProbe) and self.upnp is not None:
                    self.mapper.upnp_probed(self.now, self.upnp)
            while (event := self.mapper.next_event()) is not None:
                self.events.append(event)
            if not out:
                return
            for data, addr in out:
                self.sent.append((data, addr))
                answer = None if self.silent else self.gw.answer(data, self.now)
                if answer is not None:
                    self.mapper.receive_datagram(answer, addr, self.now)

    def start(self) -> None:
        self.mapper.start(self.now, GW, PORT, ME)
        self.flush()

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while (t := self.mapper.get_timer()) is not None and t <= end:
            self.now = max(t, self.now)
            self.mapper.handle_timer(self.now)
            self.flush()
        self.now = end

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if isinstance(e, kind)]


def test_both_answer_nat_pmp_wins_and_is_granted_for_7200_s() -> None:
    w = World()
    w.start()
    assert [a for _, a in w.sent] == [(GW, 5351)] * 2  # NAT-PMP request and PCP ANNOUNCE at once
    assert w.events == [] and w.mapper.get_timer() == 100.25  # both answered; UPnP still out
    w.run(0.3)
    assert w.of(ProbeDone) == [ProbeDone(("nat-pmp", "pcp"))]
    assert w.of(MappingGranted) == [MappingGranted("nat-pmp", "198.51.100.7", 40000, 7200)]
    assert w.mapper.status(w.now)["external"] == "198.51.100.7:40000"
    assert w.gw.mappings == {PORT: (40000, b"")}


def test_all_three_answer_ends_the_probe_at_once() -> None:
    w = World(upnp=True)
    w.start()
    assert w.of(ProbeDone) == [ProbeDone(("nat-pmp", "pcp", "upnp"))]
    assert w.of(MappingGranted)[0].protocol == "nat-pmp"


def test_pcp_only_maps_with_the_nonce_and_the_client_address() -> None:
    w = World(FakeGateway(answers_pmp=False))
    w.start()
    w.run(0.3)
    assert w.of(ProbeDone) == [ProbeDone(("pcp",))]
    assert w.of(MappingGranted) == [MappingGranted("pcp", "198.51.100.7", 40000, 7200)]
    req = pcp.parse_request(w.sent[-1][0])
    assert req.client_ip == ME and req.map is not None and req.map.nonce == bytes(range(7, 19))


def test_silence_costs_one_probe_and_250_ms_then_nothing() -> None:
    w = World(FakeGateway(answers_pmp=False, answers_pcp=False))
    w.start()
    w.run(0.25)
    assert w.of(ProbeDone) == [ProbeDone(())]
    assert w.mapper.state == "unavailable" and w.mapper.get_timer() is None
    w.run(10_000)
    assert len(w.sent) == 2 and w.of(MappingGranted) == []
    # a network change probes again, once
    w.mapper.network_changed(w.now, "10.0.0.1", "10.0.0.2")
    w.flush()
    assert [a for _, a in w.sent[2:]] == [("10.0.0.1", 5351)] * 2


def test_renews_at_half_life_keeping_the_port() -> None:
    w = World()
    w.start()
    w.run(0.3)
    granted_at = 100.25
    assert w.mapper.get_timer() == granted_at + 3600
    w.run(3599)
    assert len(w.of(MappingGranted)) == 1
    w.run(1)
    renew = natpmp.parse_request(w.sent[-1][0])
    assert renew == natpmp.MapRequest(PORT, 40000, 7200)
    assert len(w.of(MappingGranted)) == 2 and w.of(MappingGranted)[-1].port == 40000
    assert w.mapper.stats["portmap_renewals"] == 1 and w.of(MappingLost) == []


def test_an_unanswered_renewal_retries_until_the_lease_ends_then_probes_again() -> None:
    w = World(FakeGateway(max_lifetime=100))
    w.start()
    w.run(0.3)
    w.silent = True
    w.run(49.8)
    w.run(60)
    assert w.of(MappingLost) == [MappingLost("expired")]
    assert w.mapper.stats["portmap_retransmits"] >= 4
    assert w.of(ProbeDone)[-1] == ProbeDone(())  # the re-probe heard nothing: quiet now
    assert w.mapper.get_timer() is None


def test_stop_deletes_the_mapping_with_lifetime_zero() -> None:
    for gw in (FakeGateway(), FakeGateway(answers_pmp=False)):
        w = World(gw)
        w.start()
        w.run(0.3)
        assert gw.mappings
        w.mapper.stop(w.now)
        w.flush()
        assert gw.mappings == {}  # the PCP delete carried the mapping's nonce
        assert w.of(MappingLost) == [MappingLost("stopped")]
        assert w.mapper.get_timer() is None


def test_a_rebooted_gateway_is_seen_by_its_epoch_and_mapped_again() -> None:
    w = World(FakeGateway(booted_at=0.0, max_lifetime=1000))
    w.start()
    w.run(0.3)
    w.run(600)  # renewed once at half-life: the epoch moves with our clock
    w.gw.reboot(w.now)  # epoch back to 0, mapping table empty
    w.run(500)  # the next renewal's answer carries the small epoch
    assert w.mapper.stats["portmap_drop_epoch"] == 1
    assert MappingLost("gateway-rebooted") in w.events
    assert w.events[-1] == MappingGranted("nat-pmp", "198.51.100.7", 40001, 1000)
    assert w.gw.mappings == {PORT: (40001, b"")}


def test_refused_nat_pmp_falls_back_to_pcp() -> None:
    w = World(FakeGateway(pmp_result=natpmp.ResultCode.NETWORK_FAILURE))
    w.start()
    w.run(0.3)
    assert w.of(MappingGranted) == [MappingGranted("pcp", "198.51.100.7", 40000, 7200)]
    assert w.mapper.stats["portmap_refused"] == 1


def test_every_protocol_refusing_is_one_mapping_failed() -> None:
    w = World(FakeGateway(answers_pcp=False, pmp_result=natpmp.ResultCode.NOT_AUTHORIZED))
    w.start()
    w.run(0.3)
    assert w.of(ProbeDone) == [ProbeDone(("nat-pmp",))]
    assert w.of(MappingFailed) == [MappingFailed("nat-pmp: result NOT_AUTHORIZED")]
    assert w.mapper.state == "unavailable" and w.mapper.get_timer() is None
    assert w.of(MappingGranted) == [] and w.of(MappingLost) == []


def test_upnp_only_goes_through_driver_commands() -> None:
    w = World(FakeGateway(answers_pmp=False, answers_pcp=False), upnp=True)
    w.start()
    w.run(0.3)
    assert w.of(ProbeDone) == [ProbeDone(("upnp",))]
    assert w.commands == [UpnpProbe(), UpnpMap(PORT, PORT, 7200)]
    w.mapper.upnp_result(w.now, "203.0.113.9", 5000, 7200)
    w.flush()
    assert w.of(MappingGranted) == [MappingGranted("upnp", "203.0.113.9", 5000, 7200)]
    w.mapper.stop(w.now)
    w.flush()
    assert w.commands[-1] == UpnpDelete(5000)


def test_hostile_answers_are_dropped_counted_and_change_nothing() -> None:
    w = World(FakeGateway(answers_pmp=False))
    w.start()
    w.run(0.3)
    granted = list(w.events)
    m = w.mapper
    good = pcp.Response(
        pcp.MAP, 0, 7200, 1, pcp.MapData(bytes(range(7, 19)), 17, PORT, 40000, "198.51.100.7")
    )
    evil = pcp.MapData(bytes(12), 17, PORT, 666, "203.0.113.66")
    m.handle_timer(w.now + 3600)  # a renewal is pending: answers would be taken
    m.datagrams_to_send(w.now)
    cases = [
        (bytes(good), ("203.0.113.66", 5351), "portmap_drop_not_gateway"),
        (bytes(good), (GW, 5352), "portmap_drop_not_gateway"),
        (bytes(pcp.Response(pcp.MAP, 0, 7200, 1, evil)), (GW, 5351), "portmap_drop_nonce"),
        (bytes(good)[:30], (GW, 5351), "portmap_drop_malformed"),
        (bytes(pcp.Response(pcp.MAP, 0, 10**7, 1, good.map)), (GW, 5351), "portmap_drop_lifetime"),
        (bytes(pcp.Response(pcp.MAP, 0, 1, 1, good.map)), (GW, 5351), "portmap_drop_lifetime"),
        (
            bytes(natpmp.MapResponse(1, 0, 1, PORT, 666, 7200)),
            (GW, 5351),
            "portmap_drop_unexpected",
        ),
    ]
    for data, addr, counter in cases:
        before = m.stats[counter]
        m.receive_datagram(data, addr, w.now + 3600)
        assert m.stats[counter] == before + 1, counter
        assert m.next_event() is None and m.datagrams_to_send(w.now) == []
    assert w.events == granted and m.mapping == granted[-1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=80), max_size=8), st.booleans())
def test_fuzzed_datagrams_from_the_gateway_never_raise_nor_redirect(
    datagrams: list[bytes], mapped: bool
) -> None:
    w = World(FakeGateway(answers_pmp=False))
    w.start()
    if mapped:
        w.run(0.3)
    for d in datagrams:
        w.mapper.receive_datagram(b"\x02" + d if len(d) % 2 else d, (GW, 5351), w.now)
        w.mapper.receive_datagram(d, ("198.51.100.1", 5351), w.now)
    assert all(a == (GW, 5351) for _, a in w.mapper.datagrams_to_send(w.now))


_STEP = st.one_of(
    st.tuples(st.just("timer"), st.floats(0, 5000)),
    st.tuples(st.just("datagram"), st.binary(max_size=64)),
    st.tuples(st.just("answer"), st.integers(0, 3)),
    st.tuples(st.just("upnp_probed"), st.booleans()),
    st.tuples(st.just("upnp_result"), st.booleans()),
    st.tuples(st.just("network"), st.booleans()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_STEP, max_size=25), st.booleans(), st.booleans())
def test_any_sequence_of_inputs_keeps_the_invariants(
    steps: list[tuple[str, object]], pmp: bool, pcp_on: bool
) -> None:
    """Timers, junk, real answers, UPnP results and network changes in any order: no exception,
    every datagram goes to the current gateway's port 5351, a mapping is only ever granted by
    an answer, and stop leaves nothing running."""
    gw = FakeGateway(answers_pmp=pmp, answers_pcp=pcp_on)
    m = PortMapper(lambda n: bytes(n))
    now = 0.0
    m.start(now, GW, PORT, ME)
    gateway = GW
    pending: list[bytes] = []
    for kind, arg in steps:
        if kind == "timer":
            now += float(arg)  # type: ignore[arg-type]
            m.handle_timer(now)
        elif kind == "datagram":
            m.receive_datagram(bytes(arg), (gateway, 5351), now)  # type: ignore[call-overload]
        elif kind == "answer" and pending:
            answer = gw.answer(pending.pop(int(arg) % len(pending)), now)  # type: ignore[call-overload]
            if answer is not None:
                m.receive_datagram(answer, (gateway, 5351), now)
        elif kind == "upnp_probed":
            m.upnp_probed(now, bool(arg))
        elif kind == "upnp_result":
            m.upnp_result(now, "203.0.113.9" if arg else None, 5000 if arg else None, 7200)
        elif kind == "network":
            gateway = "10.0.0.1" if arg else GW
            m.network_changed(now, gateway, ME)
        for data, addr in m.datagrams_to_send(now):
            assert addr == (gateway, 5351)
            pending.append(data)
        while m.next_command() is not None:
            pass
        while (event := m.next_event()) is not None:
            if isinstance(event, MappingGranted):
                assert event.port > 0 and 2 <= event.lifetime_s <= 604800
        timer = m.get_timer()
        if m.state in ("idle", "stopped", "unavailable"):
            assert timer is None
        elif m.state != "mapping" or not m._upnp_pending:
            # only an AddPortMapping in flight has no timer: the driver always answers it
            assert timer is not None
    m.stop(now)
    assert m.get_timer() is None and m.state == "stopped"
    assert all(addr == (gateway, 5351) for _, addr in m.datagrams_to_send(now))
