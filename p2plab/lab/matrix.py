"""The punching matrix: real rendezvous and worker processes between every pair of NAT profiles.

For each pair the lab is built, ``p2plab rendezvous`` starts on the rendezvous host and
``p2plab worker --events`` on hosts ``a`` and ``b``; the workers' JSON event lines (the same
``status`` objects ``GET /status`` serves) are read until both say ``connected`` (or both fell
back to ``relayed``) or the timeout passes.  Results go to ``matrix.csv`` and ``matrix.png`` (a
heatmap) in the output directory, next to one log file per process.

``outcome`` is about direct hole punching only (``direct``/``failed``, natlab.md's table);
``fallback`` records the relay through the rendezvous: ``relayed`` when a failed pair ended
relayed and a chat message from a reached b exactly once and was acknowledged.  ``method`` is
what the workers' status says made the link (``direct``, ``birthday``, ``predicted``, ``relay``).

``--repeat N`` runs each pair N times (one row per run) and ``--pairs A:B,...`` runs only those
ordered pairs; :mod:`p2plab.lab.matrix_report` folds the runs into ``summary.csv`` and draws
the tables and the heatmap.

``fallback`` records the relay that carried a failed pair: ``relayed`` (the rendezvous
WebSocket) or, in runs with TURN (``turn=True``, ``p2plab lab matrix --turn``), ``turn-udp`` /
``turn-tcp`` (the lab's coturn), when a chat message from a reached b exactly once and was
acknowledged there.  ``path`` is the workers' own status ``path`` at the end (``direct``,
``turn-udp``, ``turn-tcp``, ``relay``).

TURN is off by default: the matrix is natlab.md's hole-punching table and its recorded runs and
tests pin the rendezvous relay as the fallback; with TURN the fallback column changes meaning,
so it is a separate, opt-in run.

Sites are site specs (:mod:`p2plab.lab.site`, issue 19): with IPv6 in the lab the rendezvous
listens on both families (``--host ::``), each worker gets the rendezvous and STUN addresses of the
families its host has, and ``family`` records the family of the direct link (``expected_family``:
IPv6 wherever both sites have it, :func:`p2plab.lab.ipv6.expected_site_outcome`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from p2plab.aio.ui_auth import new_ui_token
from p2plab.errors import LabError
from p2plab.lab.ipv6 import bracket, expected_site_outcome
from p2plab.lab.matrix_report import (
    format_summary,
    pair_family,
    plot_heatmap,
    print_table,
    summarize,
    write_summary_csv,
)
from p2plab.lab.netns import Lab, LabConfig, classify_profiles
from p2plab.lab.profiles import PROFILES
from p2plab.lab.site import parse_site

__all__ = [
    "PairResult",
    "PairRun",
    "hint_text",
    "link_counter",
    "pair_method",
    "plot_heatmap",
    "print_table",
    "run_from_args",
    "run_matrix",
    "run_pair",
    "wait_listening",
    "write_csv",
]

log = logging.getLogger(__name__)

RENDEZVOUS_PORT = 8000
WORKER_HTTP_PORT = 8080


@dataclass(frozen=True)
class PairResult:
    """What happened between the workers on hosts ``a`` and ``b`` of one lab."""

    profile_a: str
    """NAT profile in front of host a."""
    profile_b: str
    """NAT profile in front of host b (equal to ``profile_a`` for the same-LAN case)."""
    same_lan: bool
    """Both hosts behind one NAT."""
    outcome: str
    """``direct`` when both workers reached ``connected``; ``failed`` otherwise; ``error`` when
    the lab or a process broke."""
    expected: str
    """What natlab.md's table predicts (``direct``, ``failed`` or ``unknown``)."""
    connect_s: float | None
    """Seconds from starting the workers until both were connected."""
    punch_s: float | None
    """Seconds from the first ``punching`` state seen until both were connected."""
    a_public: str | None
    """Host a's public UDP endpoint as its worker first learnt it (``udp_public``; the one its
    peer was offered)."""
    b_public: str | None
    """Host b's public UDP endpoint."""
    a_peer_endpoint: str | None
    """The address host a's worker talks to its peer at."""
    b_peer_endpoint: str | None
    """The address host b's worker talks to its peer at."""
    a_nat: str
    """Host a's worker's own classification (``mapping/filtering``) from ``status["nat"]``."""
    b_nat: str
    """Host b's worker's own classification."""
    a_classic: str
    """pystun3's RFC 3489 type for host a's profile (classification step)."""
    b_classic: str
    """pystun3's RFC 3489 type for host b's profile."""
    a_state: str
    """Host a's last worker state."""
    b_state: str
    """Host b's last worker state."""
    fallback: str = ""
    """``relayed`` when direct punching failed but the pair ended relayed through the rendezvous
    and chat worked over the relay (a message from a reached b exactly once, acknowledged);
    empty otherwise."""
    error: str = ""
    """What went wrong, for outcome ``error``."""
    method: str = ""
    """How the link was made, from the workers' status ``method`` (``direct``, ``birthday``,
    ``predicted``, ``relay``); ``A/B`` when the two workers disagree, empty when neither said."""
    probes: int | None = None
    """Birthday probes the pair sent (both workers' ``birthday_probes`` counters; one side
    probes); None when the workers do not report the counter."""
    sprays: int | None = None
    """Datagrams sent from socket pools (both workers' ``spray_datagrams``); None likewise."""
    run: int = 1
    """Which run of the pair this is (``--repeat``), from 1."""
    a_hint: str = ""
    """Host a's worker's NAT hint as its status shows it (``status["nat"]["hint"]``):
    ``easy``, ``hard`` or ``unknown``, plus ``+remaps`` (the leaky clash) and ``+sequential``."""
    b_hint: str = ""
    """Host b's worker's NAT hint."""
    chat: str = ""
    """With ``check_chat``: ``ok`` when a chat message from a reached b exactly once over the
    direct link and was acknowledged, ``failed`` otherwise; empty when not checked."""
    worker_error: str = ""
    """The workers' status ``error`` (a's, else b's), else the first ``error`` event either
    worker printed: e.g. why a hard x hard pair went to the relay."""
    path: str = ""
    """The workers' status ``path`` at the end (``direct``, ``turn-udp``, ``turn-tcp``,
    ``relay``), ``a_path/b_path`` when they disagree; empty when neither had one."""
    first_path: str = ""
    """The first path host a's worker reported (``turn-udp`` then ``path`` ``direct``: the pair
    connected over TURN and upgraded to direct)."""
    family: str = ""
    """The address family of the link (``ipv4``, ``ipv6``): the workers' status ``family``, else
    read off their peer endpoints; ``a/b`` when they disagree, empty without a direct link."""
    expected_family: str = ""
    """The family a direct link should have (``ipv6`` when both sites have IPv6)."""

    @property
    def agrees(self) -> bool:
        """True when the outcome is what the table predicts (or the table does not say), and a
        direct link runs over the family expected."""
        if self.expected == "unknown":
            return True
        family_ok = (
            not self.expected_family
            or self.outcome != "direct"
            or self.family == self.expected_family
        )
        return self.outcome == self.expected and family_ok


