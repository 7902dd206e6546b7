"""The worker's page needs its token and answers only to its own names (issue 14, item 2 and
finding 7), tried as an attacker would: over real sockets, with the Host and Origin a DNS
rebinding page sends, without the token, with a wrong one, with a non-ASCII one."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any

import pytest
import websockets

from p2plab.aio import ui_auth
from p2plab.aio.hub import EventHub
from p2plab.aio.ui_auth import UiGuard, parse_allowed_hosts
from p2plab.aio.ui_server import UiServer
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.errors import ConfigError

TOKEN = "ui-auth-test-token-0123456789"
WORKER_ID = "3f1c0de0-0000-4000-8000-00000000abcd"


class StubWorker:
    """What the page's server needs of a worker; the secret-looking bits must never leak."""

    worker_id = WORKER_ID

    def __init__(self) -> None:
        self.hub = EventHub()
        self.chats: list[str] = []

    def status(self) -> dict[str, Any]:
        return {"type": "status", "worker_id": WORKER_ID, "state": "connected"}

    def send_chat(self, text: str) -> str:
        self.chats.append(text)
        return "0" * 16

    def ui_subscribe(self) -> Any:
        return self.hub.ui_subscribe()

    def ui_unsubscribe(self, q: Any) -> None:
        self.hub.ui_unsubscribe(q)

    def ui_history(self) -> list[dict[str, Any]]:
        return []


