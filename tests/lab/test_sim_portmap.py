"""Port mapping in the simulator (issue 18): the router's NAT-PMP and PCP answers on the wire, a
lease that forwards whatever the NAT's filtering, expires and can be deleted, the worker's client
(probe, preference, renewal), and the pairs of the issue's matrix."""

from __future__ import annotations

import json
import random

import pytest

from p2plab.core import events as ev
from p2plab.core import natpmp, pcp
from p2plab.core.signaling import PortMapping
from p2plab.lab.sim import Simulation
from p2plab.lab.sim.matrix import EXPECTED_SITES, sim_matrix
from p2plab.lab.sim.portmap_client import SimPortMapClient
from p2plab.lab.sim.portmap_model import PORTMAP_PORT, PortMapConfig, PortMapNat
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


def _pmp_map(internal: int, external: int, lifetime: int) -> bytes:
    return bytes(natpmp.MapRequest(internal, external, lifetime))


def test_natpmp_and_pcp_answers_grant_the_suggested_port() -> None:
    sim, nat, host, _ = _site()
    client = host.bind(41000)
    (answer,) = _ask(sim, nat, client, _pmp_map(40000, 40000, 7200))
    assert natpmp.parse_response(answer) == natpmp.MapResponse(1, 0, 0, 40000, 40000, 7200)
    (address,) = _ask(sim, nat, client, bytes(natpmp.ExternalAddressRequest()))
    assert natpmp.parse_response(address) == natpmp.ExternalAddressResponse(0, 0, nat.public_ip)
    (announce,) = _ask(sim, nat, client, bytes(pcp.Request(pcp.ANNOUNCE, 0, host.ip)))
    assert pcp.parse_response(announce) == pcp.Response(pcp.ANNOUNCE, 0, 0, 0)
    nonce = bytes(range(12))
    body = pcp.MapData(nonce, pcp.PROTO_UDP, 40001, 40001, "0.0.0.0")
    (mapped,) = _ask(sim, nat, client, bytes(pcp.Request(pcp.MAP, 3, host.ip, body)))
    got = pcp.parse_response(mapped)
    # miniupnpd's PCP floor: a 3 s ask gets min_lifetime (10 s, the kernel lab's setting).
    want = pcp.MapData(nonce, pcp.PROTO_UDP, 40001, 40001, nat.public_ip)
    assert got == pcp.Response(pcp.MAP, 0, 10, 0, want)
    assert nat.responder.stats["leases_granted"] == 2
    # A PCP client that lies about its address is refused (RFC 6887 section 8.3).
    (lie,) = _ask(sim, nat, client, bytes(pcp.Request(pcp.MAP, 3, "198.18.1.99", body)))
    assert pcp.parse_response(lie).result == pcp.ResultCode.ADDRESS_MISMATCH


def test_a_protocol_not_offered_stays_silent_and_junk_is_counted() -> None:
    sim, nat, host, _ = _site(frozenset({"upnp"}))
    client = host.bind(41000)
    assert _ask(sim, nat, client, _pmp_map(40000, 40000, 7200)) == []
    assert _ask(sim, nat, client, bytes(pcp.Request(pcp.ANNOUNCE, 0, host.ip))) == []
    stats = nat.responder.stats
    assert (stats["natpmp_not_offered"], stats["pcp_not_offered"]) == (1, 1)
    sim, nat, host, _ = _site()
    client = host.bind(41000)
    for junk in (b"", b"\x00", b"\x00\x01short", b"\x02" + bytes(22), b"\x07garbage" * 5):
        assert _ask(sim, nat, client, junk) == []
    assert nat.responder.stats["junk"] == 5
    assert nat.responder.leases == {}


def test_a_lease_forwards_whatever_the_filtering_and_replies_leave_by_it() -> None:
    sim, nat, host, remote = _site()
    sock = host.bind(40000)
    _ask(sim, nat, host.bind(41000), _pmp_map(40000, 40000, 7200))
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
    sim, nat, host, remote = _site()
    sock = host.bind(40000)
    client = host.bind(41000)
    _ask(sim, nat, client, _pmp_map(40000, 40000, 60))
    inside = _inbox(sock)
    outside = remote.bind(7000)
    sim.run_for(59.0)  # the lease was granted 0.1 s ago, for 60 s
    outside.sendto(b"alive", (nat.public_ip, 40000))
    sim.run_for(1.5)
    outside.sendto(b"expired", (nat.public_ip, 40000))
    sim.run_for(0.5)
    assert [d for d, _ in inside] == [b"alive"]
    assert nat.responder.stats["leases_expired"] == 1
    _ask(sim, nat, client, _pmp_map(40000, 40000, 60))
    nat.delete_lease(sock.address)
    outside.sendto(b"deleted", (nat.public_ip, 40000))
    sim.run_for(0.5)
    _ask(sim, nat, client, _pmp_map(40000, 40000, 60))  # renewed: the same port
    outside.sendto(b"renewed", (nat.public_ip, 40000))
    sim.run_for(0.5)
    assert [d for d, _ in inside] == [b"alive", b"renewed"]


def test_a_port_held_by_another_host_is_not_leased() -> None:
    sim, nat, host, remote = _site(profile="port-restricted")
    other = sim.add_host(behind=nat)
    other.bind(40000).sendto(b"x", (remote.ip, 7000))  # takes public port 40000 (preserving)
    sim.run_for(0.1)
    (answer,) = _ask(sim, nat, host.bind(41000), _pmp_map(40000, 40000, 7200))
    granted = natpmp.parse_response(answer)
    assert isinstance(granted, natpmp.MapResponse)
    assert granted.external_port not in (0, 40000)


