"""Benchmarks between two real Workers on loopback (rendezvous in-process).

No timing assertions: every check is on counts, which must be exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from p2plab.aio.bench import Benchmark, stop_benchmark_from_ui
from p2plab.aio.endpoint import mmsg_supported
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.core import bench as cb
from p2plab.core.events import BenchmarkFinished, BenchmarkProgress
from p2plab.errors import BenchmarkError, NotConnected
from p2plab.results import (
    CSV_COLUMNS,
    INTERVAL_COLUMNS,
    intervals_to_dataframe,
    results_to_dataframe,
    results_to_json,
    write_csv,
    write_intervals_csv,
)
from rendezvous_service_code.main import RendezvousServer
from tests.conftest import TIMEOUT_UNIT, until

T = 20 * TIMEOUT_UNIT


@contextlib.asynccontextmanager
async def two_workers(http: bool = False) -> AsyncIterator[tuple[Worker, Worker]]:
    rv = await RendezvousServer.start("127.0.0.1", 0)
    cfg = dict(
        rendezvous_url=rv.ws_url,
        http_port=0 if http else None,
        udp_host="127.0.0.1",
        nat_report=False,
    )
    a, b = Worker(WorkerConfig(**cfg)), Worker(WorkerConfig(**cfg))  # type: ignore[arg-type]
    try:
        await a.start()
        await b.start()
        await a.wait_connected(T)
        await b.wait_connected(T)
        yield a, b
    finally:
        await a.stop()
        await b.stop()
        await rv.close()


def drop_every(worker: Worker, n: int) -> list[int]:
    """Make ``worker``'s endpoint skip every n-th datagram handed to ``send_segments``.

    Datagrams go out in seq order, so the k-th one (from 0) carries seq k: drop those with
    ``k % n == n - 1``.  Works on sealed datagrams too (it never reads them) and keeps GSO.
    """
    ep = worker.endpoint
    assert ep is not None
    orig = ep.send_segments
    dropped: list[int] = []
    k = 0  # datagrams consumed so far (sent or dropped)

    def send_segments(buf: Any, size: int, count: int, addr: Any, *, gso: bool = True) -> int:
        nonlocal k
        mv = memoryview(buf)
        i = 0
        while i < count:
            j = i
            while j < count and (k + j - i) % n != n - 1:
                j += 1
            if j > i:
                got = orig(mv[i * size : j * size], size, j - i, addr, gso=gso)
                k += got
                if got < j - i:
                    return i + got
            if j < count:
                dropped.append(k)
                k += 1
                j += 1
            i = j
        return count

    ep.send_segments = send_segments  # type: ignore[method-assign]
    return dropped


@pytest.mark.parametrize(
    ("gso", "gro", "encrypt", "mmsg"),
    [
        (False, False, True, True),
        (False, False, True, False),
        (False, True, True, True),
        (True, False, True, True),
        (True, True, True, True),
        (True, True, False, True),
        (False, False, False, True),
        (False, False, False, False),
    ],
)
async def test_run_with_injected_drops_counts_exactly(
    gso: bool, gro: bool, encrypt: bool, mmsg: bool
) -> None:
    async with two_workers() as (a, b):
        assert b.endpoint is not None and a.endpoint is not None
        b.endpoint.set_gro(gro)
        a.endpoint.mmsg = b.endpoint.mmsg = mmsg and mmsg_supported()
        dropped = drop_every(a, 7)
        # The run ends on a count, not a clock: stopped once 15 datagrams were dropped (105
        # went), however slowly a loaded machine sends (once 1 s sent only 12 of them).
        run = asyncio.ensure_future(
            Benchmark(a, gso=gso, encrypt=encrypt).run(
                duration_s=T, payload_size=1200, rate_mbps=40
            )
        )
        await until(lambda: len(dropped) >= 15 or run.done(), "15 injected drops")
        assert a.benchmark.stop() or run.done()
        r = await asyncio.wait_for(run, T)
        assert r.role == "sender" and r.peer_view is not None
        rx = r.peer_view
        assert r.packets_sent >= 105
        assert len(dropped) == r.packets_sent // 7
        assert rx.packets_received == r.packets_sent - len(dropped)
        assert rx.lost == len(dropped) == r.lost
        assert rx.duplicates == 0
        assert rx.bytes_received == rx.packets_received * 1200
        assert sum(iv.packets for iv in rx.intervals) == rx.packets_received
        assert r.gso == (gso and a.endpoint.gso)
        assert rx.gro == b.endpoint.gro
        assert r.encrypted is encrypt and rx.encrypted is encrypt
        assert rx.auth_failures == 0 and r.flow_control
        # Which batching ran: sendmmsg for plain sends, the recvmmsg reader for the data.
        batched = mmsg and mmsg_supported()
        assert (a.endpoint.stats["mmsg_sends"] > 0) is (batched and not r.gso)
        assert (b.endpoint.stats["mmsg_reads"] > 0) is batched


async def test_a_loop_held_past_the_report_wait_still_gets_the_report() -> None:
    """A blocking call on the event loop (a notebook's chart once held it 14 s) while the report
    is due: the wait's timer runs late, the report is read after it, and the run has it."""
    async with two_workers() as (a, b):
        answering = b.benchmark.answering
        on_end = answering.on_end

        def held_on_end(run_id: int, obj: dict[str, Any]) -> None:
            time.sleep(2.0)  # the point: the loop (both workers) is held
            on_end(run_id, obj)

        answering.on_end = held_on_end  # type: ignore[method-assign]
        r = await asyncio.wait_for(
            Benchmark(a, timeout_s=1.0).run(duration_s=0.2, payload_size=1000, rate_mbps=10), T
        )
        assert r.peer_view is not None and r.peer_view.packets_received == r.packets_sent
        assert a.stats["bench_loop_stalls"] == 1


async def test_both_ends_publish_both_views_and_chat_flows_during_a_run() -> None:
    async with two_workers() as (a, b):
        qa, qb = a.ui_subscribe(), b.ui_subscribe()
        run = asyncio.ensure_future(
            Benchmark(a).run(duration_s=1.5, payload_size=1000, rate_mbps=30, interval_s=0.5)
        )
        await asyncio.sleep(0.3)
        a.send_chat("during the run")
        r = await asyncio.wait_for(run, T)

        async def collect(q: asyncio.Queue[dict[str, Any]], want: int) -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            while sum(m["type"] == "benchmark_result" for m in got) < want:
                got.append(await asyncio.wait_for(q.get(), T))
            return got

        ma, mb = await collect(qa, 2), await collect(qb, 2)
        for msgs in (ma, mb):
            results = [m for m in msgs if m["type"] == "benchmark_result"]
            assert {m["role"] for m in results} == {"sender", "receiver"}
            assert {m["run_id"] for m in results} == {r.run_id}
            for m in results:
                for key in ("payload_size", "duration_s", "packets_sent", "packets_received"):
                    assert key in m
                assert m["packets_sent"] == r.packets_sent
                assert m["lost"] == 0
        progress_b = [m for m in mb if m["type"] == "benchmark_progress"]
        assert progress_b and all(m["role"] == "receiver" for m in progress_b)
        assert any(m["type"] == "benchmark_progress" and m["role"] == "sender" for m in ma)
        assert any(
            m["type"] == "chat" and m["direction"] == "in" and m["text"] == "during the run"
            for m in mb
        ) or await _wait_chat(qb)


async def _wait_chat(q: asyncio.Queue[dict[str, Any]]) -> bool:
    while True:
        m = await asyncio.wait_for(q.get(), T)
        if m["type"] == "chat" and m["text"] == "during the run":
            return True


async def test_receive_direction_and_rtt() -> None:
    async with two_workers() as (a, _b):
        r = await asyncio.wait_for(
            Benchmark(a).run(duration_s=0.5, payload_size=200, rate_mbps=10, direction="receive"),
            T,
        )
        assert r.role == "receiver" and r.local_worker == a.worker_id
        assert r.path == "direct" and r.peer_view is not None and r.peer_view.path == "direct"
        assert r.peer_view is not None and r.peer_view.role == "sender"
        assert r.packets_received == r.packets_sent > 0
        rtt = await asyncio.wait_for(Benchmark(a).rtt(count=200), T)
        assert rtt.received == 200 and rtt.lost == 0
        assert 0 < rtt.min_ms <= rtt.p50_ms <= rtt.p90_ms <= rtt.p99_ms <= rtt.max_ms
        # Both workers share this loop: neither may block or spin in it.
        assert rtt.wait == "event-loop" and rtt.busy_poll_us == 0


async def test_peer_refuses_a_request_it_cannot_serve_and_says_why() -> None:
    async with two_workers() as (a, b):
        busy = asyncio.create_task(Benchmark(b).run(duration_s=30, payload_size=200, rate_mbps=5))
        try:
            await until(lambda: a.benchmark.answering.receiving is not None, "b's run to start")
            # Not a timeout: b answers at once that it is busy.
            with pytest.raises(BenchmarkError, match="already running"):
                await asyncio.wait_for(
                    Benchmark(a).run(duration_s=0.5, payload_size=200, direction="receive"), T
                )
        finally:
            Benchmark(b).stop()
            await asyncio.wait_for(busy, T)


async def test_stop_from_the_receiving_ui_still_gives_both_ends_a_result() -> None:
    async with two_workers() as (a, b):
        q = b.ui_subscribe()
        run = asyncio.create_task(Benchmark(a).run(duration_s=60, payload_size=200, rate_mbps=5))
        # Stop once datagrams flow (stopping before the first one is another test's case).
        await until(
            lambda: (rec := b.benchmark.answering.receiving) is not None and rec.rx.packets > 0,
            "a's datagrams to arrive",
        )
        assert await stop_benchmark_from_ui(b) is None
        r = await asyncio.wait_for(run, T)  # the sender's run returns, with the peer's report
        assert r.role == "sender" and r.duration_s < 60
        assert r.peer_view is not None and r.peer_view.packets_received == r.packets_sent > 0
        roles = set()
        async with asyncio.timeout(T):
            while roles != {"sender", "receiver"}:
                m = await q.get()
                if m["type"] == "benchmark_result" and m["run_id"] == r.run_id:
                    roles.add(m["role"])


async def test_unknown_control_messages_are_dropped_and_counted() -> None:
    async with two_workers() as (a, b):
        a.send_control({"type": "no_such_control", "x": 1})
        await until(lambda: b.status()["stats"]["controls_unknown"] == 1, "the count")
        r = await asyncio.wait_for(Benchmark(a).run(duration_s=0.2, payload_size=200), T)
        assert r.packets_received == r.packets_sent > 0  # and the link carries on


async def test_ui_websocket_start_benchmark(tmp_path: Path) -> None:
    async with two_workers(http=True) as (a, _b):
        assert a.ui_url is not None
        ws_url = a.ui_url.replace("http://", "ws://").replace("/?token=", "/ui_ws?token=")
        async with connect(ws_url, open_timeout=T) as ws:
            await ws.send(json.dumps({"type": "start_benchmark", "duration_s": 0.2,
                                      "payload_size": 64000, "rate_mbps": 0}))  # fmt: skip
            await ws.send(json.dumps({"type": "start_benchmark", "duration_s": 1.5,
                                      "payload_size": 1200, "rate_mbps": 20}))  # fmt: skip
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(T):
                while sum(m["type"] == "benchmark_result" for m in seen) < 2:
                    seen.append(json.loads(await ws.recv()))
            # The second start came while the first ran: refused with an error.
            assert any(m["type"] == "error" and "already running" in m["message"] for m in seen)
            big = [m for m in seen if m["type"] == "benchmark_result"][:2]
            assert {m["role"] for m in big} == {"sender", "receiver"}
            assert all(m["payload_size"] == 64000 and m["fragmented"] for m in big)
            assert any(m["type"] == "benchmark_progress" for m in seen)
            await ws.send(json.dumps({"type": "start_benchmark", "payload_size": 10}))
            async with asyncio.timeout(T):
                while True:
                    m = json.loads(await ws.recv())
                    if m["type"] == "error":
                        assert "payload_size" in m["message"]
                        break


async def test_results_export_columns(tmp_path: Path) -> None:
    async with two_workers() as (a, _b):
        rs = await asyncio.wait_for(
            Benchmark(a).sweep([64, 1500], duration_s=0.4, rate_mbps=10, progress=True), T
        )
    assert [r.payload_size for r in rs] == [64, 1500]
    assert rs[1].fragmented and not rs[0].fragmented
    path = write_csv(rs, tmp_path / "runs.csv", both_views=True)
    with path.open() as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0][: len(CSV_COLUMNS)]) == CSV_COLUMNS
    assert len(rows) == 1 + 4
    ipath = write_intervals_csv(rs, tmp_path / "iv.csv")
    with ipath.open() as fh:
        irows = list(csv.reader(fh))
    assert tuple(irows[0]) == INTERVAL_COLUMNS and len(irows) > 2
    df = results_to_dataframe(rs, both_views=True)
    assert tuple(df.columns[: len(CSV_COLUMNS)]) == CSV_COLUMNS and len(df) == 4
    idf = intervals_to_dataframe(rs)
    assert tuple(idf.columns) == INTERVAL_COLUMNS
    assert int(idf["packets"].sum()) == sum(r.packets_received for r in rs)
    data = json.loads(results_to_json(rs))
    assert data[0]["peer_view"]["role"] == "receiver" and data[0]["intervals"]


