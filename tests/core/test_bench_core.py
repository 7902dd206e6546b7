"""Benchmark core: codec, pacing and exact receiver accounting against hand-computed cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2plab.core import bench as cb
from p2plab.core import wire
from p2plab.core.bench import accounting as cba

MS = 1_000_000  # ns


def feed(rx: cb.BenchReceiver, items: list[tuple[int, int, int]], size: int = 100) -> None:
    """items: (seq, send_ts_ns, arrival_ns) in arrival order, one datagram at a time."""
    for seq, ts, arr in items:
        rx.receive(rx.run_id, seq, ts, size, arr)


def feed_batch(rx: cb.BenchReceiver, items: list[tuple[int, int, int]], size: int = 100) -> None:
    rx.receive_batch(
        [rx.run_id] * len(items),
        [s for s, _, _ in items],
        [t for _, t, _ in items],
        [size] * len(items),
        [a for _, _, a in items],
    )


# -- codec -------------------------------------------------------------------------------------


def test_datagram_is_classified_by_wire_and_round_trips() -> None:
    data = cb.encode_bench(cb.BENCH_DATA, 0xDEADBEEF, 12345678901, 987654321, 64)
    assert len(data) == 64
    assert wire.datagram_type(data) == cb.BENCH_DATA
    assert cb.BENCH_DATA in wire.BENCH_TYPES and cb.BENCH_PONG in wire.BENCH_TYPES
    h = cb.parse_bench(data)
    assert h == cb.BenchHeader(cb.BENCH_DATA, 0xDEADBEEF, 12345678901, 987654321)
    assert isinstance(wire.parse_datagram(data), wire.BenchDatagram)


@pytest.mark.parametrize(
    "junk", [b"", b"\xd7\x50\x01\x20", b"\x00" * 64, b"\xd7\x50\x09\x20" + bytes(60)]
)
def test_parse_rejects_junk_without_raising(junk: bytes) -> None:
    assert cb.parse_bench(junk) is None


def test_template_and_vectorised_header_fill_and_parse() -> None:
    size, n = 80, 10
    buf = cb.make_template(cb.BENCH_DATA, 7, size, n)
    cb.fill_headers(buf, size, n, 100, 5555)
    for i in range(n):
        h = cb.parse_bench(bytes(buf[i * size : (i + 1) * size]))
        assert h == cb.BenchHeader(cb.BENCH_DATA, 7, 100 + i, 5555)
    if cba.numpy_or_none() is not None:
        kinds, runs, seqs, ts = cb.parse_headers(buf, [i * size for i in range(n)])
        assert kinds.tolist() == [cb.BENCH_DATA] * n
        assert runs.tolist() == [7] * n
        assert seqs.tolist() == list(range(100, 110))
        assert ts.tolist() == [5555] * n
        buf[0] = 0  # broken magic
        assert cb.parse_headers(buf, [0, size])[0].tolist() == [-1, cb.BENCH_DATA]


@pytest.mark.parametrize(
    ("size", "rate", "dur"), [(63, 0, 1), (65508, 0, 1), (1200, -1, 1), (1200, 0, 0)]
)
def test_validate_params_rejects(size: int, rate: float, dur: float) -> None:
    with pytest.raises(ValueError):
        cb.validate_params(size, rate, dur)


def test_validate_params_accepts_limits() -> None:
    cb.validate_params(64, 0, 1)
    cb.validate_params(65507, 100, 5)


# -- pacing ------------------------------------------------------------------------------------


def test_pacer_releases_datagrams_at_the_rate() -> None:
    # 1200 bytes at 9.6 Mbit/s: one datagram per millisecond.
    p = cb.Pacer(9.6, 1200, start=10.0, burst=100)
    assert p.interval == pytest.approx(0.001)
    assert p.allowance(10.0) == 1
    p.consumed(1)
    assert p.allowance(10.0005) == 0
    assert p.next_time() == pytest.approx(10.001)
    assert p.allowance(10.0105) == 10  # datagrams 1..10 are due by t=10.0105
    p.consumed(10)
    assert p.allowance(10.0105) == 0


def test_pacer_caps_bursts_and_forgets_old_debt() -> None:
    p = cb.Pacer(9.6, 1200, start=0.0, burst=5)
    assert p.allowance(1.0) == 5
    p.consumed(5)
    assert p.allowance(1.0) == 0  # debt of ~1000 datagrams forgotten
    assert p.allowance(1.0011) == 1


def test_pacer_unlimited() -> None:
    p = cb.Pacer(0, 1200, start=0.0, burst=64)
    assert p.allowance(0.0) == 64
    p.consumed(64)
    assert p.allowance(0.0) == 64


# -- accounting: hand-computed cases ------------------------------------------------------------

# seq 0..9 sent; 3 and 7 lost; 5 arrives after 6 (reordered); 2 arrives twice.
CASE = [
    (0, 0, 0),
    (1, 0, 0),
    (2, 0, 0),
    (2, 0, 0),
    (4, 0, 0),
    (6, 0, 0),
    (5, 0, 0),
    (8, 0, 0),
    (9, 0, 0),
]


Feeder = type(feed)


@pytest.mark.parametrize("how", [feed, feed_batch])
def test_loss_reorder_duplicates_exact(how: Feeder) -> None:
    rx = cb.BenchReceiver(run_id=1)
    how(rx, CASE)
    r = rx.report(packets_sent=10)
    assert r.packets_received == 8  # unique 0,1,2,4,6,5,8,9
    assert r.lost == 2  # 3 and 7
    assert r.lost_percent == pytest.approx(20.0)
    assert r.duplicates == 1  # the second 2
    assert r.out_of_order == 1  # 5 after 6
    assert r.bytes_received == 800


@pytest.mark.parametrize("how", [feed, feed_batch])
def test_trailing_loss_needs_the_senders_count(how: Feeder) -> None:
    rx = cb.BenchReceiver(run_id=1)
    how(rx, [(0, 0, 0), (1, 0, 1)])
    assert rx.report(packets_sent=5).lost == 3
    rx2 = cb.BenchReceiver(run_id=1)
    how(rx2, [(0, 0, 0), (1, 0, 1)])
    assert rx2.report().lost == 0  # unknown count: highest seq + 1 assumed


@pytest.mark.parametrize("how", [feed, feed_batch])
def test_other_runs_and_absurd_seqs_are_counted_as_bad(how: Feeder) -> None:
    rx = cb.BenchReceiver(run_id=1, max_seq=1000)
    how(rx, [(0, 0, 0), (5000, 0, 0)])
    rx.receive(2, 1, 0, 100, 0)
    r = rx.report(packets_sent=2)
    assert rx.bad == 2
    assert (r.packets_received, r.lost) == (1, 1)


@pytest.mark.parametrize("how", [feed, feed_batch])
def test_jitter_rfc3550_worked_example(how: Feeder) -> None:
    # Sent every 10 ms, arriving at 5, 17, 25, 40 ms: transit 5, 7, 5, 10 ms; |D| = 2, 2, 5 ms.
    # J1 = 2/16 = 0.125; J2 = 0.125 + (2 - 0.125)/16 = 0.2421875;
    # J3 = 0.2421875 + (5 - 0.2421875)/16 = 0.53955078125 (ms).
    rx = cb.BenchReceiver(run_id=1)
    how(rx, [(0, 0, 5 * MS), (1, 10 * MS, 17 * MS), (2, 20 * MS, 25 * MS), (3, 30 * MS, 40 * MS)])
    assert rx.report(packets_sent=4).jitter_ms == pytest.approx(0.53955078125, rel=1e-12)


def test_jitter_ignores_clock_offset() -> None:
    a, b = cb.BenchReceiver(run_id=1), cb.BenchReceiver(run_id=1)
    items = [(i, i * MS, i * MS + (i % 3) * 100_000) for i in range(50)]
    feed(a, items)
    feed(b, [(s, t + 10**15, r) for s, t, r in items])
    assert a.report().jitter_ms == pytest.approx(b.report().jitter_ms)
    assert a.report().jitter_ms > 0


@pytest.mark.parametrize("how", [feed, feed_batch])
def test_intervals(how: Feeder) -> None:
    s = 1_000_000_000
    rx = cb.BenchReceiver(run_id=1, interval_s=1.0)
    how(rx, [(0, 0, 0), (1, 0, s // 2), (3, 0, 12 * s // 10), (4, 0, 25 * s // 10)])
    r = rx.report(packets_sent=5)
    iv = [(x.t_start, x.t_end, x.packets, x.bytes, x.lost) for x in r.intervals]
    assert iv == [(0.0, 1.0, 2, 200, 0), (1.0, 2.0, 1, 100, 1), (2.0, 2.5, 1, 100, 0)]
    assert r.intervals[0].mbps == pytest.approx(200 * 8 / 1e6)
    assert r.duration_s == pytest.approx(2.5)
    assert r.mbps == pytest.approx(400 * 8 / 2.5 / 1e6)


def test_advance_closes_intervals_with_no_traffic() -> None:
    s = 1_000_000_000
    rx = cb.BenchReceiver(run_id=1, interval_s=1.0)
    feed(rx, [(0, 0, 0)])
    closed = rx.advance(3 * s)
    assert [(x.t_start, x.packets) for x in closed] == [(0.0, 1), (1.0, 0), (2.0, 0)]


def test_report_round_trips_through_dict() -> None:
    rx = cb.BenchReceiver(run_id=1)
    feed(rx, CASE)
    r = rx.report(packets_sent=10)
    assert cb.ReceiverReport.from_dict(r.to_dict()) == r


events = st.lists(
    st.tuples(st.integers(0, 300), st.integers(0, 10**9), st.integers(0, 5 * 10**8)),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(events, st.integers(1, 64))
def test_batches_equal_one_by_one(items: list[tuple[int, int, int]], chunk: int) -> None:
    items = sorted(items, key=lambda x: x[2])  # arrival order
    one = cb.BenchReceiver(run_id=3, interval_s=0.1)
    feed(one, items)
    many = cb.BenchReceiver(run_id=3, interval_s=0.1)
    for i in range(0, len(items), chunk):
        feed_batch(many, items[i : i + chunk])
    a, b = one.report(packets_sent=301), many.report(packets_sent=301)
    assert a.jitter_ms == pytest.approx(b.jitter_ms, rel=1e-9, abs=1e-12)

    def key(r: cb.ReceiverReport) -> list[tuple[float, float, int, int, int]]:
        return [(x.t_start, x.t_end, x.packets, x.bytes, x.lost) for x in r.intervals]

    assert key(a) == key(b)
    for x, y in zip(a.intervals, b.intervals, strict=True):
        assert x.jitter_ms == pytest.approx(y.jitter_ms, rel=1e-9, abs=1e-12)
    assert (a.packets_received, a.lost, a.duplicates, a.out_of_order, a.bytes_received) == (
        b.packets_received,
        b.lost,
        b.duplicates,
        b.out_of_order,
        b.bytes_received,
    )
    unique = len({s for s, _, _ in items})
    assert a.packets_received == unique
    assert a.duplicates == len(items) - unique
    assert a.lost == 301 - unique


def test_rtt_percentiles_nearest_rank() -> None:
    p = cb.rtt_percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (p["min_ms"], p["p50_ms"], p["p90_ms"], p["p99_ms"], p["max_ms"]) == pytest.approx(
        (1, 50, 90, 99, 100)
    )
    assert p["mean_ms"] == pytest.approx(50.5)
    assert cb.rtt_percentiles([])["p50_ms"] == 0.0


def test_credit_window_and_credit_datagram() -> None:
    w = cb.CreditWindow(100)
    assert w.allowance(0) == 100 and w.allowance(100) == 0
    w.update(40, 38)  # read up to seq 39 (two lost)
    assert w.allowance(100) == 40 and w.received == 38
    w.update(30, 30)  # an out-of-date report never moves the window back
    assert w.consumed == 40 and w.allowance(100) == 40 and w.reports == 1
    assert w.allowance(200) == 0
    h = cb.parse_bench(cb.encode_credit(7, 40, 38))
    assert h == cb.BenchHeader(cb.BENCH_CREDIT, 7, 40, 38)
    with pytest.raises(ValueError):
        cb.CreditWindow(0)


def test_receiver_report_carries_auth_failures() -> None:
    rx = cb.BenchReceiver(1)
    rx.receive(1, 0, 0, 100, 10)
    rx.auth_failures += 3
    rep = rx.report(packets_sent=1)
    assert rep.auth_failures == 3 and rep.packets_received == 1
    assert cb.ReceiverReport.from_dict(rep.to_dict()) == rep
