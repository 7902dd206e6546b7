"""Whole workers in the simulator: the core link engine decides, the simulated network carries.

Everything runs on the virtual clock (a few milliseconds of real time per test).  The assertions
are on the engine's own ``StateChanged`` events, so a relay fallback or a re-punch seen here is
one the engine made, not one the simulator imitated.
"""

from __future__ import annotations

import pytest

from p2plab.config import BirthdayConfig
from p2plab.core import events as ev
from p2plab.core.link import LinkConfig as EngineConfig
from p2plab.lab.sim import Simulation, SimWorker, sim_matrix
from p2plab.lab.simnet import Host, Nat


def _site(sim: Simulation, profile: str, name: str) -> tuple[Host, Nat]:
    nat = sim.add_nat(profile, name=f"nat_{name}")
    return sim.add_host(behind=nat, name=name), nat


def _changes(w: SimWorker, since: float = 0.0) -> list[tuple[str, str]]:
    """(previous, state) of every StateChanged the engine emitted at or after ``since``."""
    return [
        (e.previous, e.state) for t, e in w.events if t >= since and isinstance(e, ev.StateChanged)
    ]


def _chat(sim: Simulation, sender: SimWorker, receiver: SimWorker, text: str) -> None:
    msg_id = sender.send_chat(text)

    def done() -> bool:
        acked = any(
            isinstance(e, ev.ChatDelivered) and e.msg_id == msg_id for _, e in sender.events
        )
        return acked and text in receiver.chats_received

    assert sim.run_for(30.0, stop=done), (sender, receiver)
    sim.run_for(5.0)  # retransmissions, if any, must not deliver it twice
    assert receiver.chats_received.count(text) == 1
    received = [e for _, e in receiver.events if isinstance(e, ev.ChatReceived) and e.text == text]
    assert received[0].peer_id == sender.worker_id


def test_symmetric_pair_falls_back_to_the_relay_and_chats_over_it() -> None:
    """The punch-timeout fallback (birthday off: with it, two symmetric NATs relay at once,
    tests/lab/test_sim_birthday.py)."""
    sim = Simulation(seed=3)
    (a, _), (b, _) = _site(sim, "symmetric", "a"), _site(sim, "symmetric", "b")
    plain = EngineConfig(birthday=BirthdayConfig(enabled=False))
    result = sim.pair(a, b, skew=0.1, config=plain)
    assert (result.outcome, result.fallback, result.path) == ("failed", "relayed", "relayed")
    punch = result.a.engine.config.session.punch_timeout
    for w in (result.a, result.b):
        changes = _changes(w)
        assert changes[:3] == [
            ("starting", "registering"),
            ("registering", "discovering"),
            ("discovering", "waiting_for_peer"),
        ]
        assert ("waiting_for_peer", "punching") in changes
        assert changes[-1] == ("punching", "relayed")
        assert "connected" not in w.states
        assert w.peer_address == ("relay", 1)
    # The controlling side gave up punching after its punch timeout and fell back on its own;
    # B followed it onto the relay (or timed out too): both engines counted a switch.
    a_punching = result.a.first_time("punching")
    a_relayed = result.a.first_time("relayed")
    assert a_punching is not None and a_relayed is not None
    assert a_relayed - a_punching >= punch
    assert result.a.engine.stats["relay_switches"] == 1
    assert result.b.engine.stats["relay_switches"] == 1
    assert sim.rendezvous.stats["relayed"] > 0
    assert sim.rendezvous.stats["relay_refused"] == 0
    _chat(sim, result.a, result.b, "over the relay")
    _chat(sim, result.b, result.a, "and back")
    sim.run_for(120.0)  # keep-alives keep the relayed link up
    assert result.a.state == result.b.state == "relayed"


def test_port_restricted_pair_connects_directly_without_the_relay() -> None:
    sim = Simulation(seed=4)
    (a, _), (b, _) = _site(sim, "port-restricted", "a"), _site(sim, "port-restricted", "b")
    result = sim.pair(a, b, skew=0.1)
    assert (result.outcome, result.fallback, result.path) == ("direct", "", "public")
    assert result.connect_time_s is not None and result.connect_time_s > 0
    for w, other in ((result.a, result.b), (result.b, result.a)):
        assert _changes(w)[-2:] == [("waiting_for_peer", "punching"), ("punching", "connected")]
        assert "relayed" not in w.states
        assert w.peer_address == other.public_address
    assert sim.rendezvous.stats["relayed"] == 0
    _chat(sim, result.a, result.b, "direct")


