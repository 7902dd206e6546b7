"""The benchmark's control protocol, sans-I/O: layered on the session like H3 on QUIC.

A benchmark run is coordinated with small JSON control messages carried by the session's
reliable control channel (``PeerSession.send_control``)::

    driving end                                  answering end
    bench_start {run_id, mode, params}  ->       StartReceived: arm a receiver / responder
                                        <-       bench_ready {run_id, ...} (or with "error")
    ... datagrams (not this module) ...
                                        <-       bench_interval {run_id, record}  (each interval)
    bench_end {run_id, packets_sent}    ->       EndReceived: close the books
                                        <-       bench_report {run_id, report}

    bench_request {run_id, params}      ->       RequestReceived: the peer should send to us
                                        <-       bench_start ... (a run the other way)
                                        <-       bench_refused {run_id, error} (cannot serve)
    bench_stop {run_id}                 ->       StopReceived: the sender ends its stream early
    bench_finished {run_id: 0}          ->       FinishedReceived: ``p2plab bench`` is done

:class:`BenchControl` has no I/O and reads no clock, like aioquic's ``H3Connection``: the
driver passes ``now`` in, sends what :meth:`BenchControl.controls_to_send` returns with the
link's reliable ``send_control``, arms one timer at :meth:`BenchControl.get_timer`, calls
:meth:`BenchControl.handle_timer` when it fires and drains :meth:`BenchControl.next_event`.

Waits and retries live here.  A ``bench_start`` unanswered for ``start_retry_s`` is sent again
(the answering end answers a repeated start with the ``bench_ready`` it already sent, so the
repeat is harmless); a wait that runs past its timeout ends in :class:`RunFailed`.  A control
message the link refuses because it is not connected yet (the peer's first messages can arrive
in the instant before the driver calls itself connected) goes back to the front of the queue
(:meth:`BenchControl.send_failed`) and is retried every ``send_retry_s`` for ``send_patience_s``.
A timeout measures the peer's silence while we listened: a wait whose timer runs ``stall_s``
(0.5 s) or more after its deadline (the driver's event loop was held meanwhile, e.g. by a
blocking call in a notebook) gets ``stall_grace_s`` (2 s) more, since its answer may already
wait unread in the socket (``stats["stalls"]``).
Malformed messages from the peer are dropped and counted (``stats["dropped"]``), never raised.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONTROL_TYPES",
    "BenchControl",
    "ControlConfig",
    "ControlEvent",
    "EndReceived",
    "FinishedReceived",
    "IntervalReceived",
    "ReadyReceived",
    "ReportReceived",
    "RequestReceived",
    "RunFailed",
    "StartReceived",
    "StopReceived",
]

CONTROL_TYPES = frozenset(
    {
        "bench_start",
        "bench_ready",
        "bench_end",
        "bench_report",
        "bench_interval",
        "bench_request",
        "bench_stop",
        "bench_refused",
        "bench_finished",
    }
)
"""Control message ``type`` values of the benchmark protocol."""

_ANSWERS_KEPT = 16  # answered bench_start run ids remembered, to answer repeats the same way


@dataclass(frozen=True)
class ControlConfig:
    """Timing of the benchmark control protocol (seconds of the driver's clock)."""

    start_retry_s: float = 1.0
    """A ``bench_start`` without ``bench_ready`` for this long is sent again."""

    send_retry_s: float = 0.02
    """A control message the link refused (not connected yet) is retried this often..."""

    send_patience_s: float = 2.0
    """... for this long; then the queued messages are dropped (``stats["unsendable"]``)."""

    stall_s: float = 0.5
    """A wait's timer that runs this long after its deadline shows the driver did not run
    meanwhile (its event loop was held; a healthy one runs a timer within milliseconds): the
    answer may be waiting unread, so..."""

    stall_grace_s: float = 2.0
    """... the wait gets this long more, from that late timer, before it fails (the answering
    end of a throughput run reports up to 1 s after ``bench_end``, held as long as we were)."""


@dataclass(frozen=True)
class ControlEvent:
    """Base class of the benchmark control protocol's events."""


@dataclass(frozen=True)
class StartReceived(ControlEvent):
    """The peer starts a run towards us: arm for it, then call :meth:`BenchControl.answer_start`."""

    run_id: int
    """The run's id."""

    params: dict[str, Any]
    """The whole ``bench_start`` message (mode, payload_size, encrypted, count, ...)."""


@dataclass(frozen=True)
class ReadyReceived(ControlEvent):
    """The peer answered our ``bench_start`` with a ``bench_ready`` without an error."""

    run_id: int
    """The run's id."""

    answer: dict[str, Any]
    """The whole ``bench_ready`` message (window, gro, encrypted, blocking, ...)."""


@dataclass(frozen=True)
class ReportReceived(ControlEvent):
    """The peer's receiver report of a run we sent (after our ``bench_end``)."""

    run_id: int
    """The run's id."""

    report: dict[str, Any]
    """The report (``ReceiverReport.to_dict()`` form)."""


@dataclass(frozen=True)
class IntervalReceived(ControlEvent):
    """One closed interval of the peer's receiver (``bench_interval``)."""

    run_id: int
    """The run's id."""

    record: dict[str, Any]
    """The whole ``bench_interval`` message (``IntervalRecord.to_dict()`` fields)."""


@dataclass(frozen=True)
class EndReceived(ControlEvent):
    """The peer ended a run it sent to us (``bench_end``)."""

    run_id: int
    """The run's id."""

    params: dict[str, Any]
    """The whole ``bench_end`` message (packets_sent, bytes_sent, duration_s, mode, ...)."""


@dataclass(frozen=True)
class RequestReceived(ControlEvent):
    """The peer asks us to send a run to it (``bench_request``)."""

    run_id: int
    """The run's id (the run we send uses it)."""

    params: dict[str, Any]
    """The whole ``bench_request`` message (duration_s, payload_size, rate_mbps, ...)."""


@dataclass(frozen=True)
class StopReceived(ControlEvent):
    """The peer asks the sending end to end its stream now (``bench_stop``)."""

    run_id: int
    """The run to stop."""


@dataclass(frozen=True)
class FinishedReceived(ControlEvent):
    """The peer is done with benchmarks (``bench_finished``; ``p2plab bench`` waits for it)."""


@dataclass(frozen=True)
class RunFailed(ControlEvent):
    """A wait of ours ended without the answer: refused by the peer, or timed out."""

    run_id: int
    """The run's id."""

    waiting_for: str
    """What we waited for: ``"bench_ready"``, ``"bench_report"`` or ``"bench_request"``."""

    reason: str
    """Why, in words (shown to the user)."""

    refused: bool
    """True when the peer said no (False: no answer in time)."""


@dataclass
class _Wait:
    deadline: float
    timeout_s: float
    resend: dict[str, Any] | None = None  # sent again every start_retry_s while waiting
    next_resend: float = float("inf")


@dataclass
class _Outbox:
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    blocked: bool = False  # the link refused a message; hold the queue until retry_at
    first_refusal: float | None = None  # since when the link refuses (patience runs from here)
    retry_at: float | None = None


class BenchControl:
    """One worker's end of the benchmark control protocol over one peer link."""

    def __init__(self, config: ControlConfig | None = None) -> None:
        self.config = config or ControlConfig()
        self.stats: dict[str, int] = {
            "dropped": 0,
            "late": 0,
            "unsendable": 0,
            "resent": 0,
            "stalls": 0,
        }
        """``dropped``: malformed messages; ``late``: answers nobody waits for any more;
        ``unsendable``: messages given up on; ``resent``: repeated ``bench_start``; ``stalls``:
        waits extended because their timer ran late (``ControlConfig.stall_s``)."""
        self._events: deque[ControlEvent] = deque()
        self._out = _Outbox()
        self._waits: dict[tuple[str, int], _Wait] = {}
        self._answers: OrderedDict[int, dict[str, Any] | None] = OrderedDict()

    # -- what the driving end does --------------------------------------------------------------

    def start(self, params: dict[str, Any], now: float, timeout_s: float) -> None:
        """Send ``bench_start`` (``params`` without ``type``; needs ``run_id``) and wait for
        ``bench_ready``: :class:`ReadyReceived`, or :class:`RunFailed` after ``timeout_s``."""
        msg = {"type": "bench_start", **params}
        run_id = int(msg["run_id"])
        self._queue(msg)
        self._waits[("bench_ready", run_id)] = _Wait(
            deadline=now + timeout_s,
            timeout_s=timeout_s,
            resend=msg,
            next_resend=now + self.config.start_retry_s,
        )

    def end(self, params: dict[str, Any], now: float, timeout_s: float) -> None:
        """Send ``bench_end`` and wait for the report: :class:`ReportReceived` or
        :class:`RunFailed` after ``timeout_s``.  RTT runs (``mode="rtt"``) expect no report."""
        msg = {"type": "bench_end", **params}
        run_id = int(msg["run_id"])
        self._waits.pop(("bench_ready", run_id), None)
        if msg.get("mode") != "rtt":
            self._waits[("bench_report", run_id)] = _Wait(now + timeout_s, timeout_s)
        self._queue(msg)

    def request(self, params: dict[str, Any], now: float, timeout_s: float) -> None:
        """Ask the peer to send us a run (``bench_request``): its ``bench_start`` ends the wait
        (as :class:`StartReceived`); ``bench_refused`` or ``timeout_s`` is :class:`RunFailed`."""
        msg = {"type": "bench_request", **params}
        run_id = int(msg["run_id"])
        self._waits[("bench_request", run_id)] = _Wait(now + timeout_s, timeout_s)
        self._queue(msg)

    def cancel(self, run_id: int) -> None:
        """Stop waiting for anything about ``run_id`` (its driver gave up)."""
        for kind in ("bench_ready", "bench_report", "bench_request"):
            self._waits.pop((kind, run_id), None)

    # -- what the answering end does ------------------------------------------------------------

    def answer_start(self, run_id: int, ready: dict[str, Any]) -> None:
        """Answer a :class:`StartReceived` with ``bench_ready`` (``ready`` without ``type``;
        an ``error`` key refuses).  A repeated ``bench_start`` gets this same answer."""
        msg = {"type": "bench_ready", "run_id": run_id, **ready}
        self._remember(run_id, msg)
        self._queue(msg)

    def refuse_request(self, run_id: int, reason: str) -> None:
        """Answer a :class:`RequestReceived` we cannot serve."""
        self._queue({"type": "bench_refused", "run_id": run_id, "error": reason})

    def send(self, obj: dict[str, Any]) -> None:
        """Queue any other benchmark control message (interval, report, stop, finished)."""
        if obj.get("type") not in CONTROL_TYPES:
            raise ValueError(f"not a benchmark control message: {obj.get('type')!r}")
        self._queue(dict(obj))

    # -- input from the link -------------------------------------------------------------------

    def handle_control(self, obj: dict[str, Any], now: float) -> None:
        """A control message from the peer whose ``type`` is in :data:`CONTROL_TYPES`."""
        kind = obj.get("type")
        try:
            run_id = int(obj.get("run_id", 0) if kind == "bench_finished" else obj["run_id"])
        except (KeyError, TypeError, ValueError):
            self.stats["dropped"] += 1
            return
        if kind == "bench_start":
            self._on_start(run_id, obj)
        elif kind == "bench_ready":
            if self._waits.pop(("bench_ready", run_id), None) is None:
                self.stats["late"] += 1
            elif obj.get("error"):
                reason = f"peer refused bench_start: {obj['error']}"
                self._events.append(RunFailed(run_id, "bench_ready", reason, refused=True))
            else:
                self._events.append(ReadyReceived(run_id, dict(obj)))
        elif kind == "bench_report":
            report = obj.get("report")
            if not isinstance(report, dict):
                self.stats["dropped"] += 1
            elif self._waits.pop(("bench_report", run_id), None) is None:
                self.stats["late"] += 1
            else:
                self._events.append(ReportReceived(run_id, report))
        elif kind == "bench_interval":
            self._events.append(IntervalReceived(run_id, dict(obj)))
        elif kind == "bench_end":
            self._events.append(EndReceived(run_id, dict(obj)))
        elif kind == "bench_request":
            self._events.append(RequestReceived(run_id, dict(obj)))
        elif kind == "bench_refused":
            if self._waits.pop(("bench_request", run_id), None) is None:
                self.stats["late"] += 1
            else:
                reason = f"the peer refused to send: {obj.get('error')}"
                self._events.append(RunFailed(run_id, "bench_request", reason, refused=True))
        elif kind == "bench_stop":
            self._events.append(StopReceived(run_id))
        elif kind == "bench_finished":
            self._events.append(FinishedReceived())
        else:
            self.stats["dropped"] += 1

    def _on_start(self, run_id: int, obj: dict[str, Any]) -> None:
        if run_id in self._answers:
            answer = self._answers[run_id]
            if answer is not None:  # a repeat of a start we answered: the same answer again
                self._queue(dict(answer))
            return  # a repeat of a start the driver has not answered yet
        self._remember(run_id, None)
        self._waits.pop(("bench_request", run_id), None)  # the run we asked for begins
        self._events.append(StartReceived(run_id, dict(obj)))

    def _remember(self, run_id: int, answer: dict[str, Any] | None) -> None:
        self._answers[run_id] = answer
        self._answers.move_to_end(run_id)
        while len(self._answers) > _ANSWERS_KEPT:
            self._answers.popitem(last=False)

    # -- output --------------------------------------------------------------------------------

    def _queue(self, msg: dict[str, Any]) -> None:
        self._out.queue.append(msg)

    def controls_to_send(self) -> list[dict[str, Any]]:
        """The control messages to send now, in order (none while the link refuses them)."""
        out = self._out
        if out.blocked:
            return []
        msgs = list(out.queue)
        out.queue.clear()
        return msgs

    def send_failed(self, unsent: list[dict[str, Any]], now: float) -> None:
        """The link refused ``unsent[0]`` (not connected yet); ``unsent`` were not sent.

        They go back to the front of the queue and are retried every ``send_retry_s``, for at
        most ``send_patience_s`` from the first refusal.
        """
        out = self._out
        out.queue.extendleft(reversed(unsent))
        if out.first_refusal is None:
            out.first_refusal = now
        if now - out.first_refusal > self.config.send_patience_s:
            self.stats["unsendable"] += len(out.queue)
            out.queue.clear()
            out.blocked, out.first_refusal, out.retry_at = False, None, None
            return
        out.blocked = True
        out.retry_at = now + self.config.send_retry_s

    def sent_ok(self) -> None:
        """Everything :meth:`controls_to_send` returned went out: the link takes messages."""
        self._out.first_refusal = None

    def next_event(self) -> ControlEvent | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    # -- timers --------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next (None: no timer)."""
        times = [w.deadline for w in self._waits.values()]
        times += [w.next_resend for w in self._waits.values() if w.resend is not None]
        if self._out.retry_at is not None:
            times.append(self._out.retry_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Fire what is due: timeouts (:class:`RunFailed`), repeated starts, send retries."""
        out = self._out
        if out.retry_at is not None and now >= out.retry_at:
            # The driver tries the queue again; send_failed blocks it again if still refused.
            out.retry_at = None
            out.blocked = False
        for key, wait in list(self._waits.items()):
            kind, run_id = key
            if now - wait.deadline >= self.config.stall_s:
                # Due long ago: we were not running, so not reading either (our stall, not
                # the peer's silence); its answer may be in the socket, read after this timer.
                wait.deadline = now + self.config.stall_grace_s
                self.stats["stalls"] += 1
            elif now >= wait.deadline:
                del self._waits[key]
                self._events.append(RunFailed(run_id, kind, _timeout_reason(kind, wait), False))
            elif wait.resend is not None and now >= wait.next_resend:
                self.stats["resent"] += 1
                self._queue(dict(wait.resend))
                wait.next_resend = now + self.config.start_retry_s


def _timeout_reason(kind: str, wait: _Wait) -> str:
    if kind == "bench_ready":
        return f"peer did not answer bench_start with bench_ready in {wait.timeout_s} s"
    if kind == "bench_request":
        return f"peer did not answer bench_request in {wait.timeout_s} s"
    return f"no {kind} within {wait.timeout_s:.1f} s"
