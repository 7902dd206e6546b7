"""FastPath on its own, with an owner that is not a UdpEndpoint: what it hands back through
``dispatch``, what it counts into the owner's stats, when it is armed, and how it closes.

(Its paths through a real endpoint are in test_endpoint.py.)  Nothing is timed.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator

import pytest

from p2plab.aio.fastpath import FAST_STATS, FastPath
from tests.conftest import until

SIZE = 200


def p2p(kind: int, i: int, size: int = SIZE) -> bytes:
    """A p2p-shaped datagram: magic, version, type, the index, then filler."""
    head = b"\xd7\x50\x01" + bytes((kind,)) + struct.pack("!I", i)
    return head + bytes((i + k) & 0xFF for k in range(size - len(head)))


@pytest.fixture
def socks() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setblocking(False)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    try:
        yield rx, tx
    finally:
        rx.close()
        tx.close()


async def test_an_owner_gets_the_rest_through_dispatch_and_the_counters_in_its_dict(
    socks: tuple[socket.socket, socket.socket],
) -> None:
    rx, tx = socks
    loop = asyncio.get_running_loop()
    stats = {"mine": 7}
    dispatched: list[bytes] = []
    fp = FastPath(rx, loop, stats, lambda data, addr: dispatched.append(data))
    assert stats["mine"] == 7 and all(stats[k] == 0 for k in FAST_STATS)
    assert not fp.armed
    bulk: list[bytes] = []

    def sink(buf: memoryview, reads: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int]]:
        left = []
        for i, (off, n, seg, _arrival) in enumerate(reads):
            for s in range(off, off + n, seg):
                e = min(s + seg, off + n)
                if buf[s + 3] == 0x20:
                    bulk.append(bytes(buf[s:e]))
                else:
                    left.append((i, s, e))
        return left

    fast: list[bytes] = []
    fp.set_bulk_sink({0x20}, sink)
    fp.set_fast_handler(0x21, lambda view, addr: fast.append(bytes(view)))
    assert fp.armed
    sent = [p2p(0x20, 0), p2p(0x20, 1), p2p(0x05, 2), p2p(0x21, 3, 64), p2p(0x20, 4)]
    for d in sent:
        tx.sendto(d, rx.getsockname())
    loop.add_reader(rx.fileno(), fp.on_readable)  # the owner's reader while armed
    try:
        await until(lambda: len(bulk) + len(dispatched) + len(fast) == len(sent))
    finally:
        loop.remove_reader(rx.fileno())
    assert bulk == [sent[0], sent[1], sent[4]]
    assert fast == [sent[3]]
    assert dispatched == [sent[2]]  # not fast-path traffic: the owner's (it counts those)
    assert stats["bulk_datagrams"] == 3 and stats["fast_datagrams"] == 1
    # The owner's dispatch counts what it gets; the fast path counts only what it delivered.
    assert stats["datagrams_in"] == 4
    assert stats["bytes_in"] == sum(map(len, sent)) - len(sent[2])
    fp.set_bulk_sink(set(), None)
    assert fp.armed  # the fast handler is still set
    fp.set_fast_handler(0x21, None)
    assert not fp.armed


async def test_close_releases_a_writability_waiter_and_stops_sending() -> None:
    # A datagram socketpair whose peer never reads: once its queue is full, it is not writable.
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    mine.setblocking(False)
    try:
        while True:
            try:
                mine.send(b"x" * 1000)
            except BlockingIOError:
                break
        fp = FastPath(mine, asyncio.get_running_loop(), {}, lambda data, addr: None)
        waiter = asyncio.ensure_future(fp.wait_writable())
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert not waiter.done()  # still full
        fp.close()
        await asyncio.wait_for(waiter, 5)  # released by close, not left hanging
        assert fp.closed
        assert fp.send_segments(b"x" * 100, 100, 1, ("127.0.0.1", 9)) == 0  # sends nothing
        fp.read_blocking(lambda: False, 5.0)  # returns at once once closed
        assert fp.stats["datagrams_out"] == 0 and fp.stats["send_errors"] == 0
    finally:
        mine.close()
        peer.close()
