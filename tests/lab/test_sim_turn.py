"""The simulator's TURN server model against the core's TurnClient, in memory on a fake clock:
allocation with coturn's REST credentials, permissions, Send/Data indications and ChannelData
both ways, bad and expired credentials, data without a permission, lifetimes and stale nonces,
the same over a TCP stream; then the server on the simulated network."""

from __future__ import annotations

import itertools
import random
from typing import Any

from p2plab.core.stun import Class, Message, Method, parse_message
from p2plab.core.turn import (
    CHANNEL_MIN,
    Allocated,
    AllocationFailed,
    ChannelBound,
    PeerData,
    PermissionCreated,
    Refreshed,
    Released,
    TurnClient,
    TurnEvent,
    encode_channel_data,
)
from p2plab.core.turn_config import turn_credentials
from p2plab.lab.sim import Simulation
from p2plab.lab.sim.turn_model import (
    RELAY_PORTS,
    SIM_TURN_REALM,
    Outgoing,
    TurnServerModel,
)
from p2plab.lab.sim.world import TURN_IP
from p2plab.lab.simnet import SimSocket, TimerHandle

SERVER = ("192.0.2.10", 3478)
CLIENT = ("198.51.100.7", 40000)
PEER = ("203.0.113.5", 6000)
STRANGER = ("203.0.113.66", 6000)
SECRET = "sim-secret"


def counter_bytes(start: int = 1) -> Any:
    counter = itertools.count(start)
    return lambda n: next(counter).to_bytes(n, "big")


class Harness:
    """One client, one server model, and what reached peers."""

    def __init__(
        self,
        *,
        worker: str = "w1",
        issued_at: float = 0.0,
        ttl: float = 600.0,
        password: str | None = None,
        client_addr: tuple[str, int] = CLIENT,
        model: TurnServerModel | None = None,
        first_tid: int = 1,
        tcp: bool = False,
    ) -> None:
        self.model = model or TurnServerModel(SERVER, SECRET, rand_bytes=random.Random(1).randbytes)
        username, good = turn_credentials(SECRET, worker, issued_at, ttl)
        self.client_addr = client_addr
        self.tcp = tcp
        self.client = TurnClient(
            SERVER,
            username,
            password or good,
            rand_bytes=counter_bytes(first_tid),
            transport="tcp" if tcp else "udp",
        )
        self.to_peers: list[Outgoing] = []

    def deliver(self, out: list[Outgoing], now: float) -> None:
        for item in out:
            if item.destination == self.client_addr:
                assert item.local == SERVER and item.stream == self.tcp
                self.client.receive(item.data, item.local, now)
            else:
                self.to_peers.append(item)

    def pump(self, now: float) -> list[TurnEvent]:
        for _ in range(20):
            out = self.client.datagrams_to_send(now)
            if not out:
                break
            for data, addr in out:
                assert addr == SERVER
                if self.tcp:
                    self.deliver(self.model.receive_stream(data, self.client_addr, now), now)
                else:
                    self.deliver(self.model.receive(data, self.client_addr, now), now)
        events = []
        while (event := self.client.next_event()) is not None:
            events.append(event)
        return events

    def run_until(self, end: float, now: float) -> list[TurnEvent]:
        """Drive the client's timers from ``now`` to ``end``; all events."""
        events = self.pump(now)
        while (at := self.client.get_timer()) is not None and at <= end:
            now = max(now, at)
            self.client.handle_timer(now)
            events += self.pump(now)
        return events

    def from_peer(self, data: bytes, peer: tuple[str, int], now: float) -> list[TurnEvent]:
        relayed = self.client.relayed
        assert relayed is not None
        self.deliver(self.model.receive(data, peer, now, relayed), now)
        return self.pump(now)


def allocated(**kwargs: Any) -> Harness:
    h = Harness(**kwargs)
    h.client.allocate(0.0)
    events = h.pump(0.0)
    assert len(events) == 1 and isinstance(events[0], Allocated), events
    return h


def test_allocate_with_rest_credentials_after_a_401() -> None:
    h = allocated()
    event = h.client.relayed
    assert event is not None and event[0] == SERVER[0]
    assert RELAY_PORTS[0] <= event[1] <= RELAY_PORTS[1]
    assert h.client.mapped == CLIENT and h.client.lifetime == 600
    assert h.model.relayed_addresses() == {event}
    assert h.model.allocation_of(CLIENT) == event
    # the first Allocate was challenged (401 with REALM and NONCE), the retry allocated
    assert h.model.stats["challenged"] == 1 and h.model.stats["allocations"] == 1
    assert h.model.stats["error_401"] == 1


