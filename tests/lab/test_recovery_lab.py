"""Recovery in the kernel NAT lab (root): the NAT in front of worker a forgets its mappings
(``conntrack -F``) while a and b are connected, and the link comes back by punching again."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import pytest

from p2plab.lab.netns import Lab
from tests.lab_fixtures import TIMEOUT_UNIT, require_lab

RENDEZVOUS_PORT = 8000
T = 30 * TIMEOUT_UNIT

# A worker with short link timers that prints every UI message as a JSON line and sends a chat
# for each "chat <text>" line on stdin (the CLI has no flags for the session timers).
WORKER = """
import asyncio, json, sys
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.config import SessionConfig

async def main():
    cfg = WorkerConfig(
        rendezvous_url=sys.argv[1], stun_servers=(sys.argv[2],), http_port=None,
        nat_report=False,
        session=SessionConfig(keepalive_interval=0.5, peer_timeout=3.0, punch_timeout=4.0),
        repunch_max_delay_s=1.0,
    )
    w = await Worker(cfg).start()
    q = w.ui_subscribe()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands():
        while line := await reader.readline():
            text = line.decode().strip()
            if text.startswith("chat "):
                try:
                    w.send_chat(text[5:])
                except Exception as exc:
                    print(json.dumps({"type": "error", "message": str(exc)}), flush=True)

    task = asyncio.ensure_future(commands())
    print(json.dumps(w.status()), flush=True)
    while True:
        print(json.dumps(await q.get()), flush=True)

asyncio.run(main())
"""


# Real namespaces and iptables: `-m "not lab"` deselects them; conftest runs them one at a time.
pytestmark = [pytest.mark.lab, pytest.mark.root]


class LabWorker:
    """One worker process in a lab host; its JSON lines are collected by a thread."""

    def __init__(self, lab: Lab, host: str) -> None:
        rv = f"ws://{lab.rendezvous_address}:{RENDEZVOUS_PORT}"
        self.proc = lab.python(
            host,
            ["-c", WORKER, rv, lab.stun_server],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.messages: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.messages.append(msg)

    def statuses(self) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages if m.get("type") == "status"]

    def states(self) -> list[str]:
        out: list[str] = []
        for s in self.statuses():
            if not out or out[-1] != s["state"]:
                out.append(s["state"])
        return out

    @property
    def status(self) -> dict[str, Any]:
        st = self.statuses()
        return st[-1] if st else {}

    def chats_in(self) -> list[str]:
        with self.lock:
            return [
                m["text"]
                for m in self.messages
                if m.get("type") == "chat" and m.get("direction") == "in"
            ]

    def chat(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"chat {text}\n")
        self.proc.stdin.flush()


def wait(cond: Callable[[], Any], what: str, timeout: float = T) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def start_pair(lab: Lab) -> tuple[LabWorker, LabWorker]:
    rv = lab.rendezvous_address
    lab.python(
        "rendezvous",
        # --open: the lab network exists only between its namespaces (beyond loopback the
        # rendezvous refuses to start without a token otherwise).
        ["-m", "p2plab", "rendezvous", "--host", rv, "--port", str(RENDEZVOUS_PORT), "--open"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait(
        lambda: f"{rv}:{RENDEZVOUS_PORT}" in lab.run("rendezvous", ["ss", "-Hltn"]).stdout,
        "the rendezvous to listen",
    )
    a, b = LabWorker(lab, "a"), LabWorker(lab, "b")
    wait(lambda: a.status.get("state") == b.status.get("state") == "connected", "a connected pair")
    return a, b


def chat_works(sender: LabWorker, receiver: LabWorker, text: str) -> None:
    sender.chat(text)
    wait(lambda: text in receiver.chats_in(), f"chat {text!r} to arrive")


def conntrack_flush(lab: Lab, host: str) -> None:
    proc = lab.run(host, ["conntrack", "-F"])
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def lab() -> Any:
    require_lab()
    with Lab.create("port-restricted", "port-restricted") as lab:
        yield lab


def test_conntrack_flush_on_a_nat_keeps_or_restores_the_link(lab: Lab) -> None:
    a, b = start_pair(lab)
    chat_works(a, b, "before the flush")
    peer = a.status["peer"]["worker_id"]
    conntrack_flush(lab, "nat_a")
    # a keeps sending keep-alives through a fresh mapping; the link must carry chat again
    chat_works(b, a, "after the flush")
    chat_works(a, b, "and back")
    assert a.status["state"] == b.status["state"] == "connected"
    assert a.status["peer"]["worker_id"] == peer


def test_nat_mapping_gone_during_an_outage_is_recovered_by_punching_again(lab: Lab) -> None:
    a, b = start_pair(lab)
    chat_works(a, b, "before")
    ids = (a.status["worker_id"], b.status["worker_id"])
    offers = (a.status["stats"]["offers"], b.status["stats"]["offers"])
    # An outage at nat_a longer than peer_timeout, then its mappings are gone: both workers
    # declare the peer lost, punch again on their own, and meet through a new mapping.
    drop = ["iptables", "-I", "FORWARD", "-p", "udp", "-j", "DROP"]
    assert lab.run("nat_a", drop).returncode == 0
    try:
        wait(lambda: "lost" in a.states() and "lost" in b.states(), "both sides to see lost")
        wait(lambda: "punching" in a.states()[1:], "a to punch again")
        conntrack_flush(lab, "nat_a")
    finally:
        lab.run("nat_a", ["iptables", "-D", "FORWARD", "-p", "udp", "-j", "DROP"])
    conntrack_flush(lab, "nat_a")
    wait(
        lambda: a.states()[-1] == "connected" and b.states()[-1] == "connected",
        "the link to come back",
    )
    assert (a.status["peer"]["worker_id"], b.status["peer"]["worker_id"]) == ids[::-1]
    # no new offer: the workers recovered without the rendezvous
    assert (a.status["stats"]["offers"], b.status["stats"]["offers"]) == offers
    chat_works(a, b, "after recovery")
    chat_works(b, a, "both ways")
    assert a.status["security"]["encrypted"] is True
