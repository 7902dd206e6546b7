"""The asyncio driver of :class:`~p2plab.core.portmap.PortMapper` (issue 18).

One UDP socket talks NAT-PMP and PCP to ``gateway:5351``; UPnP IGD goes through
`async-upnp-client` (asyncio-native and maintained by Home Assistant, where miniupnpc's Python
binding blocks the event loop in C calls): an SSDP M-SEARCH of our own to ``gateway:1900`` (and
239.255.255.250 unless the gateway is on loopback), then the library's ``IgdDevice`` profile for
AddPortMapping, GetExternalIPAddress and DeletePortMapping.

Hostile input is bounded here because the library does not bound it: its aiohttp requester
reads whole bodies, so :class:`BoundedRequester` reads at most :data:`MAX_HTTP_BYTES` and talks
to the gateway's address only (a LOCATION or a control URL pointing elsewhere is refused, so a
forged answer cannot make the worker send anywhere else); SSDP answers longer than
:data:`MAX_SSDP_BYTES`, not from the gateway or without a usable LOCATION are dropped.  Every drop
is counted in the shared ``stats`` (``portmap_*``); the library's XML parser is defusedxml.

Which gateway: :func:`resolve_gateway` (``--port-mapping off|auto|IP``).  ``auto`` reads the IPv4
default route (:func:`gateway_for_auto`) but never probes when the rendezvous or a STUN server is
on loopback: tests and ``make demo`` must not touch the host's real router.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from async_upnp_client.client import UpnpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.const import HttpRequest, HttpResponse
from async_upnp_client.exceptions import UpnpActionResponseError, UpnpCommunicationError
from async_upnp_client.profiles.igd import IgdDevice
from async_upnp_client.ssdp import build_ssdp_search_packet, decode_ssdp_packet

from p2plab.core.portmap import (
    Event,
    MappingFailed,
    MappingGranted,
    MappingLost,
    PortMapper,
    PortMapperConfig,
    ProbeDone,
    UpnpDelete,
    UpnpMap,
    UpnpProbe,
)
from p2plab.core.signaling import PortMapping
from p2plab.errors import ConfigError

__all__ = [
    "IGD_SEARCH_TARGET",
    "MAX_HTTP_BYTES",
    "MAX_SSDP_BYTES",
    "SSDP_MULTICAST",
    "BoundedRequester",
    "PortMapDriver",
    "describe_port_mapping",
    "gateway_for_auto",
    "is_loopback_server",
    "probe_port_mapping",
    "resolve_gateway",
    "start_for_worker",
]

log = logging.getLogger(__name__)

SSDP_MULTICAST = ("239.255.255.250", 1900)
IGD_SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
#: An SSDP answer is a few hundred bytes; anything longer is not a router's.
MAX_SSDP_BYTES = 2048
#: A router's device description and SOAP answers fit in a few KiB.
MAX_HTTP_BYTES = 64 * 1024
_WAN_SERVICES = ("WANIPConnection", "WANPPPConnection")


# -- which gateway ------------------------------------------------------------------------------


def gateway_for_auto(route_file: str = "/proc/net/route") -> str | None:
    """The IPv4 default route's gateway (the first one with the RTF_GATEWAY flag), or None."""
    try:
        with open(route_file, encoding="ascii") as f:
            lines = f.read(65536).splitlines()[1:]
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        cols = line.split()
        if len(cols) < 4 or cols[1] != "00000000":
            continue
        try:
            flags, gw = int(cols[3], 16), int(cols[2], 16)
        except ValueError:
            continue
        if flags & 0x2 and gw:  # RTF_GATEWAY; /proc prints the address little-endian
            return str(ipaddress.IPv4Address(gw.to_bytes(4, "little")))
    return None


def _host_of(server: str) -> str:
    if "://" in server:
        return urlsplit(server).hostname or ""
    host = server.rsplit(":", 1)[0] if server.count(":") == 1 else server
    return host.strip("[]")


