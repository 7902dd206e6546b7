"""Token buckets keyed by source, in a bounded table: the one rate limit of the core.

Used where a remote party could make us work or send: the STUN responder (answers per source
IP), the peer session (new peer sessions per source host) and the link engine (relayed payloads
tried in a fresh session).  Sans-I/O: every call takes the driver's monotonic ``now``.
"""

from __future__ import annotations

from collections import OrderedDict

from p2plab.errors import LocalProtocolError

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``burst`` events at once per key, then ``rate`` per second.

    Only ``max_keys`` buckets are kept; the least recently used goes first (counted in
    :attr:`forgotten`), so a key that comes back after eviction starts with a full bucket:
    bounded memory beats perfect memory, and whoever can use that many keys could use that many
    budgets anyway.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 1) -> None:
        if not rate > 0 or not burst >= 1 or max_keys < 1:
            raise LocalProtocolError(
                f"a rate limit needs rate > 0, burst >= 1 and max_keys >= 1, got "
                f"{rate}, {burst}, {max_keys}"
            )
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.forgotten = 0
        """Buckets dropped to make room (the table was full)."""
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, updated at

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str = "", now: float = 0.0) -> bool:
        """Take one token from ``key``'s bucket at ``now``; False (nothing taken) when empty."""
        entry = self._buckets.pop(key, None)
        if entry is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
                self.forgotten += 1
            tokens = self.burst
        else:
            tokens, then = entry
            # max(): a clock that steps back must not take tokens away.
            tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)  # re-inserted: most recently used last
        return allowed
