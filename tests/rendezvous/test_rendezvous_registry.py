"""The pure pairing rules of the rendezvous, in memory."""

from __future__ import annotations

import os

from p2plab.core.crypto import Identity
from p2plab.core.signaling import (
    Candidate,
    NatHint,
    P2PConnectionOffer,
    PeerDisconnected,
    PortMapping,
    Registered,
)
from rendezvous_service_code.registry import (
    CLOSE_REPLACED,
    Action,
    CloseConnection,
    Registry,
    SendMessage,
    build_candidates,
)


def offers(actions: list[Action]) -> dict[str, P2PConnectionOffer]:
    out = {}
    for a in actions:
        if isinstance(a, SendMessage) and isinstance(a.message, P2PConnectionOffer):
            assert a.worker_id not in out
            out[a.worker_id] = a.message
    return out


#: Registered keys are real X25519 public keys (an offer refuses anything else).
KEYS = {name: Identity.generate(os.urandom).public_b64 for name in ("KA", "KB", "K1", "K2")}


def join(reg: Registry, wid: str, port: int, room: str = "default", key: str | None = None):
    first = reg.register(wid, f"c-{wid}", room=room, now=float(port), public_key=key)
    assert [type(a.message) for a in first if isinstance(a, SendMessage)] == [Registered]
    return reg.update_udp_endpoint(
        wid, f"c-{wid}", "203.0.113.1", port, [Candidate(ip="198.18.0.1", port=port)]
    )


def test_two_workers_pair_with_roles_candidates_and_keys() -> None:
    reg = Registry()
    assert join(reg, "a", 1000, key=KEYS["KA"]) == []
    assert reg.waiting("default") == "a"
    got = offers(join(reg, "b", 2000, key=KEYS["KB"]))
    assert set(got) == {"a", "b"}
    assert got["a"].peer_worker_id == "b" and got["a"].role == "controlling"
    assert got["b"].peer_worker_id == "a" and got["b"].role == "controlled"
    assert (got["a"].peer_udp_ip, got["a"].peer_udp_port) == ("203.0.113.1", 2000)
    assert [(c.ip, c.port) for c in got["b"].peer_candidates] == [
        ("203.0.113.1", 1000),
        ("198.18.0.1", 1000),
    ]
    assert got["a"].peer_public_key == KEYS["KB"] and got["b"].peer_public_key == KEYS["KA"]
    assert reg.get("a").paired_with == "b" and reg.get("b").paired_with == "a"  # type: ignore[union-attr]


def test_controlling_is_the_first_registered_even_if_it_reports_last() -> None:
    reg = Registry()
    reg.register("early", "c1", now=1.0)
    reg.register("late", "c2", now=2.0)
    assert reg.update_udp_endpoint("late", "c2", "203.0.113.2", 5, []) == []
    got = offers(reg.update_udp_endpoint("early", "c1", "203.0.113.1", 6, []))
    assert got["early"].role == "controlling" and got["late"].role == "controlled"


def test_worker_without_endpoint_is_not_paired() -> None:
    reg = Registry()
    reg.register("a", "ca", now=0)
    join(reg, "b", 1)
    assert reg.get("a").paired_with is None  # type: ignore[union-attr]
    assert reg.waiting("default") == "b"


def test_candidates_are_deduplicated_public_first() -> None:
    cands = build_candidates(
        "203.0.113.9",
        9,
        [Candidate(ip="203.0.113.9", port=9), Candidate(ip="10.0.0.1", port=9)] * 2,
    )
    assert [(c.ip, c.port) for c in cands] == [("203.0.113.9", 9), ("10.0.0.1", 9)]


def test_third_waits_then_pairs_with_the_orphan() -> None:
    reg = Registry()
    join(reg, "a", 1)
    join(reg, "b", 2)
    assert join(reg, "c", 3) == []
    assert reg.waiting("default") == "c"
    actions = reg.unregister("b", "c-b")
    assert SendMessage("a", "c-a", PeerDisconnected(peer_worker_id="b")) in actions
    got = offers(actions)
    assert got["a"].peer_worker_id == "c" and got["c"].peer_worker_id == "a"
    assert got["a"].role == "controlling"
    assert reg.waiting("default") is None
    assert "b" not in reg


def test_orphan_without_anyone_waiting_waits() -> None:
    reg = Registry()
    join(reg, "a", 1)
    join(reg, "b", 2)
    actions = reg.unregister("a", "c-a")
    assert actions == [SendMessage("b", "c-b", PeerDisconnected(peer_worker_id="a"))]
    assert reg.waiting("default") == "b"
    assert offers(join(reg, "d", 4)).keys() == {"b", "d"}


def test_rooms_are_isolated() -> None:
    reg = Registry()
    assert join(reg, "a", 1, room="r1") == []
    assert join(reg, "b", 2, room="r2") == []
    assert offers(join(reg, "c", 3, room="r1")).keys() == {"a", "c"}
    assert reg.get("b").paired_with is None  # type: ignore[union-attr]


def test_endpoint_update_while_paired_does_not_repair() -> None:
    reg = Registry()
    join(reg, "a", 1)
    join(reg, "b", 2)
    join(reg, "c", 3)
    assert reg.update_udp_endpoint("a", "c-a", "203.0.113.7", 77, []) == []
    rec = reg.get("a")
    assert rec is not None and (rec.udp_ip, rec.udp_port) == ("203.0.113.7", 77)
    assert rec.paired_with == "b"
    assert reg.waiting("default") == "c"


