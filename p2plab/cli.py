"""``p2plab`` command line (also ``python -m p2plab``).  See contracts.md for the contract.

Containers pass the same settings through the environment (PORT, RENDEZVOUS_URL, STUN_SERVERS,
INTERNAL_UDP_PORT, P2P_ROOM, P2P_TOKEN, ADMIN_TOKEN, REDIS_URL, PUBLIC_IP_URL; and ours: HTTP_HOST,
HOST, STUN_PORT, WORKER_ID, P2P_ROOM_TOKENS, MAX_WORKERS, P2P_RELAY, TRUST_PROXY_HEADERS; see
docs/protocol.md); flags win over environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from p2plab.errors import P2PLabError

__all__ = ["build_parser", "main"]

log = logging.getLogger("p2plab.cli")


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_int(name: str, default: int | None) -> int | None:
    value = _env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(
            f"p2plab: environment variable {name} must be an integer, got {value!r}"
        ) from None


def _stun_list(values: list[str] | None) -> tuple[str, ...]:
    items: list[str] = []
    for v in values or []:
        items += [x.strip() for x in v.split(",") if x.strip()]
    return tuple(items)


def _check_hostport(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return text


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    """Run ``coro`` with uvloop when present; Ctrl-C and SIGTERM end it cleanly."""

    async def _main() -> int | None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, task.cancel)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - not on Windows
                pass
        try:
            return await coro
        except asyncio.CancelledError:
            return 0

    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run
    try:
        return int(runner(_main()) or 0)
    except P2PLabError as exc:
        print(f"p2plab: error: {exc}", file=sys.stderr)
        return 1


# -- commands -----------------------------------------------------------------------------------


def _rendezvous_settings(args: argparse.Namespace) -> Any:
    """The rendezvous's :class:`Settings`, read once: flags win over the environment."""
    from rendezvous_service_code.settings import Settings

    return Settings.load(
        {
            "host": args.host,
            "port": args.port,
            "stun_port": args.stun_port,
            "redis_url": args.redis,
            "token": args.token,
            "admin_token": args.admin_token,
            "room_tokens": (
                None if args.room_tokens is None else _parse_room_tokens(args.room_tokens)
            ),
            "max_workers": args.max_workers,
            "relay": False if args.no_relay else None,
        }
    )


def _parse_room_tokens(text: str) -> dict[str, str]:
    from rendezvous_service_code.settings import parse_room_tokens

    return parse_room_tokens(text)


def _cmd_rendezvous(args: argparse.Namespace) -> int:
    from p2plab.errors import ConfigError

    try:
        settings = _rendezvous_settings(args)
    except ConfigError as exc:  # a bad flag or variable: one line, the usage-error status
        print(f"p2plab rendezvous: error: {exc}", file=sys.stderr)
        return 2
    return _run(_serve_rendezvous(settings))


async def _serve_rendezvous(settings: Any) -> int:
    from rendezvous_service_code.server import ServeAddresses, serve

    def started(addr: ServeAddresses) -> None:
        stun = f", STUN on udp://{addr.stun_host}:{addr.stun_port}" if addr.stun_port else ""
        print(f"rendezvous on {addr.ws_url}{stun}", file=sys.stderr, flush=True)

    await serve(settings, on_started=started, handle_signals=False)
    return 0


async def _cmd_stun_server(args: argparse.Namespace) -> int:
    from p2plab.server.stun_server import run_stun_server

    await run_stun_server(args.host, args.port, alt_host=args.alt_host, alt_port=args.alt_port)
    return 0


def _worker_config(args: argparse.Namespace) -> Any:
    from p2plab.aio.worker import WorkerConfig
    from p2plab.config import SessionConfig

    stun = _stun_list(args.stun) or _stun_list([_env("STUN_SERVERS", "")])
    for s in stun:
        _check_hostport(s)
    timers: dict[str, float] = {}
    if args.keepalive is not None:
        timers["keepalive_interval"] = args.keepalive
    if args.peer_timeout is not None:
        timers["peer_timeout"] = args.peer_timeout
        # a short peer timeout needs keep-alives well inside it (three per timeout)
        timers.setdefault("keepalive_interval", min(5.0, args.peer_timeout / 3))
    if args.punch_timeout is not None:
        timers["punch_timeout"] = args.punch_timeout
    return WorkerConfig(
        rendezvous_url=args.rendezvous,
        stun_servers=stun,
        udp_port=args.udp_port,
        http_host=args.http_host,
        http_port=args.http_port,
        room=args.room,
        token=args.token,
        worker_id=args.id,
        public_ip_url=_env("PUBLIC_IP_URL"),
        nat_report=not args.no_nat_report,
        encrypt=not args.no_encrypt,
        relay=not args.no_relay,
        session=SessionConfig(**timers),
    )


async def _cmd_worker(args: argparse.Namespace) -> int:
    from p2plab.aio.worker import Worker

    if not args.rendezvous:
        raise SystemExit("p2plab worker: --rendezvous ws://HOST:PORT (or RENDEZVOUS_URL) is needed")
    worker = Worker(_worker_config(args))
    await worker.start()
    print(f"worker {worker.worker_id}: UI at {worker.ui_url}", file=sys.stderr, flush=True)
    if not worker.config.stun_servers:
        print(
            "p2plab worker: no --stun server given; the public UDP endpoint is taken from the "
            "address the rendezvous observes (fine on one LAN, wrong behind most NATs). "
            "Give a STUN server, e.g. --stun stun.l.google.com:19302.",
            file=sys.stderr,
            flush=True,
        )
    events = worker.ui_subscribe() if args.events else None
    try:
        if events is None:
            await asyncio.Event().wait()
        while True:
            msg = await events.get()  # type: ignore[union-attr]
            print(json.dumps(msg), flush=True)
    finally:
        await worker.stop()


