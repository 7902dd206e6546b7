"""The simulator's STUN server: a Binding responder on two IPs x two ports of one simulated host."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from p2plab.core.stun import CHANGE_IP, CHANGE_PORT, Class, Message, Method, parse_message
from p2plab.errors import P2PLabError
from p2plab.lab.simnet import Address, Host, SimSocket

__all__ = ["SimStunServer"]


class SimStunServer:
    """A STUN Binding responder on two IPs x two ports (RFC 5780 section 6)."""

    def __init__(self, host: Host, ips: tuple[str, str], ports: tuple[int, int]) -> None:
        self.host = host
        self.ips = ips
        self.ports = ports
        self.stats: Counter[str] = Counter()
        self.sockets: dict[tuple[int, int], SimSocket] = {}
        for i, ip in enumerate(ips):
            for j, port in enumerate(ports):
                sock = host.bind(port, ip)
                sock.on_datagram = self._handler(i, j)
                self.sockets[(i, j)] = sock

    @property
    def primary(self) -> Address:
        return (self.ips[0], self.ports[0])

    @property
    def other(self) -> Address:
        return (self.ips[1], self.ports[1])

    def _handler(self, i: int, j: int) -> Callable[[bytes, Address], None]:
        def on_datagram(data: bytes, addr: Address) -> None:
            self._handle(i, j, data, addr)

        return on_datagram

    def _handle(self, i: int, j: int, data: bytes, addr: Address) -> None:
        try:
            request = parse_message(data)
        except P2PLabError:
            self.stats["malformed_dropped"] += 1
            return
        if request.message_method != Method.BINDING or request.message_class != Class.REQUEST:
            self.stats["not_request_dropped"] += 1
            return
        self.stats["requests"] += 1
        change = int(request.attributes.get("CHANGE-REQUEST", 0))
        ti = i ^ (1 if change & CHANGE_IP else 0)
        tj = j ^ (1 if change & CHANGE_PORT else 0)
        target = self.sockets[(ti, tj)]
        response = Message(Method.BINDING, Class.RESPONSE, request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        response.attributes["RESPONSE-ORIGIN"] = target.address
        other = self.sockets[(i ^ 1, j ^ 1)].address
        response.attributes["OTHER-ADDRESS"] = other
        response.attributes["SOFTWARE"] = "p2plab simulated STUN"
        response.add_fingerprint()
        target.sendto(bytes(response), addr)