class _EventReader(threading.Thread):
    """Reads one worker's ``--events`` JSON lines and keeps the latest status and timings."""

    def __init__(self, stream: IO[str], t0: float, changed: threading.Condition) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.t0 = t0
        self.changed = changed
        self.status: dict[str, Any] = {}
        self.first_punching: float | None = None
        self.connected_at: float | None = None
        self.relayed_at: float | None = None
        self.chats_in: list[str] = []
        self.first_public: str | None = None
        """The first public endpoint the worker reported: the one it announced for the offer
        (a later STUN refresh from an adopted pool socket may show another)."""
        self.errors: list[str] = []
        """The worker's ``error`` events (e.g. why a hard x hard pair went to the relay: the
        status ``error`` is cleared once the relayed link is up)."""
        self.paths: list[tuple[float, str | None]] = []
        """(monotonic time, path) each time the status ``path`` changed."""

    def run(self) -> None:
        for line in self.stream:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == "chat" and msg.get("direction") == "in":
                with self.changed:
                    self.chats_in.append(str(msg.get("text")))
                    self.changed.notify_all()
                continue
            if msg.get("type") == "error":
                with self.changed:
                    self.errors.append(str(msg.get("message", ""))[:300])
                continue
            if msg.get("type") != "status":
                continue
            now = time.monotonic()
            with self.changed:
                self.status = msg
                if self.first_public is None and isinstance(msg.get("udp_public"), str):
                    self.first_public = msg["udp_public"]
                state = msg.get("state")
                if state == "punching" and self.first_punching is None:
                    self.first_punching = now
                if state == "connected" and self.connected_at is None:
                    self.connected_at = now
                if state == "relayed" and self.relayed_at is None:
                    self.relayed_at = now
                path = msg.get("path")
                if not self.paths or self.paths[-1][1] != path:
                    self.paths.append((now, path if isinstance(path, str) else None))
                self.changed.notify_all()


