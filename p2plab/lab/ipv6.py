"""IPv6 in the kernel lab: the addressing plan, the routers' forwarding and the firewall profiles.

IPv6 in the lab has no NAT: every host has a global address from the documentation prefix
2001:db8::/32 (RFC 3849) and a site's router only filters.  Each run gets its own /48, from the
run prefix's four hex digits (run ``p2l1a2b`` -> ``2001:db8:1a2b::/48``), so two labs up at once
never share an address even if a route ever joined them::

    public segment   2001:db8:R::/64     rendezvous ::2, stun ::10 + ::11, routers ::101 (a)
                                         and ::102 (b), open hosts ::201 (a) and ::202 (b)
    site a's LAN     2001:db8:R:a::/64   router ::1, hosts ::2 (and ::3 on a shared LAN)
    site b's LAN     2001:db8:R:b::/64   router ::1, host ::2

The public side reaches a site's LAN through a route via that site's router (there is no NAT to
hide the LAN behind).  Addresses are added with ``nodad``: duplicate address detection would keep
them tentative (unusable, coturn cannot bind them) for a second or more, and no address here can
be a duplicate.

Firewall profiles (nftables text, an ``ip6`` table so the IPv4 NAT's iptables rules are untouched):

``v6-open``
    forwards everything.
``v6-apdf``
    address-and-port-dependent filtering: outbound passes, inbound only ``ct state
    established,related`` (conntrack's reply direction of an outbound flow).  Two such sites punch
    like two port-restricted NATs: the first packet each way is dropped by the far side, the
    answer to it passes as a reply.
``v6-eif``
    endpoint-independent filtering (RFC 6092 REC-17): every outbound UDP source ``address . port``
    goes into a dynamic set (timeout 300 s, refreshed by each outbound datagram); inbound UDP to a
    member passes whoever sends it.

Every profile also drops new connections to the router itself from the WAN (``INPUT`` new-drop,
like the IPv4 profiles), ICMPv6 excepted: neighbour discovery must work.  A site whose IPv4
profile is ``open`` has no router: its host sits on the public segment and the profile becomes a
host firewall on its own input (the same rules, on the host's ``input`` and ``output`` hooks).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from p2plab.errors import ConfigError
from p2plab.lab.profiles import expected_outcome
from p2plab.lab.site import V6_PROFILES, SiteProfile, parse_site

__all__ = [
    "BLOCK_TABLE",
    "EIF_TIMEOUT_S",
    "LAB_SUPERNET",
    "NFT_TABLE",
    "NO_DAD_SYSCTLS",
    "Step",
    "V6Plan",
    "addr_argv",
    "block_ruleset",
    "bracket",
    "expected_site_outcome",
    "firewall_ruleset",
    "forwarding_argv",
    "has_v6",
    "lan_route_steps",
    "open_host_steps",
    "route_argv",
    "router_site_steps",
    "server_steps",
    "switch_argv",
]

#: Every IPv6 address the lab uses lies in the documentation prefix (RFC 3849).
LAB_SUPERNET = ipaddress.IPv6Network("2001:db8::/32")

#: How long an outbound source stays open to anyone on a ``v6-eif`` site (RFC 6092 REC-12 asks
#: for at least 2 minutes of UDP idle time; issue 19 says 300 s).
EIF_TIMEOUT_S = 300

#: Set in every namespace of a lab with IPv6 before its interfaces exist.  Without them the
#: link-local addresses stay tentative for a second or more, and a router forwarding a datagram
#: cannot solicit its next hop (neighbour discovery sources from the link-local address): the
#: datagram waits in the neighbour queue and arrives late (seen here: an unsolicited datagram
#: held until after the firewall had opened for it).
NO_DAD_SYSCTLS: tuple[str, ...] = (
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
)

#: The nftables table the profiles live in (``ip6`` family: IPv4 is left to iptables).
NFT_TABLE = "p2plab6"

#: One setup command: argv and the text it reads on stdin (None: nothing).
Step = tuple[list[str], str | None]

_PUBLIC_HOST_ID = {
    "rendezvous": 0x2,
    "stun": 0x10,
    "stun_alt": 0x11,
    "nat_a": 0x101,
    "nat_b": 0x102,
    "open_a": 0x201,
    "open_b": 0x202,
}
_SITE_SUBNET = {"a": 0xA, "b": 0xB}
_RUN_RE = re.compile(r"p2l([0-9a-f]{4})")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@dataclass(frozen=True)
class V6Plan:
    """The IPv6 addresses of one lab run (see the module docstring for the layout)."""

    run: str
    """The run prefix (``p2l`` + 4 hex digits) the /48 is taken from."""

    def __post_init__(self) -> None:
        if not _RUN_RE.fullmatch(self.run):
            raise ConfigError(f"run prefix must be 'p2l' and 4 hex digits, got {self.run!r}")

    @property
    def network(self) -> ipaddress.IPv6Network:
        """The run's /48 inside 2001:db8::/32."""
        word = int(self.run[3:], 16)
        return ipaddress.IPv6Network((int(LAB_SUPERNET.network_address) | word << 80, 48))

    def _subnet(self, subnet_id: int) -> ipaddress.IPv6Network:
        return ipaddress.IPv6Network((int(self.network.network_address) | subnet_id << 64, 64))

    @property
    def public_net(self) -> ipaddress.IPv6Network:
        """The public segment's /64."""
        return self._subnet(0)

    def lan_net(self, site: str) -> ipaddress.IPv6Network:
        """Site ``a``'s or ``b``'s LAN /64."""
        return self._subnet(_SITE_SUBNET[site])

    def public(self, name: str) -> str:
        """A public-segment address: ``rendezvous``, ``stun``, ``stun_alt``, ``nat_a``,
        ``nat_b``, ``open_a``, ``open_b``."""
        return str(self.public_net.network_address + _PUBLIC_HOST_ID[name])

    def router_lan(self, site: str) -> str:
        """The router's address on a site's LAN (the hosts' default gateway)."""
        return str(self.lan_net(site).network_address + 1)

    def lan_host(self, site: str, index: int) -> str:
        """The ``index``-th host (from 0) on a site's LAN."""
        return str(self.lan_net(site).network_address + 2 + index)

    @property
    def stun_addresses(self) -> tuple[str, str]:
        """The STUN host's two IPv6 addresses (RFC 5780's primary and alternate)."""
        return (self.public("stun"), self.public("stun_alt"))

    def contains(self, address: str) -> bool:
        """True when ``address`` is one of this run's."""
        try:
            return ipaddress.IPv6Address(address.split("%")[0]) in self.network
        except ValueError:
            return False


