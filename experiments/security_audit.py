"""Measure issue 14's findings against the code in this checkout, on loopback only.

    python experiments/security_audit.py [--json] [--short] [--only 1,3,5,7,8,9,10,12,13]

One line per finding with the number measured, for docs/security.md's before/after table: run it
on the old code and on the new one and compare.  Every probe catches its own errors (the APIs
change under it) and prints ``n/a (<reason>)`` instead of a number.  Everything talks to
127.0.0.1/127.0.0.2 only; the probes start the servers and the worker process they talk to and
end them (the worker process by its own id).

Probes:

* 9: the STUN server (``StunServer`` with its defaults): bytes out / bytes in for a bare 20-byte
  request and the other flavours, worst over a one-address and a four-address server; the share
  of requests from one source answered at ``--rate`` per second for one second (one source
  stands in for a spoofed victim address); whether source ports 7, 19, 53, 123 (and 1900,
  11211) are answered; whether SOFTWARE is sent.
* 1: ``GET /debug/list_workers`` with no token on a rendezvous started with its defaults.
* 5: takeover: a second connection registers under the victim's id with the victim's public key
  (it does not have the private key): is the victim closed?
* 13: a low-order public key (32 zero bytes) at registration: accepted?
* 7: the worker UI's ``/status`` with a foreign Host (DNS rebinding) and no token.
* 8: limits per IP: how many of N connections from one IP register (rooms of their own), and
  how many wrong tokens one IP gets answered "invalid token" per second.
* 12: ``/health`` of a rendezvous sharing state through Redis, once that redis-server is
  killed (200 means it says healthy while registration fails).
* 10: a worker process gets a 16,000-deep JSON array from a fake rendezvous that then closes
  the connection: does it register again (``audit_candidates.py``)?
* 3: a worker process gets an offer naming ``*.invalid`` host names as candidates; the worst
  ``/health`` latency afterwards and the DNS queries made (``audit_candidates.py``: it runs in
  a private network namespace with a silent resolver on 127.0.0.1; root, else ``n/a``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from audit_candidates import inner_candidates, probe_candidates, probe_deep_json
from audit_common import (
    CHALLENGE_WAIT,
    WAIT,
    Result,
    failed,
    not_available,
    recv_json,
    result,
    settle,
)

# --- 9: the STUN server -------------------------------------------------------------------------


class _Udp:
    """A non-blocking UDP socket on loopback that counts what comes back."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self.received: list[bytes] = []
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                self.received.append(self.sock.recv(4096))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def _stun_requests() -> dict[str, bytes]:
    from p2plab.core.stun import make_binding_request

    bare = bytes(make_binding_request(os.urandom, fingerprint=False))
    with_fp = bytes(make_binding_request(os.urandom))
    legacy = b"\x00\x01\x00\x00" + os.urandom(16)  # RFC 3489: no magic cookie
    return {"bare 20 B": bare, "with FINGERPRINT": with_fp, "RFC 3489": legacy}


