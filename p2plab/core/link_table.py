"""The worker's lifecycle as one table (h11's ``_state.py`` style), used by :mod:`p2plab.core.link`.

``TRANSITIONS[state][kind]`` is the state the link moves to when an input of ``kind`` arrives in
``state``.  Every pair missing from the table is forbidden: :func:`next_state` raises
:class:`~p2plab.errors.LocalProtocolError`.  The engine decides which *kind* a raw input is
(an offer for the current peer, a refused offer, a punch timeout that falls back to the relay,
...) and only then consults the table, so each row below is one decision a person can check::

    starting -> registering -> discovering -> waiting_for_peer -> punching -> connected
                    ^  (rendezvous down)                ^            |  ^         |
                    +-----------------------------------+            |  |   (peer timeout)
                                                        |            v  |         v
                                 (peer left / gave up)  +------- lost --+--(re-punch timer)
                                                                     ^
                                 punching --(first punch timeout)--> punching (relay) -> relayed

Data-plane inputs (datagrams, timers, relayed datagrams, chat) never change the state and are
not in the table; the engine drops and counts what arrives where nothing can use it.  Driver
inputs the table forbids (``start`` twice, ``discovered`` while connected) raise: they are bugs.
"""

from __future__ import annotations

from typing import Final

from p2plab.errors import LocalProtocolError

__all__ = ["LINK_STATES", "STATES_WITH_PEER", "TRANSITIONS", "Input", "next_state"]

#: contracts.md's ``state`` values.
LINK_STATES: Final = (
    "starting",
    "registering",
    "discovering",
    "waiting_for_peer",
    "punching",
    "connected",
    "relayed",
    "lost",
    "stopped",
)


class Input:
    """The kinds of input the table knows (plain strings, named here once)."""

    START: Final = "start"
    """The driver started the worker (socket bound, rendezvous client running)."""
    RENDEZVOUS_UP: Final = "rendezvous_up"
    """The rendezvous WebSocket connected."""
    CHALLENGE: Final = "challenge"
    """The rendezvous's ``challenge`` on a new connection: answered with ``register`` and the
    proof of key possession (the state stays; ``registered`` moves it)."""
    RENDEZVOUS_DOWN: Final = "rendezvous_down"
    """The rendezvous WebSocket dropped (the client reconnects on its own)."""
    REGISTERED_DISCOVER: Final = "registered_discover"
    """``registered`` arrived and the public UDP endpoint is still unknown."""
    REGISTERED: Final = "registered"
    """``registered`` arrived and the public UDP endpoint is known (it is reported again)."""
    DISCOVERED: Final = "discovered"
    """The driver's discovery (STUN, or the observed-address fallback) finished."""
    OFFER: Final = "offer"
    """An acceptable ``p2p_connection_offer`` for a new peer: punching starts."""
    OFFER_CURRENT: Final = "offer_current"
    """An offer for the peer we already punch to or are linked with: the link stays."""
    OFFER_REFUSED: Final = "offer_refused"
    """An offer refused (unusable key, encryption mismatch): back to waiting."""
    LINK_UP: Final = "link_up"
    """The direct session connected (``PeerConnected``)."""
    RELAY_UP: Final = "relay_up"
    """The relayed session connected."""
    RELAY_FALLBACK: Final = "relay_fallback"
    """The first punch timed out and relay is on: a relayed session replaces the direct one."""
    RELAY_SWITCH: Final = "relay_switch"
    """The peer's relayed datagram arrived first: follow it onto the relay."""
    RELAY_UPGRADE: Final = "relay_upgrade"
    """The relayed session moved to a TURN or direct path (issue 17's upgrade)."""
    LINK_LOST: Final = "link_lost"
    """A link that was up (or is being re-punched) fell silent; a re-punch is scheduled."""
    REPUNCH: Final = "repunch"
    """The re-punch timer fired: punch the same peer again with the same candidates."""
    RELAY_LOST: Final = "relay_lost"
    """The relayed link fell silent (peer timeout); it is set up again at once (RERELAY)."""
    RERELAY: Final = "rerelay"
    """A fresh relayed session replaces the one that fell silent."""
    LINK_FAILED: Final = "link_failed"
    """The link ended for good (punch timeout without fallback, BYE, ...)."""
    PEER_LEFT: Final = "peer_left"
    """The rendezvous said the current peer disconnected."""
    SETTLED: Final = "settled"
    """After ``lost`` for good: wait for the rendezvous to pair us again."""
    REFUSED: Final = "refused"
    """The rendezvous refused this worker for good (bad token, ...)."""
    STOP: Final = "stop"
    """The driver stops the worker."""


_I = Input

