"""Kernel lab: our benchmark vs iperf3 and sockperf across two real NATs (root).

    sudo python benchmarks/lab.py [--profile-a port-restricted] [--profile-b port-restricted]
                                  [--duration 5] [--size 1200] [--rounds 2]

Builds a :class:`p2plab.lab.netns.Lab` (hosts ``a`` and ``b`` each behind its own NAT), then:

* iperf3 UDP and sockperf ping-pong from host ``a`` to host ``b``.  Neither can punch, so NAT B
  forwards their ports to ``b`` (DNAT on its public address): the traffic crosses both NATs and
  the same bridge as ours;
* iperf3 UDP again, through a WireGuard tunnel between the same two hosts over the same path
  (``wireguard-go``, the userspace implementation: this kernel advertises WireGuard but cannot
  create the device).  ``b`` listens behind the same kind of port forward on NAT B, ``a`` dials
  NAT B's public address and leaves through NAT A: the encrypted reference a user would pick;
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
import os
import re
import shutil
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
WG_PORT = 51820
WG_NET = "198.19.0"  # the tunnel's inner addresses: natlab.md's private range, no lab LAN uses it
WG_TOOLS = ("wireguard-go", "wg")
CONFIGS = (  # name, gso, encrypt, with RTT, --busy-poll-us (None: our default, ~1 ms)
    ("plain", False, True, True, None),
    ("plain/noenc", False, False, True, None),
    ("gso-gro", True, True, False, None),
    ("gso-gro/noenc", True, False, False, None),
    ("rtt/sleep", False, True, True, 0.0),  # both ends sleep between datagrams
)


FORWARDED = (("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("udp", SOCKPERF_PORT), ("udp", WG_PORT))


def forward_ports(lab: Lab) -> None:
    """NAT B forwards the iperf3 (TCP+UDP), sockperf and WireGuard (UDP) ports to host b."""
    ns = lab.namespace("nat_b")
    pub, target = lab.address("nat_b"), lab.address("b")
    rules = [
        ["-t", "nat", "-I", "PREROUTING", "-d", pub, "-p", proto, "--dport", str(port),
         "-j", "DNAT", "--to-destination", target]
        for proto, port in FORWARDED
    ]  # fmt: skip
    rules += [
        ["-I", "FORWARD", "-d", target, "-p", proto, "--dport", str(port), "-j", "ACCEPT"]
        for proto, port in FORWARDED
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


def iperf3(
    lab: Lab, duration: float, size: int, target: str | None = None, bitrate: str = "0"
) -> dict[str, float]:
    """iperf3 UDP from a to ``target`` (default: NAT B's forwarded port), received rate and loss."""
    with serving(lab, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)]):
        out = lab.run(
            "a",
            ["iperf3", "-c", target or lab.address("nat_b"), "-p", str(IPERF_PORT), "-u",
             "-b", bitrate, "-l", str(size), "-t", str(duration), "-J"],
            timeout=duration + 30,
        )  # fmt: skip
        data = json.loads(out.stdout)
        s = data["end"]["sum"]
        recv = data["end"].get("sum_received", s)
        return {
            "mbps": float(recv.get("bits_per_second", s["bits_per_second"])) / 1e6,
            "lost_percent": float(s.get("lost_percent", 0.0)),
        }


