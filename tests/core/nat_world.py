"""Two link engines behind tiny in-memory NATs, on a fake clock (issue 16's core tests).

A cut-down copy of ``test_core_link.World`` with sockets and NATs: each node has a main socket
and, when its engine asks, a pool of sockets; each sits behind a NAT with its own public IP:

* ``easy``: endpoint-independent mapping (one public port per socket, for every destination),
  address-and-port-dependent filtering (a packet gets in only from an address the socket sent
  to): a port-restricted cone.
* ``hard``: endpoint-dependent mapping (a new public port per socket and destination, random in
  ``port_range`` from a seeded :class:`random.Random`, or the next one for ``sequential``), the
  same filtering: a symmetric NAT.

Discovery answers with the main socket's mapping towards a STUN server and the hint the test
gives the node; the fake rendezvous pairs two nodes with offers carrying the hints.  Every
datagram sent is logged (:attr:`NatWorld.sent`), every one a NAT filtered is counted.
"""

from __future__ import annotations

import base64
import itertools
import random
from dataclasses import dataclass, field

from p2plab.core import events as ev
from p2plab.core.crypto import Identity
from p2plab.core.link import (
    AdoptPoolSocket,
    ClosePool,
    DiscoverEndpoint,
    LinkConfig,
    LinkEngine,
    OpenSocketPool,
    RelayDatagram,
    SendFromPool,
    SendToRendezvous,
)
from p2plab.core.signaling import (
    Challenge,
    NatHint,
    P2PConnectionOffer,
    Registered,
    RelayIn,
    UpdateUdpEndpoint,
    encode_relay_data,
)
from tests.core.engine_clock import run_timers

Address = tuple[str, int]
STUN: Address = ("203.0.113.99", 3478)


@dataclass
class Nat:
    """One NAT: its public IP, how it maps and its tables."""

    ip: str
    kind: str  # "easy" or "hard"
    rng: random.Random
    port_range: tuple[int, int] = (1024, 65535)
    sequential: bool = False
    next_port: int = 30000
    out: dict[tuple[int, Address], int] = field(default_factory=dict)  # (socket, dst) -> port
    inb: dict[tuple[int, Address], int] = field(default_factory=dict)  # (port, src) -> socket
    easy: dict[int, int] = field(default_factory=dict)  # socket -> port (easy)
    owner: dict[int, int] = field(default_factory=dict)  # port -> socket (easy)
    allowed: dict[int, set[Address]] = field(default_factory=dict)  # socket -> sent to (easy)

    def _new_port(self, dst: Address) -> int:
        low, high = self.port_range
        while True:
            if self.sequential:
                port, self.next_port = self.next_port, self.next_port + 1
            else:
                port = self.rng.randint(low, high)
            if self.kind == "easy" and port not in self.owner:
                return port
            if self.kind == "hard" and (port, dst) not in self.inb:
                return port

    def outbound(self, sock: int, dst: Address) -> int:
        """The public port of a packet from ``sock`` to ``dst`` (mapping it if new)."""
        if self.kind == "easy":
            port = self.easy.get(sock)
            if port is None:
                port = self.easy[sock] = self._new_port(dst)
                self.owner[port] = sock
            self.allowed.setdefault(sock, set()).add(dst)
            return port
        port = self.out.get((sock, dst))
        if port is None:
            port = self.out[(sock, dst)] = self._new_port(dst)
            self.inb[(port, dst)] = sock
        return port

    def inbound(self, port: int, src: Address) -> int | None:
        """The socket a packet from ``src`` to ``port`` reaches, None if filtered."""
        if self.kind == "easy":
            sock = self.owner.get(port)
            return sock if sock is not None and src in self.allowed.get(sock, ()) else None
        return self.inb.get((port, src))


@dataclass
class Sent:
    """One datagram a node sent."""

    at: float
    node: str
    sock: int
    dst: Address
    pool: int  # 0: the main socket, else the pool index it left from


class BNode:
    """One engine, its sockets, its NAT and what it told the world."""

    def __init__(
        self, name: str, nat: Nat, hint: NatHint | None, config: LinkConfig, sock: int
    ) -> None:
        rand = random.Random(name).randbytes
        self.engine = LinkEngine(
            name, config=config, identity=Identity.generate(rand), rand_bytes=rand
        )
        self.name = name
        self.nat = nat
        self.hint = hint
        self.main = sock
        self.pool: dict[int, int] = {}  # pool index -> socket
        self.events: list[ev.Event] = []
        self.commands: list[object] = []
        self.reported: UpdateUdpEndpoint | None = None

    def of(self, kind: type[ev.Event]) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]


