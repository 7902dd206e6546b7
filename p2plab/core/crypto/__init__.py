"""Encrypted, authenticated peer datagrams: X25519, HKDF-SHA256 and ChaCha20-Poly1305 (issue 8).

Each worker holds an X25519 key pair (:class:`Identity`); its public key travels to the peer in the
rendezvous offer (``Register.public_key`` -> ``P2PConnectionOffer.peer_public_key``, base64 of the
32 raw bytes).  A :class:`PeerCipher` is the :class:`~p2plab.core.wire.Sealer` of one peer session.
Every datagram on the punched path, probes included, is sealed::

    header(4) | sender_tag(8) | receiver_tag(8) | counter(8) | ChaCha20-Poly1305(body) + tag(16)

* ``sender_tag`` is a random 8-byte tag picked by each session when it starts; ``receiver_tag`` is
  the peer session's tag as the sender last learnt it, or eight zero bytes when it knows none yet
  (allowed for PROBE only, the first contact).
* Each session draws a fresh ephemeral X25519 key and an ``epoch`` (:mod:`.handshake`).  PROBE
  and PROBE_ACK carry ``ephemeral public | epoch`` before their body, are sealed with a handshake
  key from the static-static secret (HKDF once, then a keyed BLAKE2s over the sender tag) and end
  with a 16-byte ``mac1`` checked before anything else.  Every other type is sealed with a data
  key per direction: HKDF over ``ss | ee | es | se``, bound to both ids, both static and both
  ephemeral keys and both tags, so a thief of the static keys opens no past data.  A handshake
  from an earlier peer session (an epoch not above the newest seen from that key, in the link
  engine's :class:`~.handshake.EpochStore`) is a replay.  The exact construction is in
  docs/protocol.md (section 3).
* The nonce is four zero bytes and the 64-bit big-endian counter (RFC 8439 section 2.8 leaves the
  construction to the protocol; the key is never shared between directions or sessions).  The
  associated data is the 4-byte header and both tags, so nothing outside the ciphertext can be
  changed either.
* The receiver keeps a sliding-bitmap replay window (:class:`ReplayWindow`, 1024 wide, as in
  RFC 4303 section 3.4.3) per sender tag.  A datagram naming another receiver tag than ours (one
  sealed for an earlier session of ours) or a sender tag we retired is stale and counted as a
  replay.

Session tags also let a :class:`~p2plab.core.session.PeerSession` tolerate a peer that restarts its
session (both ends re-punch independently after a NAT lost its mapping): when an authenticated
datagram that names our tag arrives with a new sender tag, :meth:`PeerCipher.take_peer_restart`
reports it once and the session resets its reliable stream instead of confusing the new
session's sequence numbers with the old ones.  :class:`PlainEnvelope` carries the same tags
without any cryptography, for the explicit plaintext mode.

Datagrams that fail are raised as :class:`AuthenticationFailed` or :class:`ReplayedDatagram` (both
:class:`~p2plab.errors.RemoteProtocolError`) and counted in ``stats``.

The package: :mod:`.keys` (identity, public keys, fingerprints), :mod:`.rules` (the one set of
rules that decides whether a sealed datagram is accepted, and its fast path for the established
pair), :mod:`.handshake` (handshake and data keys, mac1, epochs), :mod:`.envelope`
(:class:`PeerCipher`, :class:`PlainEnvelope`) and :mod:`.batch` (the benchmark's batches).
"""

from __future__ import annotations

from .envelope import PeerCipher, PlainEnvelope
from .handshake import HANDSHAKE_OVERHEAD, EpochStore
from .keys import (
    KEY_SIZE,
    Identity,
    authentication_string,
    check_public_key,
    decode_public_key,
    fingerprint,
    parse_peer_key,
    peer_key_matches,
    registration_proof,
    verify_registration_proof,
)
from .rules import SEAL_OVERHEAD, TAG_SIZE, AuthenticationFailed, ReplayedDatagram, ReplayWindow

__all__ = [
    "HANDSHAKE_OVERHEAD",
    "KEY_SIZE",
    "SEAL_OVERHEAD",
    "TAG_SIZE",
    "AuthenticationFailed",
    "EpochStore",
    "Identity",
    "PeerCipher",
    "PlainEnvelope",
    "ReplayWindow",
    "ReplayedDatagram",
    "authentication_string",
    "check_public_key",
    "decode_public_key",
    "fingerprint",
    "parse_peer_key",
    "peer_key_matches",
    "registration_proof",
    "verify_registration_proof",
]
