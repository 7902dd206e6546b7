"""A tiny NAT-PMP/PCP gateway for tests (sans-I/O): answers like miniupnpd would, in memory
(tests/core) or behind a loopback UDP socket (tests/aio)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast

from p2plab.core import natpmp, pcp
from p2plab.errors import PortMapError


@dataclass
class FakeGateway:
    """Grants UDP mappings from :attr:`next_port` on; :meth:`reboot` forgets them."""

    answers_pmp: bool = True
    answers_pcp: bool = True
    ext_ip: str = "198.51.100.7"
    next_port: int = 40000
    max_lifetime: int = 7200
    pmp_result: int = 0
    booted_at: float = 0.0
    mappings: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    """internal port -> (external port, PCP nonce or b"")."""
    requests: list[bytes] = field(default_factory=list)

    def reboot(self, now: float) -> None:
        self.booted_at = now
        self.mappings.clear()

    def epoch(self, now: float) -> int:
        return int(now - self.booted_at)

    def answer(self, data: bytes, now: float) -> bytes | None:
        self.requests.append(data)
        try:
            if data[:1] == b"\x02":
                return self._pcp(pcp.parse_request(data), now) if self.answers_pcp else None
            req = natpmp.parse_request(data)
        except PortMapError:
            return None
        return self._pmp(req, now) if self.answers_pmp else None

    def _grant(self, internal: int, nonce: bytes) -> int:
        if internal in self.mappings:  # a renewal keeps the port
            return self.mappings[internal][0]
        port, self.next_port = self.next_port, self.next_port + 1
        self.mappings[internal] = (port, nonce)
        return port

    def _pmp(self, req: natpmp.Request, now: float) -> bytes:
        if isinstance(req, natpmp.ExternalAddressRequest):
            return bytes(natpmp.ExternalAddressResponse(0, self.epoch(now), self.ext_ip))
        if self.pmp_result:
            return bytes(natpmp.MapResponse(req.opcode, self.pmp_result, self.epoch(now), 0, 0, 0))
        if req.lifetime_s == 0:
            self.mappings.pop(req.internal_port, None)
            return bytes(
                natpmp.MapResponse(req.opcode, 0, self.epoch(now), req.internal_port, 0, 0)
            )
        port = self._grant(req.internal_port, b"")
        life = min(req.lifetime_s, self.max_lifetime)
        return bytes(
            natpmp.MapResponse(req.opcode, 0, self.epoch(now), req.internal_port, port, life)
        )

    def _pcp(self, req: pcp.Request, now: float) -> bytes:
        if req.opcode == pcp.ANNOUNCE or req.map is None:
            return bytes(pcp.Response(pcp.ANNOUNCE, 0, 0, self.epoch(now)))
        m = req.map
        if req.lifetime_s == 0:
            if self.mappings.get(m.internal_port, (0, b""))[1] == m.nonce:
                del self.mappings[m.internal_port]
            return bytes(pcp.Response(pcp.MAP, 0, 0, self.epoch(now), m))
        port = self._grant(m.internal_port, m.nonce)
        body = pcp.MapData(m.nonce, m.protocol, m.internal_port, port, self.ext_ip)
        life = min(req.lifetime_s, self.max_lifetime)
        return bytes(pcp.Response(pcp.MAP, 0, life, self.epoch(now), body))


class GatewayProtocol(asyncio.DatagramProtocol):
    """The FakeGateway behind a UDP socket; ``mute`` drops every request."""

    def __init__(self, gw: FakeGateway) -> None:
        self.gw = gw
        self.mute = False
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        answer = None if self.mute else self.gw.answer(data, time.monotonic())
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)
