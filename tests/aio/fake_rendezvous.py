"""A scriptable rendezvous for hostile tests: a small WebSocket server on loopback.

It speaks just enough of the protocol to register real workers (the challenge, a verified
proof, ``registered``, their ``update_udp_endpoint``), and then sends whatever a test tells it
to: junk, hostile offers, forged relay messages, and valid offers that pair two workers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from p2plab.aio.rendezvous import Backoff
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.core.crypto import Identity, verify_registration_proof
from tests.conftest import until

__all__ = ["FakeRendezvous", "fake_rendezvous"]


@dataclass
class _Conn:
    ws: ServerConnection
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    endpoint: tuple[str, int] | None = None
    public_key: str | None = None
    received: list[dict[str, Any]] = field(default_factory=list)


class FakeRendezvous:
    """Registers workers honestly; everything else is up to the test."""

    def __init__(self, *, challenge: bool = True, first: list[str] | None = None) -> None:
        self.challenge = challenge
        """Send a challenge (False: a rendezvous that never does)."""
        self.first = first or []
        """Raw texts sent before the challenge on every connection."""
        self.conns: dict[str, _Conn] = {}
        self.connections = 0
        self.proofs_failed = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def config(self, **kw: Any) -> WorkerConfig:
        base: dict[str, Any] = dict(
            rendezvous_url=self.url,
            udp_host="127.0.0.1",
            http_port=None,
            nat_report=False,
            backoff=Backoff(initial_s=0.05, maximum_s=0.2),
        )
        base.update(kw)
        return WorkerConfig(**base)

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        worker_id = ws.request.path.rsplit("/", 1)[-1]
        self.connections += 1
        conn = _Conn(ws)
        self.conns[worker_id] = conn
        with contextlib.suppress(ConnectionClosed):
            for raw in self.first:
                await ws.send(raw)
            if not self.challenge:
                await ws.wait_closed()
                return
            server = Identity.generate(os.urandom)
            nonce = os.urandom(32)
            await ws.send(
                json.dumps(
                    {
                        "type": "challenge",
                        "nonce": base64.b64encode(nonce).decode(),
                        "server_key": server.public_b64,
                    }
                )
            )
            reg = json.loads(await ws.recv())
            while reg.get("type") == "error":  # the worker's answer to junk sent in ``first``
                conn.received.append(reg)
                reg = json.loads(await ws.recv())
            assert reg["type"] == "register", reg
            if reg.get("public_key"):
                ok = verify_registration_proof(
                    server.private_key,
                    base64.b64decode(reg["public_key"]),
                    nonce,
                    worker_id,
                    base64.b64decode(reg.get("proof") or ""),
                )
                if not ok:
                    self.proofs_failed += 1
                    await ws.close(1008, "key proof failed")
                    return
            conn.public_key = reg.get("public_key")
            await ws.send(
                json.dumps(
                    {"type": "registered", "worker_id": worker_id, "observed_ip": "127.0.0.1"}
                )
            )
            async for raw in ws:
                msg = json.loads(raw)
                conn.received.append(msg)
                if msg.get("type") == "update_udp_endpoint":
                    conn.endpoint = (msg["udp_ip"], msg["udp_port"])
                    conn.registered.set()

    def errors(self, w: Worker) -> list[dict[str, Any]]:
        """The ``error`` messages worker ``w`` sent on its current connection."""
        return [m for m in self.conns[w.worker_id].received if m.get("type") == "error"]

    async def ready(self, *workers: Worker, timeout: float = 10.0) -> None:
        """Until each worker registered and reported its UDP endpoint."""
        for w in workers:
            await until(lambda w=w: w.worker_id in self.conns, "a connection", timeout)
            await asyncio.wait_for(self.conns[w.worker_id].registered.wait(), timeout)

    async def send(self, w: Worker, obj: Any) -> None:
        """Send one message (a dict, or raw text) to worker ``w``."""
        raw = obj if isinstance(obj, str) else json.dumps(obj)
        await self.conns[w.worker_id].ws.send(raw)

    def offer(self, to: Worker, peer: Worker, role: str, **override: Any) -> dict[str, Any]:
        """A valid offer to ``to`` for ``peer`` (fields overridable)."""
        conn = self.conns[peer.worker_id]
        assert conn.endpoint is not None
        msg: dict[str, Any] = {
            "type": "p2p_connection_offer",
            "peer_worker_id": peer.worker_id,
            "peer_udp_ip": conn.endpoint[0],
            "peer_udp_port": conn.endpoint[1],
            "role": role,
            "peer_public_key": conn.public_key,
        }
        msg.update(override)
        return msg

    async def pair(self, a: Worker, b: Worker) -> None:
        await self.send(a, self.offer(a, b, "controlling"))
        await self.send(b, self.offer(b, a, "controlled"))


@contextlib.asynccontextmanager
async def fake_rendezvous(**kw: Any) -> AsyncIterator[FakeRendezvous]:
    rv = FakeRendezvous(**kw)
    async with serve(rv.handler, "127.0.0.1", 0) as server:
        rv.port = next(iter(server.sockets)).getsockname()[1]
        yield rv
