"""Rendezvous load benchmark: N concurrent workers on one instance, on loopback only.

Starts ``python -m rendezvous_service_code.main`` on 127.0.0.1 (OS-chosen port), then client
processes (``--procs``, default 2) that open N WebSocket connections in total, register them,
and report UDP endpoints pair by pair: every pair has its own room, the first of the pair reports
first, then the second's ``update_udp_endpoint`` is sent at a paced rate and the time until
*both* offers are received is the offer latency.  All connections stay open until the end.

Prints a table: workers held, connect/register time, offer latency p50/p99/max, server RSS per
worker.  Bounded by ``--max-seconds``; stops by itself.

    python benchmarks/rendezvous_load.py --workers 10000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    idx = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[idx]


# --- client process ------------------------------------------------------------------------


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    from p2plab.core.crypto import Identity, registration_proof

    n_pairs = args.pairs
    base = args.pair_offset
    deadline = time.monotonic() + args.max_seconds
    sem = asyncio.Semaphore(args.concurrency)
    conns: list[Any] = [None] * (2 * n_pairs)
    errors = 0

    async def open_one(i: int) -> None:
        nonlocal errors
        pair = base + i // 2
        wid = f"bench-{pair}-{i % 2}"
        async with sem:
            for _attempt in range(5):
                try:
                    ws = await connect(
                        f"{args.url}/ws/register/{wid}",
                        ping_interval=None,
                        open_timeout=30,
                        compression=None,
                    )
                    # The rendezvous speaks first: prove the key like a real worker does.
                    challenge = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if challenge.get("type") != "challenge":
                        raise RuntimeError(challenge)
                    identity = Identity.generate(os.urandom)
                    proof = registration_proof(
                        identity,
                        base64.b64decode(challenge["server_key"]),
                        base64.b64decode(challenge["nonce"]),
                        wid,
                    )
                    register = {
                        "type": "register",
                        "room": f"r{pair}",
                        "public_key": identity.public_b64,
                        "proof": base64.b64encode(proof).decode("ascii"),
                    }
                    await ws.send(json.dumps(register))
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if msg.get("type") != "registered":
                        raise RuntimeError(msg)
                    conns[i] = ws
                    return
                except Exception:
                    await asyncio.sleep(0.2)
            errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(open_one(i) for i in range(2 * n_pairs)))
    register_s = time.perf_counter() - t0
    # signal readiness to the parent and wait for its go
    sys.stdout.write(json.dumps({"phase": "registered", "register_s": register_s}) + "\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    def update(i: int) -> str:
        return json.dumps(
            {
                "type": "update_udp_endpoint",
                "udp_ip": "203.0.113.1",
                "udp_port": 1024 + (base * 2 + i) % 60000,
                "local_candidates": [{"ip": "198.18.0.1", "port": 1024 + i % 60000}],
            }
        )

    for i in range(0, 2 * n_pairs, 2):
        if conns[i] is not None:
            await conns[i].send(update(i))
    await asyncio.sleep(1.0)

    latencies: list[float] = []
    missing = 0
    interval = 1.0 / args.pair_rate if args.pair_rate > 0 else 0.0

    async def one_pair(k: int) -> None:
        nonlocal missing
        a, b = conns[2 * k], conns[2 * k + 1]
        if a is None or b is None:
            missing += 1
            return
        start = time.perf_counter()
        await b.send(update(2 * k + 1))
        try:
            async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
                ma, mb = await asyncio.gather(a.recv(), b.recv())
        except TimeoutError:
            missing += 1
            return
        if (
            json.loads(ma)["type"] != "p2p_connection_offer"
            or json.loads(mb)["type"] != "p2p_connection_offer"
        ):
            missing += 1
            return
        latencies.append((time.perf_counter() - start) * 1000.0)

    tasks = []
    t1 = time.perf_counter()
    for k in range(n_pairs):
        tasks.append(asyncio.create_task(one_pair(k)))
        if interval:
            next_at = t1 + (k + 1) * interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
    await asyncio.gather(*tasks)
    open_count = sum(1 for c in conns if c is not None and c.close_code is None)
    result = {
        "phase": "done",
        "register_s": register_s,
        "connect_errors": errors,
        "latencies_ms": latencies,
        "offers_missing": missing,
        "open_at_end": open_count,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for c in conns:
        if c is not None:
            with contextlib.suppress(Exception):
                await c.close()
    return result


# --- orchestration -------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=10000, help="concurrent workers (even)")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--pair-rate", type=float, default=1000.0, help="pairs/s (all processes)")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight/process")
    p.add_argument("--max-seconds", type=float, default=300.0)
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    # internal: client process mode
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pair-offset", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.client:
        raise_nofile(2 * args.pairs + 256)
        # The clients' own garbage-collector pauses would show up as offer latency; the run
        # is bounded, so switch the cyclic collector off here (reference counting still frees).
        gc.disable()
        try:
            import uvloop

            uvloop.run(client_main(args))
        except ImportError:
            asyncio.run(client_main(args))
        return 0

    n = args.workers - args.workers % 2
    limit = raise_nofile(n + 1024)
    if limit < n + 256:
        n = (limit - 256) // 2 * 2
        print(f"open-files limit {limit}: reducing to {n} workers", file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # Every client is on 127.0.0.1: lift the per-source-IP limits for this one measurement.
    server_env = dict(
        env,
        MAX_CONNECTIONS_PER_IP=str(n + 100),
        CONNECTIONS_PER_IP_PER_MIN=str(10 * n + 100),
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rendezvous_service_code.main",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "WARNING",
            "--max-workers",
            str(n + 100),
        ],
        stdout=subprocess.PIPE,
        env=server_env,
        cwd=REPO,
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        time.sleep(0.5)
        rss_before = rss_kib(server.pid)
        pairs_total = n // 2
        per = [
            pairs_total // args.procs + (1 if i < pairs_total % args.procs else 0)
            for i in range(args.procs)
        ]
        offset = 0
        for count in per:
            clients.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--client",
                        "--url",
                        info["ws_url"],
                        "--pairs",
                        str(count),
                        "--pair-offset",
                        str(offset),
                        "--pair-rate",
                        str(args.pair_rate / args.procs),
                        "--concurrency",
                        str(args.concurrency),
                        "--max-seconds",
                        str(args.max_seconds),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
            offset += count
        t_start = time.monotonic()
        reg = [json.loads(c.stdout.readline()) for c in clients]  # type: ignore[union-attr]
        register_s = time.monotonic() - t_start
        rss_held = rss_kib(server.pid)
        for c in clients:
            c.stdin.write("go\n")  # type: ignore[union-attr]
            c.stdin.flush()  # type: ignore[union-attr]
        results = [json.loads(c.stdout.readline()) for c in clients]  # type: ignore[union-attr]
        rss_after = rss_kib(server.pid)
        for c in clients:
            c.stdin.write("bye\n")  # type: ignore[union-attr]
            c.stdin.flush()  # type: ignore[union-attr]
        lat = [x for r in results for x in r["latencies_ms"]]
        held = sum(r["open_at_end"] for r in results)
        row = {
            "workers_requested": n,
            "workers_held": held,
            "connect_errors": sum(r["connect_errors"] for r in results),
            "register_all_s": round(register_s, 2),
            "client_register_s": [round(r["register_s"], 2) for r in reg],
            "pairs_measured": len(lat),
            "offers_missing": sum(r["offers_missing"] for r in results),
            "pair_rate_per_s": args.pair_rate,
            "offer_p50_ms": round(percentile(lat, 50), 2),
            "offer_p99_ms": round(percentile(lat, 99), 2),
            "offer_max_ms": round(max(lat), 2) if lat else None,
            "server_rss_before_mib": round(rss_before / 1024, 1),
            "server_rss_held_mib": round(rss_held / 1024, 1),
            "server_rss_after_pairing_mib": round(rss_after / 1024, 1),
            "rss_per_worker_kib": round((rss_after - rss_before) / max(1, held), 1),
        }
        width = max(len(k) for k in row)
        print(f"rendezvous load benchmark (one instance, loopback, {args.procs} client procs)")
        for k, v in row.items():
            print(f"  {k:<{width}}  {v}")
        if args.json:
            print(json.dumps(row))
        for c in clients:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.wait(timeout=30)
        return 0
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    raise SystemExit(main())
