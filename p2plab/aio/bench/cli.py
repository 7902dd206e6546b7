"""``p2plab bench``: UDP benchmarks between two workers from the command line (issue 4).

Both sides run the command against the same rendezvous; with ``--role auto`` the worker with the
smaller id sends and the other answers.  Runs are encrypted with the link's session keys when the
link has them; ``--no-encrypt`` measures the explicit unencrypted mode (marked ``encrypted=False``
in every result).  ``--no-flow-control`` lets the sender ignore the receiver's credit (it then
overruns a slower receiver, as iperf3 does at ``-b 0``).

Every value is checked before the worker starts (exit 2, one line); a side run alone says what
it waits for; when the peer goes away mid-run (the link leaves ``connected``) the other side ends
with an error (exit 1) instead of waiting for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from p2plab import cli_common as cc
from p2plab.aio.bench.api import Benchmark, extension_of
from p2plab.aio.bench.common import RTT_SPIN_US
from p2plab.aio.dualstack import IPV6_MODES
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.core.events import BenchmarkFinished, BenchmarkProgress
from p2plab.errors import P2PLabError
from p2plab.results import BenchResult, results_to_json, write_csv

T = TypeVar("T")

#: Every worker state without a peer link (contracts.md): the link entering one ends a run
#: (``relayed`` has one: a run goes on over the relay, at its budget).
_NOT_CONNECTED = (
    "starting",
    "registering",
    "discovering",
    "waiting_for_peer",
    "punching",
    "lost",
    "stopped",
)

__all__ = ["register_cli"]


def register_cli(subparsers: Any) -> None:
    """Add ``p2plab bench`` to the CLI."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="run UDP benchmarks against a peer worker (both sides run this command)",
        description="Run the same command on both hosts, against the same rendezvous and room.",
    )
    p.add_argument(
        "--rendezvous",
        required=True,
        type=cc.rendezvous_url,
        help="ws://HOST:PORT of the rendezvous (wss://, http(s):// too)",
    )
    p.add_argument(
        "--stun",
        action="append",
        default=[],
        type=_stun_arg,
        help="STUN server HOST:PORT, repeat for more (default: none)",
    )
    p.add_argument("--room", default="default", help="rendezvous room both sides use")
    p.add_argument("--token", default=None, help="the rendezvous's token (default: none)")
    p.add_argument("--udp-port", type=cc.port_or_zero, default=0, help="UDP port, 0: any")
    p.add_argument(
        "--ipv6",
        choices=IPV6_MODES,
        default="auto",
        help="auto: an IPv6 socket beside the IPv4 one when the host has an IPv6 route (the "
        "link may run over IPv6); off: IPv4 only",
    )
    p.add_argument("--duration", type=_duration, default=5.0, help="seconds per run (up to 3600)")
    p.add_argument(
        "--size", type=cc.payload_size, default=1200, help="UDP payload bytes (64..65507)"
    )
    p.add_argument(
        "--rate",
        type=cc.non_negative_float,
        default=0.0,
        help="target Mbit/s (0: as fast as possible)",
    )
    p.add_argument(
        "--interval", type=cc.positive_float, default=1.0, help="report interval, seconds"
    )
    p.add_argument(
        "--sweep",
        type=cc.payload_sizes,
        default=None,
        metavar="SIZES",
        help="comma-separated payload sizes, one run each (default: --size only)",
    )
    p.add_argument(
        "--rtt", type=_count, default=0, help="also ping-pong this many times (0: no RTT run)"
    )
    p.add_argument(
        "--rtt-via-loop",
        action="store_true",
        help="ping-pong through the event loop instead of blocking on the socket (comparisons)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=cc.non_negative_float,
        default=RTT_SPIN_US,
        help="RTT mode: each end reads without sleeping this long after a datagram before it"
        " sleeps (0: sleep at once, like sockperf's default)",
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
    p.add_argument(
        "--connect-timeout",
        type=cc.non_negative_float,
        default=60.0,
        help="seconds to reach the rendezvous and find a peer (0: no limit)",
    )
    p.add_argument(
        "--csv",
        default=None,
        help="write the results to this CSV (sender: both views; receiver: its own)"
        " (default: none)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_bench, check=_check_bench, cmd_parser=p)


def _stun_arg(text: str) -> str:
    for item in text.split(","):
        if item.strip():
            cc.hostport(item.strip())
    return text


def _duration(text: str) -> float:
    value = cc.positive_float(text)
    if value > 3600:
        raise argparse.ArgumentTypeError(f"must be at most 3600 s, got {text}")
    return value


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return int(text)


def _check_bench(args: argparse.Namespace) -> None:
    cc.check_free(args.cmd_parser, [("bench UDP (--udp-port)", "UDP", "0.0.0.0", args.udp_port)])


def _table(results: Sequence[BenchResult]) -> str:
    head = f"{'size':>6} {'sent':>9} {'recv':>9} {'lost%':>7} {'ooo':>5} {'dup':>4} "
    head += f"{'jit us':>8} {'send Mb/s':>10} {'recv Mb/s':>10} {'gso':>4} {'gro':>4} {'enc':>4}"
    head += f" {'short':>5}"
    lines = [head]
    for r in results:
        lines.append(
            f"{r.payload_size:>6} {r.packets_sent:>9} {r.packets_received:>9} "
            f"{r.lost_percent:>7.3f} {r.out_of_order:>5} {r.duplicates:>4} "
            f"{r.jitter_us:>8.1f} "
            f"{r.sent_mbps:>10.1f} {r.received_mbps:>10.1f} {r.gso!s:>4} {r.gro!s:>4} "
            f"{r.encrypted!s:>4} {r.short_of_target!s:>5}"
        )
    # A run that did not reach its target rate says by how much (the note has the numbers),
    # once per run however many of its views are in the table.
    said: set[str] = set()
    for r in results:
        if r.short_of_target and r.run_id not in said:
            said.add(r.run_id)
            why = [n for n in r.note.split("; ") if n.startswith("short of target")]
            lines.append(f"{r.payload_size} B: " + (why[0] if why else "short of target"))
    return "\n".join(lines)


def _result_of(d: dict[str, Any]) -> BenchResult:
    """A :class:`BenchResult` from a ``BenchmarkFinished`` row (this side's view)."""
    names = {f.name for f in fields(BenchResult)} - {"intervals", "peer_view"}
    return BenchResult(**{k: v for k, v in d.items() if k in names})


async def _unless_peer_leaves(worker: Worker, work: Awaitable[T]) -> T:
    """``work``'s result; P2PLabError at once if the peer link goes first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(worker.wait_for_state(*_NOT_CONNECTED))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise P2PLabError(
            f"the peer went away during the benchmark (link now {gone.result()}); "
            "no result from this run"
        )
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
        await asyncio.wait({task, gone}, timeout=2.0)


class _Progress:
    """A tqdm bar per run from the worker's ``BenchmarkProgress`` events (on stderr)."""

    def __init__(self, total_s: float | None) -> None:
        self.total_s = total_s
        self.bar: Any = None
        self.run_id: int | None = None

    def update(self, event: BenchmarkProgress) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]

        if event.run_id != self.run_id:
            self.close()
            self.run_id = event.run_id
            fmt = "{desc}: {n:.1f} s {postfix}"
            if self.total_s is not None:
                fmt = "{desc}: {percentage:3.0f}%|{bar:20}| {n:.1f}/{total:g} s {postfix}"
            self.bar = tqdm(
                total=self.total_s,
                desc=f"run {event.run_id}",
                bar_format=fmt,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        elapsed = event.elapsed_s if self.total_s is None else min(event.elapsed_s, self.total_s)
        self.bar.update(max(0.0, elapsed - self.bar.n))
        self.bar.set_postfix_str(f"{event.mbps:.1f} Mbit/s, {event.lost} lost")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


async def _show_progress(worker: Worker, role: str, total_s: float | None) -> None:
    progress = _Progress(total_s)
    try:
        async with worker.subscribe(BenchmarkProgress) as events:
            async for event in events:
                if event.role == role:
                    progress.update(event)
    finally:
        progress.close()


async def _find_peer(worker: Worker, args: argparse.Namespace) -> None:
    """Reach the rendezvous, then wait for a peer in the room (saying how to start one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.connect_timeout if args.connect_timeout else None
    problem = await cc.wait_registered(worker, args.rendezvous, args.connect_timeout)
    if problem is not None:
        raise P2PLabError(problem)
    if worker.state != "connected":
        room = "" if args.room == "default" else f" --room {args.room}"
        print(
            f"bench: waiting for a peer in room {args.room!r} on {args.rendezvous}; on the "
            f"other host run: p2plab bench --rendezvous {args.rendezvous}{room}",
            file=sys.stderr,
            flush=True,
        )
    left = None if deadline is None else max(0.1, deadline - loop.time())
    try:
        state = await worker.wait_for_state("connected", "relayed", timeout=left)
    except TimeoutError:
        raise P2PLabError(
            f"no peer connected in room {args.room!r} within {args.connect_timeout:g} s "
            f"(--connect-timeout); last state: {worker.state}"
        ) from None
    if state == "relayed":
        print(
            "bench: the peer is reachable only through the rendezvous's relay (hole punching "
            "failed): runs are paced under its budget (path relay)",
            file=sys.stderr,
            flush=True,
        )


async def _receive(worker: Worker, args: argparse.Namespace) -> list[BenchResult]:
    """Answer the peer's runs until it says it is done; this side's rows, in order."""
    ext = extension_of(worker)
    done = ext.finished()
    print(f"worker {worker.worker_id}: answering benchmarks", file=sys.stderr, flush=True)
    results: list[BenchResult] = []

    async def collect() -> None:
        async with worker.subscribe(BenchmarkFinished) as finished:
            async for event in finished:
                if event.error is None:
                    results.append(_result_of(event.result))

    tasks = [
        asyncio.ensure_future(collect()),
        asyncio.ensure_future(_show_progress(worker, "receiver", None)),
    ]
    try:
        await asyncio.sleep(0)  # both subscriptions are in place before the first run
        await _unless_peer_leaves(worker, done)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=2.0)
    return results


async def _cmd_bench(args: argparse.Namespace) -> int:
    config = WorkerConfig(
        rendezvous_url=args.rendezvous,
        stun_servers=tuple(s for v in args.stun for s in v.split(",") if s),
        udp_port=args.udp_port,
        http_port=None,
        room=args.room,
        token=args.token,
        nat_report=False,
        ipv6=args.ipv6,
    )
    worker = Worker(config)
    await worker.start()
    for ep in (worker.endpoint4, worker.endpoint6) if args.no_mmsg else ():
        if ep is not None:  # the link may run on either family's socket
            ep.mmsg = False
    try:
        await _find_peer(worker, args)
        role = args.role
        if role == "auto":
            role = "send" if worker.worker_id < (worker.peer_id or "") else "receive"
        rtt = None
        if role == "receive":
            results = await _receive(worker, args)
            _output(results, None, args)
            return 0
        bench = Benchmark(
            worker,
            gso=False if args.no_gso else None,
            encrypt=False if args.no_encrypt else None,
            flow_control=not args.no_flow_control,
        )
        sizes = args.sweep or [args.size]
        if len(sizes) > 1:
            results = await _unless_peer_leaves(
                worker, bench.sweep(sizes, args.duration, args.rate, args.interval)
            )
        else:
            bar = asyncio.ensure_future(_show_progress(worker, "sender", args.duration))
            try:
                run = bench.run(args.duration, sizes[0], args.rate, args.interval)
                results = [await _unless_peer_leaves(worker, run)]
            finally:
                bar.cancel()
                await asyncio.wait([bar], timeout=2.0)
        if args.rtt:
            rtt = await _unless_peer_leaves(
                worker,
                bench.rtt(args.rtt, blocking=not args.rtt_via_loop, busy_poll_us=args.busy_poll_us),
            )
        with contextlib.suppress(P2PLabError):
            worker.send_control({"type": "bench_finished", "run_id": 0})
            await asyncio.sleep(0.2)
        _output(results, rtt, args)
        return 0
    finally:
        await worker.stop()


def _output(results: list[BenchResult], rtt: Any, args: argparse.Namespace) -> None:
    """The results as a table, or JSON (``--json``), and to ``--csv``: the same on both sides."""
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
