"""The open rules: one place that decides whether a sealed datagram is accepted.

Every way of opening a datagram (:meth:`PeerCipher.open <p2plab.core.crypto.PeerCipher.open>`,
``open_datagram``'s fast path and the benchmark's batches ``open_many``/``open_many_into``)
applies these rules and only these:

1. **Layout**: ``header(4) | sender_tag(8) | receiver_tag(8) | counter(8) | ciphertext + tag(16)``
   (:data:`SEAL_OVERHEAD` beyond the plaintext; handshake types add the ephemeral key, the epoch
   and mac1, see :mod:`.handshake`); anything shorter fails authentication.
2. **Cheap checks, then authentication**: the cipher checks mac1 (handshake types) and the tags
   of rule 3 before any cryptography, and a data datagram needs a key learnt from its sender
   session's handshake; what it cannot authenticate counts in ``auth_failures``.  The header and
   both tags are the associated data.
3. **Tags** (:class:`TagTracker`): a datagram must name our session tag (only a PROBE may name
   none), and must not come from a sender tag we retired; otherwise it is stale (``replays``).
4. **Counter**: fresh in the sender tag's :class:`ReplayWindow` (``replays`` otherwise), then
   accepted; a new sender tag gets a window, and the least recently used window beyond four
   (never the confirmed peer's) is forgotten and its tag retired (so forgetting it never reopens
   it to replays).

:class:`OpenRules` applies 3 and 4 after the cipher authenticated (2).  :class:`FastPath` is the
same rules specialised to the established session pair (confirmed tags, an existing window) and
data types: it checks layout, type and pair, authenticates and applies the counter rule, and
anything it does not take goes to the full rules.  Nothing here seals.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from p2plab.core.wire import HEADER_SIZE, MessageType
from p2plab.errors import ConfigError, RemoteProtocolError

__all__ = [
    "AEAD_TAG_SIZE",
    "BODY_AT",
    "COUNTER_AT",
    "COUNTER_SIZE",
    "HANDSHAKE_TYPES",
    "MIN_SEALED_DATAGRAM",
    "NONCE",
    "SEALED_HEAD",
    "SEAL_OVERHEAD",
    "TAG_SIZE",
    "ZERO_TAG",
    "AuthenticationFailed",
    "Buffer",
    "FastPath",
    "OpenRules",
    "ReplayWindow",
    "ReplayedDatagram",
    "TagTracker",
    "new_stats",
]

TAG_SIZE = 8
"""Bytes of a session tag."""
COUNTER_SIZE = 8
"""Bytes of the sender's datagram counter."""
AEAD_TAG_SIZE = 16
"""Bytes of the Poly1305 tag."""
SEAL_OVERHEAD = 2 * TAG_SIZE + COUNTER_SIZE + AEAD_TAG_SIZE
"""Bytes a sealed datagram carries beyond the plaintext one (tags, counter, Poly1305 tag)."""
COUNTER_AT = HEADER_SIZE + 2 * TAG_SIZE
"""Offset of the counter in a sealed datagram (the associated data is everything before it)."""
BODY_AT = COUNTER_AT + COUNTER_SIZE
"""Offset of the ciphertext in a sealed datagram."""
MIN_SEALED_DATAGRAM = HEADER_SIZE + SEAL_OVERHEAD
"""The shortest sealed datagram (an empty body)."""
ZERO_TAG = bytes(TAG_SIZE)
"""The receiver tag of a first-contact PROBE, which knows no session of ours yet."""
NONCE = struct.Struct(">IQ")
"""The ChaCha20-Poly1305 nonce: four zero bytes, then the 64-bit counter."""
SEALED_HEAD = struct.Struct(">4s8s8sQ")
"""What precedes the ciphertext: the header, sender tag, receiver tag and counter."""

Buffer = bytes | bytearray | memoryview

_COUNTER = struct.Struct(">Q")
_MAX_WINDOWS = 4  # sender tags with a live replay window
_MAX_RETIRED = 64  # retired sender tags remembered
_PROBE = int(MessageType.PROBE)
_PROBE_ACK = int(MessageType.PROBE_ACK)
_NONCE_PAD = bytes(4)

