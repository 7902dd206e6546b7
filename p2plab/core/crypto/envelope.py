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
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from p2plab.core.wire import HEADER_SIZE, MessageType
from p2plab.errors import ConfigError, RemoteProtocolError

from .batch import BatchPaths
from .handshake import (
    EPOCH,
    HANDSHAKE_OVERHEAD,
    HANDSHAKE_PREFIX,
    MAC_SIZE,
    EpochStore,
    data_key,
    handshake_aead,
    handshake_base_key,
    mac1,
    mac1_key,
    mac1_ok,
)
from .keys import KEY_SIZE, Identity, fingerprint
from .rules import (
    COUNTER_SIZE,
    HANDSHAKE_TYPES,
    SEAL_OVERHEAD,
    TAG_SIZE,
    ZERO_TAG,
    AuthenticationFailed,
    FastPath,
    OpenRules,
    ReplayedDatagram,
    new_stats,
)

__all__ = ["PeerCipher", "PlainEnvelope"]

_PREFIX = 2 * TAG_SIZE + COUNTER_SIZE  # tags and counter before the ciphertext
_MAX_HANDSHAKE_KEYS = 8  # per-sender-tag handshake ciphers cached
_MAX_PENDING = 2  # unconfirmed peer sessions held at once (beside the confirmed one)
_PROBE = int(MessageType.PROBE)
_NONCE_PAD = b"\x00\x00\x00\x00"


class _PeerSession:
    """What a cipher knows of one peer session, learnt from its authentic handshake."""

    __slots__ = ("ephemeral", "epoch", "recv", "send")

    def __init__(
        self, ephemeral: bytes, epoch: int, recv: ChaCha20Poly1305, send: ChaCha20Poly1305
    ) -> None:
        self.ephemeral = ephemeral
        self.epoch = epoch
        self.recv = recv  # its data datagrams to us
        self.send = send  # ours to it


