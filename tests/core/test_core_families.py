"""Port mappings and IPv6 in the link engine (issues 18 and 19), in memory on a fake clock:
the candidate ranking, happy eyeballs, ``method`` port-mapping on both sides, ``family``, a
link moving between families, and hostile mapped endpoints."""

from __future__ import annotations

import json

import pytest

from p2plab.config import BirthdayConfig, SessionConfig
from p2plab.core import events as ev
from p2plab.core.link import LinkConfig
from p2plab.core.link_trust import offer_candidates
from p2plab.core.paths import HAPPY_EYEBALLS_DELAY, address_family, turn_address
from p2plab.core.signaling import (
    BadMessage,
    Candidate,
    NatHint,
    P2PConnectionOffer,
    PortMapping,
    dump_message,
    parse_rendezvous_message,
)
from tests.core.dual_world import DNode, DualWorld

FAST = SessionConfig(keepalive_interval=0.2, peer_timeout=2.0, punch_timeout=3.0)
DIRECT_ONLY = LinkConfig(session=FAST, relay=False, turn=False, repunch=False)
HARD = NatHint(mapping="endpoint-dependent")


def connected(w: DualWorld, *nodes: DNode) -> bool:
    return all(n.engine.state == "connected" for n in nodes)


def first_probe(w: DualWorld, node: str, family: str) -> float:
    return min(s.at for s in w.sent if s.node == node and address_family(s.dst) == family)


# -- ranking ---------------------------------------------------------------------------------


def test_offer_candidates_rank_ipv6_then_mapping_then_stun_then_ipv4_lan() -> None:
    offer = P2PConnectionOffer(
        peer_worker_id="b",
        peer_udp_ip="198.51.100.2",
        peer_udp_port=6000,
        peer_candidates=[
            Candidate(ip="198.51.100.2", port=6000),
            Candidate(ip="10.0.0.2", port=6000),
            Candidate(ip="2001:db8:2::2", port=6000),
        ],
        peer_mapped=PortMapping(protocol="pcp", ip="198.51.100.2", port=41000, lifetime_s=60),
        peer_udp6=Candidate(ip="2001:db8:2::9", port=6001),
    )
    cands, refused = offer_candidates(offer)
    assert refused == 0
    assert cands == [
        ("2001:db8:2::9", 6001),  # IPv6 STUN endpoint
        ("2001:db8:2::2", 6000),  # IPv6 host
        ("198.51.100.2", 41000),  # the NAT's port mapping
        ("198.51.100.2", 6000),  # IPv4 STUN endpoint
        ("10.0.0.2", 6000),  # IPv4 LAN
    ]


def test_address_family_of_real_and_pseudo_addresses() -> None:
    assert address_family(("2001:db8::1", 1)) == "ipv6"
    assert address_family(("198.51.100.1", 1)) == "ipv4"
    assert address_family(turn_address(("2001:db8::1", 1), "udp")) == "ipv6"
    assert address_family(("relay", 1)) is None
    assert address_family(("host.example", 1)) is None


# -- port mapping ----------------------------------------------------------------------------


def test_mapped_endpoint_alone_connects_with_method_port_mapping_on_both_sides() -> None:
    w = DualWorld()
    a = w.add("a", "hard", DIRECT_ONLY)  # symmetric NAT that maps a port on request
    b = w.add("b", "hard", DIRECT_ONLY)  # symmetric NAT
    w.map_port(a, 41000)
    assert a.reported is not None and a.reported.mapped is not None
    w.pair(a, b)
    w.run(2.0)
    assert connected(w, a, b)
    assert a.engine.method == b.engine.method == "port-mapping"
    assert a.engine.family == b.engine.family == "ipv4"
    # b reached a's mapping (the sending side); a was reached through it (the peer's probes
    # were sent to its mapped endpoint)
    assert b.engine.peer_address == a.mapped
    assert a.engine.session is not None
    assert a.engine.session.probe_target(a.engine.peer_address) == a.mapped
    # the mapping was the only way: nothing sent to the STUN endpoints got through
    stun_a = (a.reported.udp_ip, a.reported.udp_port)
    assert not any(s.delivered for s in w.sent if s.dst == stun_a)


