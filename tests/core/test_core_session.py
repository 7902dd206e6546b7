"""PeerSession once connected: reliable chat/control, keep-alives, RTT, timeouts, bad input."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.wire import (
    Ack,
    Bye,
    Chat,
    Control,
    Keepalive,
    KeepaliveAck,
    MessageType,
    ProbeAck,
    datagram_type,
    parse_datagram,
)
from p2plab.errors import ChatTooLong, ConfigError, LocalProtocolError, NotConnected
from tests.core_sim import Network, Node, pair

LATENCY = 0.01


def connected_pair(
    seed: int = 0, config: SessionConfig | None = None, **link: float
) -> tuple[Network, Node, Node]:
    net = Network(seed=seed, latency=LATENCY, **link)
    a, b = pair(net, config=config)
    assert net.run_until(
        lambda: a.session.state == "connected" and b.session.state == "connected", timeout=10
    )
    return net, a, b


def texts(node: Node) -> list[str]:
    return [e.text for e in node.events if isinstance(e, ev.ChatReceived)]


def sent_times(node: Node, kind: MessageType, after: float = 0.0) -> list[float]:
    return [t for t, d, _ in node.sent if datagram_type(d) == kind and t >= after]


def test_chat_round_trip_and_delivery_report() -> None:
    net, a, b = connected_pair()
    msg_id = a.session.send_chat("hello", net.now, sent_at=1764130000.0)
    assert net.run_until(lambda: bool(a.of_type(ev.ChatDelivered)), timeout=5)
    (received,) = b.of_type(ev.ChatReceived)
    assert received == ev.ChatReceived(msg_id, "hello", 1764130000.0)
    (delivered,) = a.of_type(ev.ChatDelivered)
    assert isinstance(delivered, ev.ChatDelivered)
    assert delivered.msg_id == msg_id
    assert delivered.latency == pytest.approx(2 * LATENCY)


def test_200_messages_each_way_through_a_lossy_reordering_duplicating_link() -> None:
    net, a, b = connected_pair(seed=11)
    net.loss, net.duplicate, net.jitter = 0.2, 0.1, 0.05  # jitter >> spacing: reordering
    n = 200
    a_ids = [a.session.send_chat(f"a{i}", net.now) for i in range(n)]
    b_ids = []
    for i in range(n):
        b_ids.append(b.session.send_chat(f"b{i}", net.now))
        net.run_until(lambda: False, timeout=0.005)  # b's messages trickle out
    done = lambda: (  # noqa: E731
        len(a.of_type(ev.ChatDelivered)) == n and len(b.of_type(ev.ChatDelivered)) == n
    )
    assert net.run_until(done, timeout=120)
    assert texts(b) == [f"a{i}" for i in range(n)]  # exactly once, in order
    assert texts(a) == [f"b{i}" for i in range(n)]
    assert [e.msg_id for e in a.of_type(ev.ChatDelivered)] != []
    assert sorted(e.msg_id for e in a.of_type(ev.ChatDelivered)) == sorted(a_ids)
    assert sorted(e.msg_id for e in b.of_type(ev.ChatDelivered)) == sorted(b_ids)
    assert a.of_type(ev.ChatFailed) == [] and b.of_type(ev.ChatFailed) == []
    # the link really was bad, and the machinery really worked for it
    assert net.lost > 0
    for node in (a, b):
        assert node.session.stats["retransmits"] > 0
        assert node.session.stats["duplicates"] > 0
        assert node.session.pending_messages == 0
        assert node.session.state == "connected"
    # reordering happened: some datagram arrived before one sent earlier
    arrivals = [parse_datagram(d).seq for _, d, _ in b.received if d[3] == MessageType.CHAT]  # type: ignore[attr-defined]
    assert any(x > y for x, y in itertools.pairwise(arrivals))


def test_chat_and_control_share_one_ordered_stream() -> None:
    net, a, b = connected_pair(seed=12, loss=0.3, jitter=0.05)
    ids = []
    for i in range(30):
        if i % 3 == 0:
            ids.append(a.session.send_control({"type": "bench", "i": i}, net.now))
        else:
            ids.append(a.session.send_chat(str(i), net.now))
    done = lambda: (  # noqa: E731
        len(a.of_type(ev.ChatDelivered)) + len(a.of_type(ev.ControlDelivered)) == 30
    )
    assert net.run_until(done, timeout=60)
    got = [
        e.obj["i"] if isinstance(e, ev.ControlReceived) else int(e.text)
        for e in b.events
        if isinstance(e, ev.ControlReceived | ev.ChatReceived)
    ]
    assert got == list(range(30))
    assert [e.msg_id for e in b.of_type(ev.ControlReceived)] == ids[::3]


def test_control_message_validation() -> None:
    net, a, _ = connected_pair()
    with pytest.raises(LocalProtocolError, match="must be a dict"):
        a.session.send_control([1, 2], net.now)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="not JSON-serialisable"):
        a.session.send_control({"x": object()}, net.now)
    with pytest.raises(LocalProtocolError, match="the limit is 16384 bytes"):
        a.session.send_control({"x": "y" * 20000}, net.now)
    assert a.session.pending_messages == 0


def test_chat_too_long_is_refused_and_the_limit_fits() -> None:
    net, a, b = connected_pair()
    with pytest.raises(ChatTooLong, match="4097 bytes of UTF-8; the limit is 4096 bytes"):
        a.session.send_chat("x" * 4097, net.now)
    with pytest.raises(ChatTooLong):
        a.session.send_chat("é" * 2049, net.now)  # 2049 characters, 4098 bytes
    big = "é" * 2048
    a.session.send_chat(big, net.now)
    assert net.run_until(lambda: bool(b.of_type(ev.ChatReceived)), timeout=5)
    assert texts(b) == [big]


def test_chat_sent_while_punching_waits_for_the_link() -> None:
    net = Network(seed=13, latency=LATENCY)
    a, b = pair(net)
    msg_id = a.session.send_chat("early", net.now)
    assert a.session.state == "punching"
    assert net.run_until(lambda: bool(a.of_type(ev.ChatDelivered)), timeout=5)
    assert texts(b) == ["early"]
    assert [e.msg_id for e in a.of_type(ev.ChatDelivered)] == [msg_id]
    kinds = [type(e) for e in a.events]
    assert kinds.index(ev.PeerConnected) < kinds.index(ev.ChatDelivered)


def test_punch_timeout_fails_queued_messages() -> None:
    net = Network(seed=14)
    a, _ = pair(net, config=SessionConfig(punch_timeout=2.0))
    net.drop = lambda node, dest, data: True
    msg_id = a.session.send_chat("never", net.now)
    net.run_until(lambda: a.session.state == "lost", timeout=5)
    assert a.events == [ev.ChatFailed(msg_id, "punch timeout"), ev.PeerLost("punch timeout")]
    with pytest.raises(NotConnected, match="the session is lost"):
        a.session.send_chat("again", net.now)


def test_cut_link_fails_the_message_and_loses_the_peer_after_peer_timeout() -> None:
    net, a, _ = connected_pair(seed=15)
    net.run_for(2)
    net.drop = lambda node, dest, data: True
    cut = net.now
    last_heard = max(t for t, _, _ in a.received)
    msg_id = a.session.send_chat("into the void", net.now)
    lost_at: list[float] = []
    net.on_event = lambda node, e: (
        lost_at.append(net.now) if node is a and isinstance(e, ev.PeerLost) else None
    )
    assert net.run_until(lambda: a.session.state == "lost", timeout=30)
    assert a.of_type(ev.ChatFailed) == [ev.ChatFailed(msg_id, "peer lost")]
    assert a.of_type(ev.PeerLost) == [ev.PeerLost("peer timeout")]
    assert lost_at[0] == pytest.approx(last_heard + 15.0)
    assert a.session.stats["retransmits"] > 3
    assert cut < lost_at[0]


def test_give_up_on_one_message_reports_failure_and_ends_the_stream() -> None:
    """Only a->b is cut: b's keep-alives still reach a, so only the retransmit limit fires."""
    config = SessionConfig(max_retransmits=3, rto_max=1.0)
    net, a, b = connected_pair(seed=16, config=config)
    net.drop = lambda node, dest, data: node is a
    first = a.session.send_chat("one", net.now)
    second = a.session.send_chat("two", net.now)
    assert net.run_until(lambda: a.session.state == "lost", timeout=20)
    assert a.of_type(ev.ChatFailed) == [
        ev.ChatFailed(first, "retransmit limit"),
        ev.ChatFailed(second, "peer lost"),
    ]
    assert a.of_type(ev.PeerLost) == [ev.PeerLost("delivery failed")]
    assert a.session.stats["retransmits"] == 3 * 2
    assert b.of_type(ev.ChatReceived) == []