def addr_argv(ns: str, dev: str, address: str, prefixlen: int = 64) -> list[str]:
    """``ip`` argv adding ``address`` to ``dev`` in ``ns``, usable at once (``nodad``)."""
    ipaddress.IPv6Address(address)
    return ["ip", "-n", ns, "-6", "addr", "add", f"{address}/{prefixlen}", "dev", dev, "nodad"]


def route_argv(ns: str, destination: str, via: str) -> list[str]:
    """``ip`` argv adding an IPv6 route (``destination``: a prefix or ``default``)."""
    ipaddress.IPv6Address(via)
    return ["ip", "-n", ns, "-6", "route", "add", destination, "via", via]


def forwarding_argv(ns: str) -> list[str]:
    """argv that makes ``ns`` forward IPv6 (a router; no NAT, the firewall decides)."""
    return ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]


def switch_argv(ns: str) -> list[str]:
    """argv that keeps the LAN bridge in ``ns`` a plain switch for IPv6.

    With ``br_netfilter`` loaded (Docker loads it; its switches are per namespace and on by
    default) bridged IPv6 goes through the ``forward`` hook, and the firewall's drop policy
    filtered one LAN host from another (seen here: a datagram between two hosts of one
    ``v6-apdf`` LAN was dropped).  ``-e``: without the module the key does not exist, which is
    what this asks for anyway.
    """
    return ["ip", "netns", "exec", ns, "sysctl", "-qew", "net.bridge.bridge-nf-call-ip6tables=0"]


def _ifname(name: str) -> str:
    # Names go into nftables text quoted: refuse anything that could break out of the quotes.
    if not _IFNAME_RE.fullmatch(name):
        raise ConfigError(f"bad interface name {name!r}")
    return name


