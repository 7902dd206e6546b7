"""Rendezvous client: one WebSocket to the rendezvous service, re-established with backoff.

The client keeps the connection for the life of the worker.  If it drops, it reconnects with
exponential backoff and full jitter (so a rendezvous restart is not met by a thundering herd) and
registers again; the worker's peer link, which does not depend on the rendezvous once punched,
is left alone meanwhile.

Registration: the rendezvous opens with a ``challenge``; the worker's link engine answers it
with ``register`` and the proof of its key (sent through :meth:`RendezvousClient.send`), and
``registered`` completes it.  A connection that is not registered within ``register_timeout_s``
is closed and tried again, so a rendezvous that never challenges or never answers cannot leave
the worker "registering" for good.

Nothing one message does ends the client: a message that does not parse (bad JSON, a 16,000-deep
array, a failed validation) is counted in ``bad_messages`` and answered with an ``error``
(``bad_message``; at most one per kind of message per second, counted in ``errors_sent``, so
junk by the thousand gets a handful of answers), a handler that raises on one is counted in
``handler_errors``, and any failure of a connection is followed by a reconnection.
Only a refusal (close 1008: bad token, failed proof) ends it, with RendezvousError.

When hole punching fails, the worker relays its (sealed) peer datagrams through this connection
with :meth:`RendezvousClient.send_relay` (the ``relay`` message, an optional extension of the
contracts).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from p2plab.core.signaling import (
    MAX_RELAY_BYTES,
    BadMessage,
    CandidatesOut,
    ErrorAnswers,
    ErrorMessage,
    Register,
    Registered,
    RelayOut,
    RendezvousMessage,
    UpdateUdpEndpoint,
    dump_message,
    encode_relay_data,
    parse_rendezvous_message,
)
from p2plab.errors import ConfigError, RemoteProtocolError, RendezvousError

__all__ = ["Backoff", "RendezvousClient", "RendezvousMessage"]

log = logging.getLogger(__name__)


#: Relayed datagrams queued for sending before further ones are dropped (a datagram path: late
#: datagrams are worth little, and the rendezvous rate-limits anyway).
_RELAY_QUEUE_LIMIT = 64


def _happy_eyeballs() -> dict[str, Any]:
    """A rendezvous name with A and AAAA records: both families, IPv6 first and IPv4 250 ms
    later (RFC 8305 happy eyeballs), so a dead family costs 250 ms, not the connect timeout.
    Only asyncio's own loop takes the argument (uvloop's ``create_connection`` refuses it and
    tries the addresses one after the other)."""
    loop = asyncio.get_running_loop()
    return {"happy_eyeballs_delay": 0.25} if isinstance(loop, asyncio.BaseEventLoop) else {}


@dataclass(frozen=True)
class Backoff:
    """Reconnection schedule: exponential with full jitter."""

    initial_s: float = 0.5
    """Delay before the first reconnection attempt (upper bound of the jittered delay)."""
    maximum_s: float = 30.0
    """Largest delay between attempts."""
    factor: float = 2.0
    """Growth of the delay per failed attempt."""

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Delay before attempt number ``attempt`` (0-based), jittered in [50%, 100%]."""
        ceiling = min(self.maximum_s, self.initial_s * self.factor**attempt)
        return ceiling * (0.5 + 0.5 * rng())


def registration_url(base: str, worker_id: str) -> str:
    """``ws://host:port`` (optionally with a path prefix) -> ``.../ws/register/<id>``."""
    if not base.startswith(("ws://", "wss://")):
        if base.startswith("http://"):
            base = "ws://" + base[len("http://") :]
        elif base.startswith("https://"):
            base = "wss://" + base[len("https://") :]
        else:
            raise ConfigError(f"rendezvous URL must start with ws:// or wss://, got {base!r}")
    return f"{base.rstrip('/')}/ws/register/{worker_id}"


