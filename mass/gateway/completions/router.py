"""Router for text completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from mass.errors import InvalidRequest
from mass.gateway.completions.protocol import CompletionRequest
from mass.gateway.generation import generate
from mass.gateway.protocol import STREAM_RESPONSE, error_responses
from mass.gateway.state import GatewayState, caller, get_state

router = APIRouter()


class CompletionShape:
    """Choices of ``/v1/completions``: text, and logprobs as tokens / token_logprobs / top_logprobs / offsets."""

    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs
        self.offsets: dict[int, int] = {}  # per choice: characters of text so far (for text_offset)

    def whole(self, choice: dict[str, Any]) -> dict[str, Any]:
        """A whole choice."""
        return self.delta(choice)

    def head(self, index: int) -> None:
        """Completions need no first chunk."""
        return None

    def delta(self, event: dict[str, Any]) -> dict[str, Any]:
        """A choice (whole or one chunk's part of it)."""
        return {"index": event["index"], "text": event["text"], "finish_reason": event["finish_reason"],
                "logprobs": self._logprobs(event) if self.logprobs else None}

    def _logprobs(self, event: dict[str, Any]) -> dict[str, Any]:
        entries = event["logprobs"] or []
        offset, offsets = self.offsets.get(event["index"], 0), []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry["token"])
        self.offsets[event["index"]] = offset
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in entries],
                "text_offset": offsets}


@router.post("/v1/completions", responses={**error_responses(400, 401, 404, 429, 500, 503, 504), **STREAM_RESPONSE})
async def create_completion(body: CompletionRequest, request: Request, state: GatewayState = Depends(get_state)):
    """OpenAI-compatible completion, streamed as SSE when ``stream`` is true."""
    if body.echo and body.logprobs is not None:
        raise InvalidRequest("echo with logprobs is not supported (prompt tokens get no logprobs)", param="echo")
    prompts = body.prompts()
    sampling = body.sampling(16 if body.max_tokens is None else body.max_tokens, body.logprobs)
    payload = {"prompts": prompts, "echo": bool(body.echo), "sampling": sampling.to_dict()}
    return await generate(state, body, payload, len(prompts) * (body.n or 1), "cmpl",
                          CompletionShape(body.logprobs is not None),
                          request.headers.get("x-request-id"), caller(request))
