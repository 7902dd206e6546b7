"""Relay fallback through the rendezvous when hole punching fails (loopback, real sockets).

Punching is made impossible on loopback with a datagram hook that drops every peer datagram a
worker receives over UDP (STUN still works: it never reaches the hooks).  The workers must then
carry their sealed datagrams as ``relay`` messages through the rendezvous.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from p2plab.aio.bench import Benchmark, start_benchmark_from_ui
from p2plab.aio.bench.route import relay_cap
from p2plab.aio.endpoint import Address
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.config import SessionConfig
from p2plab.core.signaling import MAX_RELAY_BYTES, RelayIn
from p2plab.errors import NotConnected
from rendezvous_service_code.main import RendezvousServer
from rendezvous_service_code.registry import SendMessage
from tests.conftest import TIMEOUT_UNIT
from tests.rendezvous_fixtures import WsWorker, loopback_worker_config, running_rendezvous

T = 15 * TIMEOUT_UNIT
REDIS_FAST = {"redis_heartbeat_s": 0.3, "redis_ttl_s": 1.5}


class DropAll:
    """A datagram hook that drops (and counts) every peer datagram: no direct path exists."""

    def __init__(self) -> None:
        self.dropped = 0

    def __call__(self, data: bytes, addr: Address) -> bool:
        self.dropped += 1
        return True


def worker_config(rv: RendezvousServer, **kw: Any) -> WorkerConfig:
    defaults = {"nat_report": False, "session": SessionConfig(punch_timeout=1.0)}
    return loopback_worker_config(rv, **{**defaults, **kw})


@contextlib.asynccontextmanager
async def blocked_workers(
    rv_a: RendezvousServer, rv_b: RendezvousServer, **kw: Any
) -> AsyncIterator[tuple[Worker, Worker, DropAll, DropAll]]:
    """Two workers whose UDP peer datagrams are all dropped; b starts after a (controlled)."""
    kw_a = {k[2:]: v for k, v in kw.items() if k.startswith("a_")}
    kw_b = {k[2:]: v for k, v in kw.items() if k.startswith("b_")}
    common = {k: v for k, v in kw.items() if not k.startswith(("a_", "b_"))}
    a = Worker(worker_config(rv_a, **{**common, **kw_a}))
    b = Worker(worker_config(rv_b, **{**common, **kw_b}))
    drop_a, drop_b = DropAll(), DropAll()
    a.datagram_hooks.append(drop_a)
    b.datagram_hooks.append(drop_b)
    await a.start()
    try:
        await b.start()
        try:
            yield a, b, drop_a, drop_b
        finally:
            await b.stop()
    finally:
        await a.stop()


class Inbox:
    """Every UI message of one worker from now on."""

    def __init__(self, worker: Worker) -> None:
        self.queue = worker.ui_subscribe()
        self.seen: list[dict[str, Any]] = []

    def _drain(self) -> None:
        while not self.queue.empty():
            self.seen.append(self.queue.get_nowait())

    async def wait(self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while True:
                self._drain()
                if pred(self.seen):
                    return
                self.seen.append(await self.queue.get())

    def chats_in(self) -> list[str]:
        self._drain()
        return [m["text"] for m in self.seen if m["type"] == "chat" and m["direction"] == "in"]

    def delivered(self) -> set[str]:
        self._drain()
        return {m["id"] for m in self.seen if m["type"] == "chat_delivered"}


def record_relayed(rv: RendezvousServer) -> list[bytes]:
    """Datagrams the rendezvous passes on (what it can see of the relayed traffic)."""
    assert rv.app is not None
    hub = rv.app.state.hub
    seen: list[bytes] = []
    dispatch = hub.dispatch

    async def spy(actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, SendMessage) and isinstance(action.message, RelayIn):
                seen.append(action.message.payload())
        await dispatch(actions)

    hub.dispatch = spy
    return seen


async def chat_both_ways(a: Worker, b: Worker, n: int = 5) -> None:
    """``n`` chats each way: each arrives exactly once and is acknowledged."""
    in_a, in_b = Inbox(a), Inbox(b)
    a_texts = [f"from a #{i} {os.urandom(4).hex()}" for i in range(n)]
    b_texts = [f"from b #{i} {os.urandom(4).hex()}" for i in range(n)]
    a_ids = [a.send_chat(t) for t in a_texts]
    b_ids = [b.send_chat(t) for t in b_texts]
    await in_b.wait(lambda _: len(set(in_b.chats_in())) >= n, T)
    await in_a.wait(lambda _: len(set(in_a.chats_in())) >= n, T)
    await in_a.wait(lambda _: set(a_ids) <= in_a.delivered(), T)
    await in_b.wait(lambda _: set(b_ids) <= in_b.delivered(), T)
    # Listen a little longer for duplicates (retransmissions must not be delivered twice).
    await asyncio.sleep(0.5)
    assert sorted(in_b.chats_in()) == sorted(a_texts)
    assert sorted(in_a.chats_in()) == sorted(b_texts)


async def test_failed_punch_falls_back_to_the_relay_and_chat_works() -> None:
    async with running_rendezvous(stun_port=0) as rv:
        relayed = record_relayed(rv)
        session = SessionConfig(punch_timeout=1.0, keepalive_interval=0.3)
        async with blocked_workers(rv, rv, session=session) as (a, b, drop_a, drop_b):
            await a.wait_for_state("relayed", timeout=T)
            await b.wait_for_state("relayed", timeout=T)
            assert drop_a.dropped > 0 and drop_b.dropped > 0  # punching really was tried
            for w, peer in ((a, b), (b, a)):
                st = w.status()
                assert st["state"] == "relayed"
                assert st["path"] == "relay"
                assert st["peer"]["worker_id"] == peer.worker_id
                assert st["peer"]["endpoint"] == "relay"
                assert st["security"]["encrypted"] is True
            await chat_both_ways(a, b)
            # Keep-alives and RTT run over the relay too.
            # (each keep-alive answer updates the RTT, which publishes a status)
            ka = a.status()["stats"]["session"]["keepalive_acks_received"]
            statuses = Inbox(a)
            await statuses.wait(
                lambda seen: any(
                    m["type"] == "status" and m["stats"]["session"]["keepalive_acks_received"] > ka
                    for m in seen
                ),
                T,
            )
            assert a.status()["peer"]["rtt_ms"] is not None
            assert b.status()["peer"]["rtt_ms"] is not None
            # Benchmarks run over the relay too (issue 17), at a small rate, path "relay".
            r = await Benchmark(a).run(duration_s=1, payload_size=600, rate_mbps=0.05)
            # Under the relay's budget: not clamped (a loaded machine may still fall short of the
            # 10 datagrams a second and say so: CI once sent 9, "short of target").
            assert r.path == "relay" and "relay budget" not in r.note
            assert r.rate_mbps == pytest.approx(0.05)
            assert r.peer_view is not None and r.peer_view.path == "relay"
            assert r.peer_view.packets_received > 0
            # Faster than the relay's budget: paced under it and said so, never a crash.
            fast = await Benchmark(a).run(duration_s=0.5, payload_size=600)
            assert fast.path == "relay" and "relay budget" in fast.note
            assert fast.rate_mbps == pytest.approx(relay_cap(600))
            with pytest.raises(ValueError, match="relay carries"):
                await Benchmark(a).run(duration_s=0.5, payload_size=9000)
            assert b.stats.get("bench_unclaimed", 0) == 0
            started = await start_benchmark_from_ui(
                a, {"type": "start_benchmark", "duration_s": 0.3, "payload_size": 600}
            )
            assert started is None  # no refusal: it runs at the relay's pace
            await asyncio.sleep(1.5)
        assert rv.app is not None
        stats = rv.app.state.hub.stats
        assert stats.relayed > 0 and stats.relayed_bytes > 0
    # End to end encryption: the rendezvous never saw a chat text.
    assert relayed
    assert not any(b"from a #" in d or b"from b #" in d for d in relayed)


async def test_a_side_that_still_punches_follows_the_peer_onto_the_relay() -> None:
    """b would punch for 60 s; a gives up after 1 s and b must follow at a's first datagram."""
    async with running_rendezvous(stun_port=0) as rv:
        async with blocked_workers(
            rv,
            rv,
            a_session=SessionConfig(punch_timeout=1.0),
            b_session=SessionConfig(punch_timeout=60.0),
        ) as (a, b, _, _):
            await a.wait_for_state("relayed", timeout=T)
            await b.wait_for_state("relayed", timeout=T)
            assert b.stats["relay_switches"] == 1
            await chat_both_ways(a, b, n=3)


