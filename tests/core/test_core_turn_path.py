"""The link engine's TURN path (issue 17) in memory: two engines behind in-memory NATs, a small
TURN server on the public side, a fake clock (tests/core/turn_world.py).  Symmetric x symmetric
connects over TURN and chats; the path's names on both sides; the hostile cases (candidates from
a stranger, non-IP candidates, too many, data through the allocation from a peer without a
permission); the pseudo-address helpers."""

from __future__ import annotations

import pytest

from p2plab.config import BirthdayConfig, SessionConfig
from p2plab.core import events as ev
from p2plab.core.link import LinkConfig, SendToRendezvous
from p2plab.core.paths import (
    RELAY_ADDRESS,
    parse_turn_address,
    path_name,
    path_rank,
    turn_address,
)
from p2plab.core.signaling import CandidatesIn, CandidatesOut, NatHint, RelayCandidate
from tests.core.turn_world import TURN, TURN_IP, TurnWorld, turn_offer

HARD = NatHint(mapping="endpoint-dependent")


def chats(node: object) -> list[str]:
    return [e.text for e in node.events if isinstance(e, ev.ChatReceived)]  # type: ignore[attr-defined]


def hard_pair(seed: int = 1, **kw: object) -> tuple[TurnWorld, object, object]:
    w = TurnWorld(seed)
    a = w.add_node("alice", "hard")
    b = w.add_node("bob", "hard")
    w.pair_turn(a, b, **kw)  # type: ignore[arg-type]
    return w, a, b


# -- the helpers ----------------------------------------------------------------------------------


def test_turn_address_round_trips_and_nothing_else_parses() -> None:
    addr = turn_address(("203.0.113.5", 40000), "udp")
    assert addr == ("turn-udp|203.0.113.5", 40000)
    assert parse_turn_address(addr) == ("turn-udp", ("203.0.113.5", 40000))
    tcp = turn_address(("2001:db8::1", 7), "tcp")
    assert parse_turn_address(tcp) == ("turn-tcp", ("2001:db8::1", 7))
    for junk in [
        ("203.0.113.5", 40000),
        RELAY_ADDRESS,
        ("turn-udp|example.com", 1),
        ("turn-xyz|203.0.113.5", 1),
        ("turn-udp|203.0.113.5", 0),
        ("turn-udp|203.0.113.5", "1"),
        "turn-udp|1.2.3.4",
        None,
    ]:
        assert parse_turn_address(junk) is None, junk
    assert path_name(RELAY_ADDRESS) == "relay"
    assert path_name(("1.2.3.4", 5)) == "direct"
    assert path_name(("1.2.3.4", 5), {("1.2.3.4", 5): "turn-tcp"}) == "turn-tcp"
    assert path_name(None) is None
    ranks = [path_rank(p) for p in ("direct", "turn-udp", "turn-tcp", "relay")]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4


# -- symmetric x symmetric over TURN --------------------------------------------------------------


@pytest.mark.parametrize("hint", [None, HARD])
def test_symmetric_pair_connects_over_turn_and_chats(hint: NatHint | None) -> None:
    w = TurnWorld(3)
    a = w.add("alice", "hard", hint, LinkConfig())
    b = w.add("bob", "hard", hint, LinkConfig())
    w.pair_turn(a, b)
    # Both allocated at once (in parallel with punching) and trickled their relayed address.
    assert {n for n, _ in w.candidates_out} == {"alice", "bob"}
    assert all(m.candidates[0].ip == TURN_IP for _, m in w.candidates_out)
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 10)
    assert a.engine.state == b.engine.state == "connected"  # not the WebSocket relay
    assert a.engine.path == b.engine.path == "turn-udp"
    assert a.engine.turn_relayed is not None and b.engine.turn_relayed is not None
    conn = [e for e in a.events + b.events if isinstance(e, ev.PeerConnected)]
    assert [e.path for e in conn] == ["turn-udp", "turn-udp"]
    for i in range(5):
        a.engine.send_chat(f"a{i}", w.now)
        b.engine.send_chat(f"b{i}", w.now)
    w.run(3)
    assert chats(b) == [f"a{i}" for i in range(5)] and chats(a) == [f"b{i}" for i in range(5)]
    assert w.turn.relayed > 0
    # Keep-alives keep it up well past the peer timeout (the client refreshes by itself).
    w.run(60)
    assert a.engine.state == b.engine.state == "connected"
    assert a.engine.stats["turn_allocations"] == b.engine.stats["turn_allocations"] == 1
    # Everything on the TURN path is the pair's sealed datagrams: the server saw no chat text.
    assert a.engine.security_counts()["auth_failures"] == 0


