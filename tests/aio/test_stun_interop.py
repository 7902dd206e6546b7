"""Interop with STUN code nobody here wrote, both ways, on loopback:

(a) pystun3 (an RFC 3489 client) against our StunServer with an alternate address;
(b) our StunProbe against Debian's coturn with two listening IPs and an alternate port.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import stun  # type: ignore[import-untyped]  # pystun3

from p2plab.aio.endpoint import UdpEndpoint
from p2plab.aio.stun import StunProbe, probe_nat
from p2plab.core.nat import FilteringBehavior, MappingBehavior
from p2plab.errors import StunTimeout
from p2plab.server.stun_server import StunServer

try:
    from tests.conftest import TIMEOUT_UNIT, require
    from tests.stun_fixtures import free_udp_port_pair
except ImportError:  # pragma: no cover
    from conftest import TIMEOUT_UNIT, require  # type: ignore[no-redef]
    from stun_fixtures import free_udp_port_pair  # type: ignore[no-redef]

LIMIT = 60 * TIMEOUT_UNIT


# --- (a) pystun3 -> our server -------------------------------------------------------------------


async def test_pystun3_sees_open_internet_through_our_rfc5780_server() -> None:
    server = await StunServer.start("127.0.0.1", 0, alt_host="127.0.0.2", alt_port=0)
    try:
        port = server.primary_address[1]
        nat_type, ip, ext_port = await asyncio.wait_for(
            asyncio.to_thread(
                stun.get_ip_info,
                source_ip="127.0.0.1",
                source_port=0,
                stun_host="127.0.0.1",
                stun_port=port,
            ),
            LIMIT,
        )
        assert nat_type == "Open Internet"
        assert ip == "127.0.0.1"
        assert isinstance(ext_port, int) and ext_port > 0
        # pystun3 spoke RFC 3489 to us and its CHANGE-REQUEST was honoured from 127.0.0.2
        assert server.stats["legacy_requests"] >= 2
        assert server.stats["change_requests"] >= 1
        assert server.stats["change_unsupported"] == 0
    finally:
        server.close()


async def test_pystun3_without_alternate_address_cannot_see_open_internet() -> None:
    # Our server drops RFC 3489 change requests it cannot honour, so pystun3's test II goes
    # unanswered: it must then not claim "Open Internet".
    server = await StunServer.start("127.0.0.1", 0)
    try:
        nat_type, _, _ = await asyncio.wait_for(
            asyncio.to_thread(
                stun.get_ip_info,
                source_ip="127.0.0.1",
                source_port=0,
                stun_host="127.0.0.1",
                stun_port=server.primary_address[1],
            ),
            LIMIT,
        )
        assert nat_type == "Symmetric UDP Firewall"
        assert server.stats["change_unsupported"] >= 1
    finally:
        server.close()


async def test_nat_report_with_classic_against_our_server() -> None:
    server = await StunServer.start("127.0.0.1", 0, alt_host="127.0.0.2", alt_port=0)
    try:
        report = await asyncio.wait_for(probe_nat([server.primary_address], classic=True), LIMIT)
        assert report.classic_raw == "Open Internet"
        assert report.classic == "Open Internet"
        assert report.classic_rfc5780 == "Open Internet"
        assert report.mapping is MappingBehavior.ENDPOINT_INDEPENDENT
        assert report.filtering is FilteringBehavior.ENDPOINT_INDEPENDENT
    finally:
        server.close()


# --- (b) our StunProbe -> coturn -----------------------------------------------------------------


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


async def _wait_until_answers(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        probe = StunProbe(endpoint, [("127.0.0.1", port)], timeout=0.5, rto=0.1, retries=3)
        for _ in range(int(40 * TIMEOUT_UNIT)):
            if proc.poll() is not None:
                raise AssertionError(f"turnserver exited: {_tail(log)}")
            try:
                await probe.mapped_address()
                return
            except StunTimeout:
                continue
        raise AssertionError(f"turnserver never answered: {_tail(log)}")
    finally:
        endpoint.close()


@pytest.fixture
async def coturn() -> AsyncIterator[tuple[int, int]]:
    turnserver = shutil.which("turnserver")
    require(turnserver is not None, "coturn (turnserver)")
    assert turnserver is not None
    port = free_udp_port_pair()
    with tempfile.TemporaryDirectory(prefix="p2plab-coturn-") as tmp:
        log = Path(tmp) / "turnserver.log"
        cmd = [
            turnserver,
            "-n",
            "--stun-only",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "--listening-ip",
            "127.0.0.1",
            "--listening-ip",
            "127.0.0.2",
            "--listening-port",
            str(port),
            "--alt-listening-port",
            str(port + 1),
            "--pidfile",
            str(Path(tmp) / "turnserver.pid"),
            "--log-file",
            "stdout",
            "--simple-log",
        ]
        proc = _start(cmd, log)
        try:
            await _wait_until_answers(port, proc, log)
            yield port, port + 1
        finally:
            proc.kill()
            proc.wait(timeout=10)


async def test_our_probe_gets_its_mapping_from_coturn(coturn: tuple[int, int]) -> None:
    port, alt_port = coturn
    endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
    try:
        probe = StunProbe(endpoint, [f"127.0.0.1:{port}"])
        result = await asyncio.wait_for(probe.mapped_address(), LIMIT)
        assert result.mapped == endpoint.local_address
        assert result.server == ("127.0.0.1", port)
        assert result.other_address == ("127.0.0.2", alt_port)
    finally:
        endpoint.close()


async def test_our_nat_report_against_coturn(coturn: tuple[int, int]) -> None:
    port, alt_port = coturn
    endpoint = await UdpEndpoint.bind("0.0.0.0", 0)
    try:
        probe = StunProbe(endpoint, [f"127.0.0.1:{port}"])
        report = await asyncio.wait_for(probe.nat_report(classic=True), LIMIT)
        local_port = endpoint.local_address[1]
        assert report.mapped == ("127.0.0.1", local_port)
        assert report.local == ("127.0.0.1", local_port)
        assert report.behind_nat is False
        assert report.other_address == ("127.0.0.2", alt_port)
        assert report.mapping is MappingBehavior.ENDPOINT_INDEPENDENT
        assert report.filtering is FilteringBehavior.ENDPOINT_INDEPENDENT
        assert report.classic == "Open Internet"
        assert not any("refused" in n or "ignored" in n for n in report.notes)
    finally:
        endpoint.close()
