"""Router for the model list and health probes."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from mass.gateway.state import GatewayState, get_state

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models")
async def list_models(state: GatewayState = Depends(get_state)):
    """The served models, OpenAI shape plus a ``mass`` block (ref, engine)."""
    data = [{"id": name, "object": "model", "created": _STARTED, "owned_by": "mass",
             "mass": {"ref": r.args.ref, "engine": r.args.engine}} for name, r in sorted(state.routes.items())]
    return {"object": "list", "data": data}


@router.get("/healthz")
async def healthz():
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: GatewayState = Depends(get_state)):
    """Readiness: every served model's deployment answers within 5 s (scaled-to-zero ones wake up;
    pools are probed without loading a model, so probing never churns their LRU)."""
    async def probe(route):
        try:
            await asyncio.wait_for(route.handle.ready.remote(), 5)
            return "ready"
        except Exception as exc:  # reported, not raised: readiness is a status
            return f"not ready: {type(exc).__name__}"

    names = sorted(state.routes)
    results = await asyncio.gather(*(probe(state.routes[n]) for n in names))
    status = dict(zip(names, results))
    ok = all(v == "ready" for v in results)
    return JSONResponse({"status": "ready" if ok else "not ready", "models": status}, status_code=200 if ok else 503)
