"""Path names and the pseudo-addresses of TURN paths, sans-I/O (issue 17).

A link runs on one of four paths, named the same way in the engine, the status, events, the
page and result rows (contracts.md), best first:

* ``direct``: a punched UDP pair between the two link sockets;
* ``turn-udp``: through a TURN allocation reached over UDP (ours, or the peer's);
* ``turn-tcp``: through a TURN allocation reached over TCP;
* ``relay``: the rendezvous WebSocket (the last resort, 32 KiB/s).

Within ``direct``, an IPv6 pair ranks above an IPv4 one (issue 19, Tailscale's and libp2p's
order): :func:`address_family` names the family of a peer address, :func:`family_rank` orders
them, and :data:`HAPPY_EYEBALLS_DELAY` is how long IPv4 candidates wait behind IPv6 ones.

The peer session is address-agnostic: it probes and nominates addresses.  A datagram that came
through *our own* allocation (a TURN ``PeerData``) is handed to it from a pseudo-address that
names the path and the peer's transport address as the TURN server saw it,
``("turn-udp|203.0.113.5", 40000)`` (:func:`turn_address`); the engine sends whatever the session
addresses there back through the allocation (:func:`parse_turn_address`).  The ``|`` cannot occur
in an IP literal nor a host name, so no real address parses as one.  The peer's own relayed
address (trickled in a ``candidates`` message) is a real UDP address the session probes from the
link socket; the session remembers its transport to name the path.
"""

from __future__ import annotations

from typing import Final, Literal

from p2plab.core.addresses import is_ip_literal

__all__ = [
    "DIRECT",
    "FAMILIES",
    "HAPPY_EYEBALLS_DELAY",
    "PATH_NAMES",
    "RELAY_ADDRESS",
    "RELAY_PATH",
    "TURN_TCP",
    "TURN_UDP",
    "Address",
    "address_family",
    "family_rank",
    "parse_turn_address",
    "path_name",
    "path_rank",
    "turn_address",
    "turn_path",
]

Address = tuple[str, int]
Transport = Literal["udp", "tcp"]

DIRECT: Final = "direct"
TURN_UDP: Final = "turn-udp"
TURN_TCP: Final = "turn-tcp"
RELAY_PATH: Final = "relay"
#: Every path name, best first (the order of issue 17's ranking).
PATH_NAMES: Final = (DIRECT, TURN_UDP, TURN_TCP, RELAY_PATH)

_SEP = "|"

#: Address families, best first: IPv6 needs no NAT and is tried first (Tailscale ranks IPv6
#: paths above IPv4 ones; libp2p dials IPv6 first).
FAMILIES: Final = ("ipv6", "ipv4")

#: Seconds IPv4 candidates wait behind IPv6 ones at the start of punching, when the peer offers
#: both (libp2p's happy-eyeballs delay; RFC 8305 suggests 250 ms too): long enough that a
#: working IPv6 pair usually validates first, short enough that a broken one costs little.
HAPPY_EYEBALLS_DELAY: Final = 0.25

#: Pseudo-address of the rendezvous relay: a session whose only candidate is this talks to its
#: peer through the rendezvous (``link_commands.RELAY``).  The port is 1 because the session
#: ignores candidates with port 0.
RELAY_ADDRESS: Final[Address] = ("relay", 1)


def turn_path(transport: str) -> str:
    """The path name of a TURN allocation reached over ``transport`` (``udp`` or ``tcp``)."""
    return TURN_TCP if transport == "tcp" else TURN_UDP


def path_rank(path: str) -> int:
    """0 for the best path (direct), larger for worse ones (unknown names last)."""
    return PATH_NAMES.index(path) if path in PATH_NAMES else len(PATH_NAMES)


def turn_address(peer: Address, transport: str) -> Address:
    """The pseudo-address under which the session sees ``peer`` through our allocation."""
    return (f"{turn_path(transport)}{_SEP}{peer[0]}", int(peer[1]))


def parse_turn_address(addr: object) -> tuple[str, Address] | None:
    """``(path name, peer transport address)`` of a pseudo-address made by
    :func:`turn_address`, or None for anything else (a real address, :data:`RELAY`, junk)."""
    if not isinstance(addr, tuple) or len(addr) != 2:
        return None
    host, port = addr
    if not isinstance(host, str) or not isinstance(port, int) or _SEP not in host:
        return None
    path, _, ip = host.partition(_SEP)
    if path not in (TURN_UDP, TURN_TCP) or not is_ip_literal(ip) or not 0 < port < 65536:
        return None
    return path, (ip, port)


def address_family(addr: Address | None) -> str | None:
    """``"ipv6"`` or ``"ipv4"``: the family of a peer address (of the peer's transport address
    for a pseudo-address of our own TURN allocation); None for :data:`RELAY_ADDRESS`, None and
    anything that is not an IP literal."""
    if addr is None or addr == RELAY_ADDRESS:
        return None
    parsed = parse_turn_address(addr)
    host = parsed[1][0] if parsed is not None else addr[0]
    if not isinstance(host, str) or not is_ip_literal(host):
        return None
    return "ipv6" if ":" in host else "ipv4"


def family_rank(addr: Address | None) -> int:
    """0 for an IPv6 address, 1 for IPv4, 2 for anything else (see :data:`FAMILIES`)."""
    family = address_family(addr)
    return FAMILIES.index(family) if family is not None else len(FAMILIES)


def path_name(addr: Address | None, relays: dict[Address, str] | None = None) -> str | None:
    """The name of the path to the peer at ``addr``: ``relay`` for :data:`RELAY_ADDRESS`, the
    TURN path of a pseudo-address, the path of a peer relayed address in ``relays`` (address ->
    path name), else ``direct``; None for None."""
    if addr is None:
        return None
    if addr == RELAY_ADDRESS:
        return RELAY_PATH
    parsed = parse_turn_address(addr)
    if parsed is not None:
        return parsed[0]
    if relays is not None and addr in relays:
        return relays[addr]
    return DIRECT
