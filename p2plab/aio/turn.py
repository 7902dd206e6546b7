"""An asyncio driver for the sans-I/O :class:`~p2plab.core.turn.TurnClient` on its own socket.

:class:`TurnAllocation` opens a UDP socket (or a TCP connection) to one TURN server, allocates a
relayed address and then relays datagrams to and from peers::

    alloc = await TurnAllocation.open(parse_turn_url(url), username, password)
    await alloc.create_permission(peer_ip)        # or: await alloc.bind_channel(peer)
    alloc.send(peer, data)
    peer, data = await alloc.recv()
    await alloc.close()                           # Refresh with LIFETIME 0

Everything is bounded: ``open`` and every wait take a timeout and raise :class:`TurnError`
with the client's reason.  Host names in the URL are resolved with the loop's ``getaddrinfo``
(never blocking the loop).  Refreshes of the allocation, permissions and channels run by
themselves on the client's timer.  Received peer data waits in a bounded queue (or goes to
``on_data``); beyond the bound it is dropped and counted in :attr:`TurnAllocation.stats`.

The link engine drives the core client on the worker's shared socket instead; this driver is
for tools, benchmarks and tests that want a relay of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from p2plab.core.stun import Address
from p2plab.core.turn import (
    Allocated,
    AllocationFailed,
    ChannelBindFailed,
    ChannelBound,
    PeerData,
    PermissionCreated,
    PermissionFailed,
    Refreshed,
    Released,
    TurnClient,
    TurnEvent,
    TurnState,
)
from p2plab.core.turn_config import TurnServer
from p2plab.errors import P2PLabError

__all__ = ["DEFAULT_QUEUE", "TurnAllocation", "TurnError"]

log = logging.getLogger(__name__)

#: Peer datagrams held for :meth:`TurnAllocation.recv` before newer ones are dropped.
DEFAULT_QUEUE = 1024
_READ_SIZE = 65536


def _normal_ip(ip: str) -> str:
    """The canonical text of an IP literal, as the client's events name it."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise TurnError(f"not an IP address: {ip[:64]!r}") from None