def _nat_text(status: dict[str, Any]) -> str:
    nat = status.get("nat") or {}
    if not isinstance(nat, dict) or not nat:
        return ""
    return f"{nat.get('mapping')}/{nat.get('filtering')}"


def pair_method(sa: dict[str, Any], sb: dict[str, Any]) -> str:
    """The pair's ``method``: the workers' common one, or ``A/B`` when they disagree (which
    the engine's rule says must not happen; the table shows it rather than picking one)."""
    ma, mb = sa.get("method"), sb.get("method")
    if ma is None and mb is None:
        return ""
    if ma == mb:
        return str(ma)
    return f"{ma or '-'}/{mb or '-'}"


def link_counter(statuses: Sequence[dict[str, Any]], name: str) -> int | None:
    """The sum of one link counter over the workers that report it (None: no worker does)."""
    values = [
        st["stats"][name]
        for st in statuses
        if isinstance(st.get("stats"), dict) and isinstance(st["stats"].get(name), int)
    ]
    return sum(values) if values else None


def hint_text(status: dict[str, Any]) -> str:
    """``a_hint``/``b_hint``: the hint's difficulty and its flags, from ``status["nat"]``."""
    nat = status.get("nat")
    hint = nat.get("hint") if isinstance(nat, dict) else None
    if not isinstance(hint, dict):
        return ""
    text = str(hint.get("difficulty", ""))
    text += "+remaps" if hint.get("remaps_on_clash") else ""
    return text + ("+sequential" if hint.get("sequential") else "")


def _path_text(a: dict[str, Any], b: dict[str, Any]) -> str:
    pa, pb = a.get("path") or "", b.get("path") or ""
    return pa if pa == pb else f"{pa}/{pb}"


def _peer_endpoint(status: dict[str, Any]) -> str | None:
    peer = status.get("peer")
    return peer.get("endpoint") if isinstance(peer, dict) else None


# Sends one chat through the worker UI on 127.0.0.1:8080 of its host and waits for the peer's
# acknowledgement ("delivered" on stdout).
_CHAT_PROBE = """
import asyncio, json, sys
import websockets

async def main():
    text, limit, url = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "chat", "text": text}))
        msg_id = None
        async with asyncio.timeout(limit):
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("type") == "chat" and msg.get("direction") == "out":
                    if msg.get("text") == text:
                        msg_id = msg.get("id")
                elif msg.get("type") == "chat_delivered" and msg.get("id") == msg_id:
                    print("delivered", flush=True)
                    return

asyncio.run(main())
"""


def wait_listening(lab: Lab, host: str, addr: str, timeout: float) -> bool:
    """Wait until a TCP socket listens on ``addr`` (``ip:port``) in ``host``; False on timeout."""
    # ss shows a socket on ``::`` that takes both families (IPV6_V6ONLY off) as ``*:port``.
    wanted = {addr, "*:" + addr.removeprefix("[::]:")} if addr.startswith("[::]:") else {addr}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wanted & set(lab.run(host, ["ss", "-Hltn"]).stdout.split()):
            return True
        time.sleep(0.05)
    return False


