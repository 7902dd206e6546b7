"""A hostile rendezvous (or a peer speaking through it) against real workers on loopback.

Issue 14, worker side: nothing one rendezvous message does ends the worker's rendezvous client
or its pairability (findings 10 and 13), nothing it sends makes the worker resolve a name
(finding 3), an unauthenticated ``relay`` message does not touch a direct link (finding 14), and
keys mean something: pinned, remembered, and shown as the same authentication string at both
ends (finding 4).  Each test failed on the worker before issue 14.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2plab.aio.endpoint import UdpEndpoint
from p2plab.aio.worker import Worker
from p2plab.core import events as ev
from p2plab.core.crypto import Identity, fingerprint
from tests.aio.fake_rendezvous import FakeRendezvous, fake_rendezvous
from tests.conftest import TIMEOUT_UNIT, until

T = 10 * TIMEOUT_UNIT

HOSTS = ["a.slow.invalid"] + [f"n{i}.slow.invalid" for i in range(16)]


@contextlib.asynccontextmanager
async def workers(rv: FakeRendezvous, *configs: dict[str, Any]) -> AsyncIterator[list[Worker]]:
    ws = [await Worker(rv.config(**c)).start() for c in configs]
    try:
        await rv.ready(*ws, timeout=T)
        yield ws
    finally:
        for w in ws:
            await w.stop()


async def chat_works(a: Worker, b: Worker) -> None:
    async with b.subscribe(ev.ChatReceived) as chats:
        await a.chat("still here", timeout=T)
        got = await asyncio.wait_for(anext(chats), T)
    assert got.text == "still here"


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every name lookup through the socket module (and asyncio's, which uses it)."""
    seen: list[Any] = []
    real = socket.getaddrinfo

    def recording(host: Any, *args: Any, **kw: Any) -> Any:
        seen.append(host)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return seen


async def test_no_rendezvous_message_ends_the_client_and_the_worker_still_pairs(
    lookups: list[Any],
) -> None:
    async with fake_rendezvous() as rv, workers(rv, {}, {}) as (a, b):
        assert a.identity is not None
        zero = base64.b64encode(bytes(32)).decode()
        hostile: list[Any] = [
            "[" * 16000,  # finding 10: a RecursionError in the JSON parser
            "[" * 8000 + "]" * 8000,
            "not json",
            '{"type": "no_such_type"}',
            {"type": "p2p_connection_offer", "peer_worker_id": "x"},  # fails validation
            rv.offer(a, b, "controlling", peer_worker_id=a.worker_id),  # names a itself
            rv.offer(a, b, "controlling", peer_public_key=zero),  # finding 13: low order
            rv.offer(a, b, "controlling", peer_public_key="!" * 44),
            rv.offer(  # finding 3: host names instead of addresses
                a,
                b,
                "controlling",
                peer_udp_ip=HOSTS[0],
                peer_candidates=[{"ip": h, "port": 9} for h in HOSTS[1:]],
            ),
            {
                "type": "relay",
                "from": b.worker_id,
                "data": base64.b64encode(os.urandom(60)).decode(),
            },
            {"type": "challenge", "nonce": zero, "server_key": zero},  # a second challenge
        ]
        for msg in hostile:
            await rv.send(a, msg)
        # The signaling models refuse the low-order key, the bad base64 and the host names when
        # they are parsed (bad messages); the engine refuses the offer naming a itself.
        client = a._rendezvous
        assert client is not None
        await until(lambda: client.stats["bad_messages"] >= 8, "the bad messages counted")
        await until(lambda: a.stats["offers"] >= 1, "the offers handled")
        assert a.state == "waiting_for_peer" and a.link.session is None
        assert a.stats["offers"] == a.stats["offers_refused"] == 1
        assert client.connections == 1 and rv.connections == 2  # never dropped, no reconnect
        await rv.pair(a, b)
        await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
        await chat_works(a, b)
        assert not [h for h in lookups if "invalid" in str(h)]
        assert a.endpoint is not None and a.endpoint.stats["refused_host_names"] == 0