def test_give_up_after_chat_give_up_s() -> None:
    config = SessionConfig(chat_give_up_s=2.0, max_retransmits=100)
    net, a, _ = connected_pair(seed=17, config=config)
    net.drop = lambda node, dest, data: node is a
    start = net.now
    msg_id = a.session.send_chat("slow", net.now)
    assert net.run_until(lambda: bool(a.of_type(ev.ChatFailed)), timeout=10)
    assert a.of_type(ev.ChatFailed) == [ev.ChatFailed(msg_id, "timeout")]
    assert net.now == pytest.approx(start + 2.0)


def test_keepalive_fires_at_the_interval_when_idle() -> None:
    net, a, b = connected_pair(seed=18)
    t0 = net.now
    net.run_for(21)
    for node in (a, b):
        times = sent_times(node, MessageType.KEEPALIVE, after=t0)
        assert len(times) == 4
        gaps = [y - x for x, y in itertools.pairwise(times)]
        assert gaps == pytest.approx([5.0, 5.0, 5.0])
        assert node.session.state == "connected"
        assert node.session.stats["keepalive_acks_received"] == 4
        rtts = node.of_type(ev.RttUpdated)
        assert len(rtts) == 4
        assert node.session.rtt == pytest.approx(2 * LATENCY)
        assert node.session.min_rtt == pytest.approx(2 * LATENCY)


