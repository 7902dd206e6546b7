"""The shared signaling models: what each one accepts and refuses (both ends use them)."""

from __future__ import annotations

import json

import pytest

from p2plab.core.signaling import (
    Challenge,
    Register,
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
