"""What of a received datagram reaches a :class:`~p2plab.core.session.PeerSession`'s state machine.

Every datagram passes these checks in this order; each refusal is dropped and counted in the
session's stats (:mod:`p2plab.core.session_stats`), never raised:

* **New peer sessions** are rate-limited per source host: a handshake datagram whose sender tag
  the sealer does not know (the only kind that can make it derive keys) passes a token bucket
  (``new_session_rate`` per second, ``new_session_burst`` at once) before any decryption; the
  excess is counted ``new_sessions_limited``.
* Parsing and opening: unknown types, failed authentication, replays and anything malformed
  each have their counter.
* Benchmark types (0x20..0x2F) are the I/O layer's: if one reaches the session it is counted
  (``bench_ignored``) and dropped.
* A datagram between other ids than this session's pair is ``dropped_wrong_peer``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from p2plab.core.crypto import AuthenticationFailed, ReplayedDatagram
from p2plab.core.punch import SourceRateLimit
from p2plab.core.wire import (
    Address,
    BenchDatagram,
    Sealer,
    SessionDatagram,
    UnknownDatagramType,
    parse_datagram,
)

__all__ = ["Address", "norm_address", "open_datagram", "usable_candidates"]

log = logging.getLogger("p2plab.core.session")  # the session's log, as before the split


def norm_address(addr: Any) -> Address:
    """``(host, port)`` as ``(str, int)`` (raises on anything that is not a pair)."""
    return (str(addr[0]), int(addr[1]))


def usable_candidates(candidates: Sequence[Any]) -> list[Address]:
    """The offered addresses a session may probe: normalised, a port in 1..65535, a host,
    no repeats, in the order given."""
    usable: list[Address] = []
    for c in candidates:
        a = norm_address(c)
        if 0 < a[1] < 65536 and a[0] and a not in usable:
            usable.append(a)
    return usable


def _may_try_new_session(
    data: bytes, addr: Address, now: float, sealer: Sealer | None, limit: SourceRateLimit
) -> bool:
    """The per-source rate limit on handshakes that would start a new peer session.

    Only these cost the cipher more than a lookup (a handshake key, a decryption, four
    X25519 exchanges and HKDF when they authenticate), so only these are limited, before
    any of that runs: a live session's own probes, keep-alives and data never touch it.
    """
    is_new = getattr(sealer, "is_new_peer_session", None)
    if is_new is None or not is_new(data):
        return True
    return limit.allow(addr[0], now)


def open_datagram(
    data: bytes,
    raw_addr: Any,
    now: float,
    *,
    local_id: str,
    peer_id: str,
    sealer: Sealer | None,
    new_sessions: SourceRateLimit,
    stats: dict[str, int],
) -> tuple[SessionDatagram, Address] | None:
    """The session datagram in ``data`` from ``raw_addr`` and the normalised address, or None
    when it is dropped (and counted in ``stats``)."""
    try:
        addr = norm_address(raw_addr)
        if not _may_try_new_session(data, addr, now, sealer, new_sessions):
            stats["new_sessions_limited"] += 1
            return None
        datagram = parse_datagram(data, sealer)
    except UnknownDatagramType:
        stats["dropped_unknown_type"] += 1
        return None
    except AuthenticationFailed as exc:
        stats["dropped_unauthenticated"] += 1
        log.debug("dropped unauthenticated datagram from %s: %s", raw_addr, exc)
        return None
    except ReplayedDatagram as exc:
        stats["dropped_replayed"] += 1
        log.debug("dropped replayed datagram from %s: %s", raw_addr, exc)
        return None
    except Exception as exc:  # RemoteProtocolError, or a sealer's failure
        stats["dropped_malformed"] += 1
        log.debug("dropped malformed datagram from %s: %s", raw_addr, exc)
        return None
    if isinstance(datagram, BenchDatagram):
        stats["bench_ignored"] += 1
        return None
    assert isinstance(datagram, SessionDatagram)
    if datagram.sender_id != peer_id or datagram.receiver_id != local_id:
        stats["dropped_wrong_peer"] += 1
        log.debug(
            "dropped datagram %s -> %s from %s (we are %s <- %s)",
            datagram.sender_id,
            datagram.receiver_id,
            addr,
            local_id,
            peer_id,
        )
        return None
    return datagram, addr
