"""What one simulated run reports, with the kernel lab's matrix columns: :class:`PunchResult` (two
bare sessions) and :class:`LinkResult` (two whole workers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2plab.lab.sim.peer import SimPeer
from p2plab.lab.sim.worker import SimWorker
from p2plab.lab.simnet import Address

__all__ = ["METHODS", "LinkResult", "PunchResult", "address_family", "pair_method"]

#: The ``method`` column's values (contracts.md), most specific last.
METHODS = ("direct", "port-mapping", "birthday", "predicted", "relay")


def address_family(addr: Address | None) -> str | None:
    """``ipv6`` or ``ipv4`` for an address a direct link sends to (the ``family`` column);
    None for none, or a pseudo-address (the rendezvous relay's)."""
    if addr is None or not isinstance(addr[0], str) or addr[0] == "relay":
        return None
    return "ipv6" if ":" in addr[0] else "ipv4"


def pair_method(a: str | None, b: str | None) -> str | None:
    """The pair's ``method`` from both engines' own (:attr:`LinkEngine.method`).

    The two may differ on a direct link: the prober says ``predicted`` when its winning probe was
    one of the peer's predicted ports, while the sprayer says ``birthday`` when the winning path
    reached one of its pool sockets (the ports a sequential NAT gave the pool are the predicted
    ones); and only one side's NAT may have mapped the port the link runs to.  The more specific
    word wins: relay > predicted > birthday > port-mapping > direct.
    """
    found = [m for m in (a, b) if m in METHODS]
    return max(found, key=METHODS.index) if found else None


@dataclass(frozen=True)
class PunchResult:
    """The outcome of :meth:`Simulation.punch`."""

    outcome: str
    """``"direct"`` when both sides connected, else ``"failed"``."""
    connect_time_s: float | None
    """Virtual seconds from the offers to both sides connected (None when failed)."""
    a: SimPeer
    """Side A (controlling): its session keeps running as the simulation runs on."""
    b: SimPeer
    """Side B (controlled)."""
    a_public: Address | None
    """A's public address as STUN saw it."""
    b_public: Address | None
    """B's public address as STUN saw it."""
    a_sends_to: Address | None
    """The address A's nominated path sends to (B's endpoint as A sees it)."""
    b_sends_to: Address | None
    """The address B's nominated path sends to."""
    path: str | None
    """``"public"`` or ``"lan"``: which kind of address A reached B on (None when failed)."""

    def to_dict(self) -> dict[str, Any]:
        """The kernel lab's matrix columns (:class:`p2plab.lab.matrix.PairResult`) that apply."""
        return {"outcome": self.outcome, **_link_columns(self)}


@dataclass(frozen=True)
class LinkResult:
    """The outcome of :meth:`Simulation.pair`: two whole workers, paired by the rendezvous."""

    outcome: str
    """``"direct"`` when both engines reached ``connected``, else ``"failed"`` (direct punching
    only, as in the kernel lab's matrix)."""
    fallback: str
    """``"relayed"`` when punching failed but both engines ended ``relayed`` and a chat message
    from a reached b exactly once over the relay and was acknowledged; ``"turn-udp"`` or
    ``"turn-tcp"`` when they connected through a TURN server (issue 17) and the chat check
    passed there; else ``""``."""
    connect_time_s: float | None
    """Virtual seconds from the first offer to both connected (None unless direct)."""
    a: SimWorker
    """Worker A (registered first, so ``controlling``); it keeps running as the sim runs on."""
    b: SimWorker
    """Worker B (``controlled``)."""
    a_public: Address | None
    """A's public address as it discovered it (and reported to the rendezvous)."""
    b_public: Address | None
    """B's public address."""
    a_sends_to: Address | None
    """The address A's link sends to (B's endpoint as A sees it; None when relayed)."""
    b_sends_to: Address | None
    """The address B's link sends to."""
    path: str | None
    """``"public"`` or ``"lan"`` (which kind of address A reached B on), ``"relayed"`` when the
    engines fell back to the relay, ``"turn-udp"``/``"turn-tcp"`` through TURN, None when there
    is no link."""
    method: str | None = None
    """How the link was made (:func:`pair_method` of both engines' ``method``): ``direct``,
    ``birthday``, ``predicted`` or ``relay``; None without a link."""
    birthday_probes: int = 0
    """Random-port (and predicted-port) probes both engines sent (``birthday_probes``)."""
    family: str | None = None
    """The direct link's address family (``ipv4``, ``ipv6``; TURN paths ``ipv4``), None when
    relayed by the rendezvous or without a link."""

    def to_dict(self) -> dict[str, Any]:
        """The kernel lab's matrix columns (:class:`p2plab.lab.matrix.PairResult`) that apply."""
        return {
            "outcome": self.outcome,
            "fallback": self.fallback,
            "method": self.method,
            "family": self.family,
            **_link_columns(self),
            "birthday_probes": self.birthday_probes,
        }


def _fmt(addr: Address | None) -> str | None:
    return None if addr is None else f"{addr[0]}:{addr[1]}"


def _link_columns(r: PunchResult | LinkResult) -> dict[str, Any]:
    """The matrix columns both kinds of result share, after ``outcome`` (and ``fallback``)."""
    return {
        "connect_s": r.connect_time_s,
        "path": r.path,
        "a_public": _fmt(r.a_public),
        "b_public": _fmt(r.b_public),
        "a_peer_endpoint": _fmt(r.a_sends_to),
        "b_peer_endpoint": _fmt(r.b_sends_to),
        "a_state": r.a.state,
        "b_state": r.b.state,
    }
