"""NAT-PMP (RFC 6886) and PCP (RFC 6887) codecs: golden bytes written out from the RFCs' figures
and fuzzing like the STUN codec (miniupnpd's real answers: test_portmap_miniupnpd.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2plab.core import natpmp, pcp
from p2plab.errors import PortMapError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- NAT-PMP golden bytes (RFC 6886 sections 3.2 and 3.3) -----------------------------------------

PMP_EXT_REQ = bytes.fromhex("0000")
#        ver op   result epoch=3600  198.51.100.7
PMP_EXT_RESP = bytes.fromhex("00 80 0000 00000e10 c6336407")
#        ver op  rsvd internal=5000 suggested=5000 lifetime=7200
PMP_MAP_REQ = bytes.fromhex("00 01 0000 1388 1388 00001c20")
#        ver op   result epoch     internal ext=40000 lifetime
PMP_MAP_RESP = bytes.fromhex("00 81 0000 00000e10 1388 9c40 00001c20")


def test_natpmp_requests_match_the_rfc_layout() -> None:
    assert bytes(natpmp.ExternalAddressRequest()) == PMP_EXT_REQ
    assert bytes(natpmp.MapRequest(5000, 5000, 7200)) == PMP_MAP_REQ
    assert natpmp.parse_request(PMP_MAP_REQ) == natpmp.MapRequest(5000, 5000, 7200)
    assert natpmp.parse_request(PMP_EXT_REQ) == natpmp.ExternalAddressRequest()
    # a delete (RFC 6886 3.4): lifetime 0, external port 0
    assert bytes(natpmp.MapRequest(5000, 0, 0)) == bytes.fromhex("00 01 0000 1388 0000 00000000")


def test_natpmp_responses_match_the_rfc_layout() -> None:
    ext = natpmp.parse_response(PMP_EXT_RESP)
    assert ext == natpmp.ExternalAddressResponse(0, 3600, "198.51.100.7")
    assert bytes(ext) == PMP_EXT_RESP
    m = natpmp.parse_response(PMP_MAP_RESP)
    assert m == natpmp.MapResponse(natpmp.OP_MAP_UDP, 0, 3600, 5000, 40000, 7200)
    assert bytes(m) == PMP_MAP_RESP


def test_natpmp_short_error_response_parses_but_a_short_success_does_not() -> None:
    # 8 bytes: header, result 1 (unsupported version), epoch: what a NAT-PMP server answers
    err = natpmp.parse_response(bytes.fromhex("00 81 0001 00000005"))
    assert err == natpmp.MapResponse(natpmp.OP_MAP_UDP, 1, 5, 0, 0, 0)
    with pytest.raises(PortMapError, match="expected 16"):
        natpmp.parse_response(PMP_MAP_RESP[:12])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than its header"),
        (bytes.fromhex("01 80 0000 00000e10 c6336407"), "version 1"),
        (bytes.fromhex("00 00 0000 00000e10 c6336407"), "is a request"),
        (bytes.fromhex("00 83 0000 00000e10 c6336407"), "unknown"),
        (bytes.fromhex("00 80 0000 0000"), "shorter than 8"),
    ],
)
def test_natpmp_malformed_responses_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(PortMapError, match=reason):
        natpmp.parse_response(data)


# -- PCP golden bytes (RFC 6887 sections 7.1, 7.2, 11.1) ------------------------------------------

V4_MAPPED_CLIENT = bytes.fromhex("00000000 00000000 0000ffff c0a80102")  # ::ffff:192.168.1.2
NONCE = bytes(range(1, 13))
PCP_ANNOUNCE_REQ = bytes.fromhex("02 00 0000 00000000") + V4_MAPPED_CLIENT
#                                 ver op rsv res lifetime epoch=10  reserved
PCP_ANNOUNCE_RESP = bytes.fromhex("02 80 00 00 00000000 0000000a") + bytes(12)
PCP_MAP_REQ = (
    bytes.fromhex("02 01 0000 00001c20")
    + V4_MAPPED_CLIENT
    + NONCE
    + bytes.fromhex("11 000000 1388 1388")
    + bytes.fromhex("00000000 00000000 0000ffff 00000000")  # ::ffff:0.0.0.0 = any IPv4
)
PCP_MAP_RESP = (
    bytes.fromhex("02 81 00 00 00001c20 0000000a")
    + bytes(12)
    + NONCE
    + bytes.fromhex("11 000000 1388 9c40")
    + bytes.fromhex("00000000 00000000 0000ffff c6336407")
)


def test_pcp_announce_matches_the_rfc_layout() -> None:
    assert bytes(pcp.Request(pcp.ANNOUNCE, 0, "192.168.1.2")) == PCP_ANNOUNCE_REQ
    assert pcp.parse_request(PCP_ANNOUNCE_REQ) == pcp.Request(pcp.ANNOUNCE, 0, "192.168.1.2")
    resp = pcp.parse_response(PCP_ANNOUNCE_RESP)
    assert resp == pcp.Response(pcp.ANNOUNCE, 0, 0, 10)
    assert bytes(resp) == PCP_ANNOUNCE_RESP


def test_pcp_map_matches_the_rfc_layout_with_ipv4_mapped_addresses() -> None:
    body = pcp.MapData(NONCE, pcp.PROTO_UDP, 5000, 5000, "0.0.0.0")
    req = pcp.Request(pcp.MAP, 7200, "192.168.1.2", body)
    assert bytes(req) == PCP_MAP_REQ
    assert len(PCP_MAP_REQ) == 60
    assert pcp.parse_request(PCP_MAP_REQ) == req
    resp = pcp.parse_response(PCP_MAP_RESP)
    assert resp.map == pcp.MapData(NONCE, pcp.PROTO_UDP, 5000, 40000, "198.51.100.7")
    assert (resp.opcode, resp.result, resp.lifetime_s, resp.epoch) == (pcp.MAP, 0, 7200, 10)
    assert bytes(resp) == PCP_MAP_RESP


def test_pcp_ipv6_addresses_and_options_round_trip() -> None:
    body = pcp.MapData(NONCE, pcp.PROTO_UDP, 5000, 0, "::")
    req = pcp.Request(pcp.MAP, 7200, "2001:db8::2", body, ((1, b"\x00" * 20), (0x80, b"abc")))
    data = bytes(req)
    assert data[8:24] == bytes.fromhex("20010db8000000000000000000000002")
    assert data[-8:] == bytes.fromhex("80 00 0003 616263 00")  # padded to 4, length unpadded
    assert pcp.parse_request(data) == req


def test_pcp_error_response_without_map_data_parses() -> None:
    # NOT_AUTHORIZED, header only: "PCP is implemented but not enabled" (Tailscale's wording)
    resp = pcp.parse_response(bytes.fromhex("02 81 00 02 00000000 0000000a") + bytes(12))
    assert (resp.result, resp.map) == (pcp.ResultCode.NOT_AUTHORIZED, None)
    with pytest.raises(PortMapError, match="cut short"):  # a success must carry it
        pcp.parse_response(bytes.fromhex("02 81 00 00 00001c20 0000000a") + bytes(12))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x02", "shorter than its version"),
        (b"\x00" + PCP_MAP_RESP[1:], "version 0"),
        (PCP_MAP_RESP[:20], "shorter than its header"),
        (PCP_MAP_RESP + b"\x00", "multiple of 4"),
        (PCP_MAP_RESP + bytes(1100), "at most 1100"),
        (b"\x02\x01" + PCP_MAP_RESP[2:], "is a request"),
        (b"\x02\x85" + PCP_MAP_RESP[2:], "unknown"),
        (PCP_MAP_RESP + bytes.fromhex("01 00 0010"), "longer than the message"),
    ],
)
def test_pcp_malformed_responses_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(PortMapError, match=reason):
        pcp.parse_response(data)


# -- fuzz ---------------------------------------------------------------------------------------


def _only_port_map_error(parse: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return parse(data)
    except PortMapError:
        return None


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_port_map_error(data: bytes) -> None:
    for parse in (natpmp.parse_response, natpmp.parse_request, pcp.parse_response):
        _only_port_map_error(parse, data)
    _only_port_map_error(pcp.parse_request, b"\x02" + data)


@FUZZ
@given(st.integers(0, 63), st.binary(min_size=1, max_size=4))
def test_mutated_valid_messages_raise_only_port_map_error(pos: int, patch: bytes) -> None:
    for valid, parse in (
        (PMP_MAP_RESP, natpmp.parse_response),
        (PMP_EXT_RESP, natpmp.parse_response),
        (PCP_MAP_RESP, pcp.parse_response),
        (PCP_ANNOUNCE_RESP, pcp.parse_response),
        (PCP_MAP_REQ, pcp.parse_request),
    ):
        p = pos % (len(valid) + 1)
        mutated = valid[:p] + patch + valid[p + len(patch) :]
        msg = _only_port_map_error(parse, mutated)
        if msg is not None:  # whatever parses serialises back (reserved bits aside)
            assert parse(bytes(msg)) == msg


@FUZZ
@given(
    st.binary(min_size=12, max_size=12),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.ip_addresses(),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=12)), max_size=3),
)
def test_valid_messages_round_trip(
    nonce: bytes,
    iport: int,
    eport: int,
    lifetime: int,
    epoch: int,
    ip: object,
    opts: list[tuple[int, bytes]],
) -> None:
    body = pcp.MapData(nonce, pcp.PROTO_UDP, iport, eport, str(ip))
    resp = pcp.Response(pcp.MAP, 0, lifetime, epoch, body, tuple(opts))
    back = pcp.parse_response(bytes(resp))
    addr = ipaddress.ip_address(str(ip))
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    assert back.map == dataclasses.replace(
        body, external_ip=str(mapped or addr)
    )  # v4 comes back plain
    assert back.lifetime_s == lifetime and back.epoch == epoch and back.options == tuple(opts)
    pmp = natpmp.MapResponse(natpmp.OP_MAP_UDP, 0, epoch, iport, eport, lifetime)
    assert natpmp.parse_response(bytes(pmp)) == pmp
