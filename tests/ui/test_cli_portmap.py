"""``--port-mapping`` and ``P2P_PORT_MAPPING`` reach the worker's config; bad values are usage
errors; ``probe``'s text line."""

from __future__ import annotations

import pytest

from p2plab.aio.portmap import describe_port_mapping
from p2plab.cli import _worker_config, build_parser


def _config(argv: list[str]) -> str:
    args = build_parser().parse_args(argv)
    args.cmd_parser = build_parser()
    return str(_worker_config(args).port_mapping)


def test_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["worker", "--rendezvous", "ws://h:1"]
    assert _config(base) == "auto"
    assert _config([*base, "--port-mapping", "OFF"]) == "off"
    monkeypatch.setenv("P2P_PORT_MAPPING", "192.168.1.1")
    assert _config(base) == "192.168.1.1"
    assert _config([*base, "--port-mapping", "auto"]) == "auto"  # the flag wins


def test_bad_values_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--port-mapping", "router.lan"])
    assert "expected off, auto or the gateway's IPv4 address" in capsys.readouterr().err
    monkeypatch.setenv("P2P_PORT_MAPPING", "maybe")
    with pytest.raises(SystemExit):
        _config(["worker", "--rendezvous", "ws://h:1"])
    assert "P2P_PORT_MAPPING" in capsys.readouterr().err


def test_lease_lifetime_flag_and_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def lifetime(argv: list[str]) -> int:
        args = build_parser().parse_args(["worker", "--rendezvous", "ws://h:1", *argv])
        args.cmd_parser = build_parser()
        return int(_worker_config(args).port_mapping_lifetime_s)

    assert lifetime([]) == 7200
    assert lifetime(["--port-mapping-lifetime", "20"]) == 20
    monkeypatch.setenv("P2P_PORT_MAPPING_LIFETIME", "600")
    assert lifetime([]) == 600
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--port-mapping-lifetime", "5"])
    assert "10..604800" in capsys.readouterr().err


def test_probe_line_reads_like_netcheck() -> None:
    block = {
        "gateway": "192.168.1.1",
        "protocols": ["nat-pmp", "pcp", "upnp"],
        "protocol": "nat-pmp",
        "external": "198.51.100.7:40000",
        "lease_s": 7200,
    }
    assert describe_port_mapping(block) == (
        "PortMapping: NAT-PMP, PCP, UPnP (gateway 192.168.1.1); "
        "mapped 198.51.100.7:40000 for 7200 s via nat-pmp"
    )
    assert describe_port_mapping({"gateway": "10.0.0.1", "protocols": []}).startswith(
        "PortMapping: none"
    )
    assert "not probed" in describe_port_mapping(None)
