"""Our TURN client against Debian's coturn on loopback, with coturn's REST credentials.

Two allocations relay datagrams to each other both ways, as Send/Data indications and as
ChannelData, over UDP and over TCP to the server, with credentials made here or handed out
in a rendezvous's offers; credentials that expired, were made with
another secret or name another worker are refused; a stranger without a permission gets
nothing through; an allocation keeps refreshing after its credentials expire (which is why a
short credential lifetime does not cut a relayed session short).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2plab.aio.turn import TurnAllocation, TurnError
from p2plab.core.signaling import P2PConnectionOffer, parse_rendezvous_message
from p2plab.core.turn import TurnState
from p2plab.core.turn_config import TurnServer, parse_turn_url, turn_credentials
from tests.stun_fixtures import udp_tcp_port

try:
    from tests.conftest import TIMEOUT_UNIT, require
    from tests.rendezvous_fixtures import WsWorker, new_identity, running_rendezvous
except ImportError:  # pragma: no cover
    from conftest import TIMEOUT_UNIT, require  # type: ignore[no-redef]
    from rendezvous_fixtures import (  # type: ignore[no-redef]
        WsWorker,
        new_identity,
        running_rendezvous,
    )

SECRET = "coturn-test-secret"
LIMIT = 10 * TIMEOUT_UNIT


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
async def coturn() -> AsyncIterator[int]:
    """coturn with ``use-auth-secret`` on a free loopback port; yields the port."""
    turnserver = shutil.which("turnserver")
    require(turnserver is not None, "coturn (turnserver)")
    assert turnserver is not None
    port = udp_tcp_port()
    with tempfile.TemporaryDirectory(prefix="p2plab-turn-") as tmp:
        log = Path(tmp) / "turnserver.log"
        cmd = [
            turnserver, "-n", "--use-auth-secret", "--static-auth-secret", SECRET,
            "--realm", "p2plab", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
            "--listening-port", str(port), "--no-tls", "--no-dtls", "--no-cli",
            "--allow-loopback-peers", "--userdb", str(Path(tmp) / "turndb"),
            "--pidfile", str(Path(tmp) / "turnserver.pid"), "--log-file", "stdout",
            "--simple-log",
        ]  # fmt: skip
        proc = _start(cmd, log)
        try:
            await _wait_until_allocating(port, proc, log)
            yield port
        finally:
            proc.kill()
            proc.wait(timeout=10)


async def _wait_until_allocating(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(int(40 * TIMEOUT_UNIT)):
        if proc.poll() is not None:
            raise AssertionError(f"turnserver exited: {_tail(log)}")
        try:
            alloc = await open_alloc(port, "probe", timeout=0.5)
        except TurnError:
            continue
        await alloc.close()
        return
    raise AssertionError(f"turnserver never allocated: {_tail(log)}")


async def open_alloc(
    port: int,
    worker_id: str,
    *,
    transport: str = "udp",
    timeout: float = LIMIT,
    ttl_s: float = 600,
    secret: str = SECRET,
    age_s: float = 0.0,
) -> TurnAllocation:
    now = time.time() - age_s
    username, password = turn_credentials(secret, worker_id, now, ttl_s=ttl_s)
    server = TurnServer("127.0.0.1", port, "tcp" if transport == "tcp" else "udp")
    return await TurnAllocation.open(server, username, password, timeout=timeout)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_two_allocations_relay_both_ways(coturn: int, transport: str) -> None:
    a = await open_alloc(coturn, "worker-a", transport=transport)
    b = await open_alloc(coturn, "worker-b", transport=transport)
    try:
        assert a.relayed[0] == "127.0.0.1" and a.relayed != b.relayed
        assert a.mapped == ("127.0.0.1", a.local_address[1])  # no NAT on loopback
        await a.create_permission(b.relayed[0], LIMIT)
        await b.create_permission(a.relayed[0], LIMIT)
        # Send indications out, Data indications in.
        a.send(b.relayed, b"a->b by indication")
        assert await b.recv(LIMIT) == (a.relayed, b"a->b by indication")
        b.send(a.relayed, b"b->a by indication")
        assert await a.recv(LIMIT) == (b.relayed, b"b->a by indication")
        # ChannelData both ways, sizes that need padding over TCP, in order.
        assert await a.bind_channel(b.relayed, LIMIT) == 0x4000
        assert await b.bind_channel(a.relayed, LIMIT) == 0x4000
        for n in (1, 5, 1000):
            a.send(b.relayed, bytes([n % 256]) * n)
            b.send(a.relayed, bytes([n % 251]) * n)
        assert [await b.recv(LIMIT) for _ in range(3)] == [
            (a.relayed, bytes([n % 256]) * n) for n in (1, 5, 1000)
        ]
        assert [await a.recv(LIMIT) for _ in range(3)] == [
            (b.relayed, bytes([n % 251]) * n) for n in (1, 5, 1000)
        ]
        for alloc in (a, b):
            stats = alloc.client.stats
            assert stats["sent_channel"] == 3 and stats["received_channel"] == 3
            assert stats["sent_indication"] == 1 and stats["received_indication"] == 1
            assert stats["junk"] == stats["bad_integrity"] == stats["unmatched"] == 0
    finally:
        await a.close()
        await b.close()
    assert a.client.state is TurnState.CLOSED and b.client.state is TurnState.CLOSED


async def test_refused_credentials(coturn: int) -> None:
    with pytest.raises(TurnError, match="401"):
        await open_alloc(coturn, "w-expired", ttl_s=600, age_s=605)
    with pytest.raises(TurnError, match="401"):
        await open_alloc(coturn, "w-foreign", secret="another-secret")
    # Credentials bound to one worker id do not work with another name in the username.
    username, password = turn_credentials(SECRET, "worker-1", time.time())
    stolen = username.replace("worker-1", "worker-2")
    with pytest.raises(TurnError, match="401"):
        await TurnAllocation.open(
            TurnServer("127.0.0.1", coturn, "udp"), stolen, password, timeout=LIMIT
        )


async def test_no_permission_no_data(coturn: int) -> None:
    a = await open_alloc(coturn, "worker-a")
    b = await open_alloc(coturn, "worker-b")
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.bind(("127.0.0.2", 0))
        await a.create_permission(b.relayed[0], LIMIT)  # 127.0.0.1 only
        await b.create_permission(a.relayed[0], LIMIT)
        stranger.sendto(b"from a stranger", a.relayed)
        await asyncio.sleep(0)
        b.send(a.relayed, b"from the peer")
        assert await a.recv(LIMIT) == (b.relayed, b"from the peer")
        b.send(a.relayed, b"again")
        assert await a.recv(LIMIT) == (b.relayed, b"again")
        assert a.client.stats["received_indication"] == 2
        # The control: with a permission for its IP the stranger does get through.
        await a.create_permission("127.0.0.2", LIMIT)
        stranger.sendto(b"now permitted", a.relayed)
        assert await a.recv(LIMIT) == (stranger.getsockname(), b"now permitted")
    finally:
        stranger.close()
        await a.close()
        await b.close()


async def test_allocation_refreshes_after_its_credentials_expire(coturn: int) -> None:
    expiry = int(time.time() + 1)  # what turn_credentials puts in the username
    a = await open_alloc(coturn, "worker-a", ttl_s=1)
    try:
        await asyncio.sleep(max(0.0, expiry + 1.1 - time.time()))  # at most ~2.1 s
        assert time.time() > expiry + 1
        assert await a.refresh(LIMIT) > 0
        assert a.client.state is TurnState.ALLOCATED
    finally:
        await a.close()


async def test_credentials_from_rendezvous_offers_allocate_and_relay(coturn: int) -> None:
    urls = (f"turn:127.0.0.1:{coturn}?transport=udp", f"turn:127.0.0.1:{coturn}?transport=tcp")
    async with running_rendezvous(turn_urls=urls, turn_secret=SECRET) as rv:
        workers = [await WsWorker.connect(rv.ws_url) for _ in range(2)]
        for i, worker in enumerate(workers):
            await worker.register(identity=new_identity())
            await worker.update_endpoint(f"203.0.113.{i + 1}", 1000 + i)
        offers = []
        for worker in workers:
            raw = await worker.expect("p2p_connection_offer")
            offer = parse_rendezvous_message(json.dumps(raw))
            assert isinstance(offer, P2PConnectionOffer) and offer.turn is not None
            offers.append(offer.turn)
        # Worker 0 over UDP, worker 1 over TCP, each with its own credentials.
        a = await TurnAllocation.open(
            parse_turn_url(offers[0].urls[0]), offers[0].username, offers[0].password, timeout=LIMIT
        )
        b = await TurnAllocation.open(
            parse_turn_url(offers[1].urls[1]), offers[1].username, offers[1].password, timeout=LIMIT
        )
        try:
            await a.create_permission(b.relayed[0], LIMIT)
            await b.bind_channel(a.relayed, LIMIT)
            a.send(b.relayed, b"udp to tcp")
            assert await b.recv(LIMIT) == (a.relayed, b"udp to tcp")
            b.send(a.relayed, b"tcp to udp")
            assert await a.recv(LIMIT) == (b.relayed, b"tcp to udp")
        finally:
            await a.close()
            await b.close()
            for worker in workers:
                await worker.close()
