"""The command line: parsing, environment fallbacks and clear errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from p2plab.cli import _worker_config, build_parser, main


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2plab", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_every_contract_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    res = run("bench", "--help")  # the real console entry point, once
    assert res.returncode == 0, res.stderr
    assert "usage: p2plab bench" in res.stdout
    for cmd in ["rendezvous", "stun-server", "worker", "probe", "demo", "lab", "bench"]:
        with pytest.raises(SystemExit) as exited:
            main([cmd, "--help"])
        assert exited.value.code == 0
        assert f"usage: p2plab {cmd}" in capsys.readouterr().out


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


def test_birthday_flags_and_environment_reach_the_link_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = build_parser().parse_args(["worker", "--rendezvous", "ws://h:1"])
    birthday = _worker_config(args).link_config().birthday
    assert (birthday.enabled, birthday.sockets, birthday.hard_budget) == (True, 256, 0)
    monkeypatch.setenv("P2P_BIRTHDAY", "0")
    monkeypatch.setenv("P2P_BIRTHDAY_SOCKETS", "64")
    monkeypatch.setenv("P2P_HARD_NAT_BUDGET", "5000")
    args = build_parser().parse_args(["worker", "--rendezvous", "ws://h:1"])
    birthday = _worker_config(args).link_config().birthday
    assert (birthday.enabled, birthday.sockets, birthday.hard_budget) == (False, 64, 5000)
    monkeypatch.setenv("P2P_BIRTHDAY", "yes")
    argv = ["worker", "--rendezvous", "ws://h:1", "--birthday-sockets", "1024"]
    args = build_parser().parse_args([*argv, "--hard-nat-budget", "0"])
    birthday = _worker_config(args).link_config().birthday
    assert (birthday.enabled, birthday.sockets, birthday.hard_budget) == (True, 1024, 0)
    args = build_parser().parse_args([*argv, "--no-birthday"])
    assert _worker_config(args).link_config().birthday.enabled is False


def test_port_in_the_environment_is_the_workers_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bad PORT is the worker's mistake (tests/ui/test_cli_errors.py), not other commands'.
    monkeypatch.setenv("PORT", "eighty")
    with pytest.raises(SystemExit) as exited:
        main(["probe", "--help"])
    assert exited.value.code == 0 and "usage: p2plab probe" in capsys.readouterr().out


async def test_rendezvous_command_honours_room_tokens_cap_and_relay_from_the_environment() -> None:
    """What the rendezvous image runs (`p2plab rendezvous`, no flags) reads these variables."""
    from tests.procs import start_rendezvous
    from tests.rendezvous_fixtures import WsWorker

    proc, port, _ = start_rendezvous(
        env={"MAX_WORKERS": "1", "P2P_ROOM_TOKENS": "lab=s3cret", "P2P_RELAY": "0"}
    )
    try:
        base = f"ws://127.0.0.1:{port}"
        a = await WsWorker.connect(base)
        await a.register(room="lab", token="s3cret")  # the room's own token
        b = await WsWorker.connect(base)
        assert (await b.wait_closed())[0] == 1013  # MAX_WORKERS=1
        await a.send({"type": "relay", "to": b.worker_id, "data": "AAAA"})
        err = await a.expect("error")
        assert err["code"] == "relay_disabled", err  # P2P_RELAY=0
        await a.close()
        for _ in range(50):  # until a's slot is free (1013 before that)
            c = await WsWorker.connect(base)
            await c.send({"type": "register", "room": "lab", "token": "wrong"})
            code = (await c.wait_closed())[0]
            if code != 1013:
                break
            await asyncio.sleep(0.1)
        assert code == 1008  # a room token replaces the global one, and is checked
    finally:
        proc.stop()
