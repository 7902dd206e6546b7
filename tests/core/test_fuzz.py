"""Property-based fuzzing of the codecs that read network input: STUN, the p2p wire format, and
sealed sessions.  Each parser may raise only its documented error; valid messages round-trip."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2plab.config import SessionConfig
from p2plab.core import stun
from p2plab.core.crypto import Identity, PeerCipher
from p2plab.core.stun import Class, Message, Method, make_binding_request, parse_message
from p2plab.core.wire import (
    Ack,
    BenchDatagram,
    Bye,
    Chat,
    Control,
    Keepalive,
    KeepaliveAck,
    Probe,
    ProbeAck,
    encode_datagram,
    parse_datagram,
)
from p2plab.errors import RemoteProtocolError, StunError
from tests.core.test_crypto import A_LOCAL, B_LOCAL, M_LOCAL, both_connected, sealed_pair, texts

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- STUN ---------------------------------------------------------------------------------------


def _only_stun_error(data: bytes) -> Message | None:
    try:
        return parse_message(data)
    except StunError:
        return None


@FUZZ
@given(st.binary(max_size=600))
def test_stun_random_bytes_raise_only_stun_error(data: bytes) -> None:
    _only_stun_error(data)


@FUZZ
@given(
    st.binary(min_size=12, max_size=12),
    st.binary(max_size=300),
    st.integers(0, 0xFFFF),
)
def test_stun_random_attributes_behind_a_valid_header(tid: bytes, body: bytes, mtype: int) -> None:
    """A correct header (cookie, length) with random attribute bytes behind it."""
    body = body[: len(body) - len(body) % 4]
    data = mtype.to_bytes(2, "big") + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42"
    _only_stun_error(data + tid + body)
    # and a random body under a FINGERPRINT-bearing, valid request
    req = bytes(make_binding_request(lambda n: tid[:n], software="fuzz"))
    _only_stun_error(req[:20] + body + req[20:])


@FUZZ
@given(st.integers(0, 200), st.binary(min_size=1, max_size=6))
def test_stun_mutated_valid_messages_raise_only_stun_error(pos: int, patch: bytes) -> None:
    msg = Message(
        Method.BINDING,
        Class.RESPONSE,
        bytes(range(12)),
        {
            "XOR-MAPPED-ADDRESS": ("198.51.100.7", 40000),
            "MAPPED-ADDRESS": ("198.51.100.7", 40000),
            "OTHER-ADDRESS": ("203.0.113.2", 3479),
            "SOFTWARE": "p2plab fuzz",
            "ERROR-CODE": (420, "Unknown Attribute"),
        },
    )
    msg.add_fingerprint()
    data = bytes(msg)
    pos %= len(data)
    _only_stun_error(data[:pos] + patch + data[pos + len(patch) :])


_ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
_ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
_addr = st.tuples(st.one_of(_ipv4, _ipv6), st.integers(0, 65535))
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda t: len(t.encode()) <= 120
)


@FUZZ
@given(
    tid=st.binary(min_size=12, max_size=12),
    cls=st.sampled_from(list(Class)),
    xor=_addr,
    mapped=_addr,
    other=_addr,
    software=_text,
    error=st.tuples(st.integers(300, 699), _text),
    change=st.integers(0, 2**32 - 1),
    fingerprint=st.booleans(),
)
def test_stun_round_trip(
    tid: bytes,
    cls: Class,
    xor: tuple[str, int],
    mapped: tuple[str, int],
    other: tuple[str, int],
    software: str,
    error: tuple[int, str],
    change: int,
    fingerprint: bool,
) -> None:
    attrs = {
        "XOR-MAPPED-ADDRESS": xor,
        "MAPPED-ADDRESS": mapped,
        "OTHER-ADDRESS": other,
        "SOFTWARE": software,
        "ERROR-CODE": error,
        "CHANGE-REQUEST": change,
    }
    msg = Message(Method.BINDING, cls, tid, attrs)
    if fingerprint:
        msg.add_fingerprint()
    parsed = parse_message(bytes(msg))
    assert parsed == msg
    assert bytes(parsed) == bytes(msg)
    for name, value in attrs.items():
        assert parsed.attributes[name] == value
    assert stun.decode_message_type(stun.encode_message_type(Method.BINDING, cls)) == (
        Method.BINDING,
        cls,
    )


# -- the p2p wire format ------------------------------------------------------------------------

_id = st.text(max_size=40).filter(lambda t: len(t.encode()) <= 255)
_u32 = st.integers(0, 2**32 - 1)
_host = st.text(max_size=30).filter(lambda t: len(t.encode()) <= 255)
_waddr = st.tuples(_host, st.integers(0, 65535))
_float = st.floats(allow_nan=False)

DATAGRAMS = st.one_of(
    st.builds(Probe, _id, _id, st.binary(min_size=8, max_size=8), st.booleans(), _waddr),
    st.builds(ProbeAck, _id, _id, st.binary(min_size=8, max_size=8), st.booleans(), _waddr),
    st.builds(Keepalive, _id, _id, _u32, _float),
    st.builds(KeepaliveAck, _id, _id, _u32, _float),
    st.builds(Chat, _id, _id, _u32, _id, _float, st.text(max_size=200)),
    st.builds(Control, _id, _id, _u32, _id, _float, st.binary(max_size=200)),
    st.builds(Ack, _id, _id, _u32, st.lists(_u32, max_size=64).map(tuple)),
    st.builds(Bye, _id, _id, st.text(max_size=60).filter(lambda t: len(t.encode()) <= 255)),
    st.builds(BenchDatagram, st.integers(0x20, 0x2F), st.binary(max_size=100)),
)


@FUZZ
@given(DATAGRAMS)
def test_wire_round_trip_of_every_type(datagram: object) -> None:
    data = bytes(datagram)  # type: ignore[call-overload]
    assert parse_datagram(data) == datagram


@FUZZ
@given(st.binary(max_size=300))
def test_wire_random_bytes_raise_only_remote_protocol_error(body: bytes) -> None:
    for data in (body, b"\xd7\x50\x01" + body, b"\xd7\x50\x01\x10" + body):
        try:
            parse_datagram(data)
        except RemoteProtocolError:
            pass


@FUZZ
@given(DATAGRAMS, st.integers(0, 10_000), st.binary(min_size=1, max_size=8), st.booleans())
def test_wire_mutated_datagrams_raise_only_remote_protocol_error(
    datagram: object, pos: int, patch: bytes, truncate: bool
) -> None:
    data = bytes(datagram)  # type: ignore[call-overload]
    pos %= len(data)
    mutated = data[:pos] if truncate else data[:pos] + patch + data[pos + len(patch) :]
    try:
        parse_datagram(mutated)
    except RemoteProtocolError:
        pass


# -- the sealed path ----------------------------------------------------------------------------


@FUZZ
@given(DATAGRAMS)
def test_sealed_round_trip_of_every_type(datagram: object) -> None:
    r = random.Random(1)
    ia, ib = Identity.generate(r.randbytes), Identity.generate(r.randbytes)
    ca = PeerCipher(ia, "a", "b", ib.public_bytes, r.randbytes)
    cb = PeerCipher(ib, "b", "a", ia.public_bytes, r.randbytes)
    # learn each other's session tags first (only probes may name no tag)
    parse_datagram(encode_datagram(Probe("a", "b", b"x" * 8, False, ("h", 1)), ca), cb)
    parse_datagram(encode_datagram(ProbeAck("b", "a", b"x" * 8, False, ("h", 1)), cb), ca)
    sealed = encode_datagram(datagram, ca)  # type: ignore[arg-type]
    assert parse_datagram(sealed, cb) == datagram


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.binary(max_size=120), st.sampled_from([A_LOCAL, M_LOCAL])),
        max_size=25,
    ),
    st.sampled_from([b"", b"\xd7\x50\x01\x10", b"\xd7\x50\x01\x01", b"\xd7\x50\x01\x03"]),
)
def test_fuzz_sealed_session_never_raises_and_keeps_working(
    junk: list[tuple[bytes, tuple[str, int]]], prefix: bytes
) -> None:
    net, a, b, _, _ = sealed_pair(seed=31, config=SessionConfig())
    assert net.run_until(lambda: both_connected(a, b), timeout=10)
    before = dict(b.session.stats)
    for data, src in junk:
        net.inject(b, prefix + data, src)
    assert b.session.state == "connected"
    assert b.session.peer_address == A_LOCAL
    dropped = sum(
        b.session.stats[k] - before[k]
        for k in ("dropped_malformed", "dropped_unauthenticated", "dropped_unknown_type")
    )
    assert dropped == len(junk)
    a.session.send_chat("after fuzz", net.now)
    assert net.run_until(lambda: texts(b) == ["after fuzz"], timeout=10)
    assert B_LOCAL == a.session.peer_address
