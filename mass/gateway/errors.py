"""The gateway's one translation point: every failure becomes an OpenAI error body, never a traceback."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mass.errors import MassError
from mass.gateway.protocol import error_body

log = logging.getLogger(__name__)
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 503: "overloaded_error", 504: "timeout_error"}


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError keeps it as ``cause``)."""
    seen = 0
    while seen < 5 and getattr(exc, "cause", None) is not None and not isinstance(exc, MassError):
        exc = exc.cause
        seen += 1
    return exc


def error_response(exc: BaseException, retry_after_s: int = 1) -> JSONResponse:
    """Map any exception to (status, OpenAI error body)."""
    from ray.serve.exceptions import BackPressureError

    exc = unwrap(exc)
    if isinstance(exc, MassError):
        status = exc.http_status
        param = exc.details.get("param") or exc.details.get("field")
        body = error_body(exc.message, _TYPES.get(status, "server_error"), exc.code, param)
        if status >= 500:
            log.warning("request failed: %s", exc.message)
        return JSONResponse(body, status_code=status)
    if isinstance(exc, BackPressureError):
        return JSONResponse(error_body("the model is overloaded; retry shortly", "overloaded_error",
                                       "backpressure"), status_code=503,
                            headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return JSONResponse(error_body("the model did not answer in time", "timeout_error", "upstream_timeout"),
                            status_code=504)
    log.exception("unexpected gateway error", exc_info=exc)
    return JSONResponse(error_body("internal error", "server_error", "internal_error"), status_code=500)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if p != "body"]
        field = ".".join(loc) or "body"
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown field"
        elif first["type"] == "json_invalid":
            msg, field = "request body is not valid JSON", "body"
        return JSONResponse(error_body(f"{field}: {msg}", "invalid_request_error", "invalid_value", field),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), _TYPES.get(exc.status_code, "invalid_request_error")),
                            status_code=exc.status_code)

    @app.exception_handler(MassError)
    async def _mass(request: Request, exc: MassError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return error_response(exc)
