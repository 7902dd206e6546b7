"""``p2plab lab matrix --repeat N --pairs A:B``: parsing, the per-pair summary and the files, in
process (the pairs themselves are faked: the kernel runs are in test_lab_matrix.py and
test_lab_birthday.py)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import pytest

import p2plab.lab.matrix as matrix
from p2plab.cli import build_parser, main
from p2plab.lab.matrix import PairResult
from p2plab.lab.matrix_report import format_summary, parse_pairs, summarize
from p2plab.lab.netns import LabConfig


def result(pa: str, pb: str, outcome: str = "direct", **kw: Any) -> PairResult:
    base: dict[str, Any] = {
        "profile_a": pa,
        "profile_b": pb,
        "same_lan": False,
        "outcome": outcome,
        "expected": "direct",
        "connect_s": None,
        "punch_s": None,
        "a_public": None,
        "b_public": None,
        "a_peer_endpoint": None,
        "b_peer_endpoint": None,
        "a_nat": "",
        "b_nat": "",
        "a_classic": "",
        "b_classic": "",
        "a_state": "",
        "b_state": "",
    }
    return PairResult(**{**base, **kw})


def test_pairs_are_ordered_checked_and_kept_once() -> None:
    assert parse_pairs("port-restricted:symmetric, symmetric:port-restricted,") == [
        ("port-restricted", "symmetric"),
        ("symmetric", "port-restricted"),
    ]
    assert parse_pairs("leaky:symmetric,leaky:symmetric") == [("leaky", "symmetric")]
    for bad, says in [
        ("leaky", "expected PROFILE:PROFILE"),
        ("leaky:", "expected PROFILE:PROFILE"),
        ("leaky:cone", "unknown profile 'cone'"),
        (" , ", "at least one"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_pairs(bad)


def test_the_cli_takes_pairs_and_repeat_and_refuses_bad_ones_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(
        ["lab", "matrix", "--pairs", "leaky:port-restricted,symmetric:symmetric", "--repeat", "10"]
    )
    assert args.pairs == [("leaky", "port-restricted"), ("symmetric", "symmetric")]
    assert args.repeat == 10
    defaults = build_parser().parse_args(["lab", "matrix"])
    assert defaults.pairs is None and defaults.repeat == 1
    for argv, says in [
        (["--pairs", "leaky:nat"], "unknown profile 'nat'"),
        (["--repeat", "0"], "--repeat"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["lab", "matrix", *argv])
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("p2plab lab matrix: error: ")
        assert says in err[0]


def test_summary_folds_the_runs_of_each_ordered_pair() -> None:
    runs = [
        result("port-restricted", "symmetric", connect_s=4.0, punch_s=2.0, method="birthday",
               probes=300, run=1),
        result("port-restricted", "symmetric", connect_s=6.0, punch_s=3.0, method="birthday",
               probes=500, run=2),
        result("port-restricted", "symmetric", connect_s=9.0, punch_s=7.5, method="predicted",
               probes=100, run=3),
        result("port-restricted", "symmetric", "failed", fallback="relayed", method="relay",
               probes=1024, run=4),
        result("port-restricted", "symmetric", "error", error="lab broke", run=5),
        result("symmetric", "port-restricted", connect_s=5.0, punch_s=1.0, method="birthday"),
        result("symmetric", "symmetric", "failed", expected="failed", fallback="relayed",
               method="relay"),
    ]  # fmt: skip
    by_pair = {(s.profile_a, s.profile_b): s for s in summarize(runs)}
    assert list(by_pair) == [
        ("port-restricted", "symmetric"),
        ("symmetric", "port-restricted"),
        ("symmetric", "symmetric"),
    ]
    s = by_pair["port-restricted", "symmetric"]
    assert (s.runs, s.direct, s.relayed, s.errors) == (5, 3, 1, 1)
    assert s.success_rate == 0.75  # the broken run is not a failure of the method
    assert (s.median_connect_s, s.max_connect_s) == (6.0, 9.0)
    assert (s.median_punch_s, s.max_punch_s) == (3.0, 7.5)
    assert s.methods == "birthday:2 predicted:1 relay:1"
    assert (s.median_probes, s.max_probes) == (400.0, 1024)
    hard = by_pair["symmetric", "symmetric"]
    assert (hard.success_rate, hard.median_connect_s, hard.methods) == (0.0, None, "relay:1")
    assert hard.median_probes is None and hard.expected == "failed"
    table = format_summary(summarize(runs)).splitlines()
    assert table[1].split()[:6] == ["port-restricted", "symmetric", "3/5", "75%", "6.0s", "9.0s"]
    assert table[1].endswith("birthday:2 predicted:1 relay:1 (1 broke)")


def test_method_and_counters_come_from_both_workers_statuses() -> None:
    a = {"method": "birthday", "stats": {"birthday_probes": 412, "spray_datagrams": 0}}
    b = {"method": "birthday", "stats": {"birthday_probes": 0, "spray_datagrams": 1024}}
    assert matrix.pair_method(a, b) == "birthday"
    assert matrix.pair_method({}, {}) == ""
    assert matrix.pair_method(a, {"method": "direct"}) == "birthday/direct"
    assert matrix.link_counter([a, b], "birthday_probes") == 412
    assert matrix.link_counter([a, b], "spray_datagrams") == 1024
    assert matrix.link_counter([{}, {"stats": {"x": 1}}], "birthday_probes") is None
    leaky = {"nat": {"mapping": "endpoint-independent", "hint": {"difficulty": "hard",
             "remaps_on_clash": True, "sequential": False}}}  # fmt: skip
    assert matrix.hint_text(leaky) == "hard+remaps"
    assert matrix.hint_text({"nat": None}) == matrix.hint_text({}) == ""


def test_repeat_runs_each_ordered_pair_and_writes_rows_summary_and_heatmap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, str, bool, int]] = []

    def fake_pair(config: LabConfig, **kw: Any) -> PairResult:
        calls.append((config.profile_a, config.profile_b, config.same_lan, kw["run_index"]))
        hard = config.profile_a == config.profile_b == "symmetric"
        return result(
            config.profile_a,
            config.profile_b,
            "failed" if hard else "direct",
            expected="failed" if hard else "direct",
            connect_s=None if hard else 3.0 + kw["run_index"],
            method="relay" if hard else "birthday",
            fallback="relayed" if hard else "",
            run=kw["run_index"],
        )

    monkeypatch.setattr(matrix, "run_pair", fake_pair)
    monkeypatch.setattr(
        matrix, "classify_profiles", lambda profiles: {p: {"classic": "?"} for p in profiles}
    )
    args = build_parser().parse_args(
        ["lab", "matrix", "--pairs", "port-restricted:symmetric,symmetric:symmetric",
         "--repeat", "3", "--jobs", "2", "--out", str(tmp_path)]
    )  # fmt: skip
    assert matrix.run_from_args(args) == 0
    assert sorted(calls) == sorted(
        (pa, pb, False, i)
        for pa, pb in [("port-restricted", "symmetric"), ("symmetric", "symmetric")]
        for i in (1, 2, 3)
    )  # ordered pairs only: no reverse, no same-LAN row
    with open(tmp_path / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    assert [f.name for f in dataclasses.fields(PairResult)][:6] == list(rows[0])[:6]
    assert {"method", "probes", "sprays", "run", "agrees"} <= set(rows[0])
    assert [(r["profile_a"], r["run"], r["method"]) for r in rows] == [
        ("port-restricted", "1", "birthday"),
        ("port-restricted", "2", "birthday"),
        ("port-restricted", "3", "birthday"),
        ("symmetric", "1", "relay"),
        ("symmetric", "2", "relay"),
        ("symmetric", "3", "relay"),
    ]
    with open(tmp_path / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [(s["profile_b"], s["success_rate"], s["median_connect_s"]) for s in summary] == [
        ("symmetric", "1.0", "5.0"),
        ("symmetric", "0.0", ""),
    ]
    assert (tmp_path / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
