"""Hole punching in the sans-I/O core, through the in-memory network (fake clock, no sleeps)."""

from __future__ import annotations

import itertools

import pytest

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.punch import Checklist
from p2plab.core.session import PeerSession
from p2plab.core.wire import MessageType, Probe, ProbeAck, datagram_type, parse_datagram
from tests.core_sim import Network, Node, pair

LATENCY = 0.01


def both_connected(a: Node, b: Node) -> bool:
    return a.session.state == "connected" and b.session.state == "connected"


def types_sent(node: Node) -> list[int | None]:
    return [datagram_type(data) for _, data, _ in node.sent]


def test_direct_link_connects_both_sides_once() -> None:
    net = Network(seed=1, latency=LATENCY)
    a, b = pair(net)
    start = net.now
    assert a.session.state == b.session.state == "punching"
    assert net.run_until(lambda: both_connected(a, b), timeout=5)
    assert a.session.peer_address == b.local
    assert b.session.peer_address == a.local
    net.run_for(1)
    for node in (a, b):
        connected = node.of_type(ev.PeerConnected)
        assert len(connected) == 1
        assert isinstance(connected[0], ev.PeerConnected)
        assert connected[0].rtt == pytest.approx(2 * LATENCY)
        assert node.session.rtt == pytest.approx(2 * LATENCY)
    # a full round trip cannot take less than two one-way latencies
    assert net.now - start >= 2 * LATENCY


def test_link_up_only_after_our_probe_is_acknowledged() -> None:
    """Record the moment each side connects: it must already hold an ack of its own probe."""
    net = Network(seed=2, latency=LATENCY)
    a, b = pair(net)
    checks: list[bool] = []

    def on_event(node: Node, event: ev.Event) -> None:
        if isinstance(event, ev.PeerConnected):
            sent_nonces = {
                parse_datagram(d).nonce  # type: ignore[attr-defined]
                for _, d, _ in node.sent
                if datagram_type(d) == MessageType.PROBE
            }
            acked = [
                parse_datagram(d)
                for _, d, src in node.received
                if datagram_type(d) == MessageType.PROBE_ACK and src == event.address
            ]
            checks.append(any(p.nonce in sent_nonces for p in acked))  # type: ignore[attr-defined]

    net.on_event = on_event
    assert net.run_until(lambda: both_connected(a, b), timeout=5)
    assert checks == [True, True]


@pytest.mark.parametrize("blocked", ["a", "b"])
def test_one_way_path_never_connects_and_times_out(blocked: str) -> None:
    config = SessionConfig(punch_timeout=3.0)
    net = Network(seed=3, latency=LATENCY)
    a, b = pair(net, config=config)
    net.drop = lambda node, dest, data: node.name == blocked
    start = net.now
    lost_at: dict[str, float] = {}
    net.on_event = lambda node, event: (
        lost_at.setdefault(node.name, net.now) if isinstance(event, ev.PeerLost) else None
    )
    net.run_until(lambda: len(lost_at) == 2, timeout=10)
    for node in (a, b):
        assert node.of_type(ev.PeerConnected) == []
        assert node.of_type(ev.PeerLost) == [ev.PeerLost("punch timeout")]
        assert node.session.state == "lost"
        assert node.session.peer_address is None
        assert node.session.get_timer() is None
        assert lost_at[node.name] == pytest.approx(start + 3.0)
    # the blocked side heard the other's probes and answered them; the answers were lost
    deaf = a if blocked == "a" else b
    assert deaf.session.stats["probes_received"] > 0
    assert MessageType.PROBE_ACK in types_sent(deaf)


