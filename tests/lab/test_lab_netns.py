"""The kernel NAT lab: topology, profiles classified by pystun3 against coturn, cleanup, loss."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2plab.errors import ConfigError, LabError
from p2plab.lab import netns
from p2plab.lab.netns import NOT_ROOT_MESSAGE, Lab, check_environment, clean_leftovers
from p2plab.lab.profiles import EXPECTED_CLASSIC, NAT_PROFILES, PROFILES, nat_ruleset

try:  # pystun3 installs a top-level ``tests`` package that can shadow ours
    from tests.lab_fixtures import (
        TIMEOUT_UNIT,
        lab_python,
        live_namespaces,
        require_lab,
        udp_count,
    )
except ImportError:  # pragma: no cover
    from lab_fixtures import (  # type: ignore[no-redef]
        TIMEOUT_UNIT,
        lab_python,
        live_namespaces,
        require_lab,
        udp_count,
    )

REPO = Path(__file__).resolve().parents[2]

# ---- no root needed ---------------------------------------------------------------------------


# Real namespaces and iptables: `-m "not lab"` deselects them; conftest runs them one at a time.
pytestmark = [pytest.mark.lab, pytest.mark.root]


@pytest.mark.parametrize("profile", NAT_PROFILES)
def test_ruleset_has_input_firewall_except_leaky(profile: str) -> None:
    rules = nat_ruleset(profile, wan_if="W", public_ip="203.0.113.101", private_ip="198.18.1.2")
    has_rule = "-A INPUT -i W -m conntrack --ctstate NEW -j DROP" in rules
    assert has_rule == (profile != "leaky")
    assert rules.count("COMMIT") == 2
    assert "-A POSTROUTING -o W -j MASQUERADE" in rules


def test_ruleset_recipes_follow_natlab_table() -> None:
    kw = {"wan_if": "W", "public_ip": "203.0.113.101", "private_ip": "198.18.1.2"}
    assert "--random-fully" in nat_ruleset("symmetric", **kw)
    assert "--random-fully" not in nat_ruleset("port-restricted", **kw)
    assert "DNAT --to-destination 198.18.1.2" in nat_ruleset("full", **kw)
    restricted = nat_ruleset("restricted", **kw)
    assert "--rdest --set" in restricted and "--rcheck -j DNAT" in restricted
    lossy = nat_ruleset("port-restricted", loss=0.25, **kw)
    assert lossy.count("--probability 0.250000 -j DROP") == 2  # in and out
    with pytest.raises(ConfigError):
        nat_ruleset("open", **kw)
    with pytest.raises(ConfigError):
        nat_ruleset("cone", **kw)


def test_bad_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        netns.LabConfig(profile_a="nonsense")
    with pytest.raises(ConfigError):
        netns.LabConfig(loss_a=1.5)
    with pytest.raises(ConfigError):
        netns.LabConfig(prefix="zzz")


def test_not_root_gives_one_clear_sentence() -> None:
    with pytest.raises(LabError) as info:
        check_environment(euid=1000)
    assert str(info.value) == NOT_ROOT_MESSAGE
    # One sentence: it names what is needed and ends once.
    assert "root" in NOT_ROOT_MESSAGE and "p2plab.lab.sim" in NOT_ROOT_MESSAGE
    assert NOT_ROOT_MESSAGE.endswith(".") and ". " not in NOT_ROOT_MESSAGE
    assert "\n" not in NOT_ROOT_MESSAGE


def test_missing_tool_is_named() -> None:
    with pytest.raises(LabError, match="no-such-tool-p2plab"):
        check_environment(euid=0, tools=("ip", "no-such-tool-p2plab"))


def test_cli_as_nobody_prints_the_sentence() -> None:
    """A real unprivileged process (setpriv to uid 65534) gets the sentence and exit status 2."""
    require_lab()
    proc = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
            *(sys.executable, "-m", "p2plab.lab.cli", "up"),
        ],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60 * TIMEOUT_UNIT,
    )
    assert proc.returncode == 2, proc.stderr
    assert NOT_ROOT_MESSAGE in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- root: the real lab -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def classified() -> dict[str, dict[str, object]]:
    require_lab()
    return netns.classify_profiles(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_pystun3_classifies_each_profile(
    classified: dict[str, dict[str, object]], profile: str
) -> None:
    assert classified[profile]["classic"] == EXPECTED_CLASSIC[profile]


def test_topology_and_cleanup() -> None:
    require_lab()
    before = live_namespaces()
    with Lab.create("port-restricted", "open") as lab:
        made = set(lab.namespaces)
        assert made and made.isdisjoint(before)
        assert made <= live_namespaces()
        assert all(ns.startswith(lab.prefix + "-") for ns in made)
        assert lab.address("a").startswith("198.18.1.")
        assert lab.address("nat_a") == "203.0.113.101"
        assert lab.address("b") == "203.0.113.201" or lab.address("b").startswith("203.0.113.")
        assert "nat_b" not in lab.hosts  # an open site has no NAT
        assert lab.stun_addresses == ("203.0.113.10", "203.0.113.11")
        # The host behind the NAT reaches the rendezvous; the rendezvous sees the NAT's address.
        seen = lab_python(
            lab,
            "a",
            """
            import json, socket, sys
            s = socket.create_connection((sys.argv[1], 22), timeout=2) if False else None
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.connect((sys.argv[1], 9))
            print(json.dumps(u.getsockname()[0]))
            """,
            lab.rendezvous_address,
        )
        assert seen == lab.address("a")
        counts = udp_count(lab, "a", "rendezvous", 20)
        assert counts["received"] == 20 and counts["echoed"] == 20
        coturn = lab._procs[0]
        assert coturn.poll() is None
        # Interface names stay within the kernel's 15 characters and carry the prefix.
        links = lab.run("nat_a", ["ip", "-o", "link"]).stdout
        assert f"{lab.prefix}wa" in links
    assert lab.closed
    assert made.isdisjoint(live_namespaces())
    assert coturn.poll() is not None


def test_cleanup_when_the_block_raises() -> None:
    require_lab()
    with pytest.raises(RuntimeError), Lab.create("symmetric", "full", stun=False) as lab:
        made = set(lab.namespaces)
        raise RuntimeError("boom")
    assert made.isdisjoint(live_namespaces())


SCRIPT = """
import sys, time
from p2plab.lab.netns import Lab
lab = Lab.create("full", "restricted", stun=False)
print(lab.prefix, flush=True)
time.sleep(60)
"""


def _spawn_lab_process() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout is not None
    prefix = proc.stdout.readline().strip()
    assert prefix.startswith("p2l"), prefix
    return proc, prefix


def _ours(prefix: str) -> set[str]:
    return {ns for ns in live_namespaces() if ns.startswith(prefix + "-")}


def test_sigterm_cleans_up() -> None:
    require_lab()
    proc, prefix = _spawn_lab_process()
    assert _ours(prefix)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30 * TIMEOUT_UNIT)
    assert _ours(prefix) == set()


def test_clean_leftovers_removes_dead_runs_only() -> None:
    require_lab()
    proc, prefix = _spawn_lab_process()
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait(timeout=30 * TIMEOUT_UNIT)
    assert _ours(prefix), "a SIGKILLed run leaves its namespaces"
    with Lab.create("open", "open", stun=False) as live:
        removed = clean_leftovers()
        assert _ours(prefix) == set()
        assert any(ns.startswith(prefix) for ns in removed)
        assert set(live.namespaces) <= live_namespaces(), "a live lab is left alone"
    assert _ours(live.prefix) == set()


def test_cli_clean_runs() -> None:
    require_lab()
    proc = subprocess.run(
        [sys.executable, "-m", "p2plab.lab.cli", "clean"],
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_UNIT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("removed ")


def test_same_lan_hosts_share_a_nat() -> None:
    require_lab()
    with Lab.create("port-restricted", same_lan=True, stun=False) as lab:
        assert lab.address("a") == "198.18.1.2"
        assert lab.address("b") == "198.18.1.3"
        assert lab.namespace("a") != lab.namespace("b")
        assert "nat_b" not in lab.hosts
        counts = udp_count(lab, "a", "b", 20)
        assert counts["received"] == 20 and counts["echoed"] == 20


def test_loss_drops_about_the_configured_fraction() -> None:
    require_lab()
    n = 1000
    with Lab.create("port-restricted", "open", loss_a=0.2, stun=False) as lab:
        counts = udp_count(lab, "a", "rendezvous", n)
    # Outbound through NAT A: ~80% arrive; echoes cross it again: ~64% come back.
    assert 0.70 * n <= counts["received"] <= 0.90 * n, counts
    assert 0.52 * n <= counts["echoed"] <= 0.76 * n, counts


def test_rate_limit_installs_tbf_both_ways() -> None:
    require_lab()
    with Lab.create("symmetric", "open", rate_a_mbit=5, stun=False) as lab:
        nat_q = lab.run("nat_a", ["tc", "qdisc", "show"]).stdout
        wan_q = subprocess.run(
            ["ip", "netns", "exec", f"{lab.prefix}-wan", "tc", "qdisc", "show"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert "tbf" in nat_q and "5Mbit" in nat_q
    assert "tbf" in wan_q and "5Mbit" in wan_q


def test_cli_classify_subset() -> None:
    require_lab()
    proc = subprocess.run(
        [sys.executable, "-m", "p2plab.lab.cli", "classify", "--profiles", "full,symmetric"],
        capture_output=True,
        text=True,
        timeout=120 * TIMEOUT_UNIT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("full") and "Full Cone" in line for line in lines)
    assert any(line.startswith("symmetric") and "Symmetric NAT" in line for line in lines)


def test_lab_address_of_missing_host_is_a_lab_error() -> None:
    require_lab()
    with Lab.create("open", "open", stun=False) as lab:
        with pytest.raises(LabError, match="no host 'nat_a'"):
            lab.address("nat_a")
        t0 = time.monotonic()
        assert t0 > 0
