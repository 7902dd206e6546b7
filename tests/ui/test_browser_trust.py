"""The worker's page and what guards it, in headless Chromium against real workers (issue 14,
item 2 and finding 7): the token leaves the address bar and a cookie keeps the page working, a
page of another origin or a DNS-rebound name gets nothing, a restarted worker with a new token
says so.

The module's Chromium maps ``evil.example`` to 127.0.0.1 (``--host-resolver-rules``): a DNS
rebinding attack without any DNS; no name is looked up.  Its Local Network Access checks are off,
as in browsers that have none.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser_support import launch_browser, ms, open_page, shot, tid, wait_linked
from tests.procs import UI_TOKEN, Proc, free_port, get_json, status, ui_page_url, wait_until
from tests.ui.browser_cluster import Cluster

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EVIL = "evil.example"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Chromium's own Local Network Access checks would stop the rebound page's requests before
    # they reach the worker; Firefox and Safari have none, and the worker must not lean on them.
    lna = "LocalNetworkAccessChecks,LocalNetworkAccessChecksWebSockets"
    pna = "BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights"
    rules = f"--host-resolver-rules=MAP {EVIL} 127.0.0.1"
    yield from launch_browser((rules, f"--disable-features={lna},{pna}"))


@pytest.fixture(scope="module")
def cluster(browser: Any) -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


# -- the token ----------------------------------------------------------------------------------


def test_token_leaves_the_address_bar_and_the_cookie_keeps_the_page_working(
    cluster: Cluster, browser: Any
) -> None:
    bare = f"http://127.0.0.1:{cluster.a_http}/"
    with open_page(browser, cluster.url(cluster.a_http)) as page:
        wait_linked(page)
        assert page.url == bare  # history.replaceState took the token out of this entry
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads the token
        page.reload()  # the address has no token now: the cookie carries it
        wait_linked(page)
        assert page.inner_text(tid("status-worker-id")) == cluster.a_id
        tab = page.context.new_page()  # a new tab of the same browser, the bare address
        try:
            tab.goto(bare)
            wait_linked(tab)
        finally:
            tab.close()
    with open_page(browser, bare) as stranger:  # another browser profile: no cookie
        assert "needs the worker's token" in stranger.inner_text("body")
        assert stranger.locator(tid("status-state")).count() == 0


# -- origin check -------------------------------------------------------------------------------


PROBE_JS = """
url => new Promise(resolve => {
  const events = [];
  let ws;
  try { ws = new WebSocket(url); } catch (e) { resolve(['throw:' + e]); return; }
  ws.onopen = () => events.push('open');
  ws.onmessage = (m) => { events.push('message'); ws.close(); };
  ws.onerror = () => events.push('error');
  ws.onclose = (e) => { events.push('close:' + e.code); resolve(events); };
  setTimeout(() => resolve(events.concat(['timeout'])), 8000);
})
"""


@contextlib.contextmanager
def foreign_site() -> Iterator[str]:
    """A page served from another origin (another port on 127.0.0.1)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>another site</title><p>not the worker</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_page_from_another_origin_cannot_open_ui_ws(cluster: Cluster, browser: Any) -> None:
    ws_url = f"ws://127.0.0.1:{cluster.a_http}/ui_ws"
    with (
        foreign_site() as other,
        open_page(browser, cluster.url(cluster.a_http), own_origin_only=False) as evil,
    ):
        # The browser holds the worker's token cookie now, and another port of the same host is
        # the same site: the cookie goes along, so only the Origin check stands in the way.
        wait_linked(evil)
        evil.goto(other)
        events = evil.evaluate(PROBE_JS, ws_url)
        assert "open" not in events and "message" not in events, events
        assert any(e.startswith("close:") for e in events), events
    # the same script from the worker's own page is let in (so the refusal above was the origin)
    with open_page(browser, cluster.url(cluster.a_http)) as own:
        events = own.evaluate(PROBE_JS, ws_url)
        assert events[:2] == ["open", "message"], events
    assert status(cluster.a_http)["state"] == "connected"


# -- DNS rebinding ------------------------------------------------------------------------------

ATTACK_JS = """
async ([port, token]) => {
  const out = {};
  const get = async (path) => {
    try { const r = await fetch(path, { cache: 'no-store' }); return [r.status, await r.text()]; }
    catch (e) { return [0, String(e)]; }
  };
  out.health = (await get('/health'))[0];
  out.status = await get('/status');
  out.status_with_token = await get('/status?token=' + token);
  out.page_with_token = (await get('/?token=' + token))[0];
  out.ws = await new Promise(resolve => {
    const events = [];
    const ws = new WebSocket(`ws://${location.host}/ui_ws`);
    ws.onopen = () => {
      events.push('open');
      ws.send(JSON.stringify({type: 'chat', text: 'pwned'}));
    };
    ws.onmessage = () => events.push('message');
    ws.onclose = (e) => { events.push('close:' + e.code); resolve(events); };
    setTimeout(() => resolve(events.concat(['timeout'])), 8000);
  });
  return out;
}
"""


