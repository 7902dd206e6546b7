"""The link engine never falls back to plaintext while one side encrypts (issue 14, finding 18).

``LinkEngine._check_offer`` refuses such offers before any session is built, so no public input
reaches the sealer with a key missing; these tests call the builder directly, as a later path
that forgot the check would, and require a refusal (a RemoteProtocolError the offer handling
turns into a refused offer), never a PlainEnvelope.
"""

from __future__ import annotations

import random

import pytest

from p2plab.core.crypto import Identity, PeerCipher, PlainEnvelope
from p2plab.core.link import LinkEngine
from p2plab.errors import RemoteProtocolError


def _engine(encrypting: bool, peer_key: bytes | None) -> LinkEngine:
    r = random.Random(7)
    identity = Identity.generate(r.randbytes) if encrypting else None
    engine = LinkEngine("alice", identity=identity, rand_bytes=r.randbytes)
    engine.peer_id = "bob"
    engine.peer_public_key = peer_key
    return engine


def _peer_key() -> bytes:
    return Identity.generate(random.Random(8).randbytes).public_bytes


def test_encrypting_worker_without_the_peer_key_refuses_instead_of_plaintext() -> None:
    engine = _engine(encrypting=True, peer_key=None)
    with pytest.raises(RemoteProtocolError, match="refusing a plaintext link"):
        engine._new_sealer(0.0)


def test_plaintext_worker_given_a_peer_key_refuses_too() -> None:
    engine = _engine(encrypting=False, peer_key=_peer_key())
    with pytest.raises(RemoteProtocolError, match="refusing a plaintext link"):
        engine._new_sealer(0.0)


def test_the_two_consistent_modes_still_build_their_sealers() -> None:
    assert isinstance(_engine(encrypting=True, peer_key=_peer_key())._new_sealer(0.0), PeerCipher)
    assert isinstance(_engine(encrypting=False, peer_key=None)._new_sealer(0.0), PlainEnvelope)
