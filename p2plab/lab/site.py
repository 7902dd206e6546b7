"""A lab site's profile spec: its IPv4 NAT, its port-mapping daemon and its IPv6 firewall.

One grammar for the kernel lab, the simulator and the CLI (issues 18 and 19)::

    spec      := v4 [ "+" portmap ] [ "/" v6 ]  |  v6
    v4        := one of PROFILES ("open", "full", ..., "leaky")
    portmap   := "pmp" (miniupnpd's NAT-PMP/PCP socket) | "upnp" (its UPnP IGD only) | "all"
    v6        := "v6-open" | "v6-apdf" | "v6-eif"

``symmetric+pmp`` is a symmetric NAT whose router answers NAT-PMP and PCP; ``symmetric/v6-apdf``
is a dual-stack site (IPv4 behind a symmetric NAT, IPv6 behind a conntrack-only firewall);
``v6-eif`` is an IPv6-only site.  A plain IPv4 profile name parses to itself (no port mapping,
no IPv6), so every existing spec keeps its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2plab.errors import ConfigError
from p2plab.lab.profiles import PROFILES

__all__ = ["PORTMAP_MODIFIERS", "V6_PROFILES", "SiteProfile", "parse_site"]

#: IPv6 firewall profiles (no NAT): open, address-and-port-dependent filtering (conntrack
#: only), endpoint-independent filtering (an nftables set of outbound source address . port).
V6_PROFILES: tuple[str, ...] = ("v6-open", "v6-apdf", "v6-eif")

#: Port-mapping modifiers and the protocols miniupnpd answers with each.
PORTMAP_MODIFIERS: dict[str, frozenset[str]] = {
    "pmp": frozenset({"nat-pmp", "pcp"}),
    "upnp": frozenset({"upnp"}),
    "all": frozenset({"nat-pmp", "pcp", "upnp"}),
}


@dataclass(frozen=True)
class SiteProfile:
    """One site's parsed profile spec."""

    spec: str
    """The spec as written (e.g. ``"symmetric+pmp/v6-apdf"``)."""

    v4: str | None
    """The IPv4 NAT profile (one of ``PROFILES``), or None for an IPv6-only site."""

    portmap: str | None
    """The port-mapping modifier (``pmp``, ``upnp``, ``all``) or None."""

    v6: str | None
    """The IPv6 firewall profile (one of :data:`V6_PROFILES`), or None for an IPv4-only site."""

    @property
    def protocols(self) -> frozenset[str]:
        """The port-mapping protocols the site's router answers (empty without a modifier)."""
        return PORTMAP_MODIFIERS[self.portmap] if self.portmap else frozenset()

    @property
    def families(self) -> tuple[str, ...]:
        """``("ipv4",)``, ``("ipv6",)`` or ``("ipv4", "ipv6")``."""
        return tuple(f for f, p in (("ipv4", self.v4), ("ipv6", self.v6)) if p is not None)


def parse_site(spec: str) -> SiteProfile:
    """Parse a site spec (see the module docstring); :class:`ConfigError` says what is wrong."""
    text = spec.strip()
    v4_part, sep, v6 = text.partition("/")
    if not sep and v4_part in V6_PROFILES:
        return SiteProfile(text, None, None, v4_part)
    if sep and v6 not in V6_PROFILES:
        raise ConfigError(
            f"unknown IPv6 profile {v6!r} in {spec!r}; choose one of {', '.join(V6_PROFILES)}"
        )
    v4, plus, portmap = v4_part.partition("+")
    if v4 not in PROFILES:
        raise ConfigError(
            f"unknown NAT profile {v4!r} in {spec!r}; choose one of "
            f"{', '.join(PROFILES + V6_PROFILES)}"
        )
    if plus and portmap not in PORTMAP_MODIFIERS:
        raise ConfigError(
            f"unknown port-mapping modifier {portmap!r} in {spec!r}; choose one of "
            f"{', '.join(PORTMAP_MODIFIERS)}"
        )
    if plus and v4 == "open":
        raise ConfigError(f"{spec!r}: an 'open' site has no router to map ports on")
    return SiteProfile(text, v4, portmap or None, v6 or None)