def test_peer_reflexive_address_when_the_announced_port_is_wrong() -> None:
    """b is behind a NAT that maps it to port 40001, but the rendezvous announced 40000."""
    net = Network(seed=4, latency=LATENCY)
    a_public = ("203.0.113.1", 50000)
    b_public = ("198.51.100.2", 40001)
    b_announced = ("198.51.100.2", 40000)
    a, b = pair(net, a_public=a_public, b_public=b_public, b_announced=b_announced)
    assert net.run_until(lambda: both_connected(a, b), timeout=5)
    assert a.session.peer_address == b_public
    assert b.session.peer_address == a_public
    assert a.session.stats["prflx_learned"] == 1
    assert a.session.candidates == [b_announced, b_public]
    assert net.undeliverable > 0  # probes to the announced port went nowhere
    # a answered b's probe at the address it really came from (RFC 8445 7.3.1.3)
    acks = [
        (parse_datagram(d), dest)
        for _, d, dest in a.sent
        if datagram_type(d) == MessageType.PROBE_ACK
    ]
    assert acks and all(dest == b_public for _, dest in acks)
    assert all(p.observed == b_public for p, _ in acks)  # type: ignore[attr-defined]


def test_lan_candidate_used_when_public_one_does_not_hairpin() -> None:
    net = Network(seed=5, latency=LATENCY)
    nat = ("203.0.113.9", 1000)  # a NAT that does not hairpin: nobody owns this address
    a = net.add(
        "a",
        local_id="alice",
        peer_id="bob",
        role="controlling",
        local=("198.18.0.1", 4000),
        candidates=[nat, ("198.18.0.2", 4000)],
    )
    b = net.add(
        "b",
        local_id="bob",
        peer_id="alice",
        role="controlled",
        local=("198.18.0.2", 4000),
        candidates=[nat, ("198.18.0.1", 4000)],
    )
    assert net.run_until(lambda: both_connected(a, b), timeout=5)
    assert a.session.peer_address == ("198.18.0.2", 4000)
    assert b.session.peer_address == ("198.18.0.1", 4000)


def test_punching_survives_heavy_loss() -> None:
    net = Network(seed=6, latency=LATENCY, loss=0.5, jitter=0.02, duplicate=0.1)
    a, b = pair(net)
    assert net.run_until(lambda: both_connected(a, b), timeout=10)
    assert a.session.peer_address == b.local and b.session.peer_address == a.local


