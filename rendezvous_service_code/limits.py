"""Rate limits of the rendezvous: token buckets, and the per-source-IP accounting on top of them.

A connection's own limits (messages per second, relayed bytes per second) live in its
:class:`TokenBucket`.  What one client could otherwise multiply by opening many connections is
accounted per source IP (an IPv6 client per /64, which one subscriber usually holds whole) in
:class:`PerIpLimits`: connections held at once, new connections per minute, token failures per
minute and relayed bytes per second, plus one relay budget for the whole instance.

The source IP is the socket's peer, or X-Forwarded-For's last entry behind a trusted proxy
(``trust_forwarded``): without it, behind a proxy, every client shares the proxy's address.
"""

from __future__ import annotations

from p2plab.core.addresses import source_key
from p2plab.core.signaling import MAX_RELAY_BYTES

__all__ = ["IpState", "PerIpLimits", "TokenBucket"]

#: Idle per-IP entries are dropped once the table holds this many (bounded memory whatever the
#: number of sources).
_PRUNE_AT = 4096


class TokenBucket:
    """A token bucket with an abuse score that decays at the same rate."""

    def __init__(self, rate: float, burst: float, abuse_threshold: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.abuse_threshold = abuse_threshold
        self.tokens = burst
        self.abuse = 0.0
        self.last = now
        self.dropped = 0
        self.limited = False  # currently dropping (one error per episode)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.last)
        self.last = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.abuse = max(0.0, self.abuse - elapsed * self.rate)

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many; otherwise count a drop."""
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            self.limited = False
            return True
        self.dropped += 1
        self.abuse += 1.0
        return False

    def can(self, now: float, cost: float = 1.0) -> bool:
        """Whether ``cost`` tokens are there (taking none)."""
        self._refill(now)
        return self.tokens >= cost

    def full(self, now: float) -> bool:
        """Refilled to its burst: forgetting it changes nothing."""
        self._refill(now)
        return self.tokens >= self.burst

    @property
    def abusive(self) -> bool:
        """Sustained flooding: the connection should be closed."""
        return self.abuse > self.abuse_threshold


def _relay_burst(rate: float) -> float:
    """Four seconds of ``rate``, and never less than one datagram (else none would pass)."""
    return max(4.0 * rate, float(MAX_RELAY_BYTES))


class IpState:
    """What one source IP holds and has used."""

    def __init__(
        self,
        connections_per_min: float,
        token_failures_per_min: float,
        relay_bps: float,
        now: float,
    ) -> None:
        self.connections = 0
        self.new_connections = TokenBucket(
            connections_per_min / 60.0, connections_per_min, float("inf"), now
        )
        self.token_failures = TokenBucket(
            token_failures_per_min / 60.0, token_failures_per_min, float("inf"), now
        )
        self.relay = TokenBucket(relay_bps, _relay_burst(relay_bps), float("inf"), now)

    def idle(self, now: float) -> bool:
        return (
            self.connections == 0
            and self.new_connections.full(now)
            and self.token_failures.full(now)
            and self.relay.full(now)
        )


class PerIpLimits:
    """Per-source-IP admission and relay budgets, and the instance's total relay budget."""

    def __init__(
        self,
        *,
        max_connections: int,
        connections_per_min: float,
        token_failures_per_min: float,
        relay_bytes_per_s: float,
        relay_total_bytes_per_s: float,
        now: float,
    ) -> None:
        self.max_connections = max_connections
        self.connections_per_min = connections_per_min
        self.token_failures_per_min = token_failures_per_min
        self.relay_bytes_per_s = relay_bytes_per_s
        self.total_relay = TokenBucket(
            relay_total_bytes_per_s, _relay_burst(relay_total_bytes_per_s), float("inf"), now
        )
        self._ips: dict[str, IpState] = {}

    def __len__(self) -> int:
        return len(self._ips)

    def state(self, ip: str | None, now: float) -> IpState:
        key = source_key(ip)
        st = self._ips.get(key)
        if st is None:
            if len(self._ips) >= _PRUNE_AT:
                self._prune(now)
            st = IpState(
                self.connections_per_min, self.token_failures_per_min, self.relay_bytes_per_s, now
            )
            self._ips[key] = st
        return st

    def _prune(self, now: float) -> None:
        for key in [k for k, st in self._ips.items() if st.idle(now)]:
            del self._ips[key]

    def admit(self, ip: str | None, now: float) -> str | None:
        """Take a connection slot for ``ip``; None if admitted, else the reason it is not.

        Reasons: ``"token_failures"`` (the IP guessed tokens too often lately),
        ``"connections"`` (it holds its cap of concurrent connections) and ``"rate"`` (it
        opened its allowance of new connections this minute).
        """
        st = self.state(ip, now)
        if not st.token_failures.can(now):
            return "token_failures"
        if st.connections >= self.max_connections:
            return "connections"
        if not st.new_connections.allow(now):
            return "rate"
        st.connections += 1
        return None

    def release(self, ip: str | None) -> None:
        """Give back the slot :meth:`admit` took."""
        st = self._ips.get(source_key(ip))
        if st is not None and st.connections > 0:
            st.connections -= 1

    def token_failed(self, ip: str | None, now: float) -> None:
        """Count one refused token for ``ip``."""
        self.state(ip, now).token_failures.allow(now)

    def relay(self, ip: str | None, nbytes: int, now: float) -> str | None:
        """Spend ``nbytes`` of ``ip``'s and the instance's relay budgets; None if both had it,
        else ``"ip"`` or ``"total"`` (nothing is spent then)."""
        st = self.state(ip, now)
        if not st.relay.can(now, nbytes):
            st.relay.dropped += 1
            return "ip"
        if not self.total_relay.allow(now, nbytes):
            return "total"
        st.relay.allow(now, nbytes)
        return None
