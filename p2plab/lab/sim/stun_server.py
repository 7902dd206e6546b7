"""The simulator's STUN server: the core Binding responder on two IPs x two ports of one
simulated host (RFC 5780 section 6), the same responder ``p2plab stun-server`` runs."""

from __future__ import annotations

from collections.abc import Callable

from p2plab.core.stun_server import Slot, StunResponder
from p2plab.lab.simnet import Address, Host, SimSocket

__all__ = ["SIM_STUN_SOFTWARE", "SimStunServer"]

#: The SOFTWARE attribute of the simulated server's answers.
SIM_STUN_SOFTWARE = "p2plab simulated STUN"


class SimStunServer:
    """A STUN server on ``ips`` x ``ports`` of ``host``: simulated sockets and the core
    :class:`~p2plab.core.stun_server.StunResponder`."""

    def __init__(self, host: Host, ips: tuple[str, str], ports: tuple[int, int]) -> None:
        self.host = host
        self.ips = ips
        self.ports = ports
        self.sockets: dict[Slot, SimSocket] = {}
        for i, ip in enumerate(ips):
            for j, port in enumerate(ports):
                sock = host.bind(port, ip)
                sock.on_datagram = self._handler((i, j))
                self.sockets[(i, j)] = sock
        self.responder = StunResponder(
            {slot: sock.address for slot, sock in self.sockets.items()},
            software=SIM_STUN_SOFTWARE,
            # No rate limit: virtual time and many simulated peers behind one NAT address
            # would make it part of the NAT behaviour the simulator measures.
            rate_per_s=None,
        )

    @property
    def primary(self) -> Address:
        return (self.ips[0], self.ports[0])

    @property
    def other(self) -> Address:
        return (self.ips[1], self.ports[1])

    @property
    def stats(self) -> dict[str, int]:
        """The responder's counters (requests, dropped junk)."""
        return self.responder.stats

    def _handler(self, slot: Slot) -> Callable[[bytes, Address], None]:
        def on_datagram(data: bytes, addr: Address) -> None:
            reply = self.responder.handle_datagram(data, slot, addr)
            if reply is not None:
                self.sockets[reply.slot].sendto(reply.data, reply.destination)

        return on_datagram
