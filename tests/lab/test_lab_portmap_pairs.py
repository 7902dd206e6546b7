"""Workers behind miniupnpd NATs (issue 18): the matrix pairs that port mapping rescues connect
directly with ``method`` port-mapping, and a lease deleted mid-link is replaced without losing
chat."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable

import pytest

from p2plab.lab.matrix import PairRun, run_pair
from p2plab.lab.netns import Lab, LabConfig
from p2plab.lab.portmap_lab import NATPMP_PORT, udp_exchange

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.conftest import require
    from tests.lab_fixtures import TIMEOUT_UNIT, require_lab
except ImportError:  # pragma: no cover
    from conftest import require  # type: ignore[no-redef]
    from lab_fixtures import TIMEOUT_UNIT, require_lab  # type: ignore[no-redef]

# Real namespaces, miniupnpd and worker processes: `-m "not lab"` deselects them.
pytestmark = [pytest.mark.lab, pytest.mark.root]

#: The issue's pairs: without port mapping the first three need the relay (symmetric on both
#: sides) or birthday punching; with it the mapped side is reachable at once.
PAIRS = [
    ("symmetric+pmp", "symmetric"),
    ("symmetric+upnp", "symmetric"),
    ("symmetric+pmp", "symmetric+pmp"),
    ("port-restricted+pmp", "leaky"),
]


def require_portmap_lab() -> None:
    require_lab()
    for tool in ("miniupnpd", "upnpc", "nft", "conntrack"):
        require(shutil.which(tool) is not None, tool)


@pytest.mark.parametrize(("site_a", "site_b"), PAIRS, ids=[f"{a}:{b}" for a, b in PAIRS])
def test_port_mapping_pair_connects_directly(site_a: str, site_b: str) -> None:
    require_portmap_lab()
    result = run_pair(LabConfig(site_a, site_b), timeout=30 * TIMEOUT_UNIT, check_chat=True)
    assert result.outcome == "direct", result
    assert result.method == "port-mapping", result
    assert result.chat == "ok", result


def _lease(lab: Lab, site: str) -> tuple[int, int] | None:
    """(external, internal) port of the site's UDP lease for its host, from miniupnpd's file."""
    for line in lab.miniupnpd[site].leases():
        proto, ext, _ip, internal, *_ = line.split(":")
        if proto == "UDP":
            return int(ext), int(internal)
    return None


def _until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout * TIMEOUT_UNIT
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("site_a", ["symmetric+pmp", "symmetric+upnp"])
def test_lease_deleted_mid_link_is_replaced_without_losing_chat(site_a: str) -> None:
    """A lease deleted from outside the worker (NAT-PMP delete from another socket of host a;
    ``upnpc -d``) mid-link: chat goes on exactly once both ways, and the worker's next renewal
    (at half of the 20 s lease it asks for here) re-creates the mapping.

    miniupnpd's delete removes its DNAT rule but not the NAT's conntrack entry, so the running
    flow is not cut, as on a real miniupnpd router; a fresh flow to the port would be refused
    until the renewal (test_lab_portmap.py checks that)."""
    require_portmap_lab()
    with Lab.from_config(LabConfig(site_a, "symmetric")) as lab:
        run = PairRun(lab, name="lease-delete").start(worker_args=["--port-mapping-lifetime", "20"])
        try:
            assert run.wait_connected(30 * TIMEOUT_UNIT), (run.status("a"), run.status("b"))
            assert run.status("a").get("method") == "port-mapping", run.status("a")
            assert run.chat_exactly_once("a", "b")
            lease = _lease(lab, "a")
            assert lease is not None, lab.miniupnpd["a"].leases()
            external, internal = lease
            if site_a.endswith("+upnp"):
                proc = lab.run("a", ["upnpc", "-d", str(external), "UDP"], timeout=30)
                assert proc.returncode == 0, proc.stdout + proc.stderr
            else:  # RFC 6886 3.4; secure_mode lets a client delete its own address's mappings
                delete = bytes([0, 1, 0, 0]) + internal.to_bytes(2, "big") + bytes(6)
                gateway = (lab.miniupnpd["a"].gateway, NATPMP_PORT)
                _, (answer,) = udp_exchange(lab, "a", lab.address("a"), gateway, [delete])
                assert answer is not None and answer[2:4] == b"\0\0", answer
            assert _lease(lab, "a") is None
            assert run.chat_exactly_once("a", "b")
            assert run.chat_exactly_once("b", "a")
            assert _until(lambda: _lease(lab, "a") is not None, 15), "the lease was not replaced"
            assert _lease(lab, "a") == lease  # the same external port again
            assert run.status("a").get("state") == "connected"
            assert run.chat_exactly_once("b", "a")
        finally:
            run.close()
