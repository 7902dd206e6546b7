"""Settings of one worker (the CLI and the container environment fill these in)."""

from __future__ import annotations

from dataclasses import dataclass, field

from p2plab.aio.dualstack import check_ipv6_mode, is_v6
from p2plab.aio.rendezvous import Backoff
from p2plab.config import BirthdayConfig, SessionConfig
from p2plab.core.crypto import parse_peer_key
from p2plab.core.link import LinkConfig
from p2plab.errors import ConfigError

__all__ = ["WorkerConfig"]


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker (the CLI and the container environment fill these in)."""

    rendezvous_url: str
    """``ws://host:port`` or ``wss://...`` of the rendezvous service."""
    stun_servers: tuple[str, ...] = ()
    """STUN servers as ``host:port``; empty means: use the address the rendezvous observed."""
    udp_host: str = "0.0.0.0"
    """Address the peer UDP socket binds to: the IPv4 socket (an IPv6 address is refused:
    the IPv6 socket is a second one, ``udp6_host``)."""
    udp_port: int = 0
    """Port the peer UDP socket binds to (0: chosen by the OS)."""
    http_host: str = "127.0.0.1"
    """Address of the worker's HTTP server (UI); the container sets 0.0.0.0."""
    http_port: int | None = None
    """Port of the HTTP server; 0 picks a free port; None (the default in Python) runs no HTTP
    server.  The CLI (``p2plab worker``) and the container serve the UI on 8080."""
    room: str = "default"
    """Rendezvous room: workers are paired within a room."""
    token: str | None = None
    """Token the rendezvous asks for, if it was started with one."""
    worker_id: str | None = None
    """Worker id; a fresh UUID when None."""
    public_ip_url: str | None = None
    """An IP-echo URL to learn the HTTP-derived public IP; never contacted unless set."""
    nat_report: bool = True
    """Classify the NAT (RFC 5780) in the background when the STUN server supports it."""
    session: SessionConfig = field(default_factory=SessionConfig)
    """Timers of the peer link (keep-alive, lost-peer timeout, chat retransmission)."""
    backoff: Backoff = field(default_factory=Backoff)
    """Reconnection schedule of the rendezvous client."""
    stun_timeout_s: float = 5.0
    """How long the STUN step may take before the worker falls back to the observed address."""
    encrypt: bool = True
    """Seal every peer datagram (X25519 + ChaCha20-Poly1305, see :mod:`p2plab.core.crypto`).
    False is the explicit plaintext mode: no key is advertised, and a peer is accepted only if
    it runs without encryption too (marked ``"encrypted": false`` in ``status()["security"]``)."""
    repunch: bool = True
    """After a peer timeout on a link that was up (e.g. a NAT dropped its mapping), punch the same
    peer again with the same candidates until it answers or the rendezvous says it left."""
    repunch_max_delay_s: float = 10.0
    """Longest pause between two re-punch attempts (they back off from 0.5 s)."""
    relay: bool = True
    """When punching fails, carry the (still sealed) peer datagrams through the rendezvous
    (state ``relayed``, ``status()["path"] == "relay"``): chat, keep-alives and RTT work,
    benchmarks do not.  False keeps the old behaviour (``lost``, then ``waiting_for_peer``)."""
    # -- trust in peer keys and the rendezvous (issue 14; kept together) --
    peer_key: str | None = None
    """Pin the peer (``--peer-key``/``P2P_PEER_KEY``): its base64 public key or its fingerprint
    (64 hex digits).  Offers with any other key are refused and shown as a warning.  None:
    trust on first use, remembering keys by peer id (see ``known_peers_file``)."""
    known_peers_file: str | None = None
    """A JSON file where the keys of peers seen are remembered across runs (None: in memory
    only).  A known id that comes back with another key is reported loudly."""
    register_timeout_s: float = 10.0
    """A rendezvous connection not registered within this many seconds (no challenge, no
    ``registered``) is closed and tried again with backoff."""
    ui_token: str | None = None
    """Token of the worker's page (``/``, ``/status``, ``/ui_ws``), as Jupyter's: at least 16
    characters of A-Z a-z 0-9 . _ ~ -; None generates one when the page starts
    (:attr:`Worker.ui_url <p2plab.aio.worker.Worker.ui_url>` carries it)."""
    ui_allowed_hosts: tuple[str, ...] = ()
    """Host names the page answers to besides localhost, loopback and IP addresses (DNS
    rebinding guard): ``name``, ``name:port`` or ``.domain`` (e.g. ``.run.app``)."""
    ipv6: str = "auto"
    """IPv6 beside IPv4 (issue 19; ``--ipv6``, ``P2P_IPV6``): ``auto`` binds a second UDP
    socket, IPv6 only, on the IPv4 socket's port number when free, whenever the host has an
    IPv6 route (in a loopback-only setup: only when the rendezvous or a STUN server is on
    ``::1``), and announces IPv6 candidates; ``off`` never opens one
    (:mod:`p2plab.aio.dualstack`)."""
    udp6_host: str | None = None
    """Address the IPv6 socket binds to; None: ``::`` (``::1`` in a loopback-only setup)."""
    birthday: BirthdayConfig = field(default_factory=BirthdayConfig)
    """Birthday punching and predicted ports for pairs with a hard NAT (issue 16;
    ``--birthday-sockets``, ``--hard-nat-budget``, ``--no-birthday``).  While enabled, the
    worker also learns and announces its NAT hint (a few more STUN Bindings at discovery)."""

    port_mapping: str = "auto"
    """Ask the NAT for a port for the UDP socket (issue 18; ``--port-mapping``,
    ``P2P_PORT_MAPPING``): ``off``; ``auto``, the IPv4 default route's gateway, but never when
    the rendezvous or a STUN server is on loopback (tests and ``make demo`` leave the host's
    router alone); or the gateway's IPv4 address.  The mapped endpoint is offered to the peer
    above the STUN one (:mod:`p2plab.aio.portmap`)."""
    port_mapping_lifetime_s: int = 7200
    """The lease asked for (``--port-mapping-lifetime``, ``P2P_PORT_MAPPING_LIFETIME``),
    renewed at half of it: a renewal also re-creates a mapping the router dropped meanwhile."""

    def __post_init__(self) -> None:
        check_ipv6_mode(self.ipv6)
        if ":" in self.udp_host:  # one socket per family: never a dual-stack one
            raise ConfigError(
                f"udp_host is the IPv4 socket's address, got {self.udp_host!r}; the IPv6 "
                "socket binds udp6_host (ipv6='auto')"
            )
        if self.udp6_host is not None and not is_v6(self.udp6_host):
            raise ConfigError(f"udp6_host must be an IPv6 address, got {self.udp6_host!r}")

    def link_config(self) -> LinkConfig:
        """The link engine's share of these settings."""
        return LinkConfig(
            session=self.session,
            relay=self.relay,
            repunch=self.repunch,
            repunch_max_delay_s=self.repunch_max_delay_s,
            room=self.room,
            token=self.token,
            peer_key=parse_peer_key(self.peer_key) if self.peer_key is not None else None,
            birthday=self.birthday,
        )
