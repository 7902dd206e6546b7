"""The sans-I/O STUN Binding responder, in memory: slots, CHANGE-REQUEST, legacy clients, junk,
and what keeps it from being a reflector (issue 14, finding 9): answer sizes, reflection ports,
the per-source rate limit."""

from __future__ import annotations

import itertools
import struct

import pytest

from p2plab.core.stun import (
    CHANGE_IP,
    CHANGE_PORT,
    Class,
    Message,
    Method,
    make_binding_request,
    parse_message,
)
from p2plab.core.stun_server import (
    DEFAULT_BURST,
    DEFAULT_RATE_PER_S,
    DEFAULT_SOFTWARE,
    REFLECTION_PORTS,
    RESPONDER_COUNTERS,
    SourceLimiter,
    StunResponder,
    is_reflection_port,
)
from p2plab.errors import LocalProtocolError

_counter = itertools.count()


def _rand(n: int) -> bytes:
    return next(_counter).to_bytes(n, "big")


FOUR = {
    (0, 0): ("192.0.2.1", 3478),
    (0, 1): ("192.0.2.1", 3479),
    (1, 0): ("192.0.2.2", 3478),
    (1, 1): ("192.0.2.2", 3479),
}
CLIENT = ("198.51.100.7", 40000)


def _request(**kwargs: bool) -> bytes:
    return bytes(make_binding_request(_rand, **kwargs))


@pytest.mark.parametrize(
    ("change_ip", "change_port", "want"),
    [(False, False, (0, 0)), (True, False, (1, 0)), (False, True, (0, 1)), (True, True, (1, 1))],
)
def test_change_request_picks_the_slot_and_names_origin_and_other(
    change_ip: bool, change_port: bool, want: tuple[int, int]
) -> None:
    responder = StunResponder(FOUR, software=DEFAULT_SOFTWARE)
    reply = responder.handle_datagram(
        _request(change_ip=change_ip, change_port=change_port), (0, 0), CLIENT
    )
    assert reply is not None and not reply.error
    assert reply.slot == want
    assert reply.destination == CLIENT
    msg = parse_message(reply.data)
    assert msg.message_class == Class.RESPONSE
    assert msg.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert msg.attributes["OTHER-ADDRESS"] == FOUR[(1, 1)]
    assert msg.attributes["SOFTWARE"] == DEFAULT_SOFTWARE  # opted in above
    if want != (0, 0):  # a discovery request: it compares where the answer came from
        assert msg.attributes["RESPONSE-ORIGIN"] == FOUR[want]
    # RFC 3489 names are not sent to RFC 5389 clients: XOR-MAPPED and OTHER-ADDRESS say it
    assert "MAPPED-ADDRESS" not in msg.attributes and "CHANGED-ADDRESS" not in msg.attributes
    assert responder.stats["change_requests"] == (1 if want != (0, 0) else 0)


def test_other_address_is_relative_to_the_arrival_slot() -> None:
    responder = StunResponder(FOUR)
    reply = responder.handle_datagram(_request(), (1, 0), CLIENT)
    assert reply is not None and reply.slot == (1, 0)
    assert parse_message(reply.data).attributes["OTHER-ADDRESS"] == FOUR[(0, 1)]


def test_one_address_server_has_no_other_and_refuses_change_with_420() -> None:
    responder = StunResponder({(0, 0): ("192.0.2.1", 3478)}, software=None)
    assert responder.other_slot((0, 0)) is None
    plain = responder.handle_datagram(_request(), (0, 0), CLIENT)
    assert plain is not None
    attrs = parse_message(plain.data).attributes
    assert "OTHER-ADDRESS" not in attrs and "SOFTWARE" not in attrs
    reply = responder.handle_datagram(_request(change_port=True), (0, 0), CLIENT)
    assert reply is not None and reply.error and reply.slot == (0, 0)
    msg = parse_message(reply.data)
    assert msg.message_class == Class.ERROR
    assert msg.attributes["ERROR-CODE"] == (420, "Unknown Attribute")
    assert msg.attributes["UNKNOWN-ATTRIBUTES"] == (0x0003,)
    assert responder.stats["change_unsupported"] == 1


