"""Port mapping on a simulated NAT (issue 18): the router's lease table, its NAT-PMP / PCP answers
on the wire, UPnP IGD as a call, and a NAT box that forwards a leased port.

What a router running miniupnpd does, as far as a peer-to-peer link can tell:

* it answers NAT-PMP (RFC 6886) and PCP (RFC 6887: ANNOUNCE, MAP) on the gateway's UDP port 5351
  and UPnP IGD (``AddPortMapping`` over SOAP) when those protocols are offered
  (:class:`PortMapConfig`); what is not offered stays silent (a request is counted and dropped);
* a lease maps the NAT's public IP and an external port to one internal endpoint for a lifetime
  (clamped to ``[min_lifetime_s, max_lifetime_s]``, as miniupnpd's PCP does); a renewal from the
  same internal endpoint keeps the port; a lifetime of 0 deletes it;
* an inbound datagram to a leased port reaches the internal endpoint *whatever the NAT's
  filtering* (a DNAT rule), and the replies to a remote that came in that way leave by the leased
  port (conntrack's reply direction); the host's own new flows still go through the NAT's usual
  mapping (MASQUERADE: a symmetric NAT still gives them random ports);
* leases expire, and :meth:`PortMapNat.delete_lease` removes one mid-link: new remotes no longer
  get in, while the flows already running through it live on (conntrack keeps them, idle timer
  ``mapping_timeout``), unless ``flush`` drops them too (a conntrack flush, a reboot).

The wire codecs here are minimal (the requests a client sends, the answers miniupnpd gives) and sit
behind :class:`PortMapResponder` only, so the core's codecs (``core/natpmp.py``, ``core/pcp.py``,
issue 18's client) can replace them without touching the NAT.  UPnP is not modelled on the wire
(SSDP and SOAP are TCP/HTTP; the client's driver feeds the library's result to the core):
:meth:`PortMapResponder.upnp_add_port_mapping` is the call.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2plab.errors import ConfigError
from p2plab.lab.simnet import Address, Nat

__all__ = [
    "PCP_ANNOUNCE",
    "PCP_MAP",
    "PORTMAP_PORT",
    "PROTOCOLS",
    "Lease",
    "PortMapConfig",
    "PortMapNat",
    "PortMapResponder",
    "decode_natpmp_answer",
    "decode_pcp_answer",
    "natpmp_map_request",
    "pcp_announce_request",
    "pcp_map_request",
]

#: The gateway's NAT-PMP and PCP server port (RFC 6886 section 3, RFC 6887 section 19.1).
PORTMAP_PORT = 5351
#: The protocols a router may offer, in the client's order of preference (Tailscale's).
PROTOCOLS: tuple[str, ...] = ("nat-pmp", "pcp", "upnp")

PCP_ANNOUNCE = 0
PCP_MAP = 1
_PMP_OP_ADDRESS = 0
_PMP_OP_MAP_UDP = 1
_PMP_UNSUPPORTED_OPCODE = 5
_PCP_UNSUPP_OPCODE = 4
_PCP_MALFORMED = 3
_UDP = 17


@dataclass(frozen=True)
class PortMapConfig:
    """What a simulated router offers (issue 20 samples these per NAT)."""

    protocols: frozenset[str] = frozenset({"nat-pmp", "pcp"})
    """The protocols it answers (subset of :data:`PROTOCOLS`); ``+pmp`` is NAT-PMP and PCP."""
    min_lifetime_s: float = 120.0
    """Shortest lease it grants (miniupnpd's PCP ``min_lifetime``); shorter asks are raised."""
    max_lifetime_s: float = 86400.0
    """Longest lease it grants (miniupnpd's ``max_lifetime``); longer asks are cut."""
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


# -- wire: the client's requests (what a test or the sim client sends) --------------------------


def natpmp_map_request(internal_port: int, external_port: int, lifetime_s: int) -> bytes:
    """A NAT-PMP UDP mapping request (RFC 6886 section 3.3)."""
    return struct.pack("!BBHHHI", 0, _PMP_OP_MAP_UDP, 0, internal_port, external_port, lifetime_s)


def pcp_announce_request(client_ip: str) -> bytes:
    """A PCP ANNOUNCE request (RFC 6887 section 14.1): the header alone."""
    return _pcp_header(PCP_ANNOUNCE, 0, client_ip)


def pcp_map_request(
    client_ip: str, nonce: bytes, internal_port: int, external_port: int, lifetime_s: int
) -> bytes:
    """A PCP MAP request for UDP (RFC 6887 section 11.1), suggesting ``external_port``."""
    body = nonce + struct.pack("!B3xHH", _UDP, internal_port, external_port) + bytes(16)
    return _pcp_header(PCP_MAP, lifetime_s, client_ip) + body


def _pcp_header(opcode: int, lifetime_s: int, client_ip: str) -> bytes:
    ip16 = ipaddress.IPv6Address(f"::ffff:{client_ip}").packed
    return struct.pack("!BBHI", 2, opcode, 0, lifetime_s) + ip16


def decode_natpmp_answer(data: bytes) -> dict[str, Any] | None:
    """A NAT-PMP answer's fields (``op``, ``result``, ``epoch``, and for a mapping
    ``internal_port``, ``external_port``, ``lifetime_s``; for the address op ``ip``), or None
    if it is not one."""
    if len(data) < 8 or data[0] != 0 or data[1] < 128:
        return None
    op, result, epoch = data[1] - 128, *struct.unpack("!HI", data[2:8])
    out: dict[str, Any] = {"op": op, "result": result, "epoch": epoch}
    if op == _PMP_OP_ADDRESS and len(data) >= 12:
        out["ip"] = str(ipaddress.IPv4Address(data[8:12]))
    elif op in (1, 2) and len(data) >= 16:
        out["internal_port"], out["external_port"], out["lifetime_s"] = struct.unpack(
            "!HHI", data[8:16]
        )
    return out


def decode_pcp_answer(data: bytes) -> dict[str, Any] | None:
    """A PCP answer's fields (``op``, ``result``, ``lifetime_s``, ``epoch``, and for MAP ``nonce``,
    ``internal_port``, ``external_port``, ``ip``), or None if it is not one."""
    if len(data) < 24 or data[0] != 2 or not data[1] & 0x80:
        return None
    op = data[1] & 0x7F
    result = data[3]
    lifetime, epoch = struct.unpack("!II", data[4:12])
    out: dict[str, Any] = {"op": op, "result": result, "lifetime_s": lifetime, "epoch": epoch}
    if op == PCP_MAP and len(data) >= 60:
        out["nonce"] = data[24:36]
        out["internal_port"], out["external_port"] = struct.unpack("!HH", data[40:44])
        ip = ipaddress.IPv6Address(data[44:60])
        out["ip"] = str(ip.ipv4_mapped or ip)
    return out


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
        self.stats: Counter[str] = Counter()

    def epoch(self, now: float) -> int:
        """Seconds since the router's table began (NAT-PMP and PCP's epoch)."""
        return int(now - self.boot_time)

    def reset(self, now: float) -> None:
        """Forget every lease and restart the epoch (a reboot)."""
        self.leases.clear()
        self.boot_time = now

    def lease_by_port(self, port: int, now: float) -> Lease | None:
        """The live lease holding external ``port``."""
        for lease in list(self.leases.values()):
            if lease.expires_at <= now:
                self.stats["leases_expired"] += 1
                del self.leases[lease.internal]
            elif lease.external_port == port:
                return lease
        return None

    def lease_for(self, internal: Address, now: float) -> Lease | None:
        """The live lease of ``internal``."""
        lease = self.leases.get(internal)
        return lease if lease is not None and lease.expires_at > now else None

    def delete(self, internal: Address) -> Lease | None:
        """Remove ``internal``'s lease (an administrator, or the client's delete)."""
        lease = self.leases.pop(internal, None)
        if lease is not None:
            self.stats["leases_deleted"] += 1
        return lease

    def grant(
        self, protocol: str, internal: Address, suggested: int, lifetime: float, now: float
    ) -> Lease | None:
        """Create or renew ``internal``'s lease; None when no port is free or on delete (0 s)."""
        if lifetime <= 0:
            self.delete(internal)
            return None
        life = min(max(lifetime, self.config.min_lifetime_s), self.config.max_lifetime_s)
        lease = self.lease_for(internal, now)
        if lease is None:
            port = self._choose_port(internal, suggested, now)
            if port is None:
                self.stats["out_of_ports"] += 1
                return None
            lease = Lease(protocol, internal, port, now + life)
            self.leases[internal] = lease
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
        (not offered, or junk: counted)."""
        if len(data) >= 2 and data[0] == 0:
            if "nat-pmp" not in self.config.protocols:
                self.stats["natpmp_not_offered"] += 1
                return None
            return self._natpmp(data, src, now)
        if len(data) >= 24 and data[0] == 2:
            if "pcp" not in self.config.protocols:
                self.stats["pcp_not_offered"] += 1
                return None
            return self._pcp(data, src, now)
        self.stats["junk"] += 1
        return None

    def _natpmp(self, data: bytes, src: Address, now: float) -> bytes | None:
        op = data[1]
        epoch = self.epoch(now)
        if op == _PMP_OP_ADDRESS and len(data) == 2:
            self.stats["natpmp_address"] += 1
            ip = ipaddress.IPv4Address(self.public_ip).packed
            return struct.pack("!BBHI", 0, 128, 0, epoch) + ip
        if op == _PMP_OP_MAP_UDP and len(data) == 12:
            _, _, _, internal_port, suggested, lifetime = struct.unpack("!BBHHHI", data)
            internal = (src[0], internal_port)
            lease = self.grant("nat-pmp", internal, suggested or internal_port, lifetime, now)
            self.stats["natpmp_map"] += 1
            port = lease.external_port if lease is not None else 0
            life = int(lease.expires_at - now) if lease is not None else 0
            return struct.pack("!BBHIHHI", 0, 128 + op, 0, epoch, internal_port, port, life)
        if op > 2:
            self.stats["natpmp_unsupported"] += 1
            return struct.pack("!BBHI", 0, 128 + op, _PMP_UNSUPPORTED_OPCODE, epoch)
        self.stats["junk"] += 1
        return None

    def _pcp(self, data: bytes, src: Address, now: float) -> bytes | None:
        op = data[1] & 0x7F
        lifetime = struct.unpack("!I", data[4:8])[0]
        epoch = self.epoch(now)
        if data[1] & 0x80:
            self.stats["junk"] += 1
            return None
        if op == PCP_ANNOUNCE:
            self.stats["pcp_announce"] += 1
            return self._pcp_answer(op, 0, 0, epoch, b"")
        if op != PCP_MAP:
            self.stats["pcp_unsupported"] += 1
            return self._pcp_answer(op, _PCP_UNSUPP_OPCODE, 0, epoch, b"")
        if len(data) < 60 or data[36] != _UDP:
            self.stats["pcp_malformed"] += 1
            return self._pcp_answer(op, _PCP_MALFORMED, 0, epoch, b"")
        nonce = data[24:36]
        internal_port, suggested = struct.unpack("!HH", data[40:44])
        lease = self.grant("pcp", (src[0], internal_port), suggested, lifetime, now)
        self.stats["pcp_map"] += 1
        port = lease.external_port if lease is not None else 0
        life = int(lease.expires_at - now) if lease is not None else 0
        ip16 = ipaddress.IPv6Address(f"::ffff:{self.public_ip}").packed
        body = nonce + struct.pack("!B3xHH", _UDP, internal_port, port) + ip16
        return self._pcp_answer(op, 0, life, epoch, body)

    @staticmethod
    def _pcp_answer(op: int, result: int, life: int, epoch: int, body: bytes) -> bytes:
        return struct.pack("!BBxBII12x", 2, 0x80 | op, result, life, epoch) + body


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
