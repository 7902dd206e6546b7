"""The port predictor on hand-made port lists: strides, busy gaps, wrap-around, refusals."""

from __future__ import annotations

import random

import pytest

from p2plab.core.portpredict import predict_ports


def test_plain_sequential_predicts_the_next_ports_in_order() -> None:
    got = predict_ports([20000, 20001, 20002], count=4)
    assert got.sequential and got.stride == 1
    assert got.predicted == (20003, 20004, 20005, 20006)


def test_constant_stride_is_kept() -> None:
    got = predict_ports([30000, 30002, 30004], count=3)
    assert got.stride == 2 and got.predicted == (30006, 30008, 30010)


def test_busy_steps_predict_the_window_after_the_last_port() -> None:
    got = predict_ports([20000, 20003, 20004, 20011], count=5)
    assert got.sequential and got.stride is None
    assert got.predicted == (20012, 20013, 20014, 20015, 20016)
    assert "other traffic" in got.reason


def test_wrap_around_within_the_range_counts_as_a_small_step() -> None:
    got = predict_ports([65534, 65535, 1024], count=3)
    assert got.sequential and got.stride == 1
    assert got.predicted == (1025, 1026, 1027)
    got = predict_ports([5998, 5999], count=3, port_range=(5000, 5999))
    assert got.predicted == (5000, 5001, 5002)


@pytest.mark.parametrize(
    ("ports", "words"),
    [
        ([], "at least two"),
        ([40000], "at least two"),
        ([40000, 40000, 40000], "endpoint-independent"),
        ([20005, 20004, 20003], "not sequential"),  # backwards
        ([20000, 20001, 20200], "not sequential"),  # one big jump
        ([20000, 20000, 20001], "not sequential"),  # a repeat among new mappings
        ([80, 81, 82], "outside"),
    ],
)
def test_not_sequential_says_why(ports: list[int], words: str) -> None:
    got = predict_ports(ports)
    assert not got.sequential and got.predicted == () and got.stride is None
    assert words in got.reason


def test_random_ports_are_almost_never_taken_for_sequential() -> None:
    """Three random ports pass with probability (64/64512)^2 ~ 1e-6; two with ~0.1 %."""
    rng = random.Random(16)
    three = sum(
        predict_ports([rng.randint(1024, 65535) for _ in range(3)]).sequential for _ in range(20000)
    )
    two = sum(
        predict_ports([rng.randint(1024, 65535) for _ in range(2)]).sequential for _ in range(20000)
    )
    assert three == 0
    assert two < 60  # ~20 expected


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        predict_ports([1, 2], port_range=(0, 10))
    with pytest.raises(ValueError):
        predict_ports([1, 2], count=0)
