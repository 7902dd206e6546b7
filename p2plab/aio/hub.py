"""Where a worker's messages go: UI queues (contracts.md's dicts) and public event subscriptions.

Two audiences, two shapes: the HTTP UI and the CLI read UI messages (plain dicts, the WebSocket
contract) from queues; Python code reads public events (frozen dataclasses from
:mod:`p2plab.core.events`) from :meth:`EventHub.subscribe`.  Both are fed synchronously by the
worker, so nothing published after a subscription starts can be missed.  A slow reader loses
the oldest messages rather than holding the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, Generic, TypeVar

from p2plab.core import events as ev

__all__ = ["CHAT_HISTORY", "RESULT_HISTORY", "EventHub", "Subscription", "UiHistory", "ui_message"]

_QUEUE_LIMIT = 10000

CHAT_HISTORY = 200
"""How many recent chat messages a page that connects is given."""

RESULT_HISTORY = 50
"""How many recent ``benchmark_result`` rows a page that connects is given."""

E = TypeVar("E", bound=ev.Event)


def _put_dropping_oldest(q: asyncio.Queue[Any], item: Any) -> None:
    if q.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            q.get_nowait()
    q.put_nowait(item)


def ui_message(event: ev.Event) -> dict[str, Any] | None:
    """The UI message (contracts.md) an engine event becomes, or None (status is the worker's)."""
    if isinstance(event, ev.ChatReceived):
        return {
            "type": "chat",
            "direction": "in",
            "from": event.peer_id,
            "id": event.msg_id,
            "text": event.text,
            "ts": event.sent_at,
        }
    if isinstance(event, ev.ChatDelivered):
        return {"type": "chat_delivered", "id": event.msg_id}
    if isinstance(event, ev.ChatFailed):
        return {"type": "chat_failed", "id": event.msg_id, "reason": event.reason}
    if isinstance(event, ev.ErrorReported):
        return {"type": "error", "message": event.message}
    if isinstance(event, ev.PathChanged) and event.path != event.previous_path:
        # The page shows every switch of path (upgrade to direct, downgrade to TURN).
        return {
            "type": "path_changed",
            "path": event.path,
            "previous": event.previous_path,
            "ts": time.time(),
        }
    return None


class UiHistory:
    """The recent chat messages and result rows, replayed to a page that (re)connects.

    Bounded (``chat_limit`` messages, ``result_limit`` rows, oldest dropped) so a long-lived
    worker does not grow.  A chat message's later fate is folded into it (``delivered: true``) or
    replayed after it (``chat_failed``), so the page shows the same marks after a reload.
    """

    def __init__(self, chat_limit: int = CHAT_HISTORY, result_limit: int = RESULT_HISTORY) -> None:
        self._chat: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._failed: dict[str, dict[str, Any]] = {}
        self._chat_limit = chat_limit
        self._results: deque[dict[str, Any]] = deque(maxlen=result_limit)

    def remember(self, msg: dict[str, Any]) -> None:
        """Keep ``msg`` if it is part of the history (chat and results); ignore the rest."""
        kind = msg.get("type")
        if kind == "benchmark_result":
            self._results.append(dict(msg))
        elif kind == "chat":
            if msg.get("id") is None:
                return  # the page tells replayed messages from live ones by id
            msg_id = str(msg["id"])
            self._chat[msg_id] = dict(msg)
            self._chat.move_to_end(msg_id)
            while len(self._chat) > self._chat_limit:
                old, _ = self._chat.popitem(last=False)
                self._failed.pop(old, None)
        elif kind == "chat_delivered":
            kept = self._chat.get(str(msg.get("id")))
            if kept is not None:
                kept["delivered"] = True
        elif kind == "chat_failed":
            msg_id = str(msg.get("id"))
            if msg_id in self._chat:
                self._failed[msg_id] = dict(msg)

    def messages(self) -> list[dict[str, Any]]:
        """The history as UI messages, oldest first: chat (and failures), then result rows."""
        out: list[dict[str, Any]] = []
        for msg_id, msg in self._chat.items():
            out.append(dict(msg))
            failed = self._failed.get(msg_id)
            if failed is not None:
                out.append(dict(failed))
        out.extend(dict(r) for r in self._results)
        return out


class Subscription(Generic[E]):
    """An async iterator over the public events of some kinds (see :meth:`EventHub.subscribe`)."""

    def __init__(self, kinds: tuple[type[E], ...]) -> None:
        self.kinds = kinds
        """The event classes delivered (all events when empty)."""
        self.queue: asyncio.Queue[E] = asyncio.Queue(maxsize=_QUEUE_LIMIT)
        """Events delivered and not yet read."""

    def wants(self, event: ev.Event) -> bool:
        """Whether ``event`` is of a kind this subscription delivers."""
        return not self.kinds or isinstance(event, self.kinds)

    def __aiter__(self) -> Subscription[E]:
        return self

    async def __anext__(self) -> E:
        return await self.queue.get()


class EventHub:
    """UI queues, public event subscriptions and state waiters of one worker."""

    def __init__(self) -> None:
        self._ui: set[asyncio.Queue[dict[str, Any]]] = set()
        self._subs: set[Subscription[Any]] = set()
        self._state_waiters: list[tuple[frozenset[str], asyncio.Future[str]]] = []
        self.history = UiHistory()
        """Recent chat and results, for a page that connects (:meth:`ui_history`)."""

    # -- UI messages ------------------------------------------------------------------------------

    def ui_subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives every UI message from now on."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=_QUEUE_LIMIT)
        self._ui.add(q)
        return q

    def ui_unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop feeding ``q``."""
        self._ui.discard(q)

    async def ui_messages(self) -> AsyncIterator[dict[str, Any]]:
        """Async iterator over UI messages from now on."""
        q = self.ui_subscribe()
        try:
            while True:
                yield await q.get()
        finally:
            self.ui_unsubscribe(q)

    def ui_history(self) -> list[dict[str, Any]]:
        """Recent chat messages and result rows as UI messages, oldest first."""
        return self.history.messages()

    def publish(self, msg: dict[str, Any]) -> None:
        """Give a UI message to every UI queue (and keep it if it belongs to the history)."""
        self.history.remember(msg)
        for q in list(self._ui):
            _put_dropping_oldest(q, msg)

    # -- public events ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(self, *kinds: type[E]) -> AsyncIterator[Subscription[E]]:
        """Subscribe on entry (nothing emitted afterwards is missed), unsubscribe on exit."""
        sub: Subscription[E] = Subscription(tuple(kinds))
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    def emit(self, event: ev.Event) -> None:
        """Give a public event to every subscription that wants it; wake state waiters."""
        for sub in list(self._subs):
            if sub.wants(event):
                _put_dropping_oldest(sub.queue, event)
        if isinstance(event, ev.StateChanged):
            waiting = []
            for states, fut in self._state_waiters:
                if fut.done():
                    continue
                if event.state in states:
                    fut.set_result(event.state)
                else:
                    waiting.append((states, fut))
            self._state_waiters = waiting

    def next_state(self, states: Iterable[str]) -> asyncio.Future[str]:
        """A future of the next state among ``states`` the worker enters (transient ones too).

        Registered at once, not when first awaited: a state entered before the caller's task
        runs again is not missed.
        """
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._state_waiters = [(s, f) for s, f in self._state_waiters if not f.done()]
        self._state_waiters.append((frozenset(states), fut))
        return fut
