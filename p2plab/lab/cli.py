"""``p2plab lab ...``: build, inspect, classify and clean the kernel NAT lab.

The main CLI calls :func:`register_cli` with its subparsers; each subcommand sets ``func`` (a plain
function ``func(args) -> int``).  ``python -m p2plab.lab.cli`` runs the same commands standalone.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from p2plab import cli_common as cc
from p2plab.errors import ConfigError, P2PLabError
from p2plab.lab.matrix_report import parse_pairs
from p2plab.lab.profiles import EXPECTED_CLASSIC, PROFILES
from p2plab.lab.site import parse_site

if TYPE_CHECKING:  # netns is imported where a lab is built (the parser must not need root tools)
    from p2plab.lab.netns import Lab

__all__ = ["main", "register_cli"]


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


_PROFILES_HELP = f"comma-separated NAT profiles (default: all: {','.join(PROFILES)})"


def _profiles_arg(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in PROFILES:
            raise argparse.ArgumentTypeError(
                f"unknown profile {name!r}; choose from {', '.join(PROFILES)}"
            )
    return names


_SITES_HELP = (
    "comma-separated site specs: a NAT profile, optionally with a port-mapping router "
    "(symmetric+pmp, +upnp, +all: miniupnpd), an IPv6 firewall (v6-open, v6-apdf, v6-eif) or "
    f"both (symmetric/v6-apdf) (default: the NAT profiles: {','.join(PROFILES)})"
)


def _site_arg(value: str) -> str:
    try:
        return parse_site(value).spec
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sites_arg(value: str) -> list[str]:
    return [_site_arg(v) for v in value.split(",") if v.strip()]


def _pairs_arg(value: str) -> list[tuple[str, str]]:
    try:
        return parse_pairs(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_impairments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("impairments (on each NAT's WAN, both directions, UDP)")
    g.add_argument(
        "--loss-a", type=cc.fraction, default=0.0, metavar="P", help="loss fraction, site A"
    )
    g.add_argument(
        "--loss-b", type=cc.fraction, default=0.0, metavar="P", help="loss fraction, site B"
    )
    g.add_argument(
        "--rate-a-mbit",
        type=cc.positive_float,
        default=None,
        metavar="R",
        help="tbf rate, site A (default: no limit)",
    )
    g.add_argument(
        "--rate-b-mbit",
        type=cc.positive_float,
        default=None,
        metavar="R",
        help="tbf rate, site B (default: no limit)",
    )


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``lab`` command (and its subcommands) to ``subparsers``."""
    lab: argparse.ArgumentParser = subparsers.add_parser(
        "lab",
        help="kernel NAT lab in network namespaces (root)",
        description="Real Linux NATs in network namespaces (root, iproute2, iptables, coturn).",
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="{up,clean,classify,matrix}")
    sub.required = True

    up = sub.add_parser("up", help="build a lab and keep it until Ctrl-C")
    up.add_argument(
        "--a",
        dest="profile_a",
        default="port-restricted",
        type=_site_arg,
        metavar="SPEC",
        help="site A: a NAT profile (+pmp, +upnp, +all: with miniupnpd), an IPv6 firewall or "
        "both (symmetric+pmp/v6-apdf)",
    )
    up.add_argument(
        "--b",
        dest="profile_b",
        default="port-restricted",
        type=_site_arg,
        metavar="SPEC",
        help="site B (as --a)",
    )
    up.add_argument("--same-lan", action="store_true", help="hosts a and b behind site A's NAT")
    up.add_argument("--no-stun", action="store_true", help="do not start coturn")
    up.add_argument(
        "--block-udp",
        action="store_true",
        help="drop UDP between the two sites from the start (only relays work); SIGUSR1 "
        "toggles the block while the lab is up",
    )
    up.add_argument("--json", action="store_true", help="print the lab description as JSON")
    _add_impairments(up)
    up.set_defaults(func=cmd_up)

    clean = sub.add_parser("clean", help="remove namespaces left by earlier runs")
    clean.add_argument(
        "--force", action="store_true", help="also remove labs whose creating process still runs"
    )
    clean.set_defaults(func=cmd_clean)

    classify = sub.add_parser("classify", help="classify every profile (pystun3 against coturn)")
    classify.add_argument(
        "--profiles", type=_profiles_arg, default=list(PROFILES), help=_PROFILES_HELP
    )
    classify.add_argument("--json", action="store_true", help="print the results as JSON")
    classify.set_defaults(func=cmd_classify)

    matrix = sub.add_parser("matrix", help="punch between every pair of profiles; CSV + heatmap")
    matrix.add_argument("--profiles", type=_sites_arg, default=list(PROFILES), help=_SITES_HELP)
    matrix.add_argument(
        "--pairs",
        type=_pairs_arg,
        default=None,
        metavar="A:B,...",
        help="run only these ordered pairs (site A's spec:site B's spec), no "
        "same-LAN row; overrides --profiles (default: every pair of --profiles)",
    )
    matrix.add_argument(
        "--repeat",
        type=cc.positive_int,
        default=1,
        metavar="N",
        help="run each pair N times: one CSV row per run, and summary.csv with the success "
        "rate, median and max time to connect and the methods per pair",
    )
    matrix.add_argument(
        "--out", default="lab-matrix", help="output directory (CSV, summary CSV and PNG)"
    )
    matrix.add_argument(
        "--timeout",
        type=cc.positive_float,
        default=45.0,
        help="seconds to wait per pair once both workers run (a birthday attempt takes up to "
        "the punch timeout + 20.5 s)",
    )
    matrix.add_argument(
        "--jobs", type=cc.positive_int, default=3, help="labs built at the same time"
    )
    matrix.add_argument("--no-same-lan", action="store_true", help="skip the same-LAN row")
    matrix.add_argument(
        "--turn",
        action="store_true",
        help="hand the workers the lab's coturn (TURN over UDP and TCP): pairs that cannot "
        "punch fall back to turn-udp instead of the rendezvous relay (default: off, the "
        "table of natlab.md with the WebSocket relay as fallback)",
    )
    _add_impairments(matrix)
    matrix.set_defaults(func=cmd_matrix)
    return lab


