"""The p2p datagram codec: golden bytes, exact errors, peeks, the sealing hook, fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2plab.core import wire
from p2plab.core.wire import (
    Ack,
    BenchDatagram,
    Bye,
    Chat,
    Control,
    Keepalive,
    KeepaliveAck,
    MessageType,
    Probe,
    ProbeAck,
    UnknownDatagramType,
    datagram_type,
    encode_datagram,
    is_p2p_datagram,
    parse_datagram,
)
from p2plab.errors import RemoteProtocolError

IDS = bytes.fromhex("05") + b"alice" + bytes.fromhex("03") + b"bob"
NONCE = bytes.fromhex("0102030405060708")

# (datagram, expected bytes written out field by field from the format in wire.py's docstring)
GOLDEN = [
    (
        Probe("alice", "bob", nonce=NONCE, nominate=True, target=("198.18.0.2", 40000)),
        b"\xd7\x50\x01\x01" + IDS + NONCE + b"\x01" + b"\x0a198.18.0.2" + b"\x9c\x40",
    ),
    (
        ProbeAck("alice", "bob", nonce=NONCE, nominate=False, observed=("10.0.0.1", 1)),
        b"\xd7\x50\x01\x02" + IDS + NONCE + b"\x00" + b"\x0810.0.0.1" + b"\x00\x01",
    ),
    (
        Keepalive("alice", "bob", seq=7, timestamp=1.5),
        b"\xd7\x50\x01\x03" + IDS + b"\x00\x00\x00\x07" + b"\x3f\xf8" + b"\x00" * 6,
    ),
    (
        KeepaliveAck("alice", "bob", seq=0x01020304, timestamp=-2.0),
        b"\xd7\x50\x01\x04" + IDS + b"\x01\x02\x03\x04" + b"\xc0\x00" + b"\x00" * 6,
    ),
    (
        Chat("alice", "bob", seq=1, msg_id="m1", sent_at=0.0, text="hé"),
        b"\xd7\x50\x01\x10"
        + IDS
        + b"\x00\x00\x00\x01"
        + b"\x02m1"
        + b"\x00" * 8
        + b"\x00\x03h\xc3\xa9",
    ),
    (
        Control("alice", "bob", seq=2, msg_id="", sent_at=0.0, payload=b"{}"),
        b"\xd7\x50\x01\x11" + IDS + b"\x00\x00\x00\x02" + b"\x00" + b"\x00" * 8 + b"\x00\x02{}",
    ),
    (
        Ack("alice", "bob", cumulative=5, selective=(7, 9)),
        b"\xd7\x50\x01\x12"
        + IDS
        + b"\x00\x00\x00\x05"
        + b"\x02"
        + b"\x00\x00\x00\x07\x00\x00\x00\x09",
    ),
    (Bye("alice", "bob", reason="bye"), b"\xd7\x50\x01\x13" + IDS + b"\x03bye"),
    (BenchDatagram(type=0x20, body=b"xyz"), b"\xd7\x50\x01\x20xyz"),
]


@pytest.mark.parametrize(("datagram", "expected"), GOLDEN, ids=lambda x: type(x).__name__)
def test_golden_bytes(datagram: wire.Datagram, expected: bytes) -> None:
    assert bytes(datagram) == expected
    assert parse_datagram(expected) == datagram


def test_every_session_type_has_a_golden_vector() -> None:
    covered = {d.TYPE for d, _ in GOLDEN if not isinstance(d, BenchDatagram)}
    assert covered == set(wire.FIELDS)


def test_first_byte_never_looks_like_stun() -> None:
    for _datagram, data in GOLDEN:
        assert data[0] >> 6 == 0b11  # STUN's first two bits are 00 (RFC 8489 section 6)
        assert is_p2p_datagram(data)
        assert datagram_type(data) == data[3]


def test_peeks_reject_other_traffic() -> None:
    stun = bytes.fromhex("0001 0000 2112a442") + bytes(12)
    assert not is_p2p_datagram(stun)
    assert datagram_type(stun) is None
    assert datagram_type(b"\xd7\x50\x01") is None  # header incomplete
    assert datagram_type(b"\xd7\x50\x01\x20") == MessageType.BENCH_DATA
    assert 0x20 in wire.BENCH_TYPES and 0x2F in wire.BENCH_TYPES and 0x30 not in wire.BENCH_TYPES


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "datagram too short: 0 bytes"),
        (b"\xd7\x50\x01", "datagram too short: 3 bytes"),
        (b"\x00\x01\x00\x00", "bad magic: 0x0001"),
        (b"\xd7\x50\x02\x01", "unsupported version: 2"),
        (b"\xd7\x50\x01\x01", "truncated PROBE: sender_id needs 1 bytes at offset 0, 0 left"),
        (
            b"\xd7\x50\x01\x03" + IDS + b"\x00\x00",
            "truncated KEEPALIVE: seq needs 4 bytes at offset 10, 2 left",
        ),
        (
            b"\xd7\x50\x01\x13" + IDS + b"\x00" + b"zz",
            "trailing bytes after BYE: 2",
        ),
        (b"\xd7\x50\x01\x13\x02\xff\xfe\x03bob\x00", "invalid UTF-8 in BYE sender_id"),
        (
            b"\xd7\x50\x01\x01" + IDS + NONCE + b"\x02" + b"\x00\x00\x00",
            "bad PROBE nominate flag: 2",
        ),
        (
            b"\xd7\x50\x01\x10" + IDS + bytes(4) + b"\x00" + bytes(8) + b"\x10\x01",
            "CHAT text too long: 4097 bytes (max 4096)",
        ),
        (
            b"\xd7\x50\x01\x12" + IDS + bytes(4) + b"\x41",
            "ACK selective has 65 entries (max 64)",
        ),
    ],
)
def test_exact_error_messages(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_datagram(data)
    assert str(info.value) == message
    assert not isinstance(info.value, UnknownDatagramType)


def test_unknown_type_has_its_own_error() -> None:
    with pytest.raises(UnknownDatagramType, match=r"^unknown datagram type: 0x7f$"):
        parse_datagram(b"\xd7\x50\x01\x7f" + IDS)


def test_chat_limit_on_encode_and_max_fits() -> None:
    text = "é" * 2048  # exactly 4096 bytes
    chat = Chat("a", "b", seq=0, msg_id="x", sent_at=0.0, text=text)
    assert parse_datagram(bytes(chat)) == chat
    with pytest.raises(ValueError, match="text too long: 4097 bytes"):
        bytes(Chat("a", "b", seq=0, msg_id="x", sent_at=0.0, text=text + "x"))


def test_ids_longer_than_255_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="sender_id too long"):
        bytes(Bye("x" * 256, "b", reason=""))


class XorSealer:
    """A toy seal: a checksum tag over header+body, body XORed; enough to test the hook."""

    def seal(self, header: bytes, body: bytes) -> bytes:
        tag = struct.pack("!I", sum(header + body) & 0xFFFFFFFF)
        return bytes(b ^ 0x5A for b in body) + tag

    def open(self, header: bytes, sealed: bytes) -> bytes:
        if len(sealed) < 4:
            raise RemoteProtocolError("sealed body too short")
        body = bytes(b ^ 0x5A for b in sealed[:-4])
        if struct.pack("!I", sum(header + body) & 0xFFFFFFFF) != sealed[-4:]:
            raise RemoteProtocolError("authentication failed")
        return body


def test_sealer_hook_wraps_the_body_and_authenticates_the_header() -> None:
    sealer = XorSealer()
    chat = Chat("alice", "bob", seq=3, msg_id="m", sent_at=2.0, text="secret")
    sealed = encode_datagram(chat, sealer)
    assert sealed[:4] == bytes(chat)[:4]  # header stays in clear for demultiplexing
    assert b"secret" not in sealed
    assert parse_datagram(sealed, sealer) == chat
    tampered = sealed[:3] + b"\x11" + sealed[4:]  # header is associated data
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        parse_datagram(tampered, sealer)
    with pytest.raises(RemoteProtocolError):
        parse_datagram(sealed)  # without the key the body is garbage


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    try:
        parse_datagram(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([data for _, data in GOLDEN]),
    st.integers(min_value=0, max_value=200),
    st.binary(min_size=1, max_size=4),
)
def test_fuzz_mutated_valid_datagrams(data: bytes, pos: int, patch: bytes) -> None:
    pos = pos % len(data)
    mutated = data[:pos] + patch + data[pos + len(patch) :]
    for candidate in (mutated, data[:pos], data + patch):
        try:
            parsed = parse_datagram(candidate)
        except RemoteProtocolError:
            continue
        assert bytes(parsed) == candidate  # whatever parses must round-trip exactly


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=300),
)
def test_round_trip_chat(sender: str, receiver: str, seq: int, sent_at: float, text: str) -> None:
    chat = Chat(sender, receiver, seq=seq, msg_id="id", sent_at=sent_at, text=text)
    assert parse_datagram(bytes(chat)) == chat


def test_link_core_modules_import_no_io_or_clock() -> None:
    import ast
    import pathlib

    import p2plab.core

    forbidden = {"asyncio", "socket", "time", "random", "threading", "selectors"}
    core = pathlib.Path(p2plab.core.__file__).parent
    for name in ("wire.py", "punch.py", "session.py", "events.py"):
        tree = ast.parse((core / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{name} imports {roots & forbidden}"
