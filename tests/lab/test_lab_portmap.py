"""miniupnpd on lab NATs (issue 18): NAT-PMP, PCP and UPnP IGD answer, mappings forward through a
symmetric NAT with plain sockets, deleted mappings stop forwarding, and the public-looking prefix
stays inside the lab's namespaces."""

from __future__ import annotations

import ipaddress
import json
import queue
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2plab.cli import build_parser
from p2plab.errors import ConfigError, LabError
from p2plab.lab.ipv6 import expected_site_outcome
from p2plab.lab.matrix_report import parse_pairs
from p2plab.lab.netns import PUBLIC_NET, Lab, LabConfig
from p2plab.lab.portmap_lab import (
    NATPMP_PORT,
    PORTMAP_PUBLIC_NET,
    miniupnpd_conf,
    nft_skeleton,
    udp_exchange,
)

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.conftest import require
    from tests.lab_fixtures import TIMEOUT_UNIT, require_lab
except ImportError:  # pragma: no cover
    from conftest import require  # type: ignore[no-redef]
    from lab_fixtures import TIMEOUT_UNIT, require_lab  # type: ignore[no-redef]

# Real namespaces, nftables and miniupnpd: `-m "not lab"` deselects them.
pytestmark = [pytest.mark.lab, pytest.mark.root]

NONCE = bytes(range(1, 13))
#: How long a datagram that should not arrive is waited for (it never comes back later).
SILENCE_S = 1.0 * TIMEOUT_UNIT


def natpmp_map(internal: int, external: int, lifetime: int) -> bytes:
    """RFC 6886 UDP mapping request (lifetime 0 and external 0: delete)."""
    return struct.pack("!BBHHHI", 0, 1, 0, internal, external, lifetime)


def pcp_map(client: str, internal: int, lifetime: int) -> bytes:
    """RFC 6887 MAP request for UDP, any external IPv4 address."""
    mapped = ipaddress.IPv6Address(f"::ffff:{client}").packed
    header = struct.pack("!BBHI", 2, 1, 0, lifetime) + mapped
    any4 = ipaddress.IPv6Address("::ffff:0.0.0.0").packed
    return header + NONCE + struct.pack("!B3xHH", 17, internal, internal) + any4


# ---- no root needed ---------------------------------------------------------------------------


