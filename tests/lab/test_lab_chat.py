"""Chat between two real workers through two lossy kernel NATs: every message exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from p2plab.lab.matrix import PairRun
from p2plab.lab.netns import Lab

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.lab_fixtures import TIMEOUT_UNIT, require_lab
except ImportError:  # pragma: no cover
    from lab_fixtures import TIMEOUT_UNIT, require_lab  # type: ignore[no-redef]


# Real namespaces and iptables: `-m "not lab"` deselects them; conftest runs them one at a time.
pytestmark = [pytest.mark.lab, pytest.mark.root]


RECEIVER = """
import asyncio, json, sys
import websockets

async def main():
    n, limit, url = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    got = []
    loop = asyncio.get_running_loop()
    async with websockets.connect(url) as ws:
        print("ready", flush=True)
        deadline = loop.time() + limit
        settle = None
        while loop.time() < (settle or deadline):
            try:
                left = max(0.01, (settle or deadline) - loop.time())
                raw = await asyncio.wait_for(ws.recv(), left)
            except asyncio.TimeoutError:
                break
            msg = json.loads(raw)
            if msg.get("type") == "chat" and msg.get("direction") == "in":
                got.append(msg["text"])
                if len(set(got)) >= n and settle is None:
                    settle = loop.time() + 2.0  # keep listening for duplicates
    print(json.dumps(got), flush=True)

asyncio.run(main())
"""

SENDER = """
import asyncio, json, sys
import websockets

async def main():
    texts = json.loads(sys.argv[1])
    limit, url = float(sys.argv[2]), sys.argv[3]
    delivered, ids = set(), {}
    loop = asyncio.get_running_loop()
    async with websockets.connect(url) as ws:
        for text in texts:
            await ws.send(json.dumps({"type": "chat", "text": text}))
        deadline = loop.time() + limit
        while loop.time() < deadline and len(delivered) < len(texts):
            try:
                raw = await asyncio.wait_for(ws.recv(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
            msg = json.loads(raw)
            if msg.get("type") == "chat" and msg.get("direction") == "out":
                ids[msg["id"]] = msg["text"]
            elif msg.get("type") == "chat_delivered":
                delivered.add(msg["id"])
    print(json.dumps({"delivered": sorted(ids[i] for i in delivered if i in ids)}), flush=True)

asyncio.run(main())
"""


def test_chat_at_20_percent_loss_arrives_exactly_once() -> None:
    """20% of UDP dropped at each NAT's WAN in each direction (36% end to end each way)."""
    require_lab()
    n = 30
    texts = [f"message {i:03d}" for i in range(n)]
    limit = 60 * TIMEOUT_UNIT
    with Lab.create("port-restricted", "port-restricted", loss_a=0.2, loss_b=0.2) as lab:
        run = PairRun(lab, name="chat-loss").start()
        try:
            assert run.wait_connected(60 * TIMEOUT_UNIT), (run.status("a"), run.status("b"))
            receiver = lab.python(
                "b",
                ["-c", textwrap.dedent(RECEIVER), str(n), str(limit), run.ui_ws_url],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert receiver.stdout is not None
            assert receiver.stdout.readline().strip() == "ready"
            sender = lab.run(
                "a",
                [
                    sys.executable,
                    "-c",
                    textwrap.dedent(SENDER),
                    json.dumps(texts),
                    str(limit),
                    run.ui_ws_url,
                ],
                timeout=limit + 30,
            )
            assert sender.returncode == 0, sender.stderr
            out, _ = receiver.communicate(timeout=limit + 30)
        finally:
            run.close()
    got = json.loads(out.strip().splitlines()[-1])
    assert sorted(got) == texts, "every message exactly once"
    assert json.loads(sender.stdout)["delivered"] == texts
