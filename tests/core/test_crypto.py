"""Sealed peer datagrams: keys, ChaCha20-Poly1305, replay window, session tags, in-memory links."""

from __future__ import annotations

import base64
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.crypto import (
    SEAL_OVERHEAD,
    AuthenticationFailed,
    EpochStore,
    Identity,
    PeerCipher,
    PlainEnvelope,
    ReplayedDatagram,
    ReplayWindow,
    decode_public_key,
    fingerprint,
)
from p2plab.core.session import PeerSession
from p2plab.core.wire import (
    Chat,
    MessageType,
    Probe,
    ProbeAck,
    datagram_type,
    encode_datagram,
    parse_datagram,
)
from p2plab.errors import RemoteProtocolError
from tests.core_sim import Network, Node

LATENCY = 0.01


def ciphers(seed: int = 1) -> tuple[PeerCipher, PeerCipher, Identity, Identity]:
    r = random.Random(seed)
    ia, ib = Identity.generate(r.randbytes), Identity.generate(r.randbytes)
    ca = PeerCipher(ia, "alice", "bob", ib.public_bytes, r.randbytes)
    cb = PeerCipher(ib, "bob", "alice", ia.public_bytes, r.randbytes)
    return ca, cb, ia, ib


PROBE = Probe("alice", "bob", nonce=b"n" * 8, nominate=False, target=("198.18.0.2", 1))
CHAT = Chat("alice", "bob", seq=0, msg_id="m", sent_at=0.0, text="secret words")


# -- keys and fingerprints ---------------------------------------------------------------------


def test_identity_from_injected_randomness_and_its_fingerprint() -> None:
    a = Identity.generate(lambda n: bytes(range(n)))
    b = Identity.generate(lambda n: bytes(range(n)))
    assert a.public_bytes == b.public_bytes and len(a.public_bytes) == 32
    assert decode_public_key(a.public_b64) == a.public_bytes
    fp = a.fingerprint
    assert len(fp.split(" ")) == 16 and all(len(g) == 4 for g in fp.split(" "))
    assert fp == fingerprint(a.public_bytes)
    other = Identity.generate(lambda n: bytes(n - i for i in range(n)))
    assert other.fingerprint != fp


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(bytes(31)).decode(), "must be 32 bytes, got 31"),
        ("é", "not valid base64"),
    ],
)
def test_bad_public_keys_are_refused(text: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_public_key(text)


def test_low_order_peer_key_is_refused() -> None:
    ident = Identity.generate(random.Random(3).randbytes)
    with pytest.raises(RemoteProtocolError, match="low-order"):
        PeerCipher(ident, "a", "b", bytes(32), random.Random(4).randbytes)


def test_key_derivation_matches_the_documented_construction() -> None:
    import hashlib

    from cryptography.hazmat.primitives import hashes, serialization

    ca, cb, ia, ib = ciphers(5)
    header = b"\xd7\x50\x01\x01"  # PROBE: a handshake datagram
    sealed = ca.seal(header, b"hello")
    ts, tr, ctr = sealed[:8], sealed[8:16], sealed[16:24]
    assert ts == ca.local_tag and tr == bytes(8) and ctr == bytes(8)
    ss = ia.private_key.exchange(ib.private_key.public_key())
    salt = hashlib.sha256(
        b"p2plab/v1 salt" + b"".join(sorted((ia.public_bytes, ib.public_bytes)))
    ).digest()
    ids = b"\x00\x05alice\x00\x03bob"
    # mac1: keyed BLAKE2s-128 of everything before it, key = BLAKE2s(label | receiver static).
    mac_key = hashlib.blake2s(b"p2plab/v1 mac1" + ib.public_bytes).digest()
    assert (
        sealed[-16:] == hashlib.blake2s(header + sealed[:-16], key=mac_key, digest_size=16).digest()
    )
    # Handshake key: HKDF(ss) per direction, then BLAKE2s keyed with it over the sender tag.
    info = b"p2plab/v1 handshake" + ids + ia.public_bytes + ib.public_bytes
    base = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ss)
    hs = ChaCha20Poly1305(hashlib.blake2s(ts, key=base).digest())
    plain = hs.decrypt(bytes(4) + ctr, sealed[24:-16], header + ts + tr)
    assert plain == ca.ephemeral_public + ca.epoch.to_bytes(8, "big") + b"hello"
    assert len(sealed) == len(b"hello") + SEAL_OVERHEAD + 40 + 16
    # Data key: HKDF over ss | ee | es | se, bound to ids, static and ephemeral keys and tags.
    cb.open(header, sealed)
    ack = cb.seal(b"\xd7\x50\x01\x02", b"ack")
    ca.open(b"\xd7\x50\x01\x02", ack)
    chat_header = b"\xd7\x50\x01\x10"
    data = ca.seal(chat_header, b"secret")
    ts, tr, ctr = data[:8], data[8:16], data[16:24]
    assert tr == cb.local_tag
    pub = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    ea, eb = ca._ephemeral, cb._ephemeral  # the test plays both ends
    ee = ea.exchange(eb.public_key())
    es = ea.exchange(ib.private_key.public_key())
    se = ia.private_key.exchange(eb.public_key())
    info = b"p2plab/v1 data" + ids + ia.public_bytes + ib.public_bytes
    info += ea.public_key().public_bytes(*pub) + eb.public_key().public_bytes(*pub) + ts + tr
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ss + ee + es + se)
    assert ChaCha20Poly1305(key).decrypt(bytes(4) + ctr, data[24:], chat_header + ts + tr) == (
        b"secret"
    )
    assert len(data) == len(b"secret") + SEAL_OVERHEAD


