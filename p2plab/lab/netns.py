"""The kernel NAT lab: real Linux NATs in network namespaces, built with iproute2 and iptables.

Topology (one run; every namespace and interface name starts with the run's prefix)::

                    public segment 203.0.113.0/24 (bridge in namespace <p>-wan)
      rendezvous .2     stun .10 + .11     nat_a .101     nat_b .102    (open hosts: a .201, b .202)
                                             |               |
                                    LAN 198.18.1.0/24   LAN 198.18.2.0/24
                                        a .2 (b .3)         b .2

A site with the ``open`` profile has no NAT namespace: its host sits on the public segment.  With
``same_lan=True`` hosts ``a`` and ``b`` share site A (and its profile).

The lab needs root.  It cleans up when the ``with`` block ends, at interpreter exit, and on
SIGTERM/SIGHUP; :func:`clean_leftovers` removes what a killed run left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2plab.errors import ConfigError, LabError
from p2plab.lab import ipv6
from p2plab.lab.portmap_lab import PORTMAP_PUBLIC_NET, MiniUpnpd, start_miniupnpd
from p2plab.lab.profiles import (
    impairment_rules,
    nat_ruleset,
    udp_block_rules,
    validate_profile,
)
from p2plab.lab.site import parse_site

__all__ = [
    "HOSTS",
    "NOT_ROOT_MESSAGE",
    "PREFIX_RE",
    "Lab",
    "LabConfig",
    "check_environment",
    "classify_profiles",
    "clean_leftovers",
    "list_leftovers",
]

log = logging.getLogger(__name__)

#: The sentence a user without root sees.
NOT_ROOT_MESSAGE = (
    "The kernel NAT lab needs root (network namespaces and iptables): run as root, "
    "or use the in-process simulator p2plab.lab.sim."
)

#: Names of the lab's hosts.
HOSTS: tuple[str, ...] = ("rendezvous", "stun", "nat_a", "nat_b", "a", "b")

#: Every name this module creates matches this (``p2l`` + 4 hex digits + ``-`` for namespaces).
PREFIX_RE = re.compile(r"^(p2l[0-9a-f]{4})")

_NS_RE = re.compile(r"^(p2l[0-9a-f]{4})-\S+$")
_MARKER_DIR = Path(tempfile.gettempdir()) / "p2plab-lab"

PUBLIC_NET = "203.0.113"
RENDEZVOUS_IP = f"{PUBLIC_NET}.2"
STUN_IPS = (f"{PUBLIC_NET}.10", f"{PUBLIC_NET}.11")
STUN_PORT = 3478
STUN_ALT_PORT = 3479
#: coturn's relayed ports (a small range: a lab pair needs two allocations, a few for reconnects).
TURN_RELAY_PORTS = (49152, 49407)
#: The realm coturn announces (any fixed name; credentials are the REST kind, bound to worker ids).
TURN_REALM = "p2plab"
_NAT_WAN_IP = {"a": f"{PUBLIC_NET}.101", "b": f"{PUBLIC_NET}.102"}
_OPEN_IP = {"a": f"{PUBLIC_NET}.201", "b": f"{PUBLIC_NET}.202"}
_LAN_NET = {"a": "198.18.1", "b": "198.18.2"}


@dataclass(frozen=True)
class LabConfig:
    """What lab to build."""

    profile_a: str = "port-restricted"
    """Site A's spec (:mod:`p2plab.lab.site`): a NAT profile (:mod:`p2plab.lab.profiles`),
    an IPv6 firewall (``v6-apdf``, :mod:`p2plab.lab.ipv6`) or both (``symmetric/v6-apdf``)."""
    profile_b: str = "port-restricted"
    """Site B's spec (ignored when ``same_lan``)."""
    same_lan: bool = False
    """Put hosts ``a`` and ``b`` behind the same NAT (site A)."""
    loss_a: float = 0.0
    """Fraction of UDP datagrams dropped on site A's WAN, in each direction."""
    loss_b: float = 0.0
    """Fraction of UDP datagrams dropped on site B's WAN, in each direction."""
    rate_a_mbit: float | None = None
    """Rate limit (tbf) on site A's WAN, each direction, in Mbit/s; None for no limit."""
    rate_b_mbit: float | None = None
    """Rate limit (tbf) on site B's WAN, each direction, in Mbit/s; None for no limit."""
    stun: bool = True
    """Start coturn on the STUN host (two addresses, alternate port 3479).  It also serves TURN
    (UDP and TCP on port 3478, ``use-auth-secret`` with :attr:`Lab.turn_secret`), which a run
    uses only when it hands :attr:`Lab.turn_urls` to its rendezvous."""
    prefix: str | None = None
    """Name prefix (``p2l`` + 4 hex digits); random when None."""

    def __post_init__(self) -> None:
        parse_site(self.profile_a)
        parse_site(self.profile_b)
        for loss in (self.loss_a, self.loss_b):
            if not 0.0 <= loss < 1.0:
                raise ConfigError(f"loss must be in [0, 1), got {loss!r}")
        for rate in (self.rate_a_mbit, self.rate_b_mbit):
            if rate is not None and rate <= 0:
                raise ConfigError(f"rate must be positive, got {rate!r}")
        if self.prefix is not None and not re.fullmatch(r"p2l[0-9a-f]{4}", self.prefix):
            raise ConfigError(f"prefix must be 'p2l' and 4 hex digits, got {self.prefix!r}")


