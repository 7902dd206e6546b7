"""The worker's web UI in headless Chromium, against real rendezvous and worker processes.

Chromium, Playwright and the page helpers are in ``tests/browser_support.py``; the page against a
scripted worker is in ``tests/ui/test_browser_page.py``.
"""

from __future__ import annotations

import csv
import io
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser_support import (
    ARTIFACTS,
    SERIES_PIXELS_JS,
    chart,
    launch_browser,
    ms,
    open_page,
    result_rows,
    shot,
    tid,
    wait_linked,
)
from tests.conftest import TIMEOUT_UNIT
from tests.procs import (
    UI_TOKEN,
    Proc,
    free_port,
    get_json,
    status,
    ui_page_url,
    wait_until,
)
from tests.ui.browser_cluster import Cluster

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Columns of the CSV download: contracts.md "Benchmark result records".
CSV_COLUMNS = [
    "run_id",
    "started_at",
    "local_worker",
    "peer_worker",
    "path",
    "role",
    "payload_size",
    "duration_s",
    "packets_sent",
    "packets_received",
    "lost",
    "lost_percent",
    "out_of_order",
    "duplicates",
    "jitter_ms",
    "mbps",
    "rtt_ms",
]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


@pytest.fixture(scope="module")
def cluster(browser: Any) -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def fresh_cluster(browser: Any) -> Iterator[Cluster]:
    """Workers of their own, for a test that needs an empty results table: the shared workers
    replay their earlier runs to every page that connects."""
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


def wait_result_or_error(page: Any, timeout: float) -> None:
    """Wait for a result row; an ``error`` from the worker (shown as a toast) fails at once."""
    page.wait_for_selector(f"{tid('bench-row')}, {tid('toast')}", timeout=ms(timeout))
    if page.locator(tid("bench-row")).count() == 0:
        pytest.fail(f"the worker answered with an error: {page.inner_text(tid('toasts'))}")


# -- status and chat ----------------------------------------------------------------------------


def test_status_and_chat_between_two_pages(cluster: Cluster, browser: Any) -> None:
    with (
        open_page(browser, cluster.url(cluster.a_http)) as a,
        open_page(browser, cluster.url(cluster.b_http)) as b,
    ):
        wait_linked(a)
        wait_linked(b)
        assert not a.is_visible(tid("conn-banner"))
        # the status card shows what the worker reports
        st = status(cluster.a_http)
        assert a.inner_text(tid("status-worker-id")) == cluster.a_id
        assert a.inner_text(tid("peer-id")) == cluster.b_id
        assert a.inner_text(tid("udp-public")) == st["udp_public"]
        assert a.inner_text(tid("path")) == "direct"
        assert cluster.a_id in b.inner_text(tid("peer-id"))
        # RTT arrives with a later status message once the link measured it
        a.wait_for_selector(f'{tid("rtt")}:not([data-rtt-ms=""])', timeout=ms(15))
        assert float(a.get_attribute(tid("rtt"), "data-rtt-ms")) >= 0

        # Enter sends; the text goes through the real workers to B
        box = a.locator(tid("chat-input"))
        box.click()
        box.press_sequentially("hello from A ✓")
        assert a.get_attribute(tid("chat-counter"), "data-bytes") == str(
            len("hello from A ✓".encode())
        )
        box.press("Enter")
        incoming = b.locator(f'{tid("chat-msg")}[data-direction="in"]')
        incoming.first.wait_for(timeout=ms(10))
        assert incoming.first.locator(tid("chat-text")).inner_text() == "hello from A ✓"
        outgoing = a.locator(f'{tid("chat-msg")}[data-direction="out"]')
        a.wait_for_selector(
            f'{tid("chat-msg")}[data-direction="out"][data-status="delivered"]', timeout=ms(10)
        )
        assert outgoing.count() == 1
        assert outgoing.first.locator(tid("chat-text")).inner_text() == "hello from A ✓"
        # the id the page matched the delivery on is the id B received
        assert outgoing.first.get_attribute("data-id") == incoming.first.get_attribute("data-id")
        assert box.input_value() == ""

        # Shift+Enter is a new line inside one message; a reply comes back the other way
        box.press_sequentially("line one")
        box.press("Shift+Enter")
        box.press_sequentially("line two")
        box.press("Enter")
        b.wait_for_function(
            "n => document.querySelectorAll("
            "'[data-testid=chat-msg][data-direction=in]').length >= n",
            arg=2,
            timeout=ms(10),
        )
        assert incoming.nth(1).locator(tid("chat-text")).text_content() == "line one\nline two"
        reply = b.locator(tid("chat-input"))
        reply.fill("hi A, B here")
        b.click(tid("chat-send"))
        a.wait_for_selector(f'{tid("chat-msg")}[data-direction="in"]', timeout=ms(10))
        assert a.locator(
            f'{tid("chat-msg")}[data-direction="in"] {tid("chat-text")}'
        ).inner_text() == ("hi A, B here")
        a.wait_for_selector(
            f'{tid("chat-msg")}[data-direction="out"][data-status="delivered"] >> nth=1',
            timeout=ms(10),
        )
        box.fill("a draft, not sent")
        shot(a, "chat-worker-a")
        shot(b, "chat-worker-b")


