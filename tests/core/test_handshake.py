"""The per-session handshake, tried as an attacker would (issue 14, item 6; findings 6 and 16).

Each test fails on the static-key design it replaced: a thief of the static keys opened every
captured datagram, a probe from an earlier session authenticated and pushed the live session's
replay window aside, and a datagram with random tags cost a key derivation.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from p2plab.core import events as ev
from p2plab.core.crypto import (
    AuthenticationFailed,
    EpochStore,
    Identity,
    PeerCipher,
    ReplayedDatagram,
)
from p2plab.core.wire import Chat, Keepalive, Probe, ProbeAck, encode_datagram, parse_datagram
from p2plab.errors import RemoteProtocolError

BENCH = b"\xd7\x50\x01\x20"


def probe(src: str, dst: str, n: int = 0) -> Probe:
    return Probe(src, dst, nonce=n.to_bytes(8, "big"), nominate=False, target=("198.18.0.2", 1))


def ack(src: str, dst: str, n: int = 0) -> ProbeAck:
    return ProbeAck(src, dst, nonce=n.to_bytes(8, "big"), nominate=False, observed=("h", 1))


def chat(src: str, dst: str, text: str, seq: int = 0) -> Chat:
    return Chat(src, dst, seq=seq, msg_id=f"m{seq}", sent_at=0.0, text=text)


def handshake(a: PeerCipher, b: PeerCipher) -> list[bytes]:
    """a probes, b answers: both learn the other's session. Returns the datagrams sent."""
    p = encode_datagram(probe(a.local_id, b.local_id), a)
    parse_datagram(p, b)
    q = encode_datagram(ack(b.local_id, a.local_id), b)
    parse_datagram(q, a)
    return [p, q]


class Engine:
    """What a link engine gives its ciphers: one EpochStore, epochs from a wall clock."""

    def __init__(self, name: str, peer: str, me: Identity, peer_key: bytes, seed: int) -> None:
        self.name, self.peer, self.me, self.peer_key = name, peer, me, peer_key
        self.rng = random.Random(seed)
        self.store = EpochStore()
        self.wall = 1_700_000_000_000_000_000

    def session(self) -> PeerCipher:
        self.wall += 2_000_000_000  # the next session starts a couple of seconds later
        return PeerCipher(
            self.me, self.name, self.peer, self.peer_key, self.rng.randbytes,
            epoch=self.wall, epochs=self.store,
        )  # fmt: skip


def engines(seed: int = 1) -> tuple[Engine, Engine]:
    r = random.Random(seed)
    ia, ib = Identity.generate(r.randbytes), Identity.generate(r.randbytes)
    return (
        Engine("alice", "bob", ia, ib.public_bytes, seed + 1),
        Engine("bob", "alice", ib, ia.public_bytes, seed + 2),
    )


# -- forward secrecy ---------------------------------------------------------------------------


def test_a_thief_of_both_static_keys_cannot_open_a_captured_session() -> None:
    ea, eb = engines(3)
    a, b = ea.session(), eb.session()
    wire = handshake(a, b)
    secrets = ["the launch code is 1234", "meet at noon"]
    for i, text in enumerate(secrets):
        d = encode_datagram(chat("alice", "bob", text, i), a)
        assert parse_datagram(d, b).text == text  # type: ignore[attr-defined]
        wire.append(d)
    data = a.seal_datagram(BENCH + b"bench payload " * 8)
    assert b.open_datagram(data) is not None
    wire.append(data)
    # Later the thief takes both static private keys (and knows ids and public keys): it builds
    # both ends' ciphers, gives them the sessions' tags (they travel in clear) and replays the
    # whole capture through them, in order.
    thief_b = PeerCipher(eb.me, "bob", "alice", ea.me.public_bytes, random.Random(9).randbytes)
    thief_a = PeerCipher(ea.me, "alice", "bob", eb.me.public_bytes, random.Random(8).randbytes)
    thief_a.rules.tags.local_tag, thief_b.rules.tags.local_tag = a.local_tag, b.local_tag
    opened: list[bytes] = []
    for d in wire:
        for thief in (thief_a, thief_b):
            got = thief.open_datagram(d)
            if got is not None:
                opened.append(got)
    # The handshake datagrams open (they are sealed with the static keys: the thief reads the
    # probes' nonces and addresses and both ephemeral PUBLIC keys) ...
    assert len(opened) == 2
    # ... but no chat and no data: their keys need an ephemeral private key, gone with the session.
    assert not any(s.encode() in o for o in opened for s in secrets)
    assert not any(b"bench payload" in o for o in opened)
    for thief in (thief_a, thief_b):
        assert thief.stats["opened"] == 1 and thief.stats["derivations"] == 4


