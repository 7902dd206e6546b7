"""The simulated rendezvous: the real pairing rules and message models over virtual WebSockets.

Pairing is :class:`rendezvous_service_code.registry.Registry` itself (the rendezvous's pure core:
same room, both encrypting or both not, first come first served, the earlier registered one is
``controlling``, ``peer_disconnected`` to the peer of a worker that leaves, which is then paired
again).  Every message crosses as JSON text through the models of :mod:`p2plab.core.signaling`,
in both directions, so the simulated workers parse what real workers parse.

A connection is a FIFO pipe with a one-way delay (the WebSocket's latency); the WebSocket is not
routed through the simulated NATs (TCP through a NAT keeps its mapping while it is open), so the
rendezvous's view of a worker is its NAT's public IP.  ``relay`` messages are passed only between
the two workers of a pair, and refusals answered as the service does (its per-connection byte
budget is not modelled).  ``candidates`` messages (TURN relayed addresses, issue 17) pass by the
same rule and the service's own :class:`~rendezvous_service_code.trickle.TrickleGate` (rate bound
and one error per refusal kind), on the simulation's clock.

Given TURN servers and a secret (``turn_urls``, ``turn_secret``), each offer carries ``turn``
credentials made for the worker it goes to, as the service makes them; their expiry is on the
simulation's clock, which is also the clock of :class:`~p2plab.lab.sim.turn_server.SimTurnServer`.

Registration proves key possession as with the service: each connection opens with a
``challenge`` (a fresh nonce and ephemeral X25519 key), and a ``register`` that carries a public
key without a valid proof closes the connection (counted ``refused_proof``).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from pydantic import BaseModel

from p2plab.core.crypto import Identity, verify_registration_proof
from p2plab.core.signaling import (
    CandidatesOut,
    Challenge,
    ErrorMessage,
    P2PConnectionOffer,
    Register,
    RelayIn,
    RelayOut,
    TurnOffer,
    UpdateUdpEndpoint,
    dump_message,
    parse_worker_message,
)
from p2plab.core.turn_config import DEFAULT_TURN_TTL_S, turn_credentials
from p2plab.errors import ConfigError, RemoteProtocolError
from p2plab.lab.simnet import Scheduler
from rendezvous_service_code.registry import Action, CloseConnection, Registry, SendMessage
from rendezvous_service_code.trickle import RefusalKind, TrickleGate

__all__ = ["RendezvousClient", "SimRendezvous"]

log = logging.getLogger(__name__)


class RendezvousClient(Protocol):
    """The worker end of a simulated rendezvous connection (:class:`SimWorker` is one)."""

    @property
    def worker_id(self) -> str: ...

    def rendezvous_connected(self) -> None:
        """The WebSocket is open (the worker now sends ``register``)."""

    def rendezvous_message(self, text: str) -> None:
        """One JSON message from the rendezvous."""

    def rendezvous_closed(self) -> None:
        """The rendezvous closed the connection."""


class _Connection:
    def __init__(self, conn_id: str, client: RendezvousClient, observed_ip: str, delay: float):
        self.conn_id = conn_id
        self.client = client
        self.observed_ip = observed_ip
        self.delay = delay
        self.open = True
        self.reported: set[str] = set()  # relay refusal kinds already answered with an error
        self.trickle: TrickleGate | None = None  # made at the first 'candidates' message
        self.server: Identity | None = None  # this connection's ephemeral challenge key
        self.nonce = b""


class SimRendezvous:
    """One rendezvous service on the simulation's clock."""

    def __init__(
        self,
        clock: Scheduler,
        *,
        relay: bool = True,
        rand_bytes: Callable[[int], bytes] | None = None,
        turn_urls: Sequence[str] = (),
        turn_secret: str | None = None,
        turn_ttl_s: float = DEFAULT_TURN_TTL_S,
    ) -> None:
        self.clock = clock
        # its own generator: the challenges draw nothing from the workers' or the network's
        self._rand_bytes = rand_bytes or random.Random("sim rendezvous").randbytes
        self.relay = relay
        """Whether ``relay`` messages are passed on (``P2P_RELAY``); else refused with an error."""
        self.turn_urls: list[str] = []
        """TURN servers handed out in offers (none: offers carry no ``turn``)."""
        self.turn_ttl_s = turn_ttl_s
        """Seconds the handed-out credentials are valid for."""
        self._turn_secret: str | None = None
        if turn_urls or turn_secret:
            self.use_turn(turn_urls, turn_secret or "", turn_ttl_s)
        self.registry = Registry()
        self.stats: Counter[str] = Counter()
        self._conns: dict[str, _Connection] = {}
        self._ids = itertools.count(1)

    def use_turn(self, urls: Sequence[str], secret: str, ttl_s: float = DEFAULT_TURN_TTL_S) -> None:
        """Hand out credentials for ``urls`` made with ``secret`` in the offers from now on."""
        if not urls or not secret:
            raise ConfigError("the simulated rendezvous needs both TURN URLs and a secret")
        self.turn_urls = list(urls)
        self._turn_secret = secret
        self.turn_ttl_s = ttl_s

    def connect(self, client: RendezvousClient, *, observed_ip: str, delay: float = 0.02) -> str:
        """Open a connection for ``client`` (it learns ``delay`` seconds later); returns its id."""
        conn = _Connection(f"c{next(self._ids)}", client, observed_ip, delay)
        self._conns[conn.conn_id] = conn
        self.clock.call_later(delay, self._opened, conn)
        return conn.conn_id

    def send(self, conn_id: str, text: str) -> None:
        """A worker sends one JSON message on its connection (it arrives after the delay)."""
        conn = self._conns.get(conn_id)
        if conn is None or not conn.open:
            self.stats["sent_while_closed"] += 1
            return
        self.clock.call_later(conn.delay, self._received, conn, text)

    def disconnect(self, conn_id: str) -> None:
        """The worker closed its connection (or vanished): its peer hears ``peer_disconnected``."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        conn.open = False
        self.clock.call_later(conn.delay, self._closed, conn)

    # -- internals ----------------------------------------------------------------------------

    def _opened(self, conn: _Connection) -> None:
        if not conn.open:
            return
        conn.client.rendezvous_connected()
        # The challenge comes with the accept (the service sends it first thing).
        conn.server = Identity.generate(self._rand_bytes)
        conn.nonce = self._rand_bytes(32)
        challenge = Challenge(
            nonce=base64.b64encode(conn.nonce).decode("ascii"), server_key=conn.server.public_b64
        )
        if conn.open:
            conn.client.rendezvous_message(dump_message(challenge))

    def _closed(self, conn: _Connection) -> None:
        self._carry_out(self.registry.unregister(conn.client.worker_id, conn.conn_id))

    def _received(self, conn: _Connection, text: str) -> None:
        if not conn.open:
            return
        try:
            msg = parse_worker_message(text)
        except RemoteProtocolError as exc:
            self.stats["bad_messages"] += 1
            self._deliver(conn, ErrorMessage(code="bad_message", message=str(exc)))
            return
        wid = conn.client.worker_id
        if isinstance(msg, ErrorMessage):  # as the service: counted, never answered
            self.stats["worker_errors"] += 1
            log.debug("worker %s reports %s: %s", wid, msg.code[:64], msg.message[:200])
            return
        if isinstance(msg, Register):
            if msg.public_key is not None and not self._proof_ok(conn, msg):
                self.stats["refused_proof"] += 1
                self._carry_out([CloseConnection(wid, conn.conn_id, 1008, "key proof failed")])
                return
            actions = self.registry.register(
                wid,
                conn.conn_id,
                room=msg.room,
                now=self.clock.now,
                ws_observed_ip=conn.observed_ip,
                http_public_ip=msg.http_public_ip,
                public_key=msg.public_key,
            )
        elif isinstance(msg, UpdateUdpEndpoint):
            actions = self.registry.update_udp_endpoint(
                wid,
                conn.conn_id,
                msg.udp_ip,
                msg.udp_port,
                msg.local_candidates,
                nat=msg.nat,
                mapped=msg.mapped,
                udp6=msg.udp6,
            )
        elif isinstance(msg, CandidatesOut):
            actions = self._trickle(conn, msg)
        else:
            actions = self._relay(conn, msg)
        self._carry_out(actions)

    def _proof_ok(self, conn: _Connection, msg: Register) -> bool:
        if conn.server is None or msg.proof is None or msg.public_key is None:
            return False
        try:
            key = base64.b64decode(msg.public_key, validate=True)
            proof = base64.b64decode(msg.proof, validate=True)
        except (binascii.Error, ValueError):
            return False
        return verify_registration_proof(
            conn.server.private_key, key, conn.nonce, conn.client.worker_id, proof
        )

    def _relay(self, conn: _Connection, msg: RelayOut) -> list[Action]:
        # As the service: refusals are counted, and answered with one error per kind on a
        # connection until a datagram goes through again.
        wid = conn.client.worker_id
        if not self.relay:
            return self._refuse(
                conn, "disabled", "relay_disabled", "this rendezvous does not relay"
            )
        target = self.registry.relay_target(wid, conn.conn_id, msg.to)
        if target is None:
            why = f"not paired with {msg.to!r}: relay refused"
            return self._refuse(conn, "unpaired", "relay_refused", why)
        conn.reported.clear()
        self.stats["relayed"] += 1
        return [
            SendMessage(msg.to, target, RelayIn.model_validate({"from": wid, "data": msg.data}))
        ]

    def _trickle(self, conn: _Connection, msg: CandidatesOut) -> list[Action]:
        # As the service (app.py): registered first, rate-bounded, then the pair check.
        wid = conn.client.worker_id
        if conn.trickle is None:
            conn.trickle = TrickleGate(self.clock.now)
        gate = conn.trickle
        record = self.registry.get(wid)
        if record is None or record.conn_id != conn.conn_id:
            kind: RefusalKind = "unregistered"
        elif not gate.admit(self.clock.now):
            kind = "rate"
        else:
            target = self.registry.relay_target(wid, conn.conn_id, msg.to)
            if target is not None:
                self.stats["candidates_forwarded"] += 1
                return [gate.forward(wid, msg, target)]
            kind = "unpaired"
        self.stats["candidates_rate_limited" if kind == "rate" else "candidates_refused"] += 1
        error = gate.refusal(kind, msg.to)
        return [] if error is None else [SendMessage(wid, conn.conn_id, error)]

    def _turn_offer(self, worker_id: str) -> TurnOffer | None:
        if not self.turn_urls or not self._turn_secret:
            return None
        try:
            username, password = turn_credentials(
                self._turn_secret, worker_id, self.clock.now, self.turn_ttl_s
            )
        except ConfigError:  # a worker id coturn would misread (a ':' in it): no relay for it
            self.stats["turn_refused_worker_id"] += 1
            return None
        return TurnOffer(
            urls=self.turn_urls, username=username, password=password, ttl_s=self.turn_ttl_s
        )

    def _refuse(self, conn: _Connection, kind: str, code: str, message: str) -> list[Action]:
        self.stats["relay_refused"] += 1
        if kind in conn.reported:
            return []
        conn.reported.add(kind)
        err = ErrorMessage(code=code, message=message)
        return [SendMessage(conn.client.worker_id, conn.conn_id, err)]

    def _carry_out(self, actions: Sequence[Action]) -> None:
        for action in actions:
            conn = self._conns.get(action.conn_id)
            if conn is None:
                continue
            if isinstance(action, CloseConnection):
                del self._conns[action.conn_id]
                conn.open = False
                self.clock.call_later(conn.delay, conn.client.rendezvous_closed)
            else:
                message = action.message
                if isinstance(message, P2PConnectionOffer):
                    turn = self._turn_offer(action.worker_id)
                    if turn is not None:
                        message = message.model_copy(update={"turn": turn})
                        self.stats["turn_credentials"] += 1
                self._deliver(conn, message)

    def _deliver(self, conn: _Connection, message: BaseModel) -> None:
        text = dump_message(message)
        self.clock.call_later(conn.delay, self._arrive, conn, text)

    def _arrive(self, conn: _Connection, text: str) -> None:
        if conn.open:
            conn.client.rendezvous_message(text)
