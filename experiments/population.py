"""What would it connect out there? The population study (issue 20).

    python experiments/population.py [--preset natcracker,ford-2005,libp2p-2025]
        [--pairs 10000] [--seeds 8] [--seed 1] [--processes 2] [--out DIR]

For each preset (p2plab.lab.sim.presets: the numbers, their sources and which are assumptions)
it samples --pairs pairs of sites and runs the real link engine in the simulator for each, once
with plain punching only (what DCUtR and ICE do), then adding port mapping, birthday punching,
IPv6 and TURN in turn (p2plab.lab.sim.population.predict).  Prints the success rate with a 95%
Wilson interval, the time to connect (median, p90; virtual seconds) and the probes per stage,
and the plain-punching rate next to the published figures (libp2p's campaign 70% +- 7.1%, Ford
et al.'s 82%, Tailscale's > 90% direct).

Writes population_<preset>.csv (one row per pair and stage), population_<preset>_summary.csv,
population_<preset>.png and population_field.csv (every preset's rates next to the field's)
into experiments/results/ (or --out).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd

from p2plab.lab.sim.population import predict, summarize
from p2plab.lab.sim.presets import FIELD, PRESETS, preset
from p2plab.notebook import plot_population

log = logging.getLogger("experiments.population")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def field_rows(name: str, summary: pd.DataFrame) -> list[dict[str, object]]:
    """The preset's rate per stage next to each published figure (difference in points)."""
    rows: list[dict[str, object]] = []
    for _, s in summary.iterrows():
        for ref, (rate, half) in FIELD.items():
            rows.append(
                {
                    "preset": name,
                    "stage": s["stage"],
                    "rate": s["rate"],
                    "low": s["low"],
                    "high": s["high"],
                    "reference": ref,
                    "reference_rate": rate,
                    "reference_half_width": half,
                    "difference_pp": round(100 * (s["rate"] - rate), 2),
                    "agrees": bool(
                        s["high"] >= rate - (half or 0) and s["low"] <= rate + (half or 0)
                    ),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=8, help="seed slots per class pair")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--processes", type=int, default=None, help="default: up to 2")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("p2plab").setLevel(logging.WARNING)
    try:
        presets = [preset(name) for name in args.preset.split(",") if name]
    except Exception as exc:  # a user's typo: one line, not a traceback
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    field: list[dict[str, object]] = []
    for p in presets:
        t0 = time.monotonic()

        def progress(stage: str, runs: int, _total: int, t0: float = t0) -> None:
            log.info("  %-13s %5d engine runs  [%.0f s]", stage, runs, time.monotonic() - t0)

        log.info("%s: %s; %d pairs", p.name, p.summary, args.pairs)
        rows = predict(
            p,
            args.pairs,
            seed=args.seed,
            seeds=args.seeds,
            processes=args.processes,
            progress=progress,
        )
        summary = summarize(rows)
        rows.to_csv(args.out / f"population_{p.name}.csv", index=False)
        summary.to_csv(args.out / f"population_{p.name}_summary.csv", index=False)
        fig = plot_population(summary, FIELD, title=f"{p.name}: {args.pairs} pairs")
        fig.savefig(args.out / f"population_{p.name}.png", dpi=120)
        log.info(
            "  %-13s %7s %17s %9s %7s %7s", "stage", "rate", "95% CI", "median", "p90", "probes"
        )
        for _, s in summary.iterrows():
            med = "-" if s["median_s"] is None or s["median_s"] != s["median_s"] else s["median_s"]
            p90 = "-" if s["p90_s"] is None or s["p90_s"] != s["p90_s"] else s["p90_s"]
            log.info(
                "  %-13s %6.1f%% [%5.1f%%, %5.1f%%] %8s s %6s s %7.1f",
                s["stage"],
                100 * s["rate"],
                100 * s["low"],
                100 * s["high"],
                med if isinstance(med, str) else f"{med:.2f}",
                p90 if isinstance(p90, str) else f"{p90:.2f}",
                s["probes_mean"],
            )
        field += field_rows(p.name, summary)
        log.info("  [%s: %.0f s]", p.name, time.monotonic() - t0)
    table = pd.DataFrame(field)
    table.to_csv(args.out / "population_field.csv", index=False)
    plain = table[table["stage"] == "plain"]
    for _, r in plain.iterrows():
        log.info(
            "%-12s plain %5.1f%% vs %-50s %5.1f%%: %+6.1f pp %s",
            r["preset"],
            100 * r["rate"],
            r["reference"],
            100 * r["reference_rate"],
            r["difference_pp"],
            "(agrees)" if r["agrees"] else "",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
