"""What a worker learns about its own addresses: STUN, NAT classification, LAN candidates.

The link engine asks for discovery (:class:`~p2plab.core.link.DiscoverEndpoint`); the worker runs
:func:`discover_endpoint` and :func:`local_candidates` and hands the answer back.  These are the
I/O half of discovery; every decision about what to do with the answer is the engine's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from p2plab.aio.endpoint import Address, UdpEndpoint
from p2plab.aio.stun import StunProbe
from p2plab.errors import ConfigError, P2PLabError

__all__ = [
    "Discovery",
    "classify_nat",
    "discover_endpoint",
    "fetch_public_ip",
    "local_candidates",
    "route_source",
    "split_hostport",
]

log = logging.getLogger(__name__)


def split_hostport(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a pair; raises ConfigError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def route_source(host: str) -> str | None:
    """Local address the kernel would use to reach ``host`` (UDP connect sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, 9, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(infos[0][4])
            return str(s.getsockname()[0])
    except OSError:
        return None


def local_candidates(
    local: Address, rendezvous_url: str, stun_servers: Sequence[str]
) -> list[Address]:
    """The socket's LAN addresses: its bind address, or the sources of the routes to the
    rendezvous and the STUN servers when it is bound to the wildcard."""
    host, port = local
    addrs: list[str] = []
    if host not in ("0.0.0.0", "::"):
        addrs.append(host)
    else:
        targets = [urlsplit(rendezvous_url).hostname or ""]
        targets += [split_hostport(s)[0] for s in stun_servers]
        for target in targets:
            src = route_source(target) if target else None
            if src and src not in addrs:
                addrs.append(src)
    return [(a, port) for a in addrs]


@dataclass(frozen=True)
class Discovery:
    """The public endpoint of a socket and how it was learnt."""

    public: Address
    """The endpoint peers should punch towards."""

    stun_info: dict[str, Any] | None
    """``{"server": "h:p", "rtt_ms": ...}`` when STUN answered, else None."""

    error: str | None
    """Why discovery fell back to the observed address, or None."""


async def discover_endpoint(
    endpoint: UdpEndpoint,
    stun_servers: Sequence[str],
    observed_ip: str | None,
    timeout_s: float,
) -> Discovery:
    """Learn ``endpoint``'s public mapping with STUN, or fall back to the observed address."""
    local_port = endpoint.local_address[1]
    fallback = (observed_ip or "127.0.0.1", local_port)
    if not stun_servers:
        log.warning(
            "no STUN server configured (--stun host:port): using the address the rendezvous "
            "observed (%s) with the local port %d. For NATs, configure a STUN server, e.g. "
            "a public one such as stun.l.google.com:19302.",
            observed_ip,
            local_port,
        )
        return Discovery(fallback, None, None)
    probe = StunProbe(endpoint, list(stun_servers))
    try:
        result = await asyncio.wait_for(probe.mapped_address(), timeout_s)
    except (TimeoutError, P2PLabError) as exc:
        log.warning("STUN failed (%s); falling back to the observed address", exc)
        return Discovery(fallback, None, f"STUN failed: {exc}")
    info = {
        "server": f"{result.server[0]}:{result.server[1]}",
        "rtt_ms": round(result.rtt_s * 1000, 3),
    }
    return Discovery((result.mapped[0], result.mapped[1]), info, None)


async def classify_nat(udp_host: str, stun_servers: Sequence[str]) -> dict[str, Any] | None:
    """RFC 5780 classification (``mapping``, ``filtering``, ``classic``), on a socket of its own.

    The behaviour tests (CHANGE-REQUEST, the alternate address) make some NATs hand out new
    mappings (natlab.md's "leaky" profile); on the punching socket that would change the very
    mapping the peer was told to punch towards.  A NAT's behaviour is per NAT, not per
    socket, so a second socket classifies it just as well.
    """
    try:
        probe_endpoint = await UdpEndpoint.bind(udp_host, 0)
    except OSError as exc:
        log.info("NAT classification unavailable: %s", exc)
        return None
    try:
        report = await StunProbe(probe_endpoint, list(stun_servers)).nat_report(classic=False)
    except Exception as exc:
        log.info("NAT classification unavailable: %s", exc)
        return None
    finally:
        probe_endpoint.close()
    d = report.to_dict()
    return {k: d.get(k) for k in ("mapping", "filtering", "classic")}


async def fetch_public_ip(url: str) -> str | None:
    """The HTTP-derived public IP from an IP-echo URL (only ever the one the user set)."""
    import httpx  # optional dependency, only for PUBLIC_IP_URL

    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            resp = await client.get(url)
            resp.raise_for_status()
            return resp.text.strip()[:64] or None
    except (httpx.HTTPError, OSError) as exc:
        log.warning("could not learn the public IP from %s: %s", url, exc)
        return None
