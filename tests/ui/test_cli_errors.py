"""The command line as a newcomer meets it (issue 15): mistakes are one line and exit 2, taken
ports are named, an unreachable rendezvous is a warning then an error, every option says its
default, ``probe`` reads as sentences and ``demo`` ends with the two addresses."""

from __future__ import annotations

import argparse
import itertools
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from p2plab.cli import build_parser, main
from tests.procs import free_port, start_rendezvous


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2plab", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_usage_error(res: subprocess.CompletedProcess[str], cmd: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1, res.stderr  # no traceback, no log lines: nothing ran
    assert lines[0].startswith(f"p2plab {cmd}: error: "), lines[0]
    return lines[0]


RV = "ws://127.0.0.1:9"  # never contacted: every case fails while parsing


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["bench", "--rendezvous", RV, "--size", "10"], {}, "64..65507 bytes, got 10"),
        (["bench", "--rendezvous", RV, "--size", "70000"], {}, "got 70000"),
        (["bench", "--rendezvous", RV, "--duration", "-1"], {}, "--duration: must be > 0"),
        (["bench", "--rendezvous", RV, "--sweep", "100,abc"], {}, "got 'abc'"),
        (["bench", "--rendezvous", RV, "--sweep", "100,20"], {}, "got 20"),
        (["bench", "--rendezvous", RV, "--rate", "-5"], {}, "--rate: must be >= 0"),
        (["bench", "--rendezvous", RV, "--stun", "nohostport"], {}, "expected host:port"),
        (["bench", "--rendezvous", "127.0.0.1:8000"], {}, "expected ws://HOST:PORT"),
        (["demo", "--http-port", "70000"], {}, "--http-port: port must be 0..65535"),
        (["worker"], {"PORT": "abc", "RENDEZVOUS_URL": RV}, "environment variable PORT"),
        (["worker"], {"RENDEZVOUS_URL": "127.0.0.1:8000"}, "RENDEZVOUS_URL: expected ws://"),
        (["worker", "--rendezvous", RV, "--stun", "a:1,b"], {}, "expected host:port, got 'b'"),
        (["worker", "--rendezvous", "ftp://h:1"], {}, "expected ws://HOST:PORT"),
        (["worker", "--rendezvous", RV, "--peer-key", "nope"], {}, "--peer-key must be a base64"),
        (["worker", "--rendezvous", RV], {"P2P_PEER_KEY": "ab" * 31}, "64-hex-digit fingerprint"),
        (["worker", "--rendezvous", RV, "--peer-key", "A" * 43 + "="], {}, "low-order point"),
        (["worker", "--rendezvous", "ws://h:99999"], {}, "expected ws://HOST:PORT"),
        (["worker", "--rendezvous", RV, "--stun", "nohostport"], {}, "expected host:port"),
        (["worker"], {}, "--rendezvous ws://HOST:PORT (or RENDEZVOUS_URL) is needed"),
        (["worker", "--rendezvous", RV, "--keepalive", "-1"], {}, "--keepalive: must be > 0"),
        (["worker", "--rendezvous", RV], {"PORT": "eighty"}, "PORT: expected a port number"),
        (["probe"], {}, "give a STUN server with --stun HOST:PORT"),
        (["worker", "--rendezvous", RV, "--birthday-sockets", "0"], {}, "must be > 0, got 0"),
        (["worker", "--rendezvous", RV, "--birthday-sockets", "2000"], {}, "1..1024, got 2000"),
        (["worker", "--rendezvous", RV, "--hard-nat-budget", "-1"], {}, "must be >= 0, got -1"),
        (["worker", "--rendezvous", RV, "--hard-nat-budget", "1e9"], {}, "a whole number"),
        (["worker", "--rendezvous", RV], {"P2P_BIRTHDAY": "maybe"}, "P2P_BIRTHDAY: expected 1/0"),
        (
            ["worker", "--rendezvous", RV],
            {"P2P_BIRTHDAY_SOCKETS": "5000"},
            "SOCKETS: must be 1..1024",
        ),
        (["worker", "--rendezvous", RV], {"P2P_HARD_NAT_BUDGET": "lots"}, "P2P_HARD_NAT_BUDGET"),
        (["worker", "--rendezvous", RV, "--ui-token", "short"], {}, "UI_TOKEN) needs at least 16"),
        (["worker", "--rendezvous", RV], {"UI_TOKEN": "semi;colon-0123456789"}, "--ui-token"),
        (
            ["worker", "--rendezvous", RV, "--ui-allowed-hosts", "https://w.run.app"],
            {},
            "'https://w.run.app' is not a host",
        ),
        (["worker", "--rendezvous", RV], {"UI_ALLOWED_HOSTS": "a.b,b/c"}, "'b/c' is not a host"),
        (["rendezvous", "--port", "http"], {}, "--port: expected a port number"),
        (["stun-server", "--port", "-1"], {}, "--port: port must be 0..65535"),
        (["stun-server", "--burst", "0"], {}, "--burst: must be > 0"),
        (["stun-server", "--rate", "-1"], {}, "--rate: must be >= 0"),
        (["lab", "up", "--loss-a", "2"], {}, "must be a fraction 0..1"),
    ],
)
def test_a_mistake_is_one_line_and_exit_2(
    args: list[str],
    env: dict[str, str],
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In this process (main() as the console script calls it): every case fails while the
    # command line is checked, so nothing else runs; the real process is checked below.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    res = subprocess.CompletedProcess(args, exited.value.code, "", capsys.readouterr().err)
    command = " ".join(itertools.takewhile(lambda a: not a.startswith("-"), args))
    assert says in assert_one_line_usage_error(res, command)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["bench", "--rendezvous", RV, "--size", "10"], {}, "64..65507 bytes, got 10"),
        (["worker"], {"PORT": "abc", "RENDEZVOUS_URL": RV}, "environment variable PORT"),
    ],
)
def test_a_mistake_in_a_real_process_is_one_line_too(
    args: list[str], env: dict[str, str], says: str
) -> None:
    command = " ".join(itertools.takewhile(lambda a: not a.startswith("-"), args))
    assert says in assert_one_line_usage_error(run(*args, env=env), command)


