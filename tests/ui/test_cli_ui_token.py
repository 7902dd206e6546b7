"""``p2plab worker``'s page token on the command line (issue 14, item 2): the startup line is a
working address with the token, the flag wins over ``UI_TOKEN`` (a bad token or host list is
one line: tests/ui/test_cli_errors.py)."""

from __future__ import annotations

import re
import urllib.error

import pytest

from p2plab.cli import _worker_config, build_parser
from tests.procs import Proc, get_json, start_rendezvous, wait_until

RV = "ws://127.0.0.1:9"  # never contacted: every case fails while parsing


def test_ui_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UI_TOKEN", "from-the-environment-0123")
    monkeypatch.setenv("UI_ALLOWED_HOSTS", " W-1.a.run.app , .example.org ")
    cfg = _worker_config(build_parser().parse_args(["worker", "--rendezvous", RV]))
    assert cfg.ui_token == "from-the-environment-0123"
    assert cfg.ui_allowed_hosts == ("w-1.a.run.app", ".example.org")
    args = ["worker", "--rendezvous", RV, "--ui-token", "from-the-flag-0123456789"]
    cfg = _worker_config(build_parser().parse_args([*args, "--ui-allowed-hosts", "x.example"]))
    assert cfg.ui_token == "from-the-flag-0123456789" and cfg.ui_allowed_hosts == ("x.example",)
    monkeypatch.delenv("UI_TOKEN")
    monkeypatch.delenv("UI_ALLOWED_HOSTS")
    cfg = _worker_config(build_parser().parse_args(["worker", "--rendezvous", RV]))
    assert cfg.ui_token is None and cfg.ui_allowed_hosts == ()  # generated when the page starts


def test_worker_startup_line_is_a_working_address_with_its_token() -> None:
    rv, rv_port, _ = start_rendezvous()
    worker = Proc("ui-token-worker", ["worker", "--rendezvous", f"ws://127.0.0.1:{rv_port}",
                                      "--http-port", "0", "--connect-timeout", "0"])  # fmt: skip
    try:
        line = wait_until(
            lambda: re.search(r"UI at (http://127\.0\.0\.1:(\d+)/\?token=(\S+))", worker.log()),
            15,
            "the UI address",
            worker,
        )
        url, port, token = line[1], line[2], line[3]
        assert len(token) == 32  # secrets.token_urlsafe(24), generated
        assert get_json(url.replace("/?", "/status?"))["type"] == "status"
        with pytest.raises(urllib.error.HTTPError) as refused:
            get_json(f"http://127.0.0.1:{port}/status")
        assert refused.value.code == 401
        assert get_json(f"http://127.0.0.1:{port}/health")["status"] == "ok"
    finally:
        worker.stop()
        rv.stop()
