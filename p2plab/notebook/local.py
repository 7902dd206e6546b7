"""A rendezvous (with STUN) and connected workers on loopback, in the current event loop.

For notebooks (top-level ``await``) and scripts (``asyncio.run``)::

    async with p2plab.local_lab() as lab:   # rendezvous + STUN + two connected workers
        a, b = lab.workers

    lab = await p2plab.local_lab()          # or keep it running across notebook cells
    ...
    await lab.stop()

Nothing leaves loopback: the workers use the rendezvous's embedded STUN server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from p2plab.aio.worker import Worker, WorkerConfig

__all__ = ["LocalLab", "local_lab", "start_local_lab"]

log = logging.getLogger(__name__)


@dataclass
class LocalLab:
    """A running rendezvous and its workers; :meth:`stop` ends them all."""

    rendezvous: Any
    """The :class:`rendezvous_service_code.main.RendezvousServer`."""
    workers: list[Worker] = field(default_factory=list)
    """The workers, in start order."""

    @property
    def a(self) -> Worker:
        """The first worker."""
        return self.workers[0]

    @property
    def b(self) -> Worker:
        """The second worker."""
        return self.workers[1]

    @property
    def rendezvous_url(self) -> str:
        """``ws://127.0.0.1:port`` of the rendezvous."""
        return str(self.rendezvous.addresses.ws_url)

    @property
    def stun_server(self) -> str:
        """``127.0.0.1:port`` of the rendezvous' embedded STUN server."""
        addrs = self.rendezvous.addresses
        return f"{addrs.stun_host}:{addrs.stun_port}"

    async def stop(self) -> None:
        """Stop every worker, then the rendezvous."""
        for w in reversed(self.workers):
            with contextlib.suppress(Exception):
                await w.stop()
        with contextlib.suppress(Exception):
            await self.rendezvous.close()

    async def __aenter__(self) -> LocalLab:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_local_lab(
    workers: int = 2,
    *,
    host: str = "127.0.0.1",
    http: bool = False,
    connect_timeout: float = 20.0,
    **worker_options: Any,
) -> LocalLab:
    """Start a rendezvous with STUN and ``workers`` workers on ``host``; wait until paired workers
    are connected (with an even count).  ``http=True`` also serves each worker's UI on a free port;
    ``worker_options`` go to :class:`~p2plab.aio.worker.WorkerConfig`."""
    from rendezvous_service_code.main import RendezvousServer

    server = await RendezvousServer.start(host, 0, stun_port=0)
    lab = LocalLab(server)
    try:
        for _ in range(workers):
            config = WorkerConfig(
                rendezvous_url=lab.rendezvous_url,
                stun_servers=(lab.stun_server,),
                udp_host=host,
                http_host=host,
                http_port=0 if http else None,
                **worker_options,
            )
            lab.workers.append(await Worker(config).start())
        paired = lab.workers[: workers - workers % 2]
        await asyncio.gather(*(w.wait_connected(connect_timeout) for w in paired))
    except BaseException:
        await lab.stop()
        raise
    log.info("local lab: rendezvous %s, %d workers connected", lab.rendezvous_url, len(paired))
    if http:
        # Asked for explicitly: the addresses are what the user opens next.
        for w in lab.workers:
            print(f"worker {w.worker_id[:8]}: {w.ui_url}")
    return lab


class _LocalLabStarter:
    """What :func:`local_lab` returns: ``async with`` it, or ``await`` it."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        self._lab: LocalLab | None = None

    def __await__(self) -> Generator[Any, None, LocalLab]:
        return start_local_lab(**self._options).__await__()

    async def __aenter__(self) -> LocalLab:
        self._lab = await start_local_lab(**self._options)
        return self._lab

    async def __aexit__(self, *exc: object) -> None:
        if self._lab is not None:
            await self._lab.stop()


def local_lab(
    workers: int = 2,
    *,
    host: str = "127.0.0.1",
    http: bool = False,
    connect_timeout: float = 20.0,
    **worker_options: Any,
) -> _LocalLabStarter:
    """A rendezvous with STUN and ``workers`` connected workers on loopback.

    ``async with local_lab() as lab:`` stops everything at the end of the block;
    ``lab = await local_lab()`` keeps it running until ``await lab.stop()`` (handy across
    notebook cells).  ``http=True`` serves each worker's page and prints its address.  Other
    keyword arguments go to :class:`~p2plab.aio.worker.WorkerConfig`.
    """
    return _LocalLabStarter(
        {
            "workers": workers,
            "host": host,
            "http": http,
            "connect_timeout": connect_timeout,
            **worker_options,
        }
    )
