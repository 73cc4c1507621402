"""Router for embeddings."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from mass.errors import InvalidRequest, raise_if_error
from mass.gateway.embeddings.protocol import EmbeddingRequest
from mass.gateway.protocol import error_responses
from mass.gateway.state import GatewayState, get_state

router = APIRouter()


@router.post("/v1/embeddings", responses=error_responses(400, 404, 500, 503, 504))
async def create_embeddings(body: EmbeddingRequest, state: GatewayState = Depends(get_state)):
    """OpenAI-compatible embeddings (float lists or base64 little-endian float32) of texts or token ids."""
    route = state.route(body.model, "embedding")
    facts = await state.facts(route)
    if body.dimensions is not None and body.dimensions != facts["dim"]:
        raise InvalidRequest(f"dimensions={body.dimensions}: this model returns {facts['dim']} dimensions",
                             param="dimensions")
    result = raise_if_error(await state.embed(route, body.inputs()))
    data = []
    for i, vector in enumerate(result["data"]):
        if body.encoding_format == "base64":
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = result["prompt_tokens"]
    # a JSONResponse as is: FastAPI would otherwise walk every float through jsonable_encoder
    return JSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