async def test_answers_refused_as_not_connected_yet_are_queued_and_sent_in_order() -> None:
    # The race seen in benchmarks/loopback.py: the peer's bench_start arrives between the
    # receiver's session connecting and its worker calling itself connected.
    async with two_workers() as (a, b):
        orig = b.send_control
        refused: list[str] = []
        sent: list[str] = []

        def flaky(obj: dict[str, Any]) -> None:
            if len(refused) < 3:
                refused.append(str(obj.get("type")))
                raise NotConnected("not connected yet")
            sent.append(str(obj.get("type")))
            orig(obj)

        b.send_control = flaky  # type: ignore[method-assign]
        r = await asyncio.wait_for(
            Benchmark(a).run(duration_s=0.5, payload_size=1200, rate_mbps=20), T
        )
        assert refused[0] == "bench_ready"  # refused first, then delivered
        assert sent[0] == "bench_ready" and sent[-1] == "bench_report"
        assert r.peer_view is not None and r.peer_view.packets_received == r.packets_sent > 0


async def test_forged_benchmark_datagrams_are_counted_not_accepted() -> None:
    """A third host sprays BENCH_DATA-typed garbage at the receiver during an encrypted run."""
    async with two_workers() as (a, b):
        assert b.endpoint is not None
        target = b.endpoint.local_address
        forged = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as evil:
            evil.bind(("127.0.0.1", 0))
            run = asyncio.ensure_future(
                Benchmark(a, encrypt=True).run(duration_s=1.0, payload_size=1200, rate_mbps=20)
            )
            while not run.done():
                # Header of a sealed BENCH_DATA datagram, then bytes that cannot authenticate.
                evil.sendto(b"\xd7\x50\x01\x20" + os.urandom(1196), target)
                forged += 1
                await asyncio.sleep(0.01)
            r = await asyncio.wait_for(run, T)
        assert r.peer_view is not None and r.encrypted and r.peer_view.encrypted
        rx = r.peer_view
        assert rx.packets_received == r.packets_sent and rx.lost == 0 and rx.duplicates == 0
        # Those that arrived while the run was armed were opened, failed, and were counted.
        assert 0 < rx.auth_failures <= forged
        assert rx.auth_failures == r.auth_failures