HANDSHAKE_TYPES = frozenset({_PROBE, _PROBE_ACK})
"""The handshake types (PROBE, PROBE_ACK): sealed with the handshake key, never on a fast path."""


def new_stats() -> dict[str, int]:
    """The counters every sealer keeps (``PeerCipher.stats``, ``PlainEnvelope.stats``).

    ``auth_failures`` counts every datagram that did not (or could not: no key for its tags)
    authenticate; among them ``mac1_failures`` (handshake datagrams failing mac1) and
    ``unknown_tags`` (refused before any cryptography).  ``derivations`` counts key derivations
    (HKDF), which only the construction and authenticated handshakes cause.
    """
    return {
        "sealed": 0,
        "opened": 0,
        "auth_failures": 0,
        "replays": 0,
        "peer_restarts": 0,
        "mac1_failures": 0,
        "unknown_tags": 0,
        "derivations": 0,
    }


class AuthenticationFailed(RemoteProtocolError):
    """A sealed datagram did not authenticate (forged, corrupted, or for other keys)."""


class ReplayedDatagram(RemoteProtocolError):
    """An authentic datagram seen before, too old for the window, or from an earlier session."""


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


class TagTracker:
    """Session tags of both ends (shared by ``PeerCipher`` and ``PlainEnvelope``)."""

    def __init__(self, rand_bytes: Callable[[int], bytes]) -> None:
        tag = rand_bytes(TAG_SIZE)
        while tag == ZERO_TAG:  # pragma: no cover - 2**-64
            tag = rand_bytes(TAG_SIZE)
        self.local_tag: bytes = tag
        """This session's tag."""
        self.peer_tag: bytes | None = None
        """The peer session's tag as last learnt, None before any."""
        self.confirmed = False
        """The peer has named our tag (so its tag is the established one)."""
        self.reply_tag: bytes | None = None
        """Sender tag of the datagram accepted last (a PROBE_ACK answers that session)."""
        self.retired: OrderedDict[bytes, None] = OrderedDict()
        """Sender tags of earlier peer sessions: their datagrams are stale."""
        self._restarted = False

    def retire(self, tag: bytes) -> None:
        """Refuse ``tag`` from now on (an earlier session of the peer)."""
        self.retired[tag] = None
        while len(self.retired) > _MAX_RETIRED:
            self.retired.popitem(last=False)

    def receiver_tag_for(self, kind: int) -> bytes:
        """The receiver tag a datagram of type ``kind`` we send names."""
        if kind == _PROBE_ACK and self.reply_tag is not None:
            return self.reply_tag  # answer the probe's session, whatever we think of it
        return self.peer_tag if self.peer_tag is not None else ZERO_TAG

    def stale(self, kind: int, sender_tag: bytes, receiver_tag: bytes) -> str | None:
        """Why an authentic datagram is stale (rule 3), or None."""
        if receiver_tag != self.local_tag and not (receiver_tag == ZERO_TAG and kind == _PROBE):
            return "sealed for an earlier session of ours"
        if sender_tag in self.retired:
            return "from an earlier session of the peer"
        return None

    def accepted(
        self, sender_tag: bytes, receiver_tag: bytes, stats: dict[str, int], newer: bool = True
    ) -> None:
        """Learn from an accepted datagram: the peer's tag, and whether it restarted.

        ``newer`` False: the sender session is not newer than the one we send to (its epoch is
        lower), so a first contact from it does not take the unconfirmed peer tag over.
        """
        self.reply_tag = sender_tag
        if receiver_tag == self.local_tag:
            if self.peer_tag is None or not self.confirmed:
                self.peer_tag = sender_tag
                self.confirmed = True
            elif sender_tag != self.peer_tag:
                self.retire(self.peer_tag)
                self.peer_tag = sender_tag
                self._restarted = True
                stats["peer_restarts"] += 1
        elif not self.confirmed and newer:
            self.peer_tag = sender_tag  # first contact: the newest probing session wins

    def take_restart(self) -> bool:
        """True once after the peer was seen restarting its session."""
        restarted, self._restarted = self._restarted, False
        return restarted


