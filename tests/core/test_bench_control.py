"""The benchmark's sans-I/O control protocol: two ends wired together in memory, a fake clock."""

from __future__ import annotations

from typing import Any

from p2plab.core.bench.control import (
    BenchControl,
    ControlConfig,
    ControlEvent,
    EndReceived,
    FinishedReceived,
    IntervalReceived,
    ReadyReceived,
    ReportReceived,
    RequestReceived,
    RunFailed,
    StartReceived,
    StopReceived,
)


class Wire:
    """Two controls; ``pump`` carries what each sends to the other (optionally dropping some)."""

    def __init__(self) -> None:
        self.a = BenchControl(ControlConfig(start_retry_s=1.0))
        self.b = BenchControl(ControlConfig(start_retry_s=1.0))
        self.now = 0.0
        self.drop: set[str] = set()
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for src, dst, name in ((self.a, self.b, "a"), (self.b, self.a, "b")):
                for msg in src.controls_to_send():
                    moved = True
                    self.sent.append((name, msg))
                    if msg["type"] not in self.drop:
                        dst.handle_control(msg, self.now)
                src.sent_ok()

    def advance(self, dt: float) -> None:
        """Move the clock, firing both ends' timers as they fall due."""
        end = self.now + dt
        while True:
            due = [t for t in (self.a.get_timer(), self.b.get_timer()) if t is not None]
            if not due or min(due) > end:
                break
            self.now = max(self.now, min(due))
            for c in (self.a, self.b):
                t = c.get_timer()
                if t is not None and t <= self.now:
                    c.handle_timer(self.now)
            self.pump()
        self.now = end


def drain(c: BenchControl) -> list[ControlEvent]:
    out = []
    while (e := c.next_event()) is not None:
        out.append(e)
    return out


def test_start_ready_end_report_round_trip() -> None:
    w = Wire()
    w.a.start({"run_id": 7, "mode": "throughput", "payload_size": 1200}, w.now, 3.0)
    w.pump()
    (start,) = drain(w.b)
    assert isinstance(start, StartReceived) and start.run_id == 7
    assert start.params["payload_size"] == 1200
    w.b.answer_start(7, {"window": 64, "gro": False})
    w.pump()
    (ready,) = drain(w.a)
    assert isinstance(ready, ReadyReceived) and ready.answer["window"] == 64
    assert w.a.get_timer() is None  # no wait left, no retry pending

    w.b.send({"type": "bench_interval", "run_id": 7, "t_end": 1.0, "mbps": 5.0, "lost": 0})
    w.a.end({"run_id": 7, "packets_sent": 10}, w.now, 3.0)
    w.pump()
    (interval,) = drain(w.a)
    assert isinstance(interval, IntervalReceived) and interval.record["mbps"] == 5.0
    (end,) = drain(w.b)
    assert isinstance(end, EndReceived) and end.params["packets_sent"] == 10
    w.b.send({"type": "bench_report", "run_id": 7, "report": {"packets_received": 10}})
    w.pump()
    (report,) = drain(w.a)
    assert isinstance(report, ReportReceived) and report.report == {"packets_received": 10}
    assert w.a.get_timer() is None and w.b.get_timer() is None
    w.advance(10.0)
    assert drain(w.a) == [] and drain(w.b) == []


def test_refused_start_is_a_failure_with_the_reason() -> None:
    w = Wire()
    w.a.start({"run_id": 3, "mode": "throughput"}, w.now, 3.0)
    w.pump()
    drain(w.b)
    w.b.answer_start(3, {"error": "this end has no encrypting sealer for the link"})
    w.pump()
    (failed,) = drain(w.a)
    assert isinstance(failed, RunFailed) and failed.refused and failed.waiting_for == "bench_ready"
    assert "no encrypting sealer" in failed.reason


def test_refused_request() -> None:
    w = Wire()
    w.a.request({"run_id": 5, "duration_s": 1, "payload_size": 200}, w.now, 3.0)
    w.pump()
    (req,) = drain(w.b)
    assert isinstance(req, RequestReceived) and req.params["payload_size"] == 200
    w.b.refuse_request(5, "a benchmark is already running on this end")
    w.pump()
    (failed,) = drain(w.a)
    assert isinstance(failed, RunFailed) and failed.refused
    assert failed.reason == "the peer refused to send: a benchmark is already running on this end"
    w.advance(10.0)
    assert drain(w.a) == []  # the wait ended: no timeout later


def test_accepted_request_ends_its_wait_with_the_peers_start() -> None:
    w = Wire()
    w.a.request({"run_id": 5, "duration_s": 1, "payload_size": 200}, w.now, 3.0)
    w.pump()
    drain(w.b)
    w.b.start({"run_id": 5, "mode": "throughput"}, w.now, 3.0)
    w.pump()
    (start,) = drain(w.a)
    assert isinstance(start, StartReceived) and start.run_id == 5
    w.advance(10.0)
    assert not [e for e in drain(w.a) if isinstance(e, RunFailed)]