def test_probe_schedule_backs_off_up_to_the_ceiling() -> None:
    config = SessionConfig(
        punch_timeout=8.0,
        probe_interval=0.1,
        probe_backoff=2.0,
        probe_max_interval=1.0,
        probes_per_candidate=20,  # the schedule, not the budget (tests/core/test_budget.py)
    )
    net = Network(seed=7)
    a = net.add(
        "a",
        local_id="alice",
        peer_id="bob",
        role="controlling",
        local=("198.18.0.1", 1),
        candidates=[("198.18.0.99", 9)],  # nobody there
        config=config,
    )
    net.run_until(lambda: a.session.state == "lost", timeout=20)
    times = [t for t, d, _ in a.sent if datagram_type(d) == MessageType.PROBE]
    gaps = [round(t2 - t1, 6) for t1, t2 in itertools.pairwise(times)]
    assert gaps[:4] == [0.1, 0.2, 0.4, 0.8]
    assert all(g == 1.0 for g in gaps[4:])
    assert len(times) == 4 + 1 + int((8.0 - 1.5) // 1.0)  # paced until the punch timeout


def _lone(role: str, candidates: list[tuple[str, int]]) -> PeerSession:
    counter = iter(range(1, 10_000))
    return PeerSession(
        local_id="bob",
        peer_id="alice",
        role=role,  # type: ignore[arg-type]
        candidates=candidates,
        config=SessionConfig(),
        now=0.0,
        rand_bytes=lambda n: next(counter).to_bytes(n, "big"),
    )


def test_controlled_side_waits_for_nomination() -> None:
    x = ("198.51.100.7", 5555)
    s = _lone("controlled", [])
    assert s.datagrams_to_send(0.0) == []  # nothing to probe yet
    s.receive_datagram(bytes(Probe("alice", "bob", b"N" * 8, False, ("198.18.0.2", 1))), x, 0.1)
    out = s.datagrams_to_send(0.1)
    kinds = [(type(parse_datagram(d)), dest) for d, dest in out]
    assert (ProbeAck, x) in kinds  # answered where it came from
    assert (Probe, x) in kinds  # and a triggered check of that peer-reflexive address
    assert s.candidates == [x]
    our_probe = next(parse_datagram(d) for d, dest in out if datagram_type(d) == MessageType.PROBE)
    assert isinstance(our_probe, Probe) and our_probe.target == x
    s.receive_datagram(bytes(ProbeAck("alice", "bob", our_probe.nonce, False, x)), x, 0.15)
    assert s.state == "punching"  # a round trip, but the controlling side has not chosen yet
    assert s.next_event() is None
    s.receive_datagram(bytes(Probe("alice", "bob", b"M" * 8, True, ("198.18.0.2", 1))), x, 0.2)
    assert s.state == "connected"
    assert s.peer_address == x
    assert s.next_event() == ev.PeerConnected(x, pytest.approx(0.05))


def test_probe_alone_does_not_connect_the_controlling_side() -> None:
    x = ("198.51.100.7", 5555)
    s = _lone("controlling", [])
    s.receive_datagram(bytes(Probe("alice", "bob", b"N" * 8, False, ("198.18.0.2", 1))), x, 0.1)
    s.handle_timer(0.1)
    assert s.state == "punching"
    # an ack with a nonce we never sent proves nothing
    s.receive_datagram(bytes(ProbeAck("alice", "bob", b"Z" * 8, False, x)), x, 0.2)
    assert s.state == "punching"
    assert s.stats["probe_acks_unmatched"] == 1


def test_ack_from_another_address_does_not_validate_the_pair() -> None:
    cl = Checklist.start([("10.0.0.1", 1)], SessionConfig(), now=0.0)
    (cand,) = cl.due(0.0)
    cl.record_probe(cand, b"n" * 8, 0.0, nominate=False)
    assert cl.match_ack(b"n" * 8, ("10.0.0.2", 1), 0.1) is None  # RFC 8445 7.2.5.2.1
    matched = cl.match_ack(b"n" * 8, ("10.0.0.1", 1), 0.1)
    assert matched is not None and matched[0].succeeded and matched[1] == pytest.approx(0.1)


def test_unusable_candidates_are_ignored() -> None:
    s = _lone("controlling", [("10.0.0.1", 0), ("", 5), ("10.0.0.2", 7), ("10.0.0.2", 7)])
    assert s.candidates == [("10.0.0.2", 7)]


def test_nat_rebinding_moves_the_path() -> None:
    net = Network(seed=8, latency=LATENCY)
    a, b = pair(net, b_public=("198.51.100.2", 40000))
    assert net.run_until(lambda: both_connected(a, b), timeout=5)
    net.run_for(1)
    # b's NAT forgets the mapping and picks a new port
    new = ("198.51.100.2", 40123)
    b.public = new
    net._by_addr[new] = b
    assert net.run_until(lambda: a.session.peer_address == new, timeout=15)
    assert [e for e in a.events if isinstance(e, ev.PathChanged)] == [
        ev.PathChanged(new, ("198.51.100.2", 40000), path="direct", previous_path="direct")
    ]
    assert a.session.state == b.session.state == "connected"


def test_controlled_side_connects_on_implicit_nomination() -> None:
    """Every flagged probe is lost: b still follows a once a's traffic comes from a checked path."""

    def drop(node: Node, dest: object, data: bytes) -> bool:
        if node.name != "a" or datagram_type(data) != MessageType.PROBE:
            return False
        probe = parse_datagram(data)
        return isinstance(probe, Probe) and probe.nominate

    net = Network(seed=9, latency=LATENCY)
    net.drop = drop
    a, b = pair(net)
    assert net.run_until(lambda: a.session.state == "connected", timeout=5)
    net.run_for(0.5)
    assert b.session.state == "punching"  # no nomination yet
    a.session.send_chat("hi", net.now)
    assert net.run_until(lambda: b.session.state == "connected", timeout=5)
    assert b.session.peer_address == a.local
    assert net.run_until(lambda: bool(a.of_type(ev.ChatDelivered)), timeout=5)
    assert [e.text for e in b.events if isinstance(e, ev.ChatReceived)] == ["hi"]
    assert a.session.stats["retransmits"] == 0  # the first copy was accepted on connecting