#: {state: {input kind: next state}}: every transition the engine makes, and only those.
#: Rendezvous messages that arrive where the table has no entry (a second ``registered``, an
#: offer before discovery, ...) are network junk: the engine drops and counts them
#: (``stats["rendezvous_unexpected"]``) before they reach the table.
TRANSITIONS: Final[dict[str, dict[str, str]]] = {
    "starting": {
        _I.START: "registering",
        _I.STOP: "stopped",
    },
    "registering": {
        _I.RENDEZVOUS_UP: "registering",
        _I.CHALLENGE: "registering",
        _I.RENDEZVOUS_DOWN: "registering",  # dropped again before ``registered``
        _I.REGISTERED_DISCOVER: "discovering",
        _I.REGISTERED: "waiting_for_peer",
        _I.DISCOVERED: "registering",  # the rendezvous dropped meanwhile; reported on register
        _I.REFUSED: "stopped",
        _I.STOP: "stopped",
    },
    "discovering": {
        _I.RENDEZVOUS_DOWN: "registering",
        _I.DISCOVERED: "waiting_for_peer",
        _I.REFUSED: "stopped",
        _I.STOP: "stopped",
    },
    "waiting_for_peer": {
        # up/registered here: the rendezvous dropped while a link was up, and the link ended
        # before it came back; ``registered`` then reports the endpoint again
        _I.RENDEZVOUS_UP: "waiting_for_peer",
        _I.CHALLENGE: "waiting_for_peer",
        _I.RENDEZVOUS_DOWN: "registering",
        _I.REGISTERED: "waiting_for_peer",
        _I.OFFER: "punching",
        _I.OFFER_REFUSED: "waiting_for_peer",
        _I.REFUSED: "stopped",
        _I.STOP: "stopped",
    },
    "punching": {
        _I.RENDEZVOUS_UP: "punching",
        _I.CHALLENGE: "punching",
        _I.RENDEZVOUS_DOWN: "punching",  # a peer link does not need the rendezvous
        _I.REGISTERED: "punching",
        _I.OFFER: "punching",
        _I.OFFER_CURRENT: "punching",
        _I.OFFER_REFUSED: "waiting_for_peer",
        _I.LINK_UP: "connected",
        _I.RELAY_UP: "relayed",
        _I.RELAY_FALLBACK: "punching",
        _I.RELAY_SWITCH: "punching",
        _I.LINK_LOST: "lost",
        _I.LINK_FAILED: "lost",
        _I.PEER_LEFT: "lost",
        _I.REFUSED: "stopped",
        _I.STOP: "stopped",
    },
    "connected": {
        _I.RENDEZVOUS_UP: "connected",
        _I.CHALLENGE: "connected",
        _I.RENDEZVOUS_DOWN: "connected",
        _I.REGISTERED: "connected",
        _I.OFFER: "punching",
        _I.OFFER_CURRENT: "connected",
        _I.OFFER_REFUSED: "waiting_for_peer",
        _I.RELAY_SWITCH: "punching",
        _I.LINK_LOST: "lost",
        _I.LINK_FAILED: "lost",
        _I.PEER_LEFT: "lost",
        _I.REFUSED: "stopped",
        _I.STOP: "stopped",
    },
    "relayed": {
        _I.RENDEZVOUS_UP: "relayed",
        _I.CHALLENGE: "relayed",
        _I.RENDEZVOUS_DOWN: "relayed",
        _I.REGISTERED: "relayed",
        _I.OFFER: "punching",
        _I.OFFER_CURRENT: "relayed",
        _I.OFFER_REFUSED: "waiting_for_peer",
        _I.RELAY_UPGRADE: "connected",
        _I.RELAY_LOST: "lost",
        _I.LINK_FAILED: "lost",
        _I.PEER_LEFT: "lost",
        _I.REFUSED: "stopped",
        _I.STOP: "stopped",
    },
    "lost": {
        _I.RENDEZVOUS_UP: "lost",
        _I.CHALLENGE: "lost",
        _I.RENDEZVOUS_DOWN: "lost",
        _I.REGISTERED: "lost",
        _I.OFFER: "punching",
        _I.OFFER_REFUSED: "waiting_for_peer",
        _I.RELAY_SWITCH: "punching",
        _I.REPUNCH: "punching",
        _I.RERELAY: "punching",
        _I.PEER_LEFT: "lost",
        _I.SETTLED: "waiting_for_peer",
        _I.REFUSED: "stopped",
        _I.STOP: "stopped",
    },
    "stopped": {
        _I.STOP: "stopped",  # stop() is idempotent; the driver feeds nothing else once stopped
    },
}

assert set(TRANSITIONS) == set(LINK_STATES)
assert all(t in LINK_STATES for row in TRANSITIONS.values() for t in row.values())

#: States in which the engine has a peer (a ``peer_disconnected`` about it ends the link).
STATES_WITH_PEER: Final = frozenset(s for s, row in TRANSITIONS.items() if Input.PEER_LEFT in row)


def next_state(state: str, kind: str) -> str:
    """The state after an input of ``kind`` in ``state``; raises LocalProtocolError if forbidden."""
    try:
        return TRANSITIONS[state][kind]
    except KeyError:
        raise LocalProtocolError(f"input {kind!r} is not allowed in state {state!r}") from None
