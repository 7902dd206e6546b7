"""STUN probing in the simulator: the core's RFC 5780 discovery procedure on a simulated socket,
and the RFC 3489 classic sequence as pystun3 runs it.

Each procedure runs on one :class:`~p2plab.lab.sim.peer.SimPeer` (a fresh socket the caller
opens and closes) against the simulated STUN server; virtual time passes while it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2plab.core.discovery import (
    BindingOutcome,
    BindingTest,
    DiscoveryResult,
    Rfc5780Discovery,
    outcome_from_transaction,
)
from p2plab.core.nat import ServerAnswer
from p2plab.core.stun import TransactionState
from p2plab.lab.sim.peer import SimPeer
from p2plab.lab.simnet import Address

__all__ = ["binding_answer", "classic_probe", "rfc5780_discovery"]

# Longer than any retransmission schedule: a phase ends when its transactions do.
_PHASE_LIMIT = 3600.0


def binding_answer(p: SimPeer, server: Address, **kwargs: bool) -> ServerAnswer:
    """One Binding transaction from ``p`` to ``server`` run to its end, as a ServerAnswer."""
    tx = p.binding(server, **kwargs)
    return outcome_from_transaction(server, server, tx).answer


def rfc5780_discovery(p: SimPeer, servers: Sequence[Address]) -> DiscoveryResult:
    """The core's :class:`~p2plab.core.discovery.Rfc5780Discovery` on ``p``: each phase's
    Binding requests start together, and virtual time runs until all of them ended.

    No hairpin test: a :class:`SimPeer` does not tell its own echoed request from junk.
    """
    discovery = Rfc5780Discovery(servers, local_towards=lambda _: p.local_address, hairpin=False)
    while not discovery.done:
        for test, outcome in _run_phase(p, discovery.next_tests()):
            discovery.receive(test, outcome)
    return discovery.result()


def _run_phase(p: SimPeer, tests: list[BindingTest]) -> list[tuple[BindingTest, BindingOutcome]]:
    started = []
    for test in tests:
        target = test.target or test.server
        tx = p.stun_request(target, change_ip=test.change_ip, change_port=test.change_port)
        started.append((test, target, tx))
    p.sim.run_until(p.sim.now + _PHASE_LIMIT, stop=lambda: all(tx.done for _, _, tx in started))
    return [
        (
            test,
            outcome_from_transaction(
                test.server, target, tx, p.stun_sources.get(tx.transaction_id)
            ),
        )
        for test, target, tx in started
    ]


def classic_probe(p: SimPeer, server: Address, other: Address) -> str:
    """The RFC 3489 section 10.1 test sequence as pystun3 runs it; returns pystun3's words
    (``"Restric Port NAT"``, ...).  ``other`` is used when the server names no other address.

    pystun3's own procedure, on purpose a second one beside :func:`rfc5780_discovery`: the
    workers run the pystun3 library itself, and this imitates it.
    """
    t1 = binding_answer(p, server)
    if not t1.ok or t1.mapped is None:
        return "Blocked"
    changed = t1.other_address or other
    t2 = p.binding(server, change_ip=True, change_port=True)
    if t1.mapped == p.local_address:
        ok = t2.state is TransactionState.SUCCEEDED
        return "Open Internet" if ok else "Symmetric UDP Firewall"
    if t2.state is TransactionState.SUCCEEDED:
        return "Full Cone"
    t1b = binding_answer(p, changed)
    if not t1b.ok:
        return "Meet an error, when do Test1 on Changed IP and Port"
    if t1b.mapped != t1.mapped:
        return "Symmetric NAT"
    t3 = p.binding(server, change_port=True)
    return "Restric NAT" if t3.state is TransactionState.SUCCEEDED else "Restric Port NAT"
