"""The STUN client half of a simulated socket: the core's :class:`StunTransaction` on the sim clock.

Shared by :class:`~p2plab.lab.sim.peer.SimPeer` (probing, punching) and
:class:`~p2plab.lab.sim.worker.SimWorker` (a worker's endpoint discovery), so both run the very
transaction code the workers run, with its retransmissions as sim timers.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from p2plab.core.stun import (
    RetransmissionPolicy,
    StunTransaction,
    make_binding_request,
    parse_message,
)
from p2plab.errors import P2PLabError
from p2plab.lab.simnet import Address, Scheduler, SimSocket, TimerHandle

__all__ = ["SIM_STUN_POLICY", "SimStunClient", "is_stun"]

#: Retransmissions for the simulator: fast, a handful of tries (virtual time is free).
SIM_STUN_POLICY = RetransmissionPolicy(rto=0.25, rc=3, rm=4)

OnDone = Callable[[StunTransaction], None]


def is_stun(data: bytes) -> bool:
    """Whether ``data`` looks like a STUN message (RFC 5389 section 6: magic cookie, top bits 0)."""
    return len(data) >= 20 and data[0] < 4 and data[4:8] == b"\x21\x12\xa4\x42"


class SimStunClient:
    """Binding transactions on one simulated socket; the owner hands it every STUN datagram."""

    def __init__(self, clock: Scheduler, rng: random.Random, sock: SimSocket) -> None:
        self.clock = clock
        self.rng = rng
        self.socket = sock
        self.stats: Counter[str] = Counter()
        #: Where the response of each answered transaction came from, by transaction id (the
        #: RFC 5780 filtering tests check that an answer came from the address asked for).
        self.sources: dict[bytes, Address] = {}
        self._pending: dict[bytes, tuple[StunTransaction, list[TimerHandle], OnDone | None]] = {}

    def request(
        self,
        server: Address,
        *,
        change_ip: bool = False,
        change_port: bool = False,
        policy: RetransmissionPolicy | None = None,
        on_done: OnDone | None = None,
    ) -> StunTransaction:
        """Start a Binding transaction; ``on_done(tx)`` runs once it succeeded or gave up."""
        request = make_binding_request(
            self.rng.randbytes, change_ip=change_ip, change_port=change_port
        )
        tx = StunTransaction(request, server, policy or SIM_STUN_POLICY)
        handles: list[TimerHandle] = []
        self._pending[tx.transaction_id] = (tx, handles, on_done)
        tx.start(self.clock.now)
        self._pump(tx)
        return tx

    def waiting_for(self, data: bytes) -> bool:
        """Whether ``data`` (a STUN message) answers one of this client's transactions; the
        rest (a TURN server's answers to the engine's TURN client) is the engine's."""
        return len(data) >= 20 and bytes(data[8:20]) in self._pending

    def receive(self, data: bytes, addr: Address | None = None) -> None:
        """A STUN datagram arrived on the socket (junk and strays are counted, never raised)."""
        try:
            msg = parse_message(data)
        except P2PLabError:
            self.stats["stun_malformed"] += 1
            return
        entry = self._pending.get(msg.transaction_id)
        if entry is None or not entry[0].receive(msg, self.clock.now):
            self.stats["stun_unmatched"] += 1
            return
        if addr is not None:
            self.sources[msg.transaction_id] = addr
        self._finish(entry[0])

    def _pump(self, tx: StunTransaction) -> None:
        for data, addr in tx.datagrams_to_send(self.clock.now):
            self.socket.sendto(data, addr)
        when = tx.get_timer()
        if tx.done:
            self._finish(tx)
        elif when is not None:
            self._pending[tx.transaction_id][1].append(self.clock.call_at(when, self._timer, tx))

    def _timer(self, tx: StunTransaction) -> None:
        if tx.transaction_id not in self._pending:
            return
        tx.handle_timer(self.clock.now)
        self._pump(tx)

    def _finish(self, tx: StunTransaction) -> None:
        entry = self._pending.pop(tx.transaction_id, None)
        if entry is None:
            return
        for handle in entry[1]:
            handle.cancel()
        if entry[2] is not None:
            entry[2](tx)
