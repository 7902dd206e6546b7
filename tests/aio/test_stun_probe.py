"""StunProbe on a shared UdpEndpoint against our server and a scripted fake "NAT" server, plus the
pure RFC 5780 classification functions."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from p2plab.aio.endpoint import UdpEndpoint
from p2plab.aio.stun import StunProbe, probe_nat
from p2plab.core.nat import (
    BehaviorTests,
    FilteringBehavior,
    MappingBehavior,
    classic_from_behavior,
    classic_name,
    classify_filtering,
    classify_mapping,
    derive_behavior,
)
from p2plab.core.stun import CHANGE_IP, CHANGE_PORT, Class, Message, Method, parse_message
from p2plab.errors import ConfigError, StunError, StunTimeout
from p2plab.server.stun_server import StunServer

try:
    from tests.conftest import TIMEOUT_UNIT
    from tests.stun_fixtures import RawClient
except ImportError:  # pragma: no cover
    from conftest import TIMEOUT_UNIT  # type: ignore[no-redef]
    from stun_fixtures import RawClient  # type: ignore[no-redef]

Address = tuple[str, int]
EI = MappingBehavior.ENDPOINT_INDEPENDENT
AD = MappingBehavior.ADDRESS_DEPENDENT
APD = MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
F_EI = FilteringBehavior.ENDPOINT_INDEPENDENT
F_AD = FilteringBehavior.ADDRESS_DEPENDENT
F_APD = FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT
FAST = {"timeout": 0.6 * TIMEOUT_UNIT, "rto": 0.05, "retries": 4}
LIMIT = 20 * TIMEOUT_UNIT


# --- pure classification (RFC 5780 sections 4.3 and 4.4) -----------------------------------------


def test_classify_mapping() -> None:
    a, b, c = ("198.51.100.1", 1000), ("198.51.100.1", 1001), ("198.51.100.1", 1002)
    assert classify_mapping(a, a, None) is EI
    assert classify_mapping(a, b, b) is AD
    assert classify_mapping(a, b, c) is APD
    assert classify_mapping(None, a, a) is MappingBehavior.UNKNOWN
    assert classify_mapping(a, None, a) is MappingBehavior.UNKNOWN
    assert classify_mapping(a, b, None) is MappingBehavior.UNKNOWN


def test_classify_filtering() -> None:
    assert classify_filtering(True, True, None) is F_EI
    assert classify_filtering(True, True, False) is F_EI
    assert classify_filtering(True, False, True) is F_AD
    assert classify_filtering(True, False, False) is F_APD
    assert classify_filtering(False, True, True) is FilteringBehavior.UNKNOWN
    assert classify_filtering(True, None, True) is FilteringBehavior.UNKNOWN
    assert classify_filtering(True, False, None) is FilteringBehavior.UNKNOWN


def test_derive_behavior_and_classic_names() -> None:
    local = ("198.18.0.2", 5000)
    public = ("203.0.113.9", 6000)
    mapping, filtering, behind = derive_behavior(
        BehaviorTests(local=local, mapped1=local, filter2=True)
    )
    assert (mapping, filtering, behind) == (EI, F_EI, False)
    assert classic_from_behavior(mapping, filtering, behind) == "Open Internet"
    assert classic_from_behavior(EI, F_APD, False) == "Symmetric UDP Firewall"

    tests = BehaviorTests(local=local, mapped1=public, mapped2=public, filter2=False, filter3=False)
    mapping, filtering, behind = derive_behavior(tests)
    assert (mapping, filtering, behind) == (EI, F_APD, True)
    assert classic_from_behavior(mapping, filtering, behind) == "Port-Restricted Cone"
    assert classic_from_behavior(EI, F_AD, True) == "Restricted Cone"
    assert classic_from_behavior(EI, F_EI, True) == "Full Cone"
    assert classic_from_behavior(APD, F_APD, True) == "Symmetric NAT"
    assert classic_from_behavior(MappingBehavior.UNKNOWN, F_EI, True) is None
    assert classic_name("Restric Port NAT") == "Port-Restricted Cone"
    assert classic_name("Restric NAT") == "Restricted Cone"
    assert classic_name("something new") == "something new"


# --- against our own server ----------------------------------------------------------------------


async def test_mapped_address_from_our_server() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        probe = StunProbe(endpoint, [f"127.0.0.1:{server.primary_address[1]}"])
        result = await asyncio.wait_for(probe.mapped_address(), LIMIT)
        assert result.mapped == endpoint.local_address
        assert result.server == server.primary_address
        assert result.rtt_s >= 0
        assert len(result.answers) == 1 and result.answers[0].ok
        assert result.answers[0].software is None  # no SOFTWARE unless opted in (issue 14)
        assert result.consistent
        assert server.stats["responses"] >= 1
    finally:
        endpoint.close()
        server.close()


async def test_probe_shares_the_endpoint_with_peer_traffic() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    peer = RawClient()
    received: list[bytes] = []
    endpoint.peer_handler = lambda data, addr: received.append(data)
    try:
        probe = StunProbe(endpoint, [server.primary_address])
        task = asyncio.ensure_future(probe.mapped_address())
        sent = [f"peer datagram {i}".encode() for i in range(50)]
        for data in sent:
            peer.send(data, endpoint.local_address)
            await asyncio.sleep(0)
        result = await asyncio.wait_for(task, LIMIT)
        assert result.mapped == endpoint.local_address
        for _ in range(100):
            if len(received) == len(sent):
                break
            await asyncio.sleep(0.01)
        assert received == sent
        assert endpoint.stats["dropped_no_handler"] == 0
    finally:
        peer.close()
        endpoint.close()
        server.close()


async def test_one_dead_server_is_reported_and_probe_succeeds() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    dead = RawClient()  # a socket that receives and never answers
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        probe = StunProbe(endpoint, [dead.address, server.primary_address], **FAST)
        result = await asyncio.wait_for(probe.mapped_address(), LIMIT)
        assert result.server == server.primary_address
        dead_answer, live_answer = result.answers
        assert dead_answer.server == dead.address
        assert not dead_answer.ok
        assert "no answer" in (dead_answer.error or "")
        assert live_answer.ok and live_answer.mapped == endpoint.local_address
        # the dead server really got the request and its retransmissions, all the same bytes
        got = await dead.silence(0.05)
        assert len(got) == dead_answer.attempts > 1
        assert len({data for data, _ in got}) == 1
        assert parse_message(got[0][0]).message_class == Class.REQUEST
    finally:
        dead.close()
        endpoint.close()
        server.close()


async def test_all_dead_raises_stun_timeout_naming_servers() -> None:
    dead1, dead2 = RawClient(), RawClient()
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        probe = StunProbe(endpoint, [dead1.address, f"127.0.0.1:{dead2.address[1]}"], **FAST)
        with pytest.raises(StunTimeout) as info:
            await asyncio.wait_for(probe.mapped_address(), LIMIT)
        text = str(info.value)
        assert f"127.0.0.1:{dead1.address[1]}" in text
        assert f"127.0.0.1:{dead2.address[1]}" in text
        assert "no STUN server answered" in text
        assert isinstance(info.value, TimeoutError)
    finally:
        dead1.close()
        dead2.close()
        endpoint.close()


async def test_first_answer_mode_does_not_wait_for_dead_servers() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    dead = RawClient()
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        probe = StunProbe(endpoint, [dead.address, server.primary_address], timeout=30.0)
        result = await asyncio.wait_for(probe.mapped_address(wait_all=False), LIMIT)
        assert result.mapped == endpoint.local_address
        assert result.answers[0].error == "not waited for (another server answered)"
    finally:
        dead.close()
        endpoint.close()
        server.close()


async def test_bad_server_specs_raise_config_error() -> None:
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="bad STUN server 'host:nope'"):
            StunProbe(endpoint, ["host:nope"])
        with pytest.raises(ConfigError, match="at least one"):
            StunProbe(endpoint, [])
        probe = StunProbe(endpoint, ("127.0.0.1", 3478))
        assert probe.servers == (("127.0.0.1", 3478),)
    finally:
        endpoint.close()


async def test_nat_report_against_our_rfc5780_server_on_loopback() -> None:
    server = await StunServer.start("127.0.0.1", 0, alt_host="127.0.0.2", alt_port=0)
    endpoint = await UdpEndpoint.bind("0.0.0.0", 0)
    try:
        probe = StunProbe(endpoint, [server.primary_address])
        report = await asyncio.wait_for(probe.nat_report(classic=False), LIMIT)
        port = endpoint.local_address[1]
        assert report.local == ("127.0.0.1", port)  # real source address, not 0.0.0.0
        assert report.mapped == ("127.0.0.1", port)
        assert report.behind_nat is False
        assert report.mapping is EI
        assert report.filtering is F_EI
        assert report.classic is None
        assert report.classic_rfc5780 == "Open Internet"
        assert report.other_address == server.other_address
        assert server.stats["change_requests"] >= 2
        json.dumps(report.to_dict())
    finally:
        endpoint.close()
        server.close()


async def test_nat_report_without_alternate_address_says_why() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    try:
        report = await asyncio.wait_for(
            probe_nat([f"127.0.0.1:{server.primary_address[1]}"], classic=False), LIMIT
        )
        assert report.filtering is FilteringBehavior.UNKNOWN
        assert any("OTHER-ADDRESS" in n for n in report.notes)
        assert report.to_dict()["servers"][0]["ok"] is True
    finally:
        server.close()


# --- a scripted server that plays a NAT: it lies about the mapped address and drops answers -------


class FakeNatServer:
    """Four sockets (127.0.0.1/127.0.0.2 x P1/P2) answering like an RFC 5780 server would to a
    client behind a NAT of the given behaviour: the reported mapping depends on the socket the
    request reached, and answers from addresses the NAT would filter are dropped."""

    def __init__(self, mapping: str, filtering: str, mapped_ip: str, base_port: int) -> None:
        self.mapping, self.filtering = mapping, filtering
        self.mapped_ip, self.base_port = mapped_ip, base_port
        self.socks: dict[tuple[int, int], socket.socket] = {}
        self.ignore_change = False

    def open(self) -> None:
        for _ in range(50):
            try:
                a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                a.bind(("127.0.0.1", 0))
                b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                b.bind(("127.0.0.1", 0))
                p1, p2 = a.getsockname()[1], b.getsockname()[1]
                c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                c.bind(("127.0.0.2", p1))
                d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                d.bind(("127.0.0.2", p2))
            except OSError:
                continue
            self.socks = {(0, 0): a, (0, 1): b, (1, 0): c, (1, 1): d}
            break
        loop = asyncio.get_running_loop()
        for key, s in self.socks.items():
            s.setblocking(False)
            loop.add_reader(s.fileno(), self._readable, key)

    def addr(self, key: tuple[int, int]) -> Address:
        host, port = self.socks[key].getsockname()
        return (host, port)

    def _mapped(self, key: tuple[int, int]) -> Address:
        offset = {"ei": 0, "ad": key[0], "apd": key[0] * 2 + key[1]}[self.mapping]
        return (self.mapped_ip, self.base_port + offset)

    def _readable(self, key: tuple[int, int]) -> None:
        s = self.socks[key]
        data, src = s.recvfrom(2048)
        request = parse_message(data)
        change = request.attributes.get("CHANGE-REQUEST", 0)
        out = (key[0] ^ bool(change & CHANGE_IP), key[1] ^ bool(change & CHANGE_PORT))
        if self.ignore_change:
            out = key
        # The NAT lets the answer in if its filtering allows that source (the client only ever
        # sent to the socket it asked, and to whatever the mapping tests asked before).
        if out != key:
            if self.filtering == "apd" or (self.filtering == "ad" and out[0] != key[0]):
                return
        response = Message(
            Method.BINDING,
            Class.RESPONSE,
            request.transaction_id,
            {
                "XOR-MAPPED-ADDRESS": self._mapped(key),
                "RESPONSE-ORIGIN": self.addr(out),
                "OTHER-ADDRESS": self.addr((key[0] ^ 1, key[1] ^ 1)),
            },
        )
        response.add_fingerprint()
        self.socks[out].sendto(bytes(response), src)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self.socks.values():
            loop.remove_reader(s.fileno())
            s.close()


@pytest.mark.parametrize(
    ("mapping", "filtering", "expected", "classic"),
    [
        ("ei", "ei", (EI, F_EI), "Full Cone"),
        ("ei", "ad", (EI, F_AD), "Restricted Cone"),
        ("ei", "apd", (EI, F_APD), "Port-Restricted Cone"),
        ("ad", "apd", (AD, F_APD), "Symmetric NAT"),
        ("apd", "apd", (APD, F_APD), "Symmetric NAT"),
    ],
)
async def test_nat_report_classifies_every_behaviour(
    mapping: str, filtering: str, expected: tuple[MappingBehavior, FilteringBehavior], classic: str
) -> None:
    fake = FakeNatServer(mapping, filtering, "127.0.0.4", 41000)
    fake.open()
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        probe = StunProbe(endpoint, [fake.addr((0, 0))], **FAST)
        report = await asyncio.wait_for(probe.nat_report(classic=False, hairpin=False), LIMIT)
        assert (report.mapping, report.filtering) == expected
        assert report.behind_nat is True
        assert report.mapped == ("127.0.0.4", 41000)
        assert report.classic_rfc5780 == classic
        assert report.hairpin is None
    finally:
        endpoint.close()
        fake.close()


async def test_hairpin_detected_when_our_mapped_address_reaches_us() -> None:
    endpoint = await UdpEndpoint.bind("0.0.0.0", 0)
    # The fake "public" address 127.0.0.4:<our port> reaches our wildcard-bound socket: a NAT
    # that hairpins.
    fake = FakeNatServer("ei", "ei", "127.0.0.4", endpoint.local_address[1])
    fake.open()
    try:
        probe = StunProbe(endpoint, [fake.addr((0, 0))], **FAST)
        report = await asyncio.wait_for(probe.nat_report(classic=False, hairpin=True), LIMIT)
        assert report.behind_nat is True
        assert report.hairpin is True
    finally:
        endpoint.close()
        fake.close()


async def test_server_ignoring_change_request_gives_unknown_filtering() -> None:
    fake = FakeNatServer("ei", "ei", "127.0.0.4", 41000)
    fake.ignore_change = True
    fake.open()
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        probe = StunProbe(endpoint, [fake.addr((0, 0))], **FAST)
        report = await asyncio.wait_for(probe.nat_report(classic=False, hairpin=False), LIMIT)
        assert report.filtering is FilteringBehavior.UNKNOWN
        assert any("ignored CHANGE-REQUEST" in n for n in report.notes)
        assert report.mapping is EI
    finally:
        endpoint.close()
        fake.close()


def test_stun_error_is_what_the_codec_raises() -> None:
    with pytest.raises(StunError):
        parse_message(b"junk")


async def test_ipv6_server_on_an_ipv4_endpoint_fails_cleanly() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        probe = StunProbe(endpoint, ["[2001:db8::1]:3478", server.primary_address], **FAST)
        result = await asyncio.wait_for(probe.mapped_address(), LIMIT)
        assert result.mapped == endpoint.local_address
        v6 = result.answers[0]
        assert not v6.ok and "IPv6 server" in (v6.error or "")
    finally:
        endpoint.close()
        server.close()