def test_chat_input_refuses_more_than_4096_utf8_bytes(cluster: Cluster, browser: Any) -> None:
    with open_page(browser, cluster.url(cluster.a_http)) as a:
        wait_linked(a)
        box = a.locator(tid("chat-input"))
        box.fill("é" * 2048)  # 4096 bytes in UTF-8, 2048 characters
        assert a.get_attribute(tid("chat-counter"), "data-bytes") == "4096"
        assert "4,096 / 4,096" in a.inner_text(tid("chat-counter")) or "4096 / 4096" in (
            a.inner_text(tid("chat-counter"))
        )
        box.press("End")
        box.press_sequentially("x")
        assert box.input_value() == "é" * 2048
        assert "4096 bytes" in a.inner_text(tid("chat-error"))
        box.fill("é" * 2049)  # a paste over the limit is refused as a whole
        assert box.input_value() == "é" * 2048
        box.fill("short again")
        assert a.inner_text(tid("chat-error")) == ""
        assert a.get_attribute(tid("chat-counter"), "data-bytes") == str(len("short again"))


# -- benchmark ----------------------------------------------------------------------------------


CHART_PIXELS_JS = """
() => {
  const c = document.querySelector('[data-testid=bench-chart]');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const css = getComputedStyle(document.documentElement);
  const cols = ['--series-sender', '--series-receiver'].map(v => {
    const h = css.getPropertyValue(v).trim().slice(1);
    return [0, 2, 4].map(i => parseInt(h.slice(i, i + 2), 16));
  });
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] < 200) continue;
    for (const [r, g, b] of cols) {
      if (Math.abs(d[i] - r) < 24 && Math.abs(d[i + 1] - g) < 24 && Math.abs(d[i + 2] - b) < 24) {
        n++;
        break;
      }
    }
  }
  return n;
}
"""


def test_benchmark_from_page_fills_table_chart_and_csv(cluster: Cluster, browser: Any) -> None:
    with (
        open_page(browser, cluster.url(cluster.a_http)) as a,
        open_page(browser, cluster.url(cluster.b_http)) as b,
    ):
        wait_linked(a)
        wait_linked(b)
        assert a.evaluate(CHART_PIXELS_JS) == 0  # nothing plotted before a run
        a.fill(tid("bench-size"), "1200")
        a.fill(tid("bench-rate"), "20")
        a.fill(tid("bench-duration"), "2")
        a.click(tid("bench-start"))
        wait_result_or_error(a, 30)
        rows = result_rows(a)
        assert rows, "no result row"
        assert all(r["payload_size"] == "1200" for r in rows)
        assert max(float(r["mbps"]) for r in rows) > 0
        assert max(int(r["packets_sent"] or 0) for r in rows) > 0
        assert max(int(r["packets_received"] or 0) for r in rows) > 0
        assert {r["role"] for r in rows} <= {"sender", "receiver"}
        # the live chart was fed by benchmark_progress messages and drew the series
        assert int(a.get_attribute(tid("bench-chart"), "data-points")) > 0
        assert a.evaluate(CHART_PIXELS_JS) > 50
        assert a.get_attribute(tid("bench-status"), "data-running") == "false"
        b.wait_for_timeout(500)
        shot(a, "bench-worker-a")
        shot(b, "bench-worker-b")

        # the CSV is built in the browser from the same rows, with the contract's columns
        with a.expect_download(timeout=ms(10)) as dl:
            a.click(tid("csv-download"))
        download = dl.value
        assert download.suggested_filename.endswith(".csv")
        text = Path(download.path()).read_text("utf-8")
        table = list(csv.DictReader(io.StringIO(text)))
        assert list(table[0].keys()) == CSV_COLUMNS
        assert len(table) == len(rows)
        # the table lists the newest run first, the CSV in arrival order
        for rec, row in zip(table, reversed(rows), strict=True):
            assert rec["mbps"] == row["mbps"]
            assert rec["role"] == row["role"]
            # rows name the worker of their role as local (A sent, B received)
            assert {rec["local_worker"], rec["peer_worker"]} == {cluster.a_id, cluster.b_id}
            if rec["role"] == "sender":
                assert rec["local_worker"] == cluster.a_id
            assert rec["path"] == "direct"
            assert rec["run_id"]
            assert rec["started_at"][:4].isdigit() and "T" in rec["started_at"]


