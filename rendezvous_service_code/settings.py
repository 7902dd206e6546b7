"""The rendezvous's settings: one frozen object, read once from flags and the environment.

``Settings.load(flags, environ)`` is the only place that reads the environment; flags (values
that are not None) win over environment variables (contracts.md).  Every check lives in
``Settings.__post_init__``, so a value from a flag, the environment or Python code gets the same
one-line :class:`~p2plab.errors.ConfigError`.

Environment variables: ``HOST``, ``PORT``, ``STUN_PORT``, ``P2P_TOKEN``, ``P2P_ROOM_TOKENS``
(``room=token,...``), ``ADMIN_TOKEN``, ``REDIS_URL``, ``MAX_WORKERS``, ``P2P_RELAY`` (``0`` turns
the relay off) and ``TRUST_PROXY_HEADERS``.  An empty variable counts as unset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from p2plab.errors import ConfigError

__all__ = ["ENV_VARS", "Settings", "parse_room_tokens"]

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
}

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


def _name(field_name: str) -> str:
    """How an error names a setting: the field and, where there is one, its variable."""
    env = ENV_VARS.get(field_name)
    return f"{field_name} ({env})" if env else field_name


def _from_text(field_name: str, text: str) -> Any:
    """One environment value converted to the field's type (ConfigError naming the variable)."""
    var = ENV_VARS[field_name]
    if field_name in ("port", "stun_port", "max_workers"):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{var} must be an integer, got {text!r}") from None
    if field_name in ("relay", "trust_forwarded"):
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(f"{var} must be one of 1/0, true/false, yes/no, on/off, got {text!r}")
    if field_name == "room_tokens":
        return parse_room_tokens(text)
    return text


@dataclass(frozen=True)
class Settings:
    """Everything the rendezvous service is configured with (see :meth:`load`)."""

    host: str = "0.0.0.0"
    """Address the HTTP/WebSocket server binds (``HOST``)."""
    port: int = 8000
    """HTTP port, 0 for an OS-chosen one (``PORT``)."""
    stun_port: int | None = None
    """UDP port of the embedded STUN server (0: any free port), None for none (``STUN_PORT``)."""
    token: str | None = None
    """Token every ``register`` must carry, unless its room has its own (``P2P_TOKEN``)."""
    room_tokens: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Per-room tokens replacing ``token`` in those rooms (``P2P_ROOM_TOKENS``); read-only."""
    admin_token: str | None = None
    """Bearer token that ``/debug/*`` requires, None for open endpoints (``ADMIN_TOKEN``)."""
    redis_url: str | None = None
    """Redis URL: several instances share state through it; None keeps it in memory."""
    redis_heartbeat_s: float = 2.0
    """How often an instance refreshes its liveness key in Redis."""
    redis_ttl_s: float = 10.0
    """How long an instance's workers outlive its last heartbeat in Redis."""
    max_workers: int = 20000
    """Connections held at once; more are closed with 1013 (``MAX_WORKERS``)."""
    trust_forwarded: bool = False
    """Take the observed address from X-Forwarded-For (``TRUST_PROXY_HEADERS``)."""
    relay: bool = True
    """Relay datagrams between the two workers of a pair that cannot punch (``P2P_RELAY``)."""
    relay_bytes_per_s: float = 32 * 1024
    """Relayed bytes (decoded) one connection may send per second."""
    relay_burst_bytes: float = 128 * 1024
    """Relayed bytes one connection may send in a burst."""
    rate_limit_per_s: float = 50.0
    """Messages one connection may send per second; excess is dropped."""
    rate_limit_burst: float = 100.0
    """Messages one connection may send in a burst."""
    abuse_threshold: float = 500.0
    """Dropped messages beyond the rate after which a connection is closed (1008)."""
    register_timeout_s: float = 30.0
    """Time a new connection has to send ``register`` before it is closed."""
    stun_rate_per_s: float | None = 20.0
    """Answers per second the embedded STUN server gives one source IP after its burst; None:
    no limit (checked when the STUN server starts)."""
    stun_burst: float = 40.0
    """Answers the embedded STUN server gives one source IP at once."""

    def __post_init__(self) -> None:
        # The same checks whether a value came from a flag, the environment or Python code.
        object.__setattr__(self, "room_tokens", dict(self.room_tokens))
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{_name('port')} must be in 0..65535, got {self.port}")
        if self.stun_port is not None and not 0 <= self.stun_port <= 65535:
            raise ConfigError(f"{_name('stun_port')} must be in 0..65535, got {self.stun_port}")
        if self.max_workers < 1:
            raise ConfigError(f"{_name('max_workers')} must be >= 1, got {self.max_workers}")
        for name in (
            "redis_heartbeat_s",
            "redis_ttl_s",
            "relay_bytes_per_s",
            "relay_burst_bytes",
            "rate_limit_per_s",
            "rate_limit_burst",
            "abuse_threshold",
            "register_timeout_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")

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