async def test_an_unauthenticated_relay_message_does_not_touch_a_direct_link() -> None:
    async with fake_rendezvous() as rv, workers(rv, {}, {}) as (a, b):
        await rv.pair(a, b)
        await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
        session = a.link.session
        closed: list[ev.Event] = []
        async with b.subscribe(ev.PeerClosed) as closes:
            for _ in range(20):  # finding 14: one of these used to tear the link down (BYE)
                data = base64.b64encode(os.urandom(60)).decode()
                await rv.send(a, {"type": "relay", "from": b.worker_id, "data": data})
            await until(lambda: a.stats["relay_unauthenticated"] == 20, "relay junk counted")
            await chat_works(a, b)
            with contextlib.suppress(TimeoutError):
                closed.append(await asyncio.wait_for(anext(closes), 0.2))
        assert closed == []
        assert a.state == b.state == "connected" and a.link.session is session
        assert a.status()["security"]["relayed"] is False
        assert a.stats["relay_switches"] == 0


async def test_registration_needs_the_challenge_and_never_sticks_at_registering() -> None:
    # A rendezvous that never challenges: the worker closes and tries again, with backoff.
    async with fake_rendezvous(challenge=False) as rv:
        w = await Worker(rv.config(register_timeout_s=0.2)).start()
        try:
            await until(lambda: rv.connections >= 3, "reconnections")
            client = w._rendezvous
            assert client is not None and client.stats["register_timeouts"] >= 2
            assert "not registered" in str(client.last_error)
        finally:
            await w.stop()
    # Junk before the challenge (a 16,000-deep array included) changes nothing.
    async with fake_rendezvous(first=["[" * 16000, "{}", "x"]) as rv:
        async with workers(rv, {}) as (w,):
            assert w.state == "waiting_for_peer"
            assert w._rendezvous is not None and w._rendezvous.stats["bad_messages"] == 3


async def test_both_ends_show_the_same_auth_string_and_a_pin_is_enforced() -> None:
    mallory = Identity.generate(os.urandom)
    async with fake_rendezvous() as rv, workers(rv, {}, {}) as (a, b):
        await rv.pair(a, b)
        await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
        sa, sb = a.status()["security"], b.status()["security"]
        assert sa["auth_string"] == sb["auth_string"] and len(sa["auth_string"].split()) == 8
        assert sa["peer_key_pinned"] is False and sa["peer_key_warning"] is None
        assert b.identity is not None
        b_fp = fingerprint(b.identity.public_bytes)
    # c is pinned to b's key; the rendezvous offers "b" with its own key, then the real b
    async with fake_rendezvous() as rv:
        async with workers(rv, {"worker_id": "b-id"}) as (b2,):
            assert b2.identity is not None
            pin = fingerprint(b2.identity.public_bytes)
            async with workers(rv, {"peer_key": pin}) as (c,):
                assert c.status()["security"]["peer_key_pinned"] is True
                forged = rv.offer(c, b2, "controlling", peer_public_key=mallory.public_b64)
                await rv.send(c, forged)
                await until(lambda: c.stats["offers_refused"] == 1, "the forged key refused")
                warning = c.status()["security"]["peer_key_warning"]
                assert "not the pinned one" in warning and c.state == "waiting_for_peer"
                await rv.pair(c, b2)
                await asyncio.gather(c.wait_connected(T), b2.wait_connected(T))
                assert c.status()["security"]["peer_key_warning"] is None
        assert pin != b_fp