def test_no_keepalive_while_our_own_traffic_flows() -> None:
    net, a, b = connected_pair(seed=19)
    t0 = net.now
    for i in range(20):
        a.session.send_chat(f"tick {i}", net.now)
        net.run_for(1.0)
    assert sent_times(a, MessageType.KEEPALIVE, after=t0) == []
    # b only acknowledges, which is not activity of its own: it still keeps the path alive
    assert len(sent_times(b, MessageType.KEEPALIVE, after=t0)) == 4
    # a's RTT is measured from the acks meanwhile
    assert a.session.latest_rtt == pytest.approx(2 * LATENCY)


def test_peer_timeout_fires_after_silence_and_not_before() -> None:
    config = SessionConfig(keepalive_interval=2.0, peer_timeout=6.0)
    net, a, b = connected_pair(seed=20, config=config)
    net.run_for(3)
    net.drop = lambda node, dest, data: node is b  # b falls silent for a
    last_heard = max(t for t, _, _ in a.received)
    net.run_until(lambda: False, timeout=(last_heard + 6.0 - 0.001) - net.now)
    assert a.session.state == "connected"
    assert a.of_type(ev.PeerLost) == []
    timer = a.session.get_timer()
    assert timer is not None and timer <= last_heard + 6.0
    net.run_until(lambda: a.session.state == "lost", timeout=1)
    assert a.of_type(ev.PeerLost) == [ev.PeerLost("peer timeout")]
    assert net.now == pytest.approx(last_heard + 6.0)
    assert a.session.get_timer() is None


def test_garbage_and_foreign_datagrams_are_dropped_and_counted() -> None:
    net, a, b = connected_pair(seed=21)
    net.run_for(0.5)
    events_before = list(b.events)
    src = a.local
    cases = {
        "dropped_malformed": [
            b"",
            b"garbage!",
            b"\xd7\x50\x01\x10\xff",
            b"\xd7\x50\x09\x03",
            bytes.fromhex("000100002112a442") + bytes(12),  # STUN
        ],
        "dropped_unknown_type": [b"\xd7\x50\x01\x7f\x05alice\x03bob"],
        "dropped_wrong_peer": [
            bytes(Chat("mallory", "bob", seq=0, msg_id="x", sent_at=0.0, text="hi")),
            bytes(Chat("alice", "carol", seq=0, msg_id="x", sent_at=0.0, text="hi")),
            bytes(Bye("mallory", "bob", reason="go away")),
            bytes(Keepalive("mallory", "bob", seq=1, timestamp=0.0)),
        ],
        "bench_ignored": [b"\xd7\x50\x01\x20" + bytes(100)],
    }
    before = dict(b.session.stats)
    for datagrams in cases.values():
        for data in datagrams:
            net.inject(b, data, src)
    for stat, datagrams in cases.items():
        assert b.session.stats[stat] - before[stat] == len(datagrams), stat
    assert b.events == events_before
    assert b.session.state == "connected"
    # and the session still works
    a.session.send_chat("still here", net.now)
    assert net.run_until(lambda: texts(b) == ["still here"], timeout=5)


