"""NAT profiles of the kernel lab as iptables rulesets (pure text, no I/O).

The recipes and the reasons behind them are measured on these machines and written down in
``natlab.md``.  Each profile maps to one ``iptables-restore`` input for the NAT namespace.

RFC 4787 words, and the classic RFC 3489 names pystun3 reports for them:

============== ============================================ =====================
profile        behaviour                                    pystun3 (RFC 3489)
============== ============================================ =====================
open           no NAT: the host sits on the public segment  Open Internet
full           EIM + endpoint-independent filtering         Full Cone
restricted     EIM + address-dependent filtering            Restric NAT
port-restricted EIM + address-and-port-dependent filtering  Restric Port NAT
symmetric      address-and-port-dependent mapping           Symmetric NAT
leaky          port-restricted without an input firewall    Symmetric NAT
============== ============================================ =====================

Why ``leaky`` looks symmetric: without ``INPUT -i W -m conntrack --ctstate NEW -j DROP`` an
unsolicited packet to the NAT's public port is accepted for local delivery and conntrack confirms
an entry for it; the host's own later packet to that sender clashes with that entry's reply tuple
and netfilter picks a new source port for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2plab.errors import ConfigError

__all__ = [
    "EXPECTED_CLASSIC",
    "EXPECTED_RFC5780",
    "NAT_PROFILES",
    "PROFILES",
    "expected_outcome",
    "impairment_rules",
    "nat_ruleset",
    "udp_block_rules",
    "validate_profile",
]

#: Every profile the lab can build, in the order tables and heatmaps show them.
PROFILES: tuple[str, ...] = ("open", "full", "restricted", "port-restricted", "symmetric", "leaky")

#: The profiles that put a NAT namespace in front of the site.
NAT_PROFILES: tuple[str, ...] = PROFILES[1:]

#: What pystun3 (RFC 3489 classic test) reports for a host behind each profile.
EXPECTED_CLASSIC: dict[str, str] = {
    "open": "Open Internet",
    "full": "Full Cone",
    "restricted": "Restric NAT",
    "port-restricted": "Restric Port NAT",
    "symmetric": "Symmetric NAT",
    "leaky": "Symmetric NAT",
}

#: RFC 5780 (mapping, filtering) behaviour expected for each profile.
EXPECTED_RFC5780: dict[str, tuple[str, str]] = {
    "open": ("endpoint-independent", "endpoint-independent"),
    "full": ("endpoint-independent", "endpoint-independent"),
    "restricted": ("endpoint-independent", "address-dependent"),
    "port-restricted": ("endpoint-independent", "address-and-port-dependent"),
    "symmetric": ("address-and-port-dependent", "address-and-port-dependent"),
    # The leaky NAT maps like port-restricted until an unsolicited packet has hit its port.  RFC
    # 5780's mapping test II goes to (alternate IP, primary port), which no unsolicited answer of
    # the filtering tests came from, so a fresh probe sees EIM; pystun3 runs a filtering test
    # (CHANGE-REQUEST) first and then sees the remapping ("Symmetric NAT").
    "leaky": ("endpoint-independent", "address-and-port-dependent"),
}


def validate_profile(profile: str) -> str:
    """Return ``profile`` if the lab knows it, else raise :class:`ConfigError`."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown NAT profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return profile


