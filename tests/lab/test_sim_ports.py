"""The simulator's NAT port allocators (RFC 4787 section 4.2.1) and the core's port predictor run
against them: what each allocator's ports look like in numbers, and whether the predictor tells
sequential ones from random ones through what STUN servers see."""

from __future__ import annotations

import itertools
import statistics

import pytest

from p2plab.core.portpredict import predict_ports
from p2plab.errors import ConfigError
from p2plab.lab.sim import NatBehavior, Simulation
from p2plab.lab.sim.world import SIM_PROFILES
from p2plab.lab.simnet import APDM, EIM, PORT_ALLOCATIONS, Nat


def _mapped_ports(
    allocation: str, n: int, *, seed: int = 3, internal: int = 40000, **fields: object
) -> tuple[Nat, list[int]]:
    """External ports of ``n`` new mappings of one socket (one per remote endpoint, APDM)."""
    sim = Simulation(seed=seed)
    nat = sim.add_nat(NatBehavior(mapping=APDM, port_allocation=allocation, **fields))
    inside = sim.add_host(behind=nat)
    remote = sim.add_host()
    sock = inside.bind(internal)
    for i in range(n):
        sock.sendto(b"x", (remote.ip, 1 + i))
    sim.run_for(1.0)
    ports = [m["external"][1] for m in nat.mappings]
    assert len(ports) == n
    return nat, ports


def _stun_ports(sim: Simulation, nat: Nat) -> tuple[list[int], int]:
    """What one socket behind ``nat`` learns from the four STUN server addresses (two IPs x two
    ports), in order, and the external port of the next mapping it makes (to a peer)."""
    peer = sim.peer(sim.add_host(behind=nat), port=40000)
    ports = []
    for ip in sim.stun.ips:
        for port in sim.stun.ports:
            tx = peer.binding((ip, port))
            mapped = tx.response.attributes["XOR-MAPPED-ADDRESS"] if tx.response else None
            assert mapped is not None
            ports.append(int(mapped[1]))
    other = sim.add_host()
    peer.socket.sendto(b"punch", (other.ip, 7000))
    sim.run_for(1.0)
    internal = peer.socket.address
    live = [m["external"][1] for m in nat.mappings if m["internal"] == internal]
    return ports, live[-1]


# -- the allocators in numbers ------------------------------------------------------------------


def test_profiles_keep_their_allocators() -> None:
    """The existing profiles keep today's allocators (their tests pass unchanged), defaults too."""
    allocations = {name: b.port_allocation for name, b in SIM_PROFILES.items()}
    assert allocations == {
        "full": "preserving",
        "restricted": "preserving",
        "port-restricted": "preserving",
        "symmetric": "random",
        "leaky": "preserving",
        "address-dependent": "sequential",
        # issue 16: symmetric NATs whose ports can be predicted
        "symmetric-sequential": "sequential",
        "symmetric-busy": "sequential-busy",
    }
    assert all(b.port_range == (1024, 65535) and b.port_seed is None for b in SIM_PROFILES.values())
    assert set(PORT_ALLOCATIONS) == {
        "preserve",
        "preserving",
        "random",
        "sequential",
        "sequential-busy",
    }


def test_random_spreads_over_the_range_and_never_reuses_a_live_port() -> None:
    _, ports = _mapped_ports("random", 2000)
    assert len(set(ports)) == len(ports)  # no live mapping's port handed out twice
    lo, hi = 1024, 65535
    assert all(lo <= p <= hi for p in ports)
    # Uniform over 64512 ports: each quarter ~500 of 2000 (sd ~19), mean ~33280 (sd ~416).
    quarter = (hi - lo + 1) // 4
    counts = [
        sum(1 for p in ports if lo + q * quarter <= p < lo + (q + 1) * quarter) for q in range(4)
    ]
    assert all(420 <= c <= 580 for c in counts), counts
    assert abs(statistics.mean(ports) - (lo + hi) / 2) < 2000
    steps = [b - a for a, b in itertools.pairwise(ports)]
    assert sum(1 for s in steps if 1 <= s <= 64) < 10  # about 2 expected by chance


@pytest.mark.parametrize("seed", range(10))
def test_random_fills_a_small_range_exactly_then_refuses(seed: int) -> None:
    """With 50 ports and 50 live mappings every port is used once; the 51st mapping is refused.
    (Random draws alone, as many as ports, missed the last free port about a third of the time
    and refused too early.)"""
    sim = Simulation(seed=seed)
    nat = sim.add_nat(NatBehavior(mapping=APDM, port_allocation="random", port_range=(5000, 5049)))
    sock = sim.add_host(behind=nat).bind(40000)
    remote = sim.add_host()
    for i in range(50):
        sock.sendto(b"x", (remote.ip, 1 + i))
    sim.run_for(1.0)
    assert sorted(m["external"][1] for m in nat.mappings) == list(range(5000, 5050))
    sock.sendto(b"x", (remote.ip, 51))
    with pytest.raises(ConfigError, match="out of external ports"):
        sim.run_for(1.0)