# -- sealing and opening -----------------------------------------------------------------------


def test_round_trip_hides_the_text_and_directions_use_different_keys() -> None:
    ca, cb, _, _ = ciphers()
    data = encode_datagram(PROBE, ca)
    assert b"alice" not in data and b"198.18.0.2" not in data
    assert parse_datagram(data, cb) == PROBE
    # b now knows a's tag and ephemeral key; its answer names it, and a learns b's
    parse_datagram(encode_datagram(ProbeAck("bob", "alice", b"n" * 8, False, ("h", 1)), cb), ca)
    back = encode_datagram(Chat("bob", "alice", 0, "x", 0.0, "hi"), cb)
    assert back[4 + 8 : 4 + 16] == ca.local_tag
    # a's own sealer cannot open what it sealed (the key of the other direction)
    with pytest.raises(AuthenticationFailed):
        parse_datagram(data, ca)
    assert parse_datagram(back, ca).text == "hi"  # type: ignore[attr-defined]
    assert ca.peer_tag == cb.local_tag and cb.peer_tag == ca.local_tag
    assert ca.stats["auth_failures"] == 1


def test_every_flipped_bit_fails_authentication() -> None:
    ca, cb, _, _ = ciphers()
    data = encode_datagram(PROBE, ca)
    for i in range(2, len(data)):  # magic bytes are checked by the codec before the sealer
        for bit in (0, 7):
            forged = bytearray(data)
            forged[i] ^= 1 << bit
            with pytest.raises(RemoteProtocolError):
                parse_datagram(bytes(forged), cb)
    assert parse_datagram(data, cb) == PROBE  # the original is still fresh
    assert cb.stats["auth_failures"] >= 2 * (len(data) - 3)


def test_replay_is_refused_and_counted() -> None:
    ca, cb, _, _ = ciphers()
    first = encode_datagram(PROBE, ca)
    second = encode_datagram(PROBE, ca)
    assert parse_datagram(second, cb) == PROBE
    assert parse_datagram(first, cb) == PROBE  # reordered, not replayed
    for data in (first, second):
        with pytest.raises(ReplayedDatagram, match="replayed"):
            parse_datagram(data, cb)
    assert cb.stats["replays"] == 2 and cb.stats["opened"] == 2


def test_a_third_party_with_other_keys_cannot_forge() -> None:
    _ca, cb, _ia, ib = ciphers()
    mallory = Identity.generate(random.Random(99).randbytes)
    # mallory knows both ids and b's public key, but not a's private key
    cm = PeerCipher(mallory, "alice", "bob", ib.public_bytes, random.Random(98).randbytes)
    with pytest.raises(AuthenticationFailed):
        parse_datagram(encode_datagram(PROBE, cm), cb)
    assert cb.stats["auth_failures"] == 1


