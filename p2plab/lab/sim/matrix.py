"""The simulated matrix: every pair of NAT profiles, two whole workers (link engine + sessions)
paired by the simulated rendezvous in a fresh simulation each, as rows shaped like the kernel
lab's matrix (:mod:`p2plab.lab.matrix`), its ``fallback`` column included."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from p2plab.config import BirthdayConfig, SessionConfig
from p2plab.core.link import LinkConfig as EngineConfig
from p2plab.lab.sim.world import EXPECTED_METHODS, EXPECTED_OUTCOMES, PROFILES, Simulation
from p2plab.lab.simnet import Host

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = ["matrix_dataframe", "sim_matrix"]


def _site(sim: Simulation, profile: str, name: str) -> Host:
    if profile == "open":
        return sim.add_host(name=name)
    return sim.add_host(behind=sim.add_nat(profile, name=f"nat_{name}"), name=name)


def sim_matrix(
    profiles: Iterable[str] = PROFILES,
    *,
    seed: int = 1,
    same_lan: Iterable[str] | None = None,
    config: SessionConfig | None = None,
    skew: float = 0.1,
    classify: bool = True,
    relay: bool = True,
    birthday: BirthdayConfig | None = None,
) -> list[dict[str, Any]]:
    """Pair two workers for every ordered pair of ``profiles`` (A controlling) in a fresh
    simulation each.

    ``same_lan`` adds one row per profile with both hosts behind one NAT of it (for ``open``: both
    on the public segment), by default for every profile in ``profiles``.  Rows carry the
    kernel lab's columns where they apply
    (``profile_a``, ``profile_b``, ``same_lan``, ``outcome`` (direct/failed: direct punching
    only), ``fallback`` (``relayed`` when the engines fell back to the rendezvous relay and a chat
    message crossed it exactly once, else empty), ``method`` (direct/birthday/predicted/relay:
    how the engines made the link), ``connect_s`` (virtual), ``path`` (public/lan/relayed), the
    endpoints, the workers' last states, both sides' classification (RFC 3489 and RFC 5780),
    ``expected`` and ``expected_method`` (natlab.md's table with birthday
    punching, :data:`EXPECTED_OUTCOMES`), ``birthday_probes`` and ``seed``.  ``config`` is
    the workers' session config; ``relay=False`` turns the engines' relay fallback off;
    ``birthday`` their birthday punching settings (``BirthdayConfig(enabled=False)``: plain
    punching only, as before issue 16).
    """
    # ``skew``: B gets its offer this long after A (as with the real rendezvous and processes).
    # It matters for leaky NATs only: A's first probe then reaches a leaky B before B has sent
    # anything, which is what the kernel lab sees (port-restricted x leaky and leaky x leaky
    # fail there); with skew=0 the first probes cross in flight and those pairs connect.
    profiles = list(profiles)
    if same_lan is None:
        same_lan = profiles
    cases: list[tuple[str, str, bool]] = [(pa, pb, False) for pa in profiles for pb in profiles]
    cases += [(p, p, True) for p in same_lan]
    rows: list[dict[str, Any]] = []
    for index, (prof_a, prof_b, lan) in enumerate(cases):
        run_seed = seed * 1000 + index
        sim = Simulation(seed=run_seed)
        if lan and prof_a == "open":
            # The kernel lab's same-LAN "open" case: two hosts on the public segment.
            host_a = sim.add_host(name="a")
            host_b = sim.add_host(name="b")
        elif lan:
            nat = sim.add_nat(prof_a, name="nat_a")
            host_a = sim.add_host(behind=nat, name="a")
            host_b = sim.add_host(behind=nat, name="b")
        else:
            host_a = _site(sim, prof_a, "a")
            host_b = _site(sim, prof_b, "b")
        row: dict[str, Any] = {"profile_a": prof_a, "profile_b": prof_b, "same_lan": lan}
        if classify:
            for side, host in (("a", host_a), ("b", host_b)):
                report = sim.probe(host)
                row[f"{side}_mapping"] = report.mapping.value
                row[f"{side}_filtering"] = report.filtering.value
                row[f"{side}_nat"] = f"{report.mapping.value}/{report.filtering.value}"
                row[f"{side}_classic"] = report.classic
                row[f"{side}_classic_rfc5780"] = report.classic_rfc5780
        engine = EngineConfig(birthday=birthday or BirthdayConfig())
        result = sim.pair(host_a, host_b, config=engine, session=config, skew=skew, relay=relay)
        row.update(result.to_dict())
        row["expected"] = "direct" if lan else EXPECTED_OUTCOMES.get((prof_a, prof_b))
        row["expected_method"] = "direct" if lan else EXPECTED_METHODS.get((prof_a, prof_b))
        row["seed"] = run_seed
        rows.append(row)
    return rows


def matrix_dataframe(rows: list[dict[str, Any]] | None = None, **kwargs: Any) -> pd.DataFrame:
    """:func:`sim_matrix` rows (computed with ``kwargs`` when not given) as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(rows if rows is not None else sim_matrix(**kwargs))
