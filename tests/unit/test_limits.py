"""Per-key limits: the in-process limiter's windows, reservations and settlement (driven by an explicit clock),
and the Redis limiter against a real Redis — the same answers, exact under concurrency, and the failure policy
when its Redis stops (a private ``redis-server`` on a free port, never the machine's)."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from datetime import datetime, timezone

import pytest

from mass.access.keys import ApiKey
from mass.access.limits import BUDGET, PARALLEL, RPM, TPM, LimitsUnavailable, LocalLimiter, Refusal, Reservation


def key(**limits) -> ApiKey:
    now = datetime.now(timezone.utc)
    fields = {"rpm": None, "tpm": None, "max_parallel": None, "budget_tokens": None, "budget_period": None,
              **limits}
    return ApiKey(id=uuid.uuid4().hex[:12], name="k", models=("*",), admin=False, created_at=now, updated_at=now,
                  revoked_at=None, **fields)


def test_requests_per_minute_is_a_sliding_window():
    lim, k = LocalLimiter(), key(rpm=3)
    admitted = [lim.admit(k, 0, now=t) for t in (0.0, 10.0, 20.0)]
    assert all(isinstance(r, Reservation) for r in admitted)
    assert admitted[-1].quota.requests_left == 0
    refused = lim.admit(k, 0, now=59.9)
    assert isinstance(refused, Refusal) and refused.reason == RPM and refused.retry_after_s == pytest.approx(0.1)
    assert isinstance(lim.admit(k, 0, now=60.0), Reservation)  # the first one left the window
    assert isinstance(lim.admit(k, 0, now=65.0), Refusal)  # no fixed bucket boundary lets a burst through


def test_tokens_are_reserved_then_settled_to_the_real_usage():
    lim, k = LocalLimiter(), key(tpm=100)
    first = lim.admit(k, 80, now=0.0)
    assert isinstance(first, Reservation) and first.quota.tokens_left == 20
    refused = lim.admit(k, 30, now=1.0)
    assert refused.reason == TPM and refused.retry_after_s == pytest.approx(59.0)
    lim.settle(first, 10)  # the request used 10 of its 80
    second = lim.admit(k, 30, now=2.0)
    assert isinstance(second, Reservation) and second.quota.tokens_left == 60
    lim.settle(second, 30)
    lim.settle(second, 999)  # settling twice changes nothing
    assert lim.admit(k, 61, now=3.0).reason == TPM
    too_big = lim.admit(k, 101, now=3.0)
    assert "more than the whole minute allows" in too_big.detail


def test_parallel_slots_free_when_settled():
    lim, k = LocalLimiter(), key(max_parallel=2)
    a, b = lim.admit(k, 1, now=0.0), lim.admit(k, 1, now=0.0)
    assert lim.admit(k, 1, now=0.0).reason == PARALLEL
    lim.settle(a, 1)
    assert isinstance(lim.admit(k, 1, now=0.1), Reservation) and isinstance(b, Reservation)


def test_a_budget_is_never_exceeded_and_renews_with_its_period():
    lim, k = LocalLimiter(), key(budget_tokens=100, budget_period="day")
    noon = datetime(2026, 11, 26, 12, tzinfo=timezone.utc).timestamp()
    r = lim.admit(k, 60, now=noon)
    refused = lim.admit(k, 41, now=noon)
    assert refused.reason == BUDGET and refused.retry_after_s == pytest.approx(12 * 3600)
    lim.settle(r, 59)
    assert isinstance(lim.admit(k, 41, now=noon), Reservation) and lim.spent(k, now=noon) == 100
    assert lim.admit(k, 1, now=noon).reason == BUDGET
    assert isinstance(lim.admit(k, 100, now=noon + 12 * 3600), Reservation)  # the next UTC day


def test_budget_periods_are_utc_days_and_months_whatever_order_they_are_asked_in():
    """budget_period keeps the period it last computed (it runs on every admission): asking across boundaries,
    backwards in time and for both kinds in turn still gives each instant its own period."""
    from mass.access.limits import budget_period

    day, month = key(budget_tokens=1, budget_period="day"), key(budget_tokens=1, budget_period="month")
    at = lambda *t: datetime(*t, tzinfo=timezone.utc).timestamp()  # noqa: E731
    for when, d, m, m_left in [((2026, 12, 31, 23, 59, 59), "2026-12-31", "2026-12", 1),
                               ((2027, 1, 1), "2027-01-01", "2027-01", 31 * 86400),
                               ((2026, 2, 28, 12), "2026-02-28", "2026-02", 12 * 3600),
                               ((2028, 2, 28, 12), "2028-02-28", "2028-02", 36 * 3600),  # a leap year
                               ((2026, 12, 31, 23, 59, 59), "2026-12-31", "2026-12", 1)]:
        now = at(*when)
        assert budget_period(day, now) == (d, pytest.approx((at(*when[:3]) + 86400) - now))
        assert budget_period(month, now) == (m, pytest.approx(m_left))
    assert budget_period(key(), at(2026, 1, 1)) == (None, 0.0)


def test_a_restarted_replica_starts_budgets_from_the_ledger(tmp_path):
    """The in-process limiter asks the usage ledger what a key spent in the period (once), so a restarted
    gateway does not hand out the budget again; while the ledger cannot be read, budgets fail closed."""
    from functools import partial

    from sqlalchemy import insert

    from mass.access.db import transaction
    from mass.access.ledger import spent_since
    from mass.access.schema import usage_records

    url, k = f"sqlite:///{tmp_path / 'mass.db'}", key(budget_tokens=1000, budget_period="day")
    noon = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
    rows = [(noon.replace(hour=9), 600, 300), (noon.replace(day=25, hour=23), 5000, 5000)]  # today, yesterday
    with transaction(url) as conn:
        conn.execute(insert(usage_records), [
            {"at": at, "request_id": uuid.uuid4().hex, "key_id": k.id, "model": "m", "path": "/v1/completions",
             "status": 200, "error_code": None, "prompt_tokens": p, "completion_tokens": c, "latency_ms": 1.0,
             "overhead_ms": 0.1} for at, p, c in rows])
    lim = LocalLimiter(seed=partial(spent_since, url))
    assert isinstance(lim.admit(k, 100, now=noon.timestamp()), Reservation)  # 900 spent before the restart
    assert lim.admit(k, 1, now=noon.timestamp()).reason == BUDGET and lim.spent(k, now=noon.timestamp()) == 1000
    assert isinstance(lim.admit(k, 1000, now=noon.timestamp() + 12 * 3600), Reservation)  # a new day: from 0
    unreadable = LocalLimiter(seed=partial(spent_since, "postgresql+psycopg2://postgres@127.0.0.1:1/none"))
    with pytest.raises(LimitsUnavailable, match="cannot be read from the usage ledger"):
        unreadable.admit(k, 1, now=noon.timestamp())
    assert isinstance(unreadable.admit(key(rpm=5), 1), Reservation)  # a key without a budget is unaffected


def test_the_per_replica_cap_divides_every_limit():
    lim, k = LocalLimiter(scale=2), key(rpm=5, tpm=100)
    assert [isinstance(lim.admit(k, 0, now=0.0), Reservation) for _ in range(3)] == [True, True, False]
    assert lim.admit(key(tpm=100), 51, now=0.0).reason == TPM


def test_refusals_name_the_limit_and_when_to_retry():
    from mass.access.limits import refusal_error

    k = key(rpm=3, budget_tokens=10, budget_period="month")
    err = refusal_error(k, Refusal(RPM, 2.2, None))
    assert (err.code, err.http_status, err.details["retry_after"]) == ("rate_limit_exceeded", 429, 3)
    assert "3 requests per minute" in err.message
    quota = refusal_error(k, Refusal(BUDGET, 3600, None))
    assert quota.code == "insufficient_quota" and "budget of 10 per month" in quota.message


# ------------------------------------------------------------------ Redis
@pytest.fixture
def private_redis():
    """A redis-server of this test's own on a free port (stopped and started by the test)."""
    from mass.cluster import free_port
    from tests.servers import PrivateRedis, redis_available

    assert redis_available(), "redis-server is not installed (every MASS machine and CI has it: apt install redis-server)"
    server = PrivateRedis(free_port())
    server.start()
    yield server
    server.remove()


