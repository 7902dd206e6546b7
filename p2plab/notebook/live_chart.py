"""A small live throughput chart (an ipywidgets ``Image``) fed by ``benchmark_progress`` messages.

The chart shows one run at a time, told apart by ``run_id`` (progress arrives late and out of
order, so points are sorted by elapsed time, never taken as a new run).  Redraws are throttled:
a matplotlib PNG per message would hold the notebook's event loop during a fast run.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from typing import Any

__all__ = ["LiveChart"]

_ROLES = (("sender", "sent", "#1f77b4"), ("receiver", "received", "#ff7f0e"))


class LiveChart:
    """Throughput of the current run over time, sent and received, redrawn at most every
    ``min_interval`` seconds (the last points are always drawn, a little later)."""

    def __init__(self, *, min_interval: float = 0.5) -> None:
        import ipywidgets as w  # type: ignore[import-untyped]

        self.image = w.Image(format="png", layout=w.Layout(width="420px", display="none"))
        """The widget showing the chart (hidden until the first point)."""
        self.run_id: str | None = None
        """The run drawn."""
        self.points: dict[str, list[tuple[float, float]]] = {"sender": [], "receiver": []}
        """``(elapsed_s, mbps)`` per role for :attr:`run_id`."""
        self.draws = 0
        """How many times the chart was drawn (for tests and for the throttle)."""
        self.min_interval = min_interval
        self._last_draw = -math.inf
        self._pending: asyncio.TimerHandle | None = None

    def add(self, msg: dict[str, Any]) -> None:
        """Take one ``benchmark_progress`` message; a new ``run_id`` starts a new chart."""
        role = msg.get("role")
        elapsed, mbps = _number(msg.get("elapsed_s")), _number(msg.get("mbps"))
        if role not in self.points or elapsed is None or mbps is None:
            return
        run_id = str(msg.get("run_id"))
        if run_id != self.run_id:
            self.run_id = run_id
            self.points = {"sender": [], "receiver": []}
        self.points[str(role)].append((elapsed, mbps))
        self._schedule()

    def finish(self, run_id: str) -> None:
        """The run ended: draw its last points now."""
        if run_id == self.run_id:
            self.draw()

    def _schedule(self) -> None:
        wait = self._last_draw + self.min_interval - time.monotonic()
        if wait <= 0:
            self.draw()
        elif self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(wait, self.draw)

    def draw(self) -> None:
        """Draw the current run now."""
        from matplotlib.figure import Figure

        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._last_draw = time.monotonic()
        fig = Figure(figsize=(5.0, 2.2), dpi=80)
        ax = fig.add_subplot()
        for role, label, colour in _ROLES:
            pts = sorted(self.points[role])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, color=colour)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)  # throughput starts at zero; a cap is not a capacity
        ax.set_xlabel("seconds")
        ax.set_ylabel("Mbit/s")
        ax.set_title(f"run {self.run_id}", fontsize=9)
        if any(self.points.values()):
            ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.image.value = buf.getvalue()
        self.image.layout.display = ""
        self.draws += 1

    def close(self) -> None:
        """Cancel a pending redraw."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


def _number(x: object) -> float | None:
    """``x`` as a finite float, or None (a message's fields are not trusted)."""
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None
