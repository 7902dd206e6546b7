"""The notebook plots tell the truth: axes from zero, a rate cap drawn as a target line, a
"no loss" plot that says so, heatmaps with a legend and the relay fallback, and a sentence
instead of an empty table when nothing disagrees.  Checked on the matplotlib Figure itself."""

from __future__ import annotations

import math

import pandas as pd

from p2plab.lab.sim import sim_matrix
from p2plab.notebook import (
    disagreements,
    matrix_grid,
    outcome_table,
    plot_birthday_curve,
    plot_loss,
    plot_matrix,
    plot_throughput,
)


def _sweep(lost: list[float], rate: float = 200.0) -> pd.DataFrame:
    n = len(lost)
    return pd.DataFrame(
        {
            "role": ["sender"] * n,
            "payload_size": [64, 1200, 8000][:n],
            "sent_mbps": [156.0, 199.9, 199.8][:n],
            "received_mbps": [150.0, 198.0, 199.0][:n],
            "lost_percent": lost,
            "rate_mbps": [rate] * n,
        }
    )


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_throughput_starts_at_zero_and_draws_the_rate_cap_as_a_target_line() -> None:
    fig = plot_throughput(_sweep([0.0, 0.0, 0.0]))
    (ax,) = fig.axes
    assert ax.get_ylim()[0] == 0
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"sent", "received (goodput)", "target rate"}
    target = lines["target rate"]
    assert set(target.get_ydata()) == {200.0}
    assert target.get_linestyle() == "--"  # a line, never a bar one could read as capacity
    legend = ax.get_legend()
    assert legend is not None
    assert "target rate" in [t.get_text() for t in legend.get_texts()]


def test_throughput_without_a_cap_has_no_target_line() -> None:
    fig = plot_throughput(_sweep([0.0, 0.0], rate=0.0))
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "target rate" not in labels
    assert fig.axes[0].get_ylim()[0] == 0
    # an explicit target wins over the column
    fig = plot_throughput(_sweep([0.0, 0.0], rate=0.0), target_mbps=50)
    (target,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "target rate"]
    assert set(target.get_ydata()) == {50.0}


def test_loss_plot_says_no_loss_instead_of_empty_axes() -> None:
    fig = plot_loss(_sweep([0.0, 0.0, 0.0]))
    (ax,) = fig.axes
    assert "no loss" in _texts(ax)
    low, high = ax.get_ylim()
    assert low == 0 and high > 0  # not -0.04 .. 0.04


def test_loss_plot_with_loss_starts_at_zero_and_has_no_no_loss_text() -> None:
    fig = plot_loss(_sweep([0.5, 0.0, 2.0]))
    (ax,) = fig.axes
    assert "no loss" not in _texts(ax)
    assert ax.get_ylim()[0] == 0
    assert [p.get_height() for p in ax.patches] == [0.5, 0.0, 2.0]


def _legend_texts(fig) -> list[str]:
    legend = fig.axes[0].get_legend()
    assert legend is not None, "the heatmap has no legend"
    return [t.get_text() for t in legend.get_texts()]


def test_heatmap_has_a_legend_and_explains_its_cells() -> None:
    fig = plot_matrix(sim_matrix(["open", "symmetric"], same_lan=(), relay=False))
    texts = _legend_texts(fig)
    assert any(t.startswith("direct") for t in texts)
    assert any(t.startswith("failed") for t in texts)
    assert not any("relay" in t for t in texts)  # none relayed here: no such entry
    explained = " ".join(_texts(fig.axes[0]))
    assert "to connect" in explained and "natlab.md" in explained
    # With the relay on (the default), symmetric x symmetric falls back: the legend says so.
    relayed = _legend_texts(plot_matrix(sim_matrix(["open", "symmetric"], same_lan=())))
    assert any("relay" in t for t in relayed)


