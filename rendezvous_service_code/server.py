"""Running the rendezvous: uvicorn in the current event loop, plus the embedded STUN server.

``RendezvousServer.start()`` is the in-process form (demo, notebooks, tests); ``serve()`` runs
until cancelled (the CLI); ``main()`` is the bare ``python -m rendezvous_service_code.main``
runner that prints the actual addresses as one JSON line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from p2plab.aio.http_server import EmbeddedServer
from p2plab.core.signaling import MAX_MESSAGE_BYTES
from p2plab.errors import ConfigError

from .app import create_app
from .backends import Backend
from .settings import Settings, check_exposure, exposure_warning, parse_turn_urls

__all__ = ["RendezvousServer", "ServeAddresses", "main", "serve"]

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ServeAddresses:
    """Where a started rendezvous listens."""

    http_host: str
    """Host the HTTP/WebSocket server is bound to."""
    http_port: int
    """Actual HTTP port (useful when 0 was asked for)."""
    stun_host: str | None
    """Host of the embedded STUN server, or None without one."""
    stun_port: int | None
    """Actual UDP port of the embedded STUN server, or None without one."""

    @property
    def url(self) -> str:
        """``http://host:port`` (0.0.0.0 shown as 127.0.0.1 and :: as ::1 so it can be opened
        locally)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(
            self.http_host, self.http_host
        )
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"

    @property
    def ws_url(self) -> str:
        """``ws://host:port``, what workers take as ``--rendezvous``."""
        return "ws" + self.url[len("http") :]


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if host == "::":
        # Every address of both families, whatever the host's net.ipv6.bindv6only says; IPv4
        # clients then show as ::ffff:a.b.c.d, which the app turns back into IPv4 literals.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class RendezvousServer:
    """A running rendezvous (uvicorn in the current event loop) plus optional STUN server."""

    def __init__(self) -> None:
        self.app: FastAPI | None = None
        self.addresses: ServeAddresses | None = None
        self._server: EmbeddedServer | None = None
        self._stun: Any = None

    @classmethod
    async def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        stun_port: int | None = None,
        settings: Settings | None = None,
        backend: Backend | None = None,
        handle_signals: bool = False,
        ws_max_size: int = 4 * MAX_MESSAGE_BYTES,
        backlog: int = 4096,
        **changes: Any,
    ) -> RendezvousServer:
        """Bind ``host:port``, start serving and return (the in-process form).

        The app is built from ``settings`` (default ``Settings()``) with ``changes`` applied
        (Settings field names, e.g. ``token="t", relay=False``: a short form for tests and
        notebooks); its ``host``, ``port`` and ``stun_port`` are not used here, the arguments
        are.  ``backend`` injects the shared state (see :func:`.app.create_app`).
        """
        self = cls()
        base = Settings() if settings is None else settings
        built = dataclasses.replace(base, **changes)
        check_exposure(host, built)  # the address actually bound, whatever settings.host says
        self.app = create_app(built, backend=backend)
        sock = _bind_tcp(host, port)
        http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="on",
            log_config=None,
            access_log=False,
            proxy_headers=False,  # trust_forwarded decides, not uvicorn
            ws_max_size=ws_max_size,
            ws_per_message_deflate=False,  # zlib state per connection costs memory
            timeout_graceful_shutdown=3,
            backlog=backlog,
        )
        self._server = EmbeddedServer(config, handle_signals=handle_signals)
        try:
            await self._server.start(sock, name="rendezvous")
        except BaseException:
            sock.close()
            raise
        stun_host: str | None = None
        actual_stun_port: int | None = None
        if stun_port is not None:
            try:
                from p2plab.server.stun_server import StunServer

                self._stun = await StunServer.start(
                    host,
                    stun_port,
                    rate_per_s=built.stun_rate_per_s,
                    burst=built.stun_burst,
                )
                stun_host, actual_stun_port = _first_address(self._stun.addresses)
            except BaseException:
                await self.close()
                raise
        self.addresses = ServeAddresses(host, http_port, stun_host, actual_stun_port)
        warning = exposure_warning(host, built)
        if warning is not None:
            logger.warning("%s", warning)
        logger.info("rendezvous on %s (WebSocket %s/ws/register/<id>)", self.url, self.ws_url)
        if actual_stun_port is not None:
            logger.info("STUN on udp://%s:%d", stun_host, actual_stun_port)
        return self

    @property
    def http_port(self) -> int:
        assert self.addresses is not None
        return self.addresses.http_port

    @property
    def stun_port(self) -> int | None:
        assert self.addresses is not None
        return self.addresses.stun_port

    @property
    def url(self) -> str:
        assert self.addresses is not None
        return self.addresses.url

    @property
    def ws_url(self) -> str:
        assert self.addresses is not None
        return self.addresses.ws_url

    async def wait_closed(self) -> None:
        """Until the HTTP server stops (Ctrl-C when ``handle_signals``, or :meth:`close`)."""
        if self._server is not None and self._server.task is not None:
            await asyncio.shield(self._server.task)

    async def close(self) -> None:
        """Stop STUN and HTTP (connections are closed, uvicorn shuts down gracefully)."""
        if self._stun is not None:
            stun, self._stun = self._stun, None
            res = stun.close()
            if asyncio.iscoroutine(res):
                await res
        if self._server is not None:
            await self._server.stop(_CLOSE_TIMEOUT_S)


