"""``RedisLimiter``: the per-key limits shared by every gateway replica, one Lua script per admission (check
every limit, then reserve all of them, or nothing) and one per settlement. While Redis is unreachable it
follows the named failure policy: budgets fail closed (503 ``limits_unavailable``), request and token rates
fail open to a local cap of limit / gateway replicas; it goes back to Redis by itself when Redis answers."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mass.access.keys import ApiKey
from mass.access.limits import (BUDGET, OK, WINDOW_S, LimitsUnavailable, LocalLimiter, Quota, Refusal,
                                Reservation, _too_big, budget_period, reservation_ids)

log = logging.getLogger(__name__)

# KEYS: 1 request log (zset: id -> admitted ms), 2 token log (zset: id -> admitted ms), 3 token amounts (hash:
# id -> tokens), 4 token sum (string), 5 in flight (zset: id -> expiry ms), 6 budget spent in the period (string)
# ARGV: now ms, id, rpm, tpm, max_parallel, budget (0: none), tokens, in-flight expiry ms, budget ttl s
ADMIT = """
local now, rid = tonumber(ARGV[1]), ARGV[2]
local rpm, tpm, par, budget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local need, hold, bttl = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local edge = now - 60000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', edge)
while true do
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', edge, 'LIMIT', 0, 500)
  if #old == 0 then break end
  local drop = 0
  for _, v in ipairs(redis.call('HMGET', KEYS[3], unpack(old))) do
    if v then drop = drop + tonumber(v) end
  end
  redis.call('DECRBY', KEYS[4], drop)
  redis.call('HDEL', KEYS[3], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local reqs = redis.call('ZCARD', KEYS[1])
local toks = tonumber(redis.call('GET', KEYS[4]) or '0')
local first_req = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or now
local first_tok = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or now
local reason, wait = 0, 0
if rpm > 0 and reqs >= rpm then
  reason, wait = 1, first_req + 60000 - now
elseif tpm > 0 and toks + need > tpm then
  reason = 2
  local excess, freed = toks + need - tpm, 0
  wait = 60000
  local ids = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #ids, 2 do
    freed = freed + tonumber(redis.call('HGET', KEYS[3], ids[i]) or '0')
    if freed >= excess then wait = tonumber(ids[i + 1]) + 60000 - now break end
  end
elseif par > 0 and redis.call('ZCARD', KEYS[5]) >= par then
  reason, wait = 3, 1000
elseif budget > 0 and tonumber(redis.call('GET', KEYS[6]) or '0') + need > budget then
  reason = 4
end
if reason == 0 then
  redis.call('ZADD', KEYS[1], now, rid)
  redis.call('PEXPIRE', KEYS[1], 61000)
  redis.call('ZADD', KEYS[2], now, rid)
  redis.call('PEXPIRE', KEYS[2], 61000)
  redis.call('HSET', KEYS[3], rid, need)
  redis.call('PEXPIRE', KEYS[3], 61000)
  toks = redis.call('INCRBY', KEYS[4], need)
  redis.call('PEXPIRE', KEYS[4], 61000)
  redis.call('ZADD', KEYS[5], now + hold, rid)
  redis.call('PEXPIRE', KEYS[5], hold + 1000)
  if budget > 0 then
    redis.call('INCRBY', KEYS[6], need)
    redis.call('EXPIRE', KEYS[6], bttl)
  end
  reqs = reqs + 1
end
return {reason, reqs, toks, math.floor(wait), math.floor(tonumber(first_req)), math.floor(tonumber(first_tok))}
"""

# KEYS as ADMIT; ARGV: id, tokens used, tokens reserved, budget (0: none), retry (1: an earlier try may have run)
# Safe to run twice: the window's amount is set, not added to; the budget moves only for the try that takes the
# request out of the in-flight set (a retry after a timed-out try that did run changes nothing). A first try
# moves it in any case (a request held past hold_s has left the set, and is still charged what it used).
SETTLE = """
local rid, used, reserved, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cur = redis.call('HGET', KEYS[3], rid)
if cur then
  redis.call('HSET', KEYS[3], rid, used)
  redis.call('INCRBY', KEYS[4], used - tonumber(cur))
end
local first = redis.call('ZREM', KEYS[5], rid) == 1 or ARGV[5] == '0'
if first and budget > 0 and redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('INCRBY', KEYS[6], used - reserved)
end
return first and 1 or 0
"""


class ScriptBatch:
    """Runs one Lua script for many callers with one round trip per event-loop turn: calls made in the same
    turn go out together in a pipeline (each script call stays atomic on its own). Under load this turns N
    round trips, N pool checkouts and N socket writes into one."""

    def __init__(self, redis, script: str) -> None:
        self.redis, self.script = redis, redis.register_script(script)
        self._pending: list[tuple[list[str], list, asyncio.Future]] = []
        self._flushes: set[asyncio.Task] = set()

    async def __call__(self, keys: list[str], args: list) -> Any:
        """The script's result for ``keys`` and ``args`` (or its error)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((keys, args, future))
        if len(self._pending) == 1:  # the flush's first step runs next turn, after this turn's other calls joined
            task = loop.create_task(self._flush())
            self._flushes.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._flushes.discard)
        return await future

    async def _flush(self) -> None:
        from redis.exceptions import NoScriptError

        batch, self._pending = self._pending, []
        results: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        try:
            for attempt in range(2):
                if attempt:  # the server lost its script cache (restarted): load the script again
                    await self.script.registered_client.script_load(self.script.script)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for i in todo:
                        keys, args, _ = batch[i]
                        pipe.evalsha(self.script.sha, len(keys), *keys, *args)
                    for i, result in zip(todo, await pipe.execute(raise_on_error=False)):
                        results[i] = result
                # only the calls Redis refused with NOSCRIPT go again: the others ran, and an admission is not
                # idempotent (another replica may load the script midway through this batch)
                todo = [i for i in todo if isinstance(results[i], NoScriptError)]
                if not todo:
                    break
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets it
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), result in zip(batch, results):
            if not future.done():
                future.set_exception(result) if isinstance(result, Exception) else future.set_result(result)


