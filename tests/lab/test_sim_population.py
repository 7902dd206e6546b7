"""The population study (issue 20): presets, sampling, the staged prediction, consistency."""

from __future__ import annotations

import math

import pytest

from p2plab.errors import ConfigError
from p2plab.lab.sim.population import (
    STAGES,
    Preset,
    Site,
    active,
    pair_matrix,
    predict,
    rate_under,
    sample_sites,
    summarize,
    weighted_rate,
    wilson,
)
from p2plab.lab.sim.presets import PRESETS, preset


def test_every_preset_cites_and_names_its_assumptions() -> None:
    for p in PRESETS.values():
        assert p.sources and p.assumptions
        probs = p.site_probabilities()
        assert math.isclose(sum(probs.values()), 1.0)
        assert all(v > 0 for v in probs.values())


def test_a_preset_that_does_not_sum_to_one_is_refused() -> None:
    base = preset("natcracker")
    with pytest.raises(ConfigError, match="mapping must sum to 1"):
        Preset(**{**base.__dict__, "mapping": {"EIM": 0.5, "APDM": 0.4}})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")


def test_sampling_is_seeded_and_follows_the_preset() -> None:
    p = preset("ford-2005")
    pairs = sample_sites(p, 4000, seed=7)
    assert pairs == sample_sites(p, 4000, seed=7)
    assert pairs != sample_sites(p, 4000, seed=8)
    sites = [s for pair in pairs for s in pair]
    hard = sum(s.v4.startswith("symmetric") for s in sites) / len(sites)
    # 18% map per destination in Ford et al.'s numbers: 8000 draws, 4 sigma is 1.7 points
    assert abs(hard - 0.18) < 0.017


def test_unused_features_do_not_split_runs() -> None:
    s = Site("symmetric", "pmp", "v6-apdf")
    assert active(s, "plain") == Site("symmetric")
    assert active(s, "port-mapping") == Site("symmetric", "pmp")
    assert active(s, "ipv6") == s


def test_wilson_interval() -> None:
    low, high = wilson(70, 100)
    assert low < 0.7 < high
    assert (round(low, 3), round(high, 3)) == (0.604, 0.781)  # the textbook example's values


def test_prediction_matches_the_weighted_matrix_within_sampling_error() -> None:
    """Criterion 4: the sampled rate equals the per-pair matrix weighted by the preset's pair
    probabilities, within the sampling error (both from the same engine runs' seeds)."""
    # A small population (three NAT classes) keeps the test cheap; the presets run in the
    # experiment.  Its symmetric NATs fail plain punching against port-restricted ones.
    p = Preset(
        name="small",
        summary="three classes",
        no_nat=0.0,
        mapping={"EIM": 0.6, "APDM": 0.4},
        filtering={"EIF": 0.3, "APDF": 0.7},
        allocation={"random": 1.0},
        leaky=0.0,
        portmap={"none": 1.0},
        ipv6={"none": 1.0},
        sources=("test",),
        assumptions=("all of it",),
    )
    stages = ("plain", "birthday")
    n = 400
    rows = predict(p, n, seed=3, seeds=2, stages=stages, processes=1)
    table = summarize(rows)
    matrix = pair_matrix(p, seed=3, seeds=2, stages=stages, processes=1)
    for stage in stages:
        rate = float(table.loc[table["stage"] == stage, "rate"].iloc[0])
        expected = weighted_rate(p, matrix, stage)
        sigma = math.sqrt(max(expected * (1 - expected), 1e-4) / n)
        assert abs(rate - expected) < 4 * sigma, (stage, rate, expected)
    plain = float(table.loc[table["stage"] == "plain", "rate"].iloc[0])
    birthday = float(table.loc[table["stage"] == "birthday", "rate"].iloc[0])
    # Ford et al.'s symmetric NATs fail plain punching against port-restricted ones: birthday
    # punching must rescue some of them.
    assert birthday > plain
    carried = rows[(rows["stage"] == "birthday") & rows["carried"]]
    assert carried["connected"].all()
    assert set(rows["stage"]) == set(stages)
    assert list(table["stage"]) == [s for s in STAGES if s in stages]


def test_rate_under_reweights_measured_class_pairs() -> None:
    """Moving the preset's shares re-weights what the engine did; a preset that needs a class
    pair nobody ran gets no answer rather than a guess."""
    import pandas as pd

    rows = pd.DataFrame(
        [
            {"stage": "plain", "site_a": "full", "site_b": "full", "connected": True},
            {"stage": "plain", "site_a": "full", "site_b": "symmetric", "connected": True},
            {"stage": "plain", "site_a": "symmetric", "site_b": "full", "connected": True},
            {"stage": "plain", "site_a": "symmetric", "site_b": "symmetric", "connected": False},
        ]
    )
    base = dict(
        summary="",
        no_nat=0.0,
        filtering={"EIF": 1.0},
        allocation={"random": 1.0},
        leaky=0.0,
        portmap={"none": 1.0},
        ipv6={"none": 1.0},
        sources=("t",),
        assumptions=("t",),
    )
    half = Preset(name="half", mapping={"EIM": 0.5, "APDM": 0.5}, **base)
    assert rate_under(rows, half, "plain") == pytest.approx(0.75)
    mostly_hard = Preset(name="hard", mapping={"EIM": 0.2, "APDM": 0.8}, **base)
    assert rate_under(rows, mostly_hard, "plain") == pytest.approx(1 - 0.64)
    with_adm = Preset(name="adm", mapping={"EIM": 0.5, "ADM": 0.5}, **base)
    assert rate_under(rows, with_adm, "plain") is None
