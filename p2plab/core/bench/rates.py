"""Rates of a throughput run: the window goodput is measured over, and the target shortfall.

Why a common window.  The sender's rate is ``bytes sent / its send window`` (its clock, from just
before the first send to just after the last, including the pacing slot of the last datagram);
the receiver's own span is first to last arrival, which counts N datagrams over N-1 gaps and
misses the spread of the first and last batch.  On a lossless paced run the receiver's span is
thus a little shorter than the sender's window for the same bytes, and goodput over it came out
above the sending rate (50.01 against 49.87 Mbit/s).  Goodput is therefore taken over the longer
of the two windows: never above the sending rate when nothing extra arrived (received bytes <=
sent bytes), and still lower than it when the receiver drains its socket more slowly than the
sender filled it.

Why a flag.  A paced sender that cannot keep up (small datagrams, slow host) sends less than the
target rate asked; :func:`short_of_target` says so, so a table never shows such a run as if it had
met its target.
"""

from __future__ import annotations

__all__ = ["SHORT_OF_TARGET", "goodput_window_s", "mbps", "short_of_target"]

SHORT_OF_TARGET = 0.95
"""A run whose sending rate is below this fraction of its (non-zero) target rate fell short."""


def mbps(nbytes: int, seconds: float) -> float:
    """Megabits per second of ``nbytes`` over ``seconds`` (0 for an empty window)."""
    return nbytes * 8 / seconds / 1e6 if seconds > 0 else 0.0


def goodput_window_s(arrival_span_s: float, send_window_s: float | None) -> float:
    """Seconds goodput is measured over: the longer of the receiver's first-to-last arrival and
    the sender's send window (the arrival span alone when the sender's window is unknown)."""
    if send_window_s is None or not send_window_s > 0:
        return arrival_span_s
    return max(arrival_span_s, send_window_s)


def short_of_target(sent_mbps: float, target_mbps: float) -> bool:
    """True if a run with a target rate (> 0) sent less than :data:`SHORT_OF_TARGET` of it."""
    return target_mbps > 0 and sent_mbps < SHORT_OF_TARGET * target_mbps
