"""The command line: parsing, environment fallbacks and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2plab.cli import _worker_config, build_parser


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2plab", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_every_contract_command_has_help() -> None:
    for cmd in ["rendezvous", "stun-server", "worker", "probe", "demo", "lab", "bench"]:
        res = run(cmd, "--help")
        assert res.returncode == 0, res.stderr
        assert "usage: p2plab" in res.stdout


def test_worker_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RENDEZVOUS_URL", "ws://env:1")
    monkeypatch.setenv("STUN_SERVERS", "a:1, b:2")
    monkeypatch.setenv("P2P_ROOM", "envroom")
    monkeypatch.setenv("PORT", "9999")
    monkeypatch.setenv("INTERNAL_UDP_PORT", "40000")
    args = build_parser().parse_args(["worker", "--room", "flagroom", "--peer-timeout", "3"])
    cfg = _worker_config(args)
    assert cfg.rendezvous_url == "ws://env:1"
    assert cfg.stun_servers == ("a:1", "b:2")
    assert cfg.room == "flagroom"
    assert cfg.http_port == 9999 and cfg.udp_port == 40000
    assert cfg.session.peer_timeout == 3.0 and cfg.session.keepalive_interval == 1.0
    args = build_parser().parse_args(
        ["worker", "--stun", "c:3", "--stun", "d:4", "--no-encrypt", "--no-relay"]
    )
    cfg = _worker_config(args)
    assert cfg.stun_servers == ("c:3", "d:4") and cfg.encrypt is False and cfg.relay is False


def test_bad_input_gives_one_clear_line() -> None:
    res = run("worker", "--rendezvous", "ws://127.0.0.1:1", "--stun", "nohostport")
    assert res.returncode == 2 and "expected host:port" in res.stderr
    res = run("probe")
    assert res.returncode != 0 and "--stun HOST:PORT" in res.stderr
    res = run("worker")
    assert res.returncode != 0 and "--rendezvous" in res.stderr
    res = run("worker", "--rendezvous", "ws://127.0.0.1:1", "--keepalive", "-1", "--http-port", "0")
    assert res.returncode == 1 and "keepalive_interval must be > 0" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_environment_integer_is_reported() -> None:
    import os

    res = run("worker", "--help", env={**os.environ, "PORT": "eighty"})
    assert res.returncode != 0 and "PORT must be an integer" in res.stderr
