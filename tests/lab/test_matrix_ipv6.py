"""The lab matrix with IPv6 sites (issue 19), in process: site specs in ``--pairs`` and
``--profiles``, the ``family`` column, the expected outcomes, the worker arguments per site."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

import p2plab.lab.matrix as matrix
from p2plab.cli import build_parser
from p2plab.lab.ipv6 import V6Plan
from p2plab.lab.matrix import PairResult
from p2plab.lab.matrix_report import (
    format_summary,
    link_family,
    pair_family,
    parse_pairs,
    print_table,
    summarize,
)
from p2plab.lab.netns import LabConfig


def result(pa: str, pb: str, outcome: str = "direct", **kw: Any) -> PairResult:
    base: dict[str, Any] = dict.fromkeys(
        ("a_public", "b_public", "a_peer_endpoint", "b_peer_endpoint", "connect_s", "punch_s")
    )
    base |= dict.fromkeys(("a_nat", "b_nat", "a_classic", "b_classic", "a_state", "b_state"), "")
    base |= {"profile_a": pa, "profile_b": pb, "same_lan": False, "outcome": outcome}
    base["expected"] = "direct"
    return PairResult(**{**base, **kw})


def test_pairs_take_site_specs() -> None:
    assert parse_pairs("symmetric/v6-apdf:symmetric/v6-apdf,v6-apdf:v6-eif") == [
        ("symmetric/v6-apdf", "symmetric/v6-apdf"),
        ("v6-apdf", "v6-eif"),
    ]
    with pytest.raises(ValueError, match="unknown profile 'symmetric/v6-nat'"):
        parse_pairs("symmetric/v6-nat:v6-apdf")
    args = build_parser().parse_args(
        ["lab", "matrix", "--profiles", "v6-apdf,symmetric/v6-eif", "--no-same-lan"]
    )
    assert args.profiles == ["v6-apdf", "symmetric/v6-eif"]
    up = build_parser().parse_args(["lab", "up", "--a", "v6-eif", "--b", "full/v6-open"])
    assert (up.profile_a, up.profile_b) == ("v6-eif", "full/v6-open")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lab", "up", "--a", "v6-nat"])


def test_family_comes_from_status_else_from_the_peer_endpoint() -> None:
    assert link_family({"family": "ipv6", "peer": {"endpoint": "203.0.113.1:5"}}) == "ipv6"
    assert link_family({"peer": {"endpoint": "[2001:db8:1::2]:5000"}}) == "ipv6"
    assert link_family({"peer": {"endpoint": "2001:db8:1::2:5000"}}) == "ipv6"
    assert link_family({"peer": {"endpoint": "203.0.113.101:40000"}}) == "ipv4"
    assert link_family({"peer": {"endpoint": "relay"}}) == ""
    assert link_family({"family": None, "peer": None}) == link_family({}) == ""
    six = {"family": "ipv6"}
    assert pair_family(six, six) == "ipv6"
    assert pair_family(six, {"peer": {"endpoint": "203.0.113.1:5"}}) == "ipv6/ipv4"
    assert pair_family(six, {}) == "ipv6/-"


def test_a_direct_link_over_the_wrong_family_disagrees() -> None:
    v6 = {"expected": "direct", "expected_family": "ipv6"}
    assert result("symmetric/v6-apdf", "symmetric/v6-apdf", family="ipv6", **v6).agrees
    assert not result("symmetric/v6-apdf", "symmetric/v6-apdf", family="ipv4", **v6).agrees
    assert not result("symmetric/v6-apdf", "symmetric/v6-apdf", "failed", **v6).agrees
    # Without an expected family (runs recorded before issue 19) only the outcome counts.
    assert result("full", "full", family="").agrees


def test_table_and_summary_show_the_family() -> None:
    runs = [
        result("v6-apdf", "v6-apdf", family="ipv6", expected_family="ipv6", connect_s=2.0),
        result("v6-apdf", "v6-apdf", family="ipv6", expected_family="ipv6", connect_s=3.0, run=2),
    ]
    (summary,) = summarize(runs)
    assert summary.families == "ipv6:2"
    assert format_summary([summary]).splitlines()[1].endswith("(ipv6:2)")
    head, row = (line.split() for line in print_table(runs).splitlines()[:2])
    assert head[-7:-5] == ["path", "family"] and row[-6:-3] == ["-", "-", "ipv6"]


class FakeLab:
    """What ``matrix._server_args`` reads of a lab."""

    def __init__(self, a: str, b: str) -> None:
        self.specs = {"a": a, "b": b}
        self.v6 = V6Plan("p2l0001") if "v6" in a + b else None
        self.rendezvous_address = "203.0.113.2"
        self.stun_server = "203.0.113.10:3478"
        self.stun_port = 3478

    def profile(self, host: str) -> str:
        return self.specs[host]

    def address6(self, host: str) -> str | None:
        return "2001:db8:1:a::2" if self.v6 and "v6" in self.specs[host] else None


def test_each_worker_gets_the_servers_of_its_families() -> None:
    lab: Any = FakeLab("symmetric/v6-apdf", "v6-eif")
    assert matrix._server_args(lab, "a") == [
        "--rendezvous", "ws://203.0.113.2:8000",
        "--stun", "203.0.113.10:3478",
        "--stun", "[2001:db8:1::10]:3478",
    ]  # fmt: skip
    assert matrix._server_args(lab, "b") == [
        "--rendezvous", "ws://[2001:db8:1::2]:8000",
        "--stun", "[2001:db8:1::10]:3478",
    ]  # fmt: skip
    plain: Any = FakeLab("symmetric", "full")
    assert matrix._server_args(plain, "b") == [
        "--rendezvous", "ws://203.0.113.2:8000", "--stun", "203.0.113.10:3478"
    ]  # fmt: skip


def test_expected_outcomes_and_family_columns_in_the_csv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[str, str]] = []

    def fake_pair(config: LabConfig, **kw: Any) -> PairResult:
        seen.append((config.profile_a, config.profile_b))
        return result(config.profile_a, config.profile_b, family="ipv6", expected_family="ipv6")

    monkeypatch.setattr(matrix, "run_pair", fake_pair)
    classified: list[list[str]] = []
    monkeypatch.setattr(
        matrix,
        "classify_profiles",
        lambda profiles: (
            classified.append(list(profiles)) or {p: {"classic": "?"} for p in profiles}
        ),
    )
    results = matrix.run_matrix(
        pairs=[("symmetric/v6-apdf", "symmetric/v6-apdf"), ("v6-apdf", "v6-eif")],
        out_dir=tmp_path,
        jobs=1,
    )
    assert sorted(seen) == [("symmetric/v6-apdf", "symmetric/v6-apdf"), ("v6-apdf", "v6-eif")]
    assert classified == [["symmetric"]]  # pystun3 sees only the IPv4 NATs
    assert all(r.agrees for r in results)
    with open(tmp_path / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"family", "expected_family"} <= set(rows[0])
    assert {r["family"] for r in rows} == {"ipv6"}
