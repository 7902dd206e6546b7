"""``p2plab bench``: UDP benchmarks between two workers from the command line (issue 4).

Both sides run the command against the same rendezvous; with ``--role auto`` the worker with the
smaller id sends and the other answers.  Runs are encrypted with the link's session keys when the
link has them; ``--no-encrypt`` measures the explicit unencrypted mode (marked ``encrypted=False``
in every result).  ``--no-flow-control`` lets the sender ignore the receiver's credit (it then
overruns a slower receiver, as iperf3 does at ``-b 0``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from p2plab.aio.bench.api import Benchmark, extension_of
from p2plab.aio.bench.common import RTT_SPIN_US
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.errors import P2PLabError
from p2plab.results import BenchResult, results_to_json, write_csv

__all__ = ["register_cli"]


def register_cli(subparsers: Any) -> None:
    """Add ``p2plab bench`` to the CLI."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="run UDP benchmarks against a peer worker (both sides run this command)"
    )
    p.add_argument("--rendezvous", required=True, help="ws://HOST:PORT of the rendezvous")
    p.add_argument("--stun", action="append", default=[], help="STUN server HOST:PORT")
    p.add_argument("--room", default="default")
    p.add_argument("--token", default=None)
    p.add_argument("--udp-port", type=int, default=0)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    p.add_argument("--size", type=int, default=1200, help="UDP payload bytes (64..65507)")
    p.add_argument("--rate", type=float, default=0.0, help="target Mbit/s (0: as fast as possible)")
    p.add_argument("--interval", type=float, default=1.0, help="report interval, seconds")
    p.add_argument("--sweep", default=None, help="comma-separated payload sizes, one run each")
    p.add_argument("--rtt", type=int, default=0, help="also ping-pong this many times")
    p.add_argument(
        "--rtt-via-loop",
        action="store_true",
        help="ping-pong through the event loop instead of blocking on the socket (comparisons)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=float,
        default=RTT_SPIN_US,
        help="RTT mode: each end reads without sleeping this long after a datagram before it"
        f" sleeps (0: sleep at once, like sockperf's default; default {RTT_SPIN_US:g})",
    )
    p.add_argument("--no-gso", action="store_true", help="plain sends even where GSO exists")
    p.add_argument(
        "--no-mmsg",
        action="store_true",
        help="one syscall per datagram: no sendmmsg/recvmmsg batching (for comparisons)",
    )
    p.add_argument(
        "--no-encrypt",
        action="store_true",
        help="explicit unencrypted mode: benchmark datagrams are not sealed (marked in results)",
    )
    p.add_argument(
        "--no-flow-control",
        action="store_true",
        help="ignore the receiver's credit: send at the rate asked even if the receiver drops",
    )
    p.add_argument(
        "--role",
        choices=("auto", "send", "receive"),
        default="auto",
        help="auto: the worker with the smaller id sends, the other answers",
    )
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--csv", default=None, help="write the results (both views) to this CSV")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_bench)


def _table(results: Sequence[BenchResult]) -> str:
    head = f"{'size':>6} {'sent':>9} {'recv':>9} {'lost%':>7} {'ooo':>5} {'dup':>4} "
    head += f"{'jit ms':>7} {'send Mb/s':>10} {'recv Mb/s':>10} {'gso':>4} {'gro':>4} {'enc':>4}"
    lines = [head]
    for r in results:
        lines.append(
            f"{r.payload_size:>6} {r.packets_sent:>9} {r.packets_received:>9} "
            f"{r.lost_percent:>7.3f} {r.out_of_order:>5} {r.duplicates:>4} {r.jitter_ms:>7.3f} "
            f"{r.sent_mbps:>10.1f} {r.received_mbps:>10.1f} {r.gso!s:>4} {r.gro!s:>4} "
            f"{r.encrypted!s:>4}"
        )
    return "\n".join(lines)


async def _cmd_bench(args: argparse.Namespace) -> int:
    config = WorkerConfig(
        rendezvous_url=args.rendezvous,
        stun_servers=tuple(s for v in args.stun for s in v.split(",") if s),
        udp_port=args.udp_port,
        http_port=None,
        room=args.room,
        token=args.token,
        nat_report=False,
    )
    worker = Worker(config)
    await worker.start()
    if args.no_mmsg and worker.endpoint is not None:
        worker.endpoint.mmsg = False
    try:
        await worker.wait_connected(timeout=args.connect_timeout)
        ext = extension_of(worker)
        role = args.role
        if role == "auto":
            role = "send" if worker.worker_id < (worker.peer_id or "") else "receive"
        if role == "receive":
            done = ext.finished()
            print(f"worker {worker.worker_id}: answering benchmarks", file=sys.stderr, flush=True)
            await done
            return 0
        bench = Benchmark(
            worker,
            gso=False if args.no_gso else None,
            encrypt=False if args.no_encrypt else None,
            flow_control=not args.no_flow_control,
        )
        sizes = [int(s) for s in args.sweep.split(",")] if args.sweep else [args.size]
        if len(sizes) > 1:
            results = await bench.sweep(sizes, args.duration, args.rate, args.interval)
        else:
            results = [await bench.run(args.duration, sizes[0], args.rate, args.interval)]
        rtt = (
            await bench.rtt(
                args.rtt, blocking=not args.rtt_via_loop, busy_poll_us=args.busy_poll_us
            )
            if args.rtt
            else None
        )
        with contextlib.suppress(P2PLabError):
            worker.send_control({"type": "bench_finished", "run_id": 0})
            await asyncio.sleep(0.2)
        if args.csv:
            write_csv(results, args.csv, both_views=True)
        if args.json:
            out: dict[str, Any] = {"results": json.loads(results_to_json(results))}
            if rtt is not None:
                out["rtt"] = rtt.to_dict()
            print(json.dumps(out, indent=2))
        else:
            print(_table(results))
            if rtt is not None:
                print(
                    f"rtt: {rtt.received}/{rtt.count} p50 {rtt.p50_ms:.3f} ms "
                    f"p90 {rtt.p90_ms:.3f} ms p99 {rtt.p99_ms:.3f} ms min {rtt.min_ms:.3f} ms "
                    f"encrypted={rtt.encrypted} wait={rtt.wait}"
                )
        return 0
    finally:
        await worker.stop()