def test_without_the_mapping_the_same_pair_does_not_connect() -> None:
    w = DualWorld()
    a = w.add("a", "hard", DIRECT_ONLY)
    b = w.add("b", "hard", DIRECT_ONLY)
    w.pair(a, b)
    w.run(2.0)
    assert not connected(w, a, b) and a.engine.method is None


def test_a_mapping_skips_birthday_and_the_relay_for_two_hard_nats() -> None:
    # Two hard hints would plan a relay at once (or a socket pool): a mapping opens a port to
    # anyone, so both sides punch plainly and connect directly.
    cfg = LinkConfig(session=FAST, turn=False, birthday=BirthdayConfig(hard_budget=0))
    w = DualWorld()
    a = w.add("a", "hard", cfg)
    b = w.add("b", "hard", cfg)
    for n in (a, b):
        n.engine.nat_hint = HARD  # as discovery would have reported it
    w.map_port(a, 41000)
    w.pair(a, b)
    w.run(2.0)
    assert connected(w, a, b) and a.engine.method == b.engine.method == "port-mapping"
    assert a.engine.stats["relay_switches"] == b.engine.stats["relay_switches"] == 0
    assert a.engine.pool_size == b.engine.pool_size == 0


# -- IPv6 and happy eyeballs -----------------------------------------------------------------


def test_ipv6_is_ranked_above_ipv4_and_ipv4_waits_250_ms() -> None:
    w = DualWorld()
    a = w.add("a", "easy", DIRECT_ONLY, v6="2001:db8:1::2", firewall="apdf")
    b = w.add("b", "easy", DIRECT_ONLY, v6="2001:db8:2::2", firewall="apdf")
    start = w.now
    w.pair(a, b)
    w.run(2.0)
    assert connected(w, a, b)
    assert a.engine.family == b.engine.family == "ipv6"
    assert a.engine.method == b.engine.method == "direct"
    for n in ("a", "b"):
        assert first_probe(w, n, "ipv6") == start
    # IPv6 validated within the happy-eyeballs delay: IPv4 was never needed, never probed
    assert not any(address_family(s.dst) == "ipv4" for s in w.sent if s.at >= start)


def test_without_ipv6_targets_ipv4_starts_at_once() -> None:
    w = DualWorld()
    a = w.add("a", "easy", DIRECT_ONLY, v6="2001:db8:1::2")
    b = w.add("b", "easy", DIRECT_ONLY)  # IPv4 only: a has no IPv6 target
    start = w.now
    w.pair(a, b)
    w.run(2.0)
    assert connected(w, a, b) and a.engine.family == "ipv4"
    assert first_probe(w, "a", "ipv4") == start
    assert not any(address_family(s.dst) == "ipv6" for s in w.sent if s.node == "a")


def test_broken_ipv6_costs_ipv4_only_the_happy_eyeballs_delay() -> None:
    w = DualWorld()
    a = w.add("a", "easy", DIRECT_ONLY, v6="2001:db8:1::2", firewall="closed")
    b = w.add("b", "easy", DIRECT_ONLY, v6="2001:db8:2::2", firewall="closed")
    start = w.now
    w.pair(a, b)
    w.run(0.5)
    assert connected(w, a, b) and a.engine.family == b.engine.family == "ipv4"
    for n in ("a", "b"):
        assert first_probe(w, n, "ipv6") == start
        assert first_probe(w, n, "ipv4") == pytest.approx(start + HAPPY_EYEBALLS_DELAY)


