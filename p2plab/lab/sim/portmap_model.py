"""Port mapping on a simulated NAT (issue 18): the router's lease table, its NAT-PMP / PCP answers
on the wire, UPnP IGD as a call, and a NAT box that forwards a leased port.

What a router running miniupnpd does, as far as a peer-to-peer link can tell:

* it answers NAT-PMP (RFC 6886) and PCP (RFC 6887: ANNOUNCE, MAP) on the gateway's UDP port 5351
  and UPnP IGD (``AddPortMapping`` over SOAP) when those protocols are offered
  (:class:`PortMapConfig`); what is not offered stays silent (a request is counted and dropped);
* a lease maps the NAT's public IP and an external port to one internal endpoint for a lifetime
  (NAT-PMP's as asked; PCP's and UPnP's clamped to ``[min_lifetime_s, max_lifetime_s]``, as
  miniupnpd 2.3.1 does); a renewal from the same internal endpoint keeps the port; a lifetime of
  0 deletes it; a PCP request whose client address is not its source is refused;
* an inbound datagram to a leased port reaches the internal endpoint *whatever the NAT's
  filtering* (a DNAT rule), and the replies to a remote that came in that way leave by the leased
  port (conntrack's reply direction); the host's own new flows still go through the NAT's usual
  mapping (MASQUERADE: a symmetric NAT still gives them random ports);
* leases expire, and :meth:`PortMapNat.delete_lease` removes one mid-link: new remotes no longer
  get in, while the flows already running through it live on (conntrack keeps them, idle timer
  ``mapping_timeout``; what the kernel lab measured), unless ``flush`` drops them too (a
  conntrack flush, a reboot).

The wire is the core's codecs (:mod:`p2plab.core.natpmp`, :mod:`p2plab.core.pcp`), the ones the
worker's :class:`~p2plab.core.portmap.PortMapper` speaks.  UPnP is not modelled on the wire (SSDP
and SOAP are TCP/HTTP; the worker's driver feeds the library's result to the core):
:meth:`PortMapResponder.upnp_add_port_mapping` is the call.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2plab.core import natpmp, pcp
from p2plab.errors import ConfigError, PortMapError
from p2plab.lab.simnet import Address, Nat

__all__ = ["PORTMAP_PORT", "PROTOCOLS", "Lease", "PortMapConfig", "PortMapNat", "PortMapResponder"]

#: The gateway's NAT-PMP and PCP server port (RFC 6886 section 3, RFC 6887 section 19.1).
PORTMAP_PORT = natpmp.PORT
#: The protocols a router may offer, in the client's order of preference (Tailscale's).
PROTOCOLS: tuple[str, ...] = ("nat-pmp", "pcp", "upnp")


@dataclass(frozen=True)
class PortMapConfig:
    """What a simulated router offers (issue 20 samples these per NAT)."""

    protocols: frozenset[str] = frozenset({"nat-pmp", "pcp"})
    """The protocols it answers (subset of :data:`PROTOCOLS`); ``+pmp`` is NAT-PMP and PCP."""
    min_lifetime_s: float = 10.0
    """Shortest PCP and UPnP lease it grants (miniupnpd's ``min_lifetime``: the kernel lab sets
    10, miniupnpd's default is 120); shorter asks are raised.  NAT-PMP leases are granted as
    asked (miniupnpd 2.3.1, measured in the lab: docs/natlab-results.md)."""
    max_lifetime_s: float = 86400.0
    """Longest PCP and UPnP lease it grants (miniupnpd's ``max_lifetime``); longer are cut."""
    answer_delay_s: float = 0.001
    """The router's time to answer one request (its processing)."""
    upnp_delay_s: float = 0.03
    """UPnP's SSDP discovery plus the SOAP ``AddPortMapping`` exchange, end to end."""
    preserve_port: bool = True
    """Grant the suggested external port when it is free (miniupnpd does), else a random one."""

    def __post_init__(self) -> None:
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown:
            raise ConfigError(f"unknown port-mapping protocols {sorted(unknown)}")
        if not 0 < self.min_lifetime_s <= self.max_lifetime_s:
            raise ConfigError("need 0 < min_lifetime_s <= max_lifetime_s")
        if self.answer_delay_s < 0 or self.upnp_delay_s < 0:
            raise ConfigError("delays must be >= 0")


@dataclass
class Lease:
    """One port mapping the router granted."""

    protocol: str
    """Which protocol asked for it (``nat-pmp``, ``pcp``, ``upnp``)."""
    internal: Address
    """The LAN endpoint it forwards to."""
    external_port: int
    """The NAT's public port it holds."""
    expires_at: float
    """Virtual time it ends unless renewed."""
    remotes: set[Address] = field(default_factory=set)
    """Remote endpoints that came in through it (conntrack: their replies leave by the lease)."""


# -- the router's side ----------------------------------------------------------------------------


class PortMapResponder:
    """The router's lease table and its answers (sans-I/O: bytes and ``now`` in, bytes out)."""

    def __init__(
        self,
        config: PortMapConfig,
        public_ip: str,
        port_free: Callable[[int, Address], bool],
        rng: random.Random,
        now: float = 0.0,
    ) -> None:
        self.config = config
        self.public_ip = public_ip
        self._port_free = port_free
        self._rng = rng
        self.boot_time = now
        self.leases: dict[Address, Lease] = {}
        """Live (and not yet swept) leases by internal endpoint."""
        self._by_port: dict[int, Lease] = {}
        self.stats: Counter[str] = Counter()

    def epoch(self, now: float) -> int:
        """Seconds since the router's table began (NAT-PMP and PCP's epoch)."""
        return int(now - self.boot_time)

    def reset(self, now: float) -> None:
        """Forget every lease and restart the epoch (a reboot)."""
        self.leases.clear()
        self._by_port.clear()
        self.boot_time = now

    def lease_by_port(self, port: int, now: float) -> Lease | None:
        """The live lease holding external ``port`` (an expired one is swept)."""
        lease = self._by_port.get(port)
        if lease is None or lease.expires_at > now:
            return lease
        self.stats["leases_expired"] += 1
        self._drop(lease)
        return None

    def _drop(self, lease: Lease) -> None:
        if self.leases.get(lease.internal) is lease:
            del self.leases[lease.internal]
        if self._by_port.get(lease.external_port) is lease:
            del self._by_port[lease.external_port]

    def lease_for(self, internal: Address, now: float) -> Lease | None:
        """The live lease of ``internal``."""
        lease = self.leases.get(internal)
        return lease if lease is not None and lease.expires_at > now else None

    def delete(self, internal: Address) -> Lease | None:
        """Remove ``internal``'s lease (an administrator, or the client's delete)."""
        lease = self.leases.get(internal)
        if lease is not None:
            self._drop(lease)
            self.stats["leases_deleted"] += 1
        return lease

    def grant(
        self,
        protocol: str,
        internal: Address,
        suggested: int,
        lifetime: float,
        now: float,
        *,
        clamp: bool = True,
    ) -> Lease | None:
        """Create or renew ``internal``'s lease; None when no port is free or on delete (0 s).
        ``clamp``: the lifetime is held to ``[min_lifetime_s, max_lifetime_s]``."""
        if lifetime <= 0:
            self.delete(internal)
            return None
        life = lifetime
        if clamp:
            life = min(max(lifetime, self.config.min_lifetime_s), self.config.max_lifetime_s)
        lease = self.lease_for(internal, now)
        if lease is None:
            old = self.leases.get(internal)
            if old is not None:  # expired, not yet swept
                self.stats["leases_expired"] += 1
                self._drop(old)
            port = self._choose_port(internal, suggested, now)
            if port is None:
                self.stats["out_of_ports"] += 1
                return None
            lease = Lease(protocol, internal, port, now + life)
            self.leases[internal] = lease
            self._by_port[port] = lease
            self.stats["leases_granted"] += 1
        else:
            lease.expires_at = now + life
            lease.protocol = protocol
            self.stats["leases_renewed"] += 1
        return lease

    def _choose_port(self, internal: Address, suggested: int, now: float) -> int | None:
        def free(port: int) -> bool:
            return self.lease_by_port(port, now) is None and self._port_free(port, internal)

        if self.config.preserve_port and 1024 <= suggested <= 65535 and free(suggested):
            return suggested
        for _ in range(64):
            port = self._rng.randint(1024, 65535)
            if free(port):
                return port
        return None

    def upnp_add_port_mapping(
        self, internal: Address, external_port: int, lifetime: float, now: float
    ) -> Lease | None:
        """UPnP IGD ``AddPortMapping`` (None when UPnP is not offered or no port is free)."""
        if "upnp" not in self.config.protocols:
            self.stats["upnp_not_offered"] += 1
            return None
        return self.grant("upnp", internal, external_port, lifetime, now)

    def handle_datagram(self, data: bytes, src: Address, now: float) -> bytes | None:
        """A datagram to the gateway's port 5351 from LAN endpoint ``src``: the answer, or None
        (not offered, or junk: counted).  The core's codecs read and write the wire."""
        try:
            if data[:1] == bytes([pcp.VERSION]):
                if "pcp" not in self.config.protocols:
                    self.stats["pcp_not_offered"] += 1
                    return None
                return self._pcp(pcp.parse_request(data), src, now)
            if "nat-pmp" not in self.config.protocols:
                self.stats["natpmp_not_offered"] += 1
                return None
            return self._natpmp(natpmp.parse_request(data), src, now)
        except PortMapError:
            self.stats["junk"] += 1
            return None

    def _natpmp(self, req: natpmp.Request, src: Address, now: float) -> bytes:
        epoch = self.epoch(now)
        if isinstance(req, natpmp.ExternalAddressRequest):
            self.stats["natpmp_address"] += 1
            return bytes(natpmp.ExternalAddressResponse(0, epoch, self.public_ip))
        if req.opcode != natpmp.OP_MAP_UDP:
            self.stats["natpmp_unsupported"] += 1
            code = natpmp.ResultCode.UNSUPPORTED_OPCODE
            return bytes(natpmp.MapResponse(req.opcode, code, epoch, req.internal_port, 0, 0))
        internal = (src[0], req.internal_port)
        suggested = req.external_port or req.internal_port
        # miniupnpd 2.3.1 grants NAT-PMP leases as asked (its max_lifetime caps PCP only).
        lease = self.grant("nat-pmp", internal, suggested, req.lifetime_s, now, clamp=False)
        self.stats["natpmp_map"] += 1
        if lease is None and req.lifetime_s:
            code = natpmp.ResultCode.OUT_OF_RESOURCES
            return bytes(natpmp.MapResponse(req.opcode, code, epoch, req.internal_port, 0, 0))
        port = lease.external_port if lease is not None else 0
        life = round(lease.expires_at - now) if lease is not None else 0
        return bytes(natpmp.MapResponse(req.opcode, 0, epoch, req.internal_port, port, life))

    def _pcp(self, req: pcp.Request, src: Address, now: float) -> bytes:
        epoch = self.epoch(now)
        if req.opcode == pcp.ANNOUNCE:
            self.stats["pcp_announce"] += 1
            return bytes(pcp.Response(pcp.ANNOUNCE, 0, 0, epoch))
        body = req.map
        if req.opcode != pcp.MAP or body is None:
            self.stats["pcp_unsupported"] += 1
            return bytes(pcp.Response(req.opcode, pcp.ResultCode.UNSUPP_OPCODE, 0, epoch))
        if req.client_ip != src[0]:  # RFC 6887 section 8.3: the source address is checked
            self.stats["pcp_address_mismatch"] += 1
            return bytes(pcp.Response(pcp.MAP, pcp.ResultCode.ADDRESS_MISMATCH, 0, epoch, body))
        if body.protocol != pcp.PROTO_UDP:
            self.stats["pcp_unsupported"] += 1
            return bytes(pcp.Response(pcp.MAP, pcp.ResultCode.UNSUPP_PROTOCOL, 0, epoch, body))
        lease = self.grant("pcp", (src[0], body.internal_port), body.external_port,
                           req.lifetime_s, now)  # fmt: skip
        self.stats["pcp_map"] += 1
        if lease is None and req.lifetime_s:
            return bytes(pcp.Response(pcp.MAP, pcp.ResultCode.NO_RESOURCES, 0, epoch, body))
        port = lease.external_port if lease is not None else body.external_port
        life = round(lease.expires_at - now) if lease is not None else 0
        answer = pcp.MapData(body.nonce, pcp.PROTO_UDP, body.internal_port, port, self.public_ip)
        return bytes(pcp.Response(pcp.MAP, 0, life, epoch, answer))


# -- the NAT box --------------------------------------------------------------------------------


class PortMapNat(Nat):
    """A :class:`Nat` whose router answers port-mapping requests on ``gateway_ip``:5351 and
    forwards leased ports (see the module docstring)."""

    def __init__(self, *args: Any, portmap: PortMapConfig, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gateway_ip = str(self.lan.network_address + 1)
        """The router's LAN address (the hosts' default gateway)."""
        # Its own dice for lease ports: granting a lease must not shift the simulation's draws.
        self.responder = PortMapResponder(
            portmap,
            self.public_ip,
            self._lease_port_free,
            random.Random(f"portmap {seed} {self.public_ip}"),
            self.net.clock.now,
        )
        # Flows of deleted leases that conntrack still holds: (external port, remote) ->
        # (internal endpoint, idle expiry).
        self._flows: dict[tuple[int, Address], tuple[Address, float]] = {}

    @property
    def portmap(self) -> PortMapConfig:
        """What the router offers."""
        return self.responder.config

    def _lease_port_free(self, port: int, internal: Address) -> bool:
        # A port another endpoint's mapping holds is taken; the endpoint's own mapping may share it
        # (Linux: the DNAT rule and MASQUERADE's port-preserving entry coexist).
        return all(m["external"][1] != port or m["internal"] == internal for m in self.mappings)

    def delete_lease(self, internal: Address, *, flush: bool = False) -> Lease | None:
        """Remove ``internal``'s lease mid-link (miniupnpd's delete: the DNAT rule goes).  The
        flows that came in through it keep running as conntrack entries until they idle out;
        ``flush`` drops them as well (``conntrack -F``: the link through the lease dies)."""
        lease = self.responder.delete(internal)
        if lease is not None and not flush:
            until = self.net.clock.now + self.behavior.mapping_timeout
            for remote in lease.remotes:
                self._flows[(lease.external_port, remote)] = (lease.internal, until)
        return lease

    def _flow(self, port: int, remote: Address) -> Address | None:
        """The internal endpoint of a live orphaned flow (refreshed: it carries traffic)."""
        entry = self._flows.get((port, remote))
        now = self.net.clock.now
        if entry is None or entry[1] <= now:
            self._flows.pop((port, remote), None)
            return None
        self._flows[(port, remote)] = (entry[0], now + self.behavior.mapping_timeout)
        return entry[0]

    def flush(self) -> None:
        """Forget every mapping and every lease (a reboot's table)."""
        super().flush()
        self.responder.reset(self.net.clock.now)
        self._flows.clear()

    def from_lan(self, src: Address, dst: Address, data: bytes) -> None:
        """Requests to the router are answered; replies to a remote that came in through a lease
        leave by the leased port; everything else is the NAT's."""
        if self._down():
            return
        now = self.net.clock.now
        if dst == (self.gateway_ip, PORTMAP_PORT):
            answer = self.responder.handle_datagram(data, src, now)
            host = self.hosts.get(src[0])
            if answer is not None and host is not None:
                self.stats["portmap_answers"] += 1
                gateway = (self.gateway_ip, PORTMAP_PORT)
                delay = self.portmap.answer_delay_s

                def answer_back() -> None:
                    host.link.down.send(len(answer), lambda: host.receive(gateway, src, answer))

                self.net.clock.call_later(delay, answer_back)
            return
        lease = self.responder.lease_for(src, now)
        port = lease.external_port if lease is not None and dst in lease.remotes else None
        if port is None:
            port = next(
                (p for (p, r), (i, _) in self._flows.items() if r == dst and i == src), None
            )
            if port is not None and self._flow(port, dst) is None:
                port = None
        if port is not None:
            self.stats["out_leased"] += 1
            external = (self.public_ip, port)
            self.wan.up.send(len(data), lambda: self.net.route(external, dst, data))
            return
        super().from_lan(src, dst, data)

    def from_wan(self, src: Address, dst: Address, data: bytes) -> None:
        """A datagram to a leased port reaches the lease's host whatever the filtering."""
        if self._down():
            return
        lease = self.responder.lease_by_port(dst[1], self.net.clock.now)
        internal = lease.internal if lease is not None else self._flow(dst[1], src)
        if internal is None:
            super().from_wan(src, dst, data)
            return
        host = self.hosts.get(internal[0])
        if host is None:
            self.stats["no_host"] += 1
            return
        if lease is not None:
            lease.remotes.add(src)
        self.stats["in_leased"] += 1
        host.link.down.send(len(data), lambda: host.receive(src, internal, data))