async def test_a_known_peer_with_another_key_is_reported_and_remembered(tmp_path: Path) -> None:
    known = tmp_path / "known_peers.json"
    mallory = Identity.generate(os.urandom)
    async with (
        fake_rendezvous() as rv,
        workers(rv, {"known_peers_file": str(known)}, {}) as (
            a,
            b,
        ),
    ):
        await rv.pair(a, b)
        await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
        assert b.identity is not None
        assert json.loads(known.read_text())[b.worker_id] == b.identity.public_b64
        async with a.subscribe(ev.PeerKeyChanged) as changes:
            await rv.send(a, {"type": "peer_disconnected", "peer_worker_id": b.worker_id})
            await rv.send(a, rv.offer(a, b, "controlling", peer_public_key=mallory.public_b64))
            change = await asyncio.wait_for(anext(changes), T)
        assert change == ev.PeerKeyChanged(
            b.worker_id, fingerprint(b.identity.public_bytes), fingerprint(mallory.public_bytes)
        )
        assert "another key" in a.status()["security"]["peer_key_warning"]
        await until(
            lambda: json.loads(known.read_text())[b.worker_id] == mallory.public_b64, "saved"
        )
    # a new worker with the same file knows b's (last) key from the start
    w = Worker(rv.config(known_peers_file=str(known)))
    assert w.link.known_peers.get(b.worker_id) == mallory.public_bytes


async def test_the_endpoint_never_resolves_a_host_name(
    lookups: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = await UdpEndpoint.bind("127.0.0.1", 0)
    sent: list[Any] = []

    class Recorder:  # the real socket's sendto would resolve a name itself, in C
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def sendto(self, data: bytes, addr: Any) -> int:
            sent.append(addr)
            return real.sendto(data, addr)

    real = ep.socket
    monkeypatch.setattr(ep, "_sock", Recorder())
    try:
        for host in HOSTS:
            assert ep.sendto(b"x", (host, 9)) is False
        assert ep.send_segments(b"xx", 1, 2, (HOSTS[0], 9)) == 0
        assert ep.sendto(b"x", ("127.0.0.1", 9)) is True
        assert ep.sendto(b"x", ("::1", 9)) in (True, False)  # an IPv6 literal is no name
        assert ep.stats["refused_host_names"] == len(HOSTS) + 1
        assert [a[0] for a in sent] == ["127.0.0.1", "::1"] and lookups == []
    finally:
        ep.close()


async def test_a_refused_offer_and_bad_messages_are_answered_sparingly() -> None:
    # Issue 14 item 8: an error handling one rendezvous message is counted AND answered; junk by
    # the hundred gets one answer per kind per second, not a flood of answers.
    async with fake_rendezvous() as rv, workers(rv, {}, {}) as (a, b):
        client = a._rendezvous
        assert client is not None
        await rv.send(a, rv.offer(a, b, "controlling", peer_worker_id=a.worker_id))
        await until(lambda: rv.errors(a) != [], "the refusal answered", T)
        [refused] = rv.errors(a)
        assert refused["code"] == "offer_refused" and "itself" in refused["message"]
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(200):
            await rv.send(a, "not json")
        await rv.send(a, '{"type": "no_such_type"}')  # another kind: answered on its own
        await until(lambda: client.stats["bad_messages"] == 201, "the junk counted", T)
        elapsed = loop.time() - start
        sent = client.stats["errors_sent"]
        await until(lambda: len(rv.errors(a)) == 1 + sent, "the answers arrive", T)
        bad = [e for e in rv.errors(a) if e["code"] == "bad_message"]
        assert any("unknown message type" in e["message"] for e in bad)
        not_json = [e for e in bad if "not JSON" in e["message"]]
        assert 1 <= len(not_json) <= 1 + int(elapsed)  # one per second at most, for 200 messages
        # The worker never answers the rendezvous's own errors (no error ping-pong) ...
        before = client.stats["errors_sent"]
        await rv.send(a, {"type": "error", "code": "bad_message", "message": "yours was bad"})
        await until(lambda: client.stats["messages_in"] >= 203, "the error read", T)
        assert client.stats["errors_sent"] == before
        # ... and still pairs on the same connection.
        assert client.connections == 1
        await rv.pair(a, b)
        await asyncio.gather(a.wait_connected(T), b.wait_connected(T))
        await chat_works(a, b)
