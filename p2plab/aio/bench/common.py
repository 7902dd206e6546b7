"""Shared pieces of the benchmark (:mod:`p2plab.aio.bench`): constants, the sealer protocol,
link helpers and the result rows both ends publish.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import struct
from typing import TYPE_CHECKING, Any, Protocol

from p2plab.aio.endpoint import local_endpoint_for
from p2plab.core import bench as cb
from p2plab.results import BenchResult

if TYPE_CHECKING:
    from p2plab.aio.endpoint import Address, UdpEndpoint
    from p2plab.aio.extension import WorkerHost

log = logging.getLogger(__name__)

__all__ = [
    "BODY",
    "CREDIT_NS",
    "CREDIT_TIMEOUT_NS",
    "CREDIT_TIMER_S",
    "MAX_REPORT_BYTES",
    "P2P_HEADER",
    "PATH_MTU_PAYLOAD",
    "RCVBUF",
    "RTT_BLOCK_S",
    "RTT_IDLE_S",
    "RTT_SPIN_MAX_US",
    "RTT_SPIN_US",
    "SKB_OVERHEAD",
    "YIELD_NS",
    "BenchSealer",
    "link_sealer",
    "new_run_id",
    "now_iso",
    "np",
    "open_sealed",
    "overhead",
    "peer_on_loop",
    "receiver_row",
    "same_address",
    "sender_row",
]


PATH_MTU_PAYLOAD = 1472  # 1500 - IPv4 20 - UDP 8: larger datagrams fragment on Ethernet paths
MAX_REPORT_BYTES = 12_000  # the session caps control messages at 16 KiB
YIELD_NS = 2_000_000  # a sender yields to the loop at least this often
RCVBUF = 32 * 1024 * 1024  # asked for by a receiving endpoint (beyond rmem_max only as root)
SKB_OVERHEAD = 1024  # kernel bytes charged per queued datagram beyond its payload (conservative)
CREDIT_NS = 2_000_000  # the receiver reports credit at least this often while data arrive
CREDIT_TIMER_S = 0.01  # ... and this often from a timer (so a stalled sender hears of it)
CREDIT_TIMEOUT_NS = 500_000_000  # no credit this long: the sender writes off what is in flight
RTT_BLOCK_S = 0.05  # RTT runs block on the socket at most this long before yielding to the loop
RTT_IDLE_S = 3.0  # a responder stops blocking after this long without a ping (default)
RTT_SPIN_US = 1000.0  # RTT runs busy-poll this long after each datagram before sleeping
RTT_SPIN_MAX_US = 100_000.0  # the most a peer may ask a responder to spin for


BODY = struct.Struct("!IQQ")  # run_id, seq, send_ts_ns: a benchmark header after its 4 bytes
P2P_HEADER = 4  # the p2p header (magic, version, type) that stays in clear when sealed


def np() -> Any:
    """numpy (None without numpy), imported on first use."""
    return cb.numpy_or_none()


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def new_run_id() -> int:
    return int.from_bytes(os.urandom(4), "big") or 1


class BenchSealer(Protocol):
    """What a benchmark needs of a sealer (:class:`~p2plab.core.crypto.PeerCipher` has it)."""

    encrypted: bool
    """True if the sealer encrypts and authenticates (only then are runs ``encrypted``)."""

    def seal_datagram(self, datagram: bytes) -> bytes:
        """The sealed form of a whole datagram (its 4-byte header stays in clear)."""
        ...

    def open_datagram(self, data: bytes) -> bytes | None:
        """The plaintext datagram, or None if it does not open (the sealer counts it)."""
        ...


def link_sealer(host: WorkerHost) -> BenchSealer | None:
    """The link's encrypting sealer, if it has one."""
    sealer = host.peer_sealer
    if sealer is None or not getattr(sealer, "encrypted", False):
        return None
    if not hasattr(sealer, "seal_datagram") or not hasattr(sealer, "open_datagram"):
        return None
    return sealer  # type: ignore[no-any-return]


def overhead(sealer: BenchSealer | None) -> int:
    """Bytes a sealed datagram carries beyond its plaintext (measured on a dummy datagram)."""
    if sealer is None:
        return 0
    probe = cb.encode_bench(0x2F, 0, 0, 0, cb.HEADER_SIZE)
    return len(sealer.seal_datagram(probe)) - len(probe)


def peer_on_loop(ep: UdpEndpoint, addr: Address) -> bool:
    """True if ``addr`` is an endpoint of this process on ``ep``'s event loop (blocking on the
    socket would then stall the peer itself)."""
    peer = local_endpoint_for(addr)
    return peer is not None and peer.loop is ep.loop


def open_sealed(sealer: BenchSealer | None, view: memoryview) -> bytes | memoryview | None:
    """The plaintext of a fast-path bench datagram: opened when the run is sealed, else as is.

    None when it fails authentication (the caller counts the drop).
    """
    if sealer is None:
        return view
    return sealer.open_datagram(bytes(view))


