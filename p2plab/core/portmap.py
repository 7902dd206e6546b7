"""Sans-I/O port-mapping client: NAT-PMP (RFC 6886), PCP (RFC 6887) and UPnP IGD, Tailscale style.

:class:`PortMapper` probes NAT-PMP (an external-address request) and PCP (ANNOUNCE) to the
gateway's port 5351 at once and asks its driver to look for a UPnP IGD (:class:`UpnpProbe`); after
:attr:`PortMapperConfig.probe_wait_s` (250 ms, Tailscale's wait) it reports :class:`ProbeDone` and
asks the best protocol that answered (NAT-PMP > PCP > UPnP) for a mapping of the worker's UDP port
(7200 s), renews it at half-life, and deletes it on :meth:`PortMapper.stop`.  A gateway that
answers nothing costs one probe: ProbeDone with no protocol and no further traffic until
:meth:`PortMapper.network_changed`.

UPnP is SOAP over HTTP, which the driver does: the mapper emits :class:`UpnpProbe`,
:class:`UpnpMap` and :class:`UpnpDelete` commands (``next_command()``) and the driver answers
with :meth:`PortMapper.upnp_probed` and :meth:`PortMapper.upnp_result`.

Driver contract (the same four steps as the link engine): after every input, send
``datagrams_to_send(now)`` to their addresses, run every ``next_command()``, handle every
``next_event()``, and re-arm the timer at ``get_timer()`` (then call ``handle_timer(now)``).

Anything not from ``gateway:5351``, malformed, unsolicited, with the wrong opcode, nonce or
internal port, an absurd lifetime or an epoch that says the gateway lost its state is dropped
and counted in :attr:`PortMapper.stats` (``portmap_drop_*``); a lost epoch also re-creates the
mapping.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2plab.core import natpmp, pcp
from p2plab.errors import LocalProtocolError, PortMapError

__all__ = [
    "PROTOCOLS",
    "Command",
    "Event",
    "MappingFailed",
    "MappingGranted",
    "MappingLost",
    "PortMapper",
    "PortMapperConfig",
    "ProbeDone",
    "UpnpDelete",
    "UpnpMap",
    "UpnpProbe",
    "epoch_lost",
]

Address = tuple[str, int]
#: The protocols in order of preference (Tailscale's: NAT-PMP, then PCP, then UPnP).
PROTOCOLS = ("nat-pmp", "pcp", "upnp")
#: A lease shorter than this would renew in a storm: treated as absurd and dropped.
MIN_LIFETIME_S = 2


@dataclass(frozen=True)
class PortMapperConfig:
    """Timers of the port mapper."""

    lifetime_s: int = 7200
    """The lease asked for (Tailscale's and RFC 6886's recommended two hours)."""
    probe_wait_s: float = 0.25
    """How long the probe waits for answers before choosing a protocol."""
    retransmit_s: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    """Pauses before each retransmission of a map request (RFC 6886's 250 ms doubling, cut
    short: the gateway answered the probe, so silence now means it will not map)."""
    renew_retransmit_max_s: float = 30.0
    """The longest pause between renewal retransmissions (they go on until the lease ends)."""
    gateway_port: int = natpmp.PORT
    """The gateway's NAT-PMP/PCP port (5351; tests run their gateway on another one)."""


@dataclass(frozen=True)
class Event:
    """Base class of the port mapper's events."""


@dataclass(frozen=True)
class ProbeDone(Event):
    """The probe's wait is over (or every protocol has answered)."""

    protocols: tuple[str, ...]
    """The protocols that answered, in order of preference (empty: none)."""


@dataclass(frozen=True)
class MappingGranted(Event):
    """The gateway granted or renewed a mapping of the worker's UDP port."""

    protocol: str
    """``nat-pmp``, ``pcp`` or ``upnp``."""
    ip: str
    """The external IP address."""
    port: int
    """The external port."""
    lifetime_s: float
    """The lease in seconds from now (renewed at half of it)."""


@dataclass(frozen=True)
class MappingLost(Event):
    """The mapping is gone: the endpoint must not be offered any more."""

    reason: str
    """``expired``, ``gateway-rebooted``, ``refused``, ``network-changed`` or ``stopped``."""


@dataclass(frozen=True)
class MappingFailed(Event):
    """Protocols answered the probe but none granted a mapping (no mapping was held)."""

    reason: str
    """The last refusal, e.g. ``nat-pmp: result NETWORK_FAILURE``."""