def test_alternate_port_only_server_flips_the_port_for_other_address() -> None:
    two = {(0, 0): ("192.0.2.1", 3478), (0, 1): ("192.0.2.1", 3479)}
    responder = StunResponder(two)
    assert responder.other_slot((0, 0)) == (0, 1)
    reply = responder.handle_datagram(_request(change_ip=True), (0, 0), CLIENT)
    assert reply is not None and reply.error  # no alternate IP
    reply = responder.handle_datagram(_request(change_port=True), (0, 0), CLIENT)
    assert reply is not None and not reply.error and reply.slot == (0, 1)


def _discovery_request() -> bytes:
    """A Binding request with CHANGE-REQUEST and no flags set (RFC 5780 discovery)."""
    request = make_binding_request(_rand, fingerprint=False)
    request.attributes["CHANGE-REQUEST"] = 0
    request.add_fingerprint()
    return bytes(request)


def test_wildcard_slot_advertises_the_ip_the_request_was_sent_to() -> None:
    responder = StunResponder({(0, 0): ("0.0.0.0", 3478), (0, 1): ("0.0.0.0", 3479)})
    reply = responder.handle_datagram(_discovery_request(), (0, 0), CLIENT, local_ip="127.0.0.5")
    assert reply is not None
    attrs = parse_message(reply.data).attributes
    assert attrs["RESPONSE-ORIGIN"] == ("127.0.0.5", 3478)
    assert attrs["OTHER-ADDRESS"] == ("127.0.0.5", 3479)


def test_response_port_redirects_the_answer() -> None:
    request = make_binding_request(_rand, fingerprint=False)
    request.attributes["RESPONSE-PORT"] = 50001
    reply = StunResponder(FOUR).handle_datagram(bytes(request), (0, 0), CLIENT)
    assert reply is not None and reply.destination == (CLIENT[0], 50001)


def _legacy_request(change: int = 0) -> bytes:
    body = b"" if not change else struct.pack("!HHI", 0x0003, 4, change)
    header = struct.pack("!HH", 0x0001, len(body)) + b"\x01\x02\x03\x04" + b"L" * 12
    return header + body


def test_legacy_client_gets_rfc3489_attributes_and_its_transaction_id() -> None:
    responder = StunResponder(FOUR)
    reply = responder.handle_datagram(_legacy_request(CHANGE_PORT), (0, 0), CLIENT)
    assert reply is not None and reply.slot == (0, 1)
    assert reply.data[4:20] == b"\x01\x02\x03\x04" + b"L" * 12
    msg = parse_message(reply.data)
    # SOURCE-ADDRESS is left out: no classic client's classification reads it (the answer's
    # source is what it compares) and it only made the answer bigger.
    assert set(msg.attributes) == {"MAPPED-ADDRESS", "CHANGED-ADDRESS"}
    assert msg.attributes["MAPPED-ADDRESS"] == CLIENT
    assert msg.attributes["CHANGED-ADDRESS"] == FOUR[(1, 1)]
    assert responder.stats["legacy_requests"] == 1


def test_legacy_client_gets_no_answer_to_a_change_the_server_cannot_make() -> None:
    responder = StunResponder({(0, 0): ("192.0.2.1", 3478)})
    assert responder.handle_datagram(_legacy_request(CHANGE_IP), (0, 0), CLIENT) is None
    assert responder.stats["change_unsupported"] == 1


def test_unknown_comprehension_required_attribute_gets_420_listing_it() -> None:
    request = make_binding_request(_rand, fingerprint=False)
    request.attributes["UNKNOWN-0x0042"] = b"\x00\x00\x00\x00"
    reply = StunResponder(FOUR).handle_datagram(bytes(request), (0, 0), CLIENT)
    assert reply is not None and reply.error
    assert parse_message(reply.data).attributes["UNKNOWN-ATTRIBUTES"] == (0x0042,)


def test_junk_and_non_requests_are_dropped_and_counted() -> None:
    responder = StunResponder(FOUR)
    indication = Message(Method.BINDING, Class.INDICATION, b"i" * 12)
    response = Message(Method.BINDING, Class.RESPONSE, b"r" * 12)
    allocate = Message(Method.ALLOCATE, Class.REQUEST, b"a" * 12)
    for junk in (b"", b"\xff" * 40, _request()[:-4], bytes(range(20))):
        assert responder.handle_datagram(junk, (0, 0), CLIENT) is None
    for msg in (indication, response, allocate):
        assert responder.handle_datagram(bytes(msg), (0, 0), CLIENT) is None
    assert set(responder.stats) == set(RESPONDER_COUNTERS)
    assert responder.stats["malformed_dropped"] == 4
    assert responder.stats["not_request_dropped"] == 3
    assert responder.stats["requests"] == 0


