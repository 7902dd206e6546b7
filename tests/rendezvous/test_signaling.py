"""The shared signaling models: what each one accepts and refuses (both ends use them)."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from p2plab.core.crypto import Identity
from p2plab.core.signaling import (
    MAX_LOCAL_CANDIDATES,
    Candidate,
    Challenge,
    P2PConnectionOffer,
    Register,
    UpdateUdpEndpoint,
    dump_message,
    parse_rendezvous_message,
    parse_worker_message,
)
from p2plab.errors import RemoteProtocolError


def test_challenge_round_trips_and_is_bounded() -> None:
    msg = Challenge(nonce="bm9uY2U=", server_key="a2V5")
    assert parse_rendezvous_message(dump_message(msg)) == msg
    for bad in ({"nonce": "", "server_key": "k"}, {"nonce": "n" * 65, "server_key": "k"}, {}):
        with pytest.raises(RemoteProtocolError):
            parse_rendezvous_message(json.dumps({"type": "challenge", **bad}))


def test_register_carries_an_optional_bounded_proof() -> None:
    assert Register().proof is None
    reg = parse_worker_message(json.dumps({"type": "register", "proof": "p" * 44}))
    assert isinstance(reg, Register) and reg.proof == "p" * 44
    with pytest.raises(RemoteProtocolError, match="proof"):
        parse_worker_message(json.dumps({"type": "register", "proof": "p" * 65}))


KEY = Identity.generate(os.urandom).public_b64
#: Low-order points and other keys no worker could hold (finding 13: 32 zero bytes passed).
BAD_KEYS = ["A" * 43 + "=", "AQ" + "A" * 41 + "=", "!!", "A" * 44, "QUFB", "x" * 129]
#: Names and junk where only IP literals may travel (finding 3: names froze a worker).
BAD_IPS = ["a.slow.invalid", "localhost", "example.com", "", "1.2.3", "256.1.1.1", "1.2.3.4:5"]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_unusable_public_keys_are_refused_at_registration_and_in_offers(bad: str) -> None:
    with pytest.raises(RemoteProtocolError, match="public_key"):
        parse_worker_message(json.dumps({"type": "register", "public_key": bad}))
    offer = {"type": "p2p_connection_offer", "peer_worker_id": "b", "peer_udp_ip": "192.0.2.1"}
    with pytest.raises(RemoteProtocolError, match="peer_public_key"):
        parse_rendezvous_message(json.dumps({**offer, "peer_udp_port": 1, "peer_public_key": bad}))


def test_a_real_public_key_passes() -> None:
    reg = parse_worker_message(json.dumps({"type": "register", "public_key": KEY}))
    assert isinstance(reg, Register) and reg.public_key == KEY
    assert (
        P2PConnectionOffer(
            peer_worker_id="b", peer_udp_ip="::1", peer_udp_port=1, peer_public_key=KEY
        ).peer_public_key
        == KEY
    )


@pytest.mark.parametrize("bad", BAD_IPS)
def test_only_ip_literals_travel_as_candidates(bad: str) -> None:
    update = {"type": "update_udp_endpoint", "udp_ip": "192.0.2.1", "udp_port": 1}
    with pytest.raises(RemoteProtocolError, match="udp_ip"):
        parse_worker_message(json.dumps({**update, "udp_ip": bad}))
    cands = [{"ip": bad, "port": 1}]
    with pytest.raises(RemoteProtocolError, match="local_candidates"):
        parse_worker_message(json.dumps({**update, "local_candidates": cands}))
    offer = {"type": "p2p_connection_offer", "peer_worker_id": "b", "peer_udp_port": 1}
    with pytest.raises(RemoteProtocolError, match="peer_udp_ip"):
        parse_rendezvous_message(json.dumps({**offer, "peer_udp_ip": bad}))
    with pytest.raises(RemoteProtocolError, match="peer_candidates"):
        parse_rendezvous_message(
            json.dumps({**offer, "peer_udp_ip": "192.0.2.1", "peer_candidates": cands})
        )
    with pytest.raises(ValidationError):
        Candidate(ip=bad, port=1)


def test_ipv4_and_ipv6_literals_pass() -> None:
    for ip in ("192.0.2.1", "::1", "2001:db8::7", "fe80::1"):
        assert Candidate(ip=ip, port=1).ip == ip
        assert UpdateUdpEndpoint(udp_ip=ip, udp_port=1).udp_ip == ip


def test_scoped_and_ipv4_mapped_ipv6_literals_are_refused() -> None:
    # A zone names an interface of the sender's host (issue 19); an IPv4-mapped address would
    # make one IPv4 address compare unequal to itself.
    for ip in ("fe80::1%eth0", "fe80::1%2", "::ffff:192.0.2.1"):
        with pytest.raises(ValidationError):
            Candidate(ip=ip, port=1)
        with pytest.raises(ValidationError):
            UpdateUdpEndpoint(udp_ip=ip, udp_port=1)


def test_at_most_eight_local_candidates() -> None:
    cands = [{"ip": f"192.0.2.{i}", "port": 1} for i in range(MAX_LOCAL_CANDIDATES + 1)]
    update = {"type": "update_udp_endpoint", "udp_ip": "192.0.2.1", "udp_port": 1}
    assert MAX_LOCAL_CANDIDATES == 8
    ok = parse_worker_message(json.dumps({**update, "local_candidates": cands[:8]}))
    assert isinstance(ok, UpdateUdpEndpoint) and len(ok.local_candidates) == 8
    with pytest.raises(RemoteProtocolError, match="local_candidates"):
        parse_worker_message(json.dumps({**update, "local_candidates": cands}))
    # an offer carries the public endpoint and at most eight more
    offer = {"type": "p2p_connection_offer", "peer_worker_id": "b", "peer_udp_ip": "192.0.2.1"}
    ten = [*cands, {"ip": "198.51.100.1", "port": 2}]
    parse_rendezvous_message(json.dumps({**offer, "peer_udp_port": 1, "peer_candidates": cands}))
    with pytest.raises(RemoteProtocolError, match="peer_candidates"):
        parse_rendezvous_message(json.dumps({**offer, "peer_udp_port": 1, "peer_candidates": ten}))
