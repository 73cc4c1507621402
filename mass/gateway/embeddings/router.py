"""Router for embeddings."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends

from mass.errors import InvalidRequest
from mass.gateway.embeddings.protocol import EmbeddingRequest
from mass.gateway.generation import raise_if_error
from mass.gateway.state import GatewayState, get_state

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, state: GatewayState = Depends(get_state)):
    """OpenAI-compatible embeddings (float lists or base64 little-endian float32)."""
    route = state.route(body.model, "embedding")
    facts = await state.facts(route)
    if body.dimensions is not None and body.dimensions != facts["dim"]:
        raise InvalidRequest(f"dimensions={body.dimensions}: this model returns {facts['dim']} dimensions",
                             param="dimensions")
    result = await state.embed(route, body.texts())
    raise_if_error(result)
    data = []
    for i, vector in enumerate(result["data"]):
        if body.encoding_format == "base64":
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = result["prompt_tokens"]
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
