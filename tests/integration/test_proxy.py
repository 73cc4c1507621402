"""The service proxy on a real Ray Serve app with two gateway replicas behind HAProxy, sharing a Redis for limits
and a PostgreSQL for keys and the ledger (both servers of this module's own, so they can be stopped and
restarted), called over real sockets with the official ``openai`` client and httpx."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import openai
import pytest
import ray
import redis

from mass.access.keys import KeyStore
from tests import servers
from tests.integration.support import ROOT, free_port, wait_for


APP = "mass-proxy"


@dataclass
class Proxy:
    url: str
    store: KeyStore
    admin: str
    pg: servers.PrivatePostgres
    redis: servers.PrivateRedis

    def key(self, **spec) -> tuple[str, str]:
        """A new key (id, secret) with a unique name."""
        key, secret = self.store.create({"name": f"t-{os.urandom(4).hex()}", **spec})
        return key.id, secret


@pytest.fixture(scope="module")
def proxy(trained, gateway):
    """demo.yaml's models, two replicas each, behind two gateway replicas sharing a private Redis (limits) and a
    private PostgreSQL (keys, ledger: MASS_DATABASE_URL reaches the replicas through their runtime_env)."""
    from ray import serve

    from mass.access.db import dispose
    from mass.app import build_app, load_app_args, wait_ready
    from mass.serving.args import AppArgs

    assert servers.postgres_available() and servers.redis_available(), \
        "initdb/pg_ctl and redis-server are needed (every MASS machine and CI has them)"
    pg, redis = servers.PrivatePostgres(free_port()), servers.PrivateRedis(free_port())
    pg.start()
    redis.start()
    saved = os.environ.get("MASS_DATABASE_URL")
    os.environ["MASS_DATABASE_URL"] = pg.url
    try:
        store = KeyStore(pg.url)
        _, admin = store.create({"name": "proxy-admin", "admin": True})
        data = load_app_args(ROOT / "serve_apps" / "configs" / "demo.yaml").model_dump()
        data["gateway"].update(num_cpus=0.25, replicas=2, redis_url=redis.url)
        for model in data["models"]:
            model.update(num_cpus=0.25, autoscaling={"min_replicas": 2, "max_replicas": 2})
        app = build_app(AppArgs.model_validate(data))
    finally:
        if saved is None:
            os.environ.pop("MASS_DATABASE_URL", None)
        else:
            os.environ["MASS_DATABASE_URL"] = saved
    serve.run(app, name=APP, route_prefix="/proxy")
    url = f"{gateway}/proxy"
    wait_ready(url, timeout=300)
    yield Proxy(url, store, admin, pg, redis)
    serve.delete(APP)
    dispose(pg.url)
    pg.remove()
    redis.remove()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_the_openai_client_sees_authentication_permission_not_found_and_rate_limit_errors(proxy):
    bad = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="mass-000000000000-" + "a" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.code == "invalid_api_key"
    _, secret = proxy.key(models=["minilm*"], rpm=2)
    user = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=secret, max_retries=0)
    assert [m.id for m in user.models.list()] == ["minilm"]
    with pytest.raises(openai.NotFoundError) as info:
        user.completions.create(model="tiny-gpt", prompt="a", max_tokens=2)
    assert info.value.code == "model_not_found" and "tiny-gpt" not in info.value.message.split(";")[1]
    raw = user.embeddings.with_raw_response.create(model="minilm", input="a cat")
    assert raw.headers["x-ratelimit-limit-requests"] == "2" and float(raw.headers["x-mass-overhead-ms"]) >= 0
    user.embeddings.create(model="minilm", input="a dog")
    with pytest.raises(openai.RateLimitError) as info:
        user.embeddings.create(model="minilm", input="a bird")
    assert info.value.code == "rate_limit_exceeded" and int(info.value.response.headers["retry-after"]) >= 1
    root = openai.OpenAI(base_url=proxy.url, api_key=secret, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        root.get("/admin/keys", cast_to=object)
    keys = openai.OpenAI(base_url=proxy.url, api_key=proxy.admin, max_retries=0).get("/admin/keys", cast_to=object)
    assert "proxy-admin" in {k["name"] for k in keys["data"]}


def test_a_revoked_key_is_refused_by_every_replica_within_a_second(proxy):
    _, secret = proxy.key()
    with httpx.Client(base_url=proxy.url, headers=bearer(secret), timeout=30) as http:
        assert all(http.get("/v1/models").status_code == 200 for _ in range(20))  # both replicas cache it
        proxy.store.revoke(secret.split("-")[1])
        revoked_at, last_ok, refused = time.monotonic(), None, 0
        while time.monotonic() - revoked_at < 2.5:
            status = http.get("/v1/models").status_code
            if status == 200:
                last_ok = time.monotonic() - revoked_at
            else:
                assert status == 401
                refused += 1
    assert last_ok is None or last_ok < 1.0, f"a replica still accepted the revoked key {last_ok:.2f}s later"
    assert refused > 20


async def _hammer(url: str, secret: str, seconds: float, workers: int, path: str = "/v1/embeddings",
                  body: dict | None = None) -> list[int]:
    body = body or {"model": "minilm", "input": "a"}
    statuses: list[int] = []
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, headers=bearer(secret), timeout=60,
                                 limits=httpx.Limits(max_connections=workers)) as http:
        async def worker():
            while time.monotonic() < stop:
                statuses.append((await http.post(path, json=body)).status_code)
        await asyncio.gather(*[worker() for _ in range(workers)])
    return statuses


def test_rpm_is_exact_across_two_gateway_replicas_and_another_key_keeps_its_rate(proxy):
    _, burst = proxy.key(rpm=30)
    _, steady = proxy.key(rpm=30)

    async def run():
        return await asyncio.gather(_hammer(proxy.url, burst, 6, 32), _hammer(proxy.url, steady, 6, 1))

    burst_statuses, steady_statuses = asyncio.run(run())
    assert burst_statuses.count(200) == 30 and set(burst_statuses) == {200, 429}  # 10x its limit and more
    assert steady_statuses.count(200) == min(30, len(steady_statuses))  # the other key is untouched


def test_a_token_budget_holds_exactly_under_64_concurrent_streams(proxy):
    key_id, secret = proxy.key(budget="300/day")
    body = {"model": "tiny-gpt", "prompt": "Return the", "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}

    async def one(http):
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return resp.status_code, resp.json()["error"]["code"], 0
            usage = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:]).get("usage"):
                    usage = json.loads(line[6:])["usage"]["total_tokens"]
            return 200, None, usage

    async def run():
        async with httpx.AsyncClient(base_url=proxy.url, headers=bearer(secret), timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*[one(http) for _ in range(64)])

    results = asyncio.run(run())
    used = sum(r[2] for r in results)
    assert {r[1] for r in results if r[0] != 200} == {"insufficient_quota"}
    assert 0 < used <= 300
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    budget, deadline = f"mass:limits:{{{key_id}}}:budget:{day}", time.monotonic() + 15
    while (charged := int(redis.Redis.from_url(proxy.redis.url).get(budget))) != used:
        if time.monotonic() > deadline:  # a settlement Redis timed out on is tried again every second
            break
        time.sleep(0.2)
    assert charged == used  # reservations settled to exactly what the streams used: 0 tokens over


def test_a_64kb_authorization_header_is_refused_without_a_traceback(proxy):
    resp = httpx.get(f"{proxy.url}/v1/models", headers={"Authorization": "Bearer " + "a" * 65536}, timeout=30)
    assert 400 <= resp.status_code < 500 and "Traceback" not in resp.text


def test_redis_stopped_mid_run_budgets_fail_closed_rates_fall_back_then_recover(proxy):
    _, rated = proxy.key(rpm=1000)
    _, budgeted = proxy.key(budget="1000000/day")
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        def embed(secret):
            return http.post("/v1/embeddings", headers=bearer(secret), json={"model": "minilm", "input": "a"})

        def breakers_shared() -> set[bool]:  # as the replicas that answer see it (HAProxy spreads the calls)
            return {http.get("/admin/services", headers=bearer(proxy.admin)).json()["data"][m]["breaker"]["shared"]
                    for _ in range(4) for m in ("minilm", "tiny-gpt")}

        assert embed(rated).status_code == embed(budgeted).status_code == 200
        assert breakers_shared() == {True}
        proxy.redis.stop()
        try:
            down = [embed(budgeted) for _ in range(4)]
            assert {r.status_code for r in down} == {503}
            assert {r.json()["error"]["code"] for r in down} == {"limits_unavailable"}
            assert all("retry-after" in r.headers for r in down)
            assert all(embed(rated).status_code == 200 for _ in range(4))  # rates fail open (per-replica cap)
            wait_for(lambda: breakers_shared() == {False}, 15, "every replica keeping breakers of its own")
        finally:
            proxy.redis.start()
        wait_for(lambda: embed(budgeted).status_code == 200, 30, "budgets checked again once Redis is back")
        wait_for(lambda: breakers_shared() == {True}, 15, "the breakers shared again once Redis is back")


def test_a_postgresql_restart_loses_no_ledger_record_of_an_answered_request(proxy):
    key_id, secret = proxy.key()
    answered, stop = [], threading.Event()

    def load():
        with httpx.Client(base_url=proxy.url, headers=bearer(secret), timeout=30) as http:
            while not stop.is_set():
                try:
                    resp = http.post("/v1/embeddings", json={"model": "minilm", "input": "a"})
                except httpx.HTTPError:
                    continue
                if resp.status_code == 200:
                    answered.append(resp.headers.get("x-request-id"))

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_for(lambda: len(answered) >= 10, 60, "requests before the restart")
        proxy.pg.stop()
        during = len(answered)
        time.sleep(2)
        proxy.pg.start()
        wait_for(lambda: len(answered) >= during + 10, 60, "requests after the restart")
    finally:
        stop.set()
        loader.join(timeout=60)
    assert len(answered) > during  # keys already known kept working while the database was down

    from sqlalchemy import text

    from mass.access.db import engine

    def recorded():
        with engine(proxy.pg.url).connect() as conn:
            return conn.execute(text("select count(*) from usage_records where key_id = :k and status = 200"),
                                {"k": key_id}).scalar()

    wait_for(lambda: recorded() >= len(answered), 60, f"{len(answered)} ledger records")
    assert recorded() == len(answered)  # every answered request, once


def test_killing_a_replica_under_load_fails_no_request(proxy, capsys):
    """16 HTTP clients (streamed greedy chat, completions, embeddings) and an SDK client streaming through Serve
    handles while one replica of each model is killed: a request lost before any output is retried, a stream
    under way resumes on the other replica — every streamed text is exactly the uninterrupted one."""
    outcomes: dict[str, list[str]] = {"chat": [], "completions": [], "embeddings": []}
    stop = threading.Event()
    chat = {"model": "tiny-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=proxy.url, headers=bearer(proxy.admin), timeout=60) as http:
        reference = chat_text(http.post("/v1/chat/completions", json=chat).text)
    assert reference, "the greedy reference chat is empty"

    async def client(kind: str):
        async with httpx.AsyncClient(base_url=proxy.url, headers=bearer(proxy.admin), timeout=120) as http:
            while not stop.is_set():
                try:
                    if kind == "chat":
                        async with http.stream("POST", "/v1/chat/completions", json=chat) as resp:
                            text = (await resp.aread()).decode()
                        ok = resp.status_code == 200 and text.endswith("data: [DONE]\n\n")
                        if ok and chat_text(text) != reference:
                            outcome = f"200:wrong text {chat_text(text)!r}, expected {reference!r}"
                        else:
                            outcome = "ok" if ok else f"{resp.status_code}:{text[-300:]}"
                    elif kind == "completions":
                        resp = await http.post("/v1/completions", json={"model": "tiny-gpt", "prompt": "The",
                                                                       "max_tokens": 16})
                        outcome = "ok" if resp.status_code == 200 else f"{resp.status_code}:{resp.text[:300]}"
                    else:
                        resp = await http.post("/v1/embeddings", json={"model": "minilm", "input": ["a", "b"]})
                        outcome = "ok" if resp.status_code == 200 else f"{resp.status_code}:{resp.text[:300]}"
                except httpx.HTTPError as exc:
                    outcome = f"transport:{exc!r}"
                outcomes[kind].append(outcome)

    async def run():
        await asyncio.gather(*[client(k) for k in ("chat",) * 6 + ("completions",) * 5 + ("embeddings",) * 5])

    flag = Flag.remote()  # the SDK inside the cluster (Serve handles) streams until the load stops
    sdk = sdk_streams.remote(APP, flag)
    loader = threading.Thread(target=lambda: asyncio.run(run()))
    loader.start()
    try:
        wait_for(lambda: sum(map(len, outcomes.values())) >= 100, 120, "load before the kill")
        for deployment in ("llm-tiny-gpt", "embedding-minilm"):
            victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                          if f"{APP}#{deployment}#" in a["name"])
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        killed = sum(map(len, outcomes.values()))
        wait_for(lambda: sum(map(len, outcomes.values())) >= killed + 300, 180, "load after the kill")
    finally:
        stop.set()
        ray.get(flag.set.remote())
        loader.join(timeout=180)
    via, outcomes["sdk stream"] = ray.get(sdk, timeout=180)
    assert via == "handle"
    total = sum(map(len, outcomes.values()))
    failed = [o for v in outcomes.values() for o in v if o != "ok"]
    resumed, retried = (gateway_log_count(needle) for needle in ("mid-stream; resuming", "mid-request; retrying"))
    with capsys.disabled():
        per_kind = ", ".join(f"{k} {v.count('ok')}/{len(v)}" for k, v in outcomes.items())
        print(f"\nreplica kill under load: {total - len(failed)}/{total} succeeded "
              f"({100 * (total - len(failed)) / total:.2f} %: {per_kind}; {resumed} streams resumed, {retried} "
              f"requests retried); failures: {[f[-200:] for f in failed[:3]]}")
    assert not [f for f in failed if f.startswith("500") or "internal_error" in f], failed
    assert not [f for f in failed if "wrong text" in f], failed  # a resumed stream continues exactly
    assert all("upstream_unavailable" in f for f in failed), failed  # a lost replica is an upstream failure
    assert (total - len(failed)) / total >= 0.999, failed


@ray.remote(num_cpus=0)
class Flag:
    """A flag the test sets and a task polls."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        """Raise the flag."""
        self.value = True

    def get(self) -> bool:
        """Whether it is raised."""
        return self.value


@ray.remote(num_cpus=0)
def sdk_streams(app: str, flag) -> tuple[str, list[str]]:
    """Greedy SDK streams through Serve handles until ``flag`` is set: ("handle", outcomes), each "ok" when the
    text equals the first stream's."""
    from mass import Client

    client, outcomes, reference = Client(app_name=app), [], None
    while not ray.get(flag.get.remote()):
        try:
            text = "".join(client.stream("tiny-gpt", "The", max_tokens=24, temperature=0))
            reference = text if reference is None else reference
            outcomes.append("ok" if text == reference and text else f"200:wrong text {text!r}, expected {reference!r}")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            outcomes.append(f"{getattr(exc, 'code', type(exc).__name__)}: {exc}")
    return client.via, outcomes


def gateway_log_count(needle: str) -> int:
    """Lines holding ``needle`` in this app's gateway replica logs (the cluster is local: its session's
    ``logs/serve`` directory)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"  # no public accessor in Ray 2.60
    return sum(f.read_text(errors="replace").count(needle) for f in logs.glob(f"replica_{APP}_Gateway_*.log"))


def chat_text(sse: str) -> str:
    """The assistant text of a streamed chat completion's SSE body."""
    return "".join(json.loads(b[6:])["choices"][0]["delta"].get("content") or ""
                   for b in sse.split("\n\n") if b.startswith("data: {") and '"choices":[{' in b)
