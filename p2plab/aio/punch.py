"""HolePuncher: drives a sans-I/O :class:`~p2plab.core.session.PeerSession` on a real socket.

It punches (probes every candidate pair, answers at the address a probe really came from) and,
once the link is up, keeps it: keep-alives, RTT, reliable chat and control messages are all core
timers.  This layer only moves bytes, reads the clock and arms one timer.

The clock is ``time.monotonic()`` rather than ``loop.time()``: uvloop's loop clock has
millisecond resolution, too coarse for loopback RTTs of tens of microseconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence

from p2plab.aio.endpoint import Address, UdpEndpoint
from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.link import RELAY  # a session whose only candidate is RELAY uses relay_send
from p2plab.core.session import PeerSession
from p2plab.core.wire import Sealer
from p2plab.errors import P2PLabError

__all__ = ["RELAY", "HolePuncher"]

_now = time.monotonic

log = logging.getLogger(__name__)


class HolePuncher:
    """Punch a path to one peer over ``endpoint`` and keep it alive.

    ``on_event`` receives every core event (PeerConnected, ChatReceived, PeerLost, ...).
    ``sealer`` seals every datagram (a :class:`~p2plab.core.crypto.PeerCipher` for an encrypted
    link); without one the datagrams travel as plain :mod:`p2plab.core.wire` datagrams.
    ``relay_send`` carries datagrams addressed to :data:`RELAY` (the relay fallback: the worker
    passes them to the rendezvous and feeds relayed datagrams back with ``address=RELAY``).
    """

    def __init__(
        self,
        endpoint: UdpEndpoint,
        *,
        local_id: str,
        peer_id: str,
        candidates: Sequence[Address],
        role: str = "controlling",
        config: SessionConfig | None = None,
        on_event: Callable[[ev.Event], None] | None = None,
        sealer: Sealer | None = None,
        relay_send: Callable[[bytes], object] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.loop = endpoint.loop
        self.peer_id = peer_id
        self._on_event = on_event
        self._relay_send = relay_send
        self.session = PeerSession(
            local_id=local_id,
            peer_id=peer_id,
            role=role,  # type: ignore[arg-type]
            candidates=list(candidates),
            config=config or SessionConfig(),
            now=_now(),
            rand_bytes=os.urandom,
            sealer=sealer,
        )
        self._timer: asyncio.TimerHandle | None = None
        self._connected = asyncio.Event()
        self._done = asyncio.Event()
        self._closed = False
        self._waiters: list[tuple[Callable[[ev.Event], bool], asyncio.Future[ev.Event]]] = []
        self.pump()

    # -- driving the core -------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """Feed one datagram from the endpoint into the session."""
        if self._closed:
            return
        self.session.receive_datagram(data, addr, _now())
        self.pump()

    def pump(self) -> None:
        """Send what the core wants sent, deliver its events, re-arm its timer."""
        now = _now()
        for data, addr in self.session.datagrams_to_send(now):
            if addr == RELAY:
                if self._relay_send is not None:
                    self._relay_send(data)
            else:
                self.endpoint.sendto(data, addr)
        while (event := self.session.next_event()) is not None:
            self._dispatch(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed:
            return
        when = self.session.get_timer()
        if when is not None:
            self._timer = self.loop.call_later(max(0.0, when - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        self.session.handle_timer(_now())
        self.pump()

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.PeerConnected):
            self._connected.set()
        elif isinstance(event, ev.PeerLost | ev.PeerClosed):
            self._done.set()
        for pred, fut in list(self._waiters):
            if not fut.done() and pred(event):
                fut.set_result(event)
        self._waiters = [(p, f) for p, f in self._waiters if not f.done()]
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("event handler failed for %r", event)

    # -- public API ---------------------------------------------------------------------------

    @property
    def relayed(self) -> bool:
        """Whether this link runs through the rendezvous relay."""
        return self._relay_send is not None

    @property
    def state(self) -> str:
        return str(self.session.state)

    @property
    def peer_address(self) -> Address | None:
        return self.session.peer_address

    @property
    def rtt(self) -> float | None:
        return self.session.rtt

    @property
    def sealer(self) -> Sealer | None:
        """The session's sealer (seal/open for the benchmark data path too)."""
        return self.session.sealer

    async def wait_connected(self, timeout: float | None = None) -> Address:
        """Wait until the link is up; raises P2PLabError if punching fails or times out."""
        connected = asyncio.ensure_future(self._connected.wait())
        done = asyncio.ensure_future(self._done.wait())
        try:
            finished, _ = await asyncio.wait(
                {connected, done}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            connected.cancel()
            done.cancel()
        if self._connected.is_set() and self.session.peer_address is not None:
            return self.session.peer_address
        if not finished:
            raise P2PLabError(f"no path to peer {self.peer_id} within {timeout} s")
        raise P2PLabError(f"punching to peer {self.peer_id} failed ({self.session.state})")

    async def wait_for(
        self, predicate: Callable[[ev.Event], bool], timeout: float | None = None
    ) -> ev.Event:
        """Wait for the next core event matching ``predicate``."""
        fut: asyncio.Future[ev.Event] = self.loop.create_future()
        self._waiters.append((predicate, fut))
        return await asyncio.wait_for(fut, timeout)

    def send_chat(self, text: str) -> str:
        """Queue a reliable chat message; returns its id (ChatDelivered/ChatFailed follow)."""
        msg_id = self.session.send_chat(text, _now(), sent_at=time.time())
        self.pump()
        return msg_id

    def send_control(self, obj: dict[str, object]) -> str:
        """Queue a reliable control message (JSON object) for the peer."""
        msg_id = self.session.send_control(obj, _now(), sent_at=time.time())
        self.pump()
        return msg_id

    def close(self) -> None:
        """Say goodbye to the peer (best effort) and stop all timers."""
        if self._closed:
            return
        try:
            self.session.close(_now())
            self.pump()
        finally:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._done.set()
