"""Settings as frozen dataclasses, one docstring per field.

Every class validates itself in ``__post_init__`` and raises :class:`~p2plab.errors.ConfigError`
with a message naming the field, so a bad value fails where it is given, not deep in a timer.
Times are in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from p2plab.errors import ConfigError

__all__ = ["BirthdayConfig", "SessionConfig"]


def _require_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class SessionConfig:
    """Timers and limits of one peer link (:class:`p2plab.core.session.PeerSession`)."""

    punch_timeout: float = 10.0
    """Give up punching (``PeerLost(reason="punch timeout")``) if no path is up after this long."""

    probe_interval: float = 0.1
    """First retry interval of the probes sent to each candidate address."""

    probe_backoff: float = 1.5
    """Factor applied to a candidate's probe interval after each probe (>= 1)."""

    probe_max_interval: float = 1.0
    """Ceiling of a candidate's probe interval while punching."""

    probe_pacing: float = 0.02
    """Stagger between the first probes of successive candidates (ICE's Ta, RFC 8445 14.2)."""

    max_candidates: int = 9
    """Most candidates probed from one offer: the peer's public endpoint plus the 8 local
    candidates the signaling allows; the rest are dropped (``candidates_dropped``)."""

    max_prflx_candidates: int = 4
    """Most peer-reflexive addresses learnt while punching (a symmetric NAT shows one or two)."""

    probes_per_candidate: int = 10
    """Scheduled probes per candidate while punching (about 5 s of backed-off retries with the
    defaults); a triggered check answering the peer's probe may go past it."""

    probe_budget: int = 100
    """Most probes of one punching attempt, triggered checks included; past it probes are
    withheld and counted (``probe_budget_exhausted``) and the punch timeout decides."""

    amplification_factor: int = 3
    """To a peer address not yet validated by a probe round trip, send at most this times the
    bytes of authenticated datagrams received from it (RFC 9000 section 8.1); the rest are
    withheld and counted (``amplification_limited``)."""

    new_session_rate: float = 5.0
    """Handshake datagrams (PROBE, PROBE_ACK) that would start a new peer session, i.e. whose
    sender tag the cipher does not know, accepted per second from one source IP; the excess is
    dropped before any cryptography and counted (``new_sessions_limited``)."""

    new_session_burst: int = 10
    """How many such datagrams one source IP may send at once (the token bucket's depth)."""

    keepalive_interval: float = 5.0
    """Send a keep-alive after this long without sending anything (well under a 30 s NAT
    timeout)."""

    peer_timeout: float = 15.0
    """Declare the peer lost (``PeerLost(reason="peer timeout")``) after this long without
    hearing from it."""

    upgrade_interval: float = 5.0
    """While connected on a TURN path, probe the direct candidates (the offer's and the learnt
    ones, one probe each) this often, and move to the first that answers (issue 17).  Tailscale's
    magicsock re-pings its direct endpoints every 5 s while a peer is on DERP: a NAT mapping that
    opens again is used within one round, and one small probe per candidate per round costs
    nothing next to the relayed traffic."""

    warm_interval: float = 25.0
    """While connected direct, probe the validated TURN paths this often, so that one is ready
    when the direct path dies: under the 30 s of a NAT's UDP mapping and far under a TURN
    permission's 300 s."""

    downgrade_after: float = 7.5
    """Connected direct and nothing from the peer on that path for this long: the controlling
    side moves to a validated TURN path and nominates it.  1.5 keep-alive intervals: on an idle
    link something arrives every keep-alive interval, and the controlled side may have last
    heard one interval earlier than we did, so its peer timeout (15 s) still comes after our
    nomination over TURN (7.5 + 5 s + a round trip).  Capped at 0.8 x ``peer_timeout``."""

    rto_initial: float = 1.0
    """Retransmission timeout before any RTT sample exists (RFC 6298 section 2.1)."""

    rto_min: float = 0.2
    """Lower bound of the retransmission timeout (RFC 6298 says 1 s; a LAN chat wants less)."""

    rto_max: float = 3.0
    """Upper bound of the retransmission timeout after exponential backoff."""

    max_retransmits: int = 20
    """Give up a reliable message (``ChatFailed``) after this many retransmissions.  20 with
    ``chat_give_up_s`` 60: at 20% loss on each NAT a round trip fails 59% of the time, and 12
    retransmissions within 30 s (the old limits) gave a message up in about 0.4% of chats of 30
    messages (an in-memory run of the session, 3000 chats); 0.59**21 is 2e-5 per message."""

    chat_give_up_s: float = 60.0
    """Give up a reliable message (``ChatFailed``) this long after its first transmission (a dead
    link ends sooner: the peer timeout)."""

    max_in_flight: int = 64
    """Most reliable messages sent and not yet acknowledged; later ones wait in a queue."""

    recv_window: int = 1024
    """Most out-of-order messages buffered by the receiver ahead of the next expected one."""

    max_control_bytes: int = 16 * 1024
    """Largest encoded JSON control message accepted by ``send_control``."""

    def __post_init__(self) -> None:
        _require_positive(
            self,
            *(
                f.name
                for f in fields(self)
                if f.name not in ("probe_backoff", "probe_pacing", "max_retransmits")
            ),
        )
        if self.probe_backoff < 1:
            raise ConfigError(
                f"SessionConfig.probe_backoff must be >= 1, got {self.probe_backoff!r}"
            )
        if self.probe_pacing < 0:
            raise ConfigError(f"SessionConfig.probe_pacing must be >= 0, got {self.probe_pacing!r}")
        if self.max_retransmits < 0:
            raise ConfigError(
                f"SessionConfig.max_retransmits must be >= 0, got {self.max_retransmits!r}"
            )
        if self.rto_min > self.rto_max:
            raise ConfigError(
                f"SessionConfig.rto_min ({self.rto_min}) must not exceed rto_max ({self.rto_max})"
            )
        if self.probe_interval > self.probe_max_interval:
            raise ConfigError(
                f"SessionConfig.probe_interval ({self.probe_interval}) must not exceed "
                f"probe_max_interval ({self.probe_max_interval})"
            )
        if self.keepalive_interval >= self.peer_timeout:
            raise ConfigError(
                f"SessionConfig.keepalive_interval ({self.keepalive_interval}) must be shorter "
                f"than peer_timeout ({self.peer_timeout})"
            )


