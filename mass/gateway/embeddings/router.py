"""Router for embeddings."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mass.errors import InvalidRequest, raise_if_error
from mass.gateway.embeddings.protocol import EmbeddingRequest
from mass.gateway.protocol import error_responses
from mass.gateway.proxy import current_call
from mass.gateway.state import GatewayState, caller, get_state

router = APIRouter()


@router.post("/v1/embeddings", responses=error_responses(400, 401, 404, 429, 500, 503, 504))
async def create_embeddings(body: EmbeddingRequest, request: Request, state: GatewayState = Depends(get_state)):
    """OpenAI-compatible embeddings (float lists or base64 little-endian float32) of texts or token ids."""
    route = state.route(body.model, "embedding", caller(request))
    facts = await state.facts(route)
    if body.dimensions is not None and body.dimensions != facts["dim"]:
        raise InvalidRequest(f"dimensions={body.dimensions}: this model returns {facts['dim']} dimensions",
                             param="dimensions")
    inputs = body.inputs()
    call = current_call()
    if call is not None and call.key is not None and call.key.limited:  # at most max_length tokens per input
        await state.admit(call, sum(min(len(t) if not isinstance(t, str) else len(t.encode()) + 2,
                                        facts["max_length"]) for t in inputs))

    async def attempt(candidate):
        return raise_if_error(await state.embed(candidate, inputs))

    result, answered = await state.call(route, attempt)
    if call is not None:
        call.prompt_tokens = result["prompt_tokens"]
    data = []
    for i, vector in enumerate(result["data"]):
        if body.encoding_format == "base64":
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = result["prompt_tokens"]
    # a JSONResponse as is: FastAPI would otherwise walk every float through jsonable_encoder
    return JSONResponse({"object": "list", "data": data, "model": answered.args.name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