def test_datagrams_for_an_earlier_session_are_stale() -> None:
    r = random.Random(7)
    ia, ib = Identity.generate(r.randbytes), Identity.generate(r.randbytes)
    store = EpochStore()  # alice's link engine: it remembers her earlier sessions
    a1 = PeerCipher(ia, "alice", "bob", ib.public_bytes, r.randbytes, epoch=1, epochs=store)
    b1 = PeerCipher(ib, "bob", "alice", ia.public_bytes, r.randbytes)
    parse_datagram(encode_datagram(PROBE, a1), b1)
    parse_datagram(encode_datagram(ProbeAck("bob", "alice", b"n" * 8, False, ("h", 1)), b1), a1)
    old_chat = encode_datagram(Chat("bob", "alice", 0, "x", 0.0, "old"), b1)
    parse_datagram(old_chat, a1)
    # a restarts its session: the chat sealed for a1's tag is stale for a2
    a2 = PeerCipher(ia, "alice", "bob", ib.public_bytes, r.randbytes, epoch=2, epochs=store)
    with pytest.raises(ReplayedDatagram, match="earlier session of ours"):
        parse_datagram(old_chat, a2)
    assert a2.stats["replays"] == 1 and a2.stats["derivations"] == 2  # no key was tried
    # A cipher without the engine's memory cannot tell stale from forged: it holds no key for
    # those tags, so the datagram is refused unauthenticated, still before any cryptography.
    a3 = PeerCipher(ia, "alice", "bob", ib.public_bytes, r.randbytes)
    with pytest.raises(AuthenticationFailed, match="no session of ours"):
        parse_datagram(old_chat, a3)
    assert a3.stats["unknown_tags"] == 1


def test_peer_restart_is_reported_once_and_the_old_tag_is_retired() -> None:
    r = random.Random(8)
    ia, ib = Identity.generate(r.randbytes), Identity.generate(r.randbytes)
    a = PeerCipher(ia, "alice", "bob", ib.public_bytes, r.randbytes)
    bobs = EpochStore()  # bob's link engine, across his two sessions
    b1 = PeerCipher(ib, "bob", "alice", ia.public_bytes, r.randbytes, epoch=10, epochs=bobs)
    parse_datagram(encode_datagram(PROBE, a), b1)
    parse_datagram(encode_datagram(ProbeAck("bob", "alice", b"q" * 8, False, ("h", 1)), b1), a)
    parse_datagram(encode_datagram(Chat("bob", "alice", 0, "x", 0.0, "1"), b1), a)
    old = encode_datagram(Chat("bob", "alice", 1, "y", 0.0, "2"), b1)
    assert not a.take_peer_restart()
    b2 = PeerCipher(ib, "bob", "alice", ia.public_bytes, r.randbytes, epoch=20, epochs=bobs)
    # b2 does not know a's tag yet: only a probe may name no tag (and b2 has no data key)
    with pytest.raises(AuthenticationFailed):
        parse_datagram(encode_datagram(Chat("bob", "alice", 0, "x", 0.0, "z"), b2), a)
    parse_datagram(encode_datagram(Probe("bob", "alice", b"p" * 8, False, ("h", 1)), b2), a)
    assert not a.take_peer_restart()  # a zero-tag probe does not switch a confirmed peer
    # a's ordinary datagrams still name b1; only its answer to the probe names b2
    with pytest.raises(ReplayedDatagram, match="earlier session of ours"):
        parse_datagram(encode_datagram(PROBE, a), b2)
    ack = encode_datagram(ProbeAck("alice", "bob", b"p" * 8, False, ("h", 2)), a)
    assert ack[4 + 8 : 4 + 16] == b2.local_tag
    parse_datagram(ack, b2)
    parse_datagram(encode_datagram(Chat("bob", "alice", 0, "x", 0.0, "new"), b2), a)
    assert a.take_peer_restart() and not a.take_peer_restart()
    assert a.stats["peer_restarts"] == 1 and a.peer_tag == b2.local_tag
    with pytest.raises(ReplayedDatagram, match="earlier session of the peer"):
        parse_datagram(old, a)


def test_whole_datagram_helpers_for_the_benchmark_path() -> None:
    ca, cb, _, _ = ciphers()
    lone = ca.seal_datagram(b"\xd7\x50\x01\x20" + bytes(10))
    assert cb.open_datagram(lone) is None  # names no session of b's: only probes may
    parse_datagram(encode_datagram(PROBE, ca), cb)  # the tags travel with the probe round trip
    parse_datagram(encode_datagram(ProbeAck("bob", "alice", b"n" * 8, False, ("h", 1)), cb), ca)
    plain = b"\xd7\x50\x01\x20" + bytes(range(200))
    sealed = ca.seal_datagram(plain)
    assert datagram_type(sealed) == MessageType.BENCH_DATA
    assert len(sealed) == len(plain) + SEAL_OVERHEAD
    assert cb.open_datagram(sealed) == plain
    assert cb.open_datagram(sealed) is None  # replay
    assert cb.open_datagram(sealed[:-1] + bytes([sealed[-1] ^ 1])) is None
    assert cb.open_datagram(b"\xd7") is None
    # ``lone`` named no session of b's: no key exists for it, so it is refused unauthenticated
    # (before any cryptography), like the corrupted and the truncated one.
    assert cb.stats["replays"] == 1 and cb.stats["auth_failures"] == 3
    assert cb.stats["unknown_tags"] == 1


