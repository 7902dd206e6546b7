"""Redis backend: several rendezvous instances share registrations, pairing and offers.

Layout (all keys under ``prefix``, default ``p2plab:rv:``):

* ``w:<id>``        hash: the worker's record (``conn``, ``inst``, ``room``, ``seq``, endpoint...;
  ``nat`` is the worker's NatHint as JSON text, '' for none, validated again when read back;
  ``mapped`` its PortMapping and ``udp6`` its IPv6 endpoint, the same way)
* ``waiting:<room>`` the one unpaired encrypting worker with an endpoint waiting in a room;
  ``waitingplain:<room>`` the same for workers without a public key (they pair only together)
* ``workers``       set of all worker ids; ``instw:<inst>`` the ids held by one instance
* ``inst:<inst>``   liveness key of an instance, refreshed every ``heartbeat_s`` with ``ttl_s``
* ``instances``     set of instance ids; ``seq`` registration counter (roles)
* channel ``chan:<inst>`` messages for connections held by that instance

Every change of pairing state is one Lua script, so pairing is atomic across instances: a room
has at most one waiting worker and a worker is paired only if both records say unpaired.
Offers are built from the records the script returns, in the same atomic step.  An instance
whose liveness key expired is reaped by any other: its workers are unregistered (their peers
get ``peer_disconnected`` and are paired again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis

from p2plab.core.signaling import (
    Candidate,
    NatHint,
    PeerDisconnected,
    PortMapping,
    Registered,
    parse_rendezvous_message,
)
from p2plab.errors import RemoteProtocolError

from .backends import Deliver
from .registry import (
    CLOSE_REPLACED,
    Action,
    CloseConnection,
    SendMessage,
    WorkerRecord,
    offer_update,
    offers_for_pair,
)

__all__ = ["RedisBackend"]

logger = logging.getLogger(__name__)

_LUA_COMMON = """
local P = ARGV[1]
local function waiting_key(w)
  local room = redis.call('HGET', w, 'room')
  if not room then return nil end
  local pk = redis.call('HGET', w, 'public_key')
  if pk and pk ~= '' then return P .. 'waiting:' .. room end
  return P .. 'waitingplain:' .. room
end
local function remove(id)
  local w = P .. 'w:' .. id
  local wk = waiting_key(w)
  local peer = redis.call('HGET', w, 'paired_with')
  local inst = redis.call('HGET', w, 'inst')
  redis.call('DEL', w)
  redis.call('SREM', P .. 'workers', id)
  if inst then redis.call('SREM', P .. 'instw:' .. inst, id) end
  if wk and redis.call('GET', wk) == id then
    redis.call('DEL', wk)
  end
  if peer and peer ~= '' then
    local pw = P .. 'w:' .. peer
    if redis.call('HGET', pw, 'paired_with') == id then
      redis.call('HSET', pw, 'paired_with', '')
      return {peer, redis.call('HGET', pw, 'conn')}
    end
  end
  return {}
end
local function try_pair(id)
  local w = P .. 'w:' .. id
  if redis.call('HGET', w, 'paired_with') ~= '' then return {} end
  local port = redis.call('HGET', w, 'udp_port')
  if (not port) or port == '' then return {} end
  local room = redis.call('HGET', w, 'room')
  local wk = waiting_key(w)
  local other = redis.call('GET', wk)
  if other and other ~= id then
    local ow = P .. 'w:' .. other
    local oport = redis.call('HGET', ow, 'udp_port')
    if redis.call('HGET', ow, 'paired_with') == '' and oport and oport ~= ''
        and redis.call('HGET', ow, 'room') == room then
      redis.call('HSET', w, 'paired_with', other)
      redis.call('HSET', ow, 'paired_with', id)
      redis.call('DEL', wk)
      return {redis.call('HGETALL', w), redis.call('HGETALL', ow)}
    end
  end
  redis.call('SET', wk, id)
  return {}
end
"""

# ARGV: prefix, id, conn, inst, room, now, ws_ip, ws_port, http_ip, public_key
_LUA_REGISTER = (
    _LUA_COMMON
    + """
