"""The ordered reliable message stream and its RFC 6298 timer, sans-I/O.

Chat and control messages share one stream: u32 sequence numbers from 0, cumulative plus
selective ACKs, a retransmission timer per message (RFC 6298, exponential backoff, Karn's rule
for RTT samples), a send window (``max_in_flight``) and a receive window (``recv_window``).

:class:`ReliableStream` owns the sequence space on both sides and nothing else: it neither
addresses, seals nor sends datagrams.  Its owner (:class:`~p2plab.core.session.PeerSession`)
builds the :class:`~p2plab.core.wire.Chat`/:class:`~p2plab.core.wire.Control` datagrams with
the sequence number :meth:`ReliableStream.take_seq` gives, hands them to :meth:`~ReliableStream.
queue`, sends what :meth:`~ReliableStream.transmit` and :meth:`~ReliableStream.retransmit`
return, feeds received messages and ACKs back, and decides when the link may carry traffic.
Events (delivered, failed, received) go to the ``emit`` callable, in order with the owner's own
events.  Time is always passed in.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.wire import MAX_CHAT_BYTES, MAX_SELECTIVE_ACKS, Ack, Chat, Control
from p2plab.errors import ChatTooLong, LocalProtocolError

__all__ = [
    "CLOCK_GRANULARITY",
    "KeepaliveLog",
    "Outgoing",
    "ReliableStream",
    "RttEstimator",
    "RttReadout",
    "check_chat_text",
    "control_payload",
]

CLOCK_GRANULARITY = 0.001
"""G of RFC 6298 section 2, in seconds."""

_INF = float("inf")
_U32 = 1 << 32

MessageKind = Literal["chat", "control"]


def check_chat_text(text: str) -> None:
    """Raise :class:`ChatTooLong` over 4096 bytes of UTF-8, :class:`LocalProtocolError` for text
    that cannot be UTF-8 (lone surrogates): the stream only carries what the peer can decode."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"chat text is not valid Unicode: {exc}") from None
    if len(raw) > MAX_CHAT_BYTES:
        raise ChatTooLong(
            f"chat message is {len(raw)} bytes of UTF-8; the limit is {MAX_CHAT_BYTES} bytes"
        )


def control_payload(obj: dict[str, Any], limit: int) -> bytes:
    """``obj`` as compact JSON; :class:`LocalProtocolError` if it is not a JSON-serialisable
    dict or encodes to more than ``limit`` bytes."""
    if not isinstance(obj, dict):
        raise LocalProtocolError(f"a control message must be a dict, got {type(obj).__name__}")
    try:
        payload = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"control message is not JSON-serialisable: {exc}") from None
    if len(payload) > limit:
        raise LocalProtocolError(
            f"control message is {len(payload)} bytes; the limit is {limit} bytes"
        )
    return payload


