"""The sans-I/O STUN Binding responder, in memory: slots, CHANGE-REQUEST, legacy clients, junk."""

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
from p2plab.core.stun_server import DEFAULT_SOFTWARE, RESPONDER_COUNTERS, StunResponder
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
    responder = StunResponder(FOUR)
    reply = responder.handle_datagram(
        _request(change_ip=change_ip, change_port=change_port), (0, 0), CLIENT
    )
    assert reply is not None and not reply.error
    assert reply.slot == want
    assert reply.destination == CLIENT
    msg = parse_message(reply.data)
    assert msg.message_class == Class.RESPONSE
    assert msg.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert msg.attributes["MAPPED-ADDRESS"] == CLIENT
    assert msg.attributes["RESPONSE-ORIGIN"] == FOUR[want]
    assert msg.attributes["OTHER-ADDRESS"] == FOUR[(1, 1)]
    assert msg.attributes["CHANGED-ADDRESS"] == FOUR[(1, 1)]
    assert msg.attributes["SOFTWARE"] == DEFAULT_SOFTWARE
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


def test_wildcard_slot_advertises_the_ip_the_request_was_sent_to() -> None:
    responder = StunResponder({(0, 0): ("0.0.0.0", 3478)})
    reply = responder.handle_datagram(_request(), (0, 0), CLIENT, local_ip="127.0.0.5")
    assert reply is not None
    assert parse_message(reply.data).attributes["RESPONSE-ORIGIN"] == ("127.0.0.5", 3478)


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
    assert set(msg.attributes) == {"MAPPED-ADDRESS", "SOURCE-ADDRESS", "CHANGED-ADDRESS"}
    assert msg.attributes["SOURCE-ADDRESS"] == FOUR[(0, 1)]
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