# -- no replay across sessions (finding 6) -------------------------------------------------------


def test_a_probe_from_an_earlier_session_is_refused_and_leaves_the_live_one_alone() -> None:
    ea, eb = engines(4)
    captured: list[bytes] = []
    for _ in range(5):  # five earlier sessions of the same pair, probes recorded by an attacker
        a, b = ea.session(), eb.session()
        captured += [encode_datagram(probe("bob", "alice", n), b) for n in range(2)]
        handshake(a, b)
        parse_datagram(encode_datagram(chat("bob", "alice", "old"), b), a)
    # Re-paired: session 6, same keys.
    a2, b2 = ea.session(), eb.session()
    handshake(b2, a2)
    parse_datagram(encode_datagram(chat("bob", "alice", "hello", 0), b2), a2)
    derivations = a2.stats["derivations"]
    for d in captured:
        with pytest.raises(ReplayedDatagram, match="earlier session"):
            parse_datagram(d, a2)
    assert a2.stats["replays"] == len(captured)
    assert a2.stats["derivations"] == derivations  # refused before any key was derived
    assert a2.peer_tag == b2.local_tag and not a2.take_peer_restart()
    # The live session is untouched: its datagrams keep opening, on the fast path too.
    for i in range(1, 4):
        d = encode_datagram(chat("bob", "alice", f"live {i}", i), b2)
        assert parse_datagram(d, a2).text == f"live {i}"  # type: ignore[attr-defined]
    assert a2.open_datagram(b2.seal_datagram(BENCH + b"x" * 40)) == BENCH + b"x" * 40
    assert a2.fast_path() is not None


def test_only_the_newest_earlier_session_may_start_again_and_the_real_one_wins() -> None:
    """Our side restarted, the peer's did not: its newest session must be let in (same epoch,
    same ephemeral key); once the peer's next session is seen, none of the older ones is."""
    ea, eb = engines(5)
    a1, b1 = ea.session(), eb.session()
    first_contact = encode_datagram(probe("bob", "alice", 7), b1)  # names no session: replayable
    parse_datagram(first_contact, a1)
    parse_datagram(encode_datagram(ack("alice", "bob", 7), a1), b1)
    a2 = ea.session()  # only alice restarts
    parse_datagram(encode_datagram(probe("alice", "bob"), a2), b1)
    parse_datagram(encode_datagram(ack("bob", "alice"), b1), a2)  # b1 again: accepted
    assert a2.peer_tag == b1.local_tag
    parse_datagram(encode_datagram(chat("alice", "bob", "it's me, again"), a2), b1)
    assert b1.take_peer_restart()  # b1 now sends to a2
    d = encode_datagram(chat("bob", "alice", "same"), b1)
    assert parse_datagram(d, a2).text == "same"  # type: ignore[attr-defined]
    b2 = eb.session()  # now bob restarts too
    handshake(b2, a2)
    parse_datagram(encode_datagram(chat("bob", "alice", "new session"), b2), a2)
    assert a2.take_peer_restart() and a2.peer_tag == b2.local_tag
    a3 = ea.session()
    with pytest.raises(ReplayedDatagram, match="earlier session"):
        parse_datagram(first_contact, a3)
    assert a3.stats["derivations"] == 2  # the construction's only


