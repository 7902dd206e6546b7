"""The simulator's TURN server: :class:`~p2plab.lab.sim.turn_model.TurnServerModel` on a simulated
host (:meth:`~p2plab.lab.sim.world.Simulation.add_turn_server` makes one).

The listening socket is UDP port 3478 of the host; each allocation gets a socket on its relayed
address, bound when the allocation is made and closed when it goes; expiries run as timers on the
simulation's clock.  Limits, on top of the model's (see :mod:`~p2plab.lab.sim.turn_model`): the
simulated network carries UDP only, so there is no TCP listener, and a worker's fallback to TURN
over TCP has nobody to talk to here (the model's :meth:`~TurnServerModel.receive_stream` serves
in-memory tests of that path).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from p2plab.lab.sim.turn_model import SIM_TURN_REALM, Outgoing, TurnServerModel
from p2plab.lab.simnet import Address, Host, Scheduler, SimSocket, TimerHandle

__all__ = ["SimTurnServer"]


class SimTurnServer:
    """A :class:`TurnServerModel` listening on ``port`` of a simulated ``host``."""

    def __init__(
        self,
        host: Host,
        clock: Scheduler,
        secret: str,
        *,
        port: int = 3478,
        rand_bytes: Callable[[int], bytes],
        realm: str = SIM_TURN_REALM,
    ) -> None:
        self.host = host
        self.clock = clock
        self.listener = host.bind(port)
        self.listener.on_datagram = self._on_listener
        self.model = TurnServerModel(
            self.listener.address,
            secret,
            rand_bytes=rand_bytes,
            realm=realm,
            port_in_use=lambda p: (host.ip, p) in host.sockets,
        )
        self._relays: dict[Address, SimSocket] = {}
        self._timer: TimerHandle | None = None

    @property
    def address(self) -> Address:
        """The listening address (what a ``turn:`` URL names)."""
        return self.listener.address

    @property
    def url(self) -> str:
        """``turn:ip:port?transport=udp``."""
        return f"turn:{self.address[0]}:{self.address[1]}?transport=udp"

    @property
    def stats(self) -> Counter[str]:
        """The model's counters."""
        return self.model.stats

    def _on_listener(self, data: bytes, source: Address) -> None:
        self._carry_out(self.model.receive(data, source, self.clock.now))

    def _relay_handler(self, local: Address) -> Callable[[bytes, Address], None]:
        def on_datagram(data: bytes, source: Address) -> None:
            self._carry_out(self.model.receive(data, source, self.clock.now, local))

        return on_datagram

    def _carry_out(self, out: list[Outgoing]) -> None:
        self._sync()
        for item in out:
            sock = self.listener if item.local == self.address else self._relays.get(item.local)
            if sock is not None:
                sock.sendto(item.data, item.destination)

    def _sync(self) -> None:
        """Sockets for the live relayed addresses, and the next expiry timer."""
        live = self.model.relayed_addresses()
        for address in list(self._relays):
            if address not in live:
                self._relays.pop(address).close()
        for address in live - set(self._relays):
            sock = self.host.bind(address[1], address[0])
            sock.on_datagram = self._relay_handler(address)
            self._relays[address] = sock
        when = self.model.get_timer()
        if self._timer is not None:
            if when is not None and self._timer.when == max(when, self.clock.now):
                return  # relayed data changes no expiry: keep the heap free of dead timers
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self.clock.call_at(max(when, self.clock.now), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.model.handle_timer(self.clock.now)
        self._sync()