@dataclass(frozen=True)
class Command:
    """Base class of the UPnP work the driver does for the mapper."""


@dataclass(frozen=True)
class UpnpProbe(Command):
    """Look for an IGD (SSDP); answer with :meth:`PortMapper.upnp_probed`."""


@dataclass(frozen=True)
class UpnpMap(Command):
    """AddPortMapping (UDP), then GetExternalIPAddress; answer with
    :meth:`PortMapper.upnp_result`."""

    internal_port: int
    """The worker's UDP port."""
    external_port: int
    """The external port wanted (the granted one when renewing)."""
    lifetime_s: int
    """The lease asked for."""


@dataclass(frozen=True)
class UpnpDelete(Command):
    """DeletePortMapping (UDP); no answer expected."""

    external_port: int
    """The external port of the mapping."""


def epoch_lost(prev_epoch: int, prev_now: float, epoch: int, now: float) -> bool:
    """RFC 6887 section 8.5 (RFC 6886 section 3.6 is the first half): the server's epoch went
    back, or its clock and ours drifted apart by more than 2 s plus 1/16: it lost its
    mappings (a reboot)."""
    client_delta = now - prev_now
    server_delta = epoch - prev_epoch
    return (
        epoch + 2 < prev_epoch
        or client_delta + 2 < server_delta - server_delta / 16
        or server_delta + 2 < client_delta - client_delta / 16
    )


@dataclass
class _Pending:
    protocol: str
    data: bytes
    sent: int
    next_at: float | None
    renewing: bool


