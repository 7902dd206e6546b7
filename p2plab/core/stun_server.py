"""Sans-I/O STUN Binding responder (RFC 8489/5389), RFC 5780 capable, RFC 3489 compatible.

One responder serves every STUN server in p2plab: ``p2plab stun-server`` and the rendezvous's
embedded STUN (:mod:`p2plab.server.stun_server`, which owns the sockets) and the simulator's STUN
server (:mod:`p2plab.lab.sim.stun_server`).  The driver hands over each datagram with the *slot*
it arrived on and gets back what to send, from which slot, to where (or nothing).

A server has up to four slots, ``(ip_index, port_index)`` in ``{0, 1} x {0, 1}``: slot
``(0, 0)`` is the primary address, and the others exist when the server has an alternate IP
and/or port (RFC 5780 section 6 needs all four).  A request is answered from the slot it arrived
on, or, with CHANGE-REQUEST, from the slot whose IP and/or port differ from that one as asked.

Answers carry XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, RESPONSE-ORIGIN, SOFTWARE and FINGERPRINT,
plus OTHER-ADDRESS and the RFC 3489 CHANGED-ADDRESS when an alternate address exists.  RFC 3489
clients (no magic cookie, e.g. pystun3) get MAPPED-ADDRESS, SOURCE-ADDRESS and CHANGED-ADDRESS
only, with their 16-byte transaction id echoed (RFC 8489 section 12 / RFC 5389 section 12.2):
pystun3 walks attributes without padding, so nothing with an unaligned length is sent to them.
A RESPONSE-PORT (RFC 5780 section 7.5) redirects the answer to that port of the source.

A CHANGE-REQUEST this server cannot honour (e.g. "change IP" with no alternate IP): RFC 5780
section 6.1 asks for a 420 (Unknown Attribute) error response listing CHANGE-REQUEST, which is
what RFC 5389+ clients get.  RFC 3489 clients get no answer instead: that is what an RFC 3489
server without the alternate address looked like to them, and pystun3 resends forever when it
gets an error response.  Both cases are counted in ``stats["change_unsupported"]``.
Unknown comprehension-required attributes get a 420 listing them (RFC 8489 section 6.3.1).

Malformed datagrams and anything that is not a Binding request are dropped and counted, never
raised.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from p2plab.core.stun import (
    CHANGE_IP,
    CHANGE_PORT,
    Address,
    Class,
    Message,
    Method,
    parse_message,
)
from p2plab.errors import LocalProtocolError, StunError

__all__ = ["DEFAULT_SOFTWARE", "RESPONDER_COUNTERS", "Slot", "StunReply", "StunResponder"]

#: The SOFTWARE attribute p2plab's STUN servers send unless told otherwise.
DEFAULT_SOFTWARE = "p2plab STUN server"

#: ``(ip_index, port_index)``: which of the server's addresses a datagram arrived on or leaves by.
Slot = tuple[int, int]

#: The keys of :attr:`StunResponder.stats`, in order.
RESPONDER_COUNTERS: tuple[str, ...] = (
    "requests",
    "legacy_requests",
    "change_requests",
    "change_unsupported",
    "malformed_dropped",
    "not_request_dropped",
)


@dataclass(frozen=True)
class StunReply:
    """One datagram the driver must send in answer to a request."""

    data: bytes
    """The encoded STUN response (success or error)."""
    slot: Slot
    """The slot (socket) to send it from; differs from the arrival slot on CHANGE-REQUEST."""
    destination: Address
    """Where to send it: the request's source, or its RESPONSE-PORT on the same IP."""
    error: bool
    """True for an error response (420), False for a Binding success response."""


