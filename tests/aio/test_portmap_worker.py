"""The worker maps its UDP port when told to, hands the mapping to the engine, reports it and
deletes it on stop; ``auto`` with a loopback rendezvous never probes."""

from __future__ import annotations

import asyncio
import random
import time

from p2plab.aio.worker import Worker
from p2plab.core.signaling import PortMapping
from tests.aio.test_portmap_aio import GatewayProtocol
from tests.conftest import until
from tests.portmap_gateway import FakeGateway
from tests.rendezvous_fixtures import loopback_worker_config, running_rendezvous


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
