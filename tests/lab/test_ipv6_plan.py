"""The lab's IPv6 plan and firewall rulesets as text (no root: the kernel lab tests of the same
rules are in test_lab_ipv6.py)."""

from __future__ import annotations

import ipaddress

import pytest

from p2plab.errors import ConfigError
from p2plab.lab.ipv6 import (
    LAB_SUPERNET,
    V6Plan,
    addr_argv,
    block_ruleset,
    bracket,
    expected_site_outcome,
    firewall_ruleset,
    lan_route_steps,
    router_site_steps,
)


def test_each_run_has_its_own_48_inside_the_documentation_prefix() -> None:
    plan = V6Plan("p2l1a2b")
    assert plan.network == ipaddress.IPv6Network("2001:db8:1a2b::/48")
    assert plan.network.subnet_of(LAB_SUPERNET)
    assert plan.public("rendezvous") == "2001:db8:1a2b::2"
    assert plan.stun_addresses == ("2001:db8:1a2b::10", "2001:db8:1a2b::11")
    assert plan.public("nat_b") == "2001:db8:1a2b::102"
    assert plan.lan_net("a") == ipaddress.IPv6Network("2001:db8:1a2b:a::/64")
    assert (plan.router_lan("b"), plan.lan_host("b", 0)) == (
        "2001:db8:1a2b:b::1",
        "2001:db8:1a2b:b::2",
    )
    assert plan.contains("2001:db8:1a2b:a::3") and not plan.contains("2001:db8:1a2c::2")
    assert not plan.contains("not an address")
    # Canonical text (what a worker's status shows): leading zeros of the run word go.
    assert V6Plan("p2l00ab").public("stun") == "2001:db8:ab::10"
    assert not V6Plan("p2l0001").network.overlaps(V6Plan("p2l0002").network)
    for bad in ("p2lzzzz", "x2l0000", "p2l00000"):
        with pytest.raises(ConfigError):
            V6Plan(bad)


def test_addresses_skip_dad_and_routes_go_via_the_router() -> None:
    assert addr_argv("ns", "eth0", "2001:db8::5")[-1] == "nodad"
    assert "2001:db8::5/64" in addr_argv("ns", "eth0", "2001:db8::5")
    with pytest.raises(ValueError):
        addr_argv("ns", "eth0", "203.0.113.5")
    plan = V6Plan("p2l0a0b")
    ((argv, _),) = lan_route_steps(plan, "b", ["rv"])
    assert argv == [
        "ip",
        "-n",
        "rv",
        "-6",
        "route",
        "add",
        "2001:db8:a0b:b::/64",
        "via",
        "2001:db8:a0b::102",
    ]
    steps = router_site_steps(
        plan, "a", "v6-apdf", ns="r", wan_if="w", lan_if="l", hosts=[("h", "hi")]
    )
    argvs = [" ".join(a) for a, _ in steps]
    assert "ip netns exec r sysctl -qw net.ipv6.conf.all.forwarding=1" in argvs
    assert "ip -n h -6 route add default via 2001:db8:a0b:a::1" in argvs
    assert "ip netns exec r sysctl -qew net.bridge.bridge-nf-call-ip6tables=0" in argvs
    nft = [text for a, text in steps if "nft" in a]
    assert nft == [firewall_ruleset("v6-apdf", wan_if="w", lan_if="l")]


def _chain(ruleset: str, name: str) -> list[str]:
    """The rule lines of one chain (the hook line first)."""
    lines = ruleset.splitlines()
    start = lines.index(f"\tchain {name} {{")
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 1 : end]]


def test_v6_open_forwards_everything_but_guards_the_router() -> None:
    rules = firewall_ruleset("v6-open", wan_if="W", lan_if="L")
    assert rules.startswith("table ip6 p2plab6 {")
    assert _chain(rules, "forward") == ["type filter hook forward priority filter; policy accept;"]
    assert _chain(rules, "input")[1:] == [
        "meta l4proto ipv6-icmp accept",
        'iifname "W" ct state new drop',
    ]


def test_v6_apdf_is_conntrack_only() -> None:
    fwd = _chain(firewall_ruleset("v6-apdf", wan_if="W", lan_if="L"), "forward")
    assert fwd == [
        "type filter hook forward priority filter; policy drop;",
        'iifname "L" oifname "W" accept',
        "ct state established,related accept",
    ]


