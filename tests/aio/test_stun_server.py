"""The embedded STUN server on loopback: answers, CHANGE-REQUEST, legacy clients, garbage."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from p2plab.core.stun import (
    CHANGE_IP,
    CHANGE_PORT,
    Class,
    Message,
    Method,
    make_binding_request,
    parse_message,
)
from p2plab.errors import ConfigError
from p2plab.server.stun_server import StunServer

try:
    from tests.conftest import TIMEOUT_UNIT
    from tests.stun_fixtures import RawClient, random_bytes
except ImportError:  # pragma: no cover - tests run from inside tests/
    from conftest import TIMEOUT_UNIT  # type: ignore[no-redef]
    from stun_fixtures import RawClient, random_bytes  # type: ignore[no-redef]

T = 2.0 * TIMEOUT_UNIT


async def test_answers_binding_request() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    client = RawClient()
    try:
        assert len(server.addresses) == 1
        assert server.other_address is None
        request = make_binding_request(random_bytes)
        reply, src = await client.request(request, server.primary_address, T)
        assert src == server.primary_address
        assert reply.message_class == Class.RESPONSE
        assert reply.attributes["XOR-MAPPED-ADDRESS"] == client.address
        assert "FINGERPRINT" in reply.attributes  # parse_message verified it
        # nothing the request's flavour does not need (issue 14, finding 9)
        assert set(reply.attributes) == {"XOR-MAPPED-ADDRESS", "FINGERPRINT"}
        assert server.stats["requests"] >= 1
        assert server.stats["responses"] >= 1
    finally:
        client.close()
        server.close()


async def test_garbage_is_dropped_and_counted_and_service_continues() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    client = RawClient()
    try:
        addr = server.primary_address
        junk = [
            os.urandom(100),
            b"",
            b"\x00\x01\x00",
            bytes(make_binding_request(random_bytes))[:-3],  # truncated
            b"\x00\x01\x00\x08\x21\x12\xa4\x42" + os.urandom(12) + b"\x80\x28\x00\x04abcd",
        ]
        for data in junk:
            client.send(data, addr)
        # a Binding indication and a response: valid STUN, but not requests
        indication = Message(Method.BINDING, Class.INDICATION, os.urandom(12))
        client.send(bytes(indication), addr)
        response = Message(Method.BINDING, Class.RESPONSE, os.urandom(12))
        client.send(bytes(response), addr)
        request = make_binding_request(random_bytes)
        reply, _ = await client.request(request, addr, T)
        assert reply.attributes["XOR-MAPPED-ADDRESS"] == client.address
        assert server.stats["malformed_dropped"] == len(junk)
        assert server.stats["not_request_dropped"] == 2
        assert server.stats["datagrams_in"] >= len(junk) + 3
        assert await client.silence(0.05) == []  # nothing answered the junk
    finally:
        client.close()
        server.close()


async def test_change_request_with_alternate_address() -> None:
    server = await StunServer.start("127.0.0.1", 0, alt_host="127.0.0.2", alt_port=0)
    client = RawClient()
    try:
        assert len(server.addresses) == 4
        (a1, p1), (a1b, p2), (a2, p1b), (a2b, p2b) = server.addresses
        assert (a1, a1b, a2, a2b) == ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2")
        assert p1 == p1b and p2 == p2b and p1 != p2
        assert server.other_address == ("127.0.0.2", p2)
        primary = (a1, p1)
        cases = {
            0: (a1, p1),
            CHANGE_PORT: (a1, p2),
            CHANGE_IP: (a2, p1),
            CHANGE_IP | CHANGE_PORT: (a2, p2),
        }
        for flags, expected_source in cases.items():
            request = make_binding_request(random_bytes, fingerprint=False)
            request.attributes["CHANGE-REQUEST"] = flags  # 0 too: a discovery request
            request.add_fingerprint()
            reply, src = await client.request(request, primary, T)
            assert src == expected_source, flags
            assert reply.attributes["RESPONSE-ORIGIN"] == expected_source
            assert reply.attributes["OTHER-ADDRESS"] == (a2, p2)
            assert reply.attributes["XOR-MAPPED-ADDRESS"] == client.address
        # a request to the alternate address sees the primary one as "other"
        reply, src = await client.request(make_binding_request(random_bytes), (a2, p2), T)
        assert src == (a2, p2)
        assert reply.attributes["OTHER-ADDRESS"] == (a1, p1)
        assert server.stats["change_requests"] == 3
    finally:
        client.close()
        server.close()


async def test_port_only_alternate_answers_420_for_ip_change() -> None:
    server = await StunServer.start("127.0.0.1", 0, alt_port=0)
    client = RawClient()
    try:
        assert len(server.addresses) == 2
        primary, alt = server.addresses
        reply, src = await client.request(
            make_binding_request(random_bytes, change_port=True), primary, T
        )
        assert src == alt
        assert reply.message_class == Class.RESPONSE
        assert reply.attributes["OTHER-ADDRESS"] == alt

        reply, src = await client.request(
            make_binding_request(random_bytes, change_ip=True), primary, T
        )
        assert reply.message_class == Class.ERROR
        assert reply.attributes["ERROR-CODE"][0] == 420
        assert reply.attributes["UNKNOWN-ATTRIBUTES"] == (0x0003,)
        assert server.stats["change_unsupported"] == 1
        assert server.stats["error_responses"] == 1
    finally:
        client.close()
        server.close()


def _legacy_request(tid16: bytes, change: int | None = None) -> bytes:
    body = b"" if change is None else struct.pack("!HHI", 0x0003, 4, change)
    return struct.pack("!HH", 0x0001, len(body)) + tid16 + body


async def test_rfc3489_client_gets_plain_attributes_and_its_id_back() -> None:
    server = await StunServer.start("127.0.0.1", 0, alt_host="127.0.0.2", alt_port=0)
    client = RawClient()
    try:
        tid = os.urandom(16)
        client.send(_legacy_request(tid), server.primary_address)
        data, src = await client.recv(T)
        assert data[4:20] == tid
        reply = parse_message(data)
        assert reply.legacy
        assert set(reply.attributes) == {"MAPPED-ADDRESS", "CHANGED-ADDRESS"}
        assert reply.attributes["MAPPED-ADDRESS"] == client.address
        assert reply.attributes["CHANGED-ADDRESS"] == server.other_address
        assert src == server.primary_address
        # every attribute length a multiple of 4 (RFC 3489 parsers do not skip padding)
        pos = 20
        while pos < len(data):
            length = struct.unpack("!H", data[pos + 2 : pos + 4])[0]
            assert length % 4 == 0
            pos += 4 + length
        assert server.stats["legacy_requests"] == 1
    finally:
        client.close()
        server.close()


async def test_rfc3489_ip_change_without_alternate_is_dropped() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    client = RawClient()
    try:
        client.send(
            _legacy_request(os.urandom(16), CHANGE_IP | CHANGE_PORT), server.primary_address
        )
        assert await client.silence(0.2 * TIMEOUT_UNIT) == []
        assert server.stats["change_unsupported"] == 1
        client.send(_legacy_request(os.urandom(16)), server.primary_address)
        data, _ = await client.recv(T)
        assert parse_message(data).attributes["MAPPED-ADDRESS"] == client.address
    finally:
        client.close()
        server.close()


async def test_unknown_comprehension_required_attribute_gets_420() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    client = RawClient()
    try:
        request = Message(Method.BINDING, Class.REQUEST, os.urandom(12), {"UNKNOWN-0x7F01": b"x"})
        reply, _ = await client.request(request, server.primary_address, T)
        assert reply.message_class == Class.ERROR
        assert reply.attributes["ERROR-CODE"] == (420, "Unknown Attribute")
        assert reply.attributes["UNKNOWN-ATTRIBUTES"] == (0x7F01,)
    finally:
        client.close()
        server.close()


async def test_response_port_redirects_the_answer() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    client = RawClient()
    other = RawClient()
    try:
        request = make_binding_request(random_bytes, fingerprint=False)
        request.attributes["RESPONSE-PORT"] = other.address[1]
        client.send(bytes(request), server.primary_address)
        data, _ = await other.recv(T)
        reply = parse_message(data)
        assert reply.transaction_id == request.transaction_id
        assert reply.attributes["XOR-MAPPED-ADDRESS"] == client.address
    finally:
        client.close()
        other.close()
        server.close()


async def test_wildcard_bind_reports_the_address_it_was_reached_at() -> None:
    server = await StunServer.start("0.0.0.0", 0, alt_port=0)
    client = RawClient()
    try:
        port, alt = server.addresses[0][1], server.addresses[1][1]
        request = make_binding_request(random_bytes, change_port=True)
        reply, src = await client.request(request, ("127.0.0.1", port), T)
        assert src == ("127.0.0.1", alt)
        assert reply.attributes["RESPONSE-ORIGIN"] == ("127.0.0.1", alt)
        assert reply.attributes["OTHER-ADDRESS"] == ("127.0.0.1", alt)
        reply, _ = await client.request(make_binding_request(random_bytes), ("127.0.0.1", port), T)
        assert "RESPONSE-ORIGIN" not in reply.attributes  # a plain request needs no origin
        assert reply.attributes["OTHER-ADDRESS"] == ("127.0.0.1", alt)
    finally:
        client.close()
        server.close()


async def test_bad_configuration() -> None:
    with pytest.raises(ConfigError, match="must be a concrete address"):
        await StunServer.start("0.0.0.0", 0, alt_host="127.0.0.2")
    with pytest.raises(ConfigError, match="must be a different address"):
        await StunServer.start("127.0.0.1", 0, alt_host="127.0.0.1")
    with pytest.raises(ConfigError, match="equals the primary port"):
        await StunServer.start("127.0.0.1", 40000, alt_port=40000)


async def test_run_stun_server_logs_where_it_listens_and_stops_on_cancel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio
    import re

    from p2plab.server.stun_server import run_stun_server

    caplog.set_level("INFO", logger="p2plab.server.stun_server")
    task = asyncio.ensure_future(run_stun_server("127.0.0.1", 0))
    client = RawClient()
    try:
        port = None
        for _ in range(200):
            found = re.search(r"listening on UDP 127\.0\.0\.1:(\d+)", caplog.text)
            if found:
                port = int(found.group(1))
                break
            await asyncio.sleep(0.01)
        assert port is not None, caplog.text
        reply, _ = await client.request(make_binding_request(random_bytes), ("127.0.0.1", port), T)
        assert reply.attributes["XOR-MAPPED-ADDRESS"] == client.address
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        client.close()
    assert "STUN server stopped" in caplog.text


async def test_ipv6_loopback() -> None:
    import socket

    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        # No IPv6 here (some containers): starting must fail cleanly, not half-bind.
        with pytest.raises(OSError):
            await StunServer.start("::1", 0)
        return
    from p2plab.aio.endpoint import UdpEndpoint
    from p2plab.aio.stun import StunProbe

    server = await StunServer.start("::1", 0)
    endpoint = await UdpEndpoint.bind("::1", 0)
    try:
        result = await StunProbe(endpoint, [f"[::1]:{server.primary_address[1]}"]).mapped_address()
        assert result.mapped == endpoint.local_address
    finally:
        endpoint.close()
        server.close()


# --- not a reflector (issue 14, finding 9) -------------------------------------------------------


async def test_a_flood_from_one_source_gets_its_burst_not_every_answer() -> None:
    # Finding 9: every request was answered at any rate.  A refill this slow gives no token
    # during the test, so exactly the burst is answered, counted by datagrams, not by time.
    server = await StunServer.start("127.0.0.1", 0, rate_per_s=0.001, burst=5)
    client = RawClient()
    other = RawClient("127.0.0.2")
    try:
        for _ in range(200):
            client.send(bytes(make_binding_request(random_bytes)), server.primary_address)
        for _ in range(200):
            if server.stats["datagrams_in"] >= 200:
                break
            await asyncio.sleep(0.01)
        got = await client.silence(0.2 * TIMEOUT_UNIT)
        assert len(got) == 5
        assert server.stats["datagrams_in"] == 200
        assert server.stats["responses"] == 5 and server.stats["rate_limited"] == 195
        # another source IP has its own bucket
        reply, _ = await other.request(make_binding_request(random_bytes), server.primary_address)
        assert reply.attributes["XOR-MAPPED-ADDRESS"] == other.address
    finally:
        client.close()
        other.close()
        server.close()


def _bind_reflection_port() -> socket.socket:
    for port in (11211, 1900, 5353, 10001, 3702):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.setblocking(False)
        return sock
    pytest.fail("no reflection-service port free on 127.0.0.1 to send from")


async def test_requests_from_a_reflection_service_port_are_not_answered() -> None:
    server = await StunServer.start("127.0.0.1", 0)
    sock = _bind_reflection_port()
    client = RawClient()
    try:
        sock.sendto(bytes(make_binding_request(random_bytes)), server.primary_address)
        # a RESPONSE-PORT cannot aim the answer at a service port either
        request = make_binding_request(random_bytes, fingerprint=False)
        request.attributes["RESPONSE-PORT"] = 53
        client.send(bytes(request), server.primary_address)
        # an ordinary request afterwards is answered, so the two above were processed
        reply, _ = await client.request(make_binding_request(random_bytes), server.primary_address)
        assert reply.attributes["XOR-MAPPED-ADDRESS"] == client.address
        await asyncio.sleep(0.05 * TIMEOUT_UNIT)
        with pytest.raises(BlockingIOError):
            sock.recvfrom(2048)
        assert server.stats["reflection_port_dropped"] == 2
        assert server.stats["responses"] == 1
    finally:
        sock.close()
        client.close()
        server.close()


async def test_software_is_opt_in_and_limits_are_checked() -> None:
    server = await StunServer.start("127.0.0.1", 0, software="example 1.0")
    client = RawClient()
    try:
        reply, _ = await client.request(make_binding_request(random_bytes), server.primary_address)
        assert reply.attributes["SOFTWARE"] == "example 1.0"
    finally:
        client.close()
        server.close()
    for bad in ({"rate_per_s": 0.0}, {"burst": 0.5}, {"max_sources": 0}):
        with pytest.raises(ConfigError, match="STUN"):
            await StunServer.start("127.0.0.1", 0, **bad)  # type: ignore[arg-type]


async def test_the_rendezvous_s_embedded_stun_server_is_limited_as_configured() -> None:
    from rendezvous_service_code.main import RendezvousServer

    rv = await RendezvousServer.start(
        "127.0.0.1", 0, stun_port=0, stun_rate_per_s=0.001, stun_burst=3
    )
    client = RawClient()
    try:
        assert rv.stun_port is not None
        for _ in range(20):
            client.send(bytes(make_binding_request(random_bytes)), ("127.0.0.1", rv.stun_port))
        got = await client.silence(0.2 * TIMEOUT_UNIT)
        assert len(got) == 3  # the burst; the refill gives nothing during the test
        assert all("SOFTWARE" not in parse_message(d).attributes for d, _ in got)
    finally:
        client.close()
        await rv.close()
