"""Issues 18 and 19 on the wire: port mappings and IPv6 endpoints in ``update_udp_endpoint``
and offers, and the engine's re-announce when either changes (``set_port_mapping``,
``set_endpoint6``)."""

from __future__ import annotations

import base64
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2plab.core.crypto import Identity
from p2plab.core.link import DiscoverEndpoint, LinkEngine, SendToRendezvous
from p2plab.core.signaling import (
    BadMessage,
    Candidate,
    Challenge,
    P2PConnectionOffer,
    PortMapping,
    Registered,
    UpdateUdpEndpoint,
    dump_message,
    parse_rendezvous_message,
    parse_worker_message,
)

PMP = PortMapping(protocol="nat-pmp", ip="203.0.113.7", port=41000, lifetime_s=7200)


def update(**extra: object) -> dict[str, object]:
    return {"type": "update_udp_endpoint", "udp_ip": "198.51.100.1", "udp_port": 5000, **extra}


def test_update_carries_mapping_and_udp6_and_round_trips() -> None:
    msg = UpdateUdpEndpoint(
        udp_ip="198.51.100.1",
        udp_port=5000,
        local_candidates=[Candidate(ip="2001:db8:1::2", port=5001)],
        mapped=PMP,
        udp6=Candidate(ip="2001:db8:1::2", port=5001),
    )
    back = parse_worker_message(dump_message(msg))
    assert back == msg
    assert isinstance(back, UpdateUdpEndpoint) and back.mapped == PMP
    # an old worker's update (no new fields) still parses, with None for both
    old = parse_worker_message(json.dumps(update()))
    assert isinstance(old, UpdateUdpEndpoint) and old.mapped is None and old.udp6 is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mapped", {"protocol": "nat-pmp", "ip": "router.example", "port": 1, "lifetime_s": 60}),
        ("mapped", {"protocol": "nat-pmp", "ip": "203.0.113.7", "port": 1, "lifetime_s": 1e9}),
        ("mapped", {"protocol": "nat-pmp", "ip": "203.0.113.7", "port": 1, "lifetime_s": 0}),
        ("mapped", {"protocol": "nat-pmp", "ip": "203.0.113.7", "port": 0, "lifetime_s": 60}),
        ("mapped", {"protocol": "smtp", "ip": "203.0.113.7", "port": 1, "lifetime_s": 60}),
        ("mapped", {"protocol": "pcp", "ip": "fe80::1%eth0", "port": 1, "lifetime_s": 60}),
        ("udp6", {"ip": "fe80::1%eth0", "port": 5000}),
        ("udp6", {"ip": "198.51.100.1", "port": 5000}),  # udp6 names an IPv6 endpoint only
        ("udp6", {"ip": "::ffff:198.51.100.1", "port": 5000}),
        ("udp6", {"ip": "host.example", "port": 5000}),
        ("local_candidates", [{"ip": "fe80::1%eth0", "port": 5000}]),
    ],
)
def test_hostile_update_fields_are_refused(field: str, value: object) -> None:
    with pytest.raises(BadMessage) as info:
        parse_worker_message(json.dumps(update(**{field: value})))
    assert info.value.kind == "update_udp_endpoint"


def test_offer_carries_peer_mapped_and_peer_udp6() -> None:
    offer = P2PConnectionOffer(
        peer_worker_id="b",
        peer_udp_ip="198.51.100.2",
        peer_udp_port=5000,
        peer_mapped=PMP,
        peer_udp6=Candidate(ip="2001:db8:2::2", port=5000),
        peer_candidates=[Candidate(ip="2001:db8:2::2", port=5000)],
    )
    back = parse_rendezvous_message(dump_message(offer))
    assert back == offer
    raw = json.loads(dump_message(offer))
    raw["peer_mapped"]["ip"] = "mapped.example"
    with pytest.raises(BadMessage):
        parse_rendezvous_message(json.dumps(raw))


def registered_engine() -> LinkEngine:
    rand = random.Random("a").randbytes
    e = LinkEngine("a", identity=Identity.generate(rand), rand_bytes=rand)
    e.start(0.0)
    e.rendezvous_up(0.0)
    server = Identity.generate(random.Random("server").randbytes)
    nonce = base64.b64encode(bytes(32)).decode()
    e.receive_rendezvous(Challenge(nonce=nonce, server_key=server.public_b64), 0.0)
    e.receive_rendezvous(Registered(worker_id="a", observed_ip="198.51.100.1"), 0.0)
    return e


def updates(e: LinkEngine) -> list[UpdateUdpEndpoint]:
    out = []
    while (cmd := e.next_command()) is not None:
        if isinstance(cmd, SendToRendezvous) and isinstance(cmd.message, UpdateUdpEndpoint):
            out.append(cmd.message)
    return out


def test_mapping_and_endpoint6_are_reannounced_once_registered() -> None:
    e = registered_engine()
    assert e.state == "discovering"
    # before discovery ends: stored, not announced (the discovery's report carries them)
    e.set_port_mapping(PMP, 0.1)
    assert updates(e) == []
    e.discovered(("198.51.100.1", 5000), [("10.0.0.2", 5000), ("2001:db8:1::2", 5000)], 0.2)
    (first,) = updates(e)
    assert first.mapped == PMP and first.udp6 is None
    e.set_endpoint6(("2001:db8:1::2", 5000), 0.3)
    (second,) = updates(e)
    assert second.udp6 == Candidate(ip="2001:db8:1::2", port=5000) and second.mapped == PMP
    # the v6 endpoint is not repeated among the LAN candidates
    assert [(c.ip, c.port) for c in second.local_candidates] == [("10.0.0.2", 5000)]
    e.set_endpoint6(("2001:db8:1::2", 5000), 0.4)  # no change: no message
    assert updates(e) == []
    e.set_port_mapping(None, 0.5)  # the lease was lost
    (third,) = updates(e)
    assert third.mapped is None and third.udp6 is not None
    with pytest.raises(ValueError, match="IPv6"):
        e.set_endpoint6(("198.51.100.1", 5000), 0.6)


