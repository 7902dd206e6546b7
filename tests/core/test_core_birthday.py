"""Birthday punching (issue 16), the pure parts: the odds, the plan table, the probe and spray
schedules, and the limits a hostile hint cannot move."""

from __future__ import annotations

import math
import random

import pytest

from p2plab.config import BirthdayConfig
from p2plab.core.birthday import (
    Plan,
    RandomPortProber,
    SpraySchedule,
    birthday_success,
    hard_pair_success,
    nat_kind,
    plan_traversal,
    port_count,
    spray_times,
)
from p2plab.core.signaling import NatHint

EASY = NatHint(mapping="endpoint-independent")
LEAKY = NatHint(mapping="endpoint-independent", remaps_on_clash=True)
HARD = NatHint(mapping="endpoint-dependent")
UNKNOWN = NatHint()
CFG = BirthdayConfig()


# -- formulas -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected", "digit"),
    [(174, 0.50, 0.01), (256, 0.64, 0.01), (1024, 0.983, 0.001), (2048, 0.9997, 0.0001)],
)
def test_birthday_success_matches_the_issue(n: int, expected: float, digit: float) -> None:
    # The issue's figures are for Linux's port range (1024..65535, P = 64512) to the last digit
    # shown (rounded: half a digit either way)...
    assert birthday_success(256, n, 64512) == pytest.approx(expected, abs=digit / 2)
    # ...and within a point for the full 16-bit space.
    assert birthday_success(256, n, 65536) == pytest.approx(expected, abs=0.01)


def test_birthday_success_edges() -> None:
    assert birthday_success(256, 0, 65536) == 0.0
    assert birthday_success(0, 1024, 65536) == 0.0
    assert birthday_success(70000, 1, 65536) == 1.0  # more sockets than ports: a sure hit
    assert birthday_success(1, 1, 1) == 1.0


def test_hard_pair_success() -> None:
    assert hard_pair_success(172_000, 65536) == pytest.approx(0.999, abs=0.0005)
    assert hard_pair_success(1024, 65536) == pytest.approx(1 - math.exp(-1 / 4096))
    assert hard_pair_success(0, 65536) == 0.0
    assert port_count(CFG) == 64512


# -- the plan table -------------------------------------------------------------------------------


def role(own: NatHint | None, peer: NatHint | None, config: BirthdayConfig = CFG) -> str:
    return plan_traversal(own, peer, config).role


def test_nat_kind() -> None:
    assert [nat_kind(h) for h in (EASY, LEAKY, HARD, UNKNOWN, None)] == [
        "easy",
        "leaky",
        "hard",
        "unknown",
        "unknown",
    ]


def test_plan_table_is_the_design_and_mirrors() -> None:
    table = [
        (EASY, EASY, "plain"),
        (EASY, LEAKY, "probe"),
        (EASY, HARD, "probe"),
        (LEAKY, EASY, "spray"),
        (LEAKY, LEAKY, "hard-relay"),
        (LEAKY, HARD, "probe"),
        (HARD, EASY, "spray"),
        (HARD, LEAKY, "spray"),
        (HARD, HARD, "hard-relay"),
    ]
    partner = {"plain": "plain", "probe": "spray", "spray": "probe", "hard-relay": "hard-relay"}
    for own, peer, want in table:
        assert role(own, peer) == want, (own, peer)
        assert role(peer, own) == partner[want], (peer, own)  # both sides agree
    # Only a hard sprayer facing a leaky prober waits for the prober's whole window.
    assert plan_traversal(HARD, LEAKY, CFG).spray_delay == pytest.approx(10.24)
    assert plan_traversal(HARD, EASY, CFG).spray_delay == 0.0
    assert plan_traversal(LEAKY, EASY, CFG).spray_delay == 0.0


def test_plan_unknown_or_disabled_is_plain() -> None:
    for own, peer in [(None, HARD), (HARD, None), (UNKNOWN, HARD), (EASY, UNKNOWN)]:
        assert plan_traversal(own, peer, CFG) == Plan("plain")
    off = BirthdayConfig(enabled=False)
    assert role(EASY, HARD, off) == "plain"
    assert role(HARD, HARD, off) == "plain"


def test_hard_pair_relays_with_a_sentence_unless_a_budget_is_set() -> None:
    plan = plan_traversal(HARD, HARD, CFG)
    assert plan.role == "hard-relay"
    assert plan.reason is not None
    assert "both NATs map per destination" in plan.reason
    assert "0.03%" in plan.reason and "--hard-nat-budget" in plan.reason
    tried = plan_traversal(HARD, LEAKY, BirthdayConfig(hard_budget=172_000))
    assert tried.role == "spray"  # hard x leaky is not a hard pair
    tried = plan_traversal(HARD, HARD, BirthdayConfig(hard_budget=172_000))
    assert tried.role == "hard-try"
    assert tried.expected == pytest.approx(0.9989, abs=0.0005)
    assert plan_traversal(EASY, HARD, CFG).expected == pytest.approx(0.983, abs=0.0005)


