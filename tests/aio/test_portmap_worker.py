"""The worker maps its UDP port when told to, hands the mapping to the engine, reports it and
deletes it on stop; ``auto`` with a loopback rendezvous never probes."""

from __future__ import annotations

import asyncio
import random
import time

from p2plab.aio.portmap import probe_port_mapping
from p2plab.aio.worker import Worker
from p2plab.core.signaling import PortMapping
from tests.conftest import until
from tests.portmap_gateway import FakeGateway, GatewayProtocol
from tests.rendezvous_fixtures import debug, loopback_worker_config, running_rendezvous


async def test_worker_maps_its_port_announces_it_and_deletes_it_on_stop() -> None:
    # the worker talks to port 5351 as on a real router: a loopback address of its own for
    # this gateway (127/8 is all loopback) keeps it clear of anything else on the host
    gw_ip = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.1"
    gw = FakeGateway(booted_at=time.monotonic() - 1000)
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: GatewayProtocol(gw), local_addr=(gw_ip, 5351)
    )
    try:
        async with running_rendezvous(stun_port=0) as rv:
            worker = Worker(loopback_worker_config(rv, port_mapping=gw_ip))
            await worker.start()
            try:
                await until(lambda: worker.link.port_mapping is not None, "the mapping")
                assert worker.link.port_mapping == PortMapping(
                    protocol="nat-pmp", ip="198.51.100.7", port=40000, lifetime_s=7200
                )
                udp_port = worker.endpoint.local_address[1]  # type: ignore[union-attr]
                assert gw.mappings == {udp_port: (40000, b"")}  # the worker's own socket's port
                # the rendezvous has it (the first report waited for the probe)
                mapped = None
                for _ in range(200):
                    workers = (await debug(rv))["workers"]
                    mapped = next((w.get("mapped") for w in workers if w.get("mapped")), None)
                    if mapped is not None:
                        break
                    await asyncio.sleep(0.02)
                assert mapped == {
                    "protocol": "nat-pmp",
                    "ip": "198.51.100.7",
                    "port": 40000,
                    "lifetime_s": 7200.0,
                }
                block = worker.status()["port_mapping"]
                assert block["protocols"] == ["nat-pmp", "pcp"]
                assert (block["external"], block["lease_s"]) == ("198.51.100.7:40000", 7200)
            finally:
                await worker.stop()
            await until(lambda: not gw.mappings, "the delete")
            assert all(addr[0] == "127.0.0.1" for _, addr in proto.received)
    finally:
        transport.close()


async def test_auto_with_a_loopback_rendezvous_never_probes() -> None:
    async with running_rendezvous(stun_port=0) as rv:
        worker = Worker(loopback_worker_config(rv))  # port_mapping defaults to auto
        assert worker.config.port_mapping == "auto"
        await worker.start()
        try:
            assert worker._portmap is None
            assert worker.status()["port_mapping"] is None
        finally:
            await worker.stop()


async def test_probe_reports_protocols_endpoint_and_lease_then_deletes() -> None:
    gw_ip = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.1"
    gw = FakeGateway(booted_at=time.monotonic() - 1000)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: GatewayProtocol(gw), local_addr=(gw_ip, 5351)
    )
    try:
        block = await probe_port_mapping(gw_ip, ["127.0.0.1:3478"])  # explicit: probes anyway
        assert block is not None
        assert (block["gateway"], block["protocols"]) == (gw_ip, ["nat-pmp", "pcp"])
        assert (block["external"], block["lease_s"]) == ("198.51.100.7:40000", 7200)
        await until(lambda: not gw.mappings, "the probe's mapping deleted")
        assert await probe_port_mapping("auto", ["127.0.0.1:3478"]) is None
    finally:
        transport.close()