async def test_encrypted_and_plain_rtt_and_explicit_unencrypted_mode() -> None:
    async with two_workers() as (a, _b):
        sealed = await asyncio.wait_for(Benchmark(a).rtt(count=100, payload_size=64), T)
        plain = await asyncio.wait_for(
            Benchmark(a, encrypt=False).rtt(count=100, payload_size=64), T
        )
        assert sealed.encrypted and not plain.encrypted
        for rtt in (sealed, plain):
            assert rtt.received == 100 and rtt.lost == 0 and rtt.auth_failures == 0
        # The smallest payload still holds the header once sealed (64 - 40 bytes of overhead).
        small = await asyncio.wait_for(
            Benchmark(a, encrypt=True).run(duration_s=0.3, payload_size=64, rate_mbps=5), T
        )
        assert small.encrypted and small.peer_view is not None
        assert small.peer_view.packets_received == small.packets_sent > 0
        assert small.peer_view.bytes_received == 64 * small.packets_sent
        r = await asyncio.wait_for(
            Benchmark(a, encrypt=False).run(duration_s=0.3, payload_size=64, rate_mbps=5), T
        )
        assert not r.encrypted and r.peer_view is not None and not r.peer_view.encrypted
        assert r.peer_view.packets_received == r.packets_sent > 0


