"""The birthday socket pool of one worker (issue 16): the I/O half of
:class:`~p2plab.core.link_commands.OpenSocketPool`, ``SendFromPool``, ``AdoptPoolSocket`` and
``ClosePool``.

A worker behind a NAT that maps per destination opens hundreds of extra sockets, each holding
one NAT mapping towards the peer, so that the peer's random probes have that many targets.
They are bound at once, synchronously, on the link socket's local address: each is a
:class:`~p2plab.aio.endpoint.UdpEndpoint` in its cheap ``pool`` form (no big buffers), and
binding 256 of them takes a few milliseconds of the loop.  The one that reaches the peer is
:meth:`~p2plab.aio.endpoint.UdpEndpoint.promote`'d to a full endpoint and becomes the worker's
socket; every other one is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from p2plab.aio.endpoint import Address, UdpEndpoint
from p2plab.core.link_commands import ClosePool, Command, OpenSocketPool, SendFromPool

__all__ = ["PoolHandler", "SocketPool"]

log = logging.getLogger(__name__)

PoolHandler = Callable[[int, bytes, Address], None]
"""Called with (pool index, datagram, source) for every non-STUN datagram of a pool socket."""


class SocketPool:
    """Pool sockets numbered 1..count; datagrams go to ``on_datagram`` with their index."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_datagram: PoolHandler) -> None:
        self._loop = loop
        self._on_datagram = on_datagram
        self._sockets: dict[int, UdpEndpoint] = {}
        self.stats: dict[str, int] = {"pool_opened": 0, "pool_bind_failures": 0}
        """Sockets bound and binds refused, over the worker's life."""

    def __len__(self) -> int:
        return len(self._sockets)

    def __contains__(self, index: object) -> bool:
        return index in self._sockets

    def open(self, host: str, count: int) -> int:
        """Bind pool sockets 1..``count`` on ``host`` (port 0), closing any earlier pool first;
        returns how many were bound.  A socket that cannot be bound (e.g. out of file
        descriptors) is left out; the first failure is logged, once per pool."""
        self.close()
        failed: list[OSError] = []
        for index in range(1, count + 1):
            try:
                ep = UdpEndpoint.bind_now(self._loop, host, 0, pool=True)
            except OSError as exc:
                failed.append(exc)
                continue
            ep.peer_handler = self._handler(index)
            self._sockets[index] = ep
        self.stats["pool_opened"] += len(self._sockets)
        if failed:
            self.stats["pool_bind_failures"] += len(failed)
            log.warning(
                "birthday pool: %d of %d sockets could not be bound on %s (first: %s)",
                len(failed),
                count,
                host,
                failed[0],
            )
        return len(self._sockets)

    def _handler(self, index: int) -> Callable[[bytes, Address], None]:
        on_datagram = self._on_datagram

        def handle(data: bytes, addr: Address) -> None:
            on_datagram(index, data, addr)

        return handle

    def sendto(self, index: int, data: bytes, addr: Address) -> bool:
        """Send from pool socket ``index``; False if it is gone or the OS refused."""
        ep = self._sockets.get(index)
        return ep is not None and ep.sendto(data, addr)

    def carry_out(self, cmd: Command, host: str) -> bool:
        """Do ``cmd`` if it is :class:`OpenSocketPool` (on ``host``), :class:`SendFromPool` or
        :class:`ClosePool`; returns whether it was one of them."""
        if isinstance(cmd, SendFromPool):
            self.sendto(cmd.index, cmd.data, cmd.addr)
        elif isinstance(cmd, OpenSocketPool):
            self.open(host, cmd.count)
        elif isinstance(cmd, ClosePool):
            self.close()
        else:
            return False
        return True

    def take(self, index: int, like: UdpEndpoint | None = None) -> UdpEndpoint | None:
        """Pool socket ``index`` as a full endpoint set up ``like`` the one it replaces (its
        handlers are the caller's to set), every other pool socket closed; None if it is gone
        (the whole pool is closed then too)."""
        ep = self._sockets.pop(index, None)
        self.close()
        if ep is None:
            return None
        ep.peer_handler = None
        return ep.promote(like)

    def local_addresses(self) -> list[Address]:
        """Where the open pool sockets are bound (tests and logs)."""
        return [ep.local_address for ep in self._sockets.values()]

    def close(self) -> None:
        """Close every pool socket."""
        sockets, self._sockets = self._sockets, {}
        for ep in sockets.values():
            ep.close()