def test_an_unconfirmed_session_never_evicts_the_confirmed_ones_replay_state() -> None:
    ea, eb = engines(6)
    a, b = ea.session(), eb.session()
    handshake(a, b)
    sent = [encode_datagram(Keepalive("bob", "alice", seq=i, timestamp=0.0), b) for i in range(8)]
    parse_datagram(encode_datagram(chat("alice", "bob", "confirm"), a), b)
    for d in sent:
        parse_datagram(d, a)
    # Genuine first contacts from six newer sessions of bob that never complete a round trip.
    for _ in range(6):
        parse_datagram(encode_datagram(probe("bob", "alice"), eb.session()), a)
    assert a.peer_tag == b.local_tag and not a.take_peer_restart()
    # b's replay window was kept: its old datagrams are still replays, its new ones still open.
    for d in sent:
        with pytest.raises(ReplayedDatagram, match="replayed"):
            parse_datagram(d, a)
    fresh = encode_datagram(chat("bob", "alice", "still here", 1), b)
    assert parse_datagram(fresh, a).text == "still here"  # type: ignore[attr-defined]
    assert len(a.rules.windows) <= 3  # the confirmed session and at most two pending ones


# -- cheap checks before any cryptography (finding 16) ---------------------------------------


def test_junk_with_random_tags_is_counted_and_never_derives_a_key() -> None:
    ea, eb = engines(7)
    a, b = ea.session(), eb.session()
    handshake(a, b)
    rng = random.Random(70)
    base = dict(a.stats)
    sent = 0
    for kind in range(0x30):
        for _ in range(20):
            junk = b"\xd7\x50\x01" + bytes([kind]) + rng.randbytes(rng.randint(40, 300))
            assert a.open_datagram(junk) is None
            sent += 1
    # Junk that knows our public key passes mac1 (as in WireGuard, mac1 only keeps out those
    # who do not), but still costs no key derivation.
    mac_key = hashlib.blake2s(b"p2plab/v1 mac1" + a.local_public).digest()
    for _ in range(50):
        body = b"\xd7\x50\x01\x01" + rng.randbytes(8) + bytes(8) + rng.randbytes(120)
        forged = body + hashlib.blake2s(body, key=mac_key, digest_size=16).digest()
        with pytest.raises(AuthenticationFailed, match="does not authenticate"):
            parse_datagram(forged, a)
        sent += 1
    got = {k: a.stats[k] - base[k] for k in base}
    assert got["derivations"] == 0
    assert got["auth_failures"] == sent and got["opened"] == 0 and got["replays"] == 0
    assert got["mac1_failures"] == 2 * 20  # PROBE and PROBE_ACK junk: dropped at mac1
    assert got["unknown_tags"] == sent - 2 * 20 - 50  # the rest: refused on their tags alone
    # and the live session does not notice
    d = encode_datagram(chat("bob", "alice", "fine"), b)
    assert parse_datagram(d, a).text == "fine"  # type: ignore[attr-defined]


def test_a_handshake_from_a_holder_of_the_static_key_with_a_low_order_ephemeral_is_refused() -> (
    None
):
    ea, eb = engines(8)
    a, b = ea.session(), eb.session()
    b._hs_prefix = bytes(32) + b._hs_prefix[32:]  # the all-zero point, which X25519 refuses
    with pytest.raises(AuthenticationFailed, match="low-order"):
        parse_datagram(encode_datagram(probe("bob", "alice"), b), a)
    assert a.stats["auth_failures"] == 1 and a.peer_tag is None


def test_handshake_datagrams_never_take_the_data_fast_path() -> None:
    ea, eb = engines(9)
    a, b = ea.session(), eb.session()
    handshake(a, b)
    parse_datagram(encode_datagram(chat("alice", "bob", "hi"), a), b)
    parse_datagram(encode_datagram(chat("bob", "alice", "hi"), b), a)
    assert b.fast_path() is not None
    # A probe of the established pair goes to the full rules (and opens), in batches too.
    p1 = encode_datagram(probe("alice", "bob", 1), a)
    p2 = encode_datagram(probe("alice", "bob", 2), a)
    assert b.open_datagram(p1) is not None
    assert b.open_many(p2, [(0, len(p2))])[0] is not None
    assert b.stats["auth_failures"] == 0
    with pytest.raises(ValueError, match="handshake"):
        a.seal_many(b"\xd7\x50\x01\x01" + bytes(20), 24, 1, bytearray(200))