def test_permission_then_send_and_data_indications() -> None:
    h = allocated()
    h.client.create_permission(PEER[0], 1.0)
    assert h.pump(1.0) == [PermissionCreated(PEER[0])]
    h.client.send(PEER, b"hello peer", 2.0)
    h.pump(2.0)
    assert [(o.data, o.local, o.destination) for o in h.to_peers] == [
        (b"hello peer", h.client.relayed, PEER)
    ]
    assert h.from_peer(b"hello client", PEER, 3.0) == [PeerData(PEER, b"hello client", None)]
    assert h.model.stats["relayed_to_peer"] == 1 and h.model.stats["relayed_to_client"] == 1


def test_channel_data_both_ways() -> None:
    h = allocated()
    channel = h.client.bind_channel(PEER, 1.0)
    assert channel == CHANNEL_MIN
    assert h.pump(1.0) == [ChannelBound(PEER, channel)]
    h.client.send(PEER, b"over the channel", 2.0)
    h.pump(2.0)
    assert h.client.stats["sent_channel"] == 1
    assert [(o.data, o.destination) for o in h.to_peers] == [(b"over the channel", PEER)]
    # the binding installed the permission, and the answer comes back as ChannelData
    assert h.from_peer(b"back", PEER, 3.0) == [PeerData(PEER, b"back", channel)]
    assert h.client.stats["received_channel"] == 1
    # another port of the same IP is permitted (permissions are per IP) but has no channel
    other_port = (PEER[0], 7000)
    assert h.from_peer(b"side", other_port, 3.0) == [PeerData(other_port, b"side", None)]


def test_bad_credentials_are_refused_with_401() -> None:
    h = Harness(password="not-the-hmac")
    h.client.allocate(0.0)
    [event] = h.pump(0.0)
    assert isinstance(event, AllocationFailed) and event.code == 401
    assert h.model.stats["bad_integrity"] == 1 and h.model.relayed_addresses() == set()


def test_credentials_of_another_secret_or_realm_fail() -> None:
    model = TurnServerModel(SERVER, "another-secret", rand_bytes=random.Random(2).randbytes)
    h = Harness(model=model)
    h.client.allocate(0.0)
    [event] = h.pump(0.0)
    assert isinstance(event, AllocationFailed) and event.code == 401


def test_expired_credentials_cannot_allocate_but_an_allocation_outlives_them() -> None:
    late = Harness(issued_at=0.0, ttl=60.0)
    late.client.allocate(61.0)
    [event] = late.pump(61.0)
    assert isinstance(event, AllocationFailed) and event.code == 401
    assert late.model.stats["expired_credentials"] == 1

    # made in time, the allocation keeps being refreshed after the username's expiry (coturn),
    # and a refresh after the nonce's 600 s goes through a 438 and a retry
    h = allocated(ttl=60.0)
    events = h.run_until(1300.0, 0.0)
    refreshes = [e for e in events if isinstance(e, Refreshed)]
    assert len(refreshes) == 2 and not any(isinstance(e, AllocationFailed) for e in events)
    assert h.model.stats["stale_nonce"] >= 1 and h.model.stats["refreshed"] == 2


def test_no_permission_no_relaying() -> None:
    h = allocated()
    # a peer nobody permitted: dropped at the server
    assert h.from_peer(b"unsolicited", STRANGER, 1.0) == []
    assert h.model.stats["no_permission"] == 1
    h.client.create_permission(PEER[0], 1.0)
    h.pump(1.0)
    assert h.from_peer(b"still not", STRANGER, 2.0) == []
    assert h.model.stats["no_permission"] == 2
    # a Send indication to an unpermitted peer is dropped too (crafted: the client would send it)
    send = Message(
        Method.SEND,
        Class.INDICATION,
        b"x" * 12,
        {"XOR-PEER-ADDRESS": STRANGER, "DATA": b"out"},
    )
    assert h.model.receive(bytes(send), CLIENT, 2.0) == []
    assert h.model.stats["no_permission"] == 3 and h.to_peers == []
    # ... and the same from a client without an allocation
    assert h.model.receive(bytes(send), ("198.51.100.99", 1), 2.0) == []


