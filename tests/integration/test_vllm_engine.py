"""``engine: vllm``: serve_apps/configs/vllm.yaml (tiny-gpt by MASS's engine and by vLLM's, behind one gateway) on
the session cluster, its vLLM replica on ``.venv-vllm`` (built by ``make test``), called with the official client;
vLLM's answers are held to MASS's engine's on the same registered model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from mass.errors import ConfigError
from tests.integration.support import ROOT, api_key, auth, wait_for

APP = "mass-vllm"


@pytest.fixture(scope="module")
def base(gateway, trained):
    """The shipped vllm.yaml app on the session cluster under /vllm; its base URL."""
    from ray import serve

    from mass.app import build_app, load_app_args, wait_ready

    args = load_app_args(ROOT / "serve_apps" / "configs" / "vllm.yaml")
    serve.run(build_app(args), name=APP, route_prefix="/vllm")
    try:
        wait_ready(f"{gateway}/vllm", timeout=300)
        yield f"{gateway}/vllm"
    finally:
        serve.delete(APP)


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key(), max_retries=0)


def test_vllm_answers_as_mass_engine_does_through_the_gateway(base, client):
    """Greedy text, token counts, stop strings and logprobs from vLLM equal those of MASS's engine on the same
    registered model (fp32 both); the replica says which engine and dtype it runs."""
    from ray import serve

    assert sorted(m.id for m in client.models.list()) == ["tiny-gpt", "tiny-gpt-vllm"]
    facts = serve.get_deployment_handle("vllm-tiny-gpt-vllm", APP).describe.remote().result()
    assert {k: facts[k] for k in ("engine", "dtype", "context_length", "ref")} == \
        {"engine": "vllm", "dtype": "float32", "context_length": 256, "ref": "tiny-gpt/1"}

    def both(**kw):
        return [client.completions.create(model=m, temperature=0, **kw) for m in ("tiny-gpt", "tiny-gpt-vllm")]

    for prompt in ("Return the", "The module", "def load(path):"):
        mass, vllm = both(prompt=prompt, max_tokens=24)
        assert vllm.choices[0].text == mass.choices[0].text and vllm.choices[0].finish_reason == "length"
        assert vllm.usage.model_dump() == mass.usage.model_dump()
    text = mass.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2, text
    mass, vllm = both(prompt="def load(path):", max_tokens=24, stop=[stop])
    assert vllm.choices[0].text == mass.choices[0].text == text[:text.index(stop)]
    assert vllm.choices[0].finish_reason == mass.choices[0].finish_reason == "stop"
    mass, vllm = both(prompt="Return the", max_tokens=6, logprobs=2)
    a, b = mass.choices[0].logprobs, vllm.choices[0].logprobs
    assert b.tokens == a.tokens and len(b.top_logprobs) == 6 and all(len(t) == 2 for t in b.top_logprobs)
    assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-3


def test_vllm_streams_samples_and_refuses_like_any_model(base, client):
    full = client.completions.create(model="tiny-gpt-vllm", prompt="The module", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tiny-gpt-vllm", prompt="The module", max_tokens=16,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16
    chat = list(client.chat.completions.create(model="tiny-gpt-vllm", max_tokens=8, stream=True,
                                               messages=[{"role": "user", "content": "hi"}]))
    assert chat[0].choices[0].delta.role == "assistant"

    seeded = [client.completions.create(model="tiny-gpt-vllm", prompt="The", max_tokens=12, n=2, seed=7,
                                        temperature=1.0) for _ in range(2)]
    texts = [[c.text for c in sorted(s.choices, key=lambda c: c.index)] for s in seeded]
    assert texts[0] == texts[1] and len(texts[0]) == 2  # a seeded request is reproducible, choice by choice
    assert seeded[0].usage.completion_tokens == 24

    with pytest.raises(openai.BadRequestError, match="max_tokens=129 exceeds this model's limit of 128"):
        client.completions.create(model="tiny-gpt-vllm", prompt="The", max_tokens=129)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context of 256 tokens"):
        client.completions.create(model="tiny-gpt-vllm", prompt="word " * 300, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-gpt-vllm", prompt="The", temperature=3)


def test_a_client_that_hangs_up_aborts_its_request_in_vllm(base):
    from ray import serve

    llm = serve.get_deployment_handle("vllm-tiny-gpt-vllm", APP)
    body = {"model": "tiny-gpt-vllm", "prompt": "The", "max_tokens": 120, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=auth()) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                break  # got real tokens; now hang up
    wait_for(lambda: llm.stats.remote().result()["in_flight"] == 0, 30, "vLLM to drop the request")
    out = httpx.post(f"{base}/v1/completions", headers=auth(), json={**body, "stream": False, "max_tokens": 4}).json()
    assert out["usage"]["completion_tokens"] == 4


def test_the_deployer_refuses_a_version_vllm_cannot_load(gateway):
    from mass.serving.vllm_env import vllm_source

    with pytest.raises(ConfigError, match=r"engine: vllm serves causal LMs saved as HF transformers directories; "
                                          r"minilm-l6/\d+ has task 'embedding' and format 'transformers': serve it "
                                          r"with engine: embedding"):
        vllm_source("minilm-l6@production")
