"""Benchmark results: :class:`BenchResult` rows, :class:`RttResult`, DataFrames, CSV and JSON.

Column contract (contracts.md, "Benchmark result records"): one row per run with the fields of the
``benchmark_result`` UI message plus ``run_id``, ``started_at`` (ISO 8601), ``local_worker``,
``peer_worker`` and ``path``; :data:`CSV_COLUMNS` come first, in that order, then extras.  Interval
rows carry :data:`INTERVAL_COLUMNS`.  pandas is imported only by the DataFrame helpers.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from p2plab.core.bench import IntervalRecord

__all__ = [
    "CSV_COLUMNS",
    "INTERVAL_COLUMNS",
    "RESULT_FIELDS",
    "BenchResult",
    "RttResult",
    "intervals_to_dataframe",
    "results_to_dataframe",
    "results_to_json",
    "write_csv",
    "write_intervals_csv",
]

RESULT_FIELDS = (
    "role",
    "payload_size",
    "duration_s",
    "packets_sent",
    "packets_received",
    "lost",
    "lost_percent",
    "out_of_order",
    "duplicates",
    "jitter_ms",
    "mbps",
    "rtt_ms",
)
"""Fields of the ``benchmark_result`` UI message (contracts.md), in order."""

CSV_COLUMNS = ("run_id", "started_at", "local_worker", "peer_worker", "path", *RESULT_FIELDS)
"""The documented run columns, first in every CSV and DataFrame (the UI's CSV has this order)."""

INTERVAL_COLUMNS = ("run_id", "t_start", "t_end", "bytes", "packets", "mbps", "lost", "jitter_ms")
"""The documented interval columns."""


@dataclass(frozen=True)
class BenchResult:
    """One run seen from one role.  ``mbps`` is what that role measured: the sender's sending
    rate, or the receiver's goodput; loss, reordering, duplicates and jitter are always the
    receiver's counts (the receiver's report travels back to the sender over the link)."""

    role: str
    """``sender`` or ``receiver``: whose view this row is."""
    payload_size: int
    """UDP payload bytes per datagram (benchmark header included, as iperf3's ``-l``)."""
    duration_s: float
    """Sender: its send window (just before the first send to just after the last); receiver:
    first to last arrival."""
    packets_sent: int
    """Datagrams the sender sent."""
    packets_received: int
    """Unique datagrams the receiver got."""
    lost: int
    """``packets_sent - packets_received`` (exact, from sequence numbers)."""
    lost_percent: float
    """``100 * lost / packets_sent``."""
    out_of_order: int
    """Datagrams that arrived after one with a higher sequence number."""
    duplicates: int
    """Datagrams that arrived more than once (extra copies)."""
    jitter_ms: float
    """RFC 3550 section 6.4.1 interarrival jitter at the end of the run, milliseconds."""
    mbps: float
    """Sender: payload megabits per second sent; receiver: goodput received (over the longer of
    its arrival span and the sender's send window, so never above the sending rate)."""
    rtt_ms: float | None
    """The peer link's smoothed RTT at the end of the run (keep-alive based), milliseconds."""
    run_id: str
    """Identifier of the run (same on both ends)."""
    started_at: str
    """When the run started, ISO 8601 UTC."""
    local_worker: str
    """Worker id of the side that produced this row."""
    peer_worker: str
    """Worker id of the other side."""
    path: str | None
    """``direct`` or ``relayed`` (the link's path when the run started)."""
    rate_mbps: float = 0.0
    """Target sending rate (0: as fast as possible)."""
    bytes_received: int = 0
    """Payload bytes the receiver got."""
    sent_mbps: float = 0.0
    """The sender's sending rate (same as ``mbps`` on the sender's row)."""
    received_mbps: float = 0.0
    """The receiver's goodput (same as ``mbps`` on the receiver's row): bytes received over the
    longer of the first-to-last arrival and the sender's send window, so at most ``sent_mbps``
    when nothing extra arrived."""
    gso: bool = False
    """The sender used UDP GSO (UDP_SEGMENT)."""
    gro: bool = False
    """The receiver's socket had UDP GRO on."""
    fragmented: bool = False
    """Datagrams were larger than the path MTU estimate (1472 bytes of UDP payload over IPv4)."""
    encrypted: bool = False
    """The benchmark datagrams were sealed (ChaCha20-Poly1305 with the link's session keys);
    False only for the explicit unencrypted mode (``encrypt=False`` / ``--no-encrypt``) or a
    link without encryption."""
    auth_failures: int = 0
    """Benchmark datagrams the receiver dropped because they did not open (forged, corrupted or
    replayed); never counted as received."""
    flow_control: bool = False
    """The sender obeyed the receiver's credit (feedback) so as not to overrun its socket."""
    short_of_target: bool = False
    """The run had a target rate and sent less than 95 % of it
    (:func:`p2plab.core.bench.short_of_target`); the note says how much it sent."""
    note: str = ""
    """Free text: warnings (fragmentation, shortfall, early stop, missing report)."""
    intervals: tuple[IntervalRecord, ...] = field(default=(), compare=False)
    """The receiver's interval records."""
    peer_view: BenchResult | None = field(default=None, compare=False)
    """The same run seen from the other role (both ends hold both views)."""

    # Microseconds read better than milliseconds at loopback and LAN jitter (a few us); the
    # column keeps the _ms unit of the CSV contract.
    @property
    def jitter_us(self) -> float:
        """RFC 3550 jitter at the end of the run, microseconds."""
        return self.jitter_ms * 1000.0

    def to_dict(self, *, intervals: bool = False) -> dict[str, Any]:
        """A flat dict: the ``benchmark_result`` fields and the run columns, then extras."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("intervals", "peer_view"):
                continue
            out[f.name] = getattr(self, f.name)
        if intervals:
            out["intervals"] = [r.to_dict() for r in self.intervals]
        return out

    def to_message(self) -> dict[str, Any]:
        """The ``benchmark_result`` UI message (contracts.md) with the run columns as extras."""
        return {"type": "benchmark_result", **self.to_dict()}

    def views(self) -> tuple[BenchResult, ...]:
        """This row and the peer's view, sender first."""
        both = (self,) if self.peer_view is None else (self, self.peer_view)
        return tuple(sorted(both, key=lambda r: r.role != "sender"))

    def without_peer(self) -> BenchResult:
        """A copy without ``peer_view`` (for storing both views flat)."""
        return replace(self, peer_view=None)


@dataclass(frozen=True)
class RttResult:
    """A ping-pong run: one datagram out, its echo back, ``count`` times."""

    count: int
    """Pings sent."""
    received: int
    """Pongs received."""
    lost: int
    """Pings without a pong within the timeout."""
    payload_size: int
    """UDP payload bytes per ping."""
    min_ms: float
    """Smallest RTT."""
    mean_ms: float
    """Mean RTT."""
    p50_ms: float
    """Median RTT (nearest rank)."""
    p90_ms: float
    """90th percentile."""
    p99_ms: float
    """99th percentile."""
    max_ms: float
    """Largest RTT."""
    run_id: str = ""
    """Identifier of the run."""
    started_at: str = ""
    """ISO 8601 UTC."""
    local_worker: str = ""
    """Worker that sent the pings."""
    peer_worker: str = ""
    """Worker that echoed them."""
    encrypted: bool = False
    """Pings and pongs were sealed with the link's session keys."""
    auth_failures: int = 0
    """Pongs dropped because they did not open."""
    wait: str = "blocking"
    """How the two ends waited for each datagram: ``busy-poll`` (both read without sleeping,
    see ``busy_poll_us``), ``blocking`` (both slept on the socket) or ``event-loop``."""
    busy_poll_us: float = 0.0
    """Microseconds each end spun after a datagram before sleeping (0: it slept at once)."""
    samples_ms: tuple[float, ...] = field(default=(), compare=False, repr=False)
    """Every RTT sample, milliseconds, in order."""

    # Microseconds read better than milliseconds at loopback and LAN latencies (tens of us);
    # the columns keep the _ms unit of the CSV contract.
    @property
    def p50_us(self) -> float:
        """Median RTT in microseconds."""
        return self.p50_ms * 1000.0

    @property
    def p90_us(self) -> float:
        """90th percentile in microseconds."""
        return self.p90_ms * 1000.0

    @property
    def p99_us(self) -> float:
        """99th percentile in microseconds."""
        return self.p99_ms * 1000.0

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        """Flat dict (samples only when asked)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples_ms"}
        if samples:
            out["samples_ms"] = list(self.samples_ms)
        return out


def _flatten(results: Iterable[BenchResult], both_views: bool) -> list[BenchResult]:
    rows: list[BenchResult] = []
    for r in results:
        rows.extend(r.views() if both_views else (r,))
    return rows


def _rows(results: Iterable[BenchResult], both_views: bool) -> list[dict[str, Any]]:
    rows = [r.to_dict() for r in _flatten(results, both_views)]
    order = list(CSV_COLUMNS) + [k for k in (rows[0] if rows else {}) if k not in CSV_COLUMNS]
    return [{k: row.get(k) for k in order} for row in rows]


def results_to_dataframe(results: Iterable[BenchResult], *, both_views: bool = False) -> Any:
    """A pandas DataFrame, one row per result (``both_views``: also each peer view)."""
    import pandas as pd  # type: ignore[import-untyped]

    rows = _rows(results, both_views)
    extra = [f.name for f in fields(BenchResult) if f.name not in CSV_COLUMNS]
    columns = list(CSV_COLUMNS) + [c for c in extra if c not in ("intervals", "peer_view")]
    return pd.DataFrame(rows, columns=columns)


def intervals_to_dataframe(results: Iterable[BenchResult]) -> Any:
    """A pandas DataFrame of the receiver's interval records of every run."""
    import pandas as pd

    rows = [
        {"run_id": r.run_id, **iv.to_dict()}
        for r in results
        for iv in (r.intervals or (r.peer_view.intervals if r.peer_view else ()))
    ]
    return pd.DataFrame(rows, columns=list(INTERVAL_COLUMNS))


def write_csv(
    results: Sequence[BenchResult], path: str | Path, *, both_views: bool = False
) -> Path:
    """Write one row per result: :data:`CSV_COLUMNS` first, then the extras."""
    p = Path(path)
    rows = _rows(results, both_views)
    header = list(rows[0]) if rows else list(CSV_COLUMNS)
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for row in rows:
            w.writerow(row)
    return p


def write_intervals_csv(results: Sequence[BenchResult], path: str | Path) -> Path:
    """Write the interval rows (:data:`INTERVAL_COLUMNS`)."""
    p = Path(path)
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(INTERVAL_COLUMNS))
        w.writeheader()
        for r in results:
            for iv in r.intervals or (r.peer_view.intervals if r.peer_view else ()):
                w.writerow({"run_id": r.run_id, **iv.to_dict()})
    return p


def results_to_json(results: Iterable[BenchResult], *, indent: int | None = 2) -> str:
    """JSON array of results, each with its intervals and its peer view."""
    out = []
    for r in results:
        d = r.to_dict(intervals=True)
        d["peer_view"] = r.peer_view.to_dict(intervals=True) if r.peer_view else None
        out.append(d)
    return json.dumps(out, indent=indent)
