"""A worker's X25519 identity, public keys as they travel, fingerprints, the authentication
string both pages show, pinned keys, and the proof of key possession at registration."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from p2plab.errors import ConfigError, RemoteProtocolError

__all__ = [
    "AUTH_STRING_GROUPS",
    "KEY_SIZE",
    "PROOF_SIZE",
    "Identity",
    "authentication_string",
    "check_public_key",
    "decode_public_key",
    "fingerprint",
    "parse_peer_key",
    "peer_key_matches",
    "registration_proof",
    "verify_registration_proof",
]

KEY_SIZE = 32
"""Bytes of an X25519 public or private key."""
PROOF_SIZE = 32
"""Bytes of a registration proof (HMAC-SHA256)."""
AUTH_STRING_GROUPS = 8
"""Groups of five digits in :func:`authentication_string` (8 x log2(10^5) = 132.9 bits)."""

# A fixed scalar to test public keys with: X25519 with a low-order point gives the all-zero
# shared secret whatever the scalar, which `cryptography` refuses with ValueError.
_PROBE_SCALAR = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"p2plab/v1 probe").digest())
_HEX_RE = re.compile(r"[0-9a-f]{64}")


def fingerprint(public_key: bytes) -> str:
    """The whole SHA-256 of a public key, as 16 groups of 4 hex digits (256 bits).

    What ``--peer-key`` accepts (with or without the spaces) and what a user copies out of band.
    """
    h = hashlib.sha256(public_key).hexdigest()
    return " ".join(h[i : i + 4] for i in range(0, 64, 4))


def check_public_key(raw: bytes) -> bytes:
    """``raw`` if it is a usable X25519 public key; :class:`RemoteProtocolError` otherwise.

    Refuses wrong lengths and the low-order points (all 14 encodings, 32 zero bytes included),
    whose shared secret is all zeros whatever the private key.
    """
    if len(raw) != KEY_SIZE:
        raise RemoteProtocolError(f"public key must be {KEY_SIZE} bytes, got {len(raw)}")
    try:
        _PROBE_SCALAR.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise RemoteProtocolError("public key is not usable (low-order point)") from None
    return raw


def decode_public_key(text: str) -> bytes:
    """The 32 raw bytes of a base64 X25519 public key; raises :class:`RemoteProtocolError`
    for bad base64, a wrong length or a low-order point (:func:`check_public_key`)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise RemoteProtocolError("public key is not valid base64") from None
    return check_public_key(raw)


def authentication_string(id_a: str, key_a: bytes, id_b: str, key_b: bytes) -> str:
    """The string both ends of a pair show, the same on both: compare it out of band.

    SHA-512 over the two ``(id, public key)`` pairs sorted, so either end computes the same
    value; rendered as :data:`AUTH_STRING_GROUPS` groups of five decimal digits (each group is
    five hash bytes modulo 100000, as Signal's safety numbers), 132.9 bits in all: a
    rendezvous that substitutes keys would need a second preimage of that size.
    """
    parts = sorted((i.encode("utf-8"), bytes(k)) for i, k in ((id_a, key_a), (id_b, key_b)))
    h = hashlib.sha512(b"p2plab/v1 authentication string")
    for ident, key in parts:
        h.update(len(ident).to_bytes(2, "big") + ident + key)
    digest = h.digest()
    groups = [
        int.from_bytes(digest[5 * g : 5 * g + 5], "big") % 100000 for g in range(AUTH_STRING_GROUPS)
    ]
    return " ".join(f"{g:05d}" for g in groups)


def parse_peer_key(text: str) -> bytes | str:
    """What ``--peer-key``/``P2P_PEER_KEY`` pins: a base64 public key (the 32 bytes) or a
    :func:`fingerprint` (its 64 hex digits, spaces, colons and case ignored).

    Returns the raw key or the normalised 64-digit hex fingerprint; :class:`ConfigError`, one
    line, for anything else.  Match a peer key against it with :func:`peer_key_matches`.
    """
    compact = re.sub(r"[\s:]", "", text).lower()
    if _HEX_RE.fullmatch(compact):
        return compact
    try:
        return decode_public_key(text.strip())
    except RemoteProtocolError as exc:
        raise ConfigError(
            f"--peer-key must be a base64 X25519 public key or a 64-hex-digit fingerprint ({exc})"
        ) from None


def peer_key_matches(pinned: bytes | str, public_key: bytes) -> bool:
    """Whether ``public_key`` is the key :func:`parse_peer_key` pinned."""
    if isinstance(pinned, bytes):
        return hmac.compare_digest(pinned, public_key)
    return hmac.compare_digest(pinned, hashlib.sha256(public_key).hexdigest())


def _proof_message(nonce: bytes, worker_id: str, public_key: bytes) -> bytes:
    ident = worker_id.encode("utf-8")
    return b"p2plab/v1 register" + nonce + len(ident).to_bytes(2, "big") + ident + public_key


def registration_proof(
    identity: Identity, server_key: bytes, nonce: bytes, worker_id: str
) -> bytes:
    """The worker's answer to a rendezvous ``challenge``: proof that it holds its private key.

    ``HMAC-SHA256(X25519(worker private, server ephemeral public), "p2plab/v1 register" |
    nonce | u16 length | worker id | worker public key)``.  Only the holder of the worker's
    private key (or of the server's ephemeral one) can compute it; the nonce is fresh per
    connection, so a captured proof does not register again.  Raises RemoteProtocolError for a
    server key that is not usable.
    """
    shared = identity.private_key.exchange(
        X25519PublicKey.from_public_bytes(check_public_key(server_key))
    )
    return hmac.new(
        shared, _proof_message(nonce, worker_id, identity.public_bytes), "sha256"
    ).digest()


def verify_registration_proof(
    server_private: X25519PrivateKey,
    worker_public: bytes,
    nonce: bytes,
    worker_id: str,
    proof: bytes,
) -> bool:
    """The rendezvous's check of :func:`registration_proof` (False for anything wrong)."""
    try:
        shared = server_private.exchange(
            X25519PublicKey.from_public_bytes(check_public_key(worker_public))
        )
    except (RemoteProtocolError, ValueError):
        return False
    expected = hmac.new(shared, _proof_message(nonce, worker_id, worker_public), "sha256").digest()
    return hmac.compare_digest(expected, proof)


class Identity:
    """A worker's X25519 key pair."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self.private_key = private_key
        self.public_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        """The 32 raw bytes of the public key."""

    @classmethod
    def generate(cls, rand_bytes: Callable[[int], bytes]) -> Identity:
        """A new key pair from injected randomness (``os.urandom`` in the I/O layer)."""
        return cls(X25519PrivateKey.from_private_bytes(rand_bytes(KEY_SIZE)))

    @property
    def public_b64(self) -> str:
        """The public key as sent in ``Register.public_key``."""
        return base64.b64encode(self.public_bytes).decode("ascii")

    @property
    def fingerprint(self) -> str:
        """:func:`fingerprint` of the public key."""
        return fingerprint(self.public_bytes)