def linked_ciphers(seed: int = 1) -> tuple[PeerCipher, PeerCipher]:
    """Two ciphers whose tags went through the probe round trip (the benchmark's starting point)."""
    ca, cb, _, _ = ciphers(seed)
    parse_datagram(encode_datagram(PROBE, ca), cb)
    parse_datagram(encode_datagram(ProbeAck("bob", "alice", b"n" * 8, False, ("h", 1)), cb), ca)
    return ca, cb


def batch(count: int, size: int, kind: int = 0x20) -> bytes:
    """``count`` plaintext datagrams of ``size`` bytes, each with its index in the body."""
    return b"".join(
        b"\xd7\x50\x01" + bytes((kind,)) + i.to_bytes(4, "big") + bytes([i & 0xFF]) * (size - 8)
        for i in range(count)
    )


def test_seal_many_gives_what_seal_datagram_gives_and_open_many_opens_it() -> None:
    ca, cb = linked_ciphers()
    ref_a, ref_b = linked_ciphers()  # the same keys and tags: seeded alike
    size, count = 300, 10
    src = batch(count, size)
    out = bytearray((size + SEAL_OVERHEAD) * count)
    ca.seal_many(src, size, count, out)
    osz = size + SEAL_OVERHEAD
    for i in range(count):
        # Byte for byte what the one-at-a-time path gives (same counter sequence).
        assert bytes(out[i * osz : (i + 1) * osz]) == ref_a.seal_datagram(
            src[i * size : (i + 1) * size]
        )
    bodies = cb.open_many(out, [(i * osz, (i + 1) * osz) for i in range(count)])
    assert bodies == [src[i * size + 4 : (i + 1) * size] for i in range(count)]
    assert cb.stats["opened"] == count + 1 and cb.stats["auth_failures"] == 0
    assert ca.stats["sealed"] == ref_a.stats["sealed"]
    # The single-datagram path opens the batch's datagrams too (and refuses them now: replays).
    assert ref_b.open_datagram(bytes(out[:osz])) == src[:size]
    assert cb.open_datagram(bytes(out[:osz])) is None and cb.stats["replays"] == 1


def test_open_many_rejects_forgeries_replays_and_stale_datagrams_one_by_one() -> None:
    ca, cb = linked_ciphers(3)
    size, count = 120, 8
    osz = size + SEAL_OVERHEAD
    sealed = bytearray(osz * count)
    ca.seal_many(batch(count, size), size, count, sealed)
    spans = [(i * osz, (i + 1) * osz) for i in range(count)]
    # Forge datagram 2 (body bit), datagram 5 (a tag byte: associated data), truncate one.
    forged = bytearray(sealed)
    forged[2 * osz + 40] ^= 0x10
    forged[5 * osz + 6] ^= 0x01
    third = cb.open_many(forged, [*spans, (0, SEAL_OVERHEAD + 3)])
    assert [b is None for b in third] == [i in (2, 5) for i in range(count)] + [True]
    assert cb.stats["auth_failures"] == 3 and cb.stats["opened"] == 1 + count - 2
    # The authentic 2 and 5 still open (a forgery does not burn their counters) ...
    assert [b is not None for b in cb.open_many(sealed, [spans[2], spans[5]])] == [True, True]
    # ... and everything again is a replay, counted once each, in the same batch too.
    again = cb.open_many(sealed, [*spans, spans[0]])
    assert again == [None] * (count + 1)
    assert cb.stats["replays"] == count + 1
    # A third host with other keys cannot forge a batch either.
    mallory = PeerCipher(
        Identity.generate(random.Random(5).randbytes), "alice", "bob",
        cb.local_public, random.Random(6).randbytes,
    )  # fmt: skip
    m_out = bytearray(osz * 2)
    mallory.seal_many(batch(2, size), size, 2, m_out)
    assert cb.open_many(m_out, [(0, osz), (osz, 2 * osz)]) == [None, None]
    assert cb.stats["auth_failures"] == 5


