"""TURN server addresses and coturn's REST credentials, shared by the rendezvous and the worker.

The rendezvous holds the shared secret of coturn's ``use-auth-secret`` mode and hands each paired
worker a username and password that coturn can check without any database: the username is
``"<unix expiry>:<worker id>"`` and the password is base64(HMAC-SHA1(secret, username))
(coturn's "TURN REST API", draft-uberti-behave-turn-rest-00).  So the credentials expire by
themselves and name the worker they were made for; the secret never leaves the rendezvous.

A TURN server is given as a URL of RFC 7065: ``turn:host[:port][?transport=udp|tcp]``.  ``turns:``
(TLS) is refused for now with a clear error.  Host names are kept as text: nothing here
resolves them (the core does no I/O); the worker resolves them without blocking its loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Literal

from p2plab.errors import ConfigError

__all__ = [
    "DEFAULT_TURN_PORT",
    "DEFAULT_TURN_TTL_S",
    "MAX_TURN_URL_LENGTH",
    "TurnServer",
    "parse_turn_url",
    "turn_credentials",
]

#: The TURN port over UDP and TCP (RFC 8656 section 4).
DEFAULT_TURN_PORT = 3478
#: How long handed-out credentials stay valid for a new allocation.  Ten minutes: long enough
#: for a worker to allocate after the offer even when punching takes its whole budget first (tens
#: of seconds); short enough that leaked credentials are of little use.  It does not cut a relayed
#: session short: coturn checks the expiry when an allocation is made and then keeps refreshing it
#: with the key of that session (tests/aio/test_turn_coturn.py shows a refresh after expiry).
DEFAULT_TURN_TTL_S = 600.0
#: Longest TURN URL accepted (in settings and in offers).
MAX_TURN_URL_LENGTH = 256

Transport = Literal["udp", "tcp"]


@dataclass(frozen=True)
class TurnServer:
    """One TURN server from a ``turn:`` URL."""

    host: str
    """An IP literal or a host name (not resolved here); IPv6 without brackets."""
    port: int
    """The server's port (3478 when the URL gives none)."""
    transport: Transport
    """``"udp"`` or ``"tcp"`` (RFC 7065's ``?transport=``; UDP when absent)."""

    @property
    def url(self) -> str:
        """The URL in its canonical form (``turn:host:port?transport=...``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"turn:{host}:{self.port}?transport={self.transport}"


def _bad(url: str, why: str) -> ConfigError:
    return ConfigError(f"bad TURN URL {url[:80]!r}: {why}")


def parse_turn_url(url: str) -> TurnServer:
    """``turn:host[:port][?transport=udp|tcp]`` to a :class:`TurnServer`.

    Raises :class:`~p2plab.errors.ConfigError` (one line saying what is wrong) for anything
    else, ``turns:`` included (TLS is not supported yet).
    """
    if not isinstance(url, str):
        raise ConfigError(f"bad TURN URL {url!r}: expected text")
    text = url.strip()
    if len(text) > MAX_TURN_URL_LENGTH:
        raise _bad(url, f"longer than {MAX_TURN_URL_LENGTH} characters")
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise _bad(url, "expected 'turn:host:port'")
    if scheme.lower() == "turns":
        raise _bad(url, "turns: (TURN over TLS) is not supported yet; use turn:")
    if scheme.lower() != "turn":
        raise _bad(url, f"scheme {scheme!r} is not turn:")
    rest, qsep, query = rest.partition("?")
    transport: Transport = "udp"
    if qsep:
        key, eq, value = query.partition("=")
        if key != "transport" or not eq or value.lower() not in ("udp", "tcp"):
            raise _bad(url, "the only query allowed is ?transport=udp or ?transport=tcp")
        transport = "tcp" if value.lower() == "tcp" else "udp"
    port_text: str | None = None
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise _bad(url, "missing ']' after the IPv6 address")
        host = rest[1:close]
        tail = rest[close + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise _bad(url, "expected ':port' after ']'")
            port_text = tail[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(url, f"{host[:64]!r} is not an IPv6 address") from None
    else:
        host, psep, port_part = rest.partition(":")
        if psep:
            port_text = port_part
        if ":" in port_part:
            raise _bad(url, "an IPv6 address must be in brackets")
    if not host or not all(c.isalnum() or c in ".-_" for c in host.replace(":", "")):
        raise _bad(url, "expected a host name or an IP address")
    if port_text is None:
        return TurnServer(host, DEFAULT_TURN_PORT, transport)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _bad(url, f"port {port_text[:16]!r} is not a number from 1 to 65535")
    return TurnServer(host, int(port_text), transport)


def turn_credentials(
    secret: str, worker_id: str, now: float, ttl_s: float = DEFAULT_TURN_TTL_S
) -> tuple[str, str]:
    """``(username, password)`` in coturn's REST form for ``worker_id``, valid until
    ``now + ttl_s`` (``now`` is Unix time: coturn compares the expiry with its own clock)."""
    if not secret:
        raise ConfigError("the TURN secret is empty")
    if not ttl_s > 0:
        raise ConfigError(f"TURN credential lifetime must be > 0, got {ttl_s!r}")
    if not worker_id or ":" in worker_id:
        # coturn splits the username at its first ':'; a worker id with one would name another.
        raise ConfigError(f"bad worker id for TURN credentials: {worker_id[:64]!r}")
    username = f"{int(now + ttl_s)}:{worker_id}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")
