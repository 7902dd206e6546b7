"""What a worker learns about its own addresses: STUN, NAT classification, LAN candidates, and
the NAT hint it announces for birthday punching (issue 16, :func:`nat_hint`).

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
from p2plab.aio.stun import StunProbe, StunResult
from p2plab.core.nathint import hint_from_mappings
from p2plab.core.signaling import NatHint
from p2plab.errors import ConfigError, P2PLabError

__all__ = [
    "Discovery",
    "classify_nat",
    "discover_endpoint",
    "fetch_public_ip",
    "local_candidates",
    "nat_hint",
    "probe_hint",
    "route_source",
    "split_hostport",
]

log = logging.getLogger(__name__)

#: The NAT hint's extra Bindings: each is given up after this long (a STUN server answers in
#: well under 300 ms on most paths; these only add what the first Binding already showed).
HINT_BINDING_TIMEOUT_S = 0.5
#: The whole NAT hint may delay discovery this long at most, whatever answers or not.
HINT_BUDGET_S = 1.5
#: The leaky test waits this long for the CHANGE-REQUEST's answer to reach the NAT (arriving
#: earlier ends the wait; a NAT that filters it never lets it through).
CLASH_WAIT_S = 0.2


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

    nat: NatHint | None = None
    """The NAT hint (:func:`nat_hint`) when it was asked for and STUN answered, else None."""


async def discover_endpoint(
    endpoint: UdpEndpoint,
    stun_servers: Sequence[str],
    observed_ip: str | None,
    timeout_s: float,
    *,
    hint: bool = False,
    port_range: tuple[int, int] = (1024, 65535),
    warn: bool = True,
) -> Discovery:
    """Learn ``endpoint``'s public mapping with STUN, or fall back to the observed address;
    with ``hint``, also the :func:`nat_hint` (at most :data:`HINT_BUDGET_S` more).
    ``warn=False``: no warning without STUN servers (the worker has IPv6 ones only)."""
    local_port = endpoint.local_address[1]
    fallback = (observed_ip or "127.0.0.1", local_port)
    if not stun_servers:
        if not warn:
            return Discovery(fallback, None, None)
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
    nat = await nat_hint(endpoint, result, port_range=port_range) if hint else None
    return Discovery((result.mapped[0], result.mapped[1]), info, None, nat)


def _primary(result: StunResult) -> Address | None:
    """Where the chosen server's Binding went (its resolved address)."""
    for answer in result.answers:
        if answer.server == result.server and answer.ok:
            return answer.resolved
    return None


async def nat_hint(
    endpoint: UdpEndpoint,
    first: StunResult,
    *,
    port_range: tuple[int, int] = (1024, 65535),
    clash_host: str | None = None,
) -> NatHint:
    """What ``endpoint``'s NAT does with mappings (:func:`~p2plab.core.nathint.hint_from_mappings`).

    ``first`` is the answer of the first Bindings (one per configured server, sent at once in
    configured order): their mapped addresses are the first observations.  Then, in parallel
    and bounded by :data:`HINT_BUDGET_S`: Bindings from ``endpoint`` to the chosen server's
    RFC 5780 OTHER-ADDRESS, (alt IP, alt port) then (alt IP, primary port), and the leaky test
    on a socket of its own (bound on ``clash_host``, default ``endpoint``'s address; see
    :mod:`p2plab.core.nathint`).  With one server and no OTHER-ADDRESS nothing more can be
    learnt: ``unknown`` at once.
    """
    mappings: list[Address] = [a.mapped for a in first.answers if a.ok and a.mapped is not None]
    asked = {a.resolved for a in first.answers if a.resolved is not None}
    primary = _primary(first)
    alt = first.other_address
    targets: list[Address] = []
    if alt is not None and primary is not None:
        for target in (alt, (alt[0], primary[1])):
            if target not in asked and target not in targets:
                targets.append(target)
    if not targets and len(mappings) < 2:
        return NatHint()
    probe = StunProbe(endpoint, [first.server], timeout=HINT_BINDING_TIMEOUT_S, rto=0.1, retries=3)
    # created in order, and each sends before its first await: the NAT sees them in this order
    extra = [asyncio.ensure_future(probe.binding_to(t)) for t in targets]
    clash: asyncio.Future[tuple[Address, Address] | None] | None = None
    if alt is not None and primary is not None and alt[0] != primary[0]:
        host = clash_host if clash_host is not None else endpoint.local_address[0]
        clash = asyncio.ensure_future(_clash_test(host, primary, alt))
    waiting: list[asyncio.Future[Any]] = [*extra, *([clash] if clash else [])]
    if waiting:
        _, late = await asyncio.wait(waiting, timeout=HINT_BUDGET_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    for task in extra:
        if not task.cancelled() and task.exception() is None:
            answer = task.result()
            if answer.ok and answer.mapped is not None:
                mappings.append(answer.mapped)
    clash_seen = None
    if clash is not None and not clash.cancelled() and clash.exception() is None:
        clash_seen = clash.result()
    hint = hint_from_mappings(
        mappings,
        clash_reference=clash_seen[0] if clash_seen else None,
        clash_mapping=clash_seen[1] if clash_seen else None,
        port_range=port_range,
    )
    log.info("NAT hint: %s from mappings %s, clash test %s", hint, mappings, clash_seen)
    return hint


async def _clash_test(host: str, primary: Address, alt: Address) -> tuple[Address, Address] | None:
    """The leaky test (:mod:`p2plab.core.nathint`) on a fresh socket: its mapping towards
    ``primary``, then towards ``alt`` after an unsolicited packet from ``alt`` (the answer to a
    CHANGE-REQUEST) reached that mapping.  None when a Binding was not answered."""
    try:
        ep = await UdpEndpoint.bind(host, 0)
    except OSError as exc:
        log.info("NAT hint: no socket for the clash test: %s", exc)
        return None
    try:
        probe = StunProbe(ep, [primary], timeout=HINT_BINDING_TIMEOUT_S, rto=0.1, retries=3)
        reference = await probe.binding_to(primary)
        if not reference.ok or reference.mapped is None:
            return None
        changed = asyncio.ensure_future(probe.binding_to(primary, change_ip=True, change_port=True))
        await asyncio.wait([changed], timeout=CLASH_WAIT_S)
        changed.cancel()
        await asyncio.gather(changed, return_exceptions=True)
        after = await probe.binding_to(alt)
        if not after.ok or after.mapped is None:
            return None
        return reference.mapped, after.mapped
    finally:
        ep.close()


async def probe_hint(servers: Sequence[str], host: str = "0.0.0.0") -> NatHint:
    """The NAT hint of a fresh socket on ``host`` (``p2plab probe``); unknown when no server
    answers."""
    try:
        ep = await UdpEndpoint.bind(host, 0)
    except OSError as exc:
        log.info("NAT hint unavailable: %s", exc)
        return NatHint()
    try:
        try:
            first = await StunProbe(ep, list(servers)).mapped_address()
        except P2PLabError as exc:
            log.info("NAT hint unavailable: %s", exc)
            return NatHint()
        return await nat_hint(ep, first)
    finally:
        ep.close()


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
