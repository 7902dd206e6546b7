"""Blocks of the worker's ``status`` message (contracts.md) that describe its peer link."""

from __future__ import annotations

from typing import Any

from p2plab.core.crypto import Identity, fingerprint
from p2plab.core.link import RELAY, SECURITY_COUNTERS, LinkEngine

__all__ = ["peer_block", "security_block"]


def peer_block(link: LinkEngine) -> dict[str, Any] | None:
    """``status["peer"]``: the peer's id, where its datagrams go, the RTT; None without a peer."""
    if link.peer_id is None:
        return None
    addr = link.peer_address
    rtt = link.session.rtt if link.session is not None else None
    endpoint = "relay" if addr == RELAY else (f"{addr[0]}:{addr[1]}" if addr else None)
    return {
        "worker_id": link.peer_id,
        "endpoint": endpoint,
        "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
    }


def security_block(link: LinkEngine, identity: Identity | None, encrypt: bool) -> dict[str, Any]:
    """``status["security"]``: encryption, both fingerprints, drop counters.

    Counters are totals over every link the worker had (datagrams dropped because they did not
    authenticate, were replays or stale, or came from an unexpected address).
    """
    session = link.session
    sealer = session.sealer if session is not None else None
    counts = link.security_counts()
    peer_key = link.peer_public_key
    return {
        "encrypted": bool(getattr(sealer, "encrypted", encrypt)),
        "local_fingerprint": identity.fingerprint if identity else None,
        "peer_fingerprint": fingerprint(peer_key) if peer_key and link.peer_id else None,
        **{k: counts[k] for k in SECURITY_COUNTERS},
    }
