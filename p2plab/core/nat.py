"""NAT classification from STUN probe results.

RFC 5780 section 4.3 (mapping behaviour) and 4.4 (filtering behaviour) as pure functions over the
test outcomes, the RFC 3489 "classic" names, and the :class:`NatReport` that ``StunProbe`` and
``p2plab probe`` produce.  The procedure that runs the tests is :mod:`p2plab.core.discovery`.

Test outcomes, for a server with primary address ``(A1, P1)`` and OTHER-ADDRESS ``(A2, P2)``:

* mapping test I: Binding to ``(A1, P1)``; test II: to ``(A2, P1)``; test III: to ``(A2, P2)``.
  The XOR-MAPPED-ADDRESS of each is compared (II with I, then III with II).
* filtering test I: Binding to ``(A1, P1)``; test II: the same with CHANGE-REQUEST "change IP and
  port"; test III: with "change port".  Only whether an answer arrived matters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CLASSIC_NAMES",
    "BehaviorTests",
    "FilteringBehavior",
    "MappingBehavior",
    "NatReport",
    "ServerAnswer",
    "classic_from_behavior",
    "classic_name",
    "classify_filtering",
    "classify_mapping",
    "derive_behavior",
]

Address = tuple[str, int]


class MappingBehavior(enum.StrEnum):
    """RFC 4787 / RFC 5780 mapping behaviour."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


