"""Population study (issue 20): what the link engine would connect out there.

A :class:`Preset` is a distribution of sites (NAT mapping, filtering, port allocation, the input
firewall, port-mapping support, IPv6 and its firewall), each number with its source or marked as
an assumption (:mod:`p2plab.lab.sim.presets` holds the presets).  :func:`predict` samples pairs of
sites (seeded), and for each runs the real engine in the simulator (two whole workers, the
simulated rendezvous and STUN server, :meth:`Simulation.pair`) once per *stage*: plain punching
only (what DCUtR and ICE do), then adding port mapping, birthday punching, IPv6 and TURN in turn
(:data:`STAGES`).  It reports the success rate with a Wilson confidence interval, time to connect
(median, p90, virtual seconds) and the probes used, per stage.

Speed (10,000 pairs in well under a minute on two cores).  A run is deterministic given the two
sites, the stage and its seed, so the engine runs once per distinct ``(site A, site B, stage,
seed)``: each pair draws its seed from ``seeds`` slots (default 8), which keeps the random part of
a run (birthday punching's dice, port allocation) varied while a population of 10,000 pairs of a
few dozen site classes needs some hundreds of runs per stage.  A pair that connected at a stage
keeps that result at the later ones (methods are only added, and the engine tries plain punching
first whatever else it knows): the later stages run only the pairs still failing.  Runs are spread
over worker processes (``processes``).

:func:`pair_matrix` is the other way to the same number: every class pair, each seed slot, once;
:func:`weighted_rate` weights it by the preset's pair probabilities.  The two agree within the
sampling error (a test says so), which checks the sampler and the bookkeeping.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2plab.config import BirthdayConfig
from p2plab.core.link import LinkConfig as EngineConfig
from p2plab.errors import ConfigError
from p2plab.lab.sim.portmap_model import PortMapConfig
from p2plab.lab.sim.world import Simulation
from p2plab.lab.simnet import Host
from p2plab.lab.site import PORTMAP_MODIFIERS

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = [
    "STAGES",
    "PairRun",
    "Preset",
    "Site",
    "StageSummary",
    "active",
    "pair_matrix",
    "predict",
    "rate_under",
    "run_pair",
    "sample_sites",
    "summarize",
    "weighted_rate",
    "wilson",
]

#: The stages, in order: each adds one method to those before it.
STAGES: tuple[str, ...] = ("plain", "port-mapping", "birthday", "ipv6", "turn")

#: IPv4 classes a site can draw (the simulator's profile names; ``open``: no NAT).
V4_CLASSES: tuple[str, ...] = (
    "open",
    "full",
    "restricted",
    "port-restricted",
    "leaky",
    "address-dependent",
    "symmetric",
    "symmetric-sequential",
    "symmetric-busy",
)


@dataclass(frozen=True)
class Site:
    """One sampled site: its IPv4 NAT class, port-mapping support and IPv6 firewall."""

    v4: str
    """A name of :data:`V4_CLASSES`."""

    portmap: str | None = None
    """``pmp``, ``upnp``, ``all`` (the protocols its router answers) or None."""

    v6: str | None = None
    """``v6-open``, ``v6-apdf``, ``v6-eif`` (IPv6 with that firewall) or None (no IPv6)."""

    @property
    def key(self) -> str:
        """The site as a spec string (``symmetric+pmp/v6-apdf``): the class it belongs to."""
        text = self.v4 + (f"+{self.portmap}" if self.portmap else "")
        return text + (f"/{self.v6}" if self.v6 else "")


@dataclass(frozen=True)
class Preset:
    """A population of sites: independent draws of each site's features."""

    name: str
    """Short name (``field-2025``)."""

    summary: str
    """One sentence: what population this stands for."""

    no_nat: float
    """Fraction of sites with a public address and no NAT (``open``)."""

    mapping: dict[str, float]
    """Among NATs: ``EIM``/``ADM``/``APDM`` (RFC 4787 mapping) -> probability."""

    filtering: dict[str, float]
    """Among endpoint-independent-mapping NATs: ``EIF``/``ADF``/``APDF`` -> probability."""

    allocation: dict[str, float]
    """Among address-and-port-dependent NATs: ``random``/``sequential``/``sequential-busy``."""

    leaky: float
    """Among EIM+APDF NATs: fraction without an input firewall (natlab.md's ``leaky``)."""

    portmap: dict[str, float]
    """Among NATs: ``none``/``pmp``/``upnp``/``all`` (what the router answers) -> probability."""

    ipv6: dict[str, float]
    """``none``/``v6-open``/``v6-apdf``/``v6-eif`` -> probability (per site)."""

    sources: tuple[str, ...]
    """Where the numbers come from (citations)."""

    assumptions: tuple[str, ...]
    """Which numbers are assumptions, and why these values."""

    def __post_init__(self) -> None:
        for field_name in ("mapping", "filtering", "allocation", "portmap", "ipv6"):
            dist: dict[str, float] = getattr(self, field_name)
            if not dist or any(p < 0 for p in dist.values()):
                raise ConfigError(f"preset {self.name}: {field_name} needs probabilities >= 0")
            if abs(sum(dist.values()) - 1.0) > 1e-6:
                raise ConfigError(f"preset {self.name}: {field_name} must sum to 1")
        for field_name in ("no_nat", "leaky"):
            if not 0.0 <= getattr(self, field_name) <= 1.0:
                raise ConfigError(f"preset {self.name}: {field_name} must be in [0, 1]")

    def site_probabilities(self) -> dict[Site, float]:
        """Every site class with its probability (they sum to 1)."""
        out: Counter[Site] = Counter()
        v4: Counter[str] = Counter({"open": self.no_nat})
        nat = 1.0 - self.no_nat
        for m, pm in self.mapping.items():
            if m == "EIM":
                for f, pf in self.filtering.items():
                    name = {"EIF": "full", "ADF": "restricted", "APDF": "port-restricted"}[f]
                    if f == "APDF":
                        v4["leaky"] += nat * pm * pf * self.leaky
                        v4[name] += nat * pm * pf * (1 - self.leaky)
                    else:
                        v4[name] += nat * pm * pf
            elif m == "ADM":
                v4["address-dependent"] += nat * pm
            elif m == "APDM":
                for a, pa in self.allocation.items():
                    name = {
                        "random": "symmetric",
                        "sequential": "symmetric-sequential",
                        "sequential-busy": "symmetric-busy",
                    }[a]
                    v4[name] += nat * pm * pa
            else:
                raise ConfigError(f"preset {self.name}: unknown mapping {m!r}")
        for cls, p4 in v4.items():
            if p4 <= 0:
                continue
            maps = {"none": 1.0} if cls == "open" else self.portmap
            for pmk, ppm in maps.items():
                for v6k, p6 in self.ipv6.items():
                    p = p4 * ppm * p6
                    if p > 0:
                        site = Site(
                            cls, None if pmk == "none" else pmk, None if v6k == "none" else v6k
                        )
                        out[site] += p
        return dict(out)


