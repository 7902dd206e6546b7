"""Benchmark datagrams over the engine's paths (TURN, the rendezvous relay), sans-I/O (issue 17;
a base of :class:`~p2plab.core.link.LinkEngine`).

On the direct path (and towards a peer's relayed address, a real UDP address) the benchmark's
data path uses the link socket itself (:mod:`p2plab.aio.bench`), bypassing the engine.  The
other paths exist only inside the engine, so it carries benchmark datagrams (types
0x20..0x2F, :data:`~p2plab.core.wire.BENCH_TYPES`; sealed by the benchmark layer like on the
direct path) both ways:

* out: :meth:`LinkBench.send_bench` takes datagrams addressed to a TURN pseudo-address
  (:func:`~p2plab.core.paths.turn_address`: wrapped as ChannelData through our allocation, out
  by ``datagrams_to_send`` or ``SendTurnTcp``, one ``SendTurnTcp`` per batch) or to the relay
  (:data:`~p2plab.core.link_commands.RELAY`: one ``RelayDatagram`` each; the rendezvous's byte
  budget drops what exceeds it, so the benchmark layer paces below it);
* in: a benchmark datagram that arrives through our allocation (``PeerData`` from a permitted
  peer) or through the relay from the current peer is not the session's business (it would drop
  it as ``bench_ignored``): it is queued for the driver, :meth:`LinkBench.take_bench_datagrams`,
  with the same pseudo-address the session would see it from.  The queue is bounded (a driver
  that does not drain loses the oldest-arriving excess, counted in ``bench_dropped``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from p2plab.core import events as ev
from p2plab.core.crypto import Identity
from p2plab.core.link_commands import RELAY, LinkConfig, RelayDatagram, SendTurnTcp
from p2plab.core.link_turn import LinkTurn
from p2plab.core.paths import parse_turn_address, turn_address, turn_path
from p2plab.core.turn import PeerData, TurnClient, TurnState
from p2plab.core.wire import BENCH_TYPES

__all__ = ["MAX_BENCH_QUEUE", "LinkBench", "is_bench_datagram"]

Address = ev.Address

#: Benchmark datagrams held for the driver at most (a driver drains after every input).
MAX_BENCH_QUEUE = 4096


def is_bench_datagram(data: bytes) -> bool:
    """Whether ``data`` is a p2p datagram of a benchmark type (0x20..0x2F)."""
    return len(data) >= 4 and data[0] == 0xD7 and data[1] == 0x50 and data[3] in BENCH_TYPES


class LinkBench(LinkTurn):
    """The benchmark datagrams' way through the engine (see the module docstring)."""

    def __init__(
        self,
        worker_id: str,
        *,
        config: LinkConfig | None,
        identity: Identity | None,
        rand_bytes: Callable[[int], bytes],
        wall_ns: Callable[[], int] | None,
    ) -> None:
        super().__init__(
            worker_id, config=config, identity=identity, rand_bytes=rand_bytes, wall_ns=wall_ns
        )
        self._bench_in: list[tuple[bytes, Address]] = []

    @property
    def bench_pending(self) -> bool:
        """Whether :meth:`take_bench_datagrams` has datagrams for the driver."""
        return bool(self._bench_in)

    def take_bench_datagrams(self) -> list[tuple[bytes, Address]]:
        """Benchmark datagrams that came through TURN or the relay, with their (pseudo-)source
        address, oldest first; the queue is emptied."""
        out, self._bench_in = self._bench_in, []
        return out

    def send_bench(self, datagrams: Sequence[bytes], addr: Address, now: float) -> int:
        """Send benchmark datagrams to the peer at the pseudo-address ``addr`` (a TURN path of
        our allocation, or :data:`RELAY`); returns how many were taken (0: no such path now).
        The driver then sends what ``datagrams_to_send`` and ``next_command`` give."""
        s = self.session
        if s is None or self.peer_id is None:
            self.stats["bench_dropped"] += len(datagrams)
            return 0
        if addr == RELAY:
            if not self.relayed and s.candidate_kind(RELAY) is None:
                self.stats["bench_dropped"] += len(datagrams)
                return 0
            for data in datagrams:
                self._commands.append(RelayDatagram(self.peer_id, bytes(data)))
            self.stats["bench_out"] += len(datagrams)
            return len(datagrams)
        parsed = parse_turn_address(addr)
        t = self.turn
        if parsed is None or t is None or t.state is not TurnState.ALLOCATED:
            self.stats["bench_dropped"] += len(datagrams)
            return 0
        if parsed[0] != turn_path(t.transport):
            self.stats["bench_dropped"] += len(datagrams)  # the allocation changed transport
            return 0
        for data in datagrams:
            self._turn_send(parsed[1], bytes(data), now)
        self._bench_flush(t, now)
        self.stats["bench_out"] += len(datagrams)
        return len(datagrams)

    def bench_channel_data(self, data: bytes, addr: Address) -> bool:
        """Take a benchmark datagram inside ChannelData from our TURN server (over UDP, on a
        channel we bound) straight into the queue of :meth:`take_bench_datagrams`, without the
        engine's and the client's per-datagram work (the receive path of a run through our
        allocation: a few thousand datagrams/s that way, the limit of such a run); False for
        anything else, which then takes the usual way (``receive_datagram``)."""
        t = self.turn
        if (
            t is None
            or len(data) < 8
            or data[0] >> 6 != 1
            or data[4] != 0xD7
            or data[5] != 0x50
            or data[7] not in BENCH_TYPES
            or t.transport != "udp"
            or addr != t.server
            or self.session is None
        ):
            return False
        length = (data[2] << 8) | data[3]
        peer = t.channel_peer((data[0] << 8) | data[1])
        if peer is None or 4 + length > len(data):
            return False
        self.stats["turn_data_in"] += 1
        self._bench_queue(data[4 : 4 + length], turn_address(peer, t.transport))
        return True

    def _bench_flush(self, t: TurnClient, now: float) -> None:
        """The client's output at once; over TCP as one stream write (a batch, not one command
        per datagram)."""
        if t.transport != "tcp":
            self._turn_output(t, now)
            return
        chunks = [data for data, _ in t.datagrams_to_send(now)]
        if chunks:
            self._commands.append(SendTurnTcp(b"".join(chunks)))

    def _bench_queue(self, data: bytes, addr: Address) -> None:
        if len(self._bench_in) >= MAX_BENCH_QUEUE:
            self.stats["bench_dropped"] += 1
            return
        self.stats["bench_in"] += 1
        self._bench_in.append((data, addr))

    def _turn_peer_data(self, t: TurnClient, event: PeerData, now: float) -> bool:
        if not is_bench_datagram(event.data):
            return super()._turn_peer_data(t, event, now)
        known = event.peer[0] in self._peer_ips or t.bound_channel(event.peer) is not None
        if self.session is None or not known:
            self.stats["turn_dropped"] += 1
            return False
        self.stats["turn_data_in"] += 1
        self._bench_queue(event.data, turn_address(event.peer, t.transport))
        return False
