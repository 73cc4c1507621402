"""The gateway replica's routing table: served model name -> engine kind, handle and facts."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import Request

from mass.errors import Overloaded, PermissionDenied
from mass.routing import check_served
from mass.serving.args import AppArgs, EmbeddingArgs, LLMArgs


@dataclass
class Route:
    """One served model as the gateway sees it."""

    args: LLMArgs | EmbeddingArgs
    handle: Any
    facts: dict[str, Any] = field(default_factory=dict)
    coalescer: Any = None  # embedding models: a mass.gateway.coalesce.Coalescer
    breaker: Any = None  # mass.gateway.breaker.CircuitBreaker

    @property
    def target(self):
        """The handle to call: pooled models carry their name as the multiplexed model id."""
        return self.handle.options(multiplexed_model_id=self.args.name) if self.args.pool else self.handle


log = logging.getLogger(__name__)
T = TypeVar("T")


class GatewayState:
    """Everything a request handler needs, built once per gateway replica.

    Args:
        handles: served model name -> its deployment handle.
        args: the app config.
        keys: the API key store (default: the platform database of ``MASS_DATABASE_URL``); unused when the
            app config turns ``gateway.auth`` off.
    """

    def __init__(self, handles: dict[str, Any], args: AppArgs, keys: Any = None) -> None:
        self.args = args
        self.routes = {m.name: Route(m, handles[m.name]) for m in args.models}
        from mass.gateway.breaker import CircuitBreaker

        for route in self.routes.values():
            if route.args.engine == "embedding":
                route.coalescer = self._coalescer(route)
            route.breaker = CircuitBreaker(route.args.name, **args.gateway.breaker.model_dump())
        self.lifecycle = None  # mass.lifecycle.Lifecycle, made by the admin API on first use
        self.ledger = None
        if args.gateway.ledger:
            from mass.access.ledger import UsageLedger

            self.ledger = UsageLedger(keys.url if keys is not None else None)
        self.limits = self._limiter(args.gateway, keys.url if keys is not None else None)
        self.resolver = None
        if args.gateway.auth:
            from mass.access.keys import KeyStore
            from mass.access.resolver import KeyResolver

            self.resolver = KeyResolver(keys if keys is not None else KeyStore())
        else:
            log.warning("gateway.auth is false: anyone who reaches this gateway calls every model without a key "
                        "or limits. Turn it on (the default) for anything but a private test setup")

    def _limiter(self, gw, db_url: str | None):
        """Per-key limits: shared through Redis when the config names one, else in-process (one replica), whose
        budgets start from what the usage ledger says each key spent in the period (none without a ledger)."""
        if gw.redis_url:
            from mass.access.redis_limits import RedisLimiter

            return RedisLimiter(gw.redis_url, replicas=gw.replicas)
        from functools import partial

        from mass.access.ledger import spent_since
        from mass.access.limits import LocalLimiter

        if gw.replicas > 1:
            log.warning("gateway.replicas is %d without gateway.redis_url: each replica enforces every key's "
                        "limits on its own (up to %dx the limit in all); set redis_url for exact shared limits",
                        gw.replicas, gw.replicas)
        return LocalLimiter(seed=partial(spent_since, db_url) if self.ledger is not None else None)

    async def admit(self, call, tokens: int) -> None:
        """Admit ``call`` (a proxied request) against its key's limits, reserving one request and ``tokens``;
        RateLimited / QuotaExceeded (429) or LimitsUnavailable (503) otherwise. No key (auth off, SDK handle
        calls): nothing to enforce."""
        from mass.access.limits import Refusal, refusal_error

        if call is None or call.key is None:
            return
        key = call.key
        if not key.limited:
            return  # a key without limits: nothing to reserve, no round trip to the limit store
        result = self.limits.admit(key, tokens)
        if inspect.isawaitable(result):
            result = await result
        call.quota = result.quota
        if isinstance(result, Refusal):
            raise refusal_error(call.key, result)
        call.reservation = result

    async def settle(self, call) -> None:
        """Charge ``call``'s real token usage against its reservation and free its in-flight slot."""
        reservation = call.reservation
        if reservation is None or reservation.settled:
            return
        out = reservation.backend.settle(reservation, call.prompt_tokens + call.completion_tokens)
        if inspect.isawaitable(out):
            await out

    async def authenticate(self, header: str | None, admin: bool = False):
        """The caller's key for an ``Authorization`` header (None when auth is off); InvalidApiKey (401), or
        PermissionDenied (403) for a user key where ``admin`` is needed."""
        if self.resolver is None:
            return None
        key = await self.resolver.authenticate(header)
        if admin and not key.admin:
            raise PermissionDenied(f"key {key.name!r} is not an admin key: /admin endpoints need one "
                                   "(`mass keys create --admin`)")
        return key

    def visible(self, caller) -> list[str]:
        """The served model names ``caller`` (a key, or None with auth off) may see, sorted."""
        return sorted(n for n in self.routes if caller is None or caller.allows(n))

    def _coalescer(self, route: Route):
        """Merges concurrent embedding requests for ``route`` into one upstream call (its ``batch`` bounds)."""
        from mass.gateway.coalesce import Coalescer
        from mass.gateway.errors import call_upstream

        gw, batch = self.args.gateway, route.args.batch

        async def send(merged: list[Any]) -> dict[str, Any]:
            return await call_upstream(route.target.embed.remote(merged), gw.request_timeout_s, route.args.name,
                                       gw.retry_after_s)

        return Coalescer(send, batch.max_batch_size, batch.batch_wait_timeout_s)

    def route(self, model: str, engine: str, caller=None) -> Route:
        """The route for ``model``; 404 naming the models ``caller`` may see (a model the key may not call is
        answered exactly as one that is not served), 400 when it is the wrong kind."""
        from mass.gateway.proxy import current_call

        call = current_call()
        if call is not None:
            call.model = model
        route = self.routes.get(model)
        if route is not None and caller is not None and not caller.allows(model):
            route = None
        check_served(model, route.args.engine if route else None, engine, self.visible(caller))
        return route

    async def call(self, route: Route, attempt: Callable[[Route], Awaitable[T]], record: bool = True,
                   fallbacks: bool = True) -> tuple[T, Route]:
        """``attempt(route)`` through the model's circuit breaker: a replica lost before any output is retried
        once (Serve routes the retry to another replica), then the model's fallbacks are tried in order; a
        model whose breaker is open is skipped. Returns (the result, the route that answered). With
        ``record=False`` the caller records the answering route's outcome itself (a stream, when it ends);
        ``fallbacks=False`` tries ``route`` alone (a stream resumed from its tokens needs the same model).

        CircuitOpen (503 with Retry-After) when no candidate may be called; otherwise the last failure."""
        from mass.errors import CircuitOpen
        from mass.gateway.errors import is_upstream_failure, replica_lost
        from mass.gateway.proxy import current_call

        candidates = [route, *(self.routes[name] for name in route.args.fallbacks if fallbacks)]
        failure: BaseException | None = None
        for candidate in candidates:
            if not candidate.breaker.allow():
                continue
            for retry in (False, True):
                try:
                    result = await attempt(candidate)
                except Exception as exc:
                    if not is_upstream_failure(exc):
                        candidate.breaker.record(False)
                        raise
                    candidate.breaker.record(True)
                    failure = exc
                    if replica_lost(exc) and not retry and candidate.breaker.allow():
                        log.warning("model %r lost a replica mid-request; retrying once", candidate.args.name)
                        continue
                    break
                if record:
                    candidate.breaker.record(False)
                call = current_call()
                if call is not None:
                    call.served_by = candidate.args.name
                return result, candidate
            if failure is not None and not replica_lost(failure):
                break  # a timeout or a model error is the answer; only a lost replica moves to the fallbacks
        if failure is not None:
            raise failure
        wait = min(c.breaker.retry_after_s() for c in candidates)
        raise CircuitOpen(f"model {route.args.name!r} is failing (circuit open) and no fallback can answer; retry "
                          f"in {max(1, round(wait))}s", retry_after=max(1, round(wait)))

    def services(self) -> dict[str, Any]:
        """Every served model's circuit breaker and fallbacks (``/admin/services``)."""
        return {name: {"engine": r.args.engine, "deployment": self.args.deployment_of(r.args),
                       "fallbacks": list(r.args.fallbacks), "breaker": r.breaker.status()}
                for name, r in sorted(self.routes.items())}

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
        from mass.gateway.proxy import upstream

        return await upstream(route.coalescer.submit(texts))

    async def facts(self, route: Route) -> dict[str, Any]:
        """The deployment's ``describe()`` (cached after the first call)."""
        if not route.facts:  # through call_upstream: a model at capacity is a 503 with Retry-After here too
            from mass.gateway.errors import call_upstream

            gw = self.args.gateway
            route.facts = await call_upstream(route.target.describe.remote(), gw.request_timeout_s, route.args.name,
                                              gw.retry_after_s)
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


def caller(request: Request):
    """The request's API key (set by the proxy middleware; None with auth off)."""
    call = request.scope.get("state", {}).get("mass_call")
    return None if call is None else call.key


async def get_state(request: Request) -> GatewayState:
    """FastAPI dependency: the app's own state (an in-process app) or the replica's. ``async`` on purpose:
    FastAPI runs a sync dependency in its thread pool: a thread hop on every request, which stood out in
    profiles of the gateway under load."""
    return request.app.state.mass or current_state()
