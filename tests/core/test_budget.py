"""Probe budget and anti-amplification (issue 14, findings 11 and 17), tried as an attacker would.

Counts, never times: how many probes went out, to how many addresses, how many bytes to an
address nobody validated.  The in-memory network (``tests/core_sim.py``) runs on a fake clock.
"""

from __future__ import annotations

import random

import pytest

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.crypto import Identity, PeerCipher
from p2plab.core.session import PeerSession
from p2plab.core.wire import Chat, Keepalive, MessageType, Probe, Sealer, datagram_type
from p2plab.errors import ConfigError
from tests.core_sim import Network, Node, pair

A_LOCAL = ("198.18.0.1", 40000)
B_LOCAL = ("198.18.0.2", 40000)
SPOOFED = ("203.0.113.66", 7)  # the victim of a reflection: it never sent anything


def _run_alone(session: PeerSession, now: float) -> list[tuple[bytes, tuple[str, int]]]:
    """Drive one session with nobody answering until it gives up; everything it sent."""
    sent: list[tuple[bytes, tuple[str, int]]] = []
    while session.state == "punching":
        when = session.get_timer()
        assert when is not None
        now = max(now, when)
        session.handle_timer(now)
        sent += session.datagrams_to_send(now)
    return sent


def _lone(candidates: list[tuple[str, int]], role: str = "controlling") -> PeerSession:
    return PeerSession(
        "bob",
        "alice",
        role,  # type: ignore[arg-type]
        candidates,
        SessionConfig(),
        1000.0,
        random.Random(1).randbytes,
    )


# -- finding 11: the probe budget --------------------------------------------------------------


def test_an_offer_of_17_attacker_addresses_gets_at_most_the_budget() -> None:
    """Before: 238 probes to 17 addresses for one pairing.  Now 9 addresses, 10 probes each."""
    attacker = [(f"198.51.100.{i}", 9000 + i) for i in range(17)]
    s = _lone(attacker)
    sent = _run_alone(s, 1000.0)
    probes = [(d, a) for d, a in sent if datagram_type(d) == MessageType.PROBE]
    targets = {a for _, a in probes}
    assert len(targets) == 9  # SessionConfig.max_candidates: public endpoint + 8 local
    assert targets == set(attacker[:9])  # the checklist's order: the offer's first ones
    assert len(probes) <= 9 * 10  # probes_per_candidate
    assert all(sum(1 for _, a in probes if a == t) <= 10 for t in targets)
    assert s.stats.get("candidates_dropped") == 8
    assert s.stats["probes_sent"] == len(probes)


def test_probes_from_the_peer_cannot_drive_us_past_the_attempt_budget() -> None:
    """Each probe of the peer triggers a check of its address; 300 of them buy at most 100."""
    x = ("198.51.100.7", 5555)
    s = _lone([x], role="controlled")
    now = 1000.0
    out: list[tuple[bytes, tuple[str, int]]] = []
    for i in range(300):
        now += 0.001
        probe = Probe("alice", "bob", nonce=i.to_bytes(8, "big"), nominate=False, target=B_LOCAL)
        s.receive_datagram(bytes(probe), x, now)
        out += s.datagrams_to_send(now)
    probes = [d for d, _ in out if datagram_type(d) == MessageType.PROBE]
    assert len(probes) <= 100  # SessionConfig.probe_budget
    assert s.stats.get("probe_budget_exhausted", 0) > 0
    # every probe was still answered: acks are replies to the peer, one for one
    assert sum(1 for d, _ in out if datagram_type(d) == MessageType.PROBE_ACK) == 300


def test_probes_from_many_sources_teach_at_most_four_addresses() -> None:
    """Peer-reflexive learning is capped while punching; the rest is dropped and counted."""
    s = _lone([], role="controlled")
    now = 1000.0
    out: list[tuple[bytes, tuple[str, int]]] = []
    sources = [(f"198.51.100.{i}", 7000 + i) for i in range(20)]
    for i, src in enumerate(sources):
        now += 0.001
        probe = Probe("alice", "bob", nonce=i.to_bytes(8, "big"), nominate=False, target=B_LOCAL)
        s.receive_datagram(bytes(probe), src, now)
        out += s.datagrams_to_send(now)
    assert s.candidates == sources[:4]
    assert s.stats["prflx_learned"] == 4
    assert s.stats.get("candidates_dropped") == 16
    probed = {a for d, a in out if datagram_type(d) == MessageType.PROBE}
    assert probed == set(sources[:4])


def _node(net: Network, name: str, me: str, peer: str, role: str, local: tuple[str, int]) -> Node:
    other = B_LOCAL if local == A_LOCAL else A_LOCAL
    return net.add(name, local_id=me, peer_id=peer, role=role, local=local, candidates=[other])


@pytest.mark.parametrize("early_role", ["controlling", "controlled"])
def test_a_peer_starting_after_our_scheduled_probes_ran_out_still_connects(
    early_role: str,
) -> None:
    """The early side spent its 10 probes (~5 s); triggered checks answer the late side."""
    late_role = "controlled" if early_role == "controlling" else "controlling"
    net = Network(seed=11)
    a = _node(net, "a", "alice", "bob", early_role, A_LOCAL)
    net.run_for(7.0)
    assert a.session.stats["probes_sent"] == 10  # probes_per_candidate: spent, nobody there
    assert a.session.get_timer() == pytest.approx(net.now + 3.0)  # only the punch timeout left
    b = _node(net, "b", "bob", "alice", late_role, B_LOCAL)
    assert net.run_until(lambda: a.session.state == b.session.state == "connected", timeout=2.9)
    assert a.session.peer_address == B_LOCAL and b.session.peer_address == A_LOCAL


