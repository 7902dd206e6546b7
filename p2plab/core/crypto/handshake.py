"""The per-session handshake of :class:`~p2plab.core.crypto.PeerCipher`: keys, mac1, epochs.

Each cipher (one peer session) draws a fresh ephemeral X25519 key and carries an ``epoch``.
PROBE and PROBE_ACK are the *handshake* types: they carry ``ephemeral public (32) | epoch (8)``
in front of their sealed body, are sealed with a handshake key that needs only the static keys,
and end with a 16-byte ``mac1`` checked before anything else.  Every other type is sealed with a
*data* key that mixes the four Diffie-Hellman results (static-static, ephemeral-ephemeral and
both mixed ones), so a thief of both static keys cannot open captured data (forward secrecy).
The design and why it holds: docs/protocol.md ("Session handshake") and
docs/security-notes/handshake.md.

Nothing here keeps a clock: epochs are supplied by the driver (wall-clock nanoseconds), and
:class:`EpochStore` remembers, across the sessions one link engine builds, the highest epoch seen
per peer static key, so a handshake captured from an earlier session never starts a new one.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2plab.core.wire import MessageType

from .rules import SEAL_OVERHEAD

__all__ = [
    "EPHEMERAL_AT",
    "EPOCH",
    "HANDSHAKE_OVERHEAD",
    "HANDSHAKE_PREFIX",
    "HANDSHAKE_TYPES",
    "MAC_SIZE",
    "EpochStore",
    "data_key",
    "handshake_aead",
    "handshake_base_key",
    "mac1",
    "mac1_key",
    "mac1_ok",
]

HANDSHAKE_TYPES = frozenset({int(MessageType.PROBE), int(MessageType.PROBE_ACK)})
"""Datagram types sealed with the handshake key (and carrying the ephemeral key and epoch)."""
MAC_SIZE = 16
"""Bytes of ``mac1`` at the end of a handshake datagram."""
EPOCH = struct.Struct(">Q")
"""The epoch in a handshake plaintext: u64, big-endian."""
EPHEMERAL_AT = 0
"""Offset of the ephemeral public key in a handshake plaintext (the epoch follows it)."""
HANDSHAKE_PREFIX = 32 + EPOCH.size
"""Bytes the cipher puts in front of a handshake body (ephemeral public key, epoch)."""
HANDSHAKE_OVERHEAD = SEAL_OVERHEAD + HANDSHAKE_PREFIX + MAC_SIZE
"""Bytes a sealed handshake datagram carries beyond the plaintext one."""

_MAC1_LABEL = b"p2plab/v1 mac1"


def _str16(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def mac1_key(receiver_public: bytes) -> bytes:
    """``BLAKE2s("p2plab/v1 mac1" | receiver static public)``: the key of mac1 (WireGuard's)."""
    return hashlib.blake2s(_MAC1_LABEL + receiver_public).digest()


def mac1(key: bytes, data: bytes) -> bytes:
    """The 16-byte keyed BLAKE2s of ``data`` (header and sealed body up to the mac)."""
    return hashlib.blake2s(data, key=key, digest_size=MAC_SIZE).digest()


def mac1_ok(key: bytes, data: bytes) -> bool:
    """Whether ``data`` ends with its mac1 under ``key`` (compared in constant time)."""
    return hmac.compare_digest(mac1(key, data[:-MAC_SIZE]), data[-MAC_SIZE:])


def handshake_base_key(
    ss: bytes,
    salt: bytes,
    sender: tuple[str, bytes],
    receiver: tuple[str, bytes],
) -> bytes:
    """One direction's handshake base key: HKDF over the static-static secret, ids and keys.

    It does not depend on session tags, so a datagram with a new sender tag costs no HKDF: the
    per-tag key is :func:`handshake_aead` (one keyed BLAKE2s).
    """
    info = b"p2plab/v1 handshake" + _str16(sender[0]) + _str16(receiver[0])
    info += sender[1] + receiver[1]
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ss)


