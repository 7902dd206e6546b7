"""The port-mapping driver on loopback: a NAT-PMP/PCP gateway and a tiny UPnP IGD (SSDP + HTTP)
in the test act as the router; hostile answers come from other loopback ports and addresses."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiohttp import web

from p2plab.aio.portmap import (
    MAX_HTTP_BYTES,
    PortMapDriver,
    gateway_for_auto,
    is_loopback_server,
    resolve_gateway,
)
from p2plab.core import natpmp
from p2plab.core.portmap import Event, MappingGranted, MappingLost, PortMapperConfig, ProbeDone
from p2plab.errors import ConfigError
from tests.conftest import until
from tests.portmap_gateway import FakeGateway, GatewayProtocol

GW = "127.0.0.1"


@dataclass
class Rig:
    gateway: GatewayProtocol
    port: int
    events: list[Event] = field(default_factory=list)

    def driver(self, **kw: Any) -> PortMapDriver:
        kw.setdefault("ssdp_port", _closed_udp_port())
        kw.setdefault("ssdp_wait_s", 0.3)
        return PortMapDriver(
            GW,
            5000,
            lambda e, now: self.events.append(e),
            config=PortMapperConfig(gateway_port=self.port),
            **kw,
        )

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def _closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((GW, 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    gw = FakeGateway(booted_at=time.monotonic() - 1000)
    transport, proto = await loop.create_datagram_endpoint(
        lambda: GatewayProtocol(gw), local_addr=(GW, 0)
    )
    yield Rig(proto, transport.get_extra_info("sockname")[1])
    transport.close()


async def test_grant_then_delete_on_stop(rig: Rig) -> None:
    driver = await rig.driver().start()
    await until(lambda: rig.of(MappingGranted), "a mapping")
    assert rig.of(ProbeDone) == [ProbeDone(("nat-pmp", "pcp"))]
    assert rig.of(MappingGranted) == [MappingGranted("nat-pmp", "198.51.100.7", 40000, 7200)]
    assert driver.status()["external"] == "198.51.100.7:40000"
    assert rig.gateway.gw.mappings == {5000: (40000, b"")}
    await driver.stop()
    await until(lambda: not rig.gateway.gw.mappings, "the delete")
    assert rig.events[-1] == MappingLost("stopped")


async def test_silence_ends_the_probe_and_sends_nothing_more(rig: Rig) -> None:
    rig.gateway.mute = True
    driver = await rig.driver().start()
    await until(lambda: rig.of(ProbeDone), "the probe's end")
    assert rig.of(ProbeDone) == [ProbeDone(())]
    await asyncio.sleep(0.5)  # the UPnP search gives up too; nothing else may go out
    assert len(rig.gateway.received) == 2
    assert driver.mapper.state == "unavailable" and driver.mapper.get_timer() is None
    await driver.stop()
    assert len(rig.gateway.received) == 2  # nothing mapped: nothing to delete
    assert rig.of(MappingGranted) == []


async def test_hostile_answers_from_elsewhere_are_dropped_and_never_answered(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    driver = await rig.driver().start()
    await until(lambda: rig.of(MappingGranted), "a mapping")
    me = driver._transport.get_extra_info("sockname")  # type: ignore[union-attr]
    forged = bytes(natpmp.MapResponse(natpmp.OP_MAP_UDP, 0, 5000, 5000, 666, 7200))
    spoofers = []
    for host in ("127.0.0.1", "127.0.0.2"):
        got: list[bytes] = []

        class Sink(asyncio.DatagramProtocol):
            def datagram_received(
                self, data: bytes, addr: tuple[str, int], got: list[bytes] = got
            ) -> None:
                got.append(data)

        t, _ = await loop.create_datagram_endpoint(Sink, local_addr=(host, 0))
        spoofers.append((t, got))
        for data in (forged, b"\x00", bytes(2000), b"\x02" + bytes(59)):
            t.sendto(data, me)
    await until(lambda: driver.stats["portmap_drop_not_gateway"] >= 8, "the drops")
    assert rig.of(MappingGranted) == [MappingGranted("nat-pmp", "198.51.100.7", 40000, 7200)]
    before = len(rig.gateway.received)
    await driver.stop()
    await until(lambda: len(rig.gateway.received) == before + 1, "the delete")
    for t, got in spoofers:
        assert got == []  # the worker never sent to the forger
        t.close()


# -- UPnP: a fake IGD ---------------------------------------------------------------------------

DEVICE_XML = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<friendlyName>fake</friendlyName><manufacturer>t</manufacturer><modelName>t</modelName>
<UDN>uuid:00000000-0000-0000-0000-000000000001</UDN>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<friendlyName>wan</friendlyName><manufacturer>t</manufacturer><modelName>t</modelName>
<UDN>uuid:00000000-0000-0000-0000-000000000002</UDN>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<friendlyName>conn</friendlyName><manufacturer>t</manufacturer><modelName>t</modelName>
<UDN>uuid:00000000-0000-0000-0000-000000000003</UDN>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><SCPDURL>/scpd.xml</SCPDURL>
<controlURL>/ctl</controlURL><eventSubURL>/evt</eventSubURL></service></serviceList>
</device></deviceList></device></deviceList></device></root>"""

