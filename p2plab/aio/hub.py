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
from collections.abc import AsyncIterator, Iterable
from typing import Any

from p2plab.core import events as ev

__all__ = ["EventHub", "Subscription"]

_QUEUE_LIMIT = 10000


def _put_dropping_oldest(q: asyncio.Queue[Any], item: Any) -> None:
    if q.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            q.get_nowait()
    q.put_nowait(item)


class Subscription:
    """An async iterator over the public events of some kinds (see :meth:`EventHub.subscribe`)."""

    def __init__(self, kinds: tuple[type[ev.Event], ...]) -> None:
        self.kinds = kinds
        """The event classes delivered (all events when empty)."""
        self.queue: asyncio.Queue[ev.Event] = asyncio.Queue(maxsize=_QUEUE_LIMIT)

    def wants(self, event: ev.Event) -> bool:
        """Whether ``event`` is of a kind this subscription delivers."""
        return not self.kinds or isinstance(event, self.kinds)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ev.Event:
        return await self.queue.get()


class EventHub:
    """UI queues, public event subscriptions and state waiters of one worker."""

    def __init__(self) -> None:
        self._ui: set[asyncio.Queue[dict[str, Any]]] = set()
        self._subs: set[Subscription] = set()
        self._state_waiters: list[tuple[frozenset[str], asyncio.Future[str]]] = []

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

    def publish(self, msg: dict[str, Any]) -> None:
        """Give a UI message to every UI queue."""
        for q in list(self._ui):
            _put_dropping_oldest(q, msg)

    # -- public events ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(self, *kinds: type[ev.Event]) -> AsyncIterator[AsyncIterator[ev.Event]]:
        """Subscribe on entry (nothing emitted afterwards is missed), unsubscribe on exit."""
        sub = Subscription(tuple(kinds))
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

    async def next_state(self, states: Iterable[str]) -> str:
        """The next state among ``states`` the worker enters (transient ones included)."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._state_waiters.append((frozenset(states), fut))
        return await fut
