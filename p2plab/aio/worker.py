"""Worker: ties the UDP endpoint, the rendezvous client, STUN, punching and the UI together.

Life of a worker::

    starting -> registering -> discovering -> waiting_for_peer -> punching -> connected
                                                   ^                  |           |
                                                   +------ lost <-----+-----------+
                                                                      |
                                               (punch timeout) --> relayed

When punching fails (``PeerLost("punch timeout")`` on a first attempt) and ``relay`` is on, the
link moves to the rendezvous relay: a new session whose only candidate is the pseudo-address
:data:`~p2plab.aio.punch.RELAY`; its datagrams (still sealed end to end) travel as ``relay``
messages over the rendezvous WebSocket.  A worker that receives a relayed datagram from its
peer while it still punches switches at once, so the two sides need not time out together.

The UDP endpoint is bound once and never changes: STUN learns the mapping of that very socket,
and that mapping is what the peer punches towards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from p2plab.aio.bench.extension import BenchmarkExtension
from p2plab.aio.endpoint import Address, UdpEndpoint
from p2plab.aio.extension import Extension
from p2plab.aio.punch import RELAY, HolePuncher
from p2plab.aio.rendezvous import Backoff, RendezvousClient
from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.crypto import (
    Identity,
    PeerCipher,
    PlainEnvelope,
    decode_public_key,
    fingerprint,
)
from p2plab.core.signaling import (
    Candidate,
    ErrorMessage,
    P2PConnectionOffer,
    PeerDisconnected,
    Register,
    Registered,
    RelayIn,
    UpdateUdpEndpoint,
)
from p2plab.errors import ConfigError, NotConnected, P2PLabError, RendezvousError

__all__ = ["Worker", "WorkerConfig"]

log = logging.getLogger(__name__)

STATES = (
    "starting",
    "registering",
    "discovering",
    "waiting_for_peer",
    "punching",
    "connected",
    "relayed",
    "lost",
    "stopped",
)


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker (the CLI and the container environment fill these in)."""

    rendezvous_url: str
    """``ws://host:port`` or ``wss://...`` of the rendezvous service."""
    stun_servers: tuple[str, ...] = ()
    """STUN servers as ``host:port``; empty means: use the address the rendezvous observed."""
    udp_host: str = "0.0.0.0"
    """Address the peer UDP socket binds to."""
    udp_port: int = 0
    """Port the peer UDP socket binds to (0: chosen by the OS)."""
    http_host: str = "127.0.0.1"
    """Address of the worker's HTTP server (UI); the container sets 0.0.0.0."""
    http_port: int | None = 8080
    """Port of the HTTP server; 0 picks a free port; None runs no HTTP server."""
    room: str = "default"
    """Rendezvous room: workers are paired within a room."""
    token: str | None = None
    """Token the rendezvous asks for, if it was started with one."""
    worker_id: str | None = None
    """Worker id; a fresh UUID when None."""
    public_ip_url: str | None = None
    """An IP-echo URL to learn the HTTP-derived public IP; never contacted unless set."""
    nat_report: bool = True
    """Classify the NAT (RFC 5780) in the background when the STUN server supports it."""
    session: SessionConfig = field(default_factory=SessionConfig)
    """Timers of the peer link (keep-alive, lost-peer timeout, chat retransmission)."""
    backoff: Backoff = field(default_factory=Backoff)
    """Reconnection schedule of the rendezvous client."""
    stun_timeout_s: float = 5.0
    """How long the STUN step may take before the worker falls back to the observed address."""
    encrypt: bool = True
    """Seal every peer datagram (X25519 + ChaCha20-Poly1305, see :mod:`p2plab.core.crypto`).
    False is the explicit plaintext mode: no key is advertised, and a peer is accepted only if
    it runs without encryption too (marked ``"encrypted": false`` in ``status()["security"]``)."""
    repunch: bool = True
    """After a peer timeout on a link that was up (e.g. a NAT dropped its mapping), punch the same
    peer again with the same candidates until it answers or the rendezvous says it left."""
    repunch_max_delay_s: float = 10.0
    """Longest pause between two re-punch attempts (they back off from 0.5 s)."""
    relay: bool = True
    """When punching fails, carry the (still sealed) peer datagrams through the rendezvous
    (state ``relayed``, ``status()["path"] == "relayed"``): chat, keep-alives and RTT work,
    benchmarks do not.  False keeps the old behaviour (``lost``, then ``waiting_for_peer``)."""


