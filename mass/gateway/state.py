"""The gateway replica's routing table: served model name -> engine kind, handle and facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from mass.errors import Overloaded
from mass.routing import check_served
from mass.serving.args import AppArgs, EmbeddingArgs, LLMArgs


@dataclass
class Route:
    """One served model as the gateway sees it."""

    args: LLMArgs | EmbeddingArgs
    handle: Any
    facts: dict[str, Any] = field(default_factory=dict)
    coalescer: Any = None  # embedding models: a mass.gateway.coalesce.Coalescer

    @property
    def target(self):
        """The handle to call: pooled models carry their name as the multiplexed model id."""
        return self.handle.options(multiplexed_model_id=self.args.name) if self.args.pool else self.handle


class GatewayState:
    """Everything a request handler needs, built once per gateway replica."""

    def __init__(self, handles: dict[str, Any], args: AppArgs) -> None:
        self.args = args
        self.routes = {m.name: Route(m, handles[m.name]) for m in args.models}
        for route in self.routes.values():
            if route.args.engine == "embedding":
                route.coalescer = self._coalescer(route)

    def _coalescer(self, route: Route):
        """Merges concurrent embedding requests for ``route`` into one upstream call (its ``batch`` bounds)."""
        from mass.gateway.coalesce import Coalescer
        from mass.gateway.errors import call_upstream

        gw, batch = self.args.gateway, route.args.batch

        async def send(merged: list[Any]) -> dict[str, Any]:
            return await call_upstream(route.target.embed.remote(merged), gw.request_timeout_s, route.args.name,
                                       gw.retry_after_s)

        return Coalescer(send, batch.max_batch_size, batch.batch_wait_timeout_s)

    def route(self, model: str, engine: str) -> Route:
        """The route for ``model``; 404 naming the served models, 400 when it is the wrong kind."""
        route = self.routes.get(model)
        check_served(model, route.args.engine if route else None, engine, self.routes)
        return route

    def table(self) -> dict[str, dict[str, Any]]:
        """The routing table the SDK uses for handle calls: name -> deployment, engine, pooled, and the
        ``Retry-After`` the gateway would send on backpressure."""
        return {name: {"deployment": self.args.deployment_of(r.args), "engine": r.args.engine,
                       "multiplexed": r.args.pool is not None, "retry_after_s": self.args.gateway.retry_after_s}
                for name, r in self.routes.items()}

    async def embed(self, route: Route, texts: list[Any]) -> dict[str, Any]:
        """Embeddings of ``texts`` (texts or token-id lists) from ``route``'s model, merged with concurrent
        requests for the same model into one upstream call (bounded by the model's ``batch`` settings);
        ``{"error"}`` from the model."""
        return await route.coalescer.submit(texts)

    async def facts(self, route: Route) -> dict[str, Any]:
        """The deployment's ``describe()`` (cached after the first call)."""
        if not route.facts:
            route.facts = await route.target.describe.remote()
        return route.facts


_current: GatewayState | None = None


def set_state(state: GatewayState) -> None:
    """Install the state of this gateway replica (one replica per process)."""
    global _current
    _current = state


def current_state() -> GatewayState:
    """The replica's state (Overloaded, a 503, while the replica is still starting)."""
    if _current is None:
        raise Overloaded("gateway is starting; retry in 1s", retry_after=1)
    return _current


async def get_state(request: Request) -> GatewayState:
    """FastAPI dependency: the app's own state (an in-process app) or the replica's. ``async`` on purpose:
    FastAPI runs a sync dependency in its thread pool: a thread hop on every request, which stood out in
    profiles of the gateway under load."""
    return request.app.state.mass or current_state()