class PairRun:
    """A rendezvous and two workers (hosts ``a`` and ``b``) running inside a lab."""

    def __init__(self, lab: Lab, *, log_dir: Path | None = None, name: str = "pair") -> None:
        self.lab = lab
        self.log_dir = log_dir
        self.name = name
        self.changed = threading.Condition()
        self.readers: dict[str, _EventReader] = {}
        self.t0 = 0.0
        self._logs: list[IO[Any]] = []
        self.ui_token = new_ui_token()
        """The workers' ``--ui-token`` (their pages and ``/ui_ws`` need it)."""

    @property
    def ui_ws_url(self) -> str:
        """A worker's ``/ui_ws`` with its token, as seen from inside its host."""
        return f"ws://127.0.0.1:{WORKER_HTTP_PORT}/ui_ws?token={self.ui_token}"

    def _logfile(self, what: str) -> IO[Any] | int:
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.log_dir / f"{self.name}.{what}.log", "wb")  # closed in close()
        self._logs.append(f)
        return f

    def start(self, *, worker_args: Sequence[str] = (), turn: bool = False) -> PairRun:
        """Start ``p2plab rendezvous`` and, once it listens, ``p2plab worker --events`` twice.

        With ``turn`` the rendezvous hands the workers the lab's coturn (UDP and TCP URLs, REST
        credentials made with the lab's secret) and the workers use it as ICE relay candidates.
        """
        lab = self.lab
        rv = lab.rendezvous_address
        rv_host = rv if lab.v6 is None else "::"  # with IPv6 in the lab: both families
        # --open: the lab network exists only between its namespaces (beyond loopback the
        # rendezvous refuses to start without a token otherwise).
        rv_argv = ["-m", "p2plab", "rendezvous", "--host", rv_host, "--port", str(RENDEZVOUS_PORT)]
        rv_argv.append("--open")
        if turn:
            if not lab.config.stun:
                raise LabError("TURN needs the lab's coturn (LabConfig.stun)")
            rv_argv += ["--turn", ",".join(lab.turn_urls), "--turn-secret", lab.turn_secret]
        lab.python(
            "rendezvous",
            rv_argv,
            stdout=self._logfile("rendezvous"),
            stderr=subprocess.STDOUT,
        )
        if not wait_listening(lab, "rendezvous", bracket(rv_host, RENDEZVOUS_PORT), 30.0):
            raise LabError("the rendezvous did not start listening within 30 s")
        self.t0 = time.monotonic()
        for host in ("a", "b"):
            argv = ["-m", "p2plab", "worker", *_server_args(lab, host)]
            argv += ["--http-host", "127.0.0.1"]
            argv += ["--http-port", str(WORKER_HTTP_PORT), f"--ui-token={self.ui_token}"]
            argv += ["--events", *worker_args]
            proc = lab.python(
                host,
                argv,
                stdout=subprocess.PIPE,
                stderr=self._logfile(f"worker-{host}"),
                text=True,
            )
            assert proc.stdout is not None
            self.readers[host] = _EventReader(proc.stdout, self.t0, self.changed)
            self.readers[host].start()
        return self

    def started(self) -> bool:
        """Both workers have reported a status (their process is up and running)."""
        return len(self.readers) == 2 and all(r.status for r in self.readers.values())

    def wait_started(self, timeout: float) -> bool:
        """Wait until both workers report; False on timeout."""
        with self.changed:
            return self.changed.wait_for(self.started, timeout=timeout)

    def connected(self) -> bool:
        """Both workers have reported ``connected`` at least once."""
        return all(r.connected_at is not None for r in self.readers.values())

    def wait_connected(self, timeout: float) -> bool:
        """Wait until both workers were connected; False on timeout."""
        with self.changed:
            return self.changed.wait_for(self.connected, timeout=timeout)

    def relayed(self) -> bool:
        """Both workers say ``relayed`` right now (punching failed, the relay carries the link)."""
        return all(r.status.get("state") == "relayed" for r in self.readers.values())

    def wait_settled(self, timeout: float) -> bool:
        """Wait until both workers were connected or both are relayed; False on timeout."""
        with self.changed:
            return self.changed.wait_for(
                lambda: self.connected() or self.relayed(), timeout=timeout
            )

    def chat_exactly_once(self, sender: str, receiver: str, timeout: float = 15.0) -> bool:
        """Send one chat from ``sender``'s worker: acknowledged, and received exactly once."""
        text = f"p2plab matrix probe {time.monotonic_ns()}"
        argv = [sys.executable, "-c", textwrap.dedent(_CHAT_PROBE), text, str(timeout)]
        argv.append(self.ui_ws_url)
        try:
            proc = self.lab.run(sender, argv, timeout=timeout + 15)
        except subprocess.TimeoutExpired:
            log.info("chat probe from %s did not finish", sender)
            return False
        if proc.returncode != 0 or "delivered" not in proc.stdout:
            log.info("chat probe from %s not delivered: %s", sender, proc.stderr.strip()[-300:])
            return False
        reader = self.readers[receiver]
        with self.changed:
            self.changed.wait_for(lambda: text in reader.chats_in, timeout=timeout)
        time.sleep(0.5)  # a duplicate would come right after
        with self.changed:
            return reader.chats_in.count(text) == 1

    def wait_classified(self, timeout: float) -> bool:
        """Wait until both workers report their own NAT classification."""
        with self.changed:
            return self.changed.wait_for(
                lambda: all(r.status.get("nat") for r in self.readers.values()), timeout=timeout
            )

    def path(self, host: str) -> str | None:
        """The status ``path`` of the worker on ``host`` right now."""
        with self.changed:
            path = self.readers[host].status.get("path")
        return path if isinstance(path, str) else None

    def wait_path(self, paths: Sequence[str], timeout: float) -> bool:
        """Wait until both workers' status ``path`` is one of ``paths``; False on timeout."""

        def both() -> bool:
            return all(r.status.get("path") in paths for r in self.readers.values())

        with self.changed:
            return self.changed.wait_for(both, timeout=timeout)

    def wait_family(self, family: str, timeout: float) -> bool:
        """Wait until both workers' status ``family`` is ``family``; False on timeout."""

        def both() -> bool:
            return all(r.status.get("family") == family for r in self.readers.values())

        with self.changed:
            return self.changed.wait_for(both, timeout=timeout)

    def status(self, host: str) -> dict[str, Any]:
        """The latest ``status`` object of the worker on ``host``."""
        with self.changed:
            return dict(self.readers[host].status)

    def close(self) -> None:
        """Close the log files (the lab stops the processes)."""
        for f in self._logs:
            f.close()


