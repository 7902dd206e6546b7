"""What ``p2plab lab matrix`` reports: the per-run table, the per-pair summary of a repeated
matrix (``--repeat N``), ``summary.csv`` and the heatmap.

One :class:`~p2plab.lab.matrix.PairResult` per run goes into ``matrix.csv``; this module folds
the runs of each ordered pair into one :class:`PairSummary` (success rate, median and max time to
connect, how the links were made, probes used) for ``summary.csv`` and the printed table.  It
also parses ``--pairs A:B,C:D``: an ordered pair, because the two sides of an easy x hard pair do
different things (issue 16: one probes, the other sprays) and host ``a`` is the one that
registers first (``controlling``).  A pair's sides are site specs (:mod:`p2plab.lab.site`:
``symmetric``, ``v6-apdf``, ``symmetric/v6-apdf``); ``family`` is the address family of the
direct link (issue 19).
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from p2plab.errors import ConfigError
from p2plab.lab.site import parse_site

__all__ = [
    "PairSummary",
    "RunLike",
    "format_summary",
    "link_family",
    "pair_family",
    "parse_pairs",
    "plot_heatmap",
    "print_table",
    "summarize",
    "write_summary_csv",
]


class RunLike(Protocol):
    """The fields of a :class:`~p2plab.lab.matrix.PairResult` this module reads (a protocol:
    ``matrix`` imports this module, not the other way round)."""

    @property
    def profile_a(self) -> str: ...
    @property
    def profile_b(self) -> str: ...
    @property
    def same_lan(self) -> bool: ...
    @property
    def outcome(self) -> str: ...
    @property
    def expected(self) -> str: ...
    @property
    def connect_s(self) -> float | None: ...
    @property
    def punch_s(self) -> float | None: ...
    @property
    def fallback(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def probes(self) -> int | None: ...
    @property
    def run(self) -> int: ...
    @property
    def agrees(self) -> bool: ...
    @property
    def a_peer_endpoint(self) -> str | None: ...
    @property
    def b_peer_endpoint(self) -> str | None: ...
    @property
    def family(self) -> str: ...


@dataclass(frozen=True)
class PairSummary:
    """The runs of one ordered pair of profiles, folded."""

    profile_a: str
    """NAT profile in front of host a (the worker that registers first: ``controlling``)."""
    profile_b: str
    """NAT profile in front of host b."""
    same_lan: bool
    """Both hosts behind one NAT."""
    expected: str
    """What the expected-outcome table says for the pair (``direct``, ``failed``, ``unknown``)."""
    runs: int
    """How many runs the pair had."""
    direct: int
    """Runs where both workers reached ``connected`` (directly, by whatever method)."""
    relayed: int
    """Runs that failed to punch and ended relayed (chat checked over the relay)."""
    errors: int
    """Runs where the lab or a process broke (not counted as failures of the method)."""
    success_rate: float | None
    """``direct / (runs - errors)``; None when every run broke."""
    median_connect_s: float | None
    """Median seconds from starting the workers to both connected, over the direct runs."""
    max_connect_s: float | None
    """Longest of those."""
    median_punch_s: float | None
    """Median seconds from the first ``punching`` state to both connected (the part of the
    time the traversal itself takes; startup, STUN and registration excluded)."""
    max_punch_s: float | None
    """Longest of those."""
    methods: str
    """How the links were made, counted: e.g. ``birthday:9 relay:1`` (``-`` for a run whose
    workers did not say)."""
    median_probes: float | None
    """Median of the birthday probes sent per run (both workers' ``birthday_probes``), over the
    runs that report the counter."""
    max_probes: int | None
    """Most birthday probes a run sent."""
    families: str = ""
    """The address families of the direct links, counted: e.g. ``ipv6:5`` (empty: none)."""


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``"A:B,C:D"`` -> ``[("A", "B"), ("C", "D")]`` (ordered; duplicates kept once).  A and B
    are site specs (``symmetric/v6-apdf:v6-eif``: the ``/`` is the spec's, the ``:`` the pair's).

    Raises ValueError naming the bad item (an unknown profile, or no ``:``).
    """
    pairs: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        a, sep, b = item.partition(":")
        a, b = a.strip(), b.strip()
        if not sep or not a or not b:
            raise ValueError(f"expected PROFILE:PROFILE, got {item!r}")
        for name in (a, b):
            try:
                parse_site(name)
            except ConfigError as exc:
                raise ValueError(f"unknown profile {name!r}: {exc}") from None
        if (a, b) not in pairs:
            pairs.append((a, b))
    if not pairs:
        raise ValueError("expected at least one PROFILE:PROFILE")
    return pairs


def link_family(status: dict[str, Any]) -> str:
    """The address family of a worker's link: its status ``family``, else (workers from before
    issue 19) read off the peer endpoint it reports (``[2001:db8::1]:5000`` or a bare IPv6
    literal with its port: ``ipv6``; ``203.0.113.1:5000``: ``ipv4``); empty without a direct
    peer endpoint (relayed, not connected)."""
    family = status.get("family")
    if family in ("ipv4", "ipv6"):
        return str(family)
    peer = status.get("peer")
    endpoint = peer.get("endpoint") if isinstance(peer, dict) else None
    if not isinstance(endpoint, str) or ":" not in endpoint:
        return ""
    return "ipv6" if endpoint.startswith("[") or endpoint.count(":") > 1 else "ipv4"


def pair_family(sa: dict[str, Any], sb: dict[str, Any]) -> str:
    """The pair's ``family``: the workers' common one, ``A/B`` when they disagree."""
    fa, fb = link_family(sa), link_family(sb)
    return fa if fa == fb else f"{fa or '-'}/{fb or '-'}"


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(results: Iterable[RunLike]) -> list[PairSummary]:
    """One :class:`PairSummary` per ordered pair (same-LAN cases apart), in first-seen order."""
    groups: dict[tuple[str, str, bool], list[RunLike]] = {}
    for r in results:
        groups.setdefault((r.profile_a, r.profile_b, r.same_lan), []).append(r)
    out: list[PairSummary] = []
    for (pa, pb, same_lan), runs in groups.items():
        direct = [r for r in runs if r.outcome == "direct"]
        errors = sum(r.outcome == "error" for r in runs)
        counted = len(runs) - errors
        connect = [r.connect_s for r in direct if r.connect_s is not None]
        punch = [r.punch_s for r in direct if r.punch_s is not None]
        probes = [r.probes for r in runs if r.probes is not None]
        methods = Counter(r.method or "-" for r in runs if r.outcome != "error")
        families = Counter(r.family for r in direct if r.family)
        out.append(
            PairSummary(
                profile_a=pa,
                profile_b=pb,
                same_lan=same_lan,
                expected=runs[0].expected,
                runs=len(runs),
                direct=len(direct),
                relayed=sum(r.outcome != "direct" and r.fallback == "relayed" for r in runs),
                errors=errors,
                success_rate=round(len(direct) / counted, 4) if counted else None,
                median_connect_s=_median(connect),
                max_connect_s=max(connect) if connect else None,
                median_punch_s=_median(punch),
                max_punch_s=max(punch) if punch else None,
                methods=" ".join(f"{m}:{n}" for m, n in sorted(methods.items())),
                median_probes=_median([float(p) for p in probes]),
                max_probes=max(probes) if probes else None,
                families=" ".join(f"{f}:{n}" for f, n in sorted(families.items())),
            )
        )
    return out


def write_summary_csv(summaries: Sequence[PairSummary], path: Path) -> None:
    """One row per pair, the :class:`PairSummary` fields as columns."""
    fields = [f.name for f in dataclasses.fields(PairSummary)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for s in summaries:
            writer.writerow(dataclasses.asdict(s))


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def format_summary(summaries: Sequence[PairSummary]) -> str:
    """The printed table: one line per pair."""
    head = (
        f"{'site A':<20} {'site B':<20} {'direct':>7} {'rate':>6} {'median':>7} {'max':>7}"
        f" {'punch':>7} {'probes':>7}  methods (families)\n"
    )
    lines = [head]
    for s in summaries:
        b = "same LAN" if s.same_lan else s.profile_b
        rate = "-" if s.success_rate is None else f"{100 * s.success_rate:.0f}%"
        probes = "-" if s.median_probes is None else f"{s.median_probes:.0f}"
        lines.append(
            f"{s.profile_a:<20} {b:<20} {f'{s.direct}/{s.runs}':>7} {rate:>6}"
            f" {_secs(s.median_connect_s):>7} {_secs(s.max_connect_s):>7}"
            f" {_secs(s.median_punch_s):>7} {probes:>7}  {s.methods}"
            + (f" ({s.families})" if s.families else "")
            + (f" ({s.errors} broke)" if s.errors else "")
            + "\n"
        )
    return "".join(lines)


def _cell(runs: Sequence[RunLike]) -> tuple[float, str]:
    """Colour code and label of one heatmap cell (one run, or the runs of a repeated pair)."""
    code = {"failed": 0.0, "relayed": 1.0, "error": 2.0, "direct": 3.0, "some": 4.0}
    mark = "" if all(r.agrees for r in runs) else " !"
    if len(runs) == 1:
        r = runs[0]
        label = f"{r.connect_s:.1f}s" if r.connect_s is not None else r.outcome
        if r.outcome == "failed" and r.fallback:
            label = "failed\n→ " + _via(r.fallback)
        if r.method and r.outcome == "direct" and r.method != "direct":
            label += f"\n{r.method}"
        if r.outcome == "direct" and r.family == "ipv6":
            label += "\nIPv6"
        return code["relayed" if r.outcome == "failed" and r.fallback else r.outcome], label + mark
    direct = [r for r in runs if r.outcome == "direct"]
    counted = [r for r in runs if r.outcome != "error"]
    if not counted:
        return code["error"], "error" + mark
    times = sorted(r.connect_s for r in direct if r.connect_s is not None)
    label = f"{len(direct)}/{len(counted)}"
    if times:
        label += f"\n{times[len(times) // 2]:.1f}s"
    if direct and all(r.family == "ipv6" for r in direct):
        label += "\nIPv6"
    if len(direct) == len(counted):
        return code["direct"], label + mark
    if direct:
        return code["some"], label + mark
    return code["relayed" if all(r.fallback for r in counted) else "failed"], label + mark


def plot_heatmap(results: Sequence[RunLike], path: Path, profiles: Sequence[str]) -> None:
    """Profiles x profiles (plus a same-LAN row): green direct, yellow direct in some runs,
    orange failed but relayed (the fallback through the rendezvous), red failed, grey error;
    each cell shows the time to connect (or ``failed → relay``; with repeated runs the count of
    direct runs and the median time), and a ``!`` where an outcome disagrees with natlab.md.
    Row = site A, column = site B; an unordered pair fills both cells unless its reverse ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n = len(profiles)
    has_same = any(r.same_lan for r in results)
    rows = n + (1 if has_same else 0)
    grid = [[float("nan")] * n for _ in range(rows)]
    text = [[""] * n for _ in range(rows)]
    idx = {p: i for i, p in enumerate(profiles)}
    ran = {(r.profile_a, r.profile_b) for r in results if not r.same_lan}
    cells: dict[tuple[int, int], list[RunLike]] = {}
    for r in results:
        if r.same_lan:
            targets = [(n, idx[r.profile_a])]
        else:
            targets = [(idx[r.profile_a], idx[r.profile_b])]
            if (r.profile_b, r.profile_a) not in ran:
                targets.append((idx[r.profile_b], idx[r.profile_a]))
        for yx in dict.fromkeys(targets):
            cells.setdefault(yx, []).append(r)
    for (y, x), runs in cells.items():
        grid[y][x], text[y][x] = _cell(runs)
    fig, ax = plt.subplots(figsize=(1.4 * n + 2, 1.0 * rows + 1.5))
    cmap = ListedColormap(["#d9534f", "#f0ad4e", "#aaaaaa", "#5cb85c", "#f7e463"])
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=4)
    ax.set_xticks(range(n), list(profiles), rotation=30, ha="right")
    ylabels = list(profiles) + (["same LAN"] if has_same else [])
    ax.set_yticks(range(rows), ylabels)
    ax.set_xlabel("site B profile (same-LAN row: the shared NAT's profile)")
    ax.set_ylabel("site A profile")
    for y in range(rows):
        for x in range(n):
            if text[y][x]:
                ax.text(x, y, text[y][x], ha="center", va="center", fontsize=8)
    ax.set_title(
        "UDP hole punching in the kernel NAT lab\n"
        "(green direct, yellow some runs, orange failed → relayed, red failed)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _via(fallback: str) -> str:
    """Where a failed pair fell back to: ``relay`` (the rendezvous), ``turn-udp``, ``turn-tcp``."""
    return "relay" if fallback == "relayed" else fallback


def print_table(results: Sequence[RunLike]) -> str:
    """The per-run table ``p2plab lab matrix`` prints."""
    head = f"{'site A':<20} {'site B':<20} {'run':>3} {'outcome':<18} {'expected':<8} {'time':>6}"
    lines = [head + f" {'method':<12} {'path':<9} {'family':<6}  a peer / b peer\n"]
    for r in results:
        b = "same LAN" if r.same_lan else r.profile_b
        t = f"{r.connect_s:.1f}s" if r.connect_s is not None else "-"
        mark = "" if r.agrees else "  <-- disagrees with natlab.md"
        outcome = f"{r.outcome} → {_via(r.fallback)}" if r.fallback else r.outcome
        path = r.path or "-"
        lines.append(
            f"{r.profile_a:<20} {b:<20} {r.run:>3} {outcome:<18} {r.expected:<8} {t:>6} "
            f"{r.method or '-':<12} {path:<9} {r.family or '-':<6}  "
            f"{r.a_peer_endpoint} / {r.b_peer_endpoint}{mark}\n"
        )
    return "".join(lines)
