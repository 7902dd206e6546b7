"""The peer link state machine, sans-I/O (shaped like aioquic's ``QuicConnection`` and h11).

::

    punching --(probe round trip + nomination)--> connected --(silence / give-up)--> lost
        |                                            |
        +--(punch_timeout)--> lost                   +--(BYE either way)--> closed

The driver feeds datagrams with :meth:`PeerSession.receive_datagram`, calls
:meth:`~PeerSession.datagrams_to_send` and sends what it returns, arms one timer at
:meth:`~PeerSession.get_timer` and calls :meth:`~PeerSession.handle_timer` when it fires, and drains
:meth:`~PeerSession.next_event`.  ``datagrams_to_send`` also runs whatever timer work is due, so a
driver that calls it after every input can never stall.

Decisions worth knowing:

* **Connected** means a full round trip: the controlling side connects on the first PROBE_ACK
  that echoes its nonce from the address the probe went to, then nominates that address with
  flagged probes; the controlled side connects when the address the controlling side nominated
  (explicitly, or implicitly by sending keep-alives or data from it) has passed its own round trip.
* **Chat and control** share one reliable, ordered stream,
  :class:`~p2plab.core.reliable.ReliableStream`, which the session feeds and drives.  While
  punching, ``send_chat``/``send_control`` queue the message until connected; after
  ``lost``/``closed`` they raise :class:`~p2plab.errors.NotConnected`.
* **Giving up** one message breaks the ordered stream (the receiver would wait for it forever), so
  it fails that message and every later one and declares the peer lost (``"delivery failed"``).
  With the default settings the peer timeout (15 s) always comes first.
* **Keep-alives** go out only when we have sent nothing of our own (probes, messages,
  keep-alives; acks do not count) for ``keepalive_interval``, so both ends send them on an idle
  link and both measure the RTT; their round trips (and ACKs of never-retransmitted messages)
  feed the RTT estimate.
* **BYE** from the peer ends in state ``closed`` with a :class:`PeerClosed` event; our own
  :meth:`close` ends in ``closed`` too, without an event.
* **Budgets** (:mod:`p2plab.core.punch`): ``max_candidates`` offered addresses, each probed at
  most ``probes_per_candidate`` times, ``probe_budget`` probes in all; anything to an address no
  round trip validated is capped at ``amplification_factor`` times what came from it, except
  the offer's own candidates (and birthday ones) while punching: vouched for, and budgeted.
* What of a received datagram reaches the state machine (the per-source limit on new peer
  sessions, authentication, benchmark types, the pair's ids) is :mod:`p2plab.core.session_intake`;
  bad datagrams never raise: they are dropped and counted in :attr:`PeerSession.stats`
  (names in :mod:`p2plab.core.session_stats`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.punch import AmplificationLimit, Candidate, Checklist, SourceRateLimit
from p2plab.core.reliable import (
    KeepaliveLog,
    ReliableStream,
    RttEstimator,
    RttReadout,
    check_chat_text,
    control_payload,
)
from p2plab.core.session_intake import Address, open_datagram, usable_candidates
from p2plab.core.session_paths import PathBook, SessionPaths
from p2plab.core.session_stats import new_session_stats
from p2plab.core.wire import (
    Ack,
    Bye,
    Chat,
    Control,
    Datagram,
    Keepalive,
    KeepaliveAck,
    Probe,
    ProbeAck,
    Sealer,
    SessionDatagram,
    encode_datagram,
)
from p2plab.errors import ConfigError, NotConnected

__all__ = ["Address", "PeerSession", "Role", "State"]

log = logging.getLogger(__name__)

Role = Literal["controlling", "controlled"]
State = Literal["punching", "connected", "lost", "closed"]

_INF = float("inf")
_NOMINATION_PROBES = 10  # flagged probes before relying on implicit nomination
_PATH_CHECK_PROBES = 10  # probes to a new peer address seen once connected


class PeerSession(RttReadout, SessionPaths):
    """One peer link: punching, nomination, keep-alives, RTT and a reliable message stream.

    ``rtt``, ``latest_rtt``, ``min_rtt`` and ``rto`` are :class:`RttReadout`'s; ``path``,
    ``candidates``, the candidates added after the offer and birthday probes are
    :class:`~p2plab.core.session_paths.SessionPaths`'s."""

    def __init__(
        self,
        local_id: str,
        peer_id: str,
        role: Role,
        candidates: list[Address],
        config: SessionConfig,
        now: float,
        rand_bytes: Callable[[int], bytes],
        *,
        sealer: Sealer | None = None,
    ) -> None:
        if role not in ("controlling", "controlled"):
            raise ConfigError(f"role must be 'controlling' or 'controlled', got {role!r}")
        if local_id == peer_id:
            raise ConfigError(f"local_id and peer_id are the same: {local_id!r}")
        self.local_id = local_id
        self.peer_id = peer_id
        self.role: Role = role
        self.config = config
        self._rand_bytes = rand_bytes
        self._sealer = sealer
        self._state: State = "punching"
        self.stats: dict[str, int] = new_session_stats()
        self.datagrams_accepted = 0
        """Datagrams that authenticated as the peer's (the engine adopts a pool socket on one)."""

        self._checklist = Checklist.start(usable_candidates(candidates), config, now)
        self.stats["candidates_dropped"] = self._checklist.dropped
        self._amp = AmplificationLimit(config.amplification_factor)
        self._new_sessions = SourceRateLimit(config.new_session_rate, config.new_session_burst)
        self._punch_deadline = now + config.punch_timeout
        self._peer_address: Address | None = None
        self._nominated: Address | None = None  # controlled: what the controlling side chose
        self._nomination_done = False  # controlling: a flagged probe was acknowledged
        self._data_source: Address | None = None  # where the peer's last non-probe came from
        self._paths = PathBook(config, now)  # path names, upgrade and downgrade (issue 17)

        self._outbox: list[tuple[bytes, Address]] = []
        self._events: deque[ev.Event] = deque()

        self._rtt = RttEstimator(config)  # RFC 6298, fed by probes, keep-alives and acks

        # liveness
        self._last_sent = now
        self._last_received = now
        self._keepalives = KeepaliveLog()

        self._stream = ReliableStream(config, self._rtt, self.stats, self._events.append)
        self._ack_pending: Address | None = None  # where the next ACK of the stream goes

    # ------------------------------------------------------------------------------------------
    # read-only state

    @property
    def state(self) -> State:
        """``"punching"``, ``"connected"``, ``"lost"`` or ``"closed"``."""
        return self._state

    @property
    def peer_address(self) -> Address | None:
        """The peer's address on the nominated path (None until connected)."""
        return self._peer_address

    @property
    def sealer(self) -> Sealer | None:
        """The sealer of this session's datagrams (a :class:`~p2plab.core.crypto.PeerCipher` when
        encrypted); the benchmark data path seals and opens its datagrams with it too."""
        return self._sealer

    @property
    def pending_messages(self) -> int:
        """Reliable messages not yet acknowledged (queued or in flight)."""
        return self._stream.pending

    # ------------------------------------------------------------------------------------------
    # commands

    def send_chat(self, text: str, now: float, sent_at: float | None = None) -> str:
        """Queue a chat message; returns its id.  ``sent_at`` defaults to ``now``.

        Raises :class:`ChatTooLong` over 4096 bytes of UTF-8 and :class:`NotConnected` once the
        session is ``lost`` or ``closed``.  While punching the message waits for the link.
        """
        check_chat_text(text)
        self._check_open("send a chat message")
        msg_id = self._new_id()
        seq = self._stream.take_seq()
        datagram = Chat(
            self.local_id,
            self.peer_id,
            seq=seq,
            msg_id=msg_id,
            sent_at=now if sent_at is None else sent_at,
            text=text,
        )
        self._stream.queue("chat", msg_id, datagram)
        return msg_id

    def send_control(self, obj: dict[str, Any], now: float, sent_at: float | None = None) -> str:
        """Queue a reliable JSON control message; returns its id (same stream as chat).

        Raises :class:`LocalProtocolError` if ``obj`` is not a JSON-serialisable dict or encodes
        to more than ``config.max_control_bytes``; :class:`NotConnected` once lost or closed.
        """
        payload = control_payload(obj, self.config.max_control_bytes)
        self._check_open("send a control message")
        msg_id = self._new_id()
        seq = self._stream.take_seq()
        datagram = Control(
            self.local_id,
            self.peer_id,
            seq=seq,
            msg_id=msg_id,
            sent_at=now if sent_at is None else sent_at,
            payload=payload,
        )
        self._stream.queue("control", msg_id, datagram)
        return msg_id

    def close(self, now: float, reason: str = "") -> None:
        """Close the session: a best-effort BYE to the peer, pending messages fail ("closed")."""
        if self._state in ("lost", "closed"):
            return
        reason = reason.encode("utf-8")[:255].decode("utf-8", "ignore")
        bye = self._encode(Bye(self.local_id, self.peer_id, reason=reason))
        targets: list[Address]
        if self._peer_address is not None:
            targets = [self._peer_address]
        else:
            targets = list(self._checklist.candidates)
        for addr in targets:
            self._send(bye, addr, now)
        self._finish("closed", "closed")
        log.debug("session %s -> %s closed", self.local_id, self.peer_id)

    # ------------------------------------------------------------------------------------------
    # driver interface

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one datagram from ``addr``.  Never raises on bad input: drops and counts."""
        self.stats["datagrams_in"] += 1
        self.stats["bytes_in"] += len(data)
        if self._state in ("lost", "closed"):
            self.stats["dropped_after_close"] += 1
            return
        opened = open_datagram(
            data,
            addr,
            now,
            local_id=self.local_id,
            peer_id=self.peer_id,
            sealer=self._sealer,
            new_sessions=self._new_sessions,
            stats=self.stats,
        )
        if opened is None:
            return
        datagram, addr = opened
        self.datagrams_accepted += 1
        self._paths.heard(addr, self._peer_address, now)
        self._amp.received(addr, len(data))  # it authenticated: credit for replies there
        take_restart = getattr(self._sealer, "take_peer_restart", None)
        if take_restart is not None and take_restart():
            self._on_peer_restart(now)
        self._dispatch(datagram, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams to send now, with their destinations (runs due timer work first)."""
        self._service(now)
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        if self._state in ("lost", "closed"):
            return None
        probe_at = self._checklist.next_deadline()
        deadlines = [_INF if probe_at is None else probe_at]
        if self._state == "punching":
            deadlines.append(self._punch_deadline)
        else:
            deadlines.append(self._last_sent + self.config.keepalive_interval)
            deadlines.append(self._last_received + self.config.peer_timeout)
            deadlines.append(self._stream.next_deadline())
            controlling = self.role == "controlling"
            paths = self._paths.deadline(self._peer_address, controlling, self._checklist)
            deadlines.append(paths)
            if self._ack_pending is not None or self._sendable():
                deadlines.append(-_INF)
        when = min(deadlines)
        if when == -_INF:
            return self._last_sent  # something to send right away
        return None if when == _INF else when

    def handle_timer(self, now: float) -> None:
        """Run the timer work due at ``now`` (probes, retransmissions, keep-alives, timeouts)."""
        self._service(now)

    def next_event(self) -> ev.Event | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------------------------------
    # internals: helpers

    def _new_id(self) -> str:
        return self._rand_bytes(8).hex()

    def _check_open(self, what: str) -> None:
        if self._state in ("lost", "closed"):
            raise NotConnected(f"cannot {what}: the session is {self._state}")

    def _encode(self, datagram: Datagram) -> bytes:
        return encode_datagram(datagram, self._sealer)

    def _send(
        self, data: bytes, addr: Address, now: float, *, reply: bool = False, probe: bool = False
    ) -> None:
        if not self._may_send(addr, len(data), probe):
            self.stats["amplification_limited"] += 1
            return
        self._outbox.append((data, addr))
        self.stats["datagrams_out"] += 1
        self.stats["bytes_out"] += len(data)
        if not reply and (self._peer_address is None or addr == self._peer_address):
            # Replies (acks) do not count as activity for the keep-alive timer, so both ends
            # keep sending their own keep-alives and both measure the RTT; nor does what goes
            # to another path (upgrade and warm-up probes): the current path needs its own.
            self._last_sent = max(self._last_sent, now)

    def _may_send(self, addr: Address, size: int, probe: bool = False) -> bool:
        """The anti-amplification rule (see the module docstring for the one exemption; the
        scheduled probes of upgrade and warm-up rounds to vouched-for addresses are in it)."""
        if (self._state == "punching" or probe) and self._checklist.given(addr):
            return True
        return self._amp.allow(addr, size)

    def _finish(self, state: State, reason: str) -> None:
        """Enter ``lost``/``closed``: fail every pending message with ``reason``."""
        self._state = state
        self._checklist.stop_all()
        self._stream.fail_all(reason)
        self._ack_pending = None

    def _lose(self, reason: str) -> None:
        log.info("peer %s lost: %s", self.peer_id, reason)
        self._finish("lost", "peer lost" if reason != "punch timeout" else "punch timeout")
        self._events.append(ev.PeerLost(reason))

    def _on_peer_restart(self, now: float) -> None:
        """The peer started a new session (its sealer saw a new session tag): restart our stream.

        The new peer session expects sequence numbers from 0 and knows nothing of ours, so every
        message not yet acknowledged is renumbered from 0 and sent again; the receive side starts
        over at 0 too.  A controlling side nominates its path again for the new session.
        """
        self.stats["peer_restarts"] += 1
        log.info("peer %s restarted its session", self.peer_id)
        self._stream.restart()
        self._keepalives.clear()
        if self.role == "controlling" and self._is_connected() and self._peer_address:
            self._nomination_done = False
            self._checklist.restart(self._peer_address, now, budget=_NOMINATION_PROBES)
        self._events.append(ev.PeerRestarted())

    def _connect(self, addr: Address, now: float, rtt: float | None) -> None:
        self._state = "connected"
        self._peer_address = addr
        self._last_received = now
        self._paths.moved(now)
        self._checklist.stop_all()
        if self.role == "controlling":
            self._checklist.restart(addr, now, budget=_NOMINATION_PROBES)
        log.info("peer %s connected at %s (rtt %s)", self.peer_id, addr, rtt)
        self._events.append(ev.PeerConnected(addr, rtt, path=self._paths.name(addr) or ""))

    def _is_connected(self) -> bool:
        # a call, so that type checkers do not keep a narrowed ``_state`` across state changes
        return self._state == "connected"

    def _change_path(self, addr: Address, now: float) -> None:
        previous = self._peer_address
        self._peer_address = addr
        self._paths.moved(now)
        self.stats["path_changes"] += 1
        if self.role == "controlling":
            self._nomination_done = False
            self._checklist.restart(addr, now, budget=_NOMINATION_PROBES)
        log.info("peer %s path changed %s -> %s", self.peer_id, previous, addr)
        name, before = self._paths.name(addr) or "", self._paths.name(previous)
        self._events.append(ev.PathChanged(addr, previous, path=name, previous_path=before))

    # ------------------------------------------------------------------------------------------
    # internals: timers and sending

    def _sendable(self) -> bool:
        return self._state == "connected" and self._stream.sendable()

    def _service(self, now: float) -> None:
        if self._state in ("lost", "closed"):
            return
        if self._state == "punching" and now >= self._punch_deadline:
            self._lose("punch timeout")
            return
        if self._state == "connected" and now >= self._last_received + self.config.peer_timeout:
            self._lose("peer timeout")
            return
        if self._state == "connected":
            controlling = self.role == "controlling"
            down = self._paths.service(now, self._peer_address, controlling, self._checklist)
            if down is not None:
                log.info("peer %s: nothing on the direct path: moving to %s", self.peer_id, down)
                self._change_path(down, now)
        self._send_probes(now)
        if self._state != "connected":
            return
        assert self._peer_address is not None
        retransmissions, gave_up = self._stream.retransmit(now)
        for datagram in retransmissions:
            self._send(self._encode(datagram), self._peer_address, now)
        if gave_up is not None:
            # The ordered stream cannot skip a message, so giving one up ends the session.
            log.info("gave up a message to %s: %s", self.peer_id, gave_up)
            self._finish("lost", "peer lost")
            self._events.append(ev.PeerLost("delivery failed"))
            return
        for datagram in self._stream.transmit(now):
            self._send(self._encode(datagram), self._peer_address, now)
        if self._ack_pending is not None:
            self._send_ack(now)
        if now >= self._last_sent + self.config.keepalive_interval:
            self._send_keepalive(now)

    def _send_probes(self, now: float) -> None:
        for cand in self._checklist.due(now):
            if self._state == "punching" and not self._checklist.take_budget(cand):
                self.stats["probe_budget_exhausted"] += 1
                continue
            nominate = (
                self.role == "controlling"
                and self._state == "connected"
                and cand.address == self._peer_address
            )
            self._probe(cand, now, nominate)

    def _probe(self, cand: Candidate, now: float, nominate: bool) -> None:
        nonce = self._rand_bytes(8)
        probe = Probe(
            self.local_id, self.peer_id, nonce=nonce, nominate=nominate, target=cand.address
        )
        self._checklist.record_probe(cand, nonce, now, nominate)
        self.stats["probes_sent"] += 1
        self._send(self._encode(probe), cand.address, now, probe=True)

    def _send_ack(self, now: float) -> None:
        addr = self._ack_pending
        self._ack_pending = None
        if addr is None:
            return
        cumulative, selective = self._stream.ack_fields()
        ack = Ack(self.local_id, self.peer_id, cumulative=cumulative, selective=selective)
        self.stats["acks_sent"] += 1
        self._send(self._encode(ack), addr, now, reply=True)

    def _send_keepalive(self, now: float) -> None:
        assert self._peer_address is not None
        seq = self._keepalives.sent(now)
        ka = Keepalive(self.local_id, self.peer_id, seq=seq, timestamp=now)
        self.stats["keepalives_sent"] += 1
        self._send(self._encode(ka), self._peer_address, now)

    # ------------------------------------------------------------------------------------------
    # internals: input

    def _dispatch(self, d: SessionDatagram, addr: Address, now: float) -> None:
        if isinstance(d, Probe):
            self._on_probe(d, addr, now)
        elif isinstance(d, ProbeAck):
            self._on_probe_ack(d, addr, now)
        elif isinstance(d, Bye):
            self._finish("closed", "peer closed")
            self._events.append(ev.PeerClosed(d.reason))
        else:
            self._on_traffic(d, addr, now)

    def _on_probe(self, d: Probe, addr: Address, now: float) -> None:
        self.stats["probes_received"] += 1
        self._last_received = now
        self._paths.targeted(addr, d.target)  # which of our addresses the peer reached
        # Answer where it really came from (RFC 8445 section 7.3.1.3).
        ack = ProbeAck(
            self.local_id, self.peer_id, nonce=d.nonce, nominate=d.nominate, observed=addr
        )
        self._send(self._encode(ack), addr, now, reply=True)
        if self._state == "punching":
            cand, new = self._checklist.add(addr, "prflx", now)  # triggered check (7.3.1.4)
            if cand is None:
                self.stats["candidates_dropped"] += 1
            elif new:
                self.stats["prflx_learned"] += 1
                log.debug("learnt peer-reflexive candidate %s", addr)
        elif self._state == "connected":
            self._paths.check_back(addr, self._peer_address, self._checklist, now)
        if d.nominate and self.role == "controlled":
            self._follow_nomination(addr, now)

    def _follow_nomination(self, addr: Address, now: float) -> None:
        self._nominated = addr
        cand = self._checklist.get(addr)
        if cand is not None and cand.succeeded:
            if self._state == "punching":
                self._connect(addr, now, cand.rtt)
            elif self._state == "connected" and addr != self._peer_address:
                self._change_path(addr, now)
        elif cand is None:
            if self._state != "punching":
                self._checklist.restart(addr, now, budget=_PATH_CHECK_PROBES)
            elif self._checklist.add(addr, "prflx", now)[0] is None:
                self.stats["candidates_dropped"] += 1  # the punching cap on learnt addresses
                return
            self.stats["prflx_learned"] += 1
        else:
            if self._state == "connected" and cand.next_probe_at == _INF:
                self._checklist.restart(addr, now, budget=_PATH_CHECK_PROBES)
            else:
                self._checklist.trigger(addr, now)

    def _on_probe_ack(self, d: ProbeAck, addr: Address, now: float) -> None:
        match = self._checklist.match_ack(d.nonce, addr, now)
        if match is None:
            self.stats["probe_acks_unmatched"] += 1
            return
        self.stats["probe_acks_received"] += 1
        self._last_received = now
        cand, rtt, nominate = match
        self._amp.validate(cand.address)  # our nonce came back from there: a round trip
        self._rtt.sample(rtt)
        if self._state == "punching":
            if self.role == "controlling":
                self._connect(cand.address, now, rtt)
            elif self._nominated == cand.address:
                self._connect(cand.address, now, rtt)
            elif self._sealer is None:
                self._checklist.stop(cand.address)
            # With session tags, a checked path keeps a few slow probes going until the
            # nomination comes: they name the peer's session now, and that is how a peer
            # whose old session is still connected learns that we restarted ours.
            return
        # connected
        if cand.address == self._peer_address:
            if nominate:
                self._nomination_done = True
                self._checklist.stop(cand.address)
            return
        self._checklist.stop(cand.address)
        if self.role == "controlling":
            if self._paths.better(cand.address, self._peer_address):
                self._change_path(cand.address, now)  # an upgrade (session_paths)
            elif self._data_source == cand.address and not self._paths.better(
                self._peer_address, cand.address
            ):
                self._change_path(cand.address, now)  # the peer's NAT rebound
        elif self._nominated == cand.address:
            self._change_path(cand.address, now)

    def _on_traffic(self, d: SessionDatagram, addr: Address, now: float) -> None:
        """KEEPALIVE, KEEPALIVE_ACK, CHAT, CONTROL, ACK."""
        if self._state == "punching":
            # Only a connected controlling side sends these: ``addr`` is its implicit nomination.
            if self.role == "controlled":
                self._follow_nomination(addr, now)
            if not self._is_connected():
                self.stats["dropped_not_connected"] += 1
                return
        self._data_source = addr
        if addr != self._peer_address:
            cand = self._checklist.get(addr)
            # Late datagrams of a worse path never move the link back (session_paths).
            worse = self._paths.better(self._peer_address, addr)
            if self.role == "controlled":
                if not worse:
                    self._follow_nomination(addr, now)
            elif cand is not None and cand.succeeded:
                if not worse:
                    self._change_path(addr, now)
            elif cand is None or cand.next_probe_at == _INF:
                self._checklist.restart(addr, now, budget=_PATH_CHECK_PROBES)
            succeeded = cand is not None and cand.succeeded
            side = self._paths.side_path(addr, self._peer_address, succeeded)
            if addr != self._peer_address and not side:
                # Outside punching, only the nominated path carries traffic: anything else is
                # at most a hint (a rebinding NAT) that the probe round trip above checks.
                self.stats["unexpected_source"] += 1
                log.debug("dropped %s from unexpected address %s", type(d).__name__, addr)
                return
        self._last_received = now
        if isinstance(d, Keepalive):
            self.stats["keepalives_received"] += 1
            reply = KeepaliveAck(self.local_id, self.peer_id, seq=d.seq, timestamp=d.timestamp)
            self._send(self._encode(reply), addr, now, reply=True)
        elif isinstance(d, KeepaliveAck):
            sent = self._keepalives.answered(d.seq)
            if sent is None:
                return
            self.stats["keepalive_acks_received"] += 1
            self._rtt.sample(now - sent)
            rtt = self._rtt
            assert rtt.srtt is not None and rtt.latest is not None and rtt.min is not None
            self._events.append(ev.RttUpdated(rtt.srtt, rtt.latest, rtt.min))
        elif isinstance(d, Chat | Control):
            self._ack_pending = self._peer_address
            self._stream.on_message(d)
        elif isinstance(d, Ack):
            self._stream.on_ack(d, now)
