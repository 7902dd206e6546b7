"""STUN codec against the RFC 5769 test vectors, error messages, and the RFC 8489 section 6.2.1
retransmission schedule on a fake clock."""

from __future__ import annotations

import struct

import pytest

from p2plab.core.stun import (
    CHANGE_IP,
    CHANGE_PORT,
    Class,
    Message,
    Method,
    RetransmissionPolicy,
    StunTransaction,
    TransactionState,
    decode_message_type,
    encode_message_type,
    long_term_key,
    make_binding_request,
    parse_message,
    parse_server_address,
    unknown_attribute_name,
)
from p2plab.errors import ConfigError, StunError


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 section 2.1..2.4, as printed in the RFC.
SAMPLE_REQUEST = unhex("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf""")
SAMPLE_IPV4_RESPONSE = unhex("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96""")
SAMPLE_IPV6_RESPONSE = unhex("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c""")
SAMPLE_LONG_TERM_REQUEST = unhex("""
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66""")

SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
TXID = unhex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
MATRIX = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"


# --- RFC 5769 golden vectors -------------------------------------------------------------------


def test_rfc5769_sample_request_decodes_and_checks() -> None:
    msg = parse_message(SAMPLE_REQUEST, integrity_key=SHORT_TERM_PASSWORD)
    assert msg.message_method == Method.BINDING
    assert msg.message_class == Class.REQUEST
    assert msg.transaction_id == TXID
    assert not msg.legacy
    assert msg.attributes["SOFTWARE"] == "STUN test client"
    assert msg.attributes["PRIORITY"] == 0x6E0001FF
    assert msg.attributes["ICE-CONTROLLED"] == 0x932FF9B151263B36
    assert msg.attributes["USERNAME"] == "evtj:h6vY"
    assert msg.attributes["FINGERPRINT"] == 0xE57A3BCF
    assert list(msg.attributes) == [
        "SOFTWARE",
        "PRIORITY",
        "ICE-CONTROLLED",
        "USERNAME",
        "MESSAGE-INTEGRITY",
        "FINGERPRINT",
    ]


def test_rfc5769_sample_request_encodes_byte_for_byte() -> None:
    msg = Message(
        Method.BINDING,
        Class.REQUEST,
        TXID,
        {
            "SOFTWARE": "STUN test client",
            "PRIORITY": 0x6E0001FF,
            "ICE-CONTROLLED": 0x932FF9B151263B36,
            "USERNAME": "evtj:h6vY",
        },
        pad=b" ",  # the RFC pads USERNAME with spaces; padding may be any value
    )
    msg.add_message_integrity(SHORT_TERM_PASSWORD)
    msg.add_fingerprint()
    assert bytes(msg) == SAMPLE_REQUEST


