"""IPv6 in the simulator (issue 19): stateful firewalls that filter without translating, the
network that routes both families, and the documentation prefix the kernel lab uses.

An IPv6 site has no NAT: its hosts hold global addresses from 2001:db8::/32 and a firewall sits
between them and the internet (RFC 6092).  What it lets in is what it saw go out:

* ``v6-open``: everything;
* ``v6-apdf``: a conntrack-only forward chain: address-and-port-dependent filtering, with
  Linux's UDP timers (30 s for a flow seen one way, ``nf_conntrack_udp_timeout``; 120 s once a
  reply came, ``nf_conntrack_udp_timeout_stream``);
* ``v6-eif``: that, plus an nftables dynamic set of outbound source ``address . port`` (timeout
  300 s, refreshed by each outbound datagram) matched on the inbound destination:
  endpoint-independent filtering (RFC 6092 REC-17).

A dual-stack host has an IPv4 address (behind its site's NAT, or public) and an IPv6 one behind
its site's firewall, and one access link for both; :class:`SimNetwork` sends each datagram by its
source family (to the NAT or to the firewall) and routes IPv6 destinations to their firewall.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from dataclasses import dataclass

from p2plab.core.nat import FilteringBehavior
from p2plab.errors import ConfigError
from p2plab.lab.simnet import EIF, Address, Host, LinkConfig, Network, Scheduler

__all__ = [
    "STUN_IPS6",
    "V6_FIREWALLS",
    "V6_PREFIX",
    "Firewall6",
    "FirewallBehavior",
    "SimNetwork",
    "is_ipv6",
]

#: The documentation prefix (RFC 3849) the simulator and the kernel lab hand out.
V6_PREFIX = ipaddress.IPv6Network("2001:db8::/32")
#: The STUN server's two IPv6 addresses (RFC 5780 needs two), beside its IPv4 ones.
STUN_IPS6 = ("2001:db8:ffff::10", "2001:db8:ffff::11")


def is_ipv6(ip: str) -> bool:
    """Whether ``ip`` (an address literal) is IPv6: the drivers' one test (``":" in ip``)."""
    return ":" in ip


@dataclass(frozen=True)
class FirewallBehavior:
    """What one IPv6 firewall does (issue 20 samples these)."""

    filtering: FilteringBehavior | None = FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT
    """RFC 4787 filtering applied to inbound datagrams (no mapping: addresses stay as they are);
    None lets everything in."""
    idle_timeout_s: float = 120.0
    """Seconds a flow that has seen a reply stays open without traffic (conntrack's stream
    timer; RFC 6092 REC-12 asks for >= 120 s)."""
    unreplied_timeout_s: float = 30.0
    """Seconds a flow seen outbound only stays open (conntrack's unreplied UDP timer)."""
    eif_timeout_s: float = 300.0
    """Endpoint-independent filtering only: seconds an outbound source address and port stays
    open to anyone after its last outbound datagram (the nftables set's timeout)."""

    def __post_init__(self) -> None:
        if min(self.idle_timeout_s, self.unreplied_timeout_s, self.eif_timeout_s) <= 0:
            raise ConfigError("firewall timers must be > 0")
        if self.filtering is FilteringBehavior.UNKNOWN:
            raise ConfigError("filtering behaviour must be known (or None: open)")


#: The kernel lab's IPv6 firewall profiles (natlab.md "IPv6 in the lab").
V6_FIREWALLS: dict[str, FirewallBehavior] = {
    "v6-open": FirewallBehavior(filtering=None),
    "v6-apdf": FirewallBehavior(FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT),
    "v6-eif": FirewallBehavior(EIF),
}


