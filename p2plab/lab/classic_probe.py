"""RFC 3489 classic NAT type with pystun3, as a small program to run inside a lab namespace.

``python -m p2plab.lab.classic_probe --source-ip 198.18.1.2 --stun-host 203.0.113.10`` prints
one JSON object: ``{"classic": "Restric Port NAT", "external_ip": ..., "external_port": ...}``.

pystun3 needs the host's real source address to tell "Open Internet" from "Full Cone"
(natlab.md), and its ``get_ip_info`` waits 2 s per unanswered try; in the lab a shorter timeout
is plenty, so this binds its own socket and calls ``stun.get_nat_type`` directly.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

__all__ = ["classic_nat_type", "main"]


def classic_nat_type(
    source_ip: str, stun_host: str, stun_port: int = 3478, *, timeout: float = 0.5
) -> dict[str, object]:
    """Run pystun3's RFC 3489 test from ``source_ip`` (an ephemeral port) and return the result."""
    import stun  # type: ignore[import-untyped]  # pystun3; imported here so the lab package imports without it

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source_ip, 0))
        port = sock.getsockname()[1]
        nat_type, info = stun.get_nat_type(
            sock, source_ip, port, stun_host=stun_host, stun_port=stun_port
        )
    finally:
        sock.close()
    return {
        "classic": nat_type,
        "external_ip": info.get("ExternalIP"),
        "external_port": info.get("ExternalPort"),
        "source": f"{source_ip}:{port}",
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m p2plab.lab.classic_probe")
    parser.add_argument("--source-ip", required=True)
    parser.add_argument("--stun-host", required=True)
    parser.add_argument("--stun-port", type=int, default=3478)
    parser.add_argument("--timeout", type=float, default=0.5)
    args = parser.parse_args(argv)
    result = classic_nat_type(args.source_ip, args.stun_host, args.stun_port, timeout=args.timeout)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
