"""The worker's HTTP server: the UI page, ``/health``, ``/status`` and the ``/ui_ws`` WebSocket.

It knows the worker only through :class:`UiWorker` (what the page needs), so the worker can
start it without the two modules importing each other.

Everything but ``/health`` needs the worker's UI token and a Host the worker serves, and a
browser's Origin must be the page's own (:mod:`p2plab.aio.ui_auth`): a page of another site,
another port, or a rebound DNS name must not drive the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from importlib import resources
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse

from p2plab.aio.bench import start_benchmark_from_ui, stop_benchmark_from_ui
from p2plab.aio.extension import WorkerHost
from p2plab.aio.http_server import EmbeddedServer
from p2plab.aio.ui_auth import (
    UiGuard,
    UiGuardMiddleware,
    check_ui_token,
    new_ui_token,
    origin_allowed,
)
from p2plab.errors import P2PLabError

__all__ = ["UiServer", "UiWorker", "create_worker_app", "origin_allowed"]


MAX_UI_MESSAGE = 64 * 1024


def _index_html() -> str:
    try:
        return resources.files("p2plab").joinpath("web/index.html").read_text("utf-8")
    except (FileNotFoundError, OSError):  # pragma: no cover - broken install
        return "<!doctype html><title>p2plab</title><p>UI missing from this installation.</p>"


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


# The page loads nothing from elsewhere: no referrer can carry the token out, and no other
# page may frame it (a click-jacking frame from another port of the same host would be sent the
# SameSite cookie).
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}


def create_worker_app(worker: UiWorker, guard: UiGuard) -> FastAPI:
    """The page's app; every route but ``/health`` behind ``guard``."""
    app = FastAPI(title="p2plab worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(UiGuardMiddleware, guard=guard)
    page = _index_html()

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        response = HTMLResponse(page, headers=_PAGE_HEADERS)
        if guard.token_matches(request.query_params.get("token")):
            # Opened with ?token=: the page strips it from the address bar, the cookie keeps it
            # for reloads, new tabs and /ui_ws.  HttpOnly: no script (an injected one included)
            # reads it; SameSite=Strict: no other site's request carries it.
            https = request.headers.get("x-forwarded-proto", request.url.scheme) == "https"
            response.set_cookie(
                guard.cookie_name,
                guard.token,
                httponly=True,
                samesite="strict",
                secure=https,
                path="/",
            )
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "worker_id": worker.worker_id}

    @app.get("/status")
    async def status() -> JSONResponse:
        return JSONResponse(worker.status())

    @app.websocket("/ui_ws")
    async def ui_ws(ws: WebSocket) -> None:
        # The guard checked Host, Origin and the token before this runs.
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

    def __init__(self, server: EmbeddedServer, address: tuple[str, int], guard: UiGuard) -> None:
        self.server = server
        self.address = address
        """The bound (host, port)."""
        self.guard = guard
        """The token and the Host names the page answers to."""

    @property
    def token(self) -> str:
        """The UI token (given or generated)."""
        return self.guard.token

    @classmethod
    async def start(
        cls,
        worker: UiWorker,
        host: str,
        port: int,
        *,
        token: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ) -> UiServer:
        """Bind ``host:port`` (0: a free port) and serve the page behind ``token`` (None: a
        generated one); a port in use is a :class:`~p2plab.errors.P2PLabError` naming it, a bad
        token a :class:`~p2plab.errors.ConfigError`."""
        token = new_ui_token() if token is None else check_ui_token(token)
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
        bound = sock.getsockname()
        guard = UiGuard(token, host, int(bound[1]), allowed_hosts)
        config = uvicorn.Config(
            create_worker_app(worker, guard),
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
        return cls(server, (str(bound[0]), int(bound[1])), guard)

    async def close(self) -> None:
        """Stop serving (bounded)."""
        await self.server.stop(3.0)
