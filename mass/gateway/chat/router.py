"""Router for chat completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from mass.gateway.chat.protocol import ChatCompletionRequest
from mass.gateway.generation import generate, usage
from mass.gateway.state import GatewayState, get_state

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, state: GatewayState = Depends(get_state)):
    """OpenAI-compatible chat completion (a plain role template for models without a chat template)."""
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    messages = [{"role": m.role, "content": m.content} for m in body.messages]

    def full(result: dict[str, Any], rid: str, created: int) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"], "logprobs": None}],
                "usage": usage(result)}

    def chunk(rid, created, text, finish, first, use) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choices = [] if use else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
               "choices": choices}
        if use:
            out["usage"] = use
        return out

    return await generate(state, body, {"messages": messages}, "chatcmpl", full, chunk)