_SECURITY_COUNTERS = ("auth_failures", "replays", "unexpected_source", "peer_restarts")


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def _route_source(host: str) -> str | None:
    """Local address the kernel would use to reach ``host`` (UDP connect sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, 9, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(infos[0][4])
            return str(s.getsockname()[0])
    except OSError:
        return None


def _default_extensions() -> list[Extension]:
    """The extensions a worker gets when none are given: the benchmark."""
    return [BenchmarkExtension()]


class Worker:
    """One p2plab worker.  Use ``async with Worker(config) as w:`` or ``await w.start()``."""

    def __init__(self, config: WorkerConfig, extensions: list[Extension] | None = None) -> None:
        self.config = config
        self._extensions = list(extensions) if extensions is not None else _default_extensions()
        names = [ext.name for ext in self._extensions]
        if len(set(names)) != len(names):
            raise ConfigError(f"extension names must be unique: {names}")
        self._control_routes: dict[str, Extension] = {}
        for ext in self._extensions:
            for kind in ext.control_types:
                if kind in self._control_routes:
                    raise ConfigError(f"control type {kind!r} is claimed by two extensions")
                self._control_routes[kind] = ext
        self.event_handlers: list[Callable[[ev.Event], None]] = []
        """Called with every public event an extension emits (``emit``)."""
        self.worker_id = config.worker_id or str(uuid.uuid4())
        self.state = "starting"
        self.endpoint: UdpEndpoint | None = None
        self._udp_local: Address | None = None
        self.punch: HolePuncher | None = None
        self.peer_id: str | None = None
        self.udp_public: Address | None = None
        self.observed_ip: str | None = None
        self.http_public_ip: str | None = None
        self.nat: dict[str, Any] | None = None
        self.stun_info: dict[str, Any] | None = None
        self.error: str | None = None
        self.http_address: Address | None = None
        self.stats: dict[str, int] = {
            "offers": 0,
            "chats_in": 0,
            "chats_out": 0,
            "relay_in": 0,
            "relay_dropped": 0,
            "relay_switches": 0,
            "udp_dropped_while_relayed": 0,
            "controls_unknown": 0,
        }
        self.datagram_hooks: list[Callable[[bytes, Address], bool]] = []
        """Fault injection for tests: each sees a datagram after the extensions; True drops it."""
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._rendezvous: RendezvousClient | None = None
        self._http_server: Any = None
        self._discovered = asyncio.Event()
        self._state_changed = asyncio.Condition()
        self._stopped = False
        self.identity: Identity | None = Identity.generate(os.urandom) if config.encrypt else None
        """This worker's X25519 key pair (None in plaintext mode)."""
        self.peer_public_key: bytes | None = None
        self._offer: P2PConnectionOffer | None = None
        self._punch_gen = 0
        self._repunch_attempts = 0
        self._security_totals: dict[str, int] = dict.fromkeys(_SECURITY_COUNTERS, 0)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Worker:
        """Bind the UDP socket, start the HTTP server and the rendezvous client."""
        self.endpoint = await UdpEndpoint.bind(self.config.udp_host, self.config.udp_port)
        self._udp_local = self.endpoint.local_address
        self.endpoint.peer_handler = self._on_datagram
        for ext in self._extensions:
            ext.attach(self)
        if self.config.http_port is not None:
            from p2plab.server.worker_app import start_http_server

            self._http_server, self.http_address = await start_http_server(
                self, self.config.http_host, self.config.http_port
            )
        self._rendezvous = RendezvousClient(
            self.config.rendezvous_url,
            self.worker_id,
            make_register=self._make_register,
            on_message=self._on_rendezvous_message,
            on_state=self._on_rendezvous_state,
            backoff=self.config.backoff,
        )
        self._spawn(self._run_rendezvous(), "rendezvous")
        await self._set_state("registering")
        log.info(
            "worker %s: UDP on %s, UI on %s",
            self.worker_id,
            self.udp_local,
            self.ui_url or "(none)",
        )
        return self

    async def stop(self) -> None:
        """Say goodbye to the peer, close sockets and stop all tasks."""
        if self._stopped:
            return
        self._stopped = True
        for ext in self._extensions:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ext.close(), 5.0)
        if self.punch is not None:
            self.punch.close()
        if self._http_server is not None:
            self._http_server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._http_server.p2plab_task), 3)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # bounded: a task stuck in a close handshake must not hang stop()
            done, stuck = await asyncio.wait(self._tasks, timeout=5.0)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.debug("worker task %s ended with %r", task.get_name(), task.exception())
            for task in stuck:
                log.warning("worker %s: task %s did not stop", self.worker_id[:8], task.get_name())
        if self._http_server is not None:
            self._http_server.p2plab_task.cancel()
        if self.endpoint is not None:
            self.endpoint.close()
        await self._set_state("stopped")

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"worker-{name}")
        self._tasks.append(task)
        return task

    # -- properties ---------------------------------------------------------------------------

    @property
    def udp_local(self) -> str:
        if self._udp_local is None:
            return ""
        host, port = self._udp_local
        return f"{host}:{port}"

    @property
    def ui_url(self) -> str | None:
        if self.http_address is None:
            return None
        host, port = self.http_address
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown}:{port}/"

    @property
    def path(self) -> str | None:
        """``"direct"`` while connected, ``"relayed"`` while relayed, else None."""
        return {"connected": "direct", "relayed": "relayed"}.get(self.state)

    @property
    def rtt(self) -> float | None:
        return self.punch.rtt if self.punch is not None else None

    @property
    def peer_sealer(self) -> PeerCipher | PlainEnvelope | None:
        """The sealer of the current peer link (None without one).

        The benchmark data path seals with ``peer_sealer.seal_datagram(plain)`` and opens with
        ``peer_sealer.open_datagram(data)`` (None: drop, already counted).
        """
        if self.punch is None:
            return None
        sealer = self.punch.sealer
        return sealer if isinstance(sealer, PeerCipher | PlainEnvelope) else None

    def _security_counts(self, punch: HolePuncher | None) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(_SECURITY_COUNTERS, 0)
        if punch is None:
            return counts
        sealer = punch.sealer
        stats = getattr(sealer, "stats", {})
        counts["auth_failures"] = stats.get("auth_failures", 0)
        counts["replays"] = stats.get("replays", 0)
        counts["peer_restarts"] = stats.get("peer_restarts", 0)
        counts["unexpected_source"] = punch.session.stats.get("unexpected_source", 0)
        return counts

    def _retire_punch(self, punch: HolePuncher | None) -> None:
        """Keep the security counters of a finished link in the worker's totals."""
        for k, v in self._security_counts(punch).items():
            self._security_totals[k] += v

    def security(self) -> dict[str, Any]:
        """The ``security`` block of ``status()``: encryption, both fingerprints, drop counters.

        Counters are totals over every link this worker had (datagrams dropped because they did
        not authenticate, were replays or stale, or came from an unexpected address).
        """
        current = self._security_counts(self.punch)
        sealer = self.punch.sealer if self.punch is not None else None
        return {
            "encrypted": bool(getattr(sealer, "encrypted", self.config.encrypt)),
            "local_fingerprint": self.identity.fingerprint if self.identity else None,
            "peer_fingerprint": fingerprint(self.peer_public_key)
            if self.peer_public_key and self.peer_id
            else None,
            **{k: self._security_totals[k] + current[k] for k in _SECURITY_COUNTERS},
        }

    def status(self) -> dict[str, Any]:
        """The ``status`` message of contracts.md (also served at ``GET /status``)."""
        peer = None
        if self.peer_id is not None:
            addr = self.punch.peer_address if self.punch is not None else None
            rtt = self.rtt
            peer = {
                "worker_id": self.peer_id,
                "endpoint": "relay"
                if addr == RELAY
                else (f"{addr[0]}:{addr[1]}" if addr else None),
                "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
            }
        session_stats = dict(self.punch.session.stats) if self.punch is not None else {}
        return {
            "type": "status",
            "worker_id": self.worker_id,
            "state": self.state,
            "udp_local": self.udp_local,
            "udp_public": f"{self.udp_public[0]}:{self.udp_public[1]}" if self.udp_public else None,
            "nat": self.nat,
            "peer": peer,
            "path": self.path,
            "room": self.config.room,
            "rendezvous": "connected"
            if self._rendezvous and self._rendezvous.connected
            else "down",
            "http_public_ip": self.http_public_ip,
            "stun": self.stun_info,
            "error": self.error,
            "security": self.security(),
            "stats": {
                **self.stats,
                "udp": dict(self.endpoint.stats) if self.endpoint else {},
                "session": session_stats,
            },
        }

    # -- events for the UI / notebooks ----------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives every UI message (status, chat, benchmark_*) from now on."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10000)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(q)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Async iterator over UI messages (status, chat, chat_delivered, benchmark_*)."""
        q = self.subscribe()
        try:
            while True:
                yield await q.get()
        finally:
            self.unsubscribe(q)

    def publish(self, msg: dict[str, Any]) -> None:
        """Send a UI message to every subscriber (slow subscribers lose the oldest messages)."""
        for q in list(self._subscribers):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(msg)

    def publish_status(self) -> None:
        self.publish(self.status())

    async def _set_state(self, state: str) -> None:
        assert state in STATES, state
        if state != self.state:
            log.info("worker %s: %s -> %s", self.worker_id[:8], self.state, state)
            self.state = state
            for ext in self._extensions:
                ext.on_link_changed(state)
        self.publish_status()
        async with self._state_changed:
            self._state_changed.notify_all()

    def _set_state_soon(self, state: str) -> None:
        """Change the state now, from a callback; publish it and wake waiters soon.

        The state itself must change synchronously: the core delivers PeerConnected and the
        peer's first control messages in one pump, and their handlers (benchmarks answering a
        bench_start) check ``state`` right away.
        """
        assert state in STATES, state
        if state != self.state:
            log.info("worker %s: %s -> %s", self.worker_id[:8], self.state, state)
            self.state = state
            for ext in self._extensions:
                ext.on_link_changed(state)
        asyncio.get_running_loop().create_task(self._set_state(state))

    async def wait_for_state(self, *states: str, timeout: float | None = None) -> str:
        """Wait until the worker is in one of ``states``; returns it."""

        async def _wait() -> str:
            async with self._state_changed:
                await self._state_changed.wait_for(lambda: self.state in states)
                return self.state

        return await asyncio.wait_for(_wait(), timeout)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a direct peer link is up (``wait_for_state("relayed")`` for the relay)."""
        await self.wait_for_state("connected", timeout=timeout)

    # -- chat -----------------------------------------------------------------------------------

    def send_chat(self, text: str) -> str:
        """Send a chat message reliably to the peer; returns its id.

        Raises NotConnected without a peer link and ChatTooLong over 4 KiB.
        """
        if self.punch is None or self.state not in ("connected", "relayed"):
            raise NotConnected("no peer connected: chat needs a connected peer")
        msg_id = self.punch.send_chat(text)
        self.stats["chats_out"] += 1
        self.publish(
            {
                "type": "chat",
                "direction": "out",
                "from": self.worker_id,
                "id": msg_id,
                "text": text,
                "ts": time.time(),
            }
        )
        return msg_id

    # -- rendezvous -----------------------------------------------------------------------------

    def _make_register(self) -> Register:
        return Register(
            http_public_ip=self.http_public_ip,
            room=self.config.room,
            token=self.config.token,
            public_key=self.identity.public_b64 if self.identity else None,
        )

    async def _run_rendezvous(self) -> None:
        assert self._rendezvous is not None
        if self.config.public_ip_url:
            self.http_public_ip = await self._fetch_public_ip(self.config.public_ip_url)
        try:
            await self._rendezvous.run()
        except RendezvousError as exc:
            self.error = str(exc)
            log.error("%s", exc)
            await self._set_state("stopped")

    async def _fetch_public_ip(self, url: str) -> str | None:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                resp = await client.get(url)
                resp.raise_for_status()
                return resp.text.strip()[:64] or None
        except (httpx.HTTPError, OSError) as exc:
            log.warning("could not learn the public IP from %s: %s", url, exc)
            return None

    def _on_rendezvous_state(self, connected: bool) -> None:
        if not connected and self.state in ("registering", "discovering", "waiting_for_peer"):
            self._set_state_soon("registering")
        else:
            self.publish_status()

    async def _on_rendezvous_message(
        self, msg: Registered | P2PConnectionOffer | PeerDisconnected | ErrorMessage | RelayIn
    ) -> None:
        if isinstance(msg, RelayIn):
            self._on_relayed(msg)
        elif isinstance(msg, Registered):
            self.observed_ip = msg.observed_ip
            if self.http_public_ip is None:
                self.http_public_ip = msg.observed_ip
            if self.udp_public is None:
                await self._set_state("discovering")
                await self._discover()
            await self._report_endpoint()
            if self.state not in ("punching", "connected", "relayed"):
                await self._set_state("waiting_for_peer")
        elif isinstance(msg, P2PConnectionOffer):
            await self._on_offer(msg)
        elif isinstance(msg, PeerDisconnected):
            if msg.peer_worker_id == self.peer_id:
                log.info("peer %s left the rendezvous", msg.peer_worker_id)
                self._drop_peer()
                await self._set_state("lost")
                await self._set_state("waiting_for_peer")
        elif isinstance(msg, ErrorMessage):
            log.warning("rendezvous error: %s: %s", msg.code, msg.message)
            self.publish({"type": "error", "message": f"rendezvous: {msg.message}"})

    async def _discover(self) -> None:
        """Learn the public UDP endpoint of our socket with STUN (or fall back)."""
        assert self.endpoint is not None
        local_port = self.endpoint.local_address[1]
        if not self.config.stun_servers:
            log.warning(
                "no STUN server configured (--stun host:port): using the address the rendezvous "
                "observed (%s) with the local port %d. For NATs, configure a STUN server, e.g. "
                "a public one such as stun.l.google.com:19302.",
                self.observed_ip,
                local_port,
            )
            self.udp_public = (self.observed_ip or "127.0.0.1", local_port)
            return
        from p2plab.aio.stun import StunProbe

        probe = StunProbe(self.endpoint, list(self.config.stun_servers))
        try:
            result = await asyncio.wait_for(probe.mapped_address(), self.config.stun_timeout_s)
        except (TimeoutError, P2PLabError) as exc:
            self.error = f"STUN failed: {exc}"
            log.warning("STUN failed (%s); falling back to the observed address", exc)
            self.udp_public = (self.observed_ip or "127.0.0.1", local_port)
            return
        self.udp_public = (result.mapped[0], result.mapped[1])
        self.stun_info = {
            "server": f"{result.server[0]}:{result.server[1]}",
            "rtt_ms": round(result.rtt_s * 1000, 3),
        }
        if self.config.nat_report:
            self._spawn(self._classify(), "nat-report")

    async def _classify(self) -> None:
        """RFC 5780 classification, on a socket of its own.

        The behaviour tests (CHANGE-REQUEST, the alternate address) make some NATs hand out new
        mappings (natlab.md's "leaky" profile); on the punching socket that would change the very
        mapping the peer was told to punch towards.  A NAT's behaviour is per NAT, not per
        socket, so a second socket classifies it just as well.
        """
        from p2plab.aio.stun import StunProbe

        try:
            probe_endpoint = await UdpEndpoint.bind(self.config.udp_host, 0)
        except OSError as exc:
            log.info("NAT classification unavailable: %s", exc)
            return
        try:
            report = await StunProbe(probe_endpoint, list(self.config.stun_servers)).nat_report(
                classic=False
            )
        except Exception as exc:
            log.info("NAT classification unavailable: %s", exc)
            return
        finally:
            probe_endpoint.close()
        d = report.to_dict()
        self.nat = {k: d.get(k) for k in ("mapping", "filtering", "classic")}
        self.publish_status()

    def _local_candidates(self) -> list[Candidate]:
        assert self.endpoint is not None
        host, port = self.endpoint.local_address
        addrs: list[str] = []
        if host not in ("0.0.0.0", "::"):
            addrs.append(host)
        else:
            targets = [urlsplit(self.config.rendezvous_url).hostname or ""]
            targets += [_split_hostport(s)[0] for s in self.config.stun_servers]
            for target in targets:
                src = _route_source(target) if target else None
                if src and src not in addrs:
                    addrs.append(src)
        public = self.udp_public
        return [Candidate(ip=a, port=port) for a in addrs if public is None or (a, port) != public][
            :8
        ]

    async def _report_endpoint(self) -> None:
        if self.udp_public is None or self._rendezvous is None:
            return
        await self._rendezvous.send(
            UpdateUdpEndpoint(
                udp_ip=self.udp_public[0],
                udp_port=self.udp_public[1],
                local_candidates=self._local_candidates(),
            )
        )

    # -- peer link ------------------------------------------------------------------------------

    async def _on_offer(self, offer: P2PConnectionOffer) -> None:
        self.stats["offers"] += 1
        assert self.endpoint is not None
        if (
            offer.peer_worker_id == self.peer_id
            and self.punch is not None
            and self.state in ("punching", "connected", "relayed")
        ):
            log.info("offer for the current peer %s: keeping the link", self.peer_id)
            return
        self._drop_peer()
        peer_key: bytes | None = None
        refusal: str | None = None
        if offer.peer_public_key is not None:
            try:
                peer_key = decode_public_key(offer.peer_public_key)
            except P2PLabError as exc:
                refusal = f"peer {offer.peer_worker_id} sent an unusable public key: {exc}"
        if refusal is None and self.identity is not None and peer_key is None:
            refusal = (
                f"peer {offer.peer_worker_id} offers no public key: refusing an unencrypted "
                "link (both workers must run with encryption disabled to allow plaintext)"
            )
        if refusal is None and self.identity is None and peer_key is not None:
            refusal = (
                f"peer {offer.peer_worker_id} requires encryption, but this worker runs with "
                "encryption disabled"
            )
        if refusal is not None:
            log.warning("%s", refusal)
            self.error = refusal
            self.publish({"type": "error", "message": refusal})
            await self._set_state("waiting_for_peer")
            return
        self._offer = offer
        self.peer_public_key = peer_key
        self._repunch_attempts = 0
        candidates: list[Address] = [(offer.peer_udp_ip, offer.peer_udp_port)]
        for c in offer.peer_candidates:
            if (c.ip, c.port) not in candidates and c.port:
                candidates.append((c.ip, c.port))
        log.info("offer: peer %s at %s (role %s)", offer.peer_worker_id, candidates, offer.role)
        self._start_punch(offer, candidates)
        await self._set_state("punching")

    def _new_sealer(self, offer: P2PConnectionOffer) -> PeerCipher | PlainEnvelope:
        if self.identity is not None and self.peer_public_key is not None:
            return PeerCipher(
                self.identity,
                self.worker_id,
                offer.peer_worker_id,
                self.peer_public_key,
                os.urandom,
            )
        return PlainEnvelope(os.urandom)  # explicit plaintext mode on both sides

    def _start_punch(self, offer: P2PConnectionOffer, candidates: list[Address]) -> None:
        assert self.endpoint is not None
        sealer = self._new_sealer(offer)
        self.peer_id = offer.peer_worker_id
        self._punch_gen += 1
        gen = self._punch_gen
        self.punch = HolePuncher(
            self.endpoint,
            local_id=self.worker_id,
            peer_id=offer.peer_worker_id,
            candidates=candidates,
            role=offer.role,
            config=self.config.session,
            on_event=lambda event: self._on_peer_event(event, gen),
            sealer=sealer,
        )

    def _start_relay(self, offer: P2PConnectionOffer) -> None:
        """Move the link to ``offer``'s peer onto the rendezvous relay (a fresh session)."""
        assert self.endpoint is not None
        if self.punch is not None:
            self._punch_gen += 1  # the direct attempt's events are stale from now on
            self.punch.close()
            self._retire_punch(self.punch)
        self.stats["relay_switches"] += 1
        self.peer_id = offer.peer_worker_id
        self._punch_gen += 1
        gen = self._punch_gen
        peer_id = offer.peer_worker_id
        log.info("punching to %s failed: relaying through the rendezvous", peer_id)

        def relay_send(data: bytes) -> None:
            if self._rendezvous is not None:
                self._rendezvous.send_relay(peer_id, data)

        self.punch = HolePuncher(
            self.endpoint,
            local_id=self.worker_id,
            peer_id=peer_id,
            candidates=[RELAY],
            role=offer.role,
            config=self.config.session,
            on_event=lambda event: self._on_peer_event(event, gen),
            sealer=self._new_sealer(offer),
            relay_send=relay_send,
        )

    def _on_relayed(self, msg: RelayIn) -> None:
        """A datagram the peer relayed through the rendezvous."""
        punch = self.punch
        offer = self._offer
        if not self.config.relay or offer is None or msg.from_ != self.peer_id:
            self.stats["relay_dropped"] += 1
            return
        if punch is None or not punch.relayed:
            # The peer gave up punching first: follow it onto the relay now.
            self._start_relay(offer)
            self._set_state_soon("punching")
            punch = self.punch
            assert punch is not None
        self.stats["relay_in"] += 1
        punch.datagram_received(msg.payload(), RELAY)

    def _drop_peer(self) -> None:
        self._punch_gen += 1  # events of the old link are stale from now on
        if self.punch is not None:
            self.punch.close()
        self._retire_punch(self.punch)
        self.punch = None
        self.peer_id = None
        self.peer_public_key = None
        self._offer = None

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        for ext in self._extensions:
            if ext.on_datagram(data, addr):
                return
        for hook in self.datagram_hooks:
            if hook(data, addr):
                return
        if self.punch is not None and self.punch.relayed:
            # A relayed link runs over the rendezvous only (late direct probes end here).
            self.stats["udp_dropped_while_relayed"] += 1
        elif self.punch is not None:
            self.punch.datagram_received(data, addr)
        else:
            self.endpoint.stats["dropped_no_handler"] += 1  # type: ignore[union-attr]

    def _on_peer_event(self, event: ev.Event, gen: int | None = None) -> None:
        if gen is not None and gen != self._punch_gen:
            return  # from a link we already dropped
        if isinstance(event, ev.PeerConnected):
            relayed = self.punch is not None and self.punch.relayed
            log.info("connected to %s at %s", self.peer_id, event.address)
            self._repunch_attempts = 0
            self.error = None
            self._set_state_soon("relayed" if relayed else "connected")
        elif isinstance(event, ev.PathChanged | ev.RttUpdated):
            self.publish_status()
        elif isinstance(event, ev.ChatReceived):
            self.stats["chats_in"] += 1
            self.publish(
                {
                    "type": "chat",
                    "direction": "in",
                    "from": self.peer_id,
                    "id": event.msg_id,
                    "text": event.text,
                    "ts": event.sent_at,
                }
            )
        elif isinstance(event, ev.ChatDelivered):
            self.publish({"type": "chat_delivered", "id": event.msg_id})
        elif isinstance(event, ev.ChatFailed):
            self.publish({"type": "chat_failed", "id": event.msg_id, "reason": event.reason})
        elif isinstance(event, ev.ControlReceived):
            self._on_control(event.obj)
        elif isinstance(event, ev.PeerRestarted):
            log.info("peer %s restarted its session", self.peer_id)
            self.publish_status()
        elif isinstance(event, ev.PeerLost | ev.PeerClosed):
            reason = getattr(event, "reason", "peer closed")
            log.info("peer %s lost: %s", self.peer_id, reason)
            offer, punch = self._offer, self.punch
            if punch is not None and punch.relayed:
                self._on_relay_lost(event, offer, punch)
                return
            if (
                self.config.relay
                and offer is not None
                and isinstance(event, ev.PeerLost)
                and event.reason == "punch timeout"
                and self._repunch_attempts == 0
            ):
                # Direct punching failed (e.g. symmetric x symmetric): fall back to the relay.
                self._start_relay(offer)
                return
            # Re-punch a link that was up (or is being re-punched) and fell silent: its NAT may
            # have dropped the mapping.  The rendezvous says when the peer really left.
            again = (
                self.config.repunch
                and offer is not None
                and isinstance(event, ev.PeerLost)
                and (
                    event.reason == "peer timeout"
                    or (event.reason == "punch timeout" and self._repunch_attempts > 0)
                )
            )
            self._retire_punch(punch)
            self.punch = None
            if again and offer is not None:
                last = punch.session.peer_address if punch is not None else None
                known = punch.session.candidates if punch is not None else []
                self._spawn(self._repunch(offer, last, known), "repunch")
            else:
                self.peer_id = None
                self.peer_public_key = None
                self._offer = None
                self._spawn(self._after_loss(), "after-loss")

    def _on_relay_lost(
        self, event: ev.Event, offer: P2PConnectionOffer | None, punch: HolePuncher
    ) -> None:
        """A relayed link ended: set it up again after a peer timeout, else give up."""
        self._retire_punch(punch)
        self.punch = None
        if (
            offer is not None
            and isinstance(event, ev.PeerLost)
            and event.reason == "peer timeout"
            and not self._stopped
        ):
            self._spawn(self._rerelay(offer), "rerelay")
            return
        self.peer_id = None
        self.peer_public_key = None
        self._offer = None
        self._spawn(self._after_loss(), "after-loss")

    async def _rerelay(self, offer: P2PConnectionOffer) -> None:
        gen = self._punch_gen
        await self._set_state("lost")
        if gen != self._punch_gen or self._offer is not offer or self._stopped:
            return
        self._start_relay(offer)
        await self._set_state("punching")

    async def _after_loss(self) -> None:
        await self._set_state("lost")
        # The rendezvous re-pairs us when it learns the peer left; meanwhile we wait.
        await self._set_state("waiting_for_peer")

    async def _repunch(
        self, offer: P2PConnectionOffer, last: Address | None, known: list[Address]
    ) -> None:
        """Punch the same peer again (both sides do this on their own after a peer timeout)."""
        gen = self._punch_gen
        await self._set_state("lost")
        delay = min(0.5 * 2 ** max(self._repunch_attempts - 1, 0), self.config.repunch_max_delay_s)
        if self._repunch_attempts > 0:
            await asyncio.sleep(delay)
        if gen != self._punch_gen or self._offer is not offer or self._stopped:
            return  # a new offer or the peer's departure came first
        self._repunch_attempts += 1
        candidates: list[Address] = [last] if last is not None else []
        for c in known:
            if c not in candidates:
                candidates.append(c)
        log.info(
            "re-punching peer %s (attempt %d) at %s",
            offer.peer_worker_id,
            self._repunch_attempts,
            candidates,
        )
        self._start_punch(offer, candidates)
        await self._set_state("punching")

    # -- control channel (used by benchmarks) -----------------------------------------------------

    def send_control(self, obj: dict[str, Any]) -> str:
        if self.punch is not None and self.state == "relayed":
            raise NotConnected(
                "the link to the peer is relayed through the rendezvous: benchmarks need a "
                "direct path"
            )
        if self.punch is None or self.state != "connected":
            raise NotConnected("no peer connected")
        return self.punch.send_control(obj)

    def _on_control(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        ext = self._control_routes.get(kind) if isinstance(kind, str) else None
        if ext is None:
            self.stats["controls_unknown"] += 1
            log.debug("dropping control message of unknown type %r", kind)
            return
        try:
            ext.on_control(obj)
        except Exception:  # a peer's message must never raise through the session pump
            self.count("extension_errors")
            log.exception("extension %s failed on a %r control message", ext.name, kind)

    # -- extensions (p2plab.aio.extension) --------------------------------------------------------

    def extension(self, name: str) -> Extension | None:
        """The extension called ``name``, or None."""
        for ext in self._extensions:
            if ext.name == name:
                return ext
        return None

    @property
    def benchmark(self) -> BenchmarkExtension:
        """The benchmark extension: ``await worker.benchmark.run(...)``, ``.rtt(...)``."""
        ext = self.extension(BenchmarkExtension.name)
        if not isinstance(ext, BenchmarkExtension):
            raise ConfigError("this worker was built without the benchmark extension")
        return ext

    @property
    def peer_address(self) -> Address | None:
        """Where the peer link's datagrams go (None without a link)."""
        return self.punch.peer_address if self.punch is not None else None

    def emit(self, event: ev.Event) -> None:
        """Hand a public event to every handler in :attr:`event_handlers`."""
        for handler in list(self.event_handlers):
            try:
                handler(event)
            except Exception:
                log.exception("event handler failed on %r", event)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``stats[name]``."""
        self.stats[name] = self.stats.get(name, 0) + n