# -- the probe schedule ---------------------------------------------------------------------------


def prober(
    config: BirthdayConfig = CFG, predicted: tuple[int, ...] = (), seed: int = 1, **kw: int
) -> RandomPortProber:
    return RandomPortProber(
        "198.51.100.7", config, random.Random(seed).randbytes, 10.0, predicted, **kw
    )


def drain(p: RandomPortProber, step: float = 0.0) -> list[tuple[float, tuple[str, int]]]:
    """Call the prober at each of its deadlines (plus ``step`` late) until it is done."""
    out = []
    while (deadline := p.next_deadline()) is not None:
        now = deadline + step
        got = p.due(now)
        assert got, "a deadline that yields nothing would spin the driver"
        out.extend((now, a) for a in got)
    return out


def test_prober_paces_never_repeats_and_stops_at_the_budget() -> None:
    p = prober()
    assert p.due(9.99) == []  # nothing before the start
    sent = drain(p)
    assert len(sent) == CFG.probe_budget == p.sent and p.budget_left == 0
    ports = [a[1] for _, a in sent]
    assert len(set(ports)) == len(ports)
    assert all(a[0] == "198.51.100.7" for _, a in sent)
    assert all(1024 <= port <= 65535 for port in ports)
    for i, (t, _) in enumerate(sent):  # the i-th probe leaves no earlier than start + i/rate
        assert i <= math.ceil((t - 10.0) * CFG.probe_rate) + 1
    assert sent[-1][0] == pytest.approx(10.0 + 1023 / 100)
    assert p.next_deadline() is None and p.due(1e9) == []


def test_prober_late_caller_never_exceeds_the_rate_bound() -> None:
    p = prober()
    total = 0
    for t in (10.0, 10.5, 10.505, 13.0, 30.0):
        total += len(p.due(t))
        assert total <= math.ceil((t - 10.0) * CFG.probe_rate) + 1
    assert total == CFG.probe_budget


def test_prober_ports_look_uniform() -> None:
    config = BirthdayConfig(port_range=(1000, 1999), probe_budget=1000)
    ports = [a[1] for _, a in drain(prober(config))]
    assert sorted(ports) == list(range(1000, 2000))  # the budget covers the range: each once
    ports = [a[1] for _, a in drain(prober(BirthdayConfig(probe_budget=1024), seed=7))]
    low_half = sum(1 for port in ports if port < 1024 + 64512 // 2)
    assert 400 < low_half < 624  # binomial(1024, 1/2): 7 sigma either way


def test_prober_predicted_first_and_counted_in_the_budget() -> None:
    config = BirthdayConfig(probe_budget=20)
    p = prober(config, predicted=(40001, 40002, 80, 40001))
    sent = [a for _, a in drain(p)]
    assert [a[1] for a in sent[:3]] == [40001, 40002, 80]  # in order, repeats dropped
    assert len(sent) == 20 and len({a[1] for a in sent}) == 20
    assert p.predicted_sent == {("198.51.100.7", port) for port in (40001, 40002, 80)}


def test_prober_refuses_a_hostile_prediction() -> None:
    # A hint built without the model (e.g. a buggy driver) cannot widen the probe either.
    bad = (0, -5, 70000, *range(2000, 2100))
    p = prober(BirthdayConfig(probe_budget=40), predicted=bad)
    sent = [a for _, a in drain(p)]
    assert [a[1] for a in sent[:16]] == list(range(2000, 2016))  # at most 16, valid only
    assert len(sent) == 40 and all(a[0] == "198.51.100.7" for a in sent)
    assert all(1 <= a[1] <= 65535 for a in sent)


def test_prober_budget_capped_by_the_range_and_override() -> None:
    small = BirthdayConfig(port_range=(5000, 5009), probe_budget=1024)
    assert len(drain(prober(small, predicted=(5003, 9999)))) == 11  # 10 in range + 9999
    assert len(drain(prober(CFG, budget=3))) == 3


def test_prober_survives_a_broken_rand_bytes() -> None:
    p = RandomPortProber("198.51.100.7", CFG, lambda n: b"\xff" * n, 0.0)
    ports = [a[1] for a in p.due(1.0)]
    assert len(ports) == 101 and len(set(ports)) == 101  # biased but terminating, no repeats


# -- the spray schedule ---------------------------------------------------------------------------


def test_spray_schedule() -> None:
    assert spray_times(0.0, 0.0, 5.0, 20.0) == [0.0, 5.0, 10.0, 15.0]
    assert spray_times(0.0, 10.24, 5.0, 21.0) == pytest.approx([10.24, 15.24, 20.24])
    s = SpraySchedule(0.0, 0.0, 5.0)
    assert s.due(0.0) and not s.due(4.9)
    assert s.due(17.0)  # late: one round, not three
    assert not s.due(19.9) and s.next_deadline() == 20.0 and s.rounds == 2