def firewall_ruleset(
    profile: str,
    *,
    wan_if: str,
    lan_if: str | None = None,
    timeout_s: int = EIF_TIMEOUT_S,
    loss: float = 0.0,
) -> str:
    """The ``nft -f`` input for an IPv6 firewall of ``profile`` (one of ``V6_PROFILES``).

    With ``lan_if`` it is a router's (hooks ``forward`` and ``input``); without, a host's own
    firewall on its public interface ``wan_if`` (hooks ``input`` and ``output``: the host of an
    ``open`` IPv4 site, which has no router).  ``loss`` drops that fraction of the UDP datagrams
    crossing ``wan_if``, each way (the IPv4 profiles' ``statistic`` rule, as ``numgen``).
    """
    if profile not in V6_PROFILES:
        raise ConfigError(f"unknown IPv6 profile {profile!r}; choose one of {V6_PROFILES}")
    if not 0 < timeout_s <= 86400:
        raise ConfigError(f"timeout must be 1..86400 s, got {timeout_s!r}")
    if not 0.0 <= loss < 1.0:
        raise ConfigError(f"loss must be in [0, 1), got {loss!r}")
    wan = f'"{_ifname(wan_if)}"'
    eif = profile == "v6-eif"
    drop = f"meta l4proto udp numgen random mod 1000000 < {round(loss * 1_000_000)} drop"
    lose_in = [f"\t\tiifname {wan} {drop}"] if loss else []
    lose_out = [f"\t\toifname {wan} {drop}"] if loss else []
    lines = [f"table ip6 {NFT_TABLE} {{"]
    if eif:
        lines += [
            "\tset eif_out {",
            "\t\ttype ipv6_addr . inet_service",
            "\t\tflags dynamic,timeout",
            f"\t\ttimeout {timeout_s}s",
            "\t}",
        ]
    # What passes inbound, in the order the filter chain checks it.
    inbound = ["ct state established,related accept"]
    if eif:
        inbound.append(f"iifname {wan} meta l4proto udp ip6 daddr . udp dport @eif_out accept")
    learn = "meta l4proto udp update @eif_out { ip6 saddr . udp sport }"
    if lan_if is not None:
        lan = f'"{_ifname(lan_if)}"'
        policy = "accept" if profile == "v6-open" else "drop"
        lines += [
            "\tchain forward {",
            f"\t\ttype filter hook forward priority filter; policy {policy};",
            *lose_in,
            *lose_out,
        ]
        if eif:
            lines.append(f"\t\tiifname {lan} oifname {wan} {learn}")
        if profile != "v6-open":
            lines.append(f"\t\tiifname {lan} oifname {wan} accept")
            lines += [f"\t\t{rule}" for rule in inbound]
        lines.append("\t}")
        # The router itself: nothing new from the WAN, as the IPv4 profiles' INPUT rule.
        lines += [
            "\tchain input {",
            "\t\ttype filter hook input priority filter; policy accept;",
            "\t\tmeta l4proto ipv6-icmp accept",
            f"\t\tiifname {wan} ct state new drop",
            "\t}",
        ]
    else:
        if eif or loss:
            lines += [
                "\tchain output {",
                "\t\ttype filter hook output priority filter; policy accept;",
                *lose_out,
                *([f"\t\toifname {wan} {learn}"] if eif else []),
                "\t}",
            ]
        lines += ["\tchain input {", "\t\ttype filter hook input priority filter; policy accept;"]
        lines += lose_in
        if profile != "v6-open":
            lines.append("\t\tmeta l4proto ipv6-icmp accept")
            lines += [f"\t\t{rule}" for rule in inbound]
            lines.append(f"\t\tiifname {wan} drop")
        lines.append("\t}")
    lines += ["}", ""]
    return "\n".join(lines)


#: The table :func:`block_ruleset` adds (``nft delete table ip6 p2plab6block`` lifts the block).
BLOCK_TABLE = "p2plab6block"


def block_ruleset(networks: Sequence[str], *, host: bool = False) -> str:
    """``nft -f`` input that drops IPv6 UDP to and from ``networks`` (e.g. the other site's
    LAN): IPv6 between two sites dies while IPv4 keeps working, so a link has to move between
    families.  A router's (the ``forward`` hook) or, with ``host``, a host's own (``input`` and
    ``output``: the host of an ``open`` site).  Its own table, before the firewall's (priority
    -10), so deleting the table (``nft delete table ip6 p2plab6block``) is the whole undo."""
    nets = [str(ipaddress.IPv6Network(net)) for net in networks]
    hook = "\t\ttype filter hook {} priority -10; policy accept;"
    lines = [f"table ip6 {BLOCK_TABLE} {{"]
    chains = (
        [("input", ["saddr"]), ("output", ["daddr"])] if host else [("forward", ["saddr", "daddr"])]
    )
    for chain, fields in chains:
        lines += [f"\tchain {chain} {{", hook.format(chain)]
        lines += [f"\t\tmeta l4proto udp ip6 {f} {net} drop" for net in nets for f in fields]
        lines.append("\t}")
    return "\n".join([*lines, "}", ""])


def _spec(site: str | SiteProfile) -> SiteProfile:
    return site if isinstance(site, SiteProfile) else parse_site(site)


