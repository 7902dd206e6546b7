"""Benchmarks over TURN (issue 17): two real workers on loopback whose direct path is blocked
connect through Debian's coturn (the hooks of ``test_turn_path_aio``) and benchmark there.

On such a link one side sends to the peer's relayed address from its own socket (the bench's
usual data path) and the other through its own allocation (ChannelData via the engine); each
side receives the other's datagrams through its own allocation.  Both directions run, so both
ways are exercised; each row names the path and counts what arrived.
"""

from __future__ import annotations

import asyncio

from p2plab.aio.bench import Benchmark
from p2plab.core.paths import parse_turn_address
from tests.aio.test_turn_coturn import coturn  # noqa: F401 - the fixture
from tests.aio.test_turn_path_aio import T, turn_pair


async def test_benchmark_over_turn_udp_both_ways_and_rtt(coturn: int) -> None:  # noqa: F811
    async with turn_pair(coturn, ("udp",)) as (a, b, block):
        await a.wait_for_state("connected", timeout=T)
        await b.wait_for_state("connected", timeout=T)
        assert a.path == b.path == "turn-udp"
        # One side reaches the other through its own allocation (a pseudo-address).
        pseudo = [w for w in (a, b) if parse_turn_address(w.peer_address) is not None]
        assert len(pseudo) >= 1
        for sender, receiver in ((a, b), (b, a)):
            r = await Benchmark(sender).run(duration_s=1.0, payload_size=1000, rate_mbps=20)
            assert r.path == "turn-udp"
            assert r.peer_view is not None and r.peer_view.path == "turn-udp"
            assert r.peer_view.packets_received > 0
            assert r.peer_view.auth_failures == 0 and r.encrypted
            assert receiver.stats.get("bench_unclaimed", 0) == 0
        # The side behind the pseudo-address got the other's data through its allocation.
        assert pseudo[0].link.stats["bench_in"] > 0
        assert pseudo[0].link.stats["bench_dropped"] == 0
        rtt = await Benchmark(pseudo[0]).rtt(count=20, timeout_s=1.0)
        assert rtt.received > 0
        assert block.dropped > 0  # the direct path was blocked all along
        assert a.path == b.path == "turn-udp"


async def test_benchmark_over_turn_tcp(coturn: int) -> None:  # noqa: F811
    async with turn_pair(coturn, ("tcp",)) as (a, b, _block):
        await a.wait_for_state("connected", timeout=T)
        await b.wait_for_state("connected", timeout=T)
        assert a.path == b.path == "turn-tcp"
        for sender in (a, b):
            r = await Benchmark(sender).run(duration_s=1.0, payload_size=1000, rate_mbps=10)
            assert r.path == "turn-tcp"
            assert r.peer_view is not None and r.peer_view.packets_received > 0


async def test_a_run_in_flight_across_a_path_switch_ends_with_a_clear_result(
    coturn: int,  # noqa: F811
) -> None:
    # Issue 17: "a benchmark in flight either continues or ends with a clear result".  The run
    # sends to the address of the path it started on; when the link goes direct it ends there,
    # its rows name the path they measured and say why they are short.
    async with turn_pair(coturn, ("udp",)) as (a, b, block):
        await a.wait_for_state("connected", timeout=T)
        await b.wait_for_state("connected", timeout=T)
        assert a.path == b.path == "turn-udp"
        long = 20 * T  # far longer than the upgrade takes: the switch must end it
        run = asyncio.ensure_future(
            Benchmark(a).run(duration_s=long, payload_size=1000, rate_mbps=5)
        )
        await asyncio.sleep(1.0)  # under way (the upgrade round that follows takes seconds)
        assert not run.done()
        block.on = False  # the direct path opens: the engine's next probe round goes direct
        r = await asyncio.wait_for(run, 4 * T)
        assert a.path == "direct"
        assert r.path == "turn-udp" and r.duration_s < long
        assert "path switched from turn-udp to direct" in r.note
        assert r.peer_view is not None and r.peer_view.path == "turn-udp"
        assert r.peer_view.packets_received > 0
        assert "path switched" in r.peer_view.note
        # The next run measures the new path, in full.
        r2 = await Benchmark(a).run(duration_s=0.5, payload_size=1000, rate_mbps=5)
        assert r2.path == "direct" and "switched" not in r2.note
        assert r2.peer_view is not None and r2.peer_view.packets_received > 0
