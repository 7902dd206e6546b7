"""Who may use the worker's page: the token, the Host it is served under, a browser's Origin.

Three checks guard ``/``, ``/status`` and ``/ui_ws`` (everything but ``/health``):

1. **Host** (DNS rebinding): a page at ``http://evil.example:8080/`` whose name the attacker
   later points at 127.0.0.1 is, to the browser, the same origin as the worker, so Origin and
   Host agree.  Only the Host *name* tells it apart, so it must be one the worker serves:
   ``localhost``, a loopback address, the bind address, any IP literal when bound to a wildcard
   address (an IP literal cannot be rebound: the browser's origin is that IP), or a name given
   with ``--ui-allowed-hosts``.  The port is not compared: rebinding is decided by the name, and
   a port forward (``docker run -p 9000:8080``) changes the port the browser shows.
2. **Origin**, when sent, must be the Host's origin (a page of another site or of another port
   on the same machine must not drive the worker).
3. **Token**, as in Jupyter: ``?token=``, ``Authorization: Bearer``, or the cookie the page gets
   when it is opened with ``?token=`` (HttpOnly, SameSite=Strict, named after the port because
   cookies ignore ports).  Compared in constant time.

Refusals say nothing about the worker: 403 for Host/Origin, 401 for the token on HTTP; a
WebSocket is closed (1008) before it is accepted.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from p2plab.core.addresses import is_ip_literal
from p2plab.errors import ConfigError

__all__ = [
    "MIN_UI_TOKEN_LENGTH",
    "UiGuard",
    "UiGuardMiddleware",
    "check_ui_token",
    "new_ui_token",
    "origin_allowed",
    "parse_allowed_hosts",
    "split_host",
]

log = logging.getLogger(__name__)

MIN_UI_TOKEN_LENGTH = 16
"""Shortest ``--ui-token`` accepted: the page has no rate limit on guesses, so a token must be
too long to guess (the generated one has 32 characters, 192 bits)."""

# Unreserved URL characters: the token travels in a query string and a cookie unescaped.
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~-]+")
_HOST_RE = re.compile(r"\.?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?(:[0-9]{1,5})?")
_OPEN_PATHS = frozenset({"/health"})
_LOCAL_NAMES = frozenset({"localhost"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def new_ui_token() -> str:
    """A fresh UI token: 24 random bytes, URL-safe (as Jupyter's), never starting with ``-``
    (one in 64 would, and ``--ui-token -abc...`` reads as a missing value and another flag)."""
    while (token := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return token


def check_ui_token(token: str) -> str:
    """``token`` if it is usable as a UI token, else :class:`ConfigError` (one line)."""
    if len(token) < MIN_UI_TOKEN_LENGTH or not _TOKEN_RE.fullmatch(token):
        raise ConfigError(
            f"--ui-token (or UI_TOKEN) needs at least {MIN_UI_TOKEN_LENGTH} characters of "
            "A-Z a-z 0-9 . _ ~ - (leave it out to have one generated)"
        )
    return token


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``--ui-allowed-hosts``: comma separated ``name``, ``name:port`` or ``.domain`` (the
    domain and every name under it); :class:`ConfigError` names a bad entry."""
    hosts: list[str] = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        name, port = split_host(entry)
        if not _HOST_RE.fullmatch(entry) and not is_ip_literal(name):
            raise ConfigError(
                f"--ui-allowed-hosts (or UI_ALLOWED_HOSTS): {raw.strip()!r} is not a host name "
                "(give names like p2plab-worker-1-abc.a.run.app or .run.app, no scheme or path)"
            )
        if port is not None and not 0 < int(port) < 65536:
            raise ConfigError(f"--ui-allowed-hosts: bad port in {raw.strip()!r}")
        hosts.append(entry)
    return tuple(hosts)


def split_host(host: str) -> tuple[str, str | None]:
    """``("name", "port"|None)`` of a Host header value (``[::1]:80``, ``a.b``, ``1.2.3.4:5``);
    the name lower-cased, without brackets or a trailing dot."""
    host = host.strip().lower()
    port: str | None = None
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return "", None  # malformed: names nothing
        if rest.startswith(":"):
            port = rest[1:]
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name = host  # a bare IPv6 address (no port) or a name
    if name.endswith(".") and not name.startswith("."):
        name = name[:-1]
    return name, port or None


def origin_allowed(origin: str | None, host: str | None) -> bool:
    """Same-origin check: the Origin's host:port must be the Host we serve (no Origin: not a
    browser, or a same-origin navigation, so nothing to compare)."""
    if origin is None:
        return True
    if not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default = "443" if parts.scheme == "https" else "80"
    o_host, o_port = split_host(parts.netloc)
    h_host, h_port = split_host(host)
    return o_host == h_host and (o_port or default) == (h_port or default)


@dataclass(frozen=True)
class UiGuard:
    """The token and the names one worker's page answers to."""

    token: str
    """The UI token (``--ui-token`` or generated)."""
    bind_host: str
    """The address the page's server is bound to."""
    port: int
    """The bound port (names the cookie: browsers share cookies between ports)."""
    allowed_hosts: tuple[str, ...] = ()
    """Extra Host names (``--ui-allowed-hosts``): ``name``, ``name:port`` or ``.domain``."""

    @property
    def cookie_name(self) -> str:
        """The cookie the page keeps the token in."""
        return f"p2plab_ui_{self.port}"

    def host_allowed(self, host: str | None) -> bool:
        """Whether ``host`` (a Host header) names this worker (see the module docstring)."""
        if not host:
            return False
        name, port = split_host(host)
        if name in _LOCAL_NAMES or (name and name == split_host(self.bind_host)[0]):
            return True
        if is_ip_literal(name):
            ip = ipaddress.ip_address(name)
            if ip.is_loopback or self.bind_host in _WILDCARDS:
                return True
            return is_ip_literal(self.bind_host) and ip == ipaddress.ip_address(self.bind_host)
        for entry in self.allowed_hosts:
            e_name, e_port = split_host(entry)
            if e_port is not None and e_port != port:
                continue
            if e_name == name or (e_name.startswith(".") and f".{name}".endswith(e_name)):
                return True
        return False

    def token_matches(self, candidate: str | None) -> bool:
        """Constant-time comparison with the token (bytes: a non-ASCII guess is just wrong)."""
        if not candidate:
            return False
        return hmac.compare_digest(candidate.encode("utf-8"), self.token.encode("utf-8"))

    def presented_tokens(self, conn: HTTPConnection) -> list[str]:
        """The tokens a request carries: Bearer header, ``?token=``, the page's cookie."""
        found: list[str] = []
        scheme, _, value = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            found.append(value.strip())
        if "token" in conn.query_params:
            found.append(conn.query_params["token"])
        cookie = conn.cookies.get(self.cookie_name)
        if cookie:
            found.append(cookie)
        return found

    def refusal(self, conn: HTTPConnection) -> tuple[int, str] | None:
        """None if the request may go on, else ``(HTTP status, reason)``."""
        host = conn.headers.get("host")
        if not self.host_allowed(host):
            return 403, "host not allowed"
        if not origin_allowed(conn.headers.get("origin"), host):
            return 403, "origin not allowed"
        if not any(self.token_matches(t) for t in self.presented_tokens(conn)):
            return 401, "token required"
        return None


_REFUSED_PAGE = (
    "<!doctype html><meta charset=utf-8><title>p2plab worker</title>"
    "<p>This page needs the worker's token. Open the address the worker printed when it "
    "started (<code>http://HOST:PORT/?token=...</code>), or run it with "
    "<code>--ui-token</code> / <code>UI_TOKEN</code> to choose one.</p>"
)


class UiGuardMiddleware:
    """ASGI middleware applying :class:`UiGuard` to every route but ``/health``."""

    def __init__(self, app: ASGIApp, guard: UiGuard) -> None:
        self.app = app
        self.guard = guard
        self.refused = 0
        """Requests and WebSockets refused so far."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        refused = self.guard.refusal(conn)
        if refused is None:
            await self.app(scope, receive, send)
            return
        self.refused += 1
        code, reason = refused
        # Logged at 1, 10, 100, ... refusals: a guesser must not fill the log.  Never the token;
        # of the headers only Host and Origin.
        if _is_power_of_ten(self.refused):
            log.warning(
                "worker UI: refused %s %s (%s; host %r, origin %r); %d refused so far",
                scope["type"],
                scope.get("path"),
                reason,
                conn.headers.get("host"),
                conn.headers.get("origin"),
                self.refused,
            )
        if scope["type"] == "websocket":
            # Closing before accepting: the client sees the handshake refused (HTTP 403), and a
            # browser's page script learns nothing but that it failed.
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        # The page's own address without a token gets a line saying where the token is.
        await _send_refusal(send, code, reason, html=code == 401 and scope.get("path") == "/")


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


async def _send_refusal(send: Send, code: int, reason: str, *, html: bool) -> None:
    body = (_REFUSED_PAGE if html else reason + "\n").encode("utf-8")
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"text/html; charset=utf-8" if html else b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if code == 401:
        headers.append((b"www-authenticate", b'Bearer realm="p2plab worker"'))
    start: dict[str, Any] = {"type": "http.response.start", "status": code, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})
