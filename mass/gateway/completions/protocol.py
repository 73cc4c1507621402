"""Completion request body (OpenAI ``/v1/completions``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mass.gateway.protocol import Int, SamplingFields, as_inputs, texts_or_tokens
from mass.sampling import MAX_CHOICES


class CompletionRequest(SamplingFields):
    """A text completion request: ``prompt`` is a string, a list of strings, or token ids (one list or several);
    each prompt gets ``n`` choices."""

    prompt: texts_or_tokens(MAX_CHOICES) = Field(..., description="Text, texts, or token ids in the model's own vocabulary.")
    echo: bool | None = Field(False, description="Prepend the prompt to each choice's text.")
    logprobs: Int | None = Field(None, ge=0, le=5, description="Return each token's logprob and this many "
                                                               "most likely alternatives.")
    best_of: Int | None = Field(None, ge=1, le=1, description="Not supported beyond 1 (use n).")
    suffix: Literal[""] | None = Field(None, description="Not supported (insertion): empty or null only.")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (texts or token-id lists)."""
        return as_inputs(self.prompt)