def test_lost_ready_is_retried_then_times_out() -> None:
    w = Wire()
    w.drop = {"bench_ready"}
    w.a.start({"run_id": 9, "mode": "throughput"}, w.now, 3.0)
    w.pump()
    (start,) = drain(w.b)
    assert isinstance(start, StartReceived)
    w.b.answer_start(9, {"window": 16})
    w.pump()
    w.advance(2.5)
    starts = [m for who, m in w.sent if who == "a" and m["type"] == "bench_start"]
    readies = [m for who, m in w.sent if who == "b" and m["type"] == "bench_ready"]
    assert len(starts) == 3  # the first and two repeats, one a second
    assert len(readies) == 3  # each repeat answered the same way, without a new event
    assert all(r == readies[0] for r in readies)
    assert drain(w.b) == [] and drain(w.a) == []
    w.advance(1.0)
    (failed,) = drain(w.a)
    assert isinstance(failed, RunFailed) and not failed.refused
    assert failed.reason == "peer did not answer bench_start with bench_ready in 3.0 s"
    assert w.a.get_timer() is None


def test_lost_ready_recovered_by_a_repeat() -> None:
    w = Wire()
    w.drop = {"bench_ready"}
    w.a.start({"run_id": 9, "mode": "rtt"}, w.now, 3.0)
    w.pump()
    drain(w.b)
    w.b.answer_start(9, {"blocking": True})
    w.pump()
    w.drop = set()
    w.advance(1.5)
    (ready,) = drain(w.a)
    assert isinstance(ready, ReadyReceived) and ready.answer["blocking"] is True
    assert w.a.stats["resent"] == 1


def test_missing_report_times_out() -> None:
    w = Wire()
    w.a.end({"run_id": 4, "packets_sent": 1}, w.now, 2.0)
    w.pump()
    w.advance(2.5)
    (failed,) = drain(w.a)
    assert isinstance(failed, RunFailed) and failed.waiting_for == "bench_report"
    assert failed.reason == "no bench_report within 2.0 s"


def test_a_late_timer_is_our_stall_not_the_peers_silence() -> None:
    """A wait's timer that runs long after its deadline (the driver's loop was held): the
    answer may be waiting unread, so the wait gets stall_grace_s more instead of failing."""
    w = Wire()
    w.a.end({"run_id": 4, "packets_sent": 1}, w.now, 10.0)
    w.pump()
    w.now = 14.5  # the loop was held 4.5 s past the deadline
    w.a.handle_timer(w.now)
    assert drain(w.a) == [] and w.a.stats["stalls"] == 1
    assert w.a.get_timer() == 16.5
    w.b.send({"type": "bench_report", "run_id": 4, "report": {"packets_sent": 1}})
    w.pump()  # the answer, read after the late timer
    (report,) = drain(w.a)
    assert isinstance(report, ReportReceived) and w.a.get_timer() is None
    # without an answer the extended wait fails at its new deadline, on time
    w.a.end({"run_id": 5, "packets_sent": 1}, w.now, 10.0)
    w.now += 11.5
    w.a.handle_timer(w.now)
    assert drain(w.a) == [] and w.a.stats["stalls"] == 2
    w.now += 2.0
    w.a.handle_timer(w.now)
    (failed,) = drain(w.a)
    assert isinstance(failed, RunFailed) and failed.reason == "no bench_report within 10.0 s"


def test_rtt_end_expects_no_report() -> None:
    w = Wire()
    w.a.end({"run_id": 4, "mode": "rtt"}, w.now, 2.0)
    w.pump()
    assert w.a.get_timer() is None
    (end,) = drain(w.b)
    assert isinstance(end, EndReceived) and end.params["mode"] == "rtt"


def test_stop_and_finished() -> None:
    w = Wire()
    w.b.send({"type": "bench_stop", "run_id": 8})
    w.b.send({"type": "bench_finished", "run_id": 0})
    w.pump()
    assert drain(w.a) == [StopReceived(8), FinishedReceived()]


def test_bad_messages_are_dropped_and_counted() -> None:
    c = BenchControl()
    c.handle_control({"type": "bench_start"}, 0.0)
    c.handle_control({"type": "bench_ready", "run_id": "x"}, 0.0)
    c.handle_control({"type": "bench_report", "run_id": 1, "report": "nope"}, 0.0)
    assert c.stats["dropped"] == 3
    c.handle_control({"type": "bench_ready", "run_id": 1}, 0.0)  # nobody waits for it
    assert c.stats["late"] == 1
    assert drain(c) == []


def test_refused_sends_are_retried_in_order_then_given_up() -> None:
    c = BenchControl(ControlConfig(send_retry_s=0.02, send_patience_s=0.1))
    c.answer_start(1, {"window": 4})
    c.send({"type": "bench_interval", "run_id": 1})
    msgs = c.controls_to_send()
    assert [m["type"] for m in msgs] == ["bench_ready", "bench_interval"]
    c.send_failed(msgs, 0.0)  # the link is not connected yet
    assert c.controls_to_send() == []  # held until the retry
    assert c.get_timer() == 0.02
    c.handle_timer(0.02)
    again = c.controls_to_send()
    assert again == msgs  # same order
    c.send_failed(again[1:], 0.03)  # the first one went out
    c.handle_timer(0.05)
    c.send_failed(c.controls_to_send(), 0.05)
    c.handle_timer(0.2)
    c.send_failed(c.controls_to_send(), 0.2)  # past patience: given up
    assert c.stats["unsendable"] == 1
    assert c.controls_to_send() == [] and c.get_timer() is None