class RendezvousClient:
    """Keeps a worker registered; hands every message from the rendezvous to ``on_message``."""

    def __init__(
        self,
        url: str,
        worker_id: str,
        *,
        on_message: Callable[[RendezvousMessage], Awaitable[None]],
        on_state: Callable[[bool], None] | None = None,
        backoff: Backoff | None = None,
        register_timeout_s: float = 10.0,
    ) -> None:
        self.url = registration_url(url, worker_id)
        self.worker_id = worker_id
        self._on_message = on_message
        self._register_timeout_s = register_timeout_s
        self.registered = False
        """Whether the current connection got ``registered``."""
        self._on_state = on_state
        self._backoff = backoff or Backoff()
        self._ws: ClientConnection | None = None
        self.connected = False
        self.connections = 0
        self.last_error: str | None = None
        self.stats = {
            "messages_in": 0,
            "messages_out": 0,
            "bad_messages": 0,
            "errors_sent": 0,
            "handler_errors": 0,
            "register_timeouts": 0,
            "reconnects": 0,
            "relay_out": 0,
            "relay_out_dropped": 0,
        }
        self._relay_queue: asyncio.Queue[str] | None = None
        self._relay_task: asyncio.Task[None] | None = None

    async def send(self, msg: UpdateUdpEndpoint | Register | ErrorMessage | CandidatesOut) -> bool:
        """Send a message if connected; returns False when there is no connection right now."""
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(dump_message(msg))
        except ConnectionClosed:
            return False
        self.stats["messages_out"] += 1
        return True

    def send_relay(self, to: str, data: bytes) -> bool:
        """Queue one peer datagram to be relayed to ``to`` (the paired peer); never blocks.

        Returns False (and counts a drop) without a connection, when the queue is full or for a
        datagram over ``MAX_RELAY_BYTES``.
        """
        if self._ws is None or self._relay_queue is None:
            self.stats["relay_out_dropped"] += 1
            return False
        if len(data) > MAX_RELAY_BYTES or self._relay_queue.qsize() >= _RELAY_QUEUE_LIMIT:
            self.stats["relay_out_dropped"] += 1
            return False
        self._relay_queue.put_nowait(dump_message(RelayOut(to=to, data=encode_relay_data(data))))
        return True

    async def _send_relayed(self, ws: ClientConnection, queue: asyncio.Queue[str]) -> None:
        """Send queued relay messages in order on ``ws`` until it closes."""
        while True:
            text = await queue.get()
            try:
                await ws.send(text)
            except ConnectionClosed:
                return
            self.stats["messages_out"] += 1
            self.stats["relay_out"] += 1

    async def run(self) -> None:
        """Connect, register and dispatch until cancelled; reconnect on failures.

        Raises RendezvousError when the rendezvous refuses us for good (bad token, close 1008).
        """
        attempt = 0
        while True:
            try:
                async with connect(
                    self.url, open_timeout=10, max_size=2**20, **_happy_eyeballs()
                ) as ws:
                    self._ws = ws
                    self.registered = False
                    self._relay_queue = asyncio.Queue()
                    self._relay_task = asyncio.get_running_loop().create_task(
                        self._send_relayed(ws, self._relay_queue), name="rendezvous-relay-out"
                    )
                    self.connections += 1
                    self._set_state(True)  # the challenge follows; the engine answers it
                    why = await self._serve(ws)
                    close = ws.close_code
                    reason = ws.close_reason
                if close == 1008:
                    raise RendezvousError(f"rendezvous refused this worker: {reason or 'policy'}")
                self.last_error = why or f"closed ({close} {reason})"
            except (RendezvousError, ConfigError):
                self._set_state(False)
                raise
            except (TimeoutError, OSError, ConnectionClosed, InvalidStatus) as exc:
                if isinstance(exc, ConnectionClosed) and exc.rcvd and exc.rcvd.code == 1008:
                    self._set_state(False)
                    raise RendezvousError(
                        f"rendezvous refused this worker: {exc.rcvd.reason or 'policy'}"
                    ) from None
                self.last_error = f"{type(exc).__name__}: {exc}"
            except InvalidURI as exc:
                raise ConfigError(f"bad rendezvous URL {self.url!r}: {exc}") from None
            except websockets.exceptions.WebSocketException as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug or a surprise: reconnect, never end the client
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("rendezvous client: unexpected error; reconnecting")
            finally:
                if self.registered:  # a connection that worked: the next drop starts afresh
                    attempt = 0
                self._ws = None
                self._relay_queue = None
                if self._relay_task is not None:
                    self._relay_task.cancel()
                    self._relay_task = None
            self._set_state(False)
            delay = self._backoff.delay(attempt)
            # The first failure of a streak is something the user must see (a wrong address, a
            # rendezvous not started): a WARNING; the retries after it are routine.
            log.log(
                logging.WARNING if attempt == 0 else logging.INFO,
                "rendezvous %s unavailable (%s); retrying in %.1f s, with backoff",
                self.url,
                self.last_error,
                delay,
            )
            attempt += 1
            self.stats["reconnects"] += 1
            await asyncio.sleep(delay)

    async def _serve(self, ws: ClientConnection) -> str:
        """Read and dispatch messages until the connection closes (ConnectionClosed) or is not
        registered in time (closed here; returns why)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._register_timeout_s
        answers = ErrorAnswers()  # per connection
        while True:
            if self.registered:
                raw = await ws.recv()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        raw = await ws.recv()
                except TimeoutError:
                    self.stats["register_timeouts"] += 1
                    await ws.close(1002, "not registered in time")
                    return (
                        f"not registered within {self._register_timeout_s:g} s (no challenge "
                        "or no answer from the rendezvous)"
                    )
            self.stats["messages_in"] += 1
            try:
                msg = parse_rendezvous_message(raw)
            except Exception as exc:  # BadMessage, or a surprise of the parser
                self.stats["bad_messages"] += 1
                log.warning("dropping bad message from rendezvous: %s", _short(exc))
                kind = exc.kind if isinstance(exc, BadMessage) else "malformed"
                if answers.allow(kind, loop.time()):
                    answer = ErrorMessage(code="bad_message", message=_short(exc))
                    if await self.send(answer):
                        self.stats["errors_sent"] += 1
                continue
            if isinstance(msg, Registered):
                self.registered = True
            try:
                await self._on_message(msg)
            except Exception:  # one message never ends the client
                self.stats["handler_errors"] += 1
                log.exception("rendezvous client: handling a %r message failed", msg.type)

    def _set_state(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            if self._on_state is not None:
                self._on_state(connected)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RemoteProtocolError) else str(exc)
    return text if len(text) <= 200 else text[:200] + "..."
