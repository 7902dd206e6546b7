"""UdpEndpoint on loopback: GRO splitting with mixed traffic, bulk sink order, fast handlers,
send_segments with and without GSO (and its EINVAL fallback), buffer sizes and stats counters.

Every check is on what arrived (contents, order, counts); nothing is timed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from p2plab.aio.endpoint import UdpEndpoint, local_endpoint_for
from p2plab.aio.fastpath import FastPath
from p2plab.aio.udp_os import (
    SO_RCVBUFFORCE,
    SOL_UDP,
    UDP_SEGMENT,
    gso_supported,
    mmsg_supported,
    set_buffer_sizes,
)
from tests.conftest import TIMEOUT_UNIT, until

T = 10 * TIMEOUT_UNIT
MAGIC = b"\xd7\x50\x01"
SIZE = 300


def p2p(kind: int, i: int, size: int = SIZE) -> bytes:
    """A p2p-shaped datagram of ``size`` bytes: magic, version, type, then the index."""
    head = MAGIC + bytes((kind,)) + struct.pack("!I", i)
    return head + bytes((i + k) & 0xFF for k in range(size - len(head)))


def stun(i: int) -> bytes:
    """A STUN Binding request with a transaction id derived from ``i``."""
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + i.to_bytes(12, "big")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[UdpEndpoint, socket.socket]]:
    ep = await UdpEndpoint.bind("127.0.0.1", 0)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    try:
        yield ep, tx
    finally:
        ep.close()
        tx.close()


def gso_send(tx: socket.socket, datagrams: list[bytes], addr: tuple[str, int]) -> bool:
    """Send equal-sized datagrams as one GSO send; False where the kernel has no GSO."""
    if not gso_supported(tx):
        for d in datagrams:
            tx.sendto(d, addr)
        return False
    size = len(datagrams[0])
    assert all(len(d) == size for d in datagrams[:-1])
    tx.sendmsg([b"".join(datagrams)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, addr)
    return True


class Recorder:
    """Records every delivery path of an endpoint in one ordered log."""

    def __init__(self, ep: UdpEndpoint, bulk_types: set[int] | None = None) -> None:
        self.log: list[tuple[str, bytes]] = []
        ep.peer_handler = lambda data, addr: self.log.append(("peer", data))
        ep.stun_fallback = lambda data, addr: self.log.append(("stun", data))
        if bulk_types:
            ep.set_bulk_sink(bulk_types, self.sink)
        self.bulk_types = bulk_types or set()
        self.sink_calls = 0

    def sink(
        self, buf: memoryview, reads: list[tuple[int, int, int, int]]
    ) -> list[tuple[int, int, int]]:
        self.sink_calls += 1
        left = []
        for i, (off, n, seg, _arr) in enumerate(reads):
            for s in range(off, off + n, seg):
                e = min(s + seg, off + n)
                if buf[s + 3] in self.bulk_types:
                    self.log.append(("bulk", bytes(buf[s:e])))
                else:
                    left.append((i, s, e))
        return left


async def test_gro_batches_are_split_for_every_reader(
    pair: tuple[UdpEndpoint, socket.socket],
) -> None:
    ep, tx = pair
    rec = Recorder(ep)
    addr = ep.local_address
    batch = [p2p(0x01, i) for i in range(20)] + [p2p(0x01, 20, size=100)]  # short last one
    used_gso = gso_send(tx, batch, addr)
    tx.sendto(stun(7), addr)
    batch2 = [p2p(0x02, i) for i in range(5)]
    gso_send(tx, batch2, addr)
    await until(lambda: len(rec.log) == 27)
    assert rec.log == (
        [("peer", d) for d in batch] + [("stun", stun(7))] + [("peer", d) for d in batch2]
    )
    assert ep.stats["datagrams_in"] == 27
    assert ep.stats["bytes_in"] == sum(map(len, batch + batch2)) + 20
    assert ep.stats["stun_unmatched"] == 0
    if used_gso and ep.gro:
        assert ep.stats["gro_reads"] >= 1  # the kernel coalesced at least one batch


async def test_bulk_sink_keeps_arrival_order_with_control_and_stun(
    pair: tuple[UdpEndpoint, socket.socket],
) -> None:
    ep, tx = pair
    rec = Recorder(ep, bulk_types={0x20})
    addr = ep.local_address
    sent: list[tuple[str, bytes]] = []
    # A GSO batch of data with one foreign type inside it (same size, so the kernel may
    # coalesce it along): the sink hands that span back and the endpoint dispatches it.
    mixed = [p2p(0x20, 0), p2p(0x20, 1), p2p(0x05, 2), p2p(0x20, 3)]
    gso_send(tx, mixed, addr)
    sent += [("bulk", mixed[0]), ("bulk", mixed[1]), ("peer", mixed[2]), ("bulk", mixed[3])]
    for i in range(4, 40):
        if i % 9 == 0:
            d = stun(i)
            sent.append(("stun", d))
        elif i % 5 == 0:
            d = p2p(0x03, i, size=80)  # a control-like datagram between data
            sent.append(("peer", d))
        else:
            d = p2p(0x20, i)
            sent.append(("bulk", d))
        tx.sendto(d, addr)
    await until(lambda: len(rec.log) == len(sent))
    # Same datagrams, and each path in arrival order.
    assert sorted(rec.log) == sorted(sent)
    for kinds in ({"bulk"}, {"peer", "stun"}):
        assert [e for e in rec.log if e[0] in kinds] == [e for e in sent if e[0] in kinds]
    # A datagram read on its own is dispatched only after the sink got every bulk datagram
    # that arrived before it (pending batches are flushed first).  A foreign datagram that a
    # GRO read carried along among data is handed back by the sink and dispatched after it.
    for pos in range(4, len(sent)):
        if sent[pos][0] != "bulk":
            at = rec.log.index(sent[pos])
            before = sum(k == "bulk" for k, _ in rec.log[:at])
            assert before == sum(k == "bulk" for k, _ in sent[:pos])
    nbulk = sum(k == "bulk" for k, _ in sent)
    assert ep.stats["bulk_datagrams"] == nbulk
    assert ep.stats["datagrams_in"] == len(sent)
    assert rec.sink_calls >= 1
    ep.set_bulk_sink(set(), None)  # removed: data goes to the peer handler again
    tx.sendto(p2p(0x20, 99), addr)
    await until(lambda: rec.log[-1] == ("peer", p2p(0x20, 99)))


async def test_fast_handler_gets_views_and_others_are_untouched(
    pair: tuple[UdpEndpoint, socket.socket],
) -> None:
    ep, tx = pair
    rec = Recorder(ep)
    fast: list[tuple[bytes, tuple[str, int]]] = []
    ep.set_fast_handler(0x21, lambda view, a: fast.append((bytes(view), a)))
    addr = ep.local_address
    tx.sendto(p2p(0x21, 1, size=64), addr)
    tx.sendto(p2p(0x01, 2, size=64), addr)
    tx.sendto(p2p(0x21, 3, size=64), addr)
    await until(lambda: len(fast) == 2 and len(rec.log) == 1)
    assert [d for d, _ in fast] == [p2p(0x21, 1, size=64), p2p(0x21, 3, size=64)]
    assert all(a == tx.getsockname() for _, a in fast)
    assert rec.log == [("peer", p2p(0x01, 2, size=64))]
    assert ep.stats["fast_datagrams"] == 2 and ep.stats["datagrams_in"] == 3

    def broken(view: memoryview, a: Any) -> None:
        raise RuntimeError("handler bug")

    ep.set_fast_handler(0x21, broken)
    tx.sendto(p2p(0x21, 4, size=64), addr)
    tx.sendto(p2p(0x01, 5, size=64), addr)
    await until(lambda: len(rec.log) == 2)
    assert ep.stats["handler_errors"] == 1  # counted, the reader lives on
    ep.set_fast_handler(0x21, None)
    tx.sendto(p2p(0x21, 6, size=64), addr)
    await until(lambda: len(rec.log) == 3)
    assert rec.log[-1] == ("peer", p2p(0x21, 6, size=64))


def receiver() -> socket.socket:
    """A plain socket with room for every datagram a test sends (loopback drops on overflow)."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    set_buffer_sizes(rx, 4 * 1024 * 1024, 0)
    rx.bind(("127.0.0.1", 0))
    return rx


