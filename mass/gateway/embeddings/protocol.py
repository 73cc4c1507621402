"""Embedding request body (OpenAI ``/v1/embeddings``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mass.gateway.protocol import Int, OpenAIModel, as_inputs, texts_or_tokens

MAX_INPUTS = 2048


class EmbeddingRequest(OpenAIModel):
    """Texts (or token ids in the model's own vocabulary) to embed; the official client asks for base64."""

    model: str = Field(..., description="A served embedding model id.")
    input: texts_or_tokens(MAX_INPUTS) = Field(
        ..., description="A text, texts, token ids or lists of token ids (the model's own vocabulary).")
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Int | None = Field(None, ge=1, description="Must equal the model's dimension when given.")
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """The input as a list of texts or token-id lists."""
        return as_inputs(self.input)
