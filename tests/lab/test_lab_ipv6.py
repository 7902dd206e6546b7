"""IPv6 in the kernel lab (issue 19) with plain sockets: the firewall profiles filter as their
names say, two ``v6-apdf`` sites punch, a dual-stack site speaks both families (coturn answers
over IPv6 with the host's own address: no NAT66), and nothing of it leaks into the host."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from p2plab.core.stun import Class, make_binding_request, parse_message
from p2plab.lab.ipv6 import BLOCK_TABLE, block_ruleset, bracket
from p2plab.lab.matrix import PairRun
from p2plab.lab.netns import Lab
from p2plab.lab.profiles import expected_outcome

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.lab_fixtures import TIMEOUT_UNIT, lab_python, require_lab
except ImportError:  # pragma: no cover
    from lab_fixtures import TIMEOUT_UNIT, lab_python, require_lab  # type: ignore[no-redef]

pytestmark = [pytest.mark.lab, pytest.mark.root]

# A UDP agent driven over stdin: one JSON command a line, one JSON answer a line.  The test
# orders every step itself (no sleeps deciding what happens first).
_AGENT = """
import json, select, socket, sys, time
socks = {}
for line in sys.stdin:
    cmd = json.loads(line)
    op, name = cmd["op"], cmd.get("name", "s")
    out = {}
    if op == "bind":
        fam = socket.AF_INET6 if ":" in cmd["ip"] else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((cmd["ip"], cmd.get("port", 0)))
        socks[name] = s
        out = {"port": s.getsockname()[1]}
    elif op == "send":
        socks[name].sendto(bytes.fromhex(cmd["hex"]), (cmd["ip"], cmd["port"]))
    elif op == "recv":
        got, deadline = [], time.monotonic() + cmd["timeout"]
        while len(got) < cmd.get("count", 1):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([socks[name]], [], [], left)[0]:
                break
            data, addr = socks[name].recvfrom(4096)
            got.append([data.hex(), addr[0], addr[1]])
        out = {"got": got}
    print(json.dumps(out), flush=True)
