"""The reliable stream alone: two ReliableStreams wired in memory, a fake clock, no session."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.reliable import ReliableStream, RttEstimator
from p2plab.core.wire import Ack, Chat, Control


class End:
    """One side of the stream with its counters and events."""

    def __init__(self, name: str, config: SessionConfig | None = None) -> None:
        self.name = name
        self.config = config or SessionConfig()
        self.stats: defaultdict[str, int] = defaultdict(int)
        self.events: list[ev.Event] = []
        self.rtt = RttEstimator(self.config)
        self.stream = ReliableStream(self.config, self.rtt, self.stats, self.events.append)

    def chat(self, text: str, now: float = 0.0) -> str:
        seq = self.stream.take_seq()
        msg_id = f"{self.name}{seq}"
        self.stream.queue(
            "chat", msg_id, Chat("a", "b", seq=seq, msg_id=msg_id, sent_at=now, text=text)
        )
        return msg_id

    def control(self, obj: object, now: float = 0.0) -> str:
        seq = self.stream.take_seq()
        msg_id = f"{self.name}{seq}"
        payload = json.dumps(obj).encode()
        d = Control("a", "b", seq=seq, msg_id=msg_id, sent_at=now, payload=payload)
        self.stream.queue("control", msg_id, d)
        return msg_id

    def ack(self) -> Ack:
        cumulative, selective = self.stream.ack_fields()
        return Ack("b", "a", cumulative=cumulative, selective=selective)

    def of(self, kind: type) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]


def received_texts(end: End) -> list[str]:
    return [e.text for e in end.events if isinstance(e, ev.ChatReceived)]


def test_messages_go_out_in_order_and_deliver_with_latency() -> None:
    a, b = End("a"), End("b")
    ids = [a.chat(t) for t in ("one", "two", "three")]
    assert a.stream.pending == 3
    sent = a.stream.transmit(now=1.0)
    assert [d.seq for d in sent] == [0, 1, 2] and a.stats["chats_sent"] == 3
    for d in sent:
        b.stream.on_message(d)
    assert received_texts(b) == ["one", "two", "three"]
    a.stream.on_ack(b.ack(), now=1.25)
    delivered = a.of(ev.ChatDelivered)
    assert [e.msg_id for e in delivered] == ids  # type: ignore[attr-defined]
    assert all(e.latency == pytest.approx(0.25) for e in delivered)  # type: ignore[attr-defined]
    assert a.stream.pending == 0 and a.stats["delivered"] == 3
    assert a.rtt.srtt == pytest.approx(0.25)  # one sample, from the newest fresh message


def test_out_of_order_is_held_and_selectively_acked() -> None:
    a, b = End("a"), End("b")
    for t in "wxyz":
        a.chat(t)
    d0, d1, d2, d3 = a.stream.transmit(now=0.0)
    b.stream.on_message(d2)
    b.stream.on_message(d3)
    assert received_texts(b) == []
    assert b.stream.ack_fields() == (0, (2, 3))
    a.stream.on_ack(b.ack(), now=0.1)
    assert [e.msg_id for e in a.of(ev.ChatDelivered)] == ["a2", "a3"]  # type: ignore[attr-defined]
    b.stream.on_message(d1)
    b.stream.on_message(d0)
    assert received_texts(b) == ["w", "x", "y", "z"]
    assert b.stream.ack_fields() == (4, ())


def test_duplicates_and_out_of_window_are_counted_not_delivered() -> None:
    a = End("a")
    b = End("b", SessionConfig(recv_window=4))
    for t in "abcdef":
        a.chat(t)
    sent = a.stream.transmit(now=0.0)
    b.stream.on_message(sent[0])
    b.stream.on_message(sent[0])  # again
    assert b.stats["duplicates"] == 1
    b.stream.on_message(sent[5])  # 4 ahead of the next expected (1): outside the window
    assert b.stats["dropped_out_of_window"] == 1
    assert received_texts(b) == ["a"]


def test_send_window_holds_back_messages_until_acked() -> None:
    a, b = End("a", SessionConfig(max_in_flight=2)), End("b")
    for t in "abcd":
        a.chat(t)
    first = a.stream.transmit(now=0.0)
    assert [d.seq for d in first] == [0, 1] and not a.stream.sendable()
    assert a.stream.transmit(now=0.1) == []
    b.stream.on_message(first[0])
    a.stream.on_ack(b.ack(), now=0.2)
    assert [d.seq for d in a.stream.transmit(now=0.2)] == [2]


def test_retransmission_backs_off_and_karn_ignores_retransmitted_samples() -> None:
    cfg = SessionConfig(rto_initial=1.0, rto_min=0.2, rto_max=3.0, max_retransmits=12)
    a, b = End("a", cfg), End("b")
    a.chat("hi")
    (d,) = a.stream.transmit(now=0.0)
    assert a.stream.next_deadline() == pytest.approx(1.0)
    assert a.stream.retransmit(now=0.99) == ([], None)
    times = []
    now = 0.0
    for _ in range(4):
        now = a.stream.next_deadline()
        again, gave_up = a.stream.retransmit(now)
        assert again == [d] and gave_up is None
        times.append(now)
    # 1, then doubling: 2, 4 -> capped at rto_max 3
    assert times == pytest.approx([1.0, 3.0, 6.0, 9.0])
    assert a.stats["retransmits"] == 4
    b.stream.on_message(d)
    a.stream.on_ack(b.ack(), now=9.5)
    assert a.rtt.srtt is None  # a retransmitted message gives no RTT sample (Karn)
    assert len(a.of(ev.ChatDelivered)) == 1


def test_give_up_after_the_retransmit_limit_fails_only_that_message() -> None:
    a = End("a", SessionConfig(max_retransmits=1, rto_initial=1.0))
    first, second = a.chat("x"), a.chat("y")
    a.stream.transmit(now=0.0)
    assert a.stream.retransmit(1.0)[1] is None
    sent, gave_up = a.stream.retransmit(a.stream.next_deadline())
    assert gave_up == "retransmit limit" and sent == []
    assert [(e.msg_id, e.reason) for e in a.of(ev.ChatFailed)] == [(first, "retransmit limit")]  # type: ignore[attr-defined]
    a.stream.fail_all("peer lost")  # what the owner does next: the stream cannot skip a message
    assert [e.msg_id for e in a.of(ev.ChatFailed)] == [first, second]  # type: ignore[attr-defined]
    assert a.stream.pending == 0 and a.stats["failed"] == 2


def test_give_up_after_chat_give_up_s() -> None:
    a = End("a", SessionConfig(chat_give_up_s=2.5, rto_initial=1.0, rto_max=3.0))
    a.chat("x")
    a.stream.transmit(now=0.0)
    assert a.stream.retransmit(1.0)[1] is None  # due at 1.0, next at 3.0
    assert a.stream.next_deadline() == pytest.approx(2.5)  # the give-up time comes first
    assert a.stream.retransmit(2.5) == ([], "timeout")


def test_controls_share_the_stream_and_malformed_ones_are_counted() -> None:
    a, b = End("a"), End("b")
    a.chat("first")
    a.control({"op": "x"})
    a.control([1, 2])  # valid JSON, not an object
    for d in a.stream.transmit(now=0.0):
        b.stream.on_message(d)
    kinds = [type(e).__name__ for e in b.events]
    assert kinds == ["ChatReceived", "ControlReceived"]
    assert b.stats["controls_malformed"] == 1 and b.stats["controls_received"] == 1
    a.stream.on_ack(b.ack(), now=0.1)
    assert [type(e).__name__ for e in a.events] == [
        "ChatDelivered",
        "ControlDelivered",
        "ControlDelivered",
    ]


def test_restart_renumbers_unacked_messages_from_zero() -> None:
    a, b = End("a"), End("b")
    for t in "abc":
        a.chat(t)
    sent = a.stream.transmit(now=0.0)
    b.stream.on_message(sent[0])
    a.stream.on_ack(b.ack(), now=0.1)  # "a" delivered; "b", "c" in flight
    a.chat("d")  # queued
    a.stream.restart()
    fresh = End("b2")  # the peer's new session expects 0
    again = a.stream.transmit(now=1.0)
    assert [(d.seq, d.text) for d in again] == [(0, "b"), (1, "c"), (2, "d")]  # type: ignore[union-attr]
    for d in again:
        fresh.stream.on_message(d)
    assert received_texts(fresh) == ["b", "c", "d"]
    assert a.stream.take_seq() == 3


def test_lossy_reordering_link_delivers_everything_once_in_order() -> None:
    rng = random.Random(7)
    a, b = End("a"), End("b")
    texts = [f"m{i}" for i in range(300)]
    for t in texts:
        a.chat(t)
    now = 0.0
    while a.stream.pending and now < 600:
        out, gave_up = a.stream.retransmit(now)
        assert gave_up is None
        out += a.stream.transmit(now)
        rng.shuffle(out)
        for d in out:
            if rng.random() < 0.3:
                continue  # lost
            b.stream.on_message(d)
            if rng.random() < 0.1:
                b.stream.on_message(d)  # duplicated
        if rng.random() < 0.7:
            a.stream.on_ack(b.ack(), now + 0.05)
        now += 0.1
    assert received_texts(b) == texts
    assert a.stats["delivered"] == 300 and a.stats["retransmits"] > 0


def test_rtt_estimator_follows_rfc_6298() -> None:
    cfg = SessionConfig(rto_initial=1.0, rto_min=0.2, rto_max=3.0)
    r = RttEstimator(cfg)
    assert r.rto == 1.0 and r.srtt is None
    r.sample(0.1)
    assert (r.srtt, r.rttvar, r.latest, r.min) == pytest.approx((0.1, 0.05, 0.1, 0.1))
    assert r.rto == pytest.approx(0.3)  # 0.1 + 4 * 0.05
    r.sample(0.3)
    assert r.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.2)
    assert r.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.3)
    assert r.min == pytest.approx(0.1) and r.latest == pytest.approx(0.3)
    r.sample(-1.0)  # a clock step backwards counts as 0
    assert r.latest == 0.0 and r.min == 0.0
    for _ in range(50):
        r.sample(0.001)
    assert r.rto == 0.2  # rto_min
    for _ in range(50):
        r.sample(10.0)
    assert r.rto == 3.0  # rto_max
