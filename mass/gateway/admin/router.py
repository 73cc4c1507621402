"""Router for ``/admin/keys``: the key operations of ``mass keys``, over HTTP, for admin keys (the proxy
middleware refuses every other caller before a handler runs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from mass.access.keys import KeySpec, KeyStore, KeyUpdate
from mass.errors import PermissionDenied
from mass.gateway.protocol import error_responses
from mass.gateway.state import GatewayState, get_state

router = APIRouter(prefix="/admin", tags=["admin"])
_ERRORS = error_responses(400, 401, 403, 404, 500, 503)


def _store(state: GatewayState) -> KeyStore:
    if state.resolver is None:
        raise PermissionDenied("the admin API is closed on a gateway with auth off; manage keys with `mass keys`")
    return state.resolver.store


@router.get("/keys", responses=_ERRORS)
def list_keys(state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """Every key (without secrets), oldest first."""
    return {"object": "list", "data": [k.to_dict() for k in _store(state).list()]}


@router.post("/keys", status_code=201, responses=_ERRORS)
def create_key(spec: KeySpec, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """A new key; the response holds its ``secret``, shown this once."""
    key, secret = _store(state).create(spec)
    return {**key.to_dict(), "secret": secret}


@router.get("/keys/{ref}", responses=_ERRORS)
def show_key(ref: str, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """One key, by name or id."""
    return _store(state).get(ref).to_dict()


@router.patch("/keys/{ref}", responses=_ERRORS)
def update_key(ref: str, changes: KeyUpdate, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """Change a key's models, limits, budget, name or admin flag (fields given only; null clears a limit)."""
    return _store(state).update(ref, changes).to_dict()


@router.post("/keys/{ref}/revoke", responses=_ERRORS)
def revoke_key(ref: str, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """Revoke a key for good; every gateway replica refuses it within a second."""
    return _store(state).revoke(ref).to_dict()


@router.post("/keys/{ref}/rotate", responses=_ERRORS)
def rotate_key(ref: str, state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """A new secret for the key (shown this once); the old one stops working within a second."""
    key, secret = _store(state).rotate(ref)
    return {**key.to_dict(), "secret": secret}


@router.get("/services", responses=_ERRORS)
async def services(state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """Every served model's circuit breaker (state, window counts, recent transitions), fallbacks and routed
    versions, as this gateway replica sees them; for a managed model also ``serving``: the controller's view of
    each deployed version (state, weight, replicas, SLO figures over its window) and its recent actions."""
    return {"object": "list", "data": await state.serving()}


class UsageQuery(BaseModel):
    """The query of ``/admin/usage``."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, description="One key (name or id); default every key.")
    since: str = Field("1d", description="30m, 12h, 1d, 2w or an ISO date.")
    by: Literal["key", "model", "day"] | None = Field(None, description="Group rows by key, model or day.")


@router.get("/usage", responses=_ERRORS)
def usage(query: Annotated[UsageQuery, Query()], state: GatewayState = Depends(get_state)) -> dict[str, Any]:
    """Ledger rollups (requests, refused, prompt/completion/total tokens, mean latency and overhead)."""
    from mass.access.ledger import usage_summary

    store = _store(state)
    return {"object": "list", "data": usage_summary(store.url, key=query.key, since=query.since, by=query.by)}
