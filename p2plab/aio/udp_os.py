"""The operating system's UDP features the endpoint uses, each with a clean fallback.

UDP GSO (``UDP_SEGMENT``) and GRO (``UDP_GRO``) probes, socket buffer sizes (``SO_RCVBUFFORCE``
as root), and ``sendmmsg(2)``/``recvmmsg(2)`` through ctypes with their mmsghdr, iovec and
sockaddr arrays built once per socket (:class:`MmsgIO`).  :mod:`p2plab.aio.endpoint` (the
socket and its plain reader) and :mod:`p2plab.aio.fastpath` (batched reads and sends) put them
together; nothing here knows about datagram types or handlers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
import sys
from typing import Any

__all__ = [
    "CMSG_SPACE",
    "MAX_READS_PER_WAKEUP",
    "MMSG_BATCH",
    "MMSG_FLUSH_BYTES",
    "MMSG_RECV_SLOTS",
    "RECV_SIZE",
    "SOL_UDP",
    "SO_RCVBUFFORCE",
    "SO_SNDBUFFORCE",
    "U16",
    "UDP_GRO",
    "UDP_MAX_SEGMENTS",
    "UDP_SEGMENT",
    "Address",
    "MmsgIO",
    "gro_segment",
    "gro_supported",
    "gso_supported",
    "mmsg_supported",
    "set_buffer_sizes",
    "timeval",
]

Address = tuple[str, int]

# Linux values; older Pythons' socket module lacks the names.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
_LINUX = sys.platform.startswith("linux")
SO_RCVBUFFORCE: int | None = getattr(socket, "SO_RCVBUFFORCE", 33 if _LINUX else None)
SO_SNDBUFFORCE: int | None = getattr(socket, "SO_SNDBUFFORCE", 32 if _LINUX else None)
UDP_MAX_SEGMENTS = 64
"""Most segments one GSO send may carry (the kernel's UDP_MAX_SEGMENTS)."""
RECV_SIZE = 65536
"""One read's buffer: a datagram, or a GRO batch (at most 64 KiB)."""
MAX_READS_PER_WAKEUP = 2048
"""Most reads a reader makes per readable event before it returns to the loop (fairness)."""
CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")


# -- sendmmsg(2) / recvmmsg(2) through ctypes (Linux) -------------------------------------------


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("hdr", _Msghdr), ("len", ctypes.c_uint))


MMSG_BATCH = 64
"""Datagrams per sendmmsg/recvmmsg call."""
MMSG_RECV_SLOTS = 256
"""Receive slots (of 64 KiB: 16 MiB, allocated once a bulk sink is armed): up to this many
datagrams (or GRO reads) are accounted per batch, which keeps per-batch costs small."""
_NAME_SIZE = 32  # a sockaddr_in6 (28) rounded up
MMSG_FLUSH_BYTES = 2 * 1024 * 1024  # hand a batch over once this much has landed
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)


def _load_mmsg() -> tuple[Any, Any, Any] | None:
    """(libc.sendmmsg, libc.recvmmsg, numpy) on Linux with 64-bit layouts, else None."""
    if not _LINUX or ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(_Mmsghdr) != 64:
        return None
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a dependency of the fast path only
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        send, recv = libc.sendmmsg, libc.recvmmsg
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    send.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    send.restype = ctypes.c_int
    recv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    recv.restype = ctypes.c_int
    return send, recv, numpy


_MMSG = _load_mmsg()


def mmsg_supported() -> bool:
    """True if batched sendmmsg/recvmmsg are available here (Linux, ctypes, numpy)."""
    return _MMSG is not None


def _sockaddr(addr: Address, family: int) -> bytes:
    """The raw sockaddr_in/sockaddr_in6 of ``addr`` (little-endian family field, as on Linux)."""
    if family == socket.AF_INET:
        return (
            struct.pack("<H", socket.AF_INET)
            + struct.pack("!H", addr[1])
            + socket.inet_aton(addr[0])
            + bytes(8)
        )
    return (
        struct.pack("<H", socket.AF_INET6)
        + struct.pack("!HI", addr[1], 0)
        + socket.inet_pton(socket.AF_INET6, addr[0])
        + bytes(4)
    )