class PortMapper:
    """One mapping of one UDP port on one gateway (see the module docstring)."""

    def __init__(
        self, rand_bytes: Callable[[int], bytes], config: PortMapperConfig | None = None
    ) -> None:
        self.config = config or PortMapperConfig()
        self._rand_bytes = rand_bytes
        self.stats: Counter[str] = Counter()
        """Counters: probes, grants, renewals and ``portmap_drop_*`` for what was dropped."""
        self.state = "idle"
        """``idle``, ``probing``, ``mapping``, ``mapped``, ``unavailable`` or ``stopped``."""
        self.gateway: str | None = None
        self.client_ip = "0.0.0.0"
        self.internal_port = 0
        self.answered: set[str] = set()
        self.pmp_external_ip: str | None = None
        self.mapping: MappingGranted | None = None
        self.granted_at = 0.0
        self.error: str | None = None
        """Why the last mapping attempt failed (None after a grant)."""
        self._nonce = b""
        self._epochs: dict[str, tuple[int, float]] = {}
        self._tried: list[str] = []
        self._pending: _Pending | None = None
        self._upnp_pending = False
        self._upnp_probed = False
        self._probe_deadline: float | None = None
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._commands: deque[Command] = deque()

    # -- inputs ----------------------------------------------------------------------------

    def start(self, now: float, gateway_ip: str, internal_port: int, client_ip: str) -> None:
        """Probe ``gateway_ip`` for a mapping of ``internal_port``; ``client_ip`` is the
        address this host sends from towards the gateway (PCP checks it)."""
        if self.state not in ("idle", "stopped"):
            raise LocalProtocolError(f"PortMapper.start in state {self.state}")
        self.internal_port = internal_port
        self._probe(now, gateway_ip, client_ip)

    def network_changed(self, now: float, gateway_ip: str, client_ip: str) -> None:
        """The host's network changed: forget the mapping and probe again."""
        if self.state == "stopped":
            return
        if self.mapping is not None:
            self._lose("network-changed")
        self._probe(now, gateway_ip, client_ip)

    def stop(self, now: float) -> None:
        """Delete the mapping (lifetime 0, sent once) and stop."""
        if self.state == "stopped":
            return
        protocol = self.mapping.protocol if self.mapping is not None else None
        if protocol is None and self._pending is not None:
            protocol = self._pending.protocol  # the gateway may have mapped what we never heard
        if protocol is None and self._upnp_pending:
            protocol = "upnp"
        if protocol is not None:
            self._delete(protocol)
            self.stats["portmap_deletes"] += 1
        if self.mapping is not None:
            self._lose("stopped")
        self._pending = None
        self._probe_deadline = None
        self.state = "stopped"

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """A datagram on the mapper's socket."""
        if self.state in ("idle", "stopped"):
            self.stats["portmap_drop_unexpected"] += 1
            return
        if addr != (self.gateway, self.config.gateway_port):
            self.stats["portmap_drop_not_gateway"] += 1
            return
        try:
            if data[:1] == bytes([pcp.VERSION]):
                self._on_pcp(pcp.parse_response(data), now)
            else:
                self._on_pmp(natpmp.parse_response(data), now)
        except PortMapError:
            self.stats["portmap_drop_malformed"] += 1

    def upnp_probed(self, now: float, found: bool) -> None:
        """The driver's SSDP search ended: ``found`` an IGD with a WAN connection service."""
        if self.state in ("idle", "stopped"):
            return
        self._upnp_probed = True
        if found:
            self.answered.add("upnp")
        if self.state == "probing":
            self._maybe_end_probe(now)
        elif found and self.state == "unavailable":
            self._choose(now)  # a late IGD: the only way left

    def upnp_result(self, now: float, ip: str | None, port: int | None, lifetime_s: float) -> None:
        """The driver's AddPortMapping ended: ``ip``/``port`` granted, or None if it failed."""
        if not self._upnp_pending or self.state == "stopped":
            return
        self._upnp_pending = False
        if ip is None or port is None:
            self._refused(now, "upnp", "AddPortMapping failed")
            return
        self._grant(now, "upnp", ip, port, lifetime_s)

    def handle_timer(self, now: float) -> None:
        """Fire whatever is due: the probe's end, a retransmission, a renewal, the lease's end."""
        if self.state in ("idle", "stopped", "unavailable"):
            return
        if self._probe_deadline is not None and now >= self._probe_deadline:
            self._end_probe(now)
        if self.mapping is not None and now >= self.granted_at + self.mapping.lifetime_s:
            self._pending = None
            self._lose("expired")
            self._probe(now, self.gateway or "", self.client_ip)
            return
        p = self._pending
        if p is not None and p.next_at is not None and now >= p.next_at:
            self._retransmit(now, p)
        if self.mapping is not None and self._pending is None and not self._upnp_pending:
            if now >= self.granted_at + self.mapping.lifetime_s / 2:
                self.stats["portmap_renewals"] += 1
                self._request(now, self.mapping.protocol, renewing=True)

    # -- outputs ---------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams for the gateway's port 5351 (:attr:`PortMapperConfig.gateway_port`)."""
        out, self._out = self._out, []
        return [(d, (self.gateway or "", self.config.gateway_port)) for d in out]

    def next_event(self) -> Event | None:
        """The next :class:`Event`, or None."""
        return self._events.popleft() if self._events else None

    def next_command(self) -> Command | None:
        """The next UPnP :class:`Command` for the driver, or None."""
        return self._commands.popleft() if self._commands else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (None: no timer)."""
        if self.state in ("idle", "stopped", "unavailable"):
            return None
        times: list[float] = []
        if self._probe_deadline is not None:
            times.append(self._probe_deadline)
        if self._pending is not None and self._pending.next_at is not None:
            times.append(self._pending.next_at)
        if self.mapping is not None:
            times.append(self.granted_at + self.mapping.lifetime_s)
            if self._pending is None and not self._upnp_pending:
                times.append(self.granted_at + self.mapping.lifetime_s / 2)
        return min(times) if times else None

    def status(self, now: float) -> dict[str, Any]:
        """The report of ``probe --json`` and the worker's status."""
        m = self.mapping
        return {
            "protocols": [p for p in PROTOCOLS if p in self.answered],
            "protocol": m.protocol if m is not None else None,
            "external": f"{m.ip}:{m.port}" if m is not None else None,
            "lease_s": m.lifetime_s if m is not None else None,
            "expires_in_s": (
                round(self.granted_at + m.lifetime_s - now, 1) if m is not None else None
            ),
            "state": self.state,
            "error": self.error,
        }

    # -- the probe -------------------------------------------------------------------------

    def _probe(self, now: float, gateway_ip: str, client_ip: str) -> None:
        self.gateway = gateway_ip
        self.client_ip = client_ip
        self.state = "probing"
        self.answered = set()
        self.pmp_external_ip = None
        self._epochs = {}
        self._tried = []
        self._pending = None
        self._upnp_pending = False
        self._upnp_probed = False
        self._nonce = self._rand_bytes(pcp.NONCE_SIZE)  # a new mapping, a new nonce
        self._out.append(bytes(natpmp.ExternalAddressRequest()))
        self._out.append(bytes(pcp.Request(pcp.ANNOUNCE, 0, client_ip)))
        self._commands.append(UpnpProbe())
        self._probe_deadline = now + self.config.probe_wait_s
        self.stats["portmap_probes"] += 1

    def _maybe_end_probe(self, now: float) -> None:
        if {"nat-pmp", "pcp"} <= self.answered and self._upnp_probed:
            self._end_probe(now)  # nothing left to wait for

    def _end_probe(self, now: float) -> None:
        self._probe_deadline = None
        self._events.append(ProbeDone(tuple(p for p in PROTOCOLS if p in self.answered)))
        self._choose(now)

    def _choose(self, now: float) -> None:
        for protocol in PROTOCOLS:
            if protocol in self.answered and protocol not in self._tried:
                self._tried.append(protocol)
                self.state = "mapping"
                self._request(now, protocol, renewing=False)
                return
        if self._tried and self.mapping is None:  # everything that answered refused
            self._events.append(MappingFailed(self.error or "refused"))
        self.state = "unavailable"

    # -- map requests ----------------------------------------------------------------------

    def _request(self, now: float, protocol: str, *, renewing: bool) -> None:
        m = self.mapping
        want = m.port if m is not None else self.internal_port
        lifetime = self.config.lifetime_s
        if protocol == "upnp":
            self._upnp_pending = True
            self._commands.append(UpnpMap(self.internal_port, want, lifetime))
            return
        data = self._map_request(protocol, want, lifetime, m.ip if m is not None else "0.0.0.0")
        self._out.append(data)
        self._pending = _Pending(protocol, data, 1, None, renewing)
        self._pending.next_at = now + self._pause(self._pending)

    def _map_request(self, protocol: str, port: int, lifetime: int, ip: str) -> bytes:
        if protocol == "nat-pmp":
            return bytes(natpmp.MapRequest(self.internal_port, port, lifetime))
        body = pcp.MapData(self._nonce, pcp.PROTO_UDP, self.internal_port, port, ip)
        return bytes(pcp.Request(pcp.MAP, lifetime, self.client_ip, body))

    def _pause(self, p: _Pending) -> float:
        if p.renewing:
            return min(0.25 * float(2 ** (p.sent - 1)), self.config.renew_retransmit_max_s)
        schedule = self.config.retransmit_s
        return schedule[min(p.sent, len(schedule)) - 1]

    def _retransmit(self, now: float, p: _Pending) -> None:
        if not p.renewing and p.sent > len(self.config.retransmit_s):
            self._pending = None
            self._refused(now, p.protocol, "no answer to the map request")
            return
        self._out.append(p.data)
        p.sent += 1
        p.next_at = now + self._pause(p)
        self.stats["portmap_retransmits"] += 1

    def _delete(self, protocol: str) -> None:
        m = self.mapping
        if protocol == "upnp":
            if m is not None:
                self._commands.append(UpnpDelete(m.port))
            return
        if protocol == "nat-pmp":  # RFC 6886 section 3.4: external port 0, lifetime 0
            self._out.append(bytes(natpmp.MapRequest(self.internal_port, 0, 0)))
            return
        port, ip = (m.port, m.ip) if m is not None else (0, "0.0.0.0")
        self._out.append(self._map_request("pcp", port, 0, ip))  # same nonce: RFC 6887 15

    def _refused(self, now: float, protocol: str, why: str) -> None:
        self.stats["portmap_refused"] += 1
        self.error = f"{protocol}: {why}"
        if self.mapping is not None:
            self._lose("refused")
        self._choose(now)  # the next protocol that answered, if any

    def _grant(self, now: float, protocol: str, ip: str, port: int, lifetime_s: float) -> None:
        self._pending = None
        self.error = None
        self.state = "mapped"
        self.granted_at = now
        self.mapping = MappingGranted(protocol, ip, port, lifetime_s)
        self.stats["portmap_grants"] += 1
        self._events.append(self.mapping)

    def _lose(self, reason: str) -> None:
        self.mapping = None
        self._events.append(MappingLost(reason))

    # -- responses -------------------------------------------------------------------------

    def _epoch_ok(self, protocol: str, epoch: int, now: float) -> bool:
        prev = self._epochs.get(protocol)
        if prev is not None and epoch_lost(prev[0], prev[1], epoch, now):
            self.stats["portmap_drop_epoch"] += 1
            self._epochs.pop(protocol)  # the re-map's answer starts the new baseline
            if self.mapping is not None and self.mapping.protocol == protocol:
                self._lose("gateway-rebooted")
                self._tried = [protocol]
                self.state = "mapping"
                self._request(now, protocol, renewing=False)
            return False
        self._epochs[protocol] = (epoch, now)
        return True

    def _on_pmp(self, msg: natpmp.Response, now: float) -> None:
        if isinstance(msg, natpmp.ExternalAddressResponse):
            if msg.result != natpmp.ResultCode.SUCCESS:
                self.stats["portmap_error_answers"] += 1  # e.g. a NAT-PMP server refusing PCP
                return
            if not self._epoch_ok("nat-pmp", msg.epoch, now):
                return
            if msg.ip == "0.0.0.0":  # RFC 6886 3.2: no external address yet
                self.stats["portmap_pmp_no_address"] += 1
                return
            self.pmp_external_ip = msg.ip
            if self.state == "probing":
                self.answered.add("nat-pmp")
                self._maybe_end_probe(now)
            return
        p = self._pending
        if p is None or p.protocol != "nat-pmp":
            self.stats["portmap_drop_unexpected"] += 1
            return
        # a short (8-byte) error answer carries no port: zero is fine there
        echoed = msg.internal_port in (self.internal_port, 0 if msg.result else self.internal_port)
        if msg.opcode != natpmp.OP_MAP_UDP or not echoed:
            self.stats["portmap_drop_opcode"] += 1
            return
        if msg.result != natpmp.ResultCode.SUCCESS:
            if self._epoch_ok("nat-pmp", msg.epoch, now):
                self._pending = None
                self._refused(now, "nat-pmp", f"result {_name(natpmp.ResultCode, msg.result)}")
            return
        if not MIN_LIFETIME_S <= msg.lifetime_s <= natpmp.MAX_LIFETIME_S or not msg.external_port:
            self.stats["portmap_drop_lifetime"] += 1
            return
        if not self._epoch_ok("nat-pmp", msg.epoch, now):
            return
        if self.pmp_external_ip is None:
            self._pending = None
            self._refused(now, "nat-pmp", "no external address")
            return
        self._grant(now, "nat-pmp", self.pmp_external_ip, msg.external_port, msg.lifetime_s)

    def _on_pcp(self, msg: pcp.Response, now: float) -> None:
        if msg.opcode == pcp.ANNOUNCE:
            if msg.result != pcp.ResultCode.SUCCESS:
                self.stats["portmap_error_answers"] += 1
                return
            if self._epoch_ok("pcp", msg.epoch, now) and self.state == "probing":
                self.answered.add("pcp")
                self._maybe_end_probe(now)
            return
        p = self._pending
        if p is None or p.protocol != "pcp":
            self.stats["portmap_drop_unexpected"] += 1
            return
        body = msg.map
        if body is None:  # an error answer without the MAP data: nothing ties it to us
            self.stats["portmap_drop_nonce"] += 1
            return
        if body.nonce != self._nonce:
            self.stats["portmap_drop_nonce"] += 1
            return
        if body.protocol != pcp.PROTO_UDP or body.internal_port != self.internal_port:
            self.stats["portmap_drop_opcode"] += 1
            return
        if msg.result != pcp.ResultCode.SUCCESS:
            if self._epoch_ok("pcp", msg.epoch, now):
                self._pending = None
                self._refused(now, "pcp", f"result {_name(pcp.ResultCode, msg.result)}")
            return
        if not MIN_LIFETIME_S <= msg.lifetime_s <= natpmp.MAX_LIFETIME_S or not body.external_port:
            self.stats["portmap_drop_lifetime"] += 1
            return
        if body.external_ip in ("0.0.0.0", "::"):
            self.stats["portmap_drop_malformed"] += 1
            return
        if not self._epoch_ok("pcp", msg.epoch, now):
            return
        self._grant(now, "pcp", body.external_ip, body.external_port, msg.lifetime_s)


def _name(codes: Any, value: int) -> str:
    try:
        return str(codes(value).name)
    except ValueError:
        return str(value)