def test_permissions_and_allocations_expire_on_the_clock() -> None:
    h = allocated()
    relayed = h.client.relayed
    assert relayed is not None
    h.client.create_permission(PEER[0], 1.0)
    h.pump(1.0)
    assert h.model.get_timer() == 301.0  # the permission is the first to run out
    # nobody refreshes (the client is not driven): the permission goes at 301 s
    assert h.model.receive(b"late", PEER, 302.0, relayed) == []
    assert h.model.stats["no_permission"] == 1
    h.model.handle_timer(600.0)
    assert h.model.relayed_addresses() == set() and h.model.stats["expired_allocations"] == 1
    assert h.model.receive(b"gone", PEER, 601.0, relayed) == []
    assert h.model.stats["no_allocation_for_peer"] == 1


def test_release_and_a_second_allocate_from_the_same_address() -> None:
    h = allocated()
    other = Harness(model=h.model, first_tid=1000)  # another client, same 5-tuple
    other.client.allocate(1.0)
    [event] = other.pump(1.0)
    assert isinstance(event, AllocationFailed) and event.code == 437
    h.client.release(2.0)
    assert h.pump(2.0) == [Released()]
    assert h.model.relayed_addresses() == set() and h.model.stats["released"] == 1


def test_a_retransmitted_allocate_gets_the_same_answer() -> None:
    model = TurnServerModel(SERVER, SECRET, rand_bytes=random.Random(3).randbytes)
    h = Harness(model=model)
    h.client.allocate(0.0)
    [(first, _)] = h.client.datagrams_to_send(0.0)
    [challenge] = model.receive(first, CLIENT, 0.0)
    h.client.receive(challenge.data, SERVER, 0.0)
    [(request, _)] = h.client.datagrams_to_send(0.0)
    [answer] = model.receive(request, CLIENT, 0.0)
    [again] = model.receive(request, CLIENT, 0.5)  # the answer was lost; the client resends
    assert again.data == answer.data and len(model.relayed_addresses()) == 1
    reply = parse_message(answer.data)
    assert reply.message_class is Class.RESPONSE
    assert parse_message(challenge.data).attributes["REALM"] == SIM_TURN_REALM


def test_junk_is_dropped_and_counted() -> None:
    model = TurnServerModel(SERVER, SECRET, rand_bytes=random.Random(4).randbytes)
    for junk in (b"", b"\x00", b"\x40\x00\x00\x03abc", b"\xff" * 40, bytes(20)):
        assert model.receive(junk, CLIENT, 0.0) == []
    assert model.stats["junk"] == 4 and model.stats["unknown_channel"] == 1
    response = Message(Method.ALLOCATE, Class.RESPONSE, b"y" * 12, {})
    assert model.receive(bytes(response), CLIENT, 0.0) == []
    # a forged nonce is stale: 438 with a fresh one, never an allocation
    forged = Message(
        Method.ALLOCATE,
        Class.REQUEST,
        b"z" * 12,
        {"REQUESTED-TRANSPORT": 17, "USERNAME": "9999999999:w", "REALM": SIM_TURN_REALM,
         "NONCE": "ffffffff-00"},
    )  # fmt: skip
    forged.add_message_integrity(b"k" * 16)
    [out] = model.receive(bytes(forged), CLIENT, 0.0)
    assert parse_message(out.data).attributes["ERROR-CODE"][0] == 438
    assert model.relayed_addresses() == set()


# --- over TCP (RFC 8656 section 7: the client's fallback) -----------------------------------


def test_over_tcp_allocate_relay_both_ways_and_the_connection_ends_the_allocation() -> None:
    h = allocated(tcp=True)
    relayed = h.client.relayed
    assert relayed is not None and h.model.allocation_of(CLIENT, tcp=True) == relayed
    assert h.model.allocation_of(CLIENT) is None  # a UDP client on the same address is another
    channel = h.client.bind_channel(PEER, 1.0)
    assert h.pump(1.0) == [ChannelBound(PEER, channel)]
    h.client.send(PEER, b"odd", 2.0)  # 3 bytes: padded to 4 on the stream, not to the peer
    h.pump(2.0)
    assert [(o.data, o.destination, o.stream) for o in h.to_peers] == [(b"odd", PEER, False)]
    [out] = h.model.receive(b"12345", PEER, 3.0, relayed)
    assert out.stream and out.data == encode_channel_data(channel, b"12345", pad=True)
    h.client.receive(out.data, SERVER, 3.0)
    assert h.client.next_event() == PeerData(PEER, b"12345", channel)
    # a request split across two reads is framed whole
    h.client.create_permission("203.0.113.77", 4.0)
    [(request, _)] = h.client.datagrams_to_send(4.0)
    assert h.model.receive_stream(request[:7], CLIENT, 4.0) == []
    h.deliver(h.model.receive_stream(request[7:], CLIENT, 4.0), 4.0)
    assert h.client.next_event() == PermissionCreated("203.0.113.77")
    h.model.close_stream(CLIENT)
    assert h.model.relayed_addresses() == set()
    assert h.model.receive(b"late", PEER, 5.0, relayed) == []