local id = ARGV[2]
local w = P .. 'w:' .. id
local old_conn = redis.call('HGET', w, 'conn')
local orphan = {}
local pair = {}
if old_conn then
  orphan = remove(id)
  if orphan[1] then pair = try_pair(orphan[1]) end
end
local seq = redis.call('INCR', P .. 'seq')
redis.call('HSET', w, 'worker_id', id, 'conn', ARGV[3], 'inst', ARGV[4], 'room', ARGV[5],
  'seq', seq, 'registered_at', ARGV[6], 'ws_observed_ip', ARGV[7], 'ws_observed_port', ARGV[8],
  'http_public_ip', ARGV[9], 'public_key', ARGV[10], 'udp_ip', '', 'udp_port', '',
  'local_candidates', '[]', 'nat', '', 'mapped', '', 'udp6', '', 'paired_with', '')
redis.call('SADD', P .. 'workers', id)
redis.call('SADD', P .. 'instw:' .. ARGV[4], id)
return {old_conn or '', orphan, pair}
"""
)

# ARGV: prefix, id, conn, udp_ip, udp_port, candidates_json, nat_json ('' = no hint),
#       mapped_json, udp6_json ('' = none).  Returns a new pair's two records, or, for a paired
#       worker whose mapping or IPv6 endpoint changed, {'moved', its record, its peer's}.
_LUA_UPDATE = (
    _LUA_COMMON
    + """
local id = ARGV[2]
local w = P .. 'w:' .. id
if redis.call('HGET', w, 'conn') ~= ARGV[3] then return {} end
local old_mapped = redis.call('HGET', w, 'mapped') or ''
local old_udp6 = redis.call('HGET', w, 'udp6') or ''
redis.call('HSET', w, 'udp_ip', ARGV[4], 'udp_port', ARGV[5], 'local_candidates', ARGV[6],
  'nat', ARGV[7], 'mapped', ARGV[8], 'udp6', ARGV[9])
local peer = redis.call('HGET', w, 'paired_with')
if peer and peer ~= '' then
  if old_mapped ~= ARGV[8] or old_udp6 ~= ARGV[9] then
    local pw = P .. 'w:' .. peer
    if redis.call('HGET', pw, 'paired_with') == id then
      return {'moved', redis.call('HGETALL', w), redis.call('HGETALL', pw)}
    end
  end
  return {}
end
return try_pair(id)
"""
)

# ARGV: prefix, id, conn ('' = whatever connection)
_LUA_UNREGISTER = (
    _LUA_COMMON
    + """
