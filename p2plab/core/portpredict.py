"""Port prediction: does a NAT allocate its external ports in order, and which come next?

Issue 16 item 2's detection step, as a pure function.  Input: the external ports one NAT gave to
consecutive new mappings of one socket (each seen by a different STUN server or server address,
e.g. RFC 5780's mapping tests I-III against an address-dependent or symmetric NAT), in the order
the mappings were made.  Output: whether the allocation looks sequential and, if so, the ports
its next mappings will probably get, so that the side behind it can announce them and both sides
probe them first.

The rule: every step between consecutive ports (modulo the port range, so a wrap counts as a
small step) is forward and at most ``max_gap``.  A sequential allocator gives steps of exactly 1
(or a constant stride); a busy one (other hosts' traffic in between) gives small varying steps.
A random allocator over P ports passes the test for one step with probability ``max_gap / P``
(64 / 64512 = 0.1 % for Linux's range), for two steps with its square (1e-6): three mappings are
worth asking for.  The same port every time means endpoint-independent mapping: nothing to
predict, the mapped address is already the one the peer should use.

It lives in the core, not the lab, because the worker's engine is what will act on it (announce
predicted candidates after its STUN discovery); it needs no clock or randomness.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PortPrediction", "predict_ports"]


@dataclass(frozen=True)
class PortPrediction:
    """What :func:`predict_ports` concluded."""

    sequential: bool
    """Whether the observed ports look like an in-order allocator."""
    stride: int | None
    """The constant step between ports, when every step was the same (1 for a plain sequential
    allocator); None when steps varied (a busy NAT) or the allocation is not sequential."""
    predicted: tuple[int, ...]
    """Ports to probe first, most likely first; empty when not sequential."""
    reason: str
    """One sentence saying why, for logs and ``probe --json``."""


def predict_ports(
    ports: Sequence[int],
    *,
    count: int = 16,
    max_gap: int = 64,
    port_range: tuple[int, int] = (1024, 65535),
) -> PortPrediction:
    """Whether ``ports`` (external ports of consecutive new mappings, oldest first) look
    sequential, and the next ``count`` ports if they do.

    With a constant stride ``d`` the prediction is ``last + d, last + 2d, ...``; with varying
    forward steps (other traffic takes ports in between) it is the ``count`` ports right after the
    last one, ``last + 1, last + 2, ...``: the nearest are the likeliest.  Ports wrap around within
    ``port_range`` (inclusive), as the allocator does.
    """
    lo, hi = port_range
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"bad port_range {port_range!r}")
    if count < 1 or max_gap < 1:
        raise ValueError("count and max_gap must be >= 1")
    span = hi - lo + 1
    if len(ports) < 2:
        return PortPrediction(False, None, (), "need the ports of at least two mappings")
    if any(not lo <= p <= hi for p in ports):
        return PortPrediction(False, None, (), "a port lies outside the NAT's port range")
    steps = [(b - a) % span for a, b in itertools.pairwise(ports)]
    if all(step == 0 for step in steps):
        return PortPrediction(
            False, None, (), "same port for every mapping: endpoint-independent, nothing to predict"
        )
    if not all(1 <= step <= max_gap for step in steps):
        return PortPrediction(
            False,
            None,
            (),
            f"not sequential: steps {steps} are not all forward and at most {max_gap}",
        )
    last = ports[-1]
    if len(set(steps)) == 1:
        stride = steps[0]
        predicted = tuple(lo + (last - lo + stride * i) % span for i in range(1, count + 1))
        return PortPrediction(True, stride, predicted, f"sequential with stride {stride}")
    predicted = tuple(lo + (last - lo + i) % span for i in range(1, count + 1))
    return PortPrediction(
        True,
        None,
        predicted,
        f"sequential with other traffic: steps {steps}, predicting the next {count} ports",
    )