class FilteringBehavior(enum.StrEnum):
    """RFC 4787 / RFC 5780 filtering behaviour."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


#: pystun3's words (RFC 3489 types) to the names p2plab shows.
CLASSIC_NAMES: dict[str, str] = {
    "Blocked": "Blocked",
    "Open Internet": "Open Internet",
    "Full Cone": "Full Cone",
    "Symmetric UDP Firewall": "Symmetric UDP Firewall",
    "Restric NAT": "Restricted Cone",
    "Restric Port NAT": "Port-Restricted Cone",
    "Symmetric NAT": "Symmetric NAT",
    "Meet an error, when do Test1 on Changed IP and Port": "Unknown (changed address unreachable)",
}


def classic_name(raw: str | None) -> str | None:
    """Normalise a pystun3 NAT type string; unknown strings pass through."""
    if raw is None:
        return None
    return CLASSIC_NAMES.get(raw, raw)


def classify_mapping(
    test1: Address | None, test2: Address | None, test3: Address | None
) -> MappingBehavior:
    """RFC 5780 section 4.3 from the mapped addresses of tests I, II and III (None: no answer
    or not run)."""
    if test1 is None or test2 is None:
        return MappingBehavior.UNKNOWN
    if test2 == test1:
        return MappingBehavior.ENDPOINT_INDEPENDENT
    if test3 is None:
        return MappingBehavior.UNKNOWN
    if test3 == test2:
        return MappingBehavior.ADDRESS_DEPENDENT
    return MappingBehavior.ADDRESS_AND_PORT_DEPENDENT


def classify_filtering(
    test1_answered: bool, test2_answered: bool | None, test3_answered: bool | None
) -> FilteringBehavior:
    """RFC 5780 section 4.4 from whether tests I, II (change IP and port) and III (change port)
    were answered (None: not run)."""
    if not test1_answered or test2_answered is None:
        return FilteringBehavior.UNKNOWN
    if test2_answered:
        return FilteringBehavior.ENDPOINT_INDEPENDENT
    if test3_answered is None:
        return FilteringBehavior.UNKNOWN
    if test3_answered:
        return FilteringBehavior.ADDRESS_DEPENDENT
    return FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT


def classic_from_behavior(
    mapping: MappingBehavior, filtering: FilteringBehavior, behind_nat: bool | None
) -> str | None:
    """The RFC 3489 name that RFC 5780 behaviour corresponds to (None when undecidable)."""
    if behind_nat is False:
        if filtering is FilteringBehavior.ENDPOINT_INDEPENDENT:
            return "Open Internet"
        if filtering is FilteringBehavior.UNKNOWN:
            return None
        return "Symmetric UDP Firewall"
    if mapping in (
        MappingBehavior.ADDRESS_DEPENDENT,
        MappingBehavior.ADDRESS_AND_PORT_DEPENDENT,
    ):
        return "Symmetric NAT"
    if mapping is MappingBehavior.UNKNOWN or behind_nat is None:
        return None
    return {
        FilteringBehavior.ENDPOINT_INDEPENDENT: "Full Cone",
        FilteringBehavior.ADDRESS_DEPENDENT: "Restricted Cone",
        FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT: "Port-Restricted Cone",
        FilteringBehavior.UNKNOWN: None,
    }[filtering]


@dataclass(frozen=True)
class BehaviorTests:
    """Outcomes of the RFC 5780 tests against one server (None: not run / no answer)."""

    local: Address | None = None
    """Our address towards the server (host's real source address, not 0.0.0.0)."""
    mapped1: Address | None = None
    """Test I: XOR-MAPPED-ADDRESS from the primary address."""
    mapped2: Address | None = None
    """Mapping test II: from the alternate IP, primary port."""
    mapped3: Address | None = None
    """Mapping test III: from the alternate IP, alternate port."""
    filter2: bool | None = None
    """Filtering test II (change IP and port) answered."""
    filter3: bool | None = None
    """Filtering test III (change port) answered."""


def derive_behavior(
    tests: BehaviorTests,
) -> tuple[MappingBehavior, FilteringBehavior, bool | None]:
    """``(mapping, filtering, behind_nat)`` from the test outcomes (RFC 5780 sections 4.3, 4.4).

    With no NAT (test I's mapped address equals the local address) mapping is
    endpoint-independent and mapping tests II/III are not needed (section 4.3).
    """
    behind_nat: bool | None = None
    if tests.mapped1 is not None and tests.local is not None:
        behind_nat = tests.mapped1 != tests.local
    if behind_nat is False:
        mapping = MappingBehavior.ENDPOINT_INDEPENDENT
    else:
        mapping = classify_mapping(tests.mapped1, tests.mapped2, tests.mapped3)
    filtering = classify_filtering(tests.mapped1 is not None, tests.filter2, tests.filter3)
    return mapping, filtering, behind_nat


def _host_port(addr: Address) -> str:
    """``host:port``, an IPv6 host in brackets (``[2001:db8::10]:3478``)."""
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"{host}:{addr[1]}"


def _address_json(addr: Address | None) -> dict[str, Any] | None:
    return None if addr is None else {"ip": addr[0], "port": addr[1]}


@dataclass(frozen=True)
class ServerAnswer:
    """What one STUN server did for one Binding request."""

    server: Address
    """The server as configured (host, port)."""
    ok: bool
    """True if a success response arrived."""
    rtt_s: float | None = None
    """Seconds from the last transmission to the response."""
    mapped: Address | None = None
    """XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS) it reported."""
    attempts: int = 0
    """Requests sent (1 = no retransmission)."""
    error: str | None = None
    """Why it failed (timeout, error response, resolution failure)."""
    other_address: Address | None = None
    """Its OTHER-ADDRESS (or RFC 3489 CHANGED-ADDRESS), if it gave one."""
    software: str | None = None
    """Its SOFTWARE attribute."""
    resolved: Address | None = None
    """The address the request was sent to."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": _host_port(self.server),
            "ok": self.ok,
            "rtt_ms": None if self.rtt_s is None else round(self.rtt_s * 1000.0, 3),
            "mapped": _address_json(self.mapped),
            "attempts": self.attempts,
            "error": self.error,
            "other_address": _address_json(self.other_address),
            "software": self.software,
            "resolved": _address_json(self.resolved),
        }


@dataclass(frozen=True)
class NatReport:
    """What this host's NAT does, as far as the probes could tell."""

    mapped: Address | None
    """Public (server-reflexive) address of the probed socket."""
    local: Address | None
    """Local address of the probed socket towards the server."""
    mapping: MappingBehavior = MappingBehavior.UNKNOWN
    """RFC 5780 mapping behaviour."""
    filtering: FilteringBehavior = FilteringBehavior.UNKNOWN
    """RFC 5780 filtering behaviour."""
    classic: str | None = None
    """RFC 3489 type from pystun3, normalised (e.g. "Port-Restricted Cone"); None if not run."""
    classic_raw: str | None = None
    """pystun3's own words (e.g. "Restric Port NAT")."""
    classic_rfc5780: str | None = None
    """The RFC 3489 name implied by ``mapping`` and ``filtering``."""
    behind_nat: bool | None = None
    """False when the mapped address equals the local address."""
    servers: tuple[ServerAnswer, ...] = ()
    """Every server's answer to the first Binding request, including failures."""
    other_address: Address | None = None
    """The alternate address used for the behaviour tests."""
    hairpin: bool | None = None
    """Whether a packet to our own mapped address came back (None: not tested)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Anything the reader should know (missing alternate address, skipped tests, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "mapped": _address_json(self.mapped),
            "local": _address_json(self.local),
            "mapping": self.mapping.value,
            "filtering": self.filtering.value,
            "classic": self.classic,
            "classic_raw": self.classic_raw,
            "classic_rfc5780": self.classic_rfc5780,
            "behind_nat": self.behind_nat,
            "servers": [s.to_dict() for s in self.servers],
            "other_address": _address_json(self.other_address),
            "hairpin": self.hairpin,
            "notes": list(self.notes),
        }
