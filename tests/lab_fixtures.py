"""Helpers for the kernel NAT lab tests: the root requirement, small programs run in namespaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

from p2plab.lab.netns import Lab

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.conftest import TIMEOUT_UNIT, require
except ImportError:  # pragma: no cover - depends on how pytest put tests/ on sys.path
    from conftest import TIMEOUT_UNIT, require  # type: ignore[no-redef]

__all__ = ["TIMEOUT_UNIT", "lab_python", "live_namespaces", "require_lab", "udp_count"]


def require_lab(*, coturn: bool = True) -> None:
    """Skip outside CI unless root and the tools are here; in CI (CI=true) fail instead."""
    require(os.geteuid() == 0, "root (network namespaces)")
    for tool in ("ip", "iptables", "iptables-restore", "tc"):
        require(shutil.which(tool) is not None, tool)
    if coturn:
        require(shutil.which("turnserver") is not None, "coturn (turnserver)")


def live_namespaces() -> set[str]:
    """Every network namespace name on the machine right now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def lab_python(lab: Lab, host: str, code: str, *args: str, timeout: float = 30.0) -> Any:
    """Run ``code`` with this interpreter inside ``host``; return its stdout parsed as JSON."""
    proc = lab.run(
        host,
        [sys.executable, "-c", textwrap.dedent(code), *args],
        timeout=timeout * TIMEOUT_UNIT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# A UDP sink that counts datagrams for ``seconds`` after the first one and echoes each back.
UDP_ECHO_COUNTER = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: hold every echo
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(float(sys.argv[3]))
seen = set()
try:
    while True:
        data, addr = s.recvfrom(2048)
        seen.add(data)
        s.sendto(data, addr)
except TimeoutError:
    pass
print(json.dumps({"received": len(seen)}), flush=True)
"""

# Sends N numbered datagrams (paced), then counts the echoes that come back.
UDP_SENDER = """
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: hold every echo
s.settimeout(float(sys.argv[4]))
for i in range(n):
    s.sendto(b"%08d" % i, (host, port))
    if i % 50 == 49:
        time.sleep(0.002)
echoes = set()
try:
    while len(echoes) < n:
        data, _ = s.recvfrom(2048)
        echoes.add(data)
except TimeoutError:
    pass
print(json.dumps({"sent": n, "echoed": len(echoes)}))
"""


def udp_count(lab: Lab, sender: str, receiver: str, n: int, port: int = 9999) -> dict[str, int]:
    """Send ``n`` datagrams from ``sender`` to ``receiver`` (echoing); count both ways."""
    sink = lab.python(
        receiver,
        ["-c", UDP_ECHO_COUNTER, "0.0.0.0", str(port), str(2.0 * TIMEOUT_UNIT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "ready"
    result: dict[str, int] = lab_python(
        lab, sender, UDP_SENDER, lab.address(receiver), str(port), str(n), str(1.0 * TIMEOUT_UNIT)
    )
    out, _ = sink.communicate(timeout=30 * TIMEOUT_UNIT)
    result["received"] = json.loads(out.strip().splitlines()[-1])["received"]
    return result
