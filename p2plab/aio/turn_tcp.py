"""The worker's TURN-over-TCP connection: carries out the link engine's ``OpenTurnTcp``,
``SendTurnTcp`` and ``CloseTurnTcp`` (:mod:`p2plab.core.link_commands`; issue 17).

Over UDP the engine's TURN allocation lives on the worker's own UDP socket and needs nothing
here.  Over TCP it needs one stream to the TURN server: this opens it (the host from the
``turn:`` URL is resolved by the loop's ``getaddrinfo``, never on the loop thread), writes what
the engine gives it and feeds back what the server sends, through three callbacks the worker
binds to ``engine.turn_tcp_connected``/``turn_tcp_received``/``turn_tcp_closed``.  Bounded:
the connect has a timeout, reads are at most 64 KiB at a time, and a write buffer above
1 MiB closes the connection (a server that stopped reading).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from p2plab.core.link_commands import CloseTurnTcp, Command, OpenTurnTcp, SendTurnTcp

__all__ = ["CONNECT_TIMEOUT_S", "TurnTcpConnection"]

log = logging.getLogger(__name__)

#: Seconds to resolve and connect before the engine hears ``turn_tcp_closed``.
CONNECT_TIMEOUT_S = 5.0
_READ_CHUNK = 65536
_MAX_BUFFERED = 1 << 20


class TurnTcpConnection:
    """One TCP connection to a TURN server at a time, driven by the engine's commands."""

    def __init__(
        self,
        on_connected: Callable[[], None],
        on_data: Callable[[bytes], None],
        on_closed: Callable[[str | None], None],
    ) -> None:
        self._on_connected = on_connected
        self._on_data = on_data
        self._on_closed = on_closed
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._generation = 0  # a late callback of a closed connection is ignored

    def command(self, cmd: Command) -> bool:
        """Carry out ``cmd`` if it is one of the TURN TCP commands (True), else False."""
        if isinstance(cmd, OpenTurnTcp):
            self.close()
            self._generation += 1
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(
                self._run(cmd.host, cmd.port, self._generation), name="worker-turn-tcp"
            )
        elif isinstance(cmd, SendTurnTcp):
            w = self._writer
            if w is not None and not w.is_closing():
                w.write(cmd.data)
                if w.transport.get_write_buffer_size() > _MAX_BUFFERED:
                    log.warning("TURN server does not read: closing the TCP connection")
                    self._closed(self._generation, "the TURN server stopped reading")
        elif isinstance(cmd, CloseTurnTcp):
            self.close()
        else:
            return False
        return True

    def close(self) -> None:
        """Close the connection (no ``on_closed`` for it)."""
        self._generation += 1
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self, host: str, port: int, gen: int) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            self._closed(gen, f"cannot connect to the TURN server {host}:{port}: {exc}")
            return
        if gen != self._generation:
            writer.close()
            return
        self._writer = writer
        self._on_connected()
        error: str | None = None
        try:
            while gen == self._generation:
                data = await reader.read(_READ_CHUNK)
                if not data:
                    break
                self._on_data(data)
        except OSError as exc:
            error = str(exc)
        self._closed(gen, error)

    def _closed(self, gen: int, error: str | None) -> None:
        if gen != self._generation:
            return
        self._generation += 1
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        # Soon, not now: this may run inside the worker's command loop.
        asyncio.get_running_loop().call_soon(self._on_closed, error)