def test_open_many_mixes_the_fast_path_with_first_contact_and_older_sessions() -> None:
    r = random.Random(11)
    ia, ib = Identity.generate(r.randbytes), Identity.generate(r.randbytes)
    a = PeerCipher(ia, "alice", "bob", ib.public_bytes, r.randbytes)
    b = PeerCipher(ib, "bob", "alice", ia.public_bytes, r.randbytes)
    # Before any probe: a data datagram names no session of b's (only probes may).
    early = a.seal_datagram(b"\xd7\x50\x01\x20" + bytes(30))
    probe = encode_datagram(PROBE, a)
    buf = early + probe
    spans = [(0, len(early)), (len(early), len(buf))]
    res = b.open_many(buf, spans)
    assert res[0] is None and res[1] is not None
    # no key for it (it names no session of b's): counted as :meth:`open` counts it
    assert b.stats["auth_failures"] == 1 and b.stats["unknown_tags"] == 1
    parse_datagram(encode_datagram(ProbeAck("bob", "alice", b"n" * 8, False, ("h", 1)), b), a)
    # Now a batch with an old-session datagram in the middle: only it is refused.
    a_old = PeerCipher(ia, "alice", "bob", ib.public_bytes, r.randbytes)
    stale = a_old.seal_datagram(b"\xd7\x50\x01\x20" + bytes(30))
    size = 40
    fresh = bytearray((size + SEAL_OVERHEAD) * 4)
    a.seal_many(batch(4, size), size, 4, fresh)
    osz = size + SEAL_OVERHEAD
    mixed = bytes(fresh[: 2 * osz]) + stale + bytes(fresh[2 * osz :])
    sp = [(0, osz), (osz, 2 * osz), (2 * osz, 2 * osz + len(stale))]
    sp += [(sp[-1][1], sp[-1][1] + osz), (sp[-1][1] + osz, sp[-1][1] + 2 * osz)]
    out = b.open_many(mixed, sp)
    assert [o is not None for o in out] == [True, True, False, True, True]
    assert out[3] == batch(4, size)[2 * size + 4 : 3 * size]
    assert b.stats["opened"] == 1 + 4


def test_open_many_into_writes_bodies_and_refuses_what_open_refuses() -> None:
    ca, cb = linked_ciphers(4)
    size, count = 200, 12
    osz = size + SEAL_OVERHEAD
    src = batch(count, size)
    sealed = bytearray(osz * count)
    ca.seal_many(src, size, count, sealed)
    spans = [(i * osz, (i + 1) * osz) for i in range(count)]
    order = [0, 1, 2, 5, 3, 4, 4, 6, 7, 8, 9, 10, 11, 0]  # reordered, a duplicate, a replay
    sealed[9 * osz + 100] ^= 0x40  # datagram 9 forged
    stride = size - 4 + 8  # room to spare
    out = bytearray(stride * len(order))
    oks = cb.open_many_into(sealed, [spans[j] for j in order], out, stride)
    want = [True, True, True, True, True, True, False, True, True, True, False, True, True, False]
    assert oks == want
    for i, j in enumerate(order):
        if oks[i]:
            assert (
                bytes(out[i * stride : i * stride + size - 4]) == src[j * size + 4 : (j + 1) * size]
            )
    assert cb.stats["replays"] == 2 and cb.stats["auth_failures"] == 1
    assert cb.stats["opened"] == 1 + sum(want)
    # The window took every accepted counter: all of them are replays now, one by one too.
    assert cb.open_many_into(sealed, spans, out, stride) == [False] * count
    assert cb.open_datagram(bytes(sealed[:osz])) is None
    assert cb.stats["replays"] == 2 + (count - 1) + 1
    # A body longer than the stride is refused (counted), never written past it.
    assert cb.open_many_into(sealed, spans[:1], bytearray(10), 10) == [False]


@pytest.mark.parametrize(("first", "count"), [(0, 1), (5, 3), (40, 100), (3000, 2000), (2, 5)])
def test_replay_window_accept_run_equals_accepting_one_by_one(first: int, count: int) -> None:
    a, b = ReplayWindow(64), ReplayWindow(64)
    for w in (a, b):
        for c in (0, 2, 3, 7):
            w.accept(c)
    a.accept_run(first, count)
    for c in range(first, first + count):
        if b.fresh(c):
            b.accept(c)
    assert a.top == b.top
    assert [a.fresh(c) for c in range(b.top + 2)] == [b.fresh(c) for c in range(b.top + 2)]


def test_plain_envelope_keeps_tags_without_cryptography() -> None:
    r = random.Random(2)
    pa, pb = PlainEnvelope(r.randbytes), PlainEnvelope(r.randbytes)
    assert not pa.encrypted and PeerCipher.encrypted
    data = encode_datagram(PROBE, pa)
    assert b"alice" in data  # not encrypted
    assert parse_datagram(data, pb) == PROBE
    assert pb.peer_tag == pa.local_tag
    with pytest.raises(AuthenticationFailed):
        pb.open(b"\xd7\x50\x01\x10", b"short")
    assert pb.open_datagram(b"\xd7\x50\x01\x20" + bytes(20)) is None  # names no tag: stale


# -- replay window -----------------------------------------------------------------------------


