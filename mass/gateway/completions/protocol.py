"""Completion request body (OpenAI ``/v1/completions``)."""

from __future__ import annotations

from pydantic import Field

from mass.gateway.protocol import SamplingFields


class CompletionRequest(SamplingFields):
    """A text completion request; ``prompt`` is one string."""

    prompt: str = Field(..., min_length=1)
    echo: bool = False