def test_plaintext_workers_pair_too() -> None:
    sim = Simulation(seed=5)
    (a, _), (b, _) = _site(sim, "full", "a"), _site(sim, "restricted", "b")
    result = sim.pair(a, b, encrypted=False)
    assert result.outcome == "direct"
    assert result.a.engine.identity is None
    _chat(sim, result.b, result.a, "in the clear")


def test_mapping_loss_makes_the_engine_re_punch_and_the_link_comes_back() -> None:
    sim = Simulation(seed=6)
    (a, nat_a), (b, _) = _site(sim, "port-restricted", "a"), _site(sim, "port-restricted", "b")
    result = sim.pair(a, b)
    assert result.outcome == "direct"
    wa, wb = result.a, result.b
    sim.run_for(30.0)
    assert wa.state == wb.state == "connected"
    # A's NAT reboots: every mapping gone, nothing through for 20 s (longer than the peer
    # timeout, so both sessions notice), then it hands out the same ports again (preserving).
    lost_at = sim.now
    nat_a.reboot(downtime=20.0)
    assert nat_a.mappings == []
    assert sim.run_for(
        120.0,
        stop=lambda: all(
            w.first_time("connected", lost_at) is not None and w.state == "connected"
            for w in (wa, wb)
        ),
    )
    assert nat_a.stats["dropped_down"] > 0
    for w in (wa, wb):
        changes = _changes(w, lost_at)
        assert changes[0] == ("connected", "lost"), changes
        assert ("lost", "punching") in changes
        assert changes[-1] == ("punching", "connected")
        assert "relayed" not in w.states  # a re-punch never falls back to the relay
        assert w.engine.stats["offers"] == 1  # the engine re-punched; nobody re-paired it
        back = w.first_time("connected", lost_at)
        assert back is not None and back >= lost_at + 20.0
    assert any(isinstance(e, ev.PeerLost) for e in wa.events_of(ev.PeerLost))
    _chat(sim, wa, wb, "back again")


def test_without_repunch_the_same_mapping_loss_ends_the_link() -> None:
    """The contrast: with the engine's re-punch off, the reboot above loses the link for good,
    so the recovery there is the engine's doing, not the network's."""
    sim = Simulation(seed=6)
    (a, nat_a), (b, _) = _site(sim, "port-restricted", "a"), _site(sim, "port-restricted", "b")
    result = sim.pair(a, b, config=EngineConfig(repunch=False))
    assert result.outcome == "direct"
    sim.run_for(30.0)
    nat_a.reboot(downtime=20.0)
    sim.run_for(120.0)
    for w in (result.a, result.b):
        assert _changes(w)[-2:] == [("connected", "lost"), ("lost", "waiting_for_peer")]


def test_peer_leaving_sends_the_other_back_to_waiting_and_it_pairs_again() -> None:
    sim = Simulation(seed=7)
    (a, _), (b, _) = _site(sim, "full", "a"), _site(sim, "port-restricted", "b")
    result = sim.pair(a, b)
    assert result.outcome == "direct"
    wa, wb = result.a, result.b
    left_at = sim.now
    wa.leave(bye=False)  # vanishes: no BYE, only the rendezvous notices
    assert sim.run_for(5.0, stop=lambda: wb.state == "waiting_for_peer")
    assert _changes(wb)[-3:] == [
        ("punching", "connected"),
        ("connected", "lost"),
        ("lost", "waiting_for_peer"),
    ]
    assert wb.first_time("lost", left_at) is not None
    assert wb.engine.stats["peer_disconnected_ignored"] == 0
    assert wb.engine.peer_id is None
    assert wa.state == "stopped"
    # A newcomer in the same room is paired with the waiting worker by the rendezvous.
    c_host, _ = _site(sim, "restricted", "c")
    wc = sim.worker(c_host, room=wb.room)
    assert sim.run_for(30.0, stop=lambda: wb.state == wc.state == "connected")
    assert wb.engine.peer_id == wc.worker_id


