"""Encrypted, authenticated peer datagrams: X25519, HKDF-SHA256 and ChaCha20-Poly1305 (issue 8).

Each worker holds an X25519 key pair (:class:`Identity`); its public key travels to the peer in the
rendezvous offer (``Register.public_key`` -> ``P2PConnectionOffer.peer_public_key``, base64 of the
32 raw bytes).  A :class:`PeerCipher` is the :class:`~p2plab.core.wire.Sealer` of one peer session.
Every datagram on the punched path, probes included, is sealed::

    header(4) | sender_tag(8) | receiver_tag(8) | counter(8) | ChaCha20-Poly1305(body) + tag(16)

* ``sender_tag`` is a random 8-byte tag picked by each session when it starts; ``receiver_tag`` is
  the peer session's tag as the sender last learnt it, or eight zero bytes when it knows none yet
  (allowed for PROBE only, the first contact).
* The key of one direction is ``HKDF-SHA256(ikm = X25519(own private, peer public), salt =
  SHA-256("p2plab/v1 salt" | the two public keys sorted), info = "p2plab/v1 datagram" | u16
  length | sender id | u16 length | receiver id (ids in UTF-8) | sender public key | receiver
  public key | sender_tag | receiver_tag)``: one key per direction, bound to both ids, both keys
  and both sessions.  Fresh session tags give fresh keys, so a counter that starts again at 0 in
  a new session never reuses a nonce.
* The nonce is four zero bytes and the 64-bit big-endian counter (RFC 8439 section 2.8 leaves the
  construction to the protocol; the key is never shared between directions or sessions).  The
  associated data is the 4-byte header and both tags, so nothing outside the ciphertext can be
  changed either.
* The receiver keeps a sliding-bitmap replay window (:class:`ReplayWindow`, 1024 wide, as in
  RFC 4303 section 3.4.3) per sender tag.  A datagram naming another receiver tag than ours (one
  sealed for an earlier session of ours) or a sender tag we retired is stale and counted as a
  replay.

Session tags also let a :class:`~p2plab.core.session.PeerSession` tolerate a peer that restarts its
session (both ends re-punch independently after a NAT lost its mapping): when an authenticated
datagram that names our tag arrives with a new sender tag, :meth:`PeerCipher.take_peer_restart`
reports it once and the session resets its reliable stream instead of confusing the new
session's sequence numbers with the old ones.  :class:`PlainEnvelope` carries the same tags
without any cryptography, for the explicit plaintext mode.

Datagrams that fail are raised as :class:`AuthenticationFailed` or :class:`ReplayedDatagram` (both
:class:`~p2plab.errors.RemoteProtocolError`) and counted in ``stats``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2plab.core.wire import HEADER_SIZE, MessageType
from p2plab.errors import ConfigError, RemoteProtocolError

__all__ = [
    "KEY_SIZE",
    "SEAL_OVERHEAD",
    "TAG_SIZE",
    "AuthenticationFailed",
    "Identity",
    "PeerCipher",
    "PlainEnvelope",
    "ReplayWindow",
    "ReplayedDatagram",
    "decode_public_key",
    "fingerprint",
]

KEY_SIZE = 32
"""Bytes of an X25519 public or private key."""

TAG_SIZE = 8
"""Bytes of a session tag."""

_COUNTER_SIZE = 8
_AEAD_TAG = 16
_PREFIX = 2 * TAG_SIZE + _COUNTER_SIZE
SEAL_OVERHEAD = _PREFIX + _AEAD_TAG
"""Bytes a sealed datagram carries beyond the plaintext one (tags, counter, Poly1305 tag)."""

_ZERO_TAG = bytes(TAG_SIZE)
_MAX_WINDOWS = 4  # sender tags with a live replay window
_MAX_RETIRED = 64  # retired sender tags remembered
_MAX_KEYS = 8  # derived keys cached
_PROBE = int(MessageType.PROBE)
_PROBE_ACK = int(MessageType.PROBE_ACK)
_NONCE = struct.Struct(">IQ")  # four zero bytes, then the counter
_COUNTER = struct.Struct(">Q")
_SEALED_HEAD = struct.Struct(">4s8s8sQ")  # p2p header, sender tag, receiver tag, counter
_NONCE_PAD = b"\x00\x00\x00\x00"
_CTR_AT = HEADER_SIZE + 2 * TAG_SIZE  # where a sealed datagram's counter starts
_BODY_AT = HEADER_SIZE + _PREFIX  # and its ciphertext
Buffer = bytes | bytearray | memoryview


class AuthenticationFailed(RemoteProtocolError):
    """A sealed datagram did not authenticate (forged, corrupted, or for other keys)."""


class ReplayedDatagram(RemoteProtocolError):
    """An authentic datagram seen before, too old for the window, or from an earlier session."""


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


class ReplayWindow:
    """Sliding-bitmap anti-replay window over 64-bit counters (RFC 4303 section 3.4.3 style)."""

    __slots__ = ("_bits", "_mask", "size", "top")

    def __init__(self, size: int = 1024) -> None:
        if size < 1:
            raise ConfigError(f"replay window must be >= 1, got {size}")
        self.size = size
        self.top = -1
        """Highest counter accepted so far (-1: none)."""
        self._bits = 0  # bit i set: counter top - i was accepted
        self._mask = (1 << size) - 1

    def fresh(self, counter: int) -> bool:
        """True if ``counter`` was not accepted before and is not too old for the window."""
        if counter > self.top:
            return True
        offset = self.top - counter
        if offset >= self.size:
            return False
        return not (self._bits >> offset) & 1

    def accept_run(self, first: int, count: int) -> None:
        """Mark ``first .. first + count - 1`` as seen, all above :attr:`top` (one update)."""
        if count <= 0:
            return
        if first <= self.top:
            for c in range(first, first + count):
                if self.fresh(c):
                    self.accept(c)
            return
        last = first + count - 1
        shift = last - self.top
        run = (1 << min(count, self.size)) - 1
        self._bits = ((self._bits << shift) | run) & self._mask if shift < self.size else run
        self.top = last

    def accept(self, counter: int) -> None:
        """Mark ``counter`` as seen (call after the datagram authenticated)."""
        if counter > self.top:
            shift = counter - self.top
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self.top = counter
        else:
            self._bits |= 1 << (self.top - counter)


class _TagTracker:
    """Session tags of both ends (shared by :class:`PeerCipher` and :class:`PlainEnvelope`)."""

    def __init__(self, rand_bytes: Callable[[int], bytes]) -> None:
        tag = rand_bytes(TAG_SIZE)
        while tag == _ZERO_TAG:  # pragma: no cover - 2**-64
            tag = rand_bytes(TAG_SIZE)
        self.local_tag: bytes = tag
        self.peer_tag: bytes | None = None
        self._confirmed = False  # the peer has named our tag
        self._reply_tag: bytes | None = None  # sender tag of the datagram opened last
        self._restarted = False
        self.retired: OrderedDict[bytes, None] = OrderedDict()

    def retire(self, tag: bytes) -> None:
        self.retired[tag] = None
        while len(self.retired) > _MAX_RETIRED:
            self.retired.popitem(last=False)

    def receiver_tag_for(self, kind: int) -> bytes:
        if kind == _PROBE_ACK and self._reply_tag is not None:
            return self._reply_tag  # answer the probe's session, whatever we think of it
        return self.peer_tag if self.peer_tag is not None else _ZERO_TAG

    def stale(self, kind: int, sender_tag: bytes, receiver_tag: bytes) -> str | None:
        if receiver_tag != self.local_tag and not (receiver_tag == _ZERO_TAG and kind == _PROBE):
            return "sealed for an earlier session of ours"
        if sender_tag in self.retired:
            return "from an earlier session of the peer"
        return None

    def accepted(self, sender_tag: bytes, receiver_tag: bytes, stats: dict[str, int]) -> None:
        self._reply_tag = sender_tag
        if receiver_tag == self.local_tag:
            if self.peer_tag is None or not self._confirmed:
                self.peer_tag = sender_tag
                self._confirmed = True
            elif sender_tag != self.peer_tag:
                self.retire(self.peer_tag)
                self.peer_tag = sender_tag
                self._restarted = True
                stats["peer_restarts"] += 1
        elif not self._confirmed:
            self.peer_tag = sender_tag  # first contact: the newest probing session wins

    def take_restart(self) -> bool:
        restarted, self._restarted = self._restarted, False
        return restarted


class PeerCipher:
    """The sealer of one peer session: ChaCha20-Poly1305 with per-direction HKDF keys.

    Implements :class:`p2plab.core.wire.Sealer` (``seal``/``open`` on the body, the header as
    associated data) and, for the benchmark data path, :meth:`seal_datagram`/:meth:`open_datagram`
    on whole datagrams.
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
        self._tags = _TagTracker(rand_bytes)
        self._replay_window = replay_window
        self._windows: OrderedDict[bytes, ReplayWindow] = OrderedDict()
        self._keys: OrderedDict[tuple[bool, bytes, bytes], ChaCha20Poly1305] = OrderedDict()
        self._counter = 0
        # Fast paths of the established session pair (dropped whenever :meth:`open` runs, the
        # only place where tags, windows and retirements change): for opening, the peer's and
        # our tag, the replay window and the cipher; for sealing, per header, the receiver tag
        # it was built for, the cipher, the associated data and the two tags.
        self._open_fast: tuple[bytes, ReplayWindow, ChaCha20Poly1305] | None = None
        self._seal_fast: dict[bytes, tuple[bytes | None, ChaCha20Poly1305, bytes, bytes]] = {}
        self.stats: dict[str, int] = {
            "sealed": 0,
            "opened": 0,
            "auth_failures": 0,
            "replays": 0,
            "peer_restarts": 0,
        }
        """``sealed``/``opened`` datagrams, ``auth_failures`` (forged or corrupted), ``replays``
        (seen before, too old, or from an earlier session), ``peer_restarts``."""

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
        prefix = sender_tag + receiver_tag + counter.to_bytes(_COUNTER_SIZE, "big")
        nonce = b"\x00\x00\x00\x00" + prefix[2 * TAG_SIZE :]
        aad = bytes(header) + prefix[: 2 * TAG_SIZE]
        self.stats["sealed"] += 1
        return prefix + self._aead(True, sender_tag, receiver_tag).encrypt(nonce, body, aad)

    def open(self, header: bytes, sealed: bytes) -> bytes:
        """Decrypt and check; raises :class:`AuthenticationFailed` or :class:`ReplayedDatagram`."""
        self._open_fast = None
        self._seal_fast.clear()
        if len(sealed) < SEAL_OVERHEAD or len(header) != HEADER_SIZE:
            self.stats["auth_failures"] += 1
            raise AuthenticationFailed(f"sealed body too short: {len(sealed)} bytes")
        sender_tag = bytes(sealed[:TAG_SIZE])
        receiver_tag = bytes(sealed[TAG_SIZE : 2 * TAG_SIZE])
        nonce = b"\x00\x00\x00\x00" + bytes(sealed[2 * TAG_SIZE : _PREFIX])
        counter = int.from_bytes(nonce[4:], "big")
        aad = bytes(header) + sealed[: 2 * TAG_SIZE]
        try:
            # Authenticate first, so a forgery is always counted as one, whatever its tags say.
            body = self._aead(False, sender_tag, receiver_tag).decrypt(
                nonce, bytes(sealed[_PREFIX:]), aad
            )
        except InvalidTag:
            self.stats["auth_failures"] += 1
            raise AuthenticationFailed("datagram does not authenticate") from None
        why = self._tags.stale(header[3], sender_tag, receiver_tag)
        if why is not None:
            self.stats["replays"] += 1
            raise ReplayedDatagram(f"stale datagram: {why}")
        window = self._windows.get(sender_tag)
        if window is None:
            window = self._windows[sender_tag] = ReplayWindow(self._replay_window)
            while len(self._windows) > _MAX_WINDOWS:
                old, _ = self._windows.popitem(last=False)
                self._tags.retire(old)  # forgetting its window must not reopen it to replays
        if not window.fresh(counter):
            self.stats["replays"] += 1
            raise ReplayedDatagram(f"replayed datagram (counter {counter})")
        window.accept(counter)
        self._windows.move_to_end(sender_tag)
        self._tags.accepted(sender_tag, receiver_tag, self.stats)
        self.stats["opened"] += 1
        return body

    # -- whole datagrams (the benchmark data path) --------------------------------------------

    def seal_datagram(self, datagram: bytes) -> bytes:
        """Seal a whole plaintext datagram (4-byte header, then body): header + sealed body."""
        header = bytes(datagram[:HEADER_SIZE])
        fast = self._seal_fast.get(header)
        if fast is None or fast[0] != self._tags.peer_tag or header[3] == _PROBE_ACK:
            sealed = header + self.seal(header, bytes(datagram[HEADER_SIZE:]))
            if len(header) == HEADER_SIZE and header[3] != _PROBE_ACK and len(self._seal_fast) < 8:
                tags = self._tags
                rtag = tags.receiver_tag_for(header[3])
                aead = self._aead(True, tags.local_tag, rtag)
                pair = tags.local_tag + rtag
                self._seal_fast[header] = (tags.peer_tag, aead, header + pair, pair)
            return sealed
        _, aead, aad, pair = fast
        ctr = self._counter.to_bytes(_COUNTER_SIZE, "big")
        self._counter += 1
        self.stats["sealed"] += 1
        return header + pair + ctr + aead.encrypt(_NONCE_PAD + ctr, datagram[HEADER_SIZE:], aad)

    def _fast_open(self) -> tuple[bytes, ReplayWindow, ChaCha20Poly1305] | None:
        """The fast path of the established session pair, if there is one."""
        st = self._open_fast
        if st is None:
            tags = self._tags
            peer = tags.peer_tag
            if tags._confirmed and peer is not None and peer not in tags.retired:
                win = self._windows.get(peer)
                if win is not None:
                    aead = self._aead(False, peer, tags.local_tag)
                    st = self._open_fast = (peer + tags.local_tag, win, aead)
        return st

    def open_datagram(self, data: bytes) -> bytes | None:
        """The plaintext datagram (header + body), or None if it fails (counted in ``stats``)."""
        if len(data) < HEADER_SIZE:
            self.stats["auth_failures"] += 1
            return None
        data = bytes(data)
        fast = self._open_fast or self._fast_open()
        # The established pair's fast path (the benchmark's pings and pongs): the associated
        # data is the datagram's first 20 bytes as they stand (header, sender and receiver tag).
        if (
            fast is not None
            and len(data) >= HEADER_SIZE + SEAL_OVERHEAD
            and data[HEADER_SIZE:_CTR_AT] == fast[0]
        ):
            key, window, aead = fast
            ctr = data[_CTR_AT:_BODY_AT]
            try:
                body = aead.decrypt(_NONCE_PAD + ctr, data[_BODY_AT:], data[:_CTR_AT])
            except InvalidTag:
                self.stats["auth_failures"] += 1
                return None
            c = int.from_bytes(ctr, "big")
            if not window.fresh(c):
                self.stats["replays"] += 1
                return None
            window.accept(c)
            self._tags._reply_tag = key[:TAG_SIZE]
            self._windows.move_to_end(key[:TAG_SIZE])
            self.stats["opened"] += 1
            return data[:HEADER_SIZE] + body
        header = data[:HEADER_SIZE]
        try:
            return header + self.open(header, data[HEADER_SIZE:])
        except RemoteProtocolError:
            return None

    # -- batches (the benchmark data path) ----------------------------------------------------

    def seal_many(
        self,
        src: Buffer,
        size: int,
        count: int,
        dst: bytearray | memoryview,
    ) -> None:
        """Seal ``count`` whole datagrams of ``size`` bytes laid back to back in ``src``.

        Datagram ``i`` sealed (``size + SEAL_OVERHEAD`` bytes, the same bytes
        :meth:`seal_datagram` would give) is written at ``i * (size + SEAL_OVERHEAD)`` in
        ``dst``: a counter range is reserved at once, the cipher object is looked up once per
        distinct header, and the ciphertext goes straight into ``dst`` (no intermediate copy).
        """
        if size < HEADER_SIZE:
            raise ValueError(f"datagrams must be >= {HEADER_SIZE} bytes, got {size}")
        out_size = size + SEAL_OVERHEAD
        if len(src) < size * count or len(dst) < out_size * count:
            raise ValueError("buffers too small for the batch")
        sv = memoryview(src)
        dv = memoryview(dst)
        sender_tag = self._tags.local_tag
        counter = self._counter
        self._counter += count
        self.stats["sealed"] += count
        pack_head = _SEALED_HEAD.pack_into
        pack_nonce = _NONCE.pack
        last: bytes | None = None
        receiver_tag = _ZERO_TAG
        aad = b""
        aead: ChaCha20Poly1305 | None = None
        body_at = HEADER_SIZE + _PREFIX
        first = bytes(sv[:HEADER_SIZE])
        # One header for the whole batch (the benchmark's case)?  Four strided compares.
        span = sv[: size * count]
        uniform = all(span[k::size] == first[k : k + 1] * count for k in range(HEADER_SIZE))
        if uniform:
            receiver_tag = self._tags.receiver_tag_for(first[3])
            aead = self._aead(True, sender_tag, receiver_tag)
            aad = first + sender_tag + receiver_tag
            for i in range(count):
                so = i * size
                do = i * out_size
                c = counter + i
                pack_head(dv, do, first, sender_tag, receiver_tag, c)
                aead.encrypt_into(
                    pack_nonce(0, c),
                    sv[so + HEADER_SIZE : so + size],
                    aad,
                    dv[do + body_at : do + out_size],
                )
            return
        for i in range(count):
            so = i * size
            do = i * out_size
            header = bytes(sv[so : so + HEADER_SIZE])
            if header != last or aead is None:
                receiver_tag = self._tags.receiver_tag_for(header[3])
                aead = self._aead(True, sender_tag, receiver_tag)
                aad = header + sender_tag + receiver_tag
                last = header
            c = counter + i
            pack_head(dv, do, header, sender_tag, receiver_tag, c)
            aead.encrypt_into(
                pack_nonce(0, c),
                sv[so + HEADER_SIZE : so + size],
                aad,
                dv[do + body_at : do + out_size],
            )

    def open_many(self, buf: Buffer, spans: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Open whole sealed datagrams ``buf[start:end]`` for each span; bodies or None.

        Returns, per span, the plaintext *body* (the datagram after its 4-byte header, which
        stays in clear in ``buf``), or None if it fails (counted in ``stats`` exactly as
        :meth:`open` counts).  Datagrams of the established session pair take a fast path (the
        cipher, associated data and replay window looked up once per batch); anything else goes
        through :meth:`open`, so the rules are the same.
        """
        mv = memoryview(buf)
        out: list[bytes | None] = []
        append = out.append
        tags = self._tags
        key: bytes | None = None  # sender_tag + receiver_tag of the fast path
        head: bytes | None = None
        window: ReplayWindow | None = None
        aead: ChaCha20Poly1305 | None = None
        aad = b""
        opened = failed = replayed = 0
        body_at = HEADER_SIZE + _PREFIX
        ctr_at = HEADER_SIZE + 2 * TAG_SIZE
        for start, end in spans:
            if end - start < HEADER_SIZE + SEAL_OVERHEAD:
                failed += 1
                append(None)
                continue
            header = bytes(mv[start : start + HEADER_SIZE])
            pair = bytes(mv[start + HEADER_SIZE : start + ctr_at])
            if key is None:
                fast = self._fast_open()
                if fast is not None:
                    key, window, aead = fast
            if pair == key and (header == head or head is None) and aead is not None:
                if head is None:
                    head = header
                    aad = header + pair
                assert window is not None
                nonce = bytes(mv[start + ctr_at : start + body_at])
                try:
                    body = aead.decrypt(_NONCE_PAD + nonce, mv[start + body_at : end], aad)
                except InvalidTag:
                    failed += 1
                    append(None)
                    continue
                c = int.from_bytes(nonce, "big")
                if not window.fresh(c):
                    replayed += 1
                    append(None)
                    continue
                window.accept(c)
                opened += 1
                append(body)
                continue
            # Anything else (first contact, another session, another header): the full rules.
            key = head = window = aead = None
            self.stats["opened"] += opened
            self.stats["auth_failures"] += failed
            self.stats["replays"] += replayed
            opened = failed = replayed = 0
            try:
                append(self.open(header, bytes(mv[start + HEADER_SIZE : end])))
            except RemoteProtocolError:
                append(None)
        if opened:
            assert key is not None
            tags._reply_tag = key[:TAG_SIZE]
            self._windows.move_to_end(key[:TAG_SIZE])
        self.stats["opened"] += opened
        self.stats["auth_failures"] += failed
        self.stats["replays"] += replayed
        return out

    def open_many_into(
        self,
        buf: Buffer,
        spans: Sequence[tuple[int, int]],
        out: bytearray | memoryview,
        stride: int,
    ) -> list[bool]:
        """:meth:`open_many` without a bytes object per datagram: body ``i`` goes to ``out``.

        The plaintext body of span ``i`` (its length is the span's minus ``HEADER_SIZE +
        SEAL_OVERHEAD``) is written at ``i * stride`` in ``out``; returns, per span, whether it
        opened.  Same rules and counting as :meth:`open`; a run of consecutive counters above
        the replay window is accepted in one update.  Bodies longer than ``stride`` fail.
        """
        mv = memoryview(buf)
        ov = memoryview(out)
        if len(ov) < stride * len(spans):
            raise ValueError("output buffer too small for the batch")
        oks: list[bool] = []
        append = oks.append
        ctr_at = HEADER_SIZE + 2 * TAG_SIZE
        body_at = HEADER_SIZE + _PREFIX
        overhead = HEADER_SIZE + SEAL_OVERHEAD
        opened = failed = replayed = 0
        fast = self._fast_open()
        headpair: bytes | None = None
        unpack_ctr = _COUNTER.unpack_from
        pack_nonce = _NONCE.pack
        run_first = run_next = -1  # a pending run of fresh counters (accepted at once)
        top = fast[1].top if fast is not None else -1
        for i, (start, end) in enumerate(spans):
            n = end - start - overhead
            if n < 0 or n > stride:
                failed += 1
                append(False)
                continue
            if fast is not None:
                key, window, aead = fast
                hp = mv[start : ctr_at + start]
                if headpair is None and hp[HEADER_SIZE:] == key:
                    headpair = bytes(hp)
                if headpair is not None and hp == headpair:
                    c = unpack_ctr(mv, start + ctr_at)[0]
                    try:
                        aead.decrypt_into(
                            pack_nonce(0, c), mv[start + body_at : end], headpair,
                            ov[i * stride : i * stride + n],
                        )  # fmt: skip
                    except InvalidTag:
                        failed += 1
                        append(False)
                        continue
                    if c > top:
                        if c != run_next:
                            if run_next >= 0:
                                window.accept_run(run_first, run_next - run_first)
                            run_first = c
                        run_next = c + 1
                        top = c
                    else:
                        if run_next >= 0:
                            window.accept_run(run_first, run_next - run_first)
                            run_first = run_next = -1
                        if not window.fresh(c):
                            replayed += 1
                            append(False)
                            continue
                        window.accept(c)
                    opened += 1
                    append(True)
                    continue
            # Anything else: the full rules (which may change tags and windows).
            if fast is not None and run_next >= 0:
                fast[1].accept_run(run_first, run_next - run_first)
            run_first = run_next = -1
            if opened and fast is not None:
                self._tags._reply_tag = fast[0][:TAG_SIZE]
                self._windows.move_to_end(fast[0][:TAG_SIZE])
            self.stats["opened"] += opened
            self.stats["auth_failures"] += failed
            self.stats["replays"] += replayed
            opened = failed = replayed = 0
            header = bytes(mv[start : start + HEADER_SIZE])
            try:
                body = self.open(header, bytes(mv[start + HEADER_SIZE : end]))
            except RemoteProtocolError:
                append(False)
            else:
                ov[i * stride : i * stride + len(body)] = body
                append(True)
            fast = self._fast_open()
            headpair = None
            top = fast[1].top if fast is not None else -1
        if fast is not None:
            if run_next >= 0:
                fast[1].accept_run(run_first, run_next - run_first)
            if opened:
                self._tags._reply_tag = fast[0][:TAG_SIZE]
                self._windows.move_to_end(fast[0][:TAG_SIZE])
        self.stats["opened"] += opened
        self.stats["auth_failures"] += failed
        self.stats["replays"] += replayed
        return oks


class PlainEnvelope:
    """The explicit plaintext mode: session tags but no encryption and no authentication.

    Sealed body: ``sender_tag(8) | receiver_tag(8) | body``.  Same tag rules as
    :class:`PeerCipher` (so a restarting peer is recognised), none of its protection.
    """

    encrypted = False
    """This sealer does not encrypt."""

    def __init__(self, rand_bytes: Callable[[int], bytes]) -> None:
        self._tags = _TagTracker(rand_bytes)
        self.stats: dict[str, int] = {
            "sealed": 0,
            "opened": 0,
            "auth_failures": 0,
            "replays": 0,
            "peer_restarts": 0,
        }
        """Same keys as :attr:`PeerCipher.stats` (``auth_failures`` counts malformed envelopes)."""

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
        why = self._tags.stale(header[3], sender_tag, receiver_tag)
        if why is not None:
            self.stats["replays"] += 1
            raise ReplayedDatagram(f"stale datagram: {why}")
        self._tags.accepted(sender_tag, receiver_tag, self.stats)
        self.stats["opened"] += 1
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
