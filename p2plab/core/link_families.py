"""What a link runs over, sans-I/O: port mappings and IPv6 in the link engine (issues 18 and 19).

:class:`LinkFamilies` is the part of :class:`~p2plab.core.link.LinkEngine` that takes the
driver's port mapping (``expect_port_mapping``, ``set_port_mapping``) and IPv6 endpoint
(``set_endpoint6``), reports them to the rendezvous in ``update_udp_endpoint`` (the ``mapped``
and ``udp6`` fields), and says which address ``family`` the link runs on and whether a port
mapping made it (``method``).

**Port mapping on both sides.**  A link is made by a port mapping when its direct path runs to
or from a mapped endpoint, and both workers must say so (contracts.md's ``method``):

* the side that *sends to* the peer's mapping knows it from the offer: the path's peer address
  is the offer's ``peer_mapped`` endpoint;
* the side *reached through its own* mapping knows it from the peer's probes: every PROBE
  carries, sealed, the ``target`` address it was sent to, and the probes that came from the
  path's peer address were sent to this worker's own mapped endpoint (the session remembers the
  target per source, :meth:`~p2plab.core.session_paths.SessionPaths.probe_target`).

No new message is needed, and nothing unauthenticated counts: the target is inside the sealed
probe, and a peer that lies about it only mislabels its own link.

**The first report waits for the probe.**  The rendezvous pairs a worker on its first
``update_udp_endpoint``; an offer made before the mapping was known sends the peer punching at
the STUN endpoint only.  So a driver that starts a port-mapping probe calls
``expect_port_mapping``: reports are held until ``set_port_mapping`` says how the probe ended
(None: nothing answered) or :data:`PORT_MAPPING_WAIT_S` passed.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from p2plab.core import events as ev
from p2plab.core.addresses import is_ip_literal
from p2plab.core.crypto import Identity
from p2plab.core.link_bench import LinkBench
from p2plab.core.link_commands import LinkConfig, SendToRendezvous, endpoint_update
from p2plab.core.link_trust import offer_candidates
from p2plab.core.paths import DIRECT
from p2plab.core.session import PeerSession
from p2plab.core.signaling import P2PConnectionOffer, PortMapping

__all__ = [
    "PORT_MAPPING",
    "PORT_MAPPING_WAIT_S",
    "LinkFamilies",
    "mapping_endpoint",
    "plain_ip",
    "uses_port_mapping",
]

log = logging.getLogger("p2plab.core.link")  # the engine's log

Address = ev.Address

#: The ``method`` of a link a port mapping made.
PORT_MAPPING = "port-mapping"

#: Longest the endpoint reports wait for a port-mapping probe (``expect_port_mapping``): the
#: probe's 250 ms, a request and a retransmission or two.
PORT_MAPPING_WAIT_S = 1.0


def plain_ip(ip: str | None) -> str | None:
    """``ip`` as the wire carries an address, or None: an IPv4-mapped IPv6 literal (what an
    older rendezvous listening on ``::`` reports for an IPv4 client) as its IPv4 address, and
    None for anything that is not a plain IP literal (a name, a scoped address).  The observed
    address is the endpoint discovery falls back to, and the wire refuses the others."""
    if ip is None or "%" in ip or not is_ip_literal(ip):
        return None
    if ":" in ip:
        mapped = ipaddress.IPv6Address(ip).ipv4_mapped
        return str(mapped) if mapped is not None else ip
    return ip


def mapping_endpoint(mapping: PortMapping | None) -> Address | None:
    """The external ``(ip, port)`` of ``mapping`` (None for None)."""
    return (mapping.ip, mapping.port) if mapping is not None else None


def uses_port_mapping(
    session: PeerSession | None, peer_mapped: PortMapping | None, own: PortMapping | None
) -> bool:
    """Whether ``session``'s direct path runs to the peer's mapping (``peer_mapped``, from the
    offer) or the peer reaches us at our own (``own``, the engine's current one)."""
    if session is None or session.path != DIRECT:
        return False
    addr = session.peer_address
    if addr is None:
        return False
    if peer_mapped is not None and addr == mapping_endpoint(peer_mapped):
        return True
    return own is not None and session.probe_target(addr) == mapping_endpoint(own)


class LinkFamilies(LinkBench):
    """The engine's port mapping, IPv6 endpoint and endpoint reports (see the module docstring)."""

    local_candidates: list[Address]
    """The socket's LAN addresses (set by the engine's ``discovered``)."""

    def __init__(
        self,
        worker_id: str,
        *,
        config: LinkConfig | None,
        identity: Identity | None,
        rand_bytes: Callable[[int], bytes],
        wall_ns: Callable[[], int] | None,
    ) -> None:
        super().__init__(
            worker_id, config=config, identity=identity, rand_bytes=rand_bytes, wall_ns=wall_ns
        )
        self.port_mapping: PortMapping | None = None
        """The port the NAT mapped for the link's socket on request (``set_port_mapping``)."""
        self.endpoint6: Address | None = None
        """The socket's IPv6 endpoint learnt by STUN over IPv6 (``set_endpoint6``)."""
        self._registered = False  # ``registered`` came on the current rendezvous connection
        self._mapping_wait_until: float | None = None  # expect_port_mapping: reports held
        self._report_held = False  # a report waits for the port-mapping probe

    # -- read-only state ----------------------------------------------------------------------

    def _reachable(self, candidates: list[Address]) -> list[Address]:
        """``candidates`` without the peer's IPv6 addresses when this worker has no IPv6 of its
        own (no IPv6 endpoint, no IPv6 host candidate): it could not send to them, and their
        presence would hold its IPv4 probes back by the happy-eyeballs delay for nothing (a
        symmetric side's birthday spray then won while the other side saw a plain answer, and
        the two reported different methods).  Counted in ``candidates_other_family``.  A peer
        with IPv6 only keeps its list: the punch fails as it must and the relay carries the
        pair (an offer with no address left would be refused instead)."""
        if self.endpoint6 is not None or any(":" in a[0] for a in self.local_candidates):
            return candidates
        kept = [a for a in candidates if ":" not in a[0]]
        if not kept:
            return candidates
        self.stats["candidates_other_family"] += len(candidates) - len(kept)
        return kept

    @property
    def method(self) -> str | None:
        """How the current link was made (see ``LinkBirthday.method``), or ``port-mapping``
        when its direct path runs to or from a NAT's mapped port (both sides say so)."""
        base = super().method
        if base not in (None, "relay") and uses_port_mapping(
            self.session, self.offer.peer_mapped if self.offer else None, self.port_mapping
        ):
            return PORT_MAPPING
        return base

    @property
    def family(self) -> str | None:
        """``"ipv6"`` or ``"ipv4"``: the address family of the current link's path (of the
        peer's transport address on a TURN path); None without a link and on the rendezvous
        relay."""
        if self._state != "connected" or self.session is None:
            return None
        return self.session.family

    # -- driver inputs ------------------------------------------------------------------------

    def expect_port_mapping(self, now: float, wait_s: float = PORT_MAPPING_WAIT_S) -> None:
        """A port-mapping probe has started: hold the endpoint reports until
        :meth:`set_port_mapping` says how it ended (a mapping, or None for nothing) or
        ``wait_s`` passed, so that the offer the rendezvous makes on the first report carries
        the mapping."""
        if self._state != "stopped":
            self._mapping_wait_until = now + wait_s

    def set_port_mapping(self, mapping: PortMapping | None, now: float) -> None:
        """The port the NAT mapped for the link's socket (NAT-PMP, PCP or UPnP; None: none, the
        probe found nothing, or it was lost).  A change is announced to the rendezvous at once
        when registered, else with the next ``update_udp_endpoint``; a link already up keeps
        its path.  It also ends :meth:`expect_port_mapping`'s wait."""
        if self._state == "stopped":
            return
        self._mapping_wait_until = None
        changed = mapping != self.port_mapping
        self.port_mapping = mapping
        if changed or self._report_held:
            self._report_held = False
            self._announce_change()

    def set_endpoint6(self, addr: Address | None, now: float) -> None:
        """The socket's IPv6 endpoint as STUN over IPv6 saw it (None: no IPv6 reachability).
        Announced like :meth:`set_port_mapping`."""
        if self._state == "stopped":
            return
        value = (str(addr[0]), int(addr[1])) if addr is not None else None
        if value is not None and ":" not in value[0]:
            raise ValueError(f"set_endpoint6 wants an IPv6 address, got {value[0]!r}")
        if value == self.endpoint6:
            return
        self.endpoint6 = value
        self._announce_change()

    # -- internals ----------------------------------------------------------------------------

    def _mapping_timer(self) -> float | None:
        """When the port-mapping wait ends (None: no wait)."""
        return self._mapping_wait_until

    def _mapping_service(self, now: float) -> None:
        """End the port-mapping wait at its deadline: the held report goes out without."""
        if self._mapping_wait_until is None or now < self._mapping_wait_until:
            return
        log.info("no answer from the port-mapping probe: reporting the endpoint without")
        self._mapping_wait_until = None
        if self._report_held:
            self._report_held = False
            self._announce_change()

    def _report_endpoint(self) -> None:
        """Send ``update_udp_endpoint`` (held while a port-mapping probe runs)."""
        if self._mapping_wait_until is not None:
            self._report_held = True  # sent when the port-mapping probe ends
            return
        if self.public_endpoint is not None:
            update = endpoint_update(
                self.public_endpoint,
                self.local_candidates,
                self.nat_hint,
                mapped=self.port_mapping,
                udp6=self.endpoint6,
            )
            self._commands.append(SendToRendezvous(update))

    def _announce_change(self) -> None:
        """Report the endpoint again after a mapping or IPv6 change, if the rendezvous knows us
        (before ``registered``, or before discovery ends, the coming report carries it)."""
        if self._registered and self._state not in ("discovering", "registering"):
            self._report_endpoint()

    def _merge_offer(self, offer: P2PConnectionOffer, now: float) -> None:
        """A fresh offer about the current peer while its link runs (the rendezvous sends one
        when the peer's port mapping or IPv6 endpoint changed): the link stays; the peer's new
        addresses join the session (``add_offer_candidates``) and its mapping counts for
        ``method``.  The key and the roles stay those of the first
        offer: an offer that names another key changes nothing (counted)."""
        old, s = self.offer, self.session
        if old is None or s is None:
            return
        if offer.peer_public_key != old.peer_public_key:
            self.stats["rendezvous_unexpected"] += 1
            return
        self.offer = old.model_copy(
            update={
                "peer_udp_ip": offer.peer_udp_ip,
                "peer_udp_port": offer.peer_udp_port,
                "peer_candidates": offer.peer_candidates,
                "peer_mapped": offer.peer_mapped,
                "peer_udp6": offer.peer_udp6,
            }
        )
        candidates, refused = offer_candidates(self.offer)
        candidates = self._reachable(candidates)
        self.stats["candidates_refused"] += refused
        self.stats["offer_updates"] += 1
        if not self.relayed:  # a relayed session's upgrade rounds know the offer's already
            s.add_offer_candidates(candidates, now)
        else:
            s.add_upgrade_candidates(candidates)

    def _direct_without_birthday(self) -> bool:
        """A port mapping on either side opens a port to anyone (no birthday needed, nor the
        relay at once for two hard NATs); IPv6 on both sides needs no NAT traversal at all.
        Both sides decide alike from what they announced and were offered."""
        offer = self.offer
        if offer is None:
            return False
        if offer.peer_mapped is not None or self.port_mapping is not None:
            return True
        own_v6 = self.endpoint6 is not None or any(":" in a[0] for a in self.local_candidates)
        peer_v6 = offer.peer_udp6 is not None or any(
            ":" in str(c.ip) for c in offer.peer_candidates
        )
        return own_v6 and peer_v6