def test_peer_leaving_with_bye_ends_in_waiting_too() -> None:
    sim = Simulation(seed=8)
    (a, _), (b, _) = _site(sim, "full", "a"), _site(sim, "full", "b")
    result = sim.pair(a, b)
    wa, wb = result.a, result.b
    left_at = sim.now
    wa.leave()
    assert sim.run_for(5.0, stop=lambda: wb.state == "waiting_for_peer")
    assert _changes(wb, left_at)[-1] == ("lost", "waiting_for_peer")
    assert any(isinstance(e, ev.PeerClosed) for e in wb.events_of(ev.PeerClosed))


def test_without_relay_the_engines_give_up_and_wait() -> None:
    sim = Simulation(seed=9)
    (a, _), (b, _) = _site(sim, "symmetric", "a"), _site(sim, "symmetric", "b")
    result = sim.pair(a, b, relay=False)
    assert (result.outcome, result.fallback, result.path) == ("failed", "", None)
    for w in (result.a, result.b):
        assert _changes(w)[-2:] == [("punching", "lost"), ("lost", "waiting_for_peer")]
        assert "relayed" not in w.states
    assert sim.rendezvous.stats["relayed"] == 0


def test_matrix_fallback_column_comes_from_the_engine() -> None:
    profiles = ["port-restricted", "symmetric"]
    rows = sim_matrix(profiles, same_lan=(), classify=False)
    by_pair = {(r["profile_a"], r["profile_b"]): r for r in rows}
    assert by_pair[("symmetric", "symmetric")]["fallback"] == "relayed"
    assert by_pair[("symmetric", "symmetric")]["outcome"] == "failed"
    assert by_pair[("symmetric", "symmetric")]["a_state"] == "relayed"
    assert by_pair[("port-restricted", "port-restricted")]["fallback"] == ""
    assert by_pair[("port-restricted", "port-restricted")]["outcome"] == "direct"
    for row in rows:
        assert (row["fallback"] == "relayed") == (row["outcome"] == "failed"), row
    no_relay = sim_matrix(["symmetric"], same_lan=(), classify=False, relay=False)
    assert no_relay[0]["fallback"] == "" and no_relay[0]["a_state"] == "waiting_for_peer"


def test_a_rendezvous_that_does_not_relay_leaves_the_engines_waiting() -> None:
    sim = Simulation(seed=10)
    (a, _), (b, _) = _site(sim, "symmetric", "a"), _site(sim, "symmetric", "b")
    sim.rendezvous.relay = False
    result = sim.pair(a, b)
    assert (result.outcome, result.fallback) == ("failed", "")
    for w in (result.a, result.b):
        assert _changes(w)[-2:] == [("punching", "lost"), ("lost", "waiting_for_peer")]
        errors = [e.message for _, e in w.events if isinstance(e, ev.ErrorReported)]
        # Why the pair relays (two hard NATs), then the refusal: once per connection.
        assert errors[-1] == "rendezvous: this rendezvous does not relay"
        assert errors.count(errors[-1]) == 1
        assert [m for m in errors[:-1] if "both NATs map per destination" not in m] == []
    assert sim.rendezvous.stats["relay_refused"] > 2
    assert sim.rendezvous.stats["relayed"] == 0


@pytest.mark.parametrize("use_stun", [True, False])
def test_discovery_over_stun_or_the_observed_address(use_stun: bool) -> None:
    """Without STUN the worker reports the rendezvous-observed IP with its local port, which is
    right behind a port-preserving NAT; with STUN it is what the NAT really mapped."""
    sim = Simulation(seed=11)
    (a, nat_a), (b, nat_b) = _site(sim, "full", "a"), _site(sim, "symmetric", "b")
    wa = sim.worker(a, room="r", use_stun=use_stun)
    wb = sim.worker(b, room="r", use_stun=use_stun)
    assert sim.run_for(5.0, stop=lambda: wb.public_address is not None)
    # Right after discovery the engine holds the reason for the fallback (cleared once linked).
    if use_stun:
        assert wb.engine.error is None
    else:
        assert wb.engine.error is not None and "no STUN" in wb.engine.error
    assert sim.run_for(30.0, stop=lambda: wa.state == wb.state == "connected")
    assert wa.public_address == (nat_a.public_ip, wa.local_address[1])
    assert wb.public_address is not None and wb.public_address[0] == nat_b.public_ip
    if use_stun:  # a random-port NAT: STUN saw the port it really picked
        assert wb.public_address[1] != wb.local_address[1]
    else:  # the guess keeps the local port, which this NAT did not
        assert wb.public_address[1] == wb.local_address[1]
