"""Loopback: our benchmark vs iperf3 (throughput) and sockperf (RTT), in the same run.

    python benchmarks/loopback.py [--duration 5] [--size 1200] [--rate 0]

Runs, all on 127.0.0.1 and each bounded in time:
  1. iperf3 UDP (``-b 0``: unlimited), receiver goodput and loss from its JSON;
  2. ``p2plab bench`` between two worker processes (rendezvous as a third), plain sends: one
     datagram (one skb) each, batched 64 per ``sendmmsg``/``recvmmsg`` call, no GSO coalescing;
  3. the same with UDP GSO/GRO;
  4. sockperf ping-pong (64 bytes), in its default mode (both ends sleep in the kernel between
     datagrams) and its busy-polling one (``-F r --nonblocked``), vs our RTT ping-pong, in its
     default mode (both ends busy-poll ~1 ms after each datagram, then sleep) and sleeping at
     once (``rtt/sleep``, ``--busy-poll-us 0``, like sockperf's default);
each of ours sealed with the link's keys (the default) and in the explicit unencrypted mode, and
all of it ``--rounds`` times interleaved (medians: this host is shared and noisy).  Our sender
obeys the receiver's credit window (rate 0: as fast as the receiver reads, no overrun).
``--only plain/nommsg,...`` adds runs with one syscall per datagram, for comparison.
Prints a table with the ratios the issue targets (goodput ours/iperf3 >= 1 plain with < 1% loss,
>= 5 with GSO/GRO; RTT p50 ours/sockperf <= 2), and each RTT against both sockperf modes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

P2PLAB = [sys.executable, "-m", "p2plab"]
RX_LOG: Any = subprocess.DEVNULL  # where the receiving worker logs (a file to debug a run)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iperf3(duration: float, size: int, rate: str) -> dict[str, float]:
    port = free_port()
    server = subprocess.Popen(
        ["iperf3", "-s", "-1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        out = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", rate, "-l", str(size),
             "-t", str(duration), "-J"],
            capture_output=True, text=True, timeout=duration + 30,
        )  # fmt: skip
        data = json.loads(out.stdout)
        s = data["end"]["sum"]
        recv = data["end"].get("sum_received", s)
        return {
            "mbps": float(recv.get("bits_per_second", s["bits_per_second"])) / 1e6,
            "lost_percent": float(s.get("lost_percent", 0.0)),
            "sent_mbps": float(data["end"].get("sum_sent", s)["bits_per_second"]) / 1e6,
        }
    finally:
        server.kill()
        server.wait(5)


def sockperf(duration: float, spin: bool = False) -> dict[str, float]:
    """sockperf ping-pong p50/p90/p99 (``spin``: both ends busy-poll, ``-F r --nonblocked``)."""
    port = free_port(socket.SOCK_DGRAM)
    with tempfile.NamedTemporaryFile("w", suffix=".sockperf", delete=False) as feed:
        feed.write(f"U:127.0.0.1:{port}\n")  # sockperf takes -F only with a feed file
    target = ["-f", feed.name, "-F", "r", "--nonblocked"] if spin else ["-i", "127.0.0.1", "-p",
                                                                         str(port)]  # fmt: skip
    server = subprocess.Popen(
        ["sockperf", "server", *target], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        out = subprocess.run(
            ["sockperf", "ping-pong", *target, "-m", "64", "-t", str(int(duration)), "--full-rtt"],
            capture_output=True, text=True, timeout=duration + 30,
        )  # fmt: skip
        text = out.stdout + out.stderr
        res: dict[str, float] = {}
        for name, pct in (("p50_ms", "50.000"), ("p90_ms", "90.000"), ("p99_ms", "99.000")):
            m = re.search(rf"percentile {re.escape(pct)} =\s+([\d.]+)", text)
            if m:
                res[name] = float(m.group(1)) / 1000.0  # usec -> ms
        return res
    finally:
        server.kill()
        server.wait(5)
        os.unlink(feed.name)


def ours(
    duration: float,
    size: int,
    rate: float,
    gso: bool,
    rtt: int,
    encrypt: bool = True,
    mmsg: bool = True,
    busy_poll_us: float | None = None,
) -> dict[str, object]:
    port = free_port()
    rv = subprocess.Popen(
        [*P2PLAB, "rendezvous", "--host", "127.0.0.1", "--port", str(port), "--stun-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"ws://127.0.0.1:{port}"
    procs = [rv]
    try:
        time.sleep(2.0)
        rx = subprocess.Popen(
            [*P2PLAB, "bench", "--rendezvous", url, "--role", "receive"]
            + ([] if mmsg else ["--no-mmsg"]),
            stdout=subprocess.DEVNULL, stderr=RX_LOG,
        )  # fmt: skip
        procs.append(rx)
        args = [*P2PLAB, "bench", "--rendezvous", url, "--role", "send", "--json",
                "--duration", str(duration), "--size", str(size), "--rate", str(rate)]  # fmt: skip
        if rtt:
            args += ["--rtt", str(rtt)]
        if busy_poll_us is not None:
            args += ["--busy-poll-us", str(busy_poll_us)]
        if not gso:
            args.append("--no-gso")
        if not encrypt:
            args.append("--no-encrypt")
        if not mmsg:
            args.append("--no-mmsg")
        out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return dict(json.loads(out.stdout))
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


class Config(NamedTuple):
    name: str
    gso: bool
    encrypt: bool
    rtt: bool  # also an RTT run (busy-polling both ends, our default)
    mmsg: bool = True  # sendmmsg/recvmmsg batches
    busy_poll_us: float | None = None  # None: our default
    rtt_only: bool = False  # a short throughput run, only the RTT is reported


CONFIGS = (
    Config("plain", gso=False, encrypt=True, rtt=True),
    Config("plain/noenc", gso=False, encrypt=False, rtt=True),
    Config("gso-gro", gso=True, encrypt=True, rtt=False),
    Config("gso-gro/noenc", gso=True, encrypt=False, rtt=False),
    # Sleeping between datagrams on both ends, as sockperf's default ping-pong does:
    Config("rtt/sleep", gso=False, encrypt=True, rtt=True, busy_poll_us=0, rtt_only=True),
    Config("rtt/sleep/noenc", gso=False, encrypt=False, rtt=True, busy_poll_us=0, rtt_only=True),
)
EXTRA_CONFIGS = (  # only with --only: one syscall per datagram, for comparisons
    Config("plain/nommsg", gso=False, encrypt=True, rtt=False, mmsg=False),
    Config("plain/noenc/nommsg", gso=False, encrypt=False, rtt=False, mmsg=False),
    Config("gso-gro/nommsg", gso=True, encrypt=True, rtt=False, mmsg=False),
    Config("gso-gro/noenc/nommsg", gso=True, encrypt=False, rtt=False, mmsg=False),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--rate", type=float, default=0.0, help="our target Mbit/s (0: unlimited)")
    ap.add_argument("--iperf-rate", default="0", help="iperf3 -b (0: unlimited)")
    ap.add_argument("--rtt-count", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds (medians; the host is noisy)")
    ap.add_argument(
        "--only", default="", help="comma-separated configs of ours to run (default: all)"
    )
    a = ap.parse_args()
    wanted = a.only.split(",") if a.only else [c.name for c in CONFIGS]
    configs = [c for c in CONFIGS + EXTRA_CONFIGS if c.name in wanted]
    for tool in ("iperf3", "sockperf"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2
    ip_runs: list[dict[str, float]] = []
    sp_runs: list[dict[str, float]] = []
    spin_runs: list[dict[str, float]] = []
    ours_runs: dict[str, list[dict[str, object]]] = {c.name: [] for c in configs}
    for rnd in range(a.rounds):
        # Interleaved, so that a busy spell of the host hits every tool alike.
        ip_runs.append(iperf3(a.duration, a.size, a.iperf_rate))
        sp_runs.append(sockperf(a.duration))
        spin_runs.append(sockperf(a.duration, spin=True))
        for c in configs:
            for attempt in (1, 2):
                try:
                    ours_runs[c.name].append(
                        ours(0.5 if c.rtt_only else a.duration, a.size, a.rate, gso=c.gso,
                             rtt=a.rtt_count if c.rtt else 0, encrypt=c.encrypt, mmsg=c.mmsg,
                             busy_poll_us=c.busy_poll_us)
                    )  # fmt: skip
                    break
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    # Seen rarely: the pair connects but bench_start goes unanswered.  Say so
                    # and run that configuration again (a second failure ends the script).
                    print(f"{c.name}: run failed ({str(exc).strip()[-200:]})", file=sys.stderr)
                    if attempt == 2:
                        raise
        print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    ip_mbps = statistics.median(r["mbps"] for r in ip_runs)
    ip_loss = statistics.median(r["lost_percent"] for r in ip_runs)
    ip_sent = statistics.median(r["sent_mbps"] for r in ip_runs)
    sp50 = statistics.median(r.get("p50_ms", float("nan")) for r in sp_runs)
    spin50 = statistics.median(r.get("p50_ms", float("nan")) for r in spin_runs)
    print(f"payload {a.size} B, {a.duration} s per run, loopback, medians of {a.rounds} rounds")
    print("RTT: ours busy-polls both ends by default (rtt/sleep: both sleep in poll(2)); sockperf")
    print("sleeps by default, 'sockperf spin' is its busy-polling mode (-F r --nonblocked)")
    print(f"{'':>20} {'recv Mb/s':>10} {'lost %':>8} {'sent Mb/s':>10} {'vs iperf3':>9} "
          f"{'RTT p50 ms':>10} {'vs sockperf':>11} {'vs spin':>8}")  # fmt: skip
    print(f"{'iperf3':>20} {ip_mbps:>10.1f} {ip_loss:>8.3f} {ip_sent:>10.1f}")
    print(f"{'sockperf':>20} {'':>10} {'':>8} {'':>10} {'':>9} {sp50:>10.4f}")
    print(f"{'sockperf spin':>20} {'':>10} {'':>8} {'':>10} {'':>9} {spin50:>10.4f}")
    for c in configs:
        runs = ours_runs[c.name]
        tx = [r["results"][0] for r in runs]  # type: ignore[index]
        rx = [t["peer_view"] for t in tx]
        mbps = statistics.median(float(r["mbps"]) for r in rx)
        lost = statistics.median(float(r["lost_percent"]) for r in rx)
        sent = statistics.median(float(t["mbps"]) for t in tx)
        if c.rtt_only:
            line = f"{c.name:>20} {'':>10} {'':>8} {'':>10} {'':>9}"
        elif ip_mbps:
            line = f"{c.name:>20} {mbps:>10.1f} {lost:>8.3f} {sent:>10.1f} {mbps / ip_mbps:>8.2f}x"
        else:
            line = f"{c.name:>20} {mbps:>10.1f} {lost:>8.3f} {sent:>10.1f} {'':>9}"
        if c.rtt:
            p50 = statistics.median(float(r["rtt"]["p50_ms"]) for r in runs)  # type: ignore[index]
            line += f" {p50:>10.4f} {p50 / sp50:>10.2f}x {p50 / spin50:>7.2f}x"
        extra = f" wait={runs[0]['rtt']['wait']}" if c.rtt else ""  # type: ignore[index]
        print(
            line,
            f" gso={tx[0]['gso']} gro={rx[0]['gro']} encrypted={rx[0]['encrypted']}"
            f" flow_control={tx[0]['flow_control']} mmsg={c.mmsg}{extra}",
        )
    print("per round: iperf3", [round(r["mbps"]) for r in ip_runs], "sockperf p50",
          [r.get("p50_ms") for r in sp_runs], "sockperf spin p50",
          [r.get("p50_ms") for r in spin_runs])  # fmt: skip
    for c in configs:
        print(f"per round: {c.name}", [
            (round(r["results"][0]["peer_view"]["mbps"]),  # type: ignore[index]
             round(r["results"][0]["peer_view"]["lost_percent"], 3))  # type: ignore[index]
            for r in ours_runs[c.name]
        ], [r["rtt"]["p50_ms"] for r in ours_runs[c.name] if r.get("rtt")])  # type: ignore[index]  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
