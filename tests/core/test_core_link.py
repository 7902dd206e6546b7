"""The link engine in memory: two engines, a fake clock, a fake network and a fake rendezvous.

No sockets, no sleeps: :class:`World` delivers datagrams at once (unless a test drops them),
plays the rendezvous (discovery, pairing, relaying) and jumps the clock from timer to timer.
"""

from __future__ import annotations

import base64
import itertools
import random
from collections.abc import Callable
from typing import TypeVar

import pytest

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.crypto import Identity, PeerCipher, verify_registration_proof
from p2plab.core.link import (
    RELAY,
    DiscoverEndpoint,
    LinkConfig,
    LinkEngine,
    RelayDatagram,
    SendToRendezvous,
)
from p2plab.core.link_table import LINK_STATES, TRANSITIONS, Input, next_state
from p2plab.core.session import PeerSession
from p2plab.core.signaling import (
    Challenge,
    ErrorMessage,
    P2PConnectionOffer,
    PeerDisconnected,
    Register,
    Registered,
    RelayIn,
    encode_relay_data,
)
from p2plab.errors import LocalProtocolError, NotConnected
from tests.core.engine_clock import run_timers

Address = tuple[str, int]
E = TypeVar("E", bound=ev.Event)
FAST = SessionConfig(keepalive_interval=0.2, peer_timeout=1.0, punch_timeout=1.5)
ALL_KINDS = [v for k, v in vars(Input).items() if k.isupper()]


class Node:
    """One engine and what it has told the world."""

    def __init__(self, name: str, addr: Address, config: LinkConfig, encrypt: bool) -> None:
        rand = random.Random(name).randbytes
        identity = Identity.generate(rand) if encrypt else None
        self.engine = LinkEngine(name, config=config, identity=identity, rand_bytes=rand)
        self.name = name
        self.addr = addr
        self.events: list[ev.Event] = []
        self.stamped: list[tuple[float, ev.Event]] = []
        self.reported: Address | None = None
        self.registers: list[Register] = []
        """Every ``register`` the engine sent (in answer to a challenge)."""
        self.errors: list[ErrorMessage] = []
        """Every ``error`` the engine sent the rendezvous (a refused offer)."""

    def states(self) -> list[str]:
        return [e.state for e in self.events if isinstance(e, ev.StateChanged)]

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


