"""Per-key admission: requests per minute, tokens per minute, requests in flight and a token budget per day or
month, checked and reserved in one atomic step and settled to the real usage when the response ends.

Two backends behind one interface: ``LocalLimiter`` (in-process, exact for one gateway replica: the embedded
default) and ``RedisLimiter`` (one Lua script per admission, exact across every replica that shares the Redis).
The windows are sliding logs, not fixed buckets: no 60 s span ever admits more than the limit.
"""

from __future__ import annotations

import calendar
import collections
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from mass.access.keys import ApiKey
from mass.errors import MassError, QuotaExceeded, RateLimited

log = logging.getLogger(__name__)

WINDOW_S = 60.0
OK, RPM, TPM, PARALLEL, BUDGET = 0, 1, 2, 3, 4


class LimitsUnavailable(MassError):
    """A key's budget cannot be checked (the shared limit store is down): budgets fail closed."""

    code = "limits_unavailable"
    http_status = 503
    exit_code = 7


@dataclass
class Quota:
    """What a key has left at admission (for OpenAI's ``x-ratelimit-*`` headers); None where there is no limit."""

    rpm: int | None = None
    requests_left: int | None = None
    requests_reset_s: float = 0.0
    tpm: int | None = None
    tokens_left: int | None = None
    tokens_reset_s: float = 0.0

    def headers(self) -> list[tuple[str, str]]:
        """The ``x-ratelimit-*`` headers for the limits the key has."""
        out = []
        if self.rpm is not None:
            out += [("x-ratelimit-limit-requests", str(self.rpm)),
                    ("x-ratelimit-remaining-requests", str(max(0, self.requests_left or 0))),
                    ("x-ratelimit-reset-requests", duration(self.requests_reset_s))]
        if self.tpm is not None:
            out += [("x-ratelimit-limit-tokens", str(self.tpm)),
                    ("x-ratelimit-remaining-tokens", str(max(0, self.tokens_left or 0))),
                    ("x-ratelimit-reset-tokens", duration(self.tokens_reset_s))]
        return out


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``250ms``, ``12s``, ``1m30s``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    seconds = math.ceil(seconds)
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60}s"


@dataclass
class Reservation:
    """An admitted request's hold on its key's limits, until ``settle``."""

    key: ApiKey
    id: str
    tokens: int  # reserved: prompt estimate + max_tokens
    at: float  # admission time (wall clock, seconds)
    period: str | None  # the budget period it counts against ("2026-11-26", "2026-11")
    quota: Quota = field(default_factory=Quota)  # what the key had left after this admission
    backend: Any = None  # the limiter whose ``settle`` takes it back
    settled: bool = False
    local: bool = False  # admitted by a Redis limiter's in-process fallback (Redis was down)


@dataclass
class Refusal:
    """Why a request was not admitted."""

    reason: int
    retry_after_s: float
    quota: Quota
    detail: str = ""


def budget_period(key: ApiKey, now: float) -> tuple[str | None, float]:
    """(the budget period ``now`` falls in, seconds until it ends); (None, 0) for a key without a budget."""
    if not key.budget_tokens:
        return None, 0.0
    kind = "month" if key.budget_period == "month" else "day"
    start, end, label = _PERIODS.get(kind, (0.0, 0.0, ""))
    if not start <= now < end:  # on every admission: the calendar is consulted once a period, not per request
        start, end, label = _PERIODS[kind] = _period_at(kind, now)
    return label, end - now


def reservation_ids() -> Iterator[str]:
    """Reservation ids unique across replicas and restarts (a random prefix and a counter): not a ``uuid4`` per
    request, whose ``os.urandom`` is a syscall that showed in the gateway's profile under load."""
    prefix = uuid.uuid4().hex[:16] + "-"
    return (f"{prefix}{n}" for n in itertools.count())


_PERIODS: dict[str, tuple[float, float, str]] = {}  # kind -> (start, end, label) of the period last asked for


def _period_at(kind: str, now: float) -> tuple[float, float, str]:
    """(start, end, label) of the UTC day or month that ``now`` falls in."""
    t = datetime.fromtimestamp(now, timezone.utc)
    if kind == "month":
        start = datetime(t.year, t.month, 1, tzinfo=timezone.utc).timestamp()
        return start, start + calendar.monthrange(t.year, t.month)[1] * 86400, t.strftime("%Y-%m")
    start = datetime(t.year, t.month, t.day, tzinfo=timezone.utc).timestamp()
    return start, start + 86400, t.strftime("%Y-%m-%d")


def refusal_error(key: ApiKey, refusal: Refusal) -> MassError:
    """The 429 for a refusal, naming the limit and when to retry."""
    retry = max(1, math.ceil(refusal.retry_after_s))
    if refusal.reason == BUDGET:
        return QuotaExceeded(f"key {key.name!r} has spent its token budget of {key.budget_tokens} per "
                             f"{key.budget_period}{refusal.detail}; it renews in {duration(refusal.retry_after_s)}",
                             retry_after=retry)
    what = {RPM: f"{key.rpm} requests per minute", TPM: f"{key.tpm} tokens per minute",
            PARALLEL: f"{key.max_parallel} requests in flight"}[refusal.reason]
    return RateLimited(f"key {key.name!r} is over its limit of {what}{refusal.detail}; retry in {retry}s",
                       retry_after=retry)


def _too_big(key: ApiKey, tokens: int) -> str:
    """A reason the request can never be admitted, or ''."""
    if key.tpm is not None and tokens > key.tpm:
        return (f" (this request may use up to {tokens} tokens, more than the whole minute allows: lower "
                "max_tokens or send less text)")
    return ""


