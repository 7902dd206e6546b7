"""Recovery on loopback: rendezvous restart with waiting workers, a peer that silently vanishes,
and a link that goes dark (as when a NAT drops its mapping) and comes back by punching again."""

from __future__ import annotations

import asyncio
from typing import Any

from p2plab.aio.worker import Worker
from p2plab.config import SessionConfig
from tests.aio.test_hostile import T, config, next_chat, rendezvous
from tests.conftest import TIMEOUT_UNIT, until

FAST_LINK = SessionConfig(keepalive_interval=0.2, peer_timeout=1.0, punch_timeout=1.5)


def states_seen(w: Worker) -> tuple[asyncio.Queue[dict[str, Any]], list[str]]:
    q = w.ui_subscribe()
    seen: list[str] = []

    async def _collect() -> None:
        while True:
            msg = await q.get()
            if msg["type"] == "status" and (not seen or seen[-1] != msg["state"]):
                seen.append(msg["state"])

    w._spawn(_collect(), "test-states")
    return q, seen


async def test_waiting_workers_pair_after_a_rendezvous_restart() -> None:
    async with rendezvous() as rv:
        port, stun_port = rv.http_port, rv.stun_port
        a = await Worker(config(rv)).start()
        try:
            await a.wait_for_state("waiting_for_peer", timeout=T)
            await rv.close()
            await until(lambda: a.status()["rendezvous"] == "down", "a sees it down")
            b = await Worker(config(rv)).start()  # starts while the rendezvous is down
            try:
                await asyncio.sleep(0.3)
                assert b.state == "registering"
                async with rendezvous(port=port, stun_port=stun_port):
                    # nobody acts: both reconnect with backoff, register again and get paired
                    await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
                    assert a.peer_id == b.worker_id and b.peer_id == a.worker_id
                    q = b.ui_subscribe()
                    a.send_chat("paired after the restart")
                    assert (await next_chat(q))["text"] == "paired after the restart"
            finally:
                await b.stop()
        finally:
            await a.stop()


async def test_silently_vanished_peer_is_lost_after_peer_timeout_then_a_new_peer_is_accepted() -> (
    None
):
    async with rendezvous() as rv:
        a = await Worker(config(rv, session=FAST_LINK)).start()
        b = await Worker(config(rv, session=FAST_LINK)).start()
        c: Worker | None = None
        try:
            await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
            _, seen = states_seen(a)
            # b's UDP goes silent both ways; its rendezvous connection stays up, so the
            # rendezvous says nothing
            assert b.endpoint is not None
            b.endpoint.sendto = lambda data, addr: None  # type: ignore[method-assign]
            b.datagram_hooks.insert(0, lambda data, addr: True)
            await until(lambda: "lost" in seen, "a reports lost", timeout=10)
            assert a.peer_id == b.worker_id  # still its peer as far as the rendezvous knows
            # a punches the same peer again, in vain
            await until(lambda: a.state == "punching", "a re-punches", timeout=10)
            await until(lambda: a.link.repunch_attempts >= 2, "a second attempt", timeout=10)
            assert a.state != "connected"
            # the peer leaves the rendezvous: a waits, then takes a new peer
            await b.stop()
            await a.wait_for_state("waiting_for_peer", timeout=T)
            c = await Worker(config(rv, session=FAST_LINK)).start()
            await asyncio.gather(a.wait_connected(T), c.wait_connected(T))
            assert a.peer_id == c.worker_id
            q = c.ui_subscribe()
            a.send_chat("hello newcomer")
            assert (await next_chat(q))["text"] == "hello newcomer"
        finally:
            await a.stop()
            await b.stop()
            if c is not None:
                await c.stop()


async def test_link_that_goes_dark_comes_back_by_punching_again() -> None:
    """Both ends lose each other (as when a NAT forgets the mapping) and re-punch on their own."""
    async with rendezvous() as rv:
        a = await Worker(config(rv, session=FAST_LINK)).start()
        b = await Worker(config(rv, session=FAST_LINK)).start()
        try:
            await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
            offers = (a.stats["offers"], b.stats["offers"])
            _, seen_a = states_seen(a)
            _, seen_b = states_seen(b)
            dark = True

            def blackhole(data: bytes, addr: object) -> bool:
                return dark

            a.datagram_hooks.insert(0, blackhole)
            b.datagram_hooks.insert(0, blackhole)
            await until(lambda: "lost" in seen_a and "lost" in seen_b, "both lost", timeout=10)
            await until(lambda: "punching" in seen_a and "punching" in seen_b, "re-punch", 10)
            dark = False
            await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
            assert seen_a[-1] == "connected" and seen_b[-1] == "connected"
            assert a.peer_id == b.worker_id and b.peer_id == a.worker_id
            # no new offer was needed: the workers did this on their own
            assert (a.stats["offers"], b.stats["offers"]) == offers
            q = b.ui_subscribe()
            a.send_chat("back again")
            assert (await next_chat(q))["text"] == "back again"
            assert a.status()["security"]["encrypted"] is True
        finally:
            await a.stop()
            await b.stop()


async def test_one_side_restarting_its_session_keeps_chat_exactly_once() -> None:
    """Only a loses b for a while (one-way blackhole): a re-punches while b's session lives on;
    b recognises a's new session and starts its stream over; nothing is delivered twice."""
    slow = SessionConfig(keepalive_interval=0.2, peer_timeout=1.0 * 4, punch_timeout=2.0)
    async with rendezvous() as rv:
        a = await Worker(config(rv, session=FAST_LINK)).start()
        b = await Worker(config(rv, session=slow)).start()
        try:
            await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
            qa, qb = a.ui_subscribe(), b.ui_subscribe()
            b.send_chat("one")
            assert (await next_chat(qa))["text"] == "one"
            a_gets_nothing = True
            a.datagram_hooks.insert(0, lambda data, addr: a_gets_nothing)
            _, seen_a = states_seen(a)
            await until(lambda: "punching" in seen_a, "a re-punches", timeout=10)
            a_gets_nothing = False
            await a.wait_connected(T)
            await until(
                lambda: b.link.session is not None and b.link.session.stats["peer_restarts"] >= 1,
                "b sees a's new session",
                timeout=10,
            )
            assert b.state == "connected"
            b.send_chat("two")
            a.send_chat("three")
            assert (await next_chat(qa))["text"] == "two"
            assert (await next_chat(qb))["text"] == "three"
            await asyncio.sleep(0.3 * TIMEOUT_UNIT)
            assert a.stats["chats_in"] == 2 and b.stats["chats_in"] == 1
        finally:
            await a.stop()
            await b.stop()