def _is_unspecified(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_unspecified
    except ValueError:
        return False


class StunResponder:
    """The Binding responder of one STUN server with the given slots.

    ``addresses`` maps every slot the server has to the ``(ip, port)`` its socket is bound to;
    slot ``(0, 0)`` is required.  An unspecified IP (``0.0.0.0``, ``::``) stands for "the IP the
    request was sent to", which the driver passes as ``local_ip`` (wildcard binds make sense only
    without an alternate IP, so every slot then shares that IP).
    """

    def __init__(
        self, addresses: Mapping[Slot, Address], *, software: str | None = DEFAULT_SOFTWARE
    ) -> None:
        if (0, 0) not in addresses:
            raise LocalProtocolError("a STUN responder needs the primary slot (0, 0)")
        for slot in addresses:
            if slot[0] not in (0, 1) or slot[1] not in (0, 1):
                raise LocalProtocolError(f"STUN responder slot {slot} is not in {{0,1}}x{{0,1}}")
        self.addresses: dict[Slot, Address] = dict(addresses)
        self.software = software
        #: Counters (:data:`RESPONDER_COUNTERS`): requests seen and datagrams dropped.
        self.stats: dict[str, int] = dict.fromkeys(RESPONDER_COUNTERS, 0)
        ips = {slot[0] for slot in self.addresses}
        ports = {slot[1] for slot in self.addresses}
        self._flip = (1 if len(ips) > 1 else 0, 1 if len(ports) > 1 else 0)

    # -- the server's addresses -----------------------------------------------------------------

    def other_slot(self, slot: Slot) -> Slot | None:
        """The slot differing in IP and port (or in whichever of the two has an alternate):
        what OTHER-ADDRESS names.  None for a server with one address."""
        if self._flip == (0, 0):
            return None
        other = (slot[0] ^ self._flip[0], slot[1] ^ self._flip[1])
        return other if other in self.addresses else None

    def advertised(self, slot: Slot, local_ip: str | None = None) -> Address:
        """The address to name for ``slot`` to a client that sent to ``local_ip``."""
        ip, port = self.addresses[slot]
        if local_ip is not None and _is_unspecified(ip):
            ip = local_ip
        return (ip, port)

    # -- the datagram path ------------------------------------------------------------------------

    def handle_datagram(
        self, data: bytes, slot: Slot, source: Address, local_ip: str | None = None
    ) -> StunReply | None:
        """What to answer to ``data`` from ``source`` that arrived on ``slot`` (sent to
        ``local_ip``, needed only for wildcard binds); None when nothing is sent."""
        if slot not in self.addresses:
            raise LocalProtocolError(f"STUN responder has no slot {slot}")
        try:
            request = parse_message(data)
        except StunError:
            self.stats["malformed_dropped"] += 1
            return None
        if request.message_method != Method.BINDING or request.message_class != Class.REQUEST:
            self.stats["not_request_dropped"] += 1
            return None
        self.stats["requests"] += 1
        if request.legacy:
            self.stats["legacy_requests"] += 1

        unknown = request.unknown_comprehension_required()
        if unknown:
            return self._error(request, slot, source, unknown)

        target = slot
        change = request.attributes.get("CHANGE-REQUEST", 0)
        if change & (CHANGE_IP | CHANGE_PORT):
            self.stats["change_requests"] += 1
            wanted = (
                slot[0] ^ (1 if change & CHANGE_IP else 0),
                slot[1] ^ (1 if change & CHANGE_PORT else 0),
            )
            if wanted not in self.addresses:
                self.stats["change_unsupported"] += 1
                if request.legacy:
                    return None
                return self._error(request, slot, source, (0x0003,))
            target = wanted

        destination = source
        response_port = request.attributes.get("RESPONSE-PORT")
        if isinstance(response_port, int) and response_port > 0 and not request.legacy:
            destination = (source[0], response_port)

        origin = self.advertised(target, local_ip)
        other = self.other_slot(slot)
        other_address = None if other is None else self.advertised(other, local_ip)
        response = Message(
            Method.BINDING,
            Class.RESPONSE,
            request.transaction_id,
            magic_cookie=request.magic_cookie,
        )
        attrs = response.attributes
        if request.legacy:
            attrs["MAPPED-ADDRESS"] = source
            attrs["SOURCE-ADDRESS"] = origin
            if other_address is not None:
                attrs["CHANGED-ADDRESS"] = other_address
        else:
            attrs["XOR-MAPPED-ADDRESS"] = source
            attrs["MAPPED-ADDRESS"] = source
            attrs["RESPONSE-ORIGIN"] = origin
            if other_address is not None:
                attrs["OTHER-ADDRESS"] = other_address
                attrs["CHANGED-ADDRESS"] = other_address
            if self.software:
                attrs["SOFTWARE"] = self.software
            response.add_fingerprint()
        return StunReply(bytes(response), target, destination, error=False)

    def _error(
        self, request: Message, slot: Slot, source: Address, unknown: tuple[int, ...]
    ) -> StunReply:
        """A 420 (Unknown Attribute) listing ``unknown``, from the arrival slot."""
        response = Message(
            Method.BINDING,
            Class.ERROR,
            request.transaction_id,
            {"ERROR-CODE": (420, "Unknown Attribute"), "UNKNOWN-ATTRIBUTES": unknown},
            magic_cookie=request.magic_cookie,
        )
        if not request.legacy:
            if self.software:
                response.attributes["SOFTWARE"] = self.software
            response.add_fingerprint()
        return StunReply(bytes(response), slot, source, error=True)
