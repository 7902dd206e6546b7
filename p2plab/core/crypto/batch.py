"""The benchmark's batch paths: many whole datagrams sealed or opened per call.

:class:`BatchPaths` is a base of :class:`~p2plab.core.crypto.PeerCipher`: it gives it
``seal_many``, ``open_many`` and ``open_many_into`` on top of four things the cipher provides
(:meth:`~BatchPaths.fast_path`, :meth:`~BatchPaths.open`, :meth:`~BatchPaths.reserve_counters`,
:meth:`~BatchPaths.sending`).  Opening decides nothing itself: each datagram goes to the
:class:`~p2plab.core.crypto.rules.FastPath` of the established pair when it is the pair's, and
to the cipher's full :meth:`~BatchPaths.open` otherwise, so the rules are those of
:mod:`p2plab.core.crypto.rules`, exactly as for one datagram.

Both directions refuse an output buffer that shares memory with the input (``ValueError``):
sealing in place would overwrite datagrams not yet read, and the result still authenticates,
carrying the wrong plaintext (issue 14, finding 18).  A slot of ``open_many_into`` that fails
is zeroed: no unauthenticated (or replayed) bytes are left where the caller reads bodies.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from p2plab.core.wire import HEADER_SIZE
from p2plab.errors import RemoteProtocolError

from .rules import BODY_AT, NONCE, SEAL_OVERHEAD, SEALED_HEAD, Buffer, FastPath

__all__ = ["BatchPaths"]


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable ABI since 3.11): where a buffer's bytes are."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address(buf: Buffer) -> int:
    """The address of ``buf``'s first byte (``buf`` is not empty).

    Python has no other way to tell whether two buffers (views of one bytearray, a read-only
    view, a numpy array) share memory: ask the buffer protocol (a contiguous buffer, else
    BufferError).  ``from_buffer`` is the quicker call; read-only buffers take the slower one.
    """
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except TypeError:  # read-only
        view = _PyBuffer()
        _get_buffer(buf, ctypes.byref(view), 0)  # PyBUF_SIMPLE: read-only buffers too
        try:
            return int(view.buf or 0)
        finally:
            _release_buffer(ctypes.byref(view))


def _owner(buf: Buffer) -> object | None:
    """The bytes or bytearray that owns ``buf``'s memory, when Python can tell without asking
    for addresses (the common case: cheap); None otherwise (a numpy array, an mmap...)."""
    obj = buf.obj if isinstance(buf, memoryview) else buf
    return obj if type(obj) in (bytes, bytearray) else None


def _refuse_overlap(src: Buffer, src_len: int, dst: Buffer, dst_len: int, what: str) -> None:
    """ValueError if the first ``src_len`` bytes of ``src`` and ``dst_len`` of ``dst`` overlap."""
    if src_len <= 0 or dst_len <= 0:
        return
    owner_src, owner_dst = _owner(src), _owner(dst)
    if owner_src is not None and owner_dst is not None and owner_src is not owner_dst:
        return  # two objects that each own their memory: disjoint
    s, d = _address(src), _address(dst)
    if s < d + dst_len and d < s + src_len:
        raise ValueError(
            f"{what}: the output buffer overlaps the input buffer; pass separate buffers "
            "(sealing or opening in place would corrupt datagrams not yet read)"
        )


class BatchPaths:
    """``seal_many``/``open_many``/``open_many_into`` for a sealer that provides the hooks."""

    stats: dict[str, int]

    # -- what the sealer provides ---------------------------------------------------------------

    def fast_path(self) -> FastPath | None:
        """The established pair's :class:`FastPath` (None: every datagram takes the full rules)."""
        raise NotImplementedError

    def open(self, header: bytes, sealed: bytes) -> bytes:
        """The full rules for one datagram; raises a RemoteProtocolError (counted)."""
        raise NotImplementedError

    def reserve_counters(self, count: int) -> int:
        """Take ``count`` consecutive send counters at once; returns the first."""
        raise NotImplementedError

    def sending(self, header: bytes) -> tuple[bytes, bytes, ChaCha20Poly1305]:
        """``(sender_tag, receiver_tag, cipher)`` a datagram with ``header`` is sealed with."""
        raise NotImplementedError

    # -- batches ---------------------------------------------------------------------------------

    def seal_many(
        self,
        src: Buffer,
        size: int,
        count: int,
        dst: bytearray | memoryview,
    ) -> None:
        """Seal ``count`` whole datagrams of ``size`` bytes laid back to back in ``src``.

        Datagram ``i`` sealed (``size + SEAL_OVERHEAD`` bytes, the same bytes
        ``seal_datagram`` would give) is written at ``i * (size + SEAL_OVERHEAD)`` in ``dst``:
        a counter range is reserved at once, the cipher object is looked up once per distinct
        header, and the ciphertext goes straight into ``dst`` (no intermediate copy).
        """
        if size < HEADER_SIZE:
            raise ValueError(f"datagrams must be >= {HEADER_SIZE} bytes, got {size}")
        out_size = size + SEAL_OVERHEAD
        if len(src) < size * count or len(dst) < out_size * count:
            raise ValueError("buffers too small for the batch")
        _refuse_overlap(src, size * count, dst, out_size * count, "seal_many")
        sv = memoryview(src)
        dv = memoryview(dst)
        counter = self.reserve_counters(count)
        self.stats["sealed"] += count
        pack_head = SEALED_HEAD.pack_into
        pack_nonce = NONCE.pack
        first = bytes(sv[:HEADER_SIZE])
        # One header for the whole batch (the benchmark's case)?  Four strided compares.
        span = sv[: size * count]
        uniform = all(span[k::size] == first[k : k + 1] * count for k in range(HEADER_SIZE))
        if uniform:
            sender_tag, receiver_tag, aead = self.sending(first)
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
                    dv[do + BODY_AT : do + out_size],
                )
            return
        last: bytes | None = None
        for i in range(count):
            so = i * size
            do = i * out_size
            header = bytes(sv[so : so + HEADER_SIZE])
            if header != last:
                sender_tag, receiver_tag, aead = self.sending(header)
                aad = header + sender_tag + receiver_tag
                last = header
            c = counter + i
            pack_head(dv, do, header, sender_tag, receiver_tag, c)
            aead.encrypt_into(
                pack_nonce(0, c),
                sv[so + HEADER_SIZE : so + size],
                aad,
                dv[do + BODY_AT : do + out_size],
            )

    def open_many(self, buf: Buffer, spans: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Open whole sealed datagrams ``buf[start:end]`` for each span; bodies or None.

        Returns, per span, the plaintext *body* (the datagram after its 4-byte header, which
        stays in clear in ``buf``), or None if it fails (counted in ``stats`` exactly as
        :meth:`open` counts).
        """
        mv = memoryview(buf)
        out: list[bytes | None] = []
        append = out.append
        fast = self.fast_path()
        for start, end in spans:
            if fast is not None:
                body = fast.open(mv, start, end)
                if body is not False:
                    append(body)
                    continue
            append(self._open_full(mv, start, end, fast))
            fast = self.fast_path()
        if fast is not None:
            fast.finish()
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
        the replay window is accepted in one update.  Bodies longer than ``stride`` fail.  The
        slot of a datagram that fails (``stride`` bytes at ``i * stride``) is zeroed: a failed
        decryption may have written unauthenticated plaintext there.
        """
        mv = memoryview(buf)
        ov = memoryview(out)
        if len(ov) < stride * len(spans):
            raise ValueError("output buffer too small for the batch")
        _refuse_overlap(mv, len(mv), ov, stride * len(spans), "open_many_into")
        zeros = bytes(stride)
        oks: list[bool] = []
        append = oks.append
        overhead = HEADER_SIZE + SEAL_OVERHEAD
        fast = self.fast_path()
        for i, (start, end) in enumerate(spans):
            n = end - start - overhead
            at = i * stride
            if n > stride:  # the caller's buffer, not the datagram, is too small: refuse it
                self.stats["auth_failures"] += 1
                ov[at : at + stride] = zeros
                append(False)
                continue
            if fast is not None and n >= 0:
                ok = fast.open_into(mv, start, end, ov[at : at + n])
                if ok is not None:
                    if not ok:
                        ov[at : at + stride] = zeros
                    append(ok)
                    continue
            body = self._open_full(mv, start, end, fast)
            if body is not None:
                ov[at : at + len(body)] = body
            else:
                ov[at : at + stride] = zeros
            append(body is not None)
            fast = self.fast_path()
        if fast is not None:
            fast.finish()
        return oks

    def _open_full(
        self, mv: memoryview, start: int, end: int, fast: FastPath | None
    ) -> bytes | None:
        """One datagram through the full rules (after writing back what the fast path did)."""
        if fast is not None:
            fast.finish()
        try:
            return self.open(
                bytes(mv[start : start + HEADER_SIZE]), bytes(mv[start + HEADER_SIZE : end])
            )
        except RemoteProtocolError:
            return None