class MmsgIO:
    """Pre-built mmsghdr/iovec/sockaddr arrays for one socket (all allocated once).

    Sends: every message of a batch points at one destination and at the next ``size`` bytes of
    the caller's buffer.  Receives (set up on first use): message ``i`` reads into slot ``i`` of
    a receive buffer of ``MMSG_RECV_SLOTS`` slots of ``slot`` bytes (a GRO read fits in one),
    with its own sockaddr and control space (for the UDP_GRO segment size); calls fill the
    slots ``MMSG_BATCH`` at a time, so several calls can be accounted in one batch.
    """

    def __init__(self, sock: socket.socket, slot: int) -> None:
        assert _MMSG is not None
        self.send_fn, self.recv_fn, np = _MMSG
        self.np = np
        self.fd = sock.fileno()
        self.family = sock.family
        n = MMSG_BATCH
        self.slot = slot
        self.s_iov = (_Iovec * n)()
        self.s_msgs = (_Mmsghdr * n)()
        self.s_name = ctypes.create_string_buffer(_NAME_SIZE)
        self.s_addr: Address | None = None
        self.s_iov_np = np.frombuffer(self.s_iov, dtype=np.uint64).reshape(n, 2)
        iov0 = ctypes.addressof(self.s_iov)
        for i in range(n):
            h = self.s_msgs[i].hdr
            h.name = ctypes.addressof(self.s_name)
            h.iov = iov0 + i * ctypes.sizeof(_Iovec)
            h.iovlen = 1
        self.rbuf: bytearray | None = None

    def setup_receive(self) -> None:
        """Allocate the receive side (the buffer's pages are touched only as datagrams land)."""
        if self.rbuf is not None:
            return
        np = self.np
        n = MMSG_RECV_SLOTS
        slot = self.slot
        self.rbuf = bytearray(n * slot)
        self.rview = memoryview(self.rbuf)
        self.rnp = np.frombuffer(self.rbuf, dtype=np.uint8).reshape(n, slot)
        self.r_iov = (_Iovec * n)()
        self.r_msgs = (_Mmsghdr * n)()
        self.r_names = ctypes.create_string_buffer(_NAME_SIZE * n)
        self.ctrl_size = max(CMSG_SPACE, 8)
        self.r_ctrl = ctypes.create_string_buffer(self.ctrl_size * n)
        self._pin = (ctypes.c_char * len(self.rbuf)).from_buffer(self.rbuf)  # never resized
        base = ctypes.addressof(self._pin)
        riov0 = ctypes.addressof(self.r_iov)
        for i in range(n):
            self.r_iov[i].base = base + i * slot
            self.r_iov[i].len = slot
            h = self.r_msgs[i].hdr
            h.name = ctypes.addressof(self.r_names) + i * _NAME_SIZE
            h.iov = riov0 + i * ctypes.sizeof(_Iovec)
            h.iovlen = 1
            h.control = ctypes.addressof(self.r_ctrl) + i * self.ctrl_size
        self.r_base = ctypes.addressof(self.r_msgs)
        raw = np.frombuffer(self.r_msgs, dtype=np.uint8).reshape(n, 64)
        self.r_u32 = raw.view(np.uint32)  # [:, 2] namelen, [:, 12] flags, [:, 14] msg_len
        self.r_u64 = raw.view(np.uint64)  # [:, 5] controllen
        self.names = np.frombuffer(self.r_names, dtype=np.uint8).reshape(n, _NAME_SIZE)
        self.ctrl = np.frombuffer(self.r_ctrl, dtype=np.uint8).reshape(n, self.ctrl_size)
        self.addr_cache: dict[bytes, Address] = {}

    def sendmmsg(self, mv: memoryview, size: int, count: int, addr: Address) -> int:
        """Send up to MMSG_BATCH datagrams; returns how many went (0: EAGAIN); raises OSError."""
        if addr != self.s_addr:
            raw = _sockaddr(addr, self.family)
            ctypes.memmove(self.s_name, raw, len(raw))
            for i in range(MMSG_BATCH):
                self.s_msgs[i].hdr.namelen = len(raw)
            self.s_addr = addr
        n = min(count, MMSG_BATCH)
        cbuf = (ctypes.c_char * len(mv)).from_buffer(mv)
        try:
            base = ctypes.addressof(cbuf)
            iov = self.s_iov_np
            iov[:n, 0] = base + self.np.arange(n, dtype=self.np.uint64) * size
            iov[:n, 1] = size
            got = self.send_fn(self.fd, self.s_msgs, n, _MSG_DONTWAIT)
        finally:
            del cbuf
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        return int(got)

    def recvmmsg(self, first: int) -> int:
        """Receive up to MMSG_BATCH datagrams into slots ``first...``; -1 on EAGAIN."""
        end = first + MMSG_BATCH
        self.r_u32[first:end, 2] = _NAME_SIZE
        self.r_u64[first:end, 5] = self.ctrl_size
        got = self.recv_fn(self.fd, self.r_base + first * 64, MMSG_BATCH, _MSG_DONTWAIT, None)
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return -1
            raise OSError(err, os.strerror(err))
        return int(got)

    def gro_segments(self, first: int, end: int, segs: list[int]) -> int:
        """Put the ``UDP_GRO`` segment size of each message ``first + i`` (below ``end``) that
        has one (a GRO read) into ``segs[i]``; returns how many had one."""
        np = self.np
        found = 0
        for i in np.flatnonzero(self.r_u64[first:end, 5]).tolist():
            c = self.ctrl[first + i]
            lvl = int(c[8:12].view(np.int32)[0])
            typ = int(c[12:16].view(np.int32)[0])
            if lvl == SOL_UDP and typ == UDP_GRO:
                seg = int(c[16:20].view(np.int32)[0])
                if seg > 0:
                    segs[i] = seg
                    found += 1
        return found

    def address(self, i: int) -> Address:
        raw = self.names[i, : 8 if self.family == socket.AF_INET else 24].tobytes()
        a = self.addr_cache.get(raw)
        if a is None:
            if self.family == socket.AF_INET:
                a = (socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big"))
            else:
                a = (socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big"))
            if len(self.addr_cache) > 256:
                self.addr_cache.clear()
            self.addr_cache[raw] = a
        return a


def _udp_option_known(sock: socket.socket, option: int) -> bool:
    """True if the kernel knows this SOL_UDP option for this (Linux, datagram) socket."""
    if not sys.platform.startswith("linux") or sock.type != socket.SOCK_DGRAM:
        return False
    try:
        sock.getsockopt(SOL_UDP, option)
    except OSError:
        return False
    return True


def gso_supported(sock: socket.socket) -> bool:
    """True if the kernel knows UDP_SEGMENT for this socket (Linux 4.18+)."""
    return _udp_option_known(sock, UDP_SEGMENT)


def gro_supported(sock: socket.socket) -> bool:
    """True if UDP_GRO can be turned on for this socket (Linux 5.0+)."""
    return _udp_option_known(sock, UDP_GRO)


def set_buffer_sizes(sock: socket.socket, rcvbuf: int, sndbuf: int) -> tuple[int, int]:
    """Ask for socket buffers of these sizes; returns what the kernel granted (as it reports).

    Beyond ``net.core.rmem_max``/``wmem_max`` plain ``SO_RCVBUF``/``SO_SNDBUF`` are capped; as
    root (CAP_NET_ADMIN) ``SO_RCVBUFFORCE``/``SO_SNDBUFFORCE`` are tried first, which are not.
    Never raises for refused sizes.
    """
    for size, force, plain in (
        (rcvbuf, SO_RCVBUFFORCE, socket.SO_RCVBUF),
        (sndbuf, SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        if size <= 0:
            continue
        done = False
        if force is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
                done = True
            except OSError:
                pass
        if not done:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
            except OSError:  # pragma: no cover - platform limits
                pass
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )


def timeval(seconds: float) -> bytes:
    """A struct timeval (for SO_RCVTIMEO); at least 1 us unless 0 (0 means no limit)."""
    if seconds <= 0:
        return struct.pack("@ll", 0, 0)
    us = max(1, int(seconds * 1e6))
    return struct.pack("@ll", us // 1_000_000, us % 1_000_000)


def gro_segment(ancdata: list[tuple[int, int, bytes]], n: int, stats: dict[str, int]) -> int:
    """The segment size of a read from its ``UDP_GRO`` control message (``n``: not merged)."""
    seg = n
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            seg = _I32.unpack(data[:4])[0] if len(data) >= 4 else U16.unpack(data[:2])[0]
            stats["gro_reads"] += 1
    return seg if seg > 0 else n
