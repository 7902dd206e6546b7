"""The rendezvous reads its settings once, into a frozen Settings; nothing happens at import."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from p2plab.cli import _rendezvous_settings, build_parser
from p2plab.errors import ConfigError
from rendezvous_service_code.settings import Settings


def test_settings_from_the_environment() -> None:
    s = Settings.load(
        environ={
            "HOST": "127.0.0.1",
            "PORT": "9000",
            "STUN_PORT": "3478",
            "P2P_TOKEN": "t",
            "ADMIN_TOKEN": "a",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "P2P_ROOM_TOKENS": "r1=x, r2=y,broken",
            "MAX_WORKERS": "7",
            "P2P_RELAY": "off",
            "TRUST_PROXY_HEADERS": "yes",
        }
    )
    assert s == Settings(
        host="127.0.0.1",
        port=9000,
        stun_port=3478,
        token="t",
        admin_token="a",
        redis_url="redis://127.0.0.1:1/0",
        room_tokens={"r1": "x", "r2": "y"},
        max_workers=7,
        relay=False,
        trust_forwarded=True,
    )
    # empty variables count as unset
    assert Settings.load(environ={"P2P_TOKEN": "", "MAX_WORKERS": ""}) == Settings()
    assert Settings.load(environ={}).token is None


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_workers = 3  # type: ignore[misc]


def test_flags_win_over_the_environment() -> None:
    env = {"MAX_WORKERS": "7", "P2P_ROOM_TOKENS": "lab=envtok", "PORT": "9000", "P2P_RELAY": "1"}
    s = Settings.load({"max_workers": 3, "room_tokens": {"a": "1"}, "relay": False}, env)
    assert (s.max_workers, dict(s.room_tokens), s.relay, s.port) == (3, {"a": "1"}, False, 9000)
    # a flag that was not given (None) leaves the environment's value
    assert Settings.load({"max_workers": None, "port": None}, env).max_workers == 7


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_WORKERS": "abc"}, "MAX_WORKERS must be an integer, got 'abc'"),
        ({"MAX_WORKERS": "0"}, "max_workers (MAX_WORKERS) must be >= 1, got 0"),
        ({"PORT": "eighty"}, "PORT must be an integer, got 'eighty'"),
        ({"STUN_PORT": "70000"}, "stun_port (STUN_PORT) must be in 0..65535, got 70000"),
        ({"P2P_RELAY": "maybe"}, "P2P_RELAY must be one of"),
        ({"TRUST_PROXY_HEADERS": "sure"}, "TRUST_PROXY_HEADERS must be one of"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ=env)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_values_from_python_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"register_timeout_s \(REGISTER_TIMEOUT_S\) must be > 0"):
        Settings(register_timeout_s=0)
    with pytest.raises(ConfigError, match="unknown rendezvous setting 'max_worker'"):
        Settings.load({"max_worker": 3}, {})


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_importing_the_package_with_a_bad_environment_succeeds() -> None:
    res = _python(
        "import rendezvous_service_code.main as m, rendezvous_service_code.server; "
        "print(hasattr(m, 'app'))",
        MAX_WORKERS="abc",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"  # nothing is built at import
    res = _python(
        "from rendezvous_service_code.main import app_from_env; app_from_env()", MAX_WORKERS="abc"
    )
    assert res.returncode != 0
    assert (
        "ConfigError: invalid rendezvous settings in the environment: "
        "MAX_WORKERS must be an integer, got 'abc'" in res.stderr
    )


def test_the_factory_builds_an_app_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from rendezvous_service_code.main import app_from_env

    monkeypatch.setenv("ADMIN_TOKEN", "adm")
    with TestClient(app_from_env()) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/debug/list_workers").status_code == 401
        ok = client.get("/debug/list_workers", headers={"Authorization": "Bearer adm"})
        assert ok.json() == {"count": 0, "workers": []}


def test_cli_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_WORKERS", "7")
    monkeypatch.setenv("P2P_ROOM_TOKENS", "lab=envtok")
    monkeypatch.setenv("P2P_TOKEN", "envtoken")
    monkeypatch.setenv("STUN_PORT", "3478")
    monkeypatch.delenv("P2P_RELAY", raising=False)
    s = _rendezvous_settings(build_parser().parse_args(["rendezvous"]))
    assert (s.max_workers, dict(s.room_tokens), s.token, s.stun_port, s.relay) == (
        7,
        {"lab": "envtok"},
        "envtoken",
        3478,
        True,
    )
    args = build_parser().parse_args(
        [
            "rendezvous",
            "--max-workers",
            "3",
            "--room-tokens",
            "a=1,b=2",
            "--no-relay",
            "--token",
            "flagtoken",
            "--stun-port",
            "0",
        ]
    )
    s = _rendezvous_settings(args)
    assert (s.max_workers, dict(s.room_tokens), s.token, s.stun_port, s.relay) == (
        3,
        {"a": "1", "b": "2"},
        "flagtoken",
        0,
        False,
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {"MAX_WORKERS": "abc"}, "MAX_WORKERS must be an integer, got 'abc'"),
        ([], {"P2P_RELAY": "maybe"}, "P2P_RELAY must be one of"),
        (["--max-workers", "0"], {}, "max_workers (MAX_WORKERS) must be >= 1, got 0"),
    ],
)
def test_p2plab_rendezvous_with_a_bad_value_prints_one_line_and_exits_2(
    args: list[str], env: dict[str, str], message: str
) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "p2plab", "rendezvous", "--host", "127.0.0.1", "--port", "0", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2plab rendezvous: error: "), res.stderr
    assert message in lines[0]
