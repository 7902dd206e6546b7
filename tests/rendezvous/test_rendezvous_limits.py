"""Closed by default, and limits one client cannot multiply (issue 14 findings 1, 2, 8, 12).

Each test is hostile: it does what an attacker did against the old defaults and counts what
got through.  Several source addresses come from binding clients to 127.0.0.x (all loopback).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import sys

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from p2plab.core.addresses import source_key
from p2plab.errors import ConfigError
from rendezvous_service_code.limits import PerIpLimits
from rendezvous_service_code.main import RendezvousServer, Settings, create_app
from rendezvous_service_code.settings import check_exposure, exposure_warning, is_loopback
from tests.rendezvous_fixtures import WsWorker, debug, new_identity, running_rendezvous


def _from(ip: str) -> dict[str, object]:
    """Connect options for a client whose source address is ``ip`` (a 127.0.0.x)."""
    return {"local_addr": (ip, 0)}


# -- closed unless opened on purpose (finding 1, 2) ---------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.10", "rendezvous.example"])
def test_beyond_loopback_without_a_token_refuses_to_start(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(host=host)
    text = str(info.value)
    assert "\n" not in text and "--token" in text and "--open" in text
    # a token, room tokens, or --open on purpose: it starts
    for ok in ({"token": "t"}, {"room_tokens": {"lab": "t"}}, {"open": True}):
        assert Settings(host=host, **ok).host == host  # type: ignore[arg-type]


def test_open_on_purpose_is_one_warning_line() -> None:
    text = exposure_warning("0.0.0.0", Settings(host="0.0.0.0", open=True))
    assert text is not None and "OPEN" in text and "\n" not in text
    assert exposure_warning("0.0.0.0", Settings(host="0.0.0.0", token="t")) is None
    assert exposure_warning("127.0.0.1", Settings(open=True)) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "::1", "localhost"])
def test_loopback_runs_as_before(host: str) -> None:
    assert is_loopback(host)
    check_exposure(host, Settings())


def test_the_default_is_loopback_and_closed_debug() -> None:
    s = Settings()
    assert s.host == "127.0.0.1" and s.admin_token is None and not s.open
    assert s.register_timeout_s == 10 and s.max_connections_per_ip == 20


async def test_the_in_process_server_checks_the_address_it_binds() -> None:
    # settings.host is loopback, but the address actually bound is not: refused before binding
    with pytest.raises(ConfigError, match="without a token"):
        await RendezvousServer.start("0.0.0.0", 0)


@pytest.mark.parametrize("env", [{"HOST": "0.0.0.0"}, {"HOST": "::"}])
def test_the_environment_of_the_image_without_a_token_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"refusing to serve.*--open"):
        Settings.load({}, env)


def test_p2plab_rendezvous_on_every_address_without_a_token_is_one_line() -> None:
    # One real process (the console entry point); the environment's forms are checked above.
    clean = {k: v for k, v in os.environ.items() if k not in ("P2P_TOKEN", "P2P_OPEN", "HOST")}
    res = subprocess.run(
        [sys.executable, "-m", "p2plab", "rendezvous", "--port", "0", "--host", "0.0.0.0"],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to serve" in lines[0] and "--open" in lines[0]


async def test_debug_endpoints_are_404_without_an_admin_token() -> None:
    async with running_rendezvous(admin_token=None) as rv:
        w = await WsWorker.connect(rv.ws_url)
        await w.register(identity=new_identity())
        async with httpx.AsyncClient(base_url=rv.url) as http:
            for path in ("/debug/list_workers", "/debug/stats"):
                r = await http.get(path)
                assert r.status_code == 404 and w.worker_id not in r.text
                bearer = {"Authorization": "Bearer anything"}
                assert (await http.get(path, headers=bearer)).status_code == 404
            assert (await http.get("/health")).status_code == 200
        await w.close()


# -- per-IP connection caps (finding 8: one IP took all 300 slots) -----------------------------


async def test_one_address_cannot_take_every_slot() -> None:
    async with running_rendezvous(max_workers=30) as rv:
        hog = [await WsWorker.connect(rv.ws_url, **_from("127.0.0.3")) for _ in range(20)]
        for w in hog:
            await w.register()
        extra = await WsWorker.connect(rv.ws_url, **_from("127.0.0.3"))
        code, reason = await extra.wait_closed()
        assert (code, reason) == (1013, "too many connections from your address")
        assert extra.challenge is None  # refused before any work (no key made for it)
        # a real worker elsewhere still gets in
        real = await WsWorker.connect(rv.ws_url, **_from("127.0.0.4"))
        assert (await real.register(identity=new_identity()))["worker_id"] == real.worker_id
        stats = await debug(rv, "stats")
        assert stats["refused_ip_connections"] == 1 and stats["registered"] == 21
        # a slot of the hog frees when one of its connections goes
        await hog[0].close()
        for _ in range(100):
            again = await WsWorker.connect(rv.ws_url, **_from("127.0.0.3"))
            if again.challenge is not None:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the slot never freed")
        await again.register()
        for w in [*hog[1:], real, again]:
            await w.close()


async def test_new_connections_per_address_per_minute() -> None:
    async with running_rendezvous(connections_per_ip_per_min=4) as rv:
        for _ in range(4):
            w = await WsWorker.connect(rv.ws_url, **_from("127.0.0.5"))
            await w.register()
            await w.close()
        churn = await WsWorker.connect(rv.ws_url, **_from("127.0.0.5"))
        assert await churn.wait_closed() == (
            1013,
            "too many new connections from your address; try again later",
        )
        other = await WsWorker.connect(rv.ws_url, **_from("127.0.0.6"))
        await other.register()
        assert (await debug(rv, "stats"))["refused_ip_rate"] == 1
        await other.close()


# -- token guesses (finding 8: ~800 guesses/s unthrottled) ------------------------------------


async def test_token_guesses_are_throttled_per_address() -> None:
    async with running_rendezvous(token="s3cret") as rv:
        guesses = 0
        refused_early = 0
        for i in range(12):
            w = await WsWorker.connect(rv.ws_url, **_from("127.0.0.7"))
            if w.challenge is None:
                code, reason = await w.wait_closed()
                assert code == 1013 and reason is not None and "token failures" in reason
                refused_early += 1
                continue
            guesses += 1
            await w.send({"type": "register", "token": f"guess{i}"})
            assert await w.wait_closed() == (1008, "invalid token")
        assert guesses == 5 and refused_early == 7
        # once throttled, even the right token from there waits (the guesser cannot tell)
        late = await WsWorker.connect(rv.ws_url, **_from("127.0.0.7"))
        assert (await late.wait_closed())[0] == 1013
        # another address is not affected
        ok = await WsWorker.connect(rv.ws_url, **_from("127.0.0.8"))
        await ok.register(token="s3cret")
        stats = await debug(rv, "stats")
        assert stats["refused_token"] == 5 and stats["refused_token_throttled"] == 8
        await ok.close()


async def test_admin_token_guesses_are_throttled_too() -> None:
    async with running_rendezvous(admin_token="adm") as rv:
        async with httpx.AsyncClient(base_url=rv.url) as http:
            codes = [
                (
                    await http.get("/debug/stats", headers={"Authorization": f"Bearer g{i}"})
                ).status_code
                for i in range(8)
            ]
            assert codes == [401] * 5 + [429] * 3
            right = {"Authorization": "Bearer adm"}
            assert (await http.get("/debug/stats", headers=right)).status_code == 429


# -- relay budgets per IP and in total (finding 8: 2000 pairs carried ~250 Mbit/s) --------------


async def _pairs(rv: RendezvousServer, n: int, ip: str) -> list[tuple[WsWorker, WsWorker]]:
    pairs = []
    for i in range(n):
        a = await WsWorker.connect(rv.ws_url, **_from(ip))
        b = await WsWorker.connect(rv.ws_url, **_from(ip))
        room = f"{ip}-{i}"
        await a.register(room=room)
        await b.register(room=room)
        await a.update_endpoint("203.0.113.1", 1000 + i)
        await b.update_endpoint("203.0.113.2", 2000 + i)
        await a.expect("p2p_connection_offer")
        await b.expect("p2p_connection_offer")
        pairs.append((a, b))
    return pairs


async def _relay_from_each(pairs: list[tuple[WsWorker, WsWorker]], count: int) -> None:
    data = base64.b64encode(os.urandom(4000)).decode()
    for a, b in pairs:
        for _ in range(count):
            await a.send({"type": "relay", "to": b.worker_id, "data": data})


async def test_many_pairs_from_one_address_share_its_relay_budget() -> None:
    # The per-connection budget alone would pass all 10 x 5 datagrams (200 kB at once); the
    # address's budget (burst: one 8 KiB datagram's worth at this tiny rate) passes two.
    async with running_rendezvous(
        relay_bytes_per_s=1e6, relay_burst_bytes=1e6, relay_ip_bytes_per_s=1.0, max_workers=100
    ) as rv:
        pairs = await _pairs(rv, 10, "127.0.0.9")
        await _relay_from_each(pairs, 5)
        others = await _pairs(rv, 1, "127.0.0.10")
        await _relay_from_each(others, 1)  # another address has its own budget
        got = await others[0][1].expect("relay")
        assert got["from"] == others[0][0].worker_id
        stats = await debug(rv, "stats")
        assert stats["relayed"] == 2 + 1 and stats["relayed_bytes"] == 3 * 4000
        assert stats["relay_ip_limited"] == 48
        for pair in [*pairs, *others]:
            for w in pair:
                await w.close()


async def test_the_instance_has_a_total_relay_budget() -> None:
    async with running_rendezvous(
        relay_bytes_per_s=1e6,
        relay_burst_bytes=1e6,
        relay_ip_bytes_per_s=1e6,
        relay_total_bytes_per_s=1.0,
        max_workers=100,
    ) as rv:
        pairs = [*await _pairs(rv, 2, "127.0.0.11"), *await _pairs(rv, 2, "127.0.0.12")]
        await _relay_from_each(pairs, 3)
        err = await pairs[0][0].expect("error")
        assert err["code"] == "relay_rate_limited" and "the service" in err["message"]
        stats = await debug(rv, "stats")
        assert stats["relayed"] == 2 and stats["relay_total_limited"] == 10
        for pair in pairs:
            for w in pair:
                await w.close()


def test_limits_count_ipv6_per_64_and_forget_idle_sources() -> None:
    assert (
        source_key("2001:db8:1:2:aaaa::1")
        == source_key("2001:db8:1:2:bbbb::2")
        == "2001:db8:1:2::/64"
    )
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1" and source_key("192.0.2.1") == "192.0.2.1"
    lim = PerIpLimits(
        max_connections=1,
        connections_per_min=60,
        token_failures_per_min=5,
        relay_bytes_per_s=1e4,
        relay_total_bytes_per_s=1e5,
        now=0.0,
    )
    assert lim.admit("2001:db8::1", 0.0) is None
    assert lim.admit("2001:db8::2", 0.0) == "connections"  # the same /64
    lim.release("2001:db8::1")
    for i in range(5000):  # a spray of sources, each gone at once
        assert lim.admit(f"10.{i // 250}.{i % 250}.1", float(i)) is None
        lim.release(f"10.{i // 250}.{i % 250}.1")
    assert len(lim) <= 4096  # idle entries are pruned: memory bounded whatever the sources


# -- /health and Redis (finding 12) ------------------------------------------------------------


async def test_health_is_503_while_redis_is_down(redis_url: str) -> None:
    async with running_rendezvous(
        redis_url=redis_url, redis_heartbeat_s=0.3, redis_ttl_s=1.5
    ) as rv:
        async with httpx.AsyncClient(base_url=rv.url) as http:
            r = await http.get("/health")
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
            admin = aioredis.Redis.from_url(redis_url)
            with contextlib.suppress(Exception):  # the server may go away mid-answer
                await admin.shutdown(nosave=True)
            await admin.aclose()
            for _ in range(50):  # until the process has closed its port
                r = await http.get("/health")
                if r.status_code != 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "unhealthy" and "redis" in body["reason"]
        # and registration indeed fails meanwhile: the 503 is not a false alarm
        w = await WsWorker.connect(rv.ws_url)
        await w.send({"type": "register"})
        with pytest.raises(ConnectionClosed):
            await w.recv()  # closed, never "registered"


def test_health_on_memory_is_200() -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app()) as client:
        assert client.get("/health").json() == {"status": "ok"}