class PeerCipher(BatchPaths):
    """The sealer of one peer session: a handshake with fresh ephemeral keys, then data keys.

    Implements :class:`p2plab.core.wire.Sealer` (``seal``/``open`` on the body, the header as
    associated data) and, for the benchmark data path, :meth:`seal_datagram`/:meth:`open_datagram`
    on whole datagrams (and the batches of :class:`~.batch.BatchPaths`).  PROBE and PROBE_ACK
    carry this session's ephemeral key and epoch (:mod:`.handshake`); every other type is sealed
    with a data key that exists once the peer session's ephemeral key was learnt.

    ``epoch`` (the driver's wall clock in ns) orders this worker's sessions; ``epochs`` is the
    link engine's :class:`~.handshake.EpochStore`, shared by every cipher it builds: with it, a
    handshake from a peer session older than the newest one seen from that key is a replay.
    Without one (bare ciphers in tests), epochs are carried but not checked across sessions.
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
        epoch: int = 0,
        epochs: EpochStore | None = None,
    ) -> None:
        if len(peer_public_key) != KEY_SIZE:
            raise ConfigError(f"peer public key must be {KEY_SIZE} bytes")
        self.local_id = local_id
        self.peer_id = peer_id
        self.local_public = identity.public_bytes
        self.peer_public = bytes(peer_public_key)
        self._static = identity.private_key
        self._peer_static = X25519PublicKey.from_public_bytes(self.peer_public)
        try:
            self._ss = self._static.exchange(self._peer_static)
        except ValueError:  # a low-order point: the shared secret would be all zeros
            raise RemoteProtocolError("peer public key is not usable (low-order point)") from None
        self._salt = hashlib.sha256(
            b"p2plab/v1 salt" + b"".join(sorted((self.local_public, self.peer_public)))
        ).digest()
        self.stats: dict[str, int] = new_stats()
        """``sealed``/``opened`` datagrams, ``auth_failures`` (forged, corrupted, or naming no
        session we hold keys for), ``replays`` (seen before, too old, or from an earlier
        session), ``peer_restarts``, ``derivations`` (HKDF runs), ``mac1_failures``,
        ``unknown_tags``."""
        self.rules = OpenRules(rand_bytes, self.stats, replay_window)
        """Tags and replay windows: what decides whether an authentic datagram is accepted."""
        self._tags = self.rules.tags
        self._epochs = epochs
        self.epoch = epochs.issue(epoch, self._tags.local_tag) if epochs else int(epoch)
        """This session's epoch (u64), carried in its handshake datagrams."""
        if not 0 <= self.epoch < 1 << 64:
            raise ConfigError(f"epoch must be a u64, got {self.epoch}")
        # The ephemeral private key lives here only, and dies with this session.
        self._ephemeral = X25519PrivateKey.from_private_bytes(rand_bytes(KEY_SIZE))
        self.ephemeral_public = self._ephemeral.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        """This session's ephemeral public key."""
        me, peer = (local_id, self.local_public), (peer_id, self.peer_public)
        self._hs_send = handshake_aead(
            handshake_base_key(self._ss, self._salt, me, peer), self._tags.local_tag
        )
        self._hs_recv_base = handshake_base_key(self._ss, self._salt, peer, me)
        self.stats["derivations"] += 2
        self._hs_recv: OrderedDict[bytes, ChaCha20Poly1305] = OrderedDict()
        self._hs_prefix = self.ephemeral_public + EPOCH.pack(self.epoch)
        self._mac1_send = mac1_key(self.peer_public)
        self._mac1_recv = mac1_key(self.local_public)
        self._peers: dict[bytes, _PeerSession] = {}
        self._pending: OrderedDict[bytes, None] = OrderedDict()  # unconfirmed peer tags
        self._rand_bytes = rand_bytes
        self._dead: ChaCha20Poly1305 | None = None
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

    def is_new_peer_session(self, data: bytes) -> bool:
        """Whether the whole datagram ``data`` would make this cipher try a peer session it does
        not know: a PROBE or PROBE_ACK with a right mac1, naming a session of ours (or none, on
        a first PROBE), whose sender tag is neither held nor retired.

        No decryption: a tag lookup and, for an unknown tag only, one mac1.  The session
        rate-limits these per source before :meth:`open` runs (what follows in :meth:`open` is
        a handshake key, a decryption and the key derivation).
        """
        if len(data) < HEADER_SIZE + HANDSHAKE_OVERHEAD or data[3] not in HANDSHAKE_TYPES:
            return False
        data = bytes(data)
        sender_tag = data[HEADER_SIZE : HEADER_SIZE + TAG_SIZE]
        if sender_tag in self._peers or sender_tag in self._tags.retired:
            return False
        receiver_tag = data[HEADER_SIZE + TAG_SIZE : HEADER_SIZE + 2 * TAG_SIZE]
        if receiver_tag != self._tags.local_tag and not (
            receiver_tag == ZERO_TAG and data[3] == _PROBE
        ):
            return False  # open() refuses it without cryptography
        return mac1_ok(self._mac1_recv, data)

    # -- keys -------------------------------------------------------------------------------

    def _data_send(self, receiver_tag: bytes) -> ChaCha20Poly1305:
        peer = self._peers.get(receiver_tag)
        if peer is not None:
            return peer.send
        # No handshake from that peer session yet, so no data key: seal with a key nobody
        # holds (the peer drops it before any cryptography, as it would a stale datagram).
        if self._dead is None:
            self._dead = ChaCha20Poly1305(self._rand_bytes(32))
        return self._dead

    def _hs_aead(self, sender_tag: bytes) -> ChaCha20Poly1305:
        aead = self._hs_recv.get(sender_tag)
        if aead is None:
            aead = self._hs_recv[sender_tag] = handshake_aead(self._hs_recv_base, sender_tag)
            while len(self._hs_recv) > _MAX_HANDSHAKE_KEYS:
                self._hs_recv.popitem(last=False)
        return aead

    def _derive(self, sender_tag: bytes, ephemeral: bytes, epoch: int) -> _PeerSession:
        """Data keys with an authenticated peer session (raises ValueError: low-order key)."""
        peer_eph = X25519PublicKey.from_public_bytes(ephemeral)
        ee = self._ephemeral.exchange(peer_eph)
        mine = self._ephemeral.exchange(self._peer_static)  # our ephemeral, its static
        theirs = self._static.exchange(peer_eph)  # our static, its ephemeral
        me = (self.local_id, self.local_public, self.ephemeral_public, self._tags.local_tag)
        peer = (self.peer_id, self.peer_public, ephemeral, sender_tag)
        send = data_key(self._ss + ee + mine + theirs, self._salt, me, peer)
        recv = data_key(self._ss + ee + theirs + mine, self._salt, peer, me)
        self.stats["derivations"] += 2
        return _PeerSession(ephemeral, epoch, recv, send)

    # -- Sealer -----------------------------------------------------------------------------

    def seal(self, header: bytes, body: bytes) -> bytes:
        """Encrypt ``body``; ``header`` (4 bytes) is authenticated too."""
        kind = header[3]
        sender_tag = self._tags.local_tag
        receiver_tag = self._tags.receiver_tag_for(kind)
        counter = self._counter
        self._counter += 1
        prefix = sender_tag + receiver_tag + counter.to_bytes(COUNTER_SIZE, "big")
        nonce = _NONCE_PAD + prefix[2 * TAG_SIZE :]
        aad = bytes(header) + prefix[: 2 * TAG_SIZE]
        self.stats["sealed"] += 1
        if kind in HANDSHAKE_TYPES:
            out = prefix + self._hs_send.encrypt(nonce, self._hs_prefix + body, aad)
            return out + mac1(self._mac1_send, bytes(header) + out)
        return prefix + self._data_send(receiver_tag).encrypt(nonce, body, aad)

    def open(self, header: bytes, sealed: bytes) -> bytes:
        """Decrypt and check; raises :class:`AuthenticationFailed` or :class:`ReplayedDatagram`.

        Cheap checks come first (mac1 of a handshake datagram, then the tags); nothing that
        fails them reaches a cipher, and only an authentic first contact of a new peer session
        derives keys.
        """
        self._fast = None
        self._seal_fast.clear()
        if len(sealed) < SEAL_OVERHEAD or len(header) != HEADER_SIZE:
            self._fail(f"sealed body too short: {len(sealed)} bytes")
        kind = header[3]
        sealed = bytes(sealed)
        if kind in HANDSHAKE_TYPES:
            return self._open_handshake(bytes(header), sealed)
        sender_tag = sealed[:TAG_SIZE]
        receiver_tag = sealed[TAG_SIZE : 2 * TAG_SIZE]
        self._check_tags(kind, sender_tag, receiver_tag)
        peer = self._peers.get(sender_tag)
        if peer is None:
            self._fail("no session key for its sender tag", unknown=True)
        nonce = _NONCE_PAD + sealed[2 * TAG_SIZE : _PREFIX]
        try:
            aad = bytes(header) + sealed[: 2 * TAG_SIZE]
            body = peer.recv.decrypt(nonce, sealed[_PREFIX:], aad)
        except InvalidTag:
            self._fail("datagram does not authenticate")
        self.rules.admit(kind, sender_tag, receiver_tag, int.from_bytes(nonce[4:], "big"))
        self._tidy()
        return body

    def _fail(self, why: str, *, unknown: bool = False, mac: bool = False) -> NoReturn:
        self.stats["auth_failures"] += 1
        if unknown:
            self.stats["unknown_tags"] += 1
        if mac:
            self.stats["mac1_failures"] += 1
        raise AuthenticationFailed(why)

    def _check_tags(self, kind: int, sender_tag: bytes, receiver_tag: bytes) -> None:
        """The tag checks that need no cryptography (rule 3, made cheap)."""
        tags = self._tags
        if receiver_tag != tags.local_tag and not (receiver_tag == ZERO_TAG and kind == _PROBE):
            if self._epochs is not None and self._epochs.was_local_tag(receiver_tag):
                self.stats["replays"] += 1
                raise ReplayedDatagram("stale datagram: sealed for an earlier session of ours")
            self._fail("names no session of ours", unknown=True)
        if sender_tag in tags.retired:
            self.stats["replays"] += 1
            raise ReplayedDatagram("stale datagram: from an earlier session of the peer")

    def _open_handshake(self, header: bytes, sealed: bytes) -> bytes:
        if len(sealed) < HANDSHAKE_OVERHEAD:
            self._fail(f"handshake too short: {len(sealed)} bytes", mac=True)
        if not mac1_ok(self._mac1_recv, header + sealed):
            self._fail("mac1 does not match", mac=True)
        kind = header[3]
        sender_tag = sealed[:TAG_SIZE]
        receiver_tag = sealed[TAG_SIZE : 2 * TAG_SIZE]
        self._check_tags(kind, sender_tag, receiver_tag)
        nonce = _NONCE_PAD + sealed[2 * TAG_SIZE : _PREFIX]
        try:
            plain = self._hs_aead(sender_tag).decrypt(
                nonce, sealed[_PREFIX:-MAC_SIZE], header + sealed[: 2 * TAG_SIZE]
            )
        except InvalidTag:
            self._fail("handshake does not authenticate")
        ephemeral = plain[:KEY_SIZE]
        epoch = EPOCH.unpack_from(plain, KEY_SIZE)[0]
        counter = int.from_bytes(nonce[4:], "big")
        peer = self._peers.get(sender_tag)
        if peer is not None:
            if peer.ephemeral != ephemeral or peer.epoch != epoch:
                self._fail("a peer session changed its ephemeral key or epoch")
            self.rules.admit(kind, sender_tag, receiver_tag, counter, self._newer(epoch))
        else:
            self._new_peer(kind, sender_tag, receiver_tag, counter, ephemeral, epoch)
        self._tidy()
        return plain[HANDSHAKE_PREFIX:]

    def _newer(self, epoch: int) -> bool:
        current = self._tags.peer_tag
        peer = self._peers.get(current) if current is not None else None
        return peer is None or epoch >= peer.epoch

    def _new_peer(
        self,
        kind: int,
        sender_tag: bytes,
        receiver_tag: bytes,
        counter: int,
        ephemeral: bytes,
        epoch: int,
    ) -> None:
        """An authentic handshake from a peer session new to us: check its epoch, derive keys."""
        if self._epochs is not None:
            why = self._epochs.refusal(self.peer_public, epoch, ephemeral)
            if why is not None:
                self.stats["replays"] += 1
                raise ReplayedDatagram(f"stale handshake: {why}")
        try:
            peer = self._derive(sender_tag, ephemeral, epoch)
        except ValueError:  # a low-order ephemeral key, from a holder of the static key
            self._fail("peer ephemeral key is not usable (low-order point)")
        # At most a few unconfirmed peer sessions: the oldest goes (never the confirmed one).
        while len(self._pending) >= _MAX_PENDING:
            old, _ = self._pending.popitem(last=False)
            self._peers.pop(old, None)
            self.rules.forget(old)
        newer = self._newer(epoch)
        self._peers[sender_tag] = peer
        self._pending[sender_tag] = None
        try:
            self.rules.admit(kind, sender_tag, receiver_tag, counter, newer)
        except ReplayedDatagram:  # pragma: no cover - a new tag passed the checks above
            self._peers.pop(sender_tag, None)
            self._pending.pop(sender_tag, None)
            raise
        if self._epochs is not None:
            self._epochs.accepted(self.peer_public, epoch, ephemeral)

    def _tidy(self) -> None:
        """After the rules ran: a confirmed peer session is no longer pending, retired ones go."""
        tags = self._tags
        if tags.confirmed and tags.peer_tag is not None:
            self._pending.pop(tags.peer_tag, None)
        if len(self._peers) > 1:
            for tag in [t for t in self._peers if t in tags.retired]:
                del self._peers[tag]
                self._pending.pop(tag, None)
                self.rules.windows.pop(tag, None)

    # -- hooks of the fast and batch paths ------------------------------------------------------

    def fast_path(self) -> FastPath | None:
        """The established pair's :class:`~.rules.FastPath`, until :meth:`open` runs again."""
        fast = self._fast
        if fast is None:
            est = self.rules.established()
            if est is not None:
                tag, window = est
                peer = self._peers.get(tag)
                if peer is not None:
                    fast = self._fast = FastPath(self.rules, tag, window, peer.recv)
        return fast

    def reserve_counters(self, count: int) -> int:
        """Take ``count`` consecutive send counters at once; returns the first."""
        first = self._counter
        self._counter += count
        return first

    def sending(self, header: bytes) -> tuple[bytes, bytes, ChaCha20Poly1305]:
        """``(sender_tag, receiver_tag, cipher)`` a data datagram with ``header`` is sealed with.

        Handshake types are sealed one at a time by :meth:`seal` (they carry more than this).
        """
        if header[3] in HANDSHAKE_TYPES:
            raise ValueError("handshake datagrams (PROBE, PROBE_ACK) are sealed by seal()")
        sender_tag = self._tags.local_tag
        receiver_tag = self._tags.receiver_tag_for(header[3])
        return sender_tag, receiver_tag, self._data_send(receiver_tag)

    # -- whole datagrams (the benchmark data path) --------------------------------------------

    def seal_datagram(self, datagram: bytes) -> bytes:
        """Seal a whole plaintext datagram (4-byte header, then body): header + sealed body."""
        header = bytes(datagram[:HEADER_SIZE])
        fast = self._seal_fast.get(header)
        if fast is None or fast[0] != self._tags.peer_tag:
            sealed = header + self.seal(header, bytes(datagram[HEADER_SIZE:]))
            if (
                len(header) == HEADER_SIZE
                and header[3] not in HANDSHAKE_TYPES
                and len(self._seal_fast) < 8
            ):
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