class OpenRules:
    """Rules 3 and 4 for one session: tags, replay windows, and the counting of both."""

    def __init__(
        self, rand_bytes: Callable[[int], bytes], stats: dict[str, int], replay_window: int = 1024
    ) -> None:
        self.tags = TagTracker(rand_bytes)
        """Session tags of both ends."""
        self.stats = stats
        """The sealer's counters (``opened``, ``replays`` and ``peer_restarts`` counted here)."""
        self.replay_window = replay_window
        """Width of each sender tag's replay window."""
        self.windows: OrderedDict[bytes, ReplayWindow] = OrderedDict()
        """Replay windows by sender tag, least recently used first."""

    def admit(
        self,
        kind: int,
        sender_tag: bytes,
        receiver_tag: bytes,
        counter: int | None,
        newer: bool = True,
    ) -> None:
        """Accept an authenticated datagram or raise :class:`ReplayedDatagram` (counted).

        ``counter`` None: no replay window (the plaintext envelope has no counter).  ``newer``:
        see :meth:`TagTracker.accepted`.
        """
        why = self.tags.stale(kind, sender_tag, receiver_tag)
        if why is not None:
            self.stats["replays"] += 1
            raise ReplayedDatagram(f"stale datagram: {why}")
        if counter is not None:
            window = self.windows.get(sender_tag)
            if window is None:
                window = self.windows[sender_tag] = ReplayWindow(self.replay_window)
                if len(self.windows) > _MAX_WINDOWS:
                    # Forget the least recently used window, never the confirmed peer's: an
                    # unconfirmed session (a first contact) must not push the live one aside.
                    live = self.tags.peer_tag if self.tags.confirmed else None
                    old = next(t for t in self.windows if t != live)
                    self.forget(old)
            if not window.fresh(counter):
                self.stats["replays"] += 1
                raise ReplayedDatagram(f"replayed datagram (counter {counter})")
            window.accept(counter)
            self.windows.move_to_end(sender_tag)
        self.tags.accepted(sender_tag, receiver_tag, self.stats, newer)
        self.stats["opened"] += 1

    def forget(self, sender_tag: bytes) -> None:
        """Drop a peer session's window and retire its tag (so forgetting never reopens it)."""
        self.windows.pop(sender_tag, None)
        self.tags.retire(sender_tag)

    def established(self) -> tuple[bytes, ReplayWindow] | None:
        """The established pair (peer tag, its window) a :class:`FastPath` may take, or None.

        Only once the peer named our tag, its tag is not retired and it has a window: then
        rules 3 and 4 reduce to "this exact pair of tags, a fresh counter".
        """
        tags = self.tags
        peer = tags.peer_tag
        if tags.confirmed and peer is not None and peer not in tags.retired:
            window = self.windows.get(peer)
            if window is not None:
                return peer, window
        return None

    def settle(self, sender_tag: bytes) -> None:
        """What :meth:`admit` would have noted after datagrams the fast path accepted."""
        self.tags.reply_tag = sender_tag
        self.windows.move_to_end(sender_tag)