def test_the_two_sides_name_the_path_they_use() -> None:
    """A session on its own allocation sees a pseudo-address, one on the peer's relayed address
    a real address named by its candidate: either way the path is turn-udp, and a relayed
    address the peer reaches over TCP is turn-tcp."""
    w, a, b = hard_pair(5)
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 10)
    sa, sb = a.engine.session, b.engine.session
    assert sa is not None and sb is not None
    for s, peer in ((sa, b), (sb, a)):
        addr = s.peer_address
        assert addr is not None
        parsed = parse_turn_address(addr)
        if parsed is None:  # the peer's relayed address, probed from the link socket
            assert addr in [tuple(x) for x in s.candidates] and addr[0] == TURN_IP
            assert addr == peer.engine.turn_relayed
        else:  # through our own allocation, to the peer as the TURN server sees it
            assert parsed[0] == "turn-udp" and parsed[1][0] in (TURN_IP, peer.nat.ip)
        assert s.path == s.path_of(addr) == "turn-udp"
    assert a.engine.path == b.engine.path == "turn-udp"
    assert sa.add_relay_candidate(("203.0.113.77", 9), "tcp", w.now)
    assert sa.path_of(("203.0.113.77", 9)) == "turn-tcp"
    assert sa.candidate_kind(("203.0.113.77", 9)) == "relay"


def test_without_turn_in_the_offer_a_hard_pair_still_relays() -> None:
    w = TurnWorld(2)
    a = w.add("alice", "hard", HARD, LinkConfig())
    b = w.add("bob", "hard", HARD, LinkConfig())
    w.pair(a, b)
    assert w.candidates_out == []
    assert a.engine.state == "relayed" and a.engine.path == "relay"


def test_turn_off_in_the_config_allocates_nothing() -> None:
    w = TurnWorld(2)
    a = w.add("alice", "hard", None, LinkConfig(turn=False))
    b = w.add("bob", "hard", None, LinkConfig(turn=False))
    w.pair_turn(a, b)
    w.run(12)
    assert w.candidates_out == [] and w.turn.allocs == {}
    assert a.engine.state == "relayed"


def test_the_allocation_is_released_when_the_peer_goes() -> None:
    w, a, b = hard_pair(4)
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 10)
    assert len(w.turn.allocs) == 2
    mine = [c for c, al in w.turn.allocs.items() if al.relayed == a.engine.turn_relayed]
    a.engine.stop(w.now)
    w.flush()
    assert mine and mine[0] not in w.turn.allocs  # alice's Refresh(0) reached the server
    assert a.engine.turn is None


# -- hostile input --------------------------------------------------------------------------------


def test_candidates_from_a_stranger_or_without_a_peer_are_dropped() -> None:
    w, a, _b = hard_pair(6)
    e = a.engine
    known = e.peer_relays
    assert len(known) == 1  # bob's, forwarded by the rendezvous
    cand = [RelayCandidate(ip="192.0.2.66", port=4000)]
    e.receive_rendezvous(
        CandidatesIn.model_validate({"from": "mallory", "candidates": cand}), w.now
    )
    assert e.stats["candidates_in_dropped"] == 1 and e.peer_relays == known
    s = e.session
    assert s is not None and s.candidate_kind(("192.0.2.66", 4000)) is None
    fresh = TurnWorld(7).add_node("carol", "easy")
    fresh.engine.receive_rendezvous(
        CandidatesIn.model_validate({"from": "dave", "candidates": cand}), w.now
    )
    assert fresh.engine.stats["candidates_in_dropped"] == 1


