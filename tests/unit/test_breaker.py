"""Circuit breakers and fallbacks: the breaker's states on a driven clock, then the in-process gateway with a
model whose deployment fails (faults injected into the real deployment object): the breaker opens, calls fail
fast or go to the fallback (``x-mass-model`` names who answered), probes close it again, and a replica lost
before any output is retried once, transparently."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from mass.gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_breaker_opens_on_the_failure_ratio_probes_and_closes():
    clock = Clock()
    b = CircuitBreaker("m", failure_ratio=0.5, min_requests=4, window_s=10, open_s=5, half_open_probes=2,
                       clock=clock)
    for failed in (True, False, True):
        assert b.allow()
        b.record(failed)
    assert b.state == CLOSED  # 2 of 3 failed, but fewer than min_requests outcomes
    b.record(True)
    assert b.state == OPEN and not b.allow() and b.retry_after_s() == 5
    clock.now = 5.0
    assert b.allow() and b.state == HALF_OPEN and b.allow() and not b.allow()  # two probes, no more
    b.record(False)
    b.record(True)  # a probe failed: open again
    assert b.state == OPEN
    clock.now = 10.0
    assert b.allow() and b.allow()
    b.record(False)
    b.record(False)
    assert b.state == CLOSED and [t["to"] for t in b.status()["transitions"]] == [
        OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_old_outcomes_leave_the_window():
    clock = Clock()
    b = CircuitBreaker("m", failure_ratio=0.5, min_requests=2, window_s=10, clock=clock)
    b.record(True)
    clock.now = 11.0
    b.record(True)
    assert b.state == CLOSED  # the first failure is out of the window: one outcome is not enough
    assert b.status()["window_requests"] == 1
    b.record(False)
    assert b.state == OPEN  # 1 failure in 2 is the 50 % limit


@pytest.fixture(scope="module")
def flaky(lm, unit_keys):
    """An in-process gateway: ``primary`` (falls back to ``backup``) and ``solo`` (no fallback), each a real LLM
    deployment over the session's tiny GPT-2; breakers open after 2 of 2 failures for 1 s."""
    from mass.gateway.app import create_app
    from tests.inprocess import build_state

    app = {"gateway": {"breaker": {"min_requests": 2, "failure_ratio": 0.5, "open_s": 1.0, "half_open_probes": 1}},
           "models": [{"name": n, "ref": "tiny-gpt@production", "engine": "llm", "max_tokens_limit": 16,
                       **({"fallbacks": ["backup"]} if n == "primary" else {})} for n in ("primary", "backup", "solo")]}
    state = build_state(app, {n: lm for n in ("primary", "backup", "solo")}, keys=unit_keys["store"])
    with TestClient(create_app(state), raise_server_exceptions=False,
                    headers={"Authorization": f"Bearer {unit_keys['admin']}"}) as client:
        yield client, state
    for route in state.routes.values():
        route.handle._target.served.engine.shutdown()


def fail_with(state, name, exc_factory, times=None):
    """Make model ``name``'s deployment raise ``exc_factory()`` on its next ``times`` calls (all when None)."""
    server = state.routes[name].handle._target
    real_generate, real_stream = server.generate, server.stream
    left = [times]

    def failing():
        if left[0] is None:
            return True
        left[0] -= 1
        return left[0] >= 0

    async def generate(request):
        if failing():
            raise exc_factory()
        return await real_generate(request)

    async def stream(request):
        if failing():
            raise exc_factory()
        async for event in real_stream(request):
            yield event

    server.generate, server.stream = generate, stream
    return lambda: setattr(server, "generate", real_generate) or setattr(server, "stream", real_stream)


BODY = {"prompt": "Return the", "max_tokens": 4, "temperature": 0}


def test_an_open_breaker_sends_calls_to_the_fallback_and_probes_close_it(flaky):
    client, state = flaky
    heal = fail_with(state, "primary", lambda: RuntimeError("injected model failure"))
    try:
        failures = [client.post("/v1/completions", json={"model": "primary", **BODY}) for _ in range(2)]
        assert [r.status_code for r in failures] == [500, 500]  # the model's own failures, counted
        assert state.routes["primary"].breaker.state == OPEN
        moved = client.post("/v1/completions", json={"model": "primary", **BODY})
        assert moved.status_code == 200 and moved.headers["x-mass-model"] == "backup"
        assert moved.json()["model"] == "backup"
        streamed = client.post("/v1/completions", json={"model": "primary", **BODY, "stream": True})
        assert streamed.status_code == 200 and streamed.headers["x-mass-model"] == "backup"
        services = client.get("/admin/services").json()["data"]
        assert services["primary"]["breaker"]["state"] == OPEN and services["primary"]["fallbacks"] == ["backup"]
        assert "2 of the last 2 requests failed" in services["primary"]["breaker"]["transitions"][-1]["why"]
    finally:
        heal()
    deadline = time.monotonic() + 10
    while True:  # after open_s a probe goes to the healed primary and closes the breaker
        resp = client.post("/v1/completions", json={"model": "primary", **BODY})
        if resp.headers.get("x-mass-model") == "primary":
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert resp.status_code == 200 and state.routes["primary"].breaker.state == CLOSED