@contextlib.asynccontextmanager
async def worker_on_own_loop(cfg: dict[str, Any]) -> AsyncIterator[tuple[Worker, Any]]:
    """A Worker running on its own event loop in another thread (as a peer in another process
    would: blocking on our loop does not stall it).  Yields it and its loop."""
    import threading

    box: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        w = Worker(WorkerConfig(**cfg))
        stop = asyncio.Event()
        box.update(worker=w, loop=asyncio.get_running_loop(), stop=stop)
        try:
            await w.start()
            box["ok"] = True
        finally:
            started.set()
        try:
            await stop.wait()
        finally:
            await w.stop()

    th = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    th.start()
    await asyncio.to_thread(started.wait, T)
    assert box.get("ok"), "the worker on its own loop did not start"
    try:
        yield box["worker"], box["loop"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        await asyncio.to_thread(th.join, T)


async def _while_pinging(a: Worker, run: asyncio.Future[Any]) -> Any:
    """``run``'s result; fails only when the run stands still (no ping answered) for ``T``.

    Both ends busy-polling in one process hand the GIL to each other on every ping (~10 ms a
    round trip under load, where two processes spin on two cores): a loaded machine once took
    more than 20 s for 1000 pings.  Slow is not stuck: this bounds the silence, not the run.
    """
    loop = asyncio.get_running_loop()

    def answered() -> int:
        pinger = a.benchmark.driving.pinger
        return -1 if pinger is None else len(pinger.samples) + pinger.lost

    last, since = answered(), loop.time()
    while not run.done():
        await asyncio.wait([run], timeout=0.2)
        now, got = loop.time(), answered()
        if got != last:
            last, since = got, now
        elif now - since > T:
            run.cancel()
            raise AssertionError(f"the RTT run stood still for {T:g} s at {got} pings")
    return run.result()


@pytest.mark.parametrize(
    ("encrypt", "busy_poll_us", "wait"),
    [(None, None, "busy-poll"), (False, None, "busy-poll"), (None, 0.0, "blocking")],
)
async def test_blocking_rtt_against_a_peer_on_another_loop_keeps_chat_flowing(
    encrypt: bool | None, busy_poll_us: float | None, wait: str
) -> None:
    """Both ends read the socket itself, busy-polling first (the default) or sleeping at once."""
    rv = await RendezvousServer.start("127.0.0.1", 0)
    cfg = dict(rendezvous_url=rv.ws_url, http_port=None, udp_host="127.0.0.1", nat_report=False)
    a = Worker(WorkerConfig(**cfg))  # type: ignore[arg-type]
    try:
        async with worker_on_own_loop(cfg) as (b, b_loop):
            await a.start()
            await a.wait_connected(T)
            fut = asyncio.run_coroutine_threadsafe(b.wait_connected(T), b_loop)
            await asyncio.wrap_future(fut)
            qa = a.ui_subscribe()
            qb = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_subscribe(b), b_loop))
            count = 300  # long enough for chat mid-run (many blocking chunks); cheap

            async def chat_mid_run() -> None:
                # Runs on a's loop between blocking chunks, i.e. while the run is going on
                # (polling: the pinger has no event to wait on).
                driving = a.benchmark.driving
                pinger = driving.pinger
                while pinger is None:
                    await asyncio.sleep(0)
                    pinger = driving.pinger
                a.send_chat("from a")
                b_loop.call_soon_threadsafe(b.send_chat, "from b")

            chat = asyncio.ensure_future(chat_mid_run())
            opts = {} if busy_poll_us is None else {"busy_poll_us": busy_poll_us}
            run = asyncio.ensure_future(
                Benchmark(a, encrypt=encrypt).rtt(count=count, payload_size=64, **opts)
            )
            rtt = await _while_pinging(a, run)
            await asyncio.wait_for(chat, T)
            assert rtt.received == count and rtt.lost == 0 and rtt.auth_failures == 0
            assert rtt.encrypted is (encrypt is None)
            assert rtt.wait == wait
            assert rtt.busy_poll_us == (1000.0 if wait == "busy-poll" else 0.0)
            assert 0 < rtt.min_ms <= rtt.p50_ms <= rtt.max_ms
            # The responder took the blocking path, and answered every ping.
            state = b.benchmark.answering
            assert state.rtt_task is not None
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(asyncio.wait_for(state.rtt_task, T), b_loop)
            )
            assert await _wait_text(qa, "from b")
            assert await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(_wait_text(qb, "from a"), b_loop)
            )
    finally:
        await a.stop()
        await rv.close()


