"""IPv6 in the simulator (issue 19): stateful firewalls that filter without mapping, dual-stack
hosts (IPv4 through the NAT, IPv6 as it is), STUN over IPv6, the worker's second socket, and the
issue's pairs."""

from __future__ import annotations

import ipaddress
import json

import pytest

from p2plab.core import events as ev
from p2plab.core.stun import TransactionState
from p2plab.lab.sim import Simulation
from p2plab.lab.sim.ipv6 import STUN_IPS6, V6_PREFIX
from p2plab.lab.sim.matrix import EXPECTED_SITES, sim_matrix
from p2plab.lab.sim.peer import SimPeer
from p2plab.lab.simnet import Address, Host, SimSocket


def _inbox(sock: SimSocket) -> list[tuple[bytes, Address]]:
    got: list[tuple[bytes, Address]] = []
    sock.on_datagram = lambda data, addr: got.append((data, addr))
    return got


def _v6(host: Host) -> str:
    return next(ip for ip in host.ips if ":" in ip)


def _two_remotes(sim: Simulation) -> tuple[SimSocket, SimSocket]:
    fw = sim.add_firewall6("v6-open")
    x = sim.add_host(fw6=fw, ipv4=False, name="x")
    y = sim.add_host(fw6=fw, ipv4=False, name="y")
    return x.bind(7000), y.bind(7000)


@pytest.mark.parametrize(
    ("profile", "from_x_before", "from_y_after", "idle_s"),
    [
        ("v6-open", True, True, None),
        ("v6-apdf", False, False, 120.0),
        ("v6-eif", False, True, 300.0),
    ],
)
def test_firewalls_filter_without_mapping(
    profile: str, from_x_before: bool, from_y_after: bool, idle_s: float | None
) -> None:
    sim = Simulation(seed=1)
    host = sim.add_site(profile, "h")
    assert host.ips == (_v6(host),) and ipaddress.IPv6Address(host.ip) in V6_PREFIX
    sock = host.bind(40000)
    got = _inbox(sock)
    x, y = _two_remotes(sim)
    x.sendto(b"before", sock.address)
    sim.run_for(0.1)
    assert (b"before", x.address) in got if from_x_before else got == []
    sock.sendto(b"out", x.address)  # no translation: x sees the host's own address
    seen = _inbox(x)
    sim.run_for(0.1)
    assert seen == [(b"out", sock.address)]
    x.sendto(b"reply", sock.address)
    y.sendto(b"other", sock.address)
    sim.run_for(0.1)
    assert (b"reply", x.address) in got
    assert ((b"other", y.address) in got) is from_y_after
    if idle_s is not None:  # the door closes after the idle timer
        sim.run_for(idle_s)
        x.sendto(b"late", sock.address)
        sim.run_for(0.1)
        assert (b"late", x.address) not in got


def test_dual_stack_host_goes_through_the_nat_on_ipv4_only() -> None:
    sim = Simulation(seed=1)
    host = sim.add_site("symmetric/v6-apdf", "h")
    assert host.nat is not None and len(host.ips) == 2
    sock4, sock6 = host.bind(40000), host.bind(40000, _v6(host))
    tx4 = sim.peer(host, port=40001).binding(sim.stun.primary)
    got = tx4.response.attributes["XOR-MAPPED-ADDRESS"] if tx4.response else None
    assert got is not None and str(got[0]) == host.nat.public_ip
    p6 = SimPeer(sim, host, host.bind(40002, _v6(host)), "p6")
    tx6 = p6.binding(sim.stun6.primary)
    assert sim.stun6.primary[0] == STUN_IPS6[0]
    assert tx6.state is TransactionState.SUCCEEDED and tx6.response is not None
    mapped = tx6.response.attributes["XOR-MAPPED-ADDRESS"]
    assert (str(mapped[0]), int(mapped[1])) == p6.local_address  # no NAT on IPv6
    # A datagram never crosses families (both die on the internet, counted).
    sock4.sendto(b"x", (STUN_IPS6[0], 9))
    sock6.sendto(b"x", (sim.stun.primary[0], 9))
    sim.run_for(0.1)
    assert sim.net.stats["family_mismatch"] == 2


