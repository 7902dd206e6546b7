"""Issue 13 item 7: the notebook-first API, run exactly as the issue (and the README) write it.

The same code runs in a notebook cell (top-level ``await``: ``tests/notebooks/test_notebooks.py`` executes
``notebooks/01_quickstart.ipynb``, which uses it) and inside ``asyncio.run`` in a script (the
second test runs it that way, in a fresh interpreter that imports only ``p2plab``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import p2plab
from tests.conftest import TIMEOUT_UNIT

SNIPPET = """
async with p2plab.local_lab() as lab:          # rendezvous + STUN + two workers, loopback
    a, b = lab.workers
    async with b.subscribe(p2plab.ChatReceived) as chats:
        await a.chat("hello")                   # returns once delivered; raises on failure
        msg = await anext(chats)                # msg.text == "hello"; msg.peer_id == a.id
    result = await a.benchmark.run(duration_s=1, payload_size=1200, rate_mbps=50)
    rtt = await a.benchmark.rtt(count=100)     # p50/p90/p99 in microseconds
"""


@pytest.mark.timeout(120)
async def test_the_issue_snippet_runs_as_written() -> None:
    scope: dict[str, object] = {"p2plab": p2plab}
    body = textwrap.indent(SNIPPET, "    ")
    exec(f"async def snippet():\n{body}\n    return locals()", scope)
    found = await scope["snippet"]()  # type: ignore[operator]
    msg, a = found["msg"], found["a"]
    assert msg.text == "hello" and msg.peer_id == a.id
    result, rtt = found["result"], found["rtt"]
    assert result.payload_size == 1200 and result.peer_view.packets_received > 0
    assert rtt.received == 100 and 0 < rtt.p50_us <= rtt.p90_us <= rtt.p99_us
    assert a.state == "stopped"  # the lab stopped at the end of the block


def test_the_snippet_runs_inside_asyncio_run_in_a_plain_script(tmp_path) -> None:
    script = tmp_path / "snippet.py"
    body = textwrap.indent(SNIPPET, "    ")
    script.write_text(
        "import asyncio\nimport p2plab\n\n"
        f"async def main():\n{body}\n"
        '    print("OK", msg.text, msg.peer_id == a.id, result.peer_view.packets_received > 0,'
        " rtt.received)\n\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120 * TIMEOUT_UNIT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["OK", "hello", "True", "True", "100"]
