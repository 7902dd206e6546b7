"""Benchmark core: datagram format, sender pacing and receiver accounting (sans-I/O).

Datagram format (types from :data:`p2plab.core.wire.BENCH_TYPES`, so ``wire.datagram_type``
classifies them; all fields big-endian)::

     0      2   3   4        8                16               24
    +------+---+---+--------+----------------+----------------+------------------
    |magic |ver|typ| run_id |      seq       |  send_ts_ns    | filler up to size
    +------+---+---+--------+----------------+----------------+------------------

``run_id`` (u32) ties a datagram to one run, ``seq`` (u64) counts from 0, ``send_ts_ns`` (u64) is
the sender's clock in nanoseconds (any origin: only differences are used).  ``BENCH_DATA`` carries
the throughput stream, ``BENCH_PING``/``BENCH_PONG`` the RTT ping-pong (the pong echoes the ping).
``BENCH_CREDIT`` is the receiver's flow-control feedback: ``seq`` is how far the receiver has
consumed the stream (highest seq seen + 1) and ``send_ts_ns`` how many datagrams it counted; the
sender keeps at most a window of datagrams beyond the consumed point in flight
(:class:`CreditWindow`), so it never overruns the receiver's socket buffer.

Encrypted runs seal every such datagram whole with the link's sealer (the 4-byte p2p header stays
in clear as associated data, the rest is ChaCha20-Poly1305 ciphertext); the plaintext is then
``SEAL_OVERHEAD`` bytes shorter so that the UDP payload keeps the requested size.

Accounting is exact: every sequence number has one bit in a growable bitmap, so loss
(``packets_sent - unique received``), duplicates and out-of-order arrivals (a unique packet whose
seq is below the highest seq seen before it) are counted, not estimated.  Jitter is the RFC 3550
section 6.4.1 estimator ``J += (|D(i-1, i)| - J) / 16`` over consecutive arrivals, where ``D`` is
the difference of transit times; being a linear filter, a block of packets is folded in at once
(``J_end = r**n J_0 + sum (1/16) r**(n-1-k) |D_k|`` with ``r = 15/16``), so batches are
vectorised with numpy when it is installed (pure Python otherwise).  Times passed in are integer
nanoseconds of the driver's clock; the core reads no clock.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from p2plab.core.bench.rates import goodput_window_s
from p2plab.core.bench.rates import mbps as _mbps
from p2plab.core.wire import MAGIC, VERSION

_numpy_state: list[Any] = []  # [numpy or None] once looked for


def numpy_or_none() -> Any:
    """numpy, imported on first use (it makes batch accounting vectorised; everything also
    works without it), or None where it is missing.  Lazy so that processes which never run a
    benchmark (every CLI command, the rendezvous) start without paying for its import."""
    if not _numpy_state:
        try:
            import numpy
        except ImportError:  # pragma: no cover - exercised only where numpy is missing
            _numpy_state.append(None)
        else:
            _numpy_state.append(numpy)
    return _numpy_state[0]


__all__ = [
    "BENCH_CREDIT",
    "BENCH_DATA",
    "BENCH_PING",
    "BENCH_PONG",
    "HEADER",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "MIN_PAYLOAD",
    "TAIL",
    "BenchHeader",
    "BenchReceiver",
    "CreditWindow",
    "IntervalRecord",
    "Pacer",
    "ReceiverReport",
    "encode_bench",
    "encode_credit",
    "fill_headers",
    "make_template",
    "numpy_or_none",
    "parse_bench",
    "parse_headers",
    "rtt_percentiles",
    "validate_params",
]

BENCH_DATA = 0x20
"""Throughput stream datagram."""
BENCH_PING = 0x21
"""RTT probe; answered by a BENCH_PONG with the same run id, seq and timestamp."""
BENCH_PONG = 0x22
"""RTT answer."""
BENCH_CREDIT = 0x23
"""Receiver to sender flow-control feedback (consumed point and count)."""

HEADER = struct.Struct("!2sBBIQQ")
"""magic, version, type, run_id (u32), seq (u64), send_ts_ns (u64)."""
HEADER_SIZE = HEADER.size
"""24 bytes."""
MIN_PAYLOAD = 64
"""Smallest benchmark datagram (UDP payload bytes, header included)."""
MAX_PAYLOAD = 65507
"""Largest UDP payload over IPv4."""

_KINDS = (BENCH_DATA, BENCH_PING, BENCH_PONG, BENCH_CREDIT)
TAIL = struct.Struct("!QQ")
"""seq and send_ts_ns, packed at offset 8 of a benchmark header."""
_JITTER_R = 15.0 / 16.0
_NS = 1_000_000_000


def validate_params(payload_size: int, rate_mbps: float, duration_s: float) -> None:
    """Raise ValueError for parameters a run cannot use (messages name the limit)."""
    if not MIN_PAYLOAD <= payload_size <= MAX_PAYLOAD:
        raise ValueError(
            f"payload_size must be {MIN_PAYLOAD}..{MAX_PAYLOAD} bytes, got {payload_size}"
        )
    if not (rate_mbps >= 0 and math.isfinite(rate_mbps)):
        raise ValueError(f"rate_mbps must be >= 0 (0: as fast as possible), got {rate_mbps}")
    if not (duration_s > 0 and math.isfinite(duration_s)) or duration_s > 3600:
        raise ValueError(f"duration_s must be in (0, 3600], got {duration_s}")


# -- codec ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchHeader:
    """The fixed header of a benchmark datagram."""

    type: int
    """BENCH_DATA, BENCH_PING or BENCH_PONG."""
    run_id: int
    """The run this datagram belongs to."""
    seq: int
    """Sequence number, from 0."""
    send_ts_ns: int
    """Sender's clock at sending, in nanoseconds."""