def test_a_dns_rebinding_page_gets_nothing_even_with_the_token(
    cluster: Cluster, browser: Any
) -> None:
    """Finding 7: the attacker's page came from evil.example:PORT, then the name was pointed at
    127.0.0.1.  To the browser it is same-origin with what now answers there (Host and Origin
    agree), so only the Host name can tell it is not the worker's own page."""
    port = cluster.a_http
    evil_page = f"http://{EVIL}:{port}/"
    chats_before = status(port)["stats"]["chats_out"]
    with open_page(browser, None, own_origin_only=False) as page:
        # the attacker's first answer (before the rebinding) is served inside the browser
        page.route(
            evil_page,
            lambda route: route.fulfill(
                body="<!doctype html><title>cats</title>", content_type="text/html"
            ),
        )
        page.goto(evil_page)
        got = page.evaluate(ATTACK_JS, [port, UI_TOKEN])
    # the requests did reach the worker (its open /health answered the rebound name) ...
    assert got["health"] == 200, got
    # ... and everything else was refused, with nothing of the worker in the answers
    for key in ("status", "status_with_token"):
        code, body = got[key]
        assert code == 403, got
        assert cluster.a_id not in body and "udp" not in body, got
    assert got["page_with_token"] == 403, got
    assert "open" not in got["ws"] and "message" not in got["ws"], got
    assert status(port)["stats"]["chats_out"] == chats_before  # no chat was sent


# -- a worker restarted with a new token --------------------------------------------------------


def test_a_worker_restarted_with_another_token_says_so_on_the_open_page(
    cluster: Cluster, browser: Any
) -> None:
    http_port = free_port(socket.SOCK_STREAM)
    c_id = str(uuid.uuid4())
    base = ["worker", "--rendezvous", f"ws://127.0.0.1:{cluster.rv_port}", "--stun",
            f"127.0.0.1:{cluster.stun_port}", "--udp-port", "0", "--http-host", "127.0.0.1",
            "--http-port", str(http_port), "--id", c_id]  # fmt: skip

    def start(extra: list[str]) -> Proc:
        proc = Proc("ui-worker-token", base + extra)
        wait_until(
            lambda: get_json(f"http://127.0.0.1:{http_port}/health")["worker_id"] == c_id,
            15,
            "worker health",
            proc,
        )
        return proc

    c = start(["--ui-token", UI_TOKEN])
    try:
        with open_page(browser, ui_page_url(http_port)) as page:
            page.wait_for_selector(f'{tid("ws-state")}:text("live")', timeout=ms(10))
            assert not page.is_visible(tid("auth-banner"))
            c.kill()
            c = start([])  # a generated token this time: the page's cookie is stale
            page.wait_for_selector(tid("auth-banner"), state="visible", timeout=ms(20))
            assert "token" in page.inner_text(tid("auth-banner"))
            assert page.is_visible(tid("conn-banner"))
            shot(page, "worker-new-token")
    finally:
        c.stop()


# -- trust through the real workers (needs the worker's status fields: H3's branch) ------------


def test_both_real_pages_show_the_same_authentication_string(
    cluster: Cluster, browser: Any
) -> None:
    """Finding 15: the two pages showed the fingerprints in opposite order.  Now both show one
    string, computed from the sorted pair of ids and keys, the same at both ends."""
    a_sec = status(cluster.a_http)["security"]
    b_sec = status(cluster.b_http)["security"]
    assert "auth_string" in a_sec, f"the worker sends no security.auth_string: {a_sec}"
    auth = a_sec["auth_string"]
    assert re.fullmatch(r"\d{5}( \d{5}){7}", auth), auth
    assert b_sec["auth_string"] == auth
    for sec in (a_sec, b_sec):
        assert sec["peer_key_warning"] is None and sec["relayed"] is False
        assert sec["peer_key_pinned"] is False
    shown = []
    for port in (cluster.a_http, cluster.b_http):
        with open_page(browser, cluster.url(port)) as page:
            wait_linked(page)
            page.wait_for_selector(tid("auth-string"), state="visible", timeout=ms(10))
            shown.append(page.inner_text(tid("auth-string")))
            assert not page.is_visible(tid("key-warning"))
            assert not page.is_visible(tid("relayed-banner"))
            assert not page.is_visible(tid("peer-key-pinned"))
    assert shown == [auth, auth]