def test_benchmark_stop_ends_a_long_run_early(fresh_cluster: Cluster, browser: Any) -> None:
    cluster = fresh_cluster
    with open_page(browser, cluster.url(cluster.a_http)) as a:
        wait_linked(a)
        a.fill(tid("bench-size"), "800")
        a.fill(tid("bench-rate"), "5")
        a.fill(tid("bench-duration"), "120")
        a.click(tid("bench-start"))
        a.wait_for_function(
            "() => +document.querySelector('[data-testid=bench-chart]').dataset.points > 0"
            " || document.querySelector('[data-testid=toast]') !== null",
            timeout=ms(20),
        )
        if a.locator(tid("toast")).count():
            pytest.fail(f"the worker answered with an error: {a.inner_text(tid('toasts'))}")
        assert a.is_enabled(tid("bench-stop"))
        assert not a.is_enabled(tid("bench-start"))
        a.click(tid("bench-stop"))
        wait_result_or_error(a, 30)
        rows = result_rows(a)
        assert all(r["payload_size"] == "800" for r in rows)
        assert min(float(r["duration_s"]) for r in rows) < 120
        a.wait_for_selector(f"{tid('bench-start')}:enabled", timeout=ms(10))


def test_benchmark_form_rejects_bad_payload_size(fresh_cluster: Cluster, browser: Any) -> None:
    cluster = fresh_cluster
    with open_page(browser, cluster.url(cluster.a_http)) as a:
        wait_linked(a)
        a.fill(tid("bench-size"), "65508")
        a.click(tid("bench-start"))
        assert "65507" in a.inner_text(tid("bench-error"))
        assert a.get_attribute(tid("bench-status"), "data-running") != "true"
        assert a.locator(tid("bench-row")).count() == 0


# -- reconnect after a worker restart -------------------------------------------------------------


def test_banner_while_worker_is_down_and_recovery_after_restart(
    cluster: Cluster, browser: Any
) -> None:
    http_port = free_port(socket.SOCK_STREAM)
    c_id = str(uuid.uuid4())
    args = [
        "worker",
        "--rendezvous",
        f"ws://127.0.0.1:{cluster.rv_port}",
        "--stun",
        f"127.0.0.1:{cluster.stun_port}",
        "--udp-port",
        "0",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--id",
        c_id,
        "--ui-token",
        UI_TOKEN,
    ]

    def start() -> Proc:
        proc = Proc("ui-worker-c", args)
        wait_until(
            lambda: get_json(f"http://127.0.0.1:{http_port}/health")["worker_id"] == c_id,
            15,
            "worker C health",
            proc,
        )
        return proc

    c = start()
    try:
        with open_page(browser, ui_page_url(http_port)) as page:
            page.wait_for_selector(f'{tid("ws-state")}:text("live")', timeout=ms(10))
            page.wait_for_selector(f'{tid("status-worker-id")}:text("{c_id}")', timeout=ms(10))
            assert not page.is_visible(tid("conn-banner"))
            c.kill()
            page.wait_for_selector(tid("conn-banner"), state="visible", timeout=ms(10))
            assert "reconnecting" in page.inner_text(tid("conn-banner")).lower()
            assert page.is_disabled(tid("chat-send"))
            assert page.is_disabled(tid("bench-start"))
            shot(page, "worker-down-banner")
            c = start()
            page.wait_for_selector(tid("conn-banner"), state="hidden", timeout=ms(20))
            page.wait_for_selector(f'{tid("ws-state")}:text("live")', timeout=ms(10))
            assert page.inner_text(tid("status-worker-id")) == c_id
            assert page.get_attribute(tid("status-state"), "data-state") != ""
            shot(page, "worker-restarted")
    finally:
        c.stop()


