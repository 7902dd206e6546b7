"""Helpers shared by the rendezvous tests: a running service and a worker-like client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from p2plab.aio.rendezvous import Backoff
from p2plab.aio.worker import WorkerConfig
from p2plab.core.crypto import Identity, registration_proof
from rendezvous_service_code.main import RendezvousServer

__all__ = ["ADMIN_TOKEN", "TIMEOUT", "WsWorker", "debug", "new_identity", "running_rendezvous"]

#: Generous unit for waits in these tests (never a timing assertion).
TIMEOUT = 10.0
#: The admin token of :func:`running_rendezvous` (``/debug/*`` answer 404 without one).
ADMIN_TOKEN = "test-admin-token"


@contextlib.asynccontextmanager
async def running_rendezvous(port: int = 0, **options: Any) -> AsyncIterator[RendezvousServer]:
    """A rendezvous on 127.0.0.1 (port 0: OS-chosen), closed afterwards.

    It has :data:`ADMIN_TOKEN` unless ``admin_token`` is given (read ``/debug/*`` with
    :func:`debug`).
    """
    options.setdefault("admin_token", ADMIN_TOKEN)
    server = await RendezvousServer.start("127.0.0.1", port, **options)
    try:
        yield server
    finally:
        await server.close()


def new_identity() -> Identity:
    """A fresh worker key pair."""
    return Identity.generate(os.urandom)


async def debug(rv: RendezvousServer, what: str = "list_workers") -> dict[str, Any]:
    """``GET /debug/<what>`` with :data:`ADMIN_TOKEN`, as JSON (fails on an error status)."""
    async with httpx.AsyncClient() as http:
        resp = await http.get(
            f"{rv.url}/debug/{what}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data


class WsWorker:
    """A minimal worker: reads the rendezvous's challenge, registers, reads messages."""

    def __init__(self, ws: ClientConnection, worker_id: str) -> None:
        self.ws = ws
        self.worker_id = worker_id
        self.challenge: dict[str, Any] | None = None
        """The ``challenge`` the rendezvous opened with (None if it closed first)."""

    @classmethod
    async def connect(
        cls, base_ws_url: str, worker_id: str | None = None, **connect_options: Any
    ) -> WsWorker:
        worker_id = worker_id or str(uuid.uuid4())
        ws = await connect(
            f"{base_ws_url}/ws/register/{worker_id}",
            open_timeout=TIMEOUT,
            max_size=None,
            **connect_options,
        )
        self = cls(ws, worker_id)
        # The rendezvous speaks first: a challenge, or a close (bad id, full, throttled).
        with contextlib.suppress(ConnectionClosed):
            self.challenge = await self.expect("challenge")
        return self

    def proof(self, identity: Identity, worker_id: str | None = None) -> str:
        """Base64 answer to this connection's challenge with ``identity``'s key."""
        assert self.challenge is not None, "the rendezvous sent no challenge"
        raw = registration_proof(
            identity,
            base64.b64decode(self.challenge["server_key"]),
            base64.b64decode(self.challenge["nonce"]),
            worker_id or self.worker_id,
        )
        return base64.b64encode(raw).decode("ascii")

    async def send(self, obj: Any) -> None:
        """Send (nothing if the server closed already: :meth:`wait_closed` says how)."""
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))

    async def recv(self, wait_s: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), wait_s)
        msg: dict[str, Any] = json.loads(raw)
        return msg

    async def expect(self, msg_type: str, wait_s: float = TIMEOUT) -> dict[str, Any]:
        """The next message, which must be of ``msg_type``."""
        msg = await self.recv(wait_s)
        assert msg["type"] == msg_type, msg
        return msg

    async def register(
        self,
        room: str = "default",
        token: str | None = None,
        http_public_ip: str | None = None,
        identity: Identity | None = None,
    ) -> dict[str, Any]:
        """Register (in plaintext mode without ``identity``, else proving its key)."""
        msg: dict[str, Any] = {
            "type": "register",
            "room": room,
            "token": token,
            "http_public_ip": http_public_ip,
        }
        if identity is not None:
            msg["public_key"] = identity.public_b64
            msg["proof"] = self.proof(identity)
        await self.send(msg)
        return await self.expect("registered")

    async def update_endpoint(
        self,
        ip: str,
        port: int,
        candidates: list[tuple[str, int]] | None = None,
        nat: dict[str, Any] | None = None,
    ) -> None:
        msg: dict[str, Any] = {
            "type": "update_udp_endpoint",
            "udp_ip": ip,
            "udp_port": port,
            "local_candidates": [{"ip": i, "port": p} for i, p in candidates or []],
        }
        if nat is not None:
            msg["nat"] = nat
        await self.send(msg)

    async def assert_silent(self, seconds: float = 0.3) -> None:
        """Nothing arrives within ``seconds`` (used only to show a worker keeps waiting)."""
        with contextlib.suppress(TimeoutError):
            msg = await asyncio.wait_for(self.ws.recv(), seconds)
            raise AssertionError(f"unexpected message {msg!r}")

    async def wait_closed(self, wait_s: float = TIMEOUT) -> tuple[int | None, str | None]:
        """Read until the server closes; return (code, reason)."""
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(wait_s):
                while True:
                    await self.ws.recv()
        assert self.ws.close_code is not None or self.ws.close_reason is not None
        return self.ws.close_code, self.ws.close_reason

    async def close(self) -> None:
        await self.ws.close()


#: Reconnect quickly in tests.
FAST_BACKOFF = Backoff(initial_s=0.05, maximum_s=0.2)


def loopback_worker_config(rv: RendezvousServer, **kw: Any) -> WorkerConfig:
    """An in-process worker on loopback for ``rv`` (its STUN server if it has one, no HTTP)."""
    base: dict[str, Any] = dict(
        rendezvous_url=rv.ws_url,
        udp_host="127.0.0.1",
        http_port=None,
        backoff=FAST_BACKOFF,
    )
    if rv.stun_port is not None:
        base["stun_servers"] = (f"127.0.0.1:{rv.stun_port}",)
    base.update(kw)
    return WorkerConfig(**base)
