"""The worker page against a scripted ``/ui_ws``: message orders real workers cannot be made to
show on demand (late, out-of-order, repeated), and a table of large numbers at 1280 px.

The page is ``web/index.html`` itself, served by ``page.route`` inside the browser; nothing is sent
on any network.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser_support import (
    ARTIFACTS,
    SERIES_PIXELS_JS,
    chart,
    launch_browser,
    open_page,
    result_rows,
    shot,
    tid,
    wait_linked,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


PAGE = Path(__file__).resolve().parents[2] / "web" / "index.html"
# Requests to this address are answered inside the browser (page.route), never sent anywhere.
SCRIPTED = "http://127.0.0.1:9"
OWN_ID = "a1b2c3d4-0000-4000-8000-00000000000a"
PEER_ID = "e5f6a7b8-0000-4000-8000-00000000000b"
SCRIPTED_STATUS = {
    "type": "status",
    "worker_id": OWN_ID,
    "state": "connected",
    "udp_local": "0.0.0.0:40000",
    "udp_public": "203.0.113.11:40000",
    "nat": {"classic": "Port-Restricted Cone"},
    "peer": {"worker_id": PEER_ID, "endpoint": "203.0.113.12:40001", "rtt_ms": 0.4},
    "path": "direct",
    "room": "lab-7",
    "rendezvous": "connected",
}


class ScriptedWorker:
    """The page served from ``web/index.html`` with its ``/ui_ws`` answered by the test."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.ws: Any = None
        self.received: list[dict[str, Any]] = []
        html = PAGE.read_text("utf-8")
        page.route(f"{SCRIPTED}/", lambda route: route.fulfill(body=html, content_type="text/html"))
        page.route_web_socket(SCRIPTED.replace("http", "ws") + "/ui_ws", self._accept)
        page.goto(f"{SCRIPTED}/")
        for _ in range(200):
            if self.ws is not None:
                break
            page.wait_for_timeout(25)
        assert self.ws is not None, "the page did not open /ui_ws"
        self.send(SCRIPTED_STATUS)
        wait_linked(page)

    def _accept(self, ws: Any) -> None:
        self.ws = ws
        ws.on_message(lambda text: self.received.append(json.loads(text)))

    def send(self, *messages: dict[str, Any]) -> None:
        for m in messages:
            self.ws.send(json.dumps(m))
        self.page.wait_for_timeout(30)  # let the page handle them


def progress(run_id: int, role: str, elapsed: float, mbps: float = 50.0) -> dict[str, Any]:
    return {
        "type": "benchmark_progress",
        "role": role,
        "elapsed_s": elapsed,
        "mbps": mbps,
        "lost": 0,
        "run_id": str(run_id),
        "duration_s": 5,
    }


def result(run_id: int, role: str, **extra: Any) -> dict[str, Any]:
    local, peer = (OWN_ID, PEER_ID) if role == "sender" else (PEER_ID, OWN_ID)
    row = {
        "type": "benchmark_result",
        "role": role,
        "payload_size": 1200,
        "duration_s": 5.0,
        "packets_sent": 52083,
        "packets_received": 52083,
        "lost": 0,
        "lost_percent": 0.0,
        "out_of_order": 0,
        "duplicates": 0,
        "jitter_ms": 0.0123,
        "mbps": 99.5,
        "rtt_ms": 0.412,
        "run_id": str(run_id),
        "started_at": "2026-12-01T17:00:00+00:00",
        "local_worker": local,
        "peer_worker": peer,
        "path": "direct",
        "rate_mbps": 100.0,
    }
    row.update(extra)
    return row