_ARGS = {
    "AddPortMapping": [
        ("NewRemoteHost", "RemoteHost"),
        ("NewExternalPort", "ExternalPort"),
        ("NewProtocol", "PortMappingProtocol"),
        ("NewInternalPort", "InternalPort"),
        ("NewInternalClient", "InternalClient"),
        ("NewEnabled", "PortMappingEnabled"),
        ("NewPortMappingDescription", "PortMappingDescription"),
        ("NewLeaseDuration", "PortMappingLeaseDuration"),
    ],
    "DeletePortMapping": [
        ("NewRemoteHost", "RemoteHost"),
        ("NewExternalPort", "ExternalPort"),
        ("NewProtocol", "PortMappingProtocol"),
    ],
}
_VARS = {
    "RemoteHost": "string",
    "ExternalPort": "ui2",
    "PortMappingProtocol": "string",
    "InternalPort": "ui2",
    "InternalClient": "string",
    "PortMappingEnabled": "boolean",
    "PortMappingDescription": "string",
    "PortMappingLeaseDuration": "ui4",
    "ExternalIPAddress": "string",
}


def _scpd() -> str:
    actions = "".join(
        f"<action><name>{name}</name><argumentList>"
        + "".join(
            f"<argument><name>{a}</name><direction>in</direction>"
            f"<relatedStateVariable>{v}</relatedStateVariable></argument>"
            for a, v in args
        )
        + "</argumentList></action>"
        for name, args in _ARGS.items()
    )
    actions += (
        "<action><name>GetExternalIPAddress</name><argumentList><argument>"
        "<name>NewExternalIPAddress</name><direction>out</direction>"
        "<relatedStateVariable>ExternalIPAddress</relatedStateVariable></argument>"
        "</argumentList></action>"
    )
    state = "".join(
        f'<stateVariable sendEvents="no"><name>{n}</name><dataType>{t}</dataType></stateVariable>'
        for n, t in _VARS.items()
    )
    return (
        '<?xml version="1.0"?><scpd xmlns="urn:schemas-upnp-org:service-1-0">'
        "<specVersion><major>1</major><minor>0</minor></specVersion>"
        f"<actionList>{actions}</actionList><serviceStateTable>{state}</serviceStateTable></scpd>"
    )


def _soap(action: str, body: str) -> str:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action}Response xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
        f"{body}</u:{action}Response></s:Body></s:Envelope>"
    )


def _fault(code: int) -> str:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault>'
        "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>fault</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    )


