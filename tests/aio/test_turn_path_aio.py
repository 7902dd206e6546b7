"""Two real workers on loopback whose direct path is blocked connect through Debian's coturn
(issue 17): the engine allocates on each worker's own UDP socket (and over TCP when asked),
trickles the relayed address through the rendezvous, and the pair connects on turn-udp (or
turn-tcp) and chats; unblocked, it goes direct; blocked again, back to TURN.

Loopback has no NAT, so the test plays the block: each worker drops every datagram from the
other's UDP endpoint (its ``datagram_hooks``), while datagrams from coturn (its listening port
and the relayed ports) pass.  The fake rendezvous pairs them with offers carrying coturn REST
credentials and forwards their ``candidates`` messages, as the real one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from p2plab.aio.worker import Worker
from p2plab.core import events as ev
from p2plab.core.turn_config import turn_credentials
from tests.aio.fake_rendezvous import FakeRendezvous, fake_rendezvous
from tests.aio.test_turn_coturn import SECRET, coturn  # noqa: F401 - the fixture
from tests.conftest import until

T = 20.0


def turn_field(worker: Worker, port: int, transports: tuple[str, ...]) -> dict[str, Any]:
    username, password = turn_credentials(SECRET, worker.worker_id, time.time(), ttl_s=600)
    urls = [f"turn:127.0.0.1:{port}?transport={t}" for t in transports]
    return {"urls": urls, "username": username, "password": password, "ttl_s": 600}


async def forward_candidates(rv: FakeRendezvous, a: Worker, b: Worker) -> None:
    """Pass each worker's ``candidates`` messages on to its peer (the rendezvous's job)."""
    seen = {a.worker_id: 0, b.worker_id: 0}
    peers = {a.worker_id: b, b.worker_id: a}
    while True:
        for wid, peer in peers.items():
            received = rv.conns[wid].received
            for msg in received[seen[wid] :]:
                if msg.get("type") == "candidates" and msg.get("to") == peer.worker_id:
                    fwd = {"type": "candidates", "from": wid, "candidates": msg["candidates"]}
                    await rv.send(peer, fwd)
            seen[wid] = len(received)
        await asyncio.sleep(0.01)


class Block:
    """Drops datagrams between the two workers' UDP endpoints while ``on``."""

    def __init__(self, a: Worker, b: Worker) -> None:
        self.on = True
        self.dropped = 0
        for me, peer in ((a, b), (b, a)):
            me.datagram_hooks.append(lambda data, addr, peer=peer: self._drop(peer, addr))

    def _drop(self, peer: Worker, addr: Any) -> bool:
        if self.on and peer.endpoint is not None and tuple(addr[:2]) == peer.endpoint.local_address:
            self.dropped += 1
            return True
        return False


@contextlib.asynccontextmanager
async def turn_pair(
    port: int, transports: tuple[str, ...]
) -> AsyncIterator[tuple[Worker, Worker, Block]]:
    async with fake_rendezvous() as rv:
        a = Worker(rv.config())
        b = Worker(rv.config())
        await a.start()
        await b.start()
        forwarder: asyncio.Task[None] | None = None
        try:
            await rv.ready(a, b, timeout=T)
            forwarder = asyncio.get_running_loop().create_task(forward_candidates(rv, a, b))
            block = Block(a, b)
            for me, peer, role in ((a, b, "controlling"), (b, a, "controlled")):
                offer = rv.offer(me, peer, role, turn=turn_field(me, port, transports))
                await rv.send(me, offer)
            yield a, b, block
        finally:
            if forwarder is not None:
                forwarder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await forwarder
            await a.stop()
            await b.stop()


async def test_blocked_direct_path_connects_over_coturn_then_goes_direct(coturn: int) -> None:  # noqa: F811
    async with turn_pair(coturn, ("udp",)) as (a, b, block):
        async with a.subscribe(ev.PathChanged) as a_paths, b.subscribe(ev.ChatReceived) as b_in:
            await a.wait_for_state("connected", timeout=T)
            await b.wait_for_state("connected", timeout=T)
            assert a.path == b.path == "turn-udp"
            assert a.status()["path"] == b.status()["path"] == "turn-udp"
            assert a.link.turn_relayed is not None and a.link.stats["turn_allocations"] == 1
            assert a.peer_address is not None  # the peer relayed address, or our allocation
            turn = a.status()["turn"]
            assert turn["transport"] == "udp" and turn["state"] == "allocated"
            # The peer's relayed candidate trickles through the rendezvous: A may connect
            # through its own allocation before it arrives (CI saw it once), not long before.
            await until(lambda: len(a.status()["turn"]["peer_relayed"]) == 1, "the peer's relay", T)
            assert a.status()["turn"]["relayed"] is not None
            assert b.status()["peer"]["endpoint"].startswith("127.0.0.1:")
            await a.chat("over coturn", timeout=T)
            assert (await asyncio.wait_for(anext(b_in), T)).text == "over coturn"
            assert block.dropped > 0  # the direct path really was tried and blocked
            # Unblocked: direct within a few upgrade rounds (5 s each).
            block.on = False
            change = await asyncio.wait_for(anext(a_paths), 4 * T)
            assert (change.previous_path, change.path) == ("turn-udp", "direct")
            await until(lambda: a.path == b.path == "direct", "both direct", T)
            assert a.status()["path"] == "direct" and a.peer_address is not None
            await a.chat("direct again", timeout=T)
            assert (await asyncio.wait_for(anext(b_in), T)).text == "direct again"
            # Blocked again: back to TURN (downgrade_after 7.5 s) before the peer timeout.
            block.on = True
            change = await asyncio.wait_for(anext(a_paths), T)
            assert (change.previous_path, change.path) == ("direct", "turn-udp")
            await until(lambda: a.path == b.path == "turn-udp", "both on TURN again", T)
            assert a.state == b.state == "connected"
            await a.chat("over coturn again", timeout=T)
            assert (await asyncio.wait_for(anext(b_in), T)).text == "over coturn again"


async def test_turn_over_tcp_to_coturn_carries_the_pair(coturn: int) -> None:  # noqa: F811
    async with turn_pair(coturn, ("tcp",)) as (a, b, _block):
        async with b.subscribe(ev.ChatReceived) as b_in:
            await a.wait_for_state("connected", timeout=T)
            await b.wait_for_state("connected", timeout=T)
            assert a.path == b.path == "turn-tcp"
            await a.chat("over tcp", timeout=T)
            assert (await asyncio.wait_for(anext(b_in), T)).text == "over tcp"
