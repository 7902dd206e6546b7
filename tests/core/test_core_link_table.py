"""Every allowed transition of the link table, made by the engine itself.

For each ``(state, input kind)`` pair of :data:`~p2plab.core.link_table.TRANSITIONS` a recipe
drives real engines (the in-memory :class:`~tests.core.test_core_link.World`) into ``state``
and then produces an input the engine classifies as that kind.  The test checks that the
engine consulted the table for exactly that pair and then moved to the table's target.  A pair
without a recipe fails, so a new row in the table needs a way to reach it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

import p2plab.core.link as link_module
import p2plab.core.link_sessions as link_sessions_module
import p2plab.core.link_turn as link_turn_module
from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.crypto import Identity
from p2plab.core.link import LinkConfig, LinkEngine
from p2plab.core.link_table import TRANSITIONS, Input, next_state
from p2plab.core.signaling import (
    P2PConnectionOffer,
    PeerDisconnected,
    Registered,
)
from tests.core.test_core_link import FAST, World, genuine_relayed_probe

Recipe = Callable[[World, LinkEngine, LinkEngine | None], None]
DROP_ALL: Callable[[str, str], bool] = lambda src, dst: True  # noqa: E731


def reach(state: str, variant: str = "") -> tuple[World, LinkEngine, LinkEngine | None]:
    """A world whose engine ``a`` is in ``state`` (and ``b`` its peer, if it has one).

    Variants: ``repunch`` (punching again after the link fell silent), ``norelay`` (relay off).
    """
    cfg = LinkConfig(session=FAST, relay=variant != "norelay")
    w = World()
    if state in ("starting", "registering", "discovering"):
        return w, w.add("a", cfg, upto=state), None
    a = w.add("a", cfg)
    if state == "waiting_for_peer":
        return w, a, None
    if state == "stopped":
        a.stop(w.now)
        return w, a, None
    b = w.add("b", cfg)
    if state == "punching" and variant != "repunch":
        w.drop = DROP_ALL
        w.pair(a, b)
    elif state == "relayed":
        w.drop = DROP_ALL
        w.pair(a, b)
        w.run(5.0)
    else:  # connected, lost, punching again
        w.pair(a, b)
        w.run(1.0)
        if state != "connected":
            w.drop = DROP_ALL
            w.relay_on = False
            for _ in range(100):  # a second attempt: the first re-punch starts at once
                w.run(0.05)
                if a.state == state and a.repunch_attempts >= 1:
                    break
    assert a.state == state, (a.state, state, variant)
    return w, a, b


def peer_key() -> str:
    return Identity.generate(random.Random("c").randbytes).public_b64


def offer_from(peer: str, key: str | None, port: int = 41000) -> P2PConnectionOffer:
    return P2PConnectionOffer(
        peer_worker_id=peer, peer_udp_ip="192.0.2.1", peer_udp_port=port, peer_public_key=key
    )


def _registered(w: World, a: LinkEngine, public_known: bool) -> None:
    if public_known and a.public_endpoint is None:
        a.discovered(w.node(a).addr, [], w.now)
    elif not public_known:
        a.public_endpoint = None
    a.receive_rendezvous(Registered(worker_id=a.worker_id, observed_ip="192.0.2.1"), w.now)


def _offer_current(w: World, a: LinkEngine, b: LinkEngine | None) -> None:
    assert b is not None
    key = b.identity.public_b64 if b.identity else None
    a.receive_rendezvous(offer_from(b.worker_id, key, w.node(b).addr[1]), w.now)


def _relay_in(w: World, a: LinkEngine, b: LinkEngine | None) -> None:
    assert b is not None
    a.receive_rendezvous(genuine_relayed_probe(b, a, w.now), w.now)


def _challenge(w: World, a: LinkEngine, b: LinkEngine | None) -> None:
    a.rendezvous_up(w.now)  # a challenge is the first message on a new connection
    w.challenge(a)


def _peer_left(w: World, a: LinkEngine, b: LinkEngine | None) -> None:
    assert b is not None
    a.receive_rendezvous(PeerDisconnected(peer_worker_id=b.worker_id), w.now)


def _peer_says_bye(w: World, a: LinkEngine, b: LinkEngine | None) -> None:
    assert b is not None
    b.stop(w.now)
    w.flush()


def _run(seconds: float, drop: bool | None = None, relay: bool | None = None) -> Recipe:
    def recipe(w: World, a: LinkEngine, b: LinkEngine | None) -> None:
        if drop is not None:
            w.drop = DROP_ALL if drop else (lambda src, dst: False)
        if relay is not None:
            w.relay_on = relay
        w.run(seconds)

    return recipe


#: How to produce each input kind (from the state ``reach`` left the engine in).
RECIPES: dict[str, Recipe] = {
    Input.START: lambda w, a, b: a.start(w.now),
    Input.STOP: lambda w, a, b: a.stop(w.now),
    Input.REFUSED: lambda w, a, b: a.rendezvous_refused("bad token", w.now),
    Input.RENDEZVOUS_UP: lambda w, a, b: a.rendezvous_up(w.now),
    Input.CHALLENGE: _challenge,
    Input.RENDEZVOUS_DOWN: lambda w, a, b: a.rendezvous_down(w.now),
    Input.REGISTERED_DISCOVER: lambda w, a, b: _registered(w, a, public_known=False),
    Input.REGISTERED: lambda w, a, b: _registered(w, a, public_known=True),
    Input.DISCOVERED: lambda w, a, b: a.discovered(("192.0.2.1", 40000), [], w.now),
    Input.OFFER: lambda w, a, b: a.receive_rendezvous(offer_from("c", peer_key()), w.now),
    Input.OFFER_CURRENT: _offer_current,
    Input.OFFER_REFUSED: lambda w, a, b: a.receive_rendezvous(offer_from("c", None), w.now),
    Input.LINK_UP: _run(1.0, drop=False),
    Input.RELAY_UP: _run(5.0),
    Input.RELAY_FALLBACK: _run(5.0),
    Input.RELAY_SWITCH: _relay_in,
    # the path clears: the relayed session's upgrade rounds (5 s) find the direct path
    Input.RELAY_UPGRADE: _run(12.0, drop=False),
    Input.LINK_LOST: _run(3.0, drop=True, relay=False),
    Input.REPUNCH: _run(1.0),
    Input.RELAY_LOST: _run(1.2, relay=False),
    Input.LINK_FAILED: _peer_says_bye,
    Input.PEER_LEFT: _peer_left,
    Input.SETTLED: _peer_left,
}


def _down_during_discovery(w: World, a: LinkEngine, b: LinkEngine | None) -> None:
    a.rendezvous_down(w.now)  # registering, with the discovery still running
    a.discovered(w.node(a).addr, [], w.now)


def _down_then_registered(w: World, a: LinkEngine, b: LinkEngine | None) -> None:
    a.rendezvous_down(w.now)  # registering, with the endpoint known
    a.rendezvous_up(w.now)
    _registered(w, a, public_known=True)


#: Pairs that need another way into the state, or another input, than the defaults:
#: (state, kind): (state reach() starts from, variant, recipe or None for RECIPES[kind])
SPECIAL: dict[tuple[str, str], tuple[str, str, Recipe | None]] = {
    ("punching", Input.LINK_LOST): ("punching", "repunch", _run(2.0)),
    ("punching", Input.LINK_FAILED): ("punching", "norelay", _run(3.0)),
    ("lost", Input.RERELAY): ("relayed", "", _run(1.2, relay=False)),
    ("registering", Input.DISCOVERED): ("discovering", "", _down_during_discovery),
    ("registering", Input.REGISTERED): ("waiting_for_peer", "", _down_then_registered),
}


PAIRS = sorted((s, k) for s, row in TRANSITIONS.items() for k in row)


@pytest.mark.parametrize(("state", "kind"), PAIRS, ids=[f"{s}-{k}" for s, k in PAIRS])
def test_the_engine_makes_every_allowed_transition(
    state: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    start, variant, recipe = SPECIAL.get((state, kind), (state, "", None))
    assert recipe is not None or kind in RECIPES, f"no recipe for input {kind!r}"
    w, a, b = reach(start, variant)
    consulted: list[tuple[str, str]] = []
    original = next_state

    def recording(s: str, k: str) -> str:
        consulted.append((s, k))
        return original(s, k)

    monkeypatch.setattr(link_module, "next_state", recording)  # inputs
    monkeypatch.setattr(link_sessions_module, "next_state", recording)  # the session's events
    monkeypatch.setattr(link_turn_module, "next_state", recording)  # path changes (issue 17)
    mark = len(w.node(a).events)
    (recipe or RECIPES[kind])(w, a, b)
    w.flush()
    assert (state, kind) in consulted, consulted
    target = TRANSITIONS[state][kind]
    changes = [e for e in w.node(a).events[mark:] if isinstance(e, ev.StateChanged)]
    if target != state:
        assert ev.StateChanged(target, state) in changes, changes


def test_no_recipe_is_left_unused() -> None:
    special_only = {Input.RERELAY}  # it follows RELAY_LOST at once: reached from relayed
    kinds = {k for row in TRANSITIONS.values() for k in row}
    assert set(RECIPES) == kinds - special_only
    assert set(SPECIAL) <= set(PAIRS)


def test_session_config_fast_enough_for_the_recipes() -> None:
    # the recipes' run times assume these timers
    assert FAST == SessionConfig(keepalive_interval=0.2, peer_timeout=1.0, punch_timeout=1.5)
