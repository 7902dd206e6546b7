"""Port mapping in the simulator (issue 18): the router's NAT-PMP and PCP answers on the wire, a
lease that forwards whatever the NAT's filtering, expires and can be deleted, the worker's client
(probe, preference, renewal), and the pairs of the issue's matrix."""

from __future__ import annotations

import json
import random

import pytest

from p2plab.core import events as ev
from p2plab.lab.sim import Simulation
from p2plab.lab.sim.matrix import EXPECTED_SITES, sim_matrix
from p2plab.lab.sim.portmap_client import SimPortMapClient
from p2plab.lab.sim.portmap_model import (
    PORTMAP_PORT,
    PortMapConfig,
    PortMapNat,
    decode_natpmp_answer,
    decode_pcp_answer,
    natpmp_map_request,
    pcp_announce_request,
    pcp_map_request,
)
from p2plab.lab.sim.report import LinkResult
from p2plab.lab.simnet import Address, Host, SimSocket


def _site(
    protocols: frozenset[str] = frozenset({"nat-pmp", "pcp"}),
    profile: str = "symmetric",
    **config: float,
) -> tuple[Simulation, PortMapNat, Host, Host]:
    sim = Simulation(seed=5)
    nat = sim.add_nat(profile, portmap=PortMapConfig(protocols=protocols, **config))
    assert isinstance(nat, PortMapNat)
    return sim, nat, sim.add_host(behind=nat), sim.add_host(name="remote")


def _inbox(sock: SimSocket) -> list[tuple[bytes, Address]]:
    got: list[tuple[bytes, Address]] = []
    sock.on_datagram = lambda data, addr: got.append((data, addr))
    return got


def _ask(sim: Simulation, nat: PortMapNat, sock: SimSocket, request: bytes) -> list[bytes]:
    got = _inbox(sock)
    sock.sendto(request, (nat.gateway_ip, PORTMAP_PORT))
    sim.run_for(0.1)
    assert all(addr == (nat.gateway_ip, PORTMAP_PORT) for _, addr in got)
    return [data for data, _ in got]


# -- the router on the wire ---------------------------------------------------------------------


def test_natpmp_and_pcp_answers_grant_the_suggested_port() -> None:
    sim, nat, host, _ = _site()
    client = host.bind(41000)
    (answer,) = _ask(sim, nat, client, natpmp_map_request(40000, 40000, 7200))
    fields = decode_natpmp_answer(answer)
    assert fields is not None
    assert (fields["op"], fields["result"], fields["external_port"]) == (1, 0, 40000)
    assert fields["lifetime_s"] == 7200
    (address,) = _ask(sim, nat, client, bytes([0, 0]))
    assert decode_natpmp_answer(address) == {"op": 0, "result": 0, "epoch": 0, "ip": nat.public_ip}
    nonce = bytes(range(12))
    (announce,) = _ask(sim, nat, client, pcp_announce_request(host.ip))
    assert decode_pcp_answer(announce) == {"op": 0, "result": 0, "lifetime_s": 0, "epoch": 0}
    (mapped,) = _ask(sim, nat, client, pcp_map_request(host.ip, nonce, 40001, 40001, 30))
    pcp = decode_pcp_answer(mapped)
    assert pcp is not None
    assert (pcp["nonce"], pcp["external_port"], pcp["ip"]) == (nonce, 40001, nat.public_ip)
    # miniupnpd's PCP floor: a 30 s ask gets min_lifetime (120 s).
    assert pcp["lifetime_s"] == 120
    assert nat.responder.stats["leases_granted"] == 2


def test_a_protocol_not_offered_stays_silent_and_junk_is_counted() -> None:
    sim, nat, host, _ = _site(frozenset({"upnp"}))
    client = host.bind(41000)
    assert _ask(sim, nat, client, natpmp_map_request(40000, 40000, 7200)) == []
    assert _ask(sim, nat, client, pcp_announce_request(host.ip)) == []
    assert _ask(sim, nat, client, b"\x07garbage" * 5) == []
    assert _ask(sim, nat, client, b"") == []
    stats = nat.responder.stats
    assert (stats["natpmp_not_offered"], stats["pcp_not_offered"], stats["junk"]) == (1, 1, 2)
    assert nat.responder.leases == {}