def test_while_the_rendezvous_is_down_the_next_registration_carries_the_change() -> None:
    e = registered_engine()
    e.discovered(("198.51.100.1", 5000), [], 0.1)
    updates(e)
    e.rendezvous_down(1.0)
    e.set_port_mapping(PMP, 1.1)
    assert updates(e) == []  # nobody to tell
    e.rendezvous_up(2.0)
    server = Identity.generate(random.Random("server").randbytes)
    nonce = base64.b64encode(bytes(32)).decode()
    e.receive_rendezvous(Challenge(nonce=nonce, server_key=server.public_b64), 2.0)
    e.set_endpoint6(("2001:db8:1::2", 5000), 2.05)  # challenged, not yet registered: held
    assert updates(e) == []
    e.receive_rendezvous(Registered(worker_id="a", observed_ip="198.51.100.1"), 2.1)
    (msg,) = updates(e)
    assert msg.mapped == PMP and msg.udp6 is not None and msg.udp6.ip == "2001:db8:1::2"


def test_first_report_waits_for_the_port_mapping_probe() -> None:
    e = registered_engine()
    e.expect_port_mapping(0.0)
    e.discovered(("198.51.100.1", 5000), [], 0.1)
    assert e.state == "waiting_for_peer"
    assert updates(e) == []  # held: the rendezvous would pair on it, without the mapping
    assert e.get_timer() == pytest.approx(1.0)
    e.set_port_mapping(PMP, 0.3)
    (first,) = updates(e)  # one report, carrying the mapping
    assert first.mapped == PMP
    assert e.get_timer() is None


def test_a_probe_that_finds_nothing_releases_the_report_at_once_or_by_the_deadline() -> None:
    e = registered_engine()
    e.expect_port_mapping(0.0)
    e.discovered(("198.51.100.1", 5000), [], 0.1)
    e.set_port_mapping(None, 0.26)  # the probe ended with nothing
    (first,) = updates(e)
    assert first.mapped is None
    f = registered_engine()
    f.expect_port_mapping(0.0)
    f.discovered(("198.51.100.1", 5000), [], 0.1)
    deadline = f.get_timer()
    assert deadline is not None
    f.handle_timer(deadline - 0.01)
    assert updates(f) == []
    f.handle_timer(deadline)  # the driver never said: reported anyway
    (late,) = updates(f)
    assert late.mapped is None


_IPS = st.sampled_from(
    ["203.0.113.7", "2001:db8::1", "fe80::1%eth0", "::ffff:1.2.3.4", "host.example", "", "1.2.3"]
)
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40), _IPS
)
_FIELDS = st.dictionaries(
    st.sampled_from(["protocol", "ip", "port", "lifetime_s"]),
    st.one_of(_SCALARS, st.sampled_from(["nat-pmp", "pcp", "upnp"])),
)


@settings(max_examples=300, deadline=None)
@given(mapped=st.one_of(_SCALARS, _FIELDS), udp6=st.one_of(_SCALARS, _FIELDS))
def test_fuzzed_mapped_and_udp6_parse_or_raise_bad_message_only(
    mapped: object, udp6: object
) -> None:
    raw = json.dumps(update(mapped=mapped, udp6=udp6))
    try:
        msg = parse_worker_message(raw)
    except BadMessage:
        return
    assert isinstance(msg, UpdateUdpEndpoint)
    # whatever got through is usable as is: literals, no zone, a sane lease, udp6 IPv6
    if msg.mapped is not None:
        assert "%" not in msg.mapped.ip and 0 < msg.mapped.lifetime_s <= 604800
        assert 1 <= msg.mapped.port <= 65535
    if msg.udp6 is not None:
        assert ":" in msg.udp6.ip and "%" not in msg.udp6.ip


@pytest.mark.parametrize(
    ("observed", "plain"),
    [
        ("198.51.100.1", "198.51.100.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:198.51.100.1", "198.51.100.1"),  # an IPv4 client of a rendezvous on ::
        ("fe80::1%eth0", None),
        ("rendezvous.example", None),
    ],
)
def test_the_observed_address_discovery_falls_back_to_is_a_plain_literal(
    observed: str, plain: str | None
) -> None:
    rand = random.Random("a").randbytes
    e = LinkEngine("a", identity=Identity.generate(rand), rand_bytes=rand)
    e.start(0.0)
    e.rendezvous_up(0.0)
    server = Identity.generate(random.Random("server").randbytes)
    nonce = base64.b64encode(bytes(32)).decode()
    e.receive_rendezvous(Challenge(nonce=nonce, server_key=server.public_b64), 0.0)
    e.next_command()  # the register
    e.receive_rendezvous(Registered(worker_id="a", observed_ip=observed), 0.0)
    cmd = e.next_command()
    assert isinstance(cmd, DiscoverEndpoint) and cmd.observed_ip == plain
    assert e.observed_ip == plain