class RttEstimator:
    """RFC 6298 round-trip estimate: SRTT, RTTVAR and the RTO derived from them."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.srtt: float | None = None
        """Smoothed RTT in seconds, None before the first sample."""
        self.rttvar = 0.0
        """RTT variation (RFC 6298's RTTVAR)."""
        self.latest: float | None = None
        """The most recent sample."""
        self.min: float | None = None
        """The smallest sample seen."""

    def sample(self, sample: float) -> None:
        """Take one RTT measurement (RFC 6298 sections 2.2 and 2.3); negative counts as 0."""
        sample = max(sample, 0.0)
        self.latest = sample
        self.min = sample if self.min is None else min(self.min, sample)
        if self.srtt is None:
            self.srtt = sample
            self.rttvar = sample / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample

    @property
    def rto(self) -> float:
        """Retransmission timeout (RFC 6298 section 2) before backoff, within rto_min..rto_max."""
        if self.srtt is None:
            return self.config.rto_initial
        rto = self.srtt + max(CLOCK_GRANULARITY, 4 * self.rttvar)
        return min(max(rto, self.config.rto_min), self.config.rto_max)


class RttReadout:
    """The read-only RTT figures of an object holding an :class:`RttEstimator` as ``_rtt``
    (the peer session's, kept here to keep :mod:`p2plab.core.session` short)."""

    _rtt: RttEstimator

    @property
    def rtt(self) -> float | None:
        """Smoothed RTT (RFC 6298 SRTT) in seconds, None before the first sample."""
        return self._rtt.srtt

    @property
    def latest_rtt(self) -> float | None:
        """The most recent RTT sample."""
        return self._rtt.latest

    @property
    def min_rtt(self) -> float | None:
        """The smallest RTT sample seen."""
        return self._rtt.min

    @property
    def rto(self) -> float:
        """Current retransmission timeout (RFC 6298 section 2), before backoff."""
        return self._rtt.rto


class KeepaliveLog:
    """When our recent keep-alives went out, by sequence number: each KEEPALIVE_ACK that echoes
    one is an RTT sample.  Only the last ``remembered`` are kept (an ack older than that, or one
    we never sent, samples nothing)."""

    def __init__(self, remembered: int = 16) -> None:
        self._remembered = remembered
        self._seq = 0
        self._sent: dict[int, float] = {}

    def sent(self, now: float) -> int:
        """Record a keep-alive sent at ``now``; returns its sequence number (u32, wrapping)."""
        seq = self._seq
        self._seq = (seq + 1) % _U32
        self._sent[seq] = now
        while len(self._sent) > self._remembered:
            del self._sent[next(iter(self._sent))]
        return seq

    def answered(self, seq: int) -> float | None:
        """When keep-alive ``seq`` went out (once), or None if we do not know it."""
        return self._sent.pop(seq, None)

    def clear(self) -> None:
        """Forget every keep-alive in flight (the peer restarted its session)."""
        self._sent.clear()


@dataclass
class Outgoing:
    """One message of ours: queued, then in flight until acknowledged, given up or failed."""

    seq: int
    """Its position in our stream (u32)."""
    kind: MessageKind
    """``"chat"`` or ``"control"`` (which events and counters it feeds)."""
    msg_id: str
    """The id the owner returned to its caller."""
    datagram: Chat | Control
    """The unsealed datagram; sealed at each transmission (a sealer never repeats a nonce)."""
    first_sent: float = _INF
    """When it was first sent (``inf`` while queued)."""
    last_sent: float = _INF
    """When it was last sent."""
    retransmits: int = 0
    """Times it was sent again."""
    rto: float = 0.0
    """Its current retransmission timeout, doubled at each retransmission."""
    deadline: float = _INF
    """When it is retransmitted next unless acknowledged."""


class ReliableStream:
    """Both directions of the ordered reliable stream of one peer link (see the module doc).

    ``stats`` is the owner's counter dict (``chats_sent``, ``retransmits``, ``delivered``, ...
    are incremented in place); ``emit`` receives the stream's events.
    """

    def __init__(
        self,
        config: SessionConfig,
        rtt: RttEstimator,
        stats: MutableMapping[str, int],
        emit: Callable[[ev.Event], None],
    ) -> None:
        self.config = config
        self.rtt = rtt
        self.stats = stats
        self._emit = emit
        # sending side
        self._next_seq = 0
        self._unsent: deque[Outgoing] = deque()
        self._in_flight: dict[int, Outgoing] = {}
        # receiving side
        self._expected = 0
        self._recv_buf: dict[int, Chat | Control] = {}

    # -- sending ---------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged (queued or in flight)."""
        return len(self._unsent) + len(self._in_flight)

    def take_seq(self) -> int:
        """The sequence number of the next message (the caller builds its datagram with it)."""
        seq = self._next_seq
        self._next_seq = (seq + 1) % _U32
        return seq

    def queue(self, kind: MessageKind, msg_id: str, datagram: Chat | Control) -> None:
        """Queue a message built with :meth:`take_seq`'s number; it goes out in :meth:`transmit`."""
        self._unsent.append(Outgoing(datagram.seq, kind, msg_id, datagram))

    def sendable(self) -> bool:
        """A queued message fits in the send window (``max_in_flight`` from the oldest unacked)."""
        if not self._unsent:
            return False
        lowest = min(self._in_flight) if self._in_flight else self._unsent[0].seq
        return (self._unsent[0].seq - lowest) % _U32 < self.config.max_in_flight

    def transmit(self, now: float) -> list[Chat | Control]:
        """First transmissions due now: queued messages that fit in the send window."""
        out: list[Chat | Control] = []
        while self.sendable():
            o = self._unsent.popleft()
            o.first_sent = o.last_sent = now
            o.rto = self.rtt.rto
            o.deadline = now + o.rto
            self._in_flight[o.seq] = o
            self.stats["chats_sent" if o.kind == "chat" else "controls_sent"] += 1
            out.append(o.datagram)
        return out

    def retransmit(self, now: float) -> tuple[list[Chat | Control], str | None]:
        """Retransmissions due now, and the reason if a message was given up.

        Giving up one message (``chat_give_up_s`` or ``max_retransmits`` reached) fails it and
        stops there: the ordered stream cannot skip it, so the owner must end the link (and
        :meth:`fail_all` the rest).
        """
        out: list[Chat | Control] = []
        for o in sorted(self._in_flight.values(), key=lambda o: o.first_sent):
            if now < o.deadline and now < o.first_sent + self.config.chat_give_up_s:
                continue
            if now >= o.first_sent + self.config.chat_give_up_s:
                return out, self._give_up(o, "timeout")
            if o.retransmits >= self.config.max_retransmits:
                return out, self._give_up(o, "retransmit limit")
            o.retransmits += 1
            o.last_sent = now
            o.rto = min(o.rto * 2, self.config.rto_max)
            o.deadline = now + o.rto
            self.stats["retransmits"] += 1
            out.append(o.datagram)
        return out, None

    def next_deadline(self) -> float:
        """When :meth:`retransmit` has work next (``inf`` for none)."""
        give_up = self.config.chat_give_up_s
        return min(
            (min(o.deadline, o.first_sent + give_up) for o in self._in_flight.values()),
            default=_INF,
        )

    def on_ack(self, d: Ack, now: float) -> None:
        """The peer acknowledged ``d.cumulative`` (exclusive) and ``d.selective``."""
        self.stats["acks_received"] += 1
        acked: list[Outgoing] = []
        selective = set(d.selective)
        for seq, o in list(self._in_flight.items()):
            if 0 < (d.cumulative - seq) % _U32 < _U32 // 2 or seq in selective:
                acked.append(o)
                del self._in_flight[seq]
        if not acked:
            return
        acked.sort(key=lambda o: o.seq)
        fresh = [o for o in acked if o.retransmits == 0]
        if fresh:
            # Karn's rule: only never-retransmitted messages give a sample.
            self.rtt.sample(now - max(o.first_sent for o in fresh))
        for o in acked:
            self.stats["delivered"] += 1
            latency = now - o.first_sent
            if o.kind == "chat":
                self._emit(ev.ChatDelivered(o.msg_id, latency))
            else:
                self._emit(ev.ControlDelivered(o.msg_id, latency))

    def fail_all(self, reason: str) -> None:
        """Fail every message not yet acknowledged, in stream order (the link ended)."""
        pending = list(self._in_flight.values()) + list(self._unsent)
        pending.sort(key=lambda o: o.seq)
        self._in_flight.clear()
        self._unsent.clear()
        for o in pending:
            self._fail(o, reason)

    # -- receiving -------------------------------------------------------------------------------

    def on_message(self, d: Chat | Control) -> None:
        """One message from the peer: deliver it and whatever it unblocks, in order.

        The caller acknowledges every message it passes here (duplicates too: our ACK may
        have been lost); :meth:`ack_fields` says what to acknowledge.
        """
        offset = (d.seq - self._expected) % _U32
        if offset >= _U32 // 2 or d.seq in self._recv_buf:
            self.stats["duplicates"] += 1
            return
        if offset >= self.config.recv_window:
            self.stats["dropped_out_of_window"] += 1
            return
        self._recv_buf[d.seq] = d
        while self._expected in self._recv_buf:
            msg = self._recv_buf.pop(self._expected)
            self._expected = (self._expected + 1) % _U32
            self._deliver(msg)

    def ack_fields(self) -> tuple[int, tuple[int, ...]]:
        """``(cumulative, selective)`` for the next ACK: the next expected sequence number and
        the out-of-order ones held, nearest first, at most ``MAX_SELECTIVE_ACKS``."""
        selective = tuple(sorted(self._recv_buf, key=lambda s: (s - self._expected) % _U32))
        return self._expected, selective[:MAX_SELECTIVE_ACKS]

    # -- both ------------------------------------------------------------------------------------

    def restart(self) -> None:
        """The peer started a new session: both directions start over at sequence 0.

        The new peer session knows nothing of ours, so every message not yet acknowledged is
        renumbered from 0 (oldest first) and sent again; received state is dropped.
        """
        self._expected = 0
        self._recv_buf.clear()
        pending = sorted(self._in_flight.values(), key=lambda o: (o.seq - self._next_seq) % _U32)
        pending += list(self._unsent)
        self._in_flight.clear()
        self._unsent = deque(
            Outgoing(i, o.kind, o.msg_id, replace(o.datagram, seq=i)) for i, o in enumerate(pending)
        )
        self._next_seq = len(pending) % _U32

    # -- internals -------------------------------------------------------------------------------

    def _give_up(self, o: Outgoing, reason: str) -> str:
        del self._in_flight[o.seq]
        self._fail(o, reason)
        return reason

    def _fail(self, o: Outgoing, reason: str) -> None:
        self.stats["failed"] += 1
        if o.kind == "chat":
            self._emit(ev.ChatFailed(o.msg_id, reason))
        else:
            self._emit(ev.ControlFailed(o.msg_id, reason))

    def _deliver(self, msg: Chat | Control) -> None:
        if isinstance(msg, Chat):
            self.stats["chats_received"] += 1
            self._emit(ev.ChatReceived(msg.msg_id, msg.text, msg.sent_at))
            return
        try:
            obj = json.loads(msg.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            obj = None
        if not isinstance(obj, dict):
            self.stats["controls_malformed"] += 1
            return
        self.stats["controls_received"] += 1
        self._emit(ev.ControlReceived(msg.msg_id, obj))
