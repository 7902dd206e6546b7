"""A benchmark between two processes, one of them a plain script that imports only ``Worker``.

The bug this guards against: the benchmark's control handlers were put on the ``Worker`` class
when a benchmark module was imported, so a process that only did ``from p2plab import Worker``
never answered ``bench_start`` (``controls_unknown=1``).  Tests in one process cannot see it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.procs import LOG_DIR, start_rendezvous, wait_until

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    from p2plab import Worker, WorkerConfig


    async def main() -> None:
        config = WorkerConfig(
            rendezvous_url=sys.argv[1],
            stun_servers=(sys.argv[2],),
            udp_host="127.0.0.1",
            http_port=None,
            nat_report=False,
        )
        async with Worker(config) as worker:
            await worker.wait_connected(timeout=60)
            print("CONNECTED", flush=True)
            while True:  # until the test ends this process
                print("STATS " + json.dumps(worker.stats), flush=True)
                await asyncio.sleep(0.2)


    asyncio.run(main())
    """
)


def _stats_lines(log: Path) -> list[dict[str, int]]:
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(ln[6:]) for ln in lines if ln.startswith("STATS ")]


def test_plain_worker_script_answers_a_benchmark_from_another_process(tmp_path: Path) -> None:
    script = tmp_path / "plain_worker.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rv, rv_port, stun_port = start_rendezvous()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"plain-worker-{os.getpid()}.log"
    answering = None
    try:
        with open(log, "wb") as out:
            answering = subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    f"ws://127.0.0.1:{rv_port}",
                    f"127.0.0.1:{stun_port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,  # nothing of the repository on the path but through PYTHONPATH
            )
        sender = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2plab",
                "bench",
                "--role",
                "send",
                "--rendezvous",
                f"ws://127.0.0.1:{rv_port}",
                "--stun",
                f"127.0.0.1:{stun_port}",
                "--duration",
                "1",
                "--size",
                "1200",
                "--rate",
                "20",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
        )
        assert sender.returncode == 0, (
            f"{sender.stderr}\n--- answering worker ---\n{log.read_text()}"
        )
        (row,) = json.loads(sender.stdout)["results"]
        assert row["role"] == "sender"
        assert row["packets_sent"] > 0
        assert row["packets_received"] > 0  # the peer's report came back: it answered
        # The answering worker claimed every control message it got.
        # (two lines printed after the sender ended: every message it sent has arrived)
        seen = len(_stats_lines(log))
        wait_until(lambda: len(_stats_lines(log)) >= seen + 2, 10, "the answering worker's stats")
        stats = _stats_lines(log)[-1]
        assert stats["controls_unknown"] == 0
        assert answering.poll() is None, log.read_text()
    finally:
        if answering is not None and answering.poll() is None:
            answering.kill()
            answering.wait(10)
        rv.stop()
