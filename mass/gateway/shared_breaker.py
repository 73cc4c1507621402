"""``SharedBreaker``: one model's circuit breaker kept in Redis, so every gateway replica of an app sees one state,
one window of outcomes and one set of half-open probes. The request path reads a local mirror; outcomes are
counted locally and sent, with the mirror refreshed, every ``SYNC_S`` (one Lua script per model). While Redis is
unreachable each replica falls back to a breaker of its own and returns to the shared one by itself."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from mass.gateway.breaker import CLOSED, OPEN, CircuitBreaker, Transition

log = logging.getLogger(__name__)
SYNC_S = 0.25  # outcomes go out and the state comes back this often: what another replica sees, at the latest

# KEYS: 1 state (hash: state, opened_at, probes, probes_out, probes_ok, probe_at, seq: transitions so far),
# 2 window (hash: "<second>:n|f" -> count), 3 transitions (list of JSON, newest first). Shared by both scripts.
_MOVE = """
local function move(new, why)
  redis.call('LPUSH', KEYS[3], cjson.encode({at = now, from = state, to = new, why = why}))
  redis.call('LTRIM', KEYS[3], 0, 19)
  redis.call('HSET', KEYS[1], 'state', new)
  redis.call('HINCRBY', KEYS[1], 'seq', 1)
  state = new
end
local function keep()
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], 86400) end
end
"""

# ARGV: now (s), successes, failures, failure ratio, min requests, window s, the transition seq the caller has.
# Returns state, opened_at, window requests, window failures, seq, and the transitions only when seq moved on.
SYNC = """
local now = tonumber(ARGV[1])
local ok, failed = tonumber(ARGV[2]), tonumber(ARGV[3])
local ratio, minreq, win, known = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local st = redis.call('HMGET', KEYS[1], 'state', 'opened_at')
local state = st[1] or 'closed'
local opened = st[2] or '0'
""" + _MOVE + """
local n, f = 0, 0
if state == 'half_open' then
  if failed > 0 then
    opened = ARGV[1]
    redis.call('HSET', KEYS[1], 'opened_at', opened)
    move('open', 'a probe request failed')
  elseif ok > 0 then
    local good = redis.call('HINCRBY', KEYS[1], 'probes_ok', ok)
    local want = tonumber(redis.call('HGET', KEYS[1], 'probes') or '1')
    if good >= want then
      redis.call('DEL', KEYS[2])
      move('closed', good .. ' probe requests succeeded')
    end
  end
else
  if ok + failed > 0 then
    local second = math.floor(now)
    redis.call('HINCRBY', KEYS[2], second .. ':n', ok + failed)
    if failed > 0 then redis.call('HINCRBY', KEYS[2], second .. ':f', failed) end
  end
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local second, kind = string.match(all[i], '^(%d+):(%a)$')
    if tonumber(second) + 1 <= now - win then
      redis.call('HDEL', KEYS[2], all[i])
    elseif kind == 'n' then
      n = n + tonumber(all[i + 1])
    else
      f = f + tonumber(all[i + 1])
    end
  end
  if state == 'closed' and n >= minreq and f / n >= ratio then
    opened = ARGV[1]
    redis.call('HSET', KEYS[1], 'opened_at', opened)
    move('open', f .. ' of the last ' .. n .. ' requests failed (limit ' .. math.floor(ratio * 100 + 0.5) ..
         '% of at least ' .. minreq .. ' in ' .. win .. 's, all gateway replicas)')
  end
end
keep()
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
return {state, opened, n, f, seq, seq ~= known and redis.call('LRANGE', KEYS[3], 0, 19) or {}}
"""

# ARGV: now (s), open s, half-open probes, stale s (a probe unanswered this long is given up: its replica died).
# Returns allowed (1/0), state, opened_at.
PROBE = """
local now = tonumber(ARGV[1])
local open_s, probes, stale = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local st = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'probes_out', 'probe_at')
local state = st[1] or 'closed'
local opened = st[2] or '0'
""" + _MOVE + """
if state == 'closed' then return {1, state, opened} end
if state == 'open' then
  if now < tonumber(opened) + open_s then return {0, state, opened} end
  move('half_open', open_s .. 's open: probing with ' .. probes .. ' requests')
  redis.call('HSET', KEYS[1], 'probes_out', 0, 'probes_ok', 0, 'probes', probes, 'probe_at', now)
  st[3], st[4] = '0', ARGV[1]