def test_redis_limits_are_exact_under_concurrency(private_redis):
    from mass.access.redis_limits import RedisLimiter

    async def run():
        # generous timeouts: this test is about exactness, not about a slow Redis on a busy test machine
        lim = RedisLimiter(private_redis.url, replicas=2, timeout_s=10)
        other = RedisLimiter(private_redis.url, replicas=2, timeout_s=10)  # a second gateway replica
        k = key(rpm=50, budget_tokens=1000, budget_period="day")
        results = await asyncio.gather(*[(lim if i % 2 else other).admit(k, 10) for i in range(200)])
        admitted = [r for r in results if isinstance(r, Reservation)]
        reasons = collections.Counter(r.reason for r in results if isinstance(r, Refusal))
        # (once, in a full suite run, none of the 200 was admitted: the reasons say why if it happens again)
        assert len(admitted) == 50 and set(reasons) == {RPM}, (len(admitted), reasons, private_redis.up())
        await asyncio.gather(*[r.backend.settle(r, 4) for r in admitted])  # 200 of the 500 reserved
        b = key(tpm=100, max_parallel=3)
        held = [await lim.admit(b, 30) for _ in range(3)]
        assert all(isinstance(r, Reservation) for r in held)
        assert (await other.admit(b, 1)).reason == PARALLEL
        await lim.settle(held[0], 5)
        nxt = await other.admit(b, 30)
        assert isinstance(nxt, Reservation) and nxt.quota.tokens_left == 100 - 5 - 30 - 30 - 30
        assert (await lim.admit(b, 30)).reason in (TPM, PARALLEL)
        spent = int(await lim.redis.get(f"mass:limits:{{{k.id}}}:budget:{admitted[0].period}"))
        assert spent == 200
        await lim.close()
        await other.close()

    asyncio.run(run())


