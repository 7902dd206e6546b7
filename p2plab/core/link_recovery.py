"""What the link engine does when a peer link goes down, sans-I/O (used by :mod:`p2plab.core.link`).

A session ends ``lost`` (punch timeout, peer timeout, delivery failed) or ``closed`` (the peer's
BYE).  :func:`link_down_input` turns the reason into one input of the lifecycle table
(:data:`p2plab.core.link_table.TRANSITIONS`):

* a relayed link that fell silent is set up again at once (``RELAY_LOST``, then ``RERELAY``);
* a first direct punch that timed out (e.g. symmetric x symmetric NATs) falls back to the
  rendezvous relay (``RELAY_FALLBACK``), if the relay is allowed;
* a direct link that was up (or is being re-punched) and fell silent is punched again
  (``LINK_LOST``): its NAT may have dropped the mapping.  The first re-punch starts at once, the
  next ones after :func:`repunch_delay`; the rendezvous says when the peer really left;
* anything else gives the peer up (``LINK_FAILED``) and waits for the rendezvous to pair again.
"""

from __future__ import annotations

from collections.abc import Iterable

from p2plab.core import events as ev
from p2plab.core.link_commands import LinkConfig
from p2plab.core.link_table import Input

__all__ = ["link_down_input", "repunch_candidates", "repunch_delay"]

Address = ev.Address


def link_down_input(reason: str, *, relayed: bool, attempts: int, config: LinkConfig) -> str:
    """The table input for a link that went down for ``reason`` (a :class:`PeerLost` reason, or
    ``"peer closed"``), after ``attempts`` re-punches since it was last up."""
    if relayed:
        return Input.RELAY_LOST if reason == "peer timeout" else Input.LINK_FAILED
    if config.relay and reason == "punch timeout" and attempts == 0:
        return Input.RELAY_FALLBACK
    if config.repunch and (
        reason == "peer timeout" or (reason == "punch timeout" and attempts > 0)
    ):
        return Input.LINK_LOST
    return Input.LINK_FAILED


def repunch_delay(attempts: int, config: LinkConfig) -> float:
    """Seconds before the next re-punch after ``attempts`` of them: 0 for the first, then
    ``repunch_initial_delay_s`` doubling, at most ``repunch_max_delay_s``."""
    delay = 0.0 if attempts == 0 else config.repunch_initial_delay_s * 2 ** (attempts - 1)
    return min(delay, config.repunch_max_delay_s)


def repunch_candidates(last: Address | None, known: Iterable[Address]) -> list[Address]:
    """The addresses to punch again: the last nominated path first, then every other known."""
    out = [last] if last is not None else []
    for c in known:
        if c not in out:
            out.append(c)
    return out