def is_loopback_server(server: str) -> bool:
    """Whether ``host:port`` or a URL names loopback (a literal, localhost, ``*.localhost``)."""
    host = _host_of(server).lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_gateway(
    setting: str,
    rendezvous_url: str,
    stun_servers: Iterable[str],
    route_file: str = "/proc/net/route",
) -> str | None:
    """The gateway to ask, or None: ``off``; ``auto`` (the default route, unless the rendezvous
    or a STUN server is on loopback); or an IPv4 literal given explicitly."""
    if setting == "off":
        return None
    if setting == "auto":
        servers = [rendezvous_url, *stun_servers]
        if any(is_loopback_server(s) for s in servers):
            return None
        return gateway_for_auto(route_file)
    try:
        return str(ipaddress.IPv4Address(setting))
    except ValueError:
        raise ConfigError(
            f"port mapping {setting!r}: expected off, auto or the gateway's IPv4 address"
        ) from None


def _local_ip_towards(gateway: str, port: int) -> str:
    """The source address the kernel picks for the gateway (connect() on UDP sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((gateway, port))
        return str(s.getsockname()[0])


# -- UPnP with bounds ---------------------------------------------------------------------------


class BoundedRequester(UpnpRequester):
    """async-upnp-client's HTTP requests, to one host only and with a bounded body."""

    def __init__(self, host: str, stats: Counter[str], timeout_s: float = 2.0) -> None:
        self.host = host
        self.stats = stats
        self.timeout_s = timeout_s

    async def async_http_request(self, http_request: HttpRequest) -> HttpResponse:
        """Do the request; refuse other hosts and bodies over :data:`MAX_HTTP_BYTES`."""
        if urlsplit(http_request.url).hostname != self.host:
            self.stats["portmap_upnp_drop_elsewhere"] += 1
            raise UpnpCommunicationError(f"refusing {http_request.url}: not the gateway")
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(
                    http_request.method,
                    http_request.url,
                    headers=dict(http_request.headers or {}),
                    data=http_request.body,
                    allow_redirects=False,  # a redirect could lead off the gateway
                ) as response,
            ):
                body = b""
                while len(body) <= MAX_HTTP_BYTES:
                    chunk = await response.content.read(MAX_HTTP_BYTES + 1 - len(body))
                    if not chunk:
                        break
                    body += chunk
                if len(body) > MAX_HTTP_BYTES:
                    self.stats["portmap_upnp_drop_oversize"] += 1
                    raise UpnpCommunicationError(f"{http_request.url}: body over {MAX_HTTP_BYTES}")
                text = body.decode(response.get_encoding() or "utf-8")
                return HttpResponse(response.status, dict(response.headers), text)
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError, LookupError) as exc:
            raise UpnpCommunicationError(repr(exc)) from exc


class _SsdpSearch(asyncio.DatagramProtocol):
    """Collects the first IGD LOCATION on the gateway from SSDP answers."""

    def __init__(self, gateway: str, stats: Counter[str]) -> None:
        self.gateway = gateway
        self.stats = stats
        self.found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if len(data) > MAX_SSDP_BYTES:
            self.stats["portmap_ssdp_drop_oversize"] += 1
            return
        if addr[0] != self.gateway:
            self.stats["portmap_ssdp_drop_not_gateway"] += 1
            return
        try:
            line, headers = decode_ssdp_packet(data, None, addr)
            location = str(headers.get("location", ""))
        except Exception:  # hostile bytes: the library's parser has many ways to fail
            self.stats["portmap_ssdp_drop_malformed"] += 1
            return
        if not line.startswith("HTTP/1.1 200") or not location:
            self.stats["portmap_ssdp_drop_malformed"] += 1
            return
        if urlsplit(location).hostname != self.gateway:
            self.stats["portmap_ssdp_drop_elsewhere"] += 1
            return
        if not self.found.done():
            self.found.set_result(location)


# -- the driver ---------------------------------------------------------------------------------


