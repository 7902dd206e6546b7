"""Storage and pairing backends of the rendezvous service.

A backend owns the registrations and the pairing decisions; the web layer in ``main.py`` owns
the WebSocket connections of its own instance.  Each backend operation returns
:class:`~rendezvous_service_code.registry.Action` objects; the web layer delivers those meant
for its own connections and hands the others back to :meth:`Backend.forward` (the Redis
backend publishes them to the instance holding that connection).

* :class:`MemoryBackend` (default): one process, state in a :class:`Registry`.
* :class:`~rendezvous_service_code.redis_store.RedisBackend`: several instances share state
  through Redis (``REDIS_URL``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from p2plab.core.signaling import Candidate, NatHint, PortMapping

from .registry import Action, Registry

__all__ = ["Backend", "Deliver", "MemoryBackend"]

logger = logging.getLogger(__name__)

#: Callback a backend uses to hand the web layer an action that arrived from elsewhere.
Deliver = Callable[[Action], object]


class Backend(Protocol):
    """What the web layer needs from a registration store."""

    instance_id: str
    corrupt_nat_hints: int
    """Stored NAT hints that did not validate when read back (read as no hint)."""
    corrupt_endpoints: int
    """Stored port mappings and IPv6 endpoints that did not validate when read back (each read
    as none)."""

    async def start(self, deliver: Deliver, on_reset: Callable[[], None] | None = None) -> None:
        """Connect and start background tasks; ``deliver`` receives remote actions.

        ``on_reset`` is called when the shared state of this instance was lost (its
        registrations expired): every connection should then be closed so workers re-register.
        """

    async def close(self) -> None:
        """Stop background tasks; registrations of this instance are dropped."""

    async def health(self) -> str | None:
        """None when registration can work, else why not (``/health`` answers 503 with it)."""
        ...

    async def register(
        self,
        worker_id: str,
        conn_id: str,
        *,
        room: str,
        now: float,
        ws_observed_ip: str | None,
        ws_observed_port: int | None,
        http_public_ip: str | None,
        public_key: str | None,
    ) -> list[Action]:
        """Register a worker connection (replacing an older one with the same id)."""
        ...

    async def update_udp_endpoint(
        self,
        worker_id: str,
        conn_id: str,
        udp_ip: str,
        udp_port: int,
        local_candidates: Iterable[Candidate],
        nat: NatHint | None = None,
        *,
        mapped: PortMapping | None = None,
        udp6: Candidate | None = None,
    ) -> list[Action]:
        """Store a UDP endpoint (and the worker's NAT hint, port mapping and IPv6 endpoint) and
        pair the worker if possible."""
        ...

    async def unregister(self, worker_id: str, conn_id: str) -> list[Action]:
        """The connection went away."""
        ...

    async def list_workers(self) -> list[dict[str, Any]]:
        """Public views of all registered workers."""
        ...

    async def forward(self, action: Action) -> None:
        """Deliver an action for a connection that is not on this instance."""

    async def registered_key(self, worker_id: str) -> tuple[bool, str | None]:
        """Whether ``worker_id`` is registered now, and the public key it registered with."""
        ...

    async def relay_target(self, worker_id: str, conn_id: str, to: str) -> str | None:
        """The connection id of ``to`` if it and ``worker_id`` (on ``conn_id``) are paired.

        None when the two are not currently a pair: the rendezvous relays only within a pair.
        """
        ...


class MemoryBackend:
    """Registrations in this process only (the default)."""

    def __init__(self, instance_id: str = "local") -> None:
        self.instance_id = instance_id
        self.registry = Registry()
        # Records never leave this process, so a stored hint is the validated model itself.
        self.corrupt_nat_hints = 0
        self.corrupt_endpoints = 0

    async def start(self, deliver: Deliver, on_reset: Callable[[], None] | None = None) -> None:
        return None

    async def close(self) -> None:
        return None

    async def health(self) -> str | None:
        return None

    async def register(
        self,
        worker_id: str,
        conn_id: str,
        *,
        room: str,
        now: float,
        ws_observed_ip: str | None,
        ws_observed_port: int | None,
        http_public_ip: str | None,
        public_key: str | None,
    ) -> list[Action]:
        return self.registry.register(
            worker_id,
            conn_id,
            room=room,
            now=now,
            ws_observed_ip=ws_observed_ip,
            ws_observed_port=ws_observed_port,
            http_public_ip=http_public_ip,
            public_key=public_key,
        )

    async def update_udp_endpoint(
        self,
        worker_id: str,
        conn_id: str,
        udp_ip: str,
        udp_port: int,
        local_candidates: Iterable[Candidate],
        nat: NatHint | None = None,
        *,
        mapped: PortMapping | None = None,
        udp6: Candidate | None = None,
    ) -> list[Action]:
        return self.registry.update_udp_endpoint(
            worker_id, conn_id, udp_ip, udp_port, local_candidates, nat, mapped=mapped, udp6=udp6
        )

    async def unregister(self, worker_id: str, conn_id: str) -> list[Action]:
        return self.registry.unregister(worker_id, conn_id)

    async def list_workers(self) -> list[dict[str, Any]]:
        return [w.to_public_dict() for w in self.registry.workers()]

    async def registered_key(self, worker_id: str) -> tuple[bool, str | None]:
        record = self.registry.get(worker_id)
        return (record is not None, record.public_key if record is not None else None)

    async def relay_target(self, worker_id: str, conn_id: str, to: str) -> str | None:
        return self.registry.relay_target(worker_id, conn_id, to)

    async def forward(self, action: Action) -> None:
        # Only one instance: a connection that is not here has already gone.
        logger.debug("dropping %s for a connection that has gone", type(action).__name__)