async def _subscribe(w: Worker) -> asyncio.Queue[dict[str, Any]]:
    return w.ui_subscribe()


async def _wait_text(q: asyncio.Queue[dict[str, Any]], text: str) -> bool:
    while True:
        m = await asyncio.wait_for(q.get(), T)
        if m["type"] == "chat" and m.get("direction") == "in" and m["text"] == text:
            return True


async def test_stop_ends_a_run_early_on_both_ends_with_results() -> None:
    async with two_workers() as (a, b):
        qb = b.ui_subscribe()
        bench = Benchmark(a)
        assert bench.stop() is False  # nothing runs yet
        run = asyncio.create_task(bench.run(duration_s=60, payload_size=200, rate_mbps=5))
        await until(
            lambda: (rec := b.benchmark.answering.receiving) is not None and rec.rx.packets > 0,
            "a's stream to reach b",
        )
        assert bench.stop() is True
        r = await asyncio.wait_for(run, T)
        assert r.role == "sender" and r.duration_s < 60
        assert r.peer_view is not None and r.peer_view.packets_received == r.packets_sent > 0
        async with asyncio.timeout(T):  # the receiving end has its result too
            while True:
                m = await qb.get()
                if m["type"] == "benchmark_result" and m["run_id"] == r.run_id:
                    if m["role"] == "receiver":
                        assert m["packets_received"] == r.packets_sent
                        break
        assert b.benchmark.answering.receiving is None


