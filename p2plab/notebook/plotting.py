"""Plots of benchmark results and punching matrices (matplotlib).

Every function takes the data as a DataFrame (or rows), draws on ``ax`` when given (else on a new
figure), and returns the figure: a notebook shows it, a script saves it with ``fig.savefig``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["matrix_grid", "outcome_table", "plot_loss", "plot_matrix", "plot_throughput"]

_PROFILE_ORDER = ("open", "full", "restricted", "port-restricted", "symmetric", "leaky")
_OUTCOME_CODE = {"failed": 0.0, "error": 1.0, "direct": 2.0}


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


def plot_throughput(df: Any, ax: Any = None, *, title: str | None = None) -> Any:
    """Sent and received Mbit/s against payload size, one point per run (sender rows of
    :func:`p2plab.results.results_to_dataframe`)."""
    df = _sender_rows(_frame(df))
    fig, ax = _axes(ax, (6.0, 3.8))
    x = df["payload_size"]
    if "sent_mbps" in df.columns and "received_mbps" in df.columns:
        ax.plot(x, df["sent_mbps"], "o-", label="sent")
        ax.plot(x, df["received_mbps"], "s-", label="received (goodput)")
        ax.legend()
    else:
        ax.plot(x, df["mbps"], "o-", label="Mbit/s")
    ax.set_xscale("log")
    ax.set_xlabel("UDP payload size (bytes)")
    ax.set_ylabel("Mbit/s")
    ax.set_title(title or "Throughput by packet size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_loss(df: Any, ax: Any = None, *, title: str | None = None) -> Any:
    """Lost datagrams (percent, receiver's count) against payload size."""
    df = _sender_rows(_frame(df))
    fig, ax = _axes(ax, (6.0, 3.8))
    positions = list(range(len(df)))
    ax.bar(positions, df["lost_percent"], color="#d9534f")
    ax.set_xticks(positions, [str(s) for s in df["payload_size"]])
    ax.set_xlabel("UDP payload size (bytes)")
    ax.set_ylabel("lost (%)")
    ax.set_title(title or "Loss by packet size")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def matrix_grid(
    data: Any, profiles: Sequence[str] | None = None
) -> tuple[list[str], list[str], list[list[float]], list[list[str]]]:
    """``(row labels, column labels, codes, cell texts)`` of a punching matrix.

    ``data`` is the simulator's rows (:func:`p2plab.lab.sim.sim_matrix`, ordered pairs) or the
    kernel lab's (:class:`p2plab.lab.matrix.PairResult`, unordered pairs, mirrored here).  Codes:
    0 failed, 1 error, 2 direct, NaN not run.  Texts: time to connect or the outcome, with ``!``
    where the outcome disagrees with natlab.md's expectation.
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
        outcome = str(rec["outcome"])
        t = rec.get(time_col)
        label = f"{t:.2f}s" if isinstance(t, (int, float)) and t == t else outcome
        expected = rec.get("expected")
        if expected in ("direct", "failed") and outcome != expected:
            label += " !"
        code = _OUTCOME_CODE.get(outcome, 1.0)
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
    """The punching matrix as a heatmap: rows site A (controlling), columns site B; green
    direct, red failed, grey error; each cell shows the time to connect."""
    from matplotlib.colors import ListedColormap

    ylabels, xlabels, codes, texts = matrix_grid(data, profiles)
    fig, ax = _axes(ax, (1.3 * len(xlabels) + 2.5, 0.8 * len(ylabels) + 1.8))
    ax.imshow(codes, cmap=ListedColormap(["#d9534f", "#aaaaaa", "#5cb85c"]), vmin=0, vmax=2)
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.set_xlabel("site B profile (same-LAN row: the shared NAT)")
    ax.set_ylabel("site A profile")
    for y, row in enumerate(texts):
        for x, text in enumerate(row):
            if text:
                ax.text(x, y, text, ha="center", va="center", fontsize=8)
    ax.set_title(title or "UDP hole punching (green direct, red failed)")
    fig.tight_layout()
    return fig


def outcome_table(data: Any, profiles: Iterable[str] | None = None) -> Any:
    """The matrix as a DataFrame of outcomes (rows A, columns B) for a quick look or a diff."""
    import pandas as pd

    ylabels, xlabels, codes, _ = matrix_grid(data, list(profiles) if profiles else None)
    names = {0.0: "failed", 1.0: "error", 2.0: "direct"}
    cells = [[names.get(c, "") for c in row] for row in codes]
    return pd.DataFrame(cells, index=ylabels, columns=xlabels)
