"""The serving plane on a real Ray Serve: gateway + tiny-gpt + MiniLM, called with the official openai client."""

from __future__ import annotations

import json
import subprocess

import httpx
import openai
import pytest
import torch

from mass.app import APP_NAME, build_app, load_app_args, wait_ready
from mass.registry import ModelRegistry
from tests.integration.support import ROOT, VENV_BIN, api_key, auth, free_port, run_cli, wait_for


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=api_key(), max_retries=0)


def test_models_health_and_openapi(gateway, client):
    assert sorted(m.id for m in client.models.list()) == ["minilm", "tiny-gpt"]
    assert httpx.get(f"{gateway}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway}/readyz").json()
    assert ready == {"status": "ready", "models": {"minilm": "ready", "tiny-gpt": "ready"}}
    paths = httpx.get(f"{gateway}/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings"} <= set(paths)


def test_greedy_completion_matches_the_registered_model(client, trained):
    model, tokenizer, _ = ModelRegistry().load(trained.model_ref)
    ids = tokenizer("Return the", return_tensors="pt")["input_ids"]
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    out = client.completions.create(model="tiny-gpt", prompt="Return the", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ids.shape[1], 12)


def test_chat_and_streaming(client, gateway):
    chat = client.chat.completions.create(model="tiny-gpt", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, seed=1)
    raw = httpx.post(f"{gateway}/v1/chat/completions", headers=auth(), json={"model": "tiny-gpt", "max_tokens": 2,
                                                             "messages": [{"role": "user", "content": "hi"}]})
    ids = raw.headers.get_list("x-request-id")
    assert len(ids) == 1 and raw.json()["id"] == f"chatcmpl-{ids[0]}"  # one request id, the response's own
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8

    full = client.completions.create(model="tiny-gpt", prompt="The module", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tiny-gpt", prompt="The module", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16

    chat_chunks = list(client.chat.completions.create(model="tiny-gpt", max_tokens=8, temperature=0, stream=True,
                                                      messages=[{"role": "user", "content": "hi"}]))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_embeddings_float_and_base64(client, gateway):
    out = client.embeddings.create(model="minilm", input=["a cat sits on the mat", "a kitten rests on a rug",
                                                          "quarterly tax filing"])
    v = torch.tensor([d.embedding for d in out.data])  # the client asked for base64 and decoded it
    assert v.shape == (3, 384) and float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    raw = httpx.post(f"{gateway}/v1/embeddings", headers=auth(), json={"model": "minilm", "input": "a cat",
                                                       "encoding_format": "float"}).json()
    assert torch.allclose(torch.tensor(raw["data"][0]["embedding"]),
                          torch.tensor(client.embeddings.create(model="minilm", input="a cat").data[0].embedding),
                          atol=1e-6)
    assert raw["usage"]["prompt_tokens"] > 0


def test_concurrent_embedding_requests_are_merged_and_each_gets_its_own_answer(gateway):
    """24 clients at once: the gateway merges their texts into fewer upstream calls, and every response
    holds exactly its own vectors (as the engine computes them alone, in the dtype the replica chose) and its
    own token count."""
    import asyncio

    from ray import serve
    from transformers import AutoModel, AutoTokenizer

    from mass.registry.imports import minilm_dir
    from mass.serving.engines.embedding import EmbeddingEngine

    requests = [[f"request {i} asks about topic {i * 7 % 11}"] + [f"extra text {j} of {i}" for j in range(i % 3)]
                for i in range(24)]
    handle = serve.get_deployment_handle("embedding-minilm", APP_NAME)
    stats, facts = handle.stats, handle.describe.remote().result()
    before = stats.remote().result()

    async def fire():
        async with httpx.AsyncClient(timeout=120, headers=auth()) as http:
            return await asyncio.gather(*[http.post(f"{gateway}/v1/embeddings",
                                                    json={"model": "minilm", "input": texts, "encoding_format": "float"})
                                          for texts in requests])

    responses = asyncio.run(fire())
    after = stats.remote().result()
    path = minilm_dir()
    assert facts["dtype"] in ("float32", "bfloat16") and facts["dtype_reason"].startswith("auto: ")
    engine = EmbeddingEngine(AutoModel.from_pretrained(path).to(getattr(torch, facts["dtype"])),
                             AutoTokenizer.from_pretrained(path))
    for texts, resp in zip(requests, responses):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        alone, tokens = engine.embed(texts)
        got = torch.tensor([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
        if facts["dtype"] == "float32":
            assert torch.allclose(got, torch.tensor(alone), atol=1e-4)
        else:  # bf16 products round differently with another batch's shape: each vector is still its own text's
            assert (got * torch.tensor(alone)).sum(1).min() >= 0.9999
        assert body["usage"]["prompt_tokens"] == sum(tokens)
    texts_sent = sum(len(t) for t in requests)
    assert after["texts"] - before["texts"] == texts_sent
    assert after["calls"] - before["calls"] < len(requests)  # merged upstream (one replica at min_replicas 1)


@pytest.mark.parametrize("path,body,status,needle", [  # the full table runs in-process: tests/unit/test_gateway.py
    ("/v1/completions", {"model": "ghost", "prompt": "x"}, 404, "model 'ghost' is not served here"),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "word " * 300}, 400, "exceeds the model's context of 256"),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "x", "max_tokens": 4096}, 400, "limit of 128"),
    ("/v1/chat/completions", {"model": "tiny-gpt", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 8}, 400, "returns 384 dimensions"),
])
def test_bad_inputs_get_openai_errors(gateway, path, body, status, needle):
    resp = httpx.post(f"{gateway}{path}", headers=auth(), json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_is_a_400(gateway):
    resp = httpx.post(f"{gateway}/v1/completions", content=b'{"model": "tiny-gpt", "prompt": ',
                      headers={"content-type": "application/json", **auth()})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ghost", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-gpt", prompt="word " * 300)


