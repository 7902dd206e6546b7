"""Plots of benchmark results and punching matrices (matplotlib).

Every function takes the data as a DataFrame (or rows), draws on ``ax`` when given (else on a new
figure), and returns the figure: a notebook shows it, a script saves it with ``fig.savefig``.
Quantities that start at zero (Mbit/s, loss) are drawn from zero, so a small difference never
looks like a large one; a rate cap is a dashed "target rate" line, never a bar or a point that
could be read as the link's capacity.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "Disagreements",
    "disagreements",
    "matrix_grid",
    "outcome_table",
    "plot_birthday_curve",
    "plot_loss",
    "plot_matrix",
    "plot_population",
    "plot_throughput",
]

_PROFILE_ORDER = ("open", "full", "restricted", "port-restricted", "symmetric", "leaky")
_OUTCOME_CODE = {"failed": 0.0, "error": 1.0, "direct": 2.0, "relayed": 3.0}
_RELAY_WORDS = (
    "relay",
    "relayed",
    "turn-udp",
    "turn-tcp",
)  # ``fallback`` values: the simulator's, the kernel lab's, TURN (issue 17)
# One colour per code of matrix_grid, and what it means (the heatmap's legend).
_OUTCOME_STYLE = (
    (0.0, "#d9534f", "failed: no direct path"),
    (1.0, "#aaaaaa", "error: the run broke"),
    (2.0, "#5cb85c", "direct: hole punched"),
    (3.0, "#f0ad4e", "failed → relay: chat over the rendezvous"),
)
_TARGET_STYLE = {"color": "#555555", "linestyle": "--", "linewidth": 1.2}


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot()


def _frame(data: Any) -> Any:
    import pandas as pd  # type: ignore[import-untyped]

    if isinstance(data, pd.DataFrame):
        return data
    rows = [
        dataclasses.asdict(r) if dataclasses.is_dataclass(r) and not isinstance(r, type) else r
        for r in data
    ]
    return pd.DataFrame(rows)


def _sender_rows(df: Any) -> Any:
    if "role" in df.columns and (df["role"] == "sender").any():
        df = df[df["role"] == "sender"]
    return df.sort_values("payload_size")


def _target_rates(df: Any, target_mbps: float | None) -> list[float]:
    """The rate caps the runs were asked for (0 or missing: as fast as possible, no cap)."""
    if target_mbps is not None:
        return [float(target_mbps)] if target_mbps > 0 else []
    if "rate_mbps" not in df.columns:
        return []
    rates = [float(r) for r in df["rate_mbps"] if isinstance(r, (int, float)) and r == r]
    return [r for r in rates if r > 0]


def plot_throughput(
    df: Any, ax: Any = None, *, title: str | None = None, target_mbps: float | None = None
) -> Any:
    """Sent and received Mbit/s against payload size, one point per run (sender rows of
    :func:`p2plab.results.results_to_dataframe`).

    The y axis starts at zero.  When the runs had a rate cap (``rate_mbps`` column, or
    ``target_mbps``), it is drawn as a dashed line labelled "target rate": what was asked for,
    not what the path can carry.
    """
    df = _sender_rows(_frame(df))
    fig, ax = _axes(ax, (6.0, 3.8))
    x = df["payload_size"]
    if "sent_mbps" in df.columns and "received_mbps" in df.columns:
        ax.plot(x, df["sent_mbps"], "o-", label="sent")
        ax.plot(x, df["received_mbps"], "s-", label="received (goodput)")
    else:
        ax.plot(x, df["mbps"], "o-", label="Mbit/s")
    rates = _target_rates(df, target_mbps)
    if rates and len(set(rates)) == 1:
        ax.axhline(rates[0], label="target rate", **_TARGET_STYLE)
    elif rates:  # a different cap per run: one step per point
        ax.plot(x, df["rate_mbps"], drawstyle="steps-mid", label="target rate", **_TARGET_STYLE)
    drawn = [float(v) for line in ax.get_lines() for v in line.get_ydata()]
    top = max([*rates, *(v for v in drawn if v == v)], default=0.0)
    ax.set_ylim(0, top * 1.12 or 1.0)  # from zero, with room above a target line
    ax.set_xscale("log")
    ax.set_xlabel("UDP payload size (bytes)")
    ax.set_ylabel("Mbit/s")
    ax.set_title(title or "Throughput by packet size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_loss(df: Any, ax: Any = None, *, title: str | None = None) -> Any:
    """Lost datagrams (percent of those sent, receiver's count) against payload size.

    The y axis starts at zero; when no run lost anything the axes say "no loss" instead of
    showing an empty band around zero.
    """
    df = _sender_rows(_frame(df))
    fig, ax = _axes(ax, (6.0, 3.8))
    positions = list(range(len(df)))
    loss = [float(v) if isinstance(v, (int, float)) and v == v else 0.0 for v in df["lost_percent"]]
    ax.bar(positions, loss, color="#d9534f")
    ax.set_xticks(positions, [str(s) for s in df["payload_size"]])
    ax.set_xlabel("UDP payload size (bytes)")
    ax.set_ylabel("lost (% of datagrams sent)")
    ax.set_title(title or "Loss by packet size")
    ax.grid(True, axis="y", alpha=0.3)
    if any(v > 0 for v in loss):
        ax.set_ylim(bottom=0)
    else:
        ax.set_ylim(0, 1)
        ax.text(
            0.5,
            0.5,
            "no loss",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=14,
            color="#555555",
        )
    fig.tight_layout()
    return fig


def _relayed(rec: dict[str, Any]) -> bool:
    """Direct punching failed and the pair fell back to the relay through the rendezvous."""
    outcome = str(rec.get("outcome"))
    fallback = rec.get("fallback")
    return outcome in _RELAY_WORDS or (outcome == "failed" and fallback in _RELAY_WORDS)


def matrix_grid(
    data: Any, profiles: Sequence[str] | None = None
) -> tuple[list[str], list[str], list[list[float]], list[list[str]]]:
    """``(row labels, column labels, codes, cell texts)`` of a punching matrix.

    ``data`` is the simulator's rows (:func:`p2plab.lab.sim.sim_matrix`, ordered pairs) or the
    kernel lab's (:class:`p2plab.lab.matrix.PairResult`, unordered pairs, mirrored here).  Codes:
    0 failed, 1 error, 2 direct, 3 failed but relayed (a ``fallback`` of ``relay``/``relayed``),
    NaN not run.  Texts: time to connect or the outcome, with ``!`` where the outcome disagrees
    with natlab.md's expectation (a relay fallback is still a failed punch).
    """
    df = _frame(data)
    seen = set(df["profile_a"]) | set(df["profile_b"])
    if profiles is None:
        profiles = [p for p in _PROFILE_ORDER if p in seen] + sorted(seen - set(_PROFILE_ORDER))
    profiles = list(profiles)
    idx = {p: i for i, p in enumerate(profiles)}
    same_lan = "same_lan" in df.columns and bool(df["same_lan"].astype(bool).any())
    n = len(profiles)
    rows = n + (1 if same_lan else 0)
    nan = float("nan")
    codes = [[nan] * n for _ in range(rows)]
    texts = [[""] * n for _ in range(rows)]
    explicit: set[tuple[int, int]] = set()
    time_col = "connect_s" if "connect_s" in df.columns else "connect_time_s"
    for rec in df.to_dict("records"):
        pa, pb = rec["profile_a"], rec["profile_b"]
        if pa not in idx or pb not in idx:
            continue
        relayed = _relayed(rec)
        outcome = "failed" if relayed else str(rec["outcome"])
        t = rec.get(time_col)
        if relayed:
            label = "failed\n→ relay"
        else:
            label = f"{t:.2f}s" if isinstance(t, (int, float)) and t == t else outcome
        expected = rec.get("expected")
        if expected in ("direct", "failed") and outcome != expected:
            label += " !"
        code = _OUTCOME_CODE["relayed"] if relayed else _OUTCOME_CODE.get(outcome, 1.0)
        if rec.get("same_lan"):
            cells = [(n, idx[pa])]
        else:
            cells = [(idx[pa], idx[pb])]
            mirror = (idx[pb], idx[pa])
            if mirror not in explicit:
                cells.append(mirror)
        for y, x in cells:
            codes[y][x], texts[y][x] = code, label
        explicit.add(cells[0])
    labels = profiles + (["same LAN"] if same_lan else [])
    return labels, list(profiles), codes, texts


def plot_matrix(
    data: Any,
    ax: Any = None,
    *,
    profiles: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """The punching matrix as a heatmap: rows site A (controlling), columns site B.

    A legend beside it says what each colour means (green direct, orange failed but relayed
    through the rendezvous, red failed, grey error, blank not run) and what a cell's text is:
    the time to connect, ``!`` where natlab.md predicts another outcome.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    ylabels, xlabels, codes, texts = matrix_grid(data, profiles)
    fig, ax = _axes(ax, (0.9 * len(xlabels) + 5.5, 0.8 * len(ylabels) + 1.8))
    colours = [c for _, c, _ in _OUTCOME_STYLE]
    bounds = [code - 0.5 for code, _, _ in _OUTCOME_STYLE] + [len(_OUTCOME_STYLE) - 0.5]
    ax.imshow(codes, cmap=ListedColormap(colours), norm=BoundaryNorm(bounds, len(colours)))
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.set_xlabel("site B profile (same-LAN row: the shared NAT)")
    ax.set_ylabel("site A profile (controlling)")
    for y, row in enumerate(texts):
        for x, text in enumerate(row):
            if text:
                ax.text(x, y, text, ha="center", va="center", fontsize=8)
    present = {c for row in codes for c in row if not math.isnan(c)}
    handles = [
        Patch(facecolor=colour, edgecolor="#444444", label=meaning)
        for code, colour, meaning in _OUTCOME_STYLE
        if code in present or code in (0.0, 2.0)
    ]
    if any(math.isnan(c) for row in codes for c in row):
        handles.append(Patch(facecolor="white", edgecolor="#444444", label="blank: not run"))
    ax.legend(
        handles=handles,
        title="colour: outcome of the pair",
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
        title_fontsize=8,
        alignment="left",
    )
    ax.text(
        1.02,
        0.0,
        "cell text: seconds to connect\n!  natlab.md predicts the\n   other outcome",
        transform=ax.transAxes,
        ha="left",
        va="bottom",
        fontsize=8,
    )
    ax.set_title(title or "UDP hole punching between NAT profiles")
    fig.tight_layout()
    return fig


def outcome_table(data: Any, profiles: Iterable[str] | None = None) -> Any:
    """The matrix as a DataFrame of outcomes (rows A, columns B) for a quick look or a diff."""
    import pandas as pd

    ylabels, xlabels, codes, _ = matrix_grid(data, list(profiles) if profiles else None)
    names = {0.0: "failed", 1.0: "error", 2.0: "direct", 3.0: "failed → relay"}
    cells = [[names.get(c, "") for c in row] for row in codes]
    return pd.DataFrame(cells, index=ylabels, columns=xlabels)


_DISAGREE_COLUMNS = ("profile_a", "profile_b", "same_lan", "outcome", "expected", "fallback")


@dataclasses.dataclass(frozen=True)
class Disagreements:
    """The pairs whose outcome is not the one natlab.md predicts; a notebook shows a sentence
    when there are none instead of an empty table."""

    frame: Any
    """The disagreeing rows (a DataFrame with the matrix's identifying columns)."""
    checked: int
    """Pairs that natlab.md has an expectation for (the others cannot disagree)."""

    @property
    def empty(self) -> bool:
        """True when every checked pair ended as predicted."""
        return bool(self.frame.empty)

    def __len__(self) -> int:
        return len(self.frame)

    def sentence(self) -> str:
        """One line saying how many pairs disagree, out of how many were checked."""
        if self.empty:
            return (
                f"No disagreements: all {self.checked} pairs that natlab.md predicts "
                "ended as predicted."
            )
        n = len(self.frame)
        return f"{n} of {self.checked} pairs disagree with natlab.md:"

    def __str__(self) -> str:
        if self.empty:
            return self.sentence()
        return f"{self.sentence()}\n{self.frame.to_string(index=False)}"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        import html

        if self.empty:
            return f"<p>{html.escape(self.sentence())}</p>"
        return f"<p>{html.escape(self.sentence())}</p>{self.frame.to_html(index=False)}"


def disagreements(data: Any) -> Disagreements:
    """The matrix rows whose outcome is not natlab.md's ``expected`` (``direct`` or ``failed``).

    A relay fallback is a failed punch here.  Shown in a notebook it is one sentence when all
    pairs agree, else that sentence and the rows.
    """
    df = _frame(data)
    checked = df[df["expected"].isin(["direct", "failed"])] if "expected" in df.columns else df[:0]
    punched = [
        "failed" if _relayed(rec) else str(rec["outcome"]) for rec in checked.to_dict("records")
    ]
    bad = checked[[p != e for p, e in zip(punched, checked["expected"], strict=True)]]
    cols = [c for c in _DISAGREE_COLUMNS if c in bad.columns]
    return Disagreements(frame=bad[cols].reset_index(drop=True), checked=len(checked))


def plot_birthday_curve(data: Any, ax: Any = None, *, title: str | None = None) -> Any:
    """Birthday punching's success rate against the number of probes, one colour per ``k`` (open
    mappings): the measured points (:func:`p2plab.lab.sim.birthday_curve.curve_rows`) and the
    formula ``1 - (1 - k/P)**n`` as a line, the largest deviation in the legend."""
    df = _frame(data)
    fig, ax = _axes(ax, (7.0, 4.2))
    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")
    for i, (k, group) in enumerate(df.groupby("k", sort=True)):
        group = group.sort_values("n")
        colour = colours[i % len(colours)]
        worst = float(group["deviation_pp"].abs().max())
        trials = int(group["trials"].iloc[0])
        ax.plot(group["n"], 100 * group["formula"], color=colour, linewidth=1.5)
        ax.plot(
            group["n"],
            100 * group["measured"],
            "o",
            color=colour,
            markersize=3.5,
            label=f"k = {k}: {trials} trials/point, max |dev| {worst:.2f} pp",
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.set_xlabel("probes n (random ports of the hard side's IP)")
    ax.set_ylabel("success (%)")
    ax.set_title(title or "Birthday punching: measured (points) vs 1 - (1 - k/P)^n (lines)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_population(
    summary: Any,
    references: dict[str, tuple[float, float | None]] | None = None,
    ax: Any = None,
    *,
    title: str | None = None,
) -> Any:
    """A population study's success rate per stage (each adds a method) with its 95% interval,
    next to published rates drawn as horizontal lines (a band for a +- range):
    :func:`p2plab.lab.sim.population.summarize` output and
    :data:`p2plab.lab.sim.presets.FIELD`."""
    df = _frame(summary)
    fig, ax = _axes(ax, (7.5, 4.2))
    x = list(range(len(df)))
    rates = [100 * float(r) for r in df["rate"]]
    # max(0, ...): the Wilson bounds can round past the rate at 0% or 100%
    below = [max(0.0, 100 * (r - lo)) for r, lo in zip(df["rate"], df["low"], strict=True)]
    above = [max(0.0, 100 * (hi - r)) for r, hi in zip(df["rate"], df["high"], strict=True)]
    ax.bar(x, rates, color="#5b8fd9", yerr=[below, above], capsize=4, label="predicted (95% CI)")
    for i, r in zip(x, rates, strict=True):
        ax.annotate(
            f"{r:.1f}%",
            (i, r),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 6),
            textcoords="offset points",
        )
    colours = ("#d62728", "#2ca02c", "#9467bd", "#8c564b")
    for i, (name, (rate, half)) in enumerate((references or {}).items()):
        colour = colours[i % len(colours)]
        ax.axhline(100 * rate, color=colour, linestyle="--", linewidth=1.2, label=name)
        if half:
            ax.axhspan(100 * (rate - half), 100 * (rate + half), color=colour, alpha=0.12)
    labels = ["plain" if s == "plain" else f"+ {s}" for s in df["stage"]]
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 105)
    ax.set_ylabel("pairs connected (%)")
    ax.set_title(title or "Predicted success, adding one method at a time")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
