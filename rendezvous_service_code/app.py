"""The rendezvous app: FastAPI endpoints and WebSocket handling, built by :func:`create_app`.

Endpoints (contracts.md): ``GET /health``, ``GET /debug/list_workers`` and the WebSocket
``/ws/register/{worker_id}``.

Registration proves key possession: the service opens every connection with a ``challenge``
(a fresh nonce and a fresh ephemeral X25519 key) and a ``register`` that carries a public key
must carry the matching ``proof`` (:func:`p2plab.core.crypto.registration_proof`), else it is
closed with 1008 "key proof failed".  A live worker id can then be taken over only by a
connection proving the same key (a different key, or none, gets 4409).

Relay fallback (optional extension): a worker whose hole punching failed sends its peer
datagrams as ``{"type": "relay", "to": <peer id>, "data": <base64>}``; the service passes them on
as ``{"type": "relay", "from": <sender id>, "data": ...}``, only between the two workers of a
pair, at most ``MAX_RELAY_BYTES`` per datagram, and within a per-connection byte budget on top
of the message rate limit (chat and keep-alives fit; bulk transfer does not).  The datagrams
are sealed end to end: the service only sees ciphertext.  A worker's ``candidates`` (its TURN
relayed addresses, issue 17) reach its peer by the same pairing rule, rate-bounded
(:mod:`.trickle`).

Pairing rules live in :mod:`.registry`; storage in :mod:`.backends` (in memory) or
:mod:`.redis_store` (several instances through Redis); settings in :mod:`.settings`; running
the app in :mod:`.server`.  Nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from p2plab.core.crypto import verify_registration_proof
from p2plab.core.signaling import (
    MAX_MESSAGE_BYTES,
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
from p2plab.core.turn_config import turn_credentials
from p2plab.errors import RemoteProtocolError

from .backends import Backend, MemoryBackend
from .limits import PerIpLimits, TokenBucket
from .registry import Action, CloseConnection, SendMessage
from .settings import Settings
from .trickle import RefusalKind, TrickleGate

__all__ = [
    "CLOSE_ID_IN_USE",
    "CLOSE_POLICY",
    "CLOSE_RESTART",
    "CLOSE_TRY_AGAIN",
    "TokenBucket",
    "create_app",
]

logger = logging.getLogger(__name__)

#: WebSocket close code for policy violations (bad token, bad worker id, abuse).
CLOSE_POLICY = 1008
#: WebSocket close code when the service is full.
CLOSE_TRY_AGAIN = 1013
#: WebSocket close code asking the worker to reconnect (service restart / state lost).
CLOSE_RESTART = 1012
#: WebSocket close code for a worker id that is live with another public key.  Not 1008 (which a
#: worker takes as final): an earlier run of the same worker (a fixed WORKER_ID, a fresh key) may
#: still be registered until the rendezvous notices it is gone, so the worker retries.
CLOSE_ID_IN_USE = 4409

_WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Messages queued for one connection before it is considered stuck and closed.
_SEND_QUEUE_LIMIT = 256


class _Connection:
    """One accepted WebSocket and its writer task (sends never block other handlers)."""

    def __init__(self, websocket: WebSocket, worker_id: str, conn_id: str) -> None:
        self.websocket = websocket
        self.worker_id = worker_id
        self.conn_id = conn_id
        self.queue: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue()
        self.closed = False
        self.writer = asyncio.create_task(self._write(), name=f"rv-writer-{conn_id}")

    def send_text(self, text: str) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= _SEND_QUEUE_LIMIT:
            logger.warning("worker %s does not read its messages; closing", self.worker_id)
            self.close(CLOSE_POLICY, "not reading")
            return
        self.queue.put_nowait(text)

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait((code, reason))

    async def _write(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, tuple):
                    with contextlib.suppress(Exception):
                        await self.websocket.close(code=item[0], reason=item[1])
                    return
                await self.websocket.send_text(item)
        except Exception as exc:  # the peer went away; the reader notices too
            logger.debug("writer of %s stopped: %r", self.conn_id, exc)


@dataclass
class _Stats:
    connections: int = 0
    registered: int = 0
    bad_messages: int = 0
    rate_limited: int = 0
    closed_for_abuse: int = 0
    refused_token: int = 0
    refused_worker_id: int = 0
    refused_capacity: int = 0
    register_timeouts: int = 0
    refused_takeover: int = 0
    refused_proof: int = 0
    relayed: int = 0
    relayed_bytes: int = 0
    relay_refused: int = 0
    relay_rate_limited: int = 0
    relay_ip_limited: int = 0
    relay_total_limited: int = 0
    refused_ip_connections: int = 0
    refused_ip_rate: int = 0
    refused_token_throttled: int = 0
    worker_errors: int = 0
    turn_credentials: int = 0
    candidates_forwarded: int = 0
    candidates_refused: int = 0
    candidates_rate_limited: int = 0


class _Hub:
    """Connections of this instance and delivery of backend actions to them."""

    def __init__(
        self, backend: Backend, turn_for: Callable[[str], TurnOffer | None] | None = None
    ) -> None:
        self.backend = backend
        self.connections: dict[str, _Connection] = {}
        self.stats = _Stats()
        self._ids = itertools.count(1)
        # TURN credentials are made here, by the instance that holds the receiving worker's
        # connection, at the last moment: an offer forwarded through Redis carries none.
        self._turn_for = turn_for

    def new_conn_id(self) -> str:
        return f"{self.backend.instance_id}/{next(self._ids)}"

    def deliver_local(self, action: Action) -> bool:
        conn = self.connections.get(action.conn_id)
        if conn is None or conn.worker_id != action.worker_id:
            return False
        if isinstance(action, SendMessage):
            message = action.message
            if isinstance(message, P2PConnectionOffer) and self._turn_for is not None:
                turn = self._turn_for(action.worker_id)
                if turn is not None:
                    message = message.model_copy(update={"turn": turn})
                    self.stats.turn_credentials += 1
            conn.send_text(dump_message(message))
        elif isinstance(action, CloseConnection):
            conn.close(action.code, action.reason)
        return True

    def reset_all(self) -> None:
        """The shared state lost this instance's workers: make them all register again."""
        for conn in list(self.connections.values()):
            conn.close(CLOSE_RESTART, "rendezvous state lost; register again")

    async def dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            if not self.deliver_local(action):
                await self.backend.forward(action)