def test_client_disconnect_mid_stream_frees_the_slot(gateway):
    from ray import serve

    llm = serve.get_deployment_handle("llm-tiny-gpt", APP_NAME)
    body = {"model": "tiny-gpt", "prompt": "The", "max_tokens": 120, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/completions", json=body, headers=auth()) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                break  # got real tokens; now hang up
    wait_for(lambda: llm.stats.remote().result()["running"] == 0, 30, "the engine to drop the sequence")
    out = httpx.post(f"{gateway}/v1/completions", headers=auth(), json={**body, "stream": False, "max_tokens": 4}).json()
    assert out["usage"]["completion_tokens"] == 4


def test_backpressure_is_503_with_retry_after_and_nothing_is_mixed_up(gateway, client):
    """200 concurrent requests against a deployment that queues at most 2: the rest get 503 +
    Retry-After, and every 200 carries exactly the completion of its own prompt."""
    import asyncio

    from ray import serve

    args = load_app_args(ROOT / "serve_apps" / "configs" / "demo.yaml")
    tight = args.model_copy(update={
        "models": [args.models[0].model_copy(update={"max_ongoing_requests": 2, "max_queued_requests": 2,
                                                     "num_cpus": 0.25})],
        "gateway": args.gateway.model_copy(update={"num_cpus": 0.25, "retry_after_s": 2})})
    serve.run(build_app(tight), name="mass-tight", route_prefix="/tight")
    base = f"{gateway}/tight"
    wait_ready(base, timeout=240)
    prompts = [f"Item {i} of the list" for i in range(200)]
    expected = {p: client.completions.create(model="tiny-gpt", prompt=p, max_tokens=4, temperature=0)
                .choices[0].text for p in prompts[:10]}

    async def fire():
        async with httpx.AsyncClient(timeout=120, headers=auth(), limits=httpx.Limits(max_connections=200)) as http:
            return await asyncio.gather(*[
                http.post(f"{base}/v1/completions",
                          json={"model": "tiny-gpt", "prompt": p, "max_tokens": 4, "temperature": 0})
                for p in prompts])

    try:
        responses = asyncio.run(fire())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
        for prompt, resp in zip(prompts, responses):
            if resp.status_code == 503:
                assert resp.headers.get("Retry-After") == "2", (resp.headers, resp.text)
                assert resp.json()["error"]["code"] == "backpressure"
            else:
                body = resp.json()
                assert body["usage"]["completion_tokens"] == 4
                if prompt in expected:
                    assert body["choices"][0]["text"] == expected[prompt]
        served = [(p, r.json()["choices"][0]["text"]) for p, r in zip(prompts, responses) if r.status_code == 200]
        for prompt, text in served[:10]:  # spot-check beyond the first ten against a fresh sequential call
            again = client.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=4, temperature=0)
            assert again.choices[0].text == text
    finally:
        serve.delete("mass-tight")


