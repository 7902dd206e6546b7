"""End to end through the CLI: a rendezvous and workers as separate processes on loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets

from tests.conftest import TIMEOUT_UNIT
from tests.procs import Proc, start_rendezvous, start_worker, status, ui_ws_url, wait_until

pytestmark = pytest.mark.slow


async def _next(ws: Any, pred: Any, timeout: float) -> dict[str, Any]:
    async def _loop() -> dict[str, Any]:
        while True:
            msg = json.loads(await ws.recv())
            if pred(msg):
                return msg

    return await asyncio.wait_for(_loop(), timeout * TIMEOUT_UNIT)


def _connected_to(port: int, peer_id: str | None = None) -> bool:
    st = status(port)
    if st["state"] != "connected":
        return False
    return peer_id is None or (st["peer"] or {}).get("worker_id") == peer_id


async def test_chat_third_worker_waits_and_repairs_after_kill() -> None:
    procs: list[Proc] = []
    try:
        rv, rv_port, stun = start_rendezvous()
        procs.append(rv)
        a, a_http = start_worker(rv_port, stun, "worker-a")
        procs.append(a)
        b, b_http = start_worker(rv_port, stun, "worker-b")
        procs.append(b)
        a_id = status(a_http)["worker_id"]
        b_id = status(b_http)["worker_id"]
        wait_until(lambda: _connected_to(a_http, b_id), 10, "A connected to B", a)
        wait_until(lambda: _connected_to(b_http, a_id), 10, "B connected to A", b)
        st = status(a_http)
        assert st["udp_public"].startswith("127.0.0.1:")
        assert st["peer"]["endpoint"] == status(b_http)["udp_public"]

        async with (
            websockets.connect(ui_ws_url(a_http)) as ws_a,
            websockets.connect(ui_ws_url(b_http)) as ws_b,
        ):
            first = json.loads(await ws_a.recv())
            assert first["type"] == "status" and first["worker_id"] == a_id
            await ws_a.send(json.dumps({"type": "chat", "text": "hello from A ✓"}))
            out = await _next(ws_a, lambda m: m["type"] == "chat", 5)
            assert out["direction"] == "out" and out["from"] == a_id
            got = await _next(ws_b, lambda m: m["type"] == "chat", 5)
            assert got["direction"] == "in"
            assert got["text"] == "hello from A ✓"
            assert got["from"] == a_id
            delivered = await _next(ws_a, lambda m: m["type"] == "chat_delivered", 5)
            assert delivered["id"] == out["id"]

            # a third worker joining the room waits: A and B stay paired
            c, c_http = start_worker(rv_port, stun, "worker-c")
            procs.append(c)
            c_id = status(c_http)["worker_id"]
            wait_until(lambda: status(c_http)["state"] == "waiting_for_peer", 10, "C waits", c)
            await asyncio.sleep(1.0)
            assert status(c_http)["state"] == "waiting_for_peer"
            assert _connected_to(a_http, b_id)

            # kill B: A reports lost, then pairs with C and connects
            b.kill()
            lost = await _next(ws_a, lambda m: m["type"] == "status" and m["state"] == "lost", 20)
            assert lost["worker_id"] == a_id
            await _next(
                ws_a,
                lambda m: (
                    m["type"] == "status"
                    and m["state"] == "connected"
                    and (m.get("peer") or {}).get("worker_id") == c_id
                ),
                20,
            )
            wait_until(lambda: _connected_to(c_http, a_id), 10, "C connected to A", c)
            await ws_a.send(json.dumps({"type": "chat", "text": "hi C"}))
            wait_until(lambda: status(c_http)["stats"]["chats_in"] == 1, 10, "chat at C", c)
    finally:
        for p in reversed(procs):
            p.stop()


async def test_bad_ui_messages_get_errors_and_chat_needs_a_peer() -> None:
    procs: list[Proc] = []
    try:
        rv, rv_port, stun = start_rendezvous()
        procs.append(rv)
        a, a_http = start_worker(rv_port, stun, "worker-lonely")
        procs.append(a)
        async with websockets.connect(ui_ws_url(a_http)) as ws:
            await _next(ws, lambda m: m["type"] == "status", 5)
            for bad, expect in [
                ("not json", "not JSON"),
                (json.dumps({"type": "nope"}), "unknown message type"),
                (json.dumps({"type": "chat", "text": "x"}), "no peer"),
                (json.dumps({"type": "chat", "text": 5}), "non-empty"),
            ]:
                await ws.send(bad)
                err = await _next(ws, lambda m: m["type"] == "error", 5)
                assert expect in err["message"]
        assert a.popen.poll() is None
    finally:
        for p in reversed(procs):
            p.stop()


async def test_foreign_origin_is_refused() -> None:
    procs: list[Proc] = []
    try:
        rv, rv_port, stun = start_rendezvous()
        procs.append(rv)
        a, a_http = start_worker(rv_port, stun, "worker-origin")
        procs.append(a)
        url = ui_ws_url(a_http)
        async with websockets.connect(url, origin=f"http://127.0.0.1:{a_http}") as ws:
            assert json.loads(await ws.recv())["type"] == "status"
        with pytest.raises(websockets.exceptions.WebSocketException):
            async with websockets.connect(url, origin="http://evil.example:80") as ws:
                await ws.recv()
    finally:
        for p in reversed(procs):
            p.stop()
