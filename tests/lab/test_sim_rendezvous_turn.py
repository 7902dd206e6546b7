"""The simulated rendezvous, issue 17: offers carry TURN credentials for their own worker (which
the simulated TURN server takes), and ``candidates`` pass to the current peer only, after
register, rate-bounded, as with the service."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from p2plab.core.signaling import (
    CandidatesOut,
    RelayCandidate,
    UpdateUdpEndpoint,
    dump_message,
    parse_rendezvous_message,
)
from p2plab.core.turn import Allocated, AllocationFailed, TurnClient
from p2plab.errors import ConfigError
from p2plab.lab.sim.rendezvous import SimRendezvous
from p2plab.lab.sim.turn_model import TurnServerModel
from p2plab.lab.simnet import Scheduler
from rendezvous_service_code.trickle import CANDIDATES_PER_MIN

TURN = ("203.0.113.30", 3478)
SECRET = "sim-secret"


class Client:
    """A scripted plaintext worker on the simulated rendezvous."""

    def __init__(self, rv: SimRendezvous, worker_id: str) -> None:
        self.rv = rv
        self.worker_id = worker_id
        self.received: list[dict[str, Any]] = []
        self.conn_id = rv.connect(self, observed_ip="198.51.100.1")

    def rendezvous_connected(self) -> None:
        pass

    def rendezvous_message(self, text: str) -> None:
        parse_rendezvous_message(text)  # what a worker accepts
        self.received.append(json.loads(text))

    def rendezvous_closed(self) -> None:
        pass

    def send(self, obj: Any) -> None:
        self.rv.send(self.conn_id, obj if isinstance(obj, str) else dump_message(obj))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["type"] == kind]

    def join(self, port: int) -> None:
        self.send(json.dumps({"type": "register"}))
        self.send(UpdateUdpEndpoint(udp_ip="198.51.100.1", udp_port=port))


def cands(to: str, port: int = 50000) -> CandidatesOut:
    return CandidatesOut(to=to, candidates=[RelayCandidate(ip=TURN[0], port=port)])


def world(**kw: Any) -> tuple[Scheduler, SimRendezvous, Client, Client]:
    clock = Scheduler()
    rv = SimRendezvous(clock, **kw)
    a, b = Client(rv, "a"), Client(rv, "b")
    clock.run_until(1.0)
    a.join(1)
    b.join(2)
    clock.run_until(2.0)
    return clock, rv, a, b


def test_offers_carry_credentials_the_simulated_turn_server_takes() -> None:
    url = f"turn:{TURN[0]}:{TURN[1]}?transport=udp"
    clock, rv, a, b = world(turn_urls=[url], turn_secret=SECRET, turn_ttl_s=120)
    [offer_a], [offer_b] = a.of_type("p2p_connection_offer"), b.of_type("p2p_connection_offer")
    assert offer_a["turn"]["urls"] == [url] and offer_a["turn"]["username"].endswith(":a")
    assert offer_b["turn"]["username"].endswith(":b")
    assert rv.stats["turn_credentials"] == 2
    turn = offer_a["turn"]
    # the model checks them: good now, refused once their expiry (sim clock) has passed
    for now, expected in ((clock.now, Allocated), (clock.now + 200, AllocationFailed)):
        model = TurnServerModel(TURN, SECRET, rand_bytes=random.Random(1).randbytes)
        client = TurnClient(
            TURN, turn["username"], turn["password"], rand_bytes=random.Random(2).randbytes
        )
        client.allocate(now)
        for _ in range(3):
            for data, _addr in client.datagrams_to_send(now):
                for out in model.receive(data, ("198.51.100.1", 1), now):
                    client.receive(out.data, TURN, now)
        event = client.next_event()
        assert isinstance(event, expected), event


def test_no_turn_no_credentials_and_half_a_configuration_is_refused() -> None:
    _clock, _rv, a, _b = world()
    assert a.of_type("p2p_connection_offer")[0].get("turn") is None
    with pytest.raises(ConfigError):
        SimRendezvous(Scheduler(), turn_urls=["turn:192.0.2.1"])


def test_candidates_go_to_the_peer_only() -> None:
    clock, rv, a, b = world()
    c = Client(rv, "c")
    clock.run_until(3.0)
    c.send(cands("a"))  # before register
    c.join(3)
    a.send(cands("b"))
    a.send(cands("c"))  # not its peer
    a.send(cands("c"))  # refused again, answered no more
    clock.run_until(4.0)
    assert b.of_type("candidates") == [
        {
            "type": "candidates",
            "from": "a",
            "candidates": [{"ip": TURN[0], "port": 50000, "transport": "udp"}],
        }
    ]
    assert [e["code"] for e in a.of_type("error")] == ["candidates_refused"]
    assert [e["code"] for e in c.of_type("error")] == ["bad_message"]
    assert c.of_type("candidates") == []
    assert rv.stats["candidates_forwarded"] == 1 and rv.stats["candidates_refused"] == 3


def test_candidates_are_rate_bounded_on_the_sim_clock() -> None:
    clock, rv, a, b = world()
    for i in range(CANDIDATES_PER_MIN + 2):
        a.send(cands("b", 50000 + i))
    clock.run_until(3.0)
    assert len(b.of_type("candidates")) == CANDIDATES_PER_MIN
    assert [e["code"] for e in a.of_type("error")] == ["candidates_rate_limited"]
    assert rv.stats["candidates_rate_limited"] == 2
    clock.run_until(3.0 + 60.0 / CANDIDATES_PER_MIN)  # one more token
    a.send(cands("b", 60000))
    clock.run_until(clock.now + 1.0)
    assert b.of_type("candidates")[-1]["candidates"][0]["port"] == 60000
