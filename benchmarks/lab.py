"""Kernel lab: our benchmark vs iperf3 and sockperf across two real NATs (root).

    sudo python benchmarks/lab.py [--profile-a port-restricted] [--profile-b port-restricted]
                                  [--duration 5] [--size 1200] [--rounds 2]

Builds a :class:`p2plab.lab.netns.Lab` (hosts ``a`` and ``b`` each behind its own NAT), then:

* iperf3 UDP and sockperf ping-pong from host ``a`` to host ``b``.  Neither can punch, so NAT B
  forwards their ports to ``b`` (DNAT on its public address): the traffic crosses both NATs and
  the same bridge as ours;
* ``p2plab bench`` between two workers in ``a`` and ``b`` over the punched path (rendezvous and
  STUN on the public segment), with GSO/GRO and without, sealed (the default) and in the explicit
  unencrypted mode, plus our RTT ping-pong.

Every tool runs ``--rounds`` times, interleaved; the table shows medians and the ratios the
issue asks for (ours/iperf3 goodput, ours/sockperf RTT p50).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from p2plab.lab.matrix import RENDEZVOUS_PORT
from p2plab.lab.netns import Lab

IPERF_PORT = 5201
SOCKPERF_PORT = 11111
CONFIGS = (  # name, gso, encrypt, with RTT, --busy-poll-us (None: our default, ~1 ms)
    ("plain", False, True, True, None),
    ("plain/noenc", False, False, True, None),
    ("gso-gro", True, True, False, None),
    ("gso-gro/noenc", True, False, False, None),
    ("rtt/sleep", False, True, True, 0.0),  # both ends sleep between datagrams
)


def forward_ports(lab: Lab) -> None:
    """NAT B forwards the iperf3 (TCP+UDP) and sockperf (UDP) ports to host b."""
    ns = lab.namespace("nat_b")
    pub, target = lab.address("nat_b"), lab.address("b")
    rules = [
        ["-t", "nat", "-I", "PREROUTING", "-d", pub, "-p", proto, "--dport", str(port),
         "-j", "DNAT", "--to-destination", target]
        for proto, port in (("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("udp", SOCKPERF_PORT))
    ]  # fmt: skip
    rules += [
        ["-I", "FORWARD", "-d", target, "-p", proto, "--dport", str(port), "-j", "ACCEPT"]
        for proto, port in (("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("udp", SOCKPERF_PORT))
    ]
    for r in rules:
        subprocess.run(["ip", "netns", "exec", ns, "iptables", *r], check=True)


@contextlib.contextmanager
def serving(lab: Lab, argv: list[str]) -> Iterator[None]:
    """A server on host b for the length of the block (given half a second to start)."""
    server = lab.popen("b", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield
    finally:
        server.kill()
        server.wait(5)


def iperf3(lab: Lab, duration: float, size: int) -> dict[str, float]:
    with serving(lab, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)]):
        out = lab.run(
            "a",
            ["iperf3", "-c", lab.address("nat_b"), "-p", str(IPERF_PORT), "-u", "-b", "0",
             "-l", str(size), "-t", str(duration), "-J"],
            timeout=duration + 30,
        )  # fmt: skip
        data = json.loads(out.stdout)
        s = data["end"]["sum"]
        recv = data["end"].get("sum_received", s)
        return {
            "mbps": float(recv.get("bits_per_second", s["bits_per_second"])) / 1e6,
            "lost_percent": float(s.get("lost_percent", 0.0)),
        }


def sockperf(lab: Lab, duration: float, spin: bool = False) -> float:
    """sockperf ping-pong p50 from a to b (``spin``: its busy-polling mode on both ends)."""

    def target(host: str, tmp: str) -> list[str]:
        if not spin:
            return ["-i", host, "-p", str(SOCKPERF_PORT)]
        feed = Path(tmp) / f"{host}.feed"  # sockperf takes -F only with a feed file
        feed.write_text(f"U:{host}:{SOCKPERF_PORT}\n")
        return ["-f", str(feed), "-F", "r", "--nonblocked"]

    with (
        tempfile.TemporaryDirectory() as tmp,
        serving(lab, ["sockperf", "server", *target(lab.address("b"), tmp)]),
    ):
        out = lab.run(
            "a",
            ["sockperf", "ping-pong", *target(lab.address("nat_b"), tmp), "-m", "64", "-t",
             str(int(duration)), "--full-rtt"],
            timeout=duration + 30,
        )  # fmt: skip
        m = re.search(r"percentile 50.000 =\s+([\d.]+)", out.stdout + out.stderr)
        return float(m.group(1)) / 1000.0 if m else float("nan")


def ours(
    lab: Lab,
    url: str,
    duration: float,
    size: int,
    gso: bool,
    encrypt: bool,
    rtt: int,
    busy_poll_us: float | None = None,
) -> dict[str, Any]:
    common = ["-m", "p2plab", "bench", "--rendezvous", url, "--stun", lab.stun_server]
    rx = lab.python(
        "b", [*common, "--role", "receive"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        args = [*common, "--role", "send", "--json", "--duration", str(duration),
                "--size", str(size)]  # fmt: skip
        if rtt:
            args += ["--rtt", str(rtt)]
        if busy_poll_us is not None:
            args += ["--busy-poll-us", str(busy_poll_us)]
        if not gso:
            args.append("--no-gso")
        if not encrypt:
            args.append("--no-encrypt")
        out = lab.run("a", [sys.executable, *args], timeout=duration + 90)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return dict(json.loads(out.stdout))
    finally:
        rx.terminate()
        try:
            rx.wait(10)
        except subprocess.TimeoutExpired:
            rx.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile-a", default="port-restricted")
    ap.add_argument("--profile-b", default="port-restricted")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rtt-count", type=int, default=10000)
    a = ap.parse_args()
    with Lab.create(a.profile_a, a.profile_b) as lab:
        forward_ports(lab)
        rv = lab.rendezvous_address
        lab.python(
            "rendezvous",
            ["-m", "p2plab", "rendezvous", "--host", rv, "--port", str(RENDEZVOUS_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(2.0)
        url = f"ws://{rv}:{RENDEZVOUS_PORT}"
        ip_runs: list[dict[str, float]] = []
        sp_runs: list[float] = []
        spin_runs: list[float] = []
        runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in CONFIGS}
        for rnd in range(a.rounds):
            ip_runs.append(iperf3(lab, a.duration, a.size))
            sp_runs.append(sockperf(lab, a.duration))
            spin_runs.append(sockperf(lab, a.duration, spin=True))
            for name, gso, enc, rtt, spin_us in CONFIGS:
                runs[name].append(
                    ours(lab, url, a.duration, a.size, gso, enc, a.rtt_count if rtt else 0,
                         spin_us)
                )  # fmt: skip
            print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    ip = statistics.median(r["mbps"] for r in ip_runs)
    ip_loss = statistics.median(r["lost_percent"] for r in ip_runs)
    sp = statistics.median(sp_runs)
    spin = statistics.median(spin_runs)
    print(f"lab {a.profile_a} <-> {a.profile_b}, payload {a.size} B, {a.duration} s per run, "
          f"medians of {a.rounds} rounds")  # fmt: skip
    print("RTT: ours busy-polls both ends by default (rtt/sleep: both sleep in poll(2)); sockperf")
    print("sleeps by default, 'sockperf spin' is its busy-polling mode (-F r --nonblocked)")
    print(f"{'':>14} {'recv Mb/s':>10} {'lost %':>8} {'vs iperf3':>9} {'RTT p50 ms':>10} "
          f"{'vs sockperf':>11} {'vs spin':>8}")  # fmt: skip
    print(f"{'iperf3':>14} {ip:>10.1f} {ip_loss:>8.3f}")
    print(f"{'sockperf':>14} {'':>10} {'':>8} {'':>9} {sp:>10.4f}")
    print(f"{'sockperf spin':>14} {'':>10} {'':>8} {'':>9} {spin:>10.4f}")
    for name, _gso, _enc, rtt, _spin_us in CONFIGS:
        rx = [r["results"][0]["peer_view"] for r in runs[name]]
        mbps = statistics.median(float(r["mbps"]) for r in rx)
        lost = statistics.median(float(r["lost_percent"]) for r in rx)
        line = f"{name:>14} {mbps:>10.1f} {lost:>8.3f} {mbps / ip if ip else float('nan'):>8.2f}x"
        if rtt:
            p50 = statistics.median(float(r["rtt"]["p50_ms"]) for r in runs[name])
            line += f" {p50:>10.4f} {p50 / sp:>10.2f}x {p50 / spin:>7.2f}x"
        print(line, f" gso={runs[name][0]['results'][0]['gso']} encrypted={rx[0]['encrypted']}")
    print("per round: iperf3", [round(r["mbps"]) for r in ip_runs], "sockperf p50", sp_runs,
          "sockperf spin p50", spin_runs)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