def test_status_endpoint_matches_the_page(cluster: Cluster, browser: Any) -> None:
    """The page renders the same status object ``GET /status`` returns (no hidden fields)."""
    with open_page(browser, cluster.url(cluster.b_http)) as b:
        wait_linked(b)
        st = status(cluster.b_http)
        assert b.inner_text(tid("status-worker-id")) == st["worker_id"]
        assert b.inner_text(tid("udp-local")) == st["udp_local"]
        assert b.inner_text(tid("udp-public")) == st["udp_public"]
        assert b.inner_text(tid("peer-id")) == st["peer"]["worker_id"]
        assert st["peer"]["endpoint"] in b.inner_text(tid("peer-endpoint"))
        nat = st.get("nat")
        if isinstance(nat, dict) and nat.get("classic"):
            b.wait_for_selector(f'{tid("nat")}:text("{nat["classic"]}")', timeout=ms(10))


def test_page_shows_both_fingerprints_matching_the_peer(browser: Any, cluster: Cluster) -> None:
    """Two people compare fingerprints: A's page shows A's key and B's, B's page the same pair."""
    a_sec = status(cluster.a_http)["security"]
    b_sec = status(cluster.b_http)["security"]
    assert a_sec["encrypted"] and b_sec["encrypted"]
    assert a_sec["peer_fingerprint"] == b_sec["local_fingerprint"]
    assert b_sec["peer_fingerprint"] == a_sec["local_fingerprint"]
    for port, sec in ((cluster.a_http, a_sec), (cluster.b_http, b_sec)):
        with open_page(browser, cluster.url(port)) as page:
            fp = page.get_by_test_id("fingerprints")
            page.wait_for_function(
                "fp => document.querySelector('[data-testid=fingerprints]')"
                ".textContent.includes(fp)",
                arg=sec["peer_fingerprint"],
                timeout=10000 * TIMEOUT_UNIT,
            )
            text = fp.text_content() or ""
            assert sec["local_fingerprint"] in text and sec["peer_fingerprint"] in text
            assert (page.get_by_test_id("security").text_content() or "").startswith("on")


# -- two real runs ---------------------------------------------------------------------------------


def _rows_by_run(page: Any) -> dict[str, set[str]]:
    runs: dict[str, set[str]] = {}
    for r in result_rows(page):
        runs.setdefault(r["run_id"], set()).add(r["role"])
    return runs


def _wait_rows(page: Any, n: int, timeout: float) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('[data-testid=bench-row]').length >= n"
        " || document.querySelector('[data-testid=toast]') !== null",
        arg=n,
        timeout=ms(timeout),
    )
    if page.locator(tid("toast")).count():
        pytest.fail(f"the worker answered with an error: {page.inner_text(tid('toasts'))}")


