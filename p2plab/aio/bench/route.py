"""Benchmark runs over the paths the engine carries (issue 17): TURN through our own allocation
and the rendezvous WebSocket relay.

On the direct path, and towards the peer's TURN relayed address (a real UDP address: the
datagrams leave the link socket as on the direct path), a run sends straight from the worker's
:class:`~p2plab.aio.endpoint.UdpEndpoint`.  When the link's peer address is a pseudo-address
(:func:`p2plab.core.paths.turn_address` for a path through our allocation,
:data:`p2plab.core.paths.RELAY_ADDRESS` for the relay), only the engine can reach it:
:class:`Routed` stands in for the endpoint and hands each batch to ``worker.send_bench`` (the
engine wraps it as ChannelData, or one relay message per datagram).  Datagrams that come back
that way reach the run through :func:`deliver` (the worker drains the engine's queue after each
input), exactly as if the endpoint's fast path had read them.

The relay carries at most the rendezvous's budgets (32 KiB/s and 50 messages/s per connection,
docs/protocol.md): a run over it is paced at :func:`relay_cap` at most (asked more, or "as fast
as possible", it is clamped and the row says so) and runs without credit
datagrams (one every 2 ms would spend the budget's message rate on flow control).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from p2plab.core.paths import RELAY_ADDRESS, parse_turn_address
from p2plab.core.signaling import MAX_RELAY_BYTES

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address, UdpEndpoint

__all__ = [
    "RELAY_MAX_MBPS",
    "RELAY_MAX_PPS",
    "Routed",
    "deliver",
    "is_pseudo",
    "relay_cap",
    "relay_clamp",
]

#: The fastest a benchmark runs over the rendezvous relay, in Mbit/s of UDP payload: 24 KiB/s,
#: under the 32 KiB/s per-connection budget with room for chat, keep-alives and the run's
#: control messages (base64 and JSON framing are not charged: the budget counts decoded bytes).
RELAY_MAX_MBPS = 24 * 1024 * 8 / 1e6
#: The most benchmark datagrams per second over the relay: the rendezvous takes 50 messages/s
#: per connection (and closes one that keeps exceeding it); the rest is for chat and control.
RELAY_MAX_PPS = 30


def is_pseudo(addr: object) -> bool:
    """Whether ``addr`` is reachable only through the engine (our TURN allocation, the relay)."""
    return addr == RELAY_ADDRESS or parse_turn_address(addr) is not None


def relay_cap(payload_size: int) -> float:
    """The fastest a run of ``payload_size`` datagrams goes over the relay, in Mbit/s: the
    byte budget (:data:`RELAY_MAX_MBPS`) or the message budget (:data:`RELAY_MAX_PPS`)."""
    return min(RELAY_MAX_MBPS, RELAY_MAX_PPS * payload_size * 8 / 1e6)


def relay_clamp(rate_mbps: float, payload_size: int) -> tuple[float, str]:
    """The rate a run over the relay uses, and the row's note when it differs from the asked.

    Raises ValueError for datagrams the relay never carries (over ``MAX_RELAY_BYTES``)."""
    if payload_size > MAX_RELAY_BYTES:
        raise ValueError(
            f"payload_size {payload_size} > {MAX_RELAY_BYTES}: the rendezvous relay carries "
            "no larger datagrams"
        )
    cap = relay_cap(payload_size)
    if 0 < rate_mbps <= cap:
        return rate_mbps, ""
    asked = "as fast as possible" if rate_mbps <= 0 else f"{rate_mbps:g} Mbit/s"
    return cap, (
        f"relay budget: paced at {cap:.3f} Mbit/s ({asked} asked; the rendezvous relays "
        "32 KiB/s and 50 messages/s per connection)"
    )


def deliver(
    ep: UdpEndpoint | None, datagrams: list[tuple[bytes, Address]]
) -> list[tuple[bytes, Address]]:
    """Hand benchmark datagrams that came through the engine to the run armed on ``ep`` (fast
    handlers, else the bulk sink in one batch); returns those no run took."""
    if ep is None:
        return datagrams
    return ep.fast.deliver(datagrams, time.monotonic_ns())


class Routed:
    """The endpoint as a run sees it when the peer is behind a pseudo-address: sends go through
    the worker's engine, everything else to the real endpoint."""

    def __init__(self, endpoint: UdpEndpoint, host: Any) -> None:
        self._ep = endpoint
        self._host = host

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ep, name)

    @property
    def socket(self) -> _RoutedSocket:
        """What the RTT run's ping-pong calls ``sendto`` on."""
        return _RoutedSocket(self)

    @property
    def gso(self) -> bool:
        return False  # a batch goes through the engine datagram by datagram

    def sendto(self, data: bytes, addr: Address) -> bool:
        return bool(self._host.send_bench([bytes(data)], addr))

    def send_segments(
        self, view: memoryview, size: int, n: int, addr: Address, *, gso: bool = False
    ) -> int:
        batch: Sequence[bytes] = [bytes(view[i * size : (i + 1) * size]) for i in range(n)]
        sent: int = self._host.send_bench(batch, addr)
        return n if sent else 0  # refused: the path is gone (the run ends on its own)

    async def wait_writable(self) -> None:
        await asyncio.sleep(0.005)  # the engine never blocks; back off a little


class _RoutedSocket:
    """``sock.sendto`` for the ping-pong (:mod:`p2plab.aio.bench.rtt`), through the engine."""

    def __init__(self, routed: Routed) -> None:
        self._routed = routed

    def sendto(self, data: bytes, addr: Address) -> int:
        if not self._routed.sendto(data, addr):
            raise OSError("the path to the peer is gone")
        return len(data)
