"""The simulated internet: topology (NATs, hosts, the STUN server, the rendezvous), the virtual
clock, the NAT profiles, and what a run does with them: probing, punching two bare sessions, and
pairing two whole workers (:class:`~p2plab.lab.sim.worker.SimWorker`).

Sites take the kernel lab's specs (:func:`p2plab.lab.site.parse_site`, :meth:`Simulation.add_site`):
``symmetric+pmp`` is a symmetric NAT whose router offers NAT-PMP and PCP
(:mod:`~p2plab.lab.sim.portmap_model`), ``symmetric/v6-apdf`` a dual-stack site whose IPv6 sits
behind a conntrack-only firewall and ``v6-eif`` an IPv6-only one (:mod:`~p2plab.lab.sim.ipv6`).
The STUN server answers on two IPv6 addresses too."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace
from typing import Any

from p2plab.config import SessionConfig
from p2plab.core import events as ev
from p2plab.core.link import LinkConfig as EngineConfig
from p2plab.core.nat import NatReport
from p2plab.errors import ConfigError
from p2plab.lab.sim.ipv6 import (
    STUN_IPS6,
    V6_FIREWALLS,
    V6_PREFIX,
    Firewall6,
    FirewallBehavior,
    SimNetwork,
    is_ipv6,
)
from p2plab.lab.sim.peer import SimPeer
from p2plab.lab.sim.portmap_model import PortMapConfig, PortMapNat
from p2plab.lab.sim.probe import classic_probe, rfc5780_discovery
from p2plab.lab.sim.rendezvous import SimRendezvous
from p2plab.lab.sim.report import LinkResult, PunchResult, address_family, pair_method
from p2plab.lab.sim.stun_server import SimStunServer
from p2plab.lab.sim.turn_server import SimTurnServer
from p2plab.lab.sim.worker import SimWorker
from p2plab.lab.simnet import (
    ADF,
    ADM,
    APDF,
    APDM,
    EIF,
    EIM,
    Host,
    LinkConfig,
    Nat,
    NatBehavior,
    Scheduler,
)
from p2plab.lab.site import parse_site

__all__ = [
    "EXPECTED_METHODS",
    "EXPECTED_OUTCOMES",
    "PROFILES",
    "SIM_PROFILES",
    "STUN_IPS",
    "STUN_IPS6",
    "STUN_PORTS",
    "TURN_IP",
    "Simulation",
    "profile_behavior",
]

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
    # Not in the kernel lab either (a modern Linux cannot allocate in order, issue 16): symmetric
    # NATs whose ports can be predicted, alone on the NAT or with other hosts' traffic in between.
    "symmetric-sequential": NatBehavior(mapping=APDM, filtering=APDF, port_allocation="sequential"),
    "symmetric-busy": NatBehavior(mapping=APDM, filtering=APDF, port_allocation="sequential-busy"),
}

#: Direct punching between two workers (A's profile, B's profile) -> ``direct``/``failed``, with
#: birthday punching (issue 16; the default ``BirthdayConfig``): natlab.md's table, where "port
#: prediction or a relay is needed" is now a direct link made by birthday punching when one side
#: is hard (symmetric, or leaky, which punches as hard) and the other port-restricted, and the
#: relay when both are hard.  Birthday pairs succeed with probability
#: 1 - (1 - 256/64512)^1024 = 98.4% per run: the rows hold for the seeds the tests use.
EXPECTED_OUTCOMES: dict[tuple[str, str], str] = {}
#: How the same pairs' link is made (the ``method`` column, :func:`pair_method`).  Plain punching
#: still wins where it works: against a NAT that filters by address only or not at all (open,
#: full, restricted), and leaky (A) x port-restricted (B), where A's datagrams leave before B's
#: arrive.
EXPECTED_METHODS: dict[tuple[str, str], str] = {}
_EASY = ("open", "full", "restricted")
for _a in PROFILES:
    for _b in PROFILES:
        if _a in _EASY or _b in _EASY or _a == _b == "port-restricted":
            _method = "direct"
        elif (_a, _b) == ("leaky", "port-restricted"):
            _method = "direct"
        elif _a == _b:  # symmetric x symmetric, leaky x leaky: both hard
            _method = "relay"
        else:
            _method = "birthday"
        EXPECTED_METHODS[(_a, _b)] = _method
        EXPECTED_OUTCOMES[(_a, _b)] = "failed" if _method == "relay" else "direct"

_PUBLIC_NET = "203.0.113"
STUN_IPS = (f"{_PUBLIC_NET}.10", f"{_PUBLIC_NET}.11")
STUN_PORTS = (3478, 3479)
#: Where :meth:`Simulation.add_turn_server` puts the TURN server (on the public segment).
TURN_IP = f"{_PUBLIC_NET}.30"


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


class Simulation:
    """A simulated internet with NATs, hosts and a STUN server, on a virtual clock."""

    def __init__(self, seed: int = 1, *, wan: LinkConfig | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = Scheduler()
        self.net = SimNetwork(self.clock, self.rng)
        self.default_wan = wan or LinkConfig(delay=0.01)
        self.nats: list[Nat] = []
        self.hosts: list[Host] = []
        self.firewalls6: list[Firewall6] = []
        self._public_next = 201
        self._nat_next = 101
        self._lan_next = 1
        self._probe_ports: dict[str, int] = {}
        stun_host = Host(self.net, "stun", STUN_IPS + STUN_IPS6, None, LinkConfig(delay=0.005))
        for ip in STUN_IPS + STUN_IPS6:
            self.net.public[ip] = stun_host
        self.stun = SimStunServer(stun_host, STUN_IPS, STUN_PORTS)
        self.stun6 = SimStunServer(stun_host, STUN_IPS6, STUN_PORTS)
        """The same STUN server over IPv6 (its two IPv6 addresses)."""
        self.rendezvous = SimRendezvous(self.clock)
        self.turn: SimTurnServer | None = None
        """The TURN server, once :meth:`add_turn_server` made one."""
        self.workers: dict[str, SimWorker] = {}
        self._rooms = 0

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
        portmap: PortMapConfig | None = None,
        **overrides: Any,
    ) -> Nat:
        """A NAT box of ``profile`` (a name from :data:`SIM_PROFILES` or a :class:`NatBehavior`).

        Keyword ``overrides`` change single fields (``mapping_timeout=30``, ``hairpinning=True``).
        With ``portmap`` its router offers port mapping (a :class:`PortMapNat`).
        """
        behavior = profile_behavior(profile, **overrides)
        if public_ip is None:
            public_ip = f"{_PUBLIC_NET}.{self._nat_next}"
            self._nat_next += 1
        if public_ip in self.net.public:
            raise ConfigError(f"{public_ip} is already in use")
        lan = ipaddress.IPv4Network(f"198.18.{self._lan_next}.0/24")
        self._lan_next += 1
        args = (self.net, name or f"nat{len(self.nats) + 1}", public_ip, lan, behavior)
        kwargs: dict[str, Any] = {
            "wan": wan or self.default_wan,
            "profile": profile if isinstance(profile, str) else None,
        }
        if portmap is not None:
            nat: Nat = PortMapNat(*args, portmap=portmap, seed=self.seed, **kwargs)
        else:
            nat = Nat(*args, **kwargs)
        self.net.public[public_ip] = nat
        self.nats.append(nat)
        return nat

    def add_firewall6(
        self,
        profile: str | FirewallBehavior = "v6-apdf",
        *,
        name: str | None = None,
        wan: LinkConfig | None = None,
    ) -> Firewall6:
        """An IPv6 site's firewall (a name from :data:`~p2plab.lab.sim.ipv6.V6_FIREWALLS` or a
        :class:`FirewallBehavior`), with a /48 of 2001:db8::/32 of its own."""
        if isinstance(profile, str):
            behavior = V6_FIREWALLS.get(profile)
            if behavior is None:
                raise ConfigError(
                    f"unknown IPv6 profile {profile!r}; choose one of {', '.join(V6_FIREWALLS)}"
                )
        else:
            behavior = profile
        index = len(self.firewalls6) + 1
        prefix = ipaddress.IPv6Network((int(V6_PREFIX.network_address) + (index << 80), 48))
        fw = Firewall6(
            self.net,
            name or f"fw{index}",
            prefix,
            behavior,
            wan or self.default_wan,
            profile=profile if isinstance(profile, str) else None,
        )
        self.firewalls6.append(fw)
        return fw

    def add_site(self, spec: str, name: str, *, beside: Host | None = None) -> Host:
        """A host at a site of the kernel lab's ``spec`` (``symmetric+pmp``, ``symmetric/v6-apdf``,
        ``v6-eif``; :func:`~p2plab.lab.site.parse_site`): its NAT (with the router's port
        mapping), its IPv6 firewall, the host behind both.  ``beside``: a host of that spec's
        site already made, whose NAT and firewall the new host shares (one LAN)."""
        site = parse_site(spec)
        nat = beside.nat if beside is not None else None
        if beside is None and site.v4 is not None and site.v4 != "open":
            portmap = PortMapConfig(protocols=site.protocols) if site.portmap else None
            nat = self.add_nat(site.v4, name=f"nat_{name}", portmap=portmap)
        fw = None
        if beside is not None:
            fw = next(
                (self.net.firewalls6[ip] for ip in beside.ips if ip in self.net.firewalls6), None
            )
        elif site.v6 is not None:
            fw = self.add_firewall6(site.v6, name=f"fw_{name}")
        return self.add_host(nat, name=name, fw6=fw, ipv4=site.v4 is not None)

    def add_host(
        self,
        behind: Nat | None = None,
        *,
        name: str | None = None,
        ip: str | None = None,
        link: LinkConfig | None = None,
        fw6: Firewall6 | None = None,
        ipv4: bool = True,
    ) -> Host:
        """A host behind ``behind`` (a LAN address), or on the public internet when None; with
        ``fw6`` also an IPv6 address behind that firewall (without ``ipv4``: that one only)."""
        name = name or f"h{len(self.hosts) + 1}"
        if not ipv4:
            if fw6 is None or behind is not None:
                raise ConfigError("an IPv6-only host needs fw6 and no NAT")
            ip6 = fw6.allocate_ip()
            host = Host(self.net, name, (ip6,), None, link or LinkConfig(delay=0.001))
            self.net.add_firewall_host(fw6, host, ip6)
            self.hosts.append(host)
            return host
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
        if fw6 is not None:
            ip6 = fw6.allocate_ip()
            host.ips = (*host.ips, ip6)
            self.net.add_firewall_host(fw6, host, ip6)
        self.hosts.append(host)
        return host

    def peer(self, host: Host, *, port: int = 0, name: str | None = None) -> SimPeer:
        """A :class:`SimPeer` on a new socket of ``host``."""
        return SimPeer(self, host, host.bind(port), name or host.name)

    # -- STUN and classification ------------------------------------------------------------------

    def _probe_peer(self, host: Host, ip: str | None = None) -> SimPeer:
        # Probe sockets live at 50000 and up, away from the 40000s the peers use, and a port is
        # never reused: the NAT may still hold the previous probe's mapping and permissions.
        ip = ip or host.ip
        port = self._probe_ports.get(host.name, 50000)
        while (ip, port) in host.sockets:
            port += 1
        self._probe_ports[host.name] = port + 1
        return SimPeer(self, host, host.bind(port, ip), f"{host.name}-probe")

    def classic_probe(self, host: Host) -> str:
        """The RFC 3489 section 10.1 test sequence as pystun3 runs it; returns pystun3's words
        (``"Restric Port NAT"``, ...), on a fresh socket of ``host``."""
        p = self._probe_peer(host)
        try:
            return classic_probe(p, self.stun.primary, self.stun.other)
        finally:
            p.socket.close()

    def probe(self, host: Host, *, classic: bool = True, family: str | None = None) -> NatReport:
        """RFC 5780 NAT behaviour discovery for ``host`` against the simulated STUN server, on a
        fresh socket: the core's procedure (:class:`~p2plab.core.discovery.Rfc5780Discovery`,
        the one workers run), then with ``classic`` the RFC 3489 sequence on another socket.
        ``family`` (``ipv4``, ``ipv6``; default: the host's first address's) picks the host's
        address and the server's; over IPv6 there is no classic sequence (pystun3 has none),
        and a firewall shows as its filtering with endpoint-independent "mapping" (none).

        Filtering tests run first, then the mapping tests on the same socket, which is what
        makes a leaky NAT show its remapping.
        """
        v6 = is_ipv6(host.ip) if family is None else family == "ipv6"
        ip = next((a for a in host.ips if is_ipv6(a) == v6), None)
        if ip is None:
            raise ConfigError(f"{host.name} has no {'IPv6' if v6 else 'IPv4'} address")
        p = self._probe_peer(host, ip)
        try:
            result = rfc5780_discovery(p, [(self.stun6 if v6 else self.stun).primary])
        finally:
            p.socket.close()
        if result.mapped is None:
            return replace(result.report(), local=p.local_address)
        return result.report(self.classic_probe(host) if classic and not v6 else None)

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

    def add_turn_server(
        self, *, secret: str = "sim-turn-secret", ip: str = TURN_IP, ttl_s: float = 600.0
    ) -> SimTurnServer:
        """A TURN server on a public host at ``ip`` (port 3478, UDP), whose credentials the
        rendezvous hands out in every offer from now on (what workers do with them is the
        engine's business).  Its limits: :mod:`p2plab.lab.sim.turn_server`."""
        host = self.add_host(name="turn", ip=ip, link=LinkConfig(delay=0.005))
        # Its own generator: adding a TURN server must not shift the network's random draws.
        server = SimTurnServer(
            host, self.clock, secret, rand_bytes=random.Random(f"turn {self.seed}").randbytes
        )
        self.rendezvous.use_turn([server.url], secret, ttl_s)
        self.turn = server
        return server

    # -- whole workers --------------------------------------------------------------------------

    def worker(
        self,
        host: Host,
        *,
        name: str | None = None,
        port: int = 0,
        config: EngineConfig | None = None,
        encrypted: bool = True,
        room: str = "default",
        signaling_delay: float = 0.02,
        use_stun: bool = True,
        nat_test: bool = True,
        start: bool = True,
        port_mapping: bool = True,
    ) -> SimWorker:
        """A whole worker (link engine + sessions) on a new socket of ``host``, started unless
        ``start`` is False: it registers with :attr:`rendezvous`, discovers its endpoint over
        STUN and is paired with the next worker of ``room``.  ``signaling_delay`` is its
        rendezvous connection's one-way delay; ``nat_test`` runs issue 16's NAT test after discovery
        (off: the engine gets no hint and punches plainly); ``port_mapping`` asks the NAT's router
        for a port when it offers port mapping."""
        name = name or host.name
        while name in self.workers:
            name = f"{name}'"
        w = SimWorker(
            self,
            host,
            host.bind(port),
            name,
            self.rendezvous,
            config=config,
            encrypted=encrypted,
            room=room,
            signaling_delay=signaling_delay,
            use_stun=use_stun,
            nat_test=nat_test,
            stun_server6=self.stun6.primary,
            port_mapping=port_mapping,
        )
        self.workers[name] = w
        if start:
            w.start()
        return w

    def pair(
        self,
        a: Host | SimWorker,
        b: Host | SimWorker,
        *,
        relay: bool = True,
        config: EngineConfig | None = None,
        session: SessionConfig | None = None,
        encrypted: bool = True,
        skew: float = 0.0,
        timeout: float | None = None,
        check_relay_chat: bool = True,
    ) -> LinkResult:
        """Run two whole workers on ``a`` and ``b`` until their engines settle.

        A registers first (so the rendezvous makes it ``controlling``); B's rendezvous connection
        is ``skew`` seconds slower, so B gets its offer that much later.  ``relay`` turns the
        engines' relay fallback on or off.  When both end ``relayed`` and ``check_relay_chat``,
        A sends one chat message over the relay; ``fallback`` says ``relayed`` only if B got it
        exactly once and A saw it acknowledged (the kernel lab's rule).  The workers keep running
        afterwards as the simulation runs on.
        """
        cfg = replace(config or EngineConfig(), relay=relay)
        if session is not None:
            cfg = replace(cfg, session=session)
        self._rooms += 1
        room = f"pair{self._rooms}"
        delay = 0.02
        wa = (
            a
            if isinstance(a, SimWorker)
            else self.worker(a, config=cfg, encrypted=encrypted, room=room, signaling_delay=delay)
        )
        wb = (
            b
            if isinstance(b, SimWorker)
            else self.worker(
                b, config=cfg, encrypted=encrypted, room=room, signaling_delay=delay + skew
            )
        )
        start = self.now
        punch = cfg.session.punch_timeout
        # A birthday attempt's punch deadline is longer by up to two probe windows (issue 16).
        bd = cfg.birthday
        window = 2 * bd.probe_budget / bd.probe_rate if bd.enabled else 0.0
        limit = timeout if timeout is not None else skew + 3 * punch + window + 10.0

        def gave_up(w: SimWorker) -> bool:
            return w.state == "waiting_for_peer" and w.first_time("punching", start) is not None

        def settled() -> bool:
            states = (wa.state, wb.state)
            return states in (("connected",) * 2, ("relayed",) * 2) or (gave_up(wa) and gave_up(wb))

        self.run_until(start + limit, stop=settled)
        offered = [t for w in (wa, wb) if (t := w.first_time("punching", start)) is not None]
        connected = wa.state == wb.state == "connected"
        turn_path = wa.engine.path if wa.engine.path in ("turn-udp", "turn-tcp") else None
        turn = connected and turn_path is not None  # a relay too: not direct punching
        direct = connected and not turn
        relayed = wa.state == wb.state == "relayed"
        connect_time = None
        path = None
        if direct:
            ends = [t for w in (wa, wb) if (t := w.first_time("connected", start)) is not None]
            connect_time = max(ends) - min(offered) if ends and offered else None
            lan = wb.local_address != wb.public_address
            path = "lan" if lan and wa.peer_address == wb.local_address else "public"
        fallback = ""
        if relayed:
            path = "relayed"
            if not check_relay_chat or self._relay_chat_works(wa, wb):
                fallback = "relayed"
        if turn and turn_path is not None:
            path = turn_path
            if not check_relay_chat or self._relay_chat_works(wa, wb):
                fallback = turn_path
        linked = direct or relayed or turn
        method = pair_method(wa.engine.method, wb.engine.method) if linked else None
        probes = sum(w.engine.stats.get("birthday_probes", 0) for w in (wa, wb))
        family = address_family(wa.peer_address) if direct else "ipv4" if turn else None
        return LinkResult(
            outcome="direct" if direct else "failed",
            fallback=fallback,
            connect_time_s=connect_time,
            a=wa,
            b=wb,
            a_public=wa.public_address,
            b_public=wb.public_address,
            a_sends_to=None if relayed or turn else wa.peer_address,
            b_sends_to=None if relayed or turn else wb.peer_address,
            path=path,
            method=method,
            birthday_probes=probes,
            family=family,
        )

    def _relay_chat_works(self, wa: SimWorker, wb: SimWorker, timeout: float = 10.0) -> bool:
        text = f"relay check {self.now:.3f}"
        msg_id = wa.send_chat(text)

        def delivered() -> bool:
            return any(
                isinstance(e, ev.ChatDelivered) and e.msg_id == msg_id
                for e in wa.events_of(ev.ChatDelivered)
            )

        self.run_for(timeout, stop=lambda: delivered() and text in wb.chats_received)
        return delivered() and wb.chats_received.count(text) == 1