# -- finding 17: 3x to an unvalidated address ---------------------------------------------------


def _sealed_pair(seed: int) -> tuple[Network, Node, Node]:
    net = Network(seed=seed)
    ia, ib = Identity.generate(net.rand_bytes), Identity.generate(net.rand_bytes)
    ca = PeerCipher(ia, "alice", "bob", ib.public_bytes, net.rand_bytes)
    cb = PeerCipher(ib, "bob", "alice", ia.public_bytes, net.rand_bytes)
    a = _add_sealed(net, "a", "alice", "bob", "controlling", A_LOCAL, B_LOCAL, ca)
    b = _add_sealed(net, "b", "bob", "alice", "controlled", B_LOCAL, A_LOCAL, cb)
    return net, a, b


def _add_sealed(
    net: Network,
    name: str,
    me: str,
    peer: str,
    role: str,
    local: tuple[str, int],
    other: tuple[str, int],
    sealer: Sealer | None,
) -> Node:
    session = PeerSession(
        me,
        peer,
        role,  # type: ignore[arg-type]
        [other],
        SessionConfig(),
        net.now,
        net.rand_bytes,
        sealer=sealer,
    )
    node = Node(name, session, local)
    net.nodes[name] = node
    net._by_addr[local] = node
    return node


def _capture_keepalive(net: Network, sender: Node) -> bytes:
    """The sender's next keep-alive, taken off the wire before it arrives (the attacker's copy)."""

    def steal(node: Node, dest: object, data: bytes) -> bool:
        return node is sender and datagram_type(data) == MessageType.KEEPALIVE

    net.drop = steal
    mark = len(sender.sent)
    assert net.run_until(
        lambda: any(datagram_type(d) == MessageType.KEEPALIVE for _, d, _ in sender.sent[mark:]),
        timeout=20,
    )
    net.drop = None
    return next(d for _, d, _ in sender.sent[mark:] if datagram_type(d) == MessageType.KEEPALIVE)


@pytest.mark.parametrize("sealed", [True, False])
def test_a_keepalive_replayed_first_from_a_spoofed_address_buys_at_most_3x(sealed: bool) -> None:
    """Before: 10 probes, 780 B, went to the spoofed address for one 66-byte keep-alive."""
    if sealed:
        net, a, b = _sealed_pair(seed=3)
    else:
        net = Network(seed=3)
        a, b = pair(net)
    assert net.run_until(lambda: a.session.state == b.session.state == "connected", 5)
    net.run_for(1.0)
    keepalive = _capture_keepalive(net, b)
    mark = len(a.sent)
    net.inject(a, keepalive, SPOOFED)  # it authenticates: it is b's, and new
    net.run_for(20.0)
    to_victim = [d for _, d, dest in a.sent[mark:] if dest == SPOOFED]
    assert to_victim, "the path check itself is not suppressed"
    assert sum(len(d) for d in to_victim) <= 3 * len(keepalive)
    assert a.session.stats.get("amplification_limited", 0) > 0
    # the real link is untouched
    assert a.session.peer_address == b.source and a.session.state == "connected"
    a.session.send_chat("still here", net.now)
    assert net.run_until(lambda: any(isinstance(e, ev.ChatReceived) for e in b.events), 5)


def test_unauthenticated_datagrams_buy_no_credit() -> None:
    """Forged datagrams from a spoofed address never make the worker send there."""
    net, a, b = _sealed_pair(seed=4)
    assert net.run_until(lambda: a.session.state == b.session.state == "connected", 5)
    mark = len(a.sent)
    forged = bytes(Keepalive("bob", "alice", seq=1, timestamp=0.0))  # no seal
    junk = bytes(Chat("bob", "alice", seq=0, msg_id="x", sent_at=0.0, text="x"))
    for _ in range(50):
        net.inject(a, forged, SPOOFED)
        net.inject(a, junk, SPOOFED)
    net.run_for(5.0)
    assert [d for _, d, dest in a.sent[mark:] if dest == SPOOFED] == []


def test_sealed_nat_rebinding_still_moves_the_path_within_the_limit() -> None:
    """A real rebinding: the peer keeps sending from its new address, which buys the probes
    that validate it; once validated, the path moves and nothing is limited there."""
    net, a, b = _sealed_pair(seed=5)
    assert net.run_until(lambda: a.session.state == b.session.state == "connected", 5)
    net.run_for(1.0)
    new = ("198.51.100.2", 40123)
    b.public = new
    net._by_addr[new] = b
    assert net.run_until(lambda: a.session.peer_address == new, timeout=15)
    assert [e for e in a.events if isinstance(e, ev.PathChanged)] == [
        ev.PathChanged(new, B_LOCAL, previous_path="direct")
    ]
    limited = a.session.stats.get("amplification_limited")
    for i in range(20):
        a.session.send_chat(f"m{i}", net.now)
    assert net.run_until(
        lambda: sum(isinstance(e, ev.ChatDelivered) for e in a.events) == 20, timeout=10
    )
    assert a.session.stats.get("amplification_limited") == limited  # validated: no limit now


@pytest.mark.parametrize(
    "field",
    [
        "max_candidates",
        "max_prflx_candidates",
        "probes_per_candidate",
        "probe_budget",
        "amplification_factor",
    ],
)
def test_budget_settings_must_be_positive(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SessionConfig(**{field: 0})
