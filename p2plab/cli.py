"""``p2plab`` command line (also ``python -m p2plab``).  See contracts.md for the contract.

Containers pass the same settings through the environment (PORT, RENDEZVOUS_URL, STUN_SERVERS,
INTERNAL_UDP_PORT, P2P_ROOM, P2P_TOKEN, ADMIN_TOKEN, REDIS_URL, PUBLIC_IP_URL; and ours: HTTP_HOST,
HOST, STUN_PORT, WORKER_ID, P2P_ROOM_TOKENS, MAX_WORKERS, P2P_RELAY, TRUST_PROXY_HEADERS,
P2P_BIRTHDAY, P2P_BIRTHDAY_SOCKETS, P2P_HARD_NAT_BUDGET, P2P_PORT_MAPPING,
P2P_PORT_MAPPING_LIFETIME; see
docs/protocol.md); flags win over environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from p2plab import cli_common as cc
from p2plab.core.stun import parse_server_address
from p2plab.errors import ConfigError, P2PLabError

__all__ = ["build_parser", "main"]

log = logging.getLogger("p2plab.cli")


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _stun_list(values: list[str] | None) -> tuple[str, ...]:
    items: list[str] = []
    for v in values or []:
        items += [x.strip() for x in v.split(",") if x.strip()]
    return tuple(items)


def _stun_servers(text: str) -> str:
    """``--stun H:P`` (repeatable; ``H:P,H:P`` also works; IPv6 as ``[2001:db8::1]:3478``):
    each entry checked."""
    for item in _stun_list([text]):
        cc.hostport(item)
        if item.count(":") > 1 and not item.startswith("["):
            raise argparse.ArgumentTypeError(
                f"write an IPv6 STUN server in brackets, [ADDRESS]:PORT, got {item!r}"
            )
        try:
            parse_server_address(item)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _port_mapping(text: str) -> str:
    """``--port-mapping``: off, auto or the gateway's IPv4 address."""
    text = text.strip().lower()
    if text in ("off", "auto"):
        return text
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected off, auto or the gateway's IPv4 address"
        ) from None


def _lease_seconds(text: str) -> int:
    """``--port-mapping-lifetime``: 10..604800 s (a week: the wire's limit for a lease)."""
    value = cc.positive_int(text)
    if not 10 <= value <= 604800:
        raise argparse.ArgumentTypeError(f"must be 10..604800 seconds, got {value}")
    return value


def _ipv6_mode(text: str) -> str:
    """``--ipv6 off|auto`` (:mod:`p2plab.aio.dualstack`)."""
    word = text.strip().lower()
    if word not in ("off", "auto"):
        raise argparse.ArgumentTypeError(f"expected off or auto, got {text!r}")
    return word


def _birthday_sockets(text: str) -> int:
    """``--birthday-sockets``: 1..1024 (BirthdayConfig's limit: file descriptors are finite)."""
    value = cc.positive_int(text)
    if value > 1024:
        raise argparse.ArgumentTypeError(f"must be 1..1024, got {value}")
    return value


def _run(coro: Coroutine[Any, Any, int | None], prog: str = "p2plab") -> int:
    """Run ``coro`` with uvloop when present; Ctrl-C and SIGTERM end it cleanly.

    Exit status: 0 done, 1 a failure at run time (one line on stderr), 2 a command line that
    cannot be used (checked before this runs; a port taken meanwhile is caught here too).
    """

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
        return cc.fail(prog, str(exc))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        return cc.fail(prog, f"a port is already in use: {exc}", cc.USAGE_ERROR)


# -- commands -----------------------------------------------------------------------------------


def _rendezvous_settings(args: argparse.Namespace) -> Any:
    """The rendezvous's :class:`Settings`, read once: flags win over the environment."""
    from rendezvous_service_code.settings import LIMIT_FLAGS, Settings

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
            "open": True if args.open else None,
            "turn_urls": None if args.turn is None else _parse_turn_urls(args.turn),
            "turn_secret": args.turn_secret,
            "turn_ttl_s": args.turn_ttl,
            **{name: getattr(args, name) for name, *_ in LIMIT_FLAGS},
        }
    )


def _parse_room_tokens(text: str) -> dict[str, str]:
    from rendezvous_service_code.settings import parse_room_tokens

    return parse_room_tokens(text)


def _parse_turn_urls(text: str) -> tuple[str, ...]:
    from rendezvous_service_code.settings import parse_turn_urls

    return parse_turn_urls(text)


