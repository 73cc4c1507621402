"""The gateway replica's routing table: served model name -> engine kind, handle and facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mass.errors import InvalidRequest, MassError, ModelNotFound
from mass.serving.args import AppArgs, ModelArgs


@dataclass
class Route:
    """One served model as the gateway sees it."""

    args: ModelArgs
    handle: Any
    facts: dict[str, Any] = field(default_factory=dict)


class GatewayState:
    """Everything a request handler needs, built once per gateway replica."""

    def __init__(self, handles: dict[str, Any], args: AppArgs) -> None:
        self.args = args
        self.routes = {m.name: Route(m, handles[m.name]) for m in args.models}

    def route(self, model: str, engine: str) -> Route:
        """The route for ``model``; 404 naming the served models, 400 when it is the wrong kind."""
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(f"model {model!r} is not served here; served models: "
                                f"{', '.join(sorted(self.routes)) or 'none'}", param="model")
        if route.args.engine != engine:
            verb = "text generation" if engine == "llm" else "embeddings"
            raise InvalidRequest(f"model {model!r} is a {route.args.engine} model and does not do {verb}",
                                 param="model")
        return route

    async def facts(self, route: Route) -> dict[str, Any]:
        """The deployment's ``describe()`` (cached after the first call)."""
        if not route.facts:
            route.facts = await route.handle.describe.remote()
        return route.facts


_current: GatewayState | None = None


def set_state(state: GatewayState) -> None:
    """Install the state of this gateway replica (one replica per process)."""
    global _current
    _current = state


def get_state() -> GatewayState:
    """FastAPI dependency: the replica's state."""
    if _current is None:
        raise MassError("gateway is starting")
    return _current