def test_symmetric_ipv4_with_ipv6_on_both_sides_goes_direct_over_ipv6() -> None:
    # natlab's symmetric/v6-apdf: IPv4 would need a relay, IPv6 punches (both sides send).
    cfg = LinkConfig(session=FAST, turn=False, birthday=BirthdayConfig(hard_budget=0))
    w = DualWorld()
    a = w.add("a", "hard", cfg, v6="2001:db8:1::2", firewall="apdf")
    b = w.add("b", "hard", cfg, v6="2001:db8:2::2", firewall="apdf")
    for n in (a, b):
        n.engine.nat_hint = HARD
    w.pair(a, b)
    w.run(2.0)
    assert connected(w, a, b) and a.engine.family == b.engine.family == "ipv6"
    assert a.engine.path == "direct" and a.engine.stats["relay_switches"] == 0


def test_link_moves_from_ipv4_to_ipv6_when_ipv6_starts_working() -> None:
    w = DualWorld()
    a = w.add("a", "easy", DIRECT_ONLY, v6="2001:db8:1::2", firewall="closed")
    b = w.add("b", "easy", DIRECT_ONLY, v6="2001:db8:2::2", firewall="closed")
    w.pair(a, b)
    w.run(1.0)
    assert connected(w, a, b) and a.engine.family == "ipv4"
    a.firewall = b.firewall = "apdf"  # the firewalls now let punched IPv6 through
    w.run(FAST.upgrade_interval + 1.0)
    assert connected(w, a, b)
    assert a.engine.family == b.engine.family == "ipv6"
    for n in (a, b):
        moves = [e for e in n.of(ev.PathChanged) if isinstance(e, ev.PathChanged)]
        assert moves, n.name
        last = moves[-1]
        assert address_family(last.previous) == "ipv4" and address_family(last.address) == "ipv6"
        assert last.path == last.previous_path == "direct"
    msg_id = a.engine.send_chat("over v6", w.now)
    w.run(0.5)
    assert any(isinstance(e, ev.ChatReceived) and e.text == "over v6" for e in b.events), msg_id


# -- hostile offers --------------------------------------------------------------------------


def test_a_mapped_endpoint_that_is_not_an_ip_literal_is_refused() -> None:
    offer = P2PConnectionOffer(
        peer_worker_id="b",
        peer_udp_ip="198.51.100.2",
        peer_udp_port=6000,
        peer_mapped=PortMapping(protocol="upnp", ip="198.51.100.2", port=41000, lifetime_s=60),
    )
    raw = json.loads(dump_message(offer))
    for bad in ("gateway.example", "fe80::1%eth0", "198.51.100.2:80"):
        raw["peer_mapped"]["ip"] = bad
        with pytest.raises(BadMessage):
            parse_rendezvous_message(json.dumps(raw))
    # An offer that skipped validation (defence in depth): the engine never sends there.
    w = DualWorld()
    a = w.add("a", "easy", DIRECT_ONLY)
    b = w.add("b", "easy", DIRECT_ONLY)
    assert b.reported is not None
    evil = P2PConnectionOffer.model_construct(
        **{
            **w.offer_for(b, "controlling").__dict__,
            "peer_mapped": PortMapping.model_construct(
                protocol="upnp", ip="evil.example", port=41000, lifetime_s=60
            ),
            "peer_udp6": Candidate.model_construct(ip="fe80::1%eth0", port=5000),
        }
    )
    a.engine.receive_rendezvous(evil, w.now)
    w.flush()
    assert a.engine.stats["candidates_refused"] == 2
    assert a.engine.state == "punching"
    assert not any(s.dst[0] in ("evil.example", "fe80::1%eth0") for s in w.sent)