def test_the_epoch_store_orders_our_sessions_and_forgets_nothing_it_must_not() -> None:
    s = EpochStore()
    assert s.issue(100, b"t1" * 4) == 100
    assert s.issue(50, b"t2" * 4) == 101  # the wall clock stepped back: still increasing
    assert s.was_local_tag(b"t1" * 4) and not s.was_local_tag(b"t3" * 4)
    key = bytes(range(32))
    assert s.refusal(key, 5, b"e" * 32) is None
    s.accepted(key, 5, b"e" * 32)
    assert s.refusal(key, 5, b"e" * 32) is None  # the newest session again
    assert s.refusal(key, 5, b"f" * 32) is not None  # same epoch, another key: not it
    assert s.refusal(key, 4, b"e" * 32) is not None
    s.accepted(key, 3, b"g" * 32)  # never lowers the mark
    assert s.highest(key) == (5, b"e" * 32)
    with pytest.raises(ValueError, match="u64"):
        s.issue(1 << 64, b"t4" * 4)


def test_every_refusal_is_a_remote_protocol_error() -> None:
    ea, eb = engines(10)
    a, b = ea.session(), eb.session()
    wire = handshake(a, b)
    rng = random.Random(3)
    for d in wire:
        for _ in range(50):
            pos = rng.randrange(2, len(d))
            mutated = d[:pos] + bytes([d[pos] ^ (1 << rng.randrange(8))]) + d[pos + 1 :]
            with pytest.raises(RemoteProtocolError):
                parse_datagram(mutated, a if d is wire[1] else b)


# -- through the link engine ---------------------------------------------------------------------


def test_an_engine_re_paired_with_the_same_peer_refuses_probes_of_the_first_pairing() -> None:
    """Finding 6 end to end: the engine's EpochStore spans its sessions."""
    from p2plab.core.signaling import PeerDisconnected
    from p2plab.core.wire import MessageType, datagram_type
    from tests.core.test_core_link import World

    w = World()
    a, b = w.add("a"), w.add("b")
    probes: list[bytes] = []
    send = b.datagrams_to_send

    def spy(now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out = send(now)
        probes.extend(d for d, _ in out if datagram_type(d) == MessageType.PROBE)
        return out

    b.datagrams_to_send = spy  # type: ignore[method-assign]
    w.pair(a, b)
    w.run(1.0)
    assert a.state == b.state == "connected" and probes
    first = a.session.sealer  # type: ignore[union-attr]
    old = list(probes)
    # b leaves and comes back: the rendezvous pairs them again, same keys, new sessions.
    a.receive_rendezvous(PeerDisconnected(peer_worker_id="b"), w.now)
    w.flush()
    w.run(1.0)
    w.pair(a, b)
    w.run(1.0)
    assert a.state == b.state == "connected"
    sealer = a.session.sealer  # type: ignore[union-attr]
    assert isinstance(sealer, PeerCipher) and isinstance(first, PeerCipher)
    assert sealer.epoch > first.epoch and sealer._epochs is a.epochs
    before = dict(sealer.stats)
    b_addr = w.node(b).addr
    for d in old:
        a.receive_datagram(d, b_addr, w.now)
    w.flush()
    got = {k: sealer.stats[k] - before[k] for k in before}
    assert got["replays"] == len(old) and got["opened"] == 0 and got["derivations"] == 0
    assert a.state == "connected" and a.session is not None and a.session.sealer is sealer
    b.send_chat("after the replay", w.now)
    w.flush()
    assert [e.text for e in w.node(a).of(ev.ChatReceived)][-1] == "after the replay"


def test_an_offer_with_a_low_order_key_is_refused_and_the_engine_pairs_again() -> None:
    """Item 6: an error building a session is a refusal of that offer, never the end."""
    import base64

    from p2plab.core.signaling import P2PConnectionOffer
    from tests.core.test_core_link import World

    w = World()
    a, b = w.add("a"), w.add("b")
    # model_construct: as if the shared models let it through (they refuse it too)
    for raw in (bytes(32), bytes([1]) + bytes(31)):
        offer = P2PConnectionOffer.model_construct(
            type="p2p_connection_offer", peer_worker_id="b", peer_udp_ip="192.0.2.1",
            peer_udp_port=1, peer_candidates=[], role="controlling",
            peer_public_key=base64.b64encode(raw).decode(),
        )  # fmt: skip
        a.receive_rendezvous(offer, w.now)
        assert a.state == "waiting_for_peer" and a.session is None
        assert "low-order" in str(a.error)
    w.pair(a, b)
    w.run(1.0)
    assert a.state == b.state == "connected"
