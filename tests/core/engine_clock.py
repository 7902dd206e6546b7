"""The fake clock of the in-memory engine worlds (tests/core): jump from timer to timer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from p2plab.core.link import LinkEngine


class _Node(Protocol):
    engine: LinkEngine


class EngineWorld(Protocol):
    """What :func:`run_timers` needs of a world: its clock, its nodes and its ``flush``."""

    now: float
    nodes: Mapping[Any, Any]

    def flush(self) -> None: ...


def run_timers(world: EngineWorld, seconds: float) -> None:
    """Fire every running engine's timers in time order for ``seconds``, flushing the world's
    datagrams and commands after each step; the clock ends ``seconds`` later."""
    end = world.now + seconds
    world.flush()
    while True:
        engines: list[LinkEngine] = [
            n.engine for n in world.nodes.values() if n.engine.state != "stopped"
        ]
        timers = [t for e in engines if (t := e.get_timer()) is not None]
        if not timers:
            break
        nxt = max(min(timers), world.now)
        if nxt > end:
            break
        world.now = nxt
        for e in engines:
            t = e.get_timer()
            if e.state != "stopped" and t is not None and t <= world.now:
                e.handle_timer(world.now)
        world.flush()
    world.now = end