def test_bad_slots_are_the_driver_s_error() -> None:
    with pytest.raises(LocalProtocolError):
        StunResponder({(0, 1): ("192.0.2.1", 3479)})
    with pytest.raises(LocalProtocolError):
        StunResponder({(0, 0): ("192.0.2.1", 3478), (2, 0): ("192.0.2.3", 3478)})
    with pytest.raises(LocalProtocolError):
        StunResponder({(0, 0): ("192.0.2.1", 3478)}).handle_datagram(_request(), (1, 1), CLIENT)


# --- not a reflector (issue 14, finding 9) -------------------------------------------------------

ONE = {(0, 0): ("192.0.2.1", 3478)}


def _bare_request() -> bytes:
    """The smallest Binding request an attacker can spoof: a 20-byte header, no attributes."""
    return bytes(make_binding_request(_rand, fingerprint=False))


def _flavours() -> list[bytes]:
    unknown = make_binding_request(_rand, fingerprint=False)
    unknown.attributes["UNKNOWN-0x0042"] = b""
    return [
        _bare_request(),
        _request(),
        _discovery_request(),
        _request(change_ip=True, change_port=True),
        _request(change_port=True),
        _legacy_request(),
        _legacy_request(CHANGE_PORT),
        bytes(unknown),
    ]


@pytest.mark.parametrize("addresses", [ONE, FOUR], ids=["one-address", "four-addresses"])
def test_no_answer_is_much_bigger_than_its_request(addresses: dict) -> None:
    # The old answers were 4.4-5.6x (every attribute, SOFTWARE, FINGERPRINT, to everyone).
    worst = 0.0
    for i, request in enumerate(_flavours()):
        source = (f"198.51.100.{i + 1}", 40000)
        reply = StunResponder(addresses).handle_datagram(request, (0, 0), source)
        if reply is not None:
            worst = max(worst, len(reply.data) / len(request))
    assert 1.0 < worst <= 2.34


def test_bare_request_gets_only_its_mapped_address() -> None:
    request = _bare_request()
    reply = StunResponder(ONE).handle_datagram(request, (0, 0), CLIENT)
    assert reply is not None
    assert set(parse_message(reply.data).attributes) == {"XOR-MAPPED-ADDRESS"}
    assert (len(request), len(reply.data)) == (20, 32)  # 1.6x
    with_fp = StunResponder(ONE).handle_datagram(_request(), (0, 0), CLIENT)
    assert with_fp is not None
    assert set(parse_message(with_fp.data).attributes) == {"XOR-MAPPED-ADDRESS", "FINGERPRINT"}


def test_plain_request_to_a_two_address_server_gets_other_address_but_no_origin() -> None:
    # RFC 5780 section 4.2: OTHER-ADDRESS in test I's answer is how discovery finds the server.
    reply = StunResponder(FOUR).handle_datagram(_bare_request(), (0, 0), CLIENT)
    assert reply is not None
    attrs = parse_message(reply.data).attributes
    assert set(attrs) == {"XOR-MAPPED-ADDRESS", "OTHER-ADDRESS"}


def test_no_software_unless_the_operator_opts_in_and_never_at_the_answer_s_cost() -> None:
    for addresses in (ONE, FOUR):
        reply = StunResponder(addresses).handle_datagram(_request(), (0, 0), CLIENT)
        assert reply is not None and "SOFTWARE" not in parse_message(reply.data).attributes
    opted = StunResponder(ONE, software=DEFAULT_SOFTWARE)
    reply = opted.handle_datagram(_request(), (0, 0), CLIENT)
    assert reply is not None
    assert parse_message(reply.data).attributes["SOFTWARE"] == DEFAULT_SOFTWARE
    # A SOFTWARE text that would push the answer past 3x is left out, the answer still sent.
    chatty = StunResponder(ONE, software="x" * 200)
    reply = chatty.handle_datagram(_bare_request(), (0, 0), CLIENT)
    assert reply is not None and len(reply.data) <= 3 * 20
    assert "SOFTWARE" not in parse_message(reply.data).attributes
    assert chatty.stats["oversize_dropped"] == 0


