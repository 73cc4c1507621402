"""Chat completion request body (OpenAI ``/v1/chat/completions``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mass.gateway.protocol import SamplingFields


class ChatMessage(BaseModel):
    """One message; content is plain text."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """A chat request; ``max_completion_tokens`` is the newer name for ``max_tokens`` and wins."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