class FakeIgd(asyncio.DatagramProtocol):
    """SSDP on a UDP port and the IGD's HTTP on a TCP port, both on 127.0.0.1."""

    def __init__(self) -> None:
        self.http_port = 0
        self.location_host = GW
        self.device_xml = DEVICE_XML
        self.ssdp_extra: list[bytes] = []
        self.actions: list[str] = []
        self.bodies: list[str] = []
        self.fail_codes: list[int] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for extra in self.ssdp_extra:  # hostile answers first
            self.transport.sendto(extra, addr)
        answer = (
            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
            "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            "USN: uuid:00000000-0000-0000-0000-000000000001::"
            "urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            f"LOCATION: http://{self.location_host}:{self.http_port}/rootDesc.xml\r\n\r\n"
        )
        self.transport.sendto(answer.encode(), addr)

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/rootDesc.xml":
            return web.Response(text=self.device_xml, content_type="text/xml")
        if request.path == "/scpd.xml":
            return web.Response(text=_scpd(), content_type="text/xml")
        action = request.headers.get("SOAPACTION", "").strip('"').rsplit("#", 1)[-1]
        self.actions.append(action)
        self.bodies.append(await request.text())
        if action == "AddPortMapping" and self.fail_codes:
            return web.Response(
                status=500, text=_fault(self.fail_codes.pop(0)), content_type="text/xml"
            )
        body = "<NewExternalIPAddress>203.0.113.9</NewExternalIPAddress>"
        body = body if action == "GetExternalIPAddress" else ""
        return web.Response(text=_soap(action, body), content_type="text/xml")


@pytest.fixture
async def igd() -> AsyncIterator[tuple[FakeIgd, int]]:
    loop = asyncio.get_running_loop()
    fake = FakeIgd()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, GW, 0)
    await site.start()
    fake.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    transport, _ = await loop.create_datagram_endpoint(lambda: fake, local_addr=(GW, 0))
    yield fake, transport.get_extra_info("sockname")[1]
    transport.close()
    await runner.cleanup()


async def test_upnp_only_maps_through_the_igd_and_deletes(
    rig: Rig, igd: tuple[FakeIgd, int]
) -> None:
    fake, ssdp_port = igd
    rig.gateway.mute = True
    fake.ssdp_extra = [
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 3000 + b"\r\n\r\n",  # oversize
        b"HTTP/1.1 200 OK\r\nLOCATION: http://127.0.0.2:1/evil.xml\r\n\r\n",  # elsewhere
        b"\xff\xfe garbage",
    ]
    driver = await rig.driver(ssdp_port=ssdp_port).start()
    await until(lambda: rig.of(MappingGranted), "a UPnP mapping")
    # the IGD answered within the probe's 250 ms or after it (then it is taken late)
    assert rig.of(ProbeDone) in ([ProbeDone(())], [ProbeDone(("upnp",))])
    assert rig.of(MappingGranted) == [MappingGranted("upnp", "203.0.113.9", 5000, 7200)]
    assert driver.status()["protocols"] == ["upnp"]
    assert driver.stats["portmap_ssdp_drop_oversize"] == 1
    assert driver.stats["portmap_ssdp_drop_elsewhere"] == 1
    assert fake.actions == ["AddPortMapping", "GetExternalIPAddress"]
    await driver.stop()
    assert fake.actions[-1] == "DeletePortMapping"


async def test_upnp_conflict_and_permanent_only_leases_are_worked_around(
    rig: Rig, igd: tuple[FakeIgd, int]
) -> None:
    fake, ssdp_port = igd
    rig.gateway.mute = True
    fake.fail_codes = [718, 725]  # our port is taken; then: permanent leases only
    driver = await rig.driver(ssdp_port=ssdp_port).start()
    await until(lambda: rig.of(MappingGranted), "a UPnP mapping")
    granted = rig.of(MappingGranted)[0]
    assert granted.protocol == "upnp" and granted.port != 5000 and granted.lifetime_s == 7200
    adds = [b for a, b in zip(fake.actions, fake.bodies, strict=True) if a == "AddPortMapping"]
    assert len(adds) == 3
    assert f"<NewExternalPort>{granted.port}</NewExternalPort>" in adds[2]
    assert "<NewLeaseDuration>0</NewLeaseDuration>" in adds[2]
    assert (driver.stats["portmap_upnp_conflicts"], driver.stats["portmap_upnp_permanent"]) == (
        1,
        1,
    )
    await driver.stop()


async def test_upnp_oversize_description_is_dropped(rig: Rig, igd: tuple[FakeIgd, int]) -> None:
    fake, ssdp_port = igd
    rig.gateway.mute = True
    fake.device_xml = DEVICE_XML.replace(
        "<friendlyName>fake", "<friendlyName>" + "x" * MAX_HTTP_BYTES
    )
    driver = await rig.driver(ssdp_port=ssdp_port).start()
    await until(lambda: driver.stats["portmap_upnp_errors"], "the UPnP probe's failure")
    assert driver.stats["portmap_upnp_drop_oversize"] == 1
    assert rig.of(MappingGranted) == [] and fake.actions == []
    await driver.stop()


