"""The punching matrix: the simulator always, the kernel lab too with --kernel (root).

    python experiments/nat_matrix.py [--seed 1] [--skew 0.1] [--kernel [--profiles open,symmetric]]

The code path of notebooks/03_nat_matrix.ipynb.  Writes sim_matrix.csv/.png, and with --kernel
kernel_matrix/matrix.csv/.png plus sim_vs_kernel.csv, into experiments/results/ (or --out).
Exits 1 when the simulator disagrees with natlab.md's table or with the kernel lab.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from pathlib import Path

from p2plab.lab.sim import PROFILES, sim_matrix
from p2plab.notebook import outcome_table, plot_matrix

log = logging.getLogger("experiments.nat_matrix")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def write_rows(rows: list[dict[str, object]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skew", type=float, default=0.1, help="B starts this much later (s)")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--kernel", action="store_true", help="also run the kernel lab (root)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    profiles = args.profiles.split(",")
    args.out.mkdir(parents=True, exist_ok=True)

    rows = sim_matrix(profiles, seed=args.seed, skew=args.skew)
    write_rows(rows, args.out / "sim_matrix.csv")
    plot_matrix(rows, title="Simulator").savefig(args.out / "sim_matrix.png", dpi=120)
    log.info("simulator:\n%s", outcome_table(rows).to_string())
    bad = [r for r in rows if r["expected"] and r["outcome"] != r["expected"]]
    for r in bad:
        log.error("simulator disagrees with natlab.md: %s", r)

    if args.kernel:
        if os.geteuid() != 0:
            log.error("--kernel needs root (network namespaces and iptables)")
            return 2
        from p2plab.lab.matrix import run_matrix

        kernel = run_matrix(profiles, same_lan=True, out_dir=args.out / "kernel_matrix")
        sim = {(r["profile_a"], r["profile_b"], r["same_lan"]): r["outcome"] for r in rows}
        compare = [
            {
                "profile_a": k.profile_a,
                "profile_b": k.profile_b,
                "same_lan": k.same_lan,
                "kernel": k.outcome,
                "simulator": sim.get((k.profile_a, k.profile_b, k.same_lan)),
                "expected": k.expected,
            }
            for k in kernel
        ]
        write_rows(compare, args.out / "sim_vs_kernel.csv")
        for c in compare:
            if c["kernel"] != c["simulator"]:
                log.error("simulator and kernel lab disagree: %s", c)
                bad.append(c)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