@dataclass(frozen=True)
class BirthdayConfig:
    """Punching through a NAT that maps per destination ("hard"): birthday-paradox probing and
    predicted ports (issue 16; ``docs/protocol.md``, "Hard NATs").

    With one side easy (endpoint-independent mapping) and one hard, the hard side opens
    ``sockets`` extra sockets and sends a probe from each towards the easy side's endpoint; the
    easy side probes random ports of the hard side's announced IP, ``probe_rate`` per second, at
    most ``probe_budget`` of them (predicted ports first).  With k sockets out of P ports, n probes
    hit one with probability 1 - (1 - k/P)^n: k = 256, P = 64512, n = 1024 -> 98.3%.
    """

    enabled: bool = True
    """Try birthday punching and predicted ports at all (False: plain punching, then relay)."""

    sockets: int = 256
    """Sockets the hard side opens (k); each holds one NAT mapping towards the easy side."""

    probe_rate: float = 100.0
    """Random-port probes per second from the easy side (paced, never in bursts)."""

    probe_budget: int = 1024
    """Most random-port probes of one attempt (about 10 s at the default rate)."""

    port_range: tuple[int, int] = (1024, 65535)
    """Ports the easy side probes (inclusive): where Linux NATs allocate random ports."""

    spray_interval: float = 5.0
    """The hard side re-sends from every pool socket this often while punching (keeps the
    mappings alive: an unanswered UDP mapping lives 30 s in Linux conntrack)."""

    hard_budget: int = 0
    """Hard x hard: probes per side when both NATs map per destination.  0 (the default) goes
    straight to the relay and says why: success needs about 170,000 probes per side for 99.9%."""

    def __post_init__(self) -> None:
        _require_positive(self, "sockets", "probe_rate", "probe_budget", "spray_interval")
        low, high = self.port_range
        if not 1 <= low <= high <= 65535:
            raise ConfigError(
                "BirthdayConfig.port_range must be 1 <= low <= high <= 65535, "
                f"got {self.port_range!r}"
            )
        if self.sockets > 1024:
            raise ConfigError(f"BirthdayConfig.sockets must be <= 1024, got {self.sockets!r}")
        if self.hard_budget < 0:
            raise ConfigError(f"BirthdayConfig.hard_budget must be >= 0, got {self.hard_budget!r}")
