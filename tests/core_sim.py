"""An in-memory network for sans-I/O peer sessions: fake clock, loss, reordering, duplication.

Seeded, so a failure replays exactly.  Each node has a local address and optionally a public
(NAT) address: what it sends appears to come from the public address, and datagrams to either
address reach it.  A ``drop`` hook can cut links (per direction) at any time.

No sleeps and no real time: :meth:`Network.run_until` jumps the clock from one due thing (a
delivery or a session timer) to the next.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.session import PeerSession

Address = tuple[str, int]


@dataclass
class Node:
    name: str
    session: PeerSession
    local: Address
    public: Address | None = None
    events: list[ev.Event] = field(default_factory=list)
    sent: list[tuple[float, bytes, Address]] = field(default_factory=list)
    received: list[tuple[float, bytes, Address]] = field(default_factory=list)

    @property
    def source(self) -> Address:
        """The address the node's datagrams appear to come from."""
        return self.public or self.local

    def of_type(self, cls: type[ev.Event]) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, cls)]


class Network:
    """Deliver datagrams between sessions with a seeded lossy, reordering, duplicating link."""

    def __init__(
        self,
        seed: int = 0,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        latency: float = 0.01,
        jitter: float = 0.0,
        start: float = 1000.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.latency = latency
        self.jitter = jitter
        self.now = start
        self.nodes: dict[str, Node] = {}
        self._by_addr: dict[Address, Node] = {}
        self._queue: list[tuple[float, int, Node, bytes, Address]] = []
        self._counter = itertools.count()
        self.drop: Callable[[Node, Address, bytes], bool] | None = None
        """Return True to drop a datagram (sender node, destination, data): cut links."""
        self.on_event: Callable[[Node, ev.Event], None] | None = None
        self.undeliverable = 0
        self.lost = 0

    def rand_bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def add(
        self,
        name: str,
        *,
        local_id: str,
        peer_id: str,
        role: str,
        local: Address,
        candidates: list[Address],
        public: Address | None = None,
        config: SessionConfig | None = None,
    ) -> Node:
        session = PeerSession(
            local_id=local_id,
            peer_id=peer_id,
            role=role,  # type: ignore[arg-type]
            candidates=candidates,
            config=config or SessionConfig(),
            now=self.now,
            rand_bytes=self.rand_bytes,
        )
        node = Node(name, session, local, public)
        self.nodes[name] = node
        self._by_addr[local] = node
        if public is not None:
            self._by_addr[public] = node
        return node

    def inject(self, node: Node, data: bytes, source: Address) -> None:
        """Deliver ``data`` to ``node`` right now, as if from ``source``."""
        node.received.append((self.now, data, source))
        node.session.receive_datagram(data, source, self.now)
        self.flush()

    # -- the loop --------------------------------------------------------------------------------

    def _transmit(self, node: Node, data: bytes, dest: Address) -> None:
        node.sent.append((self.now, data, dest))
        if self.drop is not None and self.drop(node, dest, data):
            self.lost += 1
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < self.loss:
                self.lost += 1
                continue
            delay = self.latency + self.rng.random() * self.jitter
            heapq.heappush(self._queue, (self.now + delay, next(self._counter), node, data, dest))

    def flush(self) -> None:
        """Collect every node's outgoing datagrams and events."""
        for node in list(self.nodes.values()):
            for data, dest in node.session.datagrams_to_send(self.now):
                self._transmit(node, data, dest)
            while (event := node.session.next_event()) is not None:
                node.events.append(event)
                if self.on_event is not None:
                    self.on_event(node, event)
        # an on_event hook may have queued sends
        for node in self.nodes.values():
            for data, dest in node.session.datagrams_to_send(self.now):
                self._transmit(node, data, dest)

    def step(self, limit: float = float("inf")) -> bool:
        """Advance to the next due thing, but not past ``limit``; False when nothing is due."""
        self.flush()
        timers = [(t, n) for n in self.nodes.values() if (t := n.session.get_timer()) is not None]
        next_delivery = self._queue[0][0] if self._queue else None
        candidates = [t for t, _ in timers]
        if next_delivery is not None:
            candidates.append(next_delivery)
        if not candidates or min(candidates) > limit:
            if limit != float("inf"):
                self.now = max(self.now, limit)  # time passes up to the limit
            return False
        self.now = max(self.now, min(candidates))
        while self._queue and self._queue[0][0] <= self.now:
            _, _, sender, data, dest = heapq.heappop(self._queue)
            target = self._by_addr.get(dest)
            if target is None:
                self.undeliverable += 1
                continue
            target.received.append((self.now, data, sender.source))
            target.session.receive_datagram(data, sender.source, self.now)
        for t, node in timers:
            if t <= self.now:
                node.session.handle_timer(self.now)
        self.flush()
        return True

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Run until ``predicate()`` holds or ``timeout`` simulated seconds pass."""
        deadline = self.now + timeout
        stuck = 0
        while not predicate():
            before = self.now
            if not self.step(deadline):
                return predicate()
            stuck = stuck + 1 if self.now == before else 0
            if stuck > 100_000:
                raise AssertionError(f"simulation stuck at t={self.now}")
        return True

    def run_for(self, duration: float) -> None:
        """Run ``duration`` simulated seconds."""
        self.run_until(lambda: False, duration)


def pair(
    net: Network,
    *,
    config: SessionConfig | None = None,
    a_public: Address | None = None,
    b_public: Address | None = None,
    a_announced: Address | None = None,
    b_announced: Address | None = None,
) -> tuple[Node, Node]:
    """Two nodes ``a`` (controlling) and ``b`` (controlled) that know each other's candidates.

    ``*_announced`` is what the rendezvous tells the other side (defaults to the real address).
    """
    a_local = ("198.18.0.1", 40000)
    b_local = ("198.18.0.2", 40000)
    a_seen = a_announced or a_public or a_local
    b_seen = b_announced or b_public or b_local
    a = net.add(
        "a",
        local_id="alice",
        peer_id="bob",
        role="controlling",
        local=a_local,
        public=a_public,
        candidates=[b_seen],
        config=config,
    )
    b = net.add(
        "b",
        local_id="bob",
        peer_id="alice",
        role="controlled",
        local=b_local,
        public=b_public,
        candidates=[a_seen],
        config=config,
    )
    return a, b
