"""A worker's X25519 identity, public keys as they travel, and fingerprints."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2plab.errors import RemoteProtocolError

__all__ = ["KEY_SIZE", "Identity", "decode_public_key", "fingerprint"]

KEY_SIZE = 32
"""Bytes of an X25519 public or private key."""


def fingerprint(public_key: bytes) -> str:
    """A short, human comparable fingerprint: the first 8 bytes of SHA-256, as 4 groups of 4 hex."""
    h = hashlib.sha256(public_key).hexdigest()[:16]
    return " ".join(h[i : i + 4] for i in range(0, 16, 4))


def decode_public_key(text: str) -> bytes:
    """The 32 raw bytes of a base64 X25519 public key; raises :class:`RemoteProtocolError`."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise RemoteProtocolError("public key is not valid base64") from None
    if len(raw) != KEY_SIZE:
        raise RemoteProtocolError(f"public key must be {KEY_SIZE} bytes, got {len(raw)}")
    return raw


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