class RedisLimiter:
    """Limits shared through Redis at ``url``.

    Args:
        url: ``redis://host:port/db``.
        replicas: gateway replicas (the per-replica cap while Redis is down is limit / replicas).
        prefix: key prefix in Redis (tests use their own).
        hold_s: an in-flight slot a dead replica never released frees itself after this long.
        retry_s: after a failure, Redis is tried again this long later (requests meanwhile use the fallback).
        timeout_s: a Redis call (or the wait for a pooled connection) slower than this counts as Redis down.
        max_connections: connections per replica (admissions queue for one beyond it).
    """

    def __init__(self, url: str, replicas: int = 1, prefix: str = "mass:limits", hold_s: float = 600.0,
                 retry_s: float = 1.0, timeout_s: float = 1.0, max_connections: int = 32) -> None:
        import redis.asyncio as aioredis

        self.url, self.prefix, self.hold_s, self.retry_s = url, prefix, hold_s, retry_s
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                                        socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._admit, self._settle = ScriptBatch(self.redis, ADMIT), ScriptBatch(self.redis, SETTLE)
        self.fallback = LocalLimiter(scale=replicas)
        self._rids = reservation_ids()
        self._down_until = 0.0
        self.failures = 0
        self._unsettled: list[tuple[Reservation, int]] = []  # settlements Redis did not take, tried again
        self._retrier: asyncio.Task | None = None

    def _keys(self, key: ApiKey, period: str | None) -> list[str]:
        base = f"{self.prefix}:{{{key.id}}}"
        return [f"{base}:req", f"{base}:tok", f"{base}:tokn", f"{base}:toksum", f"{base}:par",
                f"{base}:budget:{period or '-'}"]

    def _down(self, exc: Exception) -> None:
        if self._down_until <= time.monotonic():
            log.warning("Redis at %s unreachable (%s): budgets fail closed, rates fall back to a per-replica cap; "
                        "retrying in %.0fs", self.url.split("@")[-1], type(exc).__name__, self.retry_s)
        self.failures += 1
        self._down_until = time.monotonic() + self.retry_s

    async def admit(self, key: ApiKey, tokens: int) -> Reservation | Refusal:
        """Reserve one request and ``tokens`` for ``key`` across every replica, or say why not."""
        from redis.exceptions import RedisError

        now = time.time()
        period, period_left = budget_period(key, now)
        if time.monotonic() >= self._down_until:
            rid = next(self._rids)
            try:
                reason, reqs, toks, wait_ms, first_req, first_tok = await self._admit(
                    keys=self._keys(key, period),
                    args=[int(now * 1000), rid, key.rpm or 0, key.tpm or 0, key.max_parallel or 0,
                          key.budget_tokens or 0, tokens, int(self.hold_s * 1000), int(period_left) + 3600])
            except (RedisError, OSError) as exc:
                self._down(exc)
            else:
                if self._down_until:
                    log.warning("Redis at %s reachable again: shared limits restored", self.url.split("@")[-1])
                    self._down_until = 0.0
                now_ms = now * 1000
                quota = Quota(key.rpm, None if key.rpm is None else key.rpm - reqs,
                              max(0.0, (first_req + WINDOW_S * 1000 - now_ms) / 1000), key.tpm,
                              None if key.tpm is None else key.tpm - toks,
                              max(0.0, (first_tok + WINDOW_S * 1000 - now_ms) / 1000))
                if reason == OK:
                    return Reservation(key, rid, tokens, now, period, quota, self)
                wait = period_left if reason == BUDGET else wait_ms / 1000
                return Refusal(reason, wait, quota, _too_big(key, tokens) if reason == 2 else "")
        if key.budget_tokens:
            raise LimitsUnavailable(f"key {key.name!r} has a token budget, and the limit store (Redis) is "
                                    f"unreachable: budgets fail closed; retry in {self.retry_s:.0f}s",
                                    retry_after=max(1, int(self.retry_s)))
        result = self.fallback.admit(key, tokens, now)
        if isinstance(result, Reservation):
            result.backend, result.local = self, True
        return result

    async def settle(self, reservation: Reservation, used: int) -> None:
        """Charge the real usage instead of the reservation and free the in-flight slot (once)."""
        from redis.exceptions import RedisError

        if reservation.local:
            self.fallback.settle(reservation, used)
            return
        if reservation.settled:
            return
        reservation.settled = True
        try:
            await self._send_settlement(reservation, used, retry=False)
        except (RedisError, OSError) as exc:
            self._down(exc)
            self._unsettled.append((reservation, used))
            if self._retrier is None or self._retrier.done():
                self._retrier = asyncio.get_running_loop().create_task(self._retry_settlements())

    async def _send_settlement(self, reservation: Reservation, used: int, retry: bool) -> None:
        key = reservation.key
        await self._settle(keys=self._keys(key, reservation.period),
                           args=[reservation.id, used, reservation.tokens, key.budget_tokens or 0, int(retry)])

    async def _retry_settlements(self) -> None:
        """Try the settlements Redis did not take (a timeout, a restart) every ``retry_s`` until it takes them: a
        timed-out one may have run, so the script changes nothing the second time. One older than ``hold_s`` is
        dropped (its in-flight slot has freed itself; its budget keeps the reservation: an over-count, never an
        under-count)."""
        from redis.exceptions import RedisError

        while self._unsettled:
            await asyncio.sleep(self.retry_s)
            batch = list(self._unsettled)  # they stay counted (``unsettled``) until Redis has taken them
            results = await asyncio.gather(*[self._send_settlement(r, used, retry=True) for r, used in batch],
                                           return_exceptions=True)
            again = []
            for (reservation, used), result in zip(batch, results):
                if not isinstance(result, BaseException):
                    continue
                if isinstance(result, (RedisError, OSError)) and time.time() < reservation.at + self.hold_s:
                    self._down(result)
                    again.append((reservation, used))
                else:
                    log.warning("Redis did not take the settlement of request %s of key %r (%s): its budget keeps "
                                "the %d tokens reserved (used: %d)", reservation.id, reservation.key.name,
                                type(result).__name__, reservation.tokens, used)
            self._unsettled = again + self._unsettled[len(batch):]  # those that failed meanwhile come after

    @property
    def unsettled(self) -> int:
        """Settlements waiting for Redis to take them."""
        return len(self._unsettled)

    async def close(self) -> None:
        """Close the connection pool (settlements still waiting for Redis are dropped, and logged)."""
        if self._retrier is not None and not self._retrier.done():
            self._retrier.cancel()
        if self._unsettled:
            log.warning("closing with %d settlements Redis has not taken: those budgets keep their reservations",
                        len(self._unsettled))
        await self.redis.aclose()
