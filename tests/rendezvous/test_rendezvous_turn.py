"""The rendezvous hands each paired worker TURN credentials of its own (issue 17): settings from
flags and the environment, one-line errors, the ``turn`` field of offers and its bounds."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest

from p2plab.cli import _rendezvous_settings, build_parser
from p2plab.core.signaling import BadMessage, parse_rendezvous_message
from p2plab.errors import ConfigError
from rendezvous_service_code.settings import Settings

try:
    from tests.rendezvous_fixtures import WsWorker, debug, new_identity, running_rendezvous
except ImportError:  # pragma: no cover
    from rendezvous_fixtures import (  # type: ignore[no-redef]
        WsWorker,
        debug,
        new_identity,
        running_rendezvous,
    )

URLS = ("turn:127.0.0.1:3478?transport=udp", "turn:turn.example.org:3478?transport=tcp")
SECRET = "the-coturn-secret"


def test_turn_settings_from_the_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"TURN_URLS": " turn:192.0.2.1 , turn:192.0.2.2:80?transport=tcp,", "TURN_SECRET": "e"}
    s = Settings.load(environ=env)
    assert s.turn_urls == ("turn:192.0.2.1", "turn:192.0.2.2:80?transport=tcp")
    assert s.turn_secret == "e" and s.turn_ttl_s == 600
    assert "'e'" not in repr(s)  # the secret stays out of logs
    for var, value in (*env.items(), ("TURN_TTL_S", "120")):
        monkeypatch.setenv(var, value)
    args = build_parser().parse_args(
        ["rendezvous", "--turn", "turn:198.51.100.1:3478", "--turn-secret", "flag"]
    )
    s = _rendezvous_settings(args)
    assert (s.turn_urls, s.turn_secret, s.turn_ttl_s) == (("turn:198.51.100.1:3478",), "flag", 120)
    assert Settings().turn_urls == () and Settings().turn_secret is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TURN_URLS": "turn:192.0.2.1"}, "without a secret"),
        ({"TURN_SECRET": "s"}, "without TURN servers"),
        ({"TURN_URLS": "turns:192.0.2.1", "TURN_SECRET": "s"}, "not supported yet"),
        ({"TURN_URLS": "http://x", "TURN_SECRET": "s"}, "bad TURN URL"),
        ({"TURN_URLS": ",".join(["turn:192.0.2.1"] * 5), "TURN_SECRET": "s"}, "at most 4"),
        ({"TURN_URLS": "turn:192.0.2.1", "TURN_SECRET": "s", "TURN_TTL_S": "0"}, "TURN_TTL_S"),
        ({"TURN_URLS": "turn:192.0.2.1", "TURN_SECRET": "s", "TURN_TTL_S": "x"}, "TURN_TTL_S"),
    ],
)
def test_bad_turn_settings_are_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ=env)
    assert message in str(info.value) and "\n" not in str(info.value)


def _check_credentials(turn: dict[str, Any], worker_id: str, before: float) -> None:
    assert turn["urls"] == list(URLS)
    assert turn["ttl_s"] == 120
    expiry, _, named = turn["username"].partition(":")
    assert named == worker_id
    assert before + 120 - 1 <= int(expiry) <= time.time() + 120
    digest = hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert turn["password"] == base64.b64encode(digest).decode()


async def test_each_offer_carries_credentials_for_its_own_worker() -> None:
    before = time.time()
    async with running_rendezvous(turn_urls=URLS, turn_secret=SECRET, turn_ttl_s=120) as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        await a.register(identity=new_identity())
        await b.register(identity=new_identity())
        await a.update_endpoint("203.0.113.1", 1111)
        await b.update_endpoint("203.0.113.2", 2222)
        offer_a = await a.expect("p2p_connection_offer")
        offer_b = await b.expect("p2p_connection_offer")
        parse_rendezvous_message(json.dumps(offer_a))  # what a worker accepts
        _check_credentials(offer_a["turn"], a.worker_id, before)
        _check_credentials(offer_b["turn"], b.worker_id, before)
        assert offer_a["turn"]["password"] != offer_b["turn"]["password"]
        assert SECRET not in json.dumps(offer_a) + json.dumps(offer_b)
        assert (await debug(rv, "stats"))["turn_credentials"] == 2
        await a.close()
        await b.close()


async def test_no_turn_configured_no_credentials() -> None:
    async with running_rendezvous() as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        await a.register()
        await b.register()
        await a.update_endpoint("203.0.113.1", 1111)
        await b.update_endpoint("203.0.113.2", 2222)
        assert (await a.expect("p2p_connection_offer")).get("turn") is None
        assert (await b.expect("p2p_connection_offer")).get("turn") is None
        await a.close()
        await b.close()


def _offer(turn: dict[str, Any]) -> str:
    return json.dumps(
        {
            "type": "p2p_connection_offer",
            "peer_worker_id": "p",
            "peer_udp_ip": "192.0.2.1",
            "peer_udp_port": 1,
            "turn": turn,
        }
    )


GOOD_TURN = {"urls": ["turn:192.0.2.9:3478"], "username": "1:w", "password": "p", "ttl_s": 600}


@pytest.mark.parametrize(
    "change",
    [
        {"urls": []},
        {"urls": ["turn:192.0.2.9"] * 5},
        {"urls": ["turns:192.0.2.9"]},
        {"urls": ["turn:" + "a" * 300]},
        {"username": "u" * 129},
        {"password": ""},
        {"ttl_s": 0},
        {"ttl_s": 10**9},
    ],
)
def test_offers_with_a_bad_turn_field_are_refused(change: dict[str, Any]) -> None:
    parsed = parse_rendezvous_message(_offer(GOOD_TURN))
    assert getattr(parsed, "turn", None) is not None
    with pytest.raises(BadMessage, match="turn"):
        parse_rendezvous_message(_offer({**GOOD_TURN, **change}))