async def test_without_relay_the_pair_ends_lost_as_before() -> None:
    async with running_rendezvous(stun_port=0) as rv:
        async with blocked_workers(rv, rv, relay=False) as (a, b, _, _):
            states: dict[str, list[str]] = {"a": [], "b": []}
            qa, qb = a.ui_subscribe(), b.ui_subscribe()
            await a.wait_for_state("punching", timeout=T)
            await a.wait_for_state("waiting_for_peer", timeout=T)
            await b.wait_for_state("waiting_for_peer", timeout=T)
            await asyncio.sleep(0.5)
            for name, q in (("a", qa), ("b", qb)):
                while not q.empty():
                    m = q.get_nowait()
                    if m["type"] == "status":
                        states[name].append(m["state"])
            assert "lost" in states["a"] and "lost" in states["b"]
            for w in (a, b):
                assert w.state == "waiting_for_peer"
                assert w.stats["relay_switches"] == 0
                assert w.status()["path"] is None
                with pytest.raises(NotConnected):
                    w.send_chat("nobody hears this")
        assert rv.app is not None
        assert rv.app.state.hub.stats.relayed == 0


def _relay(to: str, data: bytes) -> dict[str, Any]:
    return {"type": "relay", "to": to, "data": base64.b64encode(data).decode()}


