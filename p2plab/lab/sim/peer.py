"""A simulated worker's socket: STUN transactions and at most one core :class:`PeerSession`."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.session import PeerSession
from p2plab.core.stun import RetransmissionPolicy, StunTransaction, TransactionState
from p2plab.errors import ConfigError
from p2plab.lab.sim.stun_client import SimStunClient, is_stun
from p2plab.lab.sim.stun_server import SimStunServer
from p2plab.lab.simnet import Address, Host, Scheduler, SimSocket, TimerHandle

__all__ = ["SimPeer", "SimWorld"]

log = logging.getLogger(__name__)


class SimWorld(Protocol):
    """What a :class:`SimPeer` needs from its simulation (:class:`~p2plab.lab.sim.Simulation`).

    A protocol rather than the class itself, so that the peer does not import the simulation that
    builds peers (no import cycle).
    """

    rng: random.Random
    clock: Scheduler
    stun: SimStunServer

    @property
    def now(self) -> float: ...

    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> bool: ...


class SimPeer:
    """What a worker does on one simulated socket: STUN and one peer session."""

    def __init__(self, sim: SimWorld, host: Host, sock: SimSocket, name: str) -> None:
        self.sim = sim
        self.host = host
        self.socket = sock
        self.name = name
        self.session: PeerSession | None = None
        #: Every session event with the virtual time it came out: ``(t, event)``.
        self.events: list[tuple[float, ev.Event]] = []
        #: Public (server-reflexive) address learnt from STUN.
        self.public_address: Address | None = None
        self.connected_at: float | None = None
        self.started_at: float | None = None
        self.stats: Counter[str] = Counter()
        self._timer: TimerHandle | None = None
        self.stun_client = SimStunClient(sim.clock, sim.rng, sock)
        sock.on_datagram = self._on_datagram

    # -- properties -----------------------------------------------------------------------

    @property
    def local_address(self) -> Address:
        return self.socket.address

    @property
    def stun_sources(self) -> dict[bytes, Address]:
        """Where the response of each answered STUN transaction came from, by transaction id."""
        return self.stun_client.sources

    @property
    def state(self) -> str:
        """The session's state, or ``"idle"`` before :meth:`start_session`."""
        return "idle" if self.session is None else self.session.state

    @property
    def peer_address(self) -> Address | None:
        return None if self.session is None else self.session.peer_address

    @property
    def rtt(self) -> float | None:
        return None if self.session is None else self.session.rtt

    @property
    def chats_received(self) -> list[str]:
        """Texts of the chat messages received, in order."""
        return [e.text for _, e in self.events if isinstance(e, ev.ChatReceived)]

    def events_of(self, kind: type[ev.Event]) -> list[ev.Event]:
        return [e for _, e in self.events if isinstance(e, kind)]

    # -- datagrams ----------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        now = self.sim.now
        if is_stun(data):
            self.stun_client.receive(data, addr)
            return
        if self.session is None:
            self.stats["dropped_no_session"] += 1
            return
        self.session.receive_datagram(data, addr, now)
        self.pump()

    # -- STUN -------------------------------------------------------------------------------------

    def stun_request(
        self,
        server: Address,
        *,
        change_ip: bool = False,
        change_port: bool = False,
        policy: RetransmissionPolicy | None = None,
    ) -> StunTransaction:
        """Start a Binding transaction (the core's) and return it; run the sim to finish it."""
        return self.stun_client.request(
            server, change_ip=change_ip, change_port=change_port, policy=policy
        )

    def binding(self, server: Address | None = None, **kwargs: Any) -> StunTransaction:
        """Run one Binding transaction to completion (virtual time passes) and return it."""
        tx = self.stun_request(server or self.sim.stun.primary, **kwargs)
        self.sim.run_until(self.sim.now + 3600.0, stop=lambda: tx.done)
        return tx

    def discover(self) -> Address | None:
        """Learn our public address from the STUN server (what a worker does before punching)."""
        tx = self.binding()
        if tx.state is TransactionState.SUCCEEDED and tx.response is not None:
            mapped = tx.response.attributes.get("XOR-MAPPED-ADDRESS")
            if mapped is None:
                return self.public_address
            self.public_address = (str(mapped[0]), int(mapped[1]))
        return self.public_address

    @property
    def candidates(self) -> list[Address]:
        """What the rendezvous would announce for us: public address first, then the LAN one."""
        out = [] if self.public_address is None else [self.public_address]
        if self.local_address not in out:
            out.append(self.local_address)
        return out

    # -- the peer session -------------------------------------------------------------------------

    def start_session(
        self,
        peer_id: str,
        role: str,
        candidates: Sequence[Address],
        config: SessionConfig | None = None,
    ) -> PeerSession:
        """Create the core :class:`PeerSession` (as on a ``p2p_connection_offer``) and drive it."""
        if self.session is not None:
            self.close()
        self.started_at = self.sim.now
        self.connected_at = None
        self.session = PeerSession(
            local_id=self.name,
            peer_id=peer_id,
            role=role,  # type: ignore[arg-type]
            candidates=list(candidates),
            config=config or SessionConfig(),
            now=self.sim.now,
            rand_bytes=self.sim.rng.randbytes,
        )
        self.pump()
        return self.session

    def pump(self) -> None:
        """Send what the core wants sent, collect its events, re-arm its one timer."""
        session = self.session
        if session is None:
            return
        now = self.sim.now
        for data, addr in session.datagrams_to_send(now):
            self.socket.sendto(data, addr)
        while (event := session.next_event()) is not None:
            self.events.append((now, event))
            if isinstance(event, ev.PeerConnected) and self.connected_at is None:
                self.connected_at = now
            log.debug("%.3f %s: %s", now, self.name, event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = session.get_timer()
        if when is not None:
            self._timer = self.sim.clock.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.session is not None:
            self.session.handle_timer(self.sim.now)
            self.pump()

    def send_chat(self, text: str) -> str:
        """Send a chat message over the session; returns its id."""
        if self.session is None:
            raise ConfigError(f"{self.name} has no peer session")
        msg_id = self.session.send_chat(text, self.sim.now)
        self.pump()
        return msg_id

    def close(self) -> None:
        """Close the session (sends BYE) and stop its timer."""
        if self.session is not None and self.session.state in ("punching", "connected"):
            self.session.close(self.sim.now)
            self.pump()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __repr__(self) -> str:
        return f"SimPeer({self.name!r}, {self.local_address}, {self.state})"
