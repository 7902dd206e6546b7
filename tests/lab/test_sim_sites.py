"""The simulated matrix over the kernel lab's site specs (issues 18 and 19): every ordered pair of
a mix of port-mapping, dual-stack and IPv6-only sites ends as the lab's rules say
(:func:`p2plab.lab.sim.matrix.expected_row`), and the issue's own pairs are in it."""

from __future__ import annotations

from collections import Counter

from p2plab.lab.sim.matrix import EXPECTED_SITES, PORTMAP_V6_SITES, expected_row, sim_matrix

SPECS = (
    "open",
    "full+pmp",
    "port-restricted+upnp",
    "symmetric+all",
    "leaky+pmp",
    "symmetric/v6-eif",
    "v6-open",
    "restricted/v6-apdf",
)


def _agrees(row: dict[str, object]) -> bool:
    method = row["expected_method"]
    return (
        row["outcome"] == row["expected"]
        and (method is None or row["method"] == method)
        and row["family"] == row["expected_family"]
    )


def test_every_pair_of_mixed_sites_ends_as_the_lab_says() -> None:
    rows = sim_matrix(pairs=[(a, b) for a in SPECS for b in SPECS], classify=False, seed=5)
    assert [(r["profile_a"], r["profile_b"]) for r in rows if not _agrees(r)] == []
    methods = Counter((r["method"], r["family"]) for r in rows)
    # 7 x 7 pairs of IPv4 sites less the 3 x 3 without a mapping site; 3 x 3 with IPv6 on both.
    assert methods[("port-mapping", "ipv4")] == 40
    assert methods[("direct", "ipv6")] == 9
    # An IPv6-only site and an IPv4-only one share no family: the rendezvous relay carries them.
    no_common = [r for r in rows if {r["profile_a"], r["profile_b"]} == {"v6-open", "full+pmp"}]
    assert [(r["outcome"], r["fallback"]) for r in no_common] == [("failed", "relayed")] * 2


def test_the_issue_pairs_and_their_same_lan_rows() -> None:
    rows = sim_matrix(pairs=list(EXPECTED_SITES), same_lan=PORTMAP_V6_SITES, seed=7)
    assert all(_agrees(r) for r in rows), [r for r in rows if not _agrees(r)]
    lan = [r for r in rows if r["same_lan"]]
    assert {r["family"] for r in lan if "v6" in str(r["profile_a"])} == {"ipv6"}
    # The classification columns run over IPv4 where a site has it.
    first = rows[0]
    assert first["a_nat"] == "address-and-port-dependent/address-and-port-dependent"
    assert expected_row("v6-eif", "symmetric")["expected"] == "failed"