class World:
    """A fake clock, a lossless instant network and a fake rendezvous for a few engines."""

    def __init__(self) -> None:
        self.now = 100.0
        self.nodes: dict[str, Node] = {}
        self.drop: Callable[[str, str], bool] = lambda src, dst: False
        self.relay_on = True  # the fake rendezvous relays
        self.answer_discovery = True  # the fake driver answers DiscoverEndpoint at once

    def add(
        self,
        name: str,
        config: LinkConfig | None = None,
        *,
        encrypt: bool = True,
        upto: str = "waiting_for_peer",
    ) -> LinkEngine:
        """A new engine, driven up to ``upto`` (``starting``, ``registering``, ``discovering``
        or ``waiting_for_peer``)."""
        port = 40000 + len(self.nodes)
        node = Node(name, ("192.0.2.1", port), config or LinkConfig(session=FAST), encrypt)
        self.nodes[name] = node
        if upto == "starting":
            return node.engine
        node.engine.start(self.now)
        if upto == "registering":
            return node.engine
        self.answer_discovery = upto != "discovering"
        node.engine.rendezvous_up(self.now)
        self.challenge(node.engine)
        node.engine.receive_rendezvous(
            Registered(worker_id=name, observed_ip="192.0.2.1"), self.now
        )
        self.flush()
        return node.engine

    def challenge(self, engine: LinkEngine) -> Register:
        """Play the rendezvous's challenge; the engine's ``register`` must carry a valid proof
        (in plaintext mode: no key and no proof)."""
        node = self.node(engine)
        sent = len(node.registers)
        server = Identity.generate(random.Random(f"server {len(node.registers)}").randbytes)
        nonce = random.Random(f"nonce {len(node.registers)}").randbytes(32)
        engine.receive_rendezvous(
            Challenge(
                nonce=base64.b64encode(nonce).decode(),
                server_key=server.public_b64,
            ),
            self.now,
        )
        self.flush()
        assert len(node.registers) == sent + 1
        reg = node.registers[-1]
        if engine.identity is None:
            assert reg.public_key is None and reg.proof is None
        else:
            assert reg.public_key == engine.identity.public_b64 and reg.proof is not None
            proof = base64.b64decode(reg.proof)
            assert verify_registration_proof(
                server.private_key, engine.identity.public_bytes, nonce, engine.worker_id, proof
            )
        return reg

    def node(self, engine: LinkEngine) -> Node:
        return self.nodes[engine.worker_id]

    def pair(self, a: LinkEngine, b: LinkEngine) -> None:
        """The fake rendezvous pairs ``a`` (controlling) and ``b``."""
        for me, peer, role in ((a, b, "controlling"), (b, a, "controlled")):
            peer_node = self.node(peer)
            assert peer_node.reported is not None
            key = peer.identity.public_b64 if peer.identity else None
            offer = P2PConnectionOffer(
                peer_worker_id=peer.worker_id,
                peer_udp_ip=peer_node.reported[0],
                peer_udp_port=peer_node.reported[1],
                role=role,  # type: ignore[arg-type]
                peer_public_key=key,
            )
            me.receive_rendezvous(offer, self.now)
        self.flush()

    def flush(self) -> None:
        """Move every datagram, command and event until nothing moves."""
        moved = True
        while moved:
            moved = False
            for node in list(self.nodes.values()):
                eng = node.engine
                for data, addr in eng.datagrams_to_send(self.now):
                    moved = True
                    dst = next((n for n in self.nodes.values() if n.addr == addr), None)
                    if dst is None or dst.engine.state == "stopped":
                        continue
                    if not self.drop(node.name, dst.name):
                        dst.engine.receive_datagram(data, node.addr, self.now)
                while (cmd := eng.next_command()) is not None:
                    moved = True
                    self._command(node, cmd)
                while (event := eng.next_event()) is not None:
                    node.events.append(event)
                    node.stamped.append((self.now, event))

    def _command(self, node: Node, cmd: object) -> None:
        if isinstance(cmd, DiscoverEndpoint) and self.answer_discovery:
            node.engine.discovered(node.addr, [("10.0.0.2", node.addr[1])], self.now)
        elif isinstance(cmd, SendToRendezvous) and isinstance(cmd.message, Register):
            node.registers.append(cmd.message)
        elif isinstance(cmd, SendToRendezvous) and isinstance(cmd.message, ErrorMessage):
            node.errors.append(cmd.message)
        elif isinstance(cmd, SendToRendezvous):
            node.reported = (cmd.message.udp_ip, cmd.message.udp_port)
        elif isinstance(cmd, RelayDatagram) and self.relay_on:
            dst = self.nodes[cmd.to]
            msg = RelayIn.model_validate({"from": node.name, "data": encode_relay_data(cmd.data)})
            dst.engine.receive_rendezvous(msg, self.now)

    def run(self, seconds: float) -> None:
        """Jump the clock from timer to timer for ``seconds``."""
        run_timers(self, seconds)


def genuine_relayed_probe(sender: LinkEngine, receiver: LinkEngine, now: float) -> RelayIn:
    """The first datagram a relayed session of ``sender`` sends ``receiver`` (a sealed probe),
    as the rendezvous passes it on: what a peer that gave up punching sends first."""
    assert sender.identity is not None and receiver.identity is not None
    rand = random.Random(f"relay {sender.worker_id}").randbytes
    session = PeerSession(
        local_id=sender.worker_id,
        peer_id=receiver.worker_id,
        role="controlling",
        candidates=[RELAY],
        config=FAST,
        now=now,
        rand_bytes=rand,
        sealer=PeerCipher(
            sender.identity,
            sender.worker_id,
            receiver.worker_id,
            receiver.identity.public_bytes,
            rand,
            epoch=int(now * 1e9),  # as the engine's own sessions: later than the direct one's
        ),
    )
    data, addr = session.datagrams_to_send(now)[0]
    assert addr == RELAY
    return RelayIn.model_validate({"from": sender.worker_id, "data": encode_relay_data(data)})


