"""The network half of the in-process NAT simulator: virtual clock, links, hosts and NAT boxes.

Everything runs on one virtual clock (a heap of timed callbacks); nothing here reads the real
clock, sleeps or opens a socket, and every random choice (loss, random port allocation) comes from
one seeded :class:`random.Random`, so a run is a pure function of its seed.

NAT boxes follow RFC 4787's vocabulary:

* **mapping** (section 4.1): endpoint-independent (one external port per internal endpoint),
  address-dependent (one per internal endpoint and remote IP), address-and-port-dependent (one per
  internal endpoint and remote endpoint);
* **filtering** (section 5): an inbound datagram passes if the mapping has sent to any remote
  (endpoint-independent), to that remote IP (address-dependent) or to that very remote endpoint
  (address-and-port-dependent);
* **port allocation** (section 4.2.1), seedable (``port_seed``) within ``port_range``:
  ``preserve`` (the internal port when free, else a random one: Linux's default MASQUERADE),
  ``preserving`` (the internal port when free, else the next free one: the historical default of
  the existing profiles), ``random`` (every mapping a random port: ``--random-fully``),
  ``sequential`` (the next free port after the last one) and ``sequential-busy`` (sequential, but
  other hosts' traffic takes a random number of ports, ``busy_gap``, between two of ours);
* **mapping timeout** (section 4.3), refreshed by outbound traffic (REQ-6) and optionally inbound;
* **hairpinning** (section 6, REQ-9: the hairpinned datagram carries the sender's external
  address);
* **leaky**: a Linux port-restricted NAT with no input firewall (natlab.md): an unsolicited
  inbound datagram is taken for local delivery and leaves a conntrack entry behind; the host's own
  later datagram to that remote would clash with it, so it leaves by another external port.

The topology is a star: every host has an access link to its NAT (or, for a public host, to the
internet); every NAT has a WAN link to the internet.  Links have delay, loss and a rate with a
drop-tail queue, each direction on its own.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2plab.core.nat import FilteringBehavior, MappingBehavior
from p2plab.errors import ConfigError

__all__ = [
    "ADF",
    "ADM",
    "APDF",
    "APDM",
    "EIF",
    "EIM",
    "PORT_ALLOCATIONS",
    "Address",
    "Host",
    "LinkConfig",
    "Nat",
    "NatBehavior",
    "Network",
    "Scheduler",
    "SimSocket",
    "TimerHandle",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]

PORT_ALLOCATIONS: tuple[str, ...] = (
    "preserving",
    "preserve",
    "random",
    "sequential",
    "sequential-busy",
)

EIM = MappingBehavior.ENDPOINT_INDEPENDENT
ADM = MappingBehavior.ADDRESS_DEPENDENT
APDM = MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
EIF = FilteringBehavior.ENDPOINT_INDEPENDENT
ADF = FilteringBehavior.ADDRESS_DEPENDENT
APDF = FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT

# Linux keeps an unreplied UDP conntrack entry for 30 s (nf_conntrack_udp_timeout).
_LOCAL_CONNTRACK_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------------
# virtual clock


class TimerHandle:
    """A scheduled callback; :meth:`cancel` stops it from running."""

    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback."""
        self.cancelled = True