def test_replay_window_edges() -> None:
    w = ReplayWindow(8)
    assert w.fresh(0)
    w.accept(0)
    assert not w.fresh(0)
    w.accept(5)
    assert w.fresh(3) and not w.fresh(5)
    w.accept(12)  # 5 is still inside (12 - 5 < 8), 4 is not
    assert not w.fresh(5) and not w.fresh(4) and w.fresh(6) and w.fresh(13)
    w.accept(1000)  # a jump larger than the window clears it
    assert not w.fresh(1000) and w.fresh(999) and not w.fresh(992)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3000), max_size=200), st.sampled_from([1, 7, 64, 1024]))
def test_replay_window_matches_a_reference_model(counters: list[int], size: int) -> None:
    w = ReplayWindow(size)
    seen: set[int] = set()
    top = -1
    for c in counters:
        expected = c not in seen and c > top - size
        assert w.fresh(c) == expected
        if expected:
            w.accept(c)
            seen.add(c)
            top = max(top, c)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_sealed_path_only_raises_remote_protocol_error(junk: bytes) -> None:
    _, cb, _, _ = ciphers()
    for data in (junk, b"\xd7\x50\x01\x10" + junk, b"\xd7\x50\x01\x01" + junk):
        try:
            parse_datagram(data, cb)
        except RemoteProtocolError:
            pass
        else:  # pragma: no cover - would be a forgery
            raise AssertionError("random bytes authenticated")
        assert cb.open_datagram(data) is None


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
def test_fuzz_mutated_sealed_datagrams_never_open(pos: int, patch: bytes) -> None:
    ca, cb, _, _ = ciphers()
    data = encode_datagram(CHAT, ca)
    pos %= len(data)
    mutated = data[:pos] + patch + data[pos + len(patch) :]
    if mutated == data:
        return
    with pytest.raises(RemoteProtocolError):
        parse_datagram(mutated, cb)


# -- sessions through an in-memory network -------------------------------------------------


def add_node(
    net: Network,
    name: str,
    local_id: str,
    peer_id: str,
    role: str,
    local: tuple[str, int],
    candidates: list[tuple[str, int]],
    sealer: object,
    config: SessionConfig | None = None,
) -> Node:
    session = PeerSession(
        local_id,
        peer_id,
        role,  # type: ignore[arg-type]
        candidates,
        config or SessionConfig(),
        net.now,
        net.rand_bytes,
        sealer=sealer,  # type: ignore[arg-type]
    )
    node = Node(name, session, local)
    net.nodes[name] = node
    net._by_addr[local] = node
    return node


A_LOCAL = ("198.18.0.1", 40000)
B_LOCAL = ("198.18.0.2", 40000)
M_LOCAL = ("198.18.0.66", 40000)


def sealed_pair(
    seed: int = 0, config: SessionConfig | None = None, **link: float
) -> tuple[Network, Node, Node, Identity, Identity]:
    net = Network(seed=seed, latency=LATENCY, **link)
    ia, ib = Identity.generate(net.rand_bytes), Identity.generate(net.rand_bytes)
    ca = PeerCipher(ia, "alice", "bob", ib.public_bytes, net.rand_bytes)
    cb = PeerCipher(ib, "bob", "alice", ia.public_bytes, net.rand_bytes)
    a = add_node(net, "a", "alice", "bob", "controlling", A_LOCAL, [B_LOCAL], ca, config)
    b = add_node(net, "b", "bob", "alice", "controlled", B_LOCAL, [A_LOCAL], cb, config)
    return net, a, b, ia, ib


def texts(node: Node) -> list[str]:
    return [e.text for e in node.events if isinstance(e, ev.ChatReceived)]


def both_connected(a: Node, b: Node) -> bool:
    return a.session.state == b.session.state == "connected"


def test_sealed_sessions_connect_and_chat_reliably_through_loss() -> None:
    net, a, b, _, _ = sealed_pair(seed=3, loss=0.2, duplicate=0.1, jitter=0.02)
    assert net.run_until(lambda: both_connected(a, b), timeout=10)
    for i in range(30):
        a.session.send_chat(f"a{i}", net.now)
        b.session.send_chat(f"b{i}", net.now)
    assert net.run_until(lambda: len(texts(a)) == 30 and len(texts(b)) == 30, timeout=60)
    assert texts(b) == [f"a{i}" for i in range(30)] and texts(a) == [f"b{i}" for i in range(30)]
    # duplicated datagrams never reached the stream: the replay window took them
    assert b.session.stats["dropped_replayed"] > 0
    chat_datagrams = [d for _, d, _ in a.sent if datagram_type(d) == MessageType.CHAT]
    assert chat_datagrams and not any(b"a1" in d for d in chat_datagrams)