def _sdk_session(client_kwargs: dict) -> dict:
    """Everything the SDK test compares, run with one transport."""
    from mass import Client, MassError

    c = Client(**client_kwargs)
    out = {"via": c.via, "models": c.models(),
           "complete": c.complete("tiny-gpt", "Return the", max_tokens=8, temperature=0),
           "chat": c.chat("tiny-gpt", "hello", max_tokens=6, temperature=0),
           "stream": "".join(c.stream("tiny-gpt", "The module", max_tokens=10, temperature=0)),
           "embed": c.embed("minilm", ["a cat sits on the mat"])[0][:8]}
    for name, call in {"ghost": lambda: c.complete("ghost", "x"),
                       "too_long": lambda: c.complete("tiny-gpt", "word " * 300),
                       "limit": lambda: c.complete("tiny-gpt", "x", max_tokens=4096),
                       "wrong_kind": lambda: c.embed("tiny-gpt", "x")}.items():
        try:
            call()
            out[name] = None
        except MassError as exc:
            out[name] = (type(exc).__name__, exc.message)
    return out


def test_sdk_gives_the_same_results_and_errors_over_http_and_serve_handles(gateway):
    import ray

    over_http = _sdk_session({"base_url": gateway, "via": "http"})
    # inside a Ray task: handles, chosen by itself; the key is passed only to attribute the calls in the ledger
    in_cluster = ray.get(ray.remote(num_cpus=0)(_sdk_session).remote({"api_key": api_key()}))
    assert over_http["via"] == "http" and in_cluster["via"] == "handle"
    for key in ("models", "complete", "chat", "stream", "ghost", "too_long", "limit", "wrong_kind"):
        assert over_http[key] == in_cluster[key], key
    assert torch.allclose(torch.tensor(over_http["embed"]), torch.tensor(in_cluster["embed"]), atol=1e-6)
    assert over_http["ghost"][0] == "ModelNotFound" and over_http["too_long"][0] == "InvalidRequest"
    assert over_http["complete"].completion_tokens == 8 and over_http["stream"]

    from sqlalchemy import text

    from mass.access.db import engine
    from mass.access.keys import KeyStore

    store = KeyStore()
    key_id = store.get("integration").id

    def attributed() -> dict:
        with engine(store.url).connect() as conn:
            return dict(conn.execute(text("select path, count(*) from usage_records where key_id = :k and path "
                                          "like 'handle:%' group by path"), {"k": key_id}).all())

    wait_for(lambda: {"handle:generate", "handle:stream", "handle:embed"} <= set(attributed()), 30,
             "the SDK's handle calls in the usage ledger")