def test_dual_stack_worker_announces_its_ipv6_endpoint_and_host_candidate() -> None:
    sim = Simulation(seed=2)
    host = sim.add_site("port-restricted/v6-eif", "a")
    texts: list[str] = []
    send = sim.rendezvous.send
    sim.rendezvous.send = lambda conn, text: (texts.append(text), send(conn, text))[1]  # type: ignore[method-assign]
    w = sim.worker(host)
    sim.run_for(2.0)
    assert w.socket6 is not None
    v6 = w.socket6.address
    assert w.engine.endpoint6 == v6  # STUN over IPv6 sees the host's own address
    (update,) = [json.loads(t) for t in texts if '"update_udp_endpoint"' in t]
    assert update["udp6"] == {"ip": v6[0], "port": v6[1]}
    # With no NAT the host candidate is the STUN endpoint: announced once (as udp6).
    assert {"ip": v6[0], "port": v6[1]} not in update["local_candidates"]
    assert update["local_candidates"] == [{"ip": w.local_address[0], "port": 40000}]
    assert host.nat is not None and update["udp_ip"] == host.nat.public_ip


def test_ipv6_only_pair_connects_over_ipv6() -> None:
    (row,) = sim_matrix(pairs=[("v6-apdf", "v6-apdf")], classify=False, seed=3)
    assert (row["outcome"], row["method"], row["family"]) == ("direct", "direct", "ipv6")
    assert row["a_peer_endpoint"].startswith("2001:db8:")


def test_dual_stack_pair_whose_ipv4_needs_a_relay_goes_direct_over_ipv6() -> None:
    pair = ("symmetric/v6-apdf", "symmetric/v6-apdf")
    (row,) = sim_matrix(pairs=[pair], classify=False, seed=3)
    assert (row["outcome"], row["method"], row["family"]) == EXPECTED_SITES[pair]


def test_same_lan_rows_share_the_site() -> None:
    rows = sim_matrix(pairs=[], same_lan=["v6-eif"], classify=False, seed=3)
    (row,) = rows
    assert row["same_lan"] and (row["outcome"], row["family"]) == ("direct", "ipv6")
    assert row["expected_family"] == "ipv6"


def test_ranking_picks_ipv6_when_both_families_would_do() -> None:
    """port-restricted x port-restricted punches over IPv4 too; the engines still take IPv6."""
    sim = Simulation(seed=6)
    a = sim.add_site("port-restricted/v6-eif", "a")
    b = sim.add_site("port-restricted/v6-apdf", "b")
    link = sim.pair(a, b)
    assert (link.outcome, link.family) == ("direct", "ipv6")
    assert link.a.engine.family == link.b.engine.family == "ipv6"
    assert link.b.socket6 is not None and link.a.peer_address == link.b.socket6.address
    link.a.send_chat("over v6")
    sim.run_for(5.0)
    assert link.b.chats_received == ["over v6"]
    fw_b = sim.net.firewalls6[_v6(b)]
    assert fw_b.stats["in"] > 0 and a.nat is not None and a.nat.stats["in"] < fw_b.stats["in"]


@pytest.mark.parametrize(
    ("spec", "filtering", "words"),
    [
        ("v6-open", "endpoint-independent", "Open Internet"),
        ("v6-apdf", "address-and-port-dependent", "Symmetric UDP Firewall"),
        ("v6-eif", "endpoint-independent", "Open Internet"),
    ],
)
def test_rfc5780_over_ipv6_sees_the_firewall(spec: str, filtering: str, words: str) -> None:
    sim = Simulation(seed=1)
    report = sim.probe(sim.add_site(spec, "h"))
    assert (report.mapping.value, report.filtering.value) == ("endpoint-independent", filtering)
    assert (report.behind_nat, report.classic_rfc5780, report.classic) == (False, words, None)
    assert report.mapped == report.local and ":" in report.mapped[0]


def test_matrix_classifies_a_dual_stack_site_on_both_families() -> None:
    (row,) = sim_matrix(pairs=[("symmetric/v6-apdf", "v6-eif")], seed=2)
    assert row["a_nat"] == "address-and-port-dependent/address-and-port-dependent"
    assert row["a_filtering6"] == "address-and-port-dependent"
    assert row["b_nat"] == "endpoint-independent/endpoint-independent"
    assert (row["outcome"], row["family"]) == ("direct", "ipv6")


