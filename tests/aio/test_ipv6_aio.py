"""Dual-stack workers on loopback (issue 19): one UDP socket per family, IPv6 candidates, STUN
over IPv6, a link and a benchmark over IPv6, ``--ipv6 off``, and ``p2plab probe`` over IPv6.

Only loopback: the rendezvous, our STUN server and coturn on ``::1`` (and 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from p2plab import cli
from p2plab.aio import dualstack
from p2plab.aio.bench import Benchmark
from p2plab.aio.endpoint import UdpEndpoint, local_endpoint_for
from p2plab.aio.rendezvous import Backoff
from p2plab.aio.status import format_address
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.config import SessionConfig
from p2plab.errors import ConfigError
from p2plab.probe_text import describe_ipv6
from p2plab.server.stun_server import StunServer
from rendezvous_service_code.server import RendezvousServer
from tests.aio.fake_rendezvous import fake_rendezvous
from tests.conftest import TIMEOUT_UNIT, require, until
from tests.stun_fixtures import udp_tcp_port

T = 20 * TIMEOUT_UNIT


def _has_loopback6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def v6_pair(
    spy: _UdpSockets | None = None, extra_stun: StunServer | None = None, **kw: Any
) -> AsyncIterator[tuple[Worker, Worker, RendezvousServer]]:
    """A rendezvous (with its STUN server) on ::1 and two workers that know it (and
    ``extra_stun`` too); ``spy`` starts recording UDP sockets once the rendezvous is up (the
    workers' only)."""
    require(_has_loopback6(), "IPv6 on loopback (::1)")
    rv = await RendezvousServer.start("::1", 0, stun_port=0)
    if spy is not None:
        spy.install()
    cfg: dict[str, Any] = dict(
        rendezvous_url=rv.ws_url,
        udp_host="127.0.0.1",
        stun_servers=(
            f"[::1]:{rv.stun_port}",
            *([format_address(extra_stun.primary_address)] if extra_stun is not None else []),
        ),
        nat_report=False,
        backoff=Backoff(initial_s=0.05, maximum_s=0.2),
    )
    cfg.update(kw)
    a, b = Worker(WorkerConfig(**cfg)), Worker(WorkerConfig(**cfg))
    try:
        await a.start()
        await b.start()
        yield a, b, rv
    finally:
        await a.stop()
        await b.stop()
        await rv.close()


async def test_two_workers_on_ipv6_loopback_connect_chat_and_benchmark() -> None:
    async with v6_pair() as (a, b, rv):
        assert rv.ws_url.startswith("ws://[::1]:")
        await a.wait_connected(T)
        await b.wait_connected(T)
        assert a.endpoint6 is not None and b.endpoint6 is not None
        # the IPv6 socket takes the IPv4 socket's port number when it is free
        assert a.endpoint6.local_address == ("::1", a.endpoint4.local_address[1])  # type: ignore[union-attr]
        await until(lambda: a.link.endpoint6 is not None, "STUN over IPv6 answered", T)
        st = a.status()
        assert st["family"] == "ipv6" and a.family == "ipv6"
        assert st["peer"]["endpoint"] == f"[::1]:{b.endpoint6.local_address[1]}"
        six = st["ipv6"]
        assert six["enabled"] and six["reachable"] is True and six["nat66"] is False
        assert six["endpoint"] == six["socket"] == f"[::1]:{a.endpoint6.local_address[1]}"
        assert six["candidates"] == [six["socket"]]
        assert six["stun"]["server"] == f"[::1]:{rv.stun_port}"
        # the benchmark's fast paths run on the socket of the link's family
        assert a.endpoint is a.endpoint6 and b.endpoint is b.endpoint6

        got = await a.chat("hello over IPv6", timeout=T)
        assert got.msg_id
        v6_in = b.endpoint6.stats["datagrams_in"]
        r = await asyncio.wait_for(
            Benchmark(a).run(duration_s=0.5, payload_size=1200, rate_mbps=20), T
        )
        assert r.packets_sent > 0 and r.peer_view is not None
        assert r.peer_view.packets_received == r.packets_sent - r.lost
        assert r.peer_view.packets_received > 0
        assert b.endpoint6.stats["datagrams_in"] - v6_in >= r.peer_view.packets_received
        rtt = await asyncio.wait_for(Benchmark(a).rtt(count=20), T)
        assert rtt.received == 20


class _UdpSockets:
    """Records the family of every UDP socket the process creates once installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.families: list[int] = []
        self._monkeypatch = monkeypatch

    def install(self) -> None:
        seen = self.families

        class Spy(socket.socket):
            def __init__(self, family: int = -1, type: int = -1, *a: Any, **kw: Any) -> None:
                super().__init__(family, type, *a, **kw)
                if self.type == socket.SOCK_DGRAM:
                    seen.append(self.family)

        self._monkeypatch.setattr(socket, "socket", Spy)


@pytest.fixture
def udp_sockets(monkeypatch: pytest.MonkeyPatch) -> _UdpSockets:
    return _UdpSockets(monkeypatch)


async def test_ipv6_off_never_opens_an_ipv6_socket(udp_sockets: _UdpSockets) -> None:
    require(_has_loopback6(), "IPv6 on loopback (::1)")
    stun4 = await StunServer.start("127.0.0.1", 0)
    try:
        # a rendezvous on ::1 would make "auto" open one; with IPv4 STUN the link runs on IPv4
        stun = (f"127.0.0.1:{stun4.primary_address[1]}",)
        async with v6_pair(udp_sockets, ipv6="off", stun_servers=stun) as (a, b, _):
            await a.wait_connected(T)
            await b.wait_connected(T)
            assert a.endpoint6 is None and b.endpoint6 is None
            st = a.status()
            assert st["family"] == "ipv4" and st["ipv6"]["enabled"] is False
            assert all(":" not in c[0] for c in a.link.local_candidates)
            assert a.link.endpoint6 is None
            await a.chat("IPv4 only", timeout=T)
    finally:
        stun4.close()
    assert socket.AF_INET6 not in udp_sockets.families
    assert udp_sockets.families.count(socket.AF_INET) >= 2  # the spy saw the IPv4 sockets


async def test_register_carries_candidates_of_both_families() -> None:
    """The update the rendezvous gets: the IPv4 endpoint, ``udp6`` from STUN over IPv6, and
    host candidates of both families."""
    require(_has_loopback6(), "IPv6 on loopback (::1)")
    stun4 = await StunServer.start("127.0.0.1", 0)
    stun6 = await StunServer.start("::1", 0)
    servers = (
        f"127.0.0.1:{stun4.primary_address[1]}",
        f"[::1]:{stun6.primary_address[1]}",
    )
    try:
        async with fake_rendezvous() as rv:
            w = Worker(rv.config(stun_servers=servers))
            await w.start()
            try:
                await until(lambda: w.link.endpoint6 is not None, "udp6 learnt", T)
                assert w.endpoint6 is not None and w.endpoint4 is not None
                port4, port6 = w.endpoint4.local_address[1], w.endpoint6.local_address[1]

                def updates() -> list[dict[str, Any]]:
                    conn = next(iter(rv.conns.values()), None)
                    got = conn.received if conn else []
                    return [m for m in got if m.get("type") == "update_udp_endpoint"]

                await until(lambda: any(u.get("udp6") for u in updates()), "udp6 sent", T)
                first, last = updates()[0], updates()[-1]
                # discovery reports at once with the IPv6 host candidate (IPv6 never delays
                # IPv4); STUN over IPv6 follows, and the same address then rides as udp6
                for up in (first, last):
                    assert (up["udp_ip"], up["udp_port"]) == ("127.0.0.1", port4)
                assert {(c["ip"], c["port"]) for c in first["local_candidates"]} == {("::1", port6)}
                assert first["udp6"] is None
                assert (last["udp6"]["ip"], last["udp6"]["port"]) == ("::1", port6)
                # the IPv4 STUN server saw the IPv4 socket only, the IPv6 one the IPv6 socket
                assert stun4.stats["datagrams_in"] >= 1 and stun6.stats["datagrams_in"] >= 1
            finally:
                await w.stop()
    finally:
        stun4.close()
        stun6.close()


async def test_ipv4_loopback_setup_opens_no_ipv6_socket() -> None:
    """Tests on 127.0.0.1 stay as they were: no IPv6 socket, no host IPv6 address leaks."""
    async with fake_rendezvous() as rv:
        w = Worker(rv.config())
        await w.start()
        try:
            await until(lambda: w.state == "waiting_for_peer", "discovered", T)
            assert w.endpoint6 is None
            assert all(":" not in c[0] for c in w.link.local_candidates)
        finally:
            await w.stop()


async def test_probe_ipv6_against_our_stun_server() -> None:
    require(_has_loopback6(), "IPv6 on loopback (::1)")
    srv = await StunServer.start("::1", 0)
    try:
        port = srv.primary_address[1]
        block = await dualstack.probe_ipv6([f"[::1]:{port}", "127.0.0.1:9"])
        assert block["tested"] and block["reachable"] is True
        assert block["mapped"] == block["local"] and block["mapped"].startswith("[::1]:")
        assert block["nat66"] is False
        assert block["filtering"] == "unknown" and block["notes"]  # no alternate address
        assert [s["ok"] for s in block["servers"]] == [True]  # the IPv4 server was not asked
    finally:
        srv.close()
    # a server that answers nothing: unreachable, said so
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as silent:
        silent.bind(("::1", 0))
        port = silent.getsockname()[1]
        block = await dualstack.probe_ipv6([f"[::1]:{port}"], request_timeout=0.3, rto=0.05)
    assert block["tested"] and block["reachable"] is False and block["error"]
    block = await dualstack.probe_ipv6(["127.0.0.1:3478"])
    assert block["tested"] is False and block["reachable"] is None


async def test_stun_over_ipv6_against_coturn() -> None:
    turnserver = shutil.which("turnserver")
    require(turnserver is not None, "coturn (turnserver)")
    require(_has_loopback6(), "IPv6 on loopback (::1)")
    assert turnserver is not None
    port = udp_tcp_port("::1")
    with tempfile.TemporaryDirectory(prefix="p2plab-turn6-") as tmp:
        cmd = [
            turnserver, "-n", "--listening-ip", "::1", "--listening-port", str(port),
            "--no-tls", "--no-dtls", "--no-cli", "--stun-only",
            "--pidfile", str(Path(tmp) / "turnserver.pid"), "--log-file", "stdout",
            "--simple-log",
        ]  # fmt: skip
        with (Path(tmp) / "log").open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        try:
            block: dict[str, Any] = {}
            for _ in range(int(40 * TIMEOUT_UNIT)):  # until coturn listens
                assert proc.poll() is None, (Path(tmp) / "log").read_text(errors="replace")
                block = await dualstack.probe_ipv6([f"[::1]:{port}"], request_timeout=0.5, rto=0.1)
                if block["reachable"]:
                    break
            assert block["reachable"] is True, block
            assert block["mapped"] == block["local"] and block["nat66"] is False
            assert block["servers"][0]["ok"]
        finally:
            proc.kill()
            proc.wait(timeout=10)


# -- the pieces, without sockets ---------------------------------------------------------------


def test_split_stun_servers_by_family() -> None:
    v4, v6 = dualstack.split_stun_servers(
        ["127.0.0.1:3478", "[2001:db8::1]:3478", "stun.example.org:19302", "[::1]:5000"]
    )
    assert v4 == ("127.0.0.1:3478", "stun.example.org:19302")
    assert v6 == ("[2001:db8::1]:3478", "stun.example.org:19302", "[::1]:5000")


def test_ipv6_bind_host_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    bind = dualstack.ipv6_bind_host
    # beyond loopback: the wildcard when the kernel routes IPv6, no socket (no error) else
    routes: set[str] = set()
    monkeypatch.setattr(dualstack, "_routes_to", lambda host: host in routes)
    assert bind("auto", "ws://192.0.2.1:8000", ["192.0.2.1:3478"], None) is None
    routes.add("2001:db8::1")  # a default route covers any global address
    assert bind("auto", "ws://192.0.2.1:8000", ["192.0.2.1:3478"], None) == "::"
    routes.clear()
    routes.add("2001:db8:5::7")  # only a route to the rendezvous's network
    assert bind("auto", "ws://[2001:db8:5::7]:8000", [], None) == "::"
    assert bind("auto", "ws://[2001:db8:5::7]:8000", [], "2001:db8:5::2") == "2001:db8:5::2"
    assert bind("off", "ws://[::1]:8000", ["[::1]:3478"], None) is None
    # loopback-only: only with ::1 among the hosts, and then on ::1
    assert bind("auto", "ws://127.0.0.1:8000", ["127.0.0.1:3478"], None) is None
    assert bind("auto", "ws://localhost:8000", [], None) is None
    assert bind("auto", "ws://[::1]:8000", [], None) == "::1"
    assert bind("auto", "ws://127.0.0.1:8000", ["[::1]:3478"], None) == "::1"
    assert bind("auto", "ws://[::1]:8000", [], "::") == "::"
    with pytest.raises(ConfigError):
        bind("on", "ws://[::1]:8000", [], None)
    with pytest.raises(ConfigError):
        WorkerConfig(rendezvous_url="ws://[::1]:1", ipv6="yes")
    with pytest.raises(ConfigError):  # never one dual-stack socket
        WorkerConfig(rendezvous_url="ws://[::1]:1", udp_host="::")
    with pytest.raises(ConfigError):
        WorkerConfig(rendezvous_url="ws://[::1]:1", udp6_host="127.0.0.1")


def test_host_candidates_are_global_usable_addresses(tmp_path: Path) -> None:
    table = tmp_path / "if_inet6"
    table.write_text(
        "20010db8000000000000000000000001 02 40 00 80 eth0\n"  # global, permanent
        "fd000000000000000000000000000002 02 40 00 02 eth0\n"  # ULA (global scope), nodad
        "fe800000000000000000000000000001 02 40 20 80 eth0\n"  # link-local
        "00000000000000000000000000000001 01 80 10 80 lo\n"  # loopback
        "20010db8000000000000000000000002 02 40 00 c0 eth0\n"  # tentative
        "20010db8000000000000000000000003 02 40 00 20 eth0\n"  # deprecated
        "20010db8000000000000000000000004 02 40 00 08 eth0\n"  # DAD failed
        "garbage line\n"
        "zz010db8000000000000000000000005 02 40 00 80 eth0\n"
    )
    assert dualstack.host_addresses6(str(table)) == ["2001:db8::1", "fd00::2"]
    assert dualstack.host_addresses6(str(tmp_path / "missing")) == []
    # a loopback setup announces ::1 only; a socket bound to one address announces it
    assert dualstack.local_candidates6(("::", 5000), "ws://[::1]:1", []) == [("::1", 5000)]
    assert dualstack.local_candidates6(("2001:db8::9", 5000), "ws://[::1]:1", []) == [
        ("2001:db8::9", 5000)
    ]


def test_family_of() -> None:
    assert dualstack.family_of(("2001:db8::1", 1)) == "ipv6"
    assert dualstack.family_of(("192.0.2.1", 1)) == "ipv4"
    assert dualstack.family_of(("turn-udp|2001:db8::1", 1)) is None
    assert dualstack.family_of(("relay", 1)) is None
    assert dualstack.family_of(None) is None


def test_cli_ipv6_flag_env_and_bracketed_stun(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = cli.build_parser()
    base = ["worker", "--rendezvous", "ws://[::1]:8000", "--http-port", "0"]
    args = parser.parse_args([*base, "--ipv6", "off", "--stun", "[2001:db8::1]:3478"])
    assert cli._worker_config(args).ipv6 == "off"
    assert cli._worker_config(args).stun_servers == ("[2001:db8::1]:3478",)
    monkeypatch.setenv("P2P_IPV6", "off")
    assert cli._worker_config(parser.parse_args(base)).ipv6 == "off"
    monkeypatch.setenv("P2P_IPV6", "auto")
    assert cli._worker_config(parser.parse_args(base)).ipv6 == "auto"
    monkeypatch.delenv("P2P_IPV6")
    assert cli._worker_config(parser.parse_args(base)).ipv6 == "auto"
    for bad in (["--ipv6", "on"], ["--stun", "2001:db8::1:3478"], ["--stun", "[2001:db8::x]:1"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, *bad])


def test_rendezvous_url_with_an_ipv6_literal() -> None:
    parser = cli.build_parser()
    for url in ("ws://[::1]:8000", "ws://[::1]", "wss://[2001:db8::1]:443/prefix"):
        args = parser.parse_args(["worker", "--rendezvous", url])
        assert args.rendezvous == url
    for bad in ("ws://[::1", "ws://[::1]x", "ws://[zz]:1", "ws://[::1]:", "ws://[::1]:99999"):
        with pytest.raises(SystemExit):
            parser.parse_args(["worker", "--rendezvous", bad])


async def test_local_endpoint_for_tells_the_families_apart() -> None:
    require(_has_loopback6(), "IPv6 on loopback (::1)")
    v4 = await UdpEndpoint.bind("0.0.0.0", 0)
    port = v4.local_address[1]
    try:
        assert local_endpoint_for(("127.0.0.1", port)) is v4
        assert local_endpoint_for(("::1", port)) is None  # not the IPv4 wildcard's
        v6 = dualstack.bind6(asyncio.get_running_loop(), "::", port)
        assert v6 is not None and v6.local_address == ("::", port)  # V6ONLY: same number
        try:
            assert local_endpoint_for(("::1", port)) is v6
            assert local_endpoint_for(("127.0.0.1", port)) is v4
        finally:
            v6.close()
    finally:
        v4.close()


async def test_probe_cli_reports_ipv6_in_sentences_and_json() -> None:
    """``p2plab probe --json`` with an IPv6 STUN server only: IPv6 tested, IPv4 said not to be
    (one process: a Python start is most of the cost)."""
    require(_has_loopback6(), "IPv6 on loopback (::1)")
    srv = await StunServer.start("::1", 0)
    server = f"[::1]:{srv.primary_address[1]}"

    async def probe(*extra: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "p2plab", "probe", "--stun", server, "--no-classic", *extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60 * TIMEOUT_UNIT)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    try:
        raw = await probe("--json")
    finally:
        srv.close()
    report = json.loads(raw)
    assert report["ipv6"]["reachable"] is True and report["ipv6"]["nat66"] is False
    assert report["ipv6"]["mapped"] == report["ipv6"]["local"]
    text = describe_ipv6(report["ipv6"])  # what probe prints without --json
    assert f"IPv6: reachable, address {report['ipv6']['mapped']}" in text
    assert "IPv6 NAT: none" in text and "IPv6 filtering (RFC 5780): unknown" in text
    assert report["mapped"] is None and "no IPv4 STUN server given" in report["notes"][0]


async def test_ipv6_preferred_and_a_link_whose_ipv6_dies_comes_back_over_ipv4() -> None:
    """Both families punch; the link runs on IPv6 (ranked first); when IPv6 stops carrying
    anything the link comes back over IPv4, through the IPv4 socket."""
    require(_has_loopback6(), "IPv6 on loopback (::1)")
    stun4 = await StunServer.start("127.0.0.1", 0)
    timers = SessionConfig(keepalive_interval=0.3, peer_timeout=1.5)
    try:
        async with v6_pair(session=timers, extra_stun=stun4) as (a, b, _):
            await a.wait_connected(T)
            await b.wait_connected(T)
            await until(lambda: a.family == b.family == "ipv6", "the link on IPv6", T)
            assert a.endpoint4 is not None and b.endpoint4 is not None
            assert a.link.public_endpoint == a.endpoint4.local_address  # IPv4 STUN answered
            v4_out = a.endpoint4.stats["datagrams_out"]

            def drop_v6(data: bytes, addr: tuple[str, int]) -> bool:
                return ":" in addr[0]

            a.datagram_hooks.append(drop_v6)
            b.datagram_hooks.append(drop_v6)
            await until(lambda: a.family == b.family == "ipv4", "the link back on IPv4", T)
            await a.wait_connected(T)
            assert a.status()["peer"]["endpoint"] == f"127.0.0.1:{b.endpoint4.local_address[1]}"
            assert a.endpoint is a.endpoint4
            assert a.endpoint4.stats["datagrams_out"] > v4_out
            await a.chat("over IPv4 again", timeout=T)
    finally:
        stun4.close()


def test_the_rendezvous_is_reached_on_uvloop_too() -> None:
    """The CLI runs on uvloop, whose create_connection takes no happy-eyeballs argument."""

    async def main() -> str:
        rv = await RendezvousServer.start("127.0.0.1", 0)
        w = Worker(WorkerConfig(rendezvous_url=rv.ws_url, udp_host="127.0.0.1", nat_report=False))
        try:
            await w.start()
            return await w.wait_for_state("waiting_for_peer", timeout=T)
        finally:
            await w.stop()
            await rv.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == "waiting_for_peer"
