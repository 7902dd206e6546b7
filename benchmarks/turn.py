"""Every path in one run: direct, TURN over UDP and TCP (Debian's coturn), the WebSocket relay,
and coturn's own ``turnutils_uclient`` as the reference for TURN throughput (issue 17).

    python benchmarks/turn.py [--duration 3] [--size 1000] [--messages 200000]

All on 127.0.0.1, each step bounded in time.  coturn runs as tests/aio/test_turn_coturn.py starts
it (``use-auth-secret``, loopback peers allowed).  Two workers in this process (one event loop,
so one core for both ends: an in-process figure, below what two processes reach) are paired by
the tests' fake rendezvous with coturn REST credentials; the tests' hooks block their direct
path for the TURN runs (so they connect through coturn) and leave it open for the direct run.
The relay run pairs two workers through a real rendezvous (``p2plab.server``) whose relay keeps
its default budgets (32 KiB/s and 50 messages/s per connection): the run is paced under them.

Each path runs both ways (``a->b`` and ``b->a``): on a TURN link one side sends to the peer's
relayed address from its own socket and the other through its own allocation (ChannelData via
the engine), which are different data paths.  Every row is sealed (the default) and obeys the
receiver's credit window (rate 0: as fast as the receiver reads).

coturn's reference: ``turnutils_uclient -y -c`` (two clients relaying to each other through
their allocations, ChannelData, as fast as it sends: ``-z 0``) with ``-n`` messages of ``-l``
bytes, over UDP and with ``-t`` over TCP; goodput = bytes received over the seconds in which
they arrived (its progress lines have 1 s resolution: a run lasts several seconds).  Its two
clients send to each other at the same time: the table gives the goodput per flow (the total
over both flows in parentheses), against which ours (one flow at a time) is compared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2plab.aio.bench import Benchmark  # noqa: E402
from p2plab.aio.worker import Worker  # noqa: E402
from p2plab.config import SessionConfig  # noqa: E402
from p2plab.results import BenchResult  # noqa: E402
from tests.aio.test_relay import blocked_workers  # noqa: E402
from tests.aio.test_turn_coturn import SECRET, _free_port  # noqa: E402
from tests.aio.test_turn_path_aio import turn_pair  # noqa: E402
from tests.rendezvous_fixtures import running_rendezvous  # noqa: E402

T = 30.0


@contextlib.contextmanager
def coturn() -> Any:
    """coturn on a free loopback port, as the tests start it; yields the port."""
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        raise SystemExit("coturn is not installed (apt-get install coturn)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="p2plab-turn-") as tmp:
        cmd = [
            turnserver, "-n", "--use-auth-secret", "--static-auth-secret", SECRET,
            "--realm", "p2plab", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
            "--listening-port", str(port), "--no-tls", "--no-dtls", "--no-cli",
            "--allow-loopback-peers", "--userdb", str(Path(tmp) / "turndb"),
            "--pidfile", str(Path(tmp) / "turnserver.pid"), "--log-file", "stdout",
            "--simple-log",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            yield port
        finally:
            proc.kill()
            proc.wait(timeout=10)


def uclient(port: int, messages: int, size: int, tcp: bool) -> dict[str, float]:
    """coturn's turnutils_uclient between two of its own clients; goodput in Mbit/s."""
    cmd = ["turnutils_uclient", "-y", "-c", "-W", SECRET, "-u", "bench", "-n", str(messages),
           "-l", str(size), "-m", "1", "-z", "0", "-p", str(port)]  # fmt: skip
    if tcp:
        cmd.append("-t")
    out = subprocess.run(
        [*cmd, "127.0.0.1"], capture_output=True, text=True, timeout=120, check=False
    ).stdout
    return parse_uclient(out)


def parse_uclient(out: str) -> dict[str, float]:
    """Goodput per flow and in total (Mbit/s), loss and RTT from turnutils_uclient's output."""
    points = [
        (int(m.group(1)), int(m.group(2)))
        for m in re.finditer(
            r"^(\d+): : start_mclient: msz=\d+, .*tot_recv_bytes ~ (\d+)", out, re.M
        )
    ]
    lost = re.search(r"Total lost packets \d+ \(([\d.]+)%\)", out)
    rtt = re.search(r"Average round trip delay ([\d.]+) ms", out)
    if not points or points[-1][1] == 0:
        return {"mbps": 0.0, "total_mbps": 0.0, "lost_percent": 100.0, "rtt_ms": 0.0}
    final = points[-1][1]
    flows = int(m.group(1)) if (m := re.search(r"start_mclient: msz=(\d+)", out)) else 2
    start = max(t for t, b in points if b == 0) if any(b == 0 for _, b in points) else 0
    end = min(t for t, b in points if b == final)
    secs = max(1, end - start)
    return {
        "mbps": final * 8 / secs / 1e6 / max(1, flows),  # per flow: they all run at once
        "total_mbps": final * 8 / secs / 1e6,
        "lost_percent": float(lost.group(1)) if lost else 0.0,
        "rtt_ms": float(rtt.group(1)) if rtt else 0.0,
    }