async def test_rendezvous_relays_only_within_a_pair_and_bounds_the_size() -> None:
    async with running_rendezvous() as rv:
        assert rv.app is not None
        stats = rv.app.state.hub.stats
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        c = await WsWorker.connect(rv.ws_url)
        try:
            # Before registering, a relay message is a protocol error.
            await c.send(_relay(a.worker_id, b"x"))
            assert (await c.expect("error"))["code"] == "bad_message"
            await a.register()
            await b.register()
            await c.register(room="elsewhere")
            await a.update_endpoint("127.0.0.1", 40001)
            await b.update_endpoint("127.0.0.1", 40002)
            await c.update_endpoint("127.0.0.1", 40003)
            await a.expect("p2p_connection_offer")
            await b.expect("p2p_connection_offer")

            # Within the pair: passed on with the sender's id.
            await a.send(_relay(b.worker_id, b"sealed bytes"))
            got = await b.expect("relay")
            assert got["from"] == a.worker_id
            assert base64.b64decode(got["data"]) == b"sealed bytes"
            assert "to" not in got

            # Not paired: dropped, counted, one error per episode.
            await c.send(_relay(a.worker_id, b"let me in"))
            err = await c.expect("error")
            assert err["code"] == "relay_refused"
            await c.send(_relay(b.worker_id, b"again"))
            await a.send(_relay(c.worker_id, b"to a stranger"))
            assert (await a.expect("error"))["code"] == "relay_refused"
            await a.send(_relay(a.worker_id, b"to myself"))
            await a.send(_relay("no-such-worker", b"to nobody"))
            await c.assert_silent()
            assert stats.relay_refused == 5

            # Too large (decoded) or not base64: bad_message, nothing passed on.
            await a.send(_relay(b.worker_id, b"z" * (MAX_RELAY_BYTES + 1)))
            assert (await a.expect("error"))["code"] == "bad_message"
            await a.send({"type": "relay", "to": b.worker_id, "data": "not base64!"})
            assert (await a.expect("error"))["code"] == "bad_message"
            # The largest allowed datagram goes through; the pair is still served.
            big = os.urandom(MAX_RELAY_BYTES)
            await a.send(_relay(b.worker_id, big))
            got = await b.expect("relay")
            assert base64.b64decode(got["data"]) == big
            await b.assert_silent()
            assert stats.relayed == 2
            assert stats.relayed_bytes == len(b"sealed bytes") + MAX_RELAY_BYTES
        finally:
            for w in (a, b, c):
                await w.close()


async def test_relay_byte_budget_stops_bulk_transfer() -> None:
    async with running_rendezvous(relay_bytes_per_s=100.0, relay_burst_bytes=20000.0) as rv:
        assert rv.app is not None
        stats = rv.app.state.hub.stats
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        try:
            await a.register()
            await b.register()
            await a.update_endpoint("127.0.0.1", 40001)
            await b.update_endpoint("127.0.0.1", 40002)
            await a.expect("p2p_connection_offer")
            await b.expect("p2p_connection_offer")
            for _ in range(5):
                await a.send(_relay(b.worker_id, os.urandom(8000)))
            assert (await a.expect("error"))["code"] == "relay_rate_limited"
            await a.assert_silent()  # one error per episode
            passed = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    await b.expect("relay", wait_s=0.5)
                    passed += 1
            assert passed == 2  # 20000 bytes of burst: two datagrams of 8000
            assert stats.relayed == 2 and stats.relay_rate_limited == 3
        finally:
            await a.close()
            await b.close()


