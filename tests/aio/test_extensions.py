"""Worker extensions: handed over when the worker is built, never registered by an import."""

from __future__ import annotations

from typing import Any

import pytest

from p2plab.aio.bench import BenchmarkExtension
from p2plab.aio.endpoint import Address
from p2plab.aio.extension import Extension, WorkerHost
from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.errors import ConfigError
from rendezvous_service_code.main import RendezvousServer
from tests.conftest import TIMEOUT_UNIT, until
from tests.rendezvous_fixtures import loopback_worker_config

T = 20 * TIMEOUT_UNIT


class Recorder(Extension):
    """Claims ``x_ping``/``x_pong`` and records every hook call."""

    name = "recorder"
    control_types = frozenset({"x_ping", "x_pong"})

    def __init__(self) -> None:
        self.host: WorkerHost | None = None
        self.controls: list[dict[str, Any]] = []
        self.states: list[str] = []
        self.closed = False

    def attach(self, host: WorkerHost) -> None:
        self.host = host

    def on_control(self, obj: dict[str, Any]) -> None:
        self.controls.append(obj)
        if obj["type"] == "x_ping" and self.host is not None:
            self.host.send_control({"type": "x_pong", "n": obj["n"]})

    def on_datagram(self, data: bytes, addr: Address) -> bool:
        return False

    def on_link_changed(self, state: str) -> None:
        self.states.append(state)

    async def close(self) -> None:
        self.closed = True


def test_defaults_carry_the_benchmark_and_names_are_unique() -> None:
    config = WorkerConfig(rendezvous_url="ws://127.0.0.1:1", http_port=None)
    w = Worker(config)
    assert isinstance(w.benchmark, BenchmarkExtension)
    assert w.extension("benchmark") is w.benchmark
    bare = Worker(config, extensions=[])
    assert bare.extension("benchmark") is None
    with pytest.raises(ConfigError, match="without the benchmark"):
        _ = bare.benchmark
    with pytest.raises(ConfigError, match="unique"):
        Worker(config, extensions=[Recorder(), Recorder()])
    with pytest.raises(ConfigError, match="claimed by two"):
        Worker(config, extensions=[BenchmarkExtension(), _Clash()])


class _Clash(Extension):
    name = "clash"
    control_types = frozenset({"bench_start"})


async def test_controls_route_to_the_claiming_extension_else_count_as_unknown() -> None:
    rv = await RendezvousServer.start("127.0.0.1", 0)
    ra, rb = Recorder(), Recorder()
    a = Worker(loopback_worker_config(rv, nat_report=False), extensions=[ra])
    b = Worker(loopback_worker_config(rv, nat_report=False), extensions=[rb])
    try:
        await a.start()
        await b.start()
        await a.wait_connected(T)
        await b.wait_connected(T)
        assert ra.host is a and "connected" in ra.states
        a.send_control({"type": "x_ping", "n": 1})
        await until(lambda: ra.controls == [{"type": "x_pong", "n": 1}], "the pong")
        assert rb.controls == [{"type": "x_ping", "n": 1}]
        # b has no benchmark extension: a benchmark control is dropped and counted there.
        a.send_control({"type": "bench_start", "run_id": 1, "mode": "throughput"})
        await until(lambda: b.stats["controls_unknown"] == 1, "the unknown control counted")
        assert a.stats["controls_unknown"] == 0
    finally:
        await a.stop()
        await b.stop()
        await rv.close()
    assert ra.closed and rb.closed
