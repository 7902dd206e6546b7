"""Hostile input against running services on loopback: a worker's UDP port, the STUN server, the
rendezvous WebSocket.  After each attack the service keeps serving everyone else and nothing it
had accepted (links, registrations, pairs) is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from p2plab.aio.worker import Worker, WorkerConfig
from p2plab.core.crypto import Identity, PeerCipher, fingerprint
from p2plab.core.signaling import MAX_MESSAGE_BYTES, P2PConnectionOffer
from p2plab.core.stun import make_binding_request
from p2plab.core.wire import Chat, MessageType, Probe, datagram_type, encode_datagram
from p2plab.server.stun_server import StunServer
from rendezvous_service_code.main import RendezvousServer
from tests.conftest import TIMEOUT_UNIT, until
from tests.rendezvous_fixtures import WsWorker, debug, loopback_worker_config, running_rendezvous
from tests.stun_fixtures import RawClient, random_bytes

T = 10 * TIMEOUT_UNIT


def rendezvous(port: int = 0, stun_port: int = 0, **options: Any) -> Any:
    return running_rendezvous(port, stun_port=stun_port, **options)


def config(rv: RendezvousServer, **kw: Any) -> WorkerConfig:
    return loopback_worker_config(rv, **{"nat_report": False, **kw})


@contextlib.asynccontextmanager
async def connected_pair(rv: RendezvousServer, **kw: Any) -> AsyncIterator[tuple[Worker, Worker]]:
    a = await Worker(config(rv, **kw)).start()
    b = await Worker(config(rv, **kw)).start()
    try:
        await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def next_chat(q: asyncio.Queue[dict[str, Any]], timeout: float = T) -> dict[str, Any]:
    async def _loop() -> dict[str, Any]:
        while True:
            msg = await q.get()
            if msg["type"] == "chat" and msg["direction"] == "in":
                return msg

    return await asyncio.wait_for(_loop(), timeout)


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def udp_addr(w: Worker) -> tuple[str, int]:
    assert w.endpoint is not None
    return w.endpoint.local_address


# -- encryption between real workers ------------------------------------------------------------


async def test_workers_encrypt_by_default_and_show_matching_fingerprints() -> None:
    async with rendezvous() as rv, connected_pair(rv) as (a, b):
        seen: list[bytes] = []
        b.datagram_hooks.append(lambda data, addr: seen.append(bytes(data)) and False)
        q = b.ui_subscribe()
        a.send_chat("the eagle lands at dawn")
        assert (await next_chat(q))["text"] == "the eagle lands at dawn"
        chats = [d for d in seen if datagram_type(d) == MessageType.CHAT]
        assert chats and not any(b"eagle" in d for d in chats)
        sa, sb = a.status()["security"], b.status()["security"]
        assert sa["encrypted"] is True and sb["encrypted"] is True
        assert sa["local_fingerprint"] == sb["peer_fingerprint"]
        assert sb["local_fingerprint"] == sa["peer_fingerprint"]
        assert sa["local_fingerprint"] != sa["peer_fingerprint"]
        assert a.identity is not None
        assert sa["local_fingerprint"] == fingerprint(a.identity.public_bytes)
        assert isinstance(a.peer_sealer, PeerCipher) and a.peer_sealer.encrypted


async def test_plaintext_only_when_both_sides_disable_encryption() -> None:
    async with rendezvous() as rv, connected_pair(rv, encrypt=False) as (a, b):
        assert a.status()["security"]["encrypted"] is False
        assert a.status()["security"]["local_fingerprint"] is None
        q = b.ui_subscribe()
        a.send_chat("in the clear")
        assert (await next_chat(q))["text"] == "in the clear"


@pytest.mark.parametrize("plain_side", ["first", "second"])
async def test_mixed_encryption_settings_are_not_paired_and_refuse_offers(plain_side: str) -> None:
    async with rendezvous() as rv:
        a = await Worker(config(rv, encrypt=plain_side != "first")).start()
        b = await Worker(config(rv, encrypt=plain_side == "first")).start()
        c = None
        try:
            await a.wait_for_state("waiting_for_peer", timeout=T)
            await b.wait_for_state("waiting_for_peer", timeout=T)
            # The rendezvous pairs a with a newcomer of its own mode, never with b.
            c = await Worker(config(rv, encrypt=plain_side != "first")).start()
            await a.wait_connected(T)
            await c.wait_connected(T)
            assert a.peer_id == c.worker_id and b.stats["offers"] == 0
            assert b.state == "waiting_for_peer"
            # A rendezvous that offers across modes anyway (an old or hostile one) is refused:
            # b (sealed when a is plain, and the other way round) gets such an offer.
            b_encrypts = plain_side == "first"
            offer = P2PConnectionOffer(
                peer_worker_id="rogue",
                peer_udp_ip="127.0.0.1",
                peer_udp_port=9,
                # a usable key (32 zero bytes, low-order, is refused for that reason first)
                peer_public_key=None if b_encrypts else Identity.generate(os.urandom).public_b64,
            )
            await b._on_rendezvous_message(offer)
            words = "offers no public key" if b_encrypts else "encryption disabled"
            assert words in str(b.error) and b.link.session is None
            assert b.state == "waiting_for_peer" and b.stats["offers"] == 1
        finally:
            for w in (a, b, c):
                if w is not None:
                    await w.stop()


# -- hostile datagrams at a worker --------------------------------------------------------------


async def test_random_datagrams_at_a_worker_are_dropped_and_counted() -> None:
    async with rendezvous() as rv, connected_pair(rv) as (a, b):
        rng = random.Random(5)
        attacker = udp_socket()
        try:
            junk = [rng.randbytes(rng.randint(0, 1400)) for _ in range(300)]
            junk += [b"\xd7\x50\x01" + bytes([t]) + rng.randbytes(60) for t in range(256)]
            for data in junk:
                attacker.sendto(data, udp_addr(b))
            before_session = dict(b.link.session.stats)  # type: ignore[union-attr]
            q = b.ui_subscribe()
            a.send_chat("still talking")
            assert (await next_chat(q))["text"] == "still talking"
            assert b.state == "connected" and b.link.session is not None
            stats = b.status()["stats"]
            dropped = (
                stats["session"]["dropped_malformed"]
                + stats["session"]["dropped_unauthenticated"]
                + stats["session"]["bench_ignored"]
            )
            assert dropped >= 200
            assert b.status()["security"]["auth_failures"] >= 200
            assert before_session["chats_received"] + 1 == b.link.session.stats["chats_received"]
        finally:
            attacker.close()


async def test_forged_and_replayed_chat_from_a_third_host_is_dropped_never_shown() -> None:
    async with rendezvous() as rv, connected_pair(rv) as (a, b):
        attacker = udp_socket()
        q = b.ui_subscribe()
        captured: list[bytes] = []

        def steal_one_chat(data: bytes, addr: tuple[str, int]) -> bool:
            if not captured and datagram_type(data) == MessageType.CHAT:
                captured.append(bytes(data))
                return True  # b never sees the original: only the attacker's copy
            return False

        try:
            # 1. forged: the attacker knows both ids and both public keys, not the keys
            mallory = Identity.generate(os.urandom)
            assert b.identity is not None
            cm = PeerCipher(mallory, a.worker_id, b.worker_id, b.identity.public_bytes, os.urandom)
            forged = [
                bytes(Chat(a.worker_id, b.worker_id, 0, "evil", 0.0, "pwned plain")),
                encode_datagram(Chat(a.worker_id, b.worker_id, 0, "evil", 0.0, "pwned"), cm),
                encode_datagram(Probe(a.worker_id, b.worker_id, b"m" * 8, True, udp_addr(b)), cm),
            ]
            for data in forged:
                attacker.sendto(data, udp_addr(b))
            await until(
                lambda: b.status()["security"]["auth_failures"] >= 3, "auth failures counted"
            )
            # 2. a genuine chat datagram, stolen on its way and sent from the attacker's address
            b.datagram_hooks.append(steal_one_chat)
            a.send_chat("genuine")
            await until(lambda: bool(captured), "a captured chat")
            attacker.sendto(captured[0], udp_addr(b))
            await until(
                lambda: b.status()["security"]["unexpected_source"] >= 1, "unexpected source"
            )
            # 3. and the same datagram again, replayed from the attacker and from the peer path
            attacker.sendto(captured[0], udp_addr(b))
            # the reliable stream retransmits the genuine chat over the real path
            msg = await next_chat(q)
            assert msg["text"] == "genuine"
            await until(lambda: b.status()["security"]["replays"] >= 1, "replay counted")
            await asyncio.sleep(0.2)
            assert q.empty() or all(
                m.get("type") != "chat" or "pwned" not in m.get("text", "")
                for m in [q.get_nowait() for _ in range(q.qsize())]
            )
            assert b.stats["chats_in"] == 1
            # the attacker's address got path checks (it relayed an authentic datagram),
            # but it cannot answer them: the path stays where it was
            assert b.link.session is not None and b.peer_address == udp_addr(a)
            assert b.link.session.stats["path_changes"] == 0
        finally:
            attacker.close()


# -- hostile datagrams at the STUN server -------------------------------------------------------


async def test_random_datagram_flood_at_the_stun_server_does_not_stop_it() -> None:
    # No rate limit here: every junk datagram must reach the parser (the limit has its own
    # tests in test_stun_server.py).
    server = await StunServer.start("127.0.0.1", 0, rate_per_s=None)
    client = RawClient()
    attacker = udp_socket()
    try:
        rng = random.Random(9)
        valid = bytes(make_binding_request(random_bytes))
        for i in range(2000):
            if i % 3 == 0:  # STUN-looking: magic cookie in place, random rest
                data = rng.randbytes(4) + b"\x21\x12\xa4\x42" + rng.randbytes(rng.randint(0, 200))
            elif i % 3 == 1:  # a valid request with a flipped byte
                pos = rng.randrange(len(valid))
                data = valid[:pos] + bytes([valid[pos] ^ 0xFF]) + valid[pos + 1 :]
            else:
                data = rng.randbytes(rng.randint(0, 1500))
            attacker.sendto(data, server.primary_address)
            if i % 200 == 0:
                await asyncio.sleep(0)
        reply, _ = await client.request(
            make_binding_request(random_bytes), server.primary_address, T
        )
        assert reply.attributes["XOR-MAPPED-ADDRESS"] == client.address
        await until(lambda: server.stats["malformed_dropped"] >= 1000, "drops counted")
        assert server.stats["datagrams_in"] >= 1000
    finally:
        attacker.close()
        client.close()
        server.close()


# -- hostile WebSocket clients at the rendezvous ---------------------------------------------


async def _debug_workers(rv: RendezvousServer) -> dict[str, Any]:
    return await debug(rv)


async def _closed_code(ws: WsWorker) -> int | None:
    code, _ = await ws.wait_closed(T)
    return code


async def test_rendezvous_survives_hostile_clients_and_keeps_what_it_accepted() -> None:
    async with rendezvous(max_workers=12, rate_limit_per_s=20, rate_limit_burst=20) as rv:
        async with connected_pair(rv) as (a, b):
            before = await _debug_workers(rv)
            pairs = {w["worker_id"]: w["paired_with"] for w in before["workers"]}
            assert pairs[a.worker_id] == b.worker_id and pairs[b.worker_id] == a.worker_id
            base = rv.ws_url.rsplit("/ws", 1)[0] if "/ws" in rv.ws_url else rv.ws_url

            # malformed, binary, oversized, wrong types, before and after registering
            bad = await WsWorker.connect(base)
            for raw in [
                "not json",
                b"\x00\xff\xfe binary",
                "[]",
                '{"type": 5}',
                '{"type": "register", "room": ""}',
                '{"type": "update_udp_endpoint", "udp_ip": "1.2.3.4", "udp_port": 1}',
                json.dumps({"type": "register", "room": "x" * 10_000}),
                "x" * (MAX_MESSAGE_BYTES + 1),
            ]:
                await bad.send(raw)
                assert (await bad.expect("error"))["code"] == "bad_message"
            await bad.register(room="hostile")
            await bad.send(json.dumps({"type": "register"}))
            assert "already registered" in (await bad.expect("error"))["message"]
            # a frame over the WebSocket size limit closes that connection only
            await bad.send("y" * (8 * MAX_MESSAGE_BYTES))
            with contextlib.suppress(ConnectionClosed, TimeoutError, AssertionError):
                await bad.wait_closed(T)

            # bad worker ids
            for wid in ["x" * 65, "bad id", "../../etc", "é"]:
                with contextlib.suppress(Exception):
                    ws = await WsWorker.connect(base, worker_id=wid)
                    assert await _closed_code(ws) == 1008

            # a flood: closed for abuse, the others are untouched
            flooder = await WsWorker.connect(base)
            await flooder.register(room="flood")
            with contextlib.suppress(ConnectionClosed):
                for _ in range(3000):
                    await flooder.send('{"type":"update_udp_endpoint","udp_ip":"x","udp_port":1}')
            code = await _closed_code(flooder)
            assert code == 1008

            # the cap: extra connections are refused with 1013 while slots are taken
            hogs = []
            refused = 0
            for _ in range(14):
                ws = await WsWorker.connect(base)
                hogs.append(ws)
            for ws in hogs:
                with contextlib.suppress(TimeoutError):
                    code = await asyncio.wait_for(_closed_code(ws), 0.5)
                    refused += code == 1013
            assert refused >= 2
            for ws in hogs:
                await ws.close()

            # the pair survived, chat still works, and newcomers are served
            after = await _debug_workers(rv)
            pairs = {w["worker_id"]: w["paired_with"] for w in after["workers"]}
            assert pairs[a.worker_id] == b.worker_id and pairs[b.worker_id] == a.worker_id
            assert a.state == b.state == "connected"
            q = b.ui_subscribe()
            a.send_chat("after the storm")
            assert (await next_chat(q))["text"] == "after the storm"
            await asyncio.sleep(0.3)  # let the refused sockets' slots free up
            async with connected_pair(rv) as (c, d):
                assert c.peer_id == d.worker_id
