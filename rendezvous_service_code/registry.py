"""Pure pairing logic of the rendezvous service: no I/O, no clock, no sockets.

Every operation returns a list of *actions* (messages to send to which worker connection, or
connections to close) that the I/O layer in :mod:`rendezvous_service_code.main` carries out.
That keeps the rules testable in memory:

* workers of the same room that have reported a UDP endpoint and are unpaired are paired two by
  two, first come first served; the earlier registered of the pair is ``controlling``;
* only workers of the same mode are paired: with a public key (encrypting) or without one
  (``--no-encrypt``); each side would refuse the other's offer, and both would stay paired to
  a peer they cannot talk to;
* when a worker leaves, its peer gets ``peer_disconnected``, becomes unpaired and is paired again
  with the next waiting worker of the room;
* a worker re-sending ``update_udp_endpoint`` while paired only updates the stored endpoint,
  unless its port mapping or IPv6 endpoint changed (a lease replaced at another port): then its
  peer gets a fresh offer about it (:func:`offer_update`), which the peer's engine merges into
  the current link (its next re-punch tries the new addresses);
* a re-register with the same ``worker_id`` replaces the old connection (which is closed), and
  counts as the old one leaving.

Because pairing happens as soon as two workers are eligible, a room never has more than one
waiting worker per mode; the Redis backend relies on that to pair atomically with one key per
room and mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from p2plab.core.signaling import (
    Candidate,
    NatHint,
    P2PConnectionOffer,
    PeerDisconnected,
    PortMapping,
    Registered,
)

__all__ = [
    "CLOSE_REPLACED",
    "Action",
    "CloseConnection",
    "Registry",
    "SendMessage",
    "WorkerRecord",
    "build_candidates",
    "build_offer",
    "offer_update",
    "offers_for_pair",
]

#: Close code used when a newer connection with the same worker id replaces an old one.
CLOSE_REPLACED = 4000


@dataclass(frozen=True)
class SendMessage:
    """Send ``message`` to the connection ``conn_id`` of ``worker_id``."""

    worker_id: str
    """The worker to send to."""
    conn_id: str
    """The connection the message is meant for (a replaced connection does not get it)."""
    message: BaseModel
    """A model from :mod:`p2plab.core.signaling`."""


@dataclass(frozen=True)
class CloseConnection:
    """Close the connection ``conn_id`` of ``worker_id`` with a WebSocket close code."""

    worker_id: str
    """The worker whose connection is closed."""
    conn_id: str
    """The connection to close."""
    code: int
    """WebSocket close code."""
    reason: str
    """Close reason sent to the client."""


Action = SendMessage | CloseConnection


@dataclass
class WorkerRecord:
    """What the rendezvous knows about one registered worker."""

    worker_id: str
    """The worker's id from the WebSocket path."""
    conn_id: str
    """Id of the connection that registered it (unique across instances)."""
    room: str
    """Pairing room."""
    seq: int
    """Registration order; the lower of a pair is ``controlling``."""
    registered_at: float
    """Unix time of the registration."""
    ws_observed_ip: str | None = None
    """Address the WebSocket connection came from."""
    ws_observed_port: int | None = None
    """Port the WebSocket connection came from (unknown behind a proxy)."""
    http_public_ip: str | None = None
    """Public IP the worker learnt over HTTP, if any."""
    public_key: str | None = None
    """The worker's X25519 public key (base64), passed on in offers."""
    udp_ip: str | None = None
    """STUN-learnt UDP address."""
    udp_port: int | None = None
    """STUN-learnt UDP port."""
    local_candidates: list[Candidate] = field(default_factory=list)
    """LAN candidates the worker reported."""
    nat: NatHint | None = None
    """What the worker reported of its NAT's mapping (issue 16), passed on to its peer in the
    offer as ``peer_nat``; None when it did not test (or the stored copy was unreadable)."""
    mapped: PortMapping | None = None
    """The port its NAT mapped on request (issue 18), passed on as ``peer_mapped``."""
    udp6: Candidate | None = None
    """Its IPv6 STUN endpoint (issue 19), passed on as ``peer_udp6``."""
    paired_with: str | None = None
    """Worker id of the current peer."""

    @property
    def has_endpoint(self) -> bool:
        """Whether the worker reported a UDP endpoint (a condition to be paired)."""
        return self.udp_ip is not None and self.udp_port is not None

    def to_public_dict(self) -> dict[str, Any]:
        """The ``/debug/list_workers`` view of the record."""
        return {
            "worker_id": self.worker_id,
            "room": self.room,
            "ws_observed_ip": self.ws_observed_ip,
            "ws_observed_port": self.ws_observed_port,
            "http_public_ip": self.http_public_ip,
            "udp_ip": self.udp_ip,
            "udp_port": self.udp_port,
            "local_candidates": [c.model_dump() for c in self.local_candidates],
            "public_key": self.public_key,
            "nat": self.nat.model_dump() if self.nat is not None else None,
            "mapped": self.mapped.model_dump() if self.mapped is not None else None,
            "udp6": self.udp6.model_dump() if self.udp6 is not None else None,
            "paired_with": self.paired_with,
            "registered_at": self.registered_at,
        }


