"""Runs in its own venv with the newest ``openai`` (3.x: HTTPX2 transport) against a served MASS app and prints
what it saw as one JSON line; ``test_client_compat`` compares it with the pinned 2.x client's answers.

Usage: ``.venv-openai3/bin/python openai3_client.py BASE_URL`` with ``MASS_API_KEY`` (admin) and
``MASS_USER_KEY`` (a key limited to ``minilm*`` at 2 requests per minute) in the environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import openai

HELLO = [{"role": "user", "content": "hello"}]


def error_of(call) -> dict:
    """The openai exception class a call raised, with its HTTP status and error code."""
    try:
        call()
    except openai.APIStatusError as exc:
        return {"type": type(exc).__name__, "status": exc.status_code, "code": exc.code,
                "retry_after": exc.response.headers.get("retry-after")}
    return {"type": None}


async def streamed_completion(base: str, key: str) -> str:
    """A streamed completion through the async client."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    text = ""
    async for chunk in await client.completions.create(model="tiny-gpt", prompt="Return the", max_tokens=10,
                                                       temperature=0, stream=True):
        text += chunk.choices[0].text if chunk.choices else ""
    await client.close()
    return text


def main(base: str) -> dict:
    """Every call the compatibility tier makes with the 2.x client, made with this one."""
    admin, user = os.environ["MASS_API_KEY"], os.environ["MASS_USER_KEY"]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=admin, max_retries=0)
    chat = client.chat.completions.create(model="tiny-gpt", messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-gpt", messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    completion = client.completions.create(model="tiny-gpt", prompt="Return the", max_tokens=10, temperature=0,
                                           logprobs=2)
    by_base64 = client.embeddings.create(model="minilm", input=["a cat sits", "tax filing"])  # the client's default
    by_float = client.embeddings.create(model="minilm", input="a cat sits", encoding_format="float")
    limited = openai.OpenAI(base_url=f"{base}/v1", api_key=user, max_retries=0)
    raw = limited.embeddings.with_raw_response.create(model="minilm", input="a cat")
    limited.embeddings.create(model="minilm", input="a dog")
    return {
        "openai": openai.__version__,
        "transport": [f"{k.__module__}.{k.__name__}" for k in type(client._client).__mro__],
        "models": sorted(m.id for m in client.models.list()),
        "chat": chat.choices[0].message.content,
        "chat_usage": [chat.usage.prompt_tokens, chat.usage.completion_tokens],
        "stream": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "stream_usage": chunks[-1].usage.completion_tokens,
        "completion": completion.choices[0].text,
        "logprob_tokens": completion.choices[0].logprobs.tokens,
        "async_stream": asyncio.run(streamed_completion(base, admin)),
        "embeddings": [d.embedding for d in by_base64.data],
        "embedding_float": by_float.data[0].embedding,
        "user_models": sorted(m.id for m in limited.models.list()),
        "ratelimit_header": raw.headers.get("x-ratelimit-limit-requests"),
        "overhead_header": raw.headers.get("x-mass-overhead-ms"),
        "errors": {
            "bad_key": error_of(lambda: openai.OpenAI(base_url=f"{base}/v1", api_key="mass-000000000000-" + "a" * 43,
                                                      max_retries=0).models.list()),
            "unknown_model": error_of(lambda: client.models.retrieve("ghost")),
            "hidden_model": error_of(lambda: limited.completions.create(model="tiny-gpt", prompt="a", max_tokens=2)),
            "rate_limited": error_of(lambda: limited.embeddings.create(model="minilm", input="a bird")),
            "admin_with_user_key": error_of(lambda: openai.OpenAI(base_url=base, api_key=user, max_retries=0)
                                            .get("/admin/keys", cast_to=object)),
            "unsupported_field": error_of(lambda: client.chat.completions.create(
                model="tiny-gpt", messages=HELLO,
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])),
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