def test_late_out_of_order_progress_keeps_both_series_and_runs_apart(browser: Any) -> None:
    """The sender's page gets the receiver's intervals relayed late and out of order: they stay
    with their run (told by run id), in elapsed order, next to the sent series."""
    with open_page(browser) as page:
        w = ScriptedWorker(page)
        w.send(*(progress(111, "sender", t) for t in (1.0, 2.0, 3.0, 4.0, 5.0)))
        w.send(*(progress(111, "receiver", t, 40.0) for t in (5.0, 2.0, 3.0, 1.0, 4.0)))
        w.send(result(111, "sender"), result(111, "receiver", mbps=99.0))
        assert chart(page, "run-id") == "111"
        assert chart(page, "sender-elapsed") == "1,2,3,4,5"
        assert chart(page, "receiver-elapsed") == "1,2,3,4,5"
        assert page.evaluate(SERIES_PIXELS_JS, "sender") > 50
        assert page.evaluate(SERIES_PIXELS_JS, "receiver") > 50
        assert page.inner_text(tid("legend-sender")) == "sent by this worker"
        assert page.inner_text(tid("legend-receiver")) == "received by the peer"
        assert page.is_visible(tid("legend-target"))  # the run asked for 100 Mbit/s
        # a repeated late interval of the finished run neither starts a run nor adds a point
        w.send(progress(111, "receiver", 2.0, 40.0))
        assert chart(page, "run-id") == "111"
        assert chart(page, "receiver-elapsed") == "1,2,3,4,5"
        shot(page, "scripted-run-111")

        # a new run (the peer started it): its own series; run 111's late news stays with 111
        w.send(progress(222, "receiver", 1.0, 30.0))
        assert chart(page, "run-id") == "222"
        w.send(progress(111, "receiver", 3.0, 40.0))
        assert chart(page, "run-id") == "222"
        assert chart(page, "receiver-elapsed") == "1"
        assert chart(page, "sender-elapsed") == ""
        w.send(progress(222, "receiver", 2.0, 30.0), result(222, "receiver", mbps=30.0))
        assert chart(page, "receiver-elapsed") == "1,2"
        # both runs are in the table, each row with its run id
        ids = [r["run_id"] for r in result_rows(page)]
        assert ids == ["222", "111", "111"]

        # Start here: a late interval of run 222 goes to 222, the next new id is this run's
        page.click(tid("bench-start"))
        assert w.received[-1]["type"] == "start_benchmark"
        w.send(progress(222, "receiver", 3.0, 30.0))
        assert chart(page, "run-id") == ""  # still waiting for its own first message
        assert page.get_attribute(tid("bench-status"), "data-running") == "true"
        w.send(progress(333, "sender", 1.0, 80.0))
        assert chart(page, "run-id") == "333"
        assert chart(page, "sender-elapsed") == "1"
        assert page.inner_text(tid("legend-sender")) == "sent by this worker"


def test_page_and_cli_share_the_default_rate(browser: Any) -> None:
    """The page's rate default is the CLI's (``p2plab bench --rate``: 0, as fast as possible)."""
    with open_page(browser) as page:
        w = ScriptedWorker(page)
        assert page.input_value(tid("bench-rate")) == "0"
        page.fill(tid("bench-duration"), "2")
        page.click(tid("bench-start"))
        start = w.received[-1]
        assert start["type"] == "start_benchmark" and start["rate_mbps"] == 0
        w.send(progress(7, "sender", 1.0, 900.0), result(7, "sender", rate_mbps=0.0))
        assert not page.is_visible(tid("legend-target"))  # no cap, no target line