def test_a_batch_redis_ran_in_part_before_another_replica_loaded_the_script_is_charged_once(private_redis):
    """A fresh (or restarted) Redis has no script cached: a pipelined batch of admissions meets NOSCRIPT until
    some replica loads the script — possibly midway through the batch. Only the refused calls go again; the
    ones that ran are not run twice (seen once in a suite run as 0 of 200 admitted)."""
    import threading

    import redis as sync_redis

    from mass.access.redis_limits import ADMIT, RedisLimiter

    other = sync_redis.Redis.from_url(private_redis.url)
    done, loaded = threading.Event(), []

    def load_once_refused():  # a second replica: loads the script as soon as Redis refused a call for want of it
        while not done.is_set():
            stats = other.info("errorstats")
            if stats.get("errorstat_NOSCRIPT", {}).get("count"):
                other.script_load(ADMIT)
                loaded.append(stats["errorstat_NOSCRIPT"]["count"])
                return

    async def run():
        lim = RedisLimiter(private_redis.url, timeout_s=30, max_connections=4)
        k = key(rpm=3000)
        helper = threading.Thread(target=load_once_refused, daemon=True)
        helper.start()
        results = await asyncio.gather(*[lim.admit(k, 0) for _ in range(6000)])  # one batch, one pipeline
        done.set()
        helper.join()
        admitted = sum(isinstance(r, Reservation) for r in results)
        in_window = await lim.redis.zcard(f"mass:limits:{{{k.id}}}:req")
        await lim.close()
        return admitted, in_window

    admitted, in_window = asyncio.run(run())
    other.close()
    assert (admitted, in_window) == (3000, 3000)
    assert loaded  # the race this test is about happened: the script arrived after a refusal


def test_a_settlement_redis_did_not_take_is_tried_again_and_counted_once(private_redis):
    import redis as sync_redis

    from mass.access.redis_limits import RedisLimiter

    async def run():
        lim = RedisLimiter(private_redis.url, timeout_s=0.3, retry_s=0.2)
        k = key(budget_tokens=1000, budget_period="day")
        held = [await lim.admit(k, 20) for _ in range(3)]
        budget = f"mass:limits:{{{k.id}}}:budget:{held[0].period}"
        assert int(await lim.redis.get(budget)) == 60
        sync_redis.Redis.from_url(private_redis.url).execute_command("CLIENT", "PAUSE", 1500, "ALL")
        await asyncio.gather(*[r.backend.settle(r, 5) for r in held])  # each times out after 0.3 s
        assert lim.unsettled == 3
        deadline = time.monotonic() + 15
        while lim.unsettled:
            assert time.monotonic() < deadline, "the settlements were never taken"
            await asyncio.sleep(0.1)
        assert int(await lim.redis.get(budget)) == 15  # whether or not the timed-out tries ran
        await lim._send_settlement(held[0], 5, retry=True)  # a retry of one that ran changes nothing
        assert int(await lim.redis.get(budget)) == 15
        await lim.close()

    asyncio.run(run())


def test_redis_failure_policy_budgets_closed_rates_capped_per_replica_then_recovery(private_redis):
    from mass.access.redis_limits import RedisLimiter

    async def run():
        lim = RedisLimiter(private_redis.url, replicas=2, retry_s=0.2)
        rated, budgeted = key(rpm=10), key(budget_tokens=100, budget_period="day")
        assert isinstance(await lim.admit(rated, 1), Reservation)
        private_redis.stop()
        with pytest.raises(LimitsUnavailable) as info:
            await lim.admit(budgeted, 1)
        assert info.value.http_status == 503 and "budgets fail closed" in info.value.message
        local = [await lim.admit(rated, 1) for _ in range(6)]
        assert [isinstance(r, Reservation) for r in local] == [True] * 5 + [False]  # 10 rpm / 2 replicas
        for r in local[:5]:
            await r.backend.settle(r, 1)  # settled locally, no Redis needed
        private_redis.start()
        deadline = time.monotonic() + 10
        while True:  # back on Redis by itself: the budget is checked again
            try:
                result = await lim.admit(budgeted, 1)
                break
            except LimitsUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert isinstance(result, Reservation) and result.backend is lim
        await lim.close()

    asyncio.run(run())
