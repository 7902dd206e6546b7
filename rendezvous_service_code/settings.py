"""The rendezvous's settings: one frozen object, read once from flags and the environment.

``Settings.load(flags, environ)`` is the only place that reads the environment; flags (values
that are not None) win over environment variables (contracts.md).  Every check lives in
``Settings.__post_init__``, so a value from a flag, the environment or Python code gets the same
one-line :class:`~p2plab.errors.ConfigError`.

Environment variables: :data:`ENV_VARS` (``HOST``, ``PORT``, ``P2P_TOKEN``, ``P2P_OPEN``, the
limits...).  An empty variable counts as unset.

Closed unless opened on purpose: on an address other than loopback the service refuses to start
without a token (``P2P_TOKEN`` or ``P2P_ROOM_TOKENS``) unless ``P2P_OPEN=1`` says that anyone may
register on purpose (:func:`check_exposure`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from p2plab.core.signaling import MAX_TURN_URLS
from p2plab.core.turn_config import DEFAULT_TURN_TTL_S, parse_turn_url
from p2plab.errors import ConfigError

__all__ = [
    "ENV_VARS",
    "LIMIT_FLAGS",
    "Settings",
    "check_exposure",
    "exposure_warning",
    "is_loopback",
    "limit_flag_help",
    "parse_room_tokens",
    "parse_turn_urls",
]

#: Settings field -> the environment variable that sets it.
ENV_VARS: Mapping[str, str] = {
    "host": "HOST",
    "port": "PORT",
    "stun_port": "STUN_PORT",
    "token": "P2P_TOKEN",
    "room_tokens": "P2P_ROOM_TOKENS",
    "admin_token": "ADMIN_TOKEN",
    "redis_url": "REDIS_URL",
    "max_workers": "MAX_WORKERS",
    "relay": "P2P_RELAY",
    "trust_forwarded": "TRUST_PROXY_HEADERS",
    "open": "P2P_OPEN",
    "max_connections_per_ip": "MAX_CONNECTIONS_PER_IP",
    "connections_per_ip_per_min": "CONNECTIONS_PER_IP_PER_MIN",
    "token_failures_per_ip_per_min": "TOKEN_FAILURES_PER_IP_PER_MIN",
    "register_timeout_s": "REGISTER_TIMEOUT_S",
    "relay_bytes_per_s": "RELAY_BYTES_PER_S",
    "relay_ip_bytes_per_s": "RELAY_BYTES_PER_IP_PER_S",
    "relay_total_bytes_per_s": "RELAY_BYTES_TOTAL_PER_S",
    "turn_urls": "TURN_URLS",
    "turn_secret": "TURN_SECRET",
    "turn_ttl_s": "TURN_TTL_S",
}
_INTS = frozenset({"port", "stun_port", "max_workers", "max_connections_per_ip"})
_FLOATS = frozenset(
    {
        "connections_per_ip_per_min",
        "token_failures_per_ip_per_min",
        "register_timeout_s",
        "relay_bytes_per_s",
        "relay_ip_bytes_per_s",
        "relay_total_bytes_per_s",
        "turn_ttl_s",
    }
)
_BOOLS = frozenset({"relay", "trust_forwarded", "open"})

#: The limits ``p2plab rendezvous`` takes as flags: (field, flag, type, what it bounds).
LIMIT_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("max_connections_per_ip", "--max-connections-per-ip", int, "connections held per IP"),
    (
        "connections_per_ip_per_min",
        "--connections-per-ip-per-min",
        float,
        "new connections (so registrations) per IP per minute",
    ),
    (
        "token_failures_per_ip_per_min",
        "--token-failures-per-ip-per-min",
        float,
        "refused tokens per IP per minute, then its connections get 1013",
    ),
    ("register_timeout_s", "--register-timeout", float, "seconds a connection has to register"),
    ("relay_bytes_per_s", "--relay-bytes-per-s", float, "relayed bytes/s per connection"),
    ("relay_ip_bytes_per_s", "--relay-bytes-per-ip", float, "relayed bytes/s per IP"),
    ("relay_total_bytes_per_s", "--relay-bytes-total", float, "relayed bytes/s in all"),
)


def limit_flag_help(field_name: str) -> str:
    """The help of one of :data:`LIMIT_FLAGS`: what it bounds, its variable and default."""
    what = next(w for name, _flag, _kind, w in LIMIT_FLAGS if name == field_name)
    default = next(f.default for f in fields(Settings) if f.name == field_name)
    shown = int(default) if isinstance(default, float) and default.is_integer() else default
    return f"{what} (env {ENV_VARS[field_name]}; default: {shown})"


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_room_tokens(text: str) -> dict[str, str]:
    """``{room: token}`` from ``"room=token,room2=token2"`` (items without both halves skipped)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        room, sep, tok = item.strip().partition("=")
        if sep and room and tok:
            out[room] = tok
    return out