def test_forged_and_replayed_datagrams_from_a_third_host_are_dropped() -> None:
    net, a, b, _ia, ib = sealed_pair(seed=4)
    assert net.run_until(lambda: both_connected(a, b), timeout=10)
    net.run_for(0.5)
    events_before = list(b.events)
    # Mallory knows both ids and both public keys, and recorded a's datagrams.
    mallory = Identity.generate(random.Random(66).randbytes)
    cm = PeerCipher(mallory, "alice", "bob", ib.public_bytes, random.Random(67).randbytes)
    forged = [
        bytes(Chat("alice", "bob", seq=0, msg_id="evil", sent_at=0.0, text="pwned")),
        encode_datagram(Chat("alice", "bob", 0, "evil", 0.0, "pwned"), cm),
        encode_datagram(Probe("alice", "bob", b"m" * 8, True, B_LOCAL), cm),
    ]
    recorded = [d for _, d, _ in a.sent][-5:]
    before = dict(b.session.stats)
    for data in forged:
        net.inject(b, data, M_LOCAL)
    for data in recorded:
        net.inject(b, data, M_LOCAL)
        net.inject(b, data, A_LOCAL)
    got = {k: b.session.stats[k] - before[k] for k in before}
    assert got["dropped_unauthenticated"] == 3
    assert got["dropped_replayed"] == 2 * len(recorded)
    assert got["probes_received"] == 0 and got["chats_received"] == 0
    assert b.events == events_before
    assert b.session.peer_address == A_LOCAL
    a.session.send_chat("still here", net.now)
    assert net.run_until(lambda: texts(b) == ["still here"], timeout=5)
    assert M_LOCAL not in b.session.candidates


def test_unauthenticated_plaintext_session_accepts_nothing_from_elsewhere() -> None:
    """Without a sealer, traffic from a third address is dropped and counted, not delivered."""
    net, a, b, _, _ = sealed_pair(seed=5)
    assert net.run_until(lambda: both_connected(a, b), timeout=10)
    net2 = Network(seed=5, latency=LATENCY)
    p = add_node(net2, "a", "alice", "bob", "controlling", A_LOCAL, [B_LOCAL], None)
    q = add_node(net2, "b", "bob", "alice", "controlled", B_LOCAL, [A_LOCAL], None)
    assert net2.run_until(lambda: both_connected(p, q), timeout=10)
    net2.inject(q, bytes(Chat("alice", "bob", 0, "evil", 0.0, "pwned")), M_LOCAL)
    assert q.session.stats["unexpected_source"] == 1
    assert texts(q) == []


def test_both_ends_restarting_their_sessions_reconnect() -> None:
    config = SessionConfig(keepalive_interval=0.5, peer_timeout=2.0, punch_timeout=5.0)
    net, a, b, ia, ib = sealed_pair(seed=6, config=config)
    assert net.run_until(lambda: both_connected(a, b), timeout=10)
    a.session.send_chat("before", net.now)
    assert net.run_until(lambda: texts(b) == ["before"], timeout=5)
    # cut the link until both time out, then both start new sessions with the same keys
    net.drop = lambda node, dest, data: True
    assert net.run_until(lambda: a.session.state == b.session.state == "lost", timeout=10)
    net.drop = None
    ca = PeerCipher(ia, "alice", "bob", ib.public_bytes, net.rand_bytes)
    cb = PeerCipher(ib, "bob", "alice", ia.public_bytes, net.rand_bytes)
    a2 = add_node(net, "a", "alice", "bob", "controlling", A_LOCAL, [B_LOCAL], ca, config)
    net.run_for(0.3)  # a's new session probes alone for a while: b has not restarted yet
    b2 = add_node(net, "b", "bob", "alice", "controlled", B_LOCAL, [A_LOCAL], cb, config)
    assert net.run_until(lambda: both_connected(a2, b2), timeout=10)
    a2.session.send_chat("after", net.now)
    assert net.run_until(lambda: texts(b2) == ["after"], timeout=5)


