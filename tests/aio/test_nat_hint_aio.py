"""The NAT hint a worker learns at discovery (issue 16), against a scripted STUN server on
loopback that plays the NAT: it answers each Binding with the public port a NAT of the chosen
kind would have given that (socket, destination) pair, and sends the CHANGE-REQUEST answers from
its alternate address as a real RFC 5780 server does."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from p2plab.aio import discovery
from p2plab.aio.endpoint import UdpEndpoint
from p2plab.aio.status import hint_block
from p2plab.aio.worker import Worker
from p2plab.core.stun import Class, Message, Method, parse_message
from p2plab.server.stun_server import StunServer
from tests.aio.fake_rendezvous import fake_rendezvous
from tests.conftest import until

Address = tuple[str, int]
PUBLIC_IP = "203.0.113.5"
PRIMARY_IP, ALT_IP = "127.0.0.1", "127.0.0.3"


class ScriptedNatStun:
    """Four STUN addresses (primary/alternate IP x port) that answer as if behind ``kind`` of NAT:
    ``easy`` (one port for all), ``leaky`` (a new port towards a sender that reached the socket
    first), ``sequential`` (a new port per destination, in order), ``plain`` (no alternate
    address at all), ``mute-alt`` (one is advertised but never answers)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.socks: dict[tuple[int, int], socket.socket] = {}
        self.ports: dict[tuple[Address, Address], int] = {}  # (source, destination) -> public
        self.unsolicited: set[tuple[Address, Address]] = set()  # (to, from) sent before asked
        self.requests = 0

    def bind(self) -> None:
        for _ in range(50):
            socks: dict[tuple[int, int], socket.socket] = {}
            try:
                a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks[(0, 0)] = a
                a.bind((PRIMARY_IP, 0))
                b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks[(0, 1)] = b
                b.bind((PRIMARY_IP, 0))
                ports = (a.getsockname()[1], b.getsockname()[1])
                for ip_i, port_i in ((1, 0), (1, 1)):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks[(ip_i, port_i)] = s
                    s.bind((ALT_IP, ports[port_i]))
            except OSError:
                for s in socks.values():
                    s.close()
                continue
            self.socks = socks
            return
        pytest.fail("no four free STUN addresses on loopback")

    def address(self, slot: tuple[int, int]) -> Address:
        host, port = self.socks[slot].getsockname()[:2]
        return (host, port)

    def public_port(self, source: Address, dest: Address) -> int:
        if self.kind == "sequential":
            return self.ports.setdefault((source, dest), 40000 + len(self.ports))
        if self.kind == "leaky" and (source, dest) in self.unsolicited:
            return source[1] + 1  # conntrack clash: the NAT picks another port
        return source[1]

    def on_datagram(self, slot: tuple[int, int], data: bytes, source: Address) -> None:
        request = parse_message(data)
        self.requests += 1
        dest = self.address(slot)
        change = int(request.attributes.get("CHANGE-REQUEST", 0))
        answer_slot = (slot[0] ^ (1 if change & 4 else 0), slot[1] ^ (1 if change & 2 else 0))
        if self.kind == "plain" and answer_slot != slot:
            return
        if self.kind == "mute-alt" and answer_slot != (0, 0):
            return  # an alternate address that a firewall drops
        origin = self.address(answer_slot)
        if origin != dest:
            self.unsolicited.add((source, origin))
        attrs: dict[str, Any] = {"XOR-MAPPED-ADDRESS": (PUBLIC_IP, self.public_port(source, dest))}
        if self.kind != "plain":
            attrs["OTHER-ADDRESS"] = self.address((slot[0] ^ 1, slot[1] ^ 1))
        response = Message(
            Method.BINDING,
            Class.RESPONSE,
            request.transaction_id,
            attrs,
            magic_cookie=request.magic_cookie,
        )
        self.socks[answer_slot].sendto(bytes(response), source)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[ScriptedNatStun]:
        self.bind()
        loop = asyncio.get_running_loop()

        def reader(slot: tuple[int, int]) -> None:
            with contextlib.suppress(BlockingIOError):
                data, addr = self.socks[slot].recvfrom(2048)
                self.on_datagram(slot, data, (addr[0], addr[1]))

        for slot, s in self.socks.items():
            s.setblocking(False)
            loop.add_reader(s.fileno(), reader, slot)
        try:
            yield self
        finally:
            for s in self.socks.values():
                loop.remove_reader(s.fileno())
                s.close()


