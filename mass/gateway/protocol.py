"""Request/response models shared by the endpoint families (OpenAI wire format)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class OpenAIModel(BaseModel):
    """Request bodies: unknown fields are errors (named in the 400), except the few clients always send."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SamplingFields(OpenAIModel):
    """Decoding fields common to completions and chat."""

    model: str
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    user: str | None = None
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and (len(value) > 4 or any(not s for s in value)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    def sampling(self) -> dict[str, Any]:
        """The engine's SamplingParams fields."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {"max_tokens": self.max_tokens or 16, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": tuple(stop)}


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
