"""A benchmark through the kernel lab's coturn (issue 17, item 5): symmetric x symmetric cannot
punch, so ``p2plab bench`` between two real processes behind the two NATs runs over TURN/UDP, says
so in its result, and the receiver counts what crossed coturn.

Root is needed; in CI (CI=true) a missing requirement fails instead of skipping.
"""

from __future__ import annotations

import pytest

from p2plab.lab.bench_run import bench, start_rendezvous
from p2plab.lab.matrix import RENDEZVOUS_PORT
from p2plab.lab.netns import Lab

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.lab_fixtures import TIMEOUT_UNIT, require_lab
except ImportError:  # pragma: no cover
    from lab_fixtures import TIMEOUT_UNIT, require_lab  # type: ignore[no-redef]

# Real namespaces and iptables: `-m "not lab"` deselects them; conftest runs them one at a time.
pytestmark = [pytest.mark.lab, pytest.mark.root]


def test_symmetric_pair_benchmarks_over_turn_udp() -> None:
    require_lab()
    with Lab.create("symmetric", "symmetric") as lab:
        start_rendezvous(lab, RENDEZVOUS_PORT, turn=True)
        # 1 s at 2 Mbit/s: small, the point is the path and that bytes arrived through coturn.
        out = bench(lab, RENDEZVOUS_PORT, "turn-bench", 1.0, 1000, rate=2.0,
                    timeout=30 * TIMEOUT_UNIT)  # fmt: skip
    (run,) = out["results"]
    assert run["path"] == "turn-udp", run["path"]
    view = run["peer_view"]
    assert view is not None and view["path"] == "turn-udp", view
    assert view["packets_received"] > 0 and view["bytes_received"] > 0, view
    assert run["packets_sent"] >= view["packets_received"]
    assert view["encrypted"] is True
