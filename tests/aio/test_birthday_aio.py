"""Birthday punching between two real workers on loopback (issue 16): an easy side and a hard
side whose announced endpoint does not answer, so only a random probe that hits one of the hard
side's pool sockets can make the link.

The hard worker lives on 127.0.0.2 (the easy side's random probes never reach 127.0.0.1, where
other tests' sockets are), its pool ports come from the kernel's ephemeral range, which is the
easy side's ``port_range``.  Loopback has no NAT, so the test plays the two NATs' filters: the
easy worker drops datagrams from addresses it never sent to (port-restricted filtering), and the
hard worker's own socket hears nothing until a pool socket won (a symmetric NAT's mapping towards
the peer is not the one STUN saw).  The NAT hints are the ones discovery would have found.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2plab.aio import discovery
from p2plab.aio.endpoint import Address
from p2plab.aio.pool import SocketPool
from p2plab.aio.worker import Worker
from p2plab.config import BirthdayConfig
from p2plab.core.signaling import NatHint
from tests.aio.fake_rendezvous import FakeRendezvous, fake_rendezvous
from tests.conftest import until

HARD_IP = "127.0.0.2"
EASY = NatHint(mapping="endpoint-independent")
HARD = NatHint(mapping="endpoint-dependent")
T = 20.0


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port on HARD_IP where a socket is bound but never read: nothing answers there, and no
    pool socket can be given that port (a freed one could be, and would answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HARD_IP, 0))
        yield int(s.getsockname()[1])


def is_free(addr: Address) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(addr)
        except OSError:
            return False
        return True


@dataclasses.dataclass
class Hints:
    asked: list[bool] = dataclasses.field(default_factory=list)
    """Whether each discovery asked for the hint."""
    sequential: bool = False
    """The hard NAT allocates in order: its hint predicts the link socket's own port."""


@pytest.fixture
def hints(monkeypatch: pytest.MonkeyPatch) -> Hints:
    """Discovery answers with the hint a real NAT would have shown (hard on HARD_IP)."""
    seen = Hints()
    real = discovery.discover_endpoint

    async def with_hint(endpoint: Any, *args: Any, **kw: Any) -> discovery.Discovery:
        seen.asked.append(bool(kw.get("hint")))
        found = await real(endpoint, *args, **kw)
        host, port = endpoint.local_address
        nat, public = EASY, found.public
        if host == HARD_IP:
            # Its own public IP, as behind a NAT of its own (two workers behind one public IP
            # punch plainly over their LAN instead).
            nat, public = HARD, (HARD_IP, port)
            if seen.sequential:
                nat = NatHint(mapping=HARD.mapping, sequential=True, predicted_ports=[port])
        return dataclasses.replace(found, nat=nat, public=public)

    monkeypatch.setattr(discovery, "discover_endpoint", with_hint)
    return seen


@contextlib.asynccontextmanager
async def pair(rv: FakeRendezvous, **easy_birthday: Any) -> AsyncIterator[tuple[Worker, Worker]]:
    ports = ephemeral_range()
    hard = Worker(rv.config(udp_host=HARD_IP, birthday=BirthdayConfig(port_range=ports)))
    birthday = dict(port_range=ports, probe_budget=4096, probe_rate=1000.0)
    easy = Worker(rv.config(birthday=BirthdayConfig(**{**birthday, **easy_birthday})))
    await hard.start()
    await easy.start()
    try:
        await rv.ready(easy, hard, timeout=T)
        yield easy, hard
    finally:
        await easy.stop()
        await hard.stop()


def play_the_nats(easy: Worker, hard: Worker) -> None:
    """Port-restricted filtering in front of ``easy``; ``hard``'s own socket unreachable."""
    assert easy.endpoint is not None
    sent: set[Address] = set()
    send = easy.endpoint.sendto

    def sendto(data: bytes, addr: Address) -> bool:
        sent.add((addr[0], addr[1]))
        return send(data, addr)

    easy.endpoint.sendto = sendto  # type: ignore[method-assign]
    easy.datagram_hooks.append(lambda data, addr: addr not in sent)
    first = hard.endpoint
    hard.datagram_hooks.append(lambda data, addr: hard.endpoint is first)


def spy_on_the_pool(hard: Worker) -> list[Address]:
    """The addresses of every pool socket the hard worker opens."""
    assert hard.pool is not None
    opened: list[Address] = []
    pool = hard.pool
    open_ = pool.open

    def spying(host: str, count: int) -> int:
        n = open_(host, count)
        opened.extend(pool.local_addresses())
        return n

    pool.open = spying  # type: ignore[method-assign]
    return opened


