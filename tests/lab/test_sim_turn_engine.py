"""The simulator drives the engine's TURN path (issue 17): two whole workers behind symmetric
NATs, with a TURN server on the public side, connect through it (not the WebSocket relay) and
chat; the workers' STUN clients leave the TURN server's messages to the engine."""

from __future__ import annotations

from p2plab.core import events as ev
from p2plab.lab.sim import Simulation


def test_symmetric_pair_connects_through_the_simulated_turn_server() -> None:
    sim = Simulation(seed=3)
    sim.add_turn_server()
    a = sim.add_host(behind=sim.add_nat("symmetric"))
    b = sim.add_host(behind=sim.add_nat("symmetric"))
    link = sim.pair(a, b)
    wa, wb = link.a, link.b
    assert wa.state == wb.state == "connected", (wa.states, wb.states)
    assert wa.engine.path == wb.engine.path == "turn-udp"
    assert wa.engine.stats["turn_allocations"] == wb.engine.stats["turn_allocations"] == 1
    wa.send_chat("through the simulated coturn")
    sim.run_for(5)
    got = [e.text for _, e in wb.events if isinstance(e, ev.ChatReceived)]
    assert got == ["through the simulated coturn"]
    sim.run_for(120)  # refreshes and keep-alives keep it up
    assert wa.state == wb.state == "connected"