async def probe_stun(short: bool, rate: int) -> list[Result]:
    from p2plab.server.stun_server import StunServer

    out: list[Result] = []
    try:
        worst, worst_what, software = 0.0, "", False
        for alt in (False, True):
            kw: dict[str, Any] = {"alt_host": "127.0.0.2", "alt_port": 0} if alt else {}
            server = await StunServer.start("127.0.0.1", 0, **kw)
            try:
                for i, (name, data) in enumerate(_stun_requests().items()):
                    client = _Udp(f"127.0.0.{10 + i + (10 if alt else 0)}")
                    try:
                        client.sock.sendto(data, server.primary_address)
                        await settle(lambda c=client: bool(c.received))  # type: ignore[misc]
                        if client.received:
                            reply = client.received[0]
                            software = software or b"\x80\x22" in reply[20:]
                            factor = len(reply) / len(data)
                            if factor > worst:
                                where = "4-address" if alt else "1-address"
                                worst, worst_what = factor, f"{name} to a {where} server"
                    finally:
                        client.close()
            finally:
                server.close()
        out.append(result(9, "stun_amplification", round(worst, 2), f"{worst:.2f}x ({worst_what})"))
        out.append(result(9, "stun_software", software, "sent" if software else "not sent"))
    except Exception as exc:
        out.append(failed(9, "stun_amplification", exc))

    try:
        server = await StunServer.start("127.0.0.1", 0)
        client = _Udp("127.0.0.3")
        try:
            total = rate if not short else rate // 10
            request = _stun_requests()["bare 20 B"]
            batch = max(1, rate // 100)  # paced in 10 ms steps
            sent, start = 0, time.monotonic()
            while sent < total:
                for _ in range(min(batch, total - sent)):
                    client.sock.sendto(request, server.primary_address)
                    sent += 1
                await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
            await settle(lambda: server.stats.get("datagrams_in", total) >= total, 2.0)
            await asyncio.sleep(0.1)
            share = len(client.received) / total
            out.append(
                result(
                    9,
                    "stun_flood_answered",
                    round(share, 4),
                    f"{100 * share:.1f}% of {total} requests from one source at {rate}/s "
                    f"answered ({len(client.received)})",
                )
            )
        finally:
            client.close()
            server.close()
    except Exception as exc:
        out.append(failed(9, "stun_flood_answered", exc))

    try:
        server = await StunServer.start("127.0.0.1", 0)
        clients: dict[int, _Udp] = {}
        try:
            for port in (7, 19, 53, 123, 1900, 11211):
                with contextlib.suppress(OSError):  # not root, or the port is in use here
                    clients[port] = _Udp("127.0.0.4", port)
            request = _stun_requests()["with FINGERPRINT"]
            for client in clients.values():
                client.sock.sendto(request, server.primary_address)
            # an ordinary client asked last: once it has its answer, the others had theirs
            control = _Udp("127.0.0.5")
            clients[0] = control
            control.sock.sendto(request, server.primary_address)
            await settle(lambda: bool(control.received), 1.0)
            await asyncio.sleep(0.05)
        finally:
            for client in clients.values():
                client.close()
            server.close()
        tried = [p for p in clients if p]
        answered = [p for p in tried if clients[p].received]
        if not tried:
            out.append(not_available(9, "stun_reflection_ports", "no such port free"))
        else:
            text = f"{len(answered)}/{len(tried)} answered (from ports {tried}: {answered})"
            out.append(result(9, "stun_reflection_ports", len(answered), text))
    except Exception as exc:
        out.append(failed(9, "stun_reflection_ports", exc))
    return out


# --- 1, 5, 13: the rendezvous -------------------------------------------------------------------


async def register_worker(
    ws: Any,
    worker_id: str,
    public_key: str | None,
    identity: Any | None,
    *,
    room: str = "default",
    token: str | None = None,
) -> dict[str, Any] | None:
    """Register as a worker would, answering a ``challenge`` if the rendezvous sends one
    (with a real proof when ``identity`` holds the private key, else with a made-up one).
    Returns the rendezvous's answer to the register (None when the connection closed).
    Without a public key no proof is needed: the register goes out at once."""
    reg: dict[str, Any] = {"type": "register", "room": room}
    if token is not None:
        reg["token"] = token
    first = None
    if public_key is not None:
        reg["public_key"] = public_key
        first = await recv_json(ws, CHALLENGE_WAIT)
    if first is not None and first.get("type") == "challenge":
        proof = os.urandom(32)
        if identity is not None:
            from p2plab.core.crypto import registration_proof

            proof = registration_proof(
                identity,
                base64.b64decode(first["server_key"]),
                base64.b64decode(first["nonce"]),
                worker_id,
            )
        reg["proof"] = base64.b64encode(proof).decode()
    try:
        await ws.send(json.dumps(reg))
        while True:
            answer = await recv_json(ws, WAIT)
            if answer is None or answer.get("type") != "challenge":
                return answer
    except Exception:
        return None


async def _closed(ws: Any, wait: float) -> tuple[bool, Any]:
    """Whether ``ws`` gets closed within ``wait`` s (reading and dropping messages meanwhile)."""
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
    except TimeoutError:
        return False, None
    except Exception:
        return True, getattr(ws, "close_code", None)
    return False, None


async def probe_rendezvous(only: set[int], short: bool) -> list[Result]:
    import httpx
    from websockets.asyncio.client import connect

    from p2plab.core.crypto import Identity
    from rendezvous_service_code.main import RendezvousServer

    out: list[Result] = []
    rv = await RendezvousServer.start("127.0.0.1", 0)
    ws_base = f"ws://127.0.0.1:{rv.http_port}/ws/register"
    try:
        victim_id = "victim-" + os.urandom(4).hex()
        identity = Identity.generate(os.urandom)
        victim = await connect(f"{ws_base}/{victim_id}", open_timeout=WAIT)
        try:
            answer = await register_worker(victim, victim_id, identity.public_b64, identity)
            if answer is None or answer.get("type") != "registered":
                raise RuntimeError(f"the victim could not register: {answer}")
            if 1 in only:
                try:
                    async with httpx.AsyncClient(timeout=WAIT) as http:
                        resp = await http.get(f"http://127.0.0.1:{rv.http_port}/debug/list_workers")
                    leaked = identity.public_b64 in resp.text
                    text = f"HTTP {resp.status_code} without a token" + (
                        ", victim's key and address in the answer" if leaked else ""
                    )
                    out.append(result(1, "debug_list_workers", resp.status_code, text))
                except Exception as exc:
                    out.append(failed(1, "debug_list_workers", exc))
            if 5 in only:
                try:
                    thief = await connect(f"{ws_base}/{victim_id}", open_timeout=WAIT)
                    try:
                        got = await register_worker(thief, victim_id, identity.public_b64, None)
                        closed, code = await _closed(victim, 1.0 if short else 2.0)
                        thief_got = "closed" if got is None else got.get("type")
                        text = (
                            f"victim closed ({code})" if closed else "victim kept its connection"
                        ) + f"; the impostor got: {thief_got}"
                        out.append(result(5, "takeover_victim_closed", closed, text))
                    finally:
                        await thief.close()
                except Exception as exc:
                    out.append(failed(5, "takeover_victim_closed", exc))
        finally:
            await victim.close()
        if 13 in only:
            try:
                zero = base64.b64encode(bytes(32)).decode()
                wid = "lowkey-" + os.urandom(4).hex()
                ws = await connect(f"{ws_base}/{wid}", open_timeout=WAIT)
                try:
                    got = await register_worker(ws, wid, zero, None)
                    accepted = got is not None and got.get("type") == "registered"
                    what = "accepted" if accepted else f"refused ({got and got.get('type')})"
                    out.append(
                        result(13, "low_order_key_registered", accepted, f"32 zero bytes {what}")
                    )
                finally:
                    await ws.close()
            except Exception as exc:
                out.append(failed(13, "low_order_key_registered", exc))
    finally:
        await rv.close()
    return out


async def probe_limits(short: bool) -> list[Result]:
    from websockets.asyncio.client import connect

    from rendezvous_service_code.main import RendezvousServer

    token = "audit-" + os.urandom(8).hex()
    out: list[Result] = []
    rv = await RendezvousServer.start("127.0.0.1", 0, token=token)
    base = f"ws://127.0.0.1:{rv.http_port}/ws/register"
    opened: list[Any] = []
    try:
        total = 100 if short else 300

        async def one(i: int) -> bool:
            wid = f"many-{i}-" + os.urandom(3).hex()
            ws = await connect(f"{base}/{wid}", open_timeout=WAIT)
            opened.append(ws)
            got = await register_worker(ws, wid, None, None, room=f"audit-{i}", token=token)
            return got is not None and got.get("type") == "registered"

        try:
            done = await asyncio.gather(*(one(i) for i in range(total)), return_exceptions=True)
            ok = sum(d is True for d in done)
            text = f"{ok} of {total} connections from one IP registered"
            out.append(result(8, "registrations_one_ip", ok, text))
        except Exception as exc:
            out.append(failed(8, "registrations_one_ip", exc))
        finally:
            await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
        try:
            window = 0.5 if short else 1.0
            reasons: Counter[str] = Counter()
            end = time.monotonic() + window

            async def guesser() -> None:
                while time.monotonic() < end:
                    wid = "guess-" + os.urandom(4).hex()
                    try:
                        async with connect(f"{base}/{wid}", open_timeout=WAIT) as ws:
                            await register_worker(ws, wid, None, None, token=os.urandom(6).hex())
                            reasons[str(getattr(ws, "close_reason", "") or "open")] += 1
                    except Exception as exc:  # refused at the handshake, say
                        reasons[type(exc).__name__] += 1

            # eight at a time, as an attacker with a few sockets would
            await asyncio.gather(*(guesser() for _ in range(8)))
            # a guess was checked when the close says the token was wrong, not "slow down"
            throttled = ("many", "rate", "throttl", "slow", "later", "limit", "wait")
            answered = sum(
                n
                for why, n in reasons.items()
                if "token" in why.lower() and not any(w in why.lower() for w in throttled)
            )
            rate = answered / window
            common = ", ".join(f"{n} {why!r}" for why, n in reasons.most_common(3))
            text = f"{rate:.0f} wrong tokens/s checked ({common})"
            out.append(result(8, "token_guesses_per_s", round(rate), text))
        except Exception as exc:
            out.append(failed(8, "token_guesses_per_s", exc))
    finally:
        await rv.close()
    return out


async def _start_redis() -> tuple[asyncio.subprocess.Process, str]:
    """A redis-server of this machine on a free loopback port (ended by its id by the caller)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no redis-server here")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = await asyncio.create_subprocess_exec(
        *(exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            pong = await asyncio.wait_for(reader.read(16), 1.0)
            writer.close()
            if pong.startswith(b"+PONG"):
                return proc, f"redis://127.0.0.1:{port}/0"
        await asyncio.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


async def probe_redis_outage() -> list[Result]:
    import httpx

    from rendezvous_service_code.main import RendezvousServer

    redis, url = await _start_redis()
    rv: Any = None
    try:
        rv = await RendezvousServer.start("127.0.0.1", 0, redis_url=url)
        health = f"http://127.0.0.1:{rv.http_port}/health"
        async with httpx.AsyncClient(timeout=WAIT) as http:
            up = (await http.get(health)).status_code
            redis.kill()  # the redis-server started above, by its own id
            await redis.wait()
            down = (await http.get(health)).status_code
        text = f"HTTP {down} while Redis is down (HTTP {up} while it was up)"
        return [result(12, "health_during_redis_outage", down, text)]
    finally:
        if redis.returncode is None:
            redis.kill()
            await redis.wait()
        if rv is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(rv.close(), WAIT)


# --- 7: the worker UI ---------------------------------------------------------------------------


async def probe_ui() -> list[Result]:
    import httpx

    from p2plab.aio.worker import Worker, WorkerConfig
    from rendezvous_service_code.main import RendezvousServer

    rv = await RendezvousServer.start("127.0.0.1", 0)
    worker: Any = None
    try:
        config = WorkerConfig(
            rendezvous_url=f"ws://127.0.0.1:{rv.http_port}",
            udp_host="127.0.0.1",
            http_port=0,
            nat_report=False,
        )
        worker = await Worker(config).start()
        port = worker.http_address[1]
        async with httpx.AsyncClient(timeout=WAIT) as http:
            foreign = await http.get(
                f"http://127.0.0.1:{port}/status", headers={"Host": f"evil.example:{port}"}
            )
            plain = await http.get(f"http://127.0.0.1:{port}/status")
        text = (
            f"HTTP {foreign.status_code} for Host evil.example and no token "
            f"(HTTP {plain.status_code} for Host 127.0.0.1 and no token)"
        )
        return [result(7, "ui_status_foreign_host", foreign.status_code, text)]
    finally:
        if worker is not None:
            await worker.stop()
        await rv.close()


# --- the run ------------------------------------------------------------------------------------


async def _guarded(
    name: str, finding: int, make: Callable[[], Awaitable[list[Result]]], limit: float
) -> list[Result]:
    try:
        return await asyncio.wait_for(make(), limit)
    except Exception as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        return [not_available(finding, name, reason)]


async def _candidates(window: float) -> list[Result]:
    try:
        return await asyncio.to_thread(probe_candidates, window)
    except Exception as exc:
        return [failed(3, "candidate_names_stall_s", exc)]


async def run(only: set[int], short: bool, rate: int) -> list[Result]:
    results: list[Result] = []
    # Finding 3 runs in its own namespace and process: alongside the others, to save time.
    candidates = asyncio.ensure_future(_candidates(2.0 if short else 8.0)) if 3 in only else None
    if 9 in only:
        results += await _guarded("stun", 9, lambda: probe_stun(short, rate), 30.0)
    # These start their own servers on OS-chosen ports: side by side.
    side_by_side = []
    if only & {1, 5, 13}:
        side_by_side.append(_guarded("rendezvous", 1, lambda: probe_rendezvous(only, short), 30))
    if 10 in only:
        side_by_side.append(_guarded("deep_json", 10, lambda: probe_deep_json(short), 40.0))
    if 12 in only:
        side_by_side.append(_guarded("health_during_redis_outage", 12, probe_redis_outage, 30))
    if 7 in only:
        side_by_side.append(_guarded("ui_status_foreign_host", 7, probe_ui, 30.0))
    for found in await asyncio.gather(*side_by_side):
        results += found
    if 8 in only:  # alone: its guesses per second count what one client gets through
        results += await _guarded("limits", 8, lambda: probe_limits(short), 40.0)
    if candidates is not None:
        results += await candidates
    return sorted(results, key=lambda r: r["finding"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--short", action="store_true", help="fewer requests, shorter windows")
    parser.add_argument(
        "--only",
        default="1,3,5,7,8,9,10,12,13",
        help="findings to measure (default: all, 1,3,5,7,8,9,10,12,13)",
    )
    parser.add_argument("--rate", type=int, default=5000, help="STUN flood rate per second")
    parser.add_argument("--inner-candidates", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.CRITICAL)  # the probes provoke errors on purpose
    if args.inner_candidates is not None:
        try:
            line = asyncio.run(inner_candidates(args.inner_candidates))
        except Exception as exc:
            line = failed(3, "candidate_names_stall_s", exc)
        print(json.dumps(line), flush=True)
        return 0
    try:
        only = {int(x) for x in args.only.split(",") if x.strip()}
    except ValueError:
        parser.error(f"--only takes finding numbers like 1,3,9, got {args.only!r}")
    if args.rate < 100:
        parser.error("--rate must be at least 100")
    started = time.monotonic()
    results = asyncio.run(run(only, args.short, args.rate))
    if args.json:
        print(json.dumps({"results": results, "seconds": round(time.monotonic() - started, 1)}))
    else:
        for r in results:
            print(f"finding {r['finding']:>2}  {r['key']:<28} {r['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