def test_duplicate_chat_is_delivered_once_and_acked_again() -> None:
    net, a, b = connected_pair(seed=22)
    chat = bytes(Chat("alice", "bob", seq=0, msg_id="dup", sent_at=1.0, text="once"))
    acks_before = b.session.stats["acks_sent"]
    net.inject(b, chat, a.local)
    net.inject(b, chat, a.local)
    assert texts(b) == ["once"]
    assert b.session.stats["duplicates"] == 1
    assert b.session.stats["acks_sent"] - acks_before == 2


def test_bye_closes_both_sides() -> None:
    net, a, b = connected_pair(seed=23)
    net.drop = lambda node, dest, data: node is b  # b will not ack: the message stays pending
    pending = a.session.send_chat("pending", net.now)
    net.run_for(0.1)
    net.drop = None
    a.session.close(net.now, reason="bye now")
    net.flush()
    assert a.session.state == "closed"
    assert a.of_type(ev.ChatFailed) == [ev.ChatFailed(pending, "closed")]
    assert net.run_until(lambda: b.session.state == "closed", timeout=1)
    assert b.of_type(ev.PeerClosed) == [ev.PeerClosed("bye now")]
    assert b.session.get_timer() is None and a.session.get_timer() is None
    with pytest.raises(NotConnected, match="the session is closed"):
        a.session.send_chat("after", net.now)
    a.session.close(net.now)  # idempotent
    assert len(sent_times(a, MessageType.BYE)) == 1


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigError, match="peer_timeout must be > 0"):
        SessionConfig(peer_timeout=0)
    with pytest.raises(ConfigError, match="keepalive_interval"):
        SessionConfig(keepalive_interval=20, peer_timeout=15)
    with pytest.raises(ConfigError, match="role must be"):
        net = Network()
        net.add("x", local_id="a", peer_id="b", role="boss", local=("198.18.0.1", 1), candidates=[])


_FORGEABLE = st.one_of(
    st.builds(
        Ack,
        st.just("alice"),
        st.just("bob"),
        st.integers(0, 2**32 - 1),
        st.lists(st.integers(0, 2**32 - 1), max_size=64).map(tuple),
    ),
    st.builds(
        Chat,
        st.just("alice"),
        st.just("bob"),
        st.integers(0, 2**32 - 1),
        st.text(max_size=8),
        st.floats(allow_nan=True),
        st.text(max_size=20),
    ),
    st.builds(
        Control,
        st.just("alice"),
        st.just("bob"),
        st.integers(0, 2**32 - 1),
        st.text(max_size=8),
        st.floats(),
        st.binary(max_size=30),
    ),
    st.builds(
        KeepaliveAck, st.just("alice"), st.just("bob"), st.integers(0, 2**32 - 1), st.floats()
    ),
    st.builds(
        ProbeAck,
        st.just("alice"),
        st.just("bob"),
        st.binary(min_size=8, max_size=8),
        st.booleans(),
        st.tuples(st.text(max_size=15), st.integers(0, 65535)),
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), _FORGEABLE.map(bytes)), max_size=20))
def test_fuzz_session_never_raises_and_keeps_working(datagrams: list[bytes]) -> None:
    net, a, b = connected_pair(seed=24)
    for data in datagrams:
        net.inject(b, data, a.local)
        b.session.handle_timer(net.now)
    assert b.session.state in ("connected", "closed", "lost")
    if b.session.state == "connected":
        b.session.send_chat("after fuzz", net.now)
        assert net.run_until(lambda: "after fuzz" in texts(a), timeout=30)
