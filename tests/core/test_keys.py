"""Keys as the user meets them: fingerprints, the authentication string, pinning, low-order
points where keys enter, and the proof of key possession at registration (issue 14)."""

from __future__ import annotations

import base64
import random

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2plab.core.crypto import (
    Identity,
    authentication_string,
    check_public_key,
    decode_public_key,
    parse_peer_key,
    peer_key_matches,
    registration_proof,
    verify_registration_proof,
)
from p2plab.errors import ConfigError, RemoteProtocolError

# The low-order points of Curve25519 (their u-coordinates, as in libsodium's blocklist); each
# encoding and its high-bit twin make a shared secret of all zeros.
_LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    ((1 << 255) - 19 - 1).to_bytes(32, "little"),
    ((1 << 255) - 19).to_bytes(32, "little"),
    ((1 << 255) - 19 + 1).to_bytes(32, "little"),
]


def _ident(seed: int) -> Identity:
    return Identity.generate(random.Random(seed).randbytes)


def test_fingerprint_is_the_whole_sha256_in_groups() -> None:
    fp = _ident(1).fingerprint
    groups = fp.split(" ")
    assert len(groups) == 16 and all(len(g) == 4 for g in groups)
    assert fp != _ident(2).fingerprint


def test_authentication_string_is_the_same_at_both_ends_and_has_128_bits() -> None:
    a, b = _ident(1), _ident(2)
    at_a = authentication_string("alice", a.public_bytes, "bob", b.public_bytes)
    at_b = authentication_string("bob", b.public_bytes, "alice", a.public_bytes)
    assert at_a == at_b
    groups = at_a.split(" ")
    assert len(groups) >= 8 and all(len(g) == 5 and g.isdigit() for g in groups)
    # A substituted key, or the same keys under other ids, gives another string.
    m = _ident(3)
    assert authentication_string("alice", a.public_bytes, "bob", m.public_bytes) != at_a
    assert authentication_string("alice", b.public_bytes, "bob", a.public_bytes) != at_a


def test_authentication_strings_spread_over_all_groups() -> None:
    # No group is stuck at a constant: each takes many values over many key pairs.
    strings = [
        authentication_string("a", _ident(i).public_bytes, "b", _ident(1000 + i).public_bytes)
        for i in range(50)
    ]
    for g in range(8):
        assert len({s.split(" ")[g] for s in strings}) > 40


@pytest.mark.parametrize("point", _LOW_ORDER)
def test_low_order_points_are_refused_where_keys_enter(point: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="low-order"):
        check_public_key(point)
    with pytest.raises(RemoteProtocolError, match="low-order"):
        decode_public_key(base64.b64encode(point).decode())


def test_a_genuine_key_passes() -> None:
    a = _ident(4)
    assert check_public_key(a.public_bytes) == a.public_bytes
    assert decode_public_key(a.public_b64) == a.public_bytes


def test_peer_key_pins_by_base64_key_or_fingerprint() -> None:
    a, b = _ident(5), _ident(6)
    for text in (a.public_b64, a.fingerprint, a.fingerprint.replace(" ", "").upper()):
        pinned = parse_peer_key(text)
        assert peer_key_matches(pinned, a.public_bytes)
        assert not peer_key_matches(pinned, b.public_bytes)


@pytest.mark.parametrize(
    "text", ["", "abcd", "0" * 63, "not a key!", base64.b64encode(bytes(32)).decode()]
)
def test_a_bad_pinned_key_is_one_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--peer-key"):
        parse_peer_key(text)


def test_registration_proof_needs_the_private_key() -> None:
    server = X25519PrivateKey.generate()
    server_pub = server.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    worker, thief = _ident(7), _ident(8)
    nonce = bytes(range(32))
    proof = registration_proof(worker, server_pub, nonce, "w1")
    assert verify_registration_proof(server, worker.public_bytes, nonce, "w1", proof)
    # Someone who only knows the worker's public key computes with their own private key.
    forged = registration_proof(thief, server_pub, nonce, "w1")
    assert not verify_registration_proof(server, worker.public_bytes, nonce, "w1", forged)
    # A proof is bound to the nonce, the id and the key it was made for.
    assert not verify_registration_proof(server, worker.public_bytes, bytes(32), "w1", proof)
    assert not verify_registration_proof(server, worker.public_bytes, nonce, "w2", proof)
    assert not verify_registration_proof(server, thief.public_bytes, nonce, "w1", proof)
    assert not verify_registration_proof(server, bytes(32), nonce, "w1", proof)
    with pytest.raises(RemoteProtocolError):
        registration_proof(worker, bytes(32), nonce, "w1")
