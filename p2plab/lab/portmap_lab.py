"""miniupnpd on a lab NAT: the port-mapping router of the ``+pmp``, ``+upnp`` and ``+all`` sites.

Debian's miniupnpd 2.3.1 is built with its nftables backend (``miniupnpd --version`` says "using
netfilter(nftables) backend"; it links libnftnl and libmnl, no libiptc).  It does not create its
tables: it adds rules to chains that must exist, in the ``inet`` family.  Its shipped
``nft_init.sh`` would create them with a forward policy of drop, which would cut every flow the
lab's NAT profile forwards, so :func:`nft_skeleton` writes them here with policy accept.  Its table
(:data:`NFT_TABLE`) is separate from the ``ip nat``/``ip filter`` tables that the profile's
``iptables-restore`` (the nf_tables flavour) fills, and both see every packet:

- prerouting (dstnat, priority -100): miniupnpd's DNAT for a mapped port; the profile has no DNAT
  there for a mapped port (``full``/``restricted`` DNAT to the same LAN host anyway);
- forward (priority 0): miniupnpd's accept rules; the profile's FORWARD accepts everything;
- postrouting (srcnat, priority 100): empty unless PCP PEER is used; the profile masquerades.

A DNATed datagram goes to FORWARD, not INPUT, so the profile's ``INPUT -i W ctstate NEW DROP``
(what real routers have) does not hide mapped ports.

miniupnpd refuses to forward when its WAN address is private or reserved (every documentation and
benchmark range counts; 2.3.1 has no option to allow it: ``strings`` shows no
``ext_allow_private_ipv4``, which came later), so a lab with such a site gives its public segment
the public-looking prefix :data:`PORTMAP_PUBLIC_NET`, confined to the lab's namespaces (see
``natlab.md``, "Port mapping in the lab", and ``tests/lab/test_lab_portmap.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from p2plab.errors import LabError
from p2plab.lab.site import PORTMAP_MODIFIERS

__all__ = [
    "NATPMP_PORT",
    "NFT_TABLE",
    "PORTMAP_PUBLIC_NET",
    "MiniUpnpd",
    "miniupnpd_conf",
    "nft_skeleton",
    "start_miniupnpd",
    "udp_exchange",
]

#: The public segment's /24 in labs with a port-mapping site.  1.2.3.0/24 because: miniupnpd
#: 2.3.1 takes it as a routable WAN address (measured; its reserved list covers every IANA special
#: range, 203.0.113.0/24 included); it is the textbook placeholder ("1.2.3.4"), held by APNIC Labs
#: as a research sink that hosts no service, so the lab impersonates nobody's service; and it is
#: obviously fake to a reader of a log.  It never leaves the lab's namespaces anyway.
PORTMAP_PUBLIC_NET = "1.2.3"

#: miniupnpd's NAT-PMP and PCP port (RFC 6886/6887), on the NAT's LAN address.
NATPMP_PORT = 5351

#: The nftables table (family ``inet``) that holds miniupnpd's chains in a NAT namespace.
NFT_TABLE = "miniupnpd"

#: miniupnpd's default chain names for the nftables backend (we keep them).
_FORWARD_CHAIN = "miniupnpd"
_PREROUTING_CHAIN = "prerouting_miniupnpd"
_POSTROUTING_CHAIN = "postrouting_miniupnpd"


class _LabLike(Protocol):
    """The part of :class:`p2plab.lab.netns.Lab` this module uses (no import cycle)."""

    def run(
        self, host: str, argv: Sequence[str], *, check: bool = False, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command inside ``host``'s namespace."""
        ...

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside ``host``'s namespace; the lab stops it on close."""
        ...


def nft_skeleton(table: str = NFT_TABLE) -> str:
    """``nft -f`` input: the chains miniupnpd's nftables backend adds its rules to.

    Every base chain has policy accept: filtering stays the NAT profile's job.  The regular
    chains come first because a jump needs its target to exist.  The first two lines make it
    idempotent (nft 1.0.6 has no ``destroy``): a restarted miniupnpd starts from empty chains,
    like a rebooted router, instead of finding its old rules and a second set of jumps.
    """
    return f"""table inet {table} {{}}
delete table inet {table}
table inet {table} {{
    chain {_FORWARD_CHAIN} {{
    }}
    chain {_PREROUTING_CHAIN} {{
    }}
    chain {_POSTROUTING_CHAIN} {{
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        jump {_FORWARD_CHAIN};
    }}
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump {_PREROUTING_CHAIN};
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump {_POSTROUTING_CHAIN};
    }}
}}
"""


