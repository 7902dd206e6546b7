"""Start p2plab's services as real processes through the CLI, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import TIMEOUT_UNIT

P2PLAB = [sys.executable, "-m", "p2plab"]
LOG_DIR = Path(__file__).resolve().parent.parent / "test-artifacts" / "logs"
UI_TOKEN = "p2plab-test-ui-token-0123456789"
"""The ``--ui-token`` every worker started here serves its page behind."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A CLI process with its output in a log file (kept as a test artifact)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}-{os.getpid()}-{time.time_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            P2PLAB + args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.kill()
        self._log.close()


def wait_until(cond: Callable[[], Any], timeout: float, what: str, proc: Proc | None = None) -> Any:
    deadline = time.monotonic() + timeout * TIMEOUT_UNIT
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except Exception as exc:  # not up yet
            last = exc
        else:
            if last:
                return last
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited while waiting for {what}:\n{proc.log()}")
        time.sleep(0.05)
    extra = f"\n--- {proc.name} log ---\n{proc.log()}" if proc is not None else ""
    raise AssertionError(f"timed out waiting for {what} (last: {last!r}){extra}")


def get_json(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.load(resp)


def ui_ws_url(http_port: int, token: str = UI_TOKEN) -> str:
    """The worker's ``/ui_ws`` with its token."""
    return f"ws://127.0.0.1:{http_port}/ui_ws?token={token}"


def ui_page_url(http_port: int, token: str = UI_TOKEN) -> str:
    """The worker's page with its token, as the worker prints it."""
    return f"http://127.0.0.1:{http_port}/?token={token}"


def start_rendezvous(
    extra: list[str] | None = None, env: dict[str, str] | None = None
) -> tuple[Proc, int, int]:
    """A rendezvous with embedded STUN on loopback; returns (proc, http port, stun port)."""
    port, stun = free_port(), free_port(socket.SOCK_DGRAM)
    proc = Proc(
        "rendezvous",
        ["rendezvous", "--host", "127.0.0.1", "--port", str(port), "--stun-port", str(stun)]
        + (extra or []),
        env=env,
    )
    wait_until(
        lambda: get_json(f"http://127.0.0.1:{port}/health")["status"] == "ok",
        15,
        "rendezvous health",
        proc,
    )
    return proc, port, stun


def start_worker(
    rv_port: int, stun_port: int, name: str = "worker", extra: list[str] | None = None
) -> tuple[Proc, int]:
    """A worker process; returns (proc, http port) once its /health answers."""
    http = free_port()
    proc = Proc(
        name,
        [
            "worker",
            "--rendezvous",
            f"ws://127.0.0.1:{rv_port}",
            "--stun",
            f"127.0.0.1:{stun_port}",
            "--udp-port",
            "0",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http),
            "--ui-token",
            UI_TOKEN,
        ]
        + (extra or []),
    )
    wait_until(
        lambda: get_json(f"http://127.0.0.1:{http}/health")["status"] == "ok",
        15,
        f"{name} health",
        proc,
    )
    return proc, http


def status(http_port: int) -> dict[str, Any]:
    result: dict[str, Any] = get_json(
        f"http://127.0.0.1:{http_port}/status", headers={"Authorization": f"Bearer {UI_TOKEN}"}
    )
    return result
