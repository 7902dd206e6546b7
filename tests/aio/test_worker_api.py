"""The worker's Python API on loopback: extensions (the WorkerHost side), public event
subscriptions, ``await chat()``, ``id`` and the HTTP default."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import p2plab
from p2plab.aio.endpoint import Address
from p2plab.aio.extension import Extension, WorkerHost
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.errors import ChatFailedError, NotConnected
from tests.conftest import TIMEOUT_UNIT, until
from tests.rendezvous_fixtures import loopback_worker_config, running_rendezvous

T = 10 * TIMEOUT_UNIT


class Recorder(Extension):
    """An extension that records every hook call and claims ``ping``/``pong`` controls."""

    name = "recorder"
    control_types = frozenset({"ping", "pong"})

    def __init__(self, swallow: bytes | None = None) -> None:
        self.host: WorkerHost | None = None
        self.controls: list[dict[str, Any]] = []
        self.states: list[str] = []
        self.swallowed = 0
        self.swallow = swallow
        self.closed = False

    def attach(self, host: WorkerHost) -> None:
        self.host = host

    def on_control(self, obj: dict[str, Any]) -> None:
        self.controls.append(obj)
        if obj["type"] == "ping" and self.host is not None:
            self.host.send_control({"type": "pong", "n": obj["n"]})
            self.host.count("pings_answered")
            self.host.emit(ev.BenchmarkProgress(1, "receiver", 0.5, 1.0, 0))

    def on_datagram(self, data: bytes, addr: Address) -> bool:
        if self.swallow is not None and data.startswith(self.swallow):
            self.swallowed += 1
            return True
        return False

    def on_link_changed(self, state: str) -> None:
        self.states.append(state)

    async def close(self) -> None:
        self.closed = True


@asynccontextmanager
async def pair(
    ext_a: list[Extension] | None = None, ext_b: list[Extension] | None = None, **kw: Any
) -> AsyncIterator[tuple[Worker, Worker]]:
    async with running_rendezvous(0, stun_port=0) as rv:
        a = Worker(loopback_worker_config(rv, **kw), extensions=ext_a)
        b = Worker(loopback_worker_config(rv, **kw), extensions=ext_b)
        await a.start()
        await b.start()
        try:
            await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
            yield a, b
        finally:
            await a.stop()
            await b.stop()


async def test_extensions_are_attached_get_their_controls_datagrams_and_link_changes() -> None:
    ra, rb = Recorder(), Recorder(swallow=b"SWALLOW")
    async with pair([ra], [rb]) as (a, b):
        assert ra.host is a and isinstance(a, WorkerHost)
        assert a.extension("recorder") is ra and a.extension("nope") is None
        assert rb.states[-1] == "connected" and "punching" in rb.states
        assert a.peer_address is not None and a.peer_sealer is not None and a.path == "direct"
        async with a.subscribe(ev.BenchmarkProgress) as at_a, b.subscribe() as at_b:
            a.send_control({"type": "ping", "n": 7})
            await until(lambda: ra.controls == [{"type": "pong", "n": 7}], "the pong")
            assert rb.controls == [{"type": "ping", "n": 7}]
            assert b.stats["pings_answered"] == 1
            # b's extension emitted a public event to b's subscribers, not to a's
            assert await anext(at_b) == ev.BenchmarkProgress(1, "receiver", 0.5, 1.0, 0)
            assert at_a.queue.empty()
        # a control no extension claims is dropped and counted
        a.send_control({"type": "unclaimed"})
        await until(lambda: b.stats["controls_unknown"] == 1, "the count")
        # a datagram an extension consumes never reaches the engine
        assert a.endpoint is not None and b.endpoint is not None

        def drops() -> int:
            stats = b.status()["stats"]["session"]
            return sum(v for k, v in stats.items() if k.startswith("dropped"))

        before = drops()
        a.endpoint.sendto(b"SWALLOW-me", b.endpoint.local_address)
        a.endpoint.sendto(b"junk", b.endpoint.local_address)  # not claimed: the session drops it
        await until(lambda: drops() == before + 1, "the junk dropped")
        assert rb.swallowed == 1 and drops() == before + 1
    assert ra.closed and rb.closed and ra.states[-1] == "stopped"


async def test_subscribe_then_chat_returns_once_delivered() -> None:
    async with pair() as (a, b):
        assert a.id == a.worker_id
        async with b.subscribe(p2plab.ChatReceived) as chats:
            delivered = await a.chat("hello", timeout=T)
            msg = await asyncio.wait_for(anext(chats), T)
        assert isinstance(delivered, ev.ChatDelivered) and delivered.msg_id == msg.msg_id
        assert msg.text == "hello" and msg.peer_id == a.id


async def test_subscribe_filters_kinds_and_all_kinds_without_arguments() -> None:
    async with pair() as (a, b):
        async with b.subscribe() as everything, b.subscribe(ev.StateChanged) as states:
            await a.chat("x", timeout=T)
            await until(lambda: not everything.queue.empty(), "an event")
            await a.stop()
            await b.wait_for_state("waiting_for_peer", timeout=T)
            seen = [await asyncio.wait_for(anext(states), T) for _ in range(2)]
            assert [s.state for s in seen] == ["lost", "waiting_for_peer"]
            kinds = set()
            while not everything.queue.empty():
                kinds.add(type(await anext(everything)).__name__)
            assert {"ChatReceived", "PeerClosed", "StateChanged"} <= kinds


async def test_chat_raises_when_the_message_is_given_up() -> None:
    quick = SessionConfig(chat_give_up_s=0.5, rto_initial=0.1, peer_timeout=30.0)
    deaf = Recorder()
    async with pair(None, [deaf], session=quick) as (a, _):
        deaf.swallow = b""  # b hears nothing from now on
        with pytest.raises(ChatFailedError, match="failed") as info:
            await a.chat("into the void", timeout=T)
        assert info.value.reason in ("retransmit limit", "timeout")


async def test_chat_without_a_peer_raises_not_connected() -> None:
    async with running_rendezvous(0, stun_port=0) as rv:
        async with Worker(loopback_worker_config(rv)) as w:
            await w.wait_for_state("waiting_for_peer", timeout=T)
            with pytest.raises(NotConnected):
                await w.chat("nobody")


def test_a_worker_built_in_python_serves_no_http_by_default() -> None:
    cfg = WorkerConfig(rendezvous_url="ws://127.0.0.1:1")
    assert cfg.http_port is None
    # ... and answers benchmarks: the default extensions are part of the worker, not an import
    assert Worker(cfg).extension("benchmark") is not None


def test_extension_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Worker(WorkerConfig(rendezvous_url="ws://127.0.0.1:1"), extensions=[Recorder(), Recorder()])


def test_the_cli_keeps_serving_the_ui_on_8080(monkeypatch: pytest.MonkeyPatch) -> None:
    from p2plab import cli

    monkeypatch.delenv("PORT", raising=False)
    args = cli.build_parser().parse_args(["worker", "--rendezvous", "ws://127.0.0.1:1"])
    assert cli._worker_config(args).http_port == 8080
    monkeypatch.setenv("PORT", "9090")  # the container's setting still wins over the default
    args = cli.build_parser().parse_args(["worker", "--rendezvous", "ws://127.0.0.1:1"])
    assert cli._worker_config(args).http_port == 9090


async def test_wait_for_state_sees_a_state_entered_right_after_it_starts_waiting() -> None:
    w = Worker(WorkerConfig(rendezvous_url="ws://127.0.0.1:1"))
    waiter = asyncio.ensure_future(w.wait_for_state("lost", timeout=T))
    await asyncio.sleep(0)  # the waiter runs up to its first suspension
    w.emit(ev.StateChanged("lost", "connected"))  # a transient state, gone again at once
    w.emit(ev.StateChanged("punching", "lost"))
    assert await waiter == "lost"
