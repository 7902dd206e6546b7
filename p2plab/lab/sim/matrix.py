"""The simulated matrix: every pair of sites, two whole workers (link engine + sessions) paired by
the simulated rendezvous in a fresh simulation each, as rows shaped like the kernel lab's matrix
(:mod:`p2plab.lab.matrix`), its ``fallback``, ``method`` and ``family`` columns included.

Sites are the kernel lab's specs (:func:`p2plab.lab.site.parse_site`): a plain NAT profile
(``symmetric``), one whose router maps ports (``symmetric+pmp``, ``+upnp``, ``+all``), a
dual-stack site (``symmetric/v6-apdf``) or an IPv6-only one (``v6-eif``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from p2plab.config import BirthdayConfig, SessionConfig
from p2plab.core.link import LinkConfig as EngineConfig
from p2plab.lab.sim.world import EXPECTED_METHODS, EXPECTED_OUTCOMES, PROFILES, Simulation
from p2plab.lab.site import parse_site

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = ["EXPECTED_SITES", "PORTMAP_V6_SITES", "expected_row", "matrix_dataframe", "sim_matrix"]

#: Issues 18 and 19's pairs, (A's spec, B's spec) -> (outcome, method, family): what the kernel
#: lab's matrix shows for them.  A port mapping rescues a pair that would need a relay (or
#: birthday punching): the peer reaches the mapped port whatever the NAT's filtering.  A
#: dual-stack pair whose IPv4 needs a relay goes direct over IPv6, where a stateful firewall
#: filters but maps nothing.
EXPECTED_SITES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("symmetric+pmp", "symmetric"): ("direct", "port-mapping", "ipv4"),
    ("symmetric+upnp", "symmetric"): ("direct", "port-mapping", "ipv4"),
    ("symmetric+pmp", "symmetric+pmp"): ("direct", "port-mapping", "ipv4"),
    ("port-restricted+pmp", "leaky"): ("direct", "port-mapping", "ipv4"),
    ("symmetric/v6-apdf", "symmetric/v6-apdf"): ("direct", "direct", "ipv6"),
    ("v6-apdf", "v6-apdf"): ("direct", "direct", "ipv6"),
}
#: The sites of :data:`EXPECTED_SITES`, for ``sim_matrix(pairs=EXPECTED_SITES)``.
PORTMAP_V6_SITES: tuple[str, ...] = tuple(dict.fromkeys(s for pair in EXPECTED_SITES for s in pair))


def expected_row(spec_a: str, spec_b: str, lan: bool = False) -> dict[str, str | None]:
    """``expected``, ``expected_method`` and ``expected_family`` for a pair (None: no claim).

    The kernel lab's rules: two hosts of one site connect directly (over IPv6 when the site has
    it); :data:`EXPECTED_SITES` for the issues' pairs; a pair whose sites
    both have IPv6 goes direct over IPv6 (``p2plab.lab.ipv6``'s expected family); sites with no
    family in common fail (the rendezvous relay carries them); a pair with a port-mapping site
    goes direct over IPv4 through the mapping (``p2plab.lab.matrix``'s site outcome); other
    IPv4 pairs follow natlab.md's table with birthday punching."""
    a, b = parse_site(spec_a), parse_site(spec_b)
    family: str | None
    method: str | None
    if lan:
        v6 = a.v6 is not None and b.v6 is not None
        outcome, method, family = "direct", "direct", "ipv6" if v6 else "ipv4"
    elif (spec_a, spec_b) in EXPECTED_SITES:
        outcome, method, family = EXPECTED_SITES[(spec_a, spec_b)]
    elif a.v6 is not None and b.v6 is not None:
        outcome, method, family = "direct", "direct", "ipv6"
    elif a.v4 is None or b.v4 is None:  # no family in common
        outcome, method, family = "failed", None, None
    elif a.portmap or b.portmap:
        outcome, method, family = "direct", "port-mapping", "ipv4"
    elif (a.v4, b.v4) in EXPECTED_OUTCOMES:  # IPv4 alone (one side may have IPv6 too)
        outcome = EXPECTED_OUTCOMES[(a.v4, b.v4)]
        method = EXPECTED_METHODS[(a.v4, b.v4)]
        family = "ipv4" if outcome == "direct" else None
    else:
        return {"expected": None, "expected_method": None, "expected_family": None}
    return {"expected": outcome, "expected_method": method, "expected_family": family}


def sim_matrix(
    profiles: Iterable[str] = PROFILES,
    *,
    pairs: Iterable[tuple[str, str]] | None = None,
    seed: int = 1,
    same_lan: Iterable[str] | None = None,
    config: SessionConfig | None = None,
    skew: float = 0.1,
    classify: bool = True,
    relay: bool = True,
    birthday: BirthdayConfig | None = None,
) -> list[dict[str, Any]]:
    """Pair two workers for every ordered pair of ``profiles`` (site specs; A controlling), or
    for the given ``pairs`` only, in a fresh simulation each.

    ``same_lan`` adds one row per spec with both hosts at one site of it (for ``open``: both
    on the public segment), by default for every spec in ``profiles`` (none with ``pairs``).
    Rows carry the kernel lab's columns where they apply
    (``profile_a``, ``profile_b``, ``same_lan``, ``outcome`` (direct/failed: direct punching
    only), ``fallback`` (``relayed`` when the engines fell back to the rendezvous relay and a chat
    message crossed it exactly once, else empty), ``method``
    (direct/port-mapping/birthday/predicted/relay: how the engines made the link), ``family``
    (ipv4/ipv6: the direct link's), ``connect_s`` (virtual), ``path`` (public/lan/relayed), the
    endpoints, the workers' last states, both sides' classification (RFC 3489 and RFC 5780;
    over IPv6 for an IPv6-only site, and ``a_filtering6``/``b_filtering6`` for a dual-stack
    one's firewall), ``expected``, ``expected_method`` and ``expected_family``
    (:func:`expected_row`: the kernel lab's rules and :data:`EXPECTED_SITES`),
    ``birthday_probes`` and ``seed``.  ``config`` is the workers' session config;
    ``relay=False`` turns the engines' relay fallback off; ``birthday`` their birthday punching
    settings (``BirthdayConfig(enabled=False)``: plain punching only, as before issue 16).
    """
    # ``skew``: B gets its offer this long after A (as with the real rendezvous and processes).
    # It matters for leaky NATs only: A's first probe then reaches a leaky B before B has sent
    # anything, which is what the kernel lab sees (port-restricted x leaky and leaky x leaky
    # fail there); with skew=0 the first probes cross in flight and those pairs connect.
    profiles = list(profiles)
    if pairs is not None:
        cases = [(pa, pb, False) for pa, pb in pairs]
        same_lan = same_lan or ()
    else:
        cases = [(pa, pb, False) for pa in profiles for pb in profiles]
        if same_lan is None:
            same_lan = profiles
    cases += [(p, p, True) for p in same_lan]
    rows: list[dict[str, Any]] = []
    for index, (prof_a, prof_b, lan) in enumerate(cases):
        run_seed = seed * 1000 + index
        sim = Simulation(seed=run_seed)
        host_a = sim.add_site(prof_a, "a")
        host_b = sim.add_site(prof_b, "b", beside=host_a if lan else None)
        row: dict[str, Any] = {"profile_a": prof_a, "profile_b": prof_b, "same_lan": lan}
        if classify:
            for side, host in (("a", host_a), ("b", host_b)):
                report = sim.probe(host)  # IPv4 where the host has it, else IPv6
                row[f"{side}_mapping"] = report.mapping.value
                row[f"{side}_filtering"] = report.filtering.value
                row[f"{side}_nat"] = f"{report.mapping.value}/{report.filtering.value}"
                row[f"{side}_classic"] = report.classic
                row[f"{side}_classic_rfc5780"] = report.classic_rfc5780
                if len(host.ips) > 1:  # dual-stack: the IPv6 firewall's filtering too
                    row[f"{side}_filtering6"] = sim.probe(host, family="ipv6").filtering.value
        engine = EngineConfig(birthday=birthday or BirthdayConfig())
        result = sim.pair(host_a, host_b, config=engine, session=config, skew=skew, relay=relay)
        row.update(result.to_dict())
        row.update(expected_row(prof_a, prof_b, lan))
        row["seed"] = run_seed
        rows.append(row)
    return rows


def matrix_dataframe(rows: list[dict[str, Any]] | None = None, **kwargs: Any) -> pd.DataFrame:
    """:func:`sim_matrix` rows (computed with ``kwargs`` when not given) as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(rows if rows is not None else sim_matrix(**kwargs))
