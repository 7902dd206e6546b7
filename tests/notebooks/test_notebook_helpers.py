"""p2plab.notebook: the local lab, the chat panel against real workers, and the plots."""

from __future__ import annotations

import asyncio
import math

import pandas as pd
import pytest

from p2plab.lab.sim import sim_matrix
from p2plab.notebook import (
    ChatPanel,
    matrix_grid,
    outcome_table,
    plot_loss,
    plot_matrix,
    plot_throughput,
    start_local_lab,
)
from tests.conftest import TIMEOUT_UNIT


async def _until(predicate, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (widget state has no event to wait on) for up to ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout * TIMEOUT_UNIT
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(60)
async def test_chat_panel_sends_shows_and_benchmarks() -> None:
    lab = await start_local_lab(connect_timeout=20 * TIMEOUT_UNIT)
    pa = pb = None
    try:
        assert lab.a.state == lab.b.state == "connected"
        pa, pb = ChatPanel(lab.a), ChatPanel(lab.b)
        await _until(lambda: "connected" in pa.status_line.value)
        pa.text.value = "hello from the panel"
        pa.send_button.click()  # what a click in the notebook does
        assert pa.text.value == ""
        await _until(lambda: pb.lines and pa.lines and pa.lines[0]["delivered"])
        assert [(x["direction"], x["text"]) for x in pb.lines] == [("in", "hello from the panel")]
        assert "hello from the panel" in pb.log_view.value
        assert "&#10003;" in pa.log_view.value  # the delivery mark
        assert pa.send("") is None

        pa.duration.value, pa.payload.value, pa.rate.value = 0.3, 1000, 20.0
        result = await asyncio.wait_for(pa.start_benchmark(), 30 * TIMEOUT_UNIT)
        assert result is not None, pa.errors
        assert result.payload_size == 1000
        assert result.peer_view is not None and result.peer_view.packets_received > 0
        assert pa.last_result is not None and "1000 B" in pa.bench_view.value
        assert pa.errors == []
    finally:
        for p in (pa, pb):
            if p is not None:
                p.close()
        await lab.stop()
    assert lab.a.state == "stopped"


@pytest.mark.timeout(60)
async def test_panel_reports_a_send_without_a_peer() -> None:
    lab = await start_local_lab(workers=1)
    try:
        panel = ChatPanel(lab.a)
        assert panel.send("nobody there") is None
        assert panel.errors and "not sent" in panel.errors[0]
        panel.close()
    finally:
        await lab.stop()


def test_matrix_grid_from_simulator_rows() -> None:
    rows = sim_matrix(["open", "port-restricted", "symmetric"], seed=3)
    labels, columns, codes, texts = matrix_grid(rows)
    assert columns == ["open", "port-restricted", "symmetric"]
    assert labels == [*columns, "same LAN"]
    for r in rows:
        y = 3 if r["same_lan"] else columns.index(r["profile_a"])
        x = columns.index(r["profile_b"])
        relayed = r["fallback"] == "relayed"  # the engine fell back to the relay
        assert codes[y][x] == (2.0 if r["outcome"] == "direct" else 3.0 if relayed else 0.0)
    # symmetric x symmetric needs the relay; port-restricted x symmetric goes direct by
    # birthday punching (issue 16), with a time to connect like any direct cell
    assert texts[2][2] == "failed\n→ relay" and codes[2][2] == 3.0
    assert texts[1][2].endswith("s") and codes[1][2] == 2.0
    assert texts[0][0].endswith("s")  # time to connect
    assert codes[3][0] == 2.0  # same-LAN "open": two public hosts
    table = outcome_table(rows)
    assert table.loc["port-restricted", "symmetric"] == "direct"
    assert table.loc["symmetric", "symmetric"] == "failed → relay"
    assert table.loc["symmetric", "open"] == "direct"


def test_matrix_grid_mirrors_unordered_kernel_rows_and_flags_disagreement() -> None:
    rows = [
        {"profile_a": "full", "profile_b": "symmetric", "same_lan": False, "outcome": "direct",
         "expected": "direct", "connect_s": 0.5},
        {"profile_a": "symmetric", "profile_b": "symmetric", "same_lan": False,
         "outcome": "direct", "expected": "failed", "connect_s": 1.25},
    ]  # fmt: skip
    labels, columns, codes, texts = matrix_grid(rows)
    assert columns == ["full", "symmetric"] and labels == columns
    assert codes[0][1] == codes[1][0] == 2.0 and texts[1][0] == "0.50s"
    assert texts[1][1] == "1.25s !"
    assert math.isnan(codes[0][0])


def test_plots_draw_what_they_are_given() -> None:
    df = pd.DataFrame(
        {
            "role": ["sender", "receiver", "sender"],
            "payload_size": [1200, 1200, 64],
            "sent_mbps": [90.0, 90.0, 20.0],
            "received_mbps": [80.0, 80.0, 19.0],
            "lost_percent": [10.0, 10.0, 5.0],
        }
    )
    fig = plot_throughput(df)
    (ax,) = fig.axes
    sent, received = ax.get_lines()
    assert list(sent.get_xdata()) == [64, 1200]  # sender rows only, sorted by size
    assert list(received.get_ydata()) == [19.0, 80.0]
    fig = plot_loss(df)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [5.0, 10.0]
    fig = plot_matrix(sim_matrix(["open", "symmetric"], same_lan=()))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["open", "symmetric"]


def _http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.timeout(60)
async def test_local_lab_as_a_context_manager_and_awaited(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from p2plab.notebook import local_lab

    async with local_lab(http=True, connect_timeout=20 * TIMEOUT_UNIT) as lab:
        a, b = lab.workers
        assert a.state == b.state == "connected"
        assert a.peer_id == b.worker_id
        printed = capsys.readouterr().out
        for w in (a, b):
            assert w.ui_url is not None and w.ui_url in printed
            # the printed address opens the page; without its token the page stays shut
            assert await asyncio.to_thread(_http_status, w.ui_url) == 200
            assert await asyncio.to_thread(_http_status, w.ui_url.split("?")[0]) == 401
    assert a.state == b.state == "stopped"

    lab = await local_lab(workers=1)  # a notebook keeps it across cells
    try:
        assert [w.state for w in lab.workers] != ["stopped"]
        assert lab.workers[0].ui_url is None  # no HTTP unless asked
    finally:
        await lab.stop()
    assert lab.workers[0].state == "stopped"


# -- the chat panel: Enter, result labels, the live chart (issue 15 item 15) ---------------------


@pytest.mark.timeout(90)
async def test_chat_panel_enter_sends_and_results_are_labelled_by_run_and_direction() -> None:
    lab = await start_local_lab(connect_timeout=20 * TIMEOUT_UNIT)
    pa = pb = None
    try:
        pa, pb = ChatPanel(lab.a), ChatPanel(lab.b)
        # the box tells the front end to keep what is typed until Enter (or leaving the box)
        assert pa.text.continuous_update is False
        assert lab.a.stats["chats_out"] == 0
        # Enter: the front end commits the value, as the comm does (Widget.set_state)
        pa.text.set_state({"value": "sent with Enter"})
        assert lab.a.stats["chats_out"] == 1 and pa.text.value == ""
        await _until(lambda: pb.lines and pa.lines and pa.lines[0]["delivered"])
        assert pb.transcript() == "<- sent with Enter"
        assert pa.transcript() == "-> sent with Enter (delivered)"

        # A sends to B at 20 Mbit/s, then B sends to A at 10: both panels see both runs
        pa.duration.value, pa.payload.value, pa.rate.value = 1.5, 1000, 20.0
        ra = await asyncio.wait_for(pa.start_benchmark(), 30 * TIMEOUT_UNIT)
        assert ra is not None, pa.errors
        pb.duration.value, pb.payload.value, pb.rate.value = 0.5, 800, 10.0
        rb = await asyncio.wait_for(pb.start_benchmark(), 30 * TIMEOUT_UNIT)
        assert rb is not None, pb.errors
        both = {"sender", "receiver"}
        for p in (pa, pb):
            await _until(lambda p=p: [set(v) for v in p.runs.values()] == [both, both])
        assert list(pa.runs) == list(pb.runs) == [ra.run_id, rb.run_id]
        a_new, a_old = pa.result_lines()
        b_new, b_old = pb.result_lines()
        assert a_old.startswith(f"run {ra.run_id}, this worker -> peer: 1000 B, target 20.0")
        assert b_old.startswith(f"run {ra.run_id}, peer -> this worker: 1000 B, target 20.0")
        assert a_new.startswith(f"run {rb.run_id}, peer -> this worker: 800 B, target 10.0")
        assert b_new.startswith(f"run {rb.run_id}, this worker -> peer: 800 B, target 10.0")
        sent = ra.mbps
        assert f"sent {sent:.1f} Mbit/s" in a_old and f"sent {sent:.1f} Mbit/s" in b_old
        for line in (a_new, a_old, b_new, b_old):
            assert "received " in line and "lost " in line and "jitter " in line
        # both runs are listed, newest first; no raw dicts anywhere
        for p in (pa, pb):
            view = p.results_view.value
            assert view.index(f"run {rb.run_id}") < view.index(f"run {ra.run_id}")
            for shown in (view, p.bench_view.value, p.log_view.value):
                assert "{" not in shown and "'" not in shown.replace("style='", "")

        # the live chart followed the runs by run id and ends on the last one
        await pa.chart.idle()
        assert pa.chart.run_id == rb.run_id and pa.chart.draws >= 2
        assert pa.chart.points["receiver"], "A received in B's run"
        assert bytes(pa.chart.image.value).startswith(b"\x89PNG")
        assert pa.chart.image.layout.display == ""
        # a late interval of A's (older) run changes neither the chart nor the result line
        shown, draws = pa.bench_view.value, pa.chart.draws
        late_interval = {"type": "benchmark_progress", "role": "receiver", "run_id": ra.run_id}
        pa.handle({**late_interval, "elapsed_s": 9.0, "mbps": 1.0})
        assert pa.chart.run_id == rb.run_id and pa.chart.draws == draws
        assert pa.bench_view.value == shown and shown.startswith(f"run {rb.run_id}")
        # a panel opened later starts with the worker's recent chat and results
        late = ChatPanel(lab.a)
        try:
            assert late.transcript() == pa.transcript()
            assert late.result_lines() == pa.result_lines()
        finally:
            late.close()
    finally:
        for p in (pa, pb):
            if p is not None:
                p.close()
        await lab.stop()


async def test_live_chart_is_throttled_draws_the_last_points_and_follows_run_ids() -> None:
    from p2plab.notebook.live_chart import LiveChart

    def progress(run: str, role: str, t: float, mbps: float) -> dict[str, object]:
        return {
            "type": "benchmark_progress",
            "run_id": run,
            "role": role,
            "elapsed_s": t,
            "mbps": mbps,
        }

    chart = LiveChart(min_interval=3600.0)
    assert chart.image.layout.display == "none"
    chart.add(progress("1", "sender", 1.0, 20.0))
    # drawn in a thread: the event loop (the notebook's workers) runs on meanwhile
    idle = asyncio.ensure_future(chart.idle())
    turns = 0
    while not idle.done():
        turns += 1
        await asyncio.sleep(0)
    assert turns > 1
    assert chart.draws == 1 and bytes(chart.image.value).startswith(b"\x89PNG")
    chart.add(progress("1", "receiver", 2.0, 19.0))
    chart.add(progress("1", "receiver", 1.0, 18.0))  # late and out of order: same run
    await chart.idle()
    assert chart.draws == 1  # throttled
    assert chart.points["receiver"] == [(2.0, 19.0), (1.0, 18.0)]
    chart.finish("0")  # another run's end does not redraw this one
    await chart.idle()
    assert chart.draws == 1
    chart.finish("1")
    await chart.idle()
    assert chart.draws == 2
    chart.add(progress("2", "receiver", 1.0, 5.0))  # a new run id starts a new chart
    assert chart.run_id == "2" and chart.points == {"sender": [], "receiver": [(1.0, 5.0)]}
    chart.add({"type": "benchmark_progress", "run_id": "2", "role": "x", "mbps": "bad"})
    assert chart.points["receiver"] == [(1.0, 5.0)]
    chart.close()

    fast = LiveChart(min_interval=0.0)
    fast.add(progress("3", "sender", 1.0, 1.0))
    fast.add(progress("3", "sender", 2.0, 2.0))  # while the first is drawn: once more after it
    await fast.idle()
    assert fast.draws == 2
    fast.close()