def received(r: BenchResult) -> tuple[float, float]:
    """Goodput (Mbit/s) and loss (%) the receiver counted."""
    v = r.peer_view
    return (v.mbps, v.lost_percent) if v is not None else (0.0, 100.0)


async def both_ways(a: Worker, b: Worker, dur: float, size: int, rate: float = 0.0) -> list[Any]:
    rows = []
    for name, w in (("a->b", a), ("b->a", b)):
        r = await Benchmark(w).run(duration_s=dur, payload_size=size, rate_mbps=rate)
        mbps, lost = received(r)
        rows.append({"path": r.path, "way": name, "mbps": mbps, "lost": lost, "note": r.note})
    return rows


async def turn_runs(port: int, dur: float, size: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with turn_pair(port, ("udp",)) as (a, b, block):
        block.on = False  # direct: the same harness, nothing blocked
        await a.wait_for_state("connected", timeout=T)
        await b.wait_for_state("connected", timeout=T)
        for _ in range(int(T * 10)):
            if a.path == b.path == "direct":
                break
            await asyncio.sleep(0.1)
        rows += await both_ways(a, b, dur, size)
    for transport in ("udp", "tcp"):
        async with turn_pair(port, (transport,)) as (a, b, _block):
            await a.wait_for_state("connected", timeout=T)
            await b.wait_for_state("connected", timeout=T)
            rows += await both_ways(a, b, dur, size)
    return rows


async def relay_runs(dur: float, size: int) -> list[dict[str, Any]]:
    session = SessionConfig(punch_timeout=1.0, keepalive_interval=1.0)
    async with running_rendezvous(stun_port=0) as rv:
        async with blocked_workers(rv, rv, session=session) as (a, b, _da, _db):
            await a.wait_for_state("relayed", timeout=T)
            await b.wait_for_state("relayed", timeout=T)
            return await both_ways(a, b, max(dur, 3.0), size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=200_000, help="turnutils_uclient -n")
    args = ap.parse_args()
    with coturn() as port:
        rows = asyncio.run(turn_runs(port, args.duration, args.size))
        rows += asyncio.run(relay_runs(args.duration, args.size))
        ref = {t: uclient(port, args.messages, args.size, t == "tcp") for t in ("udp", "tcp")}
    print(f"\npayload {args.size} B, {args.duration:g} s per run, sealed, credit window")
    print(f"{'path':10} {'way':6} {'Mbit/s':>9} {'loss %':>7}  note")
    for r in rows:
        print(f"{r['path']!s:10} {r['way']:6} {r['mbps']:9.2f} {r['lost']:7.2f}  {r['note']}")
    for t, v in ref.items():
        print(f"{'uclient-' + t:10} {'flow':6} {v['mbps']:9.2f} {v['lost_percent']:7.2f}  "
              f"turnutils_uclient -y -c -z 0{' -t' if t == 'tcp' else ''} "
              f"(both flows at once: {v['total_mbps']:.2f})")  # fmt: skip
    best = {p: max((r["mbps"] for r in rows if r["path"] == p), default=0.0) for p in
            ("direct", "turn-udp", "turn-tcp", "relay")}  # fmt: skip
    print("\nratios (best way of each path):")
    for num, den, what in (
        ("turn-udp", "uclient-udp", "ours over TURN/UDP vs coturn's client"),
        ("turn-tcp", "uclient-tcp", "ours over TURN/TCP vs coturn's client"),
        ("turn-udp", "direct", "TURN/UDP vs direct"),
        ("turn-tcp", "direct", "TURN/TCP vs direct"),
        ("relay", "direct", "relay vs direct"),
    ):
        d = ref[den[8:]]["mbps"] if den.startswith("uclient-") else best[den]
        print(f"  {num}/{den}: {best[num] / d if d else 0.0:.3g}  ({what})")


if __name__ == "__main__":
    main()