def test_pool_multiplexes_models_with_lru_eviction(gateway, client, tmp_path):
    """Two registered versions in one pool deployment that holds one model per replica: each switch
    loads the other model (the least recently used one is evicted), answers stay correct."""
    import ray
    from ray import serve

    reg = ModelRegistry()
    model, tokenizer, _ = reg.load("tiny-gpt@latest-train")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reg.register(tmp_path, "tiny-gpt-b", "text-generation", lineage={"method": "register"}, aliases=["production"])
    args = load_app_args(ROOT / "serve_apps" / "configs" / "demo.yaml")
    data = args.model_dump()
    first, encoder = data["models"]
    data.update(pools=[{"name": "small", "engine": "llm", "max_models_per_replica": 1, "num_cpus": 0.5},
                       {"name": "enc", "engine": "embedding", "max_models_per_replica": 1, "num_cpus": 0.25}],
                models=[{**first, "name": "pa", "pool": "small"},
                        {**first, "name": "pb", "ref": "tiny-gpt-b@production", "pool": "small"},
                        {**encoder, "name": "pe", "pool": "enc", "num_cpus": 0.25}],
                gateway={**data["gateway"], "num_cpus": 0.25})
    pooled = type(args).model_validate(data)
    serve.run(build_app(pooled), name="mass-pool", route_prefix="/pool")
    base = f"{gateway}/pool"
    try:
        wait_ready(base, timeout=240)
        pool_stats = serve.get_deployment_handle("pool-small", "mass-pool").stats
        assert pool_stats.remote().result()["loads"] == []  # readiness and listing load no pooled model
        pool_client = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key(), max_retries=0)
        assert sorted(m.id for m in pool_client.models.list()) == ["pa", "pb", "pe"]
        assert httpx.get(f"{base}/readyz").json()["models"] == {"pa": "ready", "pb": "ready", "pe": "ready"}
        assert pool_stats.remote().result()["loads"] == []
        expected = client.completions.create(model="tiny-gpt", prompt="Return the", max_tokens=6,
                                             temperature=0).choices[0].text
        counts = []
        for name in ("pa", "pb", "pa", "pb"):
            out = pool_client.completions.create(model=name, prompt="Return the", max_tokens=6, temperature=0)
            assert out.choices[0].text == expected, name
            loads = pool_stats.remote().result()["loads"]
            assert loads[-1] == name  # the requested model is the one loaded now
            counts.append(len(loads))
        # one model per replica: every switch after the first evicts the other and loads again
        assert counts[1:] == [counts[0] + 1, counts[0] + 2, counts[0] + 3]

        texts = ["a cat sits on the mat", "quarterly tax filing"]  # a pooled encoder answers like the dedicated one
        pooled = pool_client.embeddings.create(model="pe", input=texts)
        dedicated = client.embeddings.create(model="minilm", input=texts)
        pooled_v, dedicated_v = (torch.tensor([d.embedding for d in r.data]) for r in (pooled, dedicated))
        assert (pooled_v * dedicated_v).sum(1).min() >= 0.9999  # both in the dtype `auto` chose (bf16: not bitwise)
        assert pooled.usage.prompt_tokens == dedicated.usage.prompt_tokens

        def in_cluster():
            from mass import Client

            c = Client(app_name="mass-pool")
            return c.via, c.complete("pb", "Return the", max_tokens=6, temperature=0).text

        assert ray.get(ray.remote(num_cpus=0)(in_cluster).remote()) == ("handle", expected)
    finally:
        serve.delete("mass-pool")


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(gateway):
    """A deployment with min 1 / max 2 replicas scales up while 24 clients stream, and back down after."""
    import asyncio
    import threading

    from ray import serve

    args = load_app_args(ROOT / "serve_apps" / "configs" / "demo.yaml")
    data = args.model_dump()
    data.update(models=[{**data["models"][0], "num_cpus": 0.5, "autoscaling": {
                    "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                    "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 11}}],
                gateway={**data["gateway"], "num_cpus": 0.25})
    serve.run(build_app(type(args).model_validate(data)), name="mass-auto", route_prefix="/auto")
    base = f"{gateway}/auto"

    def replicas() -> int:
        deployment = serve.status().applications["mass-auto"].deployments["llm-tiny-gpt"]
        return deployment.replica_states.get("RUNNING", 0)

    stop = threading.Event()

    async def load():
        body = {"model": "tiny-gpt", "prompt": "The", "max_tokens": 128, "temperature": 0}
        async with httpx.AsyncClient(timeout=120, headers=auth()) as http:
            async def worker():
                while not stop.is_set():
                    await http.post(f"{base}/v1/completions", json=body)
            await asyncio.gather(*[worker() for _ in range(24)])

    try:
        wait_ready(base, timeout=240)
        assert replicas() == 1
        loader = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
        loader.start()
        try:
            wait_for(lambda: replicas() == 2, 180, "a second replica under load", interval=1)
        finally:
            stop.set()
            loader.join(timeout=180)
        wait_for(lambda: replicas() == 1, 180, "scale back down to one replica", interval=1)
    finally:
        serve.delete("mass-auto")