def _check_rendezvous(args: argparse.Namespace) -> None:

    try:
        args.settings = _rendezvous_settings(args)
    except ConfigError as exc:  # a bad flag or variable: one line, the usage-error status
        args.cmd_parser.error(str(exc))
    st = args.settings
    cc.check_free(
        args.cmd_parser,
        [
            ("rendezvous HTTP (--port)", "TCP", st.host, st.port),
            ("rendezvous STUN (--stun-port)", "UDP", st.host, st.stun_port),
        ],
    )


async def _cmd_rendezvous(args: argparse.Namespace) -> int:
    from rendezvous_service_code.server import ServeAddresses, serve

    def started(addr: ServeAddresses) -> None:
        stun = f", STUN on udp://{addr.stun_host}:{addr.stun_port}" if addr.stun_port else ""
        print(f"rendezvous on {addr.ws_url}{stun}", file=sys.stderr, flush=True)

    await serve(args.settings, on_started=started, handle_signals=False)
    return 0


def _check_stun_server(args: argparse.Namespace) -> None:
    if args.alt_port is not None and args.alt_host is None:
        args.cmd_parser.error("--alt-port needs --alt-host (the second IP of this host)")
    hosts = [args.host] + ([args.alt_host] if args.alt_host else [])
    ports = [args.port] + ([args.alt_port] if args.alt_port else [])
    cc.check_free(
        args.cmd_parser,
        [("STUN server (--port, --alt-port)", "UDP", h, p) for h in hosts for p in ports],
    )