def _guard(fn: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            result: int = fn(args)
        except P2PLabError as exc:
            sys.stderr.write(f"p2plab lab: {exc}\n")
            return 2
        return result

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_guard
def cmd_up(args: argparse.Namespace) -> int:
    """Build a lab and keep it until interrupted."""
    from p2plab.lab.netns import Lab

    with Lab.create(
        args.profile_a,
        args.profile_b,
        same_lan=args.same_lan,
        loss_a=args.loss_a,
        loss_b=args.loss_b,
        rate_a_mbit=args.rate_a_mbit,
        rate_b_mbit=args.rate_b_mbit,
        stun=not args.no_stun,
    ) as lab:
        desc = lab.describe()
        if args.json:
            _out(json.dumps(desc))
        else:
            _out(f"lab {lab.prefix} is up (profiles: a={desc['profile_a']} b={desc['profile_b']})")
            for name, host in desc["hosts"].items():
                addr = host["address"]
                if "address6" in host:  # a lab with IPv6: both columns ("-" for none)
                    four = "-" if ":" in addr else addr
                    addr = f"{four:<15} {host['address6'] or '-':<22}"
                _out(f"  {name:<11} {addr:<15} ip netns exec {host['ns']} bash")
            if desc["stun"]:
                _out(f"  STUN (coturn): {lab.stun_server}, alternate {lab.stun_addresses[1]}:3479")
                if lab.v6 is not None:
                    six = lab.v6.stun_addresses
                    _out(f"  STUN over IPv6: [{six[0]}]:3478, alternate [{six[1]}]:3479")
                _out(f"  TURN (coturn): p2plab rendezvous --turn {','.join(lab.turn_urls)} "
                     f"--turn-secret {lab.turn_secret}")  # fmt: skip
            _out("Ctrl-C removes the lab.")
        stop = threading.Event()
        toggle = threading.Event()
        try:
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            if not args.same_lan:
                signal.signal(signal.SIGUSR1, lambda *_: toggle.set())
        except ValueError:  # not the main thread
            pass
        if args.block_udp and not args.same_lan:
            toggle.set()
        try:
            while not stop.wait(0.5):
                if toggle.is_set():
                    toggle.clear()
                    _toggle_udp_block(lab)
        except KeyboardInterrupt:
            pass
    return 0


def _toggle_udp_block(lab: Lab) -> None:
    """Block UDP between the sites when it flows, lift the block when it is there."""
    if lab.udp_blocked:
        lab.unblock_udp_between_sites()
        _out("UDP between the sites: unblocked")
    else:
        lab.block_udp_between_sites()
        _out("UDP between the sites: blocked")


@_guard
def cmd_clean(args: argparse.Namespace) -> int:
    """Remove leftovers of earlier runs."""
    from p2plab.lab.netns import clean_leftovers

    removed = clean_leftovers(force=args.force)
    _out(f"removed {len(removed)} namespace(s)" + (": " + " ".join(removed) if removed else ""))
    return 0


@_guard
def cmd_classify(args: argparse.Namespace) -> int:
    """Classify every profile and print a table."""
    from p2plab.lab.netns import classify_profiles

    results = classify_profiles(args.profiles)
    if args.json:
        _out(json.dumps(results))
        return 0
    _out(f"{'profile':<16} {'pystun3 (RFC 3489)':<20} {'expected':<20} ok")
    bad = 0
    for profile, res in results.items():
        ok = res["classic"] == EXPECTED_CLASSIC[profile]
        bad += not ok
        mark = "yes" if ok else "NO"
        _out(f"{profile:<16} {res['classic']:<20} {EXPECTED_CLASSIC[profile]:<20} {mark}")
    return 1 if bad else 0


@_guard
def cmd_matrix(args: argparse.Namespace) -> int:
    """Punch between every pair of profiles; write CSV and heatmap."""
    from p2plab.lab.matrix import run_from_args

    return run_from_args(args)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m p2plab.lab.cli lab ...`` (or without ``lab``)."""
    parser = cc.CliParser(prog="p2plab")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    register_cli(sub)
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] != "lab":
        args_list.insert(0, "lab")
    args = parser.parse_args(args_list)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