async def _cmd_probe(args: argparse.Namespace) -> int:
    from p2plab.aio.stun import probe_nat

    servers = list(_stun_list(args.stun))
    if not servers:
        raise SystemExit(
            "p2plab probe: give a STUN server with --stun HOST:PORT (e.g. your own "
            "`p2plab stun-server`, or a public one such as stun.l.google.com:19302)"
        )
    report = await probe_nat(servers, classic=not args.no_classic)
    d = report.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        for key, value in d.items():
            print(f"{key:>18}: {value}")
    return 0


async def _cmd_demo(args: argparse.Namespace) -> int:
    from p2plab.demo import run_demo

    return await run_demo(duration=args.duration, http_port=args.http_port)


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2plab", description="NAT traversal lab: rendezvous, STUN, hole punching, benchmarks"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "rendezvous",
        help="run the rendezvous service",
        description="Flags win over the environment variables named in their help.",
    )
    p.add_argument("--host", default=None, help="bind address (env HOST; 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (env PORT; 8000)")
    p.add_argument(
        "--stun-port",
        type=int,
        default=None,
        help="also answer STUN on this UDP port, 0: any free port (env STUN_PORT)",
    )
    p.add_argument("--redis", default=None, metavar="URL", help="share state via Redis (REDIS_URL)")
    p.add_argument("--token", default=None, help="workers must present this token (P2P_TOKEN)")
    p.add_argument(
        "--admin-token", default=None, help="bearer token for /debug/list_workers (ADMIN_TOKEN)"
    )
    p.add_argument(
        "--room-tokens",
        default=None,
        metavar="ROOM=TOKEN,...",
        help="per-room tokens, replacing --token in those rooms (env P2P_ROOM_TOKENS)",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=None,
        help="connections held at once; more are closed with 1013 (env MAX_WORKERS; 20000)",
    )
    p.add_argument(
        "--no-relay",
        action="store_true",
        help="refuse to relay for pairs that cannot punch (env P2P_RELAY=0)",
    )
    p.set_defaults(func=_cmd_rendezvous)

    p = sub.add_parser("stun-server", help="run a standalone STUN server")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=3478)
    p.add_argument("--alt-host", default=None, help="second IP for RFC 5780 behaviour tests")
    p.add_argument("--alt-port", type=int, default=None, help="second port for RFC 5780 tests")
    p.set_defaults(func=_cmd_stun_server)

    p = sub.add_parser("worker", help="run one worker (UI on its HTTP port)")
    p.add_argument("--rendezvous", default=_env("RENDEZVOUS_URL"), metavar="ws://H:P")
    p.add_argument(
        "--stun", action="append", metavar="H:P", type=_check_hostport, help="STUN server (repeat)"
    )
    p.add_argument("--udp-port", type=int, default=_env_int("INTERNAL_UDP_PORT", 0))
    p.add_argument("--http-host", default=_env("HTTP_HOST", "127.0.0.1"))
    p.add_argument("--http-port", type=int, default=_env_int("PORT", 8080))
    p.add_argument("--room", default=_env("P2P_ROOM", "default"))
    p.add_argument("--token", default=_env("P2P_TOKEN"))
    p.add_argument("--id", default=_env("WORKER_ID"), help="worker id (default: a new UUID)")
    p.add_argument("--no-nat-report", action="store_true", help="skip RFC 5780 classification")
    p.add_argument(
        "--no-encrypt",
        action="store_true",
        help="plaintext peer datagrams (only pairs with a peer that also says so)",
    )
    p.add_argument(
        "--no-relay",
        action="store_true",
        help="no relay fallback through the rendezvous when punching fails",
    )
    p.add_argument("--keepalive", type=float, metavar="S", help="keep-alive interval (default 5)")
    p.add_argument(
        "--peer-timeout", type=float, metavar="S", help="silence before the peer is lost (15)"
    )
    p.add_argument(
        "--punch-timeout", type=float, metavar="S", help="give up punching after S seconds (10)"
    )
    p.add_argument(
        "--events", action="store_true", help="print every status/chat event as a JSON line"
    )
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("probe", help="report this host's NAT behaviour")
    p.add_argument(
        "--stun", action="append", metavar="H:P", type=_check_hostport, help="STUN server (repeat)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-classic", action="store_true", help="skip the RFC 3489 (pystun3) test")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("demo", help="rendezvous + STUN + two workers on loopback")
    p.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    p.add_argument("--http-port", type=int, default=8080, help="first UI port (0: any)")
    p.set_defaults(func=_cmd_demo)

    try:
        from p2plab.lab.cli import register_cli
    except ImportError:
        pass
    else:
        register_cli(sub)

    try:
        from p2plab.aio.bench.cli import register_cli as register_bench_cli
    except ImportError:
        pass
    else:
        register_bench_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    func = args.func
    if asyncio.iscoroutinefunction(func):
        return _run(func(args))
    return int(func(args) or 0)