def test_a_lease_forwards_whatever_the_filtering_and_replies_leave_by_it() -> None:
    sim, nat, host, remote = _site()
    sock = host.bind(40000)
    _ask(sim, nat, host.bind(41000), natpmp_map_request(40000, 40000, 7200))
    inside = _inbox(sock)
    outside_sock = remote.bind(7000)
    outside = _inbox(outside_sock)
    outside_sock.sendto(b"unsolicited", (nat.public_ip, 40000))
    outside_sock.sendto(b"to another port", (nat.public_ip, 40002))
    sim.run_for(0.1)
    assert inside == [(b"unsolicited", outside_sock.address)]  # symmetric NAT, APDF: still in
    assert nat.stats["no_mapping"] == 1
    sock.sendto(b"reply", outside_sock.address)
    sim.run_for(0.1)
    assert outside == [(b"reply", (nat.public_ip, 40000))]
    # A new flow of the host is the NAT's own business: a symmetric NAT's random port.
    sock.sendto(b"new flow", (remote.ip, 7001))
    sim.run_for(0.1)
    assert [m["external"][1] for m in nat.mappings if m["permits"] == [(remote.ip, 7001)]] != [
        40000
    ]


def test_leases_expire_and_deletion_closes_the_door_until_renewed() -> None:
    sim, nat, host, remote = _site(min_lifetime_s=60.0)
    sock = host.bind(40000)
    client = host.bind(41000)
    _ask(sim, nat, client, natpmp_map_request(40000, 40000, 60))
    inside = _inbox(sock)
    outside = remote.bind(7000)
    sim.run_for(59.0)  # the lease was granted 0.1 s ago, for 60 s
    outside.sendto(b"alive", (nat.public_ip, 40000))
    sim.run_for(1.5)
    outside.sendto(b"expired", (nat.public_ip, 40000))
    sim.run_for(0.5)
    assert [d for d, _ in inside] == [b"alive"]
    assert nat.responder.stats["leases_expired"] == 1
    _ask(sim, nat, client, natpmp_map_request(40000, 40000, 60))
    nat.delete_lease(sock.address)
    outside.sendto(b"deleted", (nat.public_ip, 40000))
    sim.run_for(0.5)
    _ask(sim, nat, client, natpmp_map_request(40000, 40000, 60))  # renewed: the same port
    outside.sendto(b"renewed", (nat.public_ip, 40000))
    sim.run_for(0.5)
    assert [d for d, _ in inside] == [b"alive", b"renewed"]


def test_a_port_held_by_another_host_is_not_leased() -> None:
    sim, nat, host, remote = _site(profile="port-restricted")
    other = sim.add_host(behind=nat)
    other.bind(40000).sendto(b"x", (remote.ip, 7000))  # takes public port 40000 (preserving)
    sim.run_for(0.1)
    (answer,) = _ask(sim, nat, host.bind(41000), natpmp_map_request(40000, 40000, 7200))
    fields = decode_natpmp_answer(answer)
    assert fields is not None and fields["external_port"] not in (0, 40000)


# -- the worker's client ------------------------------------------------------------------------


def _client(protocols: frozenset[str]) -> tuple[Simulation, SimPortMapClient, list[object]]:
    sim, nat, host, _ = _site(protocols)
    got: list[object] = []
    client = SimPortMapClient(sim.clock, host, nat, (host.ip, 40000), got.append, random.Random(1))
    client.start()
    sim.run_for(2.0)
    return sim, client, got


@pytest.mark.parametrize(
    ("protocols", "chosen"),
    [
        (frozenset({"nat-pmp", "pcp", "upnp"}), "nat-pmp"),
        (frozenset({"pcp", "upnp"}), "pcp"),
        (frozenset({"upnp"}), "upnp"),
    ],
)
def test_client_prefers_natpmp_then_pcp_then_upnp(protocols: frozenset[str], chosen: str) -> None:
    _, client, got = _client(protocols)
    assert client.answered == protocols
    assert len(got) == 1
    mapping = got[0]
    assert mapping is not None and mapping.protocol == chosen  # type: ignore[attr-defined]
    assert (mapping.port, mapping.lifetime_s) == (40000, 7200.0)  # type: ignore[attr-defined]


def test_client_reports_none_once_when_nothing_answers() -> None:
    _, client, got = _client(frozenset())
    assert got == [None]
    assert client.answered == set()
    assert client.stats["no_protocol"] == 1


def test_client_renews_at_half_life_and_deletes_on_stop() -> None:
    sim, client, got = _client(frozenset({"nat-pmp"}))
    nat = client.nat
    sim.run_for(3600.0)
    assert client.stats["requests_nat-pmp"] == 2
    assert len(got) == 1  # the same mapping: nothing new to tell the engine
    client.stop()
    sim.run_for(1.0)
    assert nat.responder.leases == {}


