"""The benchmark's sans-I/O core: datagram format and accounting, and the control protocol.

- :mod:`p2plab.core.bench.accounting`: datagram format, sender pacing and credit window, exact
  receiver accounting (everything ``from p2plab.core.bench import X`` offered before).
- :mod:`p2plab.core.bench.rates`: the window goodput is measured over (never above the sending
  rate) and the rule for a run that fell short of its target rate.
- :mod:`p2plab.core.bench.control`: the control protocol (start, ready, refused, stop, results,
  retries and timeouts) as a state machine layered on the session.
"""

from __future__ import annotations

from p2plab.core.bench.accounting import (
    BENCH_CREDIT,
    BENCH_DATA,
    BENCH_PING,
    BENCH_PONG,
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    MIN_PAYLOAD,
    TAIL,
    BenchHeader,
    BenchReceiver,
    CreditWindow,
    IntervalRecord,
    Pacer,
    ReceiverReport,
    encode_bench,
    encode_credit,
    fill_headers,
    make_template,
    numpy_or_none,
    parse_bench,
    parse_headers,
    rtt_percentiles,
    validate_params,
)
from p2plab.core.bench.control import CONTROL_TYPES, BenchControl, ControlConfig
from p2plab.core.bench.rates import SHORT_OF_TARGET, goodput_window_s, mbps, short_of_target

__all__ = [
    "BENCH_CREDIT",
    "BENCH_DATA",
    "BENCH_PING",
    "BENCH_PONG",
    "CONTROL_TYPES",
    "HEADER",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "MIN_PAYLOAD",
    "SHORT_OF_TARGET",
    "TAIL",
    "BenchControl",
    "BenchHeader",
    "BenchReceiver",
    "ControlConfig",
    "CreditWindow",
    "IntervalRecord",
    "Pacer",
    "ReceiverReport",
    "encode_bench",
    "encode_credit",
    "fill_headers",
    "goodput_window_s",
    "make_template",
    "mbps",
    "numpy_or_none",
    "parse_bench",
    "parse_headers",
    "rtt_percentiles",
    "short_of_target",
    "validate_params",
]