def _server_args(lab: Lab, host: str) -> list[str]:
    """``--rendezvous`` and ``--stun`` for the worker on ``host``: over IPv4 when its site has
    IPv4 (the rendezvous over IPv6 only for an IPv6-only site), STUN over each family it has."""
    v6 = lab.address6(host) if lab.v6 is not None else None
    has_v4 = parse_site(lab.profile(host)).v4 is not None
    rv = lab.rendezvous_address if has_v4 or lab.v6 is None else lab.v6.public("rendezvous")
    argv = ["--rendezvous", f"ws://{bracket(rv, RENDEZVOUS_PORT)}"]
    if has_v4:
        argv += ["--stun", lab.stun_server]
    if v6 is not None and lab.v6 is not None:
        argv += ["--stun", bracket(lab.v6.stun_addresses[0], lab.stun_port)]
    return argv


def run_pair(
    config: LabConfig,
    *,
    timeout: float = 20.0,
    classic: dict[str, str] | None = None,
    log_dir: Path | None = None,
    nat_wait: float = 10.0,
    startup_timeout: float = 60.0,
    run_index: int = 1,
    worker_args: Sequence[str] = (),
    check_chat: bool = False,
    turn: bool = False,
    upgrade_wait: float = 12.0,
) -> PairResult:
    """Build one lab, run rendezvous and two workers in it, and report what happened.

    ``timeout`` bounds the wait for the outcome once both workers run (``startup_timeout``
    bounds their start: on a loaded machine, starting Python processes is what takes long, and
    it is not what the pair is tested for).

    ``classic`` maps profile -> pystun3 type (from :func:`p2plab.lab.netns.classify_profiles`);
    ``nat_wait`` bounds the wait for both workers' own NAT classification once the outcome is
    known.  ``run_index`` numbers the run of a repeated pair (its logs carry it from run 2 on).
    ``worker_args`` are added to both workers' command lines (e.g. ``--birthday-sockets``).
    ``check_chat`` sends a chat over a direct link too (the relay's is always checked).

    ``turn`` hands the workers the lab's coturn; a pair connected over TURN is ``failed`` (no
    direct punching) with fallback ``turn-udp``/``turn-tcp`` once chat works there, unless it
    goes direct within ``upgrade_wait`` seconds (the engine re-probes direct candidates every
    5 s while on TURN).
    """
    pa = config.profile_a
    pb = config.profile_a if config.same_lan else config.profile_b
    classic = classic or {}
    expected, expected_family = expected_site_outcome(pa, pb, same_lan=config.same_lan)
    base: dict[str, Any] = {
        "profile_a": pa,
        "profile_b": pb,
        "same_lan": config.same_lan,
        "expected": expected,
        "expected_family": expected_family,
        "a_classic": classic.get(parse_site(pa).v4 or "", ""),
        "b_classic": classic.get(parse_site(pb).v4 or "", ""),
        "run": run_index,
    }
    run: PairRun | None = None
    try:
        with Lab.from_config(config) as lab:
            name = f"{pa}__{'same-lan' if config.same_lan else pb}"
            name += f".{run_index}" if run_index > 1 else ""
            name = name.replace("/", "_")  # a dual-stack spec (symmetric/v6-apdf) names a file
            run = PairRun(lab, log_dir=log_dir, name=name).start(worker_args=worker_args, turn=turn)
            if not run.wait_started(startup_timeout):
                raise LabError(f"the workers did not start within {startup_timeout:.0f} s")
            run.wait_settled(timeout)
            if turn and run.connected() and run.path("a") != "direct":
                run.wait_path(("direct",), min(timeout, upgrade_wait))
            # The workers classify their NAT (RFC 5780) alongside punching; give that a moment.
            run.wait_classified(nat_wait)
            with run.changed:
                sa, sb = run.status("a"), run.status("b")
                connected = run.connected() and sa.get("state") == sb.get("state") == "connected"
                paths = (sa.get("path"), sb.get("path"))
                # Connected over coturn is a relay too, not direct punching.
                turn_path = paths[0] if paths[0] in ("turn-udp", "turn-tcp") else None
                done = connected and turn_path is None
                readers = run.readers.values()
                ends = [r.connected_at for r in readers if r.connected_at is not None]
                starts = [r.first_punching for r in readers if r.first_punching is not None]
                relayed = not done and run.relayed()
                errors = [e for r in readers for e in r.errors]
            fallback = "relayed" if relayed and run.chat_exactly_once("a", "b") else ""
            chat = ""
            if check_chat and done:
                chat = "ok" if run.chat_exactly_once("a", "b") else "failed"
            if connected and turn_path is not None and run.chat_exactly_once("a", "b"):
                fallback = turn_path
            with run.changed:
                sa, sb = run.status("a"), run.status("b")
            connect_s = max(ends) - run.t0 if done else None
            punch_s = max(ends) - min(starts) if done and starts else None
            return PairResult(
                **base,
                outcome="direct" if done else "failed",
                connect_s=None if connect_s is None else round(connect_s, 3),
                punch_s=None if punch_s is None else round(punch_s, 3),
                a_public=run.readers["a"].first_public or sa.get("udp_public"),
                b_public=run.readers["b"].first_public or sb.get("udp_public"),
                a_peer_endpoint=_peer_endpoint(sa),
                b_peer_endpoint=_peer_endpoint(sb),
                a_nat=_nat_text(sa),
                b_nat=_nat_text(sb),
                a_state=str(sa.get("state", "")),
                b_state=str(sb.get("state", "")),
                fallback=fallback,
                chat=chat,
                method=pair_method(sa, sb),
                a_hint=hint_text(sa),
                b_hint=hint_text(sb),
                worker_error=str(sa.get("error") or sb.get("error") or next(iter(errors), "")),
                probes=link_counter([sa, sb], "birthday_probes"),
                sprays=link_counter([sa, sb], "spray_datagrams"),
                path=_path_text(sa, sb),
                first_path=next((p for _, p in run.readers["a"].paths if p), ""),
                family=pair_family(sa, sb) if done else "",
            )
    except Exception as exc:  # one broken pair must not end the matrix
        log.exception("pair %s/%s failed to run", pa, pb)
        return PairResult(
            **base,
            outcome="error",
            connect_s=None,
            punch_s=None,
            a_public=None,
            b_public=None,
            a_peer_endpoint=None,
            b_peer_endpoint=None,
            a_nat="",
            b_nat="",
            a_state="",
            b_state="",
            error=str(exc),
        )
    finally:
        if run is not None:
            run.close()


