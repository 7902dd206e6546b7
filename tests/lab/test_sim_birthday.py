"""Birthday punching and predicted ports with whole workers in the simulator (issue 16).

The engines decide (who probes, who sprays, which socket wins); the simulator carries the
datagrams through NATs with random or sequential port allocators and carries out the socket-pool
commands the way the asyncio worker does.  Seeded, on the virtual clock: a birthday pair costs a
few hundred milliseconds of real time (a thousand sealed probes and sprays).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from p2plab.config import BirthdayConfig
from p2plab.core import events as ev
from p2plab.core.birthday import birthday_success
from p2plab.core.link import LinkConfig as EngineConfig
from p2plab.lab.sim import NatBehavior, Simulation, SimWorker
from p2plab.lab.sim.birthday_curve import first_hits
from p2plab.lab.simnet import APDF, APDM, Host, Nat


def _site(sim: Simulation, profile: str | NatBehavior, name: str) -> tuple[Host, Nat]:
    nat = sim.add_nat(profile, name=f"nat_{name}")
    return sim.add_host(behind=nat, name=name), nat


def _chat(sim: Simulation, sender: SimWorker, receiver: SimWorker, text: str) -> None:
    msg_id = sender.send_chat(text)

    def done() -> bool:
        acked = any(
            isinstance(e, ev.ChatDelivered) and e.msg_id == msg_id for _, e in sender.events
        )
        return acked and text in receiver.chats_received

    assert sim.run_for(30.0, stop=done), (sender, receiver)
    assert receiver.chats_received.count(text) == 1


# -- the NAT hint the simulated worker announces ------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "summary"),
    [
        ("full", ("endpoint-independent", False, False)),
        ("port-restricted", ("endpoint-independent", False, False)),
        ("leaky", ("endpoint-independent", True, False)),
        ("symmetric", ("endpoint-dependent", False, False)),
        ("symmetric-sequential", ("endpoint-dependent", False, True)),
        ("symmetric-busy", ("endpoint-dependent", False, True)),
    ],
)
def test_the_worker_learns_its_nat_hint_over_stun(
    profile: str, summary: tuple[str, bool, bool]
) -> None:
    sim = Simulation(seed=2)
    host, nat = _site(sim, profile, "a")
    w = sim.worker(host)
    sim.run_for(3.0)
    hint = w.nat_hint
    assert hint is not None and w.state == "waiting_for_peer"
    assert (hint.mapping, hint.remaps_on_clash, hint.sequential) == summary
    # The hint reached the rendezvous with the endpoint (it goes into the peer's offer).
    assert w.engine.nat_hint == hint
    if profile == "symmetric-sequential":
        # The next mapping of the punching socket takes the first predicted port.  (Behind the
        # busy NAT it may not: three mappings with random gaps can look like a constant stride.)
        w.socket.sendto(b"x", ("203.0.113.250", 9))
        sim.run_for(1.0)
        internal = w.socket.address
        newest = [m["external"][1] for m in nat.mappings if m["internal"] == internal][-1]
        assert newest == hint.predicted_ports[0]
    elif not hint.sequential:
        assert hint.predicted_ports == []
    # The leaky test's socket is closed again: only the worker's socket is left on the host.
    assert list(host.sockets.values()) == [w.socket]


# -- easy x hard ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile_a", "profile_b", "seed"),
    [
        ("port-restricted", "symmetric", 11),
        ("symmetric", "port-restricted", 12),
        ("port-restricted", "leaky", 13),
        ("leaky", "symmetric", 14),
    ],
)
def test_easy_x_hard_connects_by_birthday_on_the_socket_that_won(
    profile_a: str, profile_b: str, seed: int
) -> None:
    sim = Simulation(seed=seed)
    (a, _), (b, _) = _site(sim, profile_a, "a"), _site(sim, profile_b, "b")
    # B's offer comes 0.1 s after A's, as from a real rendezvous (with no skew the first
    # datagrams of port-restricted x leaky cross in flight and plain punching wins the race).
    result = sim.pair(a, b, skew=0.1)
    assert (result.outcome, result.method, result.path) == ("direct", "birthday", "public")
    assert result.a.engine.method == result.b.engine.method == "birthday"
    sprayers = [w for w in (result.a, result.b) if w.engine.stats["pool_adoptions"]]
    assert len(sprayers) == 1, "exactly one side adopts a pool socket"
    sprayer = sprayers[0]
    prober = result.b if sprayer is result.a else result.a
    # The hand-over: the sprayer's link runs on the pool socket that won, every other pool
    # socket and its first socket are closed; the prober kept its own socket.
    assert sprayer.stats["pool_adoptions"] == 1
    assert sprayer.stats["pool_sockets_opened"] == BirthdayConfig().sockets
    assert sprayer.pool == {}
    assert list(sprayer.host.sockets.values()) == [sprayer.socket]
    assert sprayer.local_address[1] != 40000  # its first socket was the host's first bind
    assert prober.stats["pool_sockets_opened"] == 0
    assert list(prober.host.sockets.values()) == [prober.socket]
    # The prober reaches the sprayer at the winning socket's NAT mapping (not at the public
    # endpoint it announced), within its budget.
    assert prober.peer_address is not None and prober.peer_address != sprayer.public_address
    probes = prober.engine.stats["birthday_probes"]
    assert 1 <= probes <= BirthdayConfig().probe_budget
    _chat(sim, result.a, result.b, "through the hard NAT")
    _chat(sim, result.b, result.a, "and back")
    sim.run_for(120.0)  # keep-alives keep the new socket's mapping
    assert result.a.state == result.b.state == "connected"
    _chat(sim, sprayer, prober, "two minutes later")


@pytest.mark.parametrize("easy", ["open", "full", "restricted"])
def test_plain_punching_wins_at_once_when_the_easy_side_lets_the_hard_one_in(easy: str) -> None:
    """The easy side (controlling) filters by address only or not at all: the hard side's
    first datagram from its link socket gets in and the link is up in one round trip.  The spray
    reaches the easy side too, and its answers come back to pool sockets: the hard side must not
    adopt one of them under a path the controlling side has already nominated (it did, and both
    sides waited 20 s for a peer timeout and a re-punch)."""
    sim = Simulation(seed=41)
    a = sim.add_host(name="a") if easy == "open" else _site(sim, easy, "a")[0]
    (b, _) = _site(sim, "symmetric", "b")
    result = sim.pair(a, b, skew=0.1)
    assert (result.outcome, result.method) == ("direct", "direct")
    assert result.a.engine.method == result.b.engine.method == "direct"
    assert result.connect_time_s is not None and result.connect_time_s < 1.0
    assert result.b.engine.stats["pool_adoptions"] == 0
    assert result.b.pool == {} and list(result.b.host.sockets.values()) == [result.b.socket]
    sim.run_for(60.0)
    assert result.a.state == result.b.state == "connected"
    assert not any(isinstance(e, ev.PeerLost) for w in (result.a, result.b) for _, e in w.events)


@pytest.mark.parametrize("profile", ["symmetric", "leaky"])
def test_two_hard_hosts_behind_one_nat_still_punch_over_the_lan(profile: str) -> None:
    """Both hard, but behind the same NAT (one public IP): their LAN addresses work, so the
    engines punch as before instead of going to the relay at once."""
    sim = Simulation(seed=42)
    nat = sim.add_nat(profile)
    a, b = sim.add_host(behind=nat, name="a"), sim.add_host(behind=nat, name="b")
    result = sim.pair(a, b, skew=0.1)
    assert (result.outcome, result.method, result.path) == ("direct", "direct", "lan")
    assert sim.rendezvous.stats["relayed"] == 0


def test_a_sequential_nat_connects_on_a_predicted_port_with_few_probes() -> None:
    sim = Simulation(seed=21)
    sequential = NatBehavior(mapping=APDM, filtering=APDF, port_allocation="sequential")
    # The sequential NAT's side registers first: its mappings exist when the prober starts.
    (a, _), (b, _) = _site(sim, sequential, "a"), _site(sim, "port-restricted", "b")
    result = sim.pair(a, b)
    assert result.a.nat_hint is not None and result.a.nat_hint.sequential
    assert (result.outcome, result.method) == ("direct", "predicted")
    assert result.b.engine.method == "predicted"
    assert result.b.engine.stats["birthday_probes"] <= len(result.a.nat_hint.predicted_ports)
    _chat(sim, result.a, result.b, "predicted")


def test_hard_x_hard_goes_to_the_relay_and_says_why() -> None:
    sim = Simulation(seed=31)
    (a, _), (b, _) = _site(sim, "symmetric", "a"), _site(sim, "symmetric", "b")
    result = sim.pair(a, b)
    assert (result.outcome, result.fallback, result.method) == ("failed", "relayed", "relay")
    for w in (result.a, result.b):
        assert w.engine.error is not None
        assert "both NATs map per destination" in w.engine.error
        assert "0.03%" in w.engine.error
        errors = [e.message for e in w.events_of(ev.ErrorReported)]
        assert any("both NATs map per destination" in m for m in errors)
        assert w.stats["pool_sockets_opened"] == 0
        assert w.engine.stats["birthday_probes"] == 0
    _chat(sim, result.a, result.b, "over the relay")


def test_without_birthday_an_easy_x_hard_pair_relays_as_before() -> None:
    sim = Simulation(seed=11)
    (a, _), (b, _) = _site(sim, "port-restricted", "a"), _site(sim, "symmetric", "b")
    result = sim.pair(a, b, config=EngineConfig(birthday=BirthdayConfig(enabled=False)))
    assert (result.outcome, result.fallback, result.method) == ("failed", "relayed", "relay")
    assert result.birthday_probes == 0
    assert all(w.stats["pool_sockets_opened"] == 0 for w in (result.a, result.b))


# -- the curve -----------------------------------------------------------------------------------


def _worst_z(hits: list[int | None], ns: tuple[int, ...], formula: Callable[[int], float]) -> float:
    """The largest distance, in standard errors, between the measured rate and ``formula``."""
    trials = len(hits)
    worst = 0.0
    for n in ns:
        p = formula(n)
        rate = sum(1 for h in hits if h is not None and h <= n) / trials
        worst = max(worst, abs(rate - p) / math.sqrt(max(p * (1 - p), 1e-4) / trials))
    return worst


def test_the_measured_curve_follows_the_formula_and_a_wrong_one_does_not() -> None:
    """1000 seeded trials for k = 256: at every n the measured rate is within 4.5 standard errors
    of 1 - (1 - k/P)^n (a right formula fails that at one of the points with probability ~1e-5);
    the same data lies far outside that band for formulas off by a factor of two in k or n."""
    k, port_total = 256, 64512
    ns = (32, 64, 128, 256, 512, 1024)
    hits = first_hits(k, 1000, seed=5, max_probes=max(ns))
    assert all(h is None or 1 <= h <= max(ns) for h in hits)
    assert _worst_z(hits, ns, lambda n: birthday_success(k, n, port_total)) < 4.5
    wrong: list[Callable[[int], float]] = [
        lambda n: birthday_success(k // 2, n, port_total),
        lambda n: birthday_success(k, 2 * n, port_total),
        lambda n: min(1.0, k * n / port_total),
    ]
    for formula in wrong:
        assert _worst_z(hits, ns, formula) > 8.0


def test_the_pool_and_the_probes_follow_the_local_config_and_the_peer_ip_only() -> None:
    """Each side's own BirthdayConfig sizes its pool and budget (the offer carries no numbers);
    every datagram the prober sends goes to the STUN server, to the offer's candidates, or (its
    random-port probes) to the hard side's public IP."""
    sim = Simulation(seed=51)
    (a, _), (b, nat_b) = _site(sim, "port-restricted", "a"), _site(sim, "symmetric", "b")
    small = EngineConfig(birthday=BirthdayConfig(sockets=64, probe_budget=4096, probe_rate=400))
    wa = sim.worker(a, room="r", config=small, start=False)
    wb = sim.worker(b, room="r", config=small, start=False, signaling_delay=0.12)
    sent_to: list[tuple[str, int]] = []
    send = wa.socket.sendto

    def recording(data: bytes, addr: tuple[str, int]) -> None:
        sent_to.append(addr)
        send(data, addr)

    wa.socket.sendto = recording  # type: ignore[method-assign]
    wa.start()
    wb.start()
    result = sim.pair(wa, wb)
    assert (result.outcome, result.method) == ("direct", "birthday")
    assert wb.stats["pool_sockets_opened"] == 64
    assert wb.engine.stats["spray_datagrams"] % 64 == 0
    offer = wa.engine.offer
    assert offer is not None and offer.peer_udp_ip == nat_b.public_ip
    given = {c.ip for c in offer.peer_candidates}  # plain punching: the offer's candidates
    assert {ip for ip, _ in sent_to} <= {*given, *sim.stun.ips}
    assert {(ip, port) for ip, port in sent_to if ip != nat_b.public_ip and ip in given} <= {
        (c.ip, c.port) for c in offer.peer_candidates
    }
    probed = [addr for addr in sent_to if addr[0] == nat_b.public_ip]
    assert len(set(probed)) >= wa.engine.stats["birthday_probes"]  # one probe per port
    assert wa.engine.stats["birthday_probes"] <= 4096