class Reply:
    def __init__(self, head: bytes, body: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                self.headers.setdefault(k.strip().lower(), v.strip())
        self.body = body


async def request(
    port: int, path: str, headers: dict[str, str], *, websocket: bool = False
) -> Reply:
    """One raw HTTP/1.1 request (the Host header is the caller's, as a rebinding page's is);
    ``websocket``: an upgrade request, 101 means the WebSocket was accepted."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hdrs = dict(headers)
    if websocket:
        hdrs |= {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        }
    else:
        hdrs["Connection"] = "close"
    lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in hdrs.items()), "", ""]
    writer.write("\r\n".join(lines).encode("utf-8"))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        reply = Reply(head, b"")
        n = int(reply.headers.get("content-length", "0"))
        if n:
            reply.body = await asyncio.wait_for(reader.readexactly(n), 5)
        return reply
    finally:
        writer.close()


@pytest.fixture
async def ui() -> Any:
    worker = StubWorker()
    server = await UiServer.start(worker, "127.0.0.1", 0, token=TOKEN)  # type: ignore[arg-type]
    try:
        yield server.address[1], worker
    finally:
        await server.close()


def own(port: int) -> dict[str, str]:
    return {"Host": f"127.0.0.1:{port}"}


async def test_status_page_and_ui_ws_refuse_a_missing_or_wrong_token(ui: Any) -> None:
    port, _ = ui
    for path in ("/", "/status", "/status?token=wrong-token-0123456789", "/?token="):
        r = await request(port, path, own(port))
        assert r.status == 401, path
        assert WORKER_ID.encode() not in r.body and b"connected" not in r.body  # nothing leaked
    for headers in (
        own(port),
        own(port) | {"Authorization": "Bearer wrong-token-0123456789"},
        own(port) | {"Authorization": f"Basic {TOKEN}"},
        own(port) | {"Cookie": f"p2plab_ui_{port}=wrong-token-0123456789"},
        own(port) | {"Cookie": f"p2plab_ui_{port + 1}={TOKEN}"},  # another worker's cookie name
    ):
        assert (await request(port, "/status", headers)).status == 401, headers
        assert (await request(port, "/ui_ws", headers, websocket=True)).status == 403, headers
    # a guess that is not ASCII is just wrong (compare_digest on str would raise: a 500)
    r = await request(port, "/status?token=t%C3%B6k%C3%A9n-0123456789", own(port))
    assert r.status == 401
    r = await request(port, "/status", own(port) | {"Authorization": "Bearer tökén"})
    assert r.status == 401
    # the scripts' client library sees the refusal too
    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with websockets.connect(f"ws://127.0.0.1:{port}/ui_ws"):
            pass


async def test_the_token_opens_everything_by_query_bearer_or_cookie(ui: Any) -> None:
    port, worker = ui
    r = await request(port, f"/status?token={TOKEN}", own(port))
    assert r.status == 200 and json.loads(r.body)["worker_id"] == WORKER_ID
    r = await request(port, "/status", own(port) | {"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200
    for headers in (
        {"Authorization": f"Bearer {TOKEN}"},
        {"Cookie": f"p2plab_ui_{port}={TOKEN}"},
    ):
        assert (await request(port, "/ui_ws", own(port) | headers, websocket=True)).status == 101
    url = f"ws://127.0.0.1:{port}/ui_ws"
    for kwargs in ({"uri": f"{url}?token={TOKEN}"}, {"uri": url, "additional_headers": {
        "Authorization": f"Bearer {TOKEN}"}}):  # fmt: skip
        async with websockets.connect(**kwargs) as ws:
            assert json.loads(await ws.recv())["worker_id"] == WORKER_ID
            await ws.send(json.dumps({"type": "chat", "text": "hi"}))
            await ws.send(json.dumps({"type": "status"}))
            assert json.loads(await ws.recv())["type"] == "status"
    assert worker.chats == ["hi", "hi"]


async def test_opening_the_page_with_its_token_sets_a_strict_httponly_cookie(ui: Any) -> None:
    port, _ = ui
    r = await request(port, f"/?token={TOKEN}", own(port))
    assert r.status == 200 and b"<!doctype html>" in r.body.lower()
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"p2plab_ui_{port}={TOKEN};")
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attrs
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-frame-options"] == "DENY"
    # the reload (token gone from the address bar) is let in by the cookie alone
    r = await request(port, "/", own(port) | {"Cookie": f"p2plab_ui_{port}={TOKEN}"})
    assert r.status == 200 and "set-cookie" not in r.headers
    # a wrong ?token= next to a right cookie is let in, but never stored as the cookie
    r = await request(
        port, "/?token=wrong-token-0123456789", own(port) | {"Cookie": f"p2plab_ui_{port}={TOKEN}"}
    )
    assert r.status == 200 and "set-cookie" not in r.headers
    # without a token the page says where to find it, and nothing about the worker
    r = await request(port, "/", own(port))
    assert r.status == 401 and b"?token=" in r.body and WORKER_ID.encode() not in r.body
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_dns_rebinding_is_refused_with_or_without_the_token(ui: Any) -> None:
    """Finding 7: the attacker's page at evil.example:PORT, its name rebound to 127.0.0.1,
    sends Host and Origin that agree.  Old code let it chat and run benchmarks."""
    port, worker = ui
    evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    for path in ("/", "/status"):
        assert (await request(port, path, evil)).status == 403
    assert (await request(port, "/ui_ws", evil, websocket=True)).status == 403
    # the Host alone is enough to refuse, even with the token (the token is not the only wall)
    for host in (f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil"):
        with_token = {"Host": host, "Authorization": f"Bearer {TOKEN}"}
        assert (await request(port, "/status", with_token)).status == 403, host
        assert (await request(port, "/ui_ws", with_token, websocket=True)).status == 403, host
    # a page of another origin on the right host (another port) is refused by Origin
    other = own(port) | {
        "Origin": f"http://127.0.0.1:{port + 1}",
        "Cookie": f"p2plab_ui_{port}={TOKEN}",
    }
    assert (await request(port, "/ui_ws", other, websocket=True)).status == 403
    assert (await request(port, "/status", other)).status == 403
    assert worker.chats == []


async def test_health_stays_open(ui: Any) -> None:
    port, _ = ui
    r = await request(port, "/health", {"Host": "anything.example"})
    assert r.status == 200 and json.loads(r.body)["status"] == "ok"


def test_host_names_the_page_answers_to() -> None:
    loop_bound = UiGuard(TOKEN, "127.0.0.1", 8080)
    for host in ("127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080", "127.0.0.2:9000",
                 "localhost.:8080"):  # fmt: skip
        assert loop_bound.host_allowed(host), host
    for host in (None, "", "evil.example:8080", "192.168.1.5:8080", "localhost.evil.example",
                 "127.0.0.1.nip.io:8080", "[::1"):  # fmt: skip
        assert not loop_bound.host_allowed(host), host
    # bound to a name: that name is served too
    assert UiGuard(TOKEN, "Box.lan", 8080).host_allowed("box.lan:8080")
    assert not UiGuard(TOKEN, "box.lan", 8080).host_allowed("other.lan:8080")
    # bound to every address (the image): any IP literal is this machine, no name can rebind it
    any_bound = UiGuard(TOKEN, "0.0.0.0", 8080)
    assert any_bound.host_allowed("192.168.1.5:8080")
    assert not any_bound.host_allowed("evil.example:8080")
    cloud = UiGuard(
        TOKEN, "0.0.0.0", 8080, parse_allowed_hosts("w-1-abc.a.run.app, .example.org:443")
    )
    assert cloud.host_allowed("w-1-abc.a.run.app")
    assert not cloud.host_allowed("w-2-abc.a.run.app")
    assert cloud.host_allowed("example.org:443") and cloud.host_allowed("a.b.example.org:443")
    assert not cloud.host_allowed("a.example.org:8443") and not cloud.host_allowed(
        "badexample.org:443"
    )


def test_bad_tokens_and_host_lists_are_config_errors() -> None:
    for bad in (
        "short",
        "x" * 15,
        "has space 0123456789",
        "semi;colon0123456789",
        "tökén0123456789ab",
    ):
        with pytest.raises(ConfigError, match="--ui-token"):
            asyncio.run(UiServer.start(StubWorker(), "127.0.0.1", 0, token=bad))  # type: ignore[arg-type]
    for bad in ("http://a.example", "a.example/path", "a b", "a.example:99999"):
        with pytest.raises(ConfigError, match="--ui-allowed-hosts"):
            parse_allowed_hosts(bad)


async def test_worker_prints_a_working_address_with_its_token() -> None:
    config = WorkerConfig(rendezvous_url="ws://127.0.0.1:9", udp_host="127.0.0.1", http_port=0)
    w = await Worker(config).start()
    try:
        assert w.ui_url is not None and w.ui_token is not None
        assert len(w.ui_token) >= 32  # secrets.token_urlsafe(24)
        port = w.http_address[1]  # type: ignore[index]
        assert w.ui_url == f"http://127.0.0.1:{port}/?token={w.ui_token}"
        path = w.ui_url.split(str(port), 1)[1]
        assert (await request(port, path, own(port))).status == 200
        assert (await request(port, "/status", own(port))).status == 401
    finally:
        await w.stop()
    # two workers never share a generated token; a given one is used as is
    w2 = await Worker(WorkerConfig(rendezvous_url="ws://127.0.0.1:9", udp_host="127.0.0.1",
                                   http_port=0, ui_token=TOKEN)).start()  # fmt: skip
    try:
        assert w2.ui_token == TOKEN and w2.ui_url is not None and w2.ui_url.endswith(TOKEN)
        assert w2.ui_token != w.ui_token
    finally:
        await w2.stop()


async def test_a_guesser_cannot_fill_the_log(ui: Any, caplog: pytest.LogCaptureFixture) -> None:
    port, _ = ui
    with caplog.at_level("WARNING", logger="p2plab.aio.ui_auth"):
        for i in range(12):
            r = await request(port, f"/status?token=guess-{i:020d}", own(port))
            assert r.status == 401
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2 and lines[1].endswith("10 refused so far"), lines
    assert not any("guess-" in line for line in lines)  # no token, right or wrong, is logged


def test_a_generated_token_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # One token in 64 would, and `--ui-token -abc...` (the lab passes its workers' tokens on the
    # command line) reads as a flag without its value: the lab's pair then never started.
    drawn = iter(["-starts-with-a-dash-0123456789abc", "fine-token-0123456789abcdefghijk"])
    monkeypatch.setattr(ui_auth.secrets, "token_urlsafe", lambda n: next(drawn))
    assert ui_auth.new_ui_token() == "fine-token-0123456789abcdefghijk"
