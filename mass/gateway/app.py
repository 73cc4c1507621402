"""The gateway: a FastAPI app (built in the replica, never at import) inside a Serve ingress deployment."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve


def create_app() -> FastAPI:
    """The FastAPI app with every endpoint family and the error translation installed."""
    from mass.gateway import errors
    from mass.gateway.chat.router import router as chat
    from mass.gateway.completions.router import router as completions
    from mass.gateway.embeddings.router import router as embeddings
    from mass.gateway.models.router import router as models

    app = FastAPI(title="MASS gateway", version="0.1.0",
                  description="OpenAI-compatible API over models served by MASS on Ray Serve.")
    for router in (models, completions, chat, embeddings):
        app.include_router(router)
    errors.install(app)
    return app


@serve.deployment
@serve.ingress(create_app)
class Gateway:
    """Ingress deployment: routes OpenAI requests to the model deployments by ``model`` name."""

    def __init__(self, handles: dict[str, Any], args: dict[str, Any]) -> None:
        from mass.gateway.state import GatewayState, set_state
        from mass.serving.args import AppArgs

        set_state(GatewayState(handles, AppArgs.model_validate(args)))

    def routes(self) -> dict[str, dict[str, Any]]:
        """The routing table, for SDK handle calls (not an HTTP route)."""
        from mass.gateway.state import current_state

        return current_state().table()
