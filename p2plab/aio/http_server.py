"""uvicorn embedded in the running event loop (the worker's page, the rendezvous).

``uvicorn.Server.serve()`` captures SIGINT/SIGTERM while it runs; an embedded server must not:
the CLI, a notebook kernel or the test runner owns the signals.  :class:`EmbeddedServer` turns
that off through uvicorn's own ``capture_signals`` hook instead of calling its private
``_serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

__all__ = ["EmbeddedServer"]

log = logging.getLogger(__name__)


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server run as a task of the current loop; signals stay with the caller unless
    ``handle_signals`` (the rendezvous run as its own process)."""

    def __init__(self, config: uvicorn.Config, *, handle_signals: bool = False) -> None:
        super().__init__(config)
        self.handle_signals = handle_signals
        self.task: asyncio.Task[None] | None = None
        """The serving task (set by :meth:`start`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if self.handle_signals:
            with super().capture_signals():
                yield
        else:
            yield

    async def start(self, sock: socket.socket, *, name: str) -> None:
        """Serve on the bound, listening ``sock``; returns once uvicorn says it started, raises
        the startup error if it stopped first."""
        self.task = asyncio.get_running_loop().create_task(self.serve(sockets=[sock]), name=name)
        while not self.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError(f"{name}: HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self, timeout: float = 3.0) -> None:
        """Ask uvicorn to shut down gracefully; force it after ``timeout`` seconds (its graceful
        shutdown is bounded, an application's lifespan shutdown is not).  Bounded in all."""
        task = self.task
        if task is None:
            return
        self.should_exit = True
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            log.warning(
                "HTTP server %s did not stop in %.0f s; forcing it", task.get_name(), timeout
            )
            self.force_exit = True
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)
        if task.done() and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()
