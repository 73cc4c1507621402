"""What an LLM engine streams (``TokenEvent``), how a token is shown in logprobs, and the request checks every LLM
engine makes: shared by MASS's engine and the vLLM engine (pure Python: it loads in vLLM's venv too)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import AsyncIterator

from mass.errors import InvalidRequest, MassError
from mass.sampling import SamplingParams


@dataclass
class TokenEvent:
    """A piece of one request's output: new text, and the finish reason on the last event."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None  # one entry per token id when the request asked for logprobs
    failure: MassError | None = None  # set on the last event of a request that failed (never sent on)


def token_bytes(tokenizer, token: int) -> bytes:
    """The UTF-8 bytes a token stands for: byte-level BPE tokens map back through GPT-2's byte alphabet;
    other tokenizers' tokens are decoded alone."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
        piece = tokenizer.convert_ids_to_tokens(token)
        table = _byte_decoder()
        if piece is not None and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return tokenizer.decode([token]).encode()


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars



def token_text(tokenizer, token: int) -> dict:
    """A token's UTF-8 bytes and its text; a token holding part of a character is ``bytes:\\xNN...``,
    as OpenAI writes it."""
    data = token_bytes(tokenizer, token)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
    return {"token_id": token, "token": text, "bytes": list(data)}


def check_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int, context_length: int) -> None:
    """Raise InvalidRequest when a request can never fit the model: empty prompt, no ``max_tokens``, token or
    ``logit_bias`` ids outside the vocabulary, prompt + ``max_tokens`` beyond the context."""
    if not prompt_ids:
        raise InvalidRequest("prompt is empty", field="prompt")
    if params.max_tokens is None:
        raise InvalidRequest("max_tokens must be set for the engine", param="max_tokens")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"prompt token id {bad[0]} is outside this model's vocabulary "
                             f"(0..{vocab_size - 1})", param="prompt")
    bad = [t for t in params.logit_bias if t >= vocab_size]
    if bad:
        raise InvalidRequest(f"logit_bias token id {bad[0]} is outside this model's vocabulary "
                             f"(0..{vocab_size - 1})", param="logit_bias")
    if len(prompt_ids) + params.max_tokens > context_length:
        raise InvalidRequest(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
            f"context of {context_length} tokens", field="max_tokens", limit=context_length)


def check_resume(generated: list[int], params: SamplingParams, vocab_size: int) -> None:
    """Raise InvalidRequest unless ``generated`` can be the start of a ``params`` request's output."""
    bad = [t for t in generated if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"resumed token id {bad[0]!r} is outside this model's vocabulary "
                             f"(0..{vocab_size - 1})", param="resume")
    if params.max_tokens is not None and len(generated) >= params.max_tokens:
        raise InvalidRequest(f"a resumed choice already has {len(generated)} tokens, max_tokens is "
                             f"{params.max_tokens}: nothing is left to generate", param="resume")


async def joined(events: AsyncIterator[TokenEvent], logprobs: bool) -> TokenEvent:
    """A whole completion as one event: the text and tokens of ``events`` joined, with the finish reason and usage
    of the last (and the logprobs when the request asked for them)."""
    parts, ids, entries, last = [], [], [], None
    async for event in events:
        parts.append(event.text)
        ids.extend(event.token_ids)
        entries.extend(event.logprobs or [])
        last = event
    return TokenEvent("".join(parts), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens,
                      entries if logprobs else None)
