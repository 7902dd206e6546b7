"""Birthday punching measured in the simulator against its formula (issue 16, item 4).

Three measurements, each a pure function of its seed:

* :func:`first_hits_by_k` / :func:`curve_rows`: the curve.  One trial opens ``k`` mappings on a
  fresh simulated NAT with the random allocator (:class:`~p2plab.lab.simnet.Nat`, ``port_allocation=
  "random"``: ``--random-fully``), one per socket towards the same peer endpoint as the spray does,
  and lets the core's :class:`~p2plab.core.birthday.RandomPortProber` choose probe ports until one
  lands on a mapping; the index of that first hit says, for every ``n`` at once, whether ``n``
  probes would have got through.  The success rate at ``n`` is set beside
  ``1 - (1 - k/P)**n`` (:func:`~p2plab.core.birthday.birthday_success`).  The prober samples
  without replacement, the formula with: the exact rate, 1 - C(P-k, n)/C(P, n), is higher by
  about (1-p) k n^2 / (2 P^2), at most 0.42 percentage point (k = 64, n = 2P/k), 0.11 for
  k = 256 and 0.03 for k = 1024.
* :func:`end_to_end`: whole workers (:class:`~p2plab.lab.sim.worker.SimWorker`, the real engine
  and sessions) paired through an easy and a hard NAT, seed after seed; the share that connects
  directly against the formula for the budget used.
* :func:`prediction_rows`: a port-restricted side and a symmetric one whose NAT allocates in
  order, in order with other traffic, or at random: method and probes used.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from p2plab.config import BirthdayConfig
from p2plab.core.birthday import RandomPortProber, birthday_success, port_count
from p2plab.core.link import LinkConfig as EngineConfig
from p2plab.lab.sim.world import Simulation
from p2plab.lab.simnet import APDF, APDM, Host, LinkConfig, Nat, NatBehavior, Network, Scheduler

__all__ = [
    "curve_points",
    "curve_rows",
    "end_to_end",
    "end_to_end_summary",
    "first_hits",
    "first_hits_by_k",
    "max_deviation",
    "prediction_rows",
    "prediction_summary",
]

_HARD_IP = "198.51.100.7"  # the hard NAT's public address in a curve trial
_EASY_END = ("192.0.2.9", 40000)  # the easy side's mapped endpoint the spray goes to
_LAN = ipaddress.IPv4Network("10.0.0.0/24")
_CHUNK = 64  # probes asked of the prober at once (it is paced: ask up to a time)


def _open_mappings(k: int, rng: random.Random, port_range: tuple[int, int]) -> dict[int, int]:
    """The external ports a fresh random-allocating symmetric NAT gives ``k`` sockets of one
    host that each send one datagram to the easy side's endpoint (the spray), each with its rank
    (the order the NAT allocated them in: the first ``j`` of them are what ``j`` sockets get)."""
    net = Network(Scheduler(), rng)
    behavior = NatBehavior(
        mapping=APDM, filtering=APDF, port_allocation="random", port_range=port_range
    )
    nat = Nat(net, "hard", _HARD_IP, _LAN, behavior, LinkConfig(delay=0.0))
    ip = nat.allocate_lan_ip()
    nat.hosts[ip] = Host(net, "sprayer", (ip,), nat, LinkConfig(delay=0.0))
    # The mappings the spray's first round makes, without running the links (nothing else
    # would happen on them: only the ports matter).
    ports = [nat.map_outbound((ip, 40000 + i), _EASY_END)[1] for i in range(k)]
    return {port: rank for rank, port in enumerate(ports)}


def first_hits_by_k(
    max_probes: dict[int, int],
    trials: int,
    *,
    seed: int = 1,
    config: BirthdayConfig | None = None,
) -> dict[int, list[int | None]]:
    """For each k of ``max_probes`` and each trial, how many probes it took to land on one of k
    mappings (1-based), or None when the first ``max_probes[k]`` all missed.

    One trial serves every k: the NAT allocates max(k) mappings in order and the first k of
    them are exactly what k sockets would have got (each allocation depends only on the ones
    before it); one probe sequence is checked against each.  Trials are independent.
    """
    config = config or BirthdayConfig()
    top = max(max_probes)
    budget = max(max_probes.values())
    prober_config = replace(config, probe_budget=budget, probe_rate=1.0)
    out: dict[int, list[int | None]] = {k: [] for k in max_probes}
    for trial in range(trials):
        nat_rng = random.Random(f"curve nat {seed} {top} {trial}")
        probe_rng = random.Random(f"curve probes {seed} {top} {trial}")
        ranks = _open_mappings(top, nat_rng, config.port_range)
        prober = RandomPortProber(_HARD_IP, prober_config, probe_rng.randbytes, 0.0)
        hits: dict[int, int | None] = dict.fromkeys(max_probes)
        waiting = sorted(max_probes)  # ks not hit yet, smallest (longest to wait for) first
        sent = 0
        while waiting and prober.budget_left > 0:
            # At rate 1/s probe j is due at j seconds: ask for the next chunk.
            for _, port in prober.due(float(sent + _CHUNK - 1)):
                sent += 1
                rank = ranks.get(port)
                if rank is not None:
                    for k in [k for k in waiting if rank < k and sent <= max_probes[k]]:
                        hits[k] = sent
                        waiting.remove(k)
                waiting = [k for k in waiting if sent < max_probes[k]]
                if not waiting:
                    break
        for k in max_probes:
            out[k].append(hits[k])
    return out


def first_hits(
    k: int,
    trials: int,
    *,
    seed: int = 1,
    max_probes: int,
    config: BirthdayConfig | None = None,
) -> list[int | None]:
    """:func:`first_hits_by_k` for one ``k``."""
    return first_hits_by_k({k: max_probes}, trials, seed=seed, config=config)[k]


def curve_points(k: int, port_total: int, points: int = 40, top: float = 0.995) -> list[int]:
    """About ``points`` probe counts where the formula climbs in equal steps from ~2% to ``top``
    (so the points spread evenly up the curve, the steep part included)."""
    miss = math.log(1.0 - k / port_total)
    step = (top - 0.02) / max(1, points - 1)
    levels = [0.02 + step * i for i in range(points)]
    return sorted({max(1, math.ceil(math.log(1.0 - p) / miss)) for p in levels})


def curve_rows(
    ks: Sequence[int] = (64, 256, 1024),
    trials: int = 2000,
    *,
    seed: int = 1,
    points: int = 40,
    extra_n: Iterable[int] = (1024,),
    config: BirthdayConfig | None = None,
) -> list[dict[str, Any]]:
    """One row per (k, n): trials, hits, measured rate, the formula, the deviation in
    percentage points.  ``extra_n`` adds probe counts (e.g. the default budget) to every k."""
    config = config or BirthdayConfig()
    total = port_count(config)
    rows: list[dict[str, Any]] = []
    grids = {k: sorted(set(curve_points(k, total, points)) | set(extra_n)) for k in ks}
    by_k = first_hits_by_k({k: max(g) for k, g in grids.items()}, trials, seed=seed, config=config)
    for k in ks:
        grid = grids[k]
        done = sorted(h for h in by_k[k] if h is not None)
        idx = 0
        for n in grid:
            while idx < len(done) and done[idx] <= n:
                idx += 1
            measured = idx / trials
            formula = birthday_success(k, n, total)
            rows.append(
                {
                    "k": k,
                    "n": n,
                    "port_count": total,
                    "trials": trials,
                    "successes": idx,
                    "measured": measured,
                    "formula": formula,
                    "deviation_pp": 100.0 * (measured - formula),
                    "seed": seed,
                }
            )
    return rows


def max_deviation(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row that strays furthest from the formula (in absolute percentage points)."""
    return max(rows, key=lambda r: abs(r["deviation_pp"]))