def nat_ruleset(
    profile: str,
    *,
    wan_if: str,
    public_ip: str,
    private_ip: str,
    loss: float = 0.0,
    recent_name: str = "p2plab",
) -> str:
    """The ``iptables-restore`` input that turns a router namespace into a NAT of ``profile``.

    ``private_ip`` is the host that unsolicited UDP goes to for the ``full`` and ``restricted``
    profiles (one host, like a router's "DMZ host").  ``loss`` drops that fraction of the UDP
    datagrams forwarded through the WAN, in each direction.
    """
    validate_profile(profile)
    if profile == "open":
        raise ConfigError("the 'open' profile has no NAT namespace")
    nat: list[str] = []
    filt: list[str] = []
    filt += _loss_lines("FORWARD", "-i", wan_if, loss) + _loss_lines("FORWARD", "-o", wan_if, loss)
    if profile == "full":
        nat.append(f"-A POSTROUTING -o {wan_if} -p udp -j SNAT --to-source {public_ip}")
        nat.append(f"-A PREROUTING -i {wan_if} -p udp -j DNAT --to-destination {private_ip}")
    elif profile == "restricted":
        nat.append(f"-A POSTROUTING -o {wan_if} -p udp -j SNAT --to-source {public_ip}")
        filt.append(f"-A FORWARD -o {wan_if} -p udp -m recent --name {recent_name} --rdest --set")
        nat.append(
            f"-A PREROUTING -i {wan_if} -p udp -m recent --name {recent_name} --rcheck"
            f" -j DNAT --to-destination {private_ip}"
        )
    elif profile in ("port-restricted", "leaky"):
        pass  # plain MASQUERADE below
    elif profile == "symmetric":
        nat.append(f"-A POSTROUTING -o {wan_if} -p udp -j MASQUERADE --random-fully")
    # Everything else (TCP to the rendezvous, ICMP) is masqueraded normally.
    nat.append(f"-A POSTROUTING -o {wan_if} -j MASQUERADE")
    if profile != "leaky":
        # What real routers have; see the module docstring and natlab.md for why it matters.
        filt.append(f"-A INPUT -i {wan_if} -m conntrack --ctstate NEW -j DROP")
    return _restore_text(nat, filt)


def udp_block_rules(*, nat: bool, addresses: Sequence[str]) -> list[list[str]]:
    """``iptables -I``/``-D`` arguments that drop UDP to and from ``addresses`` at one site.

    On a NAT (``nat``) the rules go in FORWARD, where the destination is still the remote public
    address (before SNAT) and the source is the remote's public address, and in INPUT for the
    unsolicited datagrams the NAT itself receives; a host without NAT gets them in OUTPUT/INPUT.
    Only the given addresses match, so anything else (the rendezvous, TCP) still passes.
    """
    chains = (
        [("FORWARD", "-d"), ("FORWARD", "-s"), ("INPUT", "-s")]
        if nat
        else [("OUTPUT", "-d"), ("INPUT", "-s")]
    )
    return [
        [chain, "-p", "udp", flag, ip, "-j", "DROP"] for ip in addresses for chain, flag in chains
    ]


def impairment_rules(interface: str, loss: float) -> str:
    """``iptables-restore`` input for a host without NAT: drop ``loss`` of UDP each way."""
    filt = _loss_lines("INPUT", "-i", interface, loss) + _loss_lines(
        "OUTPUT", "-o", interface, loss
    )
    return _restore_text([], filt)


def _loss_lines(chain: str, direction: str, interface: str, loss: float) -> list[str]:
    if not 0.0 <= loss < 1.0:
        raise ConfigError(f"loss must be in [0, 1), got {loss!r}")
    if loss == 0.0:
        return []
    return [
        f"-A {chain} {direction} {interface} -p udp -m statistic --mode random"
        f" --probability {loss:.6f} -j DROP"
    ]


def _restore_text(nat: list[str], filt: list[str]) -> str:
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [":POSTROUTING ACCEPT [0:0]", *nat, "COMMIT"]
    lines += ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [*filt, "COMMIT", ""]
    return "\n".join(lines)


def expected_outcome(profile_a: str, profile_b: str, same_lan: bool = False) -> str:
    """What punching between the two profiles should give, with birthday punching (issue 16).

    ``direct`` or ``failed`` (failed: the pair needs the relay).  natlab.md's table, where
    "needs port prediction or relay" is now a direct link made by birthday punching when one
    side is hard (symmetric, or leaky, which maps endpoint-independently but punches as hard:
    its conntrack clash remaps the socket) and the other easy; two hard sides go to the relay
    (unless a hard-NAT budget is given).  An easy x hard pair succeeds with probability
    1 - (1 - k/P)^n per attempt (98.3% with the defaults k = 256, n = 1024, P = 64512), not
    always.  Two hosts behind one NAT reach each other over the LAN.  (``unknown`` is no longer
    returned; callers may still treat it as "the table does not say".)
    """
    validate_profile(profile_a)
    validate_profile(profile_b)
    if same_lan:
        return "direct"
    # symmetric x leaky is not hard x hard: the leaky side's own mapping is endpoint-independent
    # until a stranger hits it, so it probes and the symmetric side sprays after its probes.
    if profile_a == profile_b and profile_a in ("symmetric", "leaky"):
        return "failed"
    return "direct"