async def test_relay_can_be_turned_off_at_the_rendezvous() -> None:
    async with running_rendezvous(stun_port=0, relay=False) as rv:
        async with blocked_workers(rv, rv) as (a, b, _, _):
            errors = Inbox(a)
            await a.wait_for_state("waiting_for_peer", "lost", timeout=T)
            await errors.wait(
                lambda seen: any("does not relay" in m.get("message", "") for m in seen), T
            )
            assert a.state != "relayed" and b.state != "relayed"
        assert rv.app is not None
        assert rv.app.state.hub.stats.relayed == 0
        assert rv.app.state.hub.stats.relay_refused > 0


# -- several instances through Redis ------------------------------------------------------------


async def test_relay_across_two_rendezvous_instances(redis_url: str) -> None:
    async with (
        running_rendezvous(redis_url=redis_url, **REDIS_FAST, stun_port=0) as rv1,
        running_rendezvous(redis_url=redis_url, **REDIS_FAST, stun_port=0) as rv2,
    ):
        async with blocked_workers(rv1, rv2) as (a, b, _, _):
            await a.wait_for_state("relayed", timeout=T)
            await b.wait_for_state("relayed", timeout=T)
            assert a.status()["path"] == b.status()["path"] == "relay"
            await chat_both_ways(a, b)
        assert rv1.app is not None and rv2.app is not None
        # Each instance relayed its own worker's datagrams to the other instance.
        assert rv1.app.state.hub.stats.relayed > 0
        assert rv2.app.state.hub.stats.relayed > 0


async def test_redis_backend_refuses_unpaired_relay(redis_url: str) -> None:
    async with (
        running_rendezvous(redis_url=redis_url, **REDIS_FAST) as rv1,
        running_rendezvous(redis_url=redis_url, **REDIS_FAST) as rv2,
    ):
        a = await WsWorker.connect(rv1.ws_url)
        b = await WsWorker.connect(rv2.ws_url)
        c = await WsWorker.connect(rv2.ws_url)
        try:
            await a.register()
            await b.register()
            await c.register(room="other")
            await a.update_endpoint("127.0.0.1", 40001)
            await b.update_endpoint("127.0.0.1", 40002)
            await c.update_endpoint("127.0.0.1", 40003)
            await a.expect("p2p_connection_offer")
            await b.expect("p2p_connection_offer")
            await c.send(_relay(a.worker_id, b"hi"))
            assert (await c.expect("error"))["code"] == "relay_refused"
            await a.send(_relay(b.worker_id, b"across"))
            got = await b.expect("relay")
            assert got["from"] == a.worker_id and base64.b64decode(got["data"]) == b"across"
            await a.assert_silent()
        finally:
            for w in (a, b, c):
                await w.close()


async def test_worker_drops_relayed_datagrams_it_cannot_use() -> None:
    """From a stranger, garbage from the peer, or with relay off: dropped, counted, no crash."""
    async with running_rendezvous(stun_port=0) as rv:
        async with blocked_workers(rv, rv) as (a, b, _, _):
            await a.wait_for_state("relayed", timeout=T)
            await b.wait_for_state("relayed", timeout=T)
            stranger = RelayIn.model_validate(
                {"from": "someone-else", "data": base64.b64encode(b"x" * 40).decode()}
            )
            await a._on_rendezvous_message(stranger)
            assert a.stats["relay_dropped"] == 1
            assert b.worker_id == a.peer_id
            session = a.status()["stats"]["session"]
            bad_before = session["dropped_malformed"] + session["dropped_unauthenticated"]
            for junk in (b"", b"\x00" * 3, os.urandom(200), b"\xd7\x50\x01\x01" + os.urandom(60)):
                forged = RelayIn.model_validate(
                    {"from": b.worker_id, "data": base64.b64encode(junk).decode()}
                )
                await a._on_rendezvous_message(forged)
            session = a.status()["stats"]["session"]
            dropped = (
                session["dropped_malformed"]
                + session["dropped_unauthenticated"]
                + session["dropped_unknown_type"]
            )
            assert dropped - bad_before >= 3
            assert a.state == "relayed" and a.stats["relay_switches"] == 1
            await chat_both_ways(a, b, n=2)
    async with running_rendezvous(stun_port=0) as rv:
        async with blocked_workers(rv, rv, a_relay=False) as (a, b, _, _):
            in_b = Inbox(b)
            # b falls back to the relay, but a does not relay: b's relayed probes go unanswered
            # and b gives up too.
            await in_b.wait(
                lambda seen: any(
                    m["type"] == "status"
                    and m["state"] == "waiting_for_peer"
                    and m["stats"]["relay_switches"] == 1
                    for m in seen
                ),
                T,
            )
            assert a.stats["relay_dropped"] > 0 and a.stats["relay_switches"] == 0
            assert a.state != "relayed" and b.state != "relayed"