KERNEL_ROWS = [
    {"profile_a": "open", "profile_b": "symmetric", "same_lan": False, "outcome": "direct",
     "expected": "direct", "connect_s": 0.4, "fallback": ""},
    {"profile_a": "symmetric", "profile_b": "symmetric", "same_lan": False, "outcome": "failed",
     "expected": "failed", "connect_s": None, "fallback": "relayed"},
]  # fmt: skip


def test_heatmap_shows_the_kernel_labs_relay_fallback() -> None:
    labels, columns, codes, texts = matrix_grid(KERNEL_ROWS)
    assert labels == columns == ["open", "symmetric"]
    assert codes[1][1] == 3.0 and texts[1][1].startswith("failed\n→ relay")
    assert "!" not in texts[1][1]  # a relay fallback is the failed punch natlab.md predicts
    assert codes[0][1] == codes[1][0] == 2.0
    assert math.isnan(codes[0][0])
    fig = plot_matrix(KERNEL_ROWS)
    legend = _legend_texts(fig)
    assert any("relay" in t for t in legend)
    assert any("not run" in t for t in legend)  # the blank open x open cell
    assert "failed\n→ relay" in _texts(fig.axes[0])
    assert outcome_table(KERNEL_ROWS).loc["symmetric", "symmetric"] == "failed → relay"


def test_heatmap_shows_the_simulators_relay_fallback() -> None:
    rows = [{**r, "fallback": "relay" if r["fallback"] else ""} for r in KERNEL_ROWS]
    _, _, codes, texts = matrix_grid(rows)
    assert codes[1][1] == 3.0 and texts[1][1] == "failed\n→ relay"


def test_no_disagreements_is_a_sentence_not_an_empty_table() -> None:
    rows = sim_matrix(["open", "port-restricted", "symmetric"], seed=3)
    found = disagreements(rows)
    assert found.empty and len(found) == 0
    checked = sum(1 for r in rows if r["expected"] in ("direct", "failed"))
    assert found.checked == checked > 0
    assert str(found) == (
        f"No disagreements: all {checked} pairs that natlab.md predicts ended as predicted."
    )
    assert found._repr_html_().startswith("<p>No disagreements") and "<table" not in (
        found._repr_html_()
    )


def test_disagreements_lists_the_pairs_that_disagree() -> None:
    rows = [
        *KERNEL_ROWS,
        {"profile_a": "full", "profile_b": "symmetric", "same_lan": False, "outcome": "failed",
         "expected": "direct", "connect_s": None, "fallback": ""},
        {"profile_a": "leaky", "profile_b": "leaky", "same_lan": False, "outcome": "failed",
         "expected": None, "connect_s": None, "fallback": ""},
    ]  # fmt: skip
    found = disagreements(rows)
    assert not found.empty and found.checked == 3
    assert found.frame.to_dict("records") == [
        {"profile_a": "full", "profile_b": "symmetric", "same_lan": False, "outcome": "failed",
         "expected": "direct", "fallback": ""},
    ]  # fmt: skip
    assert str(found).startswith("1 of 3 pairs disagree with natlab.md:")
    assert "<table" in found._repr_html_()


def test_birthday_curve_draws_the_formula_as_lines_and_the_measurements_as_points() -> None:
    rows = [
        {"k": k, "n": n, "trials": 2000, "measured": m, "formula": f, "deviation_pp": 100 * (m - f)}
        for k, pts in ((64, [(100, 0.10, 0.094), (1000, 0.62, 0.63)]), (256, [(100, 0.34, 0.33)]))
        for n, m, f in pts
    ]
    fig = plot_birthday_curve(rows)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_linestyle() != "None"]
    points = [ln for ln in ax.get_lines() if ln.get_linestyle() == "None"]
    assert len(lines) == len(points) == 2  # one formula line and one set of points per k
    assert list(points[0].get_ydata()) == [10.0, 62.0]  # percent, as measured
    assert list(lines[0].get_ydata()) == [9.4, 63.0]
    assert ax.get_ylim() == (0.0, 100.0)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "k = 64: 2000 trials/point, max |dev| 1.00 pp"
    assert legend[1].startswith("k = 256:")
