"""StunProbe: the mapped address and NAT behaviour of the worker's own UDP socket.

The probe sends from the :class:`~p2plab.aio.endpoint.UdpEndpoint` the worker later punches
with, so the mapping it learns is the one peers will see.  Replies are told apart from peer
traffic by the endpoint (magic cookie, then transaction id via ``add_stun_listener``).  Each
request is a core :class:`~p2plab.core.stun.StunTransaction`; this module only moves bytes,
reads the loop clock and keeps one ``call_at`` timer for all of them.

:meth:`StunProbe.nat_report` drives the core's RFC 5780 procedure
(:class:`~p2plab.core.discovery.Rfc5780Discovery`, which says which tests, in which order) on
the same socket, and runs the RFC 3489 classic test through pystun3 in a thread on its own
socket, with the host's real source address (natlab.md: 0.0.0.0 misleads it).  In this order:
filtering tests, pystun3, mapping tests.  The mapping tests send to the server's alternate IP,
which would open the very pinholes the filtering tests (ours and pystun3's) look for, on NATs
that filter per remote IP host-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from p2plab.aio.endpoint import UdpEndpoint
from p2plab.core.addresses import is_ip_literal
from p2plab.core.discovery import (
    BindingOutcome,
    BindingTest,
    DiscoveryPhase,
    Rfc5780Discovery,
    outcome_from_transaction,
)
from p2plab.core.nat import NatReport, ServerAnswer
from p2plab.core.stun import (
    Class,
    Message,
    RetransmissionPolicy,
    StunTransaction,
    make_binding_request,
    parse_message,
    parse_server_address,
)
from p2plab.errors import ConfigError, StunError, StunTimeout

__all__ = ["StunProbe", "StunResult", "parse_server_address", "probe_nat"]

log = logging.getLogger(__name__)

Address = tuple[str, int]


@dataclass(frozen=True)
class StunResult:
    """Outcome of :meth:`StunProbe.mapped_address`."""

    mapped: Address
    """Our public (server-reflexive) address as the chosen server saw it."""
    server: Address
    """The server whose answer was chosen (the fastest), as configured."""
    rtt_s: float
    """Its round-trip time in seconds (from the last transmission)."""
    answers: tuple[ServerAnswer, ...]
    """Every server's outcome, in configured order, failures included."""
    other_address: Address | None = None
    """The chosen server's OTHER-ADDRESS / CHANGED-ADDRESS, if any."""

    @property
    def consistent(self) -> bool:
        """True if every server that answered saw the same mapped address."""
        return len({a.mapped for a in self.answers if a.ok}) <= 1


@dataclass
class _Pending:
    tx: StunTransaction
    future: asyncio.Future[None]
    expect_echo: bool = False
    echoed: bool = False
    source: Address | None = None


class _Driver:
    """Runs many StunTransactions on one endpoint with one loop timer."""

    def __init__(self, endpoint: UdpEndpoint) -> None:
        self._endpoint = endpoint
        self._loop = endpoint.loop
        self._pending: dict[bytes, _Pending] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.stats = {"malformed": 0, "stray": 0}

    async def run(
        self, request: Message, addr: Address, policy: RetransmissionPolicy, expect_echo: bool
    ) -> _Pending:
        tx = StunTransaction(request, addr, policy)
        pending = _Pending(tx, self._loop.create_future(), expect_echo=expect_echo)
        self._pending[tx.transaction_id] = pending
        self._endpoint.add_stun_listener(tx.transaction_id, self._on_datagram)
        try:
            tx.start(self._loop.time())
            self._flush(tx)
            self._arm()
            await pending.future
            return pending
        finally:
            tx.cancel()
            self._pending.pop(tx.transaction_id, None)
            self._endpoint.remove_stun_listener(tx.transaction_id)
            self._arm()

    def _flush(self, tx: StunTransaction) -> None:
        for data, addr in tx.datagrams_to_send(self._loop.time()):
            self._endpoint.sendto(data, addr)

    def _finish(self, pending: _Pending) -> None:
        if not pending.future.done():
            pending.future.set_result(None)

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        try:
            message = parse_message(data)
        except StunError as exc:
            self.stats["malformed"] += 1
            log.debug("dropped malformed STUN reply from %s: %s", addr, exc)
            return
        pending = self._pending.get(message.transaction_id)
        if pending is None:
            self.stats["stray"] += 1
            return
        if message.message_class == Class.REQUEST and pending.expect_echo:
            # Our own request came back to us: the NAT hairpins (RFC 5780 section 4.5).
            pending.echoed = True
            pending.source = addr
            self._finish(pending)
            return
        if pending.tx.receive(message, self._loop.time()):
            pending.source = addr
            self._finish(pending)
        else:
            self.stats["stray"] += 1

    def _arm(self) -> None:
        timers = [t for p in self._pending.values() if (t := p.tx.get_timer()) is not None]
        when = min(timers) if timers else None
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._loop.time()
        for pending in list(self._pending.values()):
            timer = pending.tx.get_timer()
            if timer is not None and timer <= now:
                pending.tx.handle_timer(now)
                self._flush(pending.tx)
            if pending.tx.done:
                self._finish(pending)
        self._arm()