def test_scale_to_zero_wakes_on_demand_and_a_slow_upstream_is_a_504(gateway):
    """min_replicas 0: an idle deployment drops to zero replicas; the next request wakes it. The first one
    waits longer than the gateway's request_timeout_s (the replica is still starting), so it gets a 504
    with an OpenAI error body; requests after the cold start succeed."""
    from ray import serve

    args = load_app_args(ROOT / "serve_apps" / "configs" / "demo.yaml")
    data = args.model_dump()
    data.update(models=[{**data["models"][0], "num_cpus": 0.5, "autoscaling": {
                    "min_replicas": 0, "initial_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2,
                    "upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 11}}],
                gateway={**data["gateway"], "num_cpus": 0.25, "request_timeout_s": 1.5})
    serve.run(build_app(type(args).model_validate(data)), name="mass-zero", route_prefix="/zero")
    base = f"{gateway}/zero"
    body = {"model": "tiny-gpt", "prompt": "Return the", "max_tokens": 4, "temperature": 0}

    def replicas() -> int:
        return serve.status().applications["mass-zero"].deployments["llm-tiny-gpt"].replica_states.get("RUNNING", 0)

    try:
        wait_ready(base, timeout=240)
        warm = httpx.post(f"{base}/v1/completions", headers=auth(), json=body, timeout=60)
        assert warm.status_code == 200, warm.text
        wait_for(lambda: replicas() == 0, 180, "the idle deployment to scale to zero", interval=1)

        cold = httpx.post(f"{base}/v1/completions", headers=auth(), json=body, timeout=60)
        assert cold.status_code == 504, cold.text
        error = cold.json()["error"]
        assert error["type"] == "timeout_error" and "did not answer within 1.5s" in error["message"]

        answered: dict = {}

        def woken() -> bool:
            resp = httpx.post(f"{base}/v1/completions", headers=auth(), json=body, timeout=60)
            answered["body"] = resp.json() if resp.status_code == 200 else None
            return resp.status_code == 200

        # the answer is kept from the poll itself: idle again for downscale_delay_s (1 s), the woken replica may
        # already be on its way back to zero by the time a further request is sent (seen on a slower CPU)
        wait_for(woken, 180, "the woken replica to answer", interval=1)
        assert answered["body"]["choices"][0]["text"] == warm.json()["choices"][0]["text"]
    finally:
        serve.delete("mass-zero")


def test_serve_up_on_another_port_than_the_clusters_serve_is_refused_naming_it(gateway, ray_cluster):
    """Serve keeps the HTTP port it started with; `mass serve up --port P2` says so at once (it used to poll P2
    for 300 s)."""
    config = ROOT / "serve_apps" / "configs" / "demo.yaml"
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address}
    port = int(gateway.rsplit(":", 1)[1])
    other = free_port()
    proc = run_cli(["serve", "up", "--config", str(config), "--port", str(other), "--detach"], env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"already listens on 127.0.0.1:{port}" in proc.stderr and f"Use --port {port}" in proc.stderr


def test_the_config_file_runs_with_mass_serve_up_serve_run_and_serve_deploy(gateway, ray_cluster):
    """serve_apps/configs/demo.yaml as is, through each of the three CLIs, onto the session's cluster (this
    test comes last in the module: `serve run`/`serve deploy` replace the cluster's set of apps). Each one
    redeploys the same `mass` app and the gateway answers afterwards."""
    from ray import serve

    config = ROOT / "serve_apps" / "configs" / "demo.yaml"
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address}
    port = int(gateway.rsplit(":", 1)[1])
    body = {"model": "tiny-gpt", "prompt": "Return the", "max_tokens": 6, "temperature": 0}
    expected = httpx.post(f"{gateway}/v1/completions", headers=auth(), json=body, timeout=60).json()["choices"][0]["text"]

    def answers() -> bool:
        wait_ready(gateway, timeout=240)
        out = httpx.post(f"{gateway}/v1/completions", headers=auth(), json=body, timeout=60).json()
        return out["choices"][0]["text"] == expected

    up = run_cli(["-o", "json", "serve", "up", "--config", str(config), "--port", str(port), "--detach"], env=env)
    assert up.returncode == 0, up.stderr[-2000:]
    assert json.loads(up.stdout.strip().splitlines()[-1]) == {"url": gateway, "models": ["tiny-gpt", "minilm"]}
    assert answers()

    for command in (["run", "--non-blocking", "--address", ray_cluster.gcs_address, str(config)],
                    ["deploy", str(config), "--address", ray_cluster.dashboard_url]):
        proc = subprocess.run([str(VENV_BIN / "serve"), *command], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        wait_for(lambda: serve.status().applications["mass"].status == "RUNNING", 240, f"serve {command[0]}")
        deployed = subprocess.run([str(VENV_BIN / "serve"), "config", "--address", ray_cluster.dashboard_url],
                                  env=env, capture_output=True, text=True, timeout=60).stdout
        assert "import_path: serve_apps.mass_app:app_builder" in deployed, deployed  # the file's app is live
        assert answers(), command