def connected_pair(
    config: LinkConfig | None = None,
) -> tuple[World, LinkEngine, LinkEngine]:
    w = World()
    a, b = w.add("a", config), w.add("b", config)
    w.pair(a, b)
    w.run(1.0)
    assert a.state == b.state == "connected"
    return w, a, b


# -- the table --------------------------------------------------------------------------------


def test_table_covers_every_state_and_only_known_inputs() -> None:
    assert set(TRANSITIONS) == set(LINK_STATES)
    for state, row in TRANSITIONS.items():
        assert set(row) <= set(ALL_KINDS), state
        for kind, target in row.items():
            assert next_state(state, kind) == target
    # every state can be stopped, nothing leaves stopped
    assert all(next_state(s, Input.STOP) == "stopped" for s in LINK_STATES)
    assert TRANSITIONS["stopped"] == {Input.STOP: "stopped"}


@pytest.mark.parametrize("state", LINK_STATES)
def test_every_input_missing_from_the_table_raises(state: str) -> None:
    for kind in ALL_KINDS:
        if kind not in TRANSITIONS[state]:
            with pytest.raises(LocalProtocolError, match=f"{kind!r} is not allowed in state"):
                next_state(state, kind)


def test_engine_refuses_a_forbidden_input() -> None:
    e = LinkEngine("a", rand_bytes=random.Random(1).randbytes)
    with pytest.raises(LocalProtocolError, match="'discovered' is not allowed in state 'starting'"):
        e.discovered(("192.0.2.1", 1), [], 0.0)
    e.start(0.0)
    with pytest.raises(LocalProtocolError, match="'start' is not allowed"):
        e.start(0.0)
    with pytest.raises(LocalProtocolError, match="'rendezvous_up' is not allowed in state 'dis"):
        e.receive_rendezvous(Registered(worker_id="a"), 0.0)
        e.rendezvous_up(0.0)  # the client says "up" only after "down"
    e.stop(0.0)
    with pytest.raises(LocalProtocolError, match="'rendezvous_down' is not allowed"):
        e.rendezvous_down(0.0)
    assert e.state == "stopped" and e.get_timer() is None


def test_rendezvous_messages_out_of_place_are_dropped_and_counted_not_raised() -> None:
    w = World()
    a = w.add("a", upto="discovering")
    a.receive_rendezvous(Registered(worker_id="a"), w.now)  # a second registered
    offer = P2PConnectionOffer(peer_worker_id="b", peer_udp_ip="192.0.2.1", peer_udp_port=1)
    a.receive_rendezvous(offer, w.now)  # an offer before we reported an endpoint
    assert a.state == "discovering" and a.stats["rendezvous_unexpected"] == 2
    assert a.peer_id is None and a.stats["offers"] == 1


# -- registering and discovery ----------------------------------------------------------------


def test_register_discover_and_report_then_reregister_without_discovering_again() -> None:
    w = World()
    a = w.add("a")
    node = w.node(a)
    assert node.states() == ["registering", "discovering", "waiting_for_peer"]
    assert node.reported == node.addr and a.public_endpoint == node.addr
    assert a.local_candidates == [("10.0.0.2", node.addr[1])]
    a.rendezvous_down(w.now)
    a.rendezvous_up(w.now)
    node.reported = None
    a.receive_rendezvous(Registered(worker_id="a", observed_ip="192.0.2.1"), w.now)
    w.flush()
    assert node.states()[-2:] == ["registering", "waiting_for_peer"]
    assert node.reported == node.addr  # reported again, without a second discovery


def test_a_link_that_ends_while_the_rendezvous_is_down_registers_again_when_it_is_back() -> None:
    w, a, b = connected_pair()
    a.rendezvous_down(w.now)
    assert a.state == "connected"  # a punched link does not need the rendezvous
    b.stop(w.now)
    w.flush()
    assert a.state == "waiting_for_peer"
    node = w.node(a)
    node.reported = None
    a.rendezvous_up(w.now)
    a.receive_rendezvous(Registered(worker_id="a", observed_ip="192.0.2.1"), w.now)
    w.flush()
    assert node.reported == node.addr and a.state == "waiting_for_peer"
    assert a.stats["rendezvous_unexpected"] == 0