class PortMapDriver:
    """Runs one :class:`PortMapper` for the worker's UDP port (see the module docstring)."""

    def __init__(
        self,
        gateway: str,
        internal_port: int,
        on_event: Callable[[Event, float], None],
        *,
        stats: Counter[str] | None = None,
        config: PortMapperConfig | None = None,
        ssdp_port: int = 1900,
        ssdp_wait_s: float = 1.0,
        upnp_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.internal_port = internal_port
        self.on_event = on_event
        self.config = config or PortMapperConfig()
        self.mapper = PortMapper(os.urandom, self.config)
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.mapper.stats = self.stats  # one dict: the core's drops and the driver's
        self.ssdp_port = ssdp_port
        self.ssdp_wait_s = ssdp_wait_s
        self.upnp_timeout_s = upnp_timeout_s
        self._clock = clock
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._igd: IgdDevice | None = None
        self._watch: asyncio.Task[None] | None = None
        self.client_ip = "0.0.0.0"

    async def start(self) -> PortMapDriver:
        """Open the socket and probe."""
        await self._open(self.gateway)
        self._feed(
            lambda now: self.mapper.start(now, self.gateway, self.internal_port, self.client_ip)
        )
        return self

    async def _open(self, gateway: str) -> None:
        # bound to the address the kernel sends from towards the gateway: what PCP's client
        # address field must say, and the address NAT-PMP maps
        client_ip = _local_ip_towards(gateway, self.config.gateway_port)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _MapperProtocol(self), local_addr=(client_ip, 0)
        )
        if self._transport is not None:
            self._transport.close()
        self._transport = transport
        self.gateway, self.client_ip = gateway, client_ip

    async def network_changed(self, gateway: str) -> None:
        """Probe again: a new gateway, or a new local address towards it (a new socket)."""
        self._igd = None
        await self._open(gateway)
        self._feed(lambda now: self.mapper.network_changed(now, gateway, self.client_ip))

    def watch(self, gateway_source: Callable[[], str | None], interval_s: float = 5.0) -> None:
        """Re-probe when ``gateway_source()`` (e.g. :func:`gateway_for_auto`) or our address
        towards it changes: a re-read of /proc/net/route every ``interval_s``, no traffic."""
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_loop(gateway_source, interval_s), name="portmap-watch"
        )

    async def _watch_loop(
        self, gateway_source: Callable[[], str | None], interval_s: float
    ) -> None:
        while True:
            await asyncio.sleep(interval_s)
            gateway = gateway_source()
            if gateway is None:
                continue  # no default route for now: keep what we have
            try:
                if (gateway, _local_ip_towards(gateway, self.config.gateway_port)) != (
                    self.gateway,
                    self.client_ip,
                ):
                    self.stats["portmap_network_changes"] += 1
                    await self.network_changed(gateway)
            except OSError as exc:
                log.debug("port mapping: gateway %s unreachable for now: %s", gateway, exc)

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Delete the mapping (one datagram, or DeletePortMapping bounded by ``timeout_s``)."""
        if self._watch is not None:
            self._watch.cancel()
        for task in list(self._tasks):  # a probe or AddPortMapping in flight is moot now
            task.cancel()
        self._feed(self.mapper.stop)
        if self._timer is not None:
            self._timer.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        if self._transport is not None:
            self._transport.close()

    def status(self) -> dict[str, Any]:
        """The ``port_mapping`` block of the status and of ``probe --json``."""
        return self.mapper.status(self._clock())

    # -- the four steps after every input ---------------------------------------------------

    def _feed(self, input_: Callable[[float], object]) -> None:
        now = self._clock()
        input_(now)
        if self._transport is not None:
            for data, addr in self.mapper.datagrams_to_send(now):
                self._transport.sendto(data, addr)
        while (cmd := self.mapper.next_command()) is not None:
            self._spawn(cmd)
        while (event := self.mapper.next_event()) is not None:
            try:
                self.on_event(event, now)
            except Exception:
                log.exception("port mapping event handler failed on %r", event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.mapper.get_timer()
        if when is not None:
            delay = max(0.0, when - self._clock())
            self._timer = asyncio.get_running_loop().call_later(
                delay, self._feed, self.mapper.handle_timer
            )

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self._feed(lambda now: self.mapper.receive_datagram(data, (addr[0], addr[1]), now))

    def _spawn(self, cmd: object) -> None:
        if isinstance(cmd, UpnpProbe):
            coro: Any = self._upnp_probe()
        elif isinstance(cmd, UpnpMap):
            coro = self._upnp_map(cmd)
        elif isinstance(cmd, UpnpDelete):
            coro = self._upnp_delete(cmd)
        else:
            return
        task = asyncio.get_running_loop().create_task(coro, name=f"portmap-{type(cmd).__name__}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- UPnP -------------------------------------------------------------------------------

    async def _upnp_probe(self) -> None:
        found = False
        try:
            found = await self._find_igd()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # hostile XML or a broken router: UPnP is just absent
            self.stats["portmap_upnp_errors"] += 1
            log.debug("UPnP probe of %s failed: %r", self.gateway, exc)
        self._feed(lambda now: self.mapper.upnp_probed(now, found))

    async def _find_igd(self) -> bool:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _SsdpSearch(self.gateway, self.stats), local_addr=(self.client_ip, 0)
        )
        try:
            targets = [(self.gateway, self.ssdp_port)]
            if not ipaddress.ip_address(self.gateway).is_loopback:
                targets.append(SSDP_MULTICAST)  # routers that answer multicast only
                sock = transport.get_extra_info("socket")
                if sock is not None:  # out of the gateway's interface, on the LAN only
                    iface = socket.inet_aton(self.client_ip)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
            for target in targets:
                transport.sendto(build_ssdp_search_packet(target, 1, IGD_SEARCH_TARGET), target)
            try:
                location = await asyncio.wait_for(asyncio.shield(proto.found), self.ssdp_wait_s)
            except TimeoutError:
                return False
        finally:
            transport.close()
        requester = BoundedRequester(self.gateway, self.stats, self.upnp_timeout_s)
        device = await asyncio.wait_for(
            UpnpFactory(requester, non_strict=True).async_create_device(location),
            self.upnp_timeout_s * 4,
        )
        if not any(
            any(w in s.service_type for w in _WAN_SERVICES) and s.has_action("AddPortMapping")
            for s in device.all_services
        ):
            return False
        self._igd = IgdDevice(device, None)
        return True

    async def _upnp_map(self, cmd: UpnpMap) -> None:
        ip: str | None = None
        port: int | None = None
        lifetime = float(cmd.lifetime_s)
        try:
            if self._igd is None:
                raise UpnpCommunicationError("no IGD")
            try:
                lifetime = await self._add(cmd, cmd.lifetime_s)
            except UpnpActionResponseError as exc:
                if exc.error_code != 718 or cmd.external_port != cmd.internal_port:
                    raise
                # ConflictInMappingEntry: another host holds our port number; any other will do
                self.stats["portmap_upnp_conflicts"] += 1
                cmd = UpnpMap(cmd.internal_port, 1024 + secrets.randbelow(64512), cmd.lifetime_s)
                lifetime = await self._add(cmd, cmd.lifetime_s)
            raw = await self._igd.async_get_external_ip_address()
            ip = str(ipaddress.IPv4Address(str(raw)))  # a hostile router's text stops here
            port = cmd.external_port
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats["portmap_upnp_errors"] += 1
            log.debug("UPnP AddPortMapping on %s failed: %r", self.gateway, exc)
            ip = port = None
        self._feed(lambda now: self.mapper.upnp_result(now, ip, port, lifetime))

    async def _add(self, cmd: UpnpMap, lifetime_s: int) -> float:
        assert self._igd is not None
        args: Mapping[str, Any] = {
            "remote_host": ipaddress.IPv4Address("0.0.0.0"),
            "external_port": cmd.external_port,
            "protocol": "UDP",
            "internal_port": cmd.internal_port,
            "internal_client": ipaddress.IPv4Address(self.client_ip),
            "enabled": True,
            "description": "p2plab",
        }
        try:
            await self._igd.async_add_port_mapping(
                **args, lease_duration=timedelta(seconds=lifetime_s)
            )
            return float(lifetime_s)
        except UpnpActionResponseError as exc:
            if exc.error_code != 725:  # OnlyPermanentLeasesSupported: ask for 0, renew anyway
                raise
            self.stats["portmap_upnp_permanent"] += 1
        await self._igd.async_add_port_mapping(**args, lease_duration=timedelta(0))
        return float(lifetime_s)

    async def _upnp_delete(self, cmd: UpnpDelete) -> None:
        if self._igd is None:
            return
        try:
            await self._igd.async_delete_port_mapping(
                ipaddress.IPv4Address("0.0.0.0"), cmd.external_port, "UDP"
            )
        except Exception as exc:
            self.stats["portmap_upnp_errors"] += 1
            log.debug("UPnP DeletePortMapping on %s failed: %r", self.gateway, exc)


class _MapperProtocol(asyncio.DatagramProtocol):
    def __init__(self, driver: PortMapDriver) -> None:
        self.driver = driver

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.driver._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # an ICMP port unreachable from a gateway without NAT-PMP: the probe's silence says it
        self.driver.stats["portmap_icmp_errors"] += 1


# -- the worker's and the probe's use -----------------------------------------------------------


async def start_for_worker(
    setting: str,
    rendezvous_url: str,
    stun_servers: Iterable[str],
    udp_port: int,
    on_mapping: Callable[[PortMapping | None], None],
    *,
    lifetime_s: int = 7200,
) -> PortMapDriver | None:
    """Start mapping the worker's UDP port as ``setting`` says (None: off, loopback, no default
    route, or no route to the gateway); ``on_mapping`` gets the engine's :class:`PortMapping`
    on every grant or renewal, and None when the probe found nothing, every protocol refused or
    the mapping was lost.  The caller tells its engine ``expect_port_mapping`` when this returns
    a driver (the first endpoint report waits for the probe)."""
    gateway = resolve_gateway(setting, rendezvous_url, stun_servers)
    if gateway is None:
        return None

    def on_event(event: Event, now: float) -> None:
        if isinstance(event, MappingGranted):
            on_mapping(
                PortMapping.model_validate(
                    {
                        "protocol": event.protocol,
                        "ip": event.ip,
                        "port": event.port,
                        "lifetime_s": event.lifetime_s,
                    }
                )
            )
        elif isinstance(event, MappingLost | MappingFailed) or (
            isinstance(event, ProbeDone) and not event.protocols
        ):
            on_mapping(None)  # also ends the engine's wait for the probe (expect_port_mapping)

    driver = PortMapDriver(gateway, udp_port, on_event, config=PortMapperConfig(lifetime_s))
    try:
        await driver.start()
    except OSError as exc:  # e.g. no route to the gateway: the worker runs without
        log.warning("port mapping: cannot reach gateway %s: %s", gateway, exc)
        return None
    if setting == "auto":
        driver.watch(gateway_for_auto)  # a new network: probe its gateway
    return driver


async def probe_port_mapping(
    setting: str, stun_servers: Iterable[str], timeout_s: float = 3.0
) -> dict[str, Any] | None:
    """``probe``'s ``port_mapping`` block: which protocols answer, and the endpoint and lease of
    a mapping of a throwaway UDP port (deleted before returning); None when off."""
    gateway = resolve_gateway(setting, "", stun_servers)
    if gateway is None:
        return None
    done = asyncio.Event()

    def on_event(event: Event, now: float) -> None:
        if isinstance(event, MappingGranted) or (
            isinstance(event, ProbeDone) and not event.protocols
        ):
            done.set()

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        driver = PortMapDriver(gateway, sock.getsockname()[1], on_event)
        try:
            await driver.start()
        except OSError as exc:
            return {"gateway": gateway, "protocols": [], "error": str(exc)}
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except TimeoutError:
            pass
        report = {"gateway": gateway, **driver.status()}
        await driver.stop()
    return report


def describe_port_mapping(block: dict[str, Any] | None) -> str:
    """``probe``'s line, like Tailscale netcheck's ``PortMapping: UPnP, NAT-PMP, PCP``."""
    if block is None:
        return "PortMapping: not probed (--port-mapping off, or a STUN server on loopback)"
    names = {"nat-pmp": "NAT-PMP", "pcp": "PCP", "upnp": "UPnP"}
    protocols = ", ".join(names.get(p, p) for p in block.get("protocols") or [])
    line = f"PortMapping: {protocols or 'none'} (gateway {block.get('gateway')})"
    if block.get("external"):
        line += f"; mapped {block['external']} for {block.get('lease_s')} s via {block['protocol']}"
    return line
