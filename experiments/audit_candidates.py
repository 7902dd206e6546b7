"""Findings 3 and 10 of the security audit: a worker process against a fake rendezvous.

Finding 10: 16,000 nested JSON arrays from the rendezvous; does the worker register again once
the rendezvous closes that connection (its rendezvous client lived on)?

Finding 3: host names as candidates freeze a worker's event loop.

A worker process (started here, ended by its process group) gets from a fake rendezvous an
offer whose address and candidates are ``*.invalid`` names; the stall is the worst ``/health``
latency afterwards, and the DNS queries it made are counted.  So that those lookups never leave
the machine, everything runs in a private network and mount namespace (``unshare``, root) whose
resolv.conf names a resolver on 127.0.0.1 that never answers (``timeout:1 attempts:1``): a
lookup then costs the worker about a second, as a slow resolver would.  Without root: ``n/a``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from audit_common import (
    CHALLENGE_WAIT,
    ROOT,
    WAIT,
    Result,
    not_available,
    recv_json,
    result,
    settle,
)

__all__ = ["inner_candidates", "probe_candidates", "probe_deep_json"]

#: The script the namespace runs (its --inner-candidates part).
SCRIPT = Path(__file__).resolve().parent / "security_audit.py"

NAMES = ("a.slow.invalid", "b.slow.invalid", "c.slow.invalid", "d.slow.invalid")


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _fake_rendezvous(act: Callable[[Any], Awaitable[None]], registers: list[float]) -> Any:
    """A WebSocket server that registers any worker (with a challenge if it waits for one),
    notes each registration's time in ``registers``, then lets ``act`` do the attack."""
    from websockets.asyncio.server import serve

    async def handler(ws: Any) -> None:
        worker_id = ws.request.path.rsplit("/", 1)[-1]
        msg = await recv_json(ws, CHALLENGE_WAIT)
        if msg is None:  # a worker that waits for a challenge first
            nonce, key = os.urandom(32), os.urandom(32)
            with contextlib.suppress(Exception):
                from p2plab.core.crypto import Identity

                key = base64.b64decode(Identity.generate(os.urandom).public_b64)
            challenge = {
                "type": "challenge",
                "nonce": base64.b64encode(nonce).decode(),
                "server_key": base64.b64encode(key).decode(),
            }
            await ws.send(json.dumps(challenge))
            msg = await recv_json(ws, WAIT)
        if msg is None or msg.get("type") != "register":
            return
        registers.append(time.monotonic())
        port = ws.remote_address[1]
        await ws.send(
            json.dumps(
                {
                    "type": "registered",
                    "worker_id": worker_id,
                    "observed_ip": "127.0.0.1",
                    "observed_port": port,
                }
            )
        )
        await recv_json(ws, 1.0)  # its update_udp_endpoint, if it sends one
        await act(ws)
        with contextlib.suppress(Exception):
            async for _ in ws:
                pass

    return await serve(handler, "127.0.0.1", 0)


def _peer_key() -> str:
    with contextlib.suppress(Exception):
        from p2plab.core.crypto import Identity

        return str(Identity.generate(os.urandom).public_b64)
    return base64.b64encode(os.urandom(32)).decode()


