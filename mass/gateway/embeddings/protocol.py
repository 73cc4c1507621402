"""Embedding request body (OpenAI ``/v1/embeddings``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mass.gateway.protocol import OpenAIModel


class EmbeddingRequest(OpenAIModel):
    """Texts to embed; the official client asks for base64 by default."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("input must contain at least one text")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("input takes at most 2048 texts")
        if (value == "") or (isinstance(value, list) and any(not t for t in value)):
            raise ValueError("input texts must be non-empty")
        return value

    def texts(self) -> list[str]:
        """The input as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)