class FastPath:
    """The open rules specialised to the established session pair (see the module doc).

    Built by the cipher from :meth:`OpenRules.established` and valid until the full rules run
    again (they may change tags and windows).  Each ``open*`` method returns a distinct "not
    mine" value (``False`` or ``None``, as documented) for a datagram that is not the pair's
    or is too short: the caller then applies the full rules.  The batch methods keep counts and
    defer window updates for runs of consecutive new counters; :meth:`finish` writes both back
    and must run before the full rules do.
    """

    __slots__ = (
        "_head",
        "_rules",
        "_run_first",
        "_run_next",
        "_top",
        "aead",
        "failed",
        "opened",
        "pair",
        "replayed",
        "sender_tag",
        "window",
    )

    def __init__(
        self, rules: OpenRules, sender_tag: bytes, window: ReplayWindow, aead: ChaCha20Poly1305
    ) -> None:
        self._rules = rules
        self.sender_tag = sender_tag
        """The peer's established tag."""
        self.pair = sender_tag + rules.tags.local_tag
        """Sender and receiver tag as the pair's datagrams carry them."""
        self.window = window
        """The peer tag's replay window."""
        self.aead = aead
        """The cipher of the peer-to-us direction of this pair."""
        self.opened = self.failed = self.replayed = 0
        self._head: bytes | None = None  # header + pair of the batch's datagrams (the aad)
        self._run_first = self._run_next = -1  # consecutive new counters not yet in the window
        self._top = window.top

    def open_datagram(self, data: bytes) -> bytes | Literal[False] | None:
        """A whole datagram opened (header + body), None if refused (counted in ``stats``), or
        False if it is not the pair's.  Everything is written back at once."""
        if (
            len(data) < MIN_SEALED_DATAGRAM
            or data[HEADER_SIZE:COUNTER_AT] != self.pair
            or data[3] in HANDSHAKE_TYPES
        ):
            return False
        ctr = data[COUNTER_AT:BODY_AT]
        stats = self._rules.stats
        try:
            body = self.aead.decrypt(_NONCE_PAD + ctr, data[BODY_AT:], data[:COUNTER_AT])
        except InvalidTag:
            stats["auth_failures"] += 1
            return None
        if not self._fresh(int.from_bytes(ctr, "big")):
            stats["replays"] += self.replayed
            self.replayed = 0
            return None
        self._rules.settle(self.sender_tag)
        stats["opened"] += 1
        return data[:HEADER_SIZE] + body

    def open(self, view: Buffer, start: int, end: int) -> bytes | Literal[False] | None:
        """The body of ``view[start:end]``, None if refused (counted at :meth:`finish`), or
        False if it is not the pair's (or carries another header than the batch's first)."""
        if end - start < MIN_SEALED_DATAGRAM:
            return False
        head = view[start : start + COUNTER_AT]
        if head != self._head:
            if self._head is not None or not self._mine(head):
                return False
            self._head = bytes(head)
        c = _COUNTER.unpack_from(view, start + COUNTER_AT)[0]
        try:
            body = self.aead.decrypt(NONCE.pack(0, c), view[start + BODY_AT : end], self._head)
        except InvalidTag:
            self.failed += 1
            return None
        return body if self._counter_ok(c) else None

    def open_into(self, view: Buffer, start: int, end: int, out: memoryview) -> bool | None:
        """:meth:`open` with the body written to ``out`` (exactly the body's length): True if
        opened, False if refused, None if not the pair's."""
        if end - start < MIN_SEALED_DATAGRAM:
            return None
        head = view[start : start + COUNTER_AT]
        if head != self._head:
            if self._head is not None or not self._mine(head):
                return None
            self._head = bytes(head)
        c = _COUNTER.unpack_from(view, start + COUNTER_AT)[0]
        try:
            self.aead.decrypt_into(NONCE.pack(0, c), view[start + BODY_AT : end], self._head, out)
        except InvalidTag:
            self.failed += 1
            return False
        return self._counter_ok(c)

    def _mine(self, head: Buffer) -> bool:
        # The pair's tags, and not a handshake type (those take the full rules).
        return head[HEADER_SIZE:] == self.pair and head[3] not in HANDSHAKE_TYPES

    def _fresh(self, c: int) -> bool:
        # Rule 4, one counter: fresh in the window, then accepted.
        window = self.window
        if not window.fresh(c):
            self.replayed += 1
            return False
        window.accept(c)
        self._top = window.top
        return True

    def _counter_ok(self, c: int) -> bool:
        # Rule 4 in a batch: a new counter extends a run accepted later in one update.
        if c > self._top:
            if c != self._run_next:
                if self._run_next >= 0:
                    self.window.accept_run(self._run_first, self._run_next - self._run_first)
                self._run_first = c
            self._run_next = c + 1
            self._top = c
        else:
            if self._run_next >= 0:
                self.window.accept_run(self._run_first, self._run_next - self._run_first)
                self._run_first = self._run_next = -1
            if not self._fresh(c):
                return False
        self.opened += 1
        return True

    def finish(self) -> None:
        """Write the window, the tag bookkeeping and the counts of a batch back."""
        if self._run_next >= 0:
            self.window.accept_run(self._run_first, self._run_next - self._run_first)
            self._run_first = self._run_next = -1
        stats = self._rules.stats
        if self.opened:
            self._rules.settle(self.sender_tag)
            stats["opened"] += self.opened
        stats["auth_failures"] += self.failed
        stats["replays"] += self.replayed
        self.opened = self.failed = self.replayed = 0
        self._head = None