async def _cmd_stun_server(args: argparse.Namespace) -> int:
    from p2plab.server.stun_server import StunServer

    server = await StunServer.start(
        args.host,
        args.port,
        args.alt_host,
        args.alt_port,
        software=args.software or None,
        rate_per_s=args.rate or None,
        burst=max(1.0, args.burst),
    )
    try:
        listening = ", ".join(f"udp://{ip}:{p}" for ip, p in server.addresses)
        other = server.other_address
        alt = "" if other is None else f" (RFC 5780 alternate address {other[0]}:{other[1]})"
        print(f"STUN server on {listening}{alt}; Ctrl-C stops it", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
    finally:
        server.close()
    return 0


def _resolve_worker_env(args: argparse.Namespace) -> None:
    """Fill the worker's unset flags from the environment (flags win), each value checked."""
    if getattr(args, "env_resolved", False):
        return
    parser = args.cmd_parser
    from_env: list[tuple[str, str, Any, Any]] = [
        ("rendezvous", "RENDEZVOUS_URL", cc.rendezvous_url, None),
        ("udp_port", "INTERNAL_UDP_PORT", cc.port_or_zero, 0),
        ("http_host", "HTTP_HOST", str, "127.0.0.1"),
        ("http_port", "PORT", cc.port_or_zero, 8080),
        ("room", "P2P_ROOM", str, "default"),
        ("token", "P2P_TOKEN", str, None),
        ("id", "WORKER_ID", str, None),
        ("peer_key", "P2P_PEER_KEY", str, None),
        ("ui_token", "UI_TOKEN", str, None),
        ("ui_allowed_hosts", "UI_ALLOWED_HOSTS", str, ""),
        ("birthday_sockets", "P2P_BIRTHDAY_SOCKETS", _birthday_sockets, 256),
        ("hard_nat_budget", "P2P_HARD_NAT_BUDGET", cc.non_negative_int, 0),
        ("port_mapping", "P2P_PORT_MAPPING", _port_mapping, "auto"),
        ("port_mapping_lifetime", "P2P_PORT_MAPPING_LIFETIME", _lease_seconds, 7200),
        ("ipv6", "P2P_IPV6", _ipv6_mode, "auto"),
    ]
    for dest, name, convert, default in from_env:
        if getattr(args, dest) is None:
            value = cc.env_value(parser, name, convert)
            setattr(args, dest, default if value is None else value)
    if not args.no_birthday:
        args.no_birthday = cc.env_value(parser, "P2P_BIRTHDAY", cc.on_off) is False
    if not args.stun:
        try:
            args.stun = [_stun_servers(s) for s in _stun_list([_env("STUN_SERVERS", "")])]
        except argparse.ArgumentTypeError as exc:
            parser.error(f"environment variable STUN_SERVERS: {exc}")
    args.env_resolved = True


def _worker_config(args: argparse.Namespace) -> Any:
    from p2plab.aio.ui_auth import check_ui_token, parse_allowed_hosts
    from p2plab.aio.worker import WorkerConfig
    from p2plab.config import BirthdayConfig, SessionConfig

    _resolve_worker_env(args)
    timers: dict[str, Any] = {}  # SessionConfig fields: floats here
    if args.keepalive is not None:
        timers["keepalive_interval"] = args.keepalive
    if args.peer_timeout is not None:
        timers["peer_timeout"] = args.peer_timeout
        # a short peer timeout needs keep-alives well inside it (three per timeout)
        timers.setdefault("keepalive_interval", min(5.0, args.peer_timeout / 3))
    if args.punch_timeout is not None:
        timers["punch_timeout"] = args.punch_timeout
    ui_token = None if args.ui_token is None else check_ui_token(args.ui_token)
    ui_allowed_hosts = parse_allowed_hosts(args.ui_allowed_hosts)
    return WorkerConfig(
        rendezvous_url=args.rendezvous or "",
        stun_servers=_stun_list(args.stun),
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
        peer_key=args.peer_key,
        ui_token=ui_token,
        ui_allowed_hosts=ui_allowed_hosts,
        birthday=BirthdayConfig(
            enabled=not args.no_birthday,
            sockets=args.birthday_sockets,
            hard_budget=args.hard_nat_budget,
        ),
        port_mapping=args.port_mapping,
        port_mapping_lifetime_s=args.port_mapping_lifetime,
        ipv6=args.ipv6,
    )


def _check_worker(args: argparse.Namespace) -> None:

    _resolve_worker_env(args)
    if not args.rendezvous:
        args.cmd_parser.error("--rendezvous ws://HOST:PORT (or RENDEZVOUS_URL) is needed")
    try:
        config = args.config = _worker_config(args)
        config.link_config()  # checks --peer-key: one line, not a traceback at start
    except ConfigError as exc:
        args.cmd_parser.error(str(exc))
    cc.check_free(
        args.cmd_parser,
        [
            ("worker UDP (peer traffic, --udp-port)", "UDP", config.udp_host, config.udp_port),
            ("worker HTTP (UI, --http-port)", "TCP", config.http_host, config.http_port),
        ],
    )


async def _cmd_worker(args: argparse.Namespace) -> int:
    from p2plab.aio.worker import Worker

    worker = Worker(args.config)
    await worker.start()
    try:
        print(f"worker {worker.worker_id}: UI at {worker.ui_url}", file=sys.stderr, flush=True)
        if not worker.config.stun_servers:
            print(
                "p2plab worker: no --stun server given; the public UDP endpoint is taken from "
                "the address the rendezvous observes (fine on one LAN, wrong behind most NATs). "
                "Give a STUN server, e.g. --stun stun.l.google.com:19302.",
                file=sys.stderr,
                flush=True,
            )
        events = worker.ui_subscribe() if args.events else None
        problem = await cc.wait_registered(worker, args.rendezvous, args.connect_timeout)
        if problem is not None:
            return cc.fail("p2plab worker", problem)
        if events is None:
            await asyncio.Event().wait()
        while True:
            msg = await events.get()  # type: ignore[union-attr]
            print(json.dumps(msg), flush=True)
    finally:
        await worker.stop()


def _check_probe(args: argparse.Namespace) -> None:
    args.servers = list(_stun_list(args.stun))
    if args.port_mapping is None:
        args.port_mapping = (
            cc.env_value(args.cmd_parser, "P2P_PORT_MAPPING", _port_mapping) or "auto"
        )
    if not args.servers:
        args.cmd_parser.error(
            "give a STUN server with --stun HOST:PORT (e.g. your own `p2plab stun-server`, "
            "or a public one such as stun.l.google.com:19302)"
        )


async def _cmd_probe(args: argparse.Namespace) -> int:
    from p2plab.aio.discovery import probe_hint
    from p2plab.aio.dualstack import probe_ipv6, split_stun_servers
    from p2plab.aio.portmap import describe_port_mapping, probe_port_mapping
    from p2plab.aio.status import hint_block
    from p2plab.aio.stun import probe_nat
    from p2plab.core.nat import NatReport
    from p2plab.probe_text import describe_hint, describe_ipv6, describe_report

    servers = ", ".join(args.servers)
    servers4 = list(split_stun_servers(args.servers)[0])
    steps = "behaviour tests" + ("" if args.no_classic else " and the RFC 3489 test")
    print(f"probe: asking {servers} (binding, {steps})...", file=sys.stderr, flush=True)
    started = time.monotonic()

    async def tick() -> None:
        while True:
            await asyncio.sleep(2.0)
            waited = time.monotonic() - started
            print(
                f"probe: still testing ({waited:.0f} s; a test nobody answers waits for its "
                "timeout)",
                file=sys.stderr,
                flush=True,
            )

    async def ipv4() -> tuple[NatReport, dict[str, Any]]:
        if not servers4:  # IPv6 servers only: nothing to ask over IPv4
            note = "no IPv4 STUN server given: IPv4 not tested"
            return NatReport(mapped=None, local=None, notes=(note,)), hint_block(None)
        report = await probe_nat(servers4, classic=not args.no_classic)
        # easy or hard for hole punching (issue 16), on a fresh socket: the tests above may
        # have left the NAT state a "leaky" NAT reacts to
        return report, hint_block(await probe_hint(servers4))

    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        # the families do not share a NAT (IPv6 has none, or its own): tested side by side,
        # and the router's port mapping with them
        (report, hint), ipv6, port_mapping = await asyncio.gather(
            ipv4(), probe_ipv6(args.servers), probe_port_mapping(args.port_mapping, args.servers)
        )
    finally:
        ticker.cancel()
    print(f"probe: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    if args.json:
        print(
            json.dumps(
                {**report.to_dict(), "nat_hint": hint, "ipv6": ipv6, "port_mapping": port_mapping},
                indent=2,
            )
        )
    else:
        if servers4:
            print(describe_report(report))
            print(describe_hint(hint))
        print(describe_port_mapping(port_mapping))
        print(describe_ipv6(ipv6))
    return 0


def _check_demo(args: argparse.Namespace) -> None:
    if args.http_port:
        ports = [args.http_port, args.http_port + 1]
        if ports[1] > 65535:
            args.cmd_parser.error(
                f"--http-port {args.http_port}: the second UI needs the next port"
            )


async def _cmd_demo(args: argparse.Namespace) -> int:
    from p2plab.demo import run_demo

    return await run_demo(duration=args.duration, http_port=args.http_port)


# -- parser -------------------------------------------------------------------------------------

_TIMERS = "default: from the session config"


def _add_rendezvous(sub: Any) -> None:
    p = sub.add_parser(
        "rendezvous",
        help="run the rendezvous service",
        description="Flags win over the environment variables named in their help. "
        "The embedded STUN server and `p2plab stun-server` both default to UDP 3478: on one "
        "host give them different ports.",
    )
    p.add_argument(
        "--host",
        default=None,
        help="bind address (env HOST; default: 127.0.0.1); beyond loopback it needs --token, "
        "--room-tokens or --open",
    )
    p.add_argument(
        "--port", type=cc.port_or_zero, default=None, help="HTTP port (env PORT; default: 8000)"
    )
    p.add_argument(
        "--stun-port",
        type=cc.port_or_zero,
        default=None,
        help="also answer STUN on this UDP port, 0: any free port "
        "(env STUN_PORT; default: no STUN)",
    )
    p.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="share state via Redis (env REDIS_URL; default: in memory)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="workers must present this token (env P2P_TOKEN; default: none)",
    )
    p.add_argument(
        "--open",
        action="store_true",
        help="serve beyond loopback without any token, on purpose: anyone who reaches it can "
        "register, pair and relay (env P2P_OPEN=1)",
    )
    p.add_argument(
        "--admin-token",
        default=None,
        help="bearer token for /debug/list_workers and /debug/stats, which answer 404 without "
        "one (env ADMIN_TOKEN; default: none)",
    )
    p.add_argument(
        "--room-tokens",
        default=None,
        metavar="ROOM=TOKEN,...",
        help="per-room tokens, replacing --token in those rooms "
        "(env P2P_ROOM_TOKENS; default: none)",
    )
    p.add_argument(
        "--max-workers",
        type=int,  # Settings says which values it takes, naming MAX_WORKERS too
        default=None,
        help="connections held at once; more are closed with 1013 "
        "(env MAX_WORKERS; default: 10000)",
    )
    from rendezvous_service_code.settings import LIMIT_FLAGS, limit_flag_help

    limits = p.add_argument_group("limits (per source IP: an IPv6 client counts per /64)")
    for name, flag, kind, _what in LIMIT_FLAGS:
        limits.add_argument(
            flag, dest=name, type=kind, default=None, metavar="N", help=limit_flag_help(name)
        )
    p.add_argument(
        "--no-relay",
        action="store_true",
        help="refuse to relay for pairs that cannot punch (env P2P_RELAY=0)",
    )
    turn = p.add_argument_group("TURN (coturn with use-auth-secret)")
    turn.add_argument(
        "--turn",
        default=None,
        metavar="URL[,URL]",
        help="TURN servers handed to paired workers, turn:HOST:PORT?transport=udp|tcp, at most "
        "4 (env TURN_URLS; default: none)",
    )
    turn.add_argument(
        "--turn-secret",
        default=None,
        metavar="SECRET",
        help="coturn's static-auth-secret; each offer carries credentials made with it for the "
        "receiving worker only (env TURN_SECRET; default: none, required with --turn)",
    )
    turn.add_argument(
        "--turn-ttl",
        type=float,
        default=None,
        metavar="S",
        help="seconds those credentials allow new allocations (env TURN_TTL_S; default: 600)",
    )
    p.set_defaults(func=_cmd_rendezvous, check=_check_rendezvous, cmd_parser=p)


def _add_stun_server(sub: Any) -> None:
    p = sub.add_parser(
        "stun-server",
        help="run a standalone STUN server",
        description="Its default port, UDP 3478, is also the one the README gives "
        "`p2plab rendezvous --stun-port`: on one host give the two different ports.",
    )
    p.add_argument("--host", default="0.0.0.0", help="bind address")
    p.add_argument("--port", type=cc.port_or_zero, default=3478, help="UDP port (0: any)")
    p.add_argument(
        "--alt-host", default=None, help="second IP for RFC 5780 behaviour tests (default: none)"
    )
    p.add_argument(
        "--alt-port",
        type=cc.port,
        default=None,
        help="second port for RFC 5780 tests (default: none)",
    )
    p.add_argument(
        "--rate",
        type=cc.non_negative_float,
        default=20.0,
        help="answers per second to one source IP, after its burst; 0: no limit (default: 20)",
    )
    p.add_argument(
        "--burst",
        type=cc.positive_float,
        default=40.0,
        help="answers one source IP may get at once (default: 40)",
    )
    p.add_argument(
        "--software",
        default=None,
        help="SOFTWARE attribute text to send (default: none, it only helps scanners)",
    )
    p.set_defaults(func=_cmd_stun_server, check=_check_stun_server, cmd_parser=p)


def _add_worker(sub: Any) -> None:
    p = sub.add_parser(
        "worker",
        help="run one worker (UI on its HTTP port)",
        description="Flags win over the environment variables named in their help. "
        "The rendezvous URL may be ws://, wss:// or http(s):// (mapped to ws(s)://).",
    )
    p.add_argument(
        "--rendezvous",
        type=cc.rendezvous_url,
        default=None,
        metavar="ws://H:P",
        help="the rendezvous service (env RENDEZVOUS_URL; default: none, required)",
    )
    p.add_argument(
        "--stun",
        action="append",
        metavar="H:P",
        type=_stun_servers,
        help="STUN server, repeat for more (env STUN_SERVERS, comma separated; default: none)",
    )
    p.add_argument(
        "--udp-port",
        type=cc.port_or_zero,
        default=None,
        help="peer UDP port, 0: any (env INTERNAL_UDP_PORT; default: 0)",
    )
    p.add_argument(
        "--http-host", default=None, help="UI bind address (env HTTP_HOST; default: 127.0.0.1)"
    )
    p.add_argument(
        "--http-port",
        type=cc.port_or_zero,
        default=None,
        help="UI port, 0: any (env PORT; default: 8080)",
    )
    p.add_argument("--room", default=None, help="rendezvous room (env P2P_ROOM; default: default)")
    p.add_argument(
        "--token", default=None, help="the rendezvous's token (env P2P_TOKEN; default: none)"
    )
    p.add_argument("--id", default=None, help="worker id (env WORKER_ID; default: a new UUID)")
    p.add_argument(
        "--peer-key",
        default=None,
        metavar="KEY",
        help="pair only with the peer holding this key: its base64 public key or its "
        "fingerprint, 64 hex digits as its page shows (env P2P_PEER_KEY; default: any key, "
        "remembered by peer id, a change reported loudly)",
    )
    p.add_argument(
        "--ui-token",
        default=None,
        metavar="TOKEN",
        help="token of the UI page, 16+ characters (env UI_TOKEN, better: a flag shows in ps; "
        "default: generated, printed in the UI address)",
    )
    p.add_argument(
        "--ui-allowed-hosts",
        default=None,
        metavar="H,H",
        help="host names the UI answers to besides localhost and IP addresses, e.g. a Cloud Run "
        "name or .run.app (env UI_ALLOWED_HOSTS; default: none)",
    )
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
    p.add_argument(
        "--no-birthday",
        action="store_true",
        help="no birthday punching for a hard NAT (plain punching, then the relay; "
        "env P2P_BIRTHDAY=0)",
    )
    p.add_argument(
        "--birthday-sockets",
        type=_birthday_sockets,
        metavar="K",
        help="sockets a worker behind a hard NAT opens, 1..1024 (env P2P_BIRTHDAY_SOCKETS; "
        "default: 256)",
    )
    p.add_argument(
        "--hard-nat-budget",
        type=cc.non_negative_int,
        metavar="N",
        help="when both NATs are hard, try N random probes per side before the relay, 0: "
        "relay at once (env P2P_HARD_NAT_BUDGET; default: 0; 172000 gives 99.9%%)",
    )
    _add_port_mapping(p)
    p.add_argument(
        "--port-mapping-lifetime",
        type=_lease_seconds,
        metavar="S",
        help="the port-mapping lease to ask for, renewed at half of it; short ones let a lab "
        "see a deleted lease come back (env P2P_PORT_MAPPING_LIFETIME; default: 7200)",
    )
    p.add_argument(
        "--ipv6",
        type=_ipv6_mode,
        default=None,
        metavar="off|auto",
        help="auto: a second UDP socket for IPv6 when the host has an IPv6 route, IPv6 "
        "candidates and STUN over IPv6; off: IPv4 only (env P2P_IPV6; default: auto)",
    )
    p.add_argument(
        "--keepalive", type=cc.positive_float, metavar="S", help="keep-alive interval (default: 5)"
    )
    p.add_argument(
        "--peer-timeout",
        type=cc.positive_float,
        metavar="S",
        help="silence before the peer is lost (default: 15)",
    )
    p.add_argument(
        "--punch-timeout",
        type=cc.positive_float,
        metavar="S",
        help="give up punching after S seconds (default: 10)",
    )
    p.add_argument(
        "--connect-timeout",
        type=cc.non_negative_float,
        default=60.0,
        metavar="S",
        help="exit with an error if the rendezvous cannot be reached in S seconds at start "
        "(0: keep trying)",
    )
    p.add_argument(
        "--events", action="store_true", help="print every status/chat event as a JSON line"
    )
    p.set_defaults(func=_cmd_worker, check=_check_worker, cmd_parser=p)


def _add_port_mapping(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--port-mapping",
        type=_port_mapping,
        metavar="off|auto|IP",
        help="ask the NAT for a port (NAT-PMP, PCP, UPnP): off, auto (the default route's "
        "gateway; never when the rendezvous or a STUN server is on loopback) or the gateway's "
        "IPv4 address (env P2P_PORT_MAPPING; default: auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = cc.CliParser(
        prog="p2plab", description="NAT traversal lab: rendezvous, STUN, hole punching, benchmarks"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging: -v INFO, -vv DEBUG (default: warnings only)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_rendezvous(sub)
    _add_stun_server(sub)
    _add_worker(sub)

    p = sub.add_parser("probe", help="report this host's NAT behaviour (IPv4 and IPv6)")
    p.add_argument(
        "--stun",
        action="append",
        metavar="H:P",
        type=_stun_servers,
        help="STUN server, repeat for more; [2001:db8::1]:3478 or a name with an AAAA record "
        "tests IPv6 too (default: none, required)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-classic", action="store_true", help="skip the RFC 3489 (pystun3) test")
    _add_port_mapping(p)
    p.set_defaults(func=_cmd_probe, check=_check_probe, cmd_parser=p)

    p = sub.add_parser("demo", help="rendezvous + STUN + two workers on loopback")
    p.add_argument(
        "--duration",
        type=cc.positive_float,
        default=None,
        help="stop after N seconds (default: until Ctrl-C)",
    )
    p.add_argument(
        "--http-port",
        type=cc.port_or_zero,
        default=8080,
        help="first UI port, the second is the next one (0: any; a taken port: any)",
    )
    p.set_defaults(func=_cmd_demo, check=_check_demo, cmd_parser=p)

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
    # Library logs at WARNING unless asked: what a command prints itself is what the user needs.
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.verbose < 2:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    check = getattr(args, "check", None)
    if check is not None:
        check(args)  # every value, before anything touches the network (exit 2 on a mistake)
    func = args.func
    if asyncio.iscoroutinefunction(func):
        return _run(func(args), f"p2plab {args.command}")
    return int(func(args) or 0)