@pytest.mark.parametrize(
    ("vector", "mapped"),
    [
        (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_responses_decode_check_and_encode(vector: bytes, mapped: tuple[str, int]) -> None:
    msg = parse_message(vector, integrity_key=SHORT_TERM_PASSWORD)
    assert msg.message_class == Class.RESPONSE
    assert msg.transaction_id == TXID
    assert msg.attributes["SOFTWARE"] == "test vector"
    assert msg.attributes["XOR-MAPPED-ADDRESS"] == mapped

    rebuilt = Message(
        Method.BINDING,
        Class.RESPONSE,
        TXID,
        {"SOFTWARE": "test vector", "XOR-MAPPED-ADDRESS": mapped},
        pad=b" ",
    )
    rebuilt.add_message_integrity(SHORT_TERM_PASSWORD)
    rebuilt.add_fingerprint()
    assert bytes(rebuilt) == vector


def test_rfc5769_long_term_request() -> None:
    # The RFC's password is "The<U+00AD>M<U+00AA>tr<U+2168>", "TheMatrIX" after SASLprep.
    key = long_term_key(MATRIX, "example.org", "TheMatrIX")
    msg = parse_message(SAMPLE_LONG_TERM_REQUEST, integrity_key=key)
    assert msg.attributes["USERNAME"] == MATRIX
    assert msg.attributes["NONCE"] == "f//499k954d6OL34oL9FSTvy64sA"
    assert msg.attributes["REALM"] == "example.org"
    assert "FINGERPRINT" not in msg.attributes

    rebuilt = Message(
        Method.BINDING,
        Class.REQUEST,
        SAMPLE_LONG_TERM_REQUEST[8:20],
        {"USERNAME": MATRIX, "NONCE": msg.attributes["NONCE"], "REALM": "example.org"},
    )
    rebuilt.add_message_integrity(key)
    assert bytes(rebuilt) == SAMPLE_LONG_TERM_REQUEST

    wrong = long_term_key(MATRIX, "example.org", "TheMatrix")
    with pytest.raises(StunError, match=r"^STUN MESSAGE-INTEGRITY check failed$"):
        parse_message(SAMPLE_LONG_TERM_REQUEST, integrity_key=wrong)


def test_wrong_short_term_password_fails_integrity() -> None:
    with pytest.raises(StunError, match="MESSAGE-INTEGRITY check failed"):
        parse_message(SAMPLE_IPV4_RESPONSE, integrity_key=b"not the password")


def test_parse_without_key_does_not_check_integrity_but_checks_fingerprint() -> None:
    assert parse_message(SAMPLE_REQUEST).attributes["USERNAME"] == "evtj:h6vY"
    broken = bytearray(SAMPLE_REQUEST)
    broken[30] ^= 0x01  # inside SOFTWARE
    with pytest.raises(
        StunError, match=r"^STUN FINGERPRINT mismatch: got 0xe57a3bcf, expected 0x[0-9a-f]{8}$"
    ):
        parse_message(bytes(broken))


# --- error messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x01\x00", "STUN message too short: 3 bytes, the header needs 20"),
        (b"\x40" + SAMPLE_REQUEST[1:], "not a STUN message: the two most significant bits"),
        (SAMPLE_REQUEST[:2] + b"\x00\x57" + SAMPLE_REQUEST[4:], "length 87 is not a multiple"),
        (SAMPLE_REQUEST + b"\x00" * 4, "length 88 does not match the 92 bytes after the header"),
        (b"\x00\x3f\x00\x00" + SAMPLE_REQUEST[4:20], "unknown STUN method 0x01f"),
    ],
)
def test_header_errors(data: bytes, message: str) -> None:
    with pytest.raises(StunError, match=message.replace("(", r"\(")):
        parse_message(data)


def _with_attribute(attr_type: int, value: bytes, declared: int | None = None) -> bytes:
    length = len(value) if declared is None else declared
    body = struct.pack("!HH", attr_type, length) + value + b"\x00" * (-len(value) % 4)
    return struct.pack("!HHI", 0x0101, len(body), 0x2112A442) + TXID + body


def test_attribute_errors() -> None:
    with pytest.raises(StunError, match=r"attribute 0x0020 of length 64 runs past the end"):
        parse_message(_with_attribute(0x0020, b"\x00" * 8, declared=64))
    with pytest.raises(
        StunError,
        match=r"^STUN attribute XOR-MAPPED-ADDRESS \(0x0020\) is malformed: "
        r"bad address family 0x03$",
    ):
        parse_message(_with_attribute(0x0020, b"\x00\x03\x00\x00\x00\x00\x00\x00"))
    with pytest.raises(StunError, match=r"MAPPED-ADDRESS \(0x0001\) is malformed: IPv4 address"):
        parse_message(_with_attribute(0x0001, b"\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"))
    with pytest.raises(StunError, match=r"SOFTWARE \(0x8022\) is malformed: invalid UTF-8"):
        parse_message(_with_attribute(0x8022, b"\xff\xfe"))
    with pytest.raises(StunError, match=r"MESSAGE-INTEGRITY \(0x0008\) is malformed: needs 20"):
        parse_message(_with_attribute(0x0008, b"\x00" * 8))


def test_fingerprint_must_be_last_and_integrity_required_when_keyed() -> None:
    msg = Message(Method.BINDING, Class.RESPONSE, TXID, {"SOFTWARE": "x"})
    msg.add_fingerprint()
    data = bytes(msg)
    extra = struct.pack("!HH", 0x8022, 4) + b"abcd"
    tampered = data[:2] + struct.pack("!H", len(data) - 20 + 8) + data[4:] + extra
    with pytest.raises(StunError, match=r"^STUN FINGERPRINT is not the last attribute$"):
        parse_message(tampered)
    with pytest.raises(StunError, match=r"^STUN message has no MESSAGE-INTEGRITY$"):
        parse_message(data, integrity_key=b"key")


def test_unknown_attributes_are_kept_raw_in_place() -> None:
    msg = Message(
        Method.BINDING,
        Class.REQUEST,
        TXID,
        {
            unknown_attribute_name(0x7777): b"abc",
            "SOFTWARE": "s",
            unknown_attribute_name(0xC001): b"",
        },
    )
    msg.add_fingerprint()
    parsed = parse_message(bytes(msg))
    assert parsed.attributes == msg.attributes
    assert list(parsed.attributes) == [
        "UNKNOWN-0x7777",
        "SOFTWARE",
        "UNKNOWN-0xC001",
        "FINGERPRINT",
    ]
    assert parsed.attributes["UNKNOWN-0x7777"] == b"abc"
    assert parsed.unknown_comprehension_required() == (0x7777,)
    assert bytes(parsed) == bytes(msg)


def test_attributes_after_message_integrity_are_ignored() -> None:
    msg = Message(Method.BINDING, Class.REQUEST, TXID, {"USERNAME": "u"})
    msg.add_message_integrity(b"k")
    msg.attributes["SOFTWARE"] = "after integrity"
    parsed = parse_message(bytes(msg))
    assert "USERNAME" in parsed.attributes
    assert "SOFTWARE" not in parsed.attributes


def test_all_address_attributes_round_trip_ipv4_and_ipv6() -> None:
    names = [
        "MAPPED-ADDRESS",
        "XOR-MAPPED-ADDRESS",
        "RESPONSE-ORIGIN",
        "OTHER-ADDRESS",
        "CHANGED-ADDRESS",
        "SOURCE-ADDRESS",
        "ALTERNATE-SERVER",
    ]
    for address in [("203.0.113.7", 40000), ("2001:db8::7", 1)]:
        attrs = dict.fromkeys(names, address)
        attrs.update(
            {
                "CHANGE-REQUEST": CHANGE_IP | CHANGE_PORT,
                "RESPONSE-PORT": 5555,
                "PADDING": b"\x00" * 7,
                "ERROR-CODE": (420, "Unknown Attribute"),
                "UNKNOWN-ATTRIBUTES": (0x0003, 0x7777),
                "USE-CANDIDATE": None,
            }
        )
        msg = Message(Method.BINDING, Class.ERROR, TXID, attrs)
        msg.add_fingerprint()
        parsed = parse_message(bytes(msg))
        assert parsed == msg
        assert parsed.attributes["XOR-MAPPED-ADDRESS"] == address
    # the XOR really is applied: the raw bytes differ from the plain encoding
    plain = bytes(Message(Method.BINDING, Class.RESPONSE, TXID, {"MAPPED-ADDRESS": ("1.2.3.4", 5)}))
    xored = bytes(
        Message(Method.BINDING, Class.RESPONSE, TXID, {"XOR-MAPPED-ADDRESS": ("1.2.3.4", 5)})
    )
    assert plain[24:] != xored[24:]


def test_message_type_interleaving() -> None:
    cases = [
        (Method.BINDING, Class.REQUEST, 0x0001),
        (Method.BINDING, Class.RESPONSE, 0x0101),
        (Method.BINDING, Class.ERROR, 0x0111),
        (Method.BINDING, Class.INDICATION, 0x0011),
        (Method.SEND, Class.INDICATION, 0x0016),
        (Method.CHANNEL_BIND, Class.RESPONSE, 0x0109),
        (0xFFF, Class.ERROR, 0x3FFF),
        (0x080, Class.REQUEST, 0x0200),
    ]
    for method, cls, value in cases:
        assert encode_message_type(method, cls) == value
        assert decode_message_type(value) == (method, cls)


def test_legacy_rfc3489_request_parses_and_echoes_its_16_byte_id() -> None:
    legacy_id = bytes(range(1, 17))
    data = struct.pack("!HH", 0x0001, 8) + legacy_id + struct.pack("!HHI", 0x0003, 4, 6)
    msg = parse_message(data)
    assert msg.legacy
    assert msg.attributes["CHANGE-REQUEST"] == CHANGE_IP | CHANGE_PORT
    reply = Message(
        Method.BINDING,
        Class.RESPONSE,
        msg.transaction_id,
        {"MAPPED-ADDRESS": ("127.0.0.1", 9)},
        magic_cookie=msg.magic_cookie,
    )
    assert bytes(reply)[4:20] == legacy_id


def test_make_binding_request_uses_injected_randomness() -> None:
    calls: list[int] = []

    def fake_random(n: int) -> bytes:
        calls.append(n)
        return b"\x42" * n

    msg = make_binding_request(fake_random, change_port=True, software="p2plab")
    assert calls == [12]
    assert msg.transaction_id == b"\x42" * 12
    parsed = parse_message(bytes(msg))
    assert parsed.attributes["CHANGE-REQUEST"] == CHANGE_PORT
    assert parsed.attributes["SOFTWARE"] == "p2plab"
    assert "FINGERPRINT" in parsed.attributes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1:3478", ("127.0.0.1", 3478)),
        ("stun.example.org", ("stun.example.org", 3478)),
        ("stun:localhost:19302", ("localhost", 19302)),
        ("[::1]:3479", ("::1", 3479)),
        ("::1", ("::1", 3478)),
        (("127.0.0.2", 5), ("127.0.0.2", 5)),
    ],
)
def test_parse_server_address(spec: str | tuple[str, int], expected: tuple[str, int]) -> None:
    assert parse_server_address(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("127.0.0.1:", "port '' is not a number from 1 to 65535"),
        ("127.0.0.1:70000", "port '70000' is not a number"),
        ("host:abc", "port 'abc' is not a number"),
        (":3478", "expected 'host:port'"),
        ("[::1", "missing ']'"),
        ("[::1]x", "expected ':port' after ']'"),
        ("1:2:zz", "is not an IPv6 address"),
        (("h", 0), "port 0 is out of range"),
    ],
)
def test_parse_server_address_errors(spec: str | tuple[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match="bad STUN server .*" + message.replace("[", r"\[")):
        parse_server_address(spec)


# --- retransmission (RFC 8489 section 6.2.1) on a fake clock -----------------------------------


def _run_until_done(tx: StunTransaction, start: float) -> tuple[list[float], float]:
    """Drive the transaction like a loop would: returns the send times and the end time."""
    sends: list[float] = []
    tx.start(start)
    now = start
    while True:
        sends.extend(now for _ in tx.datagrams_to_send(now))
        timer = tx.get_timer()
        if timer is None:
            return sends, now
        now = timer
        tx.handle_timer(now)


def test_retransmission_schedule_is_the_rfc_example() -> None:
    tx = StunTransaction(make_binding_request(lambda n: b"\x01" * n), ("127.0.0.1", 3478))
    sends, end = _run_until_done(tx, 100.0)
    # RFC 8489 section 6.2.1: 0, 500, 1500, 3500, 7500, 15500, 31500 ms; timeout at 39500 ms.
    assert [round(t - 100.0, 9) for t in sends] == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert round(end - 100.0, 9) == 39.5
    assert tx.state is TransactionState.TIMED_OUT
    assert tx.attempts == 7


def test_retransmission_schedule_is_configurable() -> None:
    policy = RetransmissionPolicy(rto=0.1, rc=3, rm=4)
    tx = StunTransaction(make_binding_request(lambda n: b"\x02" * n), ("h", 1), policy)
    sends, end = _run_until_done(tx, 0.0)
    assert [round(t, 9) for t in sends] == [0, 0.1, 0.3]
    assert round(end, 9) == round(0.3 + 4 * 0.1, 9)

    capped = RetransmissionPolicy(rto=1.0, rc=5, rm=2, max_rto=2.0)
    tx = StunTransaction(make_binding_request(lambda n: b"\x03" * n), ("h", 1), capped)
    sends, end = _run_until_done(tx, 0.0)
    assert sends == [0, 1.0, 3.0, 5.0, 7.0]
    assert end == 9.0

    deadline = RetransmissionPolicy(rto=0.5, timeout=2.0)
    tx = StunTransaction(make_binding_request(lambda n: b"\x04" * n), ("h", 1), deadline)
    sends, end = _run_until_done(tx, 0.0)
    assert sends == [0, 0.5, 1.5]
    assert end == 2.0
    assert tx.state is TransactionState.TIMED_OUT


def test_early_timer_calls_do_nothing() -> None:
    tx = StunTransaction(make_binding_request(lambda n: b"\x05" * n), ("h", 1))
    tx.start(0.0)
    assert len(tx.datagrams_to_send(0.0)) == 1
    tx.handle_timer(0.2)
    assert tx.datagrams_to_send(0.2) == []
    assert tx.get_timer() == 0.5
    tx.handle_timer(0.5)
    assert tx.datagrams_to_send(0.5) == [(bytes(tx.request), ("h", 1))]


def test_response_ends_transaction_with_rtt_from_last_send() -> None:
    request = make_binding_request(lambda n: b"\x06" * n)
    tx = StunTransaction(request, ("h", 1))
    tx.start(0.0)
    tx.handle_timer(0.5)
    other = Message(Method.BINDING, Class.RESPONSE, b"\x07" * 12)
    assert not tx.receive(other, 0.6)
    assert not tx.receive(request, 0.6)  # a request (e.g. hairpinned) is not a response
    response = Message(
        Method.BINDING,
        Class.RESPONSE,
        request.transaction_id,
        {"XOR-MAPPED-ADDRESS": ("1.2.3.4", 5)},
    )
    assert tx.receive(response, 0.7)
    assert tx.state is TransactionState.SUCCEEDED
    assert tx.response is response
    assert tx.rtt == pytest.approx(0.2)
    assert tx.attempts == 2
    assert tx.get_timer() is None
    assert not tx.receive(response, 0.8)  # duplicates are not consumed again


def test_error_response_fails_transaction() -> None:
    request = make_binding_request(lambda n: b"\x08" * n)
    tx = StunTransaction(request, ("h", 1))
    tx.start(0.0)
    error = Message(
        Method.BINDING, Class.ERROR, request.transaction_id, {"ERROR-CODE": (420, "Unknown")}
    )
    assert tx.receive(error, 0.1)
    assert tx.state is TransactionState.FAILED
    assert tx.error == (420, "Unknown")


def test_policy_validation() -> None:
    with pytest.raises(ConfigError, match="rto must be positive"):
        RetransmissionPolicy(rto=0)
    with pytest.raises(ConfigError, match="rc must be at least 1"):
        RetransmissionPolicy(rc=0)
    with pytest.raises(ConfigError, match="max_rto"):
        RetransmissionPolicy(rto=1, max_rto=0.5)