def build_candidates(
    udp_ip: str, udp_port: int, local_candidates: Iterable[Candidate]
) -> list[Candidate]:
    """The public endpoint first, then the local candidates, without duplicates."""
    seen: set[tuple[str, int]] = set()
    out: list[Candidate] = []
    for cand in [Candidate(ip=udp_ip, port=udp_port), *local_candidates]:
        key = (cand.ip, cand.port)
        if key not in seen:
            seen.add(key)
            out.append(cand)
    return out


Role = Literal["controlling", "controlled"]


def build_offer(peer: WorkerRecord, role: Role) -> P2PConnectionOffer:
    """The offer telling a worker about ``peer``."""
    assert peer.udp_ip is not None and peer.udp_port is not None
    return P2PConnectionOffer(
        peer_worker_id=peer.worker_id,
        peer_udp_ip=peer.udp_ip,
        peer_udp_port=peer.udp_port,
        peer_candidates=build_candidates(peer.udp_ip, peer.udp_port, peer.local_candidates),
        role=role,
        peer_public_key=peer.public_key,
        peer_nat=peer.nat,
        peer_mapped=peer.mapped,
        peer_udp6=peer.udp6,
    )


def offer_update(changed: WorkerRecord, peer: WorkerRecord) -> list[Action]:
    """The fresh offer telling ``peer`` about its partner ``changed`` (same roles as the pair's
    offers: the earlier registered is ``controlling``)."""
    role: Role = "controlling" if peer.seq <= changed.seq else "controlled"
    return [SendMessage(peer.worker_id, peer.conn_id, build_offer(changed, role))]


def offers_for_pair(a: WorkerRecord, b: WorkerRecord) -> list[Action]:
    """Both offers of a new pair; the earlier registered worker is ``controlling``."""
    first, second = (a, b) if a.seq <= b.seq else (b, a)
    return [
        SendMessage(first.worker_id, first.conn_id, build_offer(second, "controlling")),
        SendMessage(second.worker_id, second.conn_id, build_offer(first, "controlled")),
    ]