def encode_bench(kind: int, run_id: int, seq: int, send_ts_ns: int, size: int) -> bytes:
    """One benchmark datagram of exactly ``size`` bytes (at least HEADER_SIZE)."""
    if size < HEADER_SIZE:
        raise ValueError(f"size must be >= {HEADER_SIZE}, got {size}")
    return HEADER.pack(MAGIC, VERSION, kind, run_id, seq, send_ts_ns) + bytes(size - HEADER_SIZE)


def parse_bench(data: bytes | bytearray | memoryview) -> BenchHeader | None:
    """The header of one benchmark datagram, or None if ``data`` is not one (never raises)."""
    if len(data) < HEADER_SIZE:
        return None
    magic, version, kind, run_id, seq, ts = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or kind not in _KINDS:
        return None
    return BenchHeader(kind, run_id, seq, ts)


def encode_credit(run_id: int, consumed: int, received: int) -> bytes:
    """BENCH_CREDIT: the receiver consumed seqs below ``consumed`` and counted ``received``."""
    return HEADER.pack(MAGIC, VERSION, BENCH_CREDIT, run_id, consumed, received)


def make_template(kind: int, run_id: int, size: int, count: int) -> bytearray:
    """``count`` datagrams of ``size`` bytes back to back, headers filled except seq/ts."""
    one = bytearray(encode_bench(kind, run_id, 0, 0, size))
    # A non-zero filler pattern so compression anywhere on the path cannot flatter the numbers.
    for i in range(HEADER_SIZE, size):
        one[i] = (i * 31 + 7) & 0xFF
    return one * count


def fill_headers(buf: bytearray, size: int, count: int, first_seq: int, send_ts_ns: int) -> None:
    """Write seq ``first_seq + i`` and ``send_ts_ns`` into datagram i of a template (vectorised)."""
    np = numpy_or_none()
    if np is not None and count > 4:
        view = np.ndarray(shape=(count,), dtype=">u8", buffer=buf, offset=8, strides=(size,))
        view[:] = np.arange(first_seq, first_seq + count, dtype=np.uint64)
        tview = np.ndarray(shape=(count,), dtype=">u8", buffer=buf, offset=16, strides=(size,))
        tview[:] = send_ts_ns
        return
    for i in range(count):
        TAIL.pack_into(buf, i * size + 8, first_seq + i, send_ts_ns)


