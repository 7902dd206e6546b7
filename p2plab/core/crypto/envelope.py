"""The sealers of one peer session: :class:`PeerCipher` (encrypted) and :class:`PlainEnvelope`.

Both implement :class:`p2plab.core.wire.Sealer` (``seal``/``open`` on the body, the header as
associated data) and, for the benchmark data path, ``seal_datagram``/``open_datagram`` on whole
datagrams.  Whether a datagram is accepted is decided in :mod:`.rules` only; the batch paths
come from :class:`~.batch.BatchPaths`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2plab.core.wire import HEADER_SIZE, MessageType
from p2plab.errors import ConfigError, RemoteProtocolError

from .batch import BatchPaths
from .keys import KEY_SIZE, Identity, fingerprint
from .rules import (
    COUNTER_SIZE,
    SEAL_OVERHEAD,
    TAG_SIZE,
    AuthenticationFailed,
    FastPath,
    OpenRules,
    new_stats,
)

__all__ = ["PeerCipher", "PlainEnvelope"]

_PREFIX = 2 * TAG_SIZE + COUNTER_SIZE  # tags and counter before the ciphertext
_MAX_KEYS = 8  # derived keys cached
_PROBE_ACK = int(MessageType.PROBE_ACK)
_NONCE_PAD = b"\x00\x00\x00\x00"


class PeerCipher(BatchPaths):
    """The sealer of one peer session: ChaCha20-Poly1305 with per-direction HKDF keys.

    Implements :class:`p2plab.core.wire.Sealer` (``seal``/``open`` on the body, the header as
    associated data) and, for the benchmark data path, :meth:`seal_datagram`/:meth:`open_datagram`
    on whole datagrams (and the batches of :class:`~.batch.BatchPaths`).
    """

    encrypted = True
    """This sealer encrypts and authenticates (see :class:`PlainEnvelope`)."""

    def __init__(
        self,
        identity: Identity,
        local_id: str,
        peer_id: str,
        peer_public_key: bytes,
        rand_bytes: Callable[[int], bytes],
        *,
        replay_window: int = 1024,
    ) -> None:
        if len(peer_public_key) != KEY_SIZE:
            raise ConfigError(f"peer public key must be {KEY_SIZE} bytes")
        self.local_id = local_id
        self.peer_id = peer_id
        self.local_public = identity.public_bytes
        self.peer_public = bytes(peer_public_key)
        try:
            self._shared = identity.private_key.exchange(
                X25519PublicKey.from_public_bytes(self.peer_public)
            )
        except ValueError:  # a low-order point: the shared secret would be all zeros
            raise RemoteProtocolError("peer public key is not usable (low-order point)") from None
        self._salt = hashlib.sha256(
            b"p2plab/v1 salt" + b"".join(sorted((self.local_public, self.peer_public)))
        ).digest()
        self.stats: dict[str, int] = new_stats()
        """``sealed``/``opened`` datagrams, ``auth_failures`` (forged or corrupted), ``replays``
        (seen before, too old, or from an earlier session), ``peer_restarts``."""
        self.rules = OpenRules(rand_bytes, self.stats, replay_window)
        """Tags and replay windows: what decides whether an authentic datagram is accepted."""
        self._tags = self.rules.tags
        self._keys: OrderedDict[tuple[bool, bytes, bytes], ChaCha20Poly1305] = OrderedDict()
        self._counter = 0
        # Caches of the established session pair, dropped whenever :meth:`open` runs (the only
        # place where tags, windows and retirements change): the fast path for opening; for
        # sealing, per header, the receiver tag it was built for, the cipher, the associated
        # data and the two tags.
        self._fast: FastPath | None = None
        self._seal_fast: dict[bytes, tuple[bytes | None, ChaCha20Poly1305, bytes, bytes]] = {}

    # -- identity ---------------------------------------------------------------------------

    @property
    def local_tag(self) -> bytes:
        """This session's tag."""
        return self._tags.local_tag

    @property
    def peer_tag(self) -> bytes | None:
        """The peer session's tag, once learnt."""
        return self._tags.peer_tag

    @property
    def local_fingerprint(self) -> str:
        """:func:`fingerprint` of our public key."""
        return fingerprint(self.local_public)

    @property
    def peer_fingerprint(self) -> str:
        """:func:`fingerprint` of the peer's public key."""
        return fingerprint(self.peer_public)

    def take_peer_restart(self) -> bool:
        """True once after the peer was seen restarting its session (a new authentic tag)."""
        return self._tags.take_restart()

    # -- keys -------------------------------------------------------------------------------

    def _aead(self, sending: bool, sender_tag: bytes, receiver_tag: bytes) -> ChaCha20Poly1305:
        cache_key = (sending, sender_tag, receiver_tag)
        aead = self._keys.get(cache_key)
        if aead is not None:
            self._keys.move_to_end(cache_key)
            return aead
        if sending:
            ids = (self.local_id, self.peer_id)
            pubs = self.local_public + self.peer_public
        else:
            ids = (self.peer_id, self.local_id)
            pubs = self.peer_public + self.local_public
        info = bytearray(b"p2plab/v1 datagram")
        for i in ids:
            raw = i.encode("utf-8")
            info += len(raw).to_bytes(2, "big") + raw
        info += pubs + sender_tag + receiver_tag
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=self._salt, info=bytes(info)).derive(
            self._shared
        )
        aead = ChaCha20Poly1305(key)
        self._keys[cache_key] = aead
        while len(self._keys) > _MAX_KEYS:
            self._keys.popitem(last=False)
        return aead

    # -- Sealer -----------------------------------------------------------------------------

    def seal(self, header: bytes, body: bytes) -> bytes:
        """Encrypt ``body``; ``header`` (4 bytes) is authenticated too."""
        sender_tag = self._tags.local_tag
        receiver_tag = self._tags.receiver_tag_for(header[3])
        counter = self._counter
        self._counter += 1
        prefix = sender_tag + receiver_tag + counter.to_bytes(COUNTER_SIZE, "big")
        nonce = _NONCE_PAD + prefix[2 * TAG_SIZE :]
        aad = bytes(header) + prefix[: 2 * TAG_SIZE]
        self.stats["sealed"] += 1
        return prefix + self._aead(True, sender_tag, receiver_tag).encrypt(nonce, body, aad)

    def open(self, header: bytes, sealed: bytes) -> bytes:
        """Decrypt and check; raises :class:`AuthenticationFailed` or :class:`ReplayedDatagram`."""
        self._fast = None
        self._seal_fast.clear()
        if len(sealed) < SEAL_OVERHEAD or len(header) != HEADER_SIZE:
            self.stats["auth_failures"] += 1
            raise AuthenticationFailed(f"sealed body too short: {len(sealed)} bytes")
        sender_tag = bytes(sealed[:TAG_SIZE])
        receiver_tag = bytes(sealed[TAG_SIZE : 2 * TAG_SIZE])
        nonce = _NONCE_PAD + bytes(sealed[2 * TAG_SIZE : _PREFIX])
        aad = bytes(header) + sealed[: 2 * TAG_SIZE]
        try:
            # Authenticate first, so a forgery is always counted as one, whatever its tags say.
            body = self._aead(False, sender_tag, receiver_tag).decrypt(
                nonce, bytes(sealed[_PREFIX:]), aad
            )
        except InvalidTag:
            self.stats["auth_failures"] += 1
            raise AuthenticationFailed("datagram does not authenticate") from None
        self.rules.admit(header[3], sender_tag, receiver_tag, int.from_bytes(nonce[4:], "big"))
        return body

    # -- hooks of the fast and batch paths ------------------------------------------------------

    def fast_path(self) -> FastPath | None:
        """The established pair's :class:`~.rules.FastPath`, until :meth:`open` runs again."""
        fast = self._fast
        if fast is None:
            est = self.rules.established()
            if est is not None:
                peer, window = est
                aead = self._aead(False, peer, self._tags.local_tag)
                fast = self._fast = FastPath(self.rules, peer, window, aead)
        return fast

    def reserve_counters(self, count: int) -> int:
        """Take ``count`` consecutive send counters at once; returns the first."""
        first = self._counter
        self._counter += count
        return first

    def sending(self, header: bytes) -> tuple[bytes, bytes, ChaCha20Poly1305]:
        """``(sender_tag, receiver_tag, cipher)`` a datagram with ``header`` is sealed with."""
        sender_tag = self._tags.local_tag
        receiver_tag = self._tags.receiver_tag_for(header[3])
        return sender_tag, receiver_tag, self._aead(True, sender_tag, receiver_tag)

    # -- whole datagrams (the benchmark data path) --------------------------------------------

    def seal_datagram(self, datagram: bytes) -> bytes:
        """Seal a whole plaintext datagram (4-byte header, then body): header + sealed body."""
        header = bytes(datagram[:HEADER_SIZE])
        fast = self._seal_fast.get(header)
        if fast is None or fast[0] != self._tags.peer_tag or header[3] == _PROBE_ACK:
            sealed = header + self.seal(header, bytes(datagram[HEADER_SIZE:]))
            if len(header) == HEADER_SIZE and header[3] != _PROBE_ACK and len(self._seal_fast) < 8:
                sender_tag, rtag, aead = self.sending(header)
                pair = sender_tag + rtag
                self._seal_fast[header] = (self._tags.peer_tag, aead, header + pair, pair)
            return sealed
        _, aead, aad, pair = fast
        ctr = self._counter.to_bytes(COUNTER_SIZE, "big")
        self._counter += 1
        self.stats["sealed"] += 1
        return header + pair + ctr + aead.encrypt(_NONCE_PAD + ctr, datagram[HEADER_SIZE:], aad)

    def open_datagram(self, data: bytes) -> bytes | None:
        """The plaintext datagram (header + body), or None if it fails (counted in ``stats``)."""
        n = len(data)
        if n < HEADER_SIZE:
            self.stats["auth_failures"] += 1
            return None
        data = bytes(data)
        # The established pair's fast path (the benchmark's pings and pongs).
        fast = self._fast or self.fast_path()
        if fast is not None:
            opened = fast.open_datagram(data)
            if opened is not False:
                return opened
        header = data[:HEADER_SIZE]
        try:
            return header + self.open(header, data[HEADER_SIZE:])
        except RemoteProtocolError:
            return None


