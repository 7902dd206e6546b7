"""``p2plab bench`` between two real processes: both sides report, and neither waits for a peer
that went away (issue 15, item 4)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import start_rendezvous, wait_until


def bench(url: str, role: str, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    """A ``p2plab bench`` process: stdout to ``log.out``, stderr to ``log``."""
    with open(log.with_suffix(".out"), "wb") as out, open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "p2plab", "bench", "--rendezvous", url, "--role", role, *extra],
            stdout=out,
            stderr=err,
            start_new_session=True,
        )


def logs(tmp: Path, name: str) -> Path:
    return tmp / f"{name}.log"


def test_both_sides_print_results_and_the_receiver_honours_csv_and_json(tmp_path: Path) -> None:
    rv, port, stun = start_rendezvous()
    url = f"ws://127.0.0.1:{port}"
    stun_arg = ["--stun", f"127.0.0.1:{stun}"]
    rx_log, tx_log = logs(tmp_path, "rx"), logs(tmp_path, "tx")
    rx_csv = tmp_path / "rx.csv"
    rx = bench(url, "receive", *stun_arg, "--json", "--csv", str(rx_csv), log=rx_log)
    try:
        tx = bench(url, "send", *stun_arg, "--duration", "1", "--rate", "20", log=tx_log)
        assert tx.wait(60) == 0, tx_log.read_text()
        assert rx.wait(30) == 0, rx_log.read_text()
    finally:
        for p in (rx,):
            if p.poll() is None:
                p.kill()
        rv.stop()
    table = tx_log.with_suffix(".out").read_text().splitlines()
    assert table[0].split()[6:8] == ["jit", "us"], table  # jitter in microseconds
    jitter = table[1].split()[6]
    assert "e" not in jitter and re.fullmatch(r"\d+\.\d", jitter), table
    # The last column says whether the run fell short of --rate; a short run adds a line why.
    assert table[0].split()[-1] == "short" and table[1].split()[-1] in ("True", "False"), table
    assert (table[1].split()[-1] == "True") is any("short of target" in t for t in table[2:])
    assert "run " in tx_log.read_text()  # the progress bar ran on stderr
    (row,) = json.loads(rx_log.with_suffix(".out").read_text())["results"]
    assert row["role"] == "receiver" and row["packets_received"] > 0
    assert row["received_mbps"] <= row["sent_mbps"]  # the same window (core.bench.rates)
    assert isinstance(row["short_of_target"], bool)
    with rx_csv.open() as fh:
        (csv_row,) = list(csv.DictReader(fh))
    assert csv_row["role"] == "receiver" and csv_row["run_id"] == row["run_id"]


@pytest.mark.parametrize("victim", ["receive", "send"])
def test_when_one_side_dies_mid_run_the_other_ends_with_an_error(
    tmp_path: Path, victim: str
) -> None:
    rv, port, stun = start_rendezvous()
    url = f"ws://127.0.0.1:{port}"
    stun_arg = ["--stun", f"127.0.0.1:{stun}"]
    rx_log, tx_log = logs(tmp_path, "rx"), logs(tmp_path, "tx")
    rx = bench(url, "receive", *stun_arg, log=rx_log)
    tx = bench(url, "send", *stun_arg, "--duration", "120", "--rate", "20", log=tx_log)
    procs = {"receive": rx, "send": tx}
    survivor_log = tx_log if victim == "receive" else rx_log
    try:
        # the run is under way once both progress bars show a first interval (the receiver's
        # intervals are published as they close, not only at the end of the run)
        wait_until(lambda: "Mbit/s" in tx_log.read_text(errors="replace"), 30, "sender progress")
        wait_until(lambda: "Mbit/s" in rx_log.read_text(errors="replace"), 30, "receiver progress")
        os.killpg(procs[victim].pid, signal.SIGKILL)
        survivor = procs["send" if victim == "receive" else "receive"]
        # far less than the 120 s run: it did not wait for the run (or a peer) to end
        status = survivor.wait(30)
        text = survivor_log.read_text(errors="replace")
        assert status == 1, text
        assert (
            text.strip()
            .splitlines()[-1]
            .startswith("p2plab bench: error: the peer went away during the benchmark")
        ), text
        assert "Traceback" not in text
    finally:
        for p in (rx, tx):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        rv.stop()
