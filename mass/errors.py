"""The MassError hierarchy: one root with a stable ``code``, an HTTP status and a CLI exit code.

Every subclass registers itself by code so a boundary (SDK, CLI, Ray) can turn a code back into the
same class. Errors are picklable because they cross Ray process boundaries.
"""

from __future__ import annotations

from typing import Any, ClassVar

_BY_CODE: dict[str, type["MassError"]] = {}


def _rebuild(cls: type["MassError"], message: str, details: dict[str, Any]) -> "MassError":
    return cls(message, **details)


class MassError(Exception):
    """Root of every error MASS raises on purpose.

    Args:
        message: one line for a person: what went wrong and how to fix it. It may reach clients,
            so it never carries secrets.
        **details: structured context (``field``, ``name``, ``available``...) kept for JSON output.
    """

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            _BY_CODE[cls.code] = cls

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self):  # keeps details across pickling (Ray, multiprocessing)
        return (_rebuild, (type(self), self.message, self.details))

    def to_dict(self) -> dict[str, Any]:
        """Return the error as a JSON-ready dict (``code``, ``message`` and details)."""
        return {"code": self.code, "message": self.message, **self.details}

    def as_value(self) -> dict[str, Any]:
        """The error as a value that crosses Ray Serve (``{"error": to_dict()}``): a model deployment
        returns it instead of raising, so a client's mistake is not logged as a replica failure."""
        return {"error": self.to_dict()}

    @staticmethod
    def from_dict(error: dict[str, Any]) -> "MassError":
        """Rebuild the error from ``to_dict()`` output (or an OpenAI error body's ``error``)."""
        details = {k: v for k, v in error.items() if k not in ("code", "message", "type") and v is not None}
        return MassError.class_for(error.get("code") or "")(error.get("message") or "request failed", **details)

    @staticmethod
    def class_for(code: str) -> type["MassError"]:
        """Return the registered class for ``code`` (``MassError`` itself when unknown)."""
        return _BY_CODE.get(code, MassError)


_BY_CODE[MassError.code] = MassError


def raise_if_error(value: Any) -> Any:
    """Raise the MassError carried by a value from ``MassError.as_value()``; otherwise return ``value``."""
    if isinstance(value, dict) and isinstance(value.get("error"), dict):
        raise MassError.from_dict(value["error"])
    return value


class InvalidRequest(MassError):
    """The caller sent something malformed: fix the input and retry."""

    code = "invalid_request"
    http_status = 400
    exit_code = 2


class ConfigError(InvalidRequest):
    """A recipe or configuration value is malformed, unknown or of the wrong type."""

    code = "invalid_config"


class InvalidModelRef(InvalidRequest):
    """A model reference string is not ``name``, ``name/<version>`` or ``name@<alias>``."""

    code = "invalid_model_ref"


class DataError(InvalidRequest):
    """Training or evaluation data is missing, empty or in an unsupported format."""

    code = "data_error"


class NotFound(MassError):
    """Something the caller named does not exist."""

    code = "not_found"
    http_status = 404
    exit_code = 3


class ModelNotFound(NotFound):
    """A registered model, version or alias does not exist; the message names what does."""

    code = "model_not_found"


class ModelOffline(NotFound):
    """A served model was taken offline (`mass models offline`); the message says by whom, when and why."""

    code = "model_offline"


class InsufficientResources(MassError):
    """The cluster cannot provide what a job asks for (workers, CPUs, GPUs)."""

    code = "insufficient_resources"
    http_status = 503
    exit_code = 4


class Overloaded(MassError):
    """A model is at capacity (Serve backpressure); retry after ``retry_after`` seconds."""

    code = "backpressure"
    http_status = 503
    exit_code = 7

    @classmethod
    def at_capacity(cls, model: str, retry_after_s: int) -> "Overloaded":
        """The one wording for Serve's backpressure on ``model`` (gateway and SDK handle path alike)."""
        return cls(f"model {model!r} is at capacity; retry in {retry_after_s}s", retry_after=retry_after_s)


class UpstreamTimeout(MassError):
    """A model did not answer within the gateway's request timeout."""

    code = "upstream_timeout"
    http_status = 504
    exit_code = 8

    @classmethod
    def after(cls, model: str, timeout_s: float) -> "UpstreamTimeout":
        """The one wording for ``model`` not answering within ``timeout_s``."""
        return cls(f"model {model!r} did not answer within {timeout_s:g}s")


class InvalidApiKey(MassError):
    """The request carries no API key, a malformed one, or one that is unknown or revoked."""

    code = "invalid_api_key"
    http_status = 401
    exit_code = 9


class InvalidSignature(InvalidApiKey):
    """A webhook delivery is unsigned, wrongly signed, or too old to be anything but a replay."""

    code = "invalid_signature"


class PermissionDenied(MassError):
    """The API key is valid but may not do this (an admin endpoint with a user key)."""

    code = "permission_denied"
    http_status = 403
    exit_code = 10


class RateLimited(MassError):
    """A key's requests or tokens per minute, or its concurrent requests, are used up; retry after
    ``retry_after`` seconds."""

    code = "rate_limit_exceeded"
    http_status = 429
    exit_code = 11


class QuotaExceeded(RateLimited):
    """A key's token budget for the day or month is spent (or cannot be checked: budgets fail closed)."""

    code = "insufficient_quota"


class KeyNotFound(NotFound):
    """An API key named by id or name does not exist."""

    code = "key_not_found"


class Conflict(MassError):
    """Another operation changed the same thing first (two operators at once): look at its state and retry."""

    code = "conflict"
    http_status = 409
    exit_code = 12


class InvalidEvent(InvalidRequest):
    """An event does not match its type's schema (refused when published; dead-lettered when read)."""

    code = "invalid_event"


class EventBusError(MassError):
    """The event bus (its SQLite log or Redis) failed or could not be reached; nothing was published."""

    code = "event_bus_unavailable"
    http_status = 503
    exit_code = 5


class UpstreamUnavailable(MassError):
    """A model's replica died or could not be reached (after one transparent retry); retry after
    ``retry_after`` seconds. An upstream failure, never the gateway's own 500."""

    code = "upstream_unavailable"
    http_status = 503
    exit_code = 7


class CircuitOpen(UpstreamUnavailable):
    """A model's circuit breaker is open (its recent requests failed) and no fallback could answer."""

    code = "circuit_open"


class RegistryError(MassError):
    """The model repository (MLflow) failed or could not be reached."""

    code = "registry_error"
    http_status = 502
    exit_code = 5


class ParityError(MassError):
    """A converted model's outputs differ from its source's beyond the tolerance (refused, not registered)."""

    code = "parity_failed"
    http_status = 422
    exit_code = 13


class JobFailed(MassError):
    """A training or compression job failed after it started."""

    code = "job_failed"
    http_status = 500
    exit_code = 6