def _first_address(addresses: Any) -> tuple[str, int]:
    first = addresses[0] if isinstance(addresses, (list, tuple)) and addresses else addresses
    if isinstance(first, (list, tuple)) and len(first) >= 2 and isinstance(first[1], int):
        return str(first[0]), int(first[1])
    if isinstance(addresses, (list, tuple)) and len(addresses) >= 2:
        return str(addresses[0]), int(addresses[1])
    raise RuntimeError(f"cannot read the STUN server's address from {addresses!r}")


async def serve(
    settings: Settings,
    *,
    backend: Backend | None = None,
    ready: asyncio.Event | None = None,
    on_started: Callable[[ServeAddresses], object] | None = None,
    handle_signals: bool = True,
) -> None:
    """Run the rendezvous on ``settings.host:settings.port`` until Ctrl-C/SIGTERM (or cancel).

    With ``settings.stun_port`` (0 = OS-chosen) an embedded STUN server answers on that UDP port
    of the same host.  Once listening, ``on_started`` is called with the actual
    :class:`ServeAddresses` (how the CLI learns the ports) and ``ready`` is set.
    """
    server = await RendezvousServer.start(
        settings.host,
        settings.port,
        stun_port=settings.stun_port,
        settings=settings,
        backend=backend,
        handle_signals=handle_signals,
    )
    try:
        assert server.addresses is not None
        if on_started is not None:
            on_started(server.addresses)
        if ready is not None:
            ready.set()
        await server.wait_closed()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m rendezvous_service_code.main``: a bare runner for tests and benchmarks.

    Prints one JSON line with the actual addresses on stdout once listening (``p2plab
    rendezvous`` is the user-facing command).
    """
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m rendezvous_service_code.main")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--stun-port", type=int, default=None)
    parser.add_argument("--token", default=None)
    parser.add_argument("--admin-token", default=None)
    parser.add_argument("--open", action="store_true", default=None)
    parser.add_argument("--redis", default=None)
    parser.add_argument("--redis-heartbeat", type=float, default=None)
    parser.add_argument("--redis-ttl", type=float, default=None)
    parser.add_argument("--max-workers", type=int, default=None)
    parser.add_argument("--turn", default=None, help="TURN URLs, comma-separated (TURN_URLS)")
    parser.add_argument("--turn-secret", default=None, help="coturn's secret (TURN_SECRET)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(
            {
                "host": args.host,
                "port": args.port,
                "stun_port": args.stun_port,
                "token": args.token,
                "admin_token": args.admin_token,
                "open": args.open,
                "redis_url": args.redis,
                "redis_heartbeat_s": args.redis_heartbeat,
                "redis_ttl_s": args.redis_ttl,
                "max_workers": args.max_workers,
                "turn_urls": None if args.turn is None else parse_turn_urls(args.turn),
                "turn_secret": args.turn_secret,
            }
        )
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def started(addresses: ServeAddresses) -> None:
        info = {
            "http_port": addresses.http_port,
            "stun_port": addresses.stun_port,
            "url": addresses.url,
            "ws_url": addresses.ws_url,
        }
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()

    coro = serve(settings, on_started=started)
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    return 0
