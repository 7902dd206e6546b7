"""Upgrade to direct and downgrade to TURN (issue 17) in memory, on the fake clock: a pair on
TURN because its direct path is blocked goes direct within a few upgrade rounds of unblocking,
back to TURN before the peer timeout when blocked again, and chat sent all along arrives exactly
once and in order; each switch is a PathChanged event with the path names."""

from __future__ import annotations

import itertools

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.signaling import CandidatesIn
from tests.core.nat_world import BNode
from tests.core.turn_world import TURN, TurnWorld

CFG = SessionConfig()


def chats(node: BNode) -> list[str]:
    return [e.text for e in node.events if isinstance(e, ev.ChatReceived)]


def switches(node: BNode) -> list[tuple[str | None, str]]:
    return [(e.previous_path, e.path) for e in node.events if isinstance(e, ev.PathChanged)]


class Talk:
    """Both sides send a chat message every ``every`` seconds while the world runs."""

    def __init__(self, w: TurnWorld, a: BNode, b: BNode, every: float = 0.7) -> None:
        self.w, self.a, self.b, self.every = w, a, b, every
        self.sent: dict[str, list[str]] = {"alice": [], "bob": []}
        self.n = 0

    def run(self, seconds: float, until: object = None) -> None:
        end = self.w.now + seconds
        while self.w.now < end:
            for node in (self.a, self.b):
                text = f"{node.name}-{self.n}"
                node.engine.send_chat(text, self.w.now)
                self.sent[node.name].append(text)
            self.n += 1
            self.w.run(self.every)
            if until is not None and until():  # type: ignore[operator]
                return


def blocked_pair(seed: int = 1) -> tuple[TurnWorld, BNode, BNode]:
    w = TurnWorld(seed)
    w.block_direct = True
    a = w.add_node("alice", "easy")
    b = w.add_node("bob", "easy")
    w.pair_turn(a, b)
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 10)
    assert a.engine.path == b.engine.path == "turn-udp"
    return w, a, b


def test_unblocked_goes_direct_then_blocked_goes_back_to_turn_and_chat_is_exact() -> None:
    w, a, b = blocked_pair(2)
    talk = Talk(w, a, b)
    talk.run(6)  # on TURN
    assert a.engine.path == b.engine.path == "turn-udp"
    assert w.blocked > 0

    # Unblock: direct within two upgrade rounds (both sides probe every upgrade_interval).
    w.block_direct = False
    t0 = w.now
    talk.run(4 * CFG.upgrade_interval, until=lambda: a.engine.path == b.engine.path == "direct")
    assert a.engine.path == b.engine.path == "direct"
    assert w.now - t0 <= CFG.upgrade_interval + 1.0  # one round (a triggered check answers)
    assert switches(a)[-1] == ("turn-udp", "direct") and switches(b)[-1] == ("turn-udp", "direct")
    talk.run(5)
    assert a.engine.path == b.engine.path == "direct"

    # Block again: back to TURN before the peer timeout would call the peer lost.
    w.block_direct = True
    t1 = w.now
    talk.run(CFG.peer_timeout + 5, until=lambda: a.engine.path == b.engine.path == "turn-udp")
    assert a.engine.path == b.engine.path == "turn-udp"
    assert w.now - t1 < CFG.peer_timeout
    talk.run(CFG.peer_timeout + 5)  # and it stays up
    assert a.engine.state == b.engine.state == "connected"
    assert not any(isinstance(e, ev.PeerLost) for e in a.events + b.events)
    assert switches(a)[-1] == ("direct", "turn-udp") and switches(b)[-1] == ("direct", "turn-udp")
    # Every chat message sent across both switches arrives exactly once and in order.
    w.run(10)
    assert chats(b) == talk.sent["alice"] and chats(a) == talk.sent["bob"]
    assert not any(isinstance(e, ev.ChatFailed) for e in a.events + b.events)
    # Switching raised no security counter (late datagrams of the old path are not "unexpected").
    for n in (a, b):
        assert set(n.engine.security_counts().values()) == {0}, n.engine.security_counts()


def test_a_direct_pair_keeps_a_warm_turn_path_and_never_flaps() -> None:
    """Connected direct from the start: TURN is validated and kept warm, the link stays direct
    (late datagrams from TURN never pull it back), and a block moves it to TURN."""
    w = TurnWorld(3)
    a = w.add_node("alice", "easy")
    b = w.add_node("bob", "easy")
    w.pair_turn(a, b)
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 10)
    talk = Talk(w, a, b)
    talk.run(60, until=None)
    assert a.engine.path == b.engine.path == "direct", (switches(a), switches(b))
    assert all(p[1] == "direct" for p in switches(a) + switches(b))
    sa = a.engine.session
    assert sa is not None
    validated_turn = [c for c in sa.candidates if sa.path_of(c) == "turn-udp"]
    assert validated_turn
    w.block_direct = True
    talk.run(CFG.peer_timeout, until=lambda: a.engine.path == b.engine.path == "turn-udp")
    assert a.engine.path == b.engine.path == "turn-udp"
    w.run(5)
    assert chats(b) == talk.sent["alice"] and chats(a) == talk.sent["bob"]


