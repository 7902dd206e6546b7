"""A simulated worker's port mapping: the core's :class:`~p2plab.core.portmap.PortMapper` driven on
a simulated socket and the sim clock, as ``aio/portmap.py`` drives it on a real one.

The mapper probes NAT-PMP and PCP to the NAT's gateway address (port 5351) and asks for a UPnP
IGD; after 250 ms it asks the best protocol that answered (NAT-PMP > PCP > UPnP) for a mapping of
the worker's UDP port, renews it at half-life and deletes it on stop.  This driver does its four
steps after every input: datagrams to the gateway from a socket of its own (not the link's, as
the asyncio driver does), UPnP commands carried out as calls on the router after its
``upnp_delay_s`` (SSDP and SOAP are not modelled on the wire), events turned into
``on_mapping(PortMapping | None)``, one timer.

``on_settled`` runs once, when the first probe has an outcome (a mapping, or nothing to map
with): the worker holds its discovery answer until then, so that its first endpoint update
already carries the mapping.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from p2plab.core.portmap import (
    MappingFailed,
    MappingGranted,
    MappingLost,
    PortMapper,
    PortMapperConfig,
    ProbeDone,
    UpnpDelete,
    UpnpMap,
    UpnpProbe,
)
from p2plab.core.signaling import PortMapping
from p2plab.lab.sim.portmap_model import PortMapNat
from p2plab.lab.simnet import Address, Host, Scheduler, TimerHandle

__all__ = ["SETTLE_LIMIT_S", "SimPortMapClient"]

#: The longest the first probe may hold discovery (the mapper's probe wait, then its map request
#: retransmissions would go on for seconds against a router that answered the probe only).
SETTLE_LIMIT_S = 1.5


class SimPortMapClient:
    """Port mapping for ``internal`` (the worker's UDP socket) through ``nat``'s router."""

    def __init__(
        self,
        clock: Scheduler,
        host: Host,
        nat: PortMapNat,
        internal: Address,
        on_mapping: Callable[[PortMapping | None], None],
        rng: random.Random,
        *,
        on_settled: Callable[[], None] | None = None,
        config: PortMapperConfig | None = None,
    ) -> None:
        self.clock = clock
        self.host = host
        self.nat = nat
        self.internal = internal
        self.on_mapping = on_mapping
        self.on_settled = on_settled
        self.mapper = PortMapper(rng.randbytes, config)
        """The core's port mapper this drives."""
        self.socket = host.bind(0, internal[0])
        """Its own socket to the gateway (answers never reach the link engine)."""
        self.socket.on_datagram = self._on_datagram
        self.mapping: PortMapping | None = None
        """The mapping in force, as last reported."""
        self.settled = False
        self._timer: TimerHandle | None = None
        self._limit: TimerHandle | None = None

    @property
    def answered(self) -> set[str]:
        """The protocols that answered the last probe (the status's ``port_mapping``)."""
        return set(self.mapper.answered)

    @property
    def stats(self) -> dict[str, int]:
        """The mapper's counters (probes, grants, renewals, ``portmap_drop_*``)."""
        return dict(self.mapper.stats)

    def start(self) -> None:
        """Probe the gateway (the worker's start)."""
        now = self.clock.now
        self.mapper.start(now, self.nat.gateway_ip, self.internal[1], self.internal[0])
        self._limit = self.clock.call_later(SETTLE_LIMIT_S, self._settle)
        self._pump()

    def stop(self) -> None:
        """Delete the mapping (the mapper sends it once) and close the socket."""
        self.mapper.stop(self.clock.now)
        self._pump()
        for handle in (self._timer, self._limit):
            if handle is not None:
                handle.cancel()
        self.socket.close()

    # -- the driver contract ---------------------------------------------------------------

    def _pump(self) -> None:
        now = self.clock.now
        mapper = self.mapper
        for data, addr in mapper.datagrams_to_send(now):
            self.socket.sendto(data, addr)
        while (cmd := mapper.next_command()) is not None:
            self._carry_out(cmd)
        while (event := mapper.next_event()) is not None:
            if isinstance(event, MappingGranted):
                fields = {
                    "protocol": event.protocol,
                    "ip": event.ip,
                    "port": event.port,
                    "lifetime_s": event.lifetime_s,
                }
                self._report(PortMapping.model_validate(fields))
            elif isinstance(event, MappingLost):
                self._report(None)
            elif isinstance(event, MappingFailed) or (
                isinstance(event, ProbeDone) and not event.protocols
            ):
                self._settle()  # the probe ended with nothing to offer
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = mapper.get_timer()
        if when is not None:
            self._timer = self.clock.call_at(when, self._on_timer)

    def _carry_out(self, cmd: object) -> None:
        router = self.nat.responder
        delay = self.nat.portmap.upnp_delay_s
        if isinstance(cmd, UpnpProbe):
            found = "upnp" in self.nat.portmap.protocols
            self._later(delay, lambda: self.mapper.upnp_probed(self.clock.now, found))
        elif isinstance(cmd, UpnpMap):

            def add() -> None:
                now = self.clock.now
                lease = router.upnp_add_port_mapping(
                    self.internal, cmd.external_port, cmd.lifetime_s, now
                )
                if lease is None:
                    self.mapper.upnp_result(now, None, None, 0.0)
                else:
                    life = lease.expires_at - now
                    self.mapper.upnp_result(now, self.nat.public_ip, lease.external_port, life)

            self._later(delay, add)
        elif isinstance(cmd, UpnpDelete):
            self._later(delay, lambda: self._upnp_delete(cmd.external_port))

    def _upnp_delete(self, external_port: int) -> None:
        lease = self.nat.responder.lease_for(self.internal, self.clock.now)
        if lease is not None and lease.external_port == external_port:
            self.nat.responder.delete(self.internal)

    def _later(self, delay: float, call: Callable[[], None]) -> None:
        def run() -> None:
            call()
            self._pump()

        self.clock.call_later(delay, run)

    def _on_timer(self) -> None:
        self._timer = None
        self.mapper.handle_timer(self.clock.now)
        self._pump()

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        self.mapper.receive_datagram(data, addr, self.clock.now)
        self._pump()

    def _report(self, mapping: PortMapping | None) -> None:
        if mapping != self.mapping:
            self.mapping = mapping
            self.on_mapping(mapping)
        self._settle()

    def _settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        if self._limit is not None:
            self._limit.cancel()
        if self.on_settled is not None:
            self.on_settled()