def test_sequential_steps_by_one() -> None:
    _, ports = _mapped_ports("sequential", 200)
    assert ports == list(range(20000, 20200))  # starts at 20000 (or the range's start if higher)
    _, ports = _mapped_ports("sequential", 20, port_range=(30000, 30019))
    assert ports == list(range(30000, 30020))


def test_sequential_wraps_when_old_mappings_expired() -> None:
    sim = Simulation(seed=1)
    behavior = NatBehavior(
        mapping=APDM, port_allocation="sequential", port_range=(3000, 3009), mapping_timeout=5.0
    )
    nat = sim.add_nat(behavior)
    sock = sim.add_host(behind=nat).bind(40000)
    remote = sim.add_host()
    seen = []
    for i in range(15):
        sock.sendto(b"x", (remote.ip, 1 + i))
        sim.run_for(1.0)
        seen.append(nat.mappings[-1]["external"][1])
    # 3000..3009, then 3000 again: the first mappings expired (5 s), so their ports are free.
    assert seen == [*range(3000, 3010), *range(3000, 3005)]


def test_sequential_busy_increases_with_gaps() -> None:
    _, ports = _mapped_ports("sequential-busy", 500)
    steps = [b - a for a, b in itertools.pairwise(ports)]
    assert all(1 <= s <= 11 for s in steps)  # our port, then 0..10 taken by other hosts
    assert len(set(steps)) == 11  # every gap size happens
    assert 5.0 < statistics.mean(steps) < 7.0  # 1 + uniform(0..10): 6 on average
    _, wide = _mapped_ports("sequential-busy", 200, busy_gap=(20, 30))
    assert all(21 <= b - a <= 31 for a, b in itertools.pairwise(wide))


def test_preserve_keeps_the_port_then_goes_random_unlike_preserving() -> None:
    """Linux MASQUERADE keeps the source port while the tuple is free and picks a random one on
    a clash; the historical ``preserving`` takes the next port instead."""
    _, ports = _mapped_ports("preserve", 100)
    assert ports[0] == 40000
    assert not predict_ports(ports[1:]).sequential
    assert len(set(ports)) == 100
    _, old = _mapped_ports("preserving", 5)
    assert old == [40000, 40001, 40002, 40003, 40004]


def test_port_seed_makes_allocation_independent_of_other_randomness() -> None:
    a = _mapped_ports("random", 20, seed=1, port_seed=99)[1]
    b = _mapped_ports("random", 20, seed=2, port_seed=99)[1]
    c = _mapped_ports("random", 20, seed=1, port_seed=100)[1]
    assert a == b != c
    # Without port_seed the simulation's own seed decides, as before.
    assert _mapped_ports("random", 20, seed=1)[1] != _mapped_ports("random", 20, seed=2)[1]


@pytest.mark.parametrize(
    "fields",
    [{"port_allocation": "lucky"}, {"busy_gap": (5, 1)}, {"busy_gap": (-1, 3)}],
)
def test_bad_allocator_parameters_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        NatBehavior(**fields)  # type: ignore[arg-type]


# -- the predictor against each allocator, through STUN -----------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_predictor_finds_a_sequential_nat_and_its_next_port(seed: int) -> None:
    sim = Simulation(seed=seed)
    nat = sim.add_nat(NatBehavior(mapping=APDM, port_allocation="sequential"))
    ports, next_port = _stun_ports(sim, nat)
    got = predict_ports(ports)
    assert got.sequential and got.stride == 1
    assert got.predicted[0] == next_port


@pytest.mark.parametrize("seed", range(5))
def test_predictor_finds_a_busy_sequential_nat_within_its_window(seed: int) -> None:
    sim = Simulation(seed=seed)
    nat = sim.add_nat(NatBehavior(mapping=APDM, port_allocation="sequential-busy", port_seed=seed))
    ports, next_port = _stun_ports(sim, nat)
    got = predict_ports(ports)
    assert got.sequential, got.reason
    assert next_port in got.predicted


def test_predictor_says_not_sequential_for_random_and_preserve_nats() -> None:
    verdicts = []
    for seed in range(20):
        for allocation in ("random", "preserve"):
            sim = Simulation(seed=seed)
            nat = sim.add_nat(NatBehavior(mapping=APDM, port_allocation=allocation))
            ports, _ = _stun_ports(sim, nat)
            verdicts.append(predict_ports(ports).sequential)
    assert verdicts == [False] * 40


def test_predictor_on_an_endpoint_independent_nat_has_nothing_to_predict() -> None:
    sim = Simulation(seed=1)
    nat = sim.add_nat(NatBehavior(mapping=EIM, port_allocation="sequential"))
    ports, next_port = _stun_ports(sim, nat)
    assert len(set(ports)) == 1 and next_port == ports[0]
    got = predict_ports(ports)
    assert not got.sequential and "endpoint-independent" in got.reason