def expected_site_outcome(
    site_a: str | SiteProfile,
    site_b: str | SiteProfile,
    *,
    same_lan: bool = False,
    v4_outcome: str | None = None,
) -> tuple[str, str]:
    """``(outcome, family)`` a pair of sites should give: ``direct`` or ``failed``, and the
    family of the direct link (``ipv6``, ``ipv4``; empty when failed).

    IPv6 on both sides goes direct over IPv6 whatever the firewalls (``v6-apdf`` x ``v6-apdf``
    punches like two port-restricted NATs; ``v6-eif`` and ``v6-open`` only help), and the engine
    ranks IPv6 first: so a dual-stack pair whose IPv4 needs a relay (``symmetric/v6-apdf`` twice)
    is direct over IPv6.  Otherwise IPv4 decides: ``v4_outcome`` when given (a caller that knows
    more), ``direct`` when a site maps ports on request (``symmetric+pmp``, issue 18), else the
    IPv4 table (:func:`p2plab.lab.profiles.expected_outcome`);
    sites with no family in common fail.
    """
    a, b = _spec(site_a), _spec(site_b)
    if same_lan:
        return "direct", "ipv6" if a.v6 else "ipv4"
    if a.v6 and b.v6:
        return "direct", "ipv6"
    if a.v4 and b.v4:
        # A site whose router maps ports on request (issue 18) is reachable from anywhere.
        mapped = "direct" if a.portmap or b.portmap else None
        outcome = v4_outcome or mapped or expected_outcome(a.v4, b.v4)
        return outcome, "ipv4" if outcome == "direct" else ""
    return "failed", ""


def bracket(address: str, port: int) -> str:
    """``ip:port`` for IPv4, ``[ip]:port`` for IPv6 (a URL's or ``ss``'s way)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def has_v6(specs: Sequence[str]) -> bool:
    """True when any of the site specs has an IPv6 profile."""
    return any(parse_site(s).v6 for s in specs)


def server_steps(plan: V6Plan, *, rv: tuple[str, str], stun: tuple[str, str]) -> list[Step]:
    """The rendezvous's and the STUN host's IPv6 addresses (``rv``/``stun``: namespace, ifname)."""
    steps: list[Step] = [(addr_argv(*rv, plan.public("rendezvous")), None)]
    steps += [(addr_argv(*stun, ip), None) for ip in plan.stun_addresses]
    return steps


def router_site_steps(
    plan: V6Plan,
    site: str,
    profile: str,
    *,
    ns: str,
    wan_if: str,
    lan_if: str,
    hosts: Sequence[tuple[str, str]],
    loss: float = 0.0,
) -> list[Step]:
    """A routed IPv6 site: the router's WAN and LAN addresses, forwarding, the firewall of
    ``profile``, and each LAN host (``hosts``: namespace, ifname, in LAN order) with its
    address and default route."""
    steps: list[Step] = [
        (addr_argv(ns, wan_if, plan.public(f"nat_{site}")), None),
        (addr_argv(ns, lan_if, plan.router_lan(site)), None),
        (forwarding_argv(ns), None),
        (switch_argv(ns), None),
        (["ip", "netns", "exec", ns, "nft", "-f", "-"],
         firewall_ruleset(profile, wan_if=wan_if, lan_if=lan_if, loss=loss)),
    ]  # fmt: skip
    for i, (host_ns, ifname) in enumerate(hosts):
        steps.append((addr_argv(host_ns, ifname, plan.lan_host(site, i)), None))
        steps.append((route_argv(host_ns, "default", plan.router_lan(site)), None))
    return steps


def open_host_steps(
    plan: V6Plan, host: str, profile: str, *, ns: str, ifname: str, loss: float = 0.0
) -> list[Step]:
    """A host on the public segment (its IPv4 site is ``open``) with its own firewall."""
    text = firewall_ruleset(profile, wan_if=ifname, loss=loss)
    return [
        (addr_argv(ns, ifname, plan.public(f"open_{host}")), None),
        (["ip", "netns", "exec", ns, "nft", "-f", "-"], text),
    ]


def lan_route_steps(plan: V6Plan, site: str, public_namespaces: Sequence[str]) -> list[Step]:
    """Routes to a routed site's LAN via its router, in every namespace on the public segment
    that speaks IPv6 (there is no NAT: the LAN's addresses are what the far side sees)."""
    net, via = str(plan.lan_net(site)), plan.public(f"nat_{site}")
    return [(route_argv(ns, net, via), None) for ns in public_namespaces]
