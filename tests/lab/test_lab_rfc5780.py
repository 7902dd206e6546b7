"""RFC 5780 NAT behaviour discovery (our StunProbe, ``p2plab probe --json``) inside the kernel lab,
against coturn and against our own ``p2plab stun-server --alt-host``."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from p2plab.lab.netns import STUN_ALT_PORT, STUN_IPS, STUN_PORT, Lab
from p2plab.lab.profiles import EXPECTED_RFC5780, PROFILES

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.lab_fixtures import TIMEOUT_UNIT, require_lab
except ImportError:  # pragma: no cover
    from lab_fixtures import TIMEOUT_UNIT, require_lab  # type: ignore[no-redef]


# Real namespaces and iptables: `-m "not lab"` deselects them; conftest runs them one at a time.
pytestmark = [pytest.mark.lab, pytest.mark.root]


def _start_own_stun_server(lab: Lab) -> None:
    lab.python(
        "stun",
        [
            "-m",
            "p2plab",
            "stun-server",
            "--host",
            STUN_IPS[0],
            "--port",
            str(STUN_PORT),
            "--alt-host",
            STUN_IPS[1],
            "--alt-port",
            str(STUN_ALT_PORT),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    want = {f"{ip}:{port}" for ip in STUN_IPS for port in (STUN_PORT, STUN_ALT_PORT)}
    for _ in range(400):
        if want <= set(lab.run("stun", ["ss", "-Hlun"]).stdout.split()):
            return
        subprocess.run(["sleep", "0.05"], check=True)
    pytest.fail("p2plab stun-server did not listen on both addresses and ports")


def _probe_all(server: str) -> dict[str, dict[str, object]]:
    pairs = [PROFILES[i : i + 2] for i in range(0, len(PROFILES), 2)]

    def one(pair: tuple[str, ...]) -> dict[str, dict[str, object]]:
        with Lab.create(pair[0], pair[1], stun=server == "coturn") as lab:
            if server == "own":
                _start_own_stun_server(lab)

            def probe(host: str) -> dict[str, object]:
                argv = [sys.executable, "-m", "p2plab", "probe", "--stun", lab.stun_server]
                r = lab.run(host, [*argv, "--json", "--no-classic"], timeout=120 * TIMEOUT_UNIT)
                assert r.returncode == 0, r.stderr
                out: dict[str, object] = json.loads(r.stdout)
                return out

            with ThreadPoolExecutor(2) as pool:
                a, b = pool.map(probe, ["a", "b"])
            return {pair[0]: a, pair[1]: b}

    results: dict[str, dict[str, object]] = {}
    with ThreadPoolExecutor(len(pairs)) as pool:
        for part in pool.map(one, pairs):
            results.update(part)
    return results


@pytest.fixture(scope="module", params=["coturn", "own"])
def reports(request: pytest.FixtureRequest) -> dict[str, dict[str, object]]:
    require_lab()
    return _probe_all(request.param)


@pytest.mark.parametrize("profile", PROFILES)
def test_rfc5780_behaviour_of_each_profile(
    reports: dict[str, dict[str, object]], profile: str
) -> None:
    report = reports[profile]
    assert (report["mapping"], report["filtering"]) == EXPECTED_RFC5780[profile], report