class Registry:
    """In-memory registry and pairing of workers (the default backend's state)."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        # (room, encrypting) -> id of the one worker waiting there (see module docstring).
        self._waiting: dict[tuple[str, bool], str] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def get(self, worker_id: str) -> WorkerRecord | None:
        """The record of ``worker_id`` or None."""
        return self._workers.get(worker_id)

    def workers(self) -> list[WorkerRecord]:
        """All records in registration order."""
        return sorted(self._workers.values(), key=lambda w: w.seq)

    def waiting(self, room: str, encrypting: bool | None = None) -> str | None:
        """The worker waiting for a peer in ``room`` (of that mode; None: either), if any."""
        modes = (True, False) if encrypting is None else (encrypting,)
        return next((w for m in modes if (w := self._waiting.get((room, m)))), None)

    def relay_target(self, worker_id: str, conn_id: str, to: str) -> str | None:
        """The connection of ``to`` if ``worker_id`` (connected as ``conn_id``) is its pair."""
        rec = self._workers.get(worker_id)
        peer = self._workers.get(to)
        if rec is None or peer is None or rec.conn_id != conn_id:
            return None
        if rec.paired_with != to or peer.paired_with != worker_id:
            return None
        return peer.conn_id

    def register(
        self,
        worker_id: str,
        conn_id: str,
        *,
        room: str = "default",
        now: float,
        ws_observed_ip: str | None = None,
        ws_observed_port: int | None = None,
        http_public_ip: str | None = None,
        public_key: str | None = None,
    ) -> list[Action]:
        """Register a worker; an older connection with the same id is closed and leaves."""
        actions: list[Action] = []
        old = self._workers.get(worker_id)
        if old is not None:
            actions.append(
                CloseConnection(
                    worker_id, old.conn_id, CLOSE_REPLACED, "replaced by a newer connection"
                )
            )
            actions.extend(self._remove(old))
        self._seq += 1
        self._workers[worker_id] = WorkerRecord(
            worker_id=worker_id,
            conn_id=conn_id,
            room=room,
            seq=self._seq,
            registered_at=now,
            ws_observed_ip=ws_observed_ip,
            ws_observed_port=ws_observed_port,
            http_public_ip=http_public_ip,
            public_key=public_key,
        )
        actions.append(
            SendMessage(
                worker_id,
                conn_id,
                Registered(
                    worker_id=worker_id, observed_ip=ws_observed_ip, observed_port=ws_observed_port
                ),
            )
        )
        return actions

    def update_udp_endpoint(
        self,
        worker_id: str,
        conn_id: str,
        udp_ip: str,
        udp_port: int,
        local_candidates: Iterable[Candidate] = (),
        nat: NatHint | None = None,
        *,
        mapped: PortMapping | None = None,
        udp6: Candidate | None = None,
    ) -> list[Action]:
        """Store the worker's UDP endpoint (and NAT hint, port mapping, IPv6 endpoint); pair it
        if it is unpaired and someone waits.  A later update without a hint (mapping, IPv6
        endpoint) clears the stored one: each describes the endpoint it came with."""
        rec = self._workers.get(worker_id)
        if rec is None or rec.conn_id != conn_id:
            return []
        moved = (rec.mapped, rec.udp6) != (mapped, udp6)
        rec.udp_ip = udp_ip
        rec.udp_port = udp_port
        rec.local_candidates = list(local_candidates)
        rec.nat = nat
        rec.mapped = mapped
        rec.udp6 = udp6
        if rec.paired_with is not None:
            # Keep the pair; the peer punches to what it was offered, and hears of a port
            # mapping or IPv6 endpoint that changed (it may be the only way in).
            peer = self._workers.get(rec.paired_with)
            return offer_update(rec, peer) if moved and peer is not None else []
        return self._try_pair(rec)

    def unregister(self, worker_id: str, conn_id: str) -> list[Action]:
        """The connection ``conn_id`` of ``worker_id`` went away."""
        rec = self._workers.get(worker_id)
        if rec is None or rec.conn_id != conn_id:
            return []  # already replaced by a newer connection
        return self._remove(rec)

    # -- internals -------------------------------------------------------------------------

    def _remove(self, rec: WorkerRecord) -> list[Action]:
        del self._workers[rec.worker_id]
        if self._waiting.get(_pool(rec)) == rec.worker_id:
            del self._waiting[_pool(rec)]
        actions: list[Action] = []
        peer = self._workers.get(rec.paired_with) if rec.paired_with else None
        if peer is not None:
            peer.paired_with = None
            actions.append(
                SendMessage(
                    peer.worker_id, peer.conn_id, PeerDisconnected(peer_worker_id=rec.worker_id)
                )
            )
            actions.extend(self._try_pair(peer))
        return actions

    def _try_pair(self, rec: WorkerRecord) -> list[Action]:
        if rec.paired_with is not None or not rec.has_endpoint:
            return []
        pool = _pool(rec)
        other_id = self._waiting.get(pool)
        if other_id is None or other_id == rec.worker_id:
            self._waiting[pool] = rec.worker_id
            return []
        other = self._workers[other_id]
        del self._waiting[pool]
        rec.paired_with = other.worker_id
        other.paired_with = rec.worker_id
        return offers_for_pair(rec, other)


def _pool(rec: WorkerRecord) -> tuple[str, bool]:
    """Who may be paired with whom: the same room, and both encrypting or both not."""
    return rec.room, rec.public_key is not None
