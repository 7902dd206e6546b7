"""The declared interface that features plug into a worker through (websockets' ``extensions``).

A feature (the benchmark today; others later) is an :class:`Extension` handed to the worker when
it is built::

    worker = Worker(config, extensions=[BenchmarkExtension()])

and is never registered by being imported.  The worker calls :meth:`Extension.attach` once with a
:class:`WorkerHost` (the narrow part of the worker an extension may use), routes every control
message whose ``type`` the extension claims in :attr:`Extension.control_types` to
:meth:`Extension.on_control`, offers every peer datagram to :meth:`Extension.on_datagram` before
the peer session sees it, tells it when the link changes, and closes it when the worker stops.
A control message no extension claims is dropped and counted (``stats["controls_unknown"]``).

This module imports nothing from the worker, so the import graph runs one way:
``extension <- bench <- worker``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address, UdpEndpoint
    from p2plab.core.events import Event

__all__ = ["Extension", "WorkerHost"]


@runtime_checkable
class WorkerHost(Protocol):
    """What an extension may use of the worker it is attached to."""

    @property
    def worker_id(self) -> str:
        """This worker's id."""
        ...

    @property
    def peer_id(self) -> str | None:
        """The current peer's id, or None without a peer."""
        ...

    @property
    def state(self) -> str:
        """The worker's state (contracts.md's ``state`` values)."""
        ...

    @property
    def path(self) -> str | None:
        """The link's path (``direct``, ``relay``, ...) or None without a link."""
        ...

    @property
    def rtt(self) -> float | None:
        """Smoothed RTT of the peer link in seconds, or None."""
        ...

    @property
    def endpoint(self) -> UdpEndpoint | None:
        """The worker's UDP endpoint of the link's current address family (the fast data
        paths use it directly).  It changes when birthday punching adopts a pool socket and
        when the link moves between IPv4 and IPv6: read it when needed, never keep it."""
        ...

    @property
    def peer_address(self) -> Address | None:
        """Where the peer link's datagrams go (None without a link): a real UDP address, or a
        pseudo-address of a path only the engine reaches (:meth:`send_bench`)."""
        ...

    def send_bench(self, datagrams: Sequence[bytes], addr: Address) -> int:
        """Send benchmark datagrams to a pseudo-address through the engine; how many it took."""
        ...

    @property
    def peer_sealer(self) -> Any:
        """The current link's sealer (``seal_datagram``/``open_datagram``), or None."""
        ...

    def send_control(self, obj: dict[str, Any]) -> str:
        """Send a reliable control message to the peer; raises NotConnected without a link."""
        ...

    def publish(self, msg: dict[str, Any]) -> None:
        """Send a UI message (contracts.md's worker-to-UI messages) to every UI subscriber."""
        ...

    def emit(self, event: Event) -> None:
        """Hand a public event to the worker's event subscribers (``Worker.subscribe``)."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the worker's counter ``stats[name]``."""
        ...


class Extension:
    """Base class of worker extensions; every hook does nothing unless overridden."""

    name: str = ""
    """Unique name; the worker exposes the extension as ``worker.extension(name)``."""

    control_types: frozenset[str] = frozenset()
    """Control message ``type`` values this extension handles."""

    def attach(self, host: WorkerHost) -> None:
        """Called once, when the worker starts, before any datagram or control message."""

    def on_control(self, obj: dict[str, Any]) -> None:
        """A control message from the peer whose ``type`` is in :attr:`control_types`."""

    def on_datagram(self, data: bytes, addr: Address) -> bool:
        """A datagram on the worker's UDP socket, before the peer session sees it.

        Return True when the extension consumed it (the session then never sees it).  Runs for
        every datagram, so it must be cheap when it is not interested.
        """
        return False

    def on_link_changed(self, state: str) -> None:
        """The worker's state changed (``connected``, ``relayed``, ``lost``, ...)."""

    async def close(self) -> None:
        """The worker is stopping: end any running work, bounded in time."""