@dataclass(frozen=True)
class PairRun:
    """One run of the engine for a pair of sites at one stage."""

    connected: bool
    """The two workers linked by a method the stage allows (direct, or TURN at ``turn``)."""

    method: str | None
    """How (``direct``, ``birthday``, ``predicted``, ``port-mapping``, ``turn-udp``...)."""

    connect_s: float | None
    """Virtual seconds from the first offer to both connected."""

    probes: int
    """Birthday and predicted-port probes both engines sent."""

    family: str | None = None
    """``ipv4``/``ipv6`` of the link when the engine reports it."""


def build_site(sim: Simulation, site: Site, name: str) -> Host:
    """``site`` in ``sim``: its NAT (whose router answers the site's port-mapping protocols),
    its IPv6 firewall and address, the host behind both (the simulator's profile names,
    which include NAT classes the kernel lab cannot build: sequential allocators, ADM)."""
    nat = None
    if site.v4 != "open":
        portmap = PortMapConfig(protocols=PORTMAP_MODIFIERS[site.portmap]) if site.portmap else None
        nat = sim.add_nat(site.v4, name=f"nat_{name}", portmap=portmap)
    fw = sim.add_firewall6(site.v6, name=f"fw_{name}") if site.v6 else None
    return sim.add_host(nat, name=name, fw6=fw)


