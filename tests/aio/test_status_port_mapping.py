"""The worker status's ``port_mapping`` block (issue 18): null without a mapping, the engine's
announced mapping otherwise, and the port-mapping driver's own report when one runs."""

from __future__ import annotations

from typing import Any

from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.core.signaling import PortMapping


def test_port_mapping_block_follows_the_engine_then_the_driver() -> None:
    w = Worker(WorkerConfig(rendezvous_url="ws://127.0.0.1:9", http_port=None))
    assert w.status()["port_mapping"] is None
    mapping = PortMapping(protocol="pcp", ip="198.51.100.1", port=41000, lifetime_s=7200)
    w.link.set_port_mapping(mapping, 0.0)
    assert w.status()["port_mapping"] == {
        "protocols": ["pcp"],
        "protocol": "pcp",
        "external": "198.51.100.1:41000",
        "lease_s": 7200.0,
    }
    report: dict[str, Any] = {"protocols": ["nat-pmp", "pcp"], "protocol": "nat-pmp"}
    w.port_mapping_report = lambda: report
    assert w.status()["port_mapping"] == report
    w.link.set_port_mapping(None, 1.0)
    w.port_mapping_report = None
    assert w.status()["port_mapping"] is None
