"""The gateway: a FastAPI app (built in the replica, never at import) inside a Serve ingress deployment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from ray import serve

if TYPE_CHECKING:
    from mass.gateway.state import GatewayState


def create_app(state: "GatewayState | None" = None) -> FastAPI:
    """The FastAPI app with every endpoint family and the error translation installed.

    ``state``: the routing state to serve (an in-process app, as the gateway tests build it); without it,
    the app serves the state its ``Gateway`` replica installs."""
    from mass.gateway import errors
    from mass.gateway.admin.lifecycle import router as lifecycle
    from mass.gateway.admin.router import router as admin
    from mass.gateway.chat.router import router as chat
    from mass.gateway.completions.router import router as completions
    from mass.gateway.embeddings.router import router as embeddings
    from mass.gateway.hooks import router as hooks
    from mass.gateway.models.router import router as models
    from mass.gateway.proxy import ProxyMiddleware

    app = FastAPI(title="MASS gateway", version="0.1.0",
                  description="OpenAI-compatible API over models served by MASS on Ray Serve.")
    for router in (models, completions, chat, embeddings, admin, lifecycle, hooks):
        app.include_router(router)
    errors.install(app)
    app.add_middleware(ProxyMiddleware)
    app.state.mass = state
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without its default 422 (validation failures are OpenAI-style 400s here), with the
    bearer-key security the proxy enforces on ``/v1`` and ``/admin``."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        doc.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "A MASS API key (mass-<id>-<secret>)"}}
        for route, path in doc.get("paths", {}).items():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
                if route.startswith(("/v1/", "/admin/")):
                    operation["security"] = [{"bearer": []}]
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


@serve.deployment
@serve.ingress(create_app)
class Gateway:
    """Ingress deployment: routes OpenAI requests to the model deployments by ``model`` name."""

    def __init__(self, handles: dict[str, Any], args: dict[str, Any]) -> None:
        from mass.gateway.state import GatewayState, set_state
        from mass.logs import setup_replica_logging
        from mass.serving.args import AppArgs

        setup_replica_logging()
        app_args, controller = AppArgs.model_validate(args), None
        if app_args.managed:  # the app's lifecycle controller: started by the first gateway replica, shared after
            from mass.lifecycle.controller import start_controller

            controller = start_controller(serve.get_replica_context().app_name, app_args)
        set_state(GatewayState(handles, app_args, controller=controller, app=serve.get_replica_context().app_name))

    async def routes(self, report: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """The routing table, for SDK handle calls (not an HTTP route); ``report``: the SDK's handle calls of
        managed models since it last asked (model -> version -> outcomes), counted in the SLO windows."""
        from mass.gateway.state import current_state

        state = current_state()
        state.merge_report(report or {})
        return state.table()

    async def record_usage(self, api_key: str, record: dict[str, Any]) -> bool:
        """Attribute an SDK handle call (in-cluster, so trusted and not limited) to ``api_key`` in the usage
        ledger; False when the key is not valid or the ledger is off (not an HTTP route)."""
        from mass.errors import MassError
        from mass.gateway.state import current_state

        state = current_state()
        if state.resolver is None or state.ledger is None:
            return False
        try:
            key = await state.resolver.authenticate(f"Bearer {api_key}")
        except MassError:
            return False
        state.ledger.record({**record, "key_id": key.id})
        return True
