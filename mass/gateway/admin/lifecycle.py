"""Router for ``/admin/models``: the lifecycle operations of ``mass models publish|canary|...`` over HTTP, for
admin keys; the operation log names the key that acted (``key:<name>``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from mass.gateway.protocol import error_responses
from mass.gateway.state import GatewayState, caller, get_state

router = APIRouter(prefix="/admin/models", tags=["admin"])
_ERRORS = error_responses(400, 401, 403, 404, 409, 500, 502, 503)


class Operation(BaseModel):
    """The body every lifecycle operation takes."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=2000, description="Why (kept in the operation log).")
    expect: int | None = Field(None, ge=0, description="Fail with 409 unless the model's generation is still this "
                                                       "(what `GET /admin/models/{name}` showed).")


class Publish(Operation):
    """``publish``: the version to make production."""

    version: int = Field(ge=1)


class Canary(Operation):
    """``canary``: the version, and a weight (1-99 %) or a rollout plan (``10:5m,50:5m,100``)."""

    version: int = Field(ge=1)
    weight: int | None = Field(None, description="Percent of traffic, 1-99 (or give plan).")
    plan: str | None = Field(None, max_length=500, description="Rollout steps 'percent:bake,...' ending at 100.")


def _life(state: GatewayState):
    """The lifecycle over this gateway's registry (MASS_TRACKING_URI) and platform database."""
    from mass.lifecycle import Lifecycle

    if state.lifecycle is None:
        state.lifecycle = Lifecycle(db_url=state.resolver.store.url if state.resolver is not None else None)
    return state.lifecycle


def _actor(request: Request) -> str:
    key = caller(request)
    return f"key:{key.name}" if key is not None else "gateway"


@router.get("/{name}", responses=_ERRORS)
async def show_model(name: str, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """Versions, aliases, traffic split, offline state, rollout plan, generation and the operation log; for a
    model this app serves as a managed model also ``serving`` (each deployed version's state, weight,
    replicas and SLO figures, as the controller sees them)."""
    import asyncio

    shown = await asyncio.to_thread(_life(state).show, name)
    route = state.routes.get(name)
    if route is not None and route.args.managed:
        shown["serving"] = (await state.serving())[name].get("serving")
    return shown


@router.post("/{name}/publish", responses=_ERRORS)
def publish(name: str, body: Publish, request: Request, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """Make ``version`` production (the previous one is kept for rollback)."""
    return _life(state).publish(name, body.version, _actor(request), body.reason, expect=body.expect).to_dict()


@router.post("/{name}/canary", responses=_ERRORS)
def canary(name: str, body: Canary, request: Request, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """Send ``weight`` % of the traffic to ``version``, or start a rollout ``plan``."""
    return _life(state).canary(name, body.version, _actor(request), weight=body.weight, plan=body.plan,
                               reason=body.reason, expect=body.expect).to_dict()


def _simple(verb: str, doc: str):
    def operate(name: str, body: Operation, request: Request, state: GatewayState = Depends(get_state)
                ) -> dict[str, Any]:
        return getattr(_life(state), verb)(name, _actor(request), body.reason, expect=body.expect).to_dict()

    operate.__doc__ = doc
    operate.__name__ = verb
    router.post(f"/{{name}}/{verb}", responses=_ERRORS)(operate)


_simple("promote", "Make the canary version production.")
_simple("rollback", "End the canary; without one, make the previous production version production again.")
_simple("offline", "Take the model offline (its requests get 404 naming it as offline).")
_simple("online", "Serve an offline model again.")