def parse_headers(
    buf: bytes | bytearray | memoryview, offsets: Sequence[int] | Any
) -> tuple[Any, Any, Any, Any]:
    """Vectorised header parse: (ok mask, kind, run_id, seq, send_ts) at each offset.

    Returns numpy arrays ``(kinds, run_ids, seqs, send_ts_ns)``; ``kinds`` is -1 where the magic
    or version is wrong.  Needs numpy (callers fall back to :func:`parse_bench` without it).
    """
    np = numpy_or_none()
    assert np is not None
    raw = np.frombuffer(buf, dtype=np.uint8)
    offs = np.asarray(offsets, dtype=np.int64)
    idx = offs[:, None] + np.arange(HEADER_SIZE, dtype=np.int64)
    rows = np.ascontiguousarray(raw[idx])
    rec = rows.view(
        np.dtype(
            [
                ("m0", "u1"),
                ("m1", "u1"),
                ("v", "u1"),
                ("t", "u1"),
                ("run", ">u4"),
                ("seq", ">u8"),
                ("ts", ">u8"),
            ]
        )
    ).reshape(-1)
    good = (rec["m0"] == MAGIC[0]) & (rec["m1"] == MAGIC[1]) & (rec["v"] == VERSION)
    kinds = np.where(good, rec["t"].astype(np.int64), -1)
    return (
        kinds,
        rec["run"].astype(np.int64),
        rec["seq"].astype(np.int64),
        rec["ts"].astype(np.int64),
    )


# -- pacing -----------------------------------------------------------------------------------


class Pacer:
    """Token bucket over datagrams: how many may be sent at ``now`` (seconds, driver's clock).

    ``rate_mbps`` counts UDP payload bits (what the receiver's goodput counts); 0 means as fast
    as possible.  ``burst`` caps how many datagrams one call may release, so a late timer does
    not turn into a huge burst.
    """

    def __init__(self, rate_mbps: float, payload_size: int, start: float, burst: int = 256) -> None:
        self.rate_mbps = rate_mbps
        self.payload_size = payload_size
        self.burst = max(1, burst)
        self.interval = payload_size * 8 / (rate_mbps * 1e6) if rate_mbps > 0 else 0.0
        """Seconds between datagrams at the target rate (0 when unlimited)."""
        self._start = start
        self._sent = 0

    @property
    def sent(self) -> int:
        """Datagrams accounted as sent so far."""
        return self._sent

    def allowance(self, now: float) -> int:
        """Datagrams that may go out now (at most ``burst``)."""
        if self.interval == 0.0:
            return self.burst
        due = int((now - self._start) / self.interval) + 1 - self._sent
        if due <= 0:
            return 0
        if due > self.burst:
            # Behind schedule by more than a burst: forget the debt rather than flood later.
            self._start = now - (self._sent + self.burst - 1) * self.interval
            return self.burst
        return due

    def consumed(self, count: int) -> None:
        """Record that ``count`` datagrams went out."""
        self._sent += count

    def next_time(self) -> float:
        """When the next datagram is due (``start`` based; now or earlier means: send)."""
        return self._start + self._sent * self.interval


