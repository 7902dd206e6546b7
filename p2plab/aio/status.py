"""Blocks of the worker's ``status`` message (contracts.md) that describe its peer link."""

from __future__ import annotations

from typing import Any

from p2plab.core.crypto import Identity, authentication_string, fingerprint
from p2plab.core.link import RELAY, SECURITY_COUNTERS, LinkEngine
from p2plab.core.nathint import hint_summary
from p2plab.core.paths import parse_turn_address
from p2plab.core.signaling import NatHint

__all__ = [
    "format_address",
    "hint_block",
    "nat_block",
    "peer_block",
    "security_block",
    "turn_block",
]


def format_address(addr: tuple[str, int]) -> str:
    """``host:port``, an IPv6 host in brackets (``[2001:db8::1]:5000``, as in a URL): status,
    the page and the CLI show addresses of both families so (issue 19)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hint_block(hint: NatHint | None) -> dict[str, Any]:
    """The NAT hint as ``probe --json`` and ``status["nat"]["hint"]`` show it: ``difficulty``
    (``easy``, ``hard`` or ``unknown``: how hole punching will go) and the hint's fields."""
    hint = hint if hint is not None else NatHint()
    return {
        "difficulty": hint_summary(hint),
        "mapping": hint.mapping,
        "remaps_on_clash": hint.remaps_on_clash,
        "sequential": hint.sequential,
        "predicted_ports": list(hint.predicted_ports),
    }


def nat_block(classification: dict[str, Any] | None, hint: NatHint | None) -> dict[str, Any] | None:
    """``status["nat"]``: the RFC 5780 classification (``mapping``, ``filtering``, ``classic``)
    with the NAT hint under ``hint``; None until the classification is done (the lab waits for
    it), so a worker run with ``--no-nat-report`` shows no hint either."""
    if classification is None:
        return None
    return {**classification, "hint": hint_block(hint)}


def peer_block(link: LinkEngine) -> dict[str, Any] | None:
    """``status["peer"]``: the peer's id, where its datagrams go, the RTT; None without a peer."""
    if link.peer_id is None:
        return None
    addr = link.peer_address
    turn = parse_turn_address(addr)
    if turn is not None:  # through our own allocation: the peer as the TURN server sees it
        addr = turn[1]
    rtt = link.session.rtt if link.session is not None else None
    endpoint = "relay" if addr == RELAY else (format_address(addr) if addr else None)
    return {
        "worker_id": link.peer_id,
        "endpoint": endpoint,
        "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
    }


def turn_block(link: LinkEngine) -> dict[str, Any] | None:
    """``status["turn"]`` (issue 17): our allocation (its relayed address, how we reach the
    server, its state) and the peer's relayed addresses; None when neither exists."""
    t = link.turn
    peer = [format_address(a) for a in link.peer_relays]
    if t is None and not peer:
        return None
    relayed = link.turn_relayed
    return {
        "relayed": format_address(relayed) if relayed else None,
        "transport": t.transport if t is not None else None,
        "state": t.state.value if t is not None else None,
        "peer_relayed": peer,
    }


def security_block(link: LinkEngine, identity: Identity | None, encrypt: bool) -> dict[str, Any]:
    """``status["security"]``: encryption, both fingerprints, the authentication string, trust
    in the peer's key, whether the link is relayed, drop counters.

    ``auth_string`` is :func:`~p2plab.core.crypto.authentication_string` of this worker and its
    current peer (the same on both pages; None without a peer or in plaintext mode).
    ``peer_key_pinned``: the worker accepts one peer key only (``--peer-key``).
    ``peer_key_warning``: a sentence when a known peer id came back with another key or an
    offered key was not the pinned one.  ``relayed``: the link runs over the rendezvous relay.
    Counters are totals over every link the worker had (datagrams dropped because they did not
    authenticate, were replays or stale, or came from an unexpected address).
    """
    session = link.session
    sealer = session.sealer if session is not None else None
    counts = link.security_counts()
    peer_key = link.peer_public_key
    peer_id = link.peer_id
    auth = None
    if identity is not None and peer_key is not None and peer_id is not None:
        auth = authentication_string(link.worker_id, identity.public_bytes, peer_id, peer_key)
    return {
        "encrypted": bool(getattr(sealer, "encrypted", encrypt)),
        "local_fingerprint": identity.fingerprint if identity else None,
        "peer_fingerprint": fingerprint(peer_key) if peer_key and peer_id else None,
        "auth_string": auth,
        "peer_key_pinned": link.config.peer_key is not None,
        "peer_key_warning": link.peer_key_warning,
        "relayed": link.relayed,
        **{k: counts[k] for k in SECURITY_COUNTERS},
    }
