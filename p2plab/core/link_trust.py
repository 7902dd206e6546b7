"""What the link engine believes of the rendezvous and of peer keys (issue 14), sans-I/O.

The rendezvous is not trusted with anything it could use against the worker:

- :func:`answer_challenge`: the ``register`` that answers a rendezvous ``challenge``, with the
  proof that this worker holds its private key (so its public key alone registers nothing).
- :func:`check_offer`: an offer is refused when it names this worker itself, carries an
  unusable key (bad base64, wrong length, low-order point), a key other than the pinned one, or
  a key that does not fit the worker's mode.
- :func:`offer_candidates`: only IP literals are punched (a host name would make the driver's
  ``sendto`` resolve it, blocking the loop; a scoped IPv6 one names an interface of the peer's
  host), at most :data:`MAX_OFFER_CANDIDATES` of them, best ranked first (issue 19: the peer's
  IPv6 endpoints, its NAT's port mapping, its STUN endpoint, its IPv4 LAN addresses).
- :func:`key_change`: trust on first use; a known peer id that comes back with another key is
  reported (:class:`~p2plab.core.events.PeerKeyChanged`) but paired, unless pinned.
- :func:`new_sealer`: never plaintext while one side encrypts (finding 18).
- :class:`RelayGate`: a ``relay`` message moves a link onto the relay only if its payload
  authenticates in a fresh relayed session, and the attempts (an X25519 and an HKDF each) are
  bounded by a token bucket.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Final

from p2plab.core import events as ev
from p2plab.core.addresses import is_ip_literal
from p2plab.core.crypto import (
    EpochStore,
    Identity,
    PeerCipher,
    PlainEnvelope,
    decode_public_key,
    fingerprint,
    peer_key_matches,
    registration_proof,
)
from p2plab.core.known_peers import KnownPeers
from p2plab.core.link_commands import RELAY
from p2plab.core.ratelimit import RateLimiter
from p2plab.core.session import PeerSession
from p2plab.core.signaling import Challenge, P2PConnectionOffer, Register
from p2plab.errors import P2PLabError, RemoteProtocolError

__all__ = [
    "MAX_OFFER_CANDIDATES",
    "RELAY_SWITCH_TRIES",
    "OfferCheck",
    "RelayGate",
    "answer_challenge",
    "check_offer",
    "key_change",
    "key_change_warning",
    "new_sealer",
    "offer_candidates",
    "punchable_ip",
    "ranked_offer_addresses",
]

Address = ev.Address

#: Candidates of one offer used at most (the announced endpoint and LAN addresses): what a
#: hostile offer can make this worker probe is bounded.
MAX_OFFER_CANDIDATES: Final = 8

#: Relay messages that may try to open a new relayed session (each costs an X25519 and an HKDF,
#: 0.2-0.5 ms): a bucket of this many, refilled at this many per second.  Plenty for a genuine
#: peer (its relayed session probes a few times a second); junk beyond it is dropped unopened.
RELAY_SWITCH_TRIES: Final = 20

#: Session counters that mean "dropped before or at authentication".
_UNAUTHENTICATED_DROPS: Final = (
    "dropped_after_close",
    "dropped_unknown_type",
    "dropped_unauthenticated",
    "dropped_replayed",
    "dropped_malformed",
    "dropped_wrong_peer",
    "bench_ignored",
)


def answer_challenge(
    msg: Challenge,
    identity: Identity | None,
    worker_id: str,
    *,
    room: str,
    token: str | None,
) -> Register:
    """The ``register`` answering ``msg``: with the key and its proof, or (plaintext mode,
    ``identity`` None) with neither.  Raises RemoteProtocolError for an unusable challenge."""
    if identity is None:
        return Register(room=room, token=token)
    try:
        nonce = base64.b64decode(msg.nonce.encode("ascii"), validate=True)
        server_key = base64.b64decode(msg.server_key.encode("ascii"), validate=True)
        proof = registration_proof(identity, server_key, nonce, worker_id)
    except (ValueError, P2PLabError) as exc:  # binascii.Error is a ValueError
        raise RemoteProtocolError(f"unusable challenge: {exc}") from None
    return Register(
        room=room,
        token=token,
        public_key=identity.public_b64,
        proof=base64.b64encode(proof).decode("ascii"),
    )


class OfferCheck:
    """The verdict on one offer: ``refusal`` (None: acceptable), the decoded ``key``, and a
    ``warning`` for the user when a pinned key did not match."""

    __slots__ = ("key", "refusal", "warning")

    def __init__(
        self, refusal: str | None, key: bytes | None = None, warning: str | None = None
    ) -> None:
        self.refusal = refusal
        self.key = key
        self.warning = warning


def check_offer(
    offer: P2PConnectionOffer,
    worker_id: str,
    identity: Identity | None,
    pinned: bytes | str | None,
) -> OfferCheck:
    """Whether this worker may punch to the peer ``offer`` names (see the module docstring)."""
    peer = offer.peer_worker_id
    if peer == worker_id:
        return OfferCheck("the rendezvous offered this worker to itself: refused")
    key: bytes | None = None
    if offer.peer_public_key is not None:
        try:
            key = decode_public_key(offer.peer_public_key)
        except P2PLabError as exc:
            return OfferCheck(f"peer {peer} sent an unusable public key: {exc}")
    if pinned is not None and (key is None or not peer_key_matches(pinned, key)):
        shown = fingerprint(key)[:19] + "..." if key is not None else "none"
        warning = (
            f"peer {peer} offered key {shown}, not the pinned one: refused (is someone in the "
            "middle, or did the peer make a new key?)"
        )
        return OfferCheck(warning, warning=warning)
    if identity is not None and key is None:
        return OfferCheck(
            f"peer {peer} offers no public key: refusing an unencrypted link (both workers "
            "must run with encryption disabled to allow plaintext)"
        )
    if identity is None and key is not None:
        return OfferCheck(
            f"peer {peer} requires encryption, but this worker runs with encryption disabled"
        )
    return OfferCheck(None, key)


def ranked_offer_addresses(offer: P2PConnectionOffer) -> list[tuple[object, object]]:
    """Every address ``offer`` names, best ranked first, unchecked (see :func:`offer_candidates`):
    the peer's IPv6 STUN endpoint and IPv6 host addresses (no NAT in the way), the port its NAT
    mapped on request (open to anyone, where the STUN one may need both sides to punch), its
    STUN endpoint, then its IPv4 LAN addresses (they work only on a shared LAN)."""

    def pair(c: object) -> tuple[object, object]:
        # getattr: an offer built without validation (tests, fuzzing) reads as refused, not
        # as an exception
        return (getattr(c, "ip", None), getattr(c, "port", None))

    given = [pair(c) for c in offer.peer_candidates]
    v6 = [pair(offer.peer_udp6)] if offer.peer_udp6 is not None else []
    v6 += [a for a in given if isinstance(a[0], str) and ":" in a[0]]
    rest = [a for a in given if not (isinstance(a[0], str) and ":" in a[0])]
    mapped = [pair(offer.peer_mapped)] if offer.peer_mapped is not None else []
    return [*v6, *mapped, (offer.peer_udp_ip, offer.peer_udp_port), *rest]


def punchable_ip(ip: object) -> bool:
    """Whether ``ip`` may be sent to: an IP literal, and not a scoped IPv6 one."""
    return is_ip_literal(ip) and isinstance(ip, str) and "%" not in ip


def offer_candidates(offer: P2PConnectionOffer) -> tuple[list[Address], int]:
    """(the offer's addresses to punch, how many were refused as not IP literals): ranked by
    :func:`ranked_offer_addresses`, no duplicates, no port 0, at most
    :data:`MAX_OFFER_CANDIDATES`."""
    out: list[Address] = []
    refused = 0
    for ip, port in ranked_offer_addresses(offer):
        if not punchable_ip(ip) or not isinstance(port, int):
            refused += 1
        elif port and (str(ip), port) not in out and len(out) < MAX_OFFER_CANDIDATES:
            out.append((str(ip), port))
    return out, refused


def key_change(known: KnownPeers, peer_id: str, key: bytes) -> ev.PeerKeyChanged | None:
    """Remember ``key`` for ``peer_id``; the event to report when it replaced another key."""
    old = known.check(peer_id, key)
    if old is None:
        return None
    return ev.PeerKeyChanged(peer_id, fingerprint(old), fingerprint(key))


def key_change_warning(change: ev.PeerKeyChanged) -> str:
    """The sentence the user sees for ``change``."""
    return (
        f"peer {change.peer_id} came back with another key (was "
        f"{change.old_fingerprint[:19]}..., now {change.new_fingerprint[:19]}...): compare the "
        "authentication string with the peer out of band"
    )


def new_sealer(
    identity: Identity | None,
    worker_id: str,
    peer_id: str,
    peer_key: bytes | None,
    rand_bytes: Callable[[int], bytes],
    *,
    epoch: int,
    epochs: EpochStore,
) -> PeerCipher | PlainEnvelope:
    """The sealer of a session to ``peer_id``: a :class:`PeerCipher` when both sides have keys,
    a :class:`PlainEnvelope` when neither has (the explicit plaintext mode), else it raises."""
    if identity is not None and peer_key is not None:
        return PeerCipher(
            identity, worker_id, peer_id, peer_key, rand_bytes, epoch=epoch, epochs=epochs
        )
    if identity is not None or peer_key is not None:
        # Never plaintext while one side encrypts (finding 18): check_offer refuses such an
        # offer first; should a path get here anyway, the offer fails, not the encryption.
        raise RemoteProtocolError(
            f"peer {peer_id}: a key is missing on one side; refusing a plaintext link"
        )
    return PlainEnvelope(rand_bytes)  # explicit plaintext mode on both sides


class RelayGate:
    """Decides whether a relayed payload may move the link onto the relay."""

    def __init__(self) -> None:
        self._tries = RateLimiter(RELAY_SWITCH_TRIES, RELAY_SWITCH_TRIES)

    def may_try(self, now: float) -> bool:
        """Whether one more payload may be tried in a fresh session (token bucket)."""
        return self._tries.allow("", now)

    @staticmethod
    def authenticated(fresh: PeerSession) -> bool:
        """Whether the one datagram ``fresh`` (a new session) received got past its checks."""
        stats = fresh.stats
        return stats.get("datagrams_in") == 1 and not any(
            stats.get(k, 0) for k in _UNAUTHENTICATED_DROPS
        )

    def follow(
        self,
        payload: bytes,
        build: Callable[[], PeerSession],
        now: float,
        stats: dict[str, int],
    ) -> PeerSession | None:
        """A fresh relayed session (from ``build``) that took ``payload`` and authenticated it,
        or None (counted in the engine's ``stats``).  Whatever it drops moves nothing and closes
        nothing: the session is not the engine's until it is returned."""
        if not self.may_try(now):
            stats["relay_unauthenticated"] += 1
            return None
        try:
            candidate = build()
        except Exception:  # no session can be built: nothing to follow
            stats["relay_dropped"] += 1
            return None
        candidate.receive_datagram(payload, RELAY, now)
        if not self.authenticated(candidate):
            stats["relay_unauthenticated"] += 1
            return None
        return candidate
