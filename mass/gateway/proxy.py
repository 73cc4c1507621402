"""The service proxy around every ``/v1`` and ``/admin`` call (a pure ASGI middleware, no per-request thread
hop): it authenticates the API key, keeps the call's record (key, model, tokens, time spent upstream), settles
the key's reservation when the response ends (streams included), and adds the gateway's own time
(``x-mass-overhead-ms``) and the key's ``x-ratelimit-*`` headers to the response."""

from __future__ import annotations

import contextvars
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, TypeVar

from starlette.datastructures import MutableHeaders

from mass.errors import MassError

T = TypeVar("T")
OVERHEAD_HEADER = "x-mass-overhead-ms"
MODEL_HEADER = "x-mass-model"  # the model that answered
VERSION_HEADER = "x-mass-model-version"  # the registered version that answered (managed models)
_PROTECTED = ("/v1/", "/admin/")


@dataclass
class Call:
    """One proxied request as the gateway accounts for it."""

    path: str
    request_id: str = ""
    started: float = field(default_factory=time.perf_counter)
    key: Any = None  # mass.access.keys.ApiKey, or None with auth off
    model: str | None = None
    served_by: str | None = None  # the model that answered (a fallback, when the requested one could not)
    version: str | None = None  # the registered version that answered (a managed model's, picked by weight)
    streamed: bool = False  # an SSE response (its first byte is the first token's)
    upstream_s: float = 0.0  # time spent awaiting model deployments
    first_byte_s: float | None = None
    status: int = 0
    error_code: str | None = None  # of an error response, or of an error event that ended a stream
    prompt_tokens: int = 0
    completion_tokens: int = 0
    quota: Any = None  # mass.access.limits.Quota: what the key had left (the x-ratelimit-* headers)
    reservation: Any = None  # mass.access.limits.Reservation, settled when the response ends

    def record(self) -> dict[str, Any]:
        """The call's usage-ledger row (status 499: the client left before the response started)."""
        elapsed = time.perf_counter() - self.started
        return {"at": datetime.now(timezone.utc), "request_id": self.request_id[:64],
                "key_id": None if self.key is None else self.key.id, "model": (self.model or None) and self.model[:128],
                "path": self.path[:64], "status": self.status or 499, "error_code": self.error_code,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_ms": elapsed * 1000, "overhead_ms": max(0.0, (elapsed - self.upstream_s) * 1000)}

    def overhead_ms(self) -> float:
        """The gateway's own time so far (until the response starts): elapsed minus upstream waits."""
        end = self.first_byte_s if self.first_byte_s is not None else time.perf_counter()
        return max(0.0, (end - self.started - self.upstream_s) * 1000)


_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar("mass_call", default=None)


def current_call() -> Call | None:
    """The call being served in this task (None outside the proxy, e.g. SDK handle calls)."""
    return _CALL.get()


async def upstream(awaitable: Awaitable[T]) -> T:
    """Await a model deployment's answer, counting the wait as upstream time (not gateway overhead)."""
    start = time.perf_counter()
    try:
        return await awaitable
    finally:
        call = _CALL.get()
        if call is not None:
            call.upstream_s += time.perf_counter() - start


class ProxyMiddleware:
    """Authenticates ``/v1`` and ``/admin`` requests (``/healthz``, ``/readyz`` and the docs stay open) and
    stamps the overhead header on their responses; refusals are OpenAI error bodies."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = route_path(scope)
        if scope["type"] != "http" or not path.startswith(_PROTECTED):
            await self.app(scope, receive, send)
            return
        from mass.gateway.errors import error_response
        from mass.gateway.state import current_state

        call = Call(path, _header(scope, b"x-request-id") or "")
        named_here = not call.request_id
        if named_here:  # no Serve/HAProxy in front (an in-process app): the proxy names the request
            call.request_id = uuid.uuid4().hex[:24]
            scope["headers"] = [*scope["headers"], (b"x-request-id", call.request_id.encode())]
        token = _CALL.set(call)
        scope.setdefault("state", {})["mass_call"] = call

        async def stamped(message) -> None:
            if message["type"] == "http.response.start":
                call.first_byte_s = time.perf_counter()
                call.status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append(OVERHEAD_HEADER, f"{call.overhead_ms():.2f}")
                if named_here:
                    headers.append("x-request-id", call.request_id)
                if call.served_by is not None:
                    headers.append(MODEL_HEADER, call.served_by)
                if call.version is not None:
                    headers.append(VERSION_HEADER, call.version)
                if call.quota is not None:
                    for name, value in call.quota.headers():
                        headers.append(name, value)
            await send(message)

        state = None
        try:
            try:
                state = scope["app"].state.mass or current_state()
                call.key = await state.authenticate(_header(scope, b"authorization"),
                                                    admin=path.startswith("/admin/"))
            except MassError as exc:
                await error_response(exc)(scope, receive, stamped)
                return
            await self.app(scope, receive, stamped)
        finally:
            _CALL.reset(token)
            if state is not None:  # the response ended (whole, streamed, failed or cancelled)
                if state.ledger is not None and call.path.startswith("/v1/"):
                    state.ledger.record(call.record())
                if call.version is not None:
                    state.observe(call)
                if call.reservation is not None:  # last: the one await here (a cancelled task stops at it)
                    await state.settle(call)


def route_path(scope) -> str:
    """The request path inside the app: an app served under a route prefix (``/proxy``, ``/mass-demo``) sees
    ``/proxy/v1/models`` in ``path`` and ``/proxy`` in ``root_path``; the proxy must protect ``/v1/models``."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):]
    return path


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None

