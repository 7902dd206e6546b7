"""Birthday punching (issue 16), the pure parts: the odds, the plan table, the probe and spray
schedules, and the limits a hostile hint cannot move."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TypeVar

import pytest
from pydantic import ValidationError

from p2plab.config import BirthdayConfig, SessionConfig
from p2plab.core import events as ev
from p2plab.core.birthday import (
    Plan,
    RandomPortProber,
    SpraySchedule,
    birthday_success,
    hard_pair_success,
    nat_kind,
    plan_traversal,
    port_count,
    spray_times,
)
from p2plab.core.crypto import Identity, PeerCipher
from p2plab.core.link import (
    AdoptPoolSocket,
    ClosePool,
    LinkConfig,
    OpenSocketPool,
    SendFromPool,
)
from p2plab.core.session import PeerSession
from p2plab.core.signaling import Candidate, NatHint, P2PConnectionOffer
from tests.core.nat_world import BNode, NatWorld

T = TypeVar("T")

EASY = NatHint(mapping="endpoint-independent")
LEAKY = NatHint(mapping="endpoint-independent", remaps_on_clash=True)
HARD = NatHint(mapping="endpoint-dependent")
UNKNOWN = NatHint()
CFG = BirthdayConfig()


# -- formulas -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected", "digit"),
    [(174, 0.50, 0.01), (256, 0.64, 0.01), (1024, 0.983, 0.001), (2048, 0.9997, 0.0001)],
)
def test_birthday_success_matches_the_issue(n: int, expected: float, digit: float) -> None:
    # The issue's figures are for Linux's port range (1024..65535, P = 64512) to the last digit
    # shown (rounded: half a digit either way)...
    assert birthday_success(256, n, 64512) == pytest.approx(expected, abs=digit / 2)
    # ...and within a point for the full 16-bit space.
    assert birthday_success(256, n, 65536) == pytest.approx(expected, abs=0.01)


def test_birthday_success_edges() -> None:
    assert birthday_success(256, 0, 65536) == 0.0
    assert birthday_success(0, 1024, 65536) == 0.0
    assert birthday_success(70000, 1, 65536) == 1.0  # more sockets than ports: a sure hit
    assert birthday_success(1, 1, 1) == 1.0


def test_hard_pair_success() -> None:
    assert hard_pair_success(172_000, 65536) == pytest.approx(0.999, abs=0.0005)
    assert hard_pair_success(1024, 65536) == pytest.approx(1 - math.exp(-1 / 4096))
    assert hard_pair_success(0, 65536) == 0.0
    assert port_count(CFG) == 64512


# -- the plan table -------------------------------------------------------------------------------


def role(own: NatHint | None, peer: NatHint | None, config: BirthdayConfig = CFG) -> str:
    return plan_traversal(own, peer, config).role


def test_nat_kind() -> None:
    assert [nat_kind(h) for h in (EASY, LEAKY, HARD, UNKNOWN, None)] == [
        "easy",
        "leaky",
        "hard",
        "unknown",
        "unknown",
    ]


def test_plan_table_is_the_design_and_mirrors() -> None:
    table = [
        (EASY, EASY, "plain"),
        (EASY, LEAKY, "probe"),
        (EASY, HARD, "probe"),
        (LEAKY, EASY, "spray"),
        (LEAKY, LEAKY, "hard-relay"),
        (LEAKY, HARD, "probe"),
        (HARD, EASY, "spray"),
        (HARD, LEAKY, "spray"),
        (HARD, HARD, "hard-relay"),
    ]
    partner = {"plain": "plain", "probe": "spray", "spray": "probe", "hard-relay": "hard-relay"}
    for own, peer, want in table:
        assert role(own, peer) == want, (own, peer)
        assert role(peer, own) == partner[want], (peer, own)  # both sides agree
    # Only a hard sprayer facing a leaky prober waits for the prober's whole window.
    assert plan_traversal(HARD, LEAKY, CFG).spray_delay == pytest.approx(10.24)
    assert plan_traversal(HARD, EASY, CFG).spray_delay == 0.0
    assert plan_traversal(LEAKY, EASY, CFG).spray_delay == 0.0


def test_plan_unknown_or_disabled_is_plain() -> None:
    for own, peer in [(None, HARD), (HARD, None), (UNKNOWN, HARD), (EASY, UNKNOWN)]:
        assert plan_traversal(own, peer, CFG) == Plan("plain")
    off = BirthdayConfig(enabled=False)
    assert role(EASY, HARD, off) == "plain"
    assert role(HARD, HARD, off) == "plain"


def test_hard_pair_relays_with_a_sentence_unless_a_budget_is_set() -> None:
    plan = plan_traversal(HARD, HARD, CFG)
    assert plan.role == "hard-relay"
    assert plan.reason is not None
    assert "both NATs map per destination" in plan.reason
    assert "0.03%" in plan.reason and "--hard-nat-budget" in plan.reason
    tried = plan_traversal(HARD, LEAKY, BirthdayConfig(hard_budget=172_000))
    assert tried.role == "spray"  # hard x leaky is not a hard pair
    tried = plan_traversal(HARD, HARD, BirthdayConfig(hard_budget=172_000))
    assert tried.role == "hard-try"
    assert tried.expected == pytest.approx(0.9989, abs=0.0005)
    assert plan_traversal(EASY, HARD, CFG).expected == pytest.approx(0.983, abs=0.0005)


# -- the probe schedule ---------------------------------------------------------------------------


def prober(
    config: BirthdayConfig = CFG, predicted: tuple[int, ...] = (), seed: int = 1, **kw: int
) -> RandomPortProber:
    return RandomPortProber(
        "198.51.100.7", config, random.Random(seed).randbytes, 10.0, predicted, **kw
    )


def drain(p: RandomPortProber, step: float = 0.0) -> list[tuple[float, tuple[str, int]]]:
    """Call the prober at each of its deadlines (plus ``step`` late) until it is done."""
    out = []
    while (deadline := p.next_deadline()) is not None:
        now = deadline + step
        got = p.due(now)
        assert got, "a deadline that yields nothing would spin the driver"
        out.extend((now, a) for a in got)
    return out


def test_prober_paces_never_repeats_and_stops_at_the_budget() -> None:
    p = prober()
    assert p.due(9.99) == []  # nothing before the start
    sent = drain(p)
    assert len(sent) == CFG.probe_budget == p.sent and p.budget_left == 0
    ports = [a[1] for _, a in sent]
    assert len(set(ports)) == len(ports)
    assert all(a[0] == "198.51.100.7" for _, a in sent)
    assert all(1024 <= port <= 65535 for port in ports)
    for i, (t, _) in enumerate(sent):  # the i-th probe leaves no earlier than start + i/rate
        assert i <= math.ceil((t - 10.0) * CFG.probe_rate) + 1
    assert sent[-1][0] == pytest.approx(10.0 + 1023 / 100)
    assert p.next_deadline() is None and p.due(1e9) == []


def test_prober_late_caller_never_exceeds_the_rate_bound() -> None:
    p = prober()
    total = 0
    for t in (10.0, 10.5, 10.505, 13.0, 30.0):
        total += len(p.due(t))
        assert total <= math.ceil((t - 10.0) * CFG.probe_rate) + 1
    assert total == CFG.probe_budget


def test_prober_ports_look_uniform() -> None:
    config = BirthdayConfig(port_range=(1000, 1999), probe_budget=1000)
    ports = [a[1] for _, a in drain(prober(config))]
    assert sorted(ports) == list(range(1000, 2000))  # the budget covers the range: each once
    ports = [a[1] for _, a in drain(prober(BirthdayConfig(probe_budget=1024), seed=7))]
    low_half = sum(1 for port in ports if port < 1024 + 64512 // 2)
    assert 400 < low_half < 624  # binomial(1024, 1/2): 7 sigma either way


def test_prober_predicted_first_and_counted_in_the_budget() -> None:
    config = BirthdayConfig(probe_budget=20)
    p = prober(config, predicted=(40001, 40002, 80, 40001))
    sent = [a for _, a in drain(p)]
    assert [a[1] for a in sent[:3]] == [40001, 40002, 80]  # in order, repeats dropped
    assert len(sent) == 20 and len({a[1] for a in sent}) == 20
    assert p.predicted_sent == {("198.51.100.7", port) for port in (40001, 40002, 80)}


def test_prober_refuses_a_hostile_prediction() -> None:
    # A hint built without the model (e.g. a buggy driver) cannot widen the probe either.
    bad = (0, -5, 70000, *range(2000, 2100))
    p = prober(BirthdayConfig(probe_budget=40), predicted=bad)
    sent = [a for _, a in drain(p)]
    assert [a[1] for a in sent[:16]] == list(range(2000, 2016))  # at most 16, valid only
    assert len(sent) == 40 and all(a[0] == "198.51.100.7" for a in sent)
    assert all(1 <= a[1] <= 65535 for a in sent)


def test_prober_budget_capped_by_the_range_and_override() -> None:
    small = BirthdayConfig(port_range=(5000, 5009), probe_budget=1024)
    assert len(drain(prober(small, predicted=(5003, 9999)))) == 11  # 10 in range + 9999
    assert len(drain(prober(CFG, budget=3))) == 3


def test_prober_survives_a_broken_rand_bytes() -> None:
    p = RandomPortProber("198.51.100.7", CFG, lambda n: b"\xff" * n, 0.0)
    ports = [a[1] for a in p.due(1.0)]
    assert len(ports) == 101 and len(set(ports)) == 101  # biased but terminating, no repeats


# -- the spray schedule ---------------------------------------------------------------------------


def test_spray_schedule() -> None:
    assert spray_times(0.0, 0.0, 5.0, 20.0) == [0.0, 5.0, 10.0, 15.0]
    assert spray_times(0.0, 10.24, 5.0, 21.0) == pytest.approx([10.24, 15.24, 20.24])
    s = SpraySchedule(0.0, 0.0, 5.0)
    assert s.due(0.0) and not s.due(4.9)
    assert s.due(17.0)  # late: one round, not three
    assert not s.due(19.9) and s.next_deadline() == 20.0 and s.rounds == 2


# -- the engine, behind in-memory NATs (tests/core/nat_world.py) ---------------------------------

FAST = SessionConfig(keepalive_interval=0.2, peer_timeout=1.0, punch_timeout=1.5)
# P = 1000 ports, k = 32 sockets, n = 200 probes in 2 s: 99.85% per attempt, and cheap.
SMALL = BirthdayConfig(
    sockets=32, probe_budget=200, probe_rate=100.0, port_range=(20000, 20999), spray_interval=1.0
)
SMALL_LINK = LinkConfig(session=FAST, birthday=SMALL)
HOST = "198.51.100.50"  # an announced IP with nobody behind it


def both_connected(a: BNode, b: BNode) -> Callable[[], bool]:
    return lambda: a.engine.state == b.engine.state == "connected"


def commands(node: BNode, kind: type[T]) -> list[T]:
    return [c for c in node.commands if isinstance(c, kind)]


def chat_both_ways(w: NatWorld, a: BNode, b: BNode) -> None:
    a.engine.send_chat("over the winner", w.now)
    b.engine.send_chat("and back", w.now)
    w.run(0.5)
    assert [e.text for e in b.of(ev.ChatReceived)] == ["over the winner"]  # type: ignore[attr-defined]
    assert [e.text for e in a.of(ev.ChatReceived)] == ["and back"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("easy_controls", [True, False])
def test_easy_x_hard_connects_through_birthday_on_the_winning_socket(easy_controls: bool) -> None:
    w = NatWorld(seed=3)
    e = w.add("easy", "easy", EASY, SMALL_LINK)
    h = w.add("hard", "hard", HARD, SMALL_LINK)
    first_socket = h.main
    w.pair(*((e, h) if easy_controls else (h, e)))
    w.run_until(both_connected(e, h), 4.0)
    assert e.engine.state == h.engine.state == "connected"
    assert e.engine.method == h.engine.method == "birthday"
    # The hard side opened k sockets, one of them won and became the link's socket.
    assert [c.count for c in commands(h, OpenSocketPool)] == [32]
    assert len(commands(h, AdoptPoolSocket)) == 1 and w.held_checked == 1
    assert h.engine.stats["pool_adoptions"] == 1 and h.pool == {}
    assert h.main != first_socket
    won = commands(h, AdoptPoolSocket)[0].index
    # The easy side probed, never opened a pool, and talks to the winner's mapping.
    assert not commands(e, OpenSocketPool) and e.engine.pool_size == 0
    assert 0 < e.engine.stats["birthday_probes"] <= SMALL.probe_budget
    peer = e.engine.peer_address
    assert peer is not None and peer[0] == h.nat.ip
    assert h.nat.inbound(peer[1], (e.nat.ip, e.nat.easy[e.main])) == h.main
    adopted_at = max(s.at for s in w.sent if s.node == "hard" and s.pool == won)
    dropped = h.engine.stats["pool_dropped"]
    h.engine.receive_datagram(b"late", peer, w.now, pool=won)  # after adoption: no pool
    assert h.engine.stats["pool_dropped"] == dropped + 1
    chat_both_ways(w, e, h)
    w.run(3.0)  # keep-alives carry on over the adopted socket
    assert e.engine.state == h.engine.state == "connected"
    later = [s for s in w.sent if s.node == "hard" and s.at > adopted_at]
    assert later and all(s.sock == h.main and s.pool == 0 for s in later)
    assert not [s for s in w.sent if s.node == "easy" and s.at > adopted_at + 1 and s.dst != peer]


def test_a_link_lost_after_birthday_re_punches_on_the_adopted_socket() -> None:
    w = NatWorld(seed=4)
    e = w.add("easy", "easy", EASY, SMALL_LINK)
    h = w.add("hard", "hard", HARD, SMALL_LINK)
    w.pair(e, h)
    w.run_until(both_connected(e, h), 4.0)
    adopted = h.main
    w.cut = True
    w.run(1.2)  # past peer_timeout: both lose the link and re-punch
    assert "punching" in [e.state for e in e.of(ev.StateChanged)][-3:]  # type: ignore[attr-defined]
    w.cut = False
    w.run_until(both_connected(e, h), 3.0)
    assert e.engine.state == h.engine.state == "connected"
    assert len(commands(h, OpenSocketPool)) == 1  # no second pool: plain re-punch
    assert h.main == adopted and e.engine.method == h.engine.method == "birthday"


def test_predicted_ports_of_a_sequential_nat_are_probed_first_and_win() -> None:
    w = NatWorld(seed=5)
    e = w.add("easy", "easy", EASY, SMALL_LINK)
    # STUN saw 20500; the next mappings will be 20501, 20502, ...
    hint = NatHint(mapping="endpoint-dependent", sequential=True, predicted_ports=[20501, 20502])
    h = w.add("hard", "hard", hint, SMALL_LINK, sequential=True)
    w.pair(e, h)
    w.run_until(both_connected(e, h), 4.0)
    assert e.engine.method == h.engine.method == "predicted"
    assert e.engine.peer_address == (h.nat.ip, 20501)
    assert not commands(h, AdoptPoolSocket) and commands(h, ClosePool)  # won on the main socket
    announced = h.reported.udp_port if h.reported else None
    to_hard = [s.dst[1] for s in w.sent if s.node == "easy" and s.dst[0] == h.nat.ip]
    assert next(p for p in to_hard if p != announced) == 20501  # the first birthday probe


@pytest.mark.parametrize("hint", [HARD, LEAKY])
def test_hard_x_hard_relays_at_once_and_says_why(hint: NatHint) -> None:
    w = NatWorld()
    a = w.add("a", "hard", hint, SMALL_LINK)
    b = w.add("b", "hard", hint, SMALL_LINK)
    w.pair(a, b)
    w.run(0.5)
    for node in (a, b):
        assert node.engine.state == "relayed" and node.engine.method == "relay"
        assert node.engine.error is not None
        assert node.engine.error.startswith("both NATs map per destination: expected success")
        reported = [x.message for x in node.of(ev.ErrorReported)]  # type: ignore[attr-defined]
        assert node.engine.error in reported
        assert not commands(node, OpenSocketPool) and node.engine.stats["birthday_probes"] == 0
    assert a.engine.stats["relay_switches"] == 1
    chat_both_ways(w, a, b)


def test_hard_x_hard_with_a_budget_tries_from_both_pools() -> None:
    config = BirthdayConfig(
        sockets=16, probe_budget=50, probe_rate=400.0, port_range=(20000, 20299), hard_budget=600
    )
    link = LinkConfig(session=FAST, birthday=config)  # 1 - exp(-600^2/300^2) = 98.2%
    w = NatWorld(seed=6)
    a = w.add("a", "hard", HARD, link)
    b = w.add("b", "hard", HARD, link)
    w.pair(a, b)
    w.run_until(both_connected(a, b), 3.0)
    assert a.engine.method == b.engine.method == "birthday"
    for node, peer in ((a, b), (b, a)):
        sends = commands(node, SendFromPool)
        assert 0 < len(sends) <= 600 and {s.index for s in sends} <= set(range(1, 17))
        assert {s.addr[0] for s in sends} == {peer.nat.ip}
        assert len({s.addr for s in sends}) == len(sends)  # no port twice
        assert len(commands(node, AdoptPoolSocket)) == 1
    chat_both_ways(w, a, b)


def lone_offer(w: NatWorld, node: BNode, peer_nat: object, **kw: object) -> None:
    """An offer from a peer that never answers (nobody behind ``HOST``)."""
    fields = {
        "peer_worker_id": "ghost",
        "peer_udp_ip": HOST,
        "peer_udp_port": 40000,
        "role": "controlling",
        "peer_public_key": Identity.generate(random.Random("ghost").randbytes).public_b64,
        "peer_nat": peer_nat,
        **kw,
    }
    node.engine.receive_rendezvous(P2PConnectionOffer.model_construct(**fields), w.now)
    w.flush()


def test_prober_schedule_budget_and_rate_with_the_defaults() -> None:
    w = NatWorld()
    e = w.add("easy", "easy", EASY, LinkConfig(session=FAST))
    start = w.now
    lone_offer(w, e, NatHint(mapping="endpoint-dependent", predicted_ports=[5000, 5001]))
    w.run(11.7)  # the punch deadline moved 10.24 s later: 1.5 + 10.24 s
    assert e.engine.stats["relay_switches"] == 0 and e.engine.state == "punching"
    w.run(13.3)
    assert e.engine.stats["relay_switches"] == 1
    probes = [s for s in w.sent if s.node == "easy" and s.dst != (HOST, 40000)]
    assert len(probes) == e.engine.stats["birthday_probes"] == 1024
    assert {s.dst[0] for s in probes} == {HOST}
    assert [s.dst[1] for s in probes[:2]] == [5000, 5001]
    assert len({s.dst for s in probes}) == 1024
    for i, s in enumerate(probes):
        assert i <= math.ceil((s.at - start) * 100.0) + 1
    assert probes[-1].at - start == pytest.approx(10.23)  # 1024 probes in about 10 s


def test_a_hostile_offer_cannot_widen_the_probe() -> None:
    w = NatWorld()
    link = LinkConfig(session=FAST, birthday=BirthdayConfig(probe_budget=100, probe_rate=50.0))
    e = w.add("easy", "easy", EASY, link)
    # A hint no honest rendezvous passes on: thousands of ports, some invalid, built unchecked.
    huge = NatHint.model_construct(
        mapping="endpoint-dependent",
        remaps_on_clash=False,
        sequential=True,
        predicted_ports=[0, -1, 70000, *range(1, 3000)],
    )
    lan = [Candidate(ip="10.9.9.9", port=1), Candidate(ip="192.0.2.77", port=2)]
    start = w.now
    lone_offer(w, e, huge, peer_candidates=lan)
    w.run(5.0)
    given = {(HOST, 40000), ("10.9.9.9", 1), ("192.0.2.77", 2)}
    birthday = [s for s in w.sent if s.node == "easy" and s.dst not in given]
    assert len(birthday) == e.engine.stats["birthday_probes"] == 100  # the local budget
    assert {s.dst[0] for s in birthday} == {HOST}  # only the announced IP
    assert [s.dst[1] for s in birthday[:16]] == list(range(1, 17))  # 16 predicted at most
    assert all(1 <= s.dst[1] <= 65535 for s in birthday)
    for i, s in enumerate(birthday):
        assert i <= math.ceil((s.at - start) * 50.0) + 1  # the local rate
    # The model itself refuses such a hint.
    with pytest.raises(ValidationError):
        NatHint(mapping="endpoint-dependent", predicted_ports=list(range(1, 18)))
    with pytest.raises(ValidationError):
        NatHint(mapping="endpoint-dependent", predicted_ports=[70000])


def test_sprayer_sends_only_from_its_k_sockets_to_the_announced_endpoint_until_the_deadline() -> (
    None
):
    w = NatWorld()
    h = w.add("hard", "hard", HARD, SMALL_LINK)
    start = w.now
    lone_offer(w, h, EASY)
    w.run(6.0)
    sends = commands(h, SendFromPool)
    assert [c.count for c in commands(h, OpenSocketPool)] == [32]  # the local count
    assert {c.addr for c in sends} == {(HOST, 40000)}
    assert {c.index for c in sends} == set(range(1, 33))
    # Rounds at 0, 1, 2, 3 s (spray_interval 1 s) until the deadline 1.5 + 2 s, then ClosePool.
    assert len(sends) == 4 * 32 == h.engine.stats["spray_datagrams"]
    assert commands(h, ClosePool) and h.pool == {}
    assert h.engine.stats["relay_switches"] == 1  # (the ghost never answers the relay either)
    rounds = sorted({s.at for s in w.sent if s.node == "hard" and s.pool})
    assert rounds == pytest.approx([start, start + 1, start + 2, start + 3])


def test_a_hard_sprayer_waits_for_a_leaky_probers_window() -> None:
    w = NatWorld()
    h = w.add("hard", "hard", HARD, SMALL_LINK)
    start = w.now
    lone_offer(w, h, LEAKY)
    w.run(1.9)
    assert commands(h, OpenSocketPool) and not commands(h, SendFromPool)
    w.run(0.2)
    first = min(s.at for s in w.sent if s.pool)
    assert first == pytest.approx(start + 2.0)  # probe_budget / probe_rate
    w.run(3.0)  # 1.5 + 2 + 2 s: still punching at 5.1 s, relayed after 5.5 s
    assert h.engine.stats["relay_switches"] == 0
    w.run(0.5)
    assert h.engine.stats["relay_switches"] == 1


def test_pool_junk_strangers_and_misuse_are_dropped_and_counted_not_adopted() -> None:
    w = NatWorld()
    h = w.add("hard", "hard", HARD, SMALL_LINK)
    lone_offer(w, h, EASY)
    eng = h.engine
    src = (HOST, 40000)
    eng.receive_datagram(b"\x00junk" * 10, src, w.now, pool=3)
    eng.receive_datagram(b"", ("192.0.2.200", 9), w.now, pool=1)
    eng.receive_datagram(b"x", src, w.now, pool=33)  # no such pool socket
    eng.receive_datagram(b"x", src, w.now, pool=-1)
    # A datagram sealed by someone else claiming to be the peer.
    stranger = Identity.generate(random.Random("mallory").randbytes)
    rand = random.Random("mallory").randbytes
    assert eng.identity is not None
    forged = PeerSession(
        "ghost",
        "hard",
        "controlling",
        [("198.51.100.2", 1)],
        FAST,
        w.now,
        rand,
        sealer=PeerCipher(stranger, "ghost", "hard", eng.identity.public_bytes, rand, epoch=1),
    ).spray_probe(("198.51.100.2", 1), w.now)
    eng.receive_datagram(forged, src, w.now, pool=2)
    w.flush()
    assert eng.stats["pool_dropped"] == 5 and eng.stats["pool_adoptions"] == 0
    assert not commands(h, AdoptPoolSocket) and eng.state == "punching"
    # An engine with no pool drops pool datagrams too.
    e = w.add("easy", "easy", EASY, SMALL_LINK)
    e.engine.receive_datagram(forged, src, w.now, pool=1)
    assert e.engine.stats["pool_dropped"] == 1


def test_stop_closes_the_pool() -> None:
    w = NatWorld()
    h = w.add("hard", "hard", HARD, SMALL_LINK)
    lone_offer(w, h, EASY)
    assert not commands(h, ClosePool)
    h.engine.stop(w.now)
    w.flush()
    assert commands(h, ClosePool) and h.pool == {}
