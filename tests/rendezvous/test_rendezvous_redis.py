"""Scale-out rendezvous: several instances sharing state through a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from rendezvous_service_code.main import RendezvousServer
from tests.rendezvous_fixtures import (
    TIMEOUT,
    WsWorker,
    debug,
    new_identity,
    running_rendezvous,
)

FAST = {"redis_heartbeat_s": 0.3, "redis_ttl_s": 1.5}


@contextlib.asynccontextmanager
async def instance_process(redis_url: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A rendezvous in its own process (so it can be killed), on an OS-chosen port."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rendezvous_service_code.main",
        "--port",
        "0",
        "--redis",
        redis_url,
        "--redis-heartbeat",
        str(FAST["redis_heartbeat_s"]),
        "--redis-ttl",
        str(FAST["redis_ttl_s"]),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        info = json.loads(line)
        yield proc, info["ws_url"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_workers_on_two_instances_get_offers_for_each_other(redis_url: str) -> None:
    async with (
        running_rendezvous(redis_url=redis_url, **FAST) as rv1,
        running_rendezvous(redis_url=redis_url, **FAST) as rv2,
    ):
        a = await WsWorker.connect(rv1.ws_url)
        b = await WsWorker.connect(rv2.ws_url)
        key_a, key_b = new_identity(), new_identity()
        await a.register(identity=key_a)
        await b.register(identity=key_b)
        await a.update_endpoint("203.0.113.1", 1111, [("198.18.0.1", 1111)])
        await a.assert_silent()
        await b.update_endpoint("203.0.113.2", 2222)
        offer_a = await a.expect("p2p_connection_offer")
        offer_b = await b.expect("p2p_connection_offer")
        assert offer_a["peer_worker_id"] == b.worker_id and offer_a["role"] == "controlling"
        assert offer_b["peer_worker_id"] == a.worker_id and offer_b["role"] == "controlled"
        assert offer_b["peer_candidates"] == [
            {"ip": "203.0.113.1", "port": 1111},
            {"ip": "198.18.0.1", "port": 1111},
        ]
        assert offer_a["peer_public_key"] == key_b.public_b64
        # both instances list both workers
        for rv in (rv1, rv2):
            listing = await debug(rv, "list_workers")
            pairs = {w["worker_id"]: w["paired_with"] for w in listing["workers"]}
            assert pairs == {a.worker_id: b.worker_id, b.worker_id: a.worker_id}
        # a leaves on instance 1: b on instance 2 hears of it
        await a.close()
        assert (await b.expect("peer_disconnected"))["peer_worker_id"] == a.worker_id
        # re-registering b's id (with b's key) on the other instance closes the old connection
        b2 = await WsWorker.connect(rv1.ws_url, worker_id=b.worker_id)
        await b2.register(identity=key_b)
        assert (await b.wait_closed())[0] == 4000
        await b2.close()


#: 25 workers per instance, all from 127.0.0.1: above the default per-IP cap of 20.
MANY = {"max_connections_per_ip": 100}
#: For tests that do not reap instances: a liveness TTL no busy event loop outlasts (with FAST's
#: 1.5 s, fifty handshakes on a loaded two-core machine stalled an instance past its TTL, and it
#: reset its workers: right for a dead instance, not what this test is about).
STEADY = {"redis_heartbeat_s": 0.3, "redis_ttl_s": 10.0}


async def test_fifty_workers_across_two_instances_make_25_disjoint_pairs(redis_url: str) -> None:
    async with (
        running_rendezvous(redis_url=redis_url, **STEADY, **MANY) as rv1,
        running_rendezvous(redis_url=redis_url, **STEADY, **MANY) as rv2,
    ):
        workers = await asyncio.gather(*(WsWorker.connect(rv.ws_url) for rv in (rv1, rv2) * 25))

        async def join(i: int, w: WsWorker) -> dict[str, object]:
            await w.register()
            await w.update_endpoint("203.0.113.1", 10000 + i)
            return await w.expect("p2p_connection_offer")

        offers = await asyncio.gather(*(join(i, w) for i, w in enumerate(workers)))
        peer_of = {w.worker_id: o["peer_worker_id"] for w, o in zip(workers, offers, strict=True)}
        port_of = {w.worker_id: 10000 + i for i, w in enumerate(workers)}
        assert len(peer_of) == 50
        for wid, peer in peer_of.items():
            assert peer != wid and peer_of[peer] == wid  # symmetric: nobody in two pairs
        role_of = {w.worker_id: o["role"] for w, o in zip(workers, offers, strict=True)}
        for o in offers:
            assert o["peer_udp_port"] == port_of[str(o["peer_worker_id"])]
        for wid, peer in peer_of.items():
            assert {role_of[wid], role_of[str(peer)]} == {"controlling", "controlled"}
        pairs = {frozenset((a, b)) for a, b in peer_of.items()}
        assert len(pairs) == 25
        # no extra offers are pending anywhere
        await asyncio.gather(*(w.assert_silent(0.3) for w in workers))
        for w in workers:
            await w.close()


async def test_killed_instance_is_reaped_and_its_worker_pairs_again_elsewhere(
    redis_url: str,
) -> None:
    async with (
        instance_process(redis_url) as (_p1, url1),
        instance_process(redis_url) as (p2, url2),
    ):
        a = await WsWorker.connect(url1)
        b = await WsWorker.connect(url2)
        await a.register()
        await b.register()
        await a.update_endpoint("203.0.113.1", 1111)
        await b.update_endpoint("203.0.113.2", 2222)
        assert (await a.expect("p2p_connection_offer"))["peer_worker_id"] == b.worker_id
        assert (await b.expect("p2p_connection_offer"))["peer_worker_id"] == a.worker_id

        p2.kill()  # no goodbye: only the TTL tells the others
        await p2.wait()
        await b.wait_closed()
        gone = await a.expect("peer_disconnected", wait_s=TIMEOUT + 3 * FAST["redis_ttl_s"])
        assert gone["peer_worker_id"] == b.worker_id

        # b reconnects to the surviving instance (as the worker's backoff loop would)
        b2 = await WsWorker.connect(url1, worker_id=b.worker_id)
        await b2.register()
        await b2.update_endpoint("203.0.113.2", 2223)
        again = await a.expect("p2p_connection_offer")
        assert again["peer_worker_id"] == b.worker_id and again["peer_udp_port"] == 2223
        assert (await b2.expect("p2p_connection_offer"))["peer_worker_id"] == a.worker_id
        await a.close()
        await b2.close()


async def test_instance_restart_with_same_redis_keeps_no_stale_workers(redis_url: str) -> None:
    server = await RendezvousServer.start("127.0.0.1", 0, redis_url=redis_url, **FAST)
    w = await WsWorker.connect(server.ws_url)
    await w.register()
    await w.update_endpoint("203.0.113.1", 1)
    await server.close()  # graceful stop: its workers are removed from Redis
    await w.wait_closed()
    async with running_rendezvous(redis_url=redis_url, **FAST) as rv:
        assert (await debug(rv, "list_workers"))["count"] == 0
        v = await WsWorker.connect(rv.ws_url)
        await v.register()
        await v.update_endpoint("203.0.113.2", 2)
        await v.assert_silent()  # nobody stale to be paired with
        await v.close()


async def test_nat_hints_cross_instances_and_a_corrupt_stored_one_reads_as_none(
    redis_url: str,
) -> None:
    hint = {
        "mapping": "endpoint-independent",
        "remaps_on_clash": True,
        "sequential": False,
        "predicted_ports": [],
    }
    async with (
        running_rendezvous(redis_url=redis_url, **STEADY) as rv1,
        running_rendezvous(redis_url=redis_url, **STEADY) as rv2,
    ):
        a = await WsWorker.connect(rv1.ws_url)
        b = await WsWorker.connect(rv2.ws_url)
        await a.register()
        await b.register()
        await a.update_endpoint("203.0.113.1", 1111, nat=hint)
        await b.update_endpoint("203.0.113.2", 2222)
        assert (await b.expect("p2p_connection_offer"))["peer_nat"] == hint
        assert (await a.expect("p2p_connection_offer"))["peer_nat"] is None
        # Redis is shared: a stored value another writer corrupted must not crash pairing nor
        # reach an offer; it reads as no hint and is counted.
        c = await WsWorker.connect(rv1.ws_url)
        d = await WsWorker.connect(rv2.ws_url)
        await c.register()
        await d.register()
        await c.update_endpoint("203.0.113.3", 3333, nat=hint)
        client = aioredis.Redis.from_url(redis_url)
        try:
            bad = json.dumps({"mapping": "endpoint-dependent", "predicted_ports": [0] * 40})
            await client.hset(f"p2plab:rv:w:{c.worker_id}", "nat", bad)
        finally:
            await client.aclose()
        await d.update_endpoint("203.0.113.4", 4444)
        assert (await d.expect("p2p_connection_offer"))["peer_nat"] is None
        assert (await c.expect("p2p_connection_offer"))["peer_worker_id"] == d.worker_id
        assert (await debug(rv2, "stats"))["corrupt_nat_hints"] == 1
        listing = await debug(rv1, "list_workers")
        nats = {w["worker_id"]: w["nat"] for w in listing["workers"]}
        assert nats[a.worker_id] == hint and nats[c.worker_id] is None
        assert (await debug(rv1, "stats"))["corrupt_nat_hints"] == 1  # its listing read it
        for w in (a, b, c, d):
            await w.close()