def _plain_ip(host: str) -> str | None:
    """``host`` as the workers' messages spell an address, or None if it is not an IP literal:
    an IPv4-mapped IPv6 address (what a ``--host ::`` socket reports for an IPv4 client) as its
    IPv4 address, so the observed address a worker falls back to passes the wire's checks and
    per-source limits count one client once; a scoped one (``fe80::1%eth0``) is refused."""
    if "%" in host:
        return None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _forwarded_ip(headers: Any) -> str | None:
    """The client address a trusted proxy put last in X-Forwarded-For, if it is an IP literal."""
    forwarded = headers.get("x-forwarded-for")
    if forwarded:
        # Proxies append the address they saw: the last entry is the one a trusted proxy
        # (Cloud Run's front end) added; earlier entries are whatever the client claimed.
        return _plain_ip(forwarded.split(",")[-1].strip())  # never a name (issue 14 item 3)
    return None


def _observed_address(websocket: WebSocket, trust_forwarded: bool) -> tuple[str | None, int | None]:
    if trust_forwarded:
        forwarded = _forwarded_ip(websocket.headers)
        if forwarded is not None:
            return forwarded, None
    client = websocket.client
    if client is None:
        return None, None
    return _plain_ip(client.host) or client.host, client.port


class _KeyChallenge:
    """The challenge of one connection: a fresh nonce and a fresh ephemeral server key.

    A ``register`` carrying a public key must answer it with
    ``registration_proof(identity, server_key, nonce, worker_id)`` (see
    :func:`p2plab.core.crypto.registration_proof`): only the holder of the private key can, and
    the nonce and server key are never reused, so neither a public key read elsewhere nor a
    proof captured from another connection registers.
    """

    def __init__(self) -> None:
        self.nonce = os.urandom(32)
        private = X25519PrivateKey.generate()
        self.private: X25519PrivateKey | None = private
        server_key = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.message = Challenge(
            nonce=base64.b64encode(self.nonce).decode("ascii"),
            server_key=base64.b64encode(server_key).decode("ascii"),
        )

    def spend(self) -> None:
        """The challenge was answered: drop its key (it never verifies anything again)."""
        self.private = None

    def verify(self, worker_id: str, msg: Register) -> bool:
        """Whether ``msg`` proves possession of the private key of ``msg.public_key``."""
        if msg.public_key is None or msg.proof is None or self.private is None:
            return False
        try:
            worker_public = base64.b64decode(msg.public_key.encode("ascii"), validate=True)
            proof = base64.b64decode(msg.proof.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return False
        return verify_registration_proof(self.private, worker_public, self.nonce, worker_id, proof)


def _token_ok(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> FastAPI:
    """Build the rendezvous FastAPI app from ``settings`` (default: ``Settings()``).

    ``backend`` injects the shared state directly (tests); otherwise ``settings.redis_url``
    selects Redis (several instances) or memory.  What each setting means:
    :class:`~.settings.Settings`.  Per connection, messages beyond the rate limit are dropped
    (one ``rate_limited`` error per episode) and a connection whose dropped messages outrun the
    rate by ``abuse_threshold`` is closed (1008); relayed datagrams beyond the relay byte budget
    are dropped and counted (see the module docstring).
    """
    s = Settings() if settings is None else settings
    if backend is None:
        if s.redis_url:
            from .redis_store import RedisBackend

            backend = RedisBackend(
                s.redis_url, heartbeat_s=s.redis_heartbeat_s, ttl_s=s.redis_ttl_s
            )
        else:
            backend = MemoryBackend()

    def turn_for(worker_id: str) -> TurnOffer | None:
        """Credentials for ``worker_id`` only, valid ``turn_ttl_s`` from now (issue 17)."""
        if not s.turn_urls or not s.turn_secret:
            return None
        username, password = turn_credentials(s.turn_secret, worker_id, time.time(), s.turn_ttl_s)
        return TurnOffer(
            urls=list(s.turn_urls), username=username, password=password, ttl_s=s.turn_ttl_s
        )

    hub = _Hub(backend, turn_for)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await hub.backend.start(hub.deliver_local, hub.reset_all)
        try:
            yield
        finally:
            await hub.backend.close()

    app = FastAPI(title="p2plab rendezvous", lifespan=lifespan)
    app.state.hub = hub

    limits = PerIpLimits(
        max_connections=s.max_connections_per_ip,
        connections_per_min=s.connections_per_ip_per_min,
        token_failures_per_min=s.token_failures_per_ip_per_min,
        relay_bytes_per_s=s.relay_ip_bytes_per_s,
        relay_total_bytes_per_s=s.relay_total_bytes_per_s,
        now=time.monotonic(),
    )
    app.state.limits = limits

    def admin_denied(request: Request) -> JSONResponse | None:
        if s.admin_token is None:
            # Off unless an operator set a token: these list every worker's addresses and key.
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        client = request.client
        ip = _forwarded_ip(request.headers) if s.trust_forwarded else None
        ip = ip or (client.host if client is not None else None)
        now = time.monotonic()
        if not limits.state(ip, now).token_failures.can(now):
            hub.stats.refused_token_throttled += 1
            return JSONResponse({"detail": "too many token failures"}, status_code=429)
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and _token_ok(s.admin_token, given.strip()):
            return None
        limits.token_failed(ip, now)
        return JSONResponse(
            {"detail": "admin token required"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.get("/health", response_model=None)
    async def health() -> JSONResponse | dict[str, str]:
        reason = await hub.backend.health()
        if reason is not None:
            # Registration cannot work: a load balancer should stop sending workers here.
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/debug/list_workers", response_model=None)
    async def list_workers(request: Request) -> JSONResponse | dict[str, Any]:
        denied = admin_denied(request)
        if denied is not None:
            return denied
        workers = await hub.backend.list_workers()
        return {"count": len(workers), "workers": workers}

    @app.get("/debug/stats", response_model=None)
    async def stats(request: Request) -> JSONResponse | dict[str, Any]:
        denied = admin_denied(request)
        if denied is not None:
            return denied
        return {
            "instance_id": hub.backend.instance_id,
            "source_ips": len(limits),
            "corrupt_nat_hints": hub.backend.corrupt_nat_hints,
            "corrupt_endpoints": hub.backend.corrupt_endpoints,
            **vars(hub.stats),
        }

    def expected_token(room: str) -> str | None:
        return s.room_tokens.get(room, s.token)

    async def send_error(conn: _Connection, code: str, message: str) -> None:
        conn.send_text(dump_message(ErrorMessage(code=code, message=message)))

    async def relay_datagram(
        conn: _Connection,
        msg: RelayOut,
        budget: TokenBucket,
        reported: set[str],
        source_ip: str | None,
    ) -> None:
        """Pass one datagram to the sender's peer; drop (and count) anything else.

        ``reported`` holds the refusal kinds already answered with an error on this connection
        (one error per kind until a datagram goes through again).
        """
        if not s.relay:
            hub.stats.relay_refused += 1
            if "disabled" not in reported:
                reported.add("disabled")
                await send_error(conn, "relay_disabled", "this rendezvous does not relay")
            return
        data = msg.payload()
        now = time.monotonic()
        if not budget.allow(now, cost=float(len(data))):
            hub.stats.relay_rate_limited += 1
            if "rate" not in reported:
                reported.add("rate")
                await send_error(conn, "relay_rate_limited", "relay byte budget exceeded; dropped")
            return
        # Many connections from one client (2000 pairs carried ~250 Mbit/s: finding 8) share
        # its address's budget, and everyone shares the instance's.
        over = limits.relay(source_ip, len(data), now)
        if over is not None:
            if over == "ip":
                hub.stats.relay_ip_limited += 1
            else:
                hub.stats.relay_total_limited += 1
            if "rate" not in reported:
                reported.add("rate")
                await send_error(
                    conn,
                    "relay_rate_limited",
                    f"relay byte budget of {'your address' if over == 'ip' else 'the service'} "
                    "exceeded; dropped",
                )
            return
        target = await hub.backend.relay_target(conn.worker_id, conn.conn_id, msg.to)
        if target is None:
            hub.stats.relay_refused += 1
            if "unpaired" not in reported:
                reported.add("unpaired")
                await send_error(
                    conn, "relay_refused", f"not paired with {msg.to!r}: relay refused"
                )
            return
        reported.clear()
        hub.stats.relayed += 1
        hub.stats.relayed_bytes += len(data)
        out = RelayIn.model_validate({"from": conn.worker_id, "data": msg.data})
        await hub.dispatch([SendMessage(msg.to, target, out)])

    async def trickle(
        conn: _Connection, msg: CandidatesOut, gate: TrickleGate, registered: bool
    ) -> None:
        """Pass a worker's candidates to its peer (see :mod:`.trickle`); refusals are counted
        (``candidates_rate_limited`` apart) and answered once per kind."""
        kind: RefusalKind
        if not registered:
            kind = "unregistered"
        elif not gate.admit(time.monotonic()):
            kind = "rate"  # checked before the lookup: a flood costs no Redis round trip
        else:
            target = await hub.backend.relay_target(conn.worker_id, conn.conn_id, msg.to)
            if target is not None:
                hub.stats.candidates_forwarded += 1
                await hub.dispatch([gate.forward(conn.worker_id, msg, target)])
                return
            kind = "unpaired"
        if kind == "rate":
            hub.stats.candidates_rate_limited += 1
        else:
            hub.stats.candidates_refused += 1
        error = gate.refusal(kind, msg.to)
        if error is not None:
            conn.send_text(dump_message(error))

    @app.websocket("/ws/register/{worker_id}")
    async def ws_register(websocket: WebSocket, worker_id: str) -> None:
        await websocket.accept()
        if not _WORKER_ID_RE.match(worker_id):
            hub.stats.refused_worker_id += 1
            await websocket.close(code=CLOSE_POLICY, reason="invalid worker id")
            return
        if len(hub.connections) >= s.max_workers:
            hub.stats.refused_capacity += 1
            logger.warning("refusing worker %s: %d connections", worker_id, s.max_workers)
            await websocket.close(code=CLOSE_TRY_AGAIN, reason="try again later")
            return
        observed_ip, observed_port = _observed_address(websocket, s.trust_forwarded)
        refused = limits.admit(observed_ip, time.monotonic())
        if refused is not None:
            # One source must not take every slot (one IP took all 300 of --max-workers 300),
            # churn registrations, or guess tokens at ~800/s.  1013: a worker retries later.
            if refused == "connections":
                hub.stats.refused_ip_connections += 1
                reason = "too many connections from your address"
            elif refused == "rate":
                hub.stats.refused_ip_rate += 1
                reason = "too many new connections from your address; try again later"
            else:
                hub.stats.refused_token_throttled += 1
                reason = "too many token failures from your address; try again later"
            logger.info("refusing worker %s from %s: %s", worker_id, observed_ip, reason)
            await websocket.close(code=CLOSE_TRY_AGAIN, reason=reason)
            return
        conn = _Connection(websocket, worker_id, hub.new_conn_id())
        hub.connections[conn.conn_id] = conn
        hub.stats.connections += 1
        challenge = _KeyChallenge()
        conn.send_text(dump_message(challenge.message))  # before anything else
        bucket = TokenBucket(
            s.rate_limit_per_s, s.rate_limit_burst, s.abuse_threshold, time.monotonic()
        )
        relay_budget = TokenBucket(
            s.relay_bytes_per_s, s.relay_burst_bytes, float("inf"), time.monotonic()
        )
        relay_reported: set[str] = set()
        trickle_gate = TrickleGate(time.monotonic())
        registered = False
        try:
            while not conn.closed:
                timeout = None if registered else s.register_timeout_s
                try:
                    event = await asyncio.wait_for(websocket.receive(), timeout)
                except TimeoutError:
                    hub.stats.register_timeouts += 1
                    conn.close(CLOSE_POLICY, "register expected")
                    break
                if event["type"] == "websocket.disconnect":
                    break
                raw = event.get("text")
                if raw is None:
                    raw = event.get("bytes") or b""
                if not bucket.allow(time.monotonic()):
                    hub.stats.rate_limited += 1
                    if bucket.abusive:
                        hub.stats.closed_for_abuse += 1
                        logger.warning("worker %s floods; closing", worker_id)
                        conn.close(CLOSE_POLICY, "rate limit exceeded")
                        break
                    if not bucket.limited:
                        bucket.limited = True
                        await send_error(conn, "rate_limited", "too many messages; dropped")
                    continue
                if len(raw) > MAX_MESSAGE_BYTES:
                    hub.stats.bad_messages += 1
                    await send_error(
                        conn,
                        "bad_message",
                        f"message too large: {len(raw)} bytes > {MAX_MESSAGE_BYTES}",
                    )
                    continue
                try:
                    msg = parse_worker_message(raw)
                except RemoteProtocolError as exc:
                    hub.stats.bad_messages += 1
                    logger.debug("bad message from %s: %s", worker_id, exc)
                    await send_error(conn, "bad_message", str(exc))
                    continue
                if isinstance(msg, ErrorMessage):
                    # A worker refused an offer or could not parse a message: counted and
                    # logged, never answered (no error ping-pong), never a reason to close; the
                    # message rate limit above already applied to it.
                    hub.stats.worker_errors += 1
                    logger.debug(
                        "worker %s reports %s: %s", worker_id, msg.code[:64], msg.message[:200]
                    )
                    continue
                if isinstance(msg, Register):
                    if registered:
                        hub.stats.bad_messages += 1
                        await send_error(conn, "bad_message", "already registered")
                        continue
                    if not _token_ok(expected_token(msg.room), msg.token):
                        hub.stats.refused_token += 1
                        limits.token_failed(observed_ip, time.monotonic())
                        logger.info("worker %s: invalid token for room %r", worker_id, msg.room)
                        conn.close(CLOSE_POLICY, "invalid token")
                        break
                    if msg.public_key is not None and not challenge.verify(worker_id, msg):
                        # Knowing a worker's public key (it is in every offer) is not owning it.
                        hub.stats.refused_proof += 1
                        logger.info("worker %s: key proof failed", worker_id)
                        conn.close(CLOSE_POLICY, "key proof failed")
                        break
                    live, known_key = await hub.backend.registered_key(worker_id)
                    if live and known_key is not None and known_key != msg.public_key:
                        # A reconnecting worker proves the key it registered with; someone else
                        # who merely knows the id (or the key) must not take its place.
                        hub.stats.refused_takeover += 1
                        logger.warning(
                            "worker %s: refusing a second connection with another public key",
                            worker_id,
                        )
                        conn.close(CLOSE_ID_IN_USE, "worker id in use")
                        break
                    registered = True
                    challenge.spend()  # answered: its key need not live as long as the socket
                    hub.stats.registered += 1
                    logger.info(
                        "worker %s registered in room %r from %s:%s",
                        worker_id,
                        msg.room,
                        observed_ip,
                        observed_port,
                    )
                    await hub.dispatch(
                        await hub.backend.register(
                            worker_id,
                            conn.conn_id,
                            room=msg.room,
                            now=time.time(),
                            ws_observed_ip=observed_ip,
                            ws_observed_port=observed_port,
                            http_public_ip=msg.http_public_ip,
                            public_key=msg.public_key,
                        )
                    )
                elif isinstance(msg, RelayOut):
                    if not registered:
                        hub.stats.bad_messages += 1
                        await send_error(conn, "bad_message", "send 'register' first")
                        continue
                    await relay_datagram(conn, msg, relay_budget, relay_reported, observed_ip)
                elif isinstance(msg, CandidatesOut):
                    await trickle(conn, msg, trickle_gate, registered)
                elif isinstance(msg, UpdateUdpEndpoint):
                    if not registered:
                        hub.stats.bad_messages += 1
                        await send_error(conn, "bad_message", "send 'register' first")
                        continue
                    await hub.dispatch(
                        await hub.backend.update_udp_endpoint(
                            worker_id,
                            conn.conn_id,
                            msg.udp_ip,
                            msg.udp_port,
                            msg.local_candidates,
                            msg.nat,
                            mapped=msg.mapped,
                            udp6=msg.udp6,
                        )
                    )
        except WebSocketDisconnect:
            pass
        except Exception:
            logger.exception("connection of worker %s failed", worker_id)
        finally:
            hub.connections.pop(conn.conn_id, None)
            limits.release(observed_ip)
            conn.close(1000, "bye")
            if registered:
                logger.info("worker %s left", worker_id)
                try:
                    await hub.dispatch(await hub.backend.unregister(worker_id, conn.conn_id))
                except Exception:
                    logger.exception("unregistering %s failed", worker_id)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.writer, 5.0)

    return app