def test_an_open_breaker_without_fallback_fails_fast_with_retry_after(flaky):
    client, state = flaky
    heal = fail_with(state, "solo", lambda: RuntimeError("injected"))
    try:
        for _ in range(2):
            client.post("/v1/completions", json={"model": "solo", **BODY})
        started = time.perf_counter()
        resp = client.post("/v1/completions", json={"model": "solo", **BODY})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "circuit_open"
        assert int(resp.headers["retry-after"]) >= 1 and time.perf_counter() - started < 5
    finally:
        heal()


def test_a_replica_lost_before_any_output_is_retried_once_transparently(flaky):
    from ray.exceptions import ActorDiedError

    client, state = flaky
    heal = fail_with(state, "backup", ActorDiedError, times=1)
    try:
        whole = client.post("/v1/completions", json={"model": "backup", **BODY})
        assert whole.status_code == 200 and whole.headers["x-mass-model"] == "backup"
    finally:
        heal()
    heal = fail_with(state, "backup", ActorDiedError, times=1)
    try:
        streamed = client.post("/v1/completions", json={"model": "backup", **BODY, "stream": True})
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    finally:
        heal()
    heal = fail_with(state, "backup", ActorDiedError)  # lost again on the retry: an upstream failure, not a 500
    try:
        resp = client.post("/v1/completions", json={"model": "backup", **BODY})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable"
        assert "retry-after" in resp.headers
    finally:
        heal()


@pytest.fixture(scope="module")
def resumable(lm, unit_keys):
    """An in-process gateway serving ``tiny`` (a real LLM deployment over the session's tiny GPT-2) whose breaker
    does not open during these tests (each lost replica counts as a failure)."""
    from mass.gateway.app import create_app
    from tests.inprocess import build_state

    app = {"gateway": {"breaker": {"min_requests": 1000}},
           "models": [{"name": "tiny", "ref": "tiny-gpt@production", "engine": "llm", "max_tokens_limit": 16}]}
    state = build_state(app, {"tiny": lm}, keys=unit_keys["store"])
    with TestClient(create_app(state), raise_server_exceptions=False,
                    headers={"Authorization": f"Bearer {unit_keys['admin']}"}) as client:
        yield client, state
    state.routes["tiny"].handle._target.served.engine.shutdown()


def die_mid_stream(state, name, after: int, times: int = 1):
    """Make model ``name``'s next ``times`` streams lose their replica after ``after`` choice events; returns
    (heal, the requests the deployment was sent, ``died`` set on those whose replica was lost)."""
    from ray.exceptions import ActorDiedError

    server = state.routes[name].handle._target
    real_stream, sent, left = server.stream, [], [times]

    async def stream(request):
        sent.append(request)
        dying, left[0] = left[0] > 0, left[0] - 1
        seen = 0
        async for event in real_stream(request):
            if dying and "index" in event:
                if seen == after:
                    sent[-1] = {**request, "died": True}
                    raise ActorDiedError()
                seen += 1
            yield event

    server.stream = stream
    return (lambda: setattr(server, "stream", real_stream)), sent


