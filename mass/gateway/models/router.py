"""Router for the model list and health probes."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mass.errors import ModelNotFound
from mass.gateway.protocol import error_responses
from mass.gateway.state import GatewayState, caller, get_state

router = APIRouter()
_STARTED = int(time.time())


def _model(name: str, route) -> dict:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "mass",
            "mass": {"ref": route.args.ref, "engine": route.args.engine}}


@router.get("/v1/models", responses=error_responses(401, 500, 503))
async def list_models(request: Request, state: GatewayState = Depends(get_state)):
    """The served models the key may call, OpenAI shape plus a ``mass`` block (ref, engine)."""
    return {"object": "list", "data": [_model(name, state.routes[name]) for name in state.visible(caller(request))]}


@router.get("/v1/models/{model}", responses=error_responses(401, 404, 500, 503))
async def retrieve_model(model: str, request: Request, state: GatewayState = Depends(get_state)):
    """One served model (``client.models.retrieve``); 404 naming the models the key may see otherwise."""
    visible = state.visible(caller(request))
    if model not in visible:
        raise ModelNotFound(f"model {model!r} is not served here; served models: {', '.join(visible) or 'none'}",
                            param="model")
    return _model(model, state.routes[model])


@router.get("/healthz")
async def healthz():
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: GatewayState = Depends(get_state)):
    """Readiness: every served model's deployment (each routed version of a managed model) answers within 5 s
    (scaled-to-zero ones wake up; pools are probed without loading a model, so probing never churns their LRU);
    an offline model does not hold readiness back."""
    async def probe(route):
        if route.offline is not None:
            return "offline"
        if not route.versions:
            return "not ready: no version routed yet (the lifecycle controller is deploying it)"
        try:
            await asyncio.wait_for(asyncio.gather(*(v.handle.ready.remote() for v in route.versions)), 5)
            return "ready"
        except Exception as exc:  # reported, not raised: readiness is a status
            return f"not ready: {type(exc).__name__}"

    names = sorted(state.routes)
    results = await asyncio.gather(*(probe(state.routes[n]) for n in names))
    status = dict(zip(names, results))
    ok = all(v in ("ready", "offline") for v in results)
    return JSONResponse({"status": "ready" if ok else "not ready", "models": status}, status_code=200 if ok else 503)
