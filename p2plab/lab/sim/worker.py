"""A whole simulated worker: the core :class:`~p2plab.core.link.LinkEngine` on a simulated socket.

:class:`SimWorker` is a driver of the engine and nothing more, following the engine's driver
contract (:mod:`p2plab.core.link`) the way the asyncio worker does: every input with the virtual
``now``, then datagrams to the socket, commands to the simulated rendezvous or to discovery,
events recorded with their virtual time, and one timer on the sim clock.  Whatever the link does
(punching, the relay fallback, re-punching after a mapping loss, waiting again when the peer
leaves) it does because the engine decided it.

Discovery is a STUN Binding on the worker's own socket against the simulation's STUN server (the
core's :class:`~p2plab.core.stun.StunTransaction`), falling back to the address the rendezvous
observed with the local port, as the worker does; then the NAT test of issue 16
(:class:`~p2plab.lab.sim.nat_test.NatHintProbe`: more Bindings to the server's other addresses,
the leaky test on a socket of its own) gives the :class:`~p2plab.core.signaling.NatHint` passed
to ``engine.discovered``.

Birthday punching's socket pool (the contract is :mod:`p2plab.core.link_commands`'s docstring):
``OpenSocketPool`` binds more sockets on the host (port 0) whose datagrams go to the engine with
their pool index, ``SendFromPool`` sends from one, ``AdoptPoolSocket`` makes one the worker's
socket (the other pool sockets and the old socket closed, the STUN client moved onto it) and
tells the engine, ``ClosePool`` closes them all.

Port mapping (issue 18): behind a NAT whose router offers it
(:class:`~p2plab.lab.sim.portmap_model.PortMapNat`), the worker runs the core's ``PortMapper``
(:class:`~p2plab.lab.sim.portmap_client.SimPortMapClient`) from its start for the link socket's
port, and hands grants and losses to ``engine.set_port_mapping``, as the asyncio worker does.

IPv6 (issue 19): a host with an IPv6 address gets a second socket on it (one socket per family,
as the asyncio driver does), datagrams leave by the socket of their destination's family, and a
Binding to the STUN server's IPv6 address gives ``engine.set_endpoint6``.  An IPv6-only host's
link socket is its IPv6 one; it discovers over IPv6 and skips the NAT test (there is no NAT).

Discovery answers the engine (``discovered``) once STUN and the NAT test and STUN over IPv6 have
settled, the IPv6 endpoint first, so that the first ``update_udp_endpoint`` (the one the
rendezvous pairs on) already carries it; for the mapping the engine itself holds that report
(``expect_port_mapping``, called when the probe starts, as the asyncio worker does).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from pydantic import BaseModel

from p2plab.core import events as ev
from p2plab.core.crypto import Identity
from p2plab.core.link import (
    AdoptPoolSocket,
    ClosePool,
    Command,
    DiscoverEndpoint,
    LinkConfig,
    LinkEngine,
    OpenSocketPool,
    RelayDatagram,
    SendFromPool,
    SendToRendezvous,
)
from p2plab.core.signaling import (
    BadMessage,
    ErrorAnswers,
    ErrorMessage,
    NatHint,
    PortMapping,
    RelayOut,
    dump_message,
    encode_relay_data,
    parse_rendezvous_message,
)
from p2plab.core.stun import StunTransaction, TransactionState
from p2plab.errors import RemoteProtocolError
from p2plab.lab.sim.ipv6 import is_ipv6
from p2plab.lab.sim.nat_test import NatHintProbe
from p2plab.lab.sim.peer import SimWorld
from p2plab.lab.sim.portmap_client import SimPortMapClient
from p2plab.lab.sim.portmap_model import PortMapNat
from p2plab.lab.sim.rendezvous import SimRendezvous
from p2plab.lab.sim.stun_client import SimStunClient, is_stun
from p2plab.lab.simnet import Address, Host, SimSocket, TimerHandle

__all__ = ["SimWorker"]

log = logging.getLogger(__name__)


class SimWorker:
    """One worker (link engine + its sessions) on one socket of a simulated host."""

    def __init__(
        self,
        sim: SimWorld,
        host: Host,
        sock: SimSocket,
        worker_id: str,
        rendezvous: SimRendezvous,
        *,
        config: LinkConfig | None = None,
        encrypted: bool = True,
        room: str = "default",
        signaling_delay: float = 0.02,
        stun_server: Address | None = None,
        use_stun: bool = True,
        nat_test: bool = True,
        stun_server6: Address | None = None,
        port_mapping: bool = True,
    ) -> None:
        self.sim = sim
        self.host = host
        self.socket = sock
        self.rendezvous = rendezvous
        self.room = room
        self.signaling_delay = signaling_delay
        v6_only = is_ipv6(sock.address[0])
        self.stun_server6 = stun_server6 if use_stun else None
        """The STUN server's IPv6 address (None: no STUN over IPv6)."""
        self.stun_server = (stun_server or sim.stun.primary) if use_stun else None
        if v6_only:
            self.stun_server = self.stun_server6
        self.nat_test = nat_test and not v6_only
        """Run the NAT test after discovery (else the engine gets no hint: plain punching)."""
        self.nat_hint: NatHint | None = None
        """What the NAT test found (the hint given to the engine), once discovery is done."""
        #: The open pool sockets by index (1..count), while the engine keeps a pool.
        self.pool: dict[int, SimSocket] = {}
        self._adopted = False
        identity = Identity.generate(sim.rng.randbytes) if encrypted else None
        self.engine = LinkEngine(
            worker_id,
            config=replace(config or LinkConfig(), room=room),
            identity=identity,
            rand_bytes=sim.rng.randbytes,
        )
        #: Every engine event with the virtual time it came out: ``(t, event)``.
        self.events: list[tuple[float, ev.Event]] = []
        self.stats: Counter[str] = Counter()
        self.conn_id: str | None = None
        self._answers = ErrorAnswers()  # as the asyncio client: bad messages answered, sparingly
        self.stun_client = SimStunClient(sim.clock, sim.rng, sock)
        self._timer: TimerHandle | None = None
        sock.on_datagram = self._on_datagram
        #: The IPv6 socket of a dual-stack host (same port when free), else None.
        self.socket6: SimSocket | None = None
        ip6 = next((ip for ip in host.ips if is_ipv6(ip)), None)
        if ip6 is not None and not v6_only:
            port = sock.address[1]
            self.socket6 = host.bind(0 if (ip6, port) in host.sockets else port, ip6)
            self.socket6.on_datagram = self._on_datagram6
        self.stun_client6 = SimStunClient(sim.clock, sim.rng, self.socket6 or sock)
        #: The port-mapping client, behind a NAT that offers port mapping.
        self.portmap: SimPortMapClient | None = None
        if port_mapping and isinstance(host.nat, PortMapNat) and not v6_only:
            self.portmap = SimPortMapClient(
                sim.clock,
                host,
                host.nat,
                sock.address,
                self._on_mapping,
                sim.rng,
                on_settled=self._on_mapping_settled,
            )
        self._pending: set[str] = set()  # what discovery still waits for
        # STUN's answer (public, error, hint), held until the other parts of discovery settle.
        self._found_v4: tuple[Address, str | None, NatHint | None] | None = None
        self.endpoint6: Address | None = None
        """What STUN over IPv6 saw (set before discovery answers the engine)."""

    # -- what a test reads ----------------------------------------------------------------------

    @property
    def worker_id(self) -> str:
        return self.engine.worker_id

    @property
    def state(self) -> str:
        """The engine's state (contracts.md's ``state``)."""
        return self.engine.state

    @property
    def local_address(self) -> Address:
        return self.socket.address

    @property
    def public_address(self) -> Address | None:
        """The public endpoint the worker discovered (and reported to the rendezvous)."""
        return self.engine.public_endpoint

    @property
    def peer_address(self) -> Address | None:
        """Where the current link sends to (:data:`p2plab.core.link.RELAY` when relayed)."""
        return self.engine.peer_address

    @property
    def states(self) -> list[str]:
        """Every state the engine moved to, in order (from its ``StateChanged`` events)."""
        return [e.state for _, e in self.events if isinstance(e, ev.StateChanged)]

    @property
    def chats_received(self) -> list[str]:
        """Texts of the chat messages received, in order."""
        return [e.text for _, e in self.events if isinstance(e, ev.ChatReceived)]

    def events_of(self, kind: type[ev.Event]) -> list[ev.Event]:
        return [e for _, e in self.events if isinstance(e, kind)]

    def first_time(self, state: str, since: float = 0.0) -> float | None:
        """Virtual time the engine first entered ``state`` at or after ``since``, or None."""
        for t, e in self.events:
            if t >= since and isinstance(e, ev.StateChanged) and e.state == state:
                return t
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine and connect to the rendezvous (as ``p2plab worker`` does)."""
        self.engine.start(self.sim.now)
        self.pump()
        if self.portmap is not None:
            self.engine.expect_port_mapping(self.sim.now)  # the first report waits for it
            self.portmap.start()
        nat = self.host.nat
        observed = nat.public_ip if nat is not None else self.host.ip
        self.conn_id = self.rendezvous.connect(
            self, observed_ip=observed, delay=self.signaling_delay
        )

    def send_chat(self, text: str) -> str:
        """Send a chat message over the current link (direct or relayed); returns its id."""
        now = self.sim.now
        msg_id = self.engine.send_chat(text, now, sent_at=now)
        self.pump()
        return msg_id

    def leave(self, *, bye: bool = True) -> None:
        """Stop: BYE to the peer (unless ``bye`` is False: the worker vanishes), close the
        rendezvous connection (the peer hears ``peer_disconnected``) and the socket."""
        if not bye:
            self.socket.close()
        if self.conn_id is not None:
            self.rendezvous.disconnect(self.conn_id)
            self.conn_id = None
        self.engine.stop(self.sim.now)
        self.pump()
        self._close_pool()
        if self.portmap is not None:
            self.portmap.stop()
        self.socket.close()
        if self.socket6 is not None:
            self.socket6.close()

    # -- the rendezvous connection (RendezvousClient) -------------------------------------------

    def rendezvous_connected(self) -> None:
        if self.state == "stopped":
            return
        self.engine.rendezvous_up(self.sim.now)
        self.pump()  # the engine registers when the rendezvous's challenge arrives

    def rendezvous_message(self, text: str) -> None:
        try:
            msg = parse_rendezvous_message(text)
        except RemoteProtocolError as exc:
            self.stats["rendezvous_bad_messages"] += 1
            kind = exc.kind if isinstance(exc, BadMessage) else "malformed"
            if self.state != "stopped" and self._answers.allow(kind, self.sim.now):
                self.stats["rendezvous_errors_sent"] += 1
                self._to_rendezvous(ErrorMessage(code="bad_message", message=str(exc)[:200]))
            return
        if self.state == "stopped":
            return
        self.engine.receive_rendezvous(msg, self.sim.now)
        self.pump()

    def rendezvous_closed(self) -> None:
        self.conn_id = None
        if self.state != "stopped":
            self.engine.rendezvous_down(self.sim.now)
            self.pump()

    def _to_rendezvous(self, msg: BaseModel) -> None:
        if self.conn_id is None:  # the contract: dropped while the rendezvous is down
            self.stats["rendezvous_down_dropped"] += 1
            return
        self.rendezvous.send(self.conn_id, dump_message(msg))

    # -- the driver contract --------------------------------------------------------------------

    def pump(self) -> None:
        """Datagrams to the socket, commands carried out, events recorded, one timer re-armed.

        After an adoption the output steps run again: the engine held its datagrams until
        ``pool_socket_adopted``, and they must leave by the new socket."""
        now = self.sim.now
        engine = self.engine
        again = True
        while again:
            self._adopted = False
            for data, addr in engine.datagrams_to_send(now):
                self._send(data, addr)
            while (cmd := engine.next_command()) is not None:
                self._carry_out(cmd)
            again = self._adopted
        while (event := engine.next_event()) is not None:
            self.events.append((now, event))
            log.debug("%.3f %s: %s", now, self.worker_id, event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = engine.get_timer()
        if when is not None:
            self._timer = self.sim.clock.call_at(when, self._on_timer)

    def _carry_out(self, cmd: Command) -> None:
        if isinstance(cmd, SendToRendezvous):
            self._to_rendezvous(cmd.message)
        elif isinstance(cmd, RelayDatagram):
            self.stats["relayed_out"] += 1
            self._to_rendezvous(RelayOut(to=cmd.to, data=encode_relay_data(cmd.data)))
        elif isinstance(cmd, DiscoverEndpoint):
            self._discover(cmd.observed_ip)
        elif isinstance(cmd, SendFromPool):
            sock = self.pool.get(cmd.index)
            if sock is None:
                self.stats["pool_send_no_socket"] += 1
            else:
                sock.sendto(cmd.data, cmd.addr)
        elif isinstance(cmd, OpenSocketPool):
            self._open_pool(cmd.count)
        elif isinstance(cmd, AdoptPoolSocket):
            self._adopt(cmd.index)
        elif isinstance(cmd, ClosePool):
            self._close_pool()
        else:  # a command this driver does not know: a newer engine
            self.stats["unknown_commands"] += 1
            log.warning("%s: unknown engine command %r", self.worker_id, cmd)

    def _send(self, data: bytes, addr: Address) -> None:
        """By the socket of the destination's family; none of that family: dropped, counted."""
        sock = self.socket
        if is_ipv6(addr[0]) != is_ipv6(sock.address[0]):
            if self.socket6 is None or not is_ipv6(addr[0]):
                self.stats["send_no_family"] += 1
                return
            sock = self.socket6
        sock.sendto(data, addr)

    def _on_datagram6(self, data: bytes, addr: Address) -> None:
        if is_stun(data) and self.stun_client6.waiting_for(data):
            self.stun_client6.receive(data, addr)
            return
        if self.state == "stopped":
            return
        self.engine.receive_datagram(data, addr, self.sim.now)
        self.pump()

    def _on_mapping(self, mapping: PortMapping | None) -> None:
        if self.state == "stopped":
            return
        self.engine.set_port_mapping(mapping, self.sim.now)
        self.pump()

    def _on_mapping_settled(self) -> None:
        # The probe ended: with a mapping, set_port_mapping already ended the engine's wait;
        # with nothing, say so (None) so that the held endpoint report leaves at once.
        if self.portmap is not None and self.portmap.mapping is None and self.state != "stopped":
            self.engine.set_port_mapping(None, self.sim.now)
            self.pump()

    def _on_timer(self) -> None:
        self._timer = None
        self.engine.handle_timer(self.sim.now)
        self.pump()

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        if is_stun(data) and self.stun_client.waiting_for(data):
            self.stun_client.receive(data, addr)
            return
        if self.state == "stopped":
            return
        self.engine.receive_datagram(data, addr, self.sim.now)
        self.pump()

    # -- the socket pool (birthday punching) ----------------------------------------------------

    def _open_pool(self, count: int) -> None:
        self._close_pool()  # one pool at a time: a new attempt starts from fresh mappings
        ip = self.socket.address[0]
        for index in range(1, count + 1):
            sock = self.host.bind(0, ip)
            sock.on_datagram = self._pool_handler(index)
            self.pool[index] = sock
        self.stats["pool_sockets_opened"] += count

    def _pool_handler(self, index: int) -> Callable[[bytes, Address], None]:
        def on_datagram(data: bytes, addr: Address) -> None:
            if self.state == "stopped":
                return
            self.engine.receive_datagram(data, addr, self.sim.now, pool=index)
            self.pump()

        return on_datagram

    def _adopt(self, index: int) -> None:
        sock = self.pool.pop(index, None)
        if sock is None:  # the engine asked for a socket it never had: a driver/engine bug
            self.stats["adopt_unknown_socket"] += 1
            log.warning("%s: adopt of unknown pool socket %d", self.worker_id, index)
            return
        old = self.socket
        self._close_pool()
        old.close()
        sock.on_datagram = self._on_datagram
        self.socket = sock
        self.stun_client.socket = sock
        self.stats["pool_adoptions"] += 1
        self.engine.pool_socket_adopted(index, self.sim.now)
        self._adopted = True  # pump() runs the output steps again: the held datagrams leave

    def _close_pool(self) -> None:
        for sock in self.pool.values():
            sock.close()
        self.pool.clear()

    # -- discovery ------------------------------------------------------------------------------

    def _discover(self, observed_ip: str | None) -> None:
        self._pending = {"v4"}
        self._found_v4 = None
        if self.socket6 is not None and self.stun_server6 is not None:
            self._pending.add("v6")
            self.stun_client6.request(self.stun_server6, on_done=self._binding6_done)
        if self.stun_server is None:
            # No STUN server: the observed address with the local port (answered on the next
            # tick so the engine is never re-entered from inside its own pump).
            self.sim.clock.call_later(0.0, self._discovered_fallback, observed_ip, "no STUN")
            return
        if not self.nat_test:
            self.stun_client.request(self.stun_server, on_done=self._binding_done)
            return
        probe = NatHintProbe(
            self.sim.clock,
            self.host,
            self.stun_client,
            self.stun_server,
            self._stun_done,
            port_range=self.engine.config.birthday.port_range,
        )
        probe.start()

    def _binding_done(self, tx: StunTransaction) -> None:
        mapped = None
        if tx.state is TransactionState.SUCCEEDED and tx.response is not None:
            mapped = tx.response.attributes.get("XOR-MAPPED-ADDRESS")
        public = None if mapped is None else (str(mapped[0]), int(mapped[1]))
        self._stun_done(public, None)

    def _stun_done(self, public: Address | None, hint: NatHint | None) -> None:
        if public is None:
            self._discovered_fallback(self.engine.observed_ip, "STUN discovery failed")
            return
        self.nat_hint = hint
        self._discovered(public, None, hint)

    def _discovered_fallback(self, observed_ip: str | None, why: str) -> None:
        ip = observed_ip or self.local_address[0]
        self._discovered((ip, self.local_address[1]), f"{why}: using {ip} and the local port")

    def _binding6_done(self, tx: StunTransaction) -> None:
        mapped = None
        if tx.state is TransactionState.SUCCEEDED and tx.response is not None:
            mapped = tx.response.attributes.get("XOR-MAPPED-ADDRESS")
        self.endpoint6 = None if mapped is None else (str(mapped[0]), int(mapped[1]))
        self._settle("v6")

    def _discovered(self, public: Address, error: str | None, hint: NatHint | None = None) -> None:
        self._found_v4 = (public, error, hint)
        self._settle("v4")

    def _settle(self, what: str) -> None:
        """One part of discovery is done; answer the engine when none is left."""
        self._pending.discard(what)
        if self._pending or self.state == "stopped" or self._found_v4 is None:
            return
        public, error, hint = self._found_v4
        self._found_v4 = None
        now = self.sim.now
        v6_only = is_ipv6(self.local_address[0])
        endpoint6 = public if v6_only else self.endpoint6
        if endpoint6 is not None:
            self.engine.set_endpoint6(endpoint6, now)
        locals_ = [self.local_address]
        if self.socket6 is not None:
            locals_.append(self.socket6.address)
        self.engine.discovered(public, locals_, now, error=error, nat=hint)
        self.pump()

    def __repr__(self) -> str:
        return f"SimWorker({self.worker_id!r}, {self.local_address}, {self.state})"