def parse_turn_urls(text: str) -> tuple[str, ...]:
    """``("turn:a:3478", ...)`` from ``"turn:a:3478,turn:b:3478?transport=tcp"`` (empty items
    skipped; each URL is checked by :class:`Settings`)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name, or "" (every address): not loopback


def check_exposure(host: str, settings: Settings) -> None:
    """Refuse (ConfigError, one line) to serve ``host`` beyond loopback with no token at all,
    unless ``settings.open`` says so on purpose (issue 14: closed unless opened on purpose)."""
    if is_loopback(host) or settings.token or settings.room_tokens or settings.open:
        return
    raise ConfigError(
        f"refusing to serve {host or '*'} without a token: anyone who reaches it could register, "
        "pair with your workers and use the relay; set --token (P2P_TOKEN) or --room-tokens "
        "(P2P_ROOM_TOKENS), bind --host 127.0.0.1, or pass --open (P2P_OPEN=1) to run open on "
        "purpose"
    )


def exposure_warning(host: str, settings: Settings) -> str | None:
    """The one warning line for a rendezvous open on purpose beyond loopback, else None."""
    if is_loopback(host) or settings.token or settings.room_tokens:
        return None
    return (
        f"OPEN rendezvous on {host or '*'} (--open): anyone who reaches it can register, pair "
        "with your workers and use the relay"
    )


def _name(field_name: str) -> str:
    """How an error names a setting: the field and, where there is one, its variable."""
    env = ENV_VARS.get(field_name)
    return f"{field_name} ({env})" if env else field_name


def _from_text(field_name: str, text: str) -> Any:
    """One environment value converted to the field's type (ConfigError naming the variable)."""
    var = ENV_VARS[field_name]
    if field_name in _INTS:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{var} must be an integer, got {text!r}") from None
    if field_name in _FLOATS:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{var} must be a number, got {text!r}") from None
    if field_name in _BOOLS:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(f"{var} must be one of 1/0, true/false, yes/no, on/off, got {text!r}")
    if field_name == "room_tokens":
        return parse_room_tokens(text)
    if field_name == "turn_urls":
        return parse_turn_urls(text)
    return text