def test_two_real_runs_keep_their_own_series_and_fit_1280_px(
    fresh_cluster: Cluster, browser: Any
) -> None:
    """A runs, then B runs: A's page keeps A's run (sent and received) until B's starts, then
    shows B's run alone; the table holds both runs by run id and fits a 1280 px window."""
    cluster = fresh_cluster
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
    a = context.new_page()
    b = context.new_page()
    errors: list[str] = []
    for p in (a, b):
        p.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        a.goto(cluster.url(cluster.a_http))
        b.goto(cluster.url(cluster.b_http))
        wait_linked(a)
        wait_linked(b)
        for page, rate in ((a, "20"), (b, "10")):
            page.fill(tid("bench-size"), "1000")
            page.fill(tid("bench-rate"), rate)
            page.fill(tid("bench-duration"), "2")
        a.click(tid("bench-start"))
        _wait_rows(a, 2, 30)
        first = _rows_by_run(a)
        assert list(first.values()) == [{"sender", "receiver"}]
        (r1,) = first
        a.wait_for_function(
            "rid => document.querySelector('[data-testid=bench-chart]').dataset.runId === rid",
            arg=r1,
            timeout=ms(5),
        )
        # the sender's page keeps both series of its run
        assert int(chart(a, "sender-points")) > 0 and int(chart(a, "receiver-points")) > 0
        assert a.evaluate(SERIES_PIXELS_JS, "sender") > 50
        assert a.evaluate(SERIES_PIXELS_JS, "receiver") > 50
        for role in ("sender", "receiver"):
            elapsed = [float(t) for t in chart(a, f"{role}-elapsed").split(",")]
            assert elapsed == sorted(elapsed)
        assert a.inner_text(tid("legend-sender")) == "sent by this worker"
        a.wait_for_selector(f"{tid('bench-start')}:enabled", timeout=ms(10))
        b.wait_for_selector(f"{tid('bench-start')}:enabled", timeout=ms(10))

        b.click(tid("bench-start"))  # B sends to A this time
        _wait_rows(a, 4, 30)
        runs = _rows_by_run(a)
        assert len(runs) == 2 and all(v == {"sender", "receiver"} for v in runs.values())
        (r2,) = set(runs) - {r1}
        a.wait_for_function(
            "rid => document.querySelector('[data-testid=bench-chart]').dataset.runId === rid",
            arg=r2,
            timeout=ms(5),
        )
        assert int(chart(a, "receiver-points")) > 0
        assert int(chart(a, "sender-points")) == 0  # A did not send in B's run
        assert a.inner_text(tid("legend-receiver")) == "received by this worker"
        # who measured what, on A's page
        for row in a.locator(tid("bench-row")).all():
            role = row.locator('td[data-field="role"]').get_attribute("data-value")
            rid = row.get_attribute("data-run-id")
            who = row.locator(tid("result-who")).inner_text()
            a_measured = (rid == r1) == (role == "sender")
            assert who == (
                f"this worker · {cluster.a_id[:8]}" if a_measured else f"peer · {cluster.b_id[:8]}"
            )
        sizes = a.locator(tid("results-wrap")).evaluate("e => [e.scrollWidth, e.clientWidth]")
        assert sizes[0] <= sizes[1], f"the results table scrolls: {sizes}"
        a.screenshot(path=str(ARTIFACTS / "two-runs-worker-a-1280.png"), full_page=True)
        b.screenshot(path=str(ARTIFACTS / "two-runs-worker-b-1280.png"), full_page=True)
        assert errors == []
    finally:
        context.close()


# -- history on reload ----------------------------------------------------------------------------


def _chat_ids(page: Any) -> list[str]:
    return [m.get_attribute("data-id") or "" for m in page.locator(tid("chat-msg")).all()]


def _row_keys(page: Any) -> list[tuple[str, str]]:
    return [(r["run_id"], r["role"]) for r in result_rows(page)]


def test_reload_keeps_chat_and_results_without_duplicates(cluster: Cluster, browser: Any) -> None:
    """The worker replays its recent chat and result rows to a page that connects; a reload
    shows the same log and table, each message and row once, delivery marks included."""
    with open_page(browser, cluster.url(cluster.a_http)) as a:
        wait_linked(a)
        text = f"kept across a reload {uuid.uuid4().hex[:6]}"
        box = a.locator(tid("chat-input"))
        box.fill(text)
        box.press("Enter")
        a.wait_for_selector(
            f'{tid("chat-msg")}[data-direction="out"][data-status="delivered"]', timeout=ms(10)
        )
        before_rows = len(result_rows(a))
        a.fill(tid("bench-size"), "1000")
        a.fill(tid("bench-rate"), "10")
        a.fill(tid("bench-duration"), "1")
        a.click(tid("bench-start"))
        _wait_rows(a, before_rows + 2, 30)
        chats, rows = _chat_ids(a), _row_keys(a)
        assert len(chats) == len(set(chats)) and len(rows) == len(set(rows))
        texts = [t.inner_text() for t in a.locator(tid("chat-text")).all()]
        assert texts.count(text) == 1

        a.reload()
        wait_linked(a)
        a.wait_for_function(
            "n => document.querySelectorAll('[data-testid=bench-row]').length >= n",
            arg=len(rows),
            timeout=ms(10),
        )
        a.wait_for_timeout(500)  # anything replayed twice would have arrived by now
        assert _chat_ids(a) == chats
        assert sorted(_row_keys(a)) == sorted(rows)
        assert [t.inner_text() for t in a.locator(tid("chat-text")).all()] == texts
        mine = a.locator(f'{tid("chat-msg")}[data-direction="out"]').filter(has_text=text)
        assert mine.count() == 1
        assert mine.first.get_attribute("data-status") == "delivered"
        shot(a, "reload-keeps-history")
