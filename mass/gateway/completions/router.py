"""Router for text completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from mass.gateway.completions.protocol import CompletionRequest
from mass.gateway.generation import generate, usage
from mass.gateway.state import GatewayState, get_state

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, state: GatewayState = Depends(get_state)):
    """OpenAI-compatible completion, streamed as SSE when ``stream`` is true."""

    def full(result: dict[str, Any], rid: str, created: int) -> dict[str, Any]:
        text = (body.prompt + result["text"]) if body.echo else result["text"]
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text, "finish_reason": result["finish_reason"], "logprobs": None}],
                "usage": usage(result)}

    def chunk(rid, created, text, finish, first, use) -> dict[str, Any]:
        if first:
            text = body.prompt if body.echo else ""
        choices = [] if use else [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        out = {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": choices}
        if use:
            out["usage"] = use
        return out

    return await generate(state, body, {"prompt": body.prompt}, "cmpl", full, chunk)