def _stage_index(stage: str) -> int:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return STAGES.index(stage)


def run_pair(site_a: Site, site_b: Site, stage: str, seed: int) -> PairRun:
    """Run two whole workers on ``site_a`` x ``site_b`` with the methods of ``stage``."""
    level = _stage_index(stage)
    sim = Simulation(seed=seed)
    # Only what the stage allows: no port mapping before ``port-mapping``, no IPv6 before ``ipv6``.
    a = build_site(sim, active(site_a, stage), "a")
    b = build_site(sim, active(site_b, stage), "b")
    if level >= STAGES.index("turn"):
        sim.add_turn_server()
    birthday = BirthdayConfig(enabled=level >= STAGES.index("birthday"))
    cfg = EngineConfig(birthday=birthday)
    start = sim.now
    # B's offer comes 0.1 s after A's, as in the matrix (what the real rendezvous does).
    result = sim.pair(a, b, config=cfg, relay=False, encrypted=False, skew=0.1)
    turn = result.fallback in ("turn-udp", "turn-tcp")
    connected = result.outcome == "direct" or turn
    connect_s = result.connect_time_s
    if turn:
        ends = [result.a.first_time("connected", start), result.b.first_time("connected", start)]
        known = [t for t in ends if t is not None]
        connect_s = max(known) - start if known else None
    family = getattr(result.a.engine, "family", None)
    return PairRun(
        connected=connected,
        method=(result.fallback if turn else result.method) if connected else None,
        connect_s=connect_s,
        probes=result.birthday_probes,
        family=family if isinstance(family, str) else None,
    )


def sample_sites(preset: Preset, n: int, seed: int) -> list[tuple[Site, Site]]:
    """``n`` pairs of sites drawn independently from ``preset`` (reproducible from ``seed``)."""
    rng = random.Random(f"population {preset.name} {seed}")
    probs = preset.site_probabilities()
    sites = list(probs)
    weights = [probs[s] for s in sites]
    drawn = rng.choices(sites, weights=weights, k=2 * n)
    return list(zip(drawn[0::2], drawn[1::2], strict=True))


_Key = tuple[Site, Site, str, int]


def active(site: Site, stage: str) -> Site:
    """``site`` with only the features ``stage`` uses (port mapping from ``port-mapping`` on,
    IPv6 from ``ipv6`` on): two sites that differ only in unused features run the same."""
    level = _stage_index(stage)
    portmap = site.portmap if level >= STAGES.index("port-mapping") else None
    v6 = site.v6 if level >= STAGES.index("ipv6") else None
    return Site(site.v4, portmap, v6)


def _flags(stage: str) -> tuple[bool, bool]:
    """What a stage switches on in the engines and the network besides the sites' features:
    birthday punching, the TURN server."""
    level = _stage_index(stage)
    return (level >= STAGES.index("birthday"), level >= STAGES.index("turn"))


def _key(a: Site, b: Site, stage: str, base: int, slot: int) -> _Key:
    """The run a pair makes at ``stage``, named by the earliest stage that makes the same
    simulation (same sites once unused features are dropped, same switches): a pair without
    port mapping runs at ``port-mapping`` exactly as at ``plain``, so it is not run twice."""
    ra, rb = active(a, stage), active(b, stage)
    for earlier in STAGES[: _stage_index(stage)]:
        same = active(a, earlier) == ra and active(b, earlier) == rb
        if same and _flags(earlier) == _flags(stage):
            stage = earlier
            break
    return (ra, rb, stage, _slot_seed(base, ra, rb, slot))


