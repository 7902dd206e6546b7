"""Helpers for the STUN tests: a raw UDP client on loopback and free-port pickers."""

from __future__ import annotations

import asyncio
import os
import socket

from p2plab.core.stun import Message, parse_message

Address = tuple[str, int]


class RawClient:
    """A plain non-blocking UDP socket that collects every datagram it receives."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((host, 0))
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        self.loop.add_reader(self.sock.fileno(), self._readable)

    @property
    def address(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return (host, port)

    def _readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self.queue.put_nowait((data, (addr[0], addr[1])))

    def send(self, data: bytes, addr: Address) -> None:
        self.sock.sendto(data, addr)

    async def recv(self, wait: float) -> tuple[bytes, Address]:
        return await asyncio.wait_for(self.queue.get(), wait)

    async def request(
        self, message: Message, addr: Address, wait: float = 2.0
    ) -> tuple[Message, Address]:
        """Send and wait for the reply with the same transaction id (one retransmit a second)."""
        deadline = self.loop.time() + wait
        while True:
            self.send(bytes(message), addr)
            try:
                data, src = await self.recv(min(1.0, max(0.01, deadline - self.loop.time())))
            except TimeoutError:
                if self.loop.time() >= deadline:
                    raise
                continue
            reply = parse_message(data)
            if reply.transaction_id == message.transaction_id:
                return reply, src

    async def silence(self, duration: float) -> list[tuple[bytes, Address]]:
        """Everything that arrives within ``duration`` seconds."""
        await asyncio.sleep(duration)
        got = []
        while not self.queue.empty():
            got.append(self.queue.get_nowait())
        return got

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def free_udp_port_pair(hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")) -> int:
    """A port P such that P and P+1 are free for UDP (and TCP) on every host (best effort)."""
    for _ in range(200):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind((hosts[0], 0))
        port = probe.getsockname()[1]
        probe.close()
        if port >= 65534:
            continue
        held: list[socket.socket] = []
        try:
            for host in hosts:
                for p in (port, port + 1):
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        s = socket.socket(socket.AF_INET, kind)
                        held.append(s)
                        s.bind((host, p))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return port
    raise RuntimeError("no free port pair found")


def udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` (coturn listens on both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise AssertionError(f"no port free for both UDP and TCP on {host}")
