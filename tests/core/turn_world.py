"""Two link engines behind in-memory NATs with a TURN server on the public side (issue 17).

:class:`TurnWorld` is :class:`~tests.core.nat_world.NatWorld` plus :class:`MiniTurn`, a small
TURN server (RFC 8656: long-term credentials with the 401 round, Allocate, Refresh,
CreatePermission, ChannelBind, Send/Data indications and ChannelData; permissions by peer IP)
and a fake rendezvous that passes ``candidates`` messages on.  ``block_direct`` drops every
datagram between the two nodes' NATs (the direct path) while the TURN server stays reachable;
``turn_open`` makes the server relay from peers without a permission (a hostile or broken
server).  Just enough to drive the engine; the simulator's TURN server is the full model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2plab.core.link import CloseTurnTcp, LinkConfig, OpenTurnTcp, SendToRendezvous, SendTurnTcp
from p2plab.core.signaling import CandidatesIn, CandidatesOut, NatHint, TurnOffer
from p2plab.core.stun import Class, Message, Method, long_term_key, parse_message
from p2plab.core.turn import decode_channel_data, encode_channel_data
from tests.core.nat_world import Address, BNode, NatWorld, Sent

TURN_IP = "203.0.113.50"
TURN: Address = (TURN_IP, 3478)
REALM = "p2plab"
PASSWORD = "pw"


def turn_offer(name: str, urls: list[str] | None = None) -> TurnOffer:
    return TurnOffer(
        urls=urls or [f"turn:{TURN_IP}:3478?transport=udp"],
        username=f"9999999999:{name}",
        password=PASSWORD,
        ttl_s=600,
    )


@dataclass
class Alloc:
    client: Address
    relayed: Address
    perms: set[str] = field(default_factory=set)
    channels: dict[int, Address] = field(default_factory=dict)

    def channel_of(self, peer: Address) -> int | None:
        return next((c for c, p in self.channels.items() if p == peer), None)


class MiniTurn:
    """A TURN server at :data:`TURN` (see the module docstring)."""

    def __init__(self) -> None:
        self.allocs: dict[Address, Alloc] = {}
        self.by_port: dict[int, Alloc] = {}
        self.next_port = 50000
        self.open = False
        self.tcp: set[Address] = set()  # clients on a TCP connection (ChannelData padded)
        self.unpermitted = 0
        self.relayed = 0
        self.key = b""

    def from_client(self, data: bytes, client: Address) -> list[tuple[bytes, Address, Address]]:
        """(data, from, to) to send for a datagram from ``client`` to the server."""
        alloc = self.allocs.get(client)
        if data and data[0] >> 6 == 1:
            if alloc is None:
                return []
            channel, payload = decode_channel_data(data)
            peer = alloc.channels.get(channel)
            return self._to_peer(alloc, peer, payload)
        msg = parse_message(data)
        if msg.message_class is Class.INDICATION and msg.message_method is Method.SEND:
            if alloc is None:
                return []
            peer = msg.attributes.get("XOR-PEER-ADDRESS")
            return self._to_peer(alloc, peer, msg.attributes.get("DATA", b""))
        if msg.message_class is not Class.REQUEST:
            return []
        if "MESSAGE-INTEGRITY" not in msg.attributes:
            return [(self._error(msg, 401), TURN, client)]
        key = long_term_key(str(msg.attributes.get("USERNAME")), REALM, PASSWORD)
        parse_message(data, key)  # raises on a bad one: a test bug
        attrs: dict[str, Any] = {}
        method = msg.message_method
        if method is Method.ALLOCATE:
            if alloc is None:
                alloc = Alloc(client, (TURN_IP, self.next_port))
                self.next_port += 1
                self.allocs[client] = alloc
                self.by_port[alloc.relayed[1]] = alloc
            attrs = {"XOR-RELAYED-ADDRESS": alloc.relayed, "XOR-MAPPED-ADDRESS": client}
            attrs["LIFETIME"] = 600
        elif alloc is None:
            return [(self._error(msg, 437), TURN, client)]
        elif method is Method.REFRESH:
            lifetime = msg.attributes.get("LIFETIME", 600)
            if lifetime == 0:
                del self.allocs[client]
                del self.by_port[alloc.relayed[1]]
            attrs = {"LIFETIME": lifetime}
        elif method is Method.CREATE_PERMISSION:
            alloc.perms.add(msg.attributes["XOR-PEER-ADDRESS"][0])
        elif method is Method.CHANNEL_BIND:
            peer = msg.attributes["XOR-PEER-ADDRESS"]
            alloc.channels[msg.attributes["CHANNEL-NUMBER"]] = peer
            alloc.perms.add(peer[0])
        reply = Message(method, Class.RESPONSE, msg.transaction_id, attrs)
        reply.add_message_integrity(key)
        return [(bytes(reply), TURN, client)]

    def from_peer(
        self, data: bytes, peer: Address, port: int
    ) -> list[tuple[bytes, Address, Address]]:
        """(data, from, to) to send for a datagram from ``peer`` to relayed port ``port``."""
        alloc = self.by_port.get(port)
        if alloc is None:
            return []
        if peer[0] not in alloc.perms and not self.open:
            self.unpermitted += 1
            return []
        self.relayed += 1
        channel = alloc.channel_of(peer)
        if channel is not None:
            pad = alloc.client in self.tcp
            return [(encode_channel_data(channel, data, pad=pad), TURN, alloc.client)]
        ind = Message(
            Method.DATA, Class.INDICATION, bytes(12), {"XOR-PEER-ADDRESS": peer, "DATA": data}
        )
        return [(bytes(ind), TURN, alloc.client)]

    def _to_peer(
        self, alloc: Alloc, peer: Any, data: bytes
    ) -> list[tuple[bytes, Address, Address]]:
        if not isinstance(peer, tuple) or peer[0] not in alloc.perms:
            self.unpermitted += 1
            return []
        self.relayed += 1
        return [(data, alloc.relayed, peer)]

    def _error(self, msg: Message, code: int) -> bytes:
        attrs = {"ERROR-CODE": (code, "err"), "REALM": REALM, "NONCE": "n1"}
        return bytes(Message(msg.message_method, Class.ERROR, msg.transaction_id, attrs))


class TurnWorld(NatWorld):
    """NatWorld with :class:`MiniTurn` and a rendezvous that forwards ``candidates``."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__(seed)
        self.turn = MiniTurn()
        self.block_direct = False
        self.blocked = 0
        self.candidates_out: list[tuple[str, CandidatesOut]] = []
        self.forward_candidates = True
        self.tcp_clients: dict[Address, BNode] = {}  # a node's TURN TCP connection, by its name
        self.turn_udp_blocked = False  # UDP to the TURN server is dropped (TCP gets through)

    def add_node(self, name: str, kind: str, config: LinkConfig | None = None) -> BNode:
        return self.add(name, kind, NatHint(), config or LinkConfig())

    def pair_turn(self, a: BNode, b: BNode, **extra: dict[str, object]) -> None:
        """Pair ``a`` (controlling) and ``b`` with TURN in both offers."""
        offers: dict[str, dict[str, object]] = {
            n.name: {"turn": turn_offer(n.name), **extra.get(n.name, {})} for n in (a, b)
        }
        self.pair(a, b, **offers)

    def send(self, node: BNode, sock: int, data: bytes, dst: Address, pool: int) -> None:
        if dst[0] != TURN_IP:
            if self.block_direct:
                self.sent.append(Sent(self.now, node.name, sock, dst, pool))
                self.blocked += 1
                return
            super().send(node, sock, data, dst, pool)
            return
        self.sent.append(Sent(self.now, node.name, sock, dst, pool))
        if self.turn_udp_blocked:
            return
        src = (node.nat.ip, node.nat.outbound(sock, dst))
        if dst == TURN:
            out = self.turn.from_client(data, src)
        else:
            out = self.turn.from_peer(data, src, dst[1])
        for payload, frm, to in out:
            self.deliver(payload, frm, to)

    def deliver(self, data: bytes, src: Address, dst: Address) -> None:
        """A datagram from the TURN server's side to a node's public address."""
        if dst[0] == TURN_IP:  # relayed address to relayed address, inside the server
            for payload, frm, to in self.turn.from_peer(data, src, dst[1]):
                self.deliver(payload, frm, to)
            return
        tcp = self.tcp_clients.get(dst)
        if tcp is not None:
            tcp.engine.turn_tcp_received(data, self.now)
            return
        if self.turn_udp_blocked and src[0] == TURN_IP:
            return
        peer = next((n for n in self.nodes.values() if n.nat.ip == dst[0]), None)
        if peer is None or peer.engine.state == "stopped":
            return
        to = peer.nat.inbound(dst[1], src)
        if to is None:
            self.filtered += 1
            return
        if to == peer.main:
            peer.engine.receive_datagram(data, src, self.now)

    def _command(self, node: BNode, cmd: object) -> None:
        if isinstance(cmd, SendToRendezvous) and isinstance(cmd.message, CandidatesOut):
            msg = cmd.message
            self.candidates_out.append((node.name, msg))
            dst = self.nodes.get(msg.to)
            if self.forward_candidates and dst is not None:
                fwd = CandidatesIn.model_validate(
                    {"from": node.name, "candidates": [c.model_dump() for c in msg.candidates]}
                )
                dst.engine.receive_rendezvous(fwd, self.now)
            return
        client = (node.nat.ip, 1)  # stands for the node's TCP connection to the server
        if isinstance(cmd, OpenTurnTcp):
            assert (cmd.host, cmd.port) == TURN
            self.tcp_clients[client] = node
            self.turn.tcp.add(client)
            node.engine.turn_tcp_connected(self.now)
            return
        if isinstance(cmd, SendTurnTcp):
            if client in self.tcp_clients:
                for payload, frm, to in self.turn.from_client(cmd.data, client):
                    self.deliver(payload, frm, to)
            return
        if isinstance(cmd, CloseTurnTcp):
            self.tcp_clients.pop(client, None)
            return
        super()._command(node, cmd)