# -- whole workers --------------------------------------------------------------------------


def _pair(
    profile_a: str | NatBehavior,
    profile_b: str | NatBehavior,
    seed: int,
    config: EngineConfig,
) -> dict[str, Any]:
    sim = Simulation(seed=seed)
    a = sim.add_host(behind=sim.add_nat(profile_a, name="nat_a"), name="a")
    b = sim.add_host(behind=sim.add_nat(profile_b, name="nat_b"), name="b")
    result = sim.pair(a, b, config=config, check_relay_chat=False)
    return {
        "seed": seed,
        "outcome": result.outcome,
        "method": result.method,
        "a_method": result.a.engine.method,
        "b_method": result.b.engine.method,
        "connect_s": result.connect_time_s,
        "birthday_probes": result.birthday_probes,
        "a_hint": None if result.a.nat_hint is None else result.a.nat_hint.mapping,
        "b_hint": None if result.b.nat_hint is None else result.b.nat_hint.mapping,
        "a_sequential": bool(result.a.nat_hint and result.a.nat_hint.sequential),
        "b_sequential": bool(result.b.nat_hint and result.b.nat_hint.sequential),
    }


def end_to_end(
    pairs: int = 100,
    *,
    seed: int = 1,
    profile_a: str = "port-restricted",
    profile_b: str = "symmetric",
    birthday: BirthdayConfig | None = None,
) -> list[dict[str, Any]]:
    """``pairs`` seeded runs of two whole workers (A behind ``profile_a``, B behind
    ``profile_b``), one row each, with the formula for the budget used."""
    bd = birthday or BirthdayConfig()
    config = EngineConfig(birthday=bd)
    expected = birthday_success(bd.sockets, bd.probe_budget, port_count(bd))
    rows = []
    for i in range(pairs):
        row = _pair(profile_a, profile_b, seed * 100_000 + i, config)
        row.update(
            profile_a=profile_a,
            profile_b=profile_b,
            sockets=bd.sockets,
            probe_budget=bd.probe_budget,
            formula=expected,
        )
        rows.append(row)
    return rows