class PlainEnvelope:
    """The explicit plaintext mode: session tags but no encryption and no authentication.

    Sealed body: ``sender_tag(8) | receiver_tag(8) | body``.  Same tag rules as
    :class:`PeerCipher` (so a restarting peer is recognised), none of its protection.
    """

    encrypted = False
    """This sealer does not encrypt."""

    def __init__(self, rand_bytes: Callable[[int], bytes]) -> None:
        self.stats: dict[str, int] = new_stats()
        """Same keys as :attr:`PeerCipher.stats` (``auth_failures`` counts malformed envelopes)."""
        self.rules = OpenRules(rand_bytes, self.stats)
        """Tags (the plaintext mode has no counter, so no replay windows)."""
        self._tags = self.rules.tags

    @property
    def local_tag(self) -> bytes:
        """This session's tag."""
        return self._tags.local_tag

    @property
    def peer_tag(self) -> bytes | None:
        """The peer session's tag, once learnt."""
        return self._tags.peer_tag

    def take_peer_restart(self) -> bool:
        """True once after the peer was seen restarting its session."""
        return self._tags.take_restart()

    def seal(self, header: bytes, body: bytes) -> bytes:
        """Prefix the two tags."""
        self.stats["sealed"] += 1
        return self._tags.local_tag + self._tags.receiver_tag_for(header[3]) + body

    def open(self, header: bytes, sealed: bytes) -> bytes:
        """Strip and check the two tags."""
        if len(sealed) < 2 * TAG_SIZE or len(header) != HEADER_SIZE:
            self.stats["auth_failures"] += 1
            raise AuthenticationFailed(f"envelope too short: {len(sealed)} bytes")
        sender_tag = bytes(sealed[:TAG_SIZE])
        receiver_tag = bytes(sealed[TAG_SIZE : 2 * TAG_SIZE])
        self.rules.admit(header[3], sender_tag, receiver_tag, None)
        return bytes(sealed[2 * TAG_SIZE :])

    def seal_datagram(self, datagram: bytes) -> bytes:
        """Wrap a whole plaintext datagram."""
        header = bytes(datagram[:HEADER_SIZE])
        return header + self.seal(header, bytes(datagram[HEADER_SIZE:]))

    def open_datagram(self, data: bytes) -> bytes | None:
        """Unwrap a whole datagram, or None (counted)."""
        if len(data) < HEADER_SIZE:
            self.stats["auth_failures"] += 1
            return None
        header = bytes(data[:HEADER_SIZE])
        try:
            return header + self.open(header, bytes(data[HEADER_SIZE:]))
        except RemoteProtocolError:
            return None
