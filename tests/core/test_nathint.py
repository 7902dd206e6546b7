"""The NatHint a worker announces, from the mappings STUN showed (p2plab.core.nathint)."""

from __future__ import annotations

from p2plab.core.nathint import hint_from_mappings, hint_summary
from p2plab.core.signaling import NatHint

IP = "203.0.113.101"


def test_one_mapping_says_nothing() -> None:
    assert hint_from_mappings([(IP, 4000)]) == NatHint()
    assert hint_summary(hint_from_mappings([(IP, 4000)])) == "unknown"
    assert hint_summary(None) == "unknown"


def test_same_port_everywhere_is_easy() -> None:
    hint = hint_from_mappings([(IP, 4000), (IP, 4000), (IP, 4000)])
    assert hint.mapping == "endpoint-independent"
    assert not hint.remaps_on_clash and not hint.predicted_ports
    assert hint_summary(hint) == "easy"


def test_random_ports_are_hard_and_not_predicted() -> None:
    hint = hint_from_mappings([(IP, 4000), (IP, 51234), (IP, 17001)])
    assert hint.mapping == "endpoint-dependent"
    assert not hint.sequential and hint.predicted_ports == []
    assert hint_summary(hint) == "hard"


def test_sequential_ports_announce_the_next_ones() -> None:
    hint = hint_from_mappings([(IP, 20000), (IP, 20001), (IP, 20002)])
    assert hint.mapping == "endpoint-dependent" and hint.sequential
    assert hint.predicted_ports[:3] == [20003, 20004, 20005]
    assert len(hint.predicted_ports) == 16


def test_several_public_ips_count_as_per_destination() -> None:
    hint = hint_from_mappings([(IP, 20000), ("203.0.113.102", 20001), (IP, 20002)])
    assert hint.mapping == "endpoint-dependent" and not hint.sequential


def test_the_leaky_test_marks_an_easy_nat_hard() -> None:
    leaky = hint_from_mappings(
        [(IP, 4000), (IP, 4000)], clash_reference=(IP, 5000), clash_mapping=(IP, 61000)
    )
    assert leaky.mapping == "endpoint-independent" and leaky.remaps_on_clash
    assert hint_summary(leaky) == "hard"
    clean = hint_from_mappings(
        [(IP, 4000), (IP, 4000)], clash_reference=(IP, 5000), clash_mapping=(IP, 5000)
    )
    assert not clean.remaps_on_clash and hint_summary(clean) == "easy"
