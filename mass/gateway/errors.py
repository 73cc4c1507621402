"""The gateway's one translation point: every failure becomes an OpenAI error body, never a traceback."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mass.errors import MassError, Overloaded, UpstreamTimeout, UpstreamUnavailable
from mass.gateway.protocol import UNSUPPORTED, error_body
from mass.routing import replica_lost

log = logging.getLogger(__name__)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "conflict_error", 429: "rate_limit_error", 502: "upstream_error",
          503: "overloaded_error", 504: "timeout_error"}


#: OpenAI's own types where a code has one; an upstream failure is not the gateway being overloaded
_CODE_TYPES = {"insufficient_quota": "insufficient_quota", "upstream_unavailable": "upstream_error",
               "circuit_open": "upstream_error"}


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError keeps it as ``cause``)."""
    seen = 0
    while seen < 5 and getattr(exc, "cause", None) is not None and not isinstance(exc, MassError):
        exc = exc.cause
        seen += 1
    return exc


async def call_upstream(response, timeout: float, model: str, retry_after_s: int):
    """Await a Serve handle response; backpressure -> Overloaded (503), timeout -> UpstreamTimeout (504), a
    replica that died -> UpstreamUnavailable (503 with Retry-After: an upstream failure, not our 500).

    Translating here, inside the route, matters: Serve installs its own plain-text 503 handler for
    BackPressureError on the app, which would bypass the OpenAI error body and ``Retry-After``.
    """
    from ray.serve.exceptions import BackPressureError

    try:
        return await asyncio.wait_for(response, timeout)
    except BackPressureError as exc:
        raise Overloaded.at_capacity(model, retry_after_s) from exc
    except asyncio.TimeoutError as exc:
        if hasattr(response, "cancel"):  # a DeploymentResponse; a stream is cancelled by its owner
            response.cancel()
        raise UpstreamTimeout.after(model, timeout) from exc
    except Exception as exc:
        if replica_lost(exc):
            raise UpstreamUnavailable(f"model {model!r} lost the replica serving this request; retry in "
                                      f"{retry_after_s}s", retry_after=retry_after_s) from exc
        raise


def is_upstream_failure(exc: BaseException) -> bool:
    """Does ``exc`` count against a model's circuit breaker? Its replica died, it timed out, or it failed on
    its own (5xx); a client's mistake (4xx) and backpressure (503 at capacity) do not."""
    exc = unwrap(exc)
    if isinstance(exc, MassError):
        return exc.http_status >= 500 and not isinstance(exc, Overloaded)
    return not isinstance(exc, asyncio.CancelledError)


def validation_error_body(errors: list[dict]) -> dict:
    """The 400 body for a request the schema refuses: the first error, naming its field; a field this gateway
    does not support says so (and what it accepts) instead of pydantic's wording."""
    # a union reports one error per member; the one that is not a plain type mismatch names the real problem
    first = next((e for e in errors if not e["type"].endswith("_type") and e["type"] != "literal_error"), errors[0])
    loc = [str(p) for p in first["loc"][1 if first["loc"][:1] == ("body",) else 0:]]
    field = ".".join(p for p in loc if not _is_type_tag(p)) or "body"
    msg = first["msg"]
    supported = next((name for name in UNSUPPORTED if f".{name}." in f".{field}."), None)
    if first["type"] == "extra_forbidden":
        msg = "unknown field (not in OpenAI's request schema for this endpoint)"
    elif first["type"] == "json_invalid":
        msg, field = "request body is not valid JSON", "body"
    elif supported is not None:
        msg = f"not supported by this gateway (accepted: {UNSUPPORTED[supported]})"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return error_body(f"{field}: {msg}", "invalid_request_error", "invalid_value", field)


def _is_type_tag(part: str) -> bool:
    """pydantic names the union member that failed inside the location (``prompt.list[int].0``)."""
    return ("[" in part or part in ("str", "int", "float", "bool", "dict", "none")
            or part.startswith(("function-", "constrained-")))


def error_response(exc: BaseException) -> JSONResponse:
    """Map any exception to (status, OpenAI error body); never a traceback."""
    from mass.gateway.proxy import current_call

    exc = unwrap(exc)
    call = current_call()
    if call is not None:
        call.error_code = exc.code if isinstance(exc, MassError) else "internal_error"
    if isinstance(exc, MassError):
        status = exc.http_status
        param = exc.details.get("param") or exc.details.get("field")
        body = error_body(exc.message, _CODE_TYPES.get(exc.code) or _TYPES.get(status, "server_error"), exc.code,
                          param)
        if status >= 500:
            log.warning("request failed: %s", exc.message)
        headers = {"Retry-After": str(exc.details["retry_after"])} if "retry_after" in exc.details else None
        return JSONResponse(body, status_code=status, headers=headers)
    log.exception("unexpected gateway error", exc_info=exc)
    return JSONResponse(error_body("internal error", "server_error", "internal_error"), status_code=500)


async def _expected(request: Request, exc: Exception):
    return error_response(exc)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(validation_error_body(exc.errors()), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), _TYPES.get(exc.status_code, "invalid_request_error")),
                            status_code=exc.status_code)

    # MassError is answered by Starlette's ExceptionMiddleware and ends there; the handler for plain
    # Exception runs in ServerErrorMiddleware, which re-raises after answering (a real crash).
    app.add_exception_handler(MassError, _expected)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return error_response(exc)