end
local out = tonumber(st[3] or '0')
if out >= probes and now - tonumber(st[4] or '0') > stale then out = 0 end
if out >= probes then return {0, state, opened} end
redis.call('HSET', KEYS[1], 'probes_out', out + 1, 'probe_at', now)
keep()
return {1, state, opened}
"""


class SharedBreaker:
    """The breaker of one model, shared by the gateway replicas through Redis; the interface of
    ``CircuitBreaker`` (``admit``, ``allow``, ``record``, ``retry_after_s``, ``status``).

    Args:
        model: the served model's name.
        redis: an asyncio Redis client (shared by the app's breakers).
        prefix: key prefix in Redis; the gateway uses ``mass:breaker:<app>`` so apps never share a breaker.
        stale_s: a half-open probe not answered within this long frees its slot (its gateway replica died).
        **settings: ``failure_ratio``, ``min_requests``, ``window_s``, ``open_s``, ``half_open_probes``.
    """

    def __init__(self, model: str, redis: Any, prefix: str, stale_s: float = 70.0, **settings: Any) -> None:
        from mass.access.redis_limits import ScriptBatch

        self.model, self.redis, self.stale_s = model, redis, stale_s
        self.local = CircuitBreaker(model, **settings)  # the settings; and the breaker while Redis is unreachable
        base = f"{prefix}:{{{model}}}"
        self.keys = [f"{base}:state", f"{base}:window", f"{base}:transitions"]
        self._sync, self._probe = ScriptBatch(redis, SYNC), ScriptBatch(redis, PROBE)
        self._state, self._opened_at = CLOSED, 0.0
        self._window = (0, 0)
        self._transitions: list[dict[str, Any]] = []
        self._seq = -1  # the shared transition count ``_transitions`` is from (read again only when it moves)
        self._ok = self._failed = 0
        self._logged_at = 0.0  # the newest shared transition this replica has logged
        self.shared = True  # False while Redis is unreachable: the local breaker decides

    @property
    def state(self) -> str:
        """The state that decides now: the shared one, or this replica's own while Redis is down."""
        return self._state if self.shared else self.local.state

    @property
    def transitions(self) -> list[Transition]:
        """Recent transitions, oldest first (the shared ones, or the local breaker's while Redis is down)."""
        if not self.shared:
            return list(self.local.transitions)
        return [Transition(t["at"], self.model, t["from"], t["to"], t["why"]) for t in reversed(self._transitions)]

    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets probes through (0 when not open)."""
        if not self.shared:
            return self.local.retry_after_s()
        return max(0.0, self._opened_at + self.local.open_s - time.time()) if self._state == OPEN else 0.0

    def allow(self) -> bool:
        """The mirror's answer without a round trip: closed lets through, open refuses, probing is ``admit``'s."""
        if not self.shared:
            return self.local.allow()
        return self._state == CLOSED

    async def admit(self) -> bool:
        """May a request go to the model now? Closed: yes, from the mirror. Open within ``open_s``: no. Otherwise
        one round trip claims a half-open probe slot shared by every replica."""
        from redis.exceptions import RedisError

        if not self.shared or self._state == CLOSED:
            return self.allow()
        if self._state == OPEN and time.time() < self._opened_at + self.local.open_s:
            return False
        try:
            allowed, state, opened = await self._probe(
                self.keys, [repr(time.time()), repr(self.local.open_s), self.local.half_open_probes,
                            repr(self.stale_s)])
        except (RedisError, OSError) as exc:
            self._lost(exc)
            return self.local.allow()
        self._mirror(state, opened)
        return bool(allowed)

    def record(self, failed: bool) -> None:
        """The outcome of a request ``admit`` let through: counted here, sent with the next sync."""
        if not self.shared:
            self.local.record(failed)
        elif failed:
            self._failed += 1
        else:
            self._ok += 1

    async def sync(self) -> None:
        """Send the outcomes counted since the last sync and refresh the mirror (and go back to the shared breaker
        when Redis answers again)."""
        from redis.exceptions import RedisError

        ok, failed = self._ok, self._failed
        self._ok = self._failed = 0
        try:
            state, opened, n, f, seq, transitions = await self._sync(
                self.keys, [repr(time.time()), ok, failed, repr(self.local.failure_ratio), self.local.min_requests,
                            repr(self.local.window_s), self._seq])
        except (RedisError, OSError) as exc:
            self._lost(exc)
            return
        if not self.shared:
            log.warning("circuit breaker of model %r: Redis answers again; the gateway replicas share it again",
                        self.model)
            self.shared = True
        self._mirror(state, opened)
        self._window = (int(n), int(f))
        if seq == self._seq:
            return
        self._seq, self._transitions = seq, [json.loads(t) for t in transitions]
        if not self._logged_at:  # a replica starting logs what happens from now on, not the history
            self._logged_at = self._transitions[0]["at"] if self._transitions else time.time()
        for t in reversed(self._transitions):  # every replica logs every shared transition once
            if t["at"] > self._logged_at:
                log.warning("circuit breaker of model %r: %s -> %s (%s)", self.model, t["from"], t["to"], t["why"])
                self._logged_at = t["at"]

    def _mirror(self, state: bytes | str, opened: bytes | str) -> None:
        self._state = state.decode() if isinstance(state, bytes) else state
        self._opened_at = float(opened)

    def _lost(self, exc: Exception) -> None:
        if self.shared:
            log.warning("circuit breaker of model %r: Redis unreachable (%s); this gateway replica keeps a breaker "
                        "of its own until Redis answers", self.model, type(exc).__name__)
        self.shared = False

    def status(self) -> dict[str, Any]:
        """State, window counts and recent transitions, and whether they are the shared ones."""
        if not self.shared:
            return {**self.local.status(), "shared": False}
        n, f = self._window
        return {"state": self._state, "window_requests": n, "window_failures": f,
                "retry_after_s": round(self.retry_after_s(), 3),
                "transitions": [t.to_dict() for t in self.transitions], "shared": True}


async def keep_in_sync(breakers: list[SharedBreaker], every_s: float = SYNC_S) -> None:
    """Sync every shared breaker every ``every_s`` (their scripts go out in one pipeline) until cancelled."""
    while True:
        await asyncio.gather(*(b.sync() for b in breakers))
        await asyncio.sleep(every_s)

