"""Keep-alives against NAT mapping timeouts, in the simulator (virtual time, no root).

    python experiments/mapping_timeout.py [--timeouts 30,60,120,300] [--idle 600]

For each NAT mapping timeout and each keep-alive interval, punch through two port-restricted NATs
(random port allocation), stay idle for --idle virtual seconds, then send one chat message: was it
delivered?  Writes mapping_timeout.csv and mapping_timeout.png into experiments/results/.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from p2plab.config import SessionConfig
from p2plab.lab.sim import Simulation

log = logging.getLogger("experiments.mapping_timeout")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def one(mapping_timeout: float, keepalive: float, idle: float, seed: int) -> dict[str, object]:
    sim = Simulation(seed=seed)
    nats = [
        sim.add_nat("port-restricted", port_allocation="random", mapping_timeout=mapping_timeout)
        for _ in range(2)
    ]
    a, b = (sim.add_host(behind=n) for n in nats)
    config = SessionConfig(keepalive_interval=keepalive, peer_timeout=max(15.0, 3 * keepalive))
    result = sim.punch(a, b, config=config)
    sim.run_for(idle)
    delivered = False
    if result.a.state == "connected":
        result.a.send_chat("still there?")
        sim.run_for(30.0)
        delivered = result.b.chats_received == ["still there?"]
    return {
        "mapping_timeout_s": mapping_timeout,
        "keepalive_interval_s": keepalive,
        "idle_s": idle,
        "punched": result.outcome,
        "state_after_idle": result.a.state,
        "chat_delivered": delivered,
        "virtual_s": round(sim.now, 3),
        "events_run": sim.clock.steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeouts", default="30,60,120,300")
    parser.add_argument("--keepalives", default="5,25,50,100,200")
    parser.add_argument("--idle", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    timeouts = [float(t) for t in args.timeouts.split(",")]
    keepalives = [float(k) for k in args.keepalives.split(",")]
    rows = [one(t, k, args.idle, args.seed) for t in timeouts for k in keepalives]
    with (args.out / "mapping_timeout.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    grid = [[1.0 if r["chat_delivered"] else 0.0 for r in rows if r["mapping_timeout_s"] == t]
            for t in timeouts]  # fmt: skip
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.imshow(grid, cmap=ListedColormap(["#d9534f", "#5cb85c"]), vmin=0, vmax=1)
    ax.set_xticks(range(len(keepalives)), [f"{k:g}" for k in keepalives])
    ax.set_yticks(range(len(timeouts)), [f"{t:g}" for t in timeouts])
    ax.set_xlabel("keep-alive interval (s)")
    ax.set_ylabel("NAT mapping timeout (s)")
    ax.set_title(f"Link alive after {args.idle:g} s idle (green) or lost (red)")
    fig.tight_layout()
    fig.savefig(args.out / "mapping_timeout.png", dpi=120)
    for r in rows:
        log.info("%s", r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
