"""Worker: the asyncio driver of one :class:`~p2plab.core.link.LinkEngine`.

The engine decides the whole lifecycle (registering, discovering, waiting, punching, connected,
relayed, lost, re-punching; see :mod:`p2plab.core.link_table`).  The worker only moves bytes:
the UDP endpoint, the rendezvous client, the STUN and NAT-classification tasks and the HTTP UI
server.  After every input it does what aioquic's ``transmit`` does: send the engine's
datagrams, carry out its commands, hand its events on (UI messages, public events, extensions),
and re-arm ONE timer.

Features plug in as :class:`~p2plab.aio.extension.Extension` objects handed over at
construction (``Worker(config, extensions=[...])``); the worker is their
:class:`~p2plab.aio.extension.WorkerHost`.

The IPv4 UDP endpoint (:attr:`Worker.endpoint4`) is bound at start: STUN learns the mapping of
that very socket, and that mapping is what the peer punches towards.  It changes once at most
per link attempt, when birthday punching (issue 16) wins on a pool socket
(:mod:`p2plab.aio.pool`): that socket holds the NAT mapping that reached the peer, so it becomes
:attr:`Worker.endpoint4` (peer handler, STUN, benchmarks and ``udp_local`` follow, since they
all read the attribute) and the old one closes.  Nothing may keep the endpoint of the start.

Beside it, an IPv6-only socket (:attr:`Worker.endpoint6`, issue 19, :mod:`p2plab.aio.dualstack`):
one socket per family, never a dual-stack one, so the engine sees plain 2-tuples of either
family.  Both sockets feed the same handler; a datagram of the engine leaves by the socket of
its address's family; :attr:`Worker.endpoint` is the socket of the link's current family (the
benchmark's fast paths read it when a run starts).  The clock is ``time.monotonic()`` rather
than ``loop.time()``: uvloop's loop clock has millisecond resolution, too coarse for loopback
RTTs of tens of microseconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar, overload

from p2plab.aio import discovery, dualstack
from p2plab.aio.bench.extension import BenchmarkExtension
from p2plab.aio.bench.route import deliver
from p2plab.aio.dualstack import Discovery6
from p2plab.aio.endpoint import Address, UdpEndpoint
from p2plab.aio.extension import Extension
from p2plab.aio.hub import EventHub, Subscription, ui_message
from p2plab.aio.pool import SocketPool
from p2plab.aio.portmap import PortMapDriver, start_for_worker
from p2plab.aio.rendezvous import RendezvousClient, RendezvousMessage
from p2plab.aio.status import format_address, nat_block, peer_block, security_block, turn_block
from p2plab.aio.trust import load_known_peers, save_known_peers
from p2plab.aio.turn_tcp import TurnTcpConnection
from p2plab.aio.ui_server import UiServer
from p2plab.aio.worker_config import WorkerConfig
from p2plab.core import events as ev
from p2plab.core.crypto import Identity, PeerCipher, PlainEnvelope
from p2plab.core.link import (
    AdoptPoolSocket,
    Command,
    DiscoverEndpoint,
    LinkEngine,
    RelayDatagram,
    SendToRendezvous,
)
from p2plab.core.signaling import PortMapping, Register, Registered
from p2plab.errors import ChatFailedError, ConfigError, RendezvousError

__all__ = ["Worker", "WorkerConfig"]

log = logging.getLogger(__name__)

_now = time.monotonic

E = TypeVar("E", bound=ev.Event)


def _default_extensions() -> list[Extension]:
    """What a worker gets when none are given: the benchmark, so a worker built with the defaults
    answers benchmarks whatever its process imported."""
    return [BenchmarkExtension()]


class Worker:
    """One p2plab worker.  Use ``async with Worker(config) as w:`` or ``await w.start()``."""

    def __init__(self, config: WorkerConfig, extensions: Iterable[Extension] | None = None) -> None:
        self.config = config
        self.worker_id = config.worker_id or str(uuid.uuid4())
        self.identity: Identity | None = Identity.generate(os.urandom) if config.encrypt else None
        """This worker's X25519 key pair (None in plaintext mode)."""
        self.link = LinkEngine(
            self.worker_id,
            config=config.link_config(),
            identity=self.identity,
            rand_bytes=os.urandom,
            known_peers=load_known_peers(config.known_peers_file),
            wall_ns=time.time_ns,  # session epochs: wall clock, so they grow across restarts
        )
        """The sans-I/O engine this worker drives."""
        self.stats = self.link.stats  # one dict: the engine's counters and the driver's
        self.stats.update(chats_out=0, controls_unknown=0)
        self.endpoint4: UdpEndpoint | None = None
        """The link's IPv4 UDP socket (replaced when a birthday pool socket is adopted)."""
        self.endpoint6: UdpEndpoint | None = None
        """The link's IPv6 UDP socket (issue 19, :mod:`p2plab.aio.dualstack`), None when
        ``ipv6`` is off or the host has no IPv6."""
        self.ipv6_discovery: Discovery6 | None = None
        """What STUN over IPv6 said of :attr:`endpoint6` (None: not asked yet)."""
        self.pool: SocketPool | None = None
        """The birthday pool sockets (empty unless the engine opened a pool)."""
        self.http_public_ip: str | None = None
        self.nat: dict[str, Any] | None = None
        self.stun_info: dict[str, Any] | None = None
        self.http_address: Address | None = None
        self._extensions: list[Extension] = list(
            _default_extensions() if extensions is None else extensions
        )
        names = [e.name for e in self._extensions]
        if len(set(names)) != len(names):
            raise ConfigError(f"extension names must be unique, got {names}")
        self._control_routes: dict[str, Extension] = {}
        for ext in self._extensions:
            for kind in ext.control_types:
                if kind in self._control_routes:
                    raise ConfigError(f"control type {kind!r} is claimed by two extensions")
                self._control_routes[kind] = ext
        self._hub = EventHub()
        link = self.link
        self._turn_tcp = TurnTcpConnection(  # the engine's TURN allocation over TCP (issue 17)
            on_connected=lambda: self._feed(link.turn_tcp_connected),
            on_data=lambda data: self._feed(lambda now: link.turn_tcp_received(data, now)),
            on_closed=lambda err: self._feed(lambda now: link.turn_tcp_closed(now, err)),
        )
        self.datagram_hooks: list[Callable[[bytes, Address], bool]] = []
        """Fault injection for tests: each sees a datagram after the extensions; True drops it."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rendezvous: RendezvousClient | None = None
        self._ui_server: UiServer | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._bench_drain: asyncio.Handle | None = None  # a scheduled _drain_bench
        self._timer_at: float | None = None
        self._chat_waiters: dict[str, asyncio.Future[ev.ChatDelivered]] = {}
        self._stopped = False
        self._known_peers_saved = self.link.known_peers.dumps()
        self._portmap: PortMapDriver | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Worker:
        """Bind the UDP socket, attach extensions, start the HTTP server and the rendezvous."""
        config = self.config
        self.endpoint4 = await UdpEndpoint.bind(config.udp_host, config.udp_port)
        host6 = dualstack.ipv6_bind_host(
            config.ipv6, config.rendezvous_url, config.stun_servers, config.udp6_host
        )
        if host6 is not None:
            loop = asyncio.get_running_loop()
            self.endpoint6 = dualstack.bind6(loop, host6, self.endpoint4.local_address[1])
        for ep in (self.endpoint4, self.endpoint6):
            if ep is not None:
                ep.peer_handler = self._on_datagram
                # STUN messages no transaction of ours waits for: the TURN server's answers and
                # Data indications to the engine's TURN client (the engine takes only its
                # server's).
                ep.stun_fallback = self._on_datagram
        self.pool = SocketPool(asyncio.get_running_loop(), self._on_pool_datagram)
        for ext in self._extensions:
            ext.attach(self)
        if self.config.http_port is not None:
            self._ui_server = await UiServer.start(
                self,
                self.config.http_host,
                self.config.http_port,
                token=self.config.ui_token,
                allowed_hosts=self.config.ui_allowed_hosts,
            )
            self.http_address = self._ui_server.address
        self._rendezvous = RendezvousClient(
            self.config.rendezvous_url,
            self.worker_id,
            on_message=self._on_rendezvous_message,
            on_state=self._on_rendezvous_state,
            backoff=self.config.backoff,
            register_timeout_s=self.config.register_timeout_s,
        )
        self._portmap = await start_for_worker(
            self.config.port_mapping,
            self.config.rendezvous_url,
            self.config.stun_servers,
            self.endpoint4.local_address[1],  # port mapping is IPv4's (issue 18)
            self._on_port_mapping,
            lifetime_s=self.config.port_mapping_lifetime_s,
        )
        self._spawn(self._run_rendezvous(), "rendezvous")
        self._feed(self.link.start)
        if self._portmap is not None:  # the first endpoint report waits for the probe
            self._feed(self.link.expect_port_mapping)
        log.info(
            "worker %s: UDP on %s, UI on %s",
            self.worker_id,
            self.udp_local,
            self.ui_url or "(none)",
        )
        return self

    async def stop(self) -> None:
        """Say goodbye to the peer, close extensions, sockets and stop all tasks."""
        if self._stopped:
            return
        self._stopped = True
        for ext in self._extensions:
            try:
                await asyncio.wait_for(ext.close(), 5.0)
            except Exception:
                log.exception("extension %r did not close cleanly", ext.name)
        if self._portmap is not None:
            await self._portmap.stop()  # deletes the mapping (bounded)
        self.link.stop(_now())
        self._transmit()
        self._turn_tcp.close()
        if self._timer is not None:
            self._timer.cancel()
        if self._bench_drain is not None:
            self._bench_drain.cancel()
        for msg_id, fut in self._chat_waiters.items():
            if not fut.done():
                fut.set_exception(ChatFailedError(msg_id, "worker stopped"))
        if self._ui_server is not None:
            await self._ui_server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # bounded: a task stuck in a close handshake must not hang stop()
            done, stuck = await asyncio.wait(tasks, timeout=5.0)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.debug("worker task %s ended with %r", task.get_name(), task.exception())
            for task in stuck:
                log.warning("worker %s: task %s did not stop", self.worker_id[:8], task.get_name())
        if self.pool is not None:
            self.pool.close()
        for ep in (self.endpoint4, self.endpoint6):
            if ep is not None:
                ep.close()

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"worker-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- driving the engine ---------------------------------------------------------------------

    def _feed(self, input_: Callable[[float], object]) -> None:
        """Give the engine one input (with the clock), then do what it asks."""
        if self.link.state == "stopped":
            return  # a stopped engine takes no input; late callbacks end here
        input_(_now())
        self._transmit()

    def _transmit(self) -> None:
        """Send what the engine says, carry out its commands, drain its events, re-arm the timer."""
        now = _now()
        self._send_datagrams(now)
        while (cmd := self.link.next_command()) is not None:
            self._command(cmd)
        while (event := self.link.next_event()) is not None:
            self._on_event(event)
        if self.link.bench_pending and self._bench_drain is None:
            self._bench_drain = asyncio.get_running_loop().call_soon(self._drain_bench)
        when = self.link.get_timer()
        if when != self._timer_at or self._timer is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = when
            if when is not None and not self._stopped:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(max(0.0, when - now), self._on_timer)

    def _send_datagrams(self, now: float) -> None:
        v4, v6 = self.endpoint4, self.endpoint6
        for data, addr in self.link.datagrams_to_send(now):
            endpoint = v6 if ":" in addr[0] else v4  # one socket per family (aio/dualstack.py)
            if endpoint is not None:
                endpoint.sendto(data, addr)
            else:
                self.count("udp_no_socket_for_family")

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._feed(self.link.handle_timer)

    def _command(self, cmd: Command) -> None:
        rendezvous = self._rendezvous
        if isinstance(cmd, RelayDatagram):
            if rendezvous is not None:
                rendezvous.send_relay(cmd.to, cmd.data)
        elif isinstance(cmd, SendToRendezvous):
            msg = cmd.message
            if isinstance(msg, Register) and self.http_public_ip is not None:
                msg = msg.model_copy(update={"http_public_ip": self.http_public_ip})
            if rendezvous is not None:
                self._spawn(rendezvous.send(msg), "rendezvous-send")
        elif isinstance(cmd, DiscoverEndpoint):
            self._spawn(self._discover(cmd.observed_ip), "discover")
        elif self._turn_tcp.command(cmd):
            pass  # TURN over TCP (issue 17)
        elif isinstance(cmd, AdoptPoolSocket):
            self._adopt(cmd.index)
        elif self.pool is not None and self.endpoint4 is not None:  # the other pool commands
            self.pool.carry_out(cmd, self.endpoint4.local_address[0])  # birthday: IPv4 NATs

    def _adopt(self, index: int) -> None:
        """Make pool socket ``index`` the link's socket, then let the engine's held datagrams
        out through it (the commands it gives meanwhile are drained by ``_transmit``'s loop)."""
        old = self.endpoint4
        new = self.pool.take(index, like=old) if self.pool is not None else None
        if new is None:  # closed meanwhile: the engine must not hold its outbox for ever
            log.warning("birthday: pool socket %d is gone; the link stays on its socket", index)
        else:
            self.endpoint4 = new
            new.peer_handler = self._on_datagram
            new.stun_fallback = self._on_datagram  # the engine's TURN client moves with it
            if old is not None:
                old.close()
            log.info("birthday: pool socket %d won; UDP now on %s", index, self.udp_local)
        now = _now()
        self.link.pool_socket_adopted(index, now)
        self._send_datagrams(now)
        self.publish_status()  # udp_local changed

    def _on_pool_datagram(self, index: int, data: bytes, addr: Address) -> None:
        if self.link.state != "stopped":
            self.link.receive_datagram(data, addr, _now(), pool=index)
            self._transmit()

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        for ext in self._extensions:
            if ext.on_datagram(data, addr):
                return
        for hook in self.datagram_hooks:
            if hook(data, addr):
                return
        if self.link.bench_channel_data(data, addr):  # a run's data through our allocation
            if self._bench_drain is None:
                self._bench_drain = asyncio.get_running_loop().call_soon(self._drain_bench)
            return
        if self.link.state != "stopped":  # the hot path: no closure per datagram
            self.link.receive_datagram(data, addr, _now())
            self._transmit()

    def _on_port_mapping(self, mapping: PortMapping | None) -> None:
        self._feed(lambda now: self.link.set_port_mapping(mapping, now))
        self.publish_status()  # the page shows the mapping (or its loss) at once

    def _on_event(self, event: ev.Event) -> None:
        """Turn one engine event into UI messages, public events and extension calls."""
        if isinstance(event, ev.StateChanged):
            self.publish(self.status(state=event.state))
            for ext in self._extensions:
                ext.on_link_changed(event.state)
        elif isinstance(event, ev.PathChanged | ev.RttUpdated | ev.PeerRestarted):
            self.publish_status()
        elif isinstance(event, ev.PeerKeyChanged):
            self.publish_status()  # peer_key_warning; the ErrorReported after it shows it too
        if isinstance(event, ev.StateChanged) and event.state == "punching":
            self._save_known_peers()
        elif isinstance(event, ev.ChatDelivered | ev.ChatFailed):
            waiter = self._chat_waiters.pop(event.msg_id, None)
            if waiter is not None and not waiter.done():
                if isinstance(event, ev.ChatDelivered):
                    waiter.set_result(event)
                else:
                    waiter.set_exception(ChatFailedError(event.msg_id, event.reason))
        elif isinstance(event, ev.ControlReceived):
            self._on_control(event.obj)
        msg = ui_message(event)
        if msg is not None:
            self.publish(msg)
        self._hub.emit(event)

    def _save_known_peers(self) -> None:
        """Write the peer keys remembered to ``known_peers_file`` when they changed."""
        text = self.link.known_peers.dumps()
        if self.config.known_peers_file is not None and text != self._known_peers_saved:
            save_known_peers(self.config.known_peers_file, self.link.known_peers)
            self._known_peers_saved = text

    def _on_control(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        ext = self._control_routes.get(kind) if isinstance(kind, str) else None
        if ext is None:
            self.stats["controls_unknown"] += 1
            log.debug("dropping control message of unknown type %r", kind)
            return
        try:
            ext.on_control(obj)
        except Exception:  # a peer's message must never raise through the engine pump
            self.count("extension_errors")
            log.exception("extension %s failed on a %r control message", ext.name, kind)

    # -- rendezvous and discovery ---------------------------------------------------------------

    async def _run_rendezvous(self) -> None:
        assert self._rendezvous is not None
        if self.config.public_ip_url:
            self.http_public_ip = await discovery.fetch_public_ip(self.config.public_ip_url)
        try:
            await self._rendezvous.run()
        except RendezvousError as exc:
            log.error("%s", exc)
            reason = str(exc)
            self._feed(lambda now: self.link.rendezvous_refused(reason, now))

    def _on_rendezvous_state(self, connected: bool) -> None:
        self._feed(self.link.rendezvous_up if connected else self.link.rendezvous_down)
        self.publish_status()

    async def _on_rendezvous_message(self, msg: RendezvousMessage) -> None:
        if isinstance(msg, Registered) and self.http_public_ip is None:
            self.http_public_ip = msg.observed_ip
        self._feed(lambda now: self.link.receive_rendezvous(msg, now))

    async def _discover(self, observed_ip: str | None) -> None:
        """Answer the engine's DiscoverEndpoint: STUN (or the observed address), LAN addresses;
        with an IPv6 socket, STUN over IPv6 at the same time (its answer follows with
        ``set_endpoint6``: IPv6 never delays IPv4) and the IPv6 host candidates."""
        v4 = self.endpoint4
        assert v4 is not None
        config = self.config
        servers4, servers6 = dualstack.split_stun_servers(config.stun_servers)
        v6 = self.endpoint6
        task6 = (
            asyncio.ensure_future(dualstack.discover6(v6, servers6, config.stun_timeout_s))
            if v6 is not None
            else None
        )
        try:
            birthday = config.birthday
            found = await discovery.discover_endpoint(
                v4,
                servers4,
                observed_ip,
                config.stun_timeout_s,
                hint=birthday.enabled,  # without birthday punching nobody needs it: no delay
                port_range=birthday.port_range,
                warn=not servers6,
            )
            public = found.public
            if found.stun_info is None and v6 is not None and dualstack.is_v6(public[0]):
                # the rendezvous saw us over IPv6: that address is ours on the IPv6 socket
                public = (public[0], v6.local_address[1])
            self.stun_info = found.stun_info
            lan = discovery.local_candidates(v4.local_address, config.rendezvous_url, servers4)
            if v6 is not None:
                lan += dualstack.local_candidates6(
                    v6.local_address, config.rendezvous_url, config.stun_servers
                )
            self._feed(
                lambda now: self.link.discovered(public, lan, now, error=found.error, nat=found.nat)
            )
            if found.stun_info is not None and config.nat_report:
                self._spawn(self._classify(servers4), "nat-report")
            if task6 is not None:
                found6 = self.ipv6_discovery = await task6
                self._feed(lambda now: self.link.set_endpoint6(found6.endpoint, now))
                self.publish_status()
        finally:
            if task6 is not None and not task6.done():
                task6.cancel()

    async def _classify(self, servers: Sequence[str]) -> None:
        nat = await discovery.classify_nat(self.config.udp_host, servers)
        if nat is not None:
            self.nat = nat
            self.publish_status()

    # -- properties (also the WorkerHost interface of extensions) -------------------------------

    @property
    def id(self) -> str:
        """This worker's id (same as :attr:`worker_id`)."""
        return self.worker_id

    @property
    def state(self) -> str:
        """contracts.md's ``state`` (the engine's)."""
        return self.link.state

    @property
    def peer_id(self) -> str | None:
        """The current peer's id, or None without a peer."""
        return self.link.peer_id

    @property
    def peer_public_key(self) -> bytes | None:
        """The current peer's X25519 public key (None without a peer or in plaintext mode)."""
        return self.link.peer_public_key

    @property
    def udp_public(self) -> Address | None:
        """The public UDP endpoint, once discovered."""
        return self.link.public_endpoint

    @property
    def observed_ip(self) -> str | None:
        """The address the rendezvous saw this worker at."""
        return self.link.observed_ip

    @property
    def error(self) -> str | None:
        """The last error the user should see (cleared when a link comes up)."""
        return self.link.error

    @property
    def udp_local(self) -> str:
        """The IPv4 socket's local address, ``host:port`` ("" before start)."""
        if self.endpoint4 is None:
            return ""
        host, port = self.endpoint4.local_address
        return f"{host}:{port}"

    @property
    def udp_local6(self) -> str | None:
        """The IPv6 socket's local address, ``[host]:port`` (None without one)."""
        ep = self.endpoint6
        return None if ep is None or ep.closed else format_address(ep.local_address)

    @property
    def endpoint(self) -> UdpEndpoint | None:
        """The UDP socket of the link's current family: :attr:`endpoint6` while the peer
        address is IPv6, else :attr:`endpoint4` (the benchmark's fast paths send and read on
        it; read it when needed, never keep it: it changes with the path)."""
        v6 = self.endpoint6
        if v6 is not None and dualstack.family_of(self.peer_address) == "ipv6":
            return v6
        return self.endpoint4  # IPv4, and the pseudo-addresses (TURN, relay): the engine's

    @property
    def family(self) -> str | None:
        """contracts.md's ``family`` (the engine's): ``"ipv4"`` or ``"ipv6"``, the address
        family of the link's path (of the peer's transport address on a TURN path); None
        without a link and on the rendezvous relay."""
        return self.link.family

    @property
    def rendezvous_connected(self) -> bool:
        """Whether the rendezvous WebSocket is up right now."""
        return self._rendezvous is not None and self._rendezvous.connected

    @property
    def ui_url(self) -> str | None:
        """The page's address with its token (``http://127.0.0.1:8080/?token=...``), None
        without a page."""
        if self._ui_server is None:
            return None
        host, port = self._ui_server.address
        shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{port}/?token={self._ui_server.token}"

    @property
    def ui_token(self) -> str | None:
        """The page's token (``WorkerConfig.ui_token`` or generated), None without a page."""
        return None if self._ui_server is None else self._ui_server.token

    @property
    def path(self) -> str | None:
        """contracts.md's ``path``: ``"direct"``, ``"turn-udp"``, ``"turn-tcp"`` or
        ``"relay"`` (the rendezvous WebSocket), else None."""
        return self.link.path

    @property
    def rtt(self) -> float | None:
        """Smoothed RTT of the peer link in seconds, or None."""
        return self.link.session.rtt if self.link.session is not None else None

    @property
    def peer_address(self) -> Address | None:
        """Where the peer link's datagrams go while connected or relayed, else None: a real UDP
        address (direct, or the peer's TURN relayed address), or a pseudo-address that only
        the engine reaches (our TURN allocation, the rendezvous relay: :meth:`send_bench`)."""
        return self.link.peer_address if self.link.path is not None else None

    def send_bench(self, datagrams: Sequence[bytes], addr: Address) -> int:
        """Send benchmark datagrams to a pseudo-address of :attr:`peer_address` through the
        engine (ChannelData via our TURN allocation, or relay messages); returns how many it
        took (0: that path is gone)."""
        if self.link.state == "stopped":
            return 0
        n = self.link.send_bench(datagrams, addr, _now())
        self._transmit()
        return n

    def _drain_bench(self) -> None:
        """The benchmark datagrams the engine received through TURN or the relay since the last
        drain: to the armed run in one batch (a drain is scheduled once per loop iteration,
        so a burst read from the socket arrives as one batch), the rest to the extensions
        (which count them as late)."""
        self._bench_drain = None
        for data, addr in deliver(self.endpoint, self.link.take_bench_datagrams()):
            if not any(ext.on_datagram(data, addr) for ext in self._extensions):
                self.count("bench_unclaimed")

    @property
    def peer_sealer(self) -> PeerCipher | PlainEnvelope | None:
        """The sealer of the current peer link (None without one).

        The benchmark data path seals with ``peer_sealer.seal_datagram(plain)`` and opens with
        ``peer_sealer.open_datagram(data)`` (None: drop, already counted).
        """
        session = self.link.session
        sealer = session.sealer if session is not None else None
        return sealer if isinstance(sealer, PeerCipher | PlainEnvelope) else None

    @property
    def benchmark(self) -> BenchmarkExtension:
        """The benchmark extension: ``await worker.benchmark.run(...)``, ``.rtt(...)``,
        ``.stop()``.  Raises ConfigError on a worker built without it."""
        ext = self.extension(BenchmarkExtension.name)
        if not isinstance(ext, BenchmarkExtension):
            raise ConfigError("this worker was built without the benchmark extension")
        return ext

    def extension(self, name: str) -> Extension | None:
        """The extension called ``name``, or None."""
        return next((e for e in self._extensions if e.name == name), None)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``stats[name]``."""
        self.stats[name] = self.stats.get(name, 0) + n

    def security(self) -> dict[str, Any]:
        """The ``security`` block of ``status()`` (see :func:`p2plab.aio.status.security_block`)."""
        return security_block(self.link, self.identity, self.config.encrypt)

    def ipv6(self) -> dict[str, Any]:
        """The ``ipv6`` block of ``status()`` (:func:`p2plab.aio.dualstack.ipv6_block`)."""
        ep = self.endpoint6
        return dualstack.ipv6_block(
            ep.local_address if ep is not None and not ep.closed else None,
            self.link.endpoint6,
            self.ipv6_discovery,
            self.link.local_candidates,
        )

    def status(self, *, state: str | None = None) -> dict[str, Any]:
        """The ``status`` message of contracts.md (also served at ``GET /status``).

        ``state`` overrides the current state (a status published for a state the engine has
        already moved past, e.g. ``lost`` on the way back to ``waiting_for_peer``).
        """
        state = self.state if state is None else state
        session = self.link.session
        public = self.udp_public
        return {
            "type": "status",
            "worker_id": self.worker_id,
            "state": state,
            "udp_local": self.udp_local,
            "udp_public": format_address(public) if public else None,
            "nat": nat_block(self.nat, self.link.nat_hint),
            "peer": peer_block(self.link),
            "path": self.link.path if state == self.state else None,
            "method": self.link.method,
            "family": self.family if state == self.state else None,
            "ipv6": self.ipv6(),
            "turn": turn_block(self.link),
            "port_mapping": self._portmap.status() if self._portmap is not None else None,
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
                "udp": dict(self.endpoint4.stats) if self.endpoint4 else {},
                "udp6": dict(self.endpoint6.stats) if self.endpoint6 else {},
                "pool": dict(self.pool.stats) if self.pool is not None else {},
                "portmap": dict(self._portmap.stats) if self._portmap is not None else {},
                "session": dict(session.stats) if session is not None else {},
            },
        }

    # -- UI messages and public events ----------------------------------------------------------

    def ui_subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives every UI message (status, chat, benchmark_*) from now on."""
        return self._hub.ui_subscribe()

    def ui_unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop feeding a queue from :meth:`ui_subscribe`."""
        self._hub.ui_unsubscribe(q)

    def ui_history(self) -> list[dict[str, Any]]:
        """The recent chat messages and result rows (bounded) as UI messages, oldest first."""
        return self._hub.ui_history()

    def ui_messages(self) -> AsyncIterator[dict[str, Any]]:
        """Async iterator over UI messages (status, chat, chat_delivered, benchmark_*)."""
        return self._hub.ui_messages()

    def publish(self, msg: dict[str, Any]) -> None:
        """Send a UI message to every UI subscriber (slow ones lose the oldest messages)."""
        self._hub.publish(msg)

    def publish_status(self) -> None:
        self.publish(self.status())

    @overload
    def subscribe(self) -> AbstractAsyncContextManager[Subscription[ev.Event]]: ...
    @overload
    def subscribe(self, *kinds: type[E]) -> AbstractAsyncContextManager[Subscription[E]]: ...
    def subscribe(self, *kinds: type[Any]) -> AbstractAsyncContextManager[Subscription[Any]]:
        """Public events of ``kinds`` (every kind when none is given), from entry on::

        async with worker.subscribe(p2plab.ChatReceived) as chats:
            await other.chat("hello")
            msg = await anext(chats)
        """
        return self._hub.subscribe(*kinds)

    def emit(self, event: ev.Event) -> None:
        """Hand a public event to the subscribers of :meth:`subscribe` (extensions use this)."""
        self._hub.emit(event)

    async def wait_for_state(self, *states: str, timeout: float | None = None) -> str:
        """Wait until the worker is in one of ``states`` (or passes through one); returns it."""
        if self.state in states:
            return self.state
        return await asyncio.wait_for(self._hub.next_state(states), timeout)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a direct peer link is up (``wait_for_state("relayed")`` for the relay)."""
        await self.wait_for_state("connected", timeout=timeout)

    # -- chat and control -----------------------------------------------------------------------

    def send_chat(self, text: str) -> str:
        """Send a chat message reliably to the peer; returns its id at once.

        Raises NotConnected without a peer link and ChatTooLong over 4 KiB.
        """
        msg_id = self.link.send_chat(text, _now(), sent_at=time.time())
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
        self._transmit()
        return msg_id

    async def chat(self, text: str, timeout: float | None = None) -> ev.ChatDelivered:
        """Send a chat message and wait until the peer acknowledges it.

        Returns the :class:`~p2plab.core.events.ChatDelivered` event; raises
        :class:`~p2plab.errors.ChatFailedError` when the message is given up, NotConnected
        without a link, TimeoutError after ``timeout`` seconds.
        """
        msg_id = self.send_chat(text)  # an acknowledgement needs a round trip: not yet here
        waiter: asyncio.Future[ev.ChatDelivered] = asyncio.get_running_loop().create_future()
        self._chat_waiters[msg_id] = waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._chat_waiters.pop(msg_id, None)

    def send_control(self, obj: dict[str, Any]) -> str:
        """Send a reliable control message to the peer; needs a direct link (NotConnected)."""
        msg_id = self.link.send_control(obj, _now(), sent_at=time.time())
        self._transmit()
        return msg_id