# -- the worker's client (the core's PortMapper on the simulated network) -----------------------


def _client(protocols: frozenset[str]) -> tuple[Simulation, SimPortMapClient, list[object]]:
    sim, nat, host, _ = _site(protocols)
    got: list[object] = []
    client = SimPortMapClient(sim.clock, host, nat, (host.ip, 40000), got.append, random.Random(1))
    client.start()
    sim.run_for(2.0)
    assert client.settled
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
    assert got == [
        PortMapping(protocol=chosen, ip=client.nat.public_ip, port=40000, lifetime_s=7200.0)
    ]


def test_client_settles_with_nothing_when_nothing_answers() -> None:
    _, client, got = _client(frozenset())
    assert got == []
    assert client.answered == set()
    assert client.mapper.state == "unavailable"


def test_client_renews_at_half_life_and_deletes_on_stop() -> None:
    sim, client, got = _client(frozenset({"nat-pmp"}))
    nat = client.nat
    sim.run_for(3600.0)
    assert (client.stats["portmap_renewals"], client.stats["portmap_grants"]) == (1, 2)
    assert len(got) == 1  # the same mapping: nothing new to tell the engine
    client.stop()
    sim.run_for(1.0)
    assert nat.responder.leases == {}


@pytest.mark.parametrize("protocol", ["pcp", "upnp"])
def test_client_deletes_its_mapping_on_stop(protocol: str) -> None:
    sim, client, got = _client(frozenset({protocol}))
    assert client.nat.responder.lease_for(client.internal, sim.now) is not None
    client.stop()
    sim.run_for(1.0)
    assert client.nat.responder.leases == {}
    assert got[-1] is None  # the mapper says it is gone: the engine stops offering it


def test_client_drops_answers_not_from_the_gateway() -> None:
    sim, client, got = _client(frozenset({"nat-pmp"}))
    intruder = sim.add_host(behind=client.nat)
    forged = bytes(natpmp.MapResponse(1, 0, 9, 40000, 1234, 7200))
    for _ in range(3):
        intruder.bind(0).sendto(forged, client.socket.address)
    sim.run_for(1.0)
    assert client.stats["portmap_drop_not_gateway"] == 3
    assert len(got) == 1


def test_a_rebooted_router_is_noticed_and_the_mapping_made_again() -> None:
    sim, client, got = _client(frozenset({"pcp"}))
    sim.run_for(2000.0)
    client.nat.reboot(5.0)  # loses every lease, its epoch starts again
    sim.run_for(3600.0)  # the renewal's answer carries the new epoch
    assert client.stats["portmap_drop_epoch"] >= 1
    assert client.nat.responder.lease_for(client.internal, sim.now) is not None
    assert got[-1] is not None


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
    """A symmetric+pcp site whose router grants ``lease_s`` (PCP: its max_lifetime caps it)."""
    sim = Simulation(seed=seed)
    config = PortMapConfig(protocols=frozenset({"pcp"}), max_lifetime_s=lease_s)
    nat = sim.add_nat("symmetric", portmap=config, name="nat_a")
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
    """A conntrack flush kills the flow too: the link is lost and punching to the mapped port
    fails until the worker's renewal (half of the 120 s lease) makes the lease again; then the
    engines re-punch through it, and chat flows exactly once."""
    sim, nat, link = _mapped_link(seed=4, lease_s=120.0)
    a, b = link.a, link.b
    assert nat.delete_lease(a.local_address, flush=True) is not None
    during = b.send_chat("during the outage")
    sim.run_for(90.0)
    assert "lost" in a.states and a.state == b.state == "connected"
    assert a.portmap is not None and a.portmap.stats["portmap_renewals"] >= 1
    assert nat.responder.lease_for(a.local_address, sim.now) is not None
    assert b.engine.method == a.engine.method == "port-mapping"
    after = b.send_chat("after the lease came back")
    sim.run_for(10.0)
    assert a.chats_received.count("after the lease came back") == 1
    assert after in [e.msg_id for e in b.events_of(ev.ChatDelivered)]  # type: ignore[attr-defined]
    # The one sent into the dead path is never duplicated; the sender is told its fate.
    assert a.chats_received.count("during the outage") <= 1
    fates = b.events_of(ev.ChatDelivered) + b.events_of(ev.ChatFailed)
    assert during in [e.msg_id for e in fates]  # type: ignore[attr-defined]


def test_hostile_requests_never_crash_the_router() -> None:
    """Mutations of valid requests and random bytes: each is answered or dropped and counted."""
    _, nat, host, _ = _site(frozenset({"nat-pmp", "pcp", "upnp"}))
    rng = random.Random(18)
    body = pcp.MapData(bytes(12), pcp.PROTO_UDP, 40000, 40000, "0.0.0.0")
    seeds = [
        _pmp_map(40000, 40000, 7200),
        bytes(natpmp.ExternalAddressRequest()),
        bytes(pcp.Request(pcp.MAP, 7200, host.ip, body)),
        bytes(pcp.Request(pcp.ANNOUNCE, 0, host.ip)),
    ]
    src = (host.ip, 41000)
    answered = 0
    for i in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 5 == 0:
            data = bytearray(rng.randbytes(rng.randint(0, 1200)))
        answered += nat.responder.handle_datagram(bytes(data), src, float(i)) is not None
    stats = nat.responder.stats
    assert 0 < answered < 3000 and stats["junk"] > 0
    # Whatever was granted went to the sender's own address, never elsewhere.
    assert {lease.internal[0] for lease in nat.responder.leases.values()} <= {host.ip}
