"""Sans-I/O STUN Binding responder (RFC 8489/5389), RFC 5780 capable, RFC 3489 compatible.

One responder serves every STUN server in p2plab: ``p2plab stun-server`` and the rendezvous's
embedded STUN (:mod:`p2plab.server.stun_server`, which owns the sockets) and the simulator's STUN
server (:mod:`p2plab.lab.sim.stun_server`).  The driver hands over each datagram with the *slot*
it arrived on and gets back what to send, from which slot, to where (or nothing).

A server has up to four slots, ``(ip_index, port_index)`` in ``{0, 1} x {0, 1}``: slot
``(0, 0)`` is the primary address, and the others exist when the server has an alternate IP
and/or port (RFC 5780 section 6 needs all four).  A request is answered from the slot it arrived
on, or, with CHANGE-REQUEST, from the slot whose IP and/or port differ from that one as asked.

Answers are no larger than the request's flavour needs, because a STUN server is a reflector
(issue 14, finding 9: the old answers were 4.4-5.6x the request, SOFTWARE always included):

* an RFC 5389/8489 request gets XOR-MAPPED-ADDRESS, plus FINGERPRINT only if it carried one;
* on a server with a second address, OTHER-ADDRESS as well (RFC 5780 section 4.2: test I is a
  plain Binding request and OTHER-ADDRESS in its answer is how a client learns the server does
  behaviour discovery), and RESPONSE-ORIGIN only when the request has a CHANGE-REQUEST (any
  flags, even none), i.e. when it is a discovery request that compares where answers come from;
* an RFC 3489 client (no magic cookie, e.g. pystun3) gets MAPPED-ADDRESS, plus CHANGED-ADDRESS on
  a server with a second address (its classic test I needs it), with its 16-byte transaction id
  echoed (RFC 8489 section 12 / RFC 5389 section 12.2); pystun3 walks attributes without
  padding, so nothing with an unaligned length is sent to them;
* SOFTWARE only when the operator opts in (``software="..."``), never in RFC 3489 answers;
* and as a backstop nothing is sent that is more than :data:`MAX_AMPLIFICATION` times the
  request's size (counted ``oversize_dropped``; no answer built here reaches it).

Worst cases measured (``experiments/security_audit.py``): 1.6x for a 20-byte request to a
one-address server, 2.2x to a two-address one (OTHER-ADDRESS), 2.33x for a 420.

Before answering, two cheap refusals (both counted, nothing is sent):

* source ports of UDP reflection services (:data:`REFLECTION_PORTS`: every port below 1024, plus
  the well-known amplifiers above it): a spoofed request "from" a victim's DNS, NTP, chargen or
  memcached port would make us the first leg of a ping-pong or reflection; no STUN client binds
  there (Linux, Windows and macOS pick ephemeral ports from 1024 up, NATs map into that range);
* a per-source-IP token bucket (IPv6: per /64; :class:`SourceLimiter`, default
  :data:`DEFAULT_RATE_PER_S` per second, burst :data:`DEFAULT_BURST`), in a table of at most
  :data:`DEFAULT_MAX_SOURCES` sources that forgets the least recently seen first (forgetting
  only ever makes a source's limit fresh again, never shuts out a legitimate client).  A
  discovery run is 3-6 requests, retransmissions included 10-20, so the burst covers one; a
  spoofed victim receives at most ``rate`` answers per second from this server.  Time is the
  driver's ``now`` (sans-I/O).

A RESPONSE-PORT (RFC 5780 section 7.5) redirects the answer to that port of the source (which is
checked against the reflection ports as well).

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

from p2plab.core.addresses import source_key
from p2plab.core.ratelimit import RateLimiter
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

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_MAX_SOURCES",
    "DEFAULT_RATE_PER_S",
    "DEFAULT_SOFTWARE",
    "MAX_AMPLIFICATION",
    "REFLECTION_PORTS",
    "RESPONDER_COUNTERS",
    "Slot",
    "SourceLimiter",
    "StunReply",
    "StunResponder",
    "is_reflection_port",
]

#: A SOFTWARE text an operator may opt in to (``software=DEFAULT_SOFTWARE``); none is sent by
#: default: it only makes answers bigger and tells a scanner what runs here.
DEFAULT_SOFTWARE = "p2plab STUN server"

#: Answers per second one source IP gets, after its burst (token bucket refill rate).
DEFAULT_RATE_PER_S = 20.0
#: Answers one source IP may get at once (bucket size): a whole discovery run with retries.
DEFAULT_BURST = 40.0
#: Source IPs whose buckets are remembered; the least recently seen is forgotten past this.
DEFAULT_MAX_SOURCES = 10_000
#: No answer is sent that is more than this many times the request's size (a backstop).
MAX_AMPLIFICATION = 3.0

#: Source ports above 1023 that belong to well-known UDP reflection/amplification services
#: (every port below 1024 is refused as well): SSDP 1900, MS-SQL browser 1434, Apple Remote
#: Desktop 3283, WS-Discovery 3702, mDNS 5353, CoAP 5683, Ubiquiti discovery 10001,
#: memcached 11211.  The ones below 1024 include echo 7, chargen 19, DNS 53, NTP 123, SNMP 161,
#: CLDAP 389 and NetBIOS 137.
REFLECTION_PORTS: frozenset[int] = frozenset({1434, 1900, 3283, 3702, 5353, 5683, 10001, 11211})


def is_reflection_port(port: int) -> bool:
    """True for a source port this server never answers: below 1024 (well-known services,
    port 0 included) or one of :data:`REFLECTION_PORTS`."""
    return port < 1024 or port in REFLECTION_PORTS


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
    "reflection_port_dropped",
    "rate_limited",
    "oversize_dropped",
    "sources_forgotten",
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


class SourceLimiter(RateLimiter):
    """A token bucket per source IP in a bounded table (least recently seen forgotten first).

    Sans-I/O: every call takes the driver's monotonic ``now`` in seconds.
    """

    def __init__(
        self,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        burst: float = DEFAULT_BURST,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        super().__init__(rate_per_s, burst, max_sources)


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

    ``software``: the SOFTWARE text to send (opt-in; None sends none).  ``rate_per_s``/``burst``/
    ``max_sources``: the per-source limit (:class:`SourceLimiter`); ``rate_per_s=None`` turns it
    off (the simulator, whose virtual clock and shared NAT addresses are not an attack surface).
    """

    def __init__(
        self,
        addresses: Mapping[Slot, Address],
        *,
        software: str | None = None,
        rate_per_s: float | None = DEFAULT_RATE_PER_S,
        burst: float = DEFAULT_BURST,
        max_sources: int = DEFAULT_MAX_SOURCES,
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
        #: The per-source limit, None when off.
        self.limiter = None if rate_per_s is None else SourceLimiter(rate_per_s, burst, max_sources)
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
        self,
        data: bytes,
        slot: Slot,
        source: Address,
        local_ip: str | None = None,
        *,
        now: float = 0.0,
    ) -> StunReply | None:
        """What to answer to ``data`` from ``source`` that arrived on ``slot`` (sent to
        ``local_ip``, needed only for wildcard binds) at the driver's monotonic time ``now``;
        None when nothing is sent."""
        if slot not in self.addresses:
            raise LocalProtocolError(f"STUN responder has no slot {slot}")
        # The cheap refusals first: no parsing for a source we will not answer.
        if is_reflection_port(source[1]):
            self.stats["reflection_port_dropped"] += 1
            return None
        if self.limiter is not None:
            before = self.limiter.forgotten
            allowed = self.limiter.allow(source_key(source[0]), now)
            self.stats["sources_forgotten"] += self.limiter.forgotten - before
            if not allowed:
                self.stats["rate_limited"] += 1
                return None
        reply = self._answer(data, slot, source, local_ip)
        if reply is not None and len(reply.data) > MAX_AMPLIFICATION * len(data):
            self.stats["oversize_dropped"] += 1
            return None
        return reply

    def _answer(
        self, data: bytes, slot: Slot, source: Address, local_ip: str | None
    ) -> StunReply | None:
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
            return self._error(request, slot, source, unknown, len(data))

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
                return self._error(request, slot, source, (0x0003,), len(data))
            target = wanted

        destination = source
        response_port = request.attributes.get("RESPONSE-PORT")
        if isinstance(response_port, int) and response_port > 0 and not request.legacy:
            if is_reflection_port(response_port):
                self.stats["reflection_port_dropped"] += 1
                return None
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
            if other_address is not None:
                attrs["CHANGED-ADDRESS"] = other_address
        else:
            attrs["XOR-MAPPED-ADDRESS"] = source
            if other_address is not None:
                # RESPONSE-ORIGIN only serves a client comparing where answers come from.
                if "CHANGE-REQUEST" in request.attributes:
                    attrs["RESPONSE-ORIGIN"] = origin
                attrs["OTHER-ADDRESS"] = other_address
        return StunReply(self._encode(response, request, len(data)), target, destination, False)

    def _error(
        self, request: Message, slot: Slot, source: Address, unknown: tuple[int, ...], size: int
    ) -> StunReply:
        """A 420 (Unknown Attribute) listing ``unknown``, from the arrival slot."""
        response = Message(
            Method.BINDING,
            Class.ERROR,
            request.transaction_id,
            {"ERROR-CODE": (420, "Unknown Attribute"), "UNKNOWN-ATTRIBUTES": unknown},
            magic_cookie=request.magic_cookie,
        )
        return StunReply(self._encode(response, request, size), slot, source, error=True)

    def _encode(self, response: Message, request: Message, request_size: int) -> bytes:
        """The response's bytes: SOFTWARE (opted in) when it fits under the amplification cap,
        FINGERPRINT when the request had one; nothing but the mapped address for RFC 3489."""
        if request.legacy:
            return bytes(response)
        if self.software:
            response.attributes["SOFTWARE"] = self.software
        if "FINGERPRINT" in request.attributes:
            response.add_fingerprint()
        data = bytes(response)
        if "SOFTWARE" in response.attributes and len(data) > MAX_AMPLIFICATION * request_size:
            # An operator's SOFTWARE must not cost the client its answer: leave it out.
            del response.attributes["SOFTWARE"]
            if "FINGERPRINT" in request.attributes:
                response.add_fingerprint()
            data = bytes(response)
        return data