async def test_a_stop_during_the_handshake_is_not_lost() -> None:
    """stop() between bench_start and bench_ready ends the run at once instead of being lost
    (the old code reset the stop flag after the handshake and streamed the full 60 s)."""
    async with two_workers() as (a, _):
        bench = Benchmark(a)
        driving = a.benchmark.driving
        started = asyncio.Event()
        real_start = driving._start

        async def start_then_stop(*args: Any, **kwargs: Any) -> Any:
            assert bench.stop() is True  # the run exists, bench_ready has not come yet
            started.set()
            return await real_start(*args, **kwargs)

        driving._start = start_then_stop  # type: ignore[method-assign]
        r = await asyncio.wait_for(bench.run(duration_s=60, payload_size=200, rate_mbps=5), T)
        assert started.is_set()
        assert r.duration_s < 60 and r.packets_sent == 0
        assert r.peer_view is not None and r.peer_view.packets_received == 0


async def test_stop_on_the_receiving_end_of_a_requested_run() -> None:
    async with two_workers() as (a, b):
        run = asyncio.create_task(
            a.benchmark.run(duration_s=60, payload_size=200, rate_mbps=5, direction="receive")
        )
        # Stop once datagrams flow (stopping before the first one is another test's case).
        await until(
            lambda: (rec := a.benchmark.answering.receiving) is not None and rec.rx.packets > 0,
            "b's datagrams to arrive",
        )
        assert a.benchmark.stop() is True  # asks b, the sender, to end its stream
        r = await asyncio.wait_for(run, T)
        assert r.role == "receiver" and r.duration_s < 60
        assert r.peer_view is not None and r.packets_received == r.peer_view.packets_sent > 0
        sending = b.benchmark.driving.sending
        assert sending is not None
        theirs = await asyncio.wait_for(sending, T)
        assert theirs.run_id == r.run_id and theirs.packets_sent == r.packets_received