class Scheduler:
    """A heap of timed callbacks on a virtual clock that starts at 0."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = 0
        #: Callbacks run so far.
        self.steps = 0

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` at virtual time ``when`` (never in the past)."""
        handle = TimerHandle(max(when, self.now), callback, args)
        self._seq += 1
        heapq.heappush(self._heap, (handle.when, self._seq, handle))
        return handle

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` ``delay`` seconds from now."""
        return self.call_at(self.now + delay, callback, *args)

    def next_time(self) -> float | None:
        """When the next live callback is due, or None."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def step(self) -> bool:
        """Run the next live callback; False if there is none."""
        if self.next_time() is None:
            return False
        when, _, handle = heapq.heappop(self._heap)
        self.now = when
        self.steps += 1
        handle.callback(*handle.args)
        return True

    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> bool:
        """Run callbacks due up to ``t`` and leave the clock at ``t``.

        With ``stop``, return as soon as it is true (checked after every callback), leaving the
        clock at that moment.  Returns whether ``stop`` became true.
        """
        if stop is not None and stop():
            return True
        while True:
            nxt = self.next_time()
            if nxt is None or nxt > t:
                break
            self.step()
            if stop is not None and stop():
                return True
        self.now = max(self.now, t)
        return False


# ---------------------------------------------------------------------------------------------
# links


@dataclass(frozen=True)
class LinkConfig:
    """One link's impairments, applied to each direction on its own."""

    delay: float = 0.005
    """One-way propagation delay in seconds."""
    loss: float = 0.0
    """Fraction of datagrams dropped at random (0 <= loss < 1)."""
    rate_mbps: float | None = None
    """Serialisation rate in Mbit/s; None for infinitely fast."""
    queue_bytes: int = 256 * 1024
    """Drop-tail queue size in bytes when ``rate_mbps`` is set."""
    jitter: float = 0.0
    """Extra delay drawn uniformly from ``[0, jitter]`` per datagram (may reorder)."""

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0:
            raise ConfigError("LinkConfig.delay and .jitter must be >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ConfigError(f"LinkConfig.loss must be in [0, 1), got {self.loss!r}")
        if self.rate_mbps is not None and not self.rate_mbps > 0:
            raise ConfigError(f"LinkConfig.rate_mbps must be > 0, got {self.rate_mbps!r}")
        if self.queue_bytes <= 0:
            raise ConfigError("LinkConfig.queue_bytes must be > 0")


class _Pipe:
    """One direction of a link: a drop-tail queue in front of a serialiser and a delay line."""

    def __init__(self, config: LinkConfig, net: Network, name: str) -> None:
        self.config = config
        self.net = net
        self.name = name
        self.free_at = 0.0
        self.stats: Counter[str] = Counter()

    def send(self, size: int, deliver: Callable[[], None]) -> None:
        cfg = self.config
        now = self.net.clock.now
        if cfg.loss and self.net.rng.random() < cfg.loss:
            self.stats["lost"] += 1
            return
        start = max(now, self.free_at)
        if cfg.rate_mbps is not None:
            rate = cfg.rate_mbps * 1e6 / 8.0  # bytes per second
            if (start - now) * rate + size > cfg.queue_bytes:
                self.stats["queue_dropped"] += 1
                return
            self.free_at = start + size / rate
            start = self.free_at
        jitter = self.net.rng.uniform(0.0, cfg.jitter) if cfg.jitter else 0.0
        self.stats["sent"] += 1
        self.stats["bytes"] += size
        self.net.clock.call_at(start + cfg.delay + jitter, deliver)


class _Link:
    def __init__(self, config: LinkConfig, net: Network, name: str) -> None:
        self.up = _Pipe(config, net, f"{name}/up")
        self.down = _Pipe(config, net, f"{name}/down")


# ---------------------------------------------------------------------------------------------
# hosts and sockets


class SimSocket:
    """A UDP socket of a simulated host (one local address)."""

    def __init__(self, host: Host, address: Address) -> None:
        self.host = host
        self.address = address
        #: Called with ``(data, source)`` for every datagram that arrives.
        self.on_datagram: Callable[[bytes, Address], None] | None = None
        self.stats: Counter[str] = Counter()
        self.closed = False

    @property
    def local_address(self) -> Address:
        return self.address

    def sendto(self, data: bytes, addr: Address) -> None:
        """Send one datagram (silently dropped if the socket is closed, like a dead host)."""
        if self.closed:
            return
        self.stats["sent"] += 1
        self.host.net.send_from_host(self.host, self.address, addr, bytes(data))

    def deliver(self, data: bytes, source: Address) -> None:
        self.stats["received"] += 1
        if self.on_datagram is None:
            self.stats["dropped_no_handler"] += 1
            return
        self.on_datagram(data, source)

    def close(self) -> None:
        self.closed = True
        self.host.sockets.pop(self.address, None)


class Host:
    """A simulated machine: one or more IP addresses, an access link, UDP sockets."""

    def __init__(
        self, net: Network, name: str, ips: tuple[str, ...], nat: Nat | None, link: LinkConfig
    ) -> None:
        self.net = net
        self.name = name
        self.ips = ips
        self.nat = nat
        self.link = _Link(link, net, name)
        self.sockets: dict[Address, SimSocket] = {}
        self.stats: Counter[str] = Counter()
        self._next_port = 40000

    @property
    def ip(self) -> str:
        return self.ips[0]

    def bind(self, port: int = 0, ip: str | None = None) -> SimSocket:
        """A socket on ``(ip, port)``; port 0 picks the next free port from 40000."""
        ip = ip or self.ip
        if ip not in self.ips:
            raise ConfigError(f"{self.name} has no address {ip}")
        if port == 0:
            while (ip, self._next_port) in self.sockets:
                self._next_port += 1
            port = self._next_port
            self._next_port += 1
        address = (ip, port)
        if address in self.sockets:
            raise ConfigError(f"{self.name}: {ip}:{port} is already bound")
        sock = SimSocket(self, address)
        self.sockets[address] = sock
        return sock

    def receive(self, src: Address, dst: Address, data: bytes) -> None:
        sock = self.sockets.get(dst)
        if sock is None:
            self.stats["no_socket"] += 1
            return
        sock.deliver(data, src)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.ip})"


# ---------------------------------------------------------------------------------------------
# NAT


@dataclass(frozen=True)
class NatBehavior:
    """What one NAT box does (RFC 4787 terms)."""

    mapping: MappingBehavior = EIM
    """Mapping behaviour (RFC 4787 section 4.1)."""
    filtering: FilteringBehavior = APDF
    """Filtering behaviour (RFC 4787 section 5)."""
    port_allocation: str = "preserving"
    """How a new mapping's external port is chosen (RFC 4787 section 4.2.1), one of
    :data:`PORT_ALLOCATIONS`: ``preserve`` keeps the internal port when it is free, else picks a
    random one (Linux's default ``MASQUERADE``, natlab.md); ``preserving`` keeps it too, else takes
    the next free port (what the profiles have always done here; kept so they do not change);
    ``random`` picks a random free port for every mapping (``--random-fully``); ``sequential``
    takes the next free port after the last one allocated (starting at 20000, or the range's
    start if higher); ``sequential-busy`` is sequential, but before each of our mappings other
    hosts behind the NAT take a random number of ports (``busy_gap``)."""
    mapping_timeout: float = 120.0
    """Seconds a mapping lives without outbound traffic (RFC 4787 REQ-5 asks for >= 120 s)."""
    inbound_refresh: bool = False
    """Whether inbound traffic also refreshes a mapping (RFC 4787 section 4.3)."""
    hairpinning: bool = False
    """Loop datagrams sent to the NAT's own public address back inside (RFC 4787 section 6)."""
    leaky: bool = False
    """No input firewall: unsolicited inbound datagrams leave a conntrack entry that forces the
    host's later datagrams to that sender out of another external port (natlab.md)."""
    port_range: tuple[int, int] = (1024, 65535)
    """External ports the NAT may allocate (inclusive); Linux's default range (natlab.md)."""
    busy_gap: tuple[int, int] = (0, 10)
    """``sequential-busy`` only: other hosts' traffic takes between this many ports (inclusive,
    uniform) between two of our consecutive mappings."""
    port_seed: int | None = None
    """Seed of this NAT's own port-allocation dice; None: the simulation's shared generator (as
    before), so allocation then depends on everything else that drew from it."""

    def __post_init__(self) -> None:
        if self.port_allocation not in PORT_ALLOCATIONS:
            raise ConfigError(
                f"port_allocation must be one of {', '.join(PORT_ALLOCATIONS)}, "
                f"got {self.port_allocation!r}"
            )
        if not self.mapping_timeout > 0:
            raise ConfigError("mapping_timeout must be > 0")
        if MappingBehavior(self.mapping) is MappingBehavior.UNKNOWN:
            raise ConfigError("mapping behaviour must be known")
        if FilteringBehavior(self.filtering) is FilteringBehavior.UNKNOWN:
            raise ConfigError("filtering behaviour must be known")
        lo, hi = self.port_range
        if not 1 <= lo <= hi <= 65535:
            raise ConfigError(f"bad port_range {self.port_range!r}")
        gap_lo, gap_hi = self.busy_gap
        if not 0 <= gap_lo <= gap_hi:
            raise ConfigError(f"bad busy_gap {self.busy_gap!r}")


@dataclass
class _Mapping:
    internal: Address
    external_port: int
    key: tuple[Any, ...]
    expires_at: float
    permits: set[Address] = field(default_factory=set)
    only_remote: Address | None = None  # a leaky NAT's per-flow exception


class Nat:
    """A NAT box between one LAN and the internet."""

    def __init__(
        self,
        net: Network,
        name: str,
        public_ip: str,
        lan: ipaddress.IPv4Network,
        behavior: NatBehavior,
        wan: LinkConfig,
        profile: str | None = None,
    ) -> None:
        self.net = net
        self.name = name
        self.public_ip = public_ip
        self.lan = lan
        self.behavior = behavior
        self.profile = profile
        self.wan = _Link(wan, net, f"{name}/wan")
        self.hosts: dict[str, Host] = {}
        self.stats: Counter[str] = Counter()
        self._by_key: dict[tuple[Any, ...], _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}
        self._local_ct: dict[tuple[int, Address], float] = {}
        self._next_port = max(behavior.port_range[0], 20000)
        # Its own dice only when asked (port_seed): the existing profiles keep drawing from the
        # simulation's generator, so their runs stay the same for a given seed.
        seed = behavior.port_seed
        self._port_rng = net.rng if seed is None else random.Random(seed)
        self._next_lan_host = 2
        #: Until this virtual time the box passes nothing (see :meth:`reboot`).
        self.down_until = 0.0

    def allocate_lan_ip(self) -> str:
        ip = str(self.lan.network_address + self._next_lan_host)
        self._next_lan_host += 1
        return ip

    # -- mapping table ------------------------------------------------------------------------

    @property
    def mappings(self) -> list[dict[str, Any]]:
        """Live mappings, for inspection: internal, external, permitted remotes, expiry."""
        now = self.net.clock.now
        return [
            {
                "internal": m.internal,
                "external": (self.public_ip, m.external_port),
                "permits": sorted(m.permits),
                "expires_at": m.expires_at,
            }
            for m in self._by_key.values()
            if m.expires_at > now
        ]

    def _live(self, m: _Mapping | None) -> _Mapping | None:
        if m is None:
            return None
        if m.expires_at > self.net.clock.now:
            return m
        self.stats["mappings_expired"] += 1
        self._by_key.pop(m.key, None)
        if self._by_port.get(m.external_port) is m:
            del self._by_port[m.external_port]
        return None

    def _port_busy(self, port: int) -> bool:
        return self._live(self._by_port.get(port)) is not None

    def _allocate(self, internal_port: int, avoid: int | None) -> int:
        lo, hi = self.behavior.port_range
        span = hi - lo + 1
        style = self.behavior.port_allocation
        preserve = style in ("preserve", "preserving")
        if preserve and internal_port != avoid and lo <= internal_port <= hi:
            if not self._port_busy(internal_port):
                return internal_port
            if style == "preserving":
                self._next_port = internal_port + 1
        if style == "sequential-busy":
            # Other subscribers' mappings took these ports since our last one.
            self._next_port += self._port_rng.randint(*self.behavior.busy_gap)
        for _ in range(span):
            if style in ("random", "preserve"):
                port = self._port_rng.randint(lo, hi)
            else:
                port = lo + (self._next_port - lo) % span
                self._next_port = port + 1
            if port != avoid and not self._port_busy(port):
                return port
        if style in ("random", "preserve"):
            # As many random draws as ports can all miss the last free ones of a nearly full
            # range; a free port still exists only if this scan finds it.
            for port in range(lo, hi + 1):
                if port != avoid and not self._port_busy(port):
                    return port
        raise ConfigError(f"{self.name}: out of external ports")

    def _key(self, internal: Address, remote: Address) -> tuple[Any, ...]:
        mapping = self.behavior.mapping
        if mapping is EIM:
            return (internal,)
        if mapping is ADM:
            return (internal, remote[0])
        return (internal, remote)

    def _outbound_mapping(self, internal: Address, remote: Address) -> _Mapping:
        now = self.net.clock.now
        timeout = self.behavior.mapping_timeout
        flow = self._live(self._by_key.get(("flow", internal, remote)))
        if flow is not None:
            flow.expires_at = now + timeout
            return flow
        key = self._key(internal, remote)
        m = self._live(self._by_key.get(key))
        if m is None:
            port = self._allocate(internal[1], None)
            m = _Mapping(internal, port, key, now + timeout)
            self._by_key[key] = m
            self._by_port[port] = m
            self.stats["mappings_created"] += 1
        if (
            self.behavior.leaky
            and remote not in m.permits
            and self._local_ct.get((m.external_port, remote), 0.0) > now
        ):
            # The reply tuple (remote -> public:port) already belongs to the conntrack entry
            # an unsolicited datagram left; netfilter picks another source port (natlab.md).
            port = self._allocate(internal[1], m.external_port)
            flow = _Mapping(internal, port, ("flow", internal, remote), now + timeout)
            flow.only_remote = remote
            flow.permits.add(remote)
            self._by_key[flow.key] = flow
            self._by_port[port] = flow
            self.stats["leaky_remaps"] += 1
            return flow
        m.expires_at = now + timeout
        m.permits.add(remote)
        return m

    def _permitted(self, m: _Mapping, remote: Address) -> bool:
        if m.only_remote is not None:
            return remote == m.only_remote
        filtering = self.behavior.filtering
        if filtering is EIF:
            return True
        if filtering is ADF:
            return any(ip == remote[0] for ip, _ in m.permits)
        return remote in m.permits

    def flush(self) -> None:
        """Forget every mapping, permission and conntrack entry at once (a mapping loss)."""
        self.stats["flushes"] += 1
        self._by_key.clear()
        self._by_port.clear()
        self._local_ct.clear()

    def reboot(self, downtime: float) -> None:
        """Lose every mapping and pass nothing for ``downtime`` seconds, as a rebooting box does.

        Ports come back as the allocation rule gives them: a ``preserving`` NAT hands the same
        external ports out again, so peers that punch again find each other where they were.
        """
        self.flush()
        self.down_until = self.net.clock.now + downtime

    def _down(self) -> bool:
        if self.net.clock.now < self.down_until:
            self.stats["dropped_down"] += 1
            return True
        return False

    def map_outbound(self, internal: Address, remote: Address) -> Address:
        """The external endpoint a datagram from ``internal`` to ``remote`` would leave by, its
        mapping made (or refreshed) exactly as :meth:`from_lan` does, but nothing sent: for
        experiments that open many mappings at once (the birthday curve)."""
        return (self.public_ip, self._outbound_mapping(internal, remote).external_port)

    # -- forwarding ---------------------------------------------------------------------------

    def from_lan(self, src: Address, dst: Address, data: bytes) -> None:
        """A datagram from a LAN host reached the NAT."""
        if self._down():
            return
        local = self.hosts.get(dst[0])
        if local is not None:
            self.stats["lan_forwarded"] += 1
            local.link.down.send(len(data), lambda: local.receive(src, dst, data))
            return
        m = self._outbound_mapping(src, dst)
        external = (self.public_ip, m.external_port)
        if dst[0] == self.public_ip:
            if not self.behavior.hairpinning:
                self.stats["hairpin_dropped"] += 1
                return
            self.stats["hairpinned"] += 1
            self.from_wan(external, dst, data)
            return
        self.stats["out"] += 1
        self.wan.up.send(len(data), lambda: self.net.route(external, dst, data))

    def from_wan(self, src: Address, dst: Address, data: bytes) -> None:
        """A datagram for the NAT's public address arrived."""
        if self._down():
            return
        now = self.net.clock.now
        m = self._live(self._by_port.get(dst[1]))
        if m is None or not self._permitted(m, src):
            self.stats["filtered" if m is not None else "no_mapping"] += 1
            if self.behavior.leaky:
                self.stats["leaky_accepted_locally"] += 1
                self._local_ct[(dst[1], src)] = now + _LOCAL_CONNTRACK_TIMEOUT
            return
        if self.behavior.inbound_refresh:
            m.expires_at = now + self.behavior.mapping_timeout
        host = self.hosts.get(m.internal[0])
        if host is None:
            self.stats["no_host"] += 1
            return
        self.stats["in"] += 1
        internal = m.internal
        host.link.down.send(len(data), lambda: host.receive(src, internal, data))

    def __repr__(self) -> str:
        return f"Nat({self.name!r}, {self.public_ip}, {self.profile or self.behavior})"


# ---------------------------------------------------------------------------------------------
# the internet


class Network:
    """The internet of one simulation: who owns which public IP, and the clock and dice."""

    def __init__(self, clock: Scheduler, rng: random.Random) -> None:
        self.clock = clock
        self.rng = rng
        self.public: dict[str, Host | Nat] = {}
        self.stats: Counter[str] = Counter()

    def send_from_host(self, host: Host, src: Address, dst: Address, data: bytes) -> None:
        nat = host.nat
        if nat is None:
            host.link.up.send(len(data), lambda: self.route(src, dst, data))
        else:
            host.link.up.send(len(data), lambda: nat.from_lan(src, dst, data))

    def route(self, src: Address, dst: Address, data: bytes) -> None:
        """A datagram on the public internet: hand it to whoever owns the destination IP."""
        node = self.public.get(dst[0])
        if node is None:
            self.stats["no_route"] += 1
            return
        if isinstance(node, Nat):
            node.wan.down.send(len(data), lambda: node.from_wan(src, dst, data))
        else:
            node.link.down.send(len(data), lambda: node.receive(src, dst, data))
