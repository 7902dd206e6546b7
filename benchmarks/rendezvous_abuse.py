"""What one abusive client gets out of a rendezvous, with today's limits and without them.

Starts ``python -m rendezvous_service_code.main`` on 127.0.0.1 twice: once with the defaults,
once with the per-IP limits lifted (what the service did before issue 14), and from one source
address measures:

- relay: ``--pairs`` pairs each relaying 1200-byte datagrams as fast as the per-connection budget
  lets them for ``--seconds``; what the service passed on, in Mbit/s (its ``relayed_bytes``);
- token guesses: connections that register with a wrong token, as fast as they can for
  ``--seconds``; how many guesses got an answer per second (the rest are refused unanswered);
- slots: connections one address can hold.

    python benchmarks/rendezvous_abuse.py --pairs 200 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

REPO = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin"
TOKEN = "bench-token"
#: Environment that lifts every per-IP limit: the service as it was before issue 14.
UNLIMITED = {
    "MAX_CONNECTIONS_PER_IP": "100000",
    "CONNECTIONS_PER_IP_PER_MIN": "1000000000",
    "TOKEN_FAILURES_PER_IP_PER_MIN": "1000000000",
    "RELAY_BYTES_PER_IP_PER_S": "1e12",
    "RELAY_BYTES_TOTAL_PER_S": "1e12",
}


def start_server(extra_env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra_env)
    argv = [sys.executable, "-m", "rendezvous_service_code.main", "--port", "0"]
    argv += ["--admin-token", ADMIN, "--token", TOKEN, "--log-level", "WARNING"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def stats(url: str) -> dict[str, Any]:
    req = urllib.request.Request(f"{url}/debug/stats", headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: dict[str, Any] = json.load(resp)
        return data


async def worker(ws_url: str, wid: str, room: str) -> ClientConnection | None:
    try:
        ws = await connect(f"{ws_url}/ws/register/{wid}", max_size=None, compression=None)
        await ws.recv()  # the challenge (plaintext registration needs no proof)
        await ws.send(json.dumps({"type": "register", "room": room, "token": TOKEN}))
        await ws.recv()
    except (ConnectionClosed, OSError):
        return None
    return ws


async def drain(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


async def relay(ws_url: str, http_url: str, pairs: int, seconds: float) -> tuple[float, int]:
    held: list[tuple[ClientConnection, ClientConnection, str]] = []
    for i in range(pairs):
        a = await worker(ws_url, f"a{i}", f"r{i}")
        b = await worker(ws_url, f"b{i}", f"r{i}")
        if a is None or b is None:
            break
        await a.send(
            json.dumps({"type": "update_udp_endpoint", "udp_ip": "203.0.113.1", "udp_port": 1})
        )
        await b.send(
            json.dumps({"type": "update_udp_endpoint", "udp_ip": "203.0.113.2", "udp_port": 2})
        )
        held.append((a, b, f"b{i}"))
    readers = [asyncio.create_task(drain(w)) for a, b, _ in held for w in (a, b)]
    await asyncio.sleep(0.5)  # offers delivered
    data = base64.b64encode(os.urandom(1200)).decode()
    before = stats(http_url)["relayed_bytes"]
    end = time.monotonic() + seconds
    t0 = time.monotonic()

    async def send(a: ClientConnection, to: str) -> None:
        msg = json.dumps({"type": "relay", "to": to, "data": data})
        with contextlib.suppress(ConnectionClosed):
            while time.monotonic() < end:
                await a.send(msg)
                await asyncio.sleep(0.04)  # 30 kB/s: inside the per-connection budget

    await asyncio.gather(*(send(a, to) for a, _, to in held))
    elapsed = time.monotonic() - t0
    passed = stats(http_url)["relayed_bytes"] - before
    for a, b, _ in held:
        await a.close()
        await b.close()
    for r in readers:
        r.cancel()
    return passed * 8 / elapsed / 1e6, len(held)


async def guesses(ws_url: str, seconds: float) -> tuple[float, int]:
    answered = refused = 0
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    i = 0
    while time.monotonic() < end:
        i += 1
        try:
            ws = await connect(f"{ws_url}/ws/register/g{i}", compression=None)
            first = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "register", "token": f"guess-{i}"}))
            await ws.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 1008:
                answered += 1
            else:
                refused += 1
            continue
        except OSError:
            refused += 1
            continue
        del first
    return answered / (time.monotonic() - t0), refused


async def slots(ws_url: str) -> int:
    held = []
    for i in range(400):
        ws = await worker(ws_url, f"s{i}", "slots")
        if ws is None:
            break
        held.append(ws)
    for ws in held:
        await ws.close()
    return len(held)


async def measure(env: dict[str, str], pairs: int, seconds: float) -> dict[str, Any]:
    """Each measurement on a fresh server (one's allowance must not spill into the next)."""
    out: dict[str, Any] = {}
    for what in ("relay", "guesses", "slots"):
        proc, info = start_server(env)
        try:
            if what == "relay":
                mbit, held_pairs = await relay(info["ws_url"], info["url"], pairs, seconds)
                out["pairs_from_one_ip"] = held_pairs
                out["relay_mbit_s"] = round(mbit, 2)
            elif what == "guesses":
                per_s, refused = await guesses(info["ws_url"], seconds)
                out["token_guesses_answered_per_s"] = round(per_s, 1)
                out["token_guesses_refused_unanswered"] = refused
            else:
                out["slots_one_ip_holds"] = await slots(info["ws_url"])
        finally:
            proc.terminate()
            proc.wait(15)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    rows = {
        "without per-IP limits (before)": asyncio.run(measure(UNLIMITED, args.pairs, args.seconds)),
        "defaults (after)": asyncio.run(measure({}, args.pairs, args.seconds)),
    }
    for name, row in rows.items():
        print(name)
        for k, v in row.items():
            print(f"  {k:<34} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