class CreditWindow:
    """Receiver-driven flow control: at most ``window`` datagrams beyond the consumed point.

    The receiver reports (``BENCH_CREDIT``) the point up to which it has read the stream (its
    highest seq + 1: everything below was read or is lost for good); datagrams above it are in
    flight or queued in its socket buffer.  Sizing ``window`` below what that buffer holds means
    the sender can go as fast as the receiver reads, never faster, whatever the rate: it is the
    UDP analogue of TCP's receive window.  Stale or reordered reports never move it back.
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        """Datagrams allowed beyond the consumed point."""
        self.consumed = 0
        """Highest consumed point reported so far."""
        self.received = 0
        """The receiver's count at the last report."""
        self.reports = 0
        """Credit reports taken."""

    def update(self, consumed: int, received: int) -> None:
        """Take a report (out-of-date ones are ignored)."""
        if consumed >= self.consumed:
            self.consumed = consumed
            self.received = max(self.received, received)
            self.reports += 1

    def allowance(self, sent: int) -> int:
        """Datagrams that may go out now, having sent ``sent`` (seqs 0..sent-1)."""
        return max(0, self.consumed + self.window - sent)


# -- receiver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntervalRecord:
    """Receiver counts for one interval of a run."""

    t_start: float
    """Seconds since the first datagram arrived."""
    t_end: float
    """Seconds since the first datagram arrived."""
    bytes: int
    """Payload bytes of unique datagrams received in the interval."""
    packets: int
    """Unique datagrams received in the interval."""
    mbps: float
    """Goodput in the interval, megabits per second."""
    lost: int
    """Sequence gaps opened in the interval (growth of the highest seq minus arrivals, >= 0)."""
    jitter_ms: float
    """RFC 3550 jitter estimate at the end of the interval, milliseconds."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the interval CSV columns minus ``run_id``)."""
        return {
            "t_start": self.t_start,
            "t_end": self.t_end,
            "bytes": self.bytes,
            "packets": self.packets,
            "mbps": self.mbps,
            "lost": self.lost,
            "jitter_ms": self.jitter_ms,
        }


