"""Forwarding a worker's trickled candidates (its TURN relayed addresses) to its peer (issue 17).

A worker that allocated a TURN relay sends ``{"type": "candidates", "to": <peer>,
"candidates": [...]}`` (:class:`~p2plab.core.signaling.CandidatesOut`); the rendezvous passes it
on as ``{"type": "candidates", "from": <sender>, ...}`` (:class:`CandidatesIn`), with the same
rules as ``relay`` messages: only between the two workers of a current pair (the backend's
``relay_target``, so across instances through Redis as well), never before ``register``.

A worker sends one such message per allocation (a new pair, a new allocation after a failure),
so :data:`CANDIDATES_PER_MIN` per connection is plenty; beyond it they are dropped, because each
one makes the peer probe new addresses.  Host names never get this far: the shared model takes
IP literals only, so a candidate with a name is a ``bad_message``.

Each refusal kind is answered with one ``error`` per connection until a message goes through
again (as for relay refusals): a worker gets told, a flooder gets no echo.  Both the service
(:mod:`.app`) and the simulated rendezvous use :class:`TrickleGate`.
"""

from __future__ import annotations

from typing import Literal

from p2plab.core.signaling import CandidatesIn, CandidatesOut, ErrorMessage

from .limits import TokenBucket
from .registry import SendMessage

__all__ = ["CANDIDATES_PER_MIN", "RefusalKind", "TrickleGate"]

#: Candidate messages one connection may send per minute (a burst of this many, then one per
#: 60/N seconds).
CANDIDATES_PER_MIN = 8

RefusalKind = Literal["unregistered", "rate", "unpaired"]

_ERRORS: dict[RefusalKind, tuple[str, str]] = {
    "unregistered": ("bad_message", "send 'register' first"),
    "rate": ("candidates_rate_limited", "too many 'candidates' messages; dropped"),
    "unpaired": ("candidates_refused", "not paired with {to!r}: candidates refused"),
}


class TrickleGate:
    """One connection's rate bound and error memory for ``candidates`` messages."""

    def __init__(self, now: float, per_min: int = CANDIDATES_PER_MIN) -> None:
        self._bucket = TokenBucket(per_min / 60.0, float(per_min), float("inf"), now)
        self._reported: set[RefusalKind] = set()

    def admit(self, now: float) -> bool:
        """Whether one more message fits the rate (if so, it is counted)."""
        return self._bucket.allow(now)

    def refusal(self, kind: RefusalKind, to: str) -> ErrorMessage | None:
        """The error to answer a refused message with, or None if this kind was answered since
        the last message that went through."""
        if kind in self._reported:
            return None
        self._reported.add(kind)
        code, text = _ERRORS[kind]
        return ErrorMessage(code=code, message=text.format(to=to[:64]))

    def forward(self, sender: str, msg: CandidatesOut, target_conn: str) -> SendMessage:
        """The message for the peer's connection ``target_conn`` (and errors may come again)."""
        self._reported.clear()
        out = CandidatesIn.model_validate({"from": sender, "candidates": msg.candidates})
        return SendMessage(msg.to, target_conn, out)