class StunProbe:
    """Binding requests from a shared endpoint to one or more STUN servers."""

    def __init__(
        self,
        endpoint: UdpEndpoint,
        servers: Sequence[str | tuple[str, int]],
        *,
        timeout: float = 3.0,
        rto: float = 0.25,
        retries: int = 6,
        software: str | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """``servers``: ``"host:port"`` strings or ``(host, port)`` tuples (ConfigError if bad).
        Every request is sent up to ``1 + retries`` times, the first retransmission after
        ``rto`` seconds and then doubling (RFC 8489 section 6.2.1), and given up ``timeout``
        seconds after the first send."""
        if isinstance(servers, str) or (
            isinstance(servers, tuple) and servers and isinstance(servers[0], str)
        ):
            servers = [servers]
        self.servers: tuple[Address, ...] = tuple(parse_server_address(s) for s in servers)
        if not self.servers:
            raise ConfigError("StunProbe needs at least one STUN server")
        if retries < 0:
            raise ConfigError(f"StunProbe retries must be 0 or more, got {retries}")
        self.endpoint = endpoint
        self.policy = RetransmissionPolicy(rto=rto, rc=retries + 1, timeout=timeout)
        self.software = software
        self._random_bytes = random_bytes
        self._driver = _Driver(endpoint)

    # -- single requests --------------------------------------------------------------------

    async def _resolve(self, server: Address) -> Address:
        host, port = server
        family = self.endpoint.socket.family
        if is_ip_literal(host):
            ip = ipaddress.ip_address(host)
            if (ip.version == 6) != (family == socket.AF_INET6):
                raise OSError(f"IPv{ip.version} server but the endpoint is not")
            return (str(ip), port)
        infos = await self.endpoint.loop.getaddrinfo(
            host, port, family=family, type=socket.SOCK_DGRAM
        )
        if not infos:
            raise OSError(f"cannot resolve {host}")
        sockaddr = infos[0][4]
        return (str(sockaddr[0]), int(sockaddr[1]))

    async def _binding(
        self,
        server: Address,
        target: Address | None = None,
        *,
        change_ip: bool = False,
        change_port: bool = False,
        expect_echo: bool = False,
    ) -> BindingOutcome:
        """One Binding transaction to ``target`` (default: ``server`` resolved)."""
        try:
            resolved = target if target is not None else await self._resolve(server)
        except OSError as exc:
            return BindingOutcome(ServerAnswer(server, False, error=f"cannot resolve: {exc}"))
        request = make_binding_request(
            self._random_bytes,
            change_ip=change_ip,
            change_port=change_port,
            software=self.software,
        )
        pending = await self._driver.run(request, resolved, self.policy, expect_echo)
        if pending.echoed:
            # Our own request came back (hairpin test): that is the answer we wanted.
            answer = ServerAnswer(server, True, attempts=pending.tx.attempts, resolved=resolved)
            return BindingOutcome(answer, pending.source)
        return outcome_from_transaction(server, resolved, pending.tx, pending.source)

    async def _run_test(self, test: BindingTest) -> BindingOutcome:
        return await self._binding(
            test.server,
            test.target,
            change_ip=test.change_ip,
            change_port=test.change_port,
            expect_echo=test.expect_echo,
        )

    # -- public API -------------------------------------------------------------------------

    async def mapped_address(self, *, wait_all: bool = True) -> StunResult:
        """Ask every server (in parallel) for our mapped address.

        With ``wait_all`` (default) every server's outcome is reported, so a dead server costs
        ``timeout``; without it the first success wins and the others are reported as not
        waited for.  Raises :class:`StunTimeout` naming the servers when none answered.
        """
        tasks = [asyncio.ensure_future(self._binding(s)) for s in self.servers]
        try:
            if wait_all:
                await asyncio.wait(tasks)
            else:
                remaining = set(tasks)
                while remaining:
                    done, remaining = await asyncio.wait(
                        remaining, return_when=asyncio.FIRST_COMPLETED
                    )
                    if any(t.result().answer.ok for t in done):
                        break
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        answers = tuple(
            t.result().answer
            if not t.cancelled()
            else ServerAnswer(server, False, error="not waited for (another server answered)")
            for t, server in zip(tasks, self.servers, strict=True)
        )
        return _stun_result(answers)

    async def binding_to(
        self, target: Address, *, change_ip: bool = False, change_port: bool = False
    ) -> ServerAnswer:
        """One Binding to ``target`` (an IP literal: e.g. a server's OTHER-ADDRESS), with the
        probe's retransmission policy; ``change_ip``/``change_port`` ask for the answer from
        the server's alternate address (RFC 5780 CHANGE-REQUEST)."""
        outcome = await self._binding(target, target, change_ip=change_ip, change_port=change_port)
        return outcome.answer

    def _local_towards(self, target: Address) -> Address:
        """Our real source address towards ``target`` (connecting a UDP socket sends nothing)."""
        host, port = self.endpoint.local_address
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(host).is_unspecified:
                return (host, port)
        with socket.socket(self.endpoint.socket.family, socket.SOCK_DGRAM) as s:
            s.connect(target)
            return (str(s.getsockname()[0]), port)

    async def nat_report(
        self, *, classic: bool = True, hairpin: bool = True, classic_timeout: float = 90.0
    ) -> NatReport:
        """Mapped address plus RFC 5780 mapping/filtering behaviour, hairpinning and (with
        ``classic``) the RFC 3489 type from pystun3.  Raises :class:`StunTimeout` if no server
        answers at all.

        The procedure (which tests, in which order) is the core's
        :class:`~p2plab.core.discovery.Rfc5780Discovery`; this runs each phase's transactions
        in parallel on our endpoint, and pystun3 between the filtering and the mapping tests.
        """
        discovery = Rfc5780Discovery(
            self.servers, local_towards=self._local_towards, hairpin=hairpin
        )
        classic_raw: str | None = None
        classic_due = classic
        while not discovery.done:
            if discovery.phase is DiscoveryPhase.MAPPING and classic_due:
                classic_due = False
                classic_raw = await self._classic_step(discovery, classic_timeout)
            tests = discovery.next_tests()
            outcomes = await asyncio.gather(*(self._run_test(t) for t in tests))
            for test, outcome in zip(tests, outcomes, strict=True):
                discovery.receive(test, outcome)
        result = discovery.result()
        _stun_result(result.first)  # raises StunTimeout when no server answered; logs
        if classic_due:
            classic_raw = await self._classic_step(discovery, classic_timeout)
            result = discovery.result()
        report = result.report(classic_raw)
        log.info(
            "NAT report: mapped %s, mapping %s, filtering %s, classic %s",
            report.mapped,
            report.mapping.value,
            report.filtering.value,
            report.classic,
        )
        return report

    async def _classic_step(self, discovery: Rfc5780Discovery, limit: float) -> str | None:
        """pystun3 against the server the behaviour tests use, from our real source IP."""
        primary, local = discovery.primary, discovery.local
        assert primary is not None and local is not None
        raw, note = await self._classic(primary, local[0], limit)
        if note:
            discovery.note(note)
        return raw

    async def _classic(
        self, server: Address, source_ip: str, limit: float
    ) -> tuple[str | None, str | None]:
        """RFC 3489 type from pystun3 (blocking: in a thread, on its own socket)."""
        if ":" in server[0]:
            return None, "classic (RFC 3489) test skipped: pystun3 speaks IPv4 only"
        try:
            import stun  # type: ignore[import-untyped]  # pystun3
        except ImportError:
            return None, "classic (RFC 3489) test skipped: pystun3 is not installed"

        def run() -> str:
            nat_type, _ip, _port = stun.get_ip_info(
                source_ip=source_ip, source_port=0, stun_host=server[0], stun_port=server[1]
            )
            return str(nat_type)

        try:
            return await asyncio.wait_for(asyncio.to_thread(run), limit), None
        except TimeoutError:
            return None, f"classic (RFC 3489) test: pystun3 did not finish in {limit:g} s"
        except Exception as exc:
            return None, f"classic (RFC 3489) test failed: {exc!r}"


async def probe_nat(
    servers: Sequence[str | tuple[str, int]],
    *,
    host: str = "0.0.0.0",
    port: int = 0,
    classic: bool = True,
    hairpin: bool = True,
    request_timeout: float = 3.0,
    rto: float = 0.25,
    retries: int = 6,
) -> NatReport:
    """Bind a fresh endpoint on ``(host, port)`` and return its :class:`NatReport`
    (``p2plab probe``).  ``request_timeout``, ``rto`` and ``retries`` are StunProbe's
    ``timeout``, ``rto`` and ``retries``."""
    probe_servers = [parse_server_address(s) for s in servers]
    endpoint = await UdpEndpoint.bind(host, port)
    try:
        probe = StunProbe(
            endpoint, probe_servers, timeout=request_timeout, rto=rto, retries=retries
        )
        return await probe.nat_report(classic=classic, hairpin=hairpin)
    finally:
        endpoint.close()


def _stun_result(answers: tuple[ServerAnswer, ...]) -> StunResult:
    """The fastest answer of ``answers``; raises :class:`StunTimeout` naming the servers when
    none answered."""
    ok = [a for a in answers if a.ok and a.mapped is not None]
    if not ok:
        detail = "; ".join(f"{a.server[0]}:{a.server[1]}: {a.error}" for a in answers)
        raise StunTimeout(f"no STUN server answered ({detail})")
    best = min(ok, key=lambda a: a.rtt_s if a.rtt_s is not None else float("inf"))
    assert best.mapped is not None
    result = StunResult(
        mapped=best.mapped,
        server=best.server,
        rtt_s=best.rtt_s or 0.0,
        answers=answers,
        other_address=best.other_address,
    )
    log.info(
        "STUN: mapped %s:%d via %s:%d in %.1f ms (%d/%d servers answered)",
        result.mapped[0],
        result.mapped[1],
        result.server[0],
        result.server[1],
        result.rtt_s * 1000.0,
        len(ok),
        len(answers),
    )
    return result