def test_v6_eif_learns_outbound_sources_for_300_s() -> None:
    rules = firewall_ruleset("v6-eif", wan_if="W", lan_if="L")
    assert "type ipv6_addr . inet_service" in rules
    assert "flags dynamic,timeout" in rules and "timeout 300s" in rules
    fwd = _chain(rules, "forward")
    learn = 'iifname "L" oifname "W" meta l4proto udp update @eif_out { ip6 saddr . udp sport }'
    admit = 'iifname "W" meta l4proto udp ip6 daddr . udp dport @eif_out accept'
    # Learning comes before the outbound accept (an accept ends the chain).
    assert fwd.index(learn) < fwd.index('iifname "L" oifname "W" accept') < fwd.index(admit)
    assert "policy drop" in fwd[0]
    assert "timeout 120s" in firewall_ruleset("v6-eif", wan_if="W", lan_if="L", timeout_s=120)


def test_host_firewall_without_router() -> None:
    rules = firewall_ruleset("v6-eif", wan_if="H")
    assert "chain forward" not in rules
    assert 'oifname "H" meta l4proto udp update @eif_out { ip6 saddr . udp sport }' in _chain(
        rules, "output"
    )
    inp = _chain(rules, "input")
    assert inp[-1] == 'iifname "H" drop' and "ct state established,related accept" in inp
    assert _chain(firewall_ruleset("v6-open", wan_if="H"), "input")[1:] == []


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"profile": "v6-strict", "wan_if": "W"}, "profile"),
        ({"profile": "v6-apdf", "wan_if": 'W" accept; #'}, "interface"),
        ({"profile": "v6-eif", "wan_if": "W", "timeout_s": 0}, "timeout"),
    ],
)
def test_bad_firewall_arguments_are_refused(kwargs: dict[str, object], what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        firewall_ruleset(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b", "v4", "want"),
    [
        ("v6-apdf", "v6-apdf", None, ("direct", "ipv6")),
        ("v6-eif", "v6-open", None, ("direct", "ipv6")),
        ("symmetric/v6-apdf", "symmetric/v6-apdf", "failed", ("direct", "ipv6")),
        ("symmetric", "symmetric", "failed", ("failed", "")),
        ("port-restricted", "symmetric/v6-eif", "direct", ("direct", "ipv4")),
        ("v6-apdf", "symmetric", None, ("failed", "")),
    ],
)
def test_expected_outcome_prefers_ipv6_where_both_have_it(
    a: str, b: str, v4: str | None, want: tuple[str, str]
) -> None:
    assert expected_site_outcome(a, b, v4_outcome=v4) == want


def test_bracket() -> None:
    assert bracket("2001:db8::1", 3478) == "[2001:db8::1]:3478"
    assert bracket("203.0.113.1", 3478) == "203.0.113.1:3478"


def test_block_ruleset_drops_udp_both_ways_in_its_own_table() -> None:
    text = block_ruleset(["2001:db8:1:b::/64"])
    assert text.startswith("table ip6 p2plab6block {")
    assert _chain(text, "forward") == [
        "type filter hook forward priority -10; policy accept;",
        "meta l4proto udp ip6 saddr 2001:db8:1:b::/64 drop",
        "meta l4proto udp ip6 daddr 2001:db8:1:b::/64 drop",
    ]
    with pytest.raises(ValueError):
        block_ruleset(["203.0.113.0/24"])


def test_block_ruleset_for_a_host_without_router() -> None:
    text = block_ruleset(["2001:db8:1::202/128"], host=True)
    assert _chain(text, "input")[1:] == ["meta l4proto udp ip6 saddr 2001:db8:1::202/128 drop"]
    assert _chain(text, "output")[1:] == ["meta l4proto udp ip6 daddr 2001:db8:1::202/128 drop"]
    assert "chain forward" not in text


def test_loss_drops_that_fraction_of_udp_each_way_across_the_wan() -> None:
    rules = firewall_ruleset("v6-apdf", wan_if="W", lan_if="L", loss=0.25)
    drop = "meta l4proto udp numgen random mod 1000000 < 250000 drop"
    assert _chain(rules, "forward")[1:3] == [f'iifname "W" {drop}', f'oifname "W" {drop}']
    host = firewall_ruleset("v6-open", wan_if="H", loss=0.1)
    assert _chain(host, "input")[1:] == [
        'iifname "H" meta l4proto udp numgen random mod 1000000 < 100000 drop'
    ]
    assert _chain(host, "output")[1:] == [
        'oifname "H" meta l4proto udp numgen random mod 1000000 < 100000 drop'
    ]
    assert "numgen" not in firewall_ruleset("v6-eif", wan_if="W", lan_if="L")
    with pytest.raises(ConfigError, match="loss"):
        firewall_ruleset("v6-open", wan_if="W", loss=1.0)
