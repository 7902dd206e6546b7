"""The asyncio layer on real loopback sockets (port 0): puncher, rendezvous client, worker."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from p2plab.aio.endpoint import UdpEndpoint
from p2plab.aio.punch import HolePuncher
from p2plab.aio.rendezvous import Backoff, registration_url
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.errors import ChatTooLong, ConfigError, NotConnected
from rendezvous_service_code.main import RendezvousServer
from tests.conftest import TIMEOUT_UNIT
from tests.rendezvous_fixtures import loopback_worker_config, running_rendezvous

T = 10 * TIMEOUT_UNIT


def rendezvous(port: int = 0, **options: Any) -> Any:
    return running_rendezvous(port, stun_port=0, **options)


def worker_config(rv: RendezvousServer, **kw: Any) -> WorkerConfig:
    return loopback_worker_config(rv, **kw)


async def test_two_punchers_connect_and_chat_on_loopback() -> None:
    a_ep = await UdpEndpoint.bind("127.0.0.1", 0)
    b_ep = await UdpEndpoint.bind("127.0.0.1", 0)
    got: list[ev.Event] = []
    a = HolePuncher(a_ep, local_id="a", peer_id="b", candidates=[b_ep.local_address])
    b = HolePuncher(
        b_ep,
        local_id="b",
        peer_id="a",
        candidates=[a_ep.local_address],
        role="controlled",
        on_event=got.append,
    )
    a_ep.peer_handler = a.datagram_received
    b_ep.peer_handler = b.datagram_received
    try:
        assert await a.wait_connected(T) == b_ep.local_address
        assert await b.wait_connected(T) == a_ep.local_address
        delivered = asyncio.ensure_future(a.wait_for(lambda e: isinstance(e, ev.ChatDelivered), T))
        msg_id = a.send_chat("héllo")
        assert (await delivered).msg_id == msg_id  # type: ignore[attr-defined]
        chats = [e for e in got if isinstance(e, ev.ChatReceived)]
        assert [c.text for c in chats] == ["héllo"]
        assert a.rtt is not None and a.rtt > 0
    finally:
        a.close()
        b.close()
        a_ep.close()
        b_ep.close()


async def test_puncher_reports_failure_when_nobody_answers() -> None:
    ep = await UdpEndpoint.bind("127.0.0.1", 0)
    silent = await UdpEndpoint.bind("127.0.0.1", 0)  # bound but never answers
    p = HolePuncher(
        ep,
        local_id="a",
        peer_id="b",
        candidates=[silent.local_address],
        config=SessionConfig(punch_timeout=0.5),
    )
    ep.peer_handler = p.datagram_received
    try:
        with pytest.raises(Exception, match="punching to peer b failed"):
            await p.wait_connected(T)
        assert p.state == "lost"
        assert silent.stats["dropped_no_handler"] > 0  # probes really went out
    finally:
        p.close()
        ep.close()
        silent.close()


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    b = Backoff(initial_s=1.0, maximum_s=8.0)
    rng = random.Random(7).random
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0)]:
        d = b.delay(attempt, rng)
        assert ceiling / 2 <= d <= ceiling
    assert b.delay(0, lambda: 0.0) == 0.5
    assert b.delay(5, lambda: 1.0) == 8.0


def test_registration_url() -> None:
    assert registration_url("ws://h:1", "x") == "ws://h:1/ws/register/x"
    assert registration_url("https://h/", "x") == "wss://h/ws/register/x"
    with pytest.raises(ConfigError, match="must start with ws://"):
        registration_url("h:1", "x")


async def test_workers_pair_through_rendezvous_and_chat() -> None:
    async with rendezvous() as rv:
        async with Worker(worker_config(rv)) as a, Worker(worker_config(rv)) as b:
            await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
            assert a.peer_id == b.worker_id and b.peer_id == a.worker_id
            assert a.udp_public == a.endpoint.local_address  # type: ignore[union-attr]
            assert a.status()["stun"]["server"] == f"127.0.0.1:{rv.stun_port}"
            events = b.ui_subscribe()
            a.send_chat("ping")
            msg = await asyncio.wait_for(_until(events, "chat"), T)
            assert msg["direction"] == "in" and msg["text"] == "ping"
            with pytest.raises(ChatTooLong):
                a.send_chat("x" * 4097)


async def _until(q: asyncio.Queue[dict[str, Any]], kind: str) -> dict[str, Any]:
    while True:
        msg = await q.get()
        if msg["type"] == kind:
            return msg


async def test_link_survives_rendezvous_restart_and_workers_reregister() -> None:
    async with rendezvous() as rv:
        port = rv.http_port
        a = await Worker(worker_config(rv)).start()
        b = await Worker(worker_config(rv)).start()
        try:
            await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
            connections = a._rendezvous.connections  # type: ignore[union-attr]
            await rv.close()
            # the punched link does not need the rendezvous
            await asyncio.sleep(0.3)
            assert a.state == "connected" and b.state == "connected"
            q = b.ui_subscribe()
            a.send_chat("still here")
            assert (await asyncio.wait_for(_until(q, "chat"), T))["text"] == "still here"
            async with rendezvous(port):
                # both reconnect with backoff; an offer for the same peer keeps the link
                for _ in range(int(200 * TIMEOUT_UNIT)):
                    if a._rendezvous.connections > connections:  # type: ignore[union-attr]
                        break
                    await asyncio.sleep(0.05)
                assert a._rendezvous.connections > connections  # type: ignore[union-attr]
                await asyncio.sleep(0.3)
                assert a.state == "connected" and a.peer_id == b.worker_id
        finally:
            await a.stop()
            await b.stop()


async def test_worker_without_stun_uses_observed_address_and_refuses_chat() -> None:
    async with rendezvous() as rv:
        async with Worker(worker_config(rv, stun_servers=())) as w:
            await w.wait_for_state("waiting_for_peer", timeout=T)
            assert w.udp_public == ("127.0.0.1", w.endpoint.local_address[1])  # type: ignore[union-attr]
            with pytest.raises(NotConnected):
                w.send_chat("nobody there")


async def test_public_ip_url_is_bounded_when_unreachable() -> None:
    # a TCP port that accepts nothing: the lookup fails fast and the worker still registers
    async with rendezvous() as rv:
        cfg = worker_config(rv, public_ip_url="http://127.0.0.1:9/")
        async with Worker(cfg) as w:
            await w.wait_for_state("waiting_for_peer", timeout=T)
            assert w.http_public_ip == "127.0.0.1"  # from the rendezvous's observation