class TurnError(P2PLabError):
    """A TURN allocation or request failed (refused, no answer, or timed out)."""


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: TurnAllocation) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner.feed(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from the server: the client's retransmissions decide.
        log.debug("TURN socket error: %r", exc)


class TurnAllocation:
    """One TURN allocation on its own socket (see the module docstring)."""

    def __init__(
        self,
        client: TurnClient,
        *,
        on_data: Callable[[Address, bytes], None] | None = None,
        queue_size: int = DEFAULT_QUEUE,
    ) -> None:
        self.client = client
        """The sans-I/O client this drives."""
        self.on_data = on_data
        """Called with ``(peer, data)`` for each relayed datagram instead of queueing it."""
        self.stats: dict[str, int] = {"queue_dropped": 0, "send_errors": 0}
        """The driver's own counters (the client's are in ``client.stats``)."""
        self._queue: asyncio.Queue[tuple[Address, bytes]] = asyncio.Queue(queue_size)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._allocated: asyncio.Future[Allocated] = asyncio.get_running_loop().create_future()
        self._released = asyncio.Event()
        self._waiters: dict[object, asyncio.Future[Any]] = {}
        self._failure: str | None = None

    @classmethod
    async def open(
        cls,
        server: TurnServer,
        username: str,
        password: str,
        *,
        timeout: float = 10.0,
        local_host: str | None = None,
        lifetime: int | None = None,
        on_data: Callable[[Address, bytes], None] | None = None,
    ) -> TurnAllocation:
        """Connect to ``server``, allocate, and return once the relayed address is known.

        Raises :class:`TurnError` when the server refuses, does not answer or cannot be
        reached within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(
                    server.host,
                    server.port,
                    type=socket.SOCK_DGRAM if server.transport == "udp" else socket.SOCK_STREAM,
                )
                family, _, _, _, sockaddr = infos[0]
                address = (str(sockaddr[0]), int(sockaddr[1]))
                client = TurnClient(
                    address,
                    username,
                    password,
                    rand_bytes=os.urandom,
                    transport=server.transport,
                    lifetime=lifetime,
                    software="p2plab",
                )
                self = cls(client, on_data=on_data)
                try:
                    await self._connect(family, local_host)
                    self._tasks.append(asyncio.create_task(self._timer_loop(), name="turn-timer"))
                    client.allocate(time.monotonic())
                    self._flush()
                    await self._allocated
                except BaseException:
                    self._abort()
                    raise
        except TimeoutError:
            raise TurnError(
                f"TURN server {server.url} did not allocate within {timeout} s"
            ) from None
        except OSError as exc:
            raise TurnError(f"TURN server {server.url} unreachable: {exc}") from None
        return self

    async def _connect(self, family: int, local_host: str | None) -> None:
        loop = asyncio.get_running_loop()
        server = self.client.server
        if self.client.transport == "udp":
            local = (local_host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=local, family=family
            )
            self._udp = transport
            return
        reader, writer = await asyncio.open_connection(
            server[0], server[1], local_addr=(local_host, 0) if local_host else None
        )
        self._tcp = writer
        self._tasks.append(asyncio.create_task(self._tcp_reader(reader), name="turn-tcp"))

    # -- properties ----------------------------------------------------------------------------

    @property
    def relayed(self) -> Address:
        """The relayed transport address peers send to."""
        assert self.client.relayed is not None
        return self.client.relayed

    @property
    def mapped(self) -> Address | None:
        """Our address as the TURN server saw it."""
        return self.client.mapped

    @property
    def local_address(self) -> Address:
        """The local address of our socket towards the server."""
        info = (
            self._udp.get_extra_info("sockname")
            if self._udp is not None
            else self._tcp.get_extra_info("sockname")
            if self._tcp is not None
            else None
        )
        return (str(info[0]), int(info[1])) if info else ("", 0)

    # -- commands ------------------------------------------------------------------------------

    async def create_permission(self, peer_ip: str, timeout: float = 10.0) -> None:
        """Let ``peer_ip`` send to us through the relay (and us to it); waits for the answer."""
        peer_ip = _normal_ip(peer_ip)
        if self.client.has_permission(peer_ip):
            return
        waiter = self._waiter(("perm", peer_ip))
        self.client.create_permission(peer_ip, time.monotonic())
        self._flush()
        await self._wait(waiter, timeout, f"CreatePermission for {peer_ip}")

    async def bind_channel(self, peer: Address, timeout: float = 10.0) -> int:
        """Bind a channel to ``peer`` (data then goes as ChannelData); its number."""
        peer = (_normal_ip(peer[0]), int(peer[1]))
        bound = self.client.bound_channel(peer)
        if bound is not None:
            return bound
        waiter = self._waiter(("chan", peer))
        self.client.bind_channel(peer, time.monotonic())
        self._flush()
        channel: int = await self._wait(waiter, timeout, f"ChannelBind to {peer[0]}:{peer[1]}")
        return channel

    async def refresh(self, timeout: float = 10.0) -> int:
        """Refresh the allocation now (it also refreshes by itself); the lifetime granted."""
        waiter = self._waiter("refresh")
        self.client.refresh(time.monotonic())
        self._flush()
        lifetime: int = await self._wait(waiter, timeout, "Refresh")
        return lifetime

    def send(self, peer: Address, data: bytes) -> None:
        """Relay ``data`` to ``peer`` (needs a permission or a channel for its IP)."""
        self.client.send(peer, data, time.monotonic())
        self._flush()

    async def recv(self, timeout: float = 10.0) -> tuple[Address, bytes]:
        """The next relayed datagram ``(peer, data)``; TurnError after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            raise TurnError(f"no relayed datagram within {timeout} s") from None

    async def close(self, timeout: float = 2.0) -> None:
        """Release the allocation (bounded wait for the answer), then close the socket."""
        if self.client.state in (TurnState.ALLOCATED, TurnState.ALLOCATING):
            self.client.release(time.monotonic())
            self._flush()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._released.wait()
        self._abort()

    # -- driver --------------------------------------------------------------------------------

    def feed(self, data: bytes, addr: Address) -> None:
        """Hand the client bytes from ``addr`` and act on what follows."""
        self.client.receive(data, addr, time.monotonic())
        self._flush()

    def _waiter(self, key: object) -> asyncio.Future[Any]:
        if self._failure is not None:
            raise TurnError(self._failure)
        old = self._waiters.get(key)
        if old is not None and not old.done():
            return old
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[key] = future
        return future

    async def _wait(self, waiter: asyncio.Future[Any], timeout: float, what: str) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(waiter)
        except TimeoutError:
            raise TurnError(f"{what}: no answer within {timeout} s") from None

    def _resolve(self, key: object, result: Any = None, error: str | None = None) -> None:
        future = self._waiters.pop(key, None)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(TurnError(error))

    def _flush(self) -> None:
        for data, _addr in self.client.datagrams_to_send(time.monotonic()):
            try:
                if self._udp is not None:
                    self._udp.sendto(data, self.client.server)
                elif self._tcp is not None:
                    self._tcp.write(data)
            except OSError:
                self.stats["send_errors"] += 1
        while (event := self.client.next_event()) is not None:
            self._on_event(event)
        self._wake.set()

    def _on_event(self, event: TurnEvent) -> None:
        if isinstance(event, PeerData):
            if self.on_data is not None:
                self.on_data(event.peer, event.data)
            else:
                try:
                    self._queue.put_nowait((event.peer, event.data))
                except asyncio.QueueFull:
                    self.stats["queue_dropped"] += 1
        elif isinstance(event, Allocated):
            if not self._allocated.done():
                self._allocated.set_result(event)
        elif isinstance(event, AllocationFailed):
            self._failure = event.reason
            if not self._allocated.done():
                self._allocated.set_exception(TurnError(event.reason))
            for key in list(self._waiters):
                self._resolve(key, error=event.reason)
            self._released.set()
        elif isinstance(event, PermissionCreated):
            self._resolve(("perm", event.peer_ip))
        elif isinstance(event, PermissionFailed):
            self._resolve(("perm", event.peer_ip), error=event.reason)
        elif isinstance(event, ChannelBound):
            self._resolve(("chan", event.peer), event.channel)
        elif isinstance(event, ChannelBindFailed):
            self._resolve(("chan", event.peer), error=event.reason)
        elif isinstance(event, Refreshed):
            self._resolve("refresh", event.lifetime)
        elif isinstance(event, Released):
            self._released.set()

    async def _timer_loop(self) -> None:
        while True:
            self._wake.clear()
            timer = self.client.get_timer()
            delay = None if timer is None else max(0.0, timer - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            now = time.monotonic()
            timer = self.client.get_timer()
            if timer is not None and now >= timer:
                self.client.handle_timer(now)
                self._flush()

    async def _tcp_reader(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                chunk = await reader.read(_READ_SIZE)
            except OSError:
                chunk = b""
            if not chunk:
                if self.client.state not in (TurnState.CLOSED, TurnState.FAILED):
                    self._failure = "the TCP connection to the TURN server closed"
                    for key in list(self._waiters):
                        self._resolve(key, error=self._failure)
                    if not self._allocated.done():
                        self._allocated.set_exception(TurnError(self._failure))
                self._released.set()
                return
            self.feed(chunk, self.client.server)

    def _abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