def test_rendezvous_drop_during_discovery_waits_for_the_next_register() -> None:
    e = LinkEngine("a", rand_bytes=random.Random(2).randbytes)
    e.start(0.0)
    e.receive_rendezvous(Registered(worker_id="a", observed_ip="192.0.2.9"), 0.0)
    assert e.next_command() == DiscoverEndpoint("192.0.2.9")
    e.rendezvous_down(0.1)
    e.discovered(("192.0.2.9", 5000), [], 0.2, error="STUN failed: timeout")
    assert e.state == "registering" and e.next_command() is None and "STUN" in str(e.error)
    e.receive_rendezvous(Registered(worker_id="a"), 0.3)
    cmd = e.next_command()
    assert isinstance(cmd, SendToRendezvous) and cmd.message.udp_port == 5000
    assert e.state == "waiting_for_peer"


# -- punching, chat ---------------------------------------------------------------------------


def test_offer_punch_connected_and_chat_both_ways() -> None:
    w, a, b = connected_pair()
    na, nb = w.node(a), w.node(b)
    assert na.states()[-2:] == ["punching", "connected"] and a.path == "direct"
    assert a.peer_address == nb.addr and b.peer_address == na.addr
    assert na.of(ev.PeerConnected) and nb.of(ev.PeerConnected)
    msg_id = a.send_chat("hello", w.now, sent_at=1.5)
    b.send_chat("hi", w.now)
    w.run(0.5)
    got = nb.of(ev.ChatReceived)
    assert got == [ev.ChatReceived(msg_id=msg_id, text="hello", sent_at=1.5, peer_id="a")]
    assert [c.text for c in na.of(ev.ChatReceived)] == ["hi"]
    assert [d.msg_id for d in na.of(ev.ChatDelivered)] == [msg_id]
    assert a.stats["chats_in"] == 1 and b.stats["chats_in"] == 1
    cid = a.send_control({"type": "bench_start", "n": 1}, w.now)
    w.run(0.5)
    assert [e.obj for e in nb.of(ev.ControlReceived)] == [{"type": "bench_start", "n": 1}]
    assert cid in [d.msg_id for d in na.of(ev.ControlDelivered)]


def test_chat_without_a_link_raises_not_connected() -> None:
    w = World()
    a = w.add("a")
    with pytest.raises(NotConnected, match="chat needs a connected peer"):
        a.send_chat("nobody", w.now)
    with pytest.raises(NotConnected):
        a.send_control({"type": "x"}, w.now)


def test_offer_for_the_current_peer_keeps_the_link() -> None:
    w, a, b = connected_pair()
    session = a.session
    w.pair(a, b)
    assert a.session is session and a.state == "connected" and a.stats["offers"] == 2


# -- relay ------------------------------------------------------------------------------------


