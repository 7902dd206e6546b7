"""Population presets for the study of :mod:`p2plab.lab.sim.population` (issue 20).

Each preset says where each number comes from; numbers no measurement gives are marked as
assumptions, with the reason for the value.  Published figures the study is checked against
(the notebook ``05_population`` puts the predictions next to them):

* libp2p's hole-punching campaign (Trautwein et al., "Challenging Tribal Knowledge: Large Scale
  Measurement Campaign on Decentralized NAT Traversal", arXiv:2510.27500, 2025): 4.4 M attempts
  from 85,000+ networks in 167 countries, success 70% +- 7.1% (conditional on a relay reservation
  and address discovery), TCP about equal to QUIC, 97.6% of successes on the first attempt; it
  does not classify NATs.
* Ford, Srisuresh and Kegel, "Peer-to-Peer Communication Across Network Address Translators",
  USENIX ATC 2005: 82% of the NATs tested support UDP hole punching (consistent endpoint
  translation).
* NATCracker (Roverso, El-Ansary and Haridi, "NATCracker: NAT Combinations Matter", ICCCN 2009),
  as reported: mapping 52% endpoint-independent, 12% address-dependent, 36%
  address-and-port-dependent.
* Tailscale, "How NAT traversal works" (2020): over 90% of its traffic goes direct.
"""

from __future__ import annotations

from p2plab.errors import ConfigError
from p2plab.lab.sim.population import Preset

__all__ = ["FIELD", "PRESETS", "preset"]

#: Published success rates of hole punching: name -> (rate, +- half-width or None).
FIELD: dict[str, tuple[float, float | None]] = {
    "libp2p DCUtR campaign (Trautwein et al. 2025)": (0.70, 0.071),
    "Ford et al. 2005 (NATs that support UDP punching)": (0.82, None),
    "Tailscale (traffic that goes direct)": (0.90, None),
}

_FILTERING_ASSUMED = (
    "filtering of endpoint-independent-mapping NATs (EIF 10%, ADF 20%, APDF 70%): assumption; no "
    "campaign above reports it; APDF is what Linux MASQUERADE and most home routers do "
    "(RFC 4787 recommends EIF only for transparency), so most weight goes there"
)
_ALLOCATION_ASSUMED = (
    "port allocation of address-and-port-dependent NATs (random 60%, sequential 25%, sequential "
    "with other traffic 15%): assumption; NATCracker reports port-contiguity and randomness but "
    "its split is not reproduced here"
)
_LEAKY_ASSUMED = (
    "10% of EIM+APDF NATs have no input firewall (natlab.md's leaky profile): assumption"
)
_PORTMAP_ASSUMED = (
    "router port mapping (none 70%, NAT-PMP/PCP 10%, UPnP IGD 15%, both 5%): assumption; UPnP "
    "is on by default on many consumer routers and off on carrier-grade NATs, which serve a "
    "growing share of users"
)
_IPV6_ASSUMED = (
    "IPv6 on 45% of sites: Google's IPv6 statistics (share of users reaching Google over IPv6, "
    "about 45% in 2025); their firewalls (APDF 70%, EIF 20%, open 10%): assumption; RFC 6092 "
    "REC-17 asks for EIF, many home routers filter per address and port"
)

# The assumed shares every preset shares (see the sentences above); a preset states its own
# mapping split, public hosts and IPv6.
_FILTERING = {"EIF": 0.10, "ADF": 0.20, "APDF": 0.70}
_ALLOCATION = {"random": 0.60, "sequential": 0.25, "sequential-busy": 0.15}
_PORTMAP = {"none": 0.70, "pmp": 0.10, "upnp": 0.15, "all": 0.05}
_IPV6_2025 = {"none": 0.55, "v6-open": 0.045, "v6-apdf": 0.315, "v6-eif": 0.09}
_GOOGLE_V6 = "IPv6 availability: Google IPv6 adoption statistics (about 45%, 2025)"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="natcracker",
            summary="NATs in NATCracker's proportions (2009), every site behind one NAT",
            no_nat=0.0,
            mapping={"EIM": 0.52, "ADM": 0.12, "APDM": 0.36},
            filtering=_FILTERING,
            allocation=_ALLOCATION,
            leaky=0.10,
            portmap=_PORTMAP,
            ipv6=_IPV6_2025,
            sources=(
                "mapping: NATCracker (Roverso et al., ICCCN 2009), as reported in the issue",
                _GOOGLE_V6,
            ),
            assumptions=(
                "no site without a NAT: NATCracker surveyed NATs",
                _FILTERING_ASSUMED,
                _ALLOCATION_ASSUMED,
                _LEAKY_ASSUMED,
                _PORTMAP_ASSUMED,
                _IPV6_ASSUMED,
            ),
        ),
        Preset(
            name="ford-2005",
            summary="Ford et al.'s NATs (2005): 82% translate consistently, 18% symmetric",
            no_nat=0.0,
            mapping={"EIM": 0.82, "ADM": 0.0, "APDM": 0.18},
            filtering=_FILTERING,
            allocation=_ALLOCATION,
            leaky=0.10,
            portmap=_PORTMAP,
            ipv6={"none": 1.0},
            sources=(
                "82% of NATs support UDP hole punching: Ford, Srisuresh and Kegel, USENIX ATC "
                "2005 (read as: 82% map endpoint-independently, the rest per destination)",
            ),
            assumptions=(
                "no site without a NAT, no IPv6 (2005)",
                _FILTERING_ASSUMED,
                _ALLOCATION_ASSUMED,
                _LEAKY_ASSUMED,
                _PORTMAP_ASSUMED,
            ),
        ),
        Preset(
            name="libp2p-2025",
            summary=(
                "a guess at the libp2p campaign's networks: some public hosts, fewer hard NATs "
                "than NATCracker (see the notebook: which assumption moves the prediction)"
            ),
            no_nat=0.10,
            mapping={"EIM": 0.70, "ADM": 0.05, "APDM": 0.25},
            filtering=_FILTERING,
            allocation=_ALLOCATION,
            leaky=0.10,
            portmap=_PORTMAP,
            ipv6=_IPV6_2025,
            sources=(
                "target: libp2p's campaign, 70% +- 7.1% (Trautwein et al., arXiv:2510.27500)",
                _GOOGLE_V6,
            ),
            assumptions=(
                "10% public hosts and the mapping split (EIM 70%, ADM 5%, APDM 25%): "
                "assumption, chosen so plain punching lands near the campaign's 70%; the "
                "campaign does not classify NATs",
                _FILTERING_ASSUMED,
                _ALLOCATION_ASSUMED,
                _LEAKY_ASSUMED,
                _PORTMAP_ASSUMED,
                _IPV6_ASSUMED,
            ),
        ),
    )
}
"""The presets by name."""


def preset(name: str) -> Preset:
    """The preset called ``name`` (:class:`ConfigError` lists them otherwise)."""
    found = PRESETS.get(name)
    if found is None:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return found
