"""Packet-size sweep on loopback: the code path of notebooks/02_packet_size_sweep.ipynb as a script.

    python experiments/packet_size_sweep.py [--sizes 64,512,1200,8000] [--duration 2] [--rate 200]

Writes packet_size_sweep.csv (one row per run, both views), packet_size_sweep_intervals.csv and
two PNG plots into experiments/results/ (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from p2plab import Benchmark
from p2plab.notebook import plot_loss, plot_throughput, start_local_lab
from p2plab.results import results_to_dataframe, write_csv, write_intervals_csv

log = logging.getLogger("experiments.packet_size_sweep")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


async def sweep(sizes: list[int], duration_s: float, rate_mbps: float, out: Path) -> Path:
    lab = await start_local_lab()
    try:
        results = await Benchmark(lab.a).sweep(
            sizes, duration_s=duration_s, rate_mbps=rate_mbps, progress=False
        )
    finally:
        await lab.stop()
    df = results_to_dataframe(results)
    csv_path = write_csv(results, out / "packet_size_sweep.csv", both_views=True)
    write_intervals_csv(results, out / "packet_size_sweep_intervals.csv")
    plot_throughput(df).savefig(out / "packet_size_sweep_throughput.png", dpi=120)
    plot_loss(df).savefig(out / "packet_size_sweep_loss.png", dpi=120)
    cols = ["payload_size", "sent_mbps", "received_mbps", "lost_percent", "jitter_ms"]
    log.info("results:\n%s", df[cols].to_string(index=False))
    return csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,512,1200,1472,4000,8000")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per size")
    parser.add_argument("--rate", type=float, default=200.0, help="Mbit/s target, 0 = max")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    path = asyncio.run(sweep(sizes, args.duration, args.rate, args.out))
    log.info("wrote %s and the plots next to it", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