# -- which gateway ------------------------------------------------------------------------------


def test_gateway_for_auto_reads_the_default_route(tmp_path: Any) -> None:
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    assert gateway_for_auto(str(route)) == "192.168.1.1"
    assert gateway_for_auto(str(tmp_path / "missing")) is None
    assert resolve_gateway("auto", "ws://203.0.113.5:8000", ["203.0.113.5:3478"], str(route)) == (
        "192.168.1.1"
    )


@pytest.mark.parametrize(
    ("rendezvous", "stun"),
    [
        ("ws://127.0.0.1:8000", []),
        ("ws://localhost:8000", ["203.0.113.5:3478"]),
        ("ws://203.0.113.5:8000", ["127.0.0.1:3478"]),
        ("ws://[::1]:8000", []),
    ],
)
def test_auto_never_probes_on_loopback(rendezvous: str, stun: list[str], tmp_path: Any) -> None:
    route = tmp_path / "route"
    route.write_text("Iface\tDestination\tGateway\tFlags\neth0\t00000000\t0101A8C0\t0003\n")
    assert resolve_gateway("auto", rendezvous, stun, str(route)) is None
    assert resolve_gateway("off", "ws://203.0.113.5", [], str(route)) is None
    assert resolve_gateway("10.0.0.1", rendezvous, stun) == "10.0.0.1"  # explicit: the user's call
    with pytest.raises(ConfigError):
        resolve_gateway("router.example", rendezvous, stun)
    assert is_loopback_server("127.0.0.5:9") and not is_loopback_server("rendezvous.example:80")


async def test_upnp_entity_bomb_and_foreign_control_url_are_refused(
    rig: Rig, igd: tuple[FakeIgd, int]
) -> None:
    fake, ssdp_port = igd
    rig.gateway.mute = True
    bomb = '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;">]>'
    fake.device_xml = bomb + DEVICE_XML.split("?>", 1)[1].replace("fake", "&b;")
    driver = await rig.driver(ssdp_port=ssdp_port).start()
    await until(lambda: driver.stats["portmap_upnp_errors"], "the UPnP probe's failure")
    await driver.stop()
    # a description whose SCPD lives on another host: never fetched (the library refuses it
    # itself, and BoundedRequester would), so no WAN service and no UPnP
    fake.device_xml = DEVICE_XML.replace("<SCPDURL>/scpd.xml", "<SCPDURL>http://127.0.0.2:9/s.xml")
    rig.events.clear()
    driver = await rig.driver(ssdp_port=ssdp_port).start()
    await until(lambda: rig.of(ProbeDone) and not driver._tasks, "the probe's end")
    assert driver.status()["protocols"] == [] and rig.of(MappingGranted) == []
    assert fake.actions == []
    await driver.stop()


async def test_a_new_gateway_is_probed_and_mapped(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    other = FakeGateway(ext_ip="203.0.113.77", booted_at=time.monotonic())
    transport, _ = await loop.create_datagram_endpoint(
        lambda: GatewayProtocol(other), local_addr=("127.0.0.3", rig.port)
    )
    current = [GW]
    driver = await rig.driver().start()
    driver.watch(lambda: current[0], interval_s=0.02)
    try:
        await until(lambda: rig.of(MappingGranted), "the first mapping")
        await asyncio.sleep(0.1)  # the same gateway: nothing happens
        assert driver.stats["portmap_network_changes"] == 0
        current[0] = "127.0.0.3"
        await until(lambda: len(rig.of(MappingGranted)) == 2, "the new network's mapping")
        assert MappingLost("network-changed") in rig.events
        assert rig.events[-1] == MappingGranted("nat-pmp", "203.0.113.77", 40000, 7200)
        assert driver.stats["portmap_network_changes"] == 1
    finally:
        await driver.stop()
        transport.close()
    await until(lambda: not other.mappings, "the delete at the new gateway")
