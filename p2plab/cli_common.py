"""What the ``p2plab`` subcommands share (``p2plab.cli``, ``bench``, ``lab``): checked arguments,
one-line errors, free-port checks and waiting for the rendezvous.

Every value is checked when the command line is parsed, before anything touches the network: a
mistake is one line on stderr (``p2plab <cmd>: error: ...``) and exit status 2, as argparse does
for its own errors.  A port that is already taken is reported the same way (:func:`check_free`),
naming the protocol and the port.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from p2plab.core.addresses import is_ip_literal
from p2plab.core.bench import MAX_PAYLOAD, MIN_PAYLOAD

__all__ = [
    "USAGE_ERROR",
    "CliParser",
    "HelpFormatter",
    "check_free",
    "env_value",
    "fail",
    "fraction",
    "hostport",
    "non_negative_float",
    "payload_size",
    "payload_sizes",
    "port",
    "port_error",
    "port_or_zero",
    "positive_float",
    "positive_int",
    "rendezvous_url",
    "wait_registered",
]

USAGE_ERROR = 2
"""Exit status of a command line that cannot be used as given (bad value, port in use)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after an option's help unless the help already names its default
    (defaults read from the environment say so in words) or there is nothing to show (flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is False:
            return text
        return super()._get_help_string(action)


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``p2plab <cmd>: error: ...`` (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argparse ``type=`` functions --------------------------------------------------------------


def _number(text: str, kind: Callable[[str], Any], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def port(text: str) -> int:
    """A port, 1..65535."""
    value = _number(text, int, "a port number")
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return int(value)


def port_or_zero(text: str) -> int:
    """A port, or 0 for one the OS picks."""
    value = _number(text, int, "a port number")
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"port must be 0..65535 (0: any free port), got {value}")
    return int(value)


def positive_float(text: str) -> float:
    value = float(_number(text, float, "a number"))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(_number(text, float, "a number"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A fraction, 0..1 (a loss probability)."""
    value = float(_number(text, float, "a fraction 0..1"))
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction 0..1, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int, "a whole number"))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(_number(text, int, "a whole number"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def on_off(text: str) -> bool:
    """A switch from the environment: 1/0, true/false, yes/no, on/off."""
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def payload_size(text: str) -> int:
    """A UDP payload size the benchmark can send (64..65507 bytes)."""
    value = int(_number(text, int, "a payload size in bytes"))
    if not MIN_PAYLOAD <= value <= MAX_PAYLOAD:
        raise argparse.ArgumentTypeError(
            f"payload size must be {MIN_PAYLOAD}..{MAX_PAYLOAD} bytes, got {value}"
        )
    return value


def payload_sizes(text: str) -> list[int]:
    """Comma-separated payload sizes (``--sweep 64,1200,8000``)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected sizes such as 64,1200,8000, got {text!r}")
    return [payload_size(s) for s in items]


def hostport(text: str) -> str:
    """``host:port`` (``[v6]:port`` too)."""
    host, sep, number = text.rpartition(":")
    if not sep or not host or not number.isdigit() or not 0 < int(number) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return text


def rendezvous_url(text: str) -> str:
    """``ws://``/``wss://`` URL of a rendezvous; ``http://``/``https://`` are accepted and mean
    the same service (the worker maps them to ``ws://``/``wss://``)."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("ws", "wss", "http", "https"):
        raise argparse.ArgumentTypeError(
            f"expected ws://HOST:PORT (or wss://, http://, https://), got {text!r}"
        )
    netloc = rest.split("/", 1)[0]
    if netloc.startswith("["):  # an IPv6 literal: ws://[::1]:8000 (or ws://[::1])
        host, bracket, after = netloc[1:].partition("]")
        colon, number = after[:1], after[1:]
        if not bracket or not is_ip_literal(host) or (after and colon != ":"):
            raise argparse.ArgumentTypeError(f"expected ws://[IPV6]:PORT, got {text!r}")
    else:
        host, colon, number = netloc.rpartition(":")
    if not netloc or (colon and (not host or not number.isdigit() or not 0 < int(number) < 65536)):
        raise argparse.ArgumentTypeError(f"expected ws://HOST:PORT, got {text!r}")
    return text


# -- environment and ports ---------------------------------------------------------------------


def env_value(
    parser: argparse.ArgumentParser, name: str, convert: Callable[[str], Any] = str
) -> Any:
    """The environment variable ``name`` checked with ``convert`` (None when unset or empty);
    a bad value is a usage error naming the variable."""
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return convert(raw)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"environment variable {name}: {exc}")


def check_free(parser: argparse.ArgumentParser, binds: Sequence[tuple[str, str, str, int]]) -> None:
    """Exit with one line when a port of ``binds`` (``(what, "TCP"|"UDP", host, port)``) is
    taken: the servers would fail later with a traceback ending in ``[Errno 98]``.  Binding a
    socket here only asks the local kernel; nothing is sent."""
    for what, proto, host, number in binds:
        if not number:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:  # as the servers do: a TIME_WAIT port is usable
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, number))
            except OSError as exc:
                parser.error(port_error(what, proto, host, number, exc))


def port_error(what: str, proto: str, host: str, number: int, exc: OSError) -> str:
    """One line for a failed bind of ``what`` on ``proto`` ``host:port``."""
    if exc.errno == errno.EADDRINUSE:
        reason = "is already in use (another p2plab or service?); pick another with its flag"
    elif exc.errno == errno.EACCES:
        reason = "needs privileges (ports below 1024); pick one above 1023"
    else:
        reason = f"cannot be bound: {exc.strerror or exc}"
    return f"{what} {proto} port {number} on {host} {reason}"


def fail(prog: str, message: str, status: int = 1) -> int:
    """Print ``prog: error: message`` on stderr; returns ``status`` (for ``return fail(...)``)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return status


#: Worker states reached once the rendezvous has answered ``register`` (or refused us).
_REGISTERED = ("discovering", "waiting_for_peer", "punching", "connected", "relayed", "stopped")


async def wait_registered(worker: Any, url: str, timeout: float) -> str | None:
    """Wait until ``worker`` is registered with the rendezvous at ``url``; returns None, or why
    not (never reached within ``timeout`` seconds, 0: no limit; or refused) as one sentence."""
    import asyncio

    try:
        state = await worker.wait_for_state(*_REGISTERED, timeout=timeout or None)
    except TimeoutError:
        return (
            f"could not reach the rendezvous at {url} within {timeout:g} s (--connect-timeout); "
            "is it running, and is the address right?"
        )
    if state == "stopped":
        await asyncio.sleep(0)
        return f"the rendezvous at {url} refused this worker: {worker.error or 'no reason given'}"
    return None
