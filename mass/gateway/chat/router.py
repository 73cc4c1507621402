"""Router for chat completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from mass.gateway.chat.protocol import ChatCompletionRequest
from mass.gateway.generation import generate
from mass.gateway.protocol import STREAM_RESPONSE, error_responses
from mass.gateway.state import GatewayState, caller, get_state

router = APIRouter()


class ChatShape:
    """Choices of ``/v1/chat/completions``: an assistant message (or delta), logprobs as ``content`` entries."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs

    def whole(self, choice: dict[str, Any]) -> dict[str, Any]:
        """A whole choice."""
        return {"index": choice["index"], "message": {"role": "assistant", "content": choice["text"],
                                                      "refusal": None},
                "finish_reason": choice["finish_reason"], "logprobs": self._logprobs(choice)}

    def head(self, index: int) -> dict[str, Any]:
        """The first chunk of a choice names the assistant role."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                "logprobs": None}

    def delta(self, event: dict[str, Any]) -> dict[str, Any]:
        """One chunk's part of a choice."""
        return {"index": event["index"], "delta": {"content": event["text"]} if event["text"] else {},
                "finish_reason": event["finish_reason"], "logprobs": self._logprobs(event)}

    def _logprobs(self, event: dict[str, Any]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None

        def entry(e: dict[str, Any]) -> dict[str, Any]:
            return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

        return {"content": [{**entry(e), "top_logprobs": [entry(t) for t in e["top"]]}
                            for e in event["logprobs"] or []], "refusal": None}


@router.post("/v1/chat/completions", responses={**error_responses(400, 401, 404, 429, 500, 503, 504), **STREAM_RESPONSE})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: GatewayState = Depends(get_state)):
    """OpenAI-compatible chat completion (a plain role template for models without a chat template)."""
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = body.sampling(max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    payload = {"messages": body.conversation(), "sampling": sampling.to_dict()}
    return await generate(state, body, payload, body.n or 1, "chatcmpl", ChatShape(bool(body.logprobs)),
                          request.headers.get("x-request-id"), caller(request))