def test_client_drops_answers_not_from_the_gateway() -> None:
    sim, client, got = _client(frozenset({"nat-pmp"}))
    intruder = sim.add_host(behind=client.nat)
    forged = bytes([0, 129, 0, 0, 0, 0, 0, 9]) + (40000).to_bytes(2, "big") + bytes(6)
    for _ in range(3):
        intruder.bind(0).sendto(forged, client.socket.address)
    sim.run_for(1.0)
    assert client.stats["dropped_not_gateway"] == 3
    assert len(got) == 1


# -- whole workers ------------------------------------------------------------------------------


def test_worker_announces_the_mapping_in_its_first_endpoint_update() -> None:
    sim = Simulation(seed=2)
    host = sim.add_site("symmetric+pmp", "a")
    texts: list[str] = []
    send = sim.rendezvous.send
    sim.rendezvous.send = lambda conn, text: (texts.append(text), send(conn, text))[1]  # type: ignore[method-assign]
    w = sim.worker(host)
    sim.run_for(2.0)
    updates = [json.loads(t) for t in texts if '"update_udp_endpoint"' in t]
    assert updates, texts
    nat = host.nat
    assert nat is not None
    assert updates[0]["mapped"] == {
        "protocol": "nat-pmp",
        "ip": nat.public_ip,
        "port": w.local_address[1],
        "lifetime_s": 7200.0,
    }
    assert w.state == "waiting_for_peer"


@pytest.mark.parametrize(("spec_a", "spec_b"), [p for p in EXPECTED_SITES if "+" in p[0]])
def test_issue_pairs_connect_directly_through_the_mapping(spec_a: str, spec_b: str) -> None:
    (row,) = sim_matrix(pairs=[(spec_a, spec_b)], classify=False, seed=3)
    assert (row["outcome"], row["method"], row["family"]) == EXPECTED_SITES[(spec_a, spec_b)]
    assert (row["expected"], row["expected_method"]) == ("direct", "port-mapping")


def _mapped_link(seed: int, lease_s: float) -> tuple[Simulation, PortMapNat, LinkResult]:
    sim = Simulation(seed=seed)
    nat = sim.add_nat("symmetric", portmap=PortMapConfig(max_lifetime_s=lease_s), name="nat_a")
    assert isinstance(nat, PortMapNat)
    link = sim.pair(sim.add_host(nat, name="a"), sim.add_site("symmetric", "b"))
    assert (link.outcome, link.method, link.family) == ("direct", "port-mapping", "ipv4")
    return sim, nat, link


def test_lease_deleted_mid_link_keeps_its_flow_and_is_renewed() -> None:
    """miniupnpd's delete takes the DNAT rule away; conntrack keeps the running flow."""
    sim, nat, link = _mapped_link(seed=4, lease_s=120.0)
    a, b = link.a, link.b
    lease = nat.delete_lease(a.local_address)
    assert lease is not None
    stranger = sim.add_host(name="stranger").bind(7000)
    stranger.sendto(b"new remote", (nat.public_ip, lease.external_port))
    b.send_chat("after the lease went")
    sim.run_for(10.0)
    assert a.chats_received.count("after the lease went") == 1
    assert nat.stats["no_mapping"] >= 1  # the stranger found the door shut
    sim.run_for(60.0)  # the client renews at half the 120 s lease: the same port again
    renewed = nat.responder.lease_for(a.local_address, sim.now)
    assert renewed is not None and renewed.external_port == lease.external_port
    assert a.state == b.state == "connected"
    assert "lost" not in a.states[a.states.index("connected") :]


def test_lease_flushed_mid_link_is_replaced_and_chat_arrives_once() -> None:
    """A conntrack flush kills the flow too: the link is lost, the worker asks the router again,
    the engines re-punch to the mapped port, and chat flows exactly once."""
    sim, nat, link = _mapped_link(seed=4, lease_s=7200.0)
    a, b = link.a, link.b
    assert nat.delete_lease(a.local_address, flush=True) is not None
    during = b.send_chat("during the outage")
    sim.run_for(60.0)
    assert a.state == b.state == "connected"
    assert a.portmap is not None and a.portmap.stats["refreshes"] >= 1
    assert nat.responder.lease_for(a.local_address, sim.now) is not None
    after = b.send_chat("after the lease came back")
    sim.run_for(10.0)
    assert a.chats_received.count("after the lease came back") == 1
    assert after in [e.msg_id for e in b.events_of(ev.ChatDelivered)]  # type: ignore[attr-defined]
    # The one sent into the dead path is never duplicated; the sender is told its fate.
    assert a.chats_received.count("during the outage") <= 1
    fates = b.events_of(ev.ChatDelivered) + b.events_of(ev.ChatFailed)
    assert during in [e.msg_id for e in fates]  # type: ignore[attr-defined]
    assert b.engine.method == a.engine.method == "port-mapping"