@dataclass(frozen=True)
class Settings:
    """Everything the rendezvous service is configured with (see :meth:`load`)."""

    host: str = "127.0.0.1"
    """Address the HTTP/WebSocket server binds (``HOST``); beyond loopback it needs a token or
    ``open`` (:func:`check_exposure`)."""
    port: int = 8000
    """HTTP port, 0 for an OS-chosen one (``PORT``)."""
    stun_port: int | None = None
    """UDP port of the embedded STUN server (0: any free port), None for none (``STUN_PORT``)."""
    token: str | None = None
    """Token every ``register`` must carry, unless its room has its own (``P2P_TOKEN``)."""
    room_tokens: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Per-room tokens replacing ``token`` in those rooms (``P2P_ROOM_TOKENS``); read-only."""
    admin_token: str | None = None
    """Bearer token that ``/debug/*`` requires; without one they answer 404 (``ADMIN_TOKEN``)."""
    open: bool = False
    """Serve beyond loopback without any token, on purpose (``P2P_OPEN``): anyone may register."""
    redis_url: str | None = None
    """Redis URL: several instances share state through it; None keeps it in memory."""
    redis_heartbeat_s: float = 2.0
    """How often an instance refreshes its liveness key in Redis."""
    redis_ttl_s: float = 10.0
    """How long an instance's workers outlive its last heartbeat in Redis."""
    max_workers: int = 10000
    """Connections held at once; more are closed with 1013 (``MAX_WORKERS``).  An idle
    registered connection costs about 40 KiB (docs/deploy.md): 10,000 fit in 512 MiB."""
    max_connections_per_ip: int = 20
    """Connections one source IP (an IPv6 /64) holds at once; more get 1013
    (``MAX_CONNECTIONS_PER_IP``)."""
    connections_per_ip_per_min: float = 60.0
    """New connections, hence registrations, one source IP may open per minute (a burst of as
    many, then one per 60/N s); more get 1013 (``CONNECTIONS_PER_IP_PER_MIN``)."""
    token_failures_per_ip_per_min: float = 5.0
    """Refused tokens one source IP may try per minute; beyond that its new connections get
    1013 until the allowance refills (``TOKEN_FAILURES_PER_IP_PER_MIN``)."""
    trust_forwarded: bool = False
    """Take the observed address from X-Forwarded-For (``TRUST_PROXY_HEADERS``)."""
    relay: bool = True
    """Relay datagrams between the two workers of a pair that cannot punch (``P2P_RELAY``)."""
    relay_bytes_per_s: float = 32 * 1024
    """Relayed bytes (decoded) one connection may send per second (``RELAY_BYTES_PER_S``)."""
    relay_burst_bytes: float = 128 * 1024
    """Relayed bytes one connection may send in a burst."""
    relay_ip_bytes_per_s: float = 64 * 1024
    """Relayed bytes all connections of one source IP may send per second, burst 4 s of it
    (``RELAY_BYTES_PER_IP_PER_S``)."""
    relay_total_bytes_per_s: float = 2 * 1024 * 1024
    """Relayed bytes the whole instance passes on per second, burst 4 s of it
    (``RELAY_BYTES_TOTAL_PER_S``)."""
    rate_limit_per_s: float = 50.0
    """Messages one connection may send per second; excess is dropped."""
    rate_limit_burst: float = 100.0
    """Messages one connection may send in a burst."""
    abuse_threshold: float = 500.0
    """Dropped messages beyond the rate after which a connection is closed (1008)."""
    register_timeout_s: float = 10.0
    """Time a new connection has to send ``register`` before it is closed (1008)
    (``REGISTER_TIMEOUT_S``)."""
    stun_rate_per_s: float | None = 20.0
    """Answers per second the embedded STUN server gives one source IP after its burst; None:
    no limit (checked when the STUN server starts)."""
    stun_burst: float = 40.0
    """Answers the embedded STUN server gives one source IP at once."""
    turn_urls: tuple[str, ...] = ()
    """TURN servers (``turn:host:port?transport=udp|tcp``, at most 4) whose short-lived
    credentials every offer carries for the worker it goes to (``TURN_URLS``, comma-separated);
    empty: no TURN."""
    turn_secret: str | None = field(default=None, repr=False)
    """The secret shared with coturn's ``use-auth-secret`` (``TURN_SECRET``); required with
    ``turn_urls``.  Never sent to anyone: workers get credentials made with it."""
    turn_ttl_s: float = DEFAULT_TURN_TTL_S
    """Seconds the handed-out credentials allow new allocations (``TURN_TTL_S``); an allocation
    made in time keeps refreshing after that (see :mod:`p2plab.core.turn_config`)."""

    def __post_init__(self) -> None:
        # The same checks whether a value came from a flag, the environment or Python code.
        object.__setattr__(self, "room_tokens", dict(self.room_tokens))
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{_name('port')} must be in 0..65535, got {self.port}")
        if self.stun_port is not None and not 0 <= self.stun_port <= 65535:
            raise ConfigError(f"{_name('stun_port')} must be in 0..65535, got {self.stun_port}")
        for name in ("max_workers", "max_connections_per_ip"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_name(name)} must be >= 1, got {getattr(self, name)}")
        for name in (
            "redis_heartbeat_s",
            "redis_ttl_s",
            "relay_bytes_per_s",
            "relay_burst_bytes",
            "rate_limit_per_s",
            "rate_limit_burst",
            "abuse_threshold",
            "register_timeout_s",
            "connections_per_ip_per_min",
            "token_failures_per_ip_per_min",
            "relay_ip_bytes_per_s",
            "relay_total_bytes_per_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{_name(name)} must be > 0, got {value}")
        self._check_turn()
        check_exposure(self.host, self)

    def _check_turn(self) -> None:
        urls = self.turn_urls
        if isinstance(urls, str):  # a flag's raw text, or Python code passing one string
            urls = parse_turn_urls(urls)
        object.__setattr__(self, "turn_urls", tuple(urls))
        if len(self.turn_urls) > MAX_TURN_URLS:
            raise ConfigError(
                f"{_name('turn_urls')} takes at most {MAX_TURN_URLS} URLs, "
                f"got {len(self.turn_urls)}"
            )
        for url in self.turn_urls:
            parse_turn_url(url)  # ConfigError, one line naming the URL
        if self.turn_urls and not self.turn_secret:
            raise ConfigError(
                "TURN servers given (--turn / TURN_URLS) without a secret: set --turn-secret "
                "(TURN_SECRET), the static-auth-secret of coturn's use-auth-secret"
            )
        if self.turn_secret and not self.turn_urls:
            raise ConfigError(
                "a TURN secret given (--turn-secret / TURN_SECRET) without TURN servers: set "
                "--turn (TURN_URLS)"
            )
        if not 0 < self.turn_ttl_s <= 86400:
            raise ConfigError(f"{_name('turn_ttl_s')} must be in (0, 86400], got {self.turn_ttl_s}")

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Settings from ``environ`` (default ``os.environ``) overlaid with ``flags``.

        ``flags`` maps field names to values; None means "not given" (the environment or the
        default applies).  Raises ConfigError, one line naming the setting, for a bad value.
        """
        env = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            text = env.get(var, "")
            if text.strip():
                values[name] = _from_text(name, text)
        for name, value in (flags or {}).items():
            if name not in known:
                raise ConfigError(f"unknown rendezvous setting {name!r}")
            if value is not None:
                values[name] = value
        return cls(**values)