def streamed_text(resp) -> tuple[list[str], dict]:
    """Each choice's streamed text and the usage chunk of a completions SSE body."""
    texts, usage = {}, None
    for block in resp.text.split("\n\n"):
        if block.startswith("data: {"):
            data = json.loads(block[6:])
            assert "error" not in data, data
            usage = data.get("usage") or usage
            for c in data["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert resp.text.endswith("data: [DONE]\n\n"), resp.text[-300:]
    return [texts[i] for i in sorted(texts)], usage


@pytest.mark.parametrize("fields", [{}, {"n": 2, "frequency_penalty": 1.5}, {"echo": True},
                                    {"echo": True, "prompt": ["Return the", "A"]}])  # cut between two echoes
def test_a_stream_whose_replica_dies_mid_way_resumes_where_it_stopped(resumable, fields):
    """Greedy output resumed on another replica (the same model) is exactly the uninterrupted output, with the
    same usage, whichever event the replica died after; the stop string's held-back text is decided once."""
    client, state = resumable
    body = {"model": "tiny", "prompt": "Return the", "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **fields}
    whole, usage = streamed_text(client.post("/v1/completions", json=body))
    stop = whole[0][len(whole[0]) // 2:][:3]
    cases = [(body, whole, usage)]
    if stop.strip() and not fields:
        stopped = {**body, "stop": [stop]}
        cases.append((stopped, *streamed_text(client.post("/v1/completions", json=stopped))))
    for request, expected, expected_usage in cases:
        for after in (0, 1, 3, 6):
            heal, sent = die_mid_stream(state, "tiny", after)
            try:
                resp = client.post("/v1/completions", json=request)
            finally:
                heal()
            assert resp.status_code == 200 and resp.headers["x-mass-model"] == "tiny"
            assert streamed_text(resp) == (expected, expected_usage), (after, request.get("stop"))
            if not sent[0].get("died"):  # the stream had ended before that event
                continue
            assert len(sent) == 2 and "resume" not in sent[0]  # died before any output: retried, not resumed
            assert len(sent[1].get("resume", ())) == (len(expected) if after else 0)


def test_a_resumed_stream_that_loses_its_replica_again_ends_with_an_error_event(resumable):
    client, state = resumable
    heal, sent = die_mid_stream(state, "tiny", after=1, times=3)
    try:
        resp = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content":
                                                        "hi"}], "max_tokens": 16, "temperature": 0, "stream": True})
    finally:
        heal()
    last = json.loads(resp.text.strip().split("\n\n")[-1][6:])
    assert resp.status_code == 200 and last["error"]["code"] == "upstream_unavailable", resp.text[-300:]
    assert "resume" in sent[-1]


# --- one breaker per model shared by every gateway replica (Redis) ---

REDIS = "redis://127.0.0.1:6379/0"


def _on_replicas(body, url: str = REDIS, n: int = 2, **settings) -> None:
    """``await body(*breakers)`` on ``n`` SharedBreakers of one model as ``n`` gateway replicas would hold them
    (own clients, one fresh prefix); the prefix's keys are deleted afterwards."""
    import asyncio
    import uuid

    import redis.asyncio as aioredis

    from mass.gateway.shared_breaker import SharedBreaker

    async def run():
        prefix = f"test:breaker:{uuid.uuid4().hex[:8]}"
        clients = [aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5) for _ in range(n)]
        try:
            await body(*(SharedBreaker("m", c, prefix, **settings) for c in clients))
        finally:
            keys = await clients[0].keys(f"{prefix}:*")
            if keys:
                await clients[0].delete(*keys)
            for c in clients:
                await c.aclose()

    asyncio.run(run())


def test_a_shared_breaker_counts_every_replicas_outcomes_and_hands_out_the_probes_once():
    import asyncio

    async def body(a, b):
        for breaker in (a, b):  # 2 failures and 0 successes each: neither alone has min_requests outcomes
            assert await breaker.admit()
            breaker.record(True)
            breaker.record(True)
        await a.sync()
        assert a.state == CLOSED and a.status()["window_requests"] == 2
        await b.sync()  # the shared window now holds 4 outcomes, all failed
        assert b.state == OPEN and "4 of the last 4 requests failed" in b.status()["transitions"][-1]["why"]
        await a.sync()
        assert a.state == OPEN and not await a.admit() and 0 < a.retry_after_s() <= 0.4
        await asyncio.sleep(0.45)
        claims = [await a.admit(), await b.admit(), await a.admit(), await b.admit()]
        assert claims == [True, True, False, False]  # 2 probes for the model, not 2 per replica
        assert a.state == b.state == HALF_OPEN
        a.record(False)
        await a.sync()
        assert a.state == HALF_OPEN  # one of two probes answered
        b.record(False)
        await b.sync()
        await a.sync()
        assert a.state == b.state == CLOSED and a.status()["window_requests"] == 0
        assert [t["to"] for t in a.status()["transitions"]] == [OPEN, HALF_OPEN, CLOSED]
        assert a.status()["shared"] and await a.admit()

    _on_replicas(body, failure_ratio=0.5, min_requests=4, window_s=10, open_s=0.4, half_open_probes=2)


async def _failed_on_a_seen_by_both(a, b) -> None:
    """One failure on replica ``a`` (enough to open a breaker with ``min_requests=1``), synced by both."""
    a.record(True)
    await a.sync()
    await b.sync()