def run_matrix(
    profiles: Sequence[str] = PROFILES,
    *,
    same_lan: bool = True,
    timeout: float = 45.0,
    jobs: int = 3,
    out_dir: Path | None = None,
    loss_a: float = 0.0,
    loss_b: float = 0.0,
    rate_a_mbit: float | None = None,
    rate_b_mbit: float | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    repeat: int = 1,
    turn: bool = False,
) -> list[PairResult]:
    """Run every unordered pair of ``profiles`` (and, with ``same_lan``, each profile's same-LAN
    case), or only the ordered ``pairs`` when given (no same-LAN case then), each ``repeat``
    times, ``jobs`` labs at a time; write CSV (one row per run), summary CSV and heatmap into
    ``out_dir`` when given.  ``turn``
    hands every pair the lab's coturn (see :func:`run_pair`)."""
    if pairs is not None:
        pairs = [(parse_site(a).spec, parse_site(b).spec) for a, b in dict.fromkeys(pairs)]
        profiles = list(dict.fromkeys(p for pair in pairs for p in pair))
        same_lan = False
    else:
        profiles = [parse_site(p).spec for p in dict.fromkeys(profiles)]
        pairs = [(pa, pb) for i, pa in enumerate(profiles) for pb in profiles[i:]]
    # pystun3 classifies the sites' IPv4 NATs (it speaks IPv4 only).
    v4_profiles = [v4 for v4 in dict.fromkeys(parse_site(p).v4 for p in profiles) if v4]
    classic = {p: str(r["classic"]) for p, r in classify_profiles(v4_profiles).items()}
    configs = [
        LabConfig(pa, pb, False, loss_a, loss_b, rate_a_mbit, rate_b_mbit) for pa, pb in pairs
    ]
    if same_lan:
        configs += [
            LabConfig(p, p, True, loss_a, loss_b, rate_a_mbit, rate_b_mbit) for p in profiles
        ]
    log_dir = out_dir / "logs" if out_dir is not None else None
    # Slow (failing) pairs first, so the pool does not end with one long straggler.
    configs.sort(
        key=lambda c: (
            expected_site_outcome(c.profile_a, c.profile_b, same_lan=c.same_lan)[0] == "direct"
        )
    )
    runs = [(c, i) for i in range(1, max(1, repeat) + 1) for c in configs]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(
            pool.map(
                lambda job: run_pair(
                    job[0],
                    timeout=timeout,
                    classic=classic,
                    log_dir=log_dir,
                    run_index=job[1],
                    turn=turn,
                ),
                runs,
            )
        )
    order = {p: i for i, p in enumerate(profiles)}
    results.sort(key=lambda r: (r.same_lan, order[r.profile_a], order[r.profile_b], r.run))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(results, out_dir / "matrix.csv")
        write_summary_csv(summarize(results), out_dir / "summary.csv")
        plot_heatmap(results, out_dir / "matrix.png", profiles)
    return results


