"""The lab's site spec grammar (shared by the kernel lab, the simulator and the CLI)."""

from __future__ import annotations

import pytest

from p2plab.errors import ConfigError
from p2plab.lab.site import parse_site


def test_plain_profiles_keep_their_meaning() -> None:
    s = parse_site("symmetric")
    assert (s.v4, s.portmap, s.v6, s.families, s.protocols) == (
        "symmetric",
        None,
        None,
        ("ipv4",),
        frozenset(),
    )


def test_modifier_and_dual_stack() -> None:
    s = parse_site("symmetric+pmp/v6-apdf")
    assert (s.v4, s.portmap, s.v6) == ("symmetric", "pmp", "v6-apdf")
    assert s.protocols == {"nat-pmp", "pcp"}
    assert s.families == ("ipv4", "ipv6")
    assert parse_site("port-restricted+all").protocols == {"nat-pmp", "pcp", "upnp"}


def test_ipv6_only_site() -> None:
    s = parse_site("v6-eif")
    assert (s.v4, s.v6, s.families) == (None, "v6-eif", ("ipv6",))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("cone", "unknown NAT profile"),
        ("symmetric+nat", "unknown port-mapping modifier"),
        ("symmetric/v6-nat", "unknown IPv6 profile"),
        ("open+pmp", "no router"),
        ("v6-apdf+pmp", "unknown NAT profile"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_site(spec)
