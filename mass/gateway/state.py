"""The gateway replica's routing table: served model name -> engine kind, handle and facts."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import Request

from mass.errors import Overloaded, PermissionDenied
from mass.gateway.proxy import current_call
from mass.routing import check_online, check_served
from mass.serving.args import AppArgs, EmbeddingArgs, LLMArgs


@dataclass
class Version:
    """One served version of a model: its deployment handle and share of the traffic. A model served as
    configured (not ``managed``) has one, with no version label."""

    label: str | None
    handle: Any
    weight: int = 100
    facts: dict[str, Any] = field(default_factory=dict)
    coalescer: Any = None  # embedding models: a mass.gateway.coalesce.Coalescer


@dataclass
class Route:
    """One served model as the gateway sees it."""

    args: LLMArgs | EmbeddingArgs
    versions: list[Version] = field(default_factory=list)
    offline: dict[str, Any] | None = None  # why, who, when: the model answers 404 model_offline
    breaker: Any = None  # mass.gateway.breaker.CircuitBreaker, or shared_breaker.SharedBreaker with Redis

    def pick(self) -> Version:
        """A version by weight (the one that answers this call); Overloaded (503) while none is ready."""
        if len(self.versions) == 1:
            version = self.versions[0]
        elif self.versions:
            version = random.choices(self.versions, weights=[v.weight for v in self.versions])[0]
        else:
            raise Overloaded(f"model {self.args.name!r} has no version ready yet (the controller is deploying it); "
                             "retry in 1s", retry_after=1)

        call = current_call()
        if call is not None:
            call.version = version.label
        return version

    def handle_of(self, version: Version):
        """The handle to call: pooled models carry their name as the multiplexed model id."""
        return version.handle.options(multiplexed_model_id=self.args.name) if self.args.pool else version.handle

    @property
    def handle(self):
        """The deployment handle of a model served as configured (its one version); None for a managed model
        with no version routed yet."""
        return self.versions[0].handle if self.versions else None

    @property
    def target(self):
        """The handle of a version picked by weight (``pick``)."""
        return self.handle_of(self.pick())


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

    def __init__(self, handles: dict[str, Any], args: AppArgs, keys: Any = None, controller: Any = None,
                 app: str = "mass") -> None:
        self.args = args
        self.routes = {m.name: Route(m, [] if m.managed else [Version(None, handles[m.name])]) for m in args.models}
        for route in self.routes.values():
            for version in route.versions:
                self._prepare(route, version)
        self.controller = controller  # the lifecycle controller's actor handle (an app with managed models)
        self.table_revision = ""
        self._report: dict[str, dict[str, dict[str, Any]]] = {}  # model -> version -> outcomes since the last poll
        self._poller: asyncio.Task | None = None
        self._handles: dict[tuple[str, str], Any] = {}
        self.lifecycle = None  # mass.lifecycle.Lifecycle, made by the admin API on first use
        self.ledger = None
        if args.gateway.ledger:
            from mass.access.ledger import UsageLedger

            self.ledger = UsageLedger(keys.url if keys is not None else None)
        self.limits = self._limiter(args.gateway, keys.url if keys is not None else None)
        self._breakers(app)
        self._breaker_sync: asyncio.Task | None = None
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

    def _breakers(self, app: str) -> None:
        """One breaker per model: shared by the app's gateway replicas through the limits' Redis when the config
        names one (``mass:breaker:<app>:{model}``), else one per replica."""
        from mass.gateway.breaker import CircuitBreaker
        from mass.gateway.shared_breaker import SharedBreaker

        gw = self.args.gateway
        for route in self.routes.values():
            if gw.redis_url:
                route.breaker = SharedBreaker(route.args.name, self.limits.redis, f"mass:breaker:{app}",
                                              stale_s=gw.request_timeout_s + 10, **gw.breaker.model_dump())
            else:
                route.breaker = CircuitBreaker(route.args.name, **gw.breaker.model_dump())

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
        """The served model names ``caller`` (a key, or None with auth off) may see, sorted (not offline ones)."""
        return sorted(n for n, r in self.routes.items() if r.offline is None and (caller is None or caller.allows(n)))

    def _prepare(self, route: Route, version: Version) -> None:
        """An embedding version's coalescer: it merges concurrent requests into one upstream call (the model's
        ``batch`` bounds)."""
        if route.args.engine != "embedding":
            return
        from mass.gateway.coalesce import Coalescer
        from mass.gateway.errors import call_upstream

        gw, batch = self.args.gateway, route.args.batch

        async def send(merged: list[Any]) -> dict[str, Any]:
            return await call_upstream(route.handle_of(version).embed.remote(merged), gw.request_timeout_s,
                                       route.args.name, gw.retry_after_s)

        version.coalescer = Coalescer(send, batch.max_batch_size, batch.batch_wait_timeout_s)

    def follow(self) -> None:
        """Start polling the controller's routing table (once; a no-op without managed models) and syncing the
        shared circuit breakers (once; a no-op without Redis)."""
        if self.controller is not None and (self._poller is None or self._poller.done()):
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        if self.args.gateway.redis_url and (self._breaker_sync is None or self._breaker_sync.done()):
            from mass.gateway.shared_breaker import keep_in_sync

            self._breaker_sync = asyncio.get_running_loop().create_task(
                keep_in_sync([r.breaker for r in self.routes.values()]))

    async def _poll(self) -> None:
        failing = False
        while True:
            try:
                report, self._report = self._report, {}
                table = await self.controller.table.remote(self.table_revision, report)
                if failing:
                    log.warning("the lifecycle controller answers again")
                failing = False
                if table is not None:
                    self.apply_table(table)
            except Exception as exc:  # noqa: BLE001 - a dead controller is restarted by Ray; keep the last table
                if not failing:
                    log.warning("cannot read the lifecycle controller's routing table (%s: %s); the last one stays",
                                type(exc).__name__, exc)
                failing = True
            await asyncio.sleep(self.args.controller.table_poll_s)

    def observe(self, call) -> None:
        """Account a finished call against the managed model's version that answered, for the controller's SLO
        windows: 5xx responses and streams that ended in an error event count as errors, client errors not at
        all; latency is the whole response's, time to first token a stream's first byte."""
        from mass.lifecycle.slo import note

        status = call.status or 499
        failed = status >= 500 or (status < 400 and call.error_code is not None)
        if status >= 400 and not failed or self.controller is None:
            return
        now = time.perf_counter()
        ttft = (call.first_byte_s - call.started) * 1000 if call.streamed and call.first_byte_s is not None else None
        note(self._report, call.served_by or call.model, call.version, failed, (now - call.started) * 1000, ttft)

    def merge_report(self, report: dict[str, Any]) -> None:
        """Add an SDK's report of its handle calls (per model and version) to the one sent with the next poll."""
        from mass.lifecycle.slo import merge

        if self.controller is not None and report:
            merge(self._report, report)

    def apply_table(self, table: dict[str, Any]) -> None:
        """Route the managed models as the controller's ``table`` says (versions reuse their handles, facts and
        coalescers across revisions)."""
        from ray import serve

        for name, entry in table["models"].items():
            route = self.routes.get(name)
            if route is None:
                continue
            known = {v.label: v for v in route.versions}
            versions = []
            for item in entry["versions"]:
                label = str(item["version"])
                version = known.get(label)
                if version is None:
                    key = (item["app"], item["deployment"])
                    if key not in self._handles:
                        self._handles[key] = serve.get_deployment_handle(item["deployment"], item["app"])
                    version = Version(label, self._handles[key])
                    self._prepare(route, version)
                versions.append(Version(label, version.handle, item["weight"], version.facts, version.coalescer))
            route.versions, route.offline = versions, entry["offline"]
        self.table_revision = table["revision"]

    def route(self, model: str, engine: str, caller=None) -> Route:
        """The route for ``model``; 404 naming the models ``caller`` may see (a model the key may not call is
        answered exactly as one that is not served), 400 when it is the wrong kind."""
        call = current_call()
        if call is not None:
            call.model = model
        route = self.routes.get(model)
        if route is not None and caller is not None and not caller.allows(model):
            route = None
        if route is not None:
            check_online(model, route.offline)
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

        candidates = [route, *(self.routes[name] for name in route.args.fallbacks if fallbacks)]
        failure: BaseException | None = None
        for candidate in candidates:
            if not await candidate.breaker.admit():
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
                    if replica_lost(exc) and not retry and await candidate.breaker.admit():
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
        """Every served model's circuit breaker, fallbacks and served versions with their weights
        (``/admin/services``)."""
        return {name: {"engine": r.args.engine, "deployment": self.args.deployment_of(r.args),
                       "managed": r.args.managed, "offline": r.offline,
                       "versions": [{"version": v.label, "weight": v.weight} for v in r.versions],
                       "fallbacks": list(r.args.fallbacks), "breaker": r.breaker.status()}
                for name, r in sorted(self.routes.items())}

    async def serving(self) -> dict[str, Any]:
        """``services()`` plus, for managed models, the controller's ``serving`` view (``{"error"}`` while the
        controller does not answer)."""
        out = self.services()
        if self.controller is None:
            return out
        try:
            status = await asyncio.wait_for(self.controller.status.remote(), 5)
        except Exception as exc:  # noqa: BLE001 - a status page must answer while the controller restarts
            status = {"models": {}, "error": f"the lifecycle controller does not answer: {type(exc).__name__}"}
        for name, entry in out.items():
            if entry["managed"]:
                model = status["models"].get(name, {})
                entry["serving"] = {"error": status["error"]} if "error" in status else {
                    "versions": model.get("versions", []), "desired": model.get("desired"),
                    "records": [r for r in status.get("records", []) if r["model"] == name][-10:]}
        return out

    def table(self) -> dict[str, dict[str, Any]]:
        """The routing table the SDK uses for handle calls: name -> deployment, engine, pooled, the
        ``Retry-After`` the gateway would send on backpressure, and for a managed model its ``versions``
        ({version, app, deployment, weight}, from the controller) and ``offline``."""
        out = {name: {"deployment": self.args.deployment_of(r.args), "engine": r.args.engine,
                      "multiplexed": r.args.pool is not None, "retry_after_s": self.args.gateway.retry_after_s}
               for name, r in self.routes.items()}
        for name, r in self.routes.items():
            if r.args.managed:
                out[name].update(offline=r.offline, versions=[
                    {"version": v.label, "weight": v.weight, "deployment": v.handle.deployment_name,
                     "app": v.handle.app_name} for v in r.versions])
        return out

    async def embed(self, route: Route, texts: list[Any]) -> dict[str, Any]:
        """Embeddings of ``texts`` (texts or token-id lists) from a version of ``route``'s model picked by
        weight, merged with concurrent requests for that version into one upstream call (bounded by the model's
        ``batch`` settings); ``{"error"}`` from the model."""
        from mass.gateway.proxy import upstream

        return await upstream(route.pick().coalescer.submit(texts))

    async def facts(self, route: Route) -> dict[str, Any]:
        """A version's ``describe()`` (cached per version after the first call)."""
        version = route.pick()
        if not version.facts:  # through call_upstream: a model at capacity is a 503 with Retry-After here too
            from mass.gateway.errors import call_upstream

            gw = self.args.gateway
            version.facts = await call_upstream(route.handle_of(version).describe.remote(), gw.request_timeout_s,
                                                route.args.name, gw.retry_after_s)
        return version.facts


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
    state = request.app.state.mass or current_state()
    state.follow()
    return state