def write_csv(results: Sequence[PairResult], path: Path) -> None:
    """One row per pair, the :class:`PairResult` fields as columns (plus ``agrees``)."""
    fields = [f.name for f in dataclasses.fields(PairResult)] + ["agrees"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({**dataclasses.asdict(r), "agrees": r.agrees})


def run_from_args(args: argparse.Namespace) -> int:
    """``p2plab lab matrix``: run, write, print a table (and the per-pair summary); exit 1 when
    a run disagrees with the expected outcome or broke."""
    out = Path(args.out)
    t0 = time.monotonic()
    results = run_matrix(
        args.profiles,
        same_lan=not args.no_same_lan,
        timeout=args.timeout,
        jobs=args.jobs,
        out_dir=out,
        loss_a=args.loss_a,
        loss_b=args.loss_b,
        rate_a_mbit=args.rate_a_mbit,
        rate_b_mbit=args.rate_b_mbit,
        pairs=args.pairs,
        repeat=args.repeat,
        turn=getattr(args, "turn", False),
    )
    w = sys.stdout.write
    w(print_table(results))
    if args.repeat > 1:
        w("\n" + format_summary(summarize(results)))
    w(f"{len(results)} runs in {time.monotonic() - t0:.0f} s; wrote {out}/matrix.csv, "
      f"{out}/summary.csv and {out}/matrix.png\n")  # fmt: skip
    return 0 if all(r.agrees and r.outcome != "error" for r in results) else 1