def test_non_ip_and_too_many_candidates_are_dropped() -> None:
    w = TurnWorld(8)
    w.forward_candidates = False
    a = w.add_node("alice", "hard")
    b = w.add_node("bob", "hard")
    w.pair_turn(a, b)
    e = a.engine
    names = [RelayCandidate.model_construct(ip="relay.example", port=5, transport="udp")]
    e.receive_rendezvous(CandidatesIn.model_construct(from_="bob", candidates=names), w.now)
    assert e.stats["candidates_in_dropped"] == 1 and e.peer_relays == []
    many = [RelayCandidate(ip="192.0.2.1", port=1000 + i) for i in range(4)]
    e.receive_rendezvous(CandidatesIn.model_validate({"from": "bob", "candidates": many}), w.now)
    more = [RelayCandidate(ip="192.0.2.1", port=2000 + i) for i in range(3)]
    more.append(many[0])  # known: not new, not dropped
    e.receive_rendezvous(CandidatesIn.model_validate({"from": "bob", "candidates": more}), w.now)
    assert len(e.peer_relays) == 4 and e.stats["candidates_in_dropped"] == 1 + 3
    s = e.session
    assert s is not None
    assert [s.candidate_kind(("192.0.2.1", 1000 + i)) for i in range(4)] == ["relay"] * 4
    assert s.candidate_kind(("192.0.2.1", 2000)) is None
    # Probes to them are bounded like the offer's candidates (within one punching attempt).
    w.run(9)
    to_relays = [x for x in w.sent if x.node == "alice" and x.dst[0] == "192.0.2.1"]
    assert 0 < len(to_relays) <= 4 * LinkConfig().session.probes_per_candidate


def test_data_through_the_allocation_from_a_peer_without_permission_never_reaches_the_session() -> (
    None
):
    w, a, b = hard_pair(9)
    w.turn.open = True  # a broken or hostile server relays from anyone
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 10)
    relayed = a.engine.turn_relayed
    assert relayed is not None
    s = a.engine.session
    assert s is not None
    before = s.stats["datagrams_in"]
    # A stranger on the Internet sends to alice's relayed address (a copy of bob's datagram
    # would not open either; this one never gets near the cipher).
    for payload in (b"hello", bytes(60)):
        for out, frm, to in w.turn.from_peer(payload, ("192.0.2.200", 5555), relayed[1]):
            w.deliver(out, frm, to)
    w.flush()
    assert s.stats["datagrams_in"] == before
    assert a.engine.turn is not None and a.engine.turn.stats["unpermitted_peer"] == 2
    assert a.engine.state == "connected"


def test_the_server_address_is_the_turn_clients_and_junk_from_it_is_counted() -> None:
    w, a, b = hard_pair(10)
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 10)
    t = a.engine.turn
    assert t is not None
    junk_before = t.stats["junk"]
    a.engine.receive_datagram(b"\xff" * 30, TURN, w.now)
    a.engine.receive_datagram(b"", TURN, w.now)
    w.flush()
    assert t.stats["junk"] == junk_before + 2 and a.engine.state == "connected"


def test_a_turn_url_with_a_host_name_over_udp_is_not_resolved() -> None:
    w = TurnWorld(11)
    a = w.add_node("alice", "hard")
    b = w.add_node("bob", "hard")
    offer = turn_offer("alice", urls=["turn:turn.example:3478?transport=udp"])
    w.pair(a, b, alice={"turn": offer}, bob={"turn": turn_offer("bob")})
    assert a.engine.turn is None and a.engine.stats["turn_urls_unusable"] == 1
    assert [n for n, _ in w.candidates_out] == ["bob"]


def test_candidates_out_goes_to_the_peer_only() -> None:
    _w, a, _b = hard_pair(12)
    sent = [c for c in a.commands if isinstance(c, SendToRendezvous)]
    outs = [c.message for c in sent if isinstance(c.message, CandidatesOut)]
    assert len(outs) == 1 and outs[0].to == "bob"
    assert outs[0].candidates[0].transport == "udp"


# -- TURN over TCP --------------------------------------------------------------------------------


def test_udp_to_the_turn_server_blocked_falls_back_to_tcp_and_connects() -> None:
    w = TurnWorld(13)
    w.turn_udp_blocked = True
    a = w.add_node("alice", "hard")
    b = w.add_node("bob", "hard")
    urls = [f"turn:{TURN_IP}:3478?transport=udp", f"turn:{TURN_IP}:3478?transport=tcp"]
    w.pair_turn(
        a, b, alice={"turn": turn_offer("alice", urls)}, bob={"turn": turn_offer("bob", urls)}
    )
    assert w.candidates_out == []  # nothing over UDP
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 15)
    assert a.engine.state == b.engine.state == "connected"
    assert {m.candidates[0].transport for _, m in w.candidates_out} == {"tcp"}
    assert a.engine.stats["turn_failures"] == 1  # the UDP attempt, after TURN_UDP_WAIT_S
    # Each side names the path by how its end reaches the TURN server: TCP on both.
    assert a.engine.path == b.engine.path == "turn-tcp"
    a.engine.send_chat("over tcp", w.now)
    w.run(2)
    assert chats(b) == ["over tcp"]
    a.engine.stop(w.now)
    w.flush()
    assert not any(n is a for n in w.tcp_clients.values())  # CloseTurnTcp


