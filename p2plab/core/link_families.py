"""What a direct link runs over, sans-I/O: which address family, and whether a NAT's port
mapping made it (issues 18 and 19; the engine's ``family`` and ``method`` properties).

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
"""

from __future__ import annotations

from typing import Any

from p2plab.core.paths import DIRECT
from p2plab.core.session import PeerSession
from p2plab.core.signaling import PortMapping

__all__ = ["PORT_MAPPING", "mapping_endpoint", "port_mapping_block", "uses_port_mapping"]

#: The ``method`` of a link a port mapping made.
PORT_MAPPING = "port-mapping"


def mapping_endpoint(mapping: PortMapping | None) -> tuple[str, int] | None:
    """The external ``(ip, port)`` of ``mapping`` (None for None)."""
    return (mapping.ip, mapping.port) if mapping is not None else None


def port_mapping_block(mapping: PortMapping | None) -> dict[str, Any] | None:
    """The status's ``port_mapping`` block for the mapping the engine announces, in the keys
    of the port-mapping driver's own report (which the worker shows instead when it runs):
    ``protocols`` answered (here only the one that mapped), ``protocol``, ``external``
    endpoint, ``lease_s``; None without a mapping."""
    if mapping is None:
        return None
    return {
        "protocols": [mapping.protocol],
        "protocol": mapping.protocol,
        "external": f"{mapping.ip}:{mapping.port}",
        "lease_s": mapping.lifetime_s,
    }


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
