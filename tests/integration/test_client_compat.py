"""Compatibility tier: the client libraries people use, unchanged, against the served app over HTTP —
the official ``openai`` client (sync, async, streaming, every supported field), LangChain's ``ChatOpenAI`` and
``OpenAIEmbeddings`` and LlamaIndex's ``OpenAILike``; the newest ``openai`` (3.x) from its own venv."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import openai
import pytest
import torch

from tests.integration.support import ROOT, api_key

pytestmark = pytest.mark.compat

HELLO = [{"role": "user", "content": "hello"}]
OPENAI3 = (ROOT / "tests" / "integration" / "openai3-requirements.txt").read_text().split("openai==")[1].strip()


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=api_key(), max_retries=0)


def test_openai_models_list_and_retrieve(client):
    assert {m.id for m in client.models.list()} == {"minilm", "tiny-gpt"}
    assert client.models.retrieve("tiny-gpt").id == "tiny-gpt"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ghost")


def test_openai_completions_with_every_supported_field(client):
    out = client.completions.create(model="tiny-gpt", prompt=["Return the", "The module"], n=2, max_tokens=6,
                                    temperature=0.8, top_p=0.9, seed=2**64 - 1, stop=["\n\n"], presence_penalty=0.5,
                                    frequency_penalty=0.5, logit_bias={"5": -100}, logprobs=2, user="u-1",
                                    echo=False, stream=False)
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and out.usage.completion_tokens <= 24
    assert all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) for c in out.choices)
    again = client.completions.create(model="tiny-gpt", prompt=["Return the", "The module"], n=2, max_tokens=6,
                                      temperature=0.8, top_p=0.9, seed=2**64 - 1, stop=["\n\n"],
                                      presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": -100},
                                      logprobs=2, user="u-1")
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: reproducible
    echoed = client.completions.create(model="tiny-gpt", prompt="Return the", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Return the")
    ids = client.completions.create(model="tiny-gpt", prompt=[[5, 6, 7]], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_openai_chat_with_current_message_shapes_and_logprobs(client):
    out = client.chat.completions.create(
        model="tiny-gpt", max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=3, n=2, seed=-2**63,
        messages=[{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "content": [{"type": "text", "text": "hello"}]},
                  {"role": "assistant", "content": None},
                  {"role": "user", "content": "again"}],
        response_format={"type": "text"}, tools=[], parallel_tool_calls=True, service_tier="auto",
        metadata={"team": "a"}, user="u-1", store=False)
    assert len(out.choices) == 2 and out.choices[0].message.content == out.choices[1].message.content  # greedy
    tokens = out.choices[0].logprobs.content
    assert tokens and all(len(t.top_logprobs) == 3 for t in tokens)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny-gpt", messages=HELLO,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_openai_streaming_sync_and_async(client, gateway):
    whole = client.chat.completions.create(model="tiny-gpt", messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-gpt", messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=api_key(), max_retries=0)
        text = ""
        async for chunk in await aclient.completions.create(model="tiny-gpt", prompt="Return the", max_tokens=10,
                                                            temperature=0, stream=True):
            text += chunk.choices[0].text if chunk.choices else ""
        done = await aclient.completions.create(model="tiny-gpt", prompt="Return the", max_tokens=10, temperature=0)
        return text, done.choices[0].text

    streamed, complete = asyncio.run(run())
    assert streamed == complete


def test_openai_embeddings_texts_and_token_ids(client):
    from transformers import AutoTokenizer

    from mass.registry.imports import minilm_dir

    ids = AutoTokenizer.from_pretrained(minilm_dir())("a cat sits")["input_ids"]
    by_text = client.embeddings.create(model="minilm", input="a cat sits")  # base64, decoded by the client
    by_ids = client.embeddings.create(model="minilm", input=[ids], encoding_format="float", dimensions=384)
    assert torch.allclose(torch.tensor(by_text.data[0].embedding), torch.tensor(by_ids.data[0].embedding), atol=1e-5)


def test_langchain_chat_openai_invoke_stream_batch(client, gateway):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny-gpt", base_url=f"{gateway}/v1", api_key=api_key(), max_tokens=8, temperature=0,
                     max_retries=0)
    expected = client.chat.completions.create(model="tiny-gpt", messages=HELLO, max_tokens=8,
                                              temperature=0).choices[0].message.content
    assert llm.invoke("hello").content == expected
    assert "".join(chunk.content for chunk in llm.stream("hello")) == expected
    assert [m.content for m in llm.batch(["hello", "hello"])] == [expected, expected]


def test_langchain_openai_embeddings_with_check_embedding_ctx_length_false(client, gateway):
    """LangChain tokenizes with tiktoken and sends those ids unless told not to; MASS takes ids in the model's
    own vocabulary, so the README says: ``check_embedding_ctx_length=False``."""
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model="minilm", base_url=f"{gateway}/v1", api_key=api_key(),
                           check_embedding_ctx_length=False, max_retries=0)
    docs = emb.embed_documents(["a cat sits on the mat", "quarterly tax filing"])
    direct = client.embeddings.create(model="minilm", input=["a cat sits on the mat", "quarterly tax filing"])
    assert torch.allclose(torch.tensor(docs), torch.tensor([d.embedding for d in direct.data]), atol=1e-5)
    assert len(emb.embed_query("a cat")) == 384


def test_llamaindex_openai_like_complete_chat_stream(client, gateway):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    expected = client.completions.create(model="tiny-gpt", prompt="Return the", max_tokens=8,
                                         temperature=0).choices[0].text
    llm = OpenAILike(model="tiny-gpt", api_base=f"{gateway}/v1", api_key=api_key(), max_tokens=8, temperature=0,
                     context_window=256, is_chat_model=False, max_retries=0)
    assert llm.complete("Return the").text == expected
    assert "".join(r.delta for r in llm.stream_complete("Return the")) == expected

    chat_expected = client.chat.completions.create(model="tiny-gpt", messages=HELLO, max_tokens=8,
                                                   temperature=0).choices[0].message.content
    chat = OpenAILike(model="tiny-gpt", api_base=f"{gateway}/v1", api_key=api_key(), max_tokens=8, temperature=0,
                      context_window=256, is_chat_model=True, max_retries=0)
    messages = [ChatMessage(role="user", content="hello")]
    assert chat.chat(messages).message.content == chat_expected
    assert "".join(r.delta for r in chat.stream_chat(messages)) == chat_expected


def test_openai_3x_with_its_httpx2_transport_sees_what_2x_sees(client, gateway):
    """openai 3.x (HTTPX2 transport) cannot share the venv with LlamaIndex (``openai<3``): ``make install`` gives
    it ``.venv-openai3``, and ``openai3_client.py`` makes the tier's calls there, errors included."""
    from mass.access.keys import KeyStore

    python = ROOT / ".venv-openai3" / "bin" / "python"
    assert python.exists(), f"{python} is missing: `make install` builds it (openai {OPENAI3} in its own venv)"
    _, user = KeyStore().create({"name": f"openai3-{os.urandom(3).hex()}", "models": ["minilm*"], "rpm": 2})
    run = subprocess.run([str(python), str(ROOT / "tests" / "integration" / "openai3_client.py"), gateway],
                         env={**os.environ, "MASS_USER_KEY": user}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["openai"] == OPENAI3 and "httpx2.Client" in seen["transport"]  # the new transport answered

    chat = client.chat.completions.create(model="tiny-gpt", messages=HELLO, max_tokens=12, temperature=0)
    completion = client.completions.create(model="tiny-gpt", prompt="Return the", max_tokens=10, temperature=0,
                                           logprobs=2)
    embeddings = client.embeddings.create(model="minilm", input=["a cat sits", "tax filing"])
    assert seen["models"] == ["minilm", "tiny-gpt"] and seen["user_models"] == ["minilm"]
    assert seen["chat"] == seen["stream"] == chat.choices[0].message.content
    assert seen["chat_usage"] == [chat.usage.prompt_tokens, chat.usage.completion_tokens]
    assert seen["stream_usage"] == chat.usage.completion_tokens
    assert seen["completion"] == seen["async_stream"] == completion.choices[0].text
    assert seen["logprob_tokens"] == completion.choices[0].logprobs.tokens
    assert torch.allclose(torch.tensor(seen["embeddings"]), torch.tensor([d.embedding for d in embeddings.data]),
                          atol=1e-5)
    assert torch.allclose(torch.tensor(seen["embedding_float"]), torch.tensor(seen["embeddings"][0]), atol=1e-5)
    assert seen["ratelimit_header"] == "2" and float(seen["overhead_header"]) >= 0
    errors = seen["errors"]
    assert errors["bad_key"] == {"type": "AuthenticationError", "status": 401, "code": "invalid_api_key",
                                 "retry_after": None}
    assert errors["unknown_model"]["type"] == errors["hidden_model"]["type"] == "NotFoundError"
    assert errors["hidden_model"]["code"] == "model_not_found"
    assert errors["rate_limited"]["type"] == "RateLimitError" and errors["rate_limited"]["code"] == \
        "rate_limit_exceeded" and int(errors["rate_limited"]["retry_after"]) >= 1
    assert errors["admin_with_user_key"]["type"] == "PermissionDeniedError"
    assert errors["unsupported_field"]["type"] == "BadRequestError" and errors["unsupported_field"]["status"] == 400