def test_punch_timeout_falls_back_to_the_relay_and_chat_flows_relayed() -> None:
    w = World()
    a, b = w.add("a"), w.add("b")
    w.drop = lambda src, dst: True  # no UDP gets through at all
    w.pair(a, b)
    w.run(5.0)
    assert a.state == b.state == "relayed" and a.path == "relay"
    assert a.peer_address == RELAY and a.relayed
    assert w.node(a).states()[-2:] == ["punching", "relayed"]
    assert a.stats["relay_switches"] == 1 and a.stats["relay_in"] > 0
    msg_id = a.send_chat("via relay", w.now)
    w.run(0.5)
    assert [c.text for c in w.node(b).of(ev.ChatReceived)] == ["via relay"]
    assert msg_id in [d.msg_id for d in w.node(a).of(ev.ChatDelivered)]
    # Benchmarks run over the relay too (issue 17): control messages go through, and the
    # benchmark's datagrams are carried by the engine both ways, not dropped by the session.
    a.send_control({"type": "bench_start"}, w.now)
    bench = b"\xd7\x50\x01\x20" + bytes(28)
    assert a.send_bench([bench, bench], RELAY, w.now) == 2
    assert a.send_bench([bench], ("turn-udp|192.0.2.9", 4000), w.now) == 0  # no allocation
    w.run(0.5)
    assert [c.obj for c in w.node(b).of(ev.ControlReceived)] == [{"type": "bench_start"}]
    assert b.take_bench_datagrams() == [(bench, RELAY), (bench, RELAY)]
    assert b.take_bench_datagrams() == []
    assert b.session is not None and b.session.stats["bench_ignored"] == 0
    assert a.stats["bench_out"] == 2 and a.stats["bench_dropped"] == 1
    # ChannelData is unwrapped only from our TURN server on a bound channel: here no allocation.
    framed = b"\x40\x00" + len(bench).to_bytes(2, "big") + bench
    assert not b.bench_channel_data(framed, ("127.0.0.1", 3478))
    assert b.take_bench_datagrams() == []


def test_the_first_relayed_datagram_moves_a_punching_peer_onto_the_relay() -> None:
    w = World()
    a = w.add("a", LinkConfig(session=SessionConfig(punch_timeout=1.0)))
    b = w.add("b", LinkConfig(session=SessionConfig(punch_timeout=8.0)))
    w.drop = lambda src, dst: True
    w.pair(a, b)
    w.run(3.0)
    assert a.state == b.state == "relayed"
    lost_b = [e for e in w.node(b).events if isinstance(e, ev.PeerLost)]
    assert lost_b == []  # b never timed out: it followed a's relayed datagram
    assert b.stats["relay_switches"] == 1


def test_relayed_datagrams_from_a_stranger_are_dropped_and_counted() -> None:
    w, a, _ = connected_pair()
    msg = RelayIn.model_validate({"from": "mallory", "data": encode_relay_data(b"x")})
    a.receive_rendezvous(msg, w.now)
    assert a.stats["relay_dropped"] == 1 and a.state == "connected" and not a.relayed


def test_without_relay_a_punch_timeout_gives_up_and_waits() -> None:
    cfg = LinkConfig(session=FAST, relay=False)
    w = World()
    a, b = w.add("a", cfg), w.add("b", cfg)
    w.drop = lambda src, dst: True
    w.pair(a, b)
    w.run(3.0)
    assert w.node(a).states()[-3:] == ["punching", "lost", "waiting_for_peer"]
    assert a.peer_id is None and a.session is None


def test_a_silent_relayed_link_is_set_up_again() -> None:
    w = World()
    a, b = w.add("a"), w.add("b")
    w.drop = lambda src, dst: True
    w.pair(a, b)
    w.run(5.0)
    assert a.state == "relayed"
    mark = len(w.node(a).states())
    w.relay_on = False  # the relayed link falls silent (peer timeout 1 s)
    w.run(1.2)
    w.relay_on = True
    w.run(1.0)
    assert w.node(a).states()[mark:] == ["lost", "punching", "relayed"]
    assert a.state == b.state == "relayed" and a.peer_id == "b"


# -- losing the link, re-punching -------------------------------------------------------------


def test_peer_timeout_repunches_with_backoff_then_connects_again() -> None:
    w, a, b = connected_pair()
    na = w.node(a)
    offers = a.stats["offers"]
    mark = len(na.states())
    w.drop = lambda src, dst: True  # the NAT forgot the mapping: nothing gets through
    w.relay_on = False  # re-punching is the engine's answer here, not the relay
    for _ in range(200):
        w.run(0.1)
        if a.repunch_attempts >= 4:
            break
    states = na.states()[mark:]
    assert states[:2] == ["lost", "punching"]  # the first re-punch starts at once
    assert states.count("lost") >= 4 and a.repunch_attempts >= 4
    assert a.peer_id == "b" and a.offer is not None  # same peer, same offer
    w.drop = lambda src, dst: False
    w.run(6.0)
    assert a.state == b.state == "connected"
    assert a.repunch_attempts == 0 and a.stats["offers"] == offers  # no new offer needed
    mid = a.send_chat("back again", w.now)
    w.run(0.5)
    assert mid in [d.msg_id for d in na.of(ev.ChatDelivered)]


