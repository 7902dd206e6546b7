"""IPv6 beside IPv4 (issue 19): the worker's second UDP socket, its IPv6 host candidates and its
IPv6 endpoint learnt by STUN over IPv6.

One socket per family, like Tailscale's magicsock (``pconn4``/``pconn6``), never one dual-stack
socket: a dual-stack socket reports IPv4 peers as v4-mapped IPv6 addresses
(``::ffff:192.0.2.1``), which would then leak into every address comparison of the engine, the
session and the rendezvous.  So the IPv6 socket is bound with ``IPV6_V6ONLY`` (which also lets it
take the IPv4 socket's port number), the engine sees plain 2-tuples of either family
(``("2001:db8::1", 5000)``), and the worker sends a datagram on the IPv6 socket when
``":" in addr[0]``.

Which socket to open (``WorkerConfig.ipv6``, ``--ipv6``, ``P2P_IPV6``):

* ``off``: none.
* ``auto``: when the kernel has an IPv6 route, to an IPv6 rendezvous or STUN server or to a
  global address (the default route); no route, or IPv6 disabled: no socket and no error.
  A loopback-only setup (every rendezvous and STUN host on loopback: tests, ``make demo``)
  opens it only when one of them is ``::1``, on ``::1``, and announces ``::1`` as its only host
  candidate: a test on 127.0.0.1 never sees the host's real IPv6 addresses, and a test on
  ``::1`` needs no global address.

Host candidates are the global-scope addresses of the host (``/proc/net/if_inet6``: never
link-local, loopback, tentative, deprecated or failed addresses), at most
:data:`MAX_HOST_CANDIDATES6` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from p2plab.aio.endpoint import Address, UdpEndpoint
from p2plab.aio.status import format_address
from p2plab.aio.stun import StunProbe
from p2plab.core.stun import parse_server_address
from p2plab.errors import ConfigError, P2PLabError

__all__ = [
    "IPV6_MODES",
    "MAX_HOST_CANDIDATES6",
    "Discovery6",
    "bind6",
    "check_ipv6_mode",
    "discover6",
    "family_of",
    "host_addresses6",
    "ipv6_bind_host",
    "ipv6_block",
    "is_v6",
    "local_candidates6",
    "loopback_only",
    "probe_ipv6",
    "setup_hosts",
    "split_stun_servers",
]

log = logging.getLogger(__name__)

#: The values of ``WorkerConfig.ipv6`` / ``--ipv6``.
IPV6_MODES = ("off", "auto")
#: At most this many IPv6 host candidates (a host with privacy addresses may hold many; the
#: register carries 8 candidates of both families in all).
MAX_HOST_CANDIDATES6 = 4
#: Any global unicast address: whether the kernel routes to it says whether the host has an
#: IPv6 default route (connecting a UDP socket sends nothing).
_GLOBAL_PROBE = "2001:db8::1"
#: ``/proc/net/if_inet6`` flags of addresses that must not be announced (IFA_F_DADFAILED,
#: IFA_F_DEPRECATED, IFA_F_TENTATIVE).
_BAD_FLAGS = 0x08 | 0x20 | 0x40
_IF_INET6 = "/proc/net/if_inet6"


def check_ipv6_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`IPV6_MODES`, else ConfigError."""
    if mode not in IPV6_MODES:
        raise ConfigError(f"ipv6 must be one of {', '.join(IPV6_MODES)}, got {mode!r}")
    return mode


def is_v6(host: str) -> bool:
    """Whether ``host`` is an IPv6 literal (names and IPv4 literals are not)."""
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def setup_hosts(rendezvous_url: str, stun_servers: Sequence[str]) -> list[str]:
    """The hosts a worker talks to: the rendezvous's and the STUN servers' (names or literals)."""
    hosts: list[str] = []
    with contextlib.suppress(ValueError):
        host = urlsplit(rendezvous_url).hostname
        if host:
            hosts.append(host)
    for spec in stun_servers:
        with contextlib.suppress(ConfigError):
            hosts.append(parse_server_address(spec)[0])
    return hosts


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_only(hosts: Sequence[str]) -> bool:
    """Whether every host is on loopback (tests, ``make demo``; none at all counts too)."""
    return all(_is_loopback(h) for h in hosts)