def _run_key(key: _Key) -> PairRun:
    a, b, stage, seed = key
    return run_pair(a, b, stage, seed)


def _run_all(keys: Sequence[_Key], processes: int) -> dict[_Key, PairRun]:
    if processes <= 1 or len(keys) < 32:
        return {k: _run_key(k) for k in keys}
    with ProcessPoolExecutor(max_workers=processes) as pool:
        return dict(zip(keys, pool.map(_run_key, keys, chunksize=16), strict=True))


def _slot_seed(base: int, a: Site, b: Site, slot: int) -> int:
    """The simulation seed of slot ``slot`` of the class pair (a, b): stable across runs."""
    return random.Random(f"{base} {a.key} {b.key} {slot}").randrange(1 << 31)


def predict(
    preset: Preset,
    n: int = 10_000,
    *,
    seed: int = 1,
    seeds: int = 8,
    stages: Iterable[str] = STAGES,
    processes: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> pd.DataFrame:
    """Sample ``n`` pairs of ``preset`` and run the engine for each at every stage.

    One row per pair and stage: ``pair``, ``stage``, ``site_a``, ``site_b``, ``seed`` (the
    simulation's), ``connected``, ``method``, ``connect_s``, ``probes``, ``family`` and
    ``carried`` (True when the pair had connected at an earlier stage and keeps that result).
    ``progress(stage, runs_done, runs_total)`` is called once per stage.
    """
    import pandas as pd

    if n < 1 or seeds < 1:
        raise ConfigError("n and seeds must be >= 1")
    order = [s for s in STAGES if s in set(stages)]
    procs = processes if processes is not None else min(2, os.cpu_count() or 1)
    pairs = sample_sites(preset, n, seed)
    rng = random.Random(f"slots {preset.name} {seed}")
    slots = [rng.randrange(seeds) for _ in pairs]
    done: dict[int, PairRun] = {}
    rows: list[dict[str, Any]] = []
    results: dict[_Key, PairRun] = {}  # every run so far: a later stage may repeat one
    for stage in order:
        todo = [i for i in range(n) if i not in done]
        keys = {i: _key(pairs[i][0], pairs[i][1], stage, seed, slots[i]) for i in todo}
        new = sorted(set(keys.values()) - set(results), key=repr)
        results.update(_run_all(new, procs))
        if progress is not None:
            progress(stage, len(new), len(new))
        for i, (a, b) in enumerate(pairs):
            carried = i in done
            run = done[i] if carried else results[keys[i]]
            rows.append(
                {
                    "pair": i,
                    "stage": stage,
                    "site_a": a.key,
                    "site_b": b.key,
                    "seed": None if carried else keys[i][3],
                    "connected": run.connected,
                    "method": run.method,
                    "connect_s": run.connect_s,
                    "probes": run.probes,
                    "family": run.family,
                    "carried": carried,
                }
            )
            if run.connected and not carried:
                done[i] = run
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class StageSummary:
    """One stage of a prediction: the success rate and how fast."""

    stage: str
    """The stage (:data:`STAGES`)."""
    n: int
    """Pairs."""
    rate: float
    """Fraction connected."""
    low: float
    """Lower bound of the 95% Wilson interval."""
    high: float
    """Upper bound of the 95% Wilson interval."""
    median_s: float | None
    """Median time to connect (virtual seconds) of the connected pairs."""
    p90_s: float | None
    """90th percentile of the same."""
    probes_mean: float
    """Mean probes per pair (all pairs of the stage)."""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def _quantile(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per stage (in :data:`STAGES` order): n, rate, low, high, median_s, p90_s, probes_mean."""
    import pandas as pd

    out = []
    for stage in [s for s in STAGES if s in set(rows["stage"])]:
        part = rows[rows["stage"] == stage]
        k, n = int(part["connected"].sum()), len(part)
        low, high = wilson(k, n)
        times = [
            float(t) for t in part.loc[part["connected"], "connect_s"] if t == t and t is not None
        ]
        out.append(
            StageSummary(
                stage,
                n,
                k / n if n else 0.0,
                low,
                high,
                _quantile(times, 0.5),
                _quantile(times, 0.9),
                float(part["probes"].mean()) if n else 0.0,
            ).__dict__
        )
    return pd.DataFrame(out)


def pair_matrix(
    preset: Preset,
    *,
    seed: int = 1,
    seeds: int = 8,
    stages: Iterable[str] = STAGES,
    processes: int | None = None,
    min_probability: float = 0.0,
) -> dict[tuple[str, str, str], float]:
    """``(site A, site B, stage) -> success rate over the seed slots`` for every class pair of
    ``preset`` whose probability is above ``min_probability`` (the per-pair matrix), with the
    same carry-over rule as :func:`predict` (a slot that connected keeps connecting)."""
    procs = processes if processes is not None else min(2, os.cpu_count() or 1)
    probs = preset.site_probabilities()
    classes = [(a, b) for a in probs for b in probs if probs[a] * probs[b] > min_probability]
    order = [s for s in STAGES if s in set(stages)]
    connected: set[tuple[Site, Site, int]] = set()
    out: dict[tuple[str, str, str], float] = {}
    results: dict[_Key, PairRun] = {}
    for stage in order:
        keys = {
            _key(a, b, stage, seed, slot)
            for a, b in classes
            for slot in range(seeds)
            if (a, b, slot) not in connected
        }
        results.update(_run_all(sorted(keys - set(results), key=repr), procs))
        for a, b in classes:
            hits = 0
            for slot in range(seeds):
                if (a, b, slot) in connected:
                    hits += 1
                elif results[_key(a, b, stage, seed, slot)].connected:
                    connected.add((a, b, slot))
                    hits += 1
            out[(a.key, b.key, stage)] = hits / seeds
    return out


def weighted_rate(preset: Preset, matrix: dict[tuple[str, str, str], float], stage: str) -> float:
    """The success rate of ``stage`` over the population: the matrix weighted by the preset's
    pair probabilities (renormalised over the pairs the matrix has)."""
    probs = {s.key: p for s, p in preset.site_probabilities().items()}
    total = weight = 0.0
    for (a, b, st), rate in matrix.items():
        if st != stage:
            continue
        w = probs[a] * probs[b]
        total += w * rate
        weight += w
    return total / weight if weight else 0.0


def rate_under(rows: pd.DataFrame, other: Preset, stage: str) -> float | None:
    """The ``stage`` success rate ``other`` would have, from the runs in ``rows`` (a
    :func:`predict` result of another preset): each class pair's measured rate (over the
    features ``stage`` uses, :func:`active`) weighted by ``other``'s probabilities.  None when
    ``rows`` lacks a class pair ``other`` needs (no run to say what it does).  This is how the
    notebook asks "which assumption would have to change to agree": plain punching depends on
    the IPv4 classes only, so moving their shares needs no new engine run."""
    part = rows[rows["stage"] == stage]
    measured: dict[tuple[Site, Site], list[int]] = {}
    for a, b, ok in zip(part["site_a"], part["site_b"], part["connected"], strict=True):
        key = (active(_parse_key(a), stage), active(_parse_key(b), stage))
        hit = measured.setdefault(key, [0, 0])
        hit[0] += int(bool(ok))
        hit[1] += 1
    probs: dict[Site, float] = {}
    for site, p in other.site_probabilities().items():
        reduced = active(site, stage)
        probs[reduced] = probs.get(reduced, 0.0) + p
    total = 0.0
    for a, pa in probs.items():
        for b, pb in probs.items():
            hit = measured.get((a, b))
            if hit is None:
                return None
            total += pa * pb * hit[0] / hit[1]
    return total


def _parse_key(key: str) -> Site:
    """The :class:`Site` of a key written by :attr:`Site.key`."""
    head, _, v6 = key.partition("/")
    v4, _, portmap = head.partition("+")
    return Site(v4, portmap or None, v6 or None)
