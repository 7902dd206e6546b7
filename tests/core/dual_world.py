"""Two link engines on dual-stack sites, on a fake clock (issues 18 and 19's core tests).

Each node has one UDP socket per family, like the worker (the engine sees plain ``(ip, port)``
tuples; an IPv6 one goes out of the IPv6 socket):

* **IPv4** behind a NAT of ``nat_world``'s kinds (``easy``: port-restricted cone, ``hard``:
  symmetric), optionally with a **port mapping** its NAT granted on request: anything sent to
  the mapped port reaches the node's socket, and replies to those senders leave from the mapped
  port (the conntrack entry of the mapping's DNAT, as miniupnpd's rules make it).
* **IPv6** (optional) with no NAT and a stateful firewall: ``open``, ``apdf`` (only addresses
  the node sent to get in: conntrack only) or ``closed`` (nothing gets in).

Discovery answers with the IPv4 socket's mapping towards a STUN server and the node's IPv6
address as a LAN candidate; the test then plays the driver's ``set_endpoint6`` and
``set_port_mapping``.  The fake rendezvous pairs two nodes with offers made of their last
``update_udp_endpoint``, as the real one does, and like it sends a paired node's peer a fresh
offer when the node's port mapping or IPv6 endpoint changes.  Every datagram sent is logged
with its time.
"""

from __future__ import annotations

import base64
import itertools
import random
from dataclasses import dataclass, field

from p2plab.core import events as ev
from p2plab.core.crypto import Identity
from p2plab.core.link import (
    DiscoverEndpoint,
    LinkConfig,
    LinkEngine,
    RelayDatagram,
    SendToRendezvous,
)
from p2plab.core.signaling import (
    Candidate,
    Challenge,
    P2PConnectionOffer,
    PortMapping,
    Registered,
    RelayIn,
    UpdateUdpEndpoint,
    encode_relay_data,
)
from tests.core.engine_clock import run_timers
from tests.core.nat_world import STUN, Nat

Address = tuple[str, int]


@dataclass
class Sent:
    """One datagram a node sent."""

    at: float
    node: str
    dst: Address
    delivered: bool


@dataclass
class DNode:
    """One engine, its NAT, its port mapping, its IPv6 address and firewall."""

    name: str
    engine: LinkEngine
    nat: Nat
    v6: Address | None
    firewall: str = "open"  # "open", "apdf" or "closed"
    mapped_port: int | None = None
    mapping_peers: set[Address] = field(default_factory=set)  # came in through the mapping
    fw_allowed: set[Address] = field(default_factory=set)  # IPv6 destinations sent to
    events: list[ev.Event] = field(default_factory=list)
    reported: UpdateUdpEndpoint | None = None
    sock: int = 1

    def of(self, kind: type[ev.Event]) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def mapped(self) -> Address | None:
        return (self.nat.ip, self.mapped_port) if self.mapped_port is not None else None