def _wg_up(lab: Lab, procs: list[subprocess.Popen[Any]], host: str, ifname: str, key: Path,
           peer_pub: str, peer_ip: str, endpoint: str | None) -> None:  # fmt: skip
    """Start wireguard-go for ``ifname`` in ``host``, then give it keys, its peer, an address."""
    env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    # -f: stay in the foreground, so we (and the lab, on close) hold it and can stop it.
    procs.append(lab.popen(host, ["wireguard-go", "-f", ifname], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    sock = Path("/var/run/wireguard") / f"{ifname}.sock"  # shared by every namespace
    deadline = time.monotonic() + 10.0
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"wireguard-go did not create {sock} within 10 s")
        time.sleep(0.05)
    peer = ["peer", peer_pub, "allowed-ips", f"{peer_ip}/32"]
    if endpoint:  # b has none: it learns a's (NATed) address from a's handshake
        peer += ["endpoint", endpoint, "persistent-keepalive", "25"]
    lab.run(host, ["wg", "set", ifname, "listen-port", str(WG_PORT), "private-key", str(key),
                   *peer], check=True)  # fmt: skip
    me = f"{WG_NET}.{1 if host == 'a' else 2}"
    lab.run(host, ["ip", "addr", "add", f"{me}/24", "dev", ifname], check=True)
    lab.run(host, ["ip", "link", "set", ifname, "up"], check=True)


@contextlib.contextmanager
def wireguard(lab: Lab) -> Iterator[str]:
    """A WireGuard tunnel between hosts a and b over the lab's path; yields b's inner address.

    a dials NAT B's public address (forwarded to b, like iperf3's port); a's packets leave
    through NAT A, so b answers the mapping NAT A gave them, as any WireGuard peer behind a NAT.
    """
    names = {h: f"{lab.prefix}wg{h}" for h in ("a", "b")}  # unique: the socket dir is shared
    procs: list[subprocess.Popen[Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            keys, pubs = {}, {}
            for h in names:
                priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                      check=True).stdout  # fmt: skip
                keys[h] = Path(tmp) / f"{h}.key"
                keys[h].write_text(priv)
                keys[h].chmod(0o600)
                pubs[h] = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True,
                                         text=True, check=True).stdout.strip()  # fmt: skip
            _wg_up(lab, procs, "b", names["b"], keys["b"], pubs["a"], f"{WG_NET}.1", None)
            _wg_up(lab, procs, "a", names["a"], keys["a"], pubs["b"], f"{WG_NET}.2",
                   f"{lab.address('nat_b')}:{WG_PORT}")  # fmt: skip
        inner_b = f"{WG_NET}.2"
        # One datagram into the tunnel makes a start the handshake; a completed handshake means
        # both directions cross the NATs (no ping on these machines).
        poke = f"import socket; socket.socket(2, 2).sendto(b'x', ('{inner_b}', 9))"
        deadline = time.monotonic() + 10.0
        while True:
            lab.run("a", [sys.executable, "-c", poke], check=True)
            shakes = lab.run("a", ["wg", "show", names["a"], "latest-handshakes"]).stdout.split()
            if len(shakes) == 2 and shakes[1] != "0":
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no WireGuard handshake between a and b within 10 s")
            time.sleep(0.5)
        yield inner_b
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for h, ifname in names.items():  # wireguard-go removes both on exit; make sure
            lab.run(h, ["ip", "link", "del", ifname])
            (Path("/var/run/wireguard") / f"{ifname}.sock").unlink(missing_ok=True)


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
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Needs root, iperf3, sockperf, coturn, and wireguard-go + wg for the encrypted "
        "reference (apt-get install wireguard-go wireguard-tools).",
    )
    ap.add_argument("--profile-a", default="port-restricted")
    ap.add_argument("--profile-b", default="port-restricted")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rtt-count", type=int, default=10000)
    ap.add_argument(
        "--wg-bitrate",
        default="0",
        help="iperf3 -b through the WireGuard tunnel (default 0: as fast as it sends, like the "
        "raw iperf3 run; e.g. 600M paces it below wireguard-go's limit, with less loss)",
    )
    a = ap.parse_args()
    missing = [t for t in WG_TOOLS if shutil.which(t) is None]
    if missing:
        print(f"lab.py: {' and '.join(missing)} not found: the WireGuard reference needs "
              "wireguard-go and wg (apt-get install wireguard-go wireguard-tools)",
              file=sys.stderr)  # fmt: skip
        return 2
    with Lab.create(a.profile_a, a.profile_b) as lab, contextlib.ExitStack() as stack:
        forward_ports(lab)
        rv = lab.rendezvous_address
        lab.python(
            "rendezvous",
            # --open: the lab network exists only between its namespaces (beyond loopback the
            # rendezvous refuses to start without a token otherwise).
            ["-m", "p2plab", "rendezvous", "--host", rv, "--port", str(RENDEZVOUS_PORT), "--open"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(2.0)
        url = f"ws://{rv}:{RENDEZVOUS_PORT}"
        wg_target = stack.enter_context(wireguard(lab))
        ip_runs: list[dict[str, float]] = []
        wg_runs: list[dict[str, float]] = []
        sp_runs: list[float] = []
        spin_runs: list[float] = []
        runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in CONFIGS}
        for rnd in range(a.rounds):
            ip_runs.append(iperf3(lab, a.duration, a.size))
            wg_runs.append(iperf3(lab, a.duration, a.size, wg_target, a.wg_bitrate))
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
    wgm = statistics.median(r["mbps"] for r in wg_runs)
    wg_loss = statistics.median(r["lost_percent"] for r in wg_runs)
    sp = statistics.median(sp_runs)
    spin = statistics.median(spin_runs)
    print(f"lab {a.profile_a} <-> {a.profile_b}, payload {a.size} B, {a.duration} s per run, "
          f"medians of {a.rounds} rounds")  # fmt: skip
    print("RTT: ours busy-polls both ends by default (rtt/sleep: both sleep in poll(2)); sockperf")
    print("sleeps by default, 'sockperf spin' is its busy-polling mode (-F r --nonblocked)")
    print(f"iperf3/wg: iperf3 -b {a.wg_bitrate} through wireguard-go between a and b, same path")
    print(f"{'':>14} {'recv Mb/s':>10} {'lost %':>8} {'vs iperf3':>9} {'vs wg':>7} "
          f"{'RTT p50 ms':>10} {'vs sockperf':>11} {'vs spin':>8}")  # fmt: skip
    print(f"{'iperf3':>14} {ip:>10.1f} {ip_loss:>8.3f}")
    print(
        f"{'iperf3/wg':>14} {wgm:>10.1f} {wg_loss:>8.3f} {wgm / ip if ip else float('nan'):>8.2f}x"
    )
    print(f"{'sockperf':>14} {'':>10} {'':>8} {'':>9} {'':>7} {sp:>10.4f}")
    print(f"{'sockperf spin':>14} {'':>10} {'':>8} {'':>9} {'':>7} {spin:>10.4f}")
    for name, _gso, _enc, rtt, _spin_us in CONFIGS:
        rx = [r["results"][0]["peer_view"] for r in runs[name]]
        mbps = statistics.median(float(r["mbps"]) for r in rx)
        lost = statistics.median(float(r["lost_percent"]) for r in rx)
        line = f"{name:>14} {mbps:>10.1f} {lost:>8.3f} {mbps / ip if ip else float('nan'):>8.2f}x"
        line += f" {mbps / wgm if wgm else float('nan'):>6.2f}x"
        if rtt:
            p50 = statistics.median(float(r["rtt"]["p50_ms"]) for r in runs[name])
            line += f" {p50:>10.4f} {p50 / sp:>10.2f}x {p50 / spin:>7.2f}x"
        print(line, f" gso={runs[name][0]['results'][0]['gso']} encrypted={rx[0]['encrypted']}")
    wg_rounds = [(round(r["mbps"]), round(r["lost_percent"], 2)) for r in wg_runs]
    print("per round: iperf3", [round(r["mbps"]) for r in ip_runs], "iperf3/wg (Mb/s, lost %)",
          wg_rounds, "sockperf p50", sp_runs, "sockperf spin p50", spin_runs)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