async def receive_all(rx: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` datagrams from a blocking-with-timeout plain socket (GRO off)."""
    rx.settimeout(T)
    loop = asyncio.get_running_loop()
    return [await loop.run_in_executor(None, rx.recv, 65536) for _ in range(count)]


@pytest.mark.parametrize("gso", [True, False])
async def test_send_segments_with_and_without_gso(gso: bool) -> None:
    ep = await UdpEndpoint.bind("127.0.0.1", 0)
    rx = receiver()
    try:
        size, count = 1000, 150  # more than one GSO send's 64 segments
        data = b"".join(p2p(0x20, i, size) for i in range(count))
        sent = ep.send_segments(data, size, count, rx.getsockname(), gso=gso)
        assert sent == count
        got = await receive_all(rx, count)
        assert got == [p2p(0x20, i, size) for i in range(count)]
        assert ep.stats["datagrams_out"] == count and ep.stats["bytes_out"] == count * size
        if gso and ep.gso:
            assert ep.stats["gso_sends"] == 3  # 64 + 64 + 22
        else:
            assert ep.stats["gso_sends"] == 0
    finally:
        ep.close()
        rx.close()


class _RefusingGso:
    """A socket stand-in whose GSO sends fail with EINVAL (as on a path without offload)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.refused = 0

    def sendmsg(self, *args: Any) -> int:
        self.refused += 1
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


async def test_send_segments_falls_back_when_gso_is_refused() -> None:
    # The fast path on a socket stand-in: it sends on the socket it was handed.
    real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    real.setblocking(False)
    real.bind(("127.0.0.1", 0))
    rx = receiver()
    fake = _RefusingGso(real)
    stats: dict[str, int] = {}
    fp = FastPath(fake, asyncio.get_running_loop(), stats, lambda data, addr: None)  # type: ignore[arg-type]
    fp.gso = True  # claim support so the GSO path is tried
    try:
        size, count = 500, 10
        data = b"".join(p2p(0x20, i, size) for i in range(count))
        assert fp.send_segments(data, size, count, rx.getsockname()) == count
        assert fake.refused == 1 and fp.gso is False  # turned off for this socket
        assert await receive_all(rx, count) == [p2p(0x20, i, size) for i in range(count)]
        assert fp.send_segments(data, size, count, rx.getsockname()) == count  # plain now
        assert fake.refused == 1
        assert await receive_all(rx, count) == [p2p(0x20, i, size) for i in range(count)]
        assert stats["datagrams_out"] == 2 * count and stats["send_errors"] == 0
    finally:
        fp.close()
        real.close()
        rx.close()


async def test_counters_for_unmatched_unhandled_and_stun_listeners(
    pair: tuple[UdpEndpoint, socket.socket],
) -> None:
    ep, tx = pair
    addr = ep.local_address
    heard: list[bytes] = []
    ep.add_stun_listener(stun(1)[8:20], lambda d, a: heard.append(d))
    tx.sendto(stun(1), addr)  # to the listener
    tx.sendto(stun(2), addr)  # nobody: unmatched
    tx.sendto(b"hello", addr)  # no peer handler: dropped
    await until(lambda: ep.stats["datagrams_in"] == 3)
    assert heard == [stun(1)]
    assert ep.stats["stun_unmatched"] == 1 and ep.stats["dropped_no_handler"] == 1
    ep.remove_stun_listener(stun(1)[8:20])
    tx.sendto(stun(1), addr)
    await until(lambda: ep.stats["stun_unmatched"] == 2)
    assert ep.sendto(b"x" * 10, tx.getsockname())
    assert ep.stats["datagrams_out"] == 1 and ep.stats["bytes_out"] == 10
    ep.close()
    assert not ep.sendto(b"x", tx.getsockname()) and ep.closed


def test_buffer_sizes_are_granted() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        want = 8 * 1024 * 1024
        rcv, snd = set_buffer_sizes(s, want, want)
        with open("/proc/sys/net/core/rmem_max") as fh:
            rmem_max = int(fh.read())
        # Linux reports twice the size set; only with CAP_NET_ADMIN (SO_RCVBUFFORCE) may it
        # go beyond rmem_max.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                assert SO_RCVBUFFORCE is not None
                probe.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, want)
                floor = want
            except OSError:
                floor = min(want, rmem_max)
        assert rcv >= 2 * floor and snd > 0


# -- sendmmsg / recvmmsg ------------------------------------------------------------------------


@pytest.mark.parametrize("mmsg", [True, False])
async def test_plain_sends_batch_with_sendmmsg_and_lose_nothing(mmsg: bool) -> None:
    ep = await UdpEndpoint.bind("127.0.0.1", 0, mmsg=mmsg)
    rx = receiver()
    try:
        assert ep.mmsg is (mmsg and mmsg_supported())
        size, count = 700, 150  # more than two sendmmsg calls of 64
        data = bytearray(b"".join(p2p(0x20, i, size) for i in range(count)))
        assert ep.send_segments(data, size, count, rx.getsockname(), gso=False) == count
        got = await receive_all(rx, count)
        assert got == [p2p(0x20, i, size) for i in range(count)]
        assert ep.stats["datagrams_out"] == count and ep.stats["bytes_out"] == count * size
        assert ep.stats["mmsg_sends"] == (3 if ep.mmsg else 0)  # 64 + 64 + 22
        # Read-only buffers (bytes) take one sendto per datagram, with the same result.
        assert ep.send_segments(bytes(data[: 3 * size]), size, 3, rx.getsockname(), gso=False) == 3
        assert await receive_all(rx, 3) == [p2p(0x20, i, size) for i in range(3)]
    finally:
        ep.close()
        rx.close()


@pytest.mark.parametrize("mmsg", [True, False])
async def test_bulk_reads_with_recvmmsg_count_exactly_among_other_traffic(mmsg: bool) -> None:
    ep = await UdpEndpoint.bind("127.0.0.1", 0, mmsg=mmsg)
    ep.set_buffer_sizes(8 * 1024 * 1024)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    tx2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a second source
    tx2.bind(("127.0.0.1", 0))
    try:
        rec = Recorder(ep, bulk_types={0x20})
        fast: list[bytes] = []
        ep.set_fast_handler(0x21, lambda view, a: fast.append(bytes(view)))
        addr = ep.local_address
        sent: list[tuple[str, bytes]] = []
        sent_fast: list[bytes] = []
        # More bulk datagrams than the reader's slots (256), so batches span several calls.
        # Hold the reader off while they queue, so that recvmmsg finds full batches.
        ep.loop.remove_reader(ep.socket.fileno())
        for i in range(700):
            if i % 97 == 0:
                d = stun(i)
                sent.append(("stun", d))
            elif i % 50 == 0:
                d = p2p(0x03, i, size=90)
                sent.append(("peer", d))
            elif i % 71 == 0:
                d = p2p(0x21, i, size=64)
                sent_fast.append(d)
            else:
                d = p2p(0x20, i, size=SIZE if i % 3 else 1200)
                sent.append(("bulk", d))
            (tx2 if i % 13 == 0 else tx).sendto(d, addr)
        ep.loop.add_reader(ep.socket.fileno(), ep._on_readable)
        await until(lambda: len(rec.log) == len(sent) and len(fast) == len(sent_fast))
        assert rec.log == sent  # every path, in arrival order (one reader, flushed in order)
        assert fast == sent_fast
        nbulk = sum(k == "bulk" for k, _ in sent)
        assert ep.stats["bulk_datagrams"] == nbulk
        assert ep.stats["datagrams_in"] == len(sent) + len(sent_fast)
        assert ep.stats["bytes_in"] == sum(len(d) for _, d in sent) + sum(map(len, sent_fast))
        assert ep.stats["truncated"] == 0 and ep.stats["handler_errors"] == 0
        if ep.mmsg:
            assert 0 < ep.stats["mmsg_reads"] < 700  # batched: fewer calls than datagrams
        else:
            assert ep.stats["mmsg_reads"] == 0
        # Without a bulk sink the ordinary reader takes over again.
        ep.set_bulk_sink(set(), None)
        reads = ep.stats["mmsg_reads"]
        tx.sendto(p2p(0x20, 1000), addr)
        await until(lambda: rec.log[-1] == ("peer", p2p(0x20, 1000)))
        assert ep.stats["mmsg_reads"] == reads
    finally:
        ep.close()
        tx.close()
        tx2.close()


@pytest.mark.parametrize("spin_s", [0.0, 0.002])
async def test_read_blocking_dispatches_everything_and_stops_when_told(
    pair: tuple[UdpEndpoint, socket.socket], spin_s: float
) -> None:
    """Sleeping in the read (spin_s 0) or busy-polling first: the same deliveries."""
    ep, tx = pair
    rec = Recorder(ep)
    fast: list[bytes] = []
    ep.set_fast_handler(0x21, lambda view, a: fast.append(bytes(view)))
    listened: list[bytes] = []
    ep.add_stun_listener((7).to_bytes(12, "big"), lambda data, a: listened.append(data))
    addr = ep.local_address
    sent = [p2p(0x21, 1, 64), p2p(0x01, 2, 64), stun(7), stun(8), p2p(0x21, 3, 64)]
    for d in sent:
        tx.sendto(d, addr)
    # Blocks on the socket (not the event loop) until both fast datagrams are in: every
    # datagram read on the way took its usual path.
    ep.read_blocking(lambda: len(fast) == 2, T, spin_s)
    assert fast == [p2p(0x21, 1, 64), p2p(0x21, 3, 64)]
    assert listened == [stun(7)]
    assert rec.log == [("peer", p2p(0x01, 2, 64)), ("stun", stun(8))]
    assert ep.stats["datagrams_in"] == 5 and ep.stats["fast_datagrams"] == 2
    # GRO-merged batches: of the fast type, each datagram reaches the fast handler; of another
    # type, the peer handler.  (Sent before the read starts, so the kernel may merge them.)
    merged = [p2p(0x21, 10 + i, 64) for i in range(4)]
    other = [p2p(0x02, 20 + i, 64) for i in range(3)]
    gso_send(tx, merged, addr)
    gso_send(tx, other, addr)
    ep.read_blocking(lambda: len(rec.log) == 5, T, spin_s)
    assert fast[2:] == merged
    assert rec.log[2:] == [("peer", d) for d in other]
    assert ep.stats["datagrams_in"] == 12 and ep.stats["fast_datagrams"] == 6
    # Nothing to read: it returns after its time limit; already true: at once.
    ep.read_blocking(lambda: False, 0.01, spin_s)
    ep.read_blocking(lambda: True, T, spin_s)
    assert ep.stats["datagrams_in"] == 12
    # The event loop's reader still works afterwards.
    tx.sendto(p2p(0x01, 9, 64), addr)
    await until(lambda: len(rec.log) == 6)
    assert rec.log[-1] == ("peer", p2p(0x01, 9, 64))


async def test_local_endpoint_for_finds_open_endpoints_of_this_process() -> None:
    ep = await UdpEndpoint.bind("127.0.0.1", 0)
    addr = ep.local_address
    assert local_endpoint_for(addr) is ep
    ep.close()
    assert local_endpoint_for(addr) is None


async def test_a_handler_that_arms_the_fast_path_mid_drain_hands_it_the_rest(
    pair: tuple[UdpEndpoint, socket.socket],
) -> None:
    """A control datagram that starts a run arms the fast path from inside the plain reader:
    the datagrams queued behind it in the same drain already take the fast path."""
    ep, tx = pair
    fast: list[bytes] = []
    peer: list[bytes] = []

    def on_peer(data: bytes, addr: tuple[str, int]) -> None:
        peer.append(data)
        ep.set_fast_handler(0x21, lambda view, a: fast.append(bytes(view)))

    ep.peer_handler = on_peer
    addr = ep.local_address
    sent = [p2p(0x01, 0, 64), p2p(0x21, 1, 64), p2p(0x21, 2, 64)]
    ep.loop.remove_reader(ep.socket.fileno())  # queue them all for one drain
    for d in sent:
        tx.sendto(d, addr)
    ep.loop.add_reader(ep.socket.fileno(), ep._on_readable)
    await until(lambda: len(fast) == 2)
    assert peer == [sent[0]] and fast == sent[1:]
    assert ep.stats["fast_datagrams"] == 2 and ep.stats["datagrams_in"] == 3
