"""The worker's HTTP server: the UI page, ``/health``, ``/status`` and the ``/ui_ws`` WebSocket.

It knows the worker only through :class:`UiWorker` (what the page needs), so the worker can
start it without the two modules importing each other.

``/ui_ws`` only accepts the worker's own page: a browser always sends ``Origin``, and a page from
another origin (a malicious site open in the same browser) must not drive the worker.  Clients
that send no ``Origin`` (scripts, notebooks, tests) are not browsers and are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse

from p2plab.aio.bench import start_benchmark_from_ui, stop_benchmark_from_ui
from p2plab.aio.extension import WorkerHost
from p2plab.aio.http_server import EmbeddedServer
from p2plab.errors import P2PLabError

__all__ = ["UiServer", "UiWorker", "create_worker_app", "origin_allowed"]

log = logging.getLogger(__name__)

MAX_UI_MESSAGE = 64 * 1024


def _index_html() -> str:
    try:
        return resources.files("p2plab").joinpath("web/index.html").read_text("utf-8")
    except (FileNotFoundError, OSError):  # pragma: no cover - broken install
        return "<!doctype html><title>p2plab</title><p>UI missing from this installation.</p>"


def origin_allowed(origin: str | None, host: str | None) -> bool:
    """Same-origin check for ``/ui_ws``: the Origin's host:port must be the Host we serve."""
    if origin is None:
        return True
    if not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default = "443" if parts.scheme == "https" else "80"
    o_host, _, o_port = (
        parts.netloc.rpartition(":") if ":" in parts.netloc else (parts.netloc, "", "")
    )
    h_host, _, h_port = host.rpartition(":") if ":" in host else (host, "", "")
    return o_host.lower() == h_host.lower() and (o_port or default) == (h_port or default)


class UiWorker(WorkerHost, Protocol):
    """What the page's server uses of a worker (beyond the extensions' :class:`WorkerHost`)."""

    def status(self) -> dict[str, Any]:
        """The ``status`` message."""
        ...

    def send_chat(self, text: str) -> str:
        """Send a chat message to the peer; returns its id."""
        ...

    def ui_subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue of every UI message from now on."""
        ...

    def ui_unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop feeding ``q``."""
        ...

    def ui_history(self) -> list[dict[str, Any]]:
        """Recent chat messages and result rows, replayed to a page that connects."""
        ...


def create_worker_app(worker: UiWorker) -> FastAPI:
    app = FastAPI(title="p2plab worker", docs_url=None, redoc_url=None, openapi_url=None)
    page = _index_html()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "worker_id": worker.worker_id}

    @app.get("/status")
    async def status() -> JSONResponse:
        return JSONResponse(worker.status())

    @app.websocket("/ui_ws")
    async def ui_ws(ws: WebSocket) -> None:
        origin = ws.headers.get("origin")
        if not origin_allowed(origin, ws.headers.get("host")):
            log.warning("refusing /ui_ws from foreign origin %s", origin)
            await ws.close(code=1008, reason="origin not allowed")
            return
        await ws.accept()
        # Subscribe before taking the history so nothing falls between the two; a message in
        # both is sent twice and the page drops the repeat (chat by id, results by run and role).
        queue = worker.ui_subscribe()
        history = worker.ui_history()
        sender: asyncio.Task[None] | None = None
        try:
            await ws.send_json(worker.status())
            for msg in history:
                await ws.send_json(msg)
            sender = asyncio.create_task(_pump_to_ui(ws, queue))
            while True:
                raw = await ws.receive_text()
                reply = await handle_ui_message(worker, raw)
                if reply is not None:
                    await ws.send_json(reply)
        except WebSocketDisconnect:
            pass
        finally:
            worker.ui_unsubscribe(queue)
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender

    return app


async def _pump_to_ui(ws: WebSocket, queue: asyncio.Queue[dict[str, Any]]) -> None:
    while True:
        msg = await queue.get()
        await ws.send_json(msg)


async def handle_ui_message(worker: UiWorker, raw: str) -> dict[str, Any] | None:
    """Handle one message from the UI; returns a direct reply (errors) or None."""
    if len(raw) > MAX_UI_MESSAGE:
        return {"type": "error", "message": f"message too large ({len(raw)} bytes)"}
    try:
        msg = json.loads(raw)
    except ValueError:
        return {"type": "error", "message": "message is not JSON"}
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return {"type": "error", "message": "message must be an object with a string 'type'"}
    kind = msg["type"]
    try:
        if kind == "chat":
            text = msg.get("text")
            if not isinstance(text, str) or not text:
                return {"type": "error", "message": "chat needs a non-empty 'text'"}
            worker.send_chat(text)
            return None
        if kind == "start_benchmark":
            return await start_benchmark_from_ui(worker, msg)
        if kind == "stop_benchmark":
            return await stop_benchmark_from_ui(worker)
        if kind == "status":
            return worker.status()
    except (P2PLabError, ValueError) as exc:
        return {"type": "error", "message": str(exc)}
    return {"type": "error", "message": f"unknown message type {kind!r}"}


class UiServer:
    """The worker's page served by uvicorn in the current loop (:meth:`start`, :meth:`close`)."""

    def __init__(self, server: EmbeddedServer, address: tuple[str, int]) -> None:
        self.server = server
        self.address = address
        """The bound (host, port)."""

    @classmethod
    async def start(cls, worker: UiWorker, host: str, port: int) -> UiServer:
        """Bind ``host:port`` (0: a free port) and serve the page; a port in use is a
        :class:`~p2plab.errors.P2PLabError` naming it."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise P2PLabError(f"cannot serve the worker UI on {host}:{port}: {exc}") from None
        sock.listen(128)
        sock.setblocking(False)
        config = uvicorn.Config(
            create_worker_app(worker),
            log_level="warning",
            lifespan="off",
            ws_max_size=MAX_UI_MESSAGE * 2,
        )
        server = EmbeddedServer(config)  # the CLI or the notebook's kernel owns SIGINT
        try:
            await server.start(sock, name="worker-ui")
        except BaseException:
            sock.close()
            raise
        bound = sock.getsockname()
        return cls(server, (str(bound[0]), int(bound[1])))

    async def close(self) -> None:
        """Stop serving (bounded)."""
        await self.server.stop(3.0)