def test_a_tcp_stream_that_stops_framing_is_dropped_with_its_allocation() -> None:
    h = allocated(tcp=True)
    assert h.model.receive_stream(b"\xc0\x00\x00\x00", CLIENT, 1.0) == []
    assert h.model.stats["stream_junk"] == 1 and h.model.relayed_addresses() == set()


# --- on the simulated network ---------------------------------------------------------------


class SimTurnDriver:
    """Drives a TurnClient on one simulated socket, on the simulation's clock."""

    def __init__(self, sim: Simulation, sock: SimSocket, client: TurnClient) -> None:
        self.sim, self.sock, self.client = sim, sock, client
        self.events: list[TurnEvent] = []
        self._timer: TimerHandle | None = None
        sock.on_datagram = self._on_datagram

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client.receive(data, addr, self.sim.now)
        self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        self.client.handle_timer(self.sim.now)
        self.flush()

    def flush(self) -> None:
        for data, addr in self.client.datagrams_to_send(self.sim.now):
            self.sock.sendto(data, addr)
        while (event := self.client.next_event()) is not None:
            self.events.append(event)
        if self._timer is not None:
            self._timer.cancel()
        at = self.client.get_timer()
        self._timer = None if at is None else self.sim.clock.call_at(at, self._on_timer)


def test_two_clients_behind_symmetric_nats_relay_through_the_simulated_server() -> None:
    sim = Simulation(seed=5)
    server = sim.add_turn_server(secret=SECRET)
    assert server.address == (TURN_IP, 3478) and sim.turn is server
    drivers = []
    for name in ("a", "b"):
        host = sim.add_host(behind=sim.add_nat("symmetric"))
        username, password = turn_credentials(SECRET, name, sim.now, 600)
        client = TurnClient(server.address, username, password, rand_bytes=sim.rng.randbytes)
        drivers.append(SimTurnDriver(sim, host.bind(), client))
    a, b = drivers
    for d in drivers:
        d.client.allocate(sim.now)
        d.flush()
    sim.run_for(2.0)
    assert [type(e) for e in a.events] == [Allocated] and [type(e) for e in b.events] == [Allocated]
    assert a.client.relayed is not None and b.client.relayed is not None
    assert server.model.relayed_addresses() == {a.client.relayed, b.client.relayed}
    assert a.client.relayed in server.host.sockets  # a socket per relayed address
    # each permits the other's relayed IP (the server's own): relayed to relayed
    a.client.bind_channel(b.client.relayed, sim.now)
    b.client.create_permission(a.client.relayed[0], sim.now)
    a.flush()
    b.flush()
    sim.run_for(1.0)
    a.client.send(b.client.relayed, b"a to b", sim.now)
    a.flush()
    sim.run_for(1.0)
    got_b = [e for e in b.events if isinstance(e, PeerData)]
    assert got_b == [PeerData(a.client.relayed, b"a to b", None)]
    b.client.send(a.client.relayed, b"b to a", sim.now)
    b.flush()
    sim.run_for(1.0)
    got_a = [e for e in a.events if isinstance(e, PeerData)]
    assert got_a == [PeerData(b.client.relayed, b"b to a", CHANNEL_MIN)]
    # a released allocation takes its relay socket with it
    relayed = a.client.relayed
    a.client.release(sim.now)
    a.flush()
    sim.run_for(1.0)
    assert relayed not in server.host.sockets and server.stats["released"] == 1


def test_paired_workers_get_credentials_for_the_simulations_turn_server() -> None:
    sim = Simulation(seed=6)
    server = sim.add_turn_server(secret=SECRET, ttl_s=300)
    a = sim.worker(sim.add_host(name="a", behind=sim.add_nat("symmetric")))
    b = sim.worker(sim.add_host(name="b", behind=sim.add_nat("port-restricted")))
    sim.run_for(10.0)
    assert sim.rendezvous.stats["turn_credentials"] == 2
    assert sim.rendezvous.turn_urls == [server.url]
    assert a.state == b.state == "connected"  # nothing else changed for them