"""


class Agent:
    """One agent process in a lab host."""

    def __init__(self, lab: Lab, host: str) -> None:
        self.proc = lab.python(
            host,
            ["-c", textwrap.dedent(_AGENT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the agent died"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def bind(self, ip: str, name: str = "s") -> int:
        return int(self._ask(op="bind", ip=ip, name=name)["port"])

    def send(self, ip: str, port: int, data: bytes, name: str = "s") -> None:
        self._ask(op="send", ip=ip, port=port, hex=data.hex(), name=name)

    def recv(self, timeout: float, name: str = "s", count: int = 1) -> list[tuple[bytes, str, int]]:
        got = self._ask(op="recv", timeout=timeout * TIMEOUT_UNIT, name=name, count=count)["got"]
        return [(bytes.fromhex(h), ip, port) for h, ip, port in got]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10 * TIMEOUT_UNIT)


AgentFactory = Callable[[Lab, str], Agent]

# How long a datagram that should NOT arrive is waited for (a namespace hop takes microseconds;
# every "blocked" check below also has a check that the same path carries what it should).
QUIET_S = 0.4


@pytest.fixture(scope="module")
def lab_fw() -> Iterator[Lab]:
    """Site a behind ``v6-apdf``, site b behind ``v6-eif`` (IPv6 only), coturn on IPv6."""
    require_lab()
    with Lab.create("v6-apdf", "v6-eif") as lab:
        yield lab


@pytest.fixture(scope="module")
def lab_dual() -> Iterator[Lab]:
    """Two dual-stack sites ``symmetric/v6-apdf`` (IPv4 would need a relay) with coturn."""
    require_lab()
    with Lab.create("symmetric/v6-apdf", "symmetric/v6-apdf") as lab:
        yield lab


@pytest.fixture
def agents() -> Iterator[Callable[[Lab, str], Agent]]:
    """``agent(lab, host)`` starts an agent there; all are stopped after the test."""
    made: list[Agent] = []

    def agent(lab: Lab, host: str) -> Agent:
        made.append(Agent(lab, host))
        return made[-1]

    yield agent
    for one in made:
        one.close()


def _v6(lab: Lab, host: str) -> str:
    address = lab.address6(host)
    assert address is not None and ipaddress.IPv6Address(address) in lab.v6.network  # type: ignore[union-attr]
    return address


def test_v6_apdf_blocks_unsolicited_and_passes_replies(lab_fw: Lab, agents: AgentFactory) -> None:
    a, b = agents(lab_fw, "a"), agents(lab_fw, "b")
    a_ip, b_ip = _v6(lab_fw, "a"), _v6(lab_fw, "b")
    pa = a.bind("::")
    pb = b.bind("::")
    pb2 = b.bind("::", name="other")
    b.send(a_ip, pa, b"unsolicited")
    assert a.recv(QUIET_S) == []
    a.send(b_ip, pb, b"hello")
    # b's v6-eif lets a's first datagram in (b has sent from pb before); it comes from a's own
    # address and port: a firewall, no NAT66.
    assert b.recv(5.0) == [(b"hello", a_ip, pa)]
    b.send(a_ip, pa, b"reply")
    assert a.recv(5.0) == [(b"reply", b_ip, pb)]
    # Address-and-port-dependent: the same host from another port is still a stranger.
    b.send(a_ip, pa, b"other port", name="other")
    assert a.recv(QUIET_S) == []
    a.send(b_ip, pb2, b"now you", name="s")
    assert b.recv(5.0, name="other") == [(b"now you", a_ip, pa)]
    b.send(a_ip, pa, b"other port again", name="other")
    assert a.recv(5.0) == [(b"other port again", b_ip, pb2)]


def test_v6_eif_lets_any_sender_reach_a_port_that_sent_out(
    lab_fw: Lab, agents: AgentFactory
) -> None:
    b, rv = agents(lab_fw, "b"), agents(lab_fw, "rendezvous")
    b_ip = _v6(lab_fw, "b")
    rv_ip = lab_fw.v6.public("rendezvous")  # type: ignore[union-attr]
    pb = b.bind("::")
    pb_quiet = b.bind("::", name="quiet")
    pr = rv.bind("::")
    rv.send(b_ip, pb, b"before")
    assert b.recv(QUIET_S) == []  # nothing went out from pb yet: filtered
    # b talks to the STUN host's address (nobody listens there): that opens pb to everyone.
    b.send(lab_fw.v6.public("stun"), 3478, b"out")  # type: ignore[union-attr]
    rv.send(b_ip, pb, b"stranger")
    assert b.recv(5.0) == [(b"stranger", rv_ip, pr)]
    # The router remembers b's address . port for 300 s (RFC 6092 REC-12 asks >= 120 s).
    listed = lab_fw.run("nat_b", ["nft", "-j", "list", "set", "ip6", "p2plab6", "eif_out"])
    (entry,) = [e for e in json.loads(listed.stdout)["nftables"] if "set" in e]
    assert entry["set"]["timeout"] == 300
    members = [el["elem"]["val"]["concat"] for el in entry["set"]["elem"]]
    assert [b_ip, pb] in members, members
    # ... and only pb: a port that never sent out stays closed to the same sender.
    rv.send(b_ip, pb_quiet, b"closed")
    assert b.recv(QUIET_S, name="quiet") == []


def test_two_v6_apdf_sites_punch_over_ipv6(lab_dual: Lab, agents: AgentFactory) -> None:
    a, b = agents(lab_dual, "a"), agents(lab_dual, "b")
    a_ip, b_ip = _v6(lab_dual, "a"), _v6(lab_dual, "b")
    pa, pb = a.bind("::"), b.bind("::")
    a.send(b_ip, pb, b"punch a")  # opens a's firewall to b:pb; b's drops it
    assert b.recv(QUIET_S) == []
    b.send(a_ip, pa, b"punch b")  # a reply for a's firewall; opens b's firewall to a:pa
    assert a.recv(5.0) == [(b"punch b", b_ip, pb)]
    a.send(b_ip, pb, b"through")
    assert b.recv(5.0) == [(b"through", a_ip, pa)]


def test_hosts_of_one_v6_apdf_lan_reach_each_other_unsolicited(agents: AgentFactory) -> None:
    """The LAN is a switch: the firewall is between the LAN and the WAN only (br_netfilter, if
    loaded, would otherwise run bridged IPv6 through the forward chain's drop policy)."""
    require_lab(coturn=False)
    with Lab.create("v6-apdf", same_lan=True, stun=False) as lab:
        a, b = agents(lab, "a"), agents(lab, "b")
        pa, pb = a.bind("::"), b.bind("::")
        a.send(_v6(lab, "b"), pb, b"lan hello")
        assert b.recv(5.0) == [(b"lan hello", _v6(lab, "a"), pa)]


def test_blocking_udp_between_sites_blocks_both_families(
    lab_dual: Lab, agents: AgentFactory
) -> None:
    """``block_udp_between_sites`` (the lab where only relays work) drops IPv6 between IPv6
    sites too, else a dual-stack pair would go direct over IPv6; unblocking lifts both."""
    a, b = agents(lab_dual, "a"), agents(lab_dual, "b")
    a_ip, b_ip = _v6(lab_dual, "a"), _v6(lab_dual, "b")
    pa, pb = a.bind("::"), b.bind("::")
    a.send(b_ip, pb, b"open a")  # a's firewall is open to b:pb from here on
    lab_dual.block_udp_between_sites()
    try:
        assert lab_dual.udp_blocked
        b.send(a_ip, pa, b"blocked")
        assert a.recv(QUIET_S) == []
    finally:
        lab_dual.unblock_udp_between_sites()
    assert not lab_dual.udp_blocked
    b.send(a_ip, pa, b"unblocked")
    assert a.recv(5.0) == [(b"unblocked", b_ip, pb)]


def _binding(agent: Agent, server: tuple[str, int]) -> dict[str, Any]:
    request = make_binding_request(os.urandom)
    agent.send(*server, bytes(request))
    got = agent.recv(5.0)
    assert len(got) == 1, f"no STUN answer from {server}"
    answer = parse_message(got[0][0])
    assert answer.message_class == Class.RESPONSE
    assert answer.transaction_id == request.transaction_id
    return answer.attributes


def test_dual_stack_site_has_both_families(lab_dual: Lab, agents: AgentFactory) -> None:
    a = agents(lab_dual, "a")
    v6 = lab_dual.v6
    assert v6 is not None
    a.bind("0.0.0.0")
    four = _binding(a, (lab_dual.stun_addresses[0], lab_dual.stun_port))
    # IPv4 leaves through the symmetric NAT: the mapped address is the NAT's.
    assert four["XOR-MAPPED-ADDRESS"][0] == lab_dual.address("nat_a")
    a.bind("::", name="s")
    six = _binding(a, (v6.stun_addresses[0], lab_dual.stun_port))
    # IPv6 has no NAT: coturn sees the host's own global address, and names its second IPv6
    # address as the RFC 5780 alternate.
    assert six["XOR-MAPPED-ADDRESS"][0] == _v6(lab_dual, "a")
    other = six.get("OTHER-ADDRESS")
    assert other is not None and ipaddress.ip_address(other[0]) == ipaddress.ip_address(
        v6.stun_addresses[1]
    )


def test_no_lab_ipv6_in_the_host_namespace(lab_dual: Lab) -> None:
    v6 = lab_dual.v6
    assert v6 is not None
    host_addrs = subprocess.run(
        ["ip", "-6", "-j", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    host_routes = subprocess.run(
        ["ip", "-6", "-j", "route", "show", "table", "all"], capture_output=True, text=True
    ).stdout
    for text in (host_addrs, host_routes):
        assert str(v6.network.network_address).rstrip(":") not in text
    # Inside, every IPv6 route stays within the run's /48 (or is link-local): no way out.
    lab_net = ipaddress.IPv6Network("fe80::/64")
    for host in lab_dual.hosts:
        routes = json.loads(lab_dual.run(host, ["ip", "-6", "-j", "route"], check=True).stdout)
        for route in routes:
            if "gateway" in route:
                assert v6.contains(route["gateway"]), (host, route)
            dst = route["dst"]
            if dst != "default":
                net = ipaddress.IPv6Network(dst)
                assert net.subnet_of(v6.network) or net == lab_net or net.is_multicast, route
    # A lab address really is reachable from inside (the check above is not vacuous).
    reached = lab_python(
        lab_dual,
        "a",
        """
        import json, socket, sys
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.connect((sys.argv[1], 9))
        print(json.dumps(s.getsockname()[0]))
        """,
        v6.public("rendezvous"),
    )
    assert reached == _v6(lab_dual, "a")


def test_dual_stack_workers_go_direct_over_ipv6_where_ipv4_needs_a_relay() -> None:
    """Real rendezvous and workers: symmetric x symmetric needs the relay over IPv4 (the IPv4
    table), but both sites have IPv6 behind v6-apdf: the link is direct over IPv6, both workers
    say so in their status, and chat crosses it exactly once."""
    require_lab()
    assert expected_outcome("symmetric", "symmetric") == "failed"
    with Lab.create("symmetric/v6-apdf", "symmetric/v6-apdf") as lab:
        run = PairRun(lab, name="v6").start()
        try:
            assert run.wait_started(90 * TIMEOUT_UNIT), "the workers did not start"
            assert run.wait_connected(40 * TIMEOUT_UNIT), (run.status("a"), run.status("b"))
            for host, peer in (("a", "b"), ("b", "a")):
                status = run.status(host)
                assert status["family"] == "ipv6", status
                assert status["path"] == "direct" and status["state"] == "connected"
                endpoint = status["peer"]["endpoint"]
                assert endpoint.startswith(f"[{_v6(lab, peer)}]:"), endpoint
            assert run.chat_exactly_once("a", "b", timeout=15 * TIMEOUT_UNIT)
        finally:
            run.close()


def test_probe_over_ipv6_classifies_each_firewall_as_its_name_says(lab_fw: Lab) -> None:
    """``p2plab probe`` against coturn's two IPv6 addresses (RFC 5780 tests over IPv6): no
    NAT66, endpoint-independent mapping, and the filtering the profile is named after."""
    v6 = lab_fw.v6
    assert v6 is not None
    stun = bracket(v6.stun_addresses[0], lab_fw.stun_port)
    for host, filtering in (("a", "address-and-port-dependent"), ("b", "endpoint-independent")):
        argv = [sys.executable, "-m", "p2plab", "probe", "--stun", stun, "--json", "--no-classic"]
        proc = lab_fw.run(host, argv, timeout=120 * TIMEOUT_UNIT)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)["ipv6"]
        assert report["reachable"] and not report["nat66"], report
        assert report["mapped"].startswith(f"[{_v6(lab_fw, host)}]:")
        assert (report["mapping"], report["filtering"]) == ("endpoint-independent", filtering)


def _families(run: PairRun) -> tuple[object, object]:
    return (run.status("a").get("family"), run.status("b").get("family"))


def test_a_link_moves_to_ipv4_when_ipv6_dies_and_back_when_it_returns() -> None:
    """Two port-restricted/v6-apdf sites: direct over IPv6; IPv6 UDP between the sites dropped
    at site a's router -> the link goes on over IPv4 without being lost (chat exactly once);
    the drop lifted -> back to IPv6."""
    require_lab()
    with Lab.create("port-restricted/v6-apdf", "port-restricted/v6-apdf") as lab:
        assert lab.v6 is not None
        run = PairRun(lab, name="move").start()
        try:
            assert run.wait_started(90 * TIMEOUT_UNIT), "the workers did not start"
            assert run.wait_connected(40 * TIMEOUT_UNIT)
            assert run.wait_family("ipv6", 20 * TIMEOUT_UNIT), _families(run)
            block = block_ruleset([str(lab.v6.lan_net("b"))])
            lab.run("nat_a", ["nft", "-f", "-"], input=block, check=True)
            assert run.wait_family("ipv4", 45 * TIMEOUT_UNIT), _families(run)
            assert {run.status(h)["state"] for h in "ab"} == {"connected"}
            assert run.chat_exactly_once("a", "b", timeout=15 * TIMEOUT_UNIT)
            lab.run("nat_a", ["nft", "delete", "table", "ip6", BLOCK_TABLE], check=True)
            assert run.wait_family("ipv6", 30 * TIMEOUT_UNIT), _families(run)
            assert run.chat_exactly_once("b", "a", timeout=15 * TIMEOUT_UNIT)
        finally:
            run.close()
