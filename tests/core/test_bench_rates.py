"""Benchmark rates on a fake clock: goodput over the sender's window, the target shortfall flag.

A model of the sender's loop (:func:`p2plab.aio.bench.sender.stream`: a token-bucket pacer woken
by a coarse timer, batches sent at once, a per-datagram cost) feeds a :class:`BenchReceiver` with
arrival times on the same fake clock, so every number below is exact and repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2plab.core import bench as cb

US = 1_000  # ns


@dataclass
class Sent:
    """What the modelled sender did."""

    seqs: list[tuple[int, int]]
    """(seq, send_ts_ns) in send order."""
    window_s: float
    """Its send window, as ``stream`` measures it (just before the first send to loop exit)."""
    size: int

    @property
    def mbps(self) -> float:
        return cb.mbps(len(self.seqs) * self.size, self.window_s)


def send(
    rate: float, size: int, duration_s: float, wake_ns: int = 1_000 * US, cost_ns: int = 0
) -> Sent:
    """The sender's loop on a fake clock: wakes every ``wake_ns`` (a coarse timer) when the
    pacer says wait, and spends ``cost_ns`` per datagram it sends."""
    t0 = now = 5 * 10**9  # any origin
    deadline = t0 + int(duration_s * 1e9)
    pacer = cb.Pacer(rate, size, start=0.0, burst=256)
    out: list[tuple[int, int]] = []
    while now < deadline:
        allow = pacer.allowance((now - t0) / 1e9)
        if allow == 0:
            due = t0 + int(pacer.next_time() * 1e9)
            now = max(due, now + wake_ns)  # a timer fires late, never early
            continue
        n = min(allow, 64)
        out += [(len(out) + i, now) for i in range(n)]
        pacer.consumed(n)
        now += max(1, n * cost_ns)
    return Sent(out, (now - t0) / 1e9, size)


def receive(
    sent: Sent, latency_ns: int = 50 * US, read_ns: int = 0, drop: int = 0
) -> cb.BenchReceiver:
    """Arrivals after ``latency_ns``; a receiver that needs ``read_ns`` per datagram falls
    behind and drains later; ``drop`` > 0 loses every drop-th datagram."""
    rx = cb.BenchReceiver(run_id=7, interval_s=0.25)
    free = 0
    for seq, ts in sent.seqs:
        if drop and seq % drop == drop - 1:
            continue
        free = max(free, ts + latency_ns) + read_ns
        rx.receive(7, seq, ts, sent.size, free)
    return rx


def test_goodput_of_a_lossless_paced_run_is_the_sending_rate_not_above() -> None:
    s = send(rate=50, size=1200, duration_s=1.0)
    rep = receive(s).report(packets_sent=len(s.seqs), send_window_s=s.window_s)
    assert rep.lost == 0 and rep.bytes_received == len(s.seqs) * 1200
    # The arrival span alone is shorter than the send window for the same bytes (N datagrams
    # over N-1 gaps, the last pacing slot): goodput over it would read above the sending rate.
    assert rep.duration_s < s.window_s
    assert cb.mbps(rep.bytes_received, rep.duration_s) > s.mbps
    # Over the common window it is exactly the sending rate.
    assert rep.window_s == s.window_s
    assert rep.mbps == s.mbps


def test_a_receiver_that_drains_slower_shows_lower_goodput() -> None:
    s = send(rate=100, size=1200, duration_s=0.5)
    per_datagram = 1200 * 8 / 100e6 * 1e9  # ns per datagram at the target rate
    rep = receive(s, read_ns=int(per_datagram * 1.5)).report(
        packets_sent=len(s.seqs), send_window_s=s.window_s
    )
    assert rep.lost == 0
    assert rep.duration_s > s.window_s  # still draining after the sender stopped
    assert rep.window_s == rep.duration_s
    assert rep.mbps < 0.8 * s.mbps


def test_without_the_senders_window_goodput_is_over_arrivals() -> None:
    s = send(rate=50, size=1200, duration_s=0.2)
    rep = receive(s).report(packets_sent=len(s.seqs))
    assert rep.window_s == rep.duration_s
    assert rep.mbps == cb.mbps(rep.bytes_received, rep.duration_s)


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(1, 400),
    size=st.sampled_from([64, 256, 1200, 1472, 8000]),
    wake_us=st.integers(1, 4000),
    latency_us=st.integers(0, 20_000),
    read_ns=st.integers(0, 20_000),
    drop=st.sampled_from([0, 0, 2, 7, 100]),
)
def test_received_never_above_sent_over_the_same_window(
    rate: float, size: int, wake_us: int, latency_us: int, read_ns: int, drop: int
) -> None:
    s = send(rate, size, duration_s=0.05, wake_ns=wake_us * US)
    rep = receive(s, latency_us * US, read_ns, drop).report(
        packets_sent=len(s.seqs), send_window_s=s.window_s
    )
    assert rep.bytes_received <= len(s.seqs) * size
    assert rep.mbps <= s.mbps
    if drop == 0:
        assert rep.lost == 0


def test_window_survives_the_report_round_trip_and_an_older_peer() -> None:
    s = send(rate=20, size=1000, duration_s=0.1)
    rep = receive(s).report(packets_sent=len(s.seqs), send_window_s=s.window_s)
    assert cb.ReceiverReport.from_dict(rep.to_dict()) == rep
    old = rep.to_dict()
    del old["window_s"]  # a receiver from before the common window
    assert cb.ReceiverReport.from_dict(old).window_s == rep.duration_s


@pytest.mark.parametrize("bad", [None, 0.0, -1.0, float("nan")])
def test_unknown_or_absurd_send_window_falls_back_to_arrivals(bad: float | None) -> None:
    assert cb.goodput_window_s(0.9, bad) == 0.9
    assert cb.goodput_window_s(0.9, 1.1) == 1.1
    assert cb.goodput_window_s(1.3, 1.1) == 1.3


# -- short of target ---------------------------------------------------------------------------


def test_a_sender_too_slow_for_its_target_is_flagged() -> None:
    # 64-byte datagrams at 200 Mbit/s need one every 2.56 us; this sender spends 3.3 us each.
    s = send(rate=200, size=64, duration_s=0.05, cost_ns=3_300)
    assert s.mbps < 0.95 * 200
    assert cb.short_of_target(s.mbps, 200)


def test_a_sender_that_keeps_up_is_not_flagged() -> None:
    s = send(rate=200, size=1200, duration_s=0.05, cost_ns=1_000)
    assert s.mbps >= 0.95 * 200
    assert not cb.short_of_target(s.mbps, 200)


@pytest.mark.parametrize(
    ("sent", "target", "short"),
    [
        (156.0, 200.0, True),
        (189.9, 200.0, True),
        (190.0, 200.0, False),  # exactly 95 %: on target
        (199.97, 200.0, False),
        (250.0, 200.0, False),
        (0.0, 200.0, True),
        (12.0, 0.0, False),  # no target (as fast as possible): never short
    ],
)
def test_short_of_target_rule(sent: float, target: float, short: bool) -> None:
    assert cb.short_of_target(sent, target) is short
    assert cb.SHORT_OF_TARGET == 0.95
