"""STUN probing in the simulator: RFC 5780 behaviour discovery and the RFC 3489 classic sequence.

Each procedure runs on one :class:`~p2plab.lab.sim.peer.SimPeer` (a fresh socket the caller
opens and closes) against the simulated STUN server; virtual time passes while it runs.
"""

from __future__ import annotations

from p2plab.core.nat import (
    BehaviorTests,
    NatReport,
    ServerAnswer,
    classic_from_behavior,
    classic_name,
    derive_behavior,
)
from p2plab.core.stun import StunTransaction, TransactionState
from p2plab.lab.sim.peer import SimPeer
from p2plab.lab.simnet import Address

__all__ = ["classic_probe", "nat_report", "rfc5780_tests", "server_answer"]


def server_answer(server: Address, tx: StunTransaction) -> ServerAnswer:
    """What one finished Binding transaction to ``server`` says, as :class:`ServerAnswer`."""
    if tx.state is not TransactionState.SUCCEEDED or tx.response is None:
        return ServerAnswer(server=server, ok=False, attempts=tx.attempts, error=tx.state.value)
    attrs = tx.response.attributes
    mapped = attrs.get("XOR-MAPPED-ADDRESS") or attrs.get("MAPPED-ADDRESS")
    other = attrs.get("OTHER-ADDRESS")
    return ServerAnswer(
        server=server,
        ok=True,
        rtt_s=tx.rtt,
        mapped=None if mapped is None else (str(mapped[0]), int(mapped[1])),
        attempts=tx.attempts,
        other_address=None if other is None else (str(other[0]), int(other[1])),
        software=attrs.get("SOFTWARE"),
        resolved=server,
    )


def classic_probe(p: SimPeer, server: Address, other: Address) -> str:
    """The RFC 3489 section 10.1 test sequence as pystun3 runs it; returns pystun3's words
    (``"Restric Port NAT"``, ...).  ``other`` is used when the server names no other address."""
    t1 = server_answer(server, p.binding(server))
    if not t1.ok or t1.mapped is None:
        return "Blocked"
    changed = t1.other_address or other
    t2 = p.binding(server, change_ip=True, change_port=True)
    if t1.mapped == p.local_address:
        ok = t2.state is TransactionState.SUCCEEDED
        return "Open Internet" if ok else "Symmetric UDP Firewall"
    if t2.state is TransactionState.SUCCEEDED:
        return "Full Cone"
    t1b = server_answer(changed, p.binding(changed))
    if not t1b.ok:
        return "Meet an error, when do Test1 on Changed IP and Port"
    if t1b.mapped != t1.mapped:
        return "Symmetric NAT"
    t3 = p.binding(server, change_port=True)
    return "Restric NAT" if t3.state is TransactionState.SUCCEEDED else "Restric Port NAT"


def rfc5780_tests(
    p: SimPeer, server: Address, other: Address
) -> tuple[ServerAnswer, Address, BehaviorTests | None]:
    """RFC 5780 behaviour discovery on ``p``: the first answer, the server's other address
    (``other`` when it names none) and the tests (None when the server did not answer).

    Filtering tests (section 4.4) run first, then the mapping tests (section 4.3) on the same
    socket, which is what makes a leaky NAT show its remapping.
    """
    t1 = p.binding(server)
    answer = server_answer(server, t1)
    if not answer.ok or answer.mapped is None:
        return answer, other, None
    other = answer.other_address or other
    f2 = p.binding(server, change_ip=True, change_port=True).state
    filter2 = f2 is TransactionState.SUCCEEDED
    filter3: bool | None = None
    if not filter2:
        filter3 = p.binding(server, change_port=True).state is TransactionState.SUCCEEDED
    mapped2 = mapped3 = None
    if answer.mapped != p.local_address:
        mapped2 = server_answer((other[0], server[1]), p.binding((other[0], server[1]))).mapped
        if mapped2 is not None and mapped2 != answer.mapped:
            mapped3 = server_answer(other, p.binding(other)).mapped
    tests = BehaviorTests(
        local=p.local_address,
        mapped1=answer.mapped,
        mapped2=mapped2,
        mapped3=mapped3,
        filter2=filter2,
        filter3=filter3,
    )
    return answer, other, tests


def nat_report(
    answer: ServerAnswer, other: Address, tests: BehaviorTests, classic_raw: str | None
) -> NatReport:
    """The :class:`NatReport` of finished RFC 5780 tests (and pystun3's words, when run)."""
    mapping, filtering, behind = derive_behavior(tests)
    return NatReport(
        mapped=answer.mapped,
        local=tests.local,
        mapping=mapping,
        filtering=filtering,
        classic=classic_name(classic_raw),
        classic_raw=classic_raw,
        classic_rfc5780=classic_from_behavior(mapping, filtering, behind),
        behind_nat=behind,
        servers=(answer,),
        other_address=other,
        notes=(),
    )