class NatWorld:
    """A fake clock, two NATs and a fake rendezvous (relay included)."""

    def __init__(self, seed: int = 1) -> None:
        self.now = 100.0
        self.rng = random.Random(seed)
        self.nodes: dict[str, BNode] = {}
        self.sockets = itertools.count(1)
        self.sent: list[Sent] = []
        self.filtered = 0
        self.held_checked = 0  # adoptions where the engine held its output until adopted
        self.relay_on = True
        self.cut = False  # the direct path drops everything (a link loss)

    def add(
        self,
        name: str,
        kind: str,
        hint: NatHint | None,
        config: LinkConfig,
        *,
        sequential: bool = False,
    ) -> BNode:
        ip = f"198.51.100.{len(self.nodes) + 1}"
        nat = Nat(
            ip,
            kind,
            random.Random(self.rng.random()),
            port_range=config.birthday.port_range,
            sequential=sequential,
            next_port=config.birthday.port_range[0] + 500,
        )
        node = BNode(name, nat, hint, config, next(self.sockets))
        self.nodes[name] = node
        e = node.engine
        e.start(self.now)
        e.rendezvous_up(self.now)
        server = Identity.generate(random.Random("server").randbytes)
        nonce = base64.b64encode(bytes(32)).decode()
        e.receive_rendezvous(Challenge(nonce=nonce, server_key=server.public_b64), self.now)
        e.receive_rendezvous(Registered(worker_id=name, observed_ip=ip), self.now)
        self.flush()
        assert e.state == "waiting_for_peer", e.state
        return node

    def pair(self, a: BNode, b: BNode, **offer_kw: object) -> None:
        """The fake rendezvous pairs ``a`` (controlling) and ``b`` with their reports."""
        for me, peer, role in ((a, b, "controlling"), (b, a, "controlled")):
            rep = peer.reported
            assert rep is not None
            fields: dict[str, object] = {
                "peer_worker_id": peer.name,
                "peer_udp_ip": rep.udp_ip,
                "peer_udp_port": rep.udp_port,
                "role": role,
                "peer_public_key": peer.engine.identity.public_b64,  # type: ignore[union-attr]
                "peer_nat": rep.nat,
            }
            fields.update(offer_kw.get(me.name, {}))  # type: ignore[call-overload]
            offer = P2PConnectionOffer.model_construct(**fields)  # hostile fields unchecked
            me.engine.receive_rendezvous(offer, self.now)
        self.flush()

    # -- the network --------------------------------------------------------------------------

    def send(self, node: BNode, sock: int, data: bytes, dst: Address, pool: int) -> None:
        self.sent.append(Sent(self.now, node.name, sock, dst, pool))
        if self.cut:
            return
        src = (node.nat.ip, node.nat.outbound(sock, dst))
        peer = next((n for n in self.nodes.values() if n.nat.ip == dst[0]), None)
        if peer is None or peer.engine.state == "stopped":
            return
        to = peer.nat.inbound(dst[1], src)
        if to is None:
            self.filtered += 1
            return
        if to == peer.main:
            peer.engine.receive_datagram(data, src, self.now)
            return
        index = next((i for i, s in peer.pool.items() if s == to), None)
        if index is not None:
            peer.engine.receive_datagram(data, src, self.now, pool=index)
        # else: a closed socket

    def flush(self) -> None:
        """Move every datagram, command and event until nothing moves."""
        moved = True
        while moved:
            moved = False
            for node in list(self.nodes.values()):
                eng = node.engine
                for data, addr in eng.datagrams_to_send(self.now):
                    moved = True
                    self.send(node, node.main, data, addr, 0)
                while (cmd := eng.next_command()) is not None:
                    moved = True
                    node.commands.append(cmd)
                    self._command(node, cmd)
                while (event := eng.next_event()) is not None:
                    node.events.append(event)

    def _command(self, node: BNode, cmd: object) -> None:
        eng = node.engine
        if isinstance(cmd, DiscoverEndpoint):
            port = node.nat.outbound(node.main, STUN)
            eng.discovered((node.nat.ip, port), [], self.now, nat=node.hint)
        elif isinstance(cmd, SendToRendezvous) and isinstance(cmd.message, UpdateUdpEndpoint):
            node.reported = cmd.message
        elif isinstance(cmd, RelayDatagram) and self.relay_on and cmd.to in self.nodes:
            dst = self.nodes[cmd.to]
            msg = RelayIn.model_validate({"from": node.name, "data": encode_relay_data(cmd.data)})
            dst.engine.receive_rendezvous(msg, self.now)
        elif isinstance(cmd, OpenSocketPool):
            assert not node.pool, "a second pool while one is open"
            node.pool = {i: next(self.sockets) for i in range(1, cmd.count + 1)}
        elif isinstance(cmd, SendFromPool):
            sock = node.pool.get(cmd.index)
            if sock is not None:
                self.send(node, sock, cmd.data, cmd.addr, cmd.index)
        elif isinstance(cmd, AdoptPoolSocket):
            # The contract: nothing leaves by the old socket until pool_socket_adopted.
            assert eng.datagrams_to_send(self.now) == []
            self.held_checked += 1
            node.main = node.pool[cmd.index]
            node.pool = {}
            eng.pool_socket_adopted(cmd.index, self.now)
        elif isinstance(cmd, ClosePool):
            node.pool = {}

    def run(self, seconds: float) -> None:
        """Jump the clock from timer to timer for ``seconds``."""
        run_timers(self, seconds)

    def run_until(self, cond: object, limit: float) -> None:
        """Run in small steps until ``cond()`` holds (at most ``limit`` seconds)."""
        end = self.now + limit
        while self.now < end and not cond():  # type: ignore[operator]
            self.run(0.05)