def end_to_end_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Success rate, the formula, the deviation and its standard error, mean time to connect."""
    n = len(rows)
    ok = [r for r in rows if r["outcome"] == "direct"]
    rate = len(ok) / n if n else 0.0
    formula = rows[0]["formula"] if rows else 0.0
    times = [r["connect_s"] for r in ok if r["connect_s"] is not None]
    return {
        "pairs": n,
        "direct": len(ok),
        "rate": rate,
        "formula": formula,
        "deviation_pp": 100.0 * (rate - formula),
        "stderr_pp": 100.0 * math.sqrt(formula * (1.0 - formula) / n) if n else 0.0,
        "methods": {m: sum(1 for r in rows if r["method"] == m) for m in _methods(rows)},
        "mean_connect_s": sum(times) / len(times) if times else None,
        "max_connect_s": max(times) if times else None,
    }


def _methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({str(r["method"]) for r in rows})


#: The allocators of the port-prediction experiment (a symmetric NAT's mapping and filtering).
PREDICTION_ALLOCATORS = ("sequential", "sequential-busy", "random")


def prediction_rows(
    pairs: int = 20,
    *,
    seed: int = 1,
    allocations: Sequence[str] = PREDICTION_ALLOCATORS,
) -> list[dict[str, Any]]:
    """A symmetric NAT (A, which registers first) with each allocator against a port-restricted
    one (B, the prober), ``pairs`` seeds each: method and probes used."""
    config = EngineConfig()
    rows = []
    for allocation in allocations:
        for i in range(pairs):
            run_seed = seed * 100_000 + i
            behavior = NatBehavior(
                mapping=APDM, filtering=APDF, port_allocation=allocation, port_seed=run_seed
            )
            row = _pair(behavior, "port-restricted", run_seed, config)
            row["allocation"] = allocation
            rows.append(row)
    return rows


def prediction_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per allocator: success, methods, median and max probes used."""
    out = []
    for allocation in dict.fromkeys(r["allocation"] for r in rows):
        group = [r for r in rows if r["allocation"] == allocation]
        probes = sorted(r["birthday_probes"] for r in group)
        out.append(
            {
                "allocation": allocation,
                "pairs": len(group),
                "direct": sum(1 for r in group if r["outcome"] == "direct"),
                "sequential_seen": sum(1 for r in group if r["a_sequential"]),
                "methods": {m: sum(1 for r in group if r["method"] == m) for m in _methods(group)},
                "median_probes": probes[len(probes) // 2] if probes else None,
                "max_probes": probes[-1] if probes else None,
            }
        )
    return out
