"""Finding 3 of the security audit: host names as candidates freeze a worker's event loop.

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

__all__ = ["inner_candidates", "probe_candidates"]

#: The script the namespace runs (its --inner-candidates part).
SCRIPT = Path(__file__).resolve().parent / "security_audit.py"

NAMES = ("a.slow.invalid", "b.slow.invalid", "c.slow.invalid", "d.slow.invalid")


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _fake_rendezvous(ready: asyncio.Event, offer_sent: list[float]) -> Any:
    from websockets.asyncio.server import serve

    peer_key = base64.b64encode(os.urandom(32)).decode()
    with contextlib.suppress(Exception):
        from p2plab.core.crypto import Identity

        peer_key = Identity.generate(os.urandom).public_b64

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
        offer = {
            "type": "p2p_connection_offer",
            "peer_worker_id": "attacker",
            "peer_udp_ip": NAMES[0],
            "peer_udp_port": 40000,
            "peer_candidates": [{"ip": n, "port": 40000} for n in NAMES[1:]],
            "role": "controlling",
            "peer_public_key": peer_key,
        }
        await ws.send(json.dumps(offer))
        offer_sent.append(time.monotonic())
        with contextlib.suppress(Exception):
            async for _ in ws:
                pass

    server = await serve(handler, "127.0.0.1", 0)
    ready.set()
    return server


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
    ready, offer_sent = asyncio.Event(), []
    fake = await _fake_rendezvous(ready, offer_sent)
    rv_port = fake.sockets[0].getsockname()[1]
    http_port = _free_tcp_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)  # the worker started above, by its own process group
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
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
