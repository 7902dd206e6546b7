"""Loopback: our benchmark vs iperf3 (throughput) and sockperf (RTT), in the same run.

    python benchmarks/loopback.py [--duration 5] [--size 1200] [--rate 0]

Runs, all on 127.0.0.1 and each bounded in time:
  1. iperf3 UDP (``-b 0``: unlimited), receiver goodput and loss from its JSON;
  2. ``p2plab bench`` between two worker processes (rendezvous as a third), plain sends;
  3. the same with UDP GSO/GRO;
  4. sockperf ping-pong (64 bytes) vs our RTT ping-pong.
Prints a table with the ratios the issue targets (goodput ours/iperf3 >= 1 plain with < 1% loss,
>= 5 with GSO/GRO; RTT p50 ours/sockperf <= 2).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time

P2PLAB = [sys.executable, "-m", "p2plab"]


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


def sockperf(duration: float) -> dict[str, float]:
    port = free_port(socket.SOCK_DGRAM)
    server = subprocess.Popen(
        ["sockperf", "server", "-i", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        out = subprocess.run(
            ["sockperf", "ping-pong", "-i", "127.0.0.1", "-p", str(port), "-m", "64", "-t",
             str(int(duration)), "--full-rtt"],
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


def ours(duration: float, size: int, rate: float, gso: bool, rtt: int) -> dict[str, object]:
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
            [*P2PLAB, "bench", "--rendezvous", url, "--role", "receive"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(rx)
        args = [*P2PLAB, "bench", "--rendezvous", url, "--role", "send", "--json",
                "--duration", str(duration), "--size", str(size), "--rate", str(rate)]  # fmt: skip
        if rtt:
            args += ["--rtt", str(rtt)]
        if not gso:
            args.append("--no-gso")
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--rate", type=float, default=0.0, help="our target Mbit/s (0: unlimited)")
    ap.add_argument("--iperf-rate", default="0", help="iperf3 -b (0: unlimited)")
    ap.add_argument("--rtt-count", type=int, default=20000)
    a = ap.parse_args()
    for tool in ("iperf3", "sockperf"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2
    ip = iperf3(a.duration, a.size, a.iperf_rate)
    sp = sockperf(a.duration)
    plain = ours(a.duration, a.size, a.rate, gso=False, rtt=a.rtt_count)
    fast = ours(a.duration, a.size, a.rate, gso=True, rtt=0)
    rows = []
    for name, res in (("plain", plain), ("gso/gro", fast)):
        r = res["results"][0]  # type: ignore[index]
        rx = r["peer_view"]
        rows.append((name, rx["mbps"], rx["lost_percent"], r["mbps"], r["gso"], rx["gro"]))
    print(f"payload {a.size} B, {a.duration} s, loopback")
    print(f"{'':>10} {'recv Mb/s':>10} {'lost %':>8} {'sent Mb/s':>10} {'vs iperf3':>9}")
    print(f"{'iperf3':>10} {ip['mbps']:>10.1f} {ip['lost_percent']:>8.3f} {ip['sent_mbps']:>10.1f}")
    for name, mbps, lost, sent, gso, gro in rows:
        ratio = mbps / ip["mbps"] if ip["mbps"] else float("nan")
        print(
            f"{name:>10} {mbps:>10.1f} {lost:>8.3f} {sent:>10.1f} {ratio:>8.2f}x"
            f"  gso={gso} gro={gro}"
        )
    rtt = plain.get("rtt") or {}
    sp50 = sp.get("p50_ms")
    o50 = rtt.get("p50_ms") if isinstance(rtt, dict) else None
    print(f"RTT p50: ours {o50} ms, sockperf {sp50} ms, ratio "
          f"{(o50 / sp50) if o50 and sp50 else float('nan'):.2f}")  # fmt: skip
    if isinstance(rtt, dict):
        print(f"RTT ours p90 {rtt.get('p90_ms')} p99 {rtt.get('p99_ms')}; sockperf {sp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
