"""Real rendezvous and worker processes punching through the kernel NAT lab.

The pairs run in parallel (one lab each) in a module fixture; each test checks one outcome.
The easy x hard pairs that birthday punching connects (issue 16) are in test_lab_birthday.py,
with a socket pool that makes their success near certain; here the pairs of two hard sides go
to the relay at once and say why.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from p2plab.lab.matrix import PairResult, plot_heatmap, run_pair, write_csv
from p2plab.lab.netns import LabConfig
from p2plab.lab.profiles import expected_outcome

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.lab_fixtures import TIMEOUT_UNIT, require_lab
except ImportError:  # pragma: no cover
    from lab_fixtures import TIMEOUT_UNIT, require_lab  # type: ignore[no-redef]

PAIRS: dict[str, LabConfig] = {
    "open x open": LabConfig("open", "open"),
    "port-restricted x port-restricted": LabConfig("port-restricted", "port-restricted"),
    "symmetric x symmetric": LabConfig("symmetric", "symmetric"),
    "full x symmetric": LabConfig("full", "symmetric"),
    "restricted x symmetric": LabConfig("restricted", "symmetric"),
    "same LAN (port-restricted)": LabConfig("port-restricted", same_lan=True),
    "leaky x leaky": LabConfig("leaky", "leaky"),
}


# Real namespaces and iptables: `-m "not lab"` deselects them; conftest runs them one at a time.
pytestmark = [pytest.mark.lab, pytest.mark.root]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PairResult]:
    require_lab()
    log_dir = tmp_path_factory.mktemp("matrix-logs")
    hard = ("symmetric x symmetric", "leaky x leaky")
    with ThreadPoolExecutor(4) as pool:
        # The relayed pairs check the chat over the relay: start them first, side by side.
        slow_first = sorted(PAIRS, key=lambda n: n not in hard)
        futures = {
            # The hard pairs relay before the workers' NAT report is in; the hint is shown with
            # it, and test_leaky_nats_are_seen_as_hard reads it: wait for it there.
            name: pool.submit(
                run_pair,
                PAIRS[name],
                timeout=25 * TIMEOUT_UNIT,
                log_dir=log_dir,
                nat_wait=10 * TIMEOUT_UNIT if name in hard else 0,
            )
            for name in slow_first
        }
        return {name: f.result() for name, f in futures.items()}


def _check(r: PairResult, outcome: str) -> None:
    assert r.outcome == outcome, r
    if outcome == "direct":
        assert r.a_state == r.b_state == "connected"
        assert r.connect_s is not None and r.connect_s > 0
        assert r.a_peer_endpoint and r.b_peer_endpoint


@pytest.mark.parametrize(
    "name",
    [
        "open x open",
        "port-restricted x port-restricted",
        "full x symmetric",
        "restricted x symmetric",
    ],
)
def test_direct(outcomes: dict[str, PairResult], name: str) -> None:
    r = outcomes[name]
    _check(r, "direct")
    assert r.expected == "direct"


def test_direct_against_symmetric_uses_the_peer_reflexive_address(
    outcomes: dict[str, PairResult],
) -> None:
    """The full-cone side answers where the symmetric side's packets really come from (RFC 8445
    7.3.1.3): its peer endpoint is on NAT B's address but not the port STUN showed."""
    r = outcomes["full x symmetric"]
    _check(r, "direct")
    assert r.a_peer_endpoint is not None and r.b_public is not None
    assert r.a_peer_endpoint.split(":")[0] == r.b_public.split(":")[0]
    assert r.a_peer_endpoint != r.b_public
    assert r.b_peer_endpoint == r.a_public


@pytest.mark.parametrize("name", ["symmetric x symmetric", "leaky x leaky"])
def test_two_hard_sides_relay_at_once_and_say_why(
    outcomes: dict[str, PairResult], name: str
) -> None:
    """Both NATs map per destination (leaky remaps on a clash: hard too): without a hard-NAT
    budget the workers do not punch birthday-style but relay, with the odds in the sentence."""
    r = outcomes[name]
    _check(r, "failed")
    assert r.expected == "failed"
    assert "connected" not in (r.a_state, r.b_state)
    assert r.fallback == "relayed" and r.method == "relay"
    assert "both NATs map per destination" in r.worker_error
    assert "0.03%" in r.worker_error
    assert r.probes == 0 and r.sprays == 0  # not one birthday datagram


def test_same_lan_pair_uses_lan_candidates(outcomes: dict[str, PairResult]) -> None:
    r = outcomes["same LAN (port-restricted)"]
    _check(r, "direct")
    # MASQUERADE does not hairpin: the link must run between the two LAN addresses.
    assert r.a_peer_endpoint is not None and r.a_peer_endpoint.startswith("198.18.1.")
    assert r.b_peer_endpoint is not None and r.b_peer_endpoint.startswith("198.18.1.")


def test_leaky_nats_are_seen_as_hard(outcomes: dict[str, PairResult]) -> None:
    """Two NATs without an input firewall lock each other out (natlab.md): each side's first
    punch reaches the other NAT before its host has sent anything to this peer, conntrack keeps
    an entry for it, and the host's own packet then gets a new source port.  The workers' clash
    test finds that, and their hints say hard (remapping), which is why they relay."""
    r = outcomes["leaky x leaky"]
    assert r.a_hint == r.b_hint == "hard+remaps"


def test_csv_and_heatmap_are_written(outcomes: dict[str, PairResult], tmp_path: Path) -> None:
    results = list(outcomes.values())
    write_csv(results, tmp_path / "m.csv")
    plot_heatmap(
        results,
        tmp_path / "m.png",
        ["open", "full", "restricted", "port-restricted", "symmetric", "leaky"],
    )
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert len(lines) == 1 + len(results)
    assert lines[0].startswith("profile_a,profile_b,same_lan,outcome,expected,connect_s")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expected_outcome_table() -> None:
    assert expected_outcome("symmetric", "symmetric") == "failed"
    assert expected_outcome("leaky", "leaky") == "failed"
    for hard in ("symmetric", "leaky"):  # birthday punching (issue 16)
        assert expected_outcome("port-restricted", hard) == "direct"
        assert expected_outcome(hard, "port-restricted") == "direct"
    assert expected_outcome("leaky", "symmetric") == expected_outcome("symmetric", "leaky")
    assert expected_outcome("leaky", "symmetric") == "direct"
    assert expected_outcome("restricted", "symmetric") == "direct"
    assert expected_outcome("symmetric", "symmetric", same_lan=True) == "direct"
    assert expected_outcome("leaky", "open") == "direct"
