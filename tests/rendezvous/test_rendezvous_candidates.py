"""The rendezvous passes a worker's trickled TURN candidates to its peer only (issue 17): within a
pair, after ``register``, at most CANDIDATES_PER_MIN a minute, IP literals only, and across
instances through Redis; every refusal counted in /debug/stats and answered once."""

from __future__ import annotations

from typing import Any

from rendezvous_service_code.trickle import CANDIDATES_PER_MIN
from tests.rendezvous_fixtures import WsWorker, debug, running_rendezvous

CANDS = [{"ip": "192.0.2.50", "port": 50000, "transport": "udp"}]


def candidates(to: str, cands: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "candidates", "to": to, "candidates": cands or CANDS}


async def paired(url: str, n: int = 2) -> list[WsWorker]:
    workers = [await WsWorker.connect(url) for _ in range(n)]
    for i, w in enumerate(workers):
        await w.register()
        await w.update_endpoint("203.0.113.1", 1000 + i)
    for w in workers:
        await w.expect("p2p_connection_offer")
    return workers


async def test_candidates_reach_the_peer_with_the_senders_id() -> None:
    async with running_rendezvous() as rv:
        a, b = await paired(rv.ws_url)
        # a "from" of its own choosing is ignored: the service names the sender
        await a.send({**candidates(b.worker_id), "from": "someone-else"})
        got = await b.expect("candidates")
        assert got == {"type": "candidates", "from": a.worker_id, "candidates": CANDS}
        await b.send(
            candidates(a.worker_id, [{"ip": "2001:db8::1", "port": 3, "transport": "tcp"}])
        )
        assert (await a.expect("candidates"))["candidates"][0]["ip"] == "2001:db8::1"
        stats = await debug(rv, "stats")
        assert stats["candidates_forwarded"] == 2 and stats["candidates_refused"] == 0
        await a.assert_silent()
        for w in (a, b):
            await w.close()


async def test_candidates_to_anyone_but_the_peer_are_refused_once() -> None:
    async with running_rendezvous() as rv:
        a, b, c, d = await paired(rv.ws_url, 4)  # pairs a-b and c-d, in arrival order
        lonely = await WsWorker.connect(rv.ws_url)
        await lonely.register()
        strangers = [c, d, lonely]
        for s in strangers:
            await a.send(candidates(s.worker_id))
        await a.send(candidates("nobody-at-all"))
        err = await a.expect("error")
        assert err["code"] == "candidates_refused"
        await a.assert_silent()  # one answer per kind, not one per message
        for s in strangers:
            await s.assert_silent(0.1)
        # unpaired, the lonely worker cannot send to anyone either
        await lonely.send(candidates(a.worker_id))
        assert (await lonely.expect("error"))["code"] == "candidates_refused"
        stats = await debug(rv, "stats")
        assert stats["candidates_refused"] == len(strangers) + 2
        assert stats["candidates_forwarded"] == 0
        for w in (a, b, c, d, lonely):
            await w.close()


async def test_candidates_before_register_are_refused() -> None:
    async with running_rendezvous() as rv:
        a = await WsWorker.connect(rv.ws_url)
        await a.send(candidates("x"))
        err = await a.expect("error")
        assert err["code"] == "bad_message" and "register" in err["message"]
        assert (await debug(rv, "stats"))["candidates_refused"] == 1
        await a.close()


async def test_too_many_candidates_are_dropped_with_one_error() -> None:
    async with running_rendezvous() as rv:
        a, b = await paired(rv.ws_url)
        for i in range(CANDIDATES_PER_MIN + 3):
            await a.send(candidates(b.worker_id, [{"ip": "192.0.2.50", "port": 1000 + i}]))
        ports = [
            (await b.expect("candidates"))["candidates"][0]["port"]
            for _ in range(CANDIDATES_PER_MIN)
        ]
        assert ports == [1000 + i for i in range(CANDIDATES_PER_MIN)]
        await b.assert_silent()
        assert (await a.expect("error"))["code"] == "candidates_rate_limited"
        await a.assert_silent()
        stats = await debug(rv, "stats")
        assert stats["candidates_forwarded"] == CANDIDATES_PER_MIN
        assert stats["candidates_rate_limited"] == 3
        for w in (a, b):
            await w.close()


async def test_host_names_and_malformed_candidates_never_reach_the_peer() -> None:
    async with running_rendezvous() as rv:
        a, b = await paired(rv.ws_url)
        bad = [
            [{"ip": "turn.example.org", "port": 3478}],
            [{"ip": "192.0.2.1", "port": 0}],
            [{"ip": "192.0.2.1", "port": 1, "transport": "sctp"}],
            [{"ip": "192.0.2.1", "port": 1}] * 5,
            [],
        ]
        for cands in bad:
            await a.send({"type": "candidates", "to": b.worker_id, "candidates": cands})
            err = await a.expect("error")
            assert err["code"] == "bad_message" and "candidates" in err["message"]
        await b.assert_silent()
        stats = await debug(rv, "stats")
        assert stats["bad_messages"] == len(bad) and stats["candidates_forwarded"] == 0
        for w in (a, b):
            await w.close()


async def test_candidates_cross_instances_through_redis(redis_url: str) -> None:
    steady: dict[str, Any] = {"redis_heartbeat_s": 0.3, "redis_ttl_s": 10.0}
    async with (
        running_rendezvous(redis_url=redis_url, **steady) as rv1,
        running_rendezvous(redis_url=redis_url, **steady) as rv2,
    ):
        a = await WsWorker.connect(rv1.ws_url)
        b = await WsWorker.connect(rv2.ws_url)
        c = await WsWorker.connect(rv2.ws_url)
        for w, port in ((a, 1), (b, 2)):
            await w.register()
            await w.update_endpoint("203.0.113.1", port)
        await c.register()
        await a.expect("p2p_connection_offer")
        await b.expect("p2p_connection_offer")
        await a.send(candidates(b.worker_id))
        assert await b.expect("candidates") == {
            "type": "candidates",
            "from": a.worker_id,
            "candidates": CANDS,
        }
        await b.send(candidates(a.worker_id))
        assert (await a.expect("candidates"))["from"] == b.worker_id
        # c (on rv2, unpaired) is refused by the pair check wherever the pair lives
        await c.send(candidates(a.worker_id))
        assert (await c.expect("error"))["code"] == "candidates_refused"
        await a.assert_silent()
        assert (await debug(rv1, "stats"))["candidates_forwarded"] == 1
        stats2 = await debug(rv2, "stats")
        assert stats2["candidates_forwarded"] == 1 and stats2["candidates_refused"] == 1
        for w in (a, b, c):
            await w.close()
