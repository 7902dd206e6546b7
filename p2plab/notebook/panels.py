"""An ipywidgets chat panel with benchmark controls for one worker.

::

    panel = ChatPanel(worker)   # in a notebook cell; the last expression displays it
    panel.send("hello")         # the same as typing and pressing Enter or "Send"
    print(panel.transcript())   # the chat log as text

The panel follows the worker's UI messages in a task of the running event loop (the notebook's),
so status, incoming chat, delivery marks and benchmark progress show up as they happen; a panel
created later starts with the worker's recent chat and results.  Each result is labelled with
its run id and direction: both workers publish every run, so a panel shows the peer's runs too.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from typing import Any

from p2plab.aio.worker import Worker
from p2plab.notebook.live_chart import LiveChart

__all__ = ["ChatPanel"]

log = logging.getLogger(__name__)

_MAX_LINES = 200
_MAX_RUNS_SHOWN = 5


class ChatPanel:
    """Chat log, input, status line and benchmark controls for ``worker``."""

    def __init__(self, worker: Worker, *, title: str | None = None) -> None:
        import ipywidgets as w  # type: ignore[import-untyped]

        self.worker = worker
        self.lines: list[dict[str, Any]] = []
        """Chat log entries: ``{"id", "direction", "text", "delivered"}``."""
        self.last_result: Any = None
        """The last benchmark result dict (``benchmark_result`` message) seen."""
        self.runs: dict[str, dict[str, dict[str, Any]]] = {}
        """Result rows seen, by run id then role (``sender``, ``receiver``), oldest run first."""
        self.errors: list[str] = []
        """Errors shown to the user (failed sends, failed benchmarks)."""
        name = title or f"worker {worker.worker_id[:8]}"
        self.header = w.HTML(f"<b>{html.escape(name)}</b>")
        self.status_line = w.HTML()
        self.log_view = w.HTML(
            layout=w.Layout(height="180px", overflow="auto", border="1px solid #ccc")
        )
        # Enter sends.  ipywidgets 8 deprecates Text.on_submit, and rightly: its "submit" message
        # overtakes the value updates the front end holds back while the kernel is busy, so it
        # sent a stale prefix of what was typed.  With continuous_update=False the value arrives
        # whole, when Enter commits it (or when the box loses focus, which sends it too).
        self.text = w.Text(
            placeholder="message (Enter sends)",
            continuous_update=False,
            layout=w.Layout(width="70%"),
        )
        self.text.observe(self._on_text_committed, names="value")
        self.send_button = w.Button(description="Send", button_style="primary")
        self.send_button.on_click(lambda _: self.send())
        self.duration = w.BoundedFloatText(value=2.0, min=0.2, max=600, description="seconds")
        self.payload = w.BoundedIntText(value=1200, min=64, max=65507, description="bytes")
        self.rate = w.BoundedFloatText(value=0.0, min=0, max=100000, description="Mbit/s")
        self.bench_button = w.Button(description="Run benchmark")
        self.bench_button.on_click(lambda _: self.start_benchmark())
        self.bench_view = w.HTML()
        self.chart = LiveChart()
        """The live throughput chart of the current run."""
        self.results_view = w.HTML()
        self.widget = w.VBox(
            [
                self.header,
                self.status_line,
                self.log_view,
                w.HBox([self.text, self.send_button]),
                w.HBox([self.duration, self.payload, self.rate]),
                w.HBox([self.bench_button, self.bench_view]),
                self.chart.image,
                self.results_view,
            ]
        )
        self._bench_task: asyncio.Task[Any] | None = None
        self._render_status(worker.status())
        self._queue = worker.ui_subscribe()
        for msg in worker.ui_history():  # taken with the subscription: nothing in between
            self._handle_safely(msg)
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="chat-panel")

    # -- display ------------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _render_status(self, status: dict[str, Any]) -> None:
        peer = status.get("peer") or {}
        parts = [f"state <b>{html.escape(str(status.get('state')))}</b>"]
        if status.get("udp_public"):
            parts.append(f"public {html.escape(str(status['udp_public']))}")
        if peer.get("endpoint"):
            parts.append(f"peer {html.escape(str(peer['endpoint']))}")
        if peer.get("rtt_ms") is not None:
            parts.append(f"RTT {peer['rtt_ms']:.2f} ms")
        self.status_line.value = " &middot; ".join(parts)

    def _render_log(self) -> None:
        out = []
        for line in self.lines[-_MAX_LINES:]:
            arrow = "&rarr;" if line["direction"] == "out" else "&larr;"
            mark = " &#10003;" if line.get("delivered") else ""
            failed = line.get("failed")
            if failed:
                mark = f" <span style='color:#d9534f'>not delivered: {html.escape(failed)}</span>"
            out.append(f"<div>{arrow} {html.escape(line['text'])}{mark}</div>")
        self.log_view.value = "".join(out)

    def transcript(self) -> str:
        """The chat log as text, one message a line (``->`` sent, ``<-`` received)."""
        out = []
        for line in self.lines[-_MAX_LINES:]:
            arrow = "->" if line["direction"] == "out" else "<-"
            mark = " (delivered)" if line.get("delivered") else ""
            if line.get("failed"):
                mark = f" (not delivered: {line['failed']})"
            out.append(f"{arrow} {line['text']}{mark}")
        return "\n".join(out)

    # -- chat -----------------------------------------------------------------------------------

    def _on_text_committed(self, change: dict[str, Any]) -> None:
        if change.get("new"):  # clearing the box after a send is a change too
            self.send()

    def send(self, text: str | None = None) -> str | None:
        """Send ``text`` (or what is typed in the input box); returns the message id."""
        message = self.text.value if text is None else text
        if not message:
            return None
        try:
            msg_id = self.worker.send_chat(message)
        except Exception as exc:
            self._error(f"not sent: {exc}")
            return None
        if text is None:
            self.text.value = ""
        return msg_id

    def _error(self, message: str) -> None:
        self.errors.append(message)
        self.bench_view.value = f"<span style='color:#d9534f'>{html.escape(message)}</span>"

    # -- benchmark --------------------------------------------------------------------------------

    def start_benchmark(self) -> asyncio.Task[Any]:
        """Start a run with the controls' settings in the background; returns its task."""
        if self._bench_task is not None and not self._bench_task.done():
            return self._bench_task
        self._bench_task = asyncio.get_running_loop().create_task(self.run_benchmark())
        return self._bench_task

    async def run_benchmark(self) -> Any:
        """Run one benchmark with the controls' settings; returns the :class:`BenchResult`."""
        from p2plab.aio.bench import Benchmark

        self.bench_button.disabled = True
        self.bench_view.value = "running..."
        try:
            result = await Benchmark(self.worker).run(
                float(self.duration.value), int(self.payload.value), float(self.rate.value)
            )
        except Exception as exc:
            self._error(f"benchmark failed: {exc}")
            return None
        finally:
            self.bench_button.disabled = False
        self._add_result(result.to_dict())
        if result.peer_view is not None:
            self._add_result(result.peer_view.to_dict())
        return result

    def _add_result(self, row: dict[str, Any]) -> None:
        """Keep one role's row of a run (a repeat replaces it) and show the run's line."""
        run_id, role = str(row.get("run_id")), str(row.get("role"))
        run = self.runs.pop(run_id, {})
        run[role] = dict(row)
        self.runs[run_id] = run  # newest last
        self.last_result = row
        self.chart.finish(run_id)
        self.bench_view.value = html.escape(self.result_line(run_id))
        lines = [self.result_line(rid) for rid in reversed(list(self.runs)[-_MAX_RUNS_SHOWN:])]
        self.results_view.value = "".join(f"<div>{html.escape(x)}</div>" for x in lines)

    def result_lines(self) -> list[str]:
        """One line per run seen, newest first (see :meth:`result_line`)."""
        return [self.result_line(rid) for rid in reversed(self.runs)]

    def result_line(self, run_id: str) -> str:
        """A run in words: its id, who sent to whom, the target, what was sent and received."""
        run = self.runs[run_id]
        snd, rcv = run.get("sender"), run.get("receiver")
        me = self.worker.worker_id
        any_row = snd or rcv or {}
        if snd is not None:
            outgoing = snd.get("local_worker") == me
        else:
            outgoing = any_row.get("peer_worker") == me
        direction = "this worker -> peer" if outgoing else "peer -> this worker"
        parts = [f"run {run_id}, {direction}: {any_row.get('payload_size')} B"]
        if snd is not None:
            target = _num(snd.get("rate_mbps"))
            parts.append(f"target {target:.1f} Mbit/s" if target else "as fast as possible")
            parts.append(f"sent {_num(snd.get('mbps')):.1f} Mbit/s")
        if rcv is not None:
            parts.append(f"received {_num(rcv.get('mbps')):.1f} Mbit/s")
            parts.append(f"lost {_num(rcv.get('lost_percent')):.2f} %")
            parts.append(f"jitter {_num(rcv.get('jitter_ms')):.3f} ms")
        else:
            parts.append("receiver's report missing")
        return ", ".join(parts)

    # -- events ---------------------------------------------------------------------------------

    def handle(self, msg: dict[str, Any]) -> None:
        """Apply one UI message from the worker to the widgets."""
        kind = msg.get("type")
        if kind == "status":
            self._render_status(msg)
        elif kind == "chat":
            if msg.get("id") is not None and any(x["id"] == msg.get("id") for x in self.lines):
                return  # already shown (history and live can overlap)
            self.lines.append(
                {
                    "id": msg.get("id"),
                    "direction": msg.get("direction"),
                    "text": str(msg.get("text", "")),
                    "delivered": bool(msg.get("delivered")),
                }
            )
            self._render_log()
        elif kind == "chat_delivered":
            for line in self.lines:
                if line["id"] == msg.get("id"):
                    line["delivered"] = True
            self._render_log()
        elif kind == "chat_failed":
            for line in self.lines:
                if line["id"] == msg.get("id"):
                    line["failed"] = str(msg.get("reason") or "failed")
            self._render_log()
        elif kind == "benchmark_progress":
            run_id = str(msg.get("run_id"))
            if run_id not in self.runs or run_id == self.chart.run_id:
                self.chart.add(msg)  # an older run's late interval must not take the chart back
            if run_id in self.runs:
                return  # a late interval of a finished run: its result line stays
            verb = "sent" if msg.get("role") == "sender" else "received"
            self.bench_view.value = html.escape(
                f"run {msg.get('run_id')}: {_num(msg.get('elapsed_s')):.1f} s, "
                f"{verb} {_num(msg.get('mbps')):.1f} Mbit/s"
            )
        elif kind == "benchmark_result":
            self._add_result({k: v for k, v in msg.items() if k != "type"})
        elif kind == "error":
            self._error(str(msg.get("message", "")))

    def _handle_safely(self, msg: dict[str, Any]) -> None:
        try:
            self.handle(msg)
        except Exception:  # a display glitch must not stop the panel
            log.exception("chat panel: cannot show %r", msg)

    async def _follow(self) -> None:
        while True:
            self._handle_safely(await self._queue.get())

    def close(self) -> None:
        """Stop following the worker and close the widgets."""
        self._task.cancel()
        self.worker.ui_unsubscribe(self._queue)
        if self._bench_task is not None:
            self._bench_task.cancel()
        self.chart.close()
        with contextlib.suppress(Exception):
            self.widget.close()


def _num(x: object) -> float:
    """A message's number, 0 when missing or not a number (the page's messages are not trusted)."""
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else 0.0