def period_start(period: str) -> datetime:
    """The UTC start of a budget period (``2026-11-26``: that day; ``2026-11``: that month)."""
    year, month, *day = (int(p) for p in period.split("-"))
    return datetime(year, month, day[0] if day else 1, tzinfo=timezone.utc)


class LocalLimiter:
    """Exact limits for one process (one gateway replica). ``scale`` divides every limit (the per-replica cap
    used while Redis is unreachable). ``seed(key_id, since)``: the tokens a key already spent since a time
    (the usage ledger's sum), asked once per key and budget period, so a restarted replica does not start
    budgets at zero; while it fails, budgets fail closed (LimitsUnavailable, 503)."""

    def __init__(self, scale: int = 1, seed: Callable[[str, datetime], int] | None = None) -> None:
        self.scale, self.seed = max(1, scale), seed
        self._seeded: set[tuple[str, str]] = set()
        self._requests: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._tokens: dict[str, collections.deque] = collections.defaultdict(collections.deque)  # [at, n, id]
        self._token_sum: dict[str, int] = collections.defaultdict(int)
        self._entry: dict[str, list] = {}
        self._inflight: dict[str, int] = collections.defaultdict(int)
        self._budget: dict[tuple[str, str], int] = collections.defaultdict(int)
        self._rids = reservation_ids()

    def _limit(self, value: int | None) -> int | None:
        return None if value is None else max(1, value // self.scale)

    def _expire(self, key_id: str, now: float) -> None:
        requests, tokens = self._requests[key_id], self._tokens[key_id]
        while requests and requests[0] <= now - WINDOW_S:
            requests.popleft()
        while tokens and tokens[0][0] <= now - WINDOW_S:
            _, n, rid = tokens.popleft()
            self._token_sum[key_id] -= n
            self._entry.pop(rid, None)

    def admit(self, key: ApiKey, tokens: int, now: float | None = None) -> Reservation | Refusal:
        """Reserve one request and ``tokens`` for ``key``, or say why not (nothing is reserved then)."""
        now = time.time() if now is None else now
        self._expire(key.id, now)
        rpm, tpm, par = self._limit(key.rpm), self._limit(key.tpm), self._limit(key.max_parallel)
        requests, token_log = self._requests[key.id], self._tokens[key.id]
        used_tokens = self._token_sum[key.id]
        period, period_left = budget_period(key, now)
        quota = Quota(rpm, None if rpm is None else rpm - len(requests),
                      (requests[0] + WINDOW_S - now) if requests else 0.0, tpm,
                      None if tpm is None else tpm - used_tokens,
                      (token_log[0][0] + WINDOW_S - now) if token_log else 0.0)
        if rpm is not None and len(requests) >= rpm:
            return Refusal(RPM, requests[0] + WINDOW_S - now, quota)
        if tpm is not None and used_tokens + tokens > tpm:
            return Refusal(TPM, _tokens_free_at(token_log, used_tokens + tokens - tpm, now), quota,
                           _too_big(key, tokens * self.scale))
        if par is not None and self._inflight[key.id] >= par:
            return Refusal(PARALLEL, 1.0, quota)
        if period is not None:
            self._seed(key, period)
            if self._budget[(key.id, period)] + tokens > key.budget_tokens:
                return Refusal(BUDGET, period_left, quota)
        rid = next(self._rids)
        requests.append(now)
        entry = [now, tokens, rid]
        token_log.append(entry)
        self._entry[rid] = entry
        self._token_sum[key.id] += tokens
        self._inflight[key.id] += 1
        if period is not None:
            self._budget[(key.id, period)] += tokens
        if quota.requests_left is not None:
            quota.requests_left -= 1
        if quota.tokens_left is not None:
            quota.tokens_left -= tokens
        return Reservation(key, rid, tokens, now, period, quota, self)

    def settle(self, reservation: Reservation, used: int) -> None:
        """Charge the real usage instead of the reservation and free the in-flight slot (once)."""
        if reservation.settled:
            return
        reservation.settled = True
        key_id = reservation.key.id
        self._inflight[key_id] -= 1
        entry = self._entry.get(reservation.id)
        if entry is not None:  # still inside the window
            self._token_sum[key_id] += used - entry[1]
            entry[1] = used
        if reservation.period is not None:
            self._budget[(key_id, reservation.period)] += used - reservation.tokens

    def _seed(self, key: ApiKey, period: str) -> None:
        """Start ``key``'s budget for ``period`` from what the ledger says it spent (once)."""
        if self.seed is None or (key.id, period) in self._seeded:
            return
        try:
            spent = self.seed(key.id, period_start(period))
        except MassError as exc:
            raise LimitsUnavailable(f"key {key.name!r} has a token budget, and what it already spent cannot be read "
                                    f"from the usage ledger ({exc.message}); retry shortly",
                                    retry_after=1) from exc
        self._budget[(key.id, period)] += spent
        self._seeded.add((key.id, period))

    def spent(self, key: ApiKey, now: float | None = None) -> int:
        """Tokens charged to ``key``'s current budget period."""
        period, _ = budget_period(key, time.time() if now is None else now)
        return 0 if period is None else self._budget[(key.id, period)]


def _tokens_free_at(token_log, excess: int, now: float) -> float:
    """Seconds until ``excess`` tokens have left the window."""
    freed = 0
    for at, n, _ in token_log:
        freed += n
        if freed >= excess:
            return at + WINDOW_S - now
    return WINDOW_S
