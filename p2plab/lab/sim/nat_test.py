"""What a simulated worker learns of its own NAT's port mapping (its :class:`NatHint`), over STUN
on the simulated network, the way the asyncio worker does it (issue 16).

Two steps, one after the other on the sim clock (never in parallel: on a sequential NAT every new
mapping takes the next port, and the punching socket's mappings must be the last ones made before
punching, so that the predicted ports are the ones its next mappings get):

1. From the *punching* socket, plain (solicited) Bindings to the STUN server's primary address,
   then to its RFC 5780 OTHER-ADDRESS, then to the primary IP on the other port: three mappings,
   one per destination.  All equal: endpoint-independent.  Otherwise the NAT maps per destination,
   and :func:`~p2plab.core.nathint.hint_from_mappings` (with
   :func:`~p2plab.core.portpredict.predict_ports`) says whether it allocates in order.
2. Only when step 1 saw one port everywhere: the "leaky" test on a *separate* socket (it spoils
   that socket's mapping): a Binding to the primary (the reference mapping), a Binding with
   CHANGE-REQUEST (IP and port) whose answer comes back unsolicited from the other address, a short
   wait, then a Binding to the other address.  A NAT that took the unsolicited answer for local
   delivery maps that last packet to a new port: ``remaps_on_clash``.

The pure part (observations -> hint) is :mod:`p2plab.core.nathint`'s; this module only makes the
observations.
"""

from __future__ import annotations

from collections.abc import Callable

from p2plab.core.nathint import hint_from_mappings
from p2plab.core.signaling import NatHint
from p2plab.core.stun import (
    RetransmissionPolicy,
    StunTransaction,
    TransactionState,
)
from p2plab.lab.sim.stun_client import SimStunClient, is_stun
from p2plab.lab.simnet import Address, Host, Scheduler

__all__ = ["CLASH_WAIT_S", "NatHintProbe"]

#: How long the leaky test waits for the unsolicited CHANGE-REQUEST answer to reach the NAT
#: before it sends to that answer's source (a few path delays of the simulated network).
CLASH_WAIT_S = 0.2

#: The change-request Binding is sent once and never retried: behind a filtering NAT its answer
#: never arrives, and only its arrival at the NAT matters.
_ONE_SHOT = RetransmissionPolicy(rto=0.05, rc=1, rm=1)

OnDone = Callable[[Address | None, NatHint | None], None]


def _mapped(tx: StunTransaction) -> Address | None:
    if tx.state is not TransactionState.SUCCEEDED or tx.response is None:
        return None
    mapped = tx.response.attributes.get("XOR-MAPPED-ADDRESS")
    return None if mapped is None else (str(mapped[0]), int(mapped[1]))


class NatHintProbe:
    """The two steps above, run once; ``on_done(public, hint)`` gets the punching socket's mapping
    towards the primary server (None if STUN failed) and the hint (None if it could not test)."""

    def __init__(
        self,
        clock: Scheduler,
        host: Host,
        client: SimStunClient,
        server: Address,
        on_done: OnDone,
        *,
        port_range: tuple[int, int] = (1024, 65535),
    ) -> None:
        self.clock = clock
        self.host = host
        self.client = client
        self.server = server
        self.on_done = on_done
        self.port_range = port_range
        #: The punching socket's mappings, in the order the Bindings were sent.
        self.mappings: list[Address] = []
        self.clash_reference: Address | None = None
        self.clash_mapping: Address | None = None
        self._targets: list[Address] = []
        self._side: SimStunClient | None = None

    def start(self) -> None:
        self.client.request(self.server, on_done=self._first_done)

    # -- step 1: the punching socket ----------------------------------------------------------

    def _first_done(self, tx: StunTransaction) -> None:
        public = _mapped(tx)
        if public is None:
            self.on_done(None, None)
            return
        self.mappings.append(public)
        other = tx.response.attributes.get("OTHER-ADDRESS") if tx.response else None
        if other is not None:
            other_ip, other_port = str(other[0]), int(other[1])
            self._targets = [(other_ip, other_port), (self.server[0], other_port)]
        self._next_mapping()

    def _next_mapping(self) -> None:
        if self._targets:
            self.client.request(self._targets.pop(0), on_done=self._mapping_done)
            return
        if len(self.mappings) >= 2 and len(set(self.mappings)) == 1:
            self._start_clash_test()
        else:
            self._finish()

    def _mapping_done(self, tx: StunTransaction) -> None:
        mapped = _mapped(tx)
        if mapped is not None:
            self.mappings.append(mapped)
        self._next_mapping()

    # -- step 2: the leaky test on a socket of its own ----------------------------------------

    def _start_clash_test(self) -> None:
        sock = self.host.bind(0, self.client.socket.address[0])
        side = SimStunClient(self.clock, self.client.rng, sock)
        self._side = side

        def on_datagram(data: bytes, addr: Address) -> None:
            if is_stun(data):
                side.receive(data, addr)

        sock.on_datagram = on_datagram
        side.request(self.server, on_done=self._reference_done)

    def _reference_done(self, tx: StunTransaction) -> None:
        self.clash_reference = _mapped(tx)
        side = self._side
        other = tx.response.attributes.get("OTHER-ADDRESS") if tx.response else None
        if side is None or self.clash_reference is None or other is None:
            self._finish()
            return
        alternate = (str(other[0]), int(other[1]))
        side.request(self.server, change_ip=True, change_port=True, policy=_ONE_SHOT)
        self.clock.call_later(CLASH_WAIT_S, self._send_to_alternate, alternate)

    def _send_to_alternate(self, alternate: Address) -> None:
        if self._side is None:
            return
        self._side.request(alternate, on_done=self._clash_done)

    def _clash_done(self, tx: StunTransaction) -> None:
        self.clash_mapping = _mapped(tx)
        self._finish()

    def _finish(self) -> None:
        if self._side is not None:
            self._side.socket.close()
            self._side = None
        hint = hint_from_mappings(
            self.mappings,
            clash_reference=self.clash_reference,
            clash_mapping=self.clash_mapping,
            port_range=self.port_range,
        )
        self.on_done(self.mappings[0] if self.mappings else None, hint)
