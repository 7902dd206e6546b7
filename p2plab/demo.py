"""``p2plab demo``: a rendezvous with embedded STUN and two workers, all on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time

from p2plab.aio.worker import Worker, WorkerConfig

__all__ = ["free_port", "run_demo"]

log = logging.getLogger(__name__)


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that is free right now on ``host`` (TCP by default)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_or_free(preferred: int) -> int:
    if preferred == 0:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


def _hostport(addr: tuple[str, int] | None) -> str:
    return "?" if addr is None else f"{addr[0]}:{addr[1]}"


async def run_demo(duration: float | None = None, http_port: int = 8080) -> int:
    from rendezvous_service_code.main import RendezvousServer

    host = "127.0.0.1"
    started = time.monotonic()
    rv = await RendezvousServer.start(host, 0, stun_port=0, handle_signals=False)
    stun_port = rv.stun_port
    workers: list[Worker] = []
    try:
        url = rv.ws_url
        print(f"rendezvous on {url}, STUN on udp://{host}:{stun_port}", flush=True)
        ports = [_port_or_free(http_port), _port_or_free(http_port + 1 if http_port else 0)]
        for p in ports:
            w = Worker(
                WorkerConfig(
                    rendezvous_url=url,
                    stun_servers=(f"{host}:{stun_port}",),
                    udp_host=host,
                    http_host=host,
                    http_port=p,
                )
            )
            await w.start()
            workers.append(w)
        a, b = workers
        print(f"workers A {a.worker_id[:8]} and B {b.worker_id[:8]} punching...", flush=True)
        try:
            await asyncio.gather(a.wait_connected(20), b.wait_connected(20))
        except TimeoutError:
            print(f"workers did not connect: A {a.state}, B {b.state}", file=sys.stderr)
            return 1
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.2)  # let a keep-alive or two refine the RTT
        rtt = a.rtt
        rtt_text = f"{rtt * 1000:.3f} ms" if rtt is not None else "n/a"
        print(
            f"connected in {elapsed:.2f} s: A {_hostport(a.udp_public)} <-> "
            f"B {_hostport(b.udp_public)}, RTT {rtt_text}",
            flush=True,
        )
        # The addresses come last, where the eye lands when the output stops.
        until = "Ctrl-C" if duration is None else f"{duration:g} s after the start, or Ctrl-C"
        print(f"The demo runs until {until}. Open the two worker pages:", flush=True)
        for w, name in ((a, "A"), (b, "B")):
            print(f"  worker {name}: {w.ui_url}", flush=True)
        if duration is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(max(0.0, duration - (time.monotonic() - started)))
        return 0
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                await w.stop()
        with contextlib.suppress(Exception):
            await rv.close()
