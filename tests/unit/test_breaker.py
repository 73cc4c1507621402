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
