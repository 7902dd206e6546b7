"""A simulated worker's port-mapping client: Tailscale's portmapper procedure on a simulated socket.

Until the core's ``PortMapper`` (issue 18, ``core/portmap.py``) drives this, the procedure is here,
minimal and behind one small interface (:meth:`SimPortMapClient.start`, :meth:`refresh`,
:meth:`stop`, the ``on_mapping`` callback and :attr:`answered`):

1. probe at once from a socket of its own: a NAT-PMP external-address request and a PCP ANNOUNCE
   to the gateway's port 5351, and UPnP IGD discovery (a call on the router, after its delay:
   SSDP and SOAP are not modelled on the wire);
2. wait :data:`PROBE_WAIT_S` (250 ms), then ask the preferred protocol that answered
   (NAT-PMP > PCP > UPnP) for a mapping of the worker's UDP port, for :data:`LEASE_ASK_S`;
3. hand the granted mapping to ``on_mapping`` (the worker passes it to
   ``LinkEngine.set_port_mapping``), renew at half the lifetime, and say ``None`` when a renewal
   is refused;
4. on :meth:`stop`, delete the mapping (lifetime 0).

A router that answers nothing costs the 250 ms and changes nothing: ``on_mapping(None)`` once.
Answers from anywhere but the gateway, or that do not parse, are dropped and counted.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from p2plab.core.signaling import PortMapping
from p2plab.lab.sim.portmap_model import (
    PCP_ANNOUNCE,
    PORTMAP_PORT,
    PROTOCOLS,
    PortMapNat,
    decode_natpmp_answer,
    decode_pcp_answer,
    natpmp_map_request,
    pcp_announce_request,
    pcp_map_request,
)
from p2plab.lab.simnet import Address, Host, Scheduler, TimerHandle

__all__ = ["LEASE_ASK_S", "PROBE_WAIT_S", "SimPortMapClient"]

#: How long the probe waits for answers before it chooses (Tailscale's portmapper).
PROBE_WAIT_S = 0.25
#: The lease asked for (Tailscale asks 7200 s).
LEASE_ASK_S = 7200
#: How long a mapping request waits for its answer before the client gives up on it.
ANSWER_WAIT_S = 1.0


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
    ) -> None:
        self.clock = clock
        self.host = host
        self.nat = nat
        self.internal = internal
        self.on_mapping = on_mapping
        self.gateway: Address = (nat.gateway_ip, PORTMAP_PORT)
        self.answered: set[str] = set()
        """The protocols that answered the last probe (the status's ``port_mapping``)."""
        self.mapping: PortMapping | None = None
        """The mapping in force, as last reported."""
        self.stats: Counter[str] = Counter()
        self._rng = rng
        self._nonce = rng.randbytes(12)
        self.socket = host.bind(0, internal[0])
        """Its own socket to the gateway (not the link's: answers never reach the engine)."""
        self.socket.on_datagram = self._on_datagram
        self._external_ip: str | None = None
        self._asked: str | None = None
        self._timers: list[TimerHandle] = []
        self._stopped = False
        self._reported = False

    # -- the interface ----------------------------------------------------------------------

    def start(self) -> None:
        """Probe all three protocols at once, choose after :data:`PROBE_WAIT_S`."""
        self.answered.clear()
        self.socket.sendto(bytes([0, 0]), self.gateway)  # NAT-PMP: external address
        self.socket.sendto(pcp_announce_request(self.internal[0]), self.gateway)
        self._later(self.nat.portmap.upnp_delay_s, self._upnp_discovered)
        self._later(PROBE_WAIT_S, self._choose)

    def refresh(self) -> None:
        """Renew now (the link went down: the lease may be gone), or probe again if none."""
        if self._stopped:
            return
        self.stats["refreshes"] += 1
        if self._asked is None:
            self.start()
        else:
            self._request(self._asked)

    def stop(self) -> None:
        """Delete the mapping and close the socket."""
        if self._stopped:
            return
        self._stopped = True
        for handle in self._timers:
            handle.cancel()
        if self.mapping is not None:
            self._request(self.mapping.protocol, lifetime=0)
        self.socket.close()

    # -- the procedure ----------------------------------------------------------------------

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        self._timers = [h for h in self._timers if not h.cancelled and h.when > self.clock.now]
        self._timers.append(self.clock.call_later(delay, callback))

    def _upnp_discovered(self) -> None:
        if "upnp" in self.nat.portmap.protocols and not self._stopped:
            self.answered.add("upnp")

    def _choose(self) -> None:
        if self._stopped:
            return
        chosen = next((p for p in PROTOCOLS if p in self.answered), None)
        if chosen is None:
            self.stats["no_protocol"] += 1
            self._report(None)
            return
        self._asked = chosen
        self._request(chosen)

    def _request(self, protocol: str, lifetime: int = LEASE_ASK_S) -> None:
        port = self.mapping.port if self.mapping is not None else self.internal[1]
        self.stats[f"requests_{protocol}"] += 1
        if protocol == "nat-pmp":
            self.socket.sendto(natpmp_map_request(self.internal[1], port, lifetime), self.gateway)
        elif protocol == "pcp":
            ip, internal_port = self.internal
            request = pcp_map_request(ip, self._nonce, internal_port, port, lifetime)
            self.socket.sendto(request, self.gateway)
        else:
            self._later(self.nat.portmap.upnp_delay_s, lambda: self._upnp_map(port, lifetime))
        if lifetime:
            self._later(ANSWER_WAIT_S, lambda: self._check_answered(protocol))

    def _check_answered(self, protocol: str) -> None:
        if not self._stopped and self.mapping is None and not self._reported:
            self.stats["no_answer"] += 1
            self._report(None)

    def _upnp_map(self, port: int, lifetime: int) -> None:
        if self._stopped and lifetime:
            return
        now = self.clock.now
        lease = self.nat.responder.upnp_add_port_mapping(self.internal, port, lifetime, now)
        if lifetime:
            self._granted(
                "upnp",
                self.nat.public_ip,
                lease.external_port if lease else 0,
                (lease.expires_at - now) if lease else 0,
            )

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        if addr != self.gateway:
            self.stats["dropped_not_gateway"] += 1
            return
        pmp = decode_natpmp_answer(data)
        if pmp is not None:
            self._natpmp_answer(pmp)
            return
        pcp = decode_pcp_answer(data)
        if pcp is not None:
            self._pcp_answer(pcp)
            return
        self.stats["dropped_malformed"] += 1

    def _natpmp_answer(self, ans: dict[str, object]) -> None:
        if ans["result"] != 0:
            self.stats["natpmp_refused"] += 1
            return
        if ans["op"] == 0 and "ip" in ans:
            self.answered.add("nat-pmp")
            self._external_ip = str(ans["ip"])
        elif ans["op"] == 1 and "external_port" in ans and self._asked == "nat-pmp":
            ip = self._external_ip or self.nat.public_ip
            self._granted(
                "nat-pmp", ip, int(str(ans["external_port"])), float(str(ans["lifetime_s"]))
            )

    def _pcp_answer(self, ans: dict[str, object]) -> None:
        if ans["result"] != 0:
            self.stats["pcp_refused"] += 1
            return
        if ans["op"] == PCP_ANNOUNCE:
            self.answered.add("pcp")
        elif "external_port" in ans and ans.get("nonce") == self._nonce and self._asked == "pcp":
            self._granted(
                "pcp", str(ans["ip"]), int(str(ans["external_port"])), float(str(ans["lifetime_s"]))
            )

    def _granted(self, protocol: str, ip: str, port: int, lifetime: float) -> None:
        if self._stopped:
            return
        if not port or lifetime <= 0:
            self.stats["refused"] += 1
            self._report(None)
            return
        self.stats["granted"] += 1
        fields = {"protocol": protocol, "ip": ip, "port": port, "lifetime_s": lifetime}
        self._report(PortMapping.model_validate(fields))
        self._later(lifetime / 2, lambda: self._request(protocol))

    def _report(self, mapping: PortMapping | None) -> None:
        first = not self._reported
        self._reported = True
        if first or mapping != self.mapping:
            self.mapping = mapping
            self.on_mapping(mapping)
