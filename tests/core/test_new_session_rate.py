"""New peer sessions are rate-limited per source host (issue 14, item 6).

The cipher derives keys for any authentic handshake from a peer session it does not know.  A
holder of the peer's static key (a thief, or the peer itself gone rogue) could mint fresh
sessions by the thousand and make us run four X25519 exchanges and HKDF for each; these tests
fail on the code without the per-source token bucket in :class:`PeerSession`.
"""

from __future__ import annotations

import random

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.crypto import Identity, PeerCipher
from p2plab.core.link_commands import session_security_counts
from p2plab.core.punch import SourceRateLimit
from p2plab.core.session import PeerSession
from p2plab.core.wire import Keepalive, Probe, encode_datagram
from tests.core_sim import Network, Node

A_LOCAL = ("198.18.0.1", 40000)
B_LOCAL = ("198.18.0.2", 40000)
MALLORY = "198.18.0.66"


def node(net: Network, name: str, me: str, peer: str, role: str, local, cands, sealer) -> Node:
    session = PeerSession(
        me, peer, role, cands, SessionConfig(), net.now, net.rand_bytes, sealer=sealer
    )  # type: ignore[arg-type]
    n = Node(name, session, local)
    net.nodes[name] = n
    net._by_addr[local] = n
    return n


def connected() -> tuple[Network, Node, Node, Identity, Identity]:
    net = Network(seed=5, latency=0.005)
    ia, ib = Identity.generate(net.rand_bytes), Identity.generate(net.rand_bytes)
    ca = PeerCipher(ia, "alice", "bob", ib.public_bytes, net.rand_bytes)
    cb = PeerCipher(ib, "bob", "alice", ia.public_bytes, net.rand_bytes)
    a = node(net, "a", "alice", "bob", "controlling", A_LOCAL, [B_LOCAL], ca)
    b = node(net, "b", "bob", "alice", "controlled", B_LOCAL, [A_LOCAL], cb)
    assert net.run_until(lambda: a.session.state == b.session.state == "connected", timeout=5)
    net.run_for(0.5)
    return net, a, b, ia, ib


def texts(n: Node) -> list[str]:
    return [e.text for e in n.events if isinstance(e, ev.ChatReceived)]


def fresh_probe(ia: Identity, ib: Identity, rng: random.Random, i: int) -> bytes:
    """A genuine first PROBE of a brand-new alice session (the static key's holder can mint it)."""
    c = PeerCipher(ia, "alice", "bob", ib.public_bytes, rng.randbytes)
    p = Probe("alice", "bob", nonce=i.to_bytes(8, "big"), nominate=False, target=B_LOCAL)
    return encode_datagram(p, c)


def test_a_thousand_fresh_sessions_from_one_host_cost_at_most_burst_plus_rate() -> None:
    net, a, b, ia, ib = connected()
    cb = b.session.sealer
    assert isinstance(cb, PeerCipher)
    config = b.session.config
    rng = random.Random(77)
    flood = [fresh_probe(ia, ib, rng, i) for i in range(1000)]
    before = cb.stats["derivations"]
    start = net.now
    for i, data in enumerate(flood):
        net.now = start + i / 1000  # all within one second, every port different
        net.inject(b, data, (MALLORY, 1024 + i))
    # Each session that reached the cipher derived two data keys.
    reached = (cb.stats["derivations"] - before) // 2
    assert reached <= config.new_session_burst + config.new_session_rate * 1
    assert reached >= config.new_session_burst  # the bucket lets a burst through, no fewer
    assert b.session.stats["new_sessions_limited"] == 1000 - reached
    assert session_security_counts(b.session)["new_sessions_limited"] == 1000 - reached  # status
    # The live session kept working through it, both ways.
    a.session.send_chat("still here", net.now)
    b.session.send_chat("me too", net.now)
    assert net.run_until(lambda: texts(b) == ["still here"] and texts(a) == ["me too"], 5)
    assert a.session.stats["new_sessions_limited"] == 0


def test_the_live_sessions_own_handshakes_and_data_are_never_limited() -> None:
    net, a, b, _, _ = connected()
    for i in range(50):
        a.session.send_chat(f"m{i}", net.now)
    assert net.run_until(lambda: len(texts(b)) == 50, 10)
    net.run_for(30)  # keep-alives and their acks
    assert b.session.stats["keepalives_received"] > 0
    assert a.session.stats["new_sessions_limited"] == b.session.stats["new_sessions_limited"] == 0


def test_junk_that_fails_mac1_spends_no_token() -> None:
    net, _, b, ia, ib = connected()
    rng = random.Random(3)
    # A blind attacker without our public key: handshake-sized junk, PROBE type byte.
    good = fresh_probe(ia, ib, rng, 0)
    for _ in range(200):
        junk = good[:4] + rng.randbytes(len(good) - 4)
        net.inject(b, junk, (MALLORY, 5000))
    assert b.session.stats["new_sessions_limited"] == 0
    # A genuine new session from that host still gets through.
    cb = b.session.sealer
    before = cb.stats["derivations"]  # type: ignore[union-attr]
    net.inject(b, good, (MALLORY, 5000))
    assert cb.stats["derivations"] == before + 2  # type: ignore[union-attr]


def test_only_handshakes_of_unknown_sessions_count_as_new() -> None:
    _, a, b, ia, ib = connected()
    ca, cb = a.session.sealer, b.session.sealer
    assert isinstance(ca, PeerCipher) and isinstance(cb, PeerCipher)
    ka = encode_datagram(Keepalive("alice", "bob", seq=9, timestamp=0.0), ca)
    probe = Probe("alice", "bob", nonce=b"n" * 8, nominate=False, target=B_LOCAL)
    live = encode_datagram(probe, ca)
    assert not cb.is_new_peer_session(ka)  # data: never
    assert not cb.is_new_peer_session(live)  # the live peer session's own probe: known tag
    assert cb.is_new_peer_session(fresh_probe(ia, ib, random.Random(1), 0))


def test_token_bucket_refills_is_per_host_and_bounded() -> None:
    bucket = SourceRateLimit(rate=5.0, burst=10)
    assert sum(bucket.allow("h", 0.0) for _ in range(100)) == 10
    assert bucket.allow("h", 0.1) is False  # half a token
    assert bucket.allow("h", 0.2) is True  # one token
    assert sum(bucket.allow("h", 10.0) for _ in range(100)) == 10  # capped at the burst
    assert bucket.allow("other", 10.0) is True  # another host has its own bucket
    for i in range(1000):
        bucket.allow(f"10.0.{i // 256}.{i % 256}", 11.0)
    assert len(bucket._buckets) <= 64