def miniupnpd_conf(
    *,
    modifier: str,
    ext_ifname: str,
    lan_ifname: str,
    lan_prefix: str,
    lease_file: Path,
    min_lifetime: int = 10,
    max_lifetime: int = 86400,
    table: str = NFT_TABLE,
    device_uuid: str | None = None,
) -> str:
    """miniupnpd.conf text for one lab NAT.

    ``modifier`` is the site's port-mapping modifier (``pmp``: NAT-PMP and PCP on port 5351, no
    IGD; ``upnp``: IGD only; ``all``: both).  ``lan_prefix`` (``198.18.1.0/24``) is the only
    client range allowed, and ``secure_mode`` limits each client to mappings to itself.
    ``min_lifetime`` is low (miniupnpd's default is 120 s) so that tests can watch a short lease
    expire.
    """
    if modifier not in PORTMAP_MODIFIERS:
        raise LabError(f"unknown port-mapping modifier {modifier!r}")
    protocols = PORTMAP_MODIFIERS[modifier]
    yes_no = {True: "yes", False: "no"}
    lines = [
        f"ext_ifname={ext_ifname}",
        f"listening_ip={lan_ifname}",
        "http_port=0",  # a free port; clients find it by SSDP
        f"enable_natpmp={yes_no['nat-pmp' in protocols]}",  # one switch for NAT-PMP and PCP
        f"enable_upnp={yes_no['upnp' in protocols]}",
        "secure_mode=yes",
        "ipv6_disable=yes",  # IPv4 port mapping only (issue 18); IPv6 is filtering (issue 19)
        "system_uptime=no",
        "notify_interval=60",
        f"min_lifetime={min_lifetime}",
        f"max_lifetime={max_lifetime}",
        f"lease_file={lease_file}",
        f"uuid={device_uuid or uuid.uuid4()}",
        f"upnp_table_name={table}",
        f"upnp_nat_table_name={table}",
        f"upnp_forward_chain={_FORWARD_CHAIN}",
        f"upnp_nat_chain={_PREROUTING_CHAIN}",
        f"upnp_nat_postrouting_chain={_POSTROUTING_CHAIN}",
        f"allow 1024-65535 {lan_prefix} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class MiniUpnpd:
    """A running miniupnpd on one lab NAT."""

    site: str
    """``a`` or ``b``."""
    modifier: str
    """``pmp``, ``upnp`` or ``all``."""
    host: str
    """The lab host it runs in (``nat_a``/``nat_b``)."""
    gateway: str
    """Its LAN address: where NAT-PMP/PCP requests (port 5351) and SSDP answers come from."""
    conf: Path
    """Its configuration file."""
    lease_file: Path
    """Its lease file (one line per mapping: ``UDP:ext:int_ip:int_port:expiry:desc``)."""
    log_file: Path
    """Its stderr (``-d``: foreground, log on the console)."""
    proc: subprocess.Popen[Any]
    """The ``ip netns exec`` process that runs it."""

    @property
    def protocols(self) -> frozenset[str]:
        """The protocols it answers."""
        return PORTMAP_MODIFIERS[self.modifier]

    def log(self) -> str:
        """Its log so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def leases(self) -> list[str]:
        """The lease file's lines (miniupnpd rewrites it on every change)."""
        try:
            return [x for x in self.lease_file.read_text().splitlines() if x.strip()]
        except OSError:
            return []


def start_miniupnpd(
    lab: _LabLike,
    *,
    site: str,
    modifier: str,
    ext_ifname: str,
    lan_ifname: str,
    lan_net: str,
    run_dir: Path,
    min_lifetime: int = 10,
    max_lifetime: int = 86400,
    timeout: float = 10.0,
) -> MiniUpnpd:
    """Install the nft skeleton in ``nat_<site>``, start miniupnpd there, wait until it listens.

    ``lan_net`` is the LAN's first three octets (``198.18.1``).  Its configuration, pid, lease
    and log files live in ``run_dir`` (one per lab run and site).
    """
    host = f"nat_{site}"
    proc = lab.run(host, ["nft", "-f", "-"], input=nft_skeleton())
    if proc.returncode != 0:
        raise LabError(f"miniupnpd's nft skeleton failed in {host}: {proc.stderr.strip()}")
    run_dir.mkdir(parents=True, exist_ok=True)
    conf = run_dir / f"miniupnpd-{site}.conf"
    lease_file = run_dir / f"miniupnpd-{site}.leases"
    log_file = run_dir / f"miniupnpd-{site}.log"
    conf.write_text(
        miniupnpd_conf(
            modifier=modifier,
            ext_ifname=ext_ifname,
            lan_ifname=lan_ifname,
            lan_prefix=f"{lan_net}.0/24",
            lease_file=lease_file,
            min_lifetime=min_lifetime,
            max_lifetime=max_lifetime,
        )
    )
    argv = ["miniupnpd", "-d", "-f", str(conf), "-P", str(run_dir / f"miniupnpd-{site}.pid")]
    with log_file.open("wb") as log:
        daemon = lab.popen(host, argv, stdout=log, stderr=subprocess.STDOUT)
    handle = MiniUpnpd(site, modifier, host, f"{lan_net}.1", conf, lease_file, log_file, daemon)
    # Ready when its sockets are bound: UDP 5351 for NAT-PMP/PCP, the HTTP port for the IGD
    # (SSDP's 1900 is bound before the HTTP socket, so "HTTP listening" in the log suffices).
    deadline = time.monotonic() + timeout
    while True:
        if daemon.poll() is not None:
            raise LabError(f"miniupnpd exited in {host} ({daemon.returncode}): {handle.log()}")
        out = lab.run(host, ["ss", "-Hlun"]).stdout
        pmp_ready = "nat-pmp" not in handle.protocols or f":{NATPMP_PORT} " in out + " "
        upnp_ready = "upnp" not in handle.protocols or "HTTP listening on port" in handle.log()
        if pmp_ready and upnp_ready:
            return handle
        if time.monotonic() > deadline:
            raise LabError(f"miniupnpd did not start listening in {host} within {timeout} s")
        time.sleep(0.05)


# A UDP client for the lab's hosts (run with ``python -c`` inside a namespace): sends each
# hex-encoded request in turn from one socket and keeps the first answer from the destination.
_EXCHANGE_SCRIPT = """
import json, socket, sys
dst = (sys.argv[1], int(sys.argv[2]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[4], int(sys.argv[5])))
s.settimeout(float(sys.argv[3]))
answers = []
for req in sys.argv[6:]:
    s.sendto(bytes.fromhex(req), dst)
    got = None
    try:
        while got is None:
            data, src = s.recvfrom(4096)
            if src == dst:
                got = data.hex()
    except socket.timeout:
        pass
    answers.append(got)
print(json.dumps({"port": s.getsockname()[1], "answers": answers}))
"""


def udp_exchange(
    lab: _LabLike,
    host: str,
    source_ip: str,
    dest: tuple[str, int],
    requests: Sequence[bytes],
    *,
    source_port: int = 0,
    timeout: float = 2.0,
) -> tuple[int, list[bytes | None]]:
    """Send ``requests`` one by one from ``host`` to ``dest``; return (source port, answers).

    Each answer is the first datagram from ``dest`` within ``timeout``, or None.  Used to talk
    NAT-PMP/PCP to miniupnpd before (and independently of) the worker's own client.
    """
    argv = [sys.executable, "-c", _EXCHANGE_SCRIPT, dest[0], str(dest[1]), str(timeout),
            source_ip, str(source_port), *(r.hex() for r in requests)]  # fmt: skip
    budget = 10.0 + timeout * (len(requests) + 1)
    proc = lab.run(host, argv, timeout=budget)
    if proc.returncode != 0:
        raise LabError(f"udp exchange from {host} failed: {proc.stderr.strip()}")
    result = json.loads(proc.stdout)
    answers = [None if a is None else bytes.fromhex(a) for a in result["answers"]]
    return int(result["port"]), answers
