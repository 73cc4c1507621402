"""Request/response models shared by the endpoint families (OpenAI wire format).

Every field of OpenAI's current request schemas is declared, so the clients people use (the official
``openai`` client, LangChain, LlamaIndex) are never refused for a field they send by default. Fields a
self-hosted engine cannot honour declare only their neutral values (``tools: []``, ``store: false``...):
anything else is a 400 that names the field and says it is not supported (``UNSUPPORTED``, used by the
gateway's validation handler). Fields outside OpenAI's schemas are still refused, by name.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
)

from mass.sampling import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_STOP,
    SEED_RANGE,
    SamplingParams,
)

#: field -> what this gateway accepts of it; any other value is refused as not supported.
UNSUPPORTED: dict[str, str] = {
    "tools": "null or []", "tool_choice": '"none" or null', "functions": "null or []",
    "function_call": '"none" or null', "response_format": '{"type": "text"} or null', "store": "false or null",
    "modalities": '["text"] or null', "audio": "null", "prediction": "null", "reasoning_effort": "null",
    "verbosity": "null", "web_search_options": "null", "suffix": '"" or null', "best_of": "1 or null",
    "include_obfuscation": "false or null", "tool_calls": "null or []",
}


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` includes 2.0; strict pydantic would refuse it (booleans stay refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]  # an integer as JSON Schema means it
TokenId = Annotated[Int, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
#: false only (booleans as JSON has them: a Literal[False] would also take 0, which equals False in Python)
OnlyFalse = Annotated[bool, AfterValidator(lambda v: _refuse(v, "false")), WithJsonSchema({"const": False})]


def _refuse(value: Any, accepted: str) -> Any:
    if value:
        raise ValueError(f"not supported by this gateway (accepted: {accepted})")
    return value


TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def as_inputs(value: str | list) -> list[str | list[int]]:
    """A ``texts_or_tokens`` value as a list of inputs (texts or token-id lists)."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(item, int) for item in value):
        return [list(value)]
    return list(value)


def texts_or_tokens(max_items: int):
    """A prompt or embedding input type: a text, texts, token ids, or lists of token ids (none empty; at
    most ``max_items`` texts or lists)."""
    return (NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=max_items)] | TokenIds
            | Annotated[list[TokenIds], Field(min_length=1, max_length=max_items)])


class OpenAIModel(BaseModel):
    """Request bodies: fields outside OpenAI's schema are errors, named in the 400."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())  # JSON types as declared


class StreamOptions(OpenAIModel):
    """Options of a streamed response."""

    include_usage: bool | None = Field(None, description="Send a last chunk with the usage of the request.")
    include_obfuscation: OnlyFalse | None = Field(None, description="Not supported: false or null only.")


class SamplingFields(OpenAIModel):
    """Decoding fields common to completions and chat."""

    model: str = Field(..., description="A served model id (GET /v1/models).")
    max_tokens: Int | None = Field(None, ge=1, description="New tokens at most.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 (or under 1e-5) decodes greedily.")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus mass; the most likely token is "
                                                                  "always kept.")
    n: Int | None = Field(None, ge=1, le=MAX_CHOICES, description="Choices to generate per prompt.")
    seed: Int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1],
                             description="Any signed or unsigned 64-bit integer; choice i uses seed + i.")
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"Up to {MAX_STOP} non-empty strings that end generation.")
    stream: bool | None = Field(False, description="Stream chunks as server-sent events.")
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]+$")], float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS,
                                                description="Token id (as a string) -> bias in [-100, 100].")
    user: str | None = Field(None, description="End-user id, recorded for attribution.")

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams (validated: InvalidRequest names the field)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=self.stop or (),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias or {}, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    """What went wrong (OpenAI's error object)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body (and a failed stream's last event)."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route returns (all with the OpenAI error body)."""
    meaning = {400: "Invalid request: the message names the field",
               401: "Missing, malformed, unknown or revoked API key (`invalid_api_key`)",
               403: "The key may not do this (/admin needs an admin key)",
               404: "Model not served here, or not one the key may call",
               409: "Another operation changed the model first (`conflict`): look again, then retry",
               429: "Rate limit (`rate_limit_exceeded`) or token budget (`insufficient_quota`); retry after "
                    "Retry-After seconds",
               500: "Internal error (never a traceback)", 502: "Model repository failed",
               503: "Model at capacity or gateway starting; retry after Retry-After seconds",
               504: "Model did not answer within the gateway's request timeout"}
    return {s: {"model": ErrorResponse, "description": meaning[s]} for s in statuses}


#: OpenAPI: a generation route's 200 is JSON, or server-sent events with ``stream: true``.
STREAM_RESPONSE = {200: {
    "description": "The response; with ``stream: true`` a ``text/event-stream`` of chunks ending with "
                   "``data: [DONE]`` (a failure mid-stream is one last ``{\"error\": ...}`` event).",
    "content": {"text/event-stream": {"schema": {  # one event (OpenAPI 3.1: the schema describes each event)
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "A JSON chunk, an error, or [DONE]."},
                       "event": {"type": "string"}}}}}}}