def test_link_falls_back_from_ipv6_to_ipv4_without_losing_the_peer_and_comes_back() -> None:
    cfg = SessionConfig(
        keepalive_interval=0.2,
        peer_timeout=2.0,
        punch_timeout=3.0,
        warm_interval=0.5,
        upgrade_interval=1.0,
    )
    link = LinkConfig(session=cfg, relay=False, turn=False, repunch=False)
    w = DualWorld()
    a = w.add("a", "easy", link, v6="2001:db8:1::2", firewall="apdf")
    b = w.add("b", "easy", link, v6="2001:db8:2::2", firewall="apdf")
    w.pair(a, b)
    w.run(1.5)  # connected over IPv6; the warm-up rounds validated IPv4 meanwhile
    assert connected(w, a, b) and a.engine.family == b.engine.family == "ipv6"
    a.firewall = b.firewall = "closed"  # IPv6 breaks
    w.run(2.5)
    assert connected(w, a, b), (a.engine.state, b.engine.state)
    assert a.engine.family == b.engine.family == "ipv4"
    assert not a.of(ev.PeerLost) and not b.of(ev.PeerLost)
    for n in (a, b):
        last = [e for e in n.of(ev.PathChanged) if isinstance(e, ev.PathChanged)][-1]
        assert address_family(last.previous) == "ipv6" and address_family(last.address) == "ipv4"
    a.engine.send_chat("over v4", w.now)
    w.run(0.5)
    assert any(isinstance(e, ev.ChatReceived) and e.text == "over v4" for e in b.events)
    a.firewall = b.firewall = "apdf"  # IPv6 is back: the upgrade rounds find it
    w.run(2.5)
    assert connected(w, a, b) and a.engine.family == b.engine.family == "ipv6"
    assert not a.of(ev.PeerLost) and not b.of(ev.PeerLost)


def test_a_mapping_replaced_at_another_port_mid_link_is_found_again_by_the_repunch() -> None:
    # The harsh case of issue 18's lease test: the NAT dropped the mapping and its flows, and the
    # new lease has another port; the rendezvous passes it on, and the re-punch reaches it.
    link = LinkConfig(session=FAST, relay=False, turn=False)
    w = DualWorld()
    a = w.add("a", "hard", link)
    b = w.add("b", "hard", link)
    w.map_port(a, 41000)
    w.pair(a, b)
    w.run(1.0)
    assert connected(w, a, b) and b.engine.peer_address == ("198.51.100.1", 41000)
    a.mapping_peers.clear()  # the flows through the old mapping are gone with it
    w.map_port(a, 42000)  # the driver's new lease, reported to the rendezvous
    assert b.engine.stats["offer_updates"] == 1
    assert b.engine.state == "connected"  # the offer about the current peer keeps the link
    w.run(FAST.peer_timeout + 3.0)
    assert connected(w, a, b)
    assert b.engine.peer_address == ("198.51.100.1", 42000)
    assert a.engine.method == b.engine.method == "port-mapping"
    a.engine.send_chat("still here", w.now)
    w.run(0.5)
    assert any(isinstance(e, ev.ChatReceived) and e.text == "still here" for e in b.events)


def test_an_offer_about_the_current_peer_with_another_key_changes_nothing() -> None:
    w = DualWorld()
    a = w.add("a", "easy", DIRECT_ONLY)
    b = w.add("b", "easy", DIRECT_ONLY)
    w.pair(a, b)
    w.run(1.0)
    assert connected(w, a, b)
    before = a.engine.offer
    other_key = DualWorld().add("x", "easy", DIRECT_ONLY).engine.identity
    assert other_key is not None
    forged = w.offer_for(b, "controlled").model_copy(
        update={
            "peer_public_key": other_key.public_b64,
            "peer_mapped": PortMapping(protocol="upnp", ip="192.0.2.66", port=6666, lifetime_s=9),
        }
    )
    a.engine.receive_rendezvous(forged, w.now)
    w.flush()
    assert a.engine.offer is before and a.engine.stats["offer_updates"] == 0
    assert a.engine.stats["rendezvous_unexpected"] == 1 and a.engine.state == "connected"
    assert a.engine.session is not None and ("192.0.2.66", 6666) not in a.engine.session.candidates
