"""Whether a host is an IP address literal: the one check behind "never resolve a name".

Candidates in signaling, the link engine's offers, the UDP endpoint's sends, the STUN client and
the worker page's Host check all ask it (issue 14 item 3: a blocking lookup of a name a peer
chose froze a worker's loop for ~54 s).
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_ip_literal"]

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
