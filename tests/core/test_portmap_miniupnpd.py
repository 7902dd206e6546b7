"""miniupnpd 2.3.1's real NAT-PMP and PCP answers, captured in the kernel lab (LAB-PMP helper;
tests/core/data/miniupnpd/README.txt says how): our requests are byte for byte what it was sent,
its answers parse and serialise back to the same bytes, and a PortMapper fed them maps."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2plab.core import natpmp, pcp
from p2plab.core.portmap import (
    MappingFailed,
    MappingGranted,
    PortMapper,
    PortMapperConfig,
    ProbeDone,
)
from p2plab.errors import PortMapError

DATA = Path(__file__).parent / "data" / "miniupnpd"
GW, ME = "198.18.1.1", "198.18.1.2"
NONCE = bytes(range(1, 13))


def cap(name: str) -> bytes:
    return (DATA / f"{name}.bin").read_bytes()


def test_our_requests_are_the_captured_bytes() -> None:
    assert bytes(natpmp.ExternalAddressRequest()) == cap("natpmp_external_address.request")
    assert bytes(natpmp.MapRequest(40000, 40000, 7200)) == cap("natpmp_map_udp.request")
    assert bytes(natpmp.MapRequest(40000, 0, 0)) == cap("natpmp_delete_udp.request")
    assert bytes(pcp.Request(pcp.ANNOUNCE, 0, ME)) == cap("pcp_announce.request")
    body = pcp.MapData(NONCE, pcp.PROTO_UDP, 40002, 40002, "0.0.0.0")
    assert bytes(pcp.Request(pcp.MAP, 7200, ME, body)) == cap("pcp_map_udp.request")
    assert bytes(pcp.Request(pcp.MAP, 0, ME, body)) == cap("pcp_delete_udp.request")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("natpmp_external_address", natpmp.ExternalAddressResponse(0, 1, "1.2.3.101")),
        ("natpmp_map_udp", natpmp.MapResponse(1, 0, 1, 40000, 40000, 7200)),
        ("natpmp_map_udp_renew", natpmp.MapResponse(1, 0, 2, 40000, 40000, 7200)),
        ("natpmp_delete_udp", natpmp.MapResponse(1, 0, 2, 40000, 0, 0)),
        ("pcp_announce", pcp.Response(pcp.ANNOUNCE, 0, 0, 4)),
        (
            "pcp_map_udp",
            pcp.Response(pcp.MAP, 0, 7200, 4, pcp.MapData(NONCE, 17, 40002, 40002, "1.2.3.101")),
        ),
        (
            "pcp_delete_udp",
            pcp.Response(pcp.MAP, 0, 0, 5, pcp.MapData(NONCE, 17, 40002, 40002, "1.2.3.101")),
        ),
        (
            "pcp_address_mismatch",
            pcp.Response(
                pcp.MAP,
                pcp.ResultCode.ADDRESS_MISMATCH,
                0,
                5,
                pcp.MapData(NONCE, 17, 40002, 40002, "0.0.0.0"),
            ),
        ),
        (
            "pcp_unsupported_version",
            pcp.Response(pcp.ANNOUNCE, pcp.ResultCode.UNSUPP_VERSION, 0, 5),
        ),
    ],
)
def test_answers_parse_and_serialise_back(name: str, expected: object) -> None:
    data = cap(f"{name}.answer")
    parse = pcp.parse_response if data[:1] == b"\x02" else natpmp.parse_response
    msg = parse(data)
    assert msg == expected
    assert bytes(msg) == data


def test_the_answer_to_an_unknown_opcode_is_refused_with_its_reason() -> None:
    # 8 bytes, result 5: nothing we send gets it, and there is no layout for opcode 3
    with pytest.raises(PortMapError, match="opcode 131 unknown"):
        natpmp.parse_response(cap("natpmp_unsupported_opcode.answer"))


def _mapper(port: int) -> PortMapper:
    m = PortMapper(lambda n: NONCE[:n], PortMapperConfig(gateway_port=5351))
    m.start(0.0, GW, port, ME)
    return m


def test_a_mapper_fed_miniupnpd_maps_with_nat_pmp() -> None:
    m = _mapper(40000)
    sent = [d for d, _ in m.datagrams_to_send(0.0)]
    assert sent == [cap("natpmp_external_address.request"), cap("pcp_announce.request")]
    m.receive_datagram(cap("natpmp_external_address.answer"), (GW, 5351), 0.01)
    m.receive_datagram(cap("pcp_announce.answer"), (GW, 5351), 0.01)
    m.handle_timer(0.25)
    assert m.next_event() == ProbeDone(("nat-pmp", "pcp"))
    assert [d for d, _ in m.datagrams_to_send(0.25)] == [cap("natpmp_map_udp.request")]
    m.receive_datagram(cap("natpmp_map_udp.answer"), (GW, 5351), 0.26)
    assert m.next_event() == MappingGranted("nat-pmp", "1.2.3.101", 40000, 7200)
    m.handle_timer(3600.26)  # half-life: the renewal is the captured request again
    assert [d for d, _ in m.datagrams_to_send(3600.26)] == [cap("natpmp_map_udp_renew.request")]
    m.stop(3601.0)
    assert [d for d, _ in m.datagrams_to_send(3601.0)] == [cap("natpmp_delete_udp.request")]


def test_a_mapper_fed_miniupnpd_maps_with_pcp() -> None:
    m = _mapper(40002)
    m.datagrams_to_send(0.0)
    m.receive_datagram(cap("pcp_announce.answer"), (GW, 5351), 0.01)
    m.handle_timer(0.25)
    assert m.next_event() == ProbeDone(("pcp",))
    assert [d for d, _ in m.datagrams_to_send(0.25)] == [cap("pcp_map_udp.request")]
    m.receive_datagram(cap("pcp_map_udp.answer"), (GW, 5351), 0.26)
    assert m.next_event() == MappingGranted("pcp", "1.2.3.101", 40002, 7200)
    assert m.stats["portmap_drop_epoch"] == 0


def test_address_mismatch_is_a_refusal_not_a_grant() -> None:
    m = _mapper(40002)
    m.datagrams_to_send(0.0)
    m.receive_datagram(cap("pcp_announce.answer"), (GW, 5351), 0.01)
    m.handle_timer(0.25)
    m.next_event()
    m.receive_datagram(cap("pcp_address_mismatch.answer"), (GW, 5351), 0.3)
    assert m.next_event() == MappingFailed("pcp: result ADDRESS_MISMATCH")
    assert m.state == "unavailable"
    assert m.error == "pcp: result ADDRESS_MISMATCH" and m.stats["portmap_refused"] == 1