local id = ARGV[2]
local conn = redis.call('HGET', P .. 'w:' .. id, 'conn')
if (not conn) or (ARGV[3] ~= '' and conn ~= ARGV[3]) then return {{}, {}} end
local orphan = remove(id)
local pair = {}
if orphan[1] then pair = try_pair(orphan[1]) end
return {orphan, pair}
"""
)


_CLOSE_STEP_S = 2.0
#: How long /health waits for Redis to answer a PING.
_HEALTH_TIMEOUT_S = 2.0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hash(flat: list[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _opt(value: str | None) -> str | None:
    return value if value else None


def _nat_hint(text: str, on_corrupt: Callable[[], None]) -> NatHint | None:
    """The stored hint, validated again: Redis is shared, and a value written by another
    version (or by hand) must not reach an offer unchecked nor crash the pairing; a corrupt one
    reads as no hint (the pair then punches plainly) and is reported through ``on_corrupt``."""
    if not text:
        return None
    try:
        return NatHint.model_validate_json(text)
    except ValueError:  # pydantic's ValidationError is a ValueError
        on_corrupt()
        return None


def _stored(
    model: type[PortMapping] | type[Candidate], text: str, on_corrupt: Callable[[], None]
) -> Any:
    """A stored port mapping or IPv6 endpoint, validated again like the NAT hint (the same
    rules as on the wire: IP literals only, no scoped address, a bounded lease); a corrupt
    one reads as none and is reported through ``on_corrupt``."""
    if not text:
        return None
    try:
        value = model.model_validate_json(text)
    except ValueError:
        on_corrupt()
        return None
    if isinstance(value, Candidate) and ":" not in value.ip:  # udp6 is IPv6 only
        on_corrupt()
        return None
    return value


def _ignore() -> None:
    return None


def _record(
    h: dict[str, str],
    on_corrupt: Callable[[], None] = _ignore,
    on_corrupt_endpoint: Callable[[], None] = _ignore,
) -> WorkerRecord:
    port = h.get("ws_observed_port", "")
    udp_port = h.get("udp_port", "")
    try:
        cands = [Candidate.model_validate(c) for c in json.loads(h.get("local_candidates", "[]"))]
    except (ValueError, TypeError):
        cands = []
    return WorkerRecord(
        worker_id=h["worker_id"],
        conn_id=h.get("conn", ""),
        room=h.get("room", "default"),
        seq=int(h.get("seq", "0") or 0),
        registered_at=float(h.get("registered_at", "0") or 0),
        ws_observed_ip=_opt(h.get("ws_observed_ip")),
        ws_observed_port=int(port) if port else None,
        http_public_ip=_opt(h.get("http_public_ip")),
        public_key=_opt(h.get("public_key")),
        udp_ip=_opt(h.get("udp_ip")),
        udp_port=int(udp_port) if udp_port else None,
        local_candidates=cands,
        nat=_nat_hint(h.get("nat", ""), on_corrupt),
        mapped=_stored(PortMapping, h.get("mapped", ""), on_corrupt_endpoint),
        udp6=_stored(Candidate, h.get("udp6", ""), on_corrupt_endpoint),
        paired_with=_opt(h.get("paired_with")),
    )


def _pair_actions(
    pair: list[Any],
    on_corrupt: Callable[[], None] = _ignore,
    on_corrupt_endpoint: Callable[[], None] = _ignore,
) -> list[Action]:
    if not pair:
        return []
    first = _record(_hash(pair[0]), on_corrupt, on_corrupt_endpoint)
    second = _record(_hash(pair[1]), on_corrupt, on_corrupt_endpoint)
    return offers_for_pair(first, second)


def _orphan_actions(orphan: list[Any], left: str) -> list[Action]:
    if not orphan:
        return []
    peer, conn = _s(orphan[0]), _s(orphan[1])
    return [SendMessage(peer, conn, PeerDisconnected(peer_worker_id=left))]


class RedisBackend:
    """Registrations in Redis, shared by every instance using the same ``url`` and ``prefix``."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "p2plab:rv:",
        heartbeat_s: float = 2.0,
        ttl_s: float = 10.0,
        instance_id: str | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url)
        self._register = self.redis.register_script(_LUA_REGISTER)
        self._update = self.redis.register_script(_LUA_UPDATE)
        self._unregister = self.redis.register_script(_LUA_UNREGISTER)
        self._deliver: Deliver | None = None
        self._on_reset: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self.reaped_instances = 0
        self.corrupt_nat_hints = 0
        self.corrupt_endpoints = 0
        """Stored port mappings and IPv6 endpoints that did not validate when read back."""
        """Stored NAT hints that did not validate when read back (each read as no hint)."""

    def _k(self, name: str) -> str:
        return self.prefix + name

    def _corrupt_hint(self) -> None:
        self.corrupt_nat_hints += 1

    def _corrupt_endpoint(self) -> None:
        self.corrupt_endpoints += 1
        logger.warning("a stored NAT hint in Redis does not validate; treating it as absent")

    def _channel(self, instance_id: str) -> str:
        return self._k(f"chan:{instance_id}")

    async def start(self, deliver: Deliver, on_reset: Callable[[], None] | None = None) -> None:
        self._deliver = deliver
        self._on_reset = on_reset
        await self._beat()
        await self.redis.sadd(self._k("instances"), self.instance_id)
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(self._channel(self.instance_id))
        self._tasks = [
            asyncio.create_task(self._listen(), name="rv-redis-listen"),
            asyncio.create_task(self._heartbeat_loop(), name="rv-redis-heartbeat"),
        ]
        logger.info("rendezvous instance %s sharing state through Redis", self.instance_id)

    async def close(self) -> None:
        # Every step is bounded: shutdown must finish even when Redis or a cancelled
        # subscription misbehaves (an unbounded await here once hung a whole shutdown).
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_CLOSE_STEP_S)
        self._tasks = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._forget_self(), _CLOSE_STEP_S)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pubsub.aclose(), _CLOSE_STEP_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), _CLOSE_STEP_S)

    async def health(self) -> str | None:
        """None if Redis answers a PING within :data:`_HEALTH_TIMEOUT_S`, else the reason."""
        try:
            await asyncio.wait_for(self.redis.ping(), _HEALTH_TIMEOUT_S)
        except TimeoutError:
            return f"redis did not answer within {_HEALTH_TIMEOUT_S:g} s"
        except Exception as exc:  # refused, reset, auth...: registration fails the same way
            return f"redis unreachable ({type(exc).__name__})"
        return None

    async def _forget_self(self) -> None:
        await self.reap(self.instance_id)
        await self.redis.delete(self._k(f"inst:{self.instance_id}"))

    # -- operations ---------------------------------------------------------------------------

    async def register(
        self,
        worker_id: str,
        conn_id: str,
        *,
        room: str,
        now: float,
        ws_observed_ip: str | None,
        ws_observed_port: int | None,
        http_public_ip: str | None,
        public_key: str | None,
    ) -> list[Action]:
        old_conn, orphan, pair = await self._register(
            args=[
                self.prefix,
                worker_id,
                conn_id,
                self.instance_id,
                room,
                repr(now),
                ws_observed_ip or "",
                "" if ws_observed_port is None else str(ws_observed_port),
                http_public_ip or "",
                public_key or "",
            ]
        )
        actions: list[Action] = []
        if _s(old_conn):
            actions.append(
                CloseConnection(
                    worker_id, _s(old_conn), CLOSE_REPLACED, "replaced by a newer connection"
                )
            )
        actions += _orphan_actions(orphan, worker_id)
        actions += _pair_actions(pair, self._corrupt_hint, self._corrupt_endpoint)
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

    async def update_udp_endpoint(
        self,
        worker_id: str,
        conn_id: str,
        udp_ip: str,
        udp_port: int,
        local_candidates: Iterable[Candidate],
        nat: NatHint | None = None,
        *,
        mapped: PortMapping | None = None,
        udp6: Candidate | None = None,
    ) -> list[Action]:
        cands = json.dumps([c.model_dump() for c in local_candidates])
        hint = nat.model_dump_json() if nat is not None else ""
        mapped_json = mapped.model_dump_json() if mapped is not None else ""
        udp6_json = udp6.model_dump_json() if udp6 is not None else ""
        args = [self.prefix, worker_id, conn_id, udp_ip, str(udp_port), cands, hint]
        pair = await self._update(args=[*args, mapped_json, udp6_json])
        if len(pair) == 3 and _s(pair[0]) == "moved":
            moved = _record(_hash(pair[1]), self._corrupt_hint, self._corrupt_endpoint)
            peer = _record(_hash(pair[2]), self._corrupt_hint, self._corrupt_endpoint)
            return offer_update(moved, peer)
        return _pair_actions(pair, self._corrupt_hint, self._corrupt_endpoint)

    async def unregister(self, worker_id: str, conn_id: str) -> list[Action]:
        orphan, pair = await self._unregister(args=[self.prefix, worker_id, conn_id])
        pairing = _pair_actions(pair, self._corrupt_hint, self._corrupt_endpoint)
        return _orphan_actions(orphan, worker_id) + pairing

    async def registered_key(self, worker_id: str) -> tuple[bool, str | None]:
        conn, key = await self.redis.hmget(self._k(f"w:{worker_id}"), ["conn", "public_key"])
        return (conn is not None, _opt(_s(key)) if key is not None else None)

    async def relay_target(self, worker_id: str, conn_id: str, to: str) -> str | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self._k(f"w:{worker_id}"), ["conn", "paired_with"])
            pipe.hmget(self._k(f"w:{to}"), ["conn", "paired_with"])
            (own_conn, own_peer), (peer_conn, peer_peer) = await pipe.execute()
        if own_conn is None or peer_conn is None or _s(own_conn) != conn_id:
            return None
        if own_peer is None or peer_peer is None:
            return None
        if _s(own_peer) != to or _s(peer_peer) != worker_id:
            return None
        return _s(peer_conn)

    async def list_workers(self) -> list[dict[str, Any]]:
        ids = [_s(i) for i in await self.redis.smembers(self._k("workers"))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(self._k(f"w:{wid}"))
            hashes = await pipe.execute()
        records = [
            _record(
                {_s(k): _s(v) for k, v in h.items()}, self._corrupt_hint, self._corrupt_endpoint
            )
            for h in hashes
            if h
        ]
        return [r.to_public_dict() for r in sorted(records, key=lambda r: r.seq)]

    async def forward(self, action: Action) -> None:
        instance, sep, _ = action.conn_id.rpartition("/")
        if not sep or instance == self.instance_id:
            logger.debug("dropping %s for a connection that has gone", type(action).__name__)
            return
        payload: dict[str, Any] = {"w": action.worker_id, "c": action.conn_id}
        if isinstance(action, SendMessage):
            payload["t"] = action.message.model_dump_json()
        else:
            payload["close"] = [action.code, action.reason]
        await self.redis.publish(self._channel(instance), json.dumps(payload))

    # -- liveness -----------------------------------------------------------------------------

    async def _beat(self) -> bool:
        """Refresh our liveness key; False if it had expired (we may have been reaped)."""
        key = self._k(f"inst:{self.instance_id}")
        existed = await self.redis.set(key, "1", px=int(self.ttl_s * 1000), get=True)
        return existed is not None

    async def reap(self, instance_id: str) -> int:
        """Unregister every worker of ``instance_id`` and deliver the consequences."""
        members = [_s(m) for m in await self.redis.smembers(self._k(f"instw:{instance_id}"))]
        for wid in members:
            conn = await self.redis.hget(self._k(f"w:{wid}"), "conn")
            if conn is None or not _s(conn).startswith(instance_id + "/"):
                await self.redis.srem(self._k(f"instw:{instance_id}"), wid)
                continue
            actions = await self.unregister(wid, _s(conn))
            for action in actions:
                await self._deliver_anywhere(action)
        await self.redis.delete(self._k(f"instw:{instance_id}"))
        await self.redis.srem(self._k("instances"), instance_id)
        return len(members)

    async def _deliver_anywhere(self, action: Action) -> None:
        instance = action.conn_id.rpartition("/")[0]
        if instance == self.instance_id:
            if self._deliver is not None:
                self._deliver(action)
        else:
            await self.forward(action)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                if not await self._beat():
                    logger.warning("instance %s lost its registration; resetting", self.instance_id)
                    await self.redis.sadd(self._k("instances"), self.instance_id)
                    if self._on_reset is not None:
                        self._on_reset()
                for other in [_s(i) for i in await self.redis.smembers(self._k("instances"))]:
                    if other == self.instance_id:
                        continue
                    if not await self.redis.exists(self._k(f"inst:{other}")):
                        n = await self.reap(other)
                        self.reaped_instances += 1
                        logger.warning("reaped dead instance %s (%d workers)", other, n)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Redis heartbeat failed")

    async def _listen(self) -> None:
        while True:
            try:
                async for message in self._pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    self._handle_remote(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Redis subscription failed; retrying")
                await asyncio.sleep(1.0)

    def _handle_remote(self, data: Any) -> None:
        try:
            payload = json.loads(data)
            wid, conn = str(payload["w"]), str(payload["c"])
            if "t" in payload:
                action: Action = SendMessage(wid, conn, parse_rendezvous_message(payload["t"]))
            else:
                code, reason = payload["close"]
                action = CloseConnection(wid, conn, int(code), str(reason))
        except (ValueError, KeyError, TypeError, RemoteProtocolError) as exc:
            logger.warning("dropping malformed message from Redis: %s", exc)
            return
        if self._deliver is not None:
            self._deliver(action)
