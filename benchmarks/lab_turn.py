"""Every path through the kernel lab's NATs in one run (issue 17), root:

    sudo python benchmarks/lab_turn.py [--profile-a port-restricted] [--profile-b port-restricted]
                                       [--duration 3] [--size 1000] [--rounds 2] [--messages 20000]

One :class:`p2plab.lab.netns.Lab` (hosts ``a`` and ``b`` each behind its own iptables NAT, coturn
on the STUN host).  ``p2plab bench`` runs from a to b between two real worker processes, once per
path, the network shaped so that this path is the one the pair ends on:

* ``direct``: nothing blocked, a rendezvous that hands out the lab's coturn (the pair punches);
* ``turn-udp``: UDP between the two sites dropped (:meth:`Lab.block_udp_between_sites`);
* ``turn-tcp``: UDP to and from coturn dropped too (``stun_host=True``);
* ``relay``: UDP between the sites dropped and a second rendezvous that hands out no TURN: the
  pair falls back to the rendezvous's WebSocket relay after the punch timeout (its budgets hold:
  the run is paced under 32 KiB/s by the relay's credit, hence a low figure by design).

The path each run reports is checked against the one asked for (a mismatch fails the script).

coturn's reference: ``turnutils_uclient`` through the lab's coturn, one client (``-m 1``), ``-n``
messages of ``-l`` bytes as fast as it sends (``-z 0``), over UDP and with ``-t`` over TCP, two
ways:

* ``echo``: from a to ``turnutils_peer`` in b (``-e`` NAT B, which forwards the peer's port to b,
  as benchmarks/lab.py does for iperf3): between the two sites, but the peer echoes, so every
  byte crosses the relay twice (a -> coturn -> b -> coturn -> a); goodput = echoed bytes a got;
* ``c2c``: ``-y -c``, two of its clients in a relaying to each other through their allocations
  (as benchmarks/turn.py does on loopback): its usual throughput test, per flow.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.turn import parse_uclient  # noqa: E402
from p2plab.lab.bench_run import bench, start_rendezvous  # noqa: E402
from p2plab.lab.matrix import RENDEZVOUS_PORT  # noqa: E402
from p2plab.lab.netns import STUN_PORT, Lab  # noqa: E402

PEER_PORT = 3480  # turnutils_peer's default (-r of the client)
PLAIN_PORT = RENDEZVOUS_PORT + 1  # the second rendezvous, without TURN
PATHS = ("direct", "turn-udp", "turn-tcp", "relay")


def forward_peer_port(lab: Lab) -> None:
    """NAT B forwards UDP and TCP ``PEER_PORT`` to host b, where turnutils_peer listens."""
    ns, pub, target = lab.namespace("nat_b"), lab.address("nat_b"), lab.address("b")
    for proto in ("udp", "tcp"):
        for rule in (
            ["-t", "nat", "-I", "PREROUTING", "-d", pub, "-p", proto, "--dport", str(PEER_PORT),
             "-j", "DNAT", "--to-destination", target],
            ["-I", "FORWARD", "-d", target, "-p", proto, "--dport", str(PEER_PORT), "-j",
             "ACCEPT"],
        ):  # fmt: skip
            subprocess.run(["ip", "netns", "exec", ns, "iptables", *rule], check=True)


def uclient(lab: Lab, messages: int, size: int, tcp: bool, c2c: bool) -> dict[str, float]:
    """turnutils_uclient from a through coturn: to turnutils_peer in b (echoed), or with ``c2c``
    between two of its own clients in a (``-y -c``, as benchmarks/turn.py); Mbit/s per flow."""
    cmd = ["turnutils_uclient", "-W", lab.turn_secret, "-u", "bench", "-n", str(messages),
           "-l", str(size), "-m", "1", "-z", "0", "-p", str(STUN_PORT)]  # fmt: skip
    cmd += ["-y", "-c"] if c2c else ["-e", lab.address("nat_b"), "-r", str(PEER_PORT)]
    if tcp:
        cmd.append("-t")
    try:
        out = lab.run("a", [*cmd, lab.stun_addresses[0]], timeout=120).stdout
    except subprocess.TimeoutExpired:
        return {"mbps": 0.0, "total_mbps": 0.0, "lost_percent": 100.0, "rtt_ms": 0.0}
    return parse_uclient(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile-a", default="port-restricted")
    ap.add_argument("--profile-b", default="port-restricted")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2, help="runs per path (medians)")
    ap.add_argument("--messages", type=int, default=20000, help="turnutils_uclient -n")
    a = ap.parse_args()
    rows: dict[str, dict[str, Any]] = {}
    med: dict[str, float] = {}
    t0 = time.monotonic()
    with Lab.create(a.profile_a, a.profile_b) as lab:
        start_rendezvous(lab, RENDEZVOUS_PORT, turn=True)
        start_rendezvous(lab, PLAIN_PORT, turn=False)
        forward_peer_port(lab)
        lab.popen("b", ["turnutils_peer", "-p", str(PEER_PORT)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(2.0)
        for rnd in range(a.rounds):
            for i, path in enumerate(PATHS):
                if path == "direct":
                    lab.unblock_udp_between_sites()
                else:
                    lab.block_udp_between_sites(stun_host=path == "turn-tcp")
                port = PLAIN_PORT if path == "relay" else RENDEZVOUS_PORT
                out = bench(lab, port, f"lab-{rnd}-{i}-{path}", a.duration, a.size)
                r = out["results"][0]
                row = rows.setdefault(
                    path, {"paths": set(), "mbps": [], "lost": [], "no_report": 0}
                )
                row["paths"].add(r["path"])
                if r["peer_view"] is None:  # the row says so ("no report from the receiver")
                    row["no_report"] += 1
                else:
                    row["mbps"].append(float(r["peer_view"]["mbps"]))
                    row["lost"].append(float(r["peer_view"]["lost_percent"]))
                print(f"round {rnd + 1} {path}: {r['path']} {row['mbps'][-1:]} Mb/s, "
                      f"note {r['note']!r}", file=sys.stderr, flush=True)  # fmt: skip
        lab.unblock_udp_between_sites()
        ref = {
            f"{how}-{t}": uclient(lab, a.messages, a.size, t == "tcp", how == "c2c")
            for how in ("echo", "c2c")
            for t in ("udp", "tcp")
        }
    took = time.monotonic() - t0
    print(f"lab {a.profile_a} <-> {a.profile_b}, payload {a.size} B, {a.duration:g} s per run, "
          f"sealed, credit window, a -> b; {took:.0f} s in all")  # fmt: skip
    print(f"{'asked':10} {'got':10} {'Mbit/s':>9} {'loss %':>7}  (medians of {a.rounds} rounds)")
    for path, r in rows.items():
        med[path] = statistics.median(r["mbps"]) if r["mbps"] else 0.0
        lost = statistics.median(r["lost"]) if r["lost"] else 100.0
        got = ",".join(sorted(str(p) for p in r["paths"]))
        extra = f"  {r['no_report']} run(s) without a receiver report" if r["no_report"] else ""
        print(f"{path:10} {got:10} {med[path]:9.2f} {lost:7.2f}{extra}")
    for k, v in ref.items():
        how, t = k.split("-")
        what = "-y -c: two clients in a, per flow" if how == "c2c" else "-e NAT_B: echoed by b"
        flags = "-m 1 -z 0" + (" -t" if t == "tcp" else "")
        print(f"{'uclient-' + k:16} {v['mbps']:9.2f} {v['lost_percent']:7.2f}  turnutils_uclient "
              f"{flags} {what}, rtt {v['rtt_ms']:.2f} ms")  # fmt: skip
    print("ratios:")
    pairs = [("turn-udp", "uclient-c2c-udp"), ("turn-tcp", "uclient-c2c-tcp"),
             ("turn-udp", "uclient-echo-udp"), ("turn-tcp", "uclient-echo-tcp"),
             ("turn-udp", "direct"), ("turn-tcp", "direct"), ("relay", "direct")]  # fmt: skip
    for num, den in pairs:
        d = ref[den[8:]]["mbps"] if den.startswith("uclient-") else med[den]
        print(f"  {num}/{den}: {med[num] / d if d else 0.0:.3g}")
    wrong = [p for p, r in rows.items() if r["paths"] != {p}]
    if wrong:
        print(f"runs not on the path asked for: {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
