"""An ipywidgets chat panel with benchmark controls for one worker.

::

    panel = ChatPanel(worker)   # in a notebook cell; the last expression displays it
    panel.send("hello")         # the same as typing and pressing "Send"

The panel follows :meth:`Worker.events` in a task of the running event loop (the notebook's),
so status, incoming chat, delivery marks and benchmark progress show up as they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from typing import Any

from p2plab.aio.worker import Worker

__all__ = ["ChatPanel"]

log = logging.getLogger(__name__)

_MAX_LINES = 200


class ChatPanel:
    """Chat log, input, status line and benchmark controls for ``worker``."""

    def __init__(self, worker: Worker, *, title: str | None = None) -> None:
        import ipywidgets as w  # type: ignore[import-untyped]

        self.worker = worker
        self.lines: list[dict[str, Any]] = []
        """Chat log entries: ``{"id", "direction", "text", "delivered"}``."""
        self.last_result: Any = None
        """The last benchmark result dict (``benchmark_result`` message) seen."""
        self.errors: list[str] = []
        """Errors shown to the user (failed sends, failed benchmarks)."""
        name = title or f"worker {worker.worker_id[:8]}"
        self.header = w.HTML(f"<b>{html.escape(name)}</b>")
        self.status_line = w.HTML()
        self.log_view = w.HTML(
            layout=w.Layout(height="180px", overflow="auto", border="1px solid #ccc")
        )
        self.text = w.Text(placeholder="message", layout=w.Layout(width="70%"))
        self.send_button = w.Button(description="Send", button_style="primary")
        self.send_button.on_click(lambda _: self.send())
        self.duration = w.BoundedFloatText(value=2.0, min=0.2, max=600, description="seconds")
        self.payload = w.BoundedIntText(value=1200, min=64, max=65507, description="bytes")
        self.rate = w.BoundedFloatText(value=0.0, min=0, max=100000, description="Mbit/s")
        self.bench_button = w.Button(description="Run benchmark")
        self.bench_button.on_click(lambda _: self.start_benchmark())
        self.bench_view = w.HTML()
        self.widget = w.VBox(
            [
                self.header,
                self.status_line,
                self.log_view,
                w.HBox([self.text, self.send_button]),
                w.HBox([self.duration, self.payload, self.rate]),
                w.HBox([self.bench_button, self.bench_view]),
            ]
        )
        self._bench_task: asyncio.Task[Any] | None = None
        self._render_status(worker.status())
        self._queue = worker.ui_subscribe()
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
            out.append(f"<div>{arrow} {html.escape(line['text'])}{mark}</div>")
        self.log_view.value = "".join(out)

    # -- chat -----------------------------------------------------------------------------------

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
        self._render_result(result.to_dict())
        return result

    def _render_result(self, r: dict[str, Any]) -> None:
        self.last_result = r
        self.bench_view.value = (
            f"{r.get('payload_size')} B: sent {r.get('sent_mbps', r.get('mbps', 0)):.1f} Mbit/s, "
            f"received {r.get('received_mbps', 0):.1f} Mbit/s, "
            f"lost {r.get('lost_percent', 0):.2f} %, jitter {r.get('jitter_ms', 0):.3f} ms"
        )

    # -- events ---------------------------------------------------------------------------------

    def handle(self, msg: dict[str, Any]) -> None:
        """Apply one UI message from the worker to the widgets."""
        kind = msg.get("type")
        if kind == "status":
            self._render_status(msg)
        elif kind == "chat":
            self.lines.append(
                {
                    "id": msg.get("id"),
                    "direction": msg.get("direction"),
                    "text": str(msg.get("text", "")),
                    "delivered": False,
                }
            )
            self._render_log()
        elif kind == "chat_delivered":
            for line in self.lines:
                if line["id"] == msg.get("id"):
                    line["delivered"] = True
            self._render_log()
        elif kind == "benchmark_progress":
            self.bench_view.value = (
                f"{msg.get('elapsed_s', 0):.1f} s: {msg.get('mbps', 0):.1f} Mbit/s, "
                f"lost {msg.get('lost', 0)}"
            )
        elif kind == "benchmark_result" and msg.get("role") == "sender":
            self._render_result(msg)
        elif kind == "error":
            self._error(str(msg.get("message", "")))

    async def _follow(self) -> None:
        while True:
            msg = await self._queue.get()
            try:
                self.handle(msg)
            except Exception:  # a display glitch must not stop the panel
                log.exception("chat panel: cannot show %r", msg)

    def close(self) -> None:
        """Stop following the worker and close the widgets."""
        self._task.cancel()
        self.worker.ui_unsubscribe(self._queue)
        if self._bench_task is not None:
            self._bench_task.cancel()
        with contextlib.suppress(Exception):
            self.widget.close()