def _routes_to(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
        return True
    except OSError:
        return False


def ipv6_bind_host(
    mode: str, rendezvous_url: str, stun_servers: Sequence[str], udp6_host: str | None
) -> str | None:
    """Where the IPv6 socket binds under ``mode`` (module docstring), or None for no socket.

    ``udp6_host`` is ``WorkerConfig.udp6_host`` (None: ``::``, or ``::1`` on loopback)."""
    if check_ipv6_mode(mode) == "off" or not socket.has_ipv6:
        return None
    hosts = setup_hosts(rendezvous_url, stun_servers)
    if loopback_only(hosts):
        if "::1" not in {str(ipaddress.ip_address(h)) for h in hosts if is_v6(h)}:
            return None
        host = udp6_host or "::1"
    else:
        v6_targets = [h for h in hosts if is_v6(h)]
        if not any(_routes_to(t) for t in [*v6_targets, _GLOBAL_PROBE]):
            log.info("IPv6: no route; the worker runs on IPv4 only")
            return None
        host = udp6_host or "::"
    return host


def bind6(loop: asyncio.AbstractEventLoop, host: str, port: int) -> UdpEndpoint | None:
    """The IPv6 socket on ``host``, on ``port`` (the IPv4 socket's number) when free, else any
    port; None when IPv6 is unavailable (disabled, no such address): the worker runs on IPv4."""
    for candidate in (port, 0) if port else (0,):
        try:
            return UdpEndpoint.bind_now(loop, host, candidate)
        except OSError as exc:
            if candidate and exc.errno == errno.EADDRINUSE:  # EADDRINUSE: any port will do
                continue
            log.info("IPv6: cannot bind [%s]:%d (%s); IPv4 only", host, candidate, exc)
            return None
    return None


def host_addresses6(path: str = _IF_INET6) -> list[str]:
    """The host's global-scope IPv6 addresses (ULA included, as RFC 1918 addresses are for
    IPv4), usable ones only, in the kernel's order; empty without IPv6."""
    found: list[str] = []
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or len(fields[0]) != 32:
            continue
        try:
            scope, flags = int(fields[3], 16), int(fields[4], 16)
            addr = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        except ValueError:
            continue
        if scope != 0 or flags & _BAD_FLAGS:
            continue
        if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.ipv4_mapped:
            continue
        if str(addr) not in found:
            found.append(str(addr))
    return found


def local_candidates6(
    local: Address, rendezvous_url: str, stun_servers: Sequence[str]
) -> list[Address]:
    """The IPv6 host candidates of the socket bound to ``local``: its bind address, or
    (wildcard) the host's global addresses; ``::1`` only in a loopback-only setup."""
    host, port = local
    if host != "::":
        return [(host, port)]
    if loopback_only(setup_hosts(rendezvous_url, stun_servers)):
        return [("::1", port)]
    return [(a, port) for a in host_addresses6()[:MAX_HOST_CANDIDATES6]]


def split_stun_servers(servers: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The STUN servers to ask over IPv4 and over IPv6: a literal goes to its family, a name to
    both (it is resolved per family: A over IPv4, AAAA over IPv6)."""
    v4: list[str] = []
    v6: list[str] = []
    for spec in servers:
        try:
            host = parse_server_address(spec)[0]
        except ConfigError:
            v4.append(spec)  # the IPv4 probe reports it as it always did
            continue
        if is_v6(host):
            v6.append(spec)
            continue
        v4.append(spec)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            v6.append(spec)  # a name: AAAA over IPv6
    return tuple(v4), tuple(v6)


@dataclass(frozen=True)
class Discovery6:
    """What STUN over IPv6 said of the IPv6 socket."""

    endpoint: Address | None
    """The IPv6 server-reflexive endpoint (equal to the host's address without NAT66), or None
    when no server answered or none was asked."""
    stun_info: dict[str, Any] | None
    """``{"server": "[h]:p", "rtt_ms": ...}`` when a server answered."""
    error: str | None = None
    """Why no server answered (None when one did or none was asked)."""

    @property
    def reachable(self) -> bool | None:
        """A STUN Binding over IPv6 was answered (None: none was asked)."""
        if self.endpoint is not None:
            return True
        return None if self.error is None else False


async def discover6(endpoint: UdpEndpoint, servers: Sequence[str], timeout_s: float) -> Discovery6:
    """STUN over IPv6 from ``endpoint`` to ``servers`` (IPv6 literals or names with AAAA)."""
    if not servers:
        return Discovery6(None, None)
    try:
        probe = StunProbe(endpoint, list(servers))
        result = await asyncio.wait_for(probe.mapped_address(), timeout_s)
    except (TimeoutError, P2PLabError) as exc:
        log.info("STUN over IPv6 failed: %s", exc)
        return Discovery6(None, None, f"STUN over IPv6 failed: {exc}")
    info = {"server": format_address(result.server), "rtt_ms": round(result.rtt_s * 1000, 3)}
    return Discovery6((result.mapped[0], result.mapped[1]), info)


def family_of(addr: Address | None) -> str | None:
    """``"ipv4"`` or ``"ipv6"`` for a real address, None for none or a pseudo-address."""
    if addr is None:
        return None
    try:
        version = ipaddress.ip_address(addr[0]).version
    except ValueError:
        return None
    return "ipv6" if version == 6 else "ipv4"


def ipv6_block(
    socket6: Address | None,
    endpoint6: Address | None,
    discovery6: Discovery6 | None,
    candidates: Sequence[Address],
) -> dict[str, Any]:
    """The ``ipv6`` block of the worker's status.

    ``enabled``: an IPv6 socket is open; ``socket``: its local address; ``endpoint``: the IPv6
    endpoint STUN over IPv6 saw (what the engine announces as ``udp6``); ``reachable``: a STUN
    Binding over IPv6 was answered (None: none asked yet, or no IPv6 STUN server);
    ``candidates``: the IPv6 host candidates announced; ``nat66``: the endpoint's address is
    none of the host's (None: unknown); ``stun``: the server that answered and its RTT.
    """
    v6_candidates = [format_address(c) for c in candidates if ":" in c[0]]
    nat66: bool | None = None
    if endpoint6 is not None and v6_candidates:
        nat66 = endpoint6[0] not in {c[0] for c in candidates}
    return {
        "enabled": socket6 is not None,
        "socket": format_address(socket6) if socket6 is not None else None,
        "endpoint": format_address(endpoint6) if endpoint6 is not None else None,
        "reachable": discovery6.reachable if discovery6 is not None else None,
        "candidates": v6_candidates,
        "nat66": nat66,
        "stun": discovery6.stun_info if discovery6 is not None else None,
    }


async def probe_ipv6(
    servers: Sequence[str],
    *,
    host: str = "::",
    request_timeout: float = 3.0,
    rto: float = 0.25,
    retries: int = 6,
) -> dict[str, Any]:
    """``p2plab probe``'s ``ipv6`` block: STUN over IPv6 from a fresh IPv6 socket on ``host``.

    ``tested``: an IPv6 STUN server was given (IPv6 literal, or a name, asked for AAAA) and an
    IPv6 socket could be bound; ``reachable``: a Binding over IPv6 was answered; ``mapped`` and
    ``local``: the endpoint the server saw and ours towards it; ``nat66``: they differ (False:
    no NAT66, the usual case, where only a firewall may filter); ``mapping`` and ``filtering``:
    the RFC 5780 behaviour tests of :mod:`p2plab.core.nat` over IPv6 (``filtering`` needs a
    server with an alternate address, else ``unknown`` and a note); ``servers``, ``notes`` and
    ``error`` as in the IPv4 report.
    """
    block: dict[str, Any] = {
        "tested": False,
        "reachable": None,
        "mapped": None,
        "local": None,
        "nat66": None,
        "mapping": "unknown",
        "filtering": "unknown",
        "other_address": None,
        "servers": [],
        "notes": [],
        "error": None,
    }
    servers6 = split_stun_servers(servers)[1]
    if not servers6:
        block["error"] = "no IPv6 STUN server given (an IPv6 literal in brackets, or a name)"
        return block
    try:
        endpoint = await UdpEndpoint.bind(host, 0)
    except OSError as exc:
        block["error"] = f"no IPv6 socket: {exc}"
        return block
    block["tested"] = True
    try:
        probe = StunProbe(
            endpoint, list(servers6), timeout=request_timeout, rto=rto, retries=retries
        )
        report = await probe.nat_report(classic=False, hairpin=False)
    except P2PLabError as exc:
        block.update(reachable=False, error=str(exc))
        return block
    finally:
        endpoint.close()
    d = report.to_dict()
    block.update(
        reachable=True,
        mapped=format_address(report.mapped) if report.mapped else None,
        local=format_address(report.local) if report.local else None,
        nat66=report.behind_nat,
        mapping=d["mapping"],
        filtering=d["filtering"],
        other_address=format_address(report.other_address) if report.other_address else None,
        servers=d["servers"],
        notes=d["notes"],
    )
    return block