def test_repunch_timer_doubles_up_to_the_ceiling() -> None:
    cfg = LinkConfig(session=FAST, relay=False, repunch_max_delay_s=1.0)
    w, a, _ = connected_pair(cfg)
    w.drop = lambda src, dst: True
    mark = len(w.node(a).stamped)
    w.run(12.0)
    changes = [(t, e) for t, e in w.node(a).stamped[mark:] if isinstance(e, ev.StateChanged)]
    pauses = [
        round(t2 - t1, 3)
        for (t1, e1), (t2, e2) in itertools.pairwise(changes)
        if e1.state == "lost" and e2.state == "punching"
    ]
    # 0 s, then 0.5 s doubling, capped at repunch_max_delay_s; each attempt punches for 1.5 s
    assert pauses[:4] == [0.0, 0.5, 1.0, 1.0]


def test_peer_disconnected_ends_the_link_and_waits() -> None:
    w, a, b = connected_pair()
    a.receive_rendezvous(PeerDisconnected(peer_worker_id="someone-else"), w.now)
    assert a.state == "connected" and a.stats["peer_disconnected_ignored"] == 1
    a.receive_rendezvous(PeerDisconnected(peer_worker_id="b"), w.now)
    w.flush()
    assert w.node(a).states()[-2:] == ["lost", "waiting_for_peer"]
    assert a.peer_id is None and a.session is None and a.get_timer() is None
    # a said BYE: b's session closed, b gives up on the link too
    assert w.node(b).of(ev.PeerClosed) and b.state == "waiting_for_peer"


def test_stop_says_bye_and_the_peer_goes_back_to_waiting() -> None:
    w, a, b = connected_pair()
    a.stop(w.now)
    w.flush()
    assert a.state == "stopped" and b.state == "waiting_for_peer"
    assert w.node(b).states()[-2:] == ["lost", "waiting_for_peer"]


# -- refused offers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_encrypts", "b_encrypts", "words"),
    [
        (True, False, "offers no public key"),
        (False, True, "requires encryption"),
    ],
)
def test_offers_with_mismatched_encryption_are_refused(
    a_encrypts: bool, b_encrypts: bool, words: str
) -> None:
    w = World()
    a = w.add("a", encrypt=a_encrypts)
    b = w.add("b", encrypt=b_encrypts)
    w.pair(a, b)
    assert a.state == "waiting_for_peer" and a.session is None and a.peer_id is None
    assert words in str(a.error) and a.stats["offers_refused"] == 1
    errors = w.node(a).of(ev.ErrorReported)
    assert errors and words in errors[0].message


def test_offer_with_an_unusable_key_is_refused() -> None:
    w = World()
    a = w.add("a")
    # The shared model refuses such a key; the engine must refuse it too if one got through.
    offer = P2PConnectionOffer.model_construct(
        peer_worker_id="b", peer_udp_ip="192.0.2.1", peer_udp_port=1, peer_public_key="!!"
    )
    a.receive_rendezvous(offer, w.now)
    assert a.state == "waiting_for_peer" and "unusable public key" in str(a.error)


def test_plaintext_on_both_sides_connects() -> None:
    w = World()
    a, b = w.add("a", encrypt=False), w.add("b", encrypt=False)
    w.pair(a, b)
    w.run(1.0)
    assert a.state == b.state == "connected"
    assert a.session is not None and not getattr(a.session.sealer, "encrypted", True)


def test_rendezvous_error_is_reported_and_refusal_stops() -> None:
    w = World()
    a = w.add("a")
    a.receive_rendezvous(ErrorMessage(code="bad_message", message="nope"), w.now)
    w.flush()
    assert w.node(a).of(ev.ErrorReported) == [ev.ErrorReported("rendezvous: nope")]
    a.rendezvous_refused("bad token", w.now)
    assert a.state == "stopped" and a.error == "bad token"