def test_results_table_fits_1280_px_with_one_precision_per_column(browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        w = ScriptedWorker(page)
        big = {"packets_sent": 123456789, "packets_received": 123450000, "lost": 6789,
               "lost_percent": 0.0055, "out_of_order": 12345, "duplicates": 1234}  # fmt: skip
        w.send(
            result(3735928559, "sender", mbps=4567.891, **big),
            result(3735928559, "receiver", mbps=4567.1, jitter_ms=0.5, rtt_ms=12.0, **big),
            result(4294967295, "sender", mbps=99.5, jitter_ms=12.25),
            result(4294967295, "receiver", mbps=7.0, duration_s=5.123456),
        )
        wrap = page.locator(tid("results-wrap"))
        sizes = wrap.evaluate("e => [e.scrollWidth, e.clientWidth]")
        assert sizes[0] <= sizes[1], f"the results table scrolls: {sizes}"
        doc = page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
        assert doc[0] <= doc[1], f"the page scrolls sideways: {doc}"

        def column(field: str) -> list[str]:
            texts: list[str] = page.eval_on_selector_all(
                f'{tid("bench-row")} td[data-field="{field}"]', "tds => tds.map(t => t.innerText)"
            )
            return texts

        assert column("mbps") == ["7.00", "99.50", "4,567.10", "4,567.89"]
        assert column("jitter_ms") == ["0.012", "12.250", "0.500", "0.012"]
        assert column("duration_s") == ["5.12", "5.00", "5.00", "5.00"]
        assert column("lost_percent") == ["0.00", "0.00", "0.01", "0.01"]
        assert column("packets_sent")[-1] == "123,456,789"
        # who measured each row, in words: this worker or the peer, and a short name
        who = column("role")
        assert who[-1].split() == ["sender", "this", "worker", "·", OWN_ID[:8]]
        assert who[-2].split() == ["receiver", "peer", "·", PEER_ID[:8]]
        worker = page.inner_text(tid("worker-detail"))
        assert f"“{OWN_ID[:8]}”" in worker and "this worker" in worker and "room lab-7" in worker
        peer = page.inner_text(tid("peer-detail"))
        assert f"“{PEER_ID[:8]}”" in peer and "peer" in peer
        page.screenshot(path=str(ARTIFACTS / "results-1280.png"), full_page=True)
        assert errors == []
    finally:
        context.close()


def test_equal_sent_and_received_lines_both_stay_visible(browser: Any) -> None:
    """Goodput equal to the sending rate (the usual case) must not hide one line under the other."""
    with open_page(browser) as page:
        w = ScriptedWorker(page)
        for t in (1.0, 2.0, 3.0, 4.0, 5.0):
            w.send(progress(55, "sender", t, 20.0), progress(55, "receiver", t, 20.0))
        assert chart(page, "sender-elapsed") == chart(page, "receiver-elapsed") == "1,2,3,4,5"
        assert page.evaluate(SERIES_PIXELS_JS, "sender") > 200
        assert page.evaluate(SERIES_PIXELS_JS, "receiver") > 200
        shot(page, "scripted-equal-series")
        # this worker sends (the peer asked it to): the relayed receiver intervals do not make
        # the page say it is receiving
        assert "sending" in page.inner_text(tid("bench-status"))


# -- trust: the authentication string, a changed key, the relay (issue 14 item 5, finding 15) --

AUTH = "01234 56789 13579 24680 11223 34455 66778 89900"
LOCAL_FP = " ".join(["a1b2"] * 16)
PEER_FP = " ".join(["c3d4"] * 16)


def secure_status(**security: Any) -> dict[str, Any]:
    sec = {
        "encrypted": True,
        "local_fingerprint": LOCAL_FP,
        "peer_fingerprint": PEER_FP,
        "auth_string": AUTH,
        "peer_key_pinned": False,
        "peer_key_warning": None,
        "relayed": False,
        "auth_failures": 0,
        "replays": 0,
        "unexpected_source": 0,
    }
    sec.update(security)
    return {**SCRIPTED_STATUS, "security": sec}


def test_the_authentication_string_is_shown_to_compare_and_the_fingerprints_fold_away(
    browser: Any,
) -> None:
    with open_page(browser) as page:
        w = ScriptedWorker(page)
        w.send(secure_status())
        assert page.is_visible(tid("auth-string"))
        assert page.inner_text(tid("auth-string")) == AUTH
        assert page.get_attribute(tid("auth-string"), "data-auth") == AUTH
        assert page.inner_text(tid("auth")).startswith("Compare with your peer:")
        # the fingerprints are there for who wants them, folded by default
        assert page.get_attribute(tid("fingerprints-details"), "open") is None
        assert not page.is_visible(tid("fingerprints"))
        page.click(f"{tid('fingerprints-details')} summary")
        assert page.inner_text(tid("fingerprints")).splitlines() == [
            f"this worker {LOCAL_FP}",
            f"peer {PEER_FP}",
        ]
        assert not page.is_visible(tid("peer-key-pinned"))
        assert not page.is_visible(tid("key-warning")) and not page.is_visible(
            tid("relayed-banner")
        )
        shot(page, "scripted-auth-string")
        w.send(secure_status(peer_key_pinned=True))
        assert page.is_visible(tid("peer-key-pinned"))


def test_a_changed_peer_key_and_the_relay_are_loud(browser: Any) -> None:
    warning = (
        f"peer {PEER_ID[:8]} came back with another key (was 9f86 d081 ..., now c3d4 c3d4 ...): "
        "compare the authentication string before you trust this link"
    )
    with open_page(browser) as page:
        w = ScriptedWorker(page)
        w.send(secure_status(peer_key_warning=warning))
        banner = page.locator(tid("key-warning"))
        assert banner.is_visible() and banner.get_attribute("role") == "alert"
        assert page.inner_text(tid("key-warning-text")) == warning
        # it comes before everything else on the page
        tops = page.evaluate(
            "ids => ids.map(i => document.querySelector(`[data-testid=${i}]`)"
            ".getBoundingClientRect().top)",
            ["key-warning", "status-worker-id"],
        )
        assert tops[0] < tops[1]
        shot(page, "scripted-key-warning")
        w.send(secure_status(relayed=True) | {"state": "relayed", "path": "relayed"})
        assert not page.is_visible(tid("key-warning"))  # cleared when the worker clears it
        assert page.is_visible(tid("relayed-banner"))
        assert "relayed through the rendezvous" in page.inner_text(tid("relayed-banner")).lower()
        shot(page, "scripted-relayed")
        w.send(secure_status())
        assert not page.is_visible(tid("relayed-banner"))


def test_a_worker_without_the_trust_fields_shows_none_of_them(browser: Any) -> None:
    """An older worker (no auth_string, warning or relayed): nothing is made up."""
    with open_page(browser) as page:
        w = ScriptedWorker(page)
        old = {"encrypted": True, "local_fingerprint": LOCAL_FP, "peer_fingerprint": PEER_FP}
        w.send({**SCRIPTED_STATUS, "security": old})
        for name in ("auth", "peer-key-pinned", "key-warning", "relayed-banner", "auth-banner"):
            assert not page.is_visible(tid(name)), name
        assert page.inner_text(tid("auth-string")) == ""
        assert PEER_FP in (page.text_content(tid("fingerprints")) or "")
        w.send({**SCRIPTED_STATUS, "security": {"encrypted": False, "auth_string": None}})
        assert not page.is_visible(tid("auth"))


def test_the_method_that_made_the_link_shows_next_to_the_path(browser: Any) -> None:
    """Issue 16: ``method`` (direct, birthday, predicted, relay) and the NAT hint are shown."""
    with open_page(browser) as page:
        w = ScriptedWorker(page)
        assert page.inner_text(tid("method")) == ""  # a worker that does not say: nothing
        hint = {"difficulty": "hard", "mapping": "endpoint-dependent", "sequential": True}
        nat = {"mapping": "endpoint-dependent", "filtering": "address-and-port-dependent"}
        w.send({**SCRIPTED_STATUS, "method": "birthday", "nat": {**nat, "hint": hint}})
        assert page.inner_text(tid("path")) == "direct"
        assert page.inner_text(tid("method")) == "method: birthday"
        assert "punching: hard (ports in order)" in page.inner_text(tid("nat-detail"))
        shot(page, "scripted-method-birthday")
        w.send({**SCRIPTED_STATUS, "state": "relayed", "path": "relayed", "method": "relay"})
        assert page.inner_text(tid("method")) == "method: relay"
        w.send({**SCRIPTED_STATUS, "state": "waiting_for_peer", "path": None, "method": None})
        assert page.inner_text(tid("method")) == ""


def test_both_address_families_show(browser: Any) -> None:
    """Issue 19: the IPv6 socket and endpoint beside the IPv4 ones, and the link's family."""
    with open_page(browser) as page:
        w = ScriptedWorker(page)
        for name in ("udp-local6", "udp-public6", "family"):  # an older worker: nothing
            assert page.inner_text(tid(name)) == "", name
        six = {
            "enabled": True,
            "socket": "[::]:40000",
            "endpoint": "[2001:db8::11]:40000",
            "reachable": True,
            "candidates": ["[2001:db8::11]:40000"],
            "nat66": False,
            "stun": {"server": "[2001:db8::3]:3478", "rtt_ms": 1.2},
        }
        peer6 = {"worker_id": PEER_ID, "endpoint": "[2001:db8::12]:40001", "rtt_ms": 0.3}
        w.send({**SCRIPTED_STATUS, "ipv6": six, "family": "ipv6", "peer": peer6})
        assert page.inner_text(tid("udp-local")) == "0.0.0.0:40000"
        assert page.inner_text(tid("udp-local6")) == "IPv6 [::]:40000"
        assert page.inner_text(tid("udp-public")) == "203.0.113.11:40000"
        assert page.inner_text(tid("udp-public6")) == "IPv6 [2001:db8::11]:40000"
        assert page.inner_text(tid("family")) == "over IPv6"
        assert page.inner_text(tid("peer-endpoint")) == "at [2001:db8::12]:40001"
        shot(page, "scripted-dual-stack")
        w.send({**SCRIPTED_STATUS, "ipv6": {**six, "nat66": True}, "family": "ipv4"})
        assert page.inner_text(tid("udp-public6")) == "IPv6 [2001:db8::11]:40000 (NAT66)"
        assert page.inner_text(tid("family")) == "over IPv4"
        nostun = {**six, "endpoint": None, "reachable": None, "stun": None}
        w.send({**SCRIPTED_STATUS, "ipv6": nostun, "family": "ipv4"})
        assert page.inner_text(tid("udp-public6")) == "IPv6 [2001:db8::11]:40000 (host)"
        w.send({**SCRIPTED_STATUS, "ipv6": {**nostun, "reachable": False}})
        assert page.inner_text(tid("udp-public6")) == "IPv6: no STUN answer"
        off = {"enabled": False, "socket": None, "endpoint": None, "reachable": None}
        w.send({**SCRIPTED_STATUS, "ipv6": off, "family": None, "path": None})
        assert page.inner_text(tid("udp-local6")) == "IPv6 off"
        assert page.inner_text(tid("udp-public6")) == "" and page.inner_text(tid("family")) == ""