def check_environment(
    *, euid: int | None = None, tools: Sequence[str] = ("ip", "iptables", "iptables-restore")
) -> None:
    """Raise :class:`LabError` with one clear sentence when the lab cannot run here."""
    if euid is None:
        euid = os.geteuid()
    if euid != 0:
        raise LabError(NOT_ROOT_MESSAGE)
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise LabError(
            f"The kernel NAT lab needs {', '.join(missing)} on PATH: "
            "install them (Debian: apt-get install iproute2 iptables coturn)."
        )


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise LabError(
            f"lab setup step failed: {' '.join(argv)}: {proc.stderr.strip() or proc.returncode}"
        )
    return proc.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_leftovers() -> list[str]:
    """Namespaces in this machine whose names look like the lab's."""
    out = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if _NS_RE.match(n)]


def _kill_namespace_processes(ns: str) -> None:
    out = _run(["ip", "netns", "pids", ns], check=False)
    pids = [int(p) for p in out.split() if p.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if _pid_alive(p)]
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(_pid_alive(p) for p in alive):
            time.sleep(0.02)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    _run(["ip", "netns", "del", ns], check=False)


def clean_leftovers(*, force: bool = False) -> list[str]:
    """Remove namespaces, interfaces and markers that earlier lab runs left behind.

    A run whose creating process is still alive is left alone unless ``force`` is true, so that
    this is safe to call while other labs are up.  Returns the namespaces removed.
    """
    check_environment(tools=("ip",))
    removed: list[str] = []
    for ns in list_leftovers():
        prefix = ns.split("-", 1)[0]
        if not force and _owner_alive(prefix):
            continue
        _delete_namespace(ns)
        removed.append(ns)
    # Interfaces in the root namespace (the lab never leaves any there, but a crash might).
    out = _run(["ip", "-o", "link", "show"], check=False)
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = PREFIX_RE.match(name)
        if m and (force or not _owner_alive(m.group(1))):
            _run(["ip", "link", "del", name], check=False)
    if _MARKER_DIR.is_dir():
        for marker in _MARKER_DIR.glob("p2l*.pid"):
            if force or not _owner_alive(marker.stem):
                marker.unlink(missing_ok=True)
    return removed


def _owner_alive(prefix: str) -> bool:
    marker = _MARKER_DIR / f"{prefix}.pid"
    try:
        pid = int(marker.read_text().strip())
    except (OSError, ValueError):
        return False
    return _pid_alive(pid)


# --- exit-path cleanup -------------------------------------------------------------------------

_LIVE: weakref.WeakSet[Lab] = weakref.WeakSet()
_HOOKS_INSTALLED = False
_SIGNALS_INSTALLED = False
_HOOK_LOCK = threading.Lock()


def _close_all() -> None:
    for lab in list(_LIVE):
        with contextlib.suppress(Exception):
            lab.close()


def _on_signal(signum: int, frame: Any) -> None:
    _close_all()
    raise SystemExit(128 + signum)


def _install_exit_hooks() -> None:
    global _HOOKS_INSTALLED, _SIGNALS_INSTALLED
    with _HOOK_LOCK:
        if not _HOOKS_INSTALLED:
            _HOOKS_INSTALLED = True
            atexit.register(_close_all)
        if _SIGNALS_INSTALLED or threading.current_thread() is not threading.main_thread():
            return
        _SIGNALS_INSTALLED = True
        for sig in (signal.SIGTERM, signal.SIGHUP):
            # Only take over signals nobody else handles (pytest, uvicorn... keep theirs).
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _on_signal)


