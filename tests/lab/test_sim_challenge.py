"""The simulated rendezvous asks for the same proof of key possession as the service (issue 14):
a register that carries someone else's public key, without its private key, is closed and
counted, and registers nothing; the honest workers around it pair as before.  Workers' ``error``
messages are counted there and never answered, as by the service."""

from __future__ import annotations

import base64
import json

from p2plab.core.signaling import Register, dump_message, parse_rendezvous_message
from p2plab.lab.sim import Simulation


class Impostor:
    """A rendezvous client that answers the challenge with a victim's key and a made-up proof."""

    def __init__(self, worker_id: str, victim_key: str) -> None:
        self.worker_id = worker_id
        self.victim_key = victim_key
        self.conn_id: str | None = None
        self.closed = False
        self.sim: Simulation | None = None
        self.received: list[str] = []

    def rendezvous_connected(self) -> None:
        pass

    def rendezvous_message(self, text: str) -> None:
        self.received.append(parse_rendezvous_message(text).type)
        if self.received[-1] == "challenge":
            assert self.sim is not None and self.conn_id is not None
            fake = base64.b64encode(bytes(32)).decode()
            reg = Register(public_key=self.victim_key, proof=fake)
            self.sim.rendezvous.send(self.conn_id, dump_message(reg))

    def rendezvous_closed(self) -> None:
        self.closed = True


def test_a_register_without_a_valid_proof_is_closed_and_registers_nothing() -> None:
    sim = Simulation(seed=7)
    a = sim.worker(sim.add_host(name="a"))
    sim.run_for(1.0)
    assert a.state == "waiting_for_peer"
    assert a.engine.identity is not None and a.engine.stats["challenges"] == 1
    mallory = Impostor(a.worker_id, a.engine.identity.public_b64)  # a's id and a's key
    mallory.sim = sim
    mallory.conn_id = sim.rendezvous.connect(mallory, observed_ip="203.0.113.9")
    sim.run_for(1.0)
    assert mallory.closed and mallory.received == ["challenge"]
    assert sim.rendezvous.stats["refused_proof"] == 1
    assert a.state == "waiting_for_peer"  # a's registration was not taken over
    b = sim.worker(sim.add_host(name="b"))
    sim.run_for(5.0)
    assert a.state == b.state == "connected" and a.engine.peer_id == b.worker_id


def test_plaintext_workers_register_without_proof_in_the_simulator() -> None:
    sim = Simulation(seed=8)
    a = sim.worker(sim.add_host(name="a"), encrypted=False)
    b = sim.worker(sim.add_host(name="b"), encrypted=False)
    sim.run_for(5.0)
    assert a.state == b.state == "connected" and sim.rendezvous.stats["refused_proof"] == 0


def test_simulated_workers_answer_refusals_and_junk_and_the_rendezvous_counts_them() -> None:
    # Issue 14 item 8, in the simulator: a refused offer is answered with ``offer_refused``
    # (here one naming the worker itself), junk with one ``bad_message`` per kind per second;
    # the rendezvous counts them and answers none.
    sim = Simulation(seed=9)
    a = sim.worker(sim.add_host(name="a"))
    sim.run_for(1.0)
    assert a.state == "waiting_for_peer" and a.engine.identity is not None
    offer = {
        "type": "p2p_connection_offer",
        "peer_worker_id": a.worker_id,
        "peer_udp_ip": "198.51.100.7",
        "peer_udp_port": 9,
        "role": "controlling",
        "peer_public_key": a.engine.identity.public_b64,
    }
    a.rendezvous_message(json.dumps(offer))
    sim.run_for(0.5)
    assert a.engine.stats["offers_refused"] == 1
    assert sim.rendezvous.stats["worker_errors"] == 1
    bad_before = sim.rendezvous.stats["bad_messages"]
    for _ in range(100):
        a.rendezvous_message("not json")
    sim.run_for(0.5)
    assert a.stats["rendezvous_bad_messages"] == 100 and a.stats["rendezvous_errors_sent"] == 1
    assert sim.rendezvous.stats["worker_errors"] == 2
    assert sim.rendezvous.stats["bad_messages"] == bad_before  # an error is not junk to it
    assert a.state == "waiting_for_peer"
    b = sim.worker(sim.add_host(name="b"))
    sim.run_for(5.0)
    assert a.state == b.state == "connected"