def test_firewall_timers_are_conntracks_and_the_eif_sets() -> None:
    """v6-apdf: a flow seen one way lives 30 s; v6-eif: the outbound source stays open to anyone
    for 300 s, far past conntrack's timers."""
    sim = Simulation(seed=1)
    apdf = sim.add_site("v6-apdf", "h1").bind(40000)
    eif = sim.add_site("v6-eif", "h2").bind(40000)
    got_apdf, got_eif = _inbox(apdf), _inbox(eif)
    x, y = _two_remotes(sim)
    apdf.sendto(b"out", x.address)
    eif.sendto(b"out", x.address)
    sim.run_for(29.0)
    x.sendto(b"at 29 s", apdf.address)
    sim.run_for(0.5)
    assert [d for d, _ in got_apdf] == [b"at 29 s"]  # now the flow has seen a reply: 120 s
    sim.run_for(119.0)
    x.sendto(b"at 148 s", apdf.address)
    sim.run_for(0.5)
    assert [d for d, _ in got_apdf] == [b"at 29 s", b"at 148 s"]
    apdf.sendto(b"to y", y.address)  # never answered: closed again after 30 s
    sim.run_for(31.0)
    y.sendto(b"late", apdf.address)
    sim.run_for(0.5)
    assert b"late" not in [d for d, _ in got_apdf]
    y.sendto(b"stranger at 180 s", eif.address)
    sim.run_for(0.5)
    assert [d for d, _ in got_eif] == [b"stranger at 180 s"]
    sim.run_for(125.0)
    y.sendto(b"after 300 s", eif.address)
    sim.run_for(0.5)
    assert b"after 300 s" not in [d for d, _ in got_eif]


def test_an_ipv6_outage_moves_the_link_to_ipv4_and_back() -> None:
    """Issue 19: a link moves between families like any path change.  Once the engines have
    warmed the IPv4 path (their first warm-up round, 25 s in), an IPv6 uplink that goes away
    for a minute costs no peer: the link moves to IPv4, chat crosses once, and it comes back."""
    sim = Simulation(seed=6)
    a = sim.add_site("port-restricted/v6-eif", "a")
    b = sim.add_site("port-restricted/v6-apdf", "b")
    link = sim.pair(a, b)
    assert link.family == "ipv6"
    sim.run_for(60.0)
    sim.net.firewalls6[_v6(b)].outage(60.0)
    msg_id = link.a.send_chat("during the outage")
    sim.run_for(30.0)
    assert (link.a.engine.family, link.b.engine.family) == ("ipv4", "ipv4")
    assert link.b.chats_received == ["during the outage"]
    assert msg_id in [e.msg_id for e in link.a.events_of(ev.ChatDelivered)]  # type: ignore[attr-defined]
    sim.run_for(90.0)
    assert (link.a.engine.family, link.b.engine.family) == ("ipv6", "ipv6")
    assert "lost" not in link.a.states + link.b.states
    moves = [e.address for e in link.b.events_of(ev.PathChanged)]  # type: ignore[attr-defined]
    assert [":" in ip for ip, _ in moves] == [False, True]


def test_an_ipv4_only_worker_does_not_wait_for_ipv6_it_cannot_reach() -> None:
    """``open/v6-apdf`` x ``symmetric``: the IPv4-only side drops the peer's IPv6 addresses
    (it has no IPv6 to send from) instead of holding its IPv4 probes back by the happy-eyeballs
    delay; both sides then say the same method (the kernel lab saw direct vs birthday)."""
    for seed in (1, 2, 3):
        sim = Simulation(seed=seed)
        a = sim.add_site("open/v6-apdf", "a")
        b = sim.add_site("symmetric", "b")
        r = sim.pair(a, b, skew=0.1)
        assert r.outcome == "direct"
        assert r.a.engine.method == r.b.engine.method == "direct"
        assert r.b.engine.stats["candidates_other_family"] > 0
        assert r.a.engine.stats["candidates_other_family"] == 0
