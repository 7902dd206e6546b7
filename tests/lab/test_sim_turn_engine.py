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
    # As a matrix row: punching failed, the fallback (chat checked) is TURN over UDP.
    assert (link.outcome, link.fallback, link.path) == ("failed", "turn-udp", "turn-udp")
    assert link.method == "relay"
    assert wa.engine.path == wb.engine.path == "turn-udp"
    assert wa.engine.stats["turn_allocations"] == wb.engine.stats["turn_allocations"] == 1
    wa.send_chat("through the simulated coturn")
    sim.run_for(5)
    got = [e.text for _, e in wb.events if isinstance(e, ev.ChatReceived)]
    assert got[1:] == ["through the simulated coturn"]  # after the pair's own chat check
    sim.run_for(120)  # refreshes and keep-alives keep it up
    assert wa.state == wb.state == "connected"


def test_upgrade_and_downgrade_in_the_simulator() -> None:
    """UDP between the two sites blocked: the pair starts on TURN, goes direct within 30 s of
    unblocking (issue 17 item 5) and back to TURN when blocked again, without losing the peer;
    chat sent all along arrives exactly once and in order."""
    sim = Simulation(seed=4)
    sim.add_turn_server()
    na, nb = sim.add_nat("port-restricted"), sim.add_nat("port-restricted")
    a, b = sim.add_host(behind=na), sim.add_host(behind=nb)
    sites = {na.public_ip, nb.public_ip}
    blocked = [True]
    route = sim.net.route

    def filtered(src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        if blocked[0] and {src[0], dst[0]} == sites:
            return
        route(src, dst, data)

    sim.net.route = filtered  # type: ignore[method-assign]
    link = sim.pair(a, b, check_relay_chat=False)
    wa, wb = link.a, link.b
    assert wa.engine.path == wb.engine.path == "turn-udp"
    sent: list[str] = []

    def talk(seconds: float, until: object = None) -> None:
        end = sim.now + seconds
        while sim.now < end:
            text = f"m{len(sent)}"
            wa.send_chat(text)
            sent.append(text)
            sim.run_for(0.5)
            if until is not None and until():  # type: ignore[operator]
                return

    talk(5)
    blocked[0] = False
    t0 = sim.now
    talk(60, until=lambda: wa.engine.path == wb.engine.path == "direct")
    assert wa.engine.path == wb.engine.path == "direct"
    assert sim.now - t0 < 30
    talk(5)
    blocked[0] = True
    talk(30, until=lambda: wa.engine.path == wb.engine.path == "turn-udp")
    assert wa.engine.path == wb.engine.path == "turn-udp"
    talk(20)
    sim.run_for(10)
    assert wa.state == wb.state == "connected"
    assert wb.chats_received == sent
    moves = [(e.previous_path, e.path) for e in wa.events_of(ev.PathChanged)]  # type: ignore[attr-defined]
    assert moves == [("turn-udp", "direct"), ("direct", "turn-udp")]
