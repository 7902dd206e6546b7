"""``p2plab bench`` between hosts a and b of a kernel lab (issue 17): the rendezvous, with or
without the lab's coturn, and one benchmark run from a to b, as real processes.

benchmarks/lab_turn.py measures every path with these; tests/lab/test_lab_turn_bench.py checks one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from p2plab.errors import LabError
from p2plab.lab.matrix import RENDEZVOUS_PORT, wait_listening
from p2plab.lab.netns import Lab

__all__ = ["bench", "start_rendezvous"]


def start_rendezvous(lab: Lab, port: int = RENDEZVOUS_PORT, *, turn: bool) -> None:
    """``p2plab rendezvous`` on the rendezvous host, handing out the lab's coturn with ``turn``
    (the lab stops it on close); returns once it listens."""
    argv = ["-m", "p2plab", "rendezvous", "--host", lab.rendezvous_address, "--port", str(port)]
    argv.append("--open")  # the lab network exists only between its namespaces
    if turn:
        argv += ["--turn", ",".join(lab.turn_urls), "--turn-secret", lab.turn_secret]
    lab.python("rendezvous", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_listening(lab, "rendezvous", f"{lab.rendezvous_address}:{port}", 30.0):
        raise LabError(f"the rendezvous on port {port} did not start listening within 30 s")


def bench(
    lab: Lab,
    port: int,
    room: str,
    duration: float,
    size: int,
    rate: float = 0.0,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """``p2plab bench`` from a to b through the rendezvous on ``port`` (``rate`` Mbit/s, 0: as
    fast as the receiver's credit allows); the sender's JSON output (``results[0]`` holds the
    run's ``path`` and the receiver's ``peer_view``).  ``timeout`` bounds finding the peer."""
    common = ["-m", "p2plab", "bench", "--rendezvous", f"ws://{lab.rendezvous_address}:{port}",
              "--stun", lab.stun_server, "--room", room]  # fmt: skip
    rx = lab.python(
        "b", [*common, "--role", "receive"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        args = [*common, "--role", "send", "--json", "--duration", str(duration), "--size",
                str(size), "--rate", str(rate), "--connect-timeout", str(timeout)]  # fmt: skip
        out = lab.run("a", [sys.executable, *args], timeout=duration + timeout + 30)
        if out.returncode != 0:
            raise RuntimeError(f"p2plab bench failed: {out.stderr[-2000:]}")
        return dict(json.loads(out.stdout))
    finally:
        rx.terminate()
        try:
            rx.wait(10)
        except subprocess.TimeoutExpired:
            rx.kill()
            rx.wait(10)