class DualWorld:
    """A fake clock, dual-stack sites and a fake rendezvous."""

    def __init__(self, seed: int = 1) -> None:
        self.now = 100.0
        self.rng = random.Random(seed)
        self.nodes: dict[str, DNode] = {}
        self.sockets = itertools.count(1)
        self.sent: list[Sent] = []
        self.relay_on = True
        self.partner: dict[str, tuple[str, str]] = {}  # name -> (peer, the peer's role)

    def add(
        self,
        name: str,
        kind: str,
        config: LinkConfig,
        *,
        v6: str | None = None,
        firewall: str = "open",
    ) -> DNode:
        n = len(self.nodes) + 1
        nat = Nat(f"198.51.100.{n}", kind, random.Random(self.rng.random()))
        rand = random.Random(name).randbytes
        engine = LinkEngine(name, config=config, identity=Identity.generate(rand), rand_bytes=rand)
        addr6 = (v6, 5000 + n) if v6 is not None else None
        node = DNode(name, engine, nat, addr6, firewall, sock=next(self.sockets))
        self.nodes[name] = node
        engine.start(self.now)
        engine.rendezvous_up(self.now)
        server = Identity.generate(random.Random("server").randbytes)
        nonce = base64.b64encode(bytes(32)).decode()
        engine.receive_rendezvous(Challenge(nonce=nonce, server_key=server.public_b64), self.now)
        engine.receive_rendezvous(Registered(worker_id=name, observed_ip=nat.ip), self.now)
        self.flush()
        assert engine.state == "waiting_for_peer", engine.state
        if addr6 is not None:
            engine.set_endpoint6(addr6, self.now)  # STUN over IPv6: no NAT, the host's own
            self.flush()
        return node

    def map_port(self, node: DNode, port: int, protocol: str = "nat-pmp") -> PortMapping:
        """The node's NAT grants a mapping of ``port``; the driver tells the engine."""
        node.mapped_port = port
        mapping = PortMapping(protocol=protocol, ip=node.nat.ip, port=port, lifetime_s=7200)  # type: ignore[arg-type]
        node.engine.set_port_mapping(mapping, self.now)
        self.flush()
        return mapping

    def offer_for(self, peer: DNode, role: str) -> P2PConnectionOffer:
        """The offer about ``peer``, from its last ``update_udp_endpoint`` (as the rendezvous
        builds it)."""
        rep = peer.reported
        assert rep is not None
        cands = [Candidate(ip=rep.udp_ip, port=rep.udp_port), *rep.local_candidates]
        return P2PConnectionOffer(
            peer_worker_id=peer.name,
            peer_udp_ip=rep.udp_ip,
            peer_udp_port=rep.udp_port,
            peer_candidates=cands,
            role=role,  # type: ignore[arg-type]
            peer_public_key=peer.engine.identity.public_b64,  # type: ignore[union-attr]
            peer_nat=rep.nat,
            peer_mapped=rep.mapped,
            peer_udp6=rep.udp6,
        )

    def pair(self, a: DNode, b: DNode) -> None:
        """The fake rendezvous pairs ``a`` (controlling) and ``b``."""
        offers = [(a, self.offer_for(b, "controlling")), (b, self.offer_for(a, "controlled"))]
        self.partner[a.name] = (b.name, "controlled")
        self.partner[b.name] = (a.name, "controlling")
        for me, offer in offers:
            me.engine.receive_rendezvous(offer, self.now)
        self.flush()

    # -- the network --------------------------------------------------------------------------

    def send(self, node: DNode, data: bytes, dst: Address) -> None:
        delivered = self._deliver(node, data, dst)
        self.sent.append(Sent(self.now, node.name, dst, delivered))

    def _deliver(self, node: DNode, data: bytes, dst: Address) -> bool:
        if ":" in dst[0]:
            if node.v6 is None:
                return False  # no IPv6 route
            node.fw_allowed.add(dst)
            peer = next((n for n in self.nodes.values() if n.v6 == dst), None)
            if peer is None or peer.engine.state == "stopped" or peer.firewall == "closed":
                return False
            if peer.firewall == "apdf" and node.v6 not in peer.fw_allowed:
                return False
            peer.engine.receive_datagram(data, node.v6, self.now)
            return True
        if node.mapped_port is not None and dst in node.mapping_peers:
            src = (node.nat.ip, node.mapped_port)  # a reply through the mapping's conntrack
        else:
            src = (node.nat.ip, node.nat.outbound(node.sock, dst))
        peer = next((n for n in self.nodes.values() if n.nat.ip == dst[0]), None)
        if peer is None or peer.engine.state == "stopped":
            return False
        if peer.mapped_port is not None and dst[1] == peer.mapped_port:
            peer.mapping_peers.add(src)  # open to anyone: that is what the mapping is for
        elif peer.nat.inbound(dst[1], src) != peer.sock:
            return False
        peer.engine.receive_datagram(data, src, self.now)
        return True

    def flush(self) -> None:
        """Move every datagram, command and event until nothing moves."""
        moved = True
        while moved:
            moved = False
            for node in list(self.nodes.values()):
                eng = node.engine
                for data, addr in eng.datagrams_to_send(self.now):
                    moved = True
                    self.send(node, data, addr)
                while (cmd := eng.next_command()) is not None:
                    moved = True
                    self._command(node, cmd)
                while (event := eng.next_event()) is not None:
                    node.events.append(event)

    def _command(self, node: DNode, cmd: object) -> None:
        eng = node.engine
        if isinstance(cmd, DiscoverEndpoint):
            public = (node.nat.ip, node.nat.outbound(node.sock, STUN))
            lan = [node.v6] if node.v6 is not None else []
            eng.discovered(public, lan, self.now)
        elif isinstance(cmd, SendToRendezvous) and isinstance(cmd.message, UpdateUdpEndpoint):
            old, node.reported = node.reported, cmd.message
            moved = old is not None and (old.mapped, old.udp6) != (
                cmd.message.mapped,
                cmd.message.udp6,
            )
            if moved and node.name in self.partner:
                peer, role = self.partner[node.name]
                self.nodes[peer].engine.receive_rendezvous(self.offer_for(node, role), self.now)
        elif isinstance(cmd, RelayDatagram) and self.relay_on and cmd.to in self.nodes:
            dst = self.nodes[cmd.to]
            msg = RelayIn.model_validate({"from": node.name, "data": encode_relay_data(cmd.data)})
            dst.engine.receive_rendezvous(msg, self.now)

    def run(self, seconds: float) -> None:
        """Jump the clock from timer to timer for ``seconds``."""
        run_timers(self, seconds)
