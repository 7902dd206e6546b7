"""In-process NAT simulator: the real sans-I/O core over a simulated network, on a virtual clock.

No root, no sockets, no real time: :class:`Simulation` builds hosts, NAT boxes (RFC 4787 mapping,
filtering, port allocation, mapping timeout, hairpinning; see :mod:`p2plab.lab.simnet`) and a STUN
server with two addresses, then drives the very code the workers run:
:class:`~p2plab.core.session.PeerSession` for punching, keep-alives and chat, and
:class:`~p2plab.core.stun.StunTransaction` plus :func:`~p2plab.core.nat.derive_behavior` for
STUN discovery and RFC 5780 classification.  One seed makes a run reproducible.

::

    sim = Simulation(seed=1)
    a = sim.add_host(behind=sim.add_nat("port-restricted"))
    b = sim.add_host(behind=sim.add_nat("symmetric"))
    result = sim.punch(a, b)            # PunchResult: outcome "direct" or "failed", connect_time_s
    result.a.send_chat("hello")
    sim.run_for(300)                    # five virtual minutes, a few milliseconds of real time
    sim.probe(a).mapping                # MappingBehavior.ENDPOINT_INDEPENDENT

:func:`sim_matrix` punches every pair of profiles (plus two hosts behind one NAT) and returns
rows shaped like the kernel lab's matrix.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.nat import (
    BehaviorTests,
    NatReport,
    ServerAnswer,
    classic_from_behavior,
    classic_name,
    derive_behavior,
)
from p2plab.core.session import PeerSession
from p2plab.core.stun import (
    CHANGE_IP,
    CHANGE_PORT,
    Class,
    Message,
    Method,
    RetransmissionPolicy,
    StunTransaction,
    TransactionState,
    make_binding_request,
    parse_message,
)
from p2plab.errors import ConfigError, P2PLabError
from p2plab.lab.simnet import (
    ADF,
    ADM,
    APDF,
    APDM,
    EIF,
    EIM,
    Address,
    Host,
    LinkConfig,
    Nat,
    NatBehavior,
    Network,
    Scheduler,
    SimSocket,
    TimerHandle,
)

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = [
    "EXPECTED_OUTCOMES",
    "PROFILES",
    "SIM_PROFILES",
    "LinkConfig",
    "NatBehavior",
    "PunchResult",
    "SimPeer",
    "Simulation",
    "matrix_dataframe",
    "profile_behavior",
    "sim_matrix",
]

log = logging.getLogger(__name__)

#: The kernel lab's profiles, in its order ("open" means no NAT).
PROFILES: tuple[str, ...] = ("open", "full", "restricted", "port-restricted", "symmetric", "leaky")

#: The NAT behaviour behind each profile name (the kernel lab's iptables recipes, natlab.md).
SIM_PROFILES: dict[str, NatBehavior] = {
    "full": NatBehavior(mapping=EIM, filtering=EIF),
    "restricted": NatBehavior(mapping=EIM, filtering=ADF),
    "port-restricted": NatBehavior(mapping=EIM, filtering=APDF),
    # MASQUERADE --random-fully
    "symmetric": NatBehavior(mapping=APDM, filtering=APDF, port_allocation="random"),
    # MASQUERADE without the INPUT conntrack rule
    "leaky": NatBehavior(mapping=EIM, filtering=APDF, leaky=True),
    # Not in the kernel lab: RFC 4787's middle case.
    "address-dependent": NatBehavior(mapping=ADM, filtering=ADF, port_allocation="sequential"),
}

#: natlab.md, "What punching should give" (A's profile, B's profile) -> outcome; symmetric pairs.
EXPECTED_OUTCOMES: dict[tuple[str, str], str] = {}
_TABLE_ROWS = {
    "open": ("direct",) * 5,
    "full": ("direct",) * 5,
    "restricted": ("direct",) * 5,
    "port-restricted": ("direct", "direct", "direct", "direct", "failed"),
    "symmetric": ("direct", "direct", "direct", "failed", "failed"),
}
for _a, _row in _TABLE_ROWS.items():
    for _b, _outcome in zip(PROFILES[:5], _row, strict=True):
        EXPECTED_OUTCOMES[(_a, _b)] = _outcome

_PUBLIC_NET = "203.0.113"
STUN_IPS = (f"{_PUBLIC_NET}.10", f"{_PUBLIC_NET}.11")
STUN_PORTS = (3478, 3479)
_SIM_STUN_POLICY = RetransmissionPolicy(rto=0.25, rc=3, rm=4)


def profile_behavior(profile: str | NatBehavior, **overrides: Any) -> NatBehavior:
    """The :class:`NatBehavior` of a profile name (or a behaviour), with fields overridden."""
    if isinstance(profile, NatBehavior):
        base = profile
    else:
        found = SIM_PROFILES.get(profile)
        if found is None:
            choices = ", ".join(SIM_PROFILES)
            raise ConfigError(f"unknown NAT profile {profile!r}; choose one of {choices}")
        base = found
    return replace(base, **overrides) if overrides else base


def _is_stun(data: bytes) -> bool:
    return len(data) >= 20 and data[0] < 4 and data[4:8] == b"\x21\x12\xa4\x42"


# ---------------------------------------------------------------------------------------------
# STUN server


class _StunServer:
    """A STUN Binding responder on two IPs x two ports (RFC 5780 section 6)."""

    def __init__(self, host: Host, ips: tuple[str, str], ports: tuple[int, int]) -> None:
        self.host = host
        self.ips = ips
        self.ports = ports
        self.stats: Counter[str] = Counter()
        self.sockets: dict[tuple[int, int], SimSocket] = {}
        for i, ip in enumerate(ips):
            for j, port in enumerate(ports):
                sock = host.bind(port, ip)
                sock.on_datagram = self._handler(i, j)
                self.sockets[(i, j)] = sock

    @property
    def primary(self) -> Address:
        return (self.ips[0], self.ports[0])

    @property
    def other(self) -> Address:
        return (self.ips[1], self.ports[1])

    def _handler(self, i: int, j: int) -> Any:
        def on_datagram(data: bytes, addr: Address) -> None:
            self._handle(i, j, data, addr)

        return on_datagram

    def _handle(self, i: int, j: int, data: bytes, addr: Address) -> None:
        try:
            request = parse_message(data)
        except P2PLabError:
            self.stats["malformed_dropped"] += 1
            return
        if request.message_method != Method.BINDING or request.message_class != Class.REQUEST:
            self.stats["not_request_dropped"] += 1
            return
        self.stats["requests"] += 1
        change = int(request.attributes.get("CHANGE-REQUEST", 0))
        ti = i ^ (1 if change & CHANGE_IP else 0)
        tj = j ^ (1 if change & CHANGE_PORT else 0)
        target = self.sockets[(ti, tj)]
        response = Message(Method.BINDING, Class.RESPONSE, request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        response.attributes["RESPONSE-ORIGIN"] = target.address
        other = self.sockets[(i ^ 1, j ^ 1)].address
        response.attributes["OTHER-ADDRESS"] = other
        response.attributes["SOFTWARE"] = "p2plab simulated STUN"
        response.add_fingerprint()
        target.sendto(bytes(response), addr)


# ---------------------------------------------------------------------------------------------
# a peer: one socket, STUN transactions and at most one PeerSession


class SimPeer:
    """What a worker does on one simulated socket: STUN and one peer session."""

    def __init__(self, sim: Simulation, host: Host, sock: SimSocket, name: str) -> None:
        self.sim = sim
        self.host = host
        self.socket = sock
        self.name = name
        self.session: PeerSession | None = None
        #: Every session event with the virtual time it came out: ``(t, event)``.
        self.events: list[tuple[float, ev.Event]] = []
        #: Public (server-reflexive) address learnt from STUN.
        self.public_address: Address | None = None
        self.connected_at: float | None = None
        self.started_at: float | None = None
        self.stats: Counter[str] = Counter()
        self._timer: TimerHandle | None = None
        self._stun: dict[bytes, tuple[StunTransaction, list[TimerHandle]]] = {}
        sock.on_datagram = self._on_datagram

    # -- properties -----------------------------------------------------------------------

    @property
    def local_address(self) -> Address:
        return self.socket.address

    @property
    def state(self) -> str:
        """The session's state, or ``"idle"`` before :meth:`start_session`."""
        return "idle" if self.session is None else self.session.state

    @property
    def peer_address(self) -> Address | None:
        return None if self.session is None else self.session.peer_address

    @property
    def rtt(self) -> float | None:
        return None if self.session is None else self.session.rtt

    @property
    def chats_received(self) -> list[str]:
        """Texts of the chat messages received, in order."""
        return [e.text for _, e in self.events if isinstance(e, ev.ChatReceived)]

    def events_of(self, kind: type[ev.Event]) -> list[ev.Event]:
        return [e for _, e in self.events if isinstance(e, kind)]

    # -- datagrams ----------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        now = self.sim.now
        if _is_stun(data):
            try:
                msg = parse_message(data)
            except P2PLabError:
                self.stats["stun_malformed"] += 1
                return
            entry = self._stun.get(msg.transaction_id)
            if entry is None or not entry[0].receive(msg, now):
                self.stats["stun_unmatched"] += 1
                return
            for handle in entry[1]:
                handle.cancel()
            return
        if self.session is None:
            self.stats["dropped_no_session"] += 1
            return
        self.session.receive_datagram(data, addr, now)
        self.pump()

    # -- STUN -------------------------------------------------------------------------------------

    def stun_request(
        self,
        server: Address,
        *,
        change_ip: bool = False,
        change_port: bool = False,
        policy: RetransmissionPolicy | None = None,
    ) -> StunTransaction:
        """Start a Binding transaction (the core's) and return it; run the sim to finish it."""
        request = make_binding_request(
            self.sim.rng.randbytes, change_ip=change_ip, change_port=change_port
        )
        tx = StunTransaction(request, server, policy or _SIM_STUN_POLICY)
        handles: list[TimerHandle] = []
        self._stun[tx.transaction_id] = (tx, handles)
        tx.start(self.sim.now)
        self._pump_stun(tx, handles)
        return tx

    def _pump_stun(self, tx: StunTransaction, handles: list[TimerHandle]) -> None:
        for data, addr in tx.datagrams_to_send(self.sim.now):
            self.socket.sendto(data, addr)
        when = tx.get_timer()
        if when is not None and not tx.done:
            handles.append(self.sim.clock.call_at(when, self._stun_timer, tx, handles))

    def _stun_timer(self, tx: StunTransaction, handles: list[TimerHandle]) -> None:
        tx.handle_timer(self.sim.now)
        self._pump_stun(tx, handles)

    def binding(self, server: Address | None = None, **kwargs: Any) -> StunTransaction:
        """Run one Binding transaction to completion (virtual time passes) and return it."""
        tx = self.stun_request(server or self.sim.stun.primary, **kwargs)
        self.sim.run_until(self.sim.now + 3600.0, stop=lambda: tx.done)
        return tx

    def discover(self) -> Address | None:
        """Learn our public address from the STUN server (what a worker does before punching)."""
        tx = self.binding()
        if tx.state is TransactionState.SUCCEEDED and tx.response is not None:
            mapped = tx.response.attributes.get("XOR-MAPPED-ADDRESS")
            if mapped is None:
                return self.public_address
            self.public_address = (str(mapped[0]), int(mapped[1]))
        return self.public_address

    @property
    def candidates(self) -> list[Address]:
        """What the rendezvous would announce for us: public address first, then the LAN one."""
        out = [] if self.public_address is None else [self.public_address]
        if self.local_address not in out:
            out.append(self.local_address)
        return out

    # -- the peer session -------------------------------------------------------------------------

    def start_session(
        self,
        peer_id: str,
        role: str,
        candidates: Sequence[Address],
        config: SessionConfig | None = None,
    ) -> PeerSession:
        """Create the core :class:`PeerSession` (as on a ``p2p_connection_offer``) and drive it."""
        if self.session is not None:
            self.close()
        self.started_at = self.sim.now
        self.connected_at = None
        self.session = PeerSession(
            local_id=self.name,
            peer_id=peer_id,
            role=role,  # type: ignore[arg-type]
            candidates=list(candidates),
            config=config or SessionConfig(),
            now=self.sim.now,
            rand_bytes=self.sim.rng.randbytes,
        )
        self.pump()
        return self.session

    def pump(self) -> None:
        """Send what the core wants sent, collect its events, re-arm its one timer."""
        session = self.session
        if session is None:
            return
        now = self.sim.now
        for data, addr in session.datagrams_to_send(now):
            self.socket.sendto(data, addr)
        while (event := session.next_event()) is not None:
            self.events.append((now, event))
            if isinstance(event, ev.PeerConnected) and self.connected_at is None:
                self.connected_at = now
            log.debug("%.3f %s: %s", now, self.name, event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = session.get_timer()
        if when is not None:
            self._timer = self.sim.clock.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.session is not None:
            self.session.handle_timer(self.sim.now)
            self.pump()

    def send_chat(self, text: str) -> str:
        """Send a chat message over the session; returns its id."""
        if self.session is None:
            raise ConfigError(f"{self.name} has no peer session")
        msg_id = self.session.send_chat(text, self.sim.now)
        self.pump()
        return msg_id

    def close(self) -> None:
        """Close the session (sends BYE) and stop its timer."""
        if self.session is not None and self.session.state in ("punching", "connected"):
            self.session.close(self.sim.now)
            self.pump()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __repr__(self) -> str:
        return f"SimPeer({self.name!r}, {self.local_address}, {self.state})"


@dataclass(frozen=True)
class PunchResult:
    """The outcome of :meth:`Simulation.punch`."""

    outcome: str
    """``"direct"`` when both sides connected, else ``"failed"``."""
    connect_time_s: float | None
    """Virtual seconds from the offers to both sides connected (None when failed)."""
    a: SimPeer
    """Side A (controlling): its session keeps running as the simulation runs on."""
    b: SimPeer
    """Side B (controlled)."""
    a_public: Address | None
    """A's public address as STUN saw it."""
    b_public: Address | None
    """B's public address as STUN saw it."""
    a_sends_to: Address | None
    """The address A's nominated path sends to (B's endpoint as A sees it)."""
    b_sends_to: Address | None
    """The address B's nominated path sends to."""
    path: str | None
    """``"public"`` or ``"lan"``: which kind of address A reached B on (None when failed)."""

    def to_dict(self) -> dict[str, Any]:
        """The kernel lab's matrix columns (:class:`p2plab.lab.matrix.PairResult`) that apply."""

        def fmt(addr: Address | None) -> str | None:
            return None if addr is None else f"{addr[0]}:{addr[1]}"

        return {
            "outcome": self.outcome,
            "connect_s": self.connect_time_s,
            "path": self.path,
            "a_public": fmt(self.a_public),
            "b_public": fmt(self.b_public),
            "a_peer_endpoint": fmt(self.a_sends_to),
            "b_peer_endpoint": fmt(self.b_sends_to),
            "a_state": self.a.state,
            "b_state": self.b.state,
        }


# ---------------------------------------------------------------------------------------------
# the simulation


class Simulation:
    """A simulated internet with NATs, hosts and a STUN server, on a virtual clock."""

    def __init__(self, seed: int = 1, *, wan: LinkConfig | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = Scheduler()
        self.net = Network(self.clock, self.rng)
        self.default_wan = wan or LinkConfig(delay=0.01)
        self.nats: list[Nat] = []
        self.hosts: list[Host] = []
        self._public_next = 201
        self._nat_next = 101
        self._lan_next = 1
        self._probe_ports: dict[str, int] = {}
        stun_host = Host(self.net, "stun", STUN_IPS, None, LinkConfig(delay=0.005))
        for ip in STUN_IPS:
            self.net.public[ip] = stun_host
        self.stun = _StunServer(stun_host, STUN_IPS, STUN_PORTS)

    # -- time -----------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Virtual seconds since the simulation started."""
        return self.clock.now

    def run_until(self, t: float, stop: Any = None) -> bool:
        """Advance the virtual clock to ``t`` (or until ``stop()`` is true); see
        :meth:`Scheduler.run_until`."""
        return self.clock.run_until(t, stop)

    def run_for(self, seconds: float, stop: Any = None) -> bool:
        """Advance the virtual clock by ``seconds``."""
        return self.clock.run_until(self.clock.now + seconds, stop)

    # -- topology -------------------------------------------------------------------------------

    def add_nat(
        self,
        profile: str | NatBehavior = "port-restricted",
        *,
        name: str | None = None,
        public_ip: str | None = None,
        wan: LinkConfig | None = None,
        **overrides: Any,
    ) -> Nat:
        """A NAT box of ``profile`` (a name from :data:`SIM_PROFILES` or a :class:`NatBehavior`).

        Keyword ``overrides`` change single fields (``mapping_timeout=30``, ``hairpinning=True``).
        """
        behavior = profile_behavior(profile, **overrides)
        if public_ip is None:
            public_ip = f"{_PUBLIC_NET}.{self._nat_next}"
            self._nat_next += 1
        if public_ip in self.net.public:
            raise ConfigError(f"{public_ip} is already in use")
        lan = ipaddress.IPv4Network(f"198.18.{self._lan_next}.0/24")
        self._lan_next += 1
        nat = Nat(
            self.net,
            name or f"nat{len(self.nats) + 1}",
            public_ip,
            lan,
            behavior,
            wan or self.default_wan,
            profile=profile if isinstance(profile, str) else None,
        )
        self.net.public[public_ip] = nat
        self.nats.append(nat)
        return nat

    def add_host(
        self,
        behind: Nat | None = None,
        *,
        name: str | None = None,
        ip: str | None = None,
        link: LinkConfig | None = None,
    ) -> Host:
        """A host behind ``behind`` (a LAN address), or on the public internet when None."""
        name = name or f"h{len(self.hosts) + 1}"
        if behind is None:
            if ip is None:
                ip = f"{_PUBLIC_NET}.{self._public_next}"
                self._public_next += 1
            if ip in self.net.public:
                raise ConfigError(f"{ip} is already in use")
            host = Host(self.net, name, (ip,), None, link or self.default_wan)
            self.net.public[ip] = host
        else:
            ip = ip or behind.allocate_lan_ip()
            host = Host(self.net, name, (ip,), behind, link or LinkConfig(delay=0.001))
            behind.hosts[ip] = host
        self.hosts.append(host)
        return host

    def peer(self, host: Host, *, port: int = 0, name: str | None = None) -> SimPeer:
        """A :class:`SimPeer` on a new socket of ``host``."""
        return SimPeer(self, host, host.bind(port), name or host.name)

    # -- STUN and classification ------------------------------------------------------------------

    def _probe_peer(self, host: Host) -> SimPeer:
        # Probe sockets live at 50000 and up, away from the 40000s the peers use, and a port is
        # never reused: the NAT may still hold the previous probe's mapping and permissions.
        port = self._probe_ports.get(host.name, 50000)
        while (host.ip, port) in host.sockets:
            port += 1
        self._probe_ports[host.name] = port + 1
        return SimPeer(self, host, host.bind(port), f"{host.name}-probe")

    def classic_probe(self, host: Host) -> str:
        """The RFC 3489 section 10.1 test sequence as pystun3 runs it; returns pystun3's words
        (``"Restric Port NAT"``, ...), on a fresh socket of ``host``."""
        p = self._probe_peer(host)
        try:
            server = self.stun.primary
            t1 = _answer(server, p.binding(server))
            if not t1.ok or t1.mapped is None:
                return "Blocked"
            changed = t1.other_address or self.stun.other
            t2 = p.binding(server, change_ip=True, change_port=True)
            if t1.mapped == p.local_address:
                ok = t2.state is TransactionState.SUCCEEDED
                return "Open Internet" if ok else "Symmetric UDP Firewall"
            if t2.state is TransactionState.SUCCEEDED:
                return "Full Cone"
            t1b = _answer(changed, p.binding(changed))
            if not t1b.ok:
                return "Meet an error, when do Test1 on Changed IP and Port"
            if t1b.mapped != t1.mapped:
                return "Symmetric NAT"
            t3 = p.binding(server, change_port=True)
            return "Restric NAT" if t3.state is TransactionState.SUCCEEDED else "Restric Port NAT"
        finally:
            p.socket.close()

    def probe(self, host: Host, *, classic: bool = True) -> NatReport:
        """RFC 5780 NAT behaviour discovery for ``host`` against the simulated STUN server.

        Filtering tests (section 4.4) run first, then the mapping tests (section 4.3) on the same
        socket, which is what makes a leaky NAT show its remapping.
        """
        p = self._probe_peer(host)
        server = self.stun.primary
        notes: list[str] = []
        t1 = p.binding(server)
        answer = _answer(server, t1)
        if not answer.ok or answer.mapped is None:
            p.socket.close()
            return NatReport(mapped=None, local=p.local_address, servers=(answer,), notes=("no",))
        other = answer.other_address or self.stun.other
        f2 = p.binding(server, change_ip=True, change_port=True).state
        filter2 = f2 is TransactionState.SUCCEEDED
        filter3: bool | None = None
        if not filter2:
            filter3 = p.binding(server, change_port=True).state is TransactionState.SUCCEEDED
        mapped2 = mapped3 = None
        if answer.mapped != p.local_address:
            mapped2 = _answer((other[0], server[1]), p.binding((other[0], server[1]))).mapped
            if mapped2 is not None and mapped2 != answer.mapped:
                mapped3 = _answer(other, p.binding(other)).mapped
        tests = BehaviorTests(
            local=p.local_address,
            mapped1=answer.mapped,
            mapped2=mapped2,
            mapped3=mapped3,
            filter2=filter2,
            filter3=filter3,
        )
        mapping, filtering, behind = derive_behavior(tests)
        p.socket.close()
        classic_raw = self.classic_probe(host) if classic else None
        return NatReport(
            mapped=answer.mapped,
            local=p.local_address,
            mapping=mapping,
            filtering=filtering,
            classic=classic_name(classic_raw),
            classic_raw=classic_raw,
            classic_rfc5780=classic_from_behavior(mapping, filtering, behind),
            behind_nat=behind,
            servers=(answer,),
            other_address=other,
            notes=tuple(notes),
        )

    # -- punching -------------------------------------------------------------------------------

    def punch(
        self,
        a: Host | SimPeer,
        b: Host | SimPeer,
        *,
        timeout: float | None = None,
        config: SessionConfig | None = None,
        config_b: SessionConfig | None = None,
        skew: float = 0.0,
    ) -> PunchResult:
        """Do what two workers and the rendezvous do, and run until both connect or give up.

        Each side learns its public address with a STUN Binding request, the "rendezvous" hands
        each the other's candidates (public, then LAN), A starts as the controlling side and B
        ``skew`` seconds later.  The sessions keep running afterwards (keep-alives, chat) as the
        simulation runs on.
        """
        pa = a if isinstance(a, SimPeer) else self.peer(a)
        pb = b if isinstance(b, SimPeer) else self.peer(b)
        if pa.name == pb.name:
            pb.name = f"{pb.name}-b"
        for p in (pa, pb):
            if p.public_address is None:
                p.discover()
        config = config or SessionConfig()
        config_b = config_b or config
        start = self.now
        pa.start_session(pb.name, "controlling", pb.candidates, config)

        def start_b() -> None:
            pb.start_session(pa.name, "controlled", pa.candidates, config_b)

        self.clock.call_later(skew, start_b)
        limit = (
            timeout if timeout is not None else max(config.punch_timeout, config_b.punch_timeout)
        )

        def settled() -> bool:
            states = (pa.state, pb.state)
            return states == ("connected", "connected") or any(
                s in ("lost", "closed") for s in states
            )

        self.run_until(start + skew + limit + 1.0, stop=settled)
        ok = pa.state == "connected" and pb.state == "connected"
        connect_time = None
        path = None
        if ok and pa.connected_at is not None and pb.connected_at is not None:
            connect_time = max(pa.connected_at, pb.connected_at) - start
            lan = pb.local_address != pb.public_address
            path = "lan" if lan and pa.peer_address == pb.local_address else "public"
        return PunchResult(
            outcome="direct" if ok else "failed",
            connect_time_s=connect_time,
            a=pa,
            b=pb,
            a_public=pa.public_address,
            b_public=pb.public_address,
            a_sends_to=pa.peer_address,
            b_sends_to=pb.peer_address,
            path=path,
        )


def _answer(server: Address, tx: StunTransaction) -> ServerAnswer:
    if tx.state is not TransactionState.SUCCEEDED or tx.response is None:
        return ServerAnswer(server=server, ok=False, attempts=tx.attempts, error=tx.state.value)
    attrs = tx.response.attributes
    mapped = attrs.get("XOR-MAPPED-ADDRESS") or attrs.get("MAPPED-ADDRESS")
    other = attrs.get("OTHER-ADDRESS")
    return ServerAnswer(
        server=server,
        ok=True,
        rtt_s=tx.rtt,
        mapped=None if mapped is None else (str(mapped[0]), int(mapped[1])),
        attempts=tx.attempts,
        other_address=None if other is None else (str(other[0]), int(other[1])),
        software=attrs.get("SOFTWARE"),
        resolved=server,
    )


# ---------------------------------------------------------------------------------------------
# the matrix


def _site(sim: Simulation, profile: str, name: str) -> Host:
    if profile == "open":
        return sim.add_host(name=name)
    return sim.add_host(behind=sim.add_nat(profile, name=f"nat_{name}"), name=name)


def sim_matrix(
    profiles: Iterable[str] = PROFILES,
    *,
    seed: int = 1,
    same_lan: Iterable[str] | None = None,
    config: SessionConfig | None = None,
    skew: float = 0.1,
    classify: bool = True,
) -> list[dict[str, Any]]:
    """Punch every ordered pair of ``profiles`` (A controlling) in a fresh simulation each.

    ``same_lan`` adds one row per profile with both hosts behind one NAT of it (for ``open``: both
    on the public segment), by default for every profile in ``profiles``.  Rows carry the
    kernel lab's columns where they apply
    (``profile_a``, ``profile_b``, ``same_lan``, ``outcome`` (direct/failed), ``connect_s``
    (virtual), ``path``, the endpoints, both sides' classification (RFC 3489 and RFC 5780),
    ``expected`` (natlab.md, where it says) and ``seed``.
    """
    # ``skew``: B gets its offer this long after A (as with the real rendezvous and processes).
    # It matters for leaky NATs only: A's first probe then reaches a leaky B before B has sent
    # anything, which is what the kernel lab sees (port-restricted x leaky and leaky x leaky
    # fail there); with skew=0 the first probes cross in flight and those pairs connect.
    profiles = list(profiles)
    if same_lan is None:
        same_lan = profiles
    cases: list[tuple[str, str, bool]] = [(pa, pb, False) for pa in profiles for pb in profiles]
    cases += [(p, p, True) for p in same_lan]
    rows: list[dict[str, Any]] = []
    for index, (prof_a, prof_b, lan) in enumerate(cases):
        run_seed = seed * 1000 + index
        sim = Simulation(seed=run_seed)
        if lan and prof_a == "open":
            # The kernel lab's same-LAN "open" case: two hosts on the public segment.
            host_a = sim.add_host(name="a")
            host_b = sim.add_host(name="b")
        elif lan:
            nat = sim.add_nat(prof_a, name="nat_a")
            host_a = sim.add_host(behind=nat, name="a")
            host_b = sim.add_host(behind=nat, name="b")
        else:
            host_a = _site(sim, prof_a, "a")
            host_b = _site(sim, prof_b, "b")
        row: dict[str, Any] = {"profile_a": prof_a, "profile_b": prof_b, "same_lan": lan}
        if classify:
            for side, host in (("a", host_a), ("b", host_b)):
                report = sim.probe(host)
                row[f"{side}_mapping"] = report.mapping.value
                row[f"{side}_filtering"] = report.filtering.value
                row[f"{side}_nat"] = f"{report.mapping.value}/{report.filtering.value}"
                row[f"{side}_classic"] = report.classic
                row[f"{side}_classic_rfc5780"] = report.classic_rfc5780
        result = sim.punch(host_a, host_b, config=config, skew=skew)
        row.update(result.to_dict())
        row["expected"] = "direct" if lan else EXPECTED_OUTCOMES.get((prof_a, prof_b))
        row["seed"] = run_seed
        rows.append(row)
    return rows


def matrix_dataframe(rows: list[dict[str, Any]] | None = None, **kwargs: Any) -> pd.DataFrame:
    """:func:`sim_matrix` rows (computed with ``kwargs`` when not given) as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(rows if rows is not None else sim_matrix(**kwargs))
