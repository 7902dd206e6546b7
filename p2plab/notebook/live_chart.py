"""A small live throughput chart (an ipywidgets ``Image``) fed by ``benchmark_progress`` messages.

The chart shows one run at a time, told apart by ``run_id`` (progress arrives late and out of
order, so points are sorted by elapsed time, never taken as a new run).  Redraws are throttled:
a matplotlib PNG per message would hold the notebook's event loop during a fast run.

The PNG is drawn in a thread (one drawing at a time), never on the event loop: the workers of a
notebook run on that loop, and matplotlib's first import and drawing take seconds on a loaded
machine.  A chart drawn on the loop once held a benchmark's two local workers for 14 s, past the
10 s the driving end waits for the receiver's report: the run ended "no report" although the
report was already on its way.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import threading
import time
from typing import Any

__all__ = ["LiveChart"]

log = logging.getLogger(__name__)

_DRAWING = threading.Lock()  # matplotlib draws one figure at a time in a process

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
        self._drawing: asyncio.Task[None] | None = None
        # What came while a drawing was under way: None, "soon" (points: a throttled redraw
        # after it) or "now" (the run ended: its last points drawn right after it).
        self._next: str | None = None

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
        if self._drawing is not None:
            self._next = self._next or "soon"  # throttled from the end of the one under way
            return
        wait = self._last_draw + self.min_interval - time.monotonic()
        if wait <= 0:
            self.draw()
        elif self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(wait, self.draw)

    def draw(self) -> None:
        """Draw the current run now (in a thread: :meth:`idle` waits for it)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._drawing is not None:
            self._next = "now"
            return
        points = {role: sorted(pts) for role, pts in self.points.items()}
        self._drawing = asyncio.get_running_loop().create_task(self._draw(self.run_id, points))

    async def _draw(self, run_id: str | None, points: dict[str, list[tuple[float, float]]]) -> None:
        try:
            png: bytes | None = await asyncio.to_thread(_png, run_id, points)
        except Exception:  # a display glitch must not stop the chart
            log.exception("live chart: cannot draw run %s", run_id)
            png = None
        finally:
            if self._drawing is asyncio.current_task():  # not closed meanwhile
                self._drawing = None
            self._last_draw = time.monotonic()
        if png is not None:
            self.image.value = png
            self.image.layout.display = ""
            self.draws += 1
        after, self._next = self._next, None
        if after == "now":
            self.draw()
        elif after == "soon":
            self._schedule()

    async def idle(self) -> None:
        """Wait until no drawing is under way (nor one asked for right after it); a throttled
        redraw waits on its timer, not here."""
        while self._drawing is not None:
            await asyncio.wait([self._drawing])

    def close(self) -> None:
        """Cancel a pending redraw (a drawing under way ends in its thread, unshown)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._next = None
        if self._drawing is not None:
            self._drawing.cancel()
            self._drawing = None


def _png(run_id: str | None, points: dict[str, list[tuple[float, float]]]) -> bytes:
    """The chart as PNG bytes (runs in a thread: a figure of its own, no pyplot state; one
    drawing at a time in the process, as matplotlib is not thread-safe)."""
    with _DRAWING:
        return _png_locked(run_id, points)


def _png_locked(run_id: str | None, points: dict[str, list[tuple[float, float]]]) -> bytes:
    from matplotlib.figure import Figure  # seconds on first use: never on the event loop

    fig = Figure(figsize=(5.0, 2.2), dpi=80)
    ax = fig.add_subplot()
    for role, label, colour in _ROLES:
        pts = points[role]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, color=colour)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)  # throughput starts at zero; a cap is not a capacity
    ax.set_xlabel("seconds")
    ax.set_ylabel("Mbit/s")
    ax.set_title(f"run {run_id}", fontsize=9)
    if any(points.values()):
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _number(x: object) -> float | None:
    """``x`` as a finite float, or None (a message's fields are not trusted)."""
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None
