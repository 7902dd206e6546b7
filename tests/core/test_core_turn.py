"""The sans-I/O TURN client in memory against a small scripted server on a fake clock: the TURN
attributes' bytes, the 401 -> credentials retry, stale nonces, refresh timing, retransmissions,
ChannelData framing over UDP and TCP, Send/Data indications, and junk dropped and counted.
Also coturn's REST credentials and ``turn:`` URLs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import struct
from typing import Any

import pytest

from p2plab.core.stun import Class, Message, Method, long_term_key, parse_message
from p2plab.core.turn import (
    CHANNEL_MIN,
    Allocated,
    AllocationFailed,
    ChannelBound,
    PeerData,
    PermissionCreated,
    PermissionFailed,
    Refreshed,
    Released,
    TurnClient,
    TurnEvent,
    TurnState,
    decode_channel_data,
    encode_channel_data,
)
from p2plab.core.turn_config import TurnServer, parse_turn_url, turn_credentials
from p2plab.errors import ConfigError, LocalProtocolError

SERVER = ("192.0.2.10", 3478)
RELAYED = ("192.0.2.10", 50000)
MAPPED = ("198.51.100.7", 40000)
PEER = ("203.0.113.5", 6000)
USER, PASSWORD, REALM = "1700000000:w1", "secret-pw", "p2plab"
KEY = long_term_key(USER, REALM, PASSWORD)
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")  # RFC 5769's transaction id


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def counter_bytes() -> Any:
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


class FakeServer:
    """Answers like a TURN server with long-term credentials (just what the tests need)."""

    def __init__(self, *, password: str = PASSWORD, lifetime: int = 600) -> None:
        self.nonce = "nonce-1"
        self.key = long_term_key(USER, REALM, password)
        self.lifetime = lifetime
        self.requests: list[Message] = []
        self.indications: list[Message] = []
        self.channel_data: list[tuple[int, bytes]] = []

    def handle(self, data: bytes) -> list[bytes]:
        if data[0] >> 6 == 1:
            self.channel_data.append(decode_channel_data(data))
            return []
        msg = parse_message(data)
        if msg.message_class is Class.INDICATION:
            self.indications.append(msg)
            return []
        self.requests.append(msg)
        if "MESSAGE-INTEGRITY" not in msg.attributes:
            return [self.error(msg, 401, {"REALM": REALM, "NONCE": self.nonce})]
        if msg.attributes.get("NONCE") != self.nonce:
            return [self.error(msg, 438, {"REALM": REALM, "NONCE": self.nonce})]
        try:
            parse_message(data, self.key)
        except Exception:
            return [self.error(msg, 401, {"REALM": REALM, "NONCE": self.nonce})]
        attrs: dict[str, Any] = {}
        if msg.message_method is Method.ALLOCATE:
            attrs = {
                "XOR-RELAYED-ADDRESS": RELAYED,
                "XOR-MAPPED-ADDRESS": MAPPED,
                "LIFETIME": self.lifetime,
            }
        elif msg.message_method is Method.REFRESH:
            attrs = {"LIFETIME": msg.attributes.get("LIFETIME", self.lifetime)}
        reply = Message(msg.message_method, Class.RESPONSE, msg.transaction_id, attrs)
        reply.add_message_integrity(self.key)
        return [bytes(reply)]

    def error(self, msg: Message, code: int, attrs: dict[str, Any]) -> bytes:
        reply = Message(
            msg.message_method,
            Class.ERROR,
            msg.transaction_id,
            {"ERROR-CODE": (code, "err"), **attrs},
        )
        return bytes(reply)


def pump(client: TurnClient, server: FakeServer, now: float) -> list[TurnEvent]:
    """Exchange until quiet; the events that came out."""
    for _ in range(20):
        out = client.datagrams_to_send(now)
        if not out:
            break
        for data, addr in out:
            assert addr == SERVER
            for reply in server.handle(data):
                client.receive(reply, SERVER, now)
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    return events


def allocated(server: FakeServer | None = None, **kwargs: Any) -> tuple[TurnClient, FakeServer]:
    server = server or FakeServer()
    client = TurnClient(SERVER, USER, PASSWORD, rand_bytes=counter_bytes(), **kwargs)
    client.allocate(0.0)
    events = pump(client, server, 0.0)
    assert events == [Allocated(RELAYED, MAPPED, server.lifetime)]
    return client, server


# --- codec ----------------------------------------------------------------------------------


def test_turn_attributes_have_their_rfc_bytes() -> None:
    msg = Message(
        Method.CHANNEL_BIND,
        Class.REQUEST,
        TXID,
        {
            "CHANNEL-NUMBER": 0x4001,
            "LIFETIME": 600,
            "XOR-PEER-ADDRESS": ("192.0.2.1", 32853),
            "DATA": b"abcde",
            "XOR-RELAYED-ADDRESS": ("192.0.2.1", 32853),
            "REQUESTED-ADDRESS-FAMILY": 2,
            "REQUESTED-TRANSPORT": 17,
            "DONT-FRAGMENT": None,
        },
    )
    expected = unhex("""
        00 09 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        00 0c 00 04 40 01 00 00
        00 0d 00 04 00 00 02 58
        00 12 00 08 00 01 a1 47 e1 12 a6 43
        00 13 00 05 61 62 63 64 65 00 00 00
        00 16 00 08 00 01 a1 47 e1 12 a6 43
        00 17 00 04 02 00 00 00
        00 19 00 04 11 00 00 00
        00 1a 00 00""")
    assert bytes(msg) == expected
    assert parse_message(expected) == msg


@pytest.mark.parametrize(
    ("attr", "raw", "why"),
    [
        (0x000C, b"\x40\x01", "needs 4 bytes"),
        (0x000D, b"\x00\x00\x02", "needs 4 bytes"),
        (0x0019, b"\x11\x00", "needs 4 bytes"),
        (0x0017, b"\x03\x00\x00\x00", "bad address family"),
        (0x001A, b"\x00\x00\x00\x00", "must be empty"),
        (0x0016, b"\x00\x01", "too short"),
    ],
)
def test_malformed_turn_attributes_are_refused(attr: int, raw: bytes, why: str) -> None:
    body = struct.pack("!HH", attr, len(raw)) + raw + b"\x00" * (-len(raw) % 4)
    data = struct.pack("!HHI", 0x0003, len(body), 0x2112A442) + TXID + body
    with pytest.raises(Exception, match=why):
        parse_message(data)


def test_channel_data_framing() -> None:
    assert encode_channel_data(0x4000, b"abc", pad=False) == b"\x40\x00\x00\x03abc"
    assert encode_channel_data(0x4000, b"abc", pad=True) == b"\x40\x00\x00\x03abc\x00"
    assert encode_channel_data(0x4000, b"abcd", pad=True) == b"\x40\x00\x00\x04abcd"
    assert decode_channel_data(b"\x40\x00\x00\x03abc\x00") == (0x4000, b"abc")
    assert decode_channel_data(b"\x7f\xfe\x00\x00") == (0x7FFE, b"")
    for bad in (
        b"\x40\x00\x00",
        b"\x40\x00\x00\x05abc",
        b"\x80\x00\x00\x00",
        b"\x40\x00\x00\x00abcd",
    ):
        with pytest.raises(ValueError):
            decode_channel_data(bad)


# --- allocation and credentials -------------------------------------------------------------


def test_401_brings_realm_and_nonce_and_the_retry_is_authenticated() -> None:
    client, server = allocated()
    first, second = server.requests
    assert first.message_method is Method.ALLOCATE
    assert first.attributes == {"REQUESTED-TRANSPORT": 17}
    assert second.transaction_id != first.transaction_id
    assert second.attributes["USERNAME"] == USER
    assert second.attributes["REALM"] == REALM
    assert second.attributes["NONCE"] == "nonce-1"
    assert second.attributes["REQUESTED-TRANSPORT"] == 17
    assert list(second.attributes)[-1] == "MESSAGE-INTEGRITY"
    parse_message(bytes(second), KEY)  # the key is MD5(username:realm:password)
    assert client.state is TurnState.ALLOCATED
    assert client.relayed == RELAYED and client.mapped == MAPPED
    assert client.expires_at == 600.0


def test_wrong_password_fails_with_401_and_no_loop() -> None:
    server = FakeServer(password="the-real-one")
    client = TurnClient(SERVER, USER, PASSWORD, rand_bytes=counter_bytes())
    client.allocate(0.0)
    events = pump(client, server, 0.0)
    assert len(server.requests) == 2
    assert len(events) == 1 and isinstance(events[0], AllocationFailed)
    assert events[0].code == 401 and "credentials refused" in events[0].reason
    assert client.state is TurnState.FAILED
    assert client.get_timer() is None


def test_stale_nonce_is_taken_and_the_request_retried() -> None:
    client, server = allocated()
    server.nonce = "nonce-2"
    client.create_permission(PEER[0], 1.0)
    assert pump(client, server, 1.0) == [PermissionCreated(PEER[0])]
    codes = [m.attributes.get("NONCE") for m in server.requests[2:]]
    assert codes == ["nonce-1", "nonce-2"]


def test_a_server_that_keeps_saying_stale_is_not_followed_forever() -> None:
    client, server = allocated()

    def always_stale(data: bytes) -> list[bytes]:
        msg = parse_message(data)
        server.requests.append(msg)
        server.nonce += "x"
        return [server.error(msg, 438, {"REALM": REALM, "NONCE": server.nonce})]

    server.handle = always_stale  # type: ignore[method-assign]
    client.create_permission(PEER[0], 1.0)
    events = pump(client, server, 1.0)
    assert len(server.requests) == 2 + 4  # the request and three retries
    assert len(events) == 1 and isinstance(events[0], PermissionFailed)


def test_retransmissions_then_allocation_fails() -> None:
    client = TurnClient(SERVER, USER, PASSWORD, rand_bytes=counter_bytes())
    client.allocate(0.0)
    sent = [0.0] if client.datagrams_to_send(0.0) else []
    while (timer := client.get_timer()) is not None:
        client.handle_timer(timer)
        if client.datagrams_to_send(timer):
            sent.append(timer)
    assert sent == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    event = client.next_event()
    assert isinstance(event, AllocationFailed) and "no answer" in event.reason
    assert client.state is TurnState.FAILED


def test_refresh_a_minute_before_expiry_and_expiry_without_answer() -> None:
    client, server = allocated()
    assert client.get_timer() == 540.0
    client.handle_timer(539.9)
    assert client.datagrams_to_send(539.9) == []
    client.handle_timer(540.0)
    assert pump(client, server, 540.0) == [Refreshed(600)]
    assert server.requests[-1].message_method is Method.REFRESH
    assert client.expires_at == 1140.0 and client.get_timer() == 1080.0
    # From now on the server is gone: retries until the allocation runs out, then it is lost.
    t = 1080.0
    events: list[TurnEvent] = []
    refreshes = 0
    while True:
        client.handle_timer(t)
        refreshes += len(client.datagrams_to_send(t))
        while (event := client.next_event()) is not None:
            events.append(event)
        if client.state is not TurnState.ALLOCATED:
            break
        timer = client.get_timer()
        assert timer is not None and timer <= 1140.0
        t = timer
    assert t == 1140.0 and refreshes > 7  # a second transaction after the first timed out
    assert len(events) == 1 and isinstance(events[0], AllocationFailed)
    assert "expired" in events[0].reason


def test_short_lifetime_refreshes_half_way() -> None:
    client, _ = allocated(FakeServer(lifetime=30))
    assert client.get_timer() == 15.0


def test_release_sends_refresh_zero() -> None:
    client, server = allocated()
    client.release(5.0)
    assert pump(client, server, 5.0) == [Released()]
    assert server.requests[-1].attributes["LIFETIME"] == 0
    assert client.state is TurnState.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(PEER, b"x", 6.0)


# --- data -----------------------------------------------------------------------------------


def test_send_indication_then_channel_data_after_bind_udp() -> None:
    client, server = allocated()
    client.create_permission(PEER[0], 1.0)
    assert pump(client, server, 1.0) == [PermissionCreated(PEER[0])]
    client.send(PEER, b"hello", 1.0)
    pump(client, server, 1.0)
    (indication,) = server.indications
    assert indication.message_method is Method.SEND
    assert indication.attributes["XOR-PEER-ADDRESS"] == PEER
    assert indication.attributes["DATA"] == b"hello"
    assert client.bind_channel(PEER, 2.0) == CHANNEL_MIN
    assert client.bind_channel(PEER, 2.0) == CHANNEL_MIN  # one channel per peer
    assert pump(client, server, 2.0) == [ChannelBound(PEER, CHANNEL_MIN)]
    client.send(PEER, b"abc", 2.0)
    ((raw, _),) = client.datagrams_to_send(2.0)
    assert raw == b"\x40\x00\x00\x03abc"  # not padded over UDP
    client.receive(b"\x40\x00\x00\x03xyz\x00", SERVER, 3.0)  # padded is fine too
    client.receive(bytes(data_indication(PEER, b"ind")), SERVER, 3.0)
    assert client.next_event() == PeerData(PEER, b"xyz", CHANNEL_MIN)
    assert client.next_event() == PeerData(PEER, b"ind", None)
    assert client.stats["sent_indication"] == 1 and client.stats["sent_channel"] == 1
    # Permissions and the channel are refreshed before they run out (300 s and 600 s).
    assert client.get_timer() == 241.0
    client.handle_timer(241.0)
    pump(client, server, 241.0)
    assert server.requests[-1].message_method is Method.CREATE_PERMISSION
    client.handle_timer(542.0)
    pump(client, server, 542.0)
    assert server.requests[-1].message_method is Method.CHANNEL_BIND
    assert server.requests[-1].attributes["CHANNEL-NUMBER"] == CHANNEL_MIN


def data_indication(peer: tuple[str, int], data: bytes) -> Message:
    return Message(
        Method.DATA, Class.INDICATION, b"\x01" * 12, {"XOR-PEER-ADDRESS": peer, "DATA": data}
    )


def test_tcp_frames_a_split_stream_and_pads_channel_data() -> None:
    server = FakeServer()
    client = TurnClient(SERVER, USER, PASSWORD, rand_bytes=counter_bytes(), transport="tcp")
    client.allocate(0.0)
    # Feed the server's answers one byte at a time: framing must not care.
    for _ in range(3):
        for data, _ in client.datagrams_to_send(0.0):
            for reply in server.handle(data):
                for i in range(len(reply)):
                    client.receive(reply[i : i + 1], SERVER, 0.0)
    assert isinstance(client.next_event(), Allocated)
    client.bind_channel(PEER, 1.0)
    assert pump(client, server, 1.0) == [ChannelBound(PEER, CHANNEL_MIN)]
    client.send(PEER, b"abcde", 1.0)
    ((raw, _),) = client.datagrams_to_send(1.0)
    assert raw == b"\x40\x00\x00\x05abcde\x00\x00\x00"
    both = encode_channel_data(CHANNEL_MIN, b"one", pad=True) + bytes(data_indication(PEER, b"two"))
    client.receive(both[:5], SERVER, 2.0)
    client.receive(both[5:], SERVER, 2.0)
    assert client.next_event() == PeerData(PEER, b"one", CHANNEL_MIN)
    assert client.next_event() == PeerData(PEER, b"two", None)
    # TCP requests are sent once, not retransmitted (RFC 8489 section 6.2.2).
    client.create_permission("203.0.113.99", 3.0)
    assert len(client.datagrams_to_send(3.0)) == 1
    assert client.get_timer() == pytest.approx(3.0 + 39.5)
    # A stream that stops framing cannot be resynchronised.
    client.receive(b"\xff\xff\xff\xff", SERVER, 4.0)
    event = client.next_event()
    assert isinstance(event, AllocationFailed) and "not TURN" in event.reason
    assert client.stats["junk"] == 1


# --- hostile input --------------------------------------------------------------------------


def test_junk_is_dropped_and_counted() -> None:
    client, server = allocated()
    client.create_permission(PEER[0], 1.0)
    pump(client, server, 1.0)
    stranger = ("203.0.113.66", 7000)
    before = dict(client.stats)
    client.receive(b"\x00\x01junk", SERVER, 2.0)  # not STUN
    client.receive(b"", SERVER, 2.0)
    client.receive(bytes(data_indication(PEER, b"x")), ("192.0.2.99", 3478), 2.0)  # not the server
    client.receive(bytes(data_indication(stranger, b"x")), SERVER, 2.0)  # no permission
    client.receive(b"\x40\x05\x00\x01x", SERVER, 2.0)  # unknown channel
    client.receive(b"\x40\x05\x00\x09x", SERVER, 2.0)  # bad length
    # A response to nothing, and a Refresh answer forged without the key:
    client.receive(bytes(Message(Method.REFRESH, Class.RESPONSE, b"\x09" * 12)), SERVER, 2.0)
    client.handle_timer(540.0)
    sent = [parse_message(data) for data, _ in client.datagrams_to_send(540.0)]
    request = next(m for m in sent if m.message_method is Method.REFRESH)
    request_bytes = bytes(request)
    forged = Message(Method.REFRESH, Class.RESPONSE, request.transaction_id, {"LIFETIME": 9})
    forged.add_message_integrity(b"wrong key")
    client.receive(bytes(forged), SERVER, 540.0)
    unsigned = Message(Method.REFRESH, Class.RESPONSE, request.transaction_id, {"LIFETIME": 9})
    client.receive(bytes(unsigned), SERVER, 540.0)
    delta = {k: client.stats[k] - before[k] for k in client.stats if client.stats[k] != before[k]}
    assert delta == {
        "junk": 3,
        "not_from_server": 1,
        "unpermitted_peer": 1,
        "unknown_channel": 1,
        "unmatched": 1,
        "bad_integrity": 2,
    }
    assert client.next_event() is None
    assert client.state is TurnState.ALLOCATED and client.lifetime == 600
    # The genuine answer still lands.
    for reply in server.handle(request_bytes):
        client.receive(reply, SERVER, 540.1)
    assert client.expires_at == pytest.approx(1140.1)


def test_bad_arguments_are_local_errors() -> None:
    client = TurnClient(SERVER, USER, PASSWORD, rand_bytes=counter_bytes())
    with pytest.raises(LocalProtocolError):
        client.create_permission(PEER[0], 0.0)  # not allocated yet
    client, _ = allocated()
    with pytest.raises(LocalProtocolError):
        client.create_permission("example.com", 0.0)
    with pytest.raises(LocalProtocolError):
        client.send(PEER, b"x" * 70000, 0.0)


# --- credentials and URLs -------------------------------------------------------------------


def test_rest_credentials_are_coturns() -> None:
    username, password = turn_credentials("s3cret", "worker-1", 1_700_000_000.5, ttl_s=600)
    assert username == "1700000600:worker-1"
    digest = hmac.new(b"s3cret", username.encode(), hashlib.sha1).digest()
    assert password == base64.b64encode(digest).decode()
    assert turn_credentials("s3cret", "worker-2", 1_700_000_000, 600)[1] != password
    for bad in (("", "w", 0.0, 600.0), ("s", "a:b", 0.0, 600.0), ("s", "w", 0.0, 0.0)):
        with pytest.raises(ConfigError):
            turn_credentials(*bad)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("turn:192.0.2.1", TurnServer("192.0.2.1", 3478, "udp")),
        ("turn:192.0.2.1:3479?transport=tcp", TurnServer("192.0.2.1", 3479, "tcp")),
        ("TURN:turn.example.org:80?transport=UDP", TurnServer("turn.example.org", 80, "udp")),
        ("turn:[2001:db8::1]:3478", TurnServer("2001:db8::1", 3478, "udp")),
    ],
)
def test_turn_urls(url: str, expected: TurnServer) -> None:
    assert parse_turn_url(url) == expected
    assert parse_turn_url(expected.url) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("turns:192.0.2.1:5349", "not supported yet"),
        ("stun:192.0.2.1", "is not turn"),
        ("192.0.2.1:3478", "is not turn"),
        ("turn:192.0.2.1:0", "port"),
        ("turn:192.0.2.1:x", "port"),
        ("turn:192.0.2.1?transport=sctp", "transport"),
        ("turn:", "host"),
        ("turn:a b", "host"),
        ("turn:2001:db8::1", "brackets"),
        ("turn:[2001:db8::1", "missing"),
        ("turn:" + "a" * 300, "longer"),
    ],
)
def test_bad_turn_urls_are_one_line_errors(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        parse_turn_url(url)
    assert "\n" not in str(info.value)


def test_a_success_to_the_unauthenticated_first_request_is_not_believed() -> None:
    client = TurnClient(SERVER, USER, PASSWORD, rand_bytes=counter_bytes())
    client.allocate(0.0)
    ((data, _),) = client.datagrams_to_send(0.0)
    first = parse_message(data)
    forged = Message(
        Method.ALLOCATE,
        Class.RESPONSE,
        first.transaction_id,
        {"XOR-RELAYED-ADDRESS": ("198.51.100.66", 9), "LIFETIME": 600},
    )
    client.receive(bytes(forged), SERVER, 0.1)
    assert client.next_event() is None and client.state is TurnState.ALLOCATING
    assert client.stats["bad_integrity"] == 1
    # The real exchange still goes through.
    server = FakeServer()
    for reply in server.handle(data):
        client.receive(reply, SERVER, 0.2)
    assert pump(client, server, 0.2) == [Allocated(RELAYED, MAPPED, 600)]