class Firewall6:
    """An IPv6 site's stateful firewall: one /48 of 2001:db8::/32, its hosts, a WAN link."""

    def __init__(
        self,
        net: SimNetwork,
        name: str,
        prefix: ipaddress.IPv6Network,
        behavior: FirewallBehavior,
        wan: LinkConfig,
        profile: str | None = None,
    ) -> None:
        self.net = net
        self.name = name
        self.prefix = prefix
        self.behavior = behavior
        self.profile = profile
        self.wan = net.link_end(wan, f"{name}/wan6")
        """The WAN link (its ``link``: ``up`` to the internet, ``down`` from it)."""
        self.hosts: dict[str, Host] = {}
        self.stats: Counter[str] = Counter()
        # Conntrack: flows (internal, remote) -> (expiry, a reply seen); the EIF set: outbound
        # sources (internal) -> expiry.
        self._flows: dict[tuple[Address, Address], tuple[float, bool]] = {}
        self._sources: dict[Address, float] = {}
        self._next_host = 0x100
        self.down_until = 0.0
        """Until this virtual time the firewall passes nothing (:meth:`outage`)."""

    def allocate_ip(self) -> str:
        """The next host address of the site's prefix."""
        ip = str(self.prefix.network_address + self._next_host)
        self._next_host += 1
        return ip

    def flush(self) -> None:
        """Forget every flow (a firewall restart)."""
        self.stats["flushes"] += 1
        self._flows.clear()
        self._sources.clear()

    def outage(self, seconds: float) -> None:
        """Pass nothing either way for ``seconds`` (an IPv6 uplink that goes away and comes
        back; the flows survive, as they do in a router whose upstream only flapped)."""
        self.down_until = self.net.clock.now + seconds

    def _down(self) -> bool:
        if self.net.clock.now < self.down_until:
            self.stats["dropped_down"] += 1
            return True
        return False

    def _open(self, internal: Address, remote: Address) -> bool:
        """Whether an inbound datagram passes; a conntrack flow it answers is refreshed."""
        now = self.net.clock.now
        b = self.behavior
        flow = self._flows.get((internal, remote))
        if flow is not None and flow[0] > now:
            self._flows[(internal, remote)] = (now + b.idle_timeout_s, True)
            return True
        if b.filtering is None:
            return True
        if b.filtering is EIF:
            return self._sources.get(internal, 0.0) > now
        if b.filtering is FilteringBehavior.ADDRESS_DEPENDENT:
            return any(
                i == internal and r[0] == remote[0] and t > now
                for (i, r), (t, _) in self._flows.items()
            )
        return False

    def from_lan(self, src: Address, dst: Address, data: bytes) -> None:
        """A datagram from a host of the site: it opens (or refreshes) the way back."""
        if self._down():
            return
        local = self.hosts.get(dst[0])
        if local is not None:
            self.stats["lan_forwarded"] += 1
            local.link.down.send(len(data), lambda: local.receive(src, dst, data))
            return
        now = self.net.clock.now
        b = self.behavior
        flow = self._flows.get((src, dst))
        replied = flow is not None and flow[0] > now and flow[1]
        timeout = b.idle_timeout_s if replied else b.unreplied_timeout_s
        self._flows[(src, dst)] = (now + timeout, replied)
        self._sources[src] = now + b.eif_timeout_s
        if len(self._flows) > 4096:  # bounded: sweep what has expired
            self._flows = {k: v for k, v in self._flows.items() if v[0] > now}
            self._sources = {k: t for k, t in self._sources.items() if t > now}
        self.stats["out"] += 1
        self.wan.link.up.send(len(data), lambda: self.net.route(src, dst, data))

    def from_wan(self, src: Address, dst: Address, data: bytes) -> None:
        """A datagram from the internet for a host of the site: passed if the filter allows."""
        if self._down():
            return
        host = self.hosts.get(dst[0])
        if host is None:
            self.stats["no_host"] += 1
            return
        if not self._open(dst, src):
            self.stats["filtered"] += 1
            return
        self.stats["in"] += 1
        host.link.down.send(len(data), lambda: host.receive(src, dst, data))

    def __repr__(self) -> str:
        return f"Firewall6({self.name!r}, {self.prefix}, {self.profile or self.behavior})"


class SimNetwork(Network):
    """The simulation's internet, both families: IPv6 addresses behind a firewall go through it."""

    def __init__(self, clock: Scheduler, rng: random.Random) -> None:
        super().__init__(clock, rng)
        self.firewalls6: dict[str, Firewall6] = {}
        """The firewall in front of each firewalled IPv6 host address."""

    def link_end(self, config: LinkConfig, name: str) -> Host:
        """A link (both directions, ``.link``) for a firewall's WAN side: an addressless host's
        access link, so that link behaves exactly like every other one of the network."""
        return Host(self, name, ("::",), None, config)

    def add_firewall_host(self, fw: Firewall6, host: Host, ip: str) -> None:
        """Put ``host``'s IPv6 address ``ip`` behind ``fw``."""
        fw.hosts[ip] = host
        self.firewalls6[ip] = fw

    def send_from_host(self, host: Host, src: Address, dst: Address, data: bytes) -> None:
        """IPv6 from a firewalled address goes to its firewall; anything else as before."""
        fw = self.firewalls6.get(src[0]) if is_ipv6(src[0]) else None
        if fw is not None:
            host.link.up.send(len(data), lambda: fw.from_lan(src, dst, data))
        elif is_ipv6(src[0]):  # a public IPv6 address (the STUN server's)
            host.link.up.send(len(data), lambda: self.route(src, dst, data))
        else:
            super().send_from_host(host, src, dst, data)

    def route(self, src: Address, dst: Address, data: bytes) -> None:
        """A datagram on the internet: to the firewall of a firewalled IPv6 address, else to
        whoever owns the destination; never across families."""
        if is_ipv6(src[0]) != is_ipv6(dst[0]):
            self.stats["family_mismatch"] += 1
            return
        fw = self.firewalls6.get(dst[0])
        if fw is not None:
            fw.wan.link.down.send(len(data), lambda: fw.from_wan(src, dst, data))
            return
        super().route(src, dst, data)
