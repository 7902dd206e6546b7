"""The batch crypto API misused on purpose (issue 14, finding 18): overlapping buffers are
refused, and a failed slot of ``open_many_into`` keeps no unauthenticated bytes."""

from __future__ import annotations

import random

import pytest

from p2plab.core.crypto import Identity, PeerCipher
from p2plab.core.crypto.rules import SEAL_OVERHEAD
from p2plab.core.wire import Probe, ProbeAck, encode_datagram, parse_datagram

SIZE = 120
OSZ = SIZE + SEAL_OVERHEAD


def linked(seed: int) -> tuple[PeerCipher, PeerCipher]:
    """Two ciphers past the probe round trip (the benchmark's starting point)."""
    r = random.Random(seed)
    ia, ib = Identity.generate(r.randbytes), Identity.generate(r.randbytes)
    ca = PeerCipher(ia, "alice", "bob", ib.public_bytes, r.randbytes)
    cb = PeerCipher(ib, "bob", "alice", ia.public_bytes, r.randbytes)
    probe = Probe("alice", "bob", nonce=b"n" * 8, nominate=False, target=("198.18.0.2", 1))
    parse_datagram(encode_datagram(probe, ca), cb)
    parse_datagram(encode_datagram(ProbeAck("bob", "alice", b"n" * 8, False, ("h", 1)), cb), ca)
    return ca, cb


def plain(count: int) -> bytearray:
    """``count`` BENCH_DATA plaintexts of SIZE bytes, each body filled with its index."""
    return bytearray(
        b"".join(
            b"\xd7\x50\x01\x20" + i.to_bytes(4, "big") + bytes([i + 1]) * (SIZE - 8)
            for i in range(count)
        )
    )


# -- seal_many ---------------------------------------------------------------------------------


def test_seal_many_in_place_is_refused() -> None:
    """Before: it sealed, and the datagrams authenticated while carrying the wrong plaintext."""
    ca, _ = linked(1)
    count = 4
    buf = bytearray(OSZ * count)
    buf[: SIZE * count] = plain(count)
    sealed_before = ca.stats["sealed"]
    with pytest.raises(ValueError, match="overlaps"):
        ca.seal_many(buf, SIZE, count, buf)
    assert ca.stats["sealed"] == sealed_before  # refused before any counter was spent


@pytest.mark.parametrize("shift", [-OSZ + 1, -7, 0, 7, SIZE * 4 - 1])
def test_seal_many_with_overlapping_views_of_one_buffer_is_refused(shift: int) -> None:
    ca, _ = linked(2)
    count = 4
    whole = bytearray(4096)
    mv = memoryview(whole)
    src_at = 2048
    mv[src_at : src_at + SIZE * count] = plain(count)
    dst = mv[src_at + shift : src_at + shift + OSZ * count]
    with pytest.raises(ValueError, match="overlaps"):
        ca.seal_many(mv[src_at : src_at + SIZE * count], SIZE, count, dst)
    # a read-only view of the same memory as input is caught too
    with pytest.raises(ValueError, match="overlaps"):
        ca.seal_many(mv[src_at : src_at + SIZE * count].toreadonly(), SIZE, count, dst)


def test_seal_many_next_to_its_input_in_one_buffer_still_works() -> None:
    """Adjacent (touching, not overlapping) regions of one buffer are fine, and correct."""
    ca, cb = linked(3)
    count = 4
    whole = bytearray(SIZE * count + OSZ * count)
    mv = memoryview(whole)
    mv[: SIZE * count] = plain(count)
    ca.seal_many(mv[: SIZE * count], SIZE, count, mv[SIZE * count :])
    spans = [(SIZE * count + i * OSZ, SIZE * count + (i + 1) * OSZ) for i in range(count)]
    bodies = cb.open_many(whole, spans)
    assert bodies == [bytes(plain(count)[i * SIZE + 4 : (i + 1) * SIZE]) for i in range(count)]


# -- open_many_into ----------------------------------------------------------------------------


def test_failed_slots_of_open_many_into_are_zeroed() -> None:
    """Forged, replayed and too-long datagrams leave zeros, not what the caller had or what a
    failed decryption wrote; accepted ones carry their body."""
    ca, cb = linked(4)
    count = 6
    src = plain(count)
    sealed = bytearray(OSZ * count)
    ca.seal_many(src, SIZE, count, sealed)
    spans = [(i * OSZ, (i + 1) * OSZ) for i in range(count)]
    sealed[2 * OSZ + 60] ^= 0x01  # forged body: the tag check fails after decrypting
    sealed[4 * OSZ + OSZ - 1] ^= 0x80  # forged tag
    order = [0, 1, 2, 3, 4, 5, 1]  # the last one is a replay
    stride = SIZE
    out = bytearray(b"\xaa" * (stride * len(order)))
    oks = cb.open_many_into(sealed, [spans[j] for j in order], out, stride)
    assert oks == [True, True, False, True, False, True, False]
    for i, j in enumerate(order):
        slot = bytes(out[i * stride : (i + 1) * stride])
        if oks[i]:
            assert slot[: SIZE - 4] == bytes(src[j * SIZE + 4 : (j + 1) * SIZE])
        else:
            assert slot == bytes(stride), f"slot {i} keeps bytes after failing"
    # a body longer than the stride fails and its slot is zeroed, nothing written past it
    small = bytearray(b"\xbb" * 20)
    assert cb.open_many_into(sealed, spans[:1], small, 10) == [False]
    assert small == bytes(10) + b"\xbb" * 10


def test_open_many_into_refuses_an_output_inside_its_input() -> None:
    _, cb = linked(5)
    buf = bytearray(OSZ * 4)
    spans = [(i * OSZ, (i + 1) * OSZ) for i in range(4)]
    with pytest.raises(ValueError, match="overlaps"):
        cb.open_many_into(buf, spans, memoryview(buf)[8:], SIZE)