async def test_worker_benchmark_is_the_notebook_api_and_emits_events() -> None:
    async with two_workers() as (a, b), a.subscribe(BenchmarkProgress, BenchmarkFinished) as sub:
        result = await asyncio.wait_for(
            a.benchmark.run(duration_s=1, payload_size=1200, rate_mbps=50), T
        )
        assert result.peer_view is not None and result.peer_view.packets_received > 0
        rtt = await asyncio.wait_for(a.benchmark.rtt(count=100), T)
        assert rtt.received == 100 and rtt.p50_ms <= rtt.p90_ms <= rtt.p99_ms
        seen: list[Any] = []
        while not sub.queue.empty():
            seen.append(sub.queue.get_nowait())
        finished = [e for e in seen if isinstance(e, BenchmarkFinished)]
        assert [e.run_id for e in finished] == [int(result.run_id)]
        assert finished[0].result["packets_sent"] == result.packets_sent
        progress = [e for e in seen if isinstance(e, BenchmarkProgress)]
        assert {e.role for e in progress} == {"sender", "receiver"}
        assert a.stats["controls_unknown"] == b.stats["controls_unknown"] == 0


@pytest.mark.parametrize(("rate", "encrypt"), [(50.0, True), (0.0, True), (50.0, False)])
async def test_goodput_of_a_lossless_run_is_never_above_what_was_sent(
    rate: float, encrypt: bool
) -> None:
    """Both ends' rows: received_mbps <= sent_mbps (same window), shortfall per the rule."""
    async with two_workers() as (a, b):
        qb = b.ui_subscribe()
        r = await asyncio.wait_for(
            Benchmark(a, encrypt=encrypt).run(duration_s=0.5, payload_size=1200, rate_mbps=rate),
            T,
        )
        assert r.peer_view is not None
        b_rows: list[dict[str, Any]] = []
        while len(b_rows) < 2:
            m = await asyncio.wait_for(qb.get(), T)
            if m["type"] == "benchmark_result":
                b_rows.append(m)
        rows = [r.to_dict(), r.peer_view.to_dict(), *b_rows]
        for row in rows:
            assert row["lost"] == 0 and row["duplicates"] == 0
            assert row["bytes_received"] == row["packets_sent"] * 1200
            assert row["received_mbps"] <= row["sent_mbps"]
            assert row["rate_mbps"] == rate
            assert row["short_of_target"] is cb.short_of_target(row["sent_mbps"], rate)
            assert ("short of target" in row["note"]) is row["short_of_target"]
        assert {row["sent_mbps"] for row in rows} == {r.sent_mbps}
        assert {row["received_mbps"] for row in rows} == {r.received_mbps}
        if rate == 0:
            assert not r.short_of_target
        assert r.jitter_us == r.jitter_ms * 1000
