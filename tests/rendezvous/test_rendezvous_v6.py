"""The rendezvous and IPv6 and port mappings (issues 18 and 19): it stores and forwards a
worker's ``mapped`` and ``udp6`` (in memory and through Redis, revalidated when read back),
refuses hostile ones (host names, scoped addresses, absurd leases) and counts them, and serves
on IPv6 (``::1``, and ``::`` for both families at once)."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from rendezvous_service_code.main import RendezvousServer
from tests.rendezvous_fixtures import ADMIN_TOKEN, WsWorker, debug, running_rendezvous

MAPPED = {"protocol": "nat-pmp", "ip": "203.0.113.7", "port": 41000, "lifetime_s": 7200.0}
UDP6 = {"ip": "2001:db8:1::2", "port": 5000}
STEADY = {"redis_heartbeat_s": 0.5, "redis_ttl_s": 30.0}


def update(ip: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"type": "update_udp_endpoint", "udp_ip": ip, "udp_port": port, **extra}


async def test_mapping_and_udp6_reach_the_peer_in_its_offer() -> None:
    async with running_rendezvous() as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        await a.register()
        await b.register()
        v6_host = [{"ip": "2001:db8:1::2", "port": 5000}, {"ip": "10.0.0.2", "port": 5000}]
        await a.send(
            update("198.51.100.1", 5000, mapped=MAPPED, udp6=UDP6, local_candidates=v6_host)
        )
        await b.send(update("198.51.100.2", 6000))
        to_b = await b.expect("p2p_connection_offer")
        assert to_b["peer_mapped"] == MAPPED and to_b["peer_udp6"] == UDP6
        assert {"ip": "2001:db8:1::2", "port": 5000} in to_b["peer_candidates"]
        to_a = await a.expect("p2p_connection_offer")
        assert to_a["peer_mapped"] is None and to_a["peer_udp6"] is None
        listing = {w["worker_id"]: w for w in (await debug(rv))["workers"]}
        assert listing[a.worker_id]["mapped"] == MAPPED and listing[a.worker_id]["udp6"] == UDP6
        for w in (a, b):
            await w.close()


async def test_hostile_mapping_and_udp6_are_refused_counted_and_never_forwarded() -> None:
    hostile = [
        {"mapped": {**MAPPED, "ip": "router.example"}},  # a name: never resolved
        {"mapped": {**MAPPED, "lifetime_s": 10**9}},  # an absurd lease
        {"mapped": {**MAPPED, "ip": "fe80::1%eth0"}},
        {"udp6": {"ip": "fe80::1%eth0", "port": 5000}},  # a zone of the sender's host
        {"udp6": {"ip": "host.example", "port": 5000}},
        {"udp6": {"ip": "198.51.100.1", "port": 5000}},  # not IPv6
        {"local_candidates": [{"ip": "fe80::1%2", "port": 5000}]},
    ]
    async with running_rendezvous() as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        await a.register()
        await b.register()
        for fields in hostile:
            await a.send(update("198.51.100.1", 5000, **fields))
            err = await a.expect("error")
            assert err["code"] == "bad_message", (fields, err)
        assert (await debug(rv, "stats"))["bad_messages"] == len(hostile)
        await b.send(update("198.51.100.2", 6000))
        await b.assert_silent()  # none of them stored an endpoint: b waits alone
        await a.send(update("198.51.100.1", 5000, mapped=MAPPED))  # an honest one pairs
        assert (await b.expect("p2p_connection_offer"))["peer_mapped"] == MAPPED
        for w in (a, b):
            await w.close()


async def test_serves_on_ipv6_loopback() -> None:
    server = await RendezvousServer.start("::1", 0, admin_token=ADMIN_TOKEN)
    try:
        assert server.ws_url.startswith("ws://[::1]:")
        a = await WsWorker.connect(server.ws_url)
        b = await WsWorker.connect(server.ws_url)
        assert (await a.register())["observed_ip"] == "::1"
        await b.register()
        await a.send(update("2001:db8:1::2", 5000))  # an IPv6-only endpoint is an endpoint
        await b.send(update("198.51.100.2", 6000, udp6={"ip": "2001:db8:2::2", "port": 6000}))
        assert (await b.expect("p2p_connection_offer"))["peer_udp_ip"] == "2001:db8:1::2"
        assert (await a.expect("p2p_connection_offer"))["peer_udp6"]["ip"] == "2001:db8:2::2"
        for w in (a, b):
            await w.close()
    finally:
        await server.close()


async def test_host_any_serves_both_families_and_reports_ipv4_clients_as_ipv4() -> None:
    # ``--host ::`` needs a token or --open (it is not loopback); the test only dials loopback.
    server = await RendezvousServer.start("::", 0, admin_token=ADMIN_TOKEN, open=True)
    try:
        assert server.ws_url.startswith("ws://[::1]:")
        v6 = await WsWorker.connect(server.ws_url)
        v4 = await WsWorker.connect(f"ws://127.0.0.1:{server.http_port}")
        assert (await v6.register())["observed_ip"] == "::1"
        # never ::ffff:127.0.0.1: the worker's fallback endpoint must pass the wire's checks
        assert (await v4.register())["observed_ip"] == "127.0.0.1"
        for w in (v6, v4):
            await w.close()
    finally:
        await server.close()


async def test_mapping_and_udp6_cross_instances_and_corrupt_stored_ones_read_as_none(
    redis_url: str,
) -> None:
    async with (
        running_rendezvous(redis_url=redis_url, **STEADY) as rv1,
        running_rendezvous(redis_url=redis_url, **STEADY) as rv2,
    ):
        a = await WsWorker.connect(rv1.ws_url)
        b = await WsWorker.connect(rv2.ws_url)
        await a.register()
        await b.register()
        await a.send(update("198.51.100.1", 1111, mapped=MAPPED, udp6=UDP6))
        await b.send(update("198.51.100.2", 2222))
        to_b = await b.expect("p2p_connection_offer")
        assert to_b["peer_mapped"] == MAPPED and to_b["peer_udp6"] == UDP6
        assert (await a.expect("p2p_connection_offer"))["peer_mapped"] is None
        # Redis is shared: what another writer stored is checked again like on the wire
        c = await WsWorker.connect(rv1.ws_url)
        d = await WsWorker.connect(rv2.ws_url)
        await c.register()
        await d.register()
        await c.send(update("198.51.100.3", 3333, mapped=MAPPED, udp6=UDP6))
        client = aioredis.Redis.from_url(redis_url)
        try:
            key = f"p2plab:rv:w:{c.worker_id}"
            await client.hset(key, "mapped", json.dumps({**MAPPED, "ip": "evil.example"}))
            await client.hset(key, "udp6", json.dumps({"ip": "fe80::1%eth0", "port": 1}))
        finally:
            await client.aclose()
        await d.send(update("198.51.100.4", 4444))
        to_d = await d.expect("p2p_connection_offer")
        assert to_d["peer_worker_id"] == c.worker_id
        assert to_d["peer_mapped"] is None and to_d["peer_udp6"] is None
        assert (await debug(rv2, "stats"))["corrupt_endpoints"] == 2
        for w in (a, b, c, d):
            await w.close()


async def test_a_paired_workers_new_mapping_reaches_its_peer_in_a_fresh_offer() -> None:
    async with running_rendezvous() as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        await a.register()
        await b.register()
        await a.send(update("198.51.100.1", 5000, mapped=MAPPED))
        await b.send(update("198.51.100.2", 6000))
        await a.expect("p2p_connection_offer")
        await b.expect("p2p_connection_offer")
        # the same endpoint again: stored, nothing sent (as before)
        await a.send(update("198.51.100.1", 5000, mapped=MAPPED))
        await b.assert_silent()
        # the lease was replaced at another port: the peer hears of it, with a's role unchanged
        moved = {**MAPPED, "port": 42000}
        await a.send(update("198.51.100.1", 5000, mapped=moved))
        again = await b.expect("p2p_connection_offer")
        assert again["peer_worker_id"] == a.worker_id and again["peer_mapped"] == moved
        assert again["role"] == "controlled"  # a registered first: it stays controlling
        await a.assert_silent()
        for w in (a, b):
            await w.close()


async def test_a_paired_workers_new_udp6_crosses_instances(redis_url: str) -> None:
    async with (
        running_rendezvous(redis_url=redis_url, **STEADY) as rv1,
        running_rendezvous(redis_url=redis_url, **STEADY) as rv2,
    ):
        a = await WsWorker.connect(rv1.ws_url)
        b = await WsWorker.connect(rv2.ws_url)
        await a.register()
        await b.register()
        await a.send(update("198.51.100.1", 1111))
        await b.send(update("198.51.100.2", 2222))
        await a.expect("p2p_connection_offer")
        await b.expect("p2p_connection_offer")
        await b.send(update("198.51.100.2", 2222))  # unchanged: nothing
        await a.assert_silent()
        await b.send(update("198.51.100.2", 2222, udp6=UDP6))
        again = await a.expect("p2p_connection_offer")
        assert again["peer_worker_id"] == b.worker_id and again["peer_udp6"] == UDP6
        assert again["role"] == "controlling"
        for w in (a, b):
            await w.close()