@pytest.fixture
def taken_ports() -> Iterator[tuple[int, int]]:
    """A TCP port with a listener and a UDP port with a bound socket, on loopback."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        yield tcp.getsockname()[1], udp.getsockname()[1]
    finally:
        tcp.close()
        udp.close()


def test_a_port_in_use_names_the_protocol_and_the_port(
    taken_ports: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    tcp, udp = taken_ports
    free_tcp = str(free_port())
    cases = [
        (
            ["rendezvous", "--host", "127.0.0.1", "--port", str(tcp)],
            f"HTTP (--port) TCP port {tcp}",
        ),
        (
            ["rendezvous", "--host", "127.0.0.1", "--port", free_tcp, "--stun-port", str(udp)],
            f"STUN (--stun-port) UDP port {udp}",
        ),
        (["stun-server", "--host", "127.0.0.1", "--port", str(udp)], f"UDP port {udp}"),
        (
            ["worker", "--rendezvous", RV, "--http-host", "127.0.0.1", "--http-port", str(tcp)],
            f"HTTP (UI, --http-port) TCP port {tcp}",
        ),
        (
            ["worker", "--rendezvous", RV, "--http-port", "0", "--udp-port", str(udp)],
            f"UDP (peer traffic, --udp-port) UDP port {udp}",
        ),
        (["bench", "--rendezvous", RV, "--udp-port", str(udp)], f"UDP port {udp}"),
    ]
    for args, says in cases:  # in this process: the ports are checked before anything starts
        with pytest.raises(SystemExit) as exited:
            main(args)
        res = subprocess.CompletedProcess(args, exited.value.code, "", capsys.readouterr().err)
        line = assert_one_line_usage_error(res, args[0])
        assert says in line and "already in use" in line, line


def test_an_unreachable_rendezvous_warns_once_then_fails_clearly() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # http:// is accepted: it means ws://
    res = run("worker", "--rendezvous", url, "--http-port", "0", "--connect-timeout", "1.5")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if " WARNING p2plab.aio.rendezvous" in ln]
    assert len(warnings) == 1, res.stderr  # the retries after the first are routine (INFO)
    assert "unavailable" in warnings[0] and "Connection refused" in warnings[0]
    assert res.stderr.strip().splitlines()[-1] == (
        f"p2plab worker: error: could not reach the rendezvous at {url} within 1.5 s "
        "(--connect-timeout); is it running, and is the address right?"
    )


def test_bench_alone_says_what_it_waits_for_and_how_to_start_the_peer() -> None:
    rv, port, _ = start_rendezvous()
    try:
        url = f"ws://127.0.0.1:{port}"
        res = run("bench", "--rendezvous", url, "--room", "lab1", "--connect-timeout", "2")
    finally:
        rv.stop()
    assert res.returncode == 1, res.stderr
    assert f"waiting for a peer in room 'lab1' on {url}" in res.stderr
    assert f"p2plab bench --rendezvous {url} --room lab1" in res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith("p2plab bench: error: no peer connected in room 'lab1' within 2 s")
    )


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_has_a_help_line_that_shows_its_default() -> None:
    parser = build_parser()
    seen = 0
    for path, action in _walk(parser, "p2plab"):
        seen += 1
        name = f"{path} {'/'.join(action.option_strings) or action.dest}"
        assert action.help, f"{name} has no help"
        if action.nargs == 0 or action.required:  # a flag, or an option without default
            continue
        # what `--help` prints for it (the formatter adds "(default: X)" where it is missing)
        shown = parser._get_formatter()._get_help_string(action) or ""
        assert "default" in shown.lower(), f"{name} does not show its default: {shown!r}"
    assert seen > 60  # every subcommand was walked (bench, lab's subcommands, ...)
    res = run("bench", "--help")
    assert "(default: 1200)" in res.stdout.replace("\n", " ").replace("  ", " ")


def test_probe_prints_sentences_progress_and_says_plainly_there_is_no_nat() -> None:
    rv, _, stun = start_rendezvous()
    try:
        res = run("probe", "--stun", f"127.0.0.1:{stun}")
    finally:
        rv.stop()
    assert res.returncode == 0, res.stderr
    assert "{" not in res.stdout and "'" not in res.stdout.split("\n")[0]  # no Python dicts
    assert re.search(r"^public address: 127\.0\.0\.1:\d+", res.stdout, re.M), res.stdout
    assert "NAT: none" in res.stdout
    # issue 16: easy or hard for hole punching (one server without an alternate: unknown)
    assert re.search(r"^hole punching: (easy|unknown) \(", res.stdout, re.M), res.stdout
    classic = next(ln for ln in res.stdout.splitlines() if ln.startswith("classic type"))
    # pystun3's "Symmetric UDP Firewall" on loopback is explained, not left beside "no NAT"
    assert "Symmetric UDP Firewall" not in classic or "no NAT" in classic
    assert f"probe: asking 127.0.0.1:{stun}" in res.stderr and "probe: done in" in res.stderr


def test_demo_ends_with_the_two_addresses_and_no_library_logs() -> None:
    res = run("demo", "--duration", "1", "--http-port", "0")
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-2:]
    assert [ln.split(":")[0].strip() for ln in last] == ["worker A", "worker B"], res.stdout
    # each address carries the worker's own generated UI token (issue 14: the page needs it)
    tokens = [re.search(r"http://127\.0\.0\.1:\d+/\?token=([A-Za-z0-9_-]{32})$", ln) for ln in last]
    assert all(tokens), last
    assert tokens[0][1] != tokens[1][1]  # type: ignore[index]
    assert " INFO " not in res.stderr, res.stderr  # library logs at WARNING without -v
