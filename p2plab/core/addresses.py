"""Addresses as the security checks see them: whether a host is an IP address literal (the one
check behind "never resolve a name"), and the unit a per-source limit counts in.

Candidates in signaling, the link engine's offers, the UDP endpoint's sends, the STUN client and
the worker page's Host check all ask it (issue 14 item 3: a blocking lookup of a name a peer
chose froze a worker's loop for ~54 s).
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_ip_literal", "source_key"]

#: Hosts already found to be IP literals (bounded; cleared when full): on the send path the
#: check runs once per peer address, not once per datagram.
_LITERALS: set[str] = set()
_LITERALS_MAX = 4096


def is_ip_literal(host: object) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address literal (never a name to resolve)."""
    if host in _LITERALS:
        return True
    if not isinstance(host, str):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    if len(_LITERALS) >= _LITERALS_MAX:
        _LITERALS.clear()
    _LITERALS.add(host)
    return True


def source_key(ip: str | None) -> str:
    """The unit per-source limits count in: the IPv4 address, or the /64 of an IPv6 one (one
    host or site holds a whole /64, so per-address buckets would let it rotate through a
    table); an IPv4-mapped IPv6 address counts as its IPv4 address."""
    if not ip:
        return "?"
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip[:64]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)