@pytest.mark.parametrize("port", [0, 7, 19, 53, 123, 161, 389, 1023, 1900, 5353, 11211])
def test_reflection_service_source_ports_are_never_answered(port: int) -> None:
    responder = StunResponder(FOUR)
    assert is_reflection_port(port)
    assert responder.handle_datagram(_request(), (0, 0), ("198.51.100.9", port)) is None
    assert responder.stats["reflection_port_dropped"] == 1
    assert responder.stats["requests"] == 0  # refused before parsing


def test_ordinary_client_ports_are_answered_and_response_port_cannot_aim_at_a_service() -> None:
    responder = StunResponder(FOUR)
    for port in (1024, 3478, 40000, 65535):
        assert not is_reflection_port(port)
        assert responder.handle_datagram(_request(), (0, 0), ("198.51.100.9", port)) is not None
    assert REFLECTION_PORTS >= {1900, 11211}
    request = make_binding_request(_rand, fingerprint=False)
    request.attributes["RESPONSE-PORT"] = 53
    assert responder.handle_datagram(bytes(request), (0, 0), CLIENT) is None
    assert responder.stats["reflection_port_dropped"] == 1


def test_spoofed_flood_from_one_source_gets_its_rate_not_every_answer() -> None:
    # Finding 9: 5000 spoofed requests/s were 100% answered.  Now a victim's IP gets the burst
    # and then the refill rate: 40 + 20 in the first second.
    responder = StunResponder(ONE)
    victim = ("203.0.113.50", 40000)
    answered = sum(
        responder.handle_datagram(_bare_request(), (0, 0), victim, now=i / 5000) is not None
        for i in range(5000)
    )
    assert answered == int(DEFAULT_BURST + DEFAULT_RATE_PER_S * 4999 / 5000)
    assert responder.stats["rate_limited"] == 5000 - answered
    # Another source is not affected, and the victim's bucket refills with time.
    assert responder.handle_datagram(_request(), (0, 0), CLIENT, now=1.0) is not None
    assert responder.handle_datagram(_request(), (0, 0), victim, now=3.0) is not None


def test_rate_limit_counts_every_datagram_and_can_be_turned_off() -> None:
    limited = StunResponder(ONE, rate_per_s=1, burst=2)
    junk = [limited.handle_datagram(b"\xff" * 30, (0, 0), CLIENT, now=0.0) for _ in range(5)]
    assert junk == [None] * 5
    assert limited.stats["malformed_dropped"] == 2 and limited.stats["rate_limited"] == 3
    free = StunResponder(ONE, rate_per_s=None)
    assert free.limiter is None
    assert all(free.handle_datagram(_request(), (0, 0), CLIENT) for _ in range(200))


def test_source_table_is_bounded_and_forgets_the_least_recently_seen() -> None:
    responder = StunResponder(ONE, rate_per_s=1, burst=1, max_sources=100)
    for i in range(1000):
        ip = f"10.{i // 256}.{i % 256}.1"
        assert responder.handle_datagram(_request(), (0, 0), (ip, 40000), now=0.0) is not None
    assert responder.limiter is not None and len(responder.limiter) == 100
    assert responder.stats["sources_forgotten"] == 900
    # The last one seen is still remembered (its bucket is empty), the first was forgotten.
    assert responder.handle_datagram(_request(), (0, 0), ("10.3.231.1", 40000)) is None
    assert responder.handle_datagram(_request(), (0, 0), ("10.0.0.1", 40000)) is not None


def test_limiter_survives_a_clock_stepping_back_and_refuses_nonsense() -> None:
    limiter = SourceLimiter(rate_per_s=10, burst=2)
    assert limiter.allow("a", 100.0) and limiter.allow("a", 100.0)
    assert not limiter.allow("a", 50.0)  # no tokens from a backwards step
    assert limiter.allow("a", 50.2)
    for bad in ((0, 2, 10), (10, 0.5, 10), (10, 2, 0)):
        with pytest.raises(LocalProtocolError):
            SourceLimiter(*bad)


def test_ipv6_sources_share_a_bucket_per_64() -> None:
    # One host holds a whole /64: rotating through its addresses must not reset the limit.
    six = {(0, 0): ("2001:db8::1", 3478)}
    responder = StunResponder(six, rate_per_s=1, burst=3)
    answered = [
        responder.handle_datagram(_request(), (0, 0), (f"2001:db8:1:2::{i:x}", 40000)) is not None
        for i in range(1, 11)
    ]
    assert answered == [True] * 3 + [False] * 7
    assert responder.handle_datagram(_request(), (0, 0), ("2001:db8:1:3::1", 40000)) is not None
