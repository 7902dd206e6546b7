"""p2plab: get two machines behind NATs talking directly over UDP, and measure the link.

Public API (imported lazily, so ``import p2plab`` stays cheap in notebooks)::

    local_lab, LocalLab       rendezvous + STUN + connected workers on loopback (notebooks)
    Worker, WorkerConfig      a worker: rendezvous, STUN, punching, chat, UI
    StunProbe, NatReport      mapped address and NAT behaviour discovery
    HolePuncher               punches a path to one peer and keeps it alive
    Benchmark, BenchResult    UDP throughput and RTT over the punched link
    SessionConfig             timers of the peer link
    StateChanged, PeerConnected, PeerLost, PathChanged, ChatReceived, ChatDelivered,
    ChatFailed, BenchmarkProgress, BenchmarkFinished
                              public events (``async with worker.subscribe(kind) as it``)
    ChatFailedError           ``await worker.chat(text)`` gave up
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Worker": "p2plab.aio.worker",
    "WorkerConfig": "p2plab.aio.worker",
    "StunProbe": "p2plab.aio.stun",
    "NatReport": "p2plab.core.nat",
    "HolePuncher": "p2plab.aio.punch",
    "Benchmark": "p2plab.aio.bench",
    "BenchResult": "p2plab.results",
    "SessionConfig": "p2plab.config",
    "BenchmarkFinished": "p2plab.core.events",
    "BenchmarkProgress": "p2plab.core.events",
    "ChatDelivered": "p2plab.core.events",
    "ChatFailed": "p2plab.core.events",
    "ChatReceived": "p2plab.core.events",
    "PathChanged": "p2plab.core.events",
    "PeerConnected": "p2plab.core.events",
    "PeerLost": "p2plab.core.events",
    "StateChanged": "p2plab.core.events",
    "ChatFailedError": "p2plab.errors",
    "LocalLab": "p2plab.notebook.local",
    "local_lab": "p2plab.notebook.local",
}

__all__ = [
    "BenchResult",
    "Benchmark",
    "BenchmarkFinished",
    "BenchmarkProgress",
    "ChatDelivered",
    "ChatFailed",
    "ChatFailedError",
    "ChatReceived",
    "HolePuncher",
    "LocalLab",
    "NatReport",
    "PathChanged",
    "PeerConnected",
    "PeerLost",
    "SessionConfig",
    "StateChanged",
    "StunProbe",
    "Worker",
    "WorkerConfig",
    "__version__",
    "local_lab",
]

if TYPE_CHECKING:
    from p2plab.aio.bench import Benchmark
    from p2plab.aio.punch import HolePuncher
    from p2plab.aio.stun import StunProbe
    from p2plab.aio.worker import Worker, WorkerConfig
    from p2plab.config import SessionConfig
    from p2plab.core.events import (
        BenchmarkFinished,
        BenchmarkProgress,
        ChatDelivered,
        ChatFailed,
        ChatReceived,
        PathChanged,
        PeerConnected,
        PeerLost,
        StateChanged,
    )
    from p2plab.core.nat import NatReport
    from p2plab.errors import ChatFailedError
    from p2plab.notebook.local import LocalLab, local_lab
    from p2plab.results import BenchResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'p2plab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
