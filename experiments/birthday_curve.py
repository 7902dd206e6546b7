"""Birthday punching in the simulator: the success rate against the formula (issue 16).

    python experiments/birthday_curve.py [--trials 10000] [--ks 64,256,1024]
        [--e2e-pairs 150] [--e2e-budgets 256,1024] [--prediction-pairs 20] [--seed 1]

Three parts (the code of p2plab.lab.sim.birthday_curve; notebook 03 runs a small version):

1. The curve: for each k, --trials trials; one trial opens k mappings on a simulated symmetric
   NAT with the random allocator (--random-fully) and lets the core's RandomPortProber pick probe
   ports until one lands on a mapping.  Success at n probes (first hit <= n) next to
   1 - (1 - k/P)^n, P = 64512 (ports 1024-65535); the largest deviation in percentage points.
2. End to end: --e2e-pairs seeded runs of two whole workers (real engines and sessions),
   port-restricted x symmetric, per budget in --e2e-budgets: the share that connects directly
   against the formula for k = 256 sockets and that budget.
3. Port prediction: a symmetric NAT allocating in order, in order with other traffic, or at
   random, against a port-restricted one: methods and probes used.

Writes birthday_curve.csv, birthday_curve.png, birthday_e2e.csv, birthday_e2e_summary.csv and
birthday_prediction.csv into experiments/results/ (or --out).  Exits 1 when a curve point is
more than --max-dev percentage points (default 3) off the formula.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from p2plab.config import BirthdayConfig
from p2plab.lab.sim.birthday_curve import (
    curve_rows,
    end_to_end,
    end_to_end_summary,
    max_deviation,
    prediction_rows,
    prediction_summary,
)
from p2plab.notebook import plot_birthday_curve

log = logging.getLogger("experiments.birthday_curve")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000, help="curve trials per k")
    parser.add_argument("--ks", default="64,256,1024", help="open mappings k")
    parser.add_argument("--points", type=int, default=40, help="probe counts per curve")
    parser.add_argument("--e2e-pairs", type=int, default=150, help="0 skips the end-to-end part")
    parser.add_argument("--e2e-budgets", default="256,1024", help="probe budgets of that part")
    parser.add_argument("--prediction-pairs", type=int, default=20, help="0 skips prediction")
    parser.add_argument("--max-dev", type=float, default=3.0, help="percentage points allowed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("p2plab").setLevel(logging.WARNING)  # not every engine's every step
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0

    t0 = time.monotonic()
    rows = curve_rows(_ints(args.ks), args.trials, seed=args.seed, points=args.points)
    write_rows(rows, args.out / "birthday_curve.csv")
    plot_birthday_curve(rows).savefig(args.out / "birthday_curve.png", dpi=120)
    log.info("%6s %6s %9s %9s %8s", "k", "n", "measured", "formula", "dev(pp)")
    worst = max_deviation(rows)
    for i, r in enumerate(rows):  # every 4th point, the default budget and the worst (all in CSV)
        if i % 4 and r["n"] != 1024 and r is not worst:
            continue
        log.info(
            "%6d %6d %8.2f%% %8.2f%% %+8.2f",
            r["k"],
            r["n"],
            100 * r["measured"],
            100 * r["formula"],
            r["deviation_pp"],
        )
    log.info(
        "curve: %d trials per point, %d points; largest deviation %+.2f pp (k=%d, n=%d) [%.0f s]",
        args.trials,
        len(rows),
        worst["deviation_pp"],
        worst["k"],
        worst["n"],
        time.monotonic() - t0,
    )
    if abs(worst["deviation_pp"]) > args.max_dev:
        log.error("a point is more than %.1f pp off the formula", args.max_dev)
        status = 1

    if args.e2e_pairs > 0:
        t0 = time.monotonic()
        e2e: list[dict[str, Any]] = []
        summaries = []
        for budget in _ints(args.e2e_budgets):
            bd = replace(BirthdayConfig(), probe_budget=budget)
            got = end_to_end(args.e2e_pairs, seed=args.seed, birthday=bd)
            e2e += got
            s = end_to_end_summary(got)
            s["probe_budget"] = budget
            summaries.append(s)
            log.info(
                "end to end, port-restricted x symmetric, k=256, budget %d: %d/%d direct = "
                "%.1f%% vs formula %.1f%% (%+.1f pp, standard error %.1f pp); methods %s; "
                "mean time to connect %s s",
                budget,
                s["direct"],
                s["pairs"],
                100 * s["rate"],
                100 * s["formula"],
                s["deviation_pp"],
                s["stderr_pp"],
                s["methods"],
                None if s["mean_connect_s"] is None else round(s["mean_connect_s"], 2),
            )
        write_rows(e2e, args.out / "birthday_e2e.csv")
        write_rows(summaries, args.out / "birthday_e2e_summary.csv")
        log.info("[end to end: %.0f s]", time.monotonic() - t0)

    if args.prediction_pairs > 0:
        t0 = time.monotonic()
        pred = prediction_rows(args.prediction_pairs, seed=args.seed)
        write_rows(pred, args.out / "birthday_prediction.csv")
        for s in prediction_summary(pred):
            log.info(
                "prediction, symmetric (%s) x port-restricted: %d/%d direct, sequential seen %d, "
                "methods %s, probes used median %s max %s",
                s["allocation"],
                s["direct"],
                s["pairs"],
                s["sequential_seen"],
                s["methods"],
                s["median_probes"],
                s["max_probes"],
            )
        log.info("[prediction: %.0f s]", time.monotonic() - t0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