def test_a_failed_probe_on_one_replica_opens_the_breaker_for_all():
    import asyncio

    async def body(a, b):
        await _failed_on_a_seen_by_both(a, b)
        assert a.state == b.state == OPEN
        await asyncio.sleep(0.35)
        assert await b.admit() and not await a.admit()
        b.record(True)  # the probe failed
        await b.sync()
        await a.sync()
        assert a.state == b.state == OPEN and a.status()["transitions"][-1]["why"] == "a probe request failed"
        assert not await a.admit()

    _on_replicas(body, failure_ratio=0.5, min_requests=1, window_s=10, open_s=0.3, half_open_probes=1)


def test_a_probe_whose_replica_never_answers_is_given_up_after_stale_s():
    import asyncio

    async def body(a, b):
        await _failed_on_a_seen_by_both(a, b)
        await asyncio.sleep(0.25)
        assert await a.admit()  # a claims the probe, then "dies": it never records the outcome
        assert not await b.admit()
        await asyncio.sleep(0.35)
        assert await b.admit()

    _on_replicas(body, min_requests=1, open_s=0.2, half_open_probes=1, stale_s=0.3)


def test_while_redis_is_down_each_replica_keeps_a_breaker_of_its_own_then_shares_again():
    from tests import servers
    from tests.integration.support import free_port

    server = servers.PrivateRedis(free_port())
    server.start()

    async def body(a):
        await a.sync()
        assert a.status()["shared"]
        server.stop()
        a.record(True)
        await a.sync()  # Redis is gone: the counted outcome is lost with it, the replica decides alone
        assert not a.status()["shared"] and await a.admit()
        a.record(True)
        a.record(True)
        assert a.state == OPEN and not await a.admit()  # its own breaker opened
        assert a.retry_after_s() > 29
        server.start()
        await a.sync()
        assert a.status()["shared"] and a.state == CLOSED and await a.admit()  # the shared one decides again

    try:
        _on_replicas(body, url=server.url, n=1, min_requests=2, window_s=10, open_s=30)
    finally:
        server.remove()


def test_two_gateway_replicas_with_redis_share_one_breaker_and_both_fail_fast(lm, unit_keys):
    """Two in-process gateways of one app sharing the machine's Redis: one failure seen by each replica opens the
    breaker of both (min_requests 2), both then fail fast, and /admin/services says the breaker is shared."""
    import uuid

    import redis

    from mass.gateway.app import create_app
    from tests.inprocess import build_state

    app_name = f"test-breaker-{uuid.uuid4().hex[:8]}"
    config = {"gateway": {"redis_url": REDIS, "replicas": 2,
                          "breaker": {"min_requests": 2, "failure_ratio": 0.5, "open_s": 30.0}},
              "models": [{"name": "solo", "ref": "tiny-gpt@production", "engine": "llm", "max_tokens_limit": 16}]}
    states = [build_state(config, {"solo": lm}, keys=unit_keys["store"], app=app_name) for _ in range(2)]
    heals = [fail_with(s, "solo", lambda: RuntimeError("injected model failure")) for s in states]
    headers = {"Authorization": f"Bearer {unit_keys['admin']}"}
    try:
        with TestClient(create_app(states[0]), raise_server_exceptions=False, headers=headers) as a, \
                TestClient(create_app(states[1]), raise_server_exceptions=False, headers=headers) as b:
            assert [c.post("/v1/completions", json={"model": "solo", **BODY}).status_code for c in (a, b)] == [500] * 2
            deadline = time.monotonic() + 5  # each replica sends its outcome within SYNC_S (0.25 s)
            while not all(s.routes["solo"].breaker.state == OPEN for s in states):
                assert time.monotonic() < deadline, [s.routes["solo"].breaker.status() for s in states]
                a.get("/v1/models")  # requests start the sync task (it lives on the app's event loop)
                b.get("/v1/models")
                time.sleep(0.05)
            for client in (a, b):
                resp = client.post("/v1/completions", json={"model": "solo", **BODY})
                assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 25
            breaker = b.get("/admin/services").json()["data"]["solo"]["breaker"]
            assert breaker["shared"] and breaker["state"] == OPEN and breaker["window_failures"] == 2
            assert "2 of the last 2 requests failed" in breaker["transitions"][-1]["why"]
    finally:
        for heal in heals:
            heal()
        for state in states:
            state.routes["solo"].handle._target.served.engine.shutdown()
        r = redis.Redis.from_url(REDIS)
        stale = r.keys(f"mass:breaker:{app_name}:*")
        if stale:
            r.delete(*stale)