@pytest.mark.parametrize("restarting", ["a", "b"])
def test_one_end_restarting_its_session_is_tolerated(restarting: str) -> None:
    """The other end is still connected: it renumbers its stream for the new session."""
    config = SessionConfig(keepalive_interval=0.5, peer_timeout=3.0)
    net, a, b, ia, ib = sealed_pair(seed=7, config=config)
    assert net.run_until(lambda: both_connected(a, b), timeout=10)
    for i in range(3):
        a.session.send_chat(f"a{i}", net.now)
        b.session.send_chat(f"b{i}", net.now)
    assert net.run_until(lambda: len(texts(a)) == len(texts(b)) == 3, timeout=5)
    if restarting == "a":
        new = add_node(
            net,
            "a",
            "alice",
            "bob",
            "controlling",
            A_LOCAL,
            [B_LOCAL],
            PeerCipher(ia, "alice", "bob", ib.public_bytes, net.rand_bytes),
            config,
        )
        other = b
    else:
        new = add_node(
            net,
            "b",
            "bob",
            "alice",
            "controlled",
            B_LOCAL,
            [A_LOCAL],
            PeerCipher(ib, "bob", "alice", ia.public_bytes, net.rand_bytes),
            config,
        )
        other = a
    # the surviving side has a message in flight for the old session
    other.session.send_chat("across the restart", net.now)
    assert net.run_until(lambda: both_connected(new, other), timeout=10)
    assert net.run_until(lambda: texts(new) == ["across the restart"], timeout=10)
    new.session.send_chat("hello again", net.now)
    assert net.run_until(lambda: texts(other)[-1:] == ["hello again"], timeout=10)
    assert other.session.state == "connected"
    assert other.session.stats["peer_restarts"] == 1
    assert any(isinstance(e, ev.PeerRestarted) for e in other.events)


def test_every_open_path_applies_the_same_rules_as_open() -> None:
    # One mixed stream, opened four ways by receivers in the same state: the full rules alone
    # (``open`` per datagram), ``open_datagram`` (fast path), ``open_many`` and ``open_many_into``.
    # Results and counters must agree exactly, whatever path each datagram took.
    _, _, ia, ib = ciphers(7)
    ca, first = linked_ciphers(7)
    receivers = [first] + [linked_ciphers(7)[1] for _ in range(3)]  # seeded alike: one state
    size = 96
    plain = [batch(8, size)[i * size : (i + 1) * size] for i in range(8)]
    d = [ca.seal_datagram(p) for p in plain]
    other_kind = ca.seal_datagram(b"\xd7\x50\x01\x21" + bytes(size - 4))  # the pair, new header
    forged = bytearray(d[4])
    forged[60] ^= 0x01
    restarted = PeerCipher(ia, "alice", "bob", ib.public_bytes, random.Random(99).randbytes)
    first_contact = encode_datagram(PROBE, restarted)  # another session of alice, zero tag
    mallory = PeerCipher(
        Identity.generate(random.Random(5).randbytes), "alice", "bob",
        ib.public_bytes, random.Random(6).randbytes,
    )  # fmt: skip
    stream = [
        d[0], d[1], d[3], d[2], d[1],  # reordered, then a replay
        bytes(forged), d[4],  # a forgery does not burn the counter
        d[0][: 4 + SEAL_OVERHEAD - 1],  # too short
        mallory.seal_datagram(plain[5]),  # other keys
        other_kind, d[5], first_contact, d[6], d[6], d[7],
    ]  # fmt: skip
    bodies = [None if x is None else x[4:] for x in (receivers[1].open_datagram(s) for s in stream)]
    full: list[bytes | None] = []
    for s in stream:
        try:
            full.append(receivers[0].open(s[:4], s[4:]))
        except RemoteProtocolError:
            full.append(None)
    spans, buf, at = [], b"", 0
    for s in stream:
        spans.append((at, at + len(s)))
        buf += s
        at += len(s)
    many = receivers[2].open_many(buf, spans)
    out = bytearray(size * len(stream))
    oks = receivers[3].open_many_into(buf, spans, out, size)
    # (a handshake datagram's body is shorter than its length minus SEAL_OVERHEAD: it carries
    # the ephemeral key, the epoch and mac1 too, so its length is taken from ``full``)
    into = [bytes(out[i * size : i * size + len(f or b"")]) if ok else None
            for i, (f, ok) in enumerate(zip(full, oks, strict=True))]  # fmt: skip
    assert [b is not None for b in full] == [
        True, True, True, True, False, False, True, False, False, True, True, True, True, False,
        True,
    ]  # fmt: skip
    assert bodies == full and many == full and into == full
    assert full[0] == plain[0][4:] and full[9] == bytes(size - 4)
    stats = [r.stats for r in receivers]
    assert stats[0]["replays"] == 2 and stats[0]["auth_failures"] == 3
    assert stats[1] == stats[0] and stats[2] == stats[0] and stats[3] == stats[0]
    # and they end in the same state: the next datagram opens (and replays refuse) alike
    nxt = ca.seal_datagram(plain[3])
    assert [r.open_datagram(nxt) is not None for r in receivers] == [True] * 4
    assert [r.open_datagram(d[7]) for r in receivers] == [None] * 4