def test_a_udp_allocation_that_never_answers_without_a_tcp_url_gives_up_quietly() -> None:
    """No answer over UDP and no TCP URL: the engine forgets TURN (no timer left spinning) and
    the pair ends where it would without TURN, on the rendezvous relay."""
    w = TurnWorld(14)
    w.turn_udp_blocked = True
    a = w.add_node("alice", "hard")
    b = w.add_node("bob", "hard")
    w.pair_turn(a, b)
    w.run(30)  # would never return if a stale TURN deadline kept the timer in the past
    assert a.engine.turn is None and a.engine.stats["turn_failures"] == 1
    assert a.engine.state == "relayed" and a.engine.path == "relay"
    timer = a.engine.get_timer()
    assert timer is None or timer > w.now - 1


# -- with birthday punching -----------------------------------------------------------------------


def test_an_easy_x_hard_pair_still_goes_direct_by_birthday_and_keeps_turn_ready() -> None:
    """TURN candidates wait while a birthday attempt runs (a TURN pair would validate first and
    close the pool for good); the link is made by birthday, and TURN is validated afterwards,
    on the hard side from the adopted socket (its allocation made again there)."""
    small = BirthdayConfig(
        sockets=32,
        probe_budget=200,
        probe_rate=100.0,
        port_range=(20000, 20999),
        spray_interval=1.0,
    )
    cfg = LinkConfig(session=SessionConfig(), birthday=small)
    w = TurnWorld(3)
    e = w.add("easy", "easy", NatHint(mapping="endpoint-independent"), cfg)
    h = w.add("hard", "hard", HARD, cfg)
    w.pair_turn(e, h)
    assert e.engine.peer_relays and h.engine.peer_relays  # trickled, and held
    se = e.engine.session
    assert se is not None and all(se.candidate_kind(r) is None for r in e.engine.peer_relays)
    w.run_until(lambda: e.engine.state == h.engine.state == "connected", 10)
    assert e.engine.method == h.engine.method == "birthday"
    assert e.engine.path == h.engine.path == "direct"
    assert h.engine.stats["pool_adoptions"] == 1
    assert h.engine.stats["turn_allocations"] == 2  # again, on the adopted socket
    w.run(5)
    for n in (e, h):
        s = n.engine.session
        assert s is not None
        turn_ok = [c for c in s.candidates if s.path_of(c) == "turn-udp"]
        assert turn_ok, n.name  # a TURN path to fall back to
    w.block_direct = True
    w.run_until(lambda: e.engine.path == h.engine.path == "turn-udp", 15)
    assert e.engine.path == h.engine.path == "turn-udp"
    assert e.engine.state == h.engine.state == "connected"


def test_a_turn_tcp_connection_that_drops_forgets_the_allocation() -> None:
    w = TurnWorld(15)
    a = w.add_node("alice", "hard")
    b = w.add_node("bob", "hard")
    tcp = [f"turn:{TURN_IP}:3478?transport=tcp"]
    offers = {n.name: {"turn": turn_offer(n.name, tcp)} for n in (a, b)}
    w.pair_turn(a, b, **offers)
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 10)
    assert a.engine.path == "turn-tcp"
    a.engine.turn_tcp_closed(w.now, "connection reset")
    w.flush()
    assert a.engine.turn is None and a.engine.stats["turn_failures"] == 1
    a.engine.turn_tcp_received(b"late bytes", w.now)  # nothing to feed: counted, no crash
    a.engine.turn_tcp_connected(w.now)  # a late callback: ignored
    assert a.engine.stats["turn_dropped"] >= 1
    # Alice's own allocation is gone, Bob's still relays: the link moves onto it and stays up.
    w.run(30)
    assert a.engine.state == b.engine.state == "connected"
    assert a.engine.path == "turn-tcp" and a.engine.peer_address == b.engine.turn_relayed
