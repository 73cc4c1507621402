"""The gateway in-process (real engines, models and FastAPI app; Serve's handle replaced by a direct call):
OpenAI fields, choices, logprobs, SSE framing, the error table and the OpenAPI document."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from mass.sampling import SEED_RANGE
from tests.inprocess import served

HELLO = [{"role": "user", "content": "hi"}]


def post(client, path, body):
    return client.post(path, json=body)


def sse(resp) -> list[dict]:
    """The data events of an SSE body; asserts the framing (``data: `` lines, blank line, ``[DONE]`` last)."""
    assert resp.headers["content-type"].startswith("text/event-stream")
    blocks = resp.text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]", resp.text[-200:]
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [json.loads(b[6:]) for b in blocks[:-2]]


def complete(client, **fields):
    resp = post(client, "/v1/completions", {"model": "tiny-gpt", "prompt": "Return the", "max_tokens": 8,
                                            "temperature": 0, **fields})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_models_list_and_retrieve(gateway_client):
    ids = [m["id"] for m in gateway_client.get("/v1/models").json()["data"]]
    assert ids == ["minilm", "tiny-gpt"]
    one = gateway_client.get("/v1/models/tiny-gpt").json()
    assert one["id"] == "tiny-gpt" and one["object"] == "model" and one["mass"]["engine"] == "llm"
    missing = gateway_client.get("/v1/models/ghost")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "tiny-gpt" in missing.json()["error"]["message"]


def test_n_choices_are_distinct_seeded_and_reproducible(gateway_client):
    a = complete(gateway_client, n=3, temperature=1.0, seed=2**64 - 1)
    b = complete(gateway_client, n=3, temperature=1.0, seed=2**64 - 1)
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({c["text"] for c in a["choices"]}) > 1
    one = complete(gateway_client, prompt="Return the")
    assert a["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # counted once, not per choice
    assert a["usage"]["completion_tokens"] == 3 * 8 or any(c["finish_reason"] == "stop" for c in a["choices"])


def test_prompt_lists_and_token_ids_are_separate_prompts(gateway_client):
    text = complete(gateway_client, prompt="Return the")["choices"][0]["text"]
    ids = served(gateway_client.app.state.mass, "tiny-gpt").engine.encode("Return the")
    by_ids = complete(gateway_client, prompt=ids)["choices"][0]["text"]
    both = complete(gateway_client, prompt=["Return the", "A"], n=2)
    assert by_ids == text and len(both["choices"]) == 4
    assert [c["text"] for c in both["choices"][:2]] == [text, text]  # greedy: both choices of prompt 0
    nested = complete(gateway_client, prompt=[ids, ids])
    assert [c["text"] for c in nested["choices"]] == [text, text]
    echoed = complete(gateway_client, prompt="Return the", echo=True)
    assert echoed["choices"][0]["text"] == "Return the" + text


def test_completion_logprobs_match_the_tokens(gateway_client):
    out = complete(gateway_client, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    assert all(t and (not t.startswith("bytes:") or "\\x" in t) for t in lp["tokens"])
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and chosen <= 0 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_penalties_and_logit_bias_change_what_is_generated(gateway_client):
    plain = complete(gateway_client, max_tokens=24)["choices"][0]["text"]
    penalised = complete(gateway_client, max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised["choices"][0]["text"] != plain
    engine = served(gateway_client.app.state.mass, "tiny-gpt").engine
    token = engine.encode(" the")[0]
    biased = complete(gateway_client, max_tokens=6, logit_bias={str(token): 100})
    assert biased["choices"][0]["text"] == engine.tokenizer.decode([token] * 6)


def test_chat_accepts_what_current_clients_send(gateway_client):
    body = {"model": "tiny-gpt", "max_completion_tokens": 6, "temperature": 0, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "again", "name": "bob"}],
        # neutral values of what this gateway does not support, and fields recorded or ignored
        "tools": [], "tool_choice": "none", "parallel_tool_calls": True, "response_format": {"type": "text"},
        "store": False, "service_tier": "auto", "metadata": {"team": "a"}, "user": "u-1", "modalities": ["text"],
        "n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "seed": -2**63,
        "logprobs": True, "top_logprobs": 2, "stream_options": None, "prompt_cache_key": "k",
        "safety_identifier": "s"}
    resp = post(gateway_client, "/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and resp.json()["usage"]["completion_tokens"] <= 6
    content = choice["logprobs"]["content"]
    assert bytes(b for c in content for b in c["bytes"]).decode(errors="ignore") == choice["message"]["content"]
    assert all(len(c["top_logprobs"]) == 2 for c in content)


@pytest.mark.parametrize("field, value, needle", [
    ("tools", [{"type": "function", "function": {"name": "f"}}], "tools: not supported"),
    ("tool_choice", "auto", "tool_choice: not supported"),
    ("response_format", {"type": "json_object"}, "response_format"),
    ("store", True, "store: not supported"),
    ("modalities", ["text", "audio"], "modalities"),
    ("reasoning_effort", "high", "reasoning_effort: not supported"),
    ("frobnicate", 1, "frobnicate: unknown field"),
    ("top_logprobs", 2, "top_logprobs needs logprobs"),
    ("seed", SEED_RANGE[1] + 1, "seed"), ("seed", SEED_RANGE[0] - 1, "seed"),
    ("n", 65, "n"), ("stop", ["a", "b", "c", "d", "e"], "stop: List should have at most 4 items"),
    ("stop", ["a", ""], "stop.1: String should have at least 1 character"),
    ("logit_bias", {"x": 1}, "logit_bias"), ("logit_bias", {"99999": 1}, "outside this model's vocabulary"),
    ("temperature", 2.5, "temperature"), ("top_p", 1.5, "top_p"),
])
def test_unsupported_and_invalid_chat_fields_are_400s_naming_the_field(gateway_client, field, value, needle):
    body = {"model": "tiny-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    resp = post(gateway_client, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize("message, needle", [
    ({"role": "tool", "content": "x", "tool_call_id": "1"}, "tool messages are not supported"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, "tool_calls: not supported"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "image_url content parts"),
    ({"role": "user", "content": None}, "content is required"),
])
def test_message_shapes_that_cannot_be_served_are_refused_clearly(gateway_client, message, needle):
    resp = post(gateway_client, "/v1/chat/completions", {"model": "tiny-gpt", "messages": [message]})
    assert resp.status_code == 400 and needle in resp.json()["error"]["message"], resp.text


@pytest.mark.parametrize("fields", [dict(top_p=5e-324, temperature=1), dict(top_p=1e-50, temperature=1),
                                    dict(temperature=1e-300), dict(top_p=0), dict(seed=SEED_RANGE[1]),
                                    dict(seed=SEED_RANGE[0]), dict(presence_penalty=-2, frequency_penalty=2)])
def test_extreme_sampling_values_are_served_not_500(gateway_client, fields):
    for path, extra in (("/v1/completions", {"prompt": "A"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A"}]})):
        resp = post(gateway_client, path, {"model": "tiny-gpt", "max_tokens": 4, **extra, **fields})
        assert resp.status_code == 200, resp.text


def test_streams_frame_choices_usage_and_done(gateway_client):
    whole = complete(gateway_client, n=2, temperature=1.0, seed=5, max_tokens=10)
    resp = post(gateway_client, "/v1/completions", {"model": "tiny-gpt", "prompt": "Return the", "max_tokens": 10,
                                                    "n": 2, "seed": 5, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    events = sse(resp)
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    assert [texts[0], texts[1]] == [c["text"] for c in whole["choices"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert len({e["id"] for e in events}) == 1 and events[0]["id"] == f"cmpl-{resp.headers['x-request-id']}"

    chat = sse(post(gateway_client, "/v1/chat/completions", {
        "model": "tiny-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
        "n": 2, "logprobs": True}))
    assert [c["delta"] for c in chat[0]["choices"]] == [{"role": "assistant", "content": ""}] * 2
    finishes = [c for e in chat for c in e["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in finishes) == [0, 1]
    assert all(e["object"] == "chat.completion.chunk" for e in chat)
    assert any(c["logprobs"] and c["logprobs"]["content"] for e in chat[1:] for c in e["choices"])


def test_the_response_id_is_the_request_id(gateway_client):
    own = post(gateway_client, "/v1/completions", {"model": "tiny-gpt", "prompt": "A", "max_tokens": 2})
    assert own.json()["id"] == f"cmpl-{own.headers['x-request-id']}"
    given = gateway_client.post("/v1/chat/completions", headers={"x-request-id": "req-42"},
                                json={"model": "tiny-gpt", "messages": HELLO, "max_tokens": 2})
    assert given.json()["id"] == "chatcmpl-req-42"  # behind Serve, Serve echoes the header (once)


def test_a_streamed_request_error_is_a_status_not_a_broken_stream(gateway_client):
    resp = post(gateway_client, "/v1/completions", {"model": "tiny-gpt", "prompt": "word " * 300, "stream": True})
    assert resp.status_code == 400 and "context" in resp.json()["error"]["message"]


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/completions", {"model": "ghost", "prompt": "x"}, 404, "model 'ghost' is not served here"),
    ("/v1/completions", {"model": "tiny-gpt"}, 400, "prompt: Field required"),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "x", "max_tokens": 100}, 400, "limit of 64"),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": [1, 99999]}, 400, "outside this model's vocabulary"),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "x", "suffix": "y"}, 400, "suffix: not supported"),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "x", "best_of": 3}, 400, "best_of: not supported"),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"model": "minilm", "prompt": "x"}, 400, "does not do text generation"),
    ("/v1/chat/completions", {"model": "tiny-gpt", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-gpt", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/embeddings", {"model": "minilm", "input": []}, 400, "input: List should have at least 1 item"),
    ("/v1/embeddings", {"model": "minilm", "input": ["a", ""]}, 400, "input.1: String should have at least 1"),
    ("/v1/embeddings", {"model": "minilm", "input": [[101, 10 ** 6]]}, 400, "outside this model's vocabulary"),
    ("/v1/embeddings", {"model": "tiny-gpt", "input": "x"}, 400, "does not do embeddings"),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 8}, 400, "returns 384 dimensions"),
])
def test_error_table(gateway_client, path, body, status, needle):
    resp = post(gateway_client, path, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error", error


def test_embeddings_of_texts_and_token_ids_agree(gateway_client):
    tok = served(gateway_client.app.state.mass, "minilm").engine.tokenizer
    ids = tok("a cat sits on the mat")["input_ids"]
    texts = post(gateway_client, "/v1/embeddings", {"model": "minilm", "input": ["a cat sits on the mat"],
                                                    "dimensions": 384}).json()
    lists = post(gateway_client, "/v1/embeddings", {"model": "minilm", "input": [ids, ids[:3]]}).json()
    a, b = np.array(texts["data"][0]["embedding"]), np.array(lists["data"][0]["embedding"])
    assert a.shape == (384,) and np.allclose(a, b, atol=1e-5) and len(lists["data"]) == 2
    mixed = post(gateway_client, "/v1/embeddings", {"model": "minilm", "input": ["a cat", ids]})
    assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "input"  # not an OpenAI shape
    single = post(gateway_client, "/v1/embeddings", {"model": "minilm", "input": ids,
                                                     "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(single["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, a, atol=1e-5) and single["usage"]["prompt_tokens"] == len(ids)


def test_openapi_declares_errors_streams_and_no_422(gateway_client):
    doc = gateway_client.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "500", "503", "504"} <= set(responses) and "422" not in responses
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert "text/event-stream" in doc["paths"][path]["post"]["responses"]["200"]["content"]
    assert "404" in doc["paths"]["/v1/models/{model}"]["get"]["responses"]