def test_upgrade_probing_is_budgeted() -> None:
    """On TURN with direct blocked for a minute: one probe per direct candidate per round."""
    w, a, b = blocked_pair(4)
    mark = len(w.sent)
    w.run(60)
    direct = [
        x for x in w.sent[mark:] if x.node == "alice" and x.dst == (b.nat.ip, b.reported.udp_port)
    ]  # type: ignore[union-attr]
    rounds = 60 / CFG.upgrade_interval
    assert rounds - 1 <= len(direct) <= rounds + 1
    assert a.engine.path == "turn-udp"


# -- off the rendezvous relay ---------------------------------------------------------------------


def test_a_pair_on_the_rendezvous_relay_goes_direct_when_the_path_clears() -> None:
    w = TurnWorld(5)
    w.block_direct = True
    a = w.add_node("alice", "easy")
    b = w.add_node("bob", "easy")
    w.pair(a, b)  # no TURN in the offers
    w.run_until(lambda: a.engine.state == b.engine.state == "relayed", 15)
    assert a.engine.path == b.engine.path == "relay"
    talk = Talk(w, a, b)
    talk.run(3)
    w.block_direct = False
    talk.run(4 * CFG.upgrade_interval, until=lambda: a.engine.path == b.engine.path == "direct")
    assert a.engine.state == b.engine.state == "connected"
    assert a.engine.path == b.engine.path == "direct"
    assert a.engine.stats["relay_upgrades"] == 1
    assert ("relay", "direct") in switches(a) and ("relay", "direct") in switches(b)
    talk.run(3)
    w.run(10)
    assert chats(b) == talk.sent["alice"] and chats(a) == talk.sent["bob"]
    for n in (a, b):
        assert set(n.engine.security_counts().values()) == {0}, n.engine.security_counts()
    # Benchmarks may run again: a direct link takes control messages.
    a.engine.send_control({"type": "ping"}, w.now)


def test_a_pair_on_the_rendezvous_relay_moves_to_turn_when_candidates_come_late() -> None:
    w = TurnWorld(6)
    w.block_direct = True
    w.forward_candidates = False  # the rendezvous lost them, say
    a = w.add_node("alice", "hard")
    b = w.add_node("bob", "hard")
    w.pair_turn(a, b)
    w.turn_udp_blocked = True  # nor can they reach each other's allocation for now
    w.run_until(lambda: a.engine.state == b.engine.state == "relayed", 25)
    assert a.engine.path == b.engine.path == "relay"
    w.turn_udp_blocked = False
    for name, msg in list(w.candidates_out):  # they arrive at last
        fwd = {"from": name, "candidates": [c.model_dump() for c in msg.candidates]}
        w.nodes[msg.to].engine.receive_rendezvous(CandidatesIn.model_validate(fwd), w.now)
    talk = Talk(w, a, b)
    talk.run(4 * CFG.upgrade_interval, until=lambda: a.engine.path == b.engine.path == "turn-udp")
    assert a.engine.state == b.engine.state == "connected"
    assert a.engine.path == b.engine.path == "turn-udp"
    assert a.engine.method == "relay"  # made through a relay; the path says which
    w.run(10)
    assert chats(b) == talk.sent["alice"] and chats(a) == talk.sent["bob"]


def test_the_mapping_towards_the_turn_server_is_kept_alive_while_direct() -> None:
    """Direct and idle for two minutes: something still goes to the TURN server at least every
    15 s (a NAT's UDP mapping lasts 30 s), so the warm TURN path is there when needed."""
    w = TurnWorld(7)
    a = w.add_node("alice", "easy")
    b = w.add_node("bob", "easy")
    w.pair_turn(a, b)
    w.run_until(lambda: a.engine.state == b.engine.state == "connected", 10)
    assert a.engine.path == "direct"
    start = w.now
    w.run(120)
    times = [start] + [x.at for x in w.sent if x.node == "alice" and x.dst == TURN and x.at > start]
    gaps = [t1 - t0 for t0, t1 in itertools.pairwise(times)]
    assert len(times) > 8 and max(gaps) <= 15.0 + 1e-6, gaps
    assert a.engine.path == "direct"
