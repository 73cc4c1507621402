"""What an LLM engine streams (``TokenEvent``) and how a token is shown in logprobs: shared by MASS's engine and
the vLLM engine (pure Python: it loads in vLLM's venv too)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mass.errors import MassError


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