def same_address(a: Address, b: Address | None) -> bool:
    return b is not None and a[1] == b[1] and a[0] == b[0]


def _peer_worker(w: WorkerHost) -> str:
    return w.peer_id or ""


def _path(w: WorkerHost) -> str | None:
    return w.path  # None (an empty CSV cell) if the link went down during the run


def _rtt_ms(w: WorkerHost) -> float | None:
    rtt = w.rtt
    return round(rtt * 1000, 3) if rtt is not None else None


def _notes(size: int, sent_mbps: float, rate: float, extra: str = "") -> tuple[str, bool]:
    """The row's note (fragmentation, shortfall, ``extra``: e.g. the relay's budget) and
    whether it fell short of its target."""
    notes = ["over the path MTU: IP fragments"] if size > PATH_MTU_PAYLOAD else []
    if extra:
        notes.append(extra)
    short = cb.short_of_target(sent_mbps, rate)
    if short:
        notes.append(f"short of target: sent {sent_mbps:.1f} of {rate:g} Mbit/s asked")
    return "; ".join(notes), short


def receiver_row(
    w: WorkerHost,
    run_id: int,
    started_at: str,
    params: dict[str, Any],
    report: cb.ReceiverReport,
    *,
    gro: bool,
) -> BenchResult:
    size = int(params.get("payload_size", 0))
    rate = float(params.get("rate_mbps", 0))
    sent_mbps = float(params.get("sent_mbps", 0.0))
    note, short = _notes(size, sent_mbps, rate, str(params.get("note") or ""))
    return BenchResult(
        role="receiver",
        payload_size=size,
        duration_s=report.duration_s,
        packets_sent=report.packets_sent,
        packets_received=report.packets_received,
        lost=report.lost,
        lost_percent=report.lost_percent,
        out_of_order=report.out_of_order,
        duplicates=report.duplicates,
        jitter_ms=report.jitter_ms,
        mbps=report.mbps,
        rtt_ms=_rtt_ms(w),
        run_id=str(run_id),
        started_at=started_at,
        local_worker=w.worker_id,
        peer_worker=_peer_worker(w),
        path=_path(w),
        rate_mbps=rate,
        bytes_received=report.bytes_received,
        sent_mbps=sent_mbps,
        received_mbps=report.mbps,
        gso=bool(params.get("gso", False)),
        gro=gro,
        fragmented=size > PATH_MTU_PAYLOAD,
        encrypted=bool(params.get("encrypted", False)),
        auth_failures=report.auth_failures,
        flow_control=bool(params.get("flow_control", False)),
        short_of_target=short,
        note=note,
        intervals=report.intervals,
    )


def sender_row(
    w: WorkerHost,
    run_id: int,
    started_at: str,
    params: dict[str, Any],
    end: dict[str, Any],
    report: cb.ReceiverReport | None,
    *,
    local: bool,
    gro: bool = False,
) -> BenchResult:
    size = int(params.get("payload_size", 0))
    sent = int(end.get("packets_sent", 0))
    send_s = float(end.get("duration_s", 0.0))
    sent_mbps = cb.mbps(sent * size, send_s)
    rate = float(params.get("rate_mbps", 0))
    note, short = _notes(size, sent_mbps, rate, str(params.get("note") or ""))
    if report is None:
        note = (note + "; " if note else "") + "no report from the receiver"
    me, peer = (w.worker_id, _peer_worker(w)) if local else (_peer_worker(w), w.worker_id)
    return BenchResult(
        role="sender",
        payload_size=size,
        duration_s=send_s,
        packets_sent=sent,
        packets_received=report.packets_received if report else 0,
        lost=report.lost if report else sent,
        lost_percent=report.lost_percent if report else (100.0 if sent else 0.0),
        out_of_order=report.out_of_order if report else 0,
        duplicates=report.duplicates if report else 0,
        jitter_ms=report.jitter_ms if report else 0.0,
        mbps=sent_mbps,
        rtt_ms=_rtt_ms(w),
        run_id=str(run_id),
        started_at=started_at,
        local_worker=me,
        peer_worker=peer,
        path=_path(w),
        rate_mbps=rate,
        bytes_received=report.bytes_received if report else 0,
        sent_mbps=sent_mbps,
        received_mbps=report.mbps if report else 0.0,
        gso=bool(end.get("gso", False)),
        gro=bool(gro),
        fragmented=size > PATH_MTU_PAYLOAD,
        encrypted=bool(params.get("encrypted", False)),
        auth_failures=report.auth_failures if report else 0,
        flow_control=bool(params.get("flow_control", False)),
        short_of_target=short,
        note=note,
        intervals=report.intervals if report else (),
    )