def handshake_aead(base: bytes, sender_tag: bytes) -> ChaCha20Poly1305:
    """The handshake cipher of one sender session: ``BLAKE2s(key=base, sender_tag)``.

    The base key is shared by every session of the same pair of static keys, while counters
    restart at 0 in each session: keying by the (random, 64-bit) sender tag keeps every
    (key, nonce) pair unique, as XChaCha20's subkey does.
    """
    return ChaCha20Poly1305(hashlib.blake2s(sender_tag, key=base).digest())


def data_key(
    secrets: bytes,
    salt: bytes,
    sender: tuple[str, bytes, bytes, bytes],
    receiver: tuple[str, bytes, bytes, bytes],
) -> ChaCha20Poly1305:
    """One direction's data cipher: HKDF over ``ss | ee | es | se`` bound to both sessions.

    ``secrets`` is the four X25519 results in the direction's order (static-static,
    ephemeral-ephemeral, sender ephemeral with receiver static, sender static with receiver
    ephemeral); ``sender``/``receiver`` are ``(id, static public, ephemeral public, tag)``.
    """
    info = b"p2plab/v1 data" + _str16(sender[0]) + _str16(receiver[0])
    info += sender[1] + receiver[1] + sender[2] + receiver[2] + sender[3] + receiver[3]
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secrets)
    return ChaCha20Poly1305(key)


class EpochStore:
    """What a link engine remembers across the sessions it builds (one per engine).

    - the last epoch it gave one of its own sessions (:meth:`issue` keeps them strictly
      increasing even if the wall clock stalls or steps back within the process);
    - its recent session tags (a datagram naming one of them is stale, not forged);
    - per peer static key, the highest epoch accepted and that session's ephemeral key.
    """

    def __init__(self, max_peers: int = 256, max_local_tags: int = 64) -> None:
        self.last_epoch = -1
        """The epoch :meth:`issue` gave last (-1: none yet)."""
        self._local_tags: OrderedDict[bytes, None] = OrderedDict()
        self._peers: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()
        self._max_peers = max_peers
        self._max_local_tags = max_local_tags

    def issue(self, wall_ns: int, local_tag: bytes) -> int:
        """An epoch for a new local session: ``max(wall_ns, last + 1)``; remembers its tag."""
        epoch = max(int(wall_ns), self.last_epoch + 1)
        if epoch >= 1 << 64:
            raise ValueError("epoch out of range (u64)")
        self.last_epoch = epoch
        self._local_tags[local_tag] = None
        while len(self._local_tags) > self._max_local_tags:
            self._local_tags.popitem(last=False)
        return epoch

    def was_local_tag(self, tag: bytes) -> bool:
        """Whether ``tag`` was one of our sessions' tags (recently)."""
        return tag in self._local_tags

    def highest(self, peer_public: bytes) -> tuple[int, bytes] | None:
        """``(epoch, ephemeral public)`` of the newest session accepted from this peer key."""
        return self._peers.get(peer_public)

    def refusal(self, peer_public: bytes, epoch: int, ephemeral: bytes) -> str | None:
        """Why a handshake from a peer session new to a cipher is a replay, or None.

        Accepted: an epoch above every one seen from this key, or the newest session itself
        again (same epoch and ephemeral key: the peer kept its session while ours restarted).
        """
        top = self._peers.get(peer_public)
        if top is None or epoch > top[0] or (epoch == top[0] and ephemeral == top[1]):
            return None
        return f"epoch {epoch} is not above {top[0]}, seen from this peer key: an earlier session"

    def accepted(self, peer_public: bytes, epoch: int, ephemeral: bytes) -> None:
        """Remember an accepted peer session (call after it authenticated)."""
        top = self._peers.get(peer_public)
        if top is None or epoch > top[0]:
            self._peers[peer_public] = (epoch, ephemeral)
        self._peers.move_to_end(peer_public)
        while len(self._peers) > self._max_peers:
            self._peers.popitem(last=False)
