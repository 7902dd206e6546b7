"""``p2plab probe``'s report in sentences a person reads (``--json`` keeps the full dict)."""

from __future__ import annotations

from typing import Any

__all__ = ["describe_hint", "describe_ipv6", "describe_report"]

#: pystun3's name when the mapped address is our own but replies from the server's other
#: address did not arrive: a filtering firewall, or a server that has no other address.
_NO_NAT_FIREWALL = "Symmetric UDP Firewall"


def _addr(a: Any) -> str:
    return "unknown" if a is None else f"{a[0]}:{a[1]}"


def describe_hint(hint: dict[str, Any]) -> str:
    """One line for ``probe --json``'s ``nat_hint`` (:func:`p2plab.aio.status.hint_block`)."""
    difficulty = hint.get("difficulty", "unknown")
    if difficulty == "easy":
        why = "one public port for every destination: plain hole punching works"
    elif hint.get("remaps_on_clash"):
        why = (
            "one public port for every destination, but a new one after an unsolicited packet "
            "(a 'leaky' NAT): birthday punching"
        )
    elif hint.get("sequential"):
        ports = ", ".join(str(p) for p in list(hint.get("predicted_ports") or [])[:3])
        why = f"a new port per destination, allocated in order (next: {ports}): predicted ports"
    elif difficulty == "hard":
        why = "a new random port per destination: birthday punching, or the relay"
    else:
        why = "needs two STUN servers, or one with an RFC 5780 alternate address"
    return f"hole punching: {difficulty} ({why})"


def describe_report(report: Any) -> str:
    """Readable lines for a :class:`~p2plab.core.nat.NatReport`."""
    lines = [f"public address: {_addr(report.mapped)} (local {_addr(report.local)})"]
    if report.behind_nat is False:
        lines.append(
            "NAT: none - this host's own address is what the STUN server sees, so peers reach "
            "it directly (a firewall may still filter)"
        )
    elif report.behind_nat:
        lines.append("NAT: yes - the STUN server sees another address than this host's own")
    else:
        lines.append("NAT: unknown (no STUN server answered)")
    mapping, filtering = report.mapping.value, report.filtering.value
    lines.append(f"mapping (RFC 5780): {mapping}")
    lines.append(f"filtering (RFC 5780): {filtering}")
    if report.hairpin is not None:
        lines.append(f"hairpinning: {'yes' if report.hairpin else 'no'}")
    if report.classic is not None:
        classic = report.classic
        if report.behind_nat is False and classic == _NO_NAT_FIREWALL:
            classic += (
                " (pystun3's name for: no NAT, but no reply from the server's other address "
                "arrived; a filtering firewall, or a server without a second address)"
            )
        lines.append(f"classic type (RFC 3489, pystun3): {classic}")
    elif report.classic_rfc5780 is not None:
        lines.append(f"classic type implied by the tests: {report.classic_rfc5780}")
    for answer in report.servers:
        server = _addr(answer.server)
        if answer.ok:
            rtt = f" in {answer.rtt_s * 1000:.1f} ms" if answer.rtt_s is not None else ""
            lines.append(f"server {server}: answered{rtt}")
        else:
            lines.append(f"server {server}: no answer ({answer.error or 'timeout'})")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def describe_ipv6(block: dict[str, Any]) -> str:
    """Readable lines for ``probe --json``'s ``ipv6`` (:func:`p2plab.aio.dualstack.probe_ipv6`)."""
    if not block.get("tested"):
        return f"IPv6: not tested ({block.get('error') or 'no IPv6 STUN server'})"
    if not block.get("reachable"):
        return f"IPv6: unreachable - no STUN server answered over IPv6 ({block.get('error')})"
    lines = [f"IPv6: reachable, address {block.get('mapped')} (local {block.get('local')})"]
    if block.get("nat66") is False:
        lines.append("IPv6 NAT: none - the server sees this host's own address (NAT66: no)")
    elif block.get("nat66"):
        lines.append("IPv6 NAT: yes (NAT66) - the server sees another address than this host's")
    lines.append(f"IPv6 mapping (RFC 5780): {block.get('mapping')}")
    filtering = block.get("filtering")
    lines.append(
        f"IPv6 filtering (RFC 5780): {filtering}"
        + (" (needs a STUN server with an alternate address)" if filtering == "unknown" else "")
    )
    lines += [f"  note: {n}" for n in block.get("notes") or []]
    return "\n".join(lines)