def test_a_new_mapping_while_paired_is_offered_to_the_peer_only() -> None:
    reg = Registry()
    join(reg, "a", 1)
    join(reg, "b", 2)
    mapping = PortMapping(protocol="nat-pmp", ip="203.0.113.7", port=41000, lifetime_s=60)
    actions = reg.update_udp_endpoint("b", "c-b", "203.0.113.7", 2, [], mapped=mapping)
    assert len(actions) == 1
    sent = actions[0]
    assert isinstance(sent, SendMessage) and sent.worker_id == "a"
    assert isinstance(sent.message, P2PConnectionOffer)
    assert sent.message.peer_mapped == mapping and sent.message.role == "controlling"
    # the same again: nothing new to tell
    assert reg.update_udp_endpoint("b", "c-b", "203.0.113.7", 2, [], mapped=mapping) == []


def test_reregister_replaces_the_old_connection() -> None:
    reg = Registry()
    join(reg, "a", 1)
    join(reg, "b", 2)
    actions = reg.register("a", "new", now=5.0)
    assert actions[0] == CloseConnection("a", "c-a", CLOSE_REPLACED, actions[0].reason)  # type: ignore[union-attr]
    assert SendMessage("b", "c-b", PeerDisconnected(peer_worker_id="a")) in actions
    assert reg.get("a").conn_id == "new"  # type: ignore[union-attr]
    # the old connection's handler ending later must not remove the new registration
    assert reg.unregister("a", "c-a") == []
    assert "a" in reg
    # stale connection cannot update the endpoint either
    assert reg.update_udp_endpoint("a", "c-a", "203.0.113.1", 1, []) == []
    got = offers(reg.update_udp_endpoint("a", "new", "203.0.113.1", 11, []))
    assert got["b"].peer_worker_id == "a" and got["b"].peer_udp_port == 11
    assert got["b"].role == "controlling"  # b is now the earlier registration


def test_no_worker_is_ever_in_two_pairs() -> None:
    reg = Registry()
    for i in range(9):
        join(reg, f"w{i}", i + 1)
    for i in (1, 4, 8):
        reg.unregister(f"w{i}", f"c-w{i}")
    partners = {w.worker_id: w.paired_with for w in reg.workers()}
    for wid, peer in partners.items():
        if peer is not None:
            assert partners[peer] == wid
    assert sum(1 for p in partners.values() if p is None) <= 1


def test_list_view_has_contract_fields() -> None:
    reg = Registry()
    join(reg, "a", 1)
    view = reg.workers()[0].to_public_dict()
    for key in (
        "worker_id",
        "room",
        "ws_observed_ip",
        "ws_observed_port",
        "http_public_ip",
        "udp_ip",
        "udp_port",
        "paired_with",
        "registered_at",
    ):
        assert key in view


def test_only_workers_of_the_same_encryption_mode_are_paired() -> None:
    reg = Registry()
    assert join(reg, "enc1", 1000, key=KEYS["K1"]) == []
    assert join(reg, "plain1", 2000) == []  # would refuse enc1's offer (and enc1 its)
    assert reg.waiting("default", encrypting=True) == "enc1"
    assert reg.waiting("default", encrypting=False) == "plain1"
    assert set(offers(join(reg, "enc2", 3000, key=KEYS["K2"]))) == {"enc1", "enc2"}
    assert set(offers(join(reg, "plain2", 4000))) == {"plain1", "plain2"}
    assert reg.waiting("default") is None


HARD = NatHint(mapping="endpoint-dependent", sequential=True, predicted_ports=[40001, 40002])


def test_a_workers_nat_hint_reaches_its_peers_offer_and_the_listing() -> None:
    reg = Registry()
    reg.register("a", "c-a", now=1.0)
    reg.register("b", "c-b", now=2.0)
    assert reg.update_udp_endpoint("a", "c-a", "203.0.113.1", 1, [], HARD) == []
    got = offers(reg.update_udp_endpoint("b", "c-b", "203.0.113.2", 2, []))
    assert got["b"].peer_nat == HARD  # b learns of a's NAT
    assert got["a"].peer_nat is None  # b reported none: unknown, plain punching
    listed = {w.worker_id: w.to_public_dict()["nat"] for w in reg.workers()}
    assert listed == {"a": HARD.model_dump(), "b": None}
    # the hint describes the endpoint it came with: a later update without one clears it
    reg.update_udp_endpoint("a", "c-a", "203.0.113.1", 3, [])
    assert reg.get("a").nat is None  # type: ignore[union-attr]


def test_a_re_paired_worker_gets_the_new_peers_hint() -> None:
    reg = Registry()
    easy = NatHint(mapping="endpoint-independent")
    reg.register("a", "c-a", now=1.0)
    reg.register("b", "c-b", now=2.0)
    reg.register("c", "c-c", now=3.0)
    reg.update_udp_endpoint("a", "c-a", "203.0.113.1", 1, [], easy)
    reg.update_udp_endpoint("b", "c-b", "203.0.113.2", 2, [], HARD)
    reg.update_udp_endpoint("c", "c-c", "203.0.113.3", 3, [], easy)  # waits
    got = offers(reg.unregister("b", "c-b"))
    assert got["a"].peer_nat == easy and got["c"].peer_nat == easy