@pytest.mark.parametrize("prober_role", ["controlling", "controlled"])
async def test_easy_x_hard_connects_through_a_pool_socket_and_keeps_it(
    hints: Hints, dead_port: int, prober_role: str
) -> None:
    async with fake_rendezvous() as rv, pair(rv) as (easy, hard):
        assert hints.asked == [True, True]  # birthday on: both asked discovery for the hint
        announced = [
            m for m in rv.conns[hard.worker_id].received if m["type"] == "update_udp_endpoint"
        ]
        assert announced[-1]["nat"]["mapping"] == "endpoint-dependent"
        play_the_nats(easy, hard)
        opened = spy_on_the_pool(hard)
        assert hard.endpoint is not None
        first = hard.endpoint.local_address
        other_role = "controlled" if prober_role == "controlling" else "controlling"
        await rv.send(
            easy,
            rv.offer(
                easy,
                hard,
                prober_role,
                peer_udp_ip=HARD_IP,
                peer_udp_port=dead_port,
                peer_nat=HARD.model_dump(),
            ),
        )
        await rv.send(hard, rv.offer(hard, easy, other_role, peer_nat=EASY.model_dump()))
        await easy.wait_connected(timeout=T)
        await hard.wait_connected(timeout=T)

        assert easy.status()["method"] == "birthday"
        await until(lambda: hard.status()["method"] == "birthday", "the sprayer's method", T)
        # the hard worker's socket is the pool socket that won; the rest of the pool is closed
        assert len(opened) == 256
        now = hard.endpoint.local_address
        assert now in opened and now != first
        assert hard.status()["udp_local"] == f"{now[0]}:{now[1]}"
        assert hard.pool is not None and len(hard.pool) == 0
        assert hard.link.stats["pool_adoptions"] == 1
        # the pool's counters stay in the status once it is closed (an empty pool is falsy)
        assert hard.status()["stats"]["pool"]["pool_opened"] == 256
        assert all(is_free(a) for a in opened if a != now)
        assert is_free(first)  # the old link socket too
        assert easy.peer_address == now
        # the easy side probed only the announced IP, within its budget
        assert 0 < easy.link.stats["birthday_probes"] <= 4096

        # the link runs on the adopted socket, both ways
        await easy.chat("through the birthday socket", timeout=T)
        await hard.chat("and back", timeout=T)
        assert hard.endpoint.local_address == now


async def test_without_birthday_nobody_asks_for_the_hint_nor_opens_a_pool(
    hints: Hints,
) -> None:
    async with fake_rendezvous() as rv:
        w = Worker(rv.config(birthday=BirthdayConfig(enabled=False)))
        await w.start()
        try:
            await rv.ready(w, timeout=T)
            assert hints.asked == [False]
            assert w.pool is not None and len(w.pool) == 0
        finally:
            await w.stop()


async def test_a_pool_binds_what_it_can_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    heard: list[tuple[int, bytes]] = []
    pool = SocketPool(loop, lambda i, data, addr: heard.append((i, data)))
    with caplog.at_level(logging.WARNING, logger="p2plab.aio.pool"):
        assert pool.open("192.0.2.1", 8) == 0  # not an address of this host
    assert pool.stats["pool_bind_failures"] == 8
    assert len([r for r in caplog.records if "could not be bound" in r.message]) == 1
    assert pool.open(HARD_IP, 4) == 4 and len(set(pool.local_addresses())) == 4
    target = pool.local_addresses()[2]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HARD_IP, 0))
        s.sendto(b"junk", target)
        await until(lambda: heard, "the pool datagram", T)
        assert heard == [(3, b"junk")]  # numbered 1..count, in the order bound
        assert pool.sendto(3, b"back", s.getsockname()) and s.recv(16) == b"back"
        assert not pool.sendto(9, b"none", s.getsockname())  # no such socket: skipped
    addrs = pool.local_addresses()
    pool.close()
    assert len(pool) == 0 and all(is_free(a) for a in addrs)


async def test_junk_and_strangers_on_the_pool_are_dropped_and_adopt_nothing(
    hints: Hints,
) -> None:
    async with fake_rendezvous() as rv, pair(rv) as (easy, hard):
        opened = spy_on_the_pool(hard)
        first = hard.endpoint
        # only the hard side gets an offer: it sprays, and nobody real answers
        await rv.send(hard, rv.offer(hard, easy, "controlled", peer_nat=EASY.model_dump()))
        await until(lambda: len(opened) == 256, "the pool", T)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind((HARD_IP, 0))
            for addr in opened:
                stranger.sendto(b"\x01" + bytes(60), addr)  # junk, not sealed for this link
            await until(lambda: hard.link.stats["pool_dropped"] >= 256, "the drops", T)
        assert hard.link.stats["pool_adoptions"] == 0
        assert hard.endpoint is first and hard.pool is not None and len(hard.pool) == 256
        assert hard.status()["method"] is None


async def test_a_predicted_port_wins_on_the_link_socket(hints: Hints, dead_port: int) -> None:
    """A sequential hard NAT announces the port its link socket will get towards the peer: the
    prober's first probe goes there, the link comes up on that socket and no pool socket is
    adopted; both sides say ``predicted``."""
    hints.sequential = True
    async with fake_rendezvous() as rv, pair(rv) as (easy, hard):
        assert hard.endpoint is not None
        first = hard.endpoint
        play_the_nats(easy, hard)
        hard.datagram_hooks.clear()  # the link socket's mapping is the predicted one: open
        announced = hard.link.nat_hint
        assert announced is not None and announced.predicted_ports == [first.local_address[1]]
        await rv.send(
            easy,
            rv.offer(
                easy,
                hard,
                "controlling",
                peer_udp_ip=HARD_IP,
                peer_udp_port=dead_port,
                peer_nat=announced.model_dump(),
            ),
        )
        await rv.send(hard, rv.offer(hard, easy, "controlled", peer_nat=EASY.model_dump()))
        await easy.wait_connected(timeout=T)
        await hard.wait_connected(timeout=T)
        assert easy.status()["method"] == "predicted"
        await until(lambda: hard.status()["method"] == "predicted", "the sprayer's method", T)
        assert hard.endpoint is first and hard.link.stats["pool_adoptions"] == 0
        assert easy.peer_address == first.local_address
        await until(lambda: hard.pool is not None and len(hard.pool) == 0, "the pool closed", T)
        await easy.chat("on the predicted port", timeout=T)