# --- the lab -----------------------------------------------------------------------------------


@dataclass
class _Host:
    name: str
    ns: str
    address: str
    lan_address: str | None = None
    interfaces: list[str] = field(default_factory=list)


class Lab:
    """A built lab.  Use :meth:`create` in a ``with`` block."""

    stun_port = STUN_PORT
    stun_alt_port = STUN_ALT_PORT

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.prefix = config.prefix or f"p2l{secrets.token_hex(2)}"
        self._hosts: dict[str, _Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        self._lock = threading.Lock()
        self.turn_secret = secrets.token_hex(16)
        """coturn's ``static-auth-secret`` (fresh per lab); the rendezvous gets it too."""
        self._blocked: list[tuple[str, list[str]]] = []
        specs = [config.profile_a] + ([] if config.same_lan else [config.profile_b])
        #: The public segment's /24: public-looking only when miniupnpd runs (portmap_lab.py).
        self.public_net = (
            PORTMAP_PUBLIC_NET if any(parse_site(s).portmap for s in specs) else PUBLIC_NET
        )
        self.stun_ips = (f"{self.public_net}.10", f"{self.public_net}.11")
        self.miniupnpd: dict[str, MiniUpnpd] = {}
        """The miniupnpd of each site with a port-mapping modifier."""
        self.v6: ipv6.V6Plan | None = ipv6.V6Plan(self.prefix) if ipv6.has_v6(specs) else None
        """The IPv6 addressing plan, when a site has an IPv6 profile (None: IPv4 only)."""
        self._address6: dict[str, str] = {}
        self._blocked6: list[str] = []

    # ---- construction

    @classmethod
    def create(
        cls,
        profile_a: str = "port-restricted",
        profile_b: str = "port-restricted",
        *,
        same_lan: bool = False,
        loss_a: float = 0.0,
        loss_b: float = 0.0,
        rate_a_mbit: float | None = None,
        rate_b_mbit: float | None = None,
        stun: bool = True,
        prefix: str | None = None,
    ) -> Lab:
        """Check the environment, build the namespaces and NATs, start coturn; return the lab."""
        config = LabConfig(
            profile_a=profile_a,
            profile_b=profile_b,
            same_lan=same_lan,
            loss_a=loss_a,
            loss_b=loss_b,
            rate_a_mbit=rate_a_mbit,
            rate_b_mbit=rate_b_mbit,
            stun=stun,
            prefix=prefix,
        )
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: LabConfig) -> Lab:
        """Like :meth:`create`, from a :class:`LabConfig`."""
        tools = ["ip", "iptables", "iptables-restore"]
        if config.rate_a_mbit or config.rate_b_mbit:
            tools.append("tc")
        if config.stun:
            tools.append("turnserver")
        check_environment(tools=tools)
        lab = cls(config)
        _install_exit_hooks()
        _LIVE.add(lab)
        try:
            lab._build()
        except BaseException:
            lab.close()
            raise
        return lab

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ns(self, tag: str) -> str:
        ns = f"{self.prefix}-{tag}"
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if self.v6 is not None:  # before any interface: even link-local addresses skip DAD
            _run(["ip", "netns", "exec", ns, "sysctl", "-qw", *ipv6.NO_DAD_SYSCTLS])
        return ns

    def _veth(self, ns1: str, if1: str, ns2: str, if2: str) -> None:
        for name in (if1, if2):
            if len(name) > 15:  # pragma: no cover - a programming error
                raise LabError(f"interface name too long: {name}")
        _run(["ip", "link", "add", if1, "netns", ns1, "type", "veth", "peer", "name", if2,
              "netns", ns2])  # fmt: skip
        _run(["ip", "-n", ns1, "link", "set", if1, "up"])
        _run(["ip", "-n", ns2, "link", "set", if2, "up"])

    def _tbf(self, ns: str, ifname: str, rate_mbit: float) -> None:
        # burst must hold at least one MTU-sized packet per timer tick; 64 kB is plenty here.
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "root", "tbf",
              "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "100ms"])  # fmt: skip

    def _build(self) -> None:
        p = self.prefix
        _MARKER_DIR.mkdir(parents=True, exist_ok=True)
        (_MARKER_DIR / f"{p}.pid").write_text(str(os.getpid()))
        wan = self._ns("wan")
        bridge = f"{p}br"
        _run(["ip", "-n", wan, "link", "add", bridge, "type", "bridge"])
        _run(["ip", "-n", wan, "link", "set", bridge, "up"])

        def attach(ns: str, ifname: str, addrs: Sequence[str]) -> str:
            peer = f"{ifname}p"
            self._veth(ns, ifname, wan, peer)
            _run(["ip", "-n", wan, "link", "set", peer, "master", bridge])
            for addr in addrs:
                _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname])
            return peer

        rv = self._ns("rv")
        attach(rv, f"{p}rv", [self.rendezvous_address])
        self._hosts["rendezvous"] = _Host("rendezvous", rv, self.rendezvous_address)
        st = self._ns("stun")
        attach(st, f"{p}st", list(self.stun_ips))
        self._hosts["stun"] = _Host("stun", st, self.stun_ips[0])
        v6, v6_public, v6_steps = self.v6, [rv, st], list[ipv6.Step]()
        if v6 is not None:
            v6_steps += ipv6.server_steps(v6, rv=(rv, f"{p}rv"), stun=(st, f"{p}st"))

        cfg = self.config
        sites = [("a", cfg.profile_a, cfg.loss_a, cfg.rate_a_mbit)]
        if not cfg.same_lan:
            sites.append(("b", cfg.profile_b, cfg.loss_b, cfg.rate_b_mbit))
        routed_v6: dict[str, str] = {}  # site -> its router's namespace
        for site, profile, loss, rate in sites:
            members = ["a", "b"] if cfg.same_lan else [site]
            spec = parse_site(profile)
            if spec.v4 == "open":
                for host in members:
                    ns = self._ns(host)
                    ifname = f"{p}o{host}"
                    ip = _OPEN_IP[host].replace(PUBLIC_NET, self.public_net)
                    peer = attach(ns, ifname, [ip])
                    self._hosts[host] = _Host(host, ns, ip, ip)
                    if v6 is not None and spec.v6:
                        v6_steps += ipv6.open_host_steps(
                            v6, host, spec.v6, ns=ns, ifname=ifname, loss=loss
                        )
                        self._address6[host] = v6.public(f"open_{host}")
                        v6_public.append(ns)
                    if loss:
                        _run(["ip", "netns", "exec", ns, "iptables-restore"],
                             input=impairment_rules(ifname, loss))  # fmt: skip
                    if rate:
                        self._tbf(ns, ifname, rate)
                        self._tbf(wan, peer, rate)
                continue
            nat = self._ns(f"nat-{site}")
            wan_if = f"{p}w{site}"
            # An IPv6-only site (spec.v4 None) has no IPv4 at all: its addresses are IPv6 ones.
            wan_ip = (
                _NAT_WAN_IP[site].replace(PUBLIC_NET, self.public_net)
                if spec.v4
                else ipv6.V6Plan(p).public(f"nat_{site}")
            )
            peer = attach(nat, wan_if, [wan_ip] if spec.v4 else [])
            lan_br = f"{p}l{site}"
            net = _LAN_NET[site]
            _run(["ip", "-n", nat, "link", "add", lan_br, "type", "bridge"])
            _run(["ip", "-n", nat, "link", "set", lan_br, "up"])
            if spec.v4:
                _run(["ip", "-n", nat, "addr", "add", f"{net}.1/24", "dev", lan_br])
                _run(["ip", "netns", "exec", nat, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            lan1 = f"{net}.1" if spec.v4 else ipv6.V6Plan(p).router_lan(site)
            self._hosts[f"nat_{site}"] = _Host(f"nat_{site}", nat, wan_ip, lan1)
            for i, host in enumerate(members):
                ns = self._ns(host)
                ifname = f"{p}h{host}"
                self._veth(ns, ifname, nat, f"{ifname}p")
                _run(["ip", "-n", nat, "link", "set", f"{ifname}p", "master", lan_br])
                lan_ip = f"{net}.{2 + i}" if spec.v4 else ipv6.V6Plan(p).lan_host(site, i)
                if spec.v4:
                    _run(["ip", "-n", ns, "addr", "add", f"{lan_ip}/24", "dev", ifname])
                    _run(["ip", "-n", ns, "route", "add", "default", "via", f"{net}.1"])
                self._hosts[host] = _Host(host, ns, lan_ip, lan_ip)
            if v6 is not None and spec.v6:
                hosts6 = [(self._hosts[h].ns, f"{p}h{h}") for h in members]
                v6_steps += ipv6.router_site_steps(
                    v6, site, spec.v6, ns=nat, wan_if=wan_if, lan_if=lan_br, hosts=hosts6, loss=loss
                )
                self._address6.update((h, v6.lan_host(site, i)) for i, h in enumerate(members))
                self._address6[f"nat_{site}"] = v6.public(f"nat_{site}")
                routed_v6[site] = nat
                v6_public.append(nat)
            if spec.v4:
                rules = nat_ruleset(
                    spec.v4,
                    wan_if=wan_if,
                    public_ip=wan_ip,
                    private_ip=f"{net}.2",
                    loss=loss,
                    recent_name=f"{p}{site}",
                )
                _run(["ip", "netns", "exec", nat, "iptables-restore"], input=rules)
            if rate:
                self._tbf(nat, wan_if, rate)
                self._tbf(wan, peer, rate)
            if spec.portmap:
                self.miniupnpd[site] = start_miniupnpd(
                    self, site=site, modifier=spec.portmap, ext_ifname=wan_if, lan_ifname=lan_br,
                    lan_net=net, run_dir=_MARKER_DIR / f"{p}-portmap")  # fmt: skip
        if v6 is not None:
            for site, router in routed_v6.items():
                v6_steps += ipv6.lan_route_steps(v6, site, [n for n in v6_public if n != router])
            for argv, stdin in v6_steps:
                _run(argv, input=stdin)
            self._address6.update(rendezvous=v6.public("rendezvous"), stun=v6.public("stun"))
        if cfg.stun:
            self._start_coturn()
        log.debug("lab %s up: %s", self.prefix, self.describe())

    def _start_coturn(self) -> None:
        st = self._hosts["stun"]
        # STUN (RFC 5780: two addresses, alternate port) and TURN in one coturn: STUN Binding
        # needs no credentials even with use-auth-secret, so the NAT classification is unchanged.
        # Relayed addresses live on the primary address, in a small port range; TCP listens too
        # (turn-tcp, for sites whose UDP is blocked); no TLS/DTLS, no TCP relaying (RFC 6062).
        run_dir = _MARKER_DIR / f"{self.prefix}-turn"
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = ["turnserver", "-n", "--no-cli", "--no-tls", "--no-dtls", "--no-tcp-relay",
                "--use-auth-secret", "--static-auth-secret", self.turn_secret,
                "--realm", TURN_REALM, "--relay-ip", self.stun_ips[0],
                "--min-port", str(TURN_RELAY_PORTS[0]), "--max-port", str(TURN_RELAY_PORTS[1]),
                "--listening-port", str(STUN_PORT), "--alt-listening-port", str(STUN_ALT_PORT),
                "--userdb", str(run_dir / "turndb"), "--log-file", "stdout", "--simple-log",
                "--pidfile", str(_MARKER_DIR / f"{self.prefix}-turnserver.pid")]  # fmt: skip
        # With IPv6 in the lab coturn listens on two IPv6 addresses too (RFC 5780 over IPv6).
        ips = [*self.stun_ips, *(self.v6.stun_addresses if self.v6 is not None else ())]
        for ip in ips:
            argv += ["--listening-ip", ip]
        self.popen("stun", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        want = {ipv6.bracket(ip, port) for ip in ips for port in (STUN_PORT, STUN_ALT_PORT)}
        want_tcp = {f"{self.stun_ips[0]}:{STUN_PORT}"}
        deadline = time.monotonic() + 10.0
        while True:
            out = _run(["ip", "netns", "exec", st.ns, "ss", "-Hlun"], check=False)
            out_tcp = _run(["ip", "netns", "exec", st.ns, "ss", "-Hltn"], check=False)
            if want <= set(out.split()) and want_tcp <= set(out_tcp.split()):
                return
            if time.monotonic() > deadline:
                raise LabError("coturn did not start listening on the STUN host within 10 s")
            time.sleep(0.05)

    # ---- teardown

    def close(self) -> None:
        """Stop every process started in the lab and delete its namespaces.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
        for ns in reversed(self._namespaces):
            _delete_namespace(ns)
        for name in (f"{self.prefix}.pid", f"{self.prefix}-turnserver.pid"):
            (_MARKER_DIR / name).unlink(missing_ok=True)
        shutil.rmtree(_MARKER_DIR / f"{self.prefix}-turn", ignore_errors=True)
        shutil.rmtree(_MARKER_DIR / f"{self.prefix}-portmap", ignore_errors=True)
        _LIVE.discard(self)
        log.debug("lab %s removed", self.prefix)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    # ---- queries

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace this lab created."""
        return tuple(self._namespaces)

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts present in this lab (``nat_a``/``nat_b`` are absent for ``open`` sites)."""
        return tuple(self._hosts)

    def _host(self, host: str) -> _Host:
        try:
            return self._hosts[host]
        except KeyError:
            raise LabError(
                f"this lab has no host {host!r}; it has {', '.join(self._hosts)}"
            ) from None

    def namespace(self, host: str) -> str:
        """The network namespace of ``host``."""
        return self._host(host).ns

    def address(self, host: str) -> str:
        """The address of ``host``: public for the servers and NATs, the LAN address for a and b."""
        return self._host(host).address

    def address6(self, host: str) -> str | None:
        """``host``'s IPv6 address (a LAN host's own global one: no NAT66), None without IPv6."""
        self._host(host)
        return self._address6.get(host)

    def profile(self, host: str) -> str:
        """The NAT profile in front of host ``a`` or ``b``."""
        if host == "a" or self.config.same_lan:
            return self.config.profile_a
        return self.config.profile_b

    @property
    def stun_addresses(self) -> tuple[str, str]:
        """The STUN host's two public addresses (primary first)."""
        return self.stun_ips

    @property
    def stun_server(self) -> str:
        """``host:port`` of the primary STUN address."""
        return f"{self.stun_ips[0]}:{STUN_PORT}"

    @property
    def turn_urls(self) -> tuple[str, str]:
        """coturn's TURN URLs (UDP first, then TCP) on the STUN host's primary address."""
        host = f"{self.stun_ips[0]}:{STUN_PORT}"
        return (f"turn:{host}?transport=udp", f"turn:{host}?transport=tcp")

    @property
    def rendezvous_address(self) -> str:
        """The rendezvous host's public address."""
        return RENDEZVOUS_IP.replace(PUBLIC_NET, self.public_net)

    def exec_prefix(self, host: str) -> list[str]:
        """The argv prefix that runs a command inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: prefix, profiles, and per host its namespace and address."""
        return {
            "prefix": self.prefix,
            "profile_a": self.config.profile_a,
            "profile_b": None if self.config.same_lan else self.config.profile_b,
            "same_lan": self.config.same_lan,
            "hosts": {
                h.name: {"ns": h.ns, "address": h.address}
                | ({"address6": self._address6.get(h.name)} if self.v6 is not None else {})
                for h in self._hosts.values()
            },
            "stun": list(self.stun_ips) if self.config.stun else [],
            "turn": list(self.turn_urls) if self.config.stun else [],
        }

    # ---- blocking UDP between the two sites

    def _block_rules(self, *, stun_host: bool) -> list[tuple[str, list[str]]]:
        """(namespace, rule) pairs that drop UDP between the sites (and, with ``stun_host``, to
        and from the STUN host's addresses), at each site's NAT or ``open`` host."""
        if self.config.same_lan:
            raise LabError("both hosts share one site: there is nothing between sites to block")
        rules: list[tuple[str, list[str]]] = []
        for site, other in (("a", "b"), ("b", "a")):
            remote = self._hosts.get(f"nat_{other}") or self._hosts[other]
            targets = [remote.address, *(self.stun_ips if stun_host else ())]
            targets = [ip for ip in targets if ":" not in ip]  # IPv6: _block6_rules
            gateway = self._hosts.get(f"nat_{site}")
            ns = gateway.ns if gateway is not None else self._hosts[site].ns
            for rule in udp_block_rules(nat=gateway is not None, addresses=targets):
                rules.append((ns, rule))
        return rules

    def _block6_rules(self, *, stun_host: bool) -> list[tuple[str, str]]:
        """(namespace, nft input) pairs that drop IPv6 UDP between the sites (and the STUN
        host's IPv6 addresses), at each IPv6 site's router or ``open`` host."""
        v6, out = self.v6, list[tuple[str, str]]()
        for site, other in (("a", "b"), ("b", "a")):
            if v6 is None or self._address6.get(site) is None:
                continue
            router = f"nat_{site}" in self._address6
            far = [str(v6.lan_net(other))] if f"nat_{other}" in self._address6 else []
            far += [f"{self._address6[other]}/128"] if not far and other in self._address6 else []
            far += [f"{ip}/128" for ip in v6.stun_addresses] if stun_host else []
            ns = self._hosts[f"nat_{site}" if router else site].ns
            out += [(ns, ipv6.block_ruleset(far, host=not router))] if far else []
        return out

    @property
    def udp_blocked(self) -> bool:
        """True while UDP between the two sites is dropped (:meth:`block_udp_between_sites`)."""
        return bool(self._blocked or self._blocked6)

    def block_udp_between_sites(self, *, stun_host: bool = False) -> None:
        """Drop every UDP datagram between site A and site B, at runtime.

        The sites still reach coturn (STUN, TURN over UDP and TCP) and the rendezvous: the
        network where only a relay works.  With ``stun_host`` UDP to and from the STUN host is
        dropped too (no STUN, no TURN over UDP): only TURN over TCP and the rendezvous's
        WebSocket relay are left.  Calling it again replaces the earlier block;
        :meth:`unblock_udp_between_sites` undoes it.
        """
        self.unblock_udp_between_sites()
        for ns, rule in self._block_rules(stun_host=stun_host):
            _run(["ip", "netns", "exec", ns, "iptables", "-I", *rule])
            self._blocked.append((ns, rule))
        for ns, text in self._block6_rules(stun_host=stun_host):  # IPv6 sites: both families
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text)
            self._blocked6.append(ns)

    def unblock_udp_between_sites(self) -> None:
        """Remove the rules :meth:`block_udp_between_sites` added (idempotent)."""
        while self._blocked:
            ns, rule = self._blocked.pop()
            _run(["ip", "netns", "exec", ns, "iptables", "-D", *rule], check=False)
        while self._blocked6:
            argv = ["nft", "delete", "table", "ip6", ipv6.BLOCK_TABLE]
            _run(["ip", "netns", "exec", self._blocked6.pop(), *argv], check=False)

    # ---- running things inside

    def run(
        self, host: str, argv: Sequence[str], *, check: bool = False, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside ``host``'s namespace and wait (``subprocess.run`` keywords)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run([*self.exec_prefix(host), *argv], check=check, **kwargs)

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespace; the lab stops it on close."""
        if self._closed:
            raise LabError("the lab is closed")
        proc = subprocess.Popen([*self.exec_prefix(host), *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def python(self, host: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start this interpreter (``sys.executable``) with ``args`` inside ``host``."""
        return self.popen(host, [sys.executable, *args], **kwargs)

    def classify(self, host: str, *, timeout: float = 0.5) -> dict[str, Any]:
        """Classify the NAT in front of ``host`` with pystun3 (RFC 3489) against coturn.

        Returns ``{"classic": ..., "external_ip": ..., "external_port": ...}``.
        """
        if not self.config.stun:
            raise LabError("this lab was built without a STUN server")
        argv = [sys.executable, "-m", "p2plab.lab.classic_probe", "--source-ip",
                self.address(host), "--stun-host", self.stun_ips[0], "--stun-port", str(STUN_PORT),
                "--timeout", str(timeout)]  # fmt: skip
        proc = self.run(host, argv, timeout=120)
        if proc.returncode != 0:
            raise LabError(f"classic probe failed in {host}: {proc.stderr.strip()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result


def classify_profiles(
    profiles: Sequence[str], *, timeout: float = 0.5
) -> dict[str, dict[str, Any]]:
    """Classify each profile with pystun3 against coturn; return ``{profile: result}``.

    Profiles are built two per lab (site A and site B), and the labs and probes run in threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    todo = [validate_profile(p) for p in dict.fromkeys(profiles)]
    pairs = [todo[i : i + 2] for i in range(0, len(todo), 2)]

    def one_lab(pair: list[str]) -> dict[str, dict[str, Any]]:
        with Lab.create(pair[0], pair[-1]) as lab:
            hosts = ["a", "b"] if len(pair) == 2 else ["a"]
            with ThreadPoolExecutor(len(hosts)) as pool:
                results = list(pool.map(lambda h: lab.classify(h, timeout=timeout), hosts))
            return dict(zip(pair, results, strict=True))

    out: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max(1, len(pairs))) as pool:
        for part in pool.map(one_lab, pairs):
            out.update(part)
    return {p: out[p] for p in todo}