async def _start_worker(rv_port: int, http_port: int) -> asyncio.subprocess.Process:
    """``p2plab worker`` of this checkout, in a process group of its own (ended by its id)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "p2plab",
        "worker",
        "--rendezvous",
        f"ws://127.0.0.1:{rv_port}",
        "--http-port",
        str(http_port),
        "--no-nat-report",
        "--id",
        "victim",
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def _stop_worker(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)  # the worker started here, by its own process group
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 10)


class _SilentDns(asyncio.DatagramProtocol):
    """A resolver on 127.0.0.1:53 that counts queries and never answers (a slow one)."""

    def __init__(self) -> None:
        self.queries = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queries += 1


async def inner_candidates(window: float) -> Result:
    """Run inside the private namespace: fake resolver, fake rendezvous, the worker, the clock."""
    loop = asyncio.get_running_loop()
    dns_transport, dns = await loop.create_datagram_endpoint(
        _SilentDns, local_addr=("127.0.0.1", 53)
    )
    offer_sent: list[float] = []
    peer_key = _peer_key()

    async def offer(ws: Any) -> None:
        await ws.send(
            json.dumps(
                {
                    "type": "p2p_connection_offer",
                    "peer_worker_id": "attacker",
                    "peer_udp_ip": NAMES[0],
                    "peer_udp_port": 40000,
                    "peer_candidates": [{"ip": n, "port": 40000} for n in NAMES[1:]],
                    "role": "controlling",
                    "peer_public_key": peer_key,
                }
            )
        )
        offer_sent.append(time.monotonic())

    fake = await _fake_rendezvous(offer, [])
    http_port = _free_tcp_port()
    proc = await _start_worker(fake.sockets[0].getsockname()[1], http_port)
    try:
        import httpx

        await settle(lambda: bool(offer_sent) or proc.returncode is not None, 20.0, 0.05)
        if not offer_sent:
            return not_available(3, "candidate_names_stall_s", "the worker never got to the offer")
        worst, answered = 0.0, 0
        end = time.monotonic() + window
        async with httpx.AsyncClient(timeout=window + 5.0) as http:
            while time.monotonic() < end:
                t0 = time.monotonic()
                with contextlib.suppress(Exception):
                    await http.get(f"http://127.0.0.1:{http_port}/health")
                    answered += 1
                worst = max(worst, time.monotonic() - t0)
                await asyncio.sleep(0.05)
        text = (
            f"worst /health latency {worst:.2f} s in the {window:.0f} s after one offer naming "
            f"{len(NAMES)} *.invalid hosts; {dns.queries} DNS queries made"
        )
        return result(3, "candidate_names_stall_s", round(worst, 2), text) | {
            "dns_queries": dns.queries
        }
    finally:
        await _stop_worker(proc)
        fake.close()
        dns_transport.close()


def probe_candidates(window: float) -> list[Result]:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return [not_available(3, "candidate_names_stall_s", "needs root and unshare")]
    with tempfile.TemporaryDirectory() as tmp:
        resolv = Path(tmp, "resolv.conf")
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        script = (
            f"mount --bind {resolv} /etc/resolv.conf && ip link set lo up && "
            f"exec {sys.executable} {SCRIPT} --inner-candidates {window}"
        )
        done = subprocess.run(
            ["unshare", "--mount", "--net", "--", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=window + 60,
        )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [not_available(3, "candidate_names_stall_s", tail[:160])]
    result: Result = json.loads(lines[-1])
    return [result]


async def probe_deep_json(short: bool) -> list[Result]:
    """Finding 10: 16,000 nested JSON arrays from the rendezvous; does the worker's rendezvous
    client live on (it registers again once the rendezvous closes the connection)?"""
    registers: list[float] = []
    sent: list[float] = []

    async def deep(ws: Any) -> None:
        if sent:  # only the first connection is attacked
            return
        # 16,000 opening brackets fit the 16 KiB message limit; the parser recurses into them
        # before it can see the JSON is unfinished (RecursionError, not ValueError)
        await ws.send("[" * 16000)
        sent.append(time.monotonic())
        await asyncio.sleep(0.3)
        await ws.close(1011, "audit: closing after the deep message")

    fake = await _fake_rendezvous(deep, registers)
    proc = await _start_worker(fake.sockets[0].getsockname()[1], _free_tcp_port())
    try:
        await settle(lambda: bool(sent) or proc.returncode is not None, 20.0, 0.05)
        if not sent:
            return [not_available(10, "deep_json_client_survives", "the worker never registered")]
        wait = 3.0 if short else 6.0
        await settle(lambda: len(registers) >= 2, wait, 0.05)
        if len(registers) >= 2:
            text = f"yes: registered again {registers[1] - sent[0]:.1f} s after the deep message"
        else:
            text = f"no: never registered again in {wait:.0f} s (its rendezvous client ended)"
        return [result(10, "deep_json_client_survives", len(registers) >= 2, text)]
    finally:
        await _stop_worker(proc)
        fake.close()
