"""The peer session of the link engine's current link, sans-I/O (the base of
:class:`~p2plab.core.link.LinkEngine`).

:class:`LinkSessions` holds the engine's state and outputs and everything about the session of
the current link: building it with its sealer (:func:`~p2plab.core.link_trust.new_sealer`),
pumping its datagrams (UDP, or :class:`~p2plab.core.link_commands.RelayDatagram` for the relay)
and events, retiring it (its security counters kept, its pending messages failed), moving it
onto the relay, and what happens when it goes down (:mod:`p2plab.core.link_recovery`).  The
inputs from the driver and the rendezvous are :class:`~p2plab.core.link.LinkEngine`'s.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from p2plab.core import events as ev
from p2plab.core.crypto import EpochStore, Identity, PeerCipher, PlainEnvelope
from p2plab.core.link_commands import (
    LINK_COUNTERS,
    RELAY,
    SECURITY_COUNTERS,
    Command,
    LinkConfig,
    RelayDatagram,
    session_security_counts,
)
from p2plab.core.link_recovery import link_down_input, repunch_candidates, repunch_delay
from p2plab.core.link_table import Input, next_state
from p2plab.core.link_trust import new_sealer
from p2plab.core.session import PeerSession
from p2plab.core.signaling import P2PConnectionOffer

__all__ = ["LinkSessions"]

log = logging.getLogger("p2plab.core.link")  # the engine's log, as before the split

Address = ev.Address


class LinkSessions:
    """The engine's state, outputs and current session (see the module docstring)."""

    def __init__(
        self,
        worker_id: str,
        *,
        config: LinkConfig | None,
        identity: Identity | None,
        rand_bytes: Callable[[int], bytes],
        wall_ns: Callable[[], int] | None,
    ) -> None:
        self.worker_id = worker_id
        self.config = config or LinkConfig()
        self.identity = identity
        """This worker's key pair; None is the explicit plaintext mode."""
        self._rand_bytes = rand_bytes
        self._wall_ns = wall_ns  # session epochs; None: derived from ``now``
        self.epochs = EpochStore()
        """Epochs and tags of our sessions and the newest epoch per peer key (replay defence)."""
        self._state = "starting"
        self.error: str | None = None
        """The last error the user should see (cleared when a link comes up)."""
        self.peer_id: str | None = None
        self.peer_public_key: bytes | None = None
        self.offer: P2PConnectionOffer | None = None
        """The offer of the current peer (kept while re-punching and relaying)."""
        self.session: PeerSession | None = None
        """The session of the current link attempt (None between attempts)."""
        self.relayed = False
        """Whether :attr:`session` runs over the rendezvous relay."""
        self.repunch_attempts = 0
        """Re-punch attempts since the link was last up."""
        self._repunch_at: float | None = None
        self._repunch_candidates: list[Address] = []
        self._outbox: list[tuple[bytes, Address]] = []
        self._commands: deque[Command] = deque()
        self._events: deque[ev.Event] = deque()
        self._security_totals = dict.fromkeys(SECURITY_COUNTERS, 0)
        self.stats: dict[str, int] = dict.fromkeys(LINK_COUNTERS, 0)
        """Counters of the engine's decisions and drops (the worker shows them in ``status``)."""

    # -- sessions -----------------------------------------------------------------------------

    def _new_sealer(self, now: float) -> PeerCipher | PlainEnvelope:
        assert self.peer_id is not None
        epoch = self._wall_ns() if self._wall_ns is not None else int(now * 1e9)
        return new_sealer(
            self.identity,
            self.worker_id,
            self.peer_id,
            self.peer_public_key,
            self._rand_bytes,
            epoch=epoch,
            epochs=self.epochs,
        )

    def _new_session(self, candidates: list[Address], now: float, *, relayed: bool) -> None:
        session = self._build_session(candidates, now)
        self._repunch_at = None
        self.relayed = relayed
        self.session = session

    def _build_session(self, candidates: list[Address], now: float) -> PeerSession:
        """A session to the current peer (not installed; raises if its sealer cannot be built)."""
        assert self.offer is not None and self.peer_id is not None
        return PeerSession(
            local_id=self.worker_id,
            peer_id=self.peer_id,
            role=self.offer.role,
            candidates=candidates,
            config=self.config.session,
            now=now,
            rand_bytes=self._rand_bytes,
            sealer=self._new_sealer(now),
        )

    def _start_relay(self, now: float) -> None:
        """Move the link to the current peer onto the rendezvous relay (a fresh session)."""
        log.info("punching to %s failed: relaying through the rendezvous", self.peer_id)
        self._retire(now, bye=True)
        self.stats["relay_switches"] += 1
        self._new_session([RELAY], now, relayed=True)

    def _retire(self, now: float, *, bye: bool) -> None:
        """End the current session: BYE if asked, keep its counters, fail its pending messages."""
        s = self.session
        if s is None:
            return
        if bye:
            s.close(now)
        self._route(s, s.datagrams_to_send(now), now)
        while (event := s.next_event()) is not None:
            if isinstance(event, ev.ChatFailed | ev.ControlFailed):
                self._events.append(event)
        for k, v in session_security_counts(s).items():
            self._security_totals[k] += v
        self.session = None
        self.relayed = False

    def _drop_peer(self, now: float) -> None:
        self._retire(now, bye=True)
        self._repunch_at = None
        self.peer_id = None
        self.peer_public_key = None
        self.offer = None

    def _repunch(self, now: float) -> None:
        """Punch the same peer again (both sides do this on their own after a peer timeout)."""
        target = next_state(self._state, Input.REPUNCH)
        self._repunch_at = None
        self.repunch_attempts += 1
        log.info(
            "re-punching peer %s (attempt %d) at %s",
            self.peer_id,
            self.repunch_attempts,
            self._repunch_candidates,
        )
        self._new_session(self._repunch_candidates, now, relayed=False)
        self._set_state(target)

    def _route(self, s: PeerSession, datagrams: list[tuple[bytes, Address]], now: float) -> None:
        for data, addr in datagrams:
            if addr == RELAY:
                self._commands.append(RelayDatagram(s.peer_id, data))
            else:
                self._outbox.append((data, addr))

    def _pump(self, now: float) -> None:
        """Collect the session's datagrams and act on its events until it has nothing more."""
        while (s := self.session) is not None:
            self._route(s, s.datagrams_to_send(now), now)
            events: list[ev.Event] = []
            while (event := s.next_event()) is not None:
                events.append(event)
            if not events:
                return
            for event in events:
                if self.session is s:
                    self._on_session_event(s, event, now)
                elif isinstance(event, ev.ChatFailed | ev.ControlFailed):
                    self._events.append(event)  # of a session just replaced

    def _on_session_event(self, s: PeerSession, event: ev.Event, now: float) -> None:
        if isinstance(event, ev.PeerConnected):
            log.info("connected to %s at %s", self.peer_id, event.address)
            target = next_state(self._state, Input.RELAY_UP if self.relayed else Input.LINK_UP)
            self.repunch_attempts = 0
            self.error = None
            self._set_state(target)
            self._events.append(event)
        elif isinstance(event, ev.ChatReceived):
            self.stats["chats_in"] += 1
            self._events.append(replace(event, peer_id=s.peer_id))
        elif isinstance(event, ev.PeerLost | ev.PeerClosed):
            self._events.append(event)
            self._on_link_down(s, event, now)
        else:
            self._events.append(event)

    def _on_link_down(self, s: PeerSession, event: ev.PeerLost | ev.PeerClosed, now: float) -> None:
        reason = event.reason if isinstance(event, ev.PeerLost) else "peer closed"
        log.info("peer %s lost: %s", self.peer_id, reason)
        kind = link_down_input(
            reason, relayed=self.relayed, attempts=self.repunch_attempts, config=self.config
        )
        if kind == Input.LINK_FAILED:
            self._give_up(now)
            return
        target = next_state(self._state, kind)
        if kind == Input.RELAY_LOST:  # set the relayed link up again at once
            self._set_state(target)
            self._start_relay(now)
            self._set_state(next_state(self._state, Input.RERELAY))
        elif kind == Input.RELAY_FALLBACK:
            self._start_relay(now)
            self._set_state(target)
        else:  # LINK_LOST: punch the same peer again, after a backoff
            known = [c for c in s.candidates if c != RELAY]  # a re-punch is UDP only
            last = s.peer_address if s.peer_address != RELAY else None
            self._repunch_candidates = repunch_candidates(last, known)
            self._retire(now, bye=False)
            self._repunch_at = now + repunch_delay(self.repunch_attempts, self.config)
            self._set_state(target)

    def _give_up(self, now: float) -> None:
        target = next_state(self._state, Input.LINK_FAILED)
        self._drop_peer(now)
        self._set_state(target)
        # The rendezvous re-pairs us when it learns the peer left; meanwhile we wait.
        self._set_state(next_state(self._state, Input.SETTLED))

    def _set_state(self, state: str) -> None:
        if state != self._state:
            log.info("worker %s: %s -> %s", self.worker_id[:8], self._state, state)
            previous, self._state = self._state, state
            self._events.append(ev.StateChanged(state=state, previous=previous))
