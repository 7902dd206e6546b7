"""Symmetric x symmetric in the kernel NAT lab: punching fails, the relay carries the chat.

Real rendezvous and worker processes (``p2plab worker --events``) run in network namespaces
behind two ``MASQUERADE --random-fully`` NATs (natlab.md: "relay").  Root is needed; in CI
(CI=true) a missing requirement fails instead of skipping.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from p2plab.lab.matrix import PairRun, plot_heatmap, run_pair, write_csv
from p2plab.lab.netns import Lab, LabConfig

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.lab_fixtures import TIMEOUT_UNIT, require_lab
except ImportError:  # pragma: no cover
    from lab_fixtures import TIMEOUT_UNIT, require_lab  # type: ignore[no-redef]


# Real namespaces and iptables: `-m "not lab"` deselects them; conftest runs them one at a time.
pytestmark = [pytest.mark.lab, pytest.mark.root]


def test_symmetric_pair_falls_back_to_the_relay_and_chats_exactly_once() -> None:
    require_lab()
    with Lab.create("symmetric", "symmetric") as lab:
        run = PairRun(lab, name="relay").start(worker_args=["--punch-timeout", "3"])
        try:
            assert run.wait_settled(60 * TIMEOUT_UNIT), (run.status("a"), run.status("b"))
            a, b = run.status("a"), run.status("b")
            # Direct punching was tried and failed: nobody was ever connected.
            assert not run.connected()
            assert all(r.first_punching is not None for r in run.readers.values())
            assert all(r.connected_at is None for r in run.readers.values())
            for st in (a, b):
                assert st["state"] == "relayed", st
                assert st["path"] == "relay"
                assert st["peer"]["endpoint"] == "relay"
                assert st["security"]["encrypted"] is True
            assert a["peer"]["worker_id"] == b["worker_id"]
            assert b["peer"]["worker_id"] == a["worker_id"]
            # Chat both ways: acknowledged and received exactly once.
            assert run.chat_exactly_once("a", "b", timeout=20 * TIMEOUT_UNIT)
            assert run.chat_exactly_once("b", "a", timeout=20 * TIMEOUT_UNIT)
            assert run.chat_exactly_once("a", "b", timeout=20 * TIMEOUT_UNIT)
            assert len(run.readers["b"].chats_in) == 2
            assert len(run.readers["a"].chats_in) == 1
        finally:
            run.close()


def test_matrix_records_the_relay_fallback(tmp_path: Path) -> None:
    require_lab()
    r = run_pair(LabConfig("symmetric", "symmetric"), timeout=40 * TIMEOUT_UNIT, nat_wait=0)
    assert r.outcome == "failed", r  # direct punching, as natlab.md predicts
    assert r.expected == "failed" and r.agrees
    assert r.fallback == "relayed", r
    assert r.a_state == r.b_state == "relayed"
    assert r.a_peer_endpoint == r.b_peer_endpoint == "relay"
    write_csv([r], tmp_path / "m.csv")
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["fallback"] == "relayed"
    assert rows[0]["outcome"] == "failed"
    plot_heatmap([r], tmp_path / "m.png", ["symmetric"])
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