async def hint_of(kind: str) -> tuple[Any, ScriptedNatStun]:
    server = ScriptedNatStun(kind)
    async with server.serving():
        primary = server.address((0, 0))
        async with await UdpEndpoint.bind(PRIMARY_IP, 0) as ep:
            found = await discovery.discover_endpoint(
                ep, [f"{primary[0]}:{primary[1]}"], None, 5.0, hint=True
            )
    assert found.error is None and found.public[0] == PUBLIC_IP
    return found.nat, server


async def test_an_easy_nat_is_endpoint_independent_and_does_not_remap() -> None:
    hint, server = await hint_of("easy")
    assert hint.mapping == "endpoint-independent" and not hint.remaps_on_clash
    # the first Binding, (alt IP, alt port) and (alt IP, primary port), and the clash test's
    # three (reference, CHANGE-REQUEST, towards the alternate)
    assert server.requests == 6


async def test_a_leaky_nat_is_caught_by_the_clash_test_on_its_own_socket() -> None:
    hint, server = await hint_of("leaky")
    assert hint.mapping == "endpoint-independent" and hint.remaps_on_clash
    # the punching socket itself never got an unsolicited packet: only the clash test's did
    assert len({src for src, _ in server.unsolicited}) == 1


async def test_a_sequential_nat_is_hard_with_predicted_ports() -> None:
    hint, _ = await hint_of("sequential")
    assert hint.mapping == "endpoint-dependent" and hint.sequential
    # the punching socket's three mappings were 40000, 40001, 40002: the next ones follow
    assert hint.predicted_ports and min(hint.predicted_ports) > 40002


async def test_one_server_without_an_alternate_address_is_unknown_at_once() -> None:
    hint, server = await hint_of("plain")
    assert hint.mapping == "unknown"
    assert server.requests == 1  # nothing more was asked: no delay for nothing


async def test_no_hint_is_asked_for_without_birthday_punching() -> None:
    server = ScriptedNatStun("easy")
    async with server.serving():
        primary = server.address((0, 0))
        async with await UdpEndpoint.bind(PRIMARY_IP, 0) as ep:
            found = await discovery.discover_endpoint(ep, [f"{primary[0]}:{primary[1]}"], None, 5.0)
    assert found.nat is None and server.requests == 1


async def test_an_alternate_address_that_never_answers_leaves_the_hint_unknown() -> None:
    hint, server = await hint_of("mute-alt")  # each Binding given up after 0.5 s
    assert hint.mapping == "unknown" and not hint.remaps_on_clash
    assert server.requests > 4  # they were retransmitted, then given up


async def test_probe_hint_against_our_rfc5780_server_says_easy_without_a_nat() -> None:
    """``p2plab probe``'s hint with the real STUN server (loopback maps nothing: easy)."""
    server = await StunServer.start("127.0.0.1", 0, alt_host="127.0.0.2", alt_port=0)
    try:
        primary = server.primary_address
        hint = await discovery.probe_hint([f"{primary[0]}:{primary[1]}"])
        assert hint_block(hint) == {
            "difficulty": "easy",
            "mapping": "endpoint-independent",
            "remaps_on_clash": False,
            "sequential": False,
            "predicted_ports": [],
        }
        # the clash test's CHANGE-REQUEST was answered from the alternate address
        assert server.stats["change_requests"] == 1
    finally:
        server.close()


async def test_a_worker_announces_its_hint_and_shows_it_in_status() -> None:
    server = await StunServer.start("127.0.0.1", 0, alt_host="127.0.0.2", alt_port=0)
    primary = server.primary_address
    try:
        async with fake_rendezvous() as rv:
            w = Worker(rv.config(stun_servers=(f"{primary[0]}:{primary[1]}",), nat_report=True))
            await w.start()
            try:
                await rv.ready(w)
                update = rv.conns[w.worker_id].received[-1]
                assert update["type"] == "update_udp_endpoint"
                assert update["nat"]["mapping"] == "endpoint-independent"
                await until(lambda: w.status()["nat"] is not None, "the classification")
                nat = w.status()["nat"]
                assert nat["mapping"] == "endpoint-independent"  # the classification's keys stay
                assert nat["hint"]["difficulty"] == "easy"
                assert w.status()["method"] is None  # no link yet
            finally:
                await w.stop()
    finally:
        server.close()
