"""The rendezvous service over real WebSockets on loopback (uvicorn on port 0)."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from p2plab.core.signaling import MAX_MESSAGE_BYTES, parse_rendezvous_message
from rendezvous_service_code.main import Settings, create_app
from tests.rendezvous_fixtures import (
    TIMEOUT,
    WsWorker,
    debug,
    new_identity,
    running_rendezvous,
)


async def paired_pair(url: str, room: str = "default") -> tuple[WsWorker, WsWorker]:
    a = await WsWorker.connect(url)
    b = await WsWorker.connect(url)
    await a.register(room=room)
    await b.register(room=room)
    await a.update_endpoint("203.0.113.1", 1111)
    await b.update_endpoint("203.0.113.2", 2222)
    await a.expect("p2p_connection_offer")
    await b.expect("p2p_connection_offer")
    return a, b


async def test_health_and_registration_reports_observed_address() -> None:
    async with running_rendezvous() as rv:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{rv.url}/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        w = await WsWorker.connect(rv.ws_url)
        reg = await w.register(http_public_ip="198.51.100.7")
        parse_rendezvous_message(json.dumps(reg))
        assert reg["worker_id"] == w.worker_id
        local_ip, local_port = w.ws.local_address[:2]
        assert (reg["observed_ip"], reg["observed_port"]) == (local_ip, local_port)
        listing = await debug(rv, "list_workers")
        assert listing["count"] == 1
        entry = listing["workers"][0]
        assert entry["worker_id"] == w.worker_id
        assert entry["http_public_ip"] == "198.51.100.7"
        assert entry["ws_observed_port"] == local_port
        assert entry["udp_port"] is None and entry["paired_with"] is None
        await w.close()


async def test_pairing_offers_both_ways_then_third_waits_then_repairs() -> None:
    async with running_rendezvous() as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        c = await WsWorker.connect(rv.ws_url)
        key_a, key_b, key_c = new_identity(), new_identity(), new_identity()
        await a.register(identity=key_a)
        await b.register(identity=key_b)
        await a.update_endpoint("203.0.113.1", 1111, [("198.18.0.1", 1111), ("203.0.113.1", 1111)])
        await a.assert_silent()
        await b.update_endpoint("203.0.113.2", 2222, [("198.18.0.2", 2222)])
        offer_a = await a.expect("p2p_connection_offer")
        offer_b = await b.expect("p2p_connection_offer")
        parse_rendezvous_message(json.dumps(offer_a))
        assert offer_a["peer_worker_id"] == b.worker_id and offer_a["role"] == "controlling"
        assert offer_b["peer_worker_id"] == a.worker_id and offer_b["role"] == "controlled"
        assert (offer_a["peer_udp_ip"], offer_a["peer_udp_port"]) == ("203.0.113.2", 2222)
        assert offer_b["peer_candidates"] == [
            {"ip": "203.0.113.1", "port": 1111},
            {"ip": "198.18.0.1", "port": 1111},
        ]
        assert offer_a["peer_public_key"] == key_b.public_b64
        assert offer_b["peer_public_key"] == key_a.public_b64

        await c.register(identity=key_c)
        await c.update_endpoint("203.0.113.3", 3333)
        await c.assert_silent()

        await b.close()
        gone = await a.expect("peer_disconnected")
        assert gone["peer_worker_id"] == b.worker_id
        again = await a.expect("p2p_connection_offer")
        offer_c = await c.expect("p2p_connection_offer")
        assert again["peer_worker_id"] == c.worker_id and again["role"] == "controlling"
        assert offer_c["peer_worker_id"] == a.worker_id and offer_c["role"] == "controlled"
        assert offer_c["peer_udp_port"] == 1111
        await a.close()
        await c.close()


async def test_rooms_isolate() -> None:
    async with running_rendezvous() as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        await a.register(room="red")
        await b.register(room="blue")
        await a.update_endpoint("203.0.113.1", 1)
        await b.update_endpoint("203.0.113.2", 2)
        await a.assert_silent()
        await b.assert_silent()
        c = await WsWorker.connect(rv.ws_url)
        await c.register(room="blue")
        await c.update_endpoint("203.0.113.3", 3)
        assert (await b.expect("p2p_connection_offer"))["peer_worker_id"] == c.worker_id
        await a.assert_silent()
        for w in (a, b, c):
            await w.close()


async def test_bad_messages_get_errors_and_harm_nobody() -> None:
    async with running_rendezvous() as rv:
        other_a, other_b = await paired_pair(rv.ws_url)
        w = await WsWorker.connect(rv.ws_url)
        # before registering, an update is refused but the connection lives on
        await w.update_endpoint("203.0.113.9", 9)
        assert (await w.expect("error"))["code"] == "bad_message"
        await w.register()
        bad_inputs: list[str | bytes] = [
            "not json",
            b"\xff\xfe\x00",
            "[1, 2]",
            json.dumps({"no": "type"}),
            json.dumps({"type": "launch_missiles"}),
            json.dumps({"type": "update_udp_endpoint", "udp_ip": "1.2.3.4", "udp_port": 70000}),
            json.dumps({"type": "update_udp_endpoint", "udp_port": 1}),
            json.dumps({"type": "register"}),  # second register on one connection
            "x" * (MAX_MESSAGE_BYTES + 1),
        ]
        for raw in bad_inputs:
            await w.send(raw)
            err = await w.expect("error")
            assert err["code"] == "bad_message" and err["message"], raw
        oversize = json.dumps({"type": "update_udp_endpoint", "pad": "y" * MAX_MESSAGE_BYTES})
        await w.send(oversize)
        assert "too large" in (await w.expect("error"))["message"]
        # the same connection still works
        v = await WsWorker.connect(rv.ws_url)
        await v.register()
        await v.update_endpoint("203.0.113.5", 5)
        await w.update_endpoint("203.0.113.4", 4)
        assert (await w.expect("p2p_connection_offer"))["peer_worker_id"] == v.worker_id
        # and the pair made before is untouched
        await other_b.close()
        assert (await other_a.expect("peer_disconnected"))["peer_worker_id"] == other_b.worker_id
        for x in (w, v, other_a):
            await x.close()


@pytest.mark.parametrize("bad_id", ["has space", "x" * 65, "semi;colon", "%00"])
async def test_invalid_worker_id_closed_1008(bad_id: str) -> None:
    async with running_rendezvous() as rv:
        w = await WsWorker.connect(rv.ws_url, worker_id=bad_id.replace(" ", "%20"))
        code, reason = await w.wait_closed()
        assert code == 1008 and reason == "invalid worker id"


async def test_uuid_and_simple_ids_accepted() -> None:
    async with running_rendezvous() as rv:
        for wid in (str(uuid.uuid4()), "worker_A-1"):
            w = await WsWorker.connect(rv.ws_url, worker_id=wid)
            assert (await w.register())["worker_id"] == wid
            await w.close()


async def test_reregister_same_id_replaces_old_connection() -> None:
    async with running_rendezvous() as rv:
        old = await WsWorker.connect(rv.ws_url)
        await old.register()
        new = await WsWorker.connect(rv.ws_url, worker_id=old.worker_id)
        await new.register()
        code, _ = await old.wait_closed()
        assert code == 4000
        listing = await debug(rv, "list_workers")
        assert [x["worker_id"] for x in listing["workers"]] == [old.worker_id]
        assert listing["workers"][0]["ws_observed_port"] == new.ws.local_address[1]
        await new.close()


async def test_a_live_id_with_a_key_cannot_be_taken_over_by_another_key() -> None:
    async with running_rendezvous() as rv:
        owner = await WsWorker.connect(rv.ws_url)
        key = new_identity()
        await owner.register(identity=key)
        other = new_identity()
        thief = await WsWorker.connect(rv.ws_url, worker_id=owner.worker_id)
        await thief.send({"type": "register"})  # plaintext, no key
        assert await thief.wait_closed() == (4409, "worker id in use")
        thief = await WsWorker.connect(rv.ws_url, worker_id=owner.worker_id)
        await thief.send(  # its own key, properly proven: still not the owner's
            {"type": "register", "public_key": other.public_b64, "proof": thief.proof(other)}
        )
        assert await thief.wait_closed() == (4409, "worker id in use")
        # the owner is untouched, and its own reconnect (same key, proven) still replaces it
        listing = await debug(rv, "list_workers")
        stats = await debug(rv, "stats")
        assert [x["worker_id"] for x in listing["workers"]] == [owner.worker_id]
        assert stats["refused_takeover"] == 2
        again = await WsWorker.connect(rv.ws_url, worker_id=owner.worker_id)
        await again.register(identity=key)
        assert (await owner.wait_closed())[0] == 4000
        await again.close()


async def test_the_public_key_alone_takes_over_nothing() -> None:
    # Finding 5: a worker's public key is in every offer its peers get.  Registering under its
    # id with that key but without its private key is refused (1008), however the proof is made.
    async with running_rendezvous() as rv:
        victim = await WsWorker.connect(rv.ws_url)
        key = new_identity()
        await victim.register(identity=key)
        replayed = victim.proof(key)  # a proof captured from the victim's own connection
        mallory = new_identity()
        attempts: list[str | None] = [
            None,  # no proof at all
            replayed,  # another connection's nonce and server key
            "A" * 43 + "=",  # 32 zero bytes
            "not base64!",
        ]
        for proof in attempts:
            thief = await WsWorker.connect(rv.ws_url, worker_id=victim.worker_id)
            await thief.send({"type": "register", "public_key": key.public_b64, "proof": proof})
            assert await thief.wait_closed() == (1008, "key proof failed"), proof
        # a proof computed with the attacker's own private key for the victim's public key
        thief = await WsWorker.connect(rv.ws_url, worker_id=victim.worker_id)
        forged = thief.proof(mallory)
        await thief.send({"type": "register", "public_key": key.public_b64, "proof": forged})
        assert await thief.wait_closed() == (1008, "key proof failed")
        # a proof for the same key but bound to another worker id
        thief = await WsWorker.connect(rv.ws_url, worker_id=victim.worker_id)
        elsewhere = thief.proof(key, worker_id="someone-else")
        await thief.send({"type": "register", "public_key": key.public_b64, "proof": elsewhere})
        assert await thief.wait_closed() == (1008, "key proof failed")
        # the victim is still registered on its connection and still gets paired
        stats = await debug(rv, "stats")
        listing = await debug(rv, "list_workers")
        assert stats["refused_proof"] == 6 and stats["registered"] == 1
        assert listing["workers"][0]["ws_observed_port"] == victim.ws.local_address[1]
        peer = await WsWorker.connect(rv.ws_url)
        await peer.register(identity=new_identity())
        await peer.update_endpoint("203.0.113.2", 2)
        await victim.update_endpoint("203.0.113.1", 1)
        assert (await victim.expect("p2p_connection_offer"))["peer_worker_id"] == peer.worker_id
        await victim.close()
        await peer.close()


async def test_every_connection_gets_a_fresh_challenge_first() -> None:
    async with running_rendezvous() as rv:
        seen = set()
        for _ in range(3):
            w = await WsWorker.connect(rv.ws_url)
            assert w.challenge is not None
            parse_rendezvous_message(json.dumps(w.challenge))
            seen.add((w.challenge["nonce"], w.challenge["server_key"]))
            await w.close()
        assert len({n for n, _ in seen}) == 3 and len({k for _, k in seen}) == 3


async def test_global_token_refuses_missing_or_wrong_token() -> None:
    async with running_rendezvous(token="s3cret") as rv:
        for given in (None, "wrong"):
            w = await WsWorker.connect(rv.ws_url)
            await w.send({"type": "register", "token": given})
            assert await w.wait_closed() == (1008, "invalid token")
        ok = await WsWorker.connect(rv.ws_url)
        assert (await ok.register(token="s3cret"))["worker_id"] == ok.worker_id
        await ok.close()


async def test_room_tokens() -> None:
    async with running_rendezvous(room_tokens={"lab": "labtok"}) as rv:
        w = await WsWorker.connect(rv.ws_url)
        await w.send({"type": "register", "room": "lab", "token": "nope"})
        assert (await w.wait_closed())[0] == 1008
        ok = await WsWorker.connect(rv.ws_url)
        await ok.register(room="lab", token="labtok")
        open_room = await WsWorker.connect(rv.ws_url)
        await open_room.register(room="elsewhere")
        await ok.close()
        await open_room.close()


async def test_admin_token_protects_debug_endpoints() -> None:
    async with running_rendezvous(admin_token="adm") as rv:
        async with httpx.AsyncClient(base_url=rv.url) as http:
            assert (await http.get("/debug/list_workers")).status_code == 401
            bad = {"Authorization": "Bearer nope"}
            assert (await http.get("/debug/list_workers", headers=bad)).status_code == 401
            good = {"Authorization": "Bearer adm"}
            r = await http.get("/debug/list_workers", headers=good)
            assert r.status_code == 200 and r.json() == {"count": 0, "workers": []}
            assert (await http.get("/health")).status_code == 200


async def test_worker_cap_refuses_with_1013_and_frees_slots() -> None:
    async with running_rendezvous(max_workers=2) as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        await a.register()
        await b.register()
        c = await WsWorker.connect(rv.ws_url)
        assert await c.wait_closed() == (1013, "try again later")
        await a.close()
        await asyncio.sleep(0.2)
        d = await WsWorker.connect(rv.ws_url)
        for _ in range(50):  # the slot frees once the server has seen the close
            try:
                await d.register()
                break
            except Exception:
                await asyncio.sleep(0.1)
                d = await WsWorker.connect(rv.ws_url)
        else:
            raise AssertionError("slot never freed")
        await b.close()
        await d.close()


async def test_rate_limit_drops_with_one_error_then_closes_abuser() -> None:
    async with running_rendezvous(
        rate_limit_per_s=5, rate_limit_burst=10, abuse_threshold=300
    ) as rv:
        bystander_a, bystander_b = await paired_pair(rv.ws_url)
        w = await WsWorker.connect(rv.ws_url)
        await w.register()  # 1 token used
        update = json.dumps({"type": "update_udp_endpoint", "udp_ip": "203.0.113.8", "udp_port": 8})
        for _ in range(60):
            await w.send(update)
        # one rate_limited error for the whole burst, nothing else (endpoint updates of an
        # unpaired worker with nobody waiting produce no reply)
        err = await w.expect("error")
        assert err["code"] == "rate_limited"
        await w.assert_silent(0.5)
        # after the bucket refills the connection works again
        await asyncio.sleep(2.5)
        await w.send("garbage")
        assert (await w.expect("error"))["code"] == "bad_message"
        # sustained flood: closed with 1008
        flood = [w.send(update) for _ in range(2000)]
        try:
            await asyncio.gather(*flood)
        except Exception:
            pass  # the server may close while we still send
        code, reason = await w.wait_closed()
        assert code == 1008 and reason == "rate limit exceeded"
        # nobody else noticed
        await bystander_b.close()
        assert (await bystander_a.expect("peer_disconnected"))["peer_worker_id"]
        listing = await debug(rv, "list_workers")
        assert [x["worker_id"] for x in listing["workers"]] == [bystander_a.worker_id]
        await bystander_a.close()


async def test_register_timeout_closes_silent_connection() -> None:
    async with running_rendezvous(register_timeout_s=0.3) as rv:
        w = await WsWorker.connect(rv.ws_url)
        assert await w.wait_closed() == (1008, "register expected")


async def test_forwarded_header_only_when_trusted() -> None:
    hdrs = {"X-Forwarded-For": "192.0.2.1, 198.51.100.44"}
    async with running_rendezvous(trust_forwarded=False) as rv:
        w = await WsWorker.connect(rv.ws_url, additional_headers=hdrs)
        assert (await w.register())["observed_ip"] == "127.0.0.1"
        await w.close()
    async with running_rendezvous(trust_forwarded=True) as rv:
        w = await WsWorker.connect(rv.ws_url, additional_headers=hdrs)
        reg = await w.register()
        assert reg["observed_ip"] == "198.51.100.44" and reg["observed_port"] is None
        await w.close()
        # a trusted proxy's entry that is not an IP literal is not taken (the socket's is)
        w = await WsWorker.connect(rv.ws_url, additional_headers={"X-Forwarded-For": "a.invalid"})
        assert (await w.register())["observed_ip"] == "127.0.0.1"
        await w.close()


async def test_host_names_as_candidates_are_refused_and_never_offered() -> None:
    # Finding 3: names in an offer made the peer's worker resolve them, blocking its loop.
    async with running_rendezvous() as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        await a.register()
        await b.register()
        await a.update_endpoint("a.slow.invalid", 1)
        assert "udp_ip" in (await a.expect("error"))["message"]
        names = [(f"n{i}.slow.invalid", 1) for i in range(17)]
        await a.update_endpoint("203.0.113.1", 1, names)
        assert "local_candidates" in (await a.expect("error"))["message"]
        await b.update_endpoint("203.0.113.2", 2)
        await b.assert_silent()  # a never reported a usable endpoint: nobody is offered it
        await a.update_endpoint("203.0.113.1", 1, [("198.18.0.1", 1)])
        offer = await b.expect("p2p_connection_offer")
        assert [c["ip"] for c in offer["peer_candidates"]] == ["203.0.113.1", "198.18.0.1"]
        await a.close()
        await b.close()


def test_testclient_works_too() -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app()) as client:
        assert client.get("/health").json() == {"status": "ok"}
        with client.websocket_connect("/ws/register/abc") as ws:
            assert ws.receive_json()["type"] == "challenge"
            ws.send_text(json.dumps({"type": "register"}))
            assert ws.receive_json()["type"] == "registered"
            ws.send_text("{")
            assert ws.receive_json()["code"] == "bad_message"


async def test_serve_reports_addresses_and_stops_on_cancel() -> None:
    from rendezvous_service_code.main import ServeAddresses, serve

    ready = asyncio.Event()
    seen: list[ServeAddresses] = []
    task = asyncio.create_task(
        serve(
            Settings(host="127.0.0.1", port=0),
            ready=ready,
            on_started=seen.append,
            handle_signals=False,
        )
    )
    await asyncio.wait_for(ready.wait(), TIMEOUT)
    assert seen and seen[0].http_port > 0 and seen[0].stun_port is None
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{seen[0].url}/health")).status_code == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_serve_with_embedded_stun_answers_binding_requests() -> None:
    import os
    import socket
    import struct

    from rendezvous_service_code.main import ServeAddresses, serve

    ready = asyncio.Event()
    seen: list[ServeAddresses] = []
    task = asyncio.create_task(
        serve(
            Settings(host="127.0.0.1", port=0, stun_port=0),
            ready=ready,
            on_started=seen.append,
            handle_signals=False,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        stun_port = seen[0].stun_port
        assert stun_port is not None and stun_port > 0
        # a hand-built RFC 8489 Binding request, independent of p2plab's codec
        txid = os.urandom(12)
        request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + txid
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            reply = b""
            for _ in range(5):
                sock.sendto(request, ("127.0.0.1", stun_port))
                try:
                    reply = await asyncio.wait_for(loop.sock_recv(sock, 2048), 1.0)
                    break
                except TimeoutError:
                    continue
        msg_type, _length, cookie = struct.unpack("!HHI", reply[:8])
        assert (msg_type, cookie, reply[8:20]) == (0x0101, 0x2112A442, txid)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_restarted_worker_with_a_fixed_id_retries_until_its_old_registration_goes() -> None:
    # WORKER_ID fixed, a fresh key per start: the earlier run may still be registered for a while
    # (a dead connection not noticed yet, a Redis TTL). The new run must retry, not stop for good.
    from p2plab.aio.worker import Worker
    from tests.conftest import until
    from tests.rendezvous_fixtures import loopback_worker_config

    async with running_rendezvous() as rv:
        cfg = loopback_worker_config(rv, worker_id="fixed-id", nat_report=False)
        old, new = Worker(cfg), Worker(cfg)
        try:
            await old.start()
            await old.wait_for_state("waiting_for_peer", timeout=TIMEOUT)
            await new.start()
            rz = new._rendezvous
            assert rz is not None
            await until(lambda: rz.stats["reconnects"] >= 2, "the new run to be refused twice")
            assert new.state != "stopped" and "4409" in str(rz.last_error)
            await old.stop()
            await new.wait_for_state("waiting_for_peer", timeout=TIMEOUT)
        finally:
            await new.stop()
            await old.stop()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_workers_pair_only_with_the_same_encryption_mode(
    backend: str, request: pytest.FixtureRequest
) -> None:
    opts: dict[str, object] = {}
    if backend == "redis":
        opts = {
            "redis_url": request.getfixturevalue("redis_url"),
            "redis_heartbeat_s": 0.3,
            "redis_ttl_s": 1.5,
        }
    async with running_rendezvous(**opts) as rv:
        ws: dict[str, WsWorker] = {}
        for i, (name, key) in enumerate(
            [("enc1", new_identity()), ("plain1", None), ("enc2", new_identity()), ("plain2", None)]
        ):
            ws[name] = await WsWorker.connect(rv.ws_url)
            await ws[name].register(identity=key)
            await ws[name].update_endpoint("203.0.113.1", 1000 + i)
            if name == "plain1":  # enc1 and plain1 could not talk: no offer
                await ws["enc1"].assert_silent()
                await ws["plain1"].assert_silent()
        for me, peer in [
            ("enc1", "enc2"),
            ("enc2", "enc1"),
            ("plain1", "plain2"),
            ("plain2", "plain1"),
        ]:
            offer = await ws[me].expect("p2p_connection_offer")
            assert offer["peer_worker_id"] == ws[peer].worker_id
        for w in ws.values():
            await w.close()


async def test_worker_errors_are_counted_never_answered_and_still_rate_limited() -> None:
    async with running_rendezvous(
        rate_limit_per_s=5, rate_limit_burst=10, abuse_threshold=300
    ) as rv:
        w = await WsWorker.connect(rv.ws_url)
        await w.register()
        refusal = {"type": "error", "code": "offer_refused", "message": "peer x: refused"}
        for _ in range(5):
            await w.send(refusal)
        await w.assert_silent(0.3)  # no answer: an error is never answered with an error
        assert (await debug(rv, "stats"))["worker_errors"] == 5
        # the connection stays up and works
        await w.send("garbage")
        assert (await w.expect("error"))["code"] == "bad_message"
        # a flood of errors is rate limited like any other message, then closed
        try:
            await asyncio.gather(*[w.send(refusal) for _ in range(2000)])
        except Exception:
            pass  # the server may close while we still send
        code, reason = await w.wait_closed()
        assert code == 1008 and reason == "rate limit exceeded"
        stats = await debug(rv, "stats")
        assert stats["closed_for_abuse"] == 1 and stats["rate_limited"] >= 300
        assert stats["worker_errors"] < 5 + 2000


async def test_the_nat_hint_is_passed_on_and_a_hostile_one_refused() -> None:
    # Issue 16: the hint chooses how the peer punches, so what reaches an offer is checked.
    async with running_rendezvous() as rv:
        a = await WsWorker.connect(rv.ws_url)
        b = await WsWorker.connect(rv.ws_url)
        await a.register()
        await b.register()
        too_many = {"mapping": "endpoint-dependent", "predicted_ports": list(range(1, 18))}
        await a.update_endpoint("203.0.113.1", 1, nat=too_many)
        assert "predicted_ports" in (await a.expect("error"))["message"]
        port_zero = {"mapping": "endpoint-dependent", "predicted_ports": [40000, 0]}
        await a.update_endpoint("203.0.113.1", 1, nat=port_zero)
        assert "predicted_ports" in (await a.expect("error"))["message"]
        await a.update_endpoint("203.0.113.1", 1, nat={"mapping": "whatever"})
        assert "nat" in (await a.expect("error"))["message"]
        await b.update_endpoint("203.0.113.2", 2)
        await b.assert_silent()  # a's endpoint never got stored: nobody is offered it
        # the connection survived all three: a valid hint now pairs and reaches b
        hint = {"mapping": "endpoint-dependent", "sequential": True, "predicted_ports": [40001]}
        await a.update_endpoint("203.0.113.1", 1, nat=hint)
        offer_b = await b.expect("p2p_connection_offer")
        assert offer_b["peer_nat"] == {
            "mapping": "endpoint-dependent",
            "remaps_on_clash": False,
            "sequential": True,
            "predicted_ports": [40001],
        }
        assert (await a.expect("p2p_connection_offer"))["peer_nat"] is None
        listing = await debug(rv, "list_workers")
        nats = {w["worker_id"]: w["nat"] for w in listing["workers"]}
        assert nats == {a.worker_id: offer_b["peer_nat"], b.worker_id: None}
        assert (await debug(rv, "stats"))["bad_messages"] == 3
        await a.close()
        await b.close()