def test_conf_switches_follow_the_modifier() -> None:
    def conf(modifier: str) -> str:
        return miniupnpd_conf(
            modifier=modifier,
            ext_ifname="W",
            lan_ifname="L",
            lan_prefix="198.18.1.0/24",
            lease_file=Path("/x"),
        )

    pmp, upnp, both = conf("pmp"), conf("upnp"), conf("all")
    assert "enable_natpmp=yes" in pmp and "enable_upnp=no" in pmp
    assert "enable_natpmp=no" in upnp and "enable_upnp=yes" in upnp
    assert "enable_natpmp=yes" in both and "enable_upnp=yes" in both
    lines = pmp.splitlines()
    # Only the LAN may map, only to itself, and the catch-all deny comes last.
    assert "secure_mode=yes" in lines and "ext_ifname=W" in lines and "listening_ip=L" in lines
    assert lines[-2:] == [
        "allow 1024-65535 198.18.1.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]
    with pytest.raises(LabError, match="modifier"):
        conf("bogus")


def test_nft_skeleton_never_drops() -> None:
    text = nft_skeleton()
    # nft_init.sh's "policy drop" on forward would cut every flow the NAT profile forwards.
    assert "drop" not in text
    assert text.count("policy accept;") == 3
    assert "\ntable inet miniupnpd {\n" in text


def test_public_prefix_only_for_port_mapping_labs() -> None:
    # Lab() only computes names and addresses; nothing is built before from_config.
    assert Lab(LabConfig("symmetric", "symmetric")).public_net == PUBLIC_NET
    for a, b in (("symmetric+pmp", "symmetric"), ("leaky", "port-restricted+upnp")):
        lab = Lab(LabConfig(a, b))
        assert lab.public_net == PORTMAP_PUBLIC_NET
        assert lab.rendezvous_address.startswith(f"{PORTMAP_PUBLIC_NET}.")
        assert all(ip.startswith(f"{PORTMAP_PUBLIC_NET}.") for ip in lab.stun_addresses)
    # site B is ignored with same_lan, so its modifier must not switch the prefix
    assert Lab(LabConfig("symmetric", "full+pmp", same_lan=True)).public_net == PUBLIC_NET
    with pytest.raises(ConfigError, match="modifier"):
        LabConfig("symmetric+bogus")


def test_matrix_takes_site_specs_and_expects_port_mapping_pairs_direct() -> None:
    pairs = "symmetric+pmp:symmetric,symmetric+upnp:symmetric,symmetric+pmp:symmetric+pmp"
    args = build_parser().parse_args(["lab", "matrix", "--pairs", pairs + ",leaky:leaky"])
    assert args.pairs[0] == ("symmetric+pmp", "symmetric") and len(args.pairs) == 4
    assert parse_pairs("port-restricted+all:leaky") == [("port-restricted+all", "leaky")]
    with pytest.raises(ValueError, match="modifier"):
        parse_pairs("symmetric+nope:leaky")
    # Two symmetric NATs need the relay, unless one of them maps a port when asked.
    assert expected_site_outcome("symmetric", "symmetric") == ("failed", "")
    for a, b in [p.split(":") for p in pairs.split(",")] + [["leaky", "port-restricted+pmp"]]:
        assert expected_site_outcome(a, b) == ("direct", "ipv4")
    assert build_parser().parse_args(["lab", "up", "--a", "symmetric+all"]).profile_a == (
        "symmetric+all"
    )


# ---- the kernel lab ---------------------------------------------------------------------------

# Echoes every datagram to its sender and prints "hex-payload source-ip source-port" per datagram.
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    while True:
        data, src = s.recvfrom(2048)
        s.sendto(data, src)
        print(data.hex(), src[0], src[1], flush=True)
except TimeoutError:
    pass
"""


class Echo:
    """A UDP echo server in a lab host; :meth:`seen` lists (payload, source) it received."""

    def __init__(self, lab: Lab, host: str, port: int) -> None:
        self.proc = lab.popen(
            host,
            [sys.executable, "-c", ECHO, str(port), str(60 * TIMEOUT_UNIT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.lines.get(timeout=10 * TIMEOUT_UNIT) == "ready"
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def seen(self) -> list[tuple[bytes, tuple[str, int]]]:
        while not self.lines.empty():
            data, ip, port = self.lines.get().split()
            self.received.append((bytes.fromhex(data), (ip, int(port))))
        return self.received


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Site A answers NAT-PMP/PCP, site B answers UPnP IGD; both NATs are symmetric."""
    require_lab(coturn=False)
    for tool in ("miniupnpd", "upnpc", "nft"):
        require(shutil.which(tool) is not None, tool)
    with Lab.create("symmetric+pmp", "symmetric+upnp", stun=False) as built:
        yield built


def send(lab: Lab, host: str, dest: tuple[str, int], payload: bytes) -> bytes | None:
    """One datagram from a fresh socket (a fresh flow through both NATs); the echo or None."""
    _, (answer,) = udp_exchange(lab, host, lab.address(host), dest, [payload], timeout=SILENCE_S)
    return answer


def pmp(lab: Lab, request: bytes) -> bytes:
    gateway = lab.miniupnpd["a"].gateway
    _, (answer,) = udp_exchange(lab, "a", lab.address("a"), (gateway, NATPMP_PORT), [request])
    assert answer is not None, lab.miniupnpd["a"].log()
    return answer


IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"


def ssdp_search(lab: Lab, host: str) -> bytes | None:
    """An SSDP M-SEARCH for an IGD sent to the host's gateway (unicast); its answer or None."""
    search = (
        "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n"
        f'MAN: "ssdp:discover"\r\nMX: 1\r\nST: {IGD}\r\n\r\n'
    ).encode()
    gateway = lab.miniupnpd[host].gateway  # hosts a and b sit in sites a and b
    _, (answer,) = udp_exchange(
        lab, host, lab.address(host), (gateway, 1900), [search], timeout=SILENCE_S
    )
    return answer


def upnpc(lab: Lab, *args: str) -> subprocess.CompletedProcess[Any]:
    return lab.run("b", ["upnpc", *args], timeout=20 * TIMEOUT_UNIT)


def test_pmp_site_answers_natpmp_and_pcp_but_not_igd(lab: Lab) -> None:
    wan_a = lab.address("nat_a")
    assert wan_a.startswith(f"{PORTMAP_PUBLIC_NET}.")
    answer = pmp(lab, bytes([0, 0]))
    version, opcode, result, _epoch = struct.unpack("!BBHI", answer[:8])
    assert (version, opcode, result) == (0, 128, 0)
    assert str(ipaddress.IPv4Address(answer[8:12])) == wan_a
    announce = pmp(lab, struct.pack("!BBHI", 2, 0, 0, 0) + bytes(10) + b"\xff\xff" + bytes(4))
    assert announce[:4] == bytes([2, 0x80, 0, 0])  # PCP, response to ANNOUNCE, SUCCESS
    # No IGD: an SSDP search sent straight to the gateway gets no answer (on the +upnp site the
    # same search is answered, see below).
    assert ssdp_search(lab, "a") is None


def test_upnp_site_answers_igd_but_not_natpmp(lab: Lab) -> None:
    proc = upnpc(lab, "-l")
    assert f"ExternalIPAddress = {lab.address('nat_b')}" in proc.stdout, proc.stdout + proc.stderr
    answer = ssdp_search(lab, "b")
    assert answer is not None and answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert IGD.encode() in answer
    gateway = lab.miniupnpd["b"].gateway
    dest = (gateway, NATPMP_PORT)
    _, (answer,) = udp_exchange(lab, "b", lab.address("b"), dest, [b"\0\0"], timeout=SILENCE_S)
    assert answer is None


def test_natpmp_and_pcp_mappings_forward_through_the_symmetric_nat(lab: Lab) -> None:
    wan_a, wan_b = lab.address("nat_a"), lab.address("nat_b")
    echo = Echo(lab, "a", 40000)
    # Control: the symmetric NAT drops unsolicited datagrams to the port before any mapping.
    assert send(lab, "b", (wan_a, 40000), b"before") is None
    answer = pmp(lab, natpmp_map(40000, 40000, 120))
    _, op, result, _, internal, external, lifetime = struct.unpack("!BBHIHHI", answer)
    assert (op, result, internal) == (129, 0, 40000) and 0 < lifetime <= 120
    assert any(f":{external}:198.18.1.2:40000:" in x for x in lab.miniupnpd["a"].leases())
    # The datagram reaches a's port, and a's echo leaves from the mapped endpoint.
    assert send(lab, "b", (wan_a, external), b"via-natpmp") == b"via-natpmp"
    assert (b"via-natpmp", wan_b) in [(d, src[0]) for d, src in echo.seen()]
    # Deleted: a fresh flow no longer gets in (an established conntrack flow would still pass).
    deleted = pmp(lab, natpmp_map(40000, 0, 0))
    assert struct.unpack("!BBH", deleted[:4]) == (0, 129, 0)
    assert send(lab, "b", (wan_a, external), b"after-delete") is None

    echo2 = Echo(lab, "a", 40002)
    answer = pmp(lab, pcp_map(lab.address("a"), 40002, 120))
    assert answer[3] == 0 and answer[24:36] == NONCE, answer.hex()
    pcp_port = struct.unpack("!H", answer[42:44])[0]
    assert str(ipaddress.IPv6Address(answer[44:60]).ipv4_mapped) == wan_a
    assert send(lab, "b", (wan_a, pcp_port), b"via-pcp") == b"via-pcp"
    assert b"via-pcp" in [d for d, _ in echo2.seen()]
    pmp(lab, pcp_map(lab.address("a"), 40002, 0))
    assert send(lab, "b", (wan_a, pcp_port), b"after-pcp-delete") is None


def test_upnp_mapping_forwards_and_delete_stops_it(lab: Lab) -> None:
    wan_b = lab.address("nat_b")
    Echo(lab, "b", 41000)
    assert send(lab, "a", (wan_b, 41000), b"before") is None
    proc = upnpc(lab, "-e", "p2plab-test", "-a", lab.address("b"), "41000", "41000", "UDP", "120")
    assert re.search(rf"external {re.escape(wan_b)}:41000 UDP is redirected", proc.stdout), (
        proc.stdout + proc.stderr
    )
    assert send(lab, "a", (wan_b, 41000), b"via-upnp") == b"via-upnp"
    proc = upnpc(lab, "-d", "41000", "UDP")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert send(lab, "a", (wan_b, 41000), b"after-delete") is None


def test_public_looking_prefix_is_confined_to_the_lab(lab: Lab) -> None:
    prefix = ipaddress.IPv4Network(f"{PORTMAP_PUBLIC_NET}.0/24")
    assert lab.public_net == PORTMAP_PUBLIC_NET

    def ip_json(ns: str | None, *args: str) -> list[dict[str, Any]]:
        argv = ["ip", "-j", *(["-n", ns] if ns else []), *args]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return list(json.loads(out or "[]"))

    def in_prefix(text: str | None) -> bool:
        if not text or text == "default":
            return False
        return ipaddress.IPv4Network(text, strict=False).overlaps(prefix)

    # The host's namespace: no lab interface, no address, no route for the prefix.
    host_links = {x["ifname"] for x in ip_json(None, "link")}
    assert not [n for n in host_links if n.startswith(lab.prefix)]
    host_addrs = [a["local"] for x in ip_json(None, "-4", "addr") for a in x["addr_info"]]
    assert not [a for a in host_addrs if in_prefix(a)]
    host_routes = ip_json(None, "-4", "route", "show", "table", "all")
    assert not [r for r in host_routes if in_prefix(r.get("dst")) or in_prefix(r.get("gateway"))]

    # Every lab namespace: only the lab's own interfaces, every route on them, and the only
    # gateway anywhere is a NAT's LAN address; from the NATs and servers nothing leads out.
    gateways = {m.gateway for m in lab.miniupnpd.values()}
    for ns in lab.namespaces:
        links = {x["ifname"] for x in ip_json(ns, "link")}
        assert links - {"lo"} and all(n == "lo" or n.startswith(lab.prefix) for n in links), links
        for route in ip_json(ns, "-4", "route", "show", "table", "all"):
            assert route.get("dev") in links, (ns, route)
            assert route.get("gateway") in (None, *gateways), (ns, route)
        lan_host = ns in (lab.namespace("a"), lab.namespace("b"))
        # A route lookup sends nothing; TEST-NET-1 stands for any address outside the lab.
        lookup = subprocess.run(
            ["ip", "-n", ns, "route", "get", "192.0.2.1"], capture_output=True, text=True
        )
        if lan_host:
            assert "via" in lookup.stdout and any(g in lookup.stdout for g in gateways)
        else:
            assert lookup.returncode != 0 and "unreachable" in lookup.stderr, (ns, lookup)