@dataclass(frozen=True)
class ReceiverReport:
    """What the receiver saw in one run (sent back to the sender as ``bench_report``)."""

    packets_sent: int
    """What the sender says it sent (from ``bench_end``), or the highest seq + 1 if unknown."""
    packets_received: int
    """Unique datagrams of the run received."""
    bytes_received: int
    """Payload bytes of those datagrams."""
    lost: int
    """``packets_sent - packets_received`` (exact)."""
    lost_percent: float
    """``100 * lost / packets_sent``."""
    out_of_order: int
    """Unique datagrams that arrived after one with a higher seq."""
    duplicates: int
    """Datagrams whose seq had already arrived."""
    jitter_ms: float
    """RFC 3550 jitter at the end of the run, milliseconds."""
    duration_s: float
    """First to last arrival, seconds."""
    mbps: float
    """Goodput: payload bits received / ``window_s``, megabits per second."""
    intervals: tuple[IntervalRecord, ...] = field(default=())
    """One record per interval."""
    auth_failures: int = 0
    """Datagrams of the run that did not open (forged, corrupted, replayed): not counted."""
    window_s: float = 0.0
    """Seconds goodput is measured over: the longer of ``duration_s`` and the sender's send
    window (:func:`p2plab.core.bench.rates.goodput_window_s`), so it never exceeds the sending
    rate for the same bytes."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (intervals as a list of dicts)."""
        return {
            "auth_failures": self.auth_failures,
            "packets_sent": self.packets_sent,
            "packets_received": self.packets_received,
            "bytes_received": self.bytes_received,
            "lost": self.lost,
            "lost_percent": self.lost_percent,
            "out_of_order": self.out_of_order,
            "duplicates": self.duplicates,
            "jitter_ms": self.jitter_ms,
            "duration_s": self.duration_s,
            "mbps": self.mbps,
            "window_s": self.window_s,
            "intervals": [r.to_dict() for r in self.intervals],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReceiverReport:
        """Inverse of :meth:`to_dict` (raises KeyError/TypeError/ValueError on bad input)."""
        return cls(
            packets_sent=int(d["packets_sent"]),
            packets_received=int(d["packets_received"]),
            bytes_received=int(d["bytes_received"]),
            lost=int(d["lost"]),
            lost_percent=float(d["lost_percent"]),
            out_of_order=int(d["out_of_order"]),
            duplicates=int(d["duplicates"]),
            jitter_ms=float(d["jitter_ms"]),
            duration_s=float(d["duration_s"]),
            mbps=float(d["mbps"]),
            intervals=tuple(IntervalRecord(**r) for r in d.get("intervals", [])),
            auth_failures=int(d.get("auth_failures", 0)),
            window_s=float(d.get("window_s", d["duration_s"])),
        )


class BenchReceiver:
    """Exact accounting of one run's BENCH_DATA stream.

    Feed it with :meth:`receive` (one datagram) or :meth:`receive_batch` (arrays, vectorised
    with numpy); both take the datagrams in arrival order.  Intervals are cut on arrival time,
    counted from the first arrival.  :meth:`report` closes the books.
    """

    def __init__(self, run_id: int, interval_s: float = 1.0, max_seq: int = 1 << 36) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.run_id = run_id
        self.interval_ns = int(interval_s * _NS)
        self.max_seq = max_seq
        """Sequence numbers at or above this are dropped and counted as ``bad``."""
        self.packets = 0
        self.bytes = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.bad = 0
        """Datagrams dropped: wrong run id or absurd seq."""
        self.auth_failures = 0
        """Datagrams the driver could not open (it counts them here; they are not received)."""
        self.jitter_ns = 0.0
        self.highest = -1
        self.first_arrival: int | None = None
        self.last_arrival: int | None = None
        self.intervals: list[IntervalRecord] = []
        self._seen = bytearray(1 << 16)  # one bit per seq
        self._last_transit: int | None = None
        self._iv_index = 0
        self._iv_bytes = 0
        self._iv_packets = 0
        self._iv_highest = -1

    # -- intervals ----------------------------------------------------------------------------

    def _close_interval(self, end_s: float | None = None) -> None:
        """Record the current interval; ``end_s`` cuts a partial last one short."""
        t0 = self._iv_index * self.interval_ns / _NS
        t1 = (self._iv_index + 1) * self.interval_ns / _NS if end_s is None else max(end_s, t0)
        gaps = (self.highest - self._iv_highest) - self._iv_packets
        self.intervals.append(
            IntervalRecord(
                t_start=t0,
                t_end=t1,
                bytes=self._iv_bytes,
                packets=self._iv_packets,
                mbps=_mbps(self._iv_bytes, t1 - t0),
                lost=max(0, gaps),
                jitter_ms=self.jitter_ns / 1e6,
            )
        )
        self._iv_index += 1
        self._iv_bytes = 0
        self._iv_packets = 0
        self._iv_highest = self.highest

    def advance(self, now_ns: int) -> list[IntervalRecord]:
        """Close every interval that ended before ``now_ns``; returns the newly closed ones."""
        if self.first_arrival is None:
            return []
        before = len(self.intervals)
        while now_ns - self.first_arrival >= (self._iv_index + 1) * self.interval_ns:
            self._close_interval()
        return self.intervals[before:]

    def _grow(self, seq: int) -> None:
        need = (seq >> 3) + 1
        if need > len(self._seen):
            self._seen.extend(bytes(max(need, 2 * len(self._seen)) - len(self._seen)))

    # -- single datagrams ---------------------------------------------------------------------

    def receive(self, run_id: int, seq: int, send_ts_ns: int, size: int, arrival_ns: int) -> None:
        """Account one datagram."""
        if run_id != self.run_id or not 0 <= seq < self.max_seq:
            self.bad += 1
            return
        if self.first_arrival is None:
            self.first_arrival = arrival_ns
        self.advance(arrival_ns)
        self._grow(seq)
        byte, bit = seq >> 3, 1 << (seq & 7)
        if self._seen[byte] & bit:
            self.duplicates += 1
            return
        self._seen[byte] |= bit
        self.last_arrival = arrival_ns
        self.packets += 1
        self.bytes += size
        self._iv_packets += 1
        self._iv_bytes += size
        if seq < self.highest:
            self.out_of_order += 1
        else:
            self.highest = seq
        transit = arrival_ns - send_ts_ns
        if self._last_transit is not None:
            d = abs(transit - self._last_transit)
            self.jitter_ns += (d - self.jitter_ns) / 16.0
        self._last_transit = transit

    # -- batches ------------------------------------------------------------------------------

    def receive_batch(
        self,
        run_ids: Any,
        seqs: Any,
        send_ts_ns: Any,
        sizes: Any,
        arrival_ns: Any,
    ) -> None:
        """Account many datagrams at once (arrays or sequences of equal length, arrival order).

        With numpy the work per batch is a handful of vector operations; the result is the
        same as calling :meth:`receive` for each datagram in order.
        """
        np = numpy_or_none()
        if np is None:
            for r, s, t, z, a in zip(run_ids, seqs, send_ts_ns, sizes, arrival_ns, strict=True):
                self.receive(int(r), int(s), int(t), int(z), int(a))
            return
        run = np.asarray(run_ids, dtype=np.int64)
        seq = np.asarray(seqs, dtype=np.int64)
        ts = np.asarray(send_ts_ns, dtype=np.int64)
        size = np.broadcast_to(np.asarray(sizes, dtype=np.int64), seq.shape)
        arr = np.broadcast_to(np.asarray(arrival_ns, dtype=np.int64), seq.shape)
        ok = (run == self.run_id) & (seq >= 0) & (seq < self.max_seq)
        nbad = int(seq.size - np.count_nonzero(ok))
        if nbad:
            self.bad += nbad
            seq, ts, size, arr = seq[ok], ts[ok], size[ok], arr[ok]
        if seq.size == 0:
            return
        if self.first_arrival is None:
            self.first_arrival = int(arr[0])
        # Split on interval boundaries so each interval closes with its own counts and jitter.
        rel = (arr - self.first_arrival) // self.interval_ns
        if int(rel[-1]) == self._iv_index and int(rel[0]) == self._iv_index:
            self._batch(seq, ts, size, arr)
            return
        cuts = np.flatnonzero(np.diff(rel)) + 1
        start = 0
        for end in [*cuts.tolist(), int(seq.size)]:
            self.advance(int(arr[start]))
            self._batch(seq[start:end], ts[start:end], size[start:end], arr[start:end])
            start = end

    def _batch(self, seq: Any, ts: Any, size: Any, arr: Any) -> None:
        np = numpy_or_none()
        assert np is not None
        top = int(seq.max())
        self._grow(top)
        bits = np.frombuffer(self._seen, dtype=np.uint8)
        byte = seq >> 3
        mask = (np.ones(1, dtype=np.uint8) << (seq & 7).astype(np.uint8)).astype(np.uint8)
        already = (bits[byte] & mask) != 0
        # First occurrence within the batch (np.unique keeps the first index of each value).
        _, first_idx = np.unique(seq, return_index=True)
        first = np.zeros(seq.size, dtype=bool)
        first[first_idx] = True
        new = first & ~already
        n_new = int(np.count_nonzero(new))
        self.duplicates += int(seq.size) - n_new
        if n_new == 0:
            return
        if n_new != seq.size:
            seq, ts, size, arr = seq[new], ts[new], size[new], arr[new]
            byte = byte[new]
            mask = mask[new]
        np.bitwise_or.at(bits, byte, mask)
        nbytes = int(size.sum())
        self.packets += n_new
        self.bytes += nbytes
        self._iv_packets += n_new
        self._iv_bytes += nbytes
        self.last_arrival = int(arr[-1])
        # Out of order: below the running maximum of everything before it.
        prev = np.empty(seq.size, dtype=np.int64)
        prev[0] = self.highest
        if seq.size > 1:
            np.maximum.accumulate(seq[:-1], out=prev[1:])
            np.maximum(prev[1:], self.highest, out=prev[1:])
        self.out_of_order += int(np.count_nonzero(seq < prev))
        self.highest = max(self.highest, top)
        # RFC 3550 6.4.1 jitter, folded in as a block (see the module docstring).
        transit = arr - ts
        if self._last_transit is None:
            d = np.abs(np.diff(transit)).astype(np.float64)
        else:
            d = np.abs(np.diff(transit, prepend=self._last_transit)).astype(np.float64)
        self._last_transit = int(transit[-1])
        n = d.size
        if n:
            weights = np.power(_JITTER_R, np.arange(n - 1, -1, -1, dtype=np.float64)) / 16.0
            self.jitter_ns = float(_JITTER_R**n * self.jitter_ns + np.dot(weights, d))

    # -- the end ------------------------------------------------------------------------------

    def report(
        self,
        packets_sent: int | None = None,
        now_ns: int | None = None,
        send_window_s: float | None = None,
    ) -> ReceiverReport:
        """Close the last interval and return the totals.

        ``packets_sent`` comes from the sender's ``bench_end``; without it the highest seq + 1
        is used (trailing losses then go unseen).  ``send_window_s`` (``bench_end.duration_s``,
        the sender's send window) makes goodput comparable with the sending rate: it is measured
        over the longer of that window and the first-to-last arrival span.
        """
        if now_ns is not None:
            self.advance(now_ns)
        if self._iv_packets or (self.first_arrival is not None and not self.intervals):
            t0 = self._iv_index * self.interval_ns / _NS
            t1 = (
                (self.last_arrival - self.first_arrival) / _NS
                if self.last_arrival is not None and self.first_arrival is not None
                else t0
            )
            self._close_interval(t1)
        sent = packets_sent if packets_sent is not None else self.highest + 1
        received_in_range = self.packets
        if packets_sent is not None and self.highest >= packets_sent:
            # Datagrams numbered beyond what the sender claims: count only those in range.
            received_in_range = self._count_seen(packets_sent)
        lost = max(0, sent - received_in_range)
        duration = (
            (self.last_arrival - self.first_arrival) / _NS
            if self.last_arrival is not None and self.first_arrival is not None
            else 0.0
        )
        window = goodput_window_s(duration, send_window_s)
        return ReceiverReport(
            packets_sent=sent,
            packets_received=self.packets,
            bytes_received=self.bytes,
            lost=lost,
            lost_percent=100.0 * lost / sent if sent > 0 else 0.0,
            out_of_order=self.out_of_order,
            duplicates=self.duplicates,
            jitter_ms=self.jitter_ns / 1e6,
            duration_s=duration,
            mbps=_mbps(self.bytes, window),
            intervals=tuple(self.intervals),
            auth_failures=self.auth_failures,
            window_s=window,
        )

    def _count_seen(self, below: int) -> int:
        full, rest = divmod(below, 8)
        np = numpy_or_none()
        n = (
            sum(bin(b).count("1") for b in self._seen[:full])
            if np is None
            else int(np.unpackbits(np.frombuffer(self._seen, dtype=np.uint8)[:full]).sum())
        )
        if rest and full < len(self._seen):
            n += bin(self._seen[full] & ((1 << rest) - 1)).count("1")
        return n


def rtt_percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """min, mean, p50, p90, p99 and max of RTT samples, in milliseconds (nearest-rank)."""
    if not samples_s:
        return {k: 0.0 for k in ("min_ms", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
    xs = sorted(samples_s)
    n = len(xs)

    def rank(p: float) -> float:
        # Nearest-rank percentile: the smallest sample with at least p% of samples <= it.
        k = max(1, math.ceil(p / 100.0 * n))
        return xs[k - 1] * 1000.0

    return {
        "min_ms": xs[0] * 1000.0,
        "mean_ms": sum(xs) / n * 1000.0,
        "p50_ms": rank(50),
        "p90_ms": rank(90),
        "p99_ms": rank(99),
        "max_ms": xs[-1] * 1000.0,
    }
