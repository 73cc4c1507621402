"""Chat completion request body (OpenAI ``/v1/chat/completions``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, model_validator

from mass.gateway.protocol import Int, OnlyFalse, OpenAIModel, SamplingFields

ROLES = ("system", "developer", "user", "assistant")


class ContentPart(OpenAIModel):
    """One part of a message's content; only ``text`` parts are supported. Any part type is read (and
    refused by the message, naming it); the document declares only ``text``."""

    model_config = OpenAIModel.model_config | {"extra": "allow", "json_schema_extra": {"additionalProperties": False,
                                                                                         "required": ["type", "text"]}}
    type: Annotated[str, WithJsonSchema({"type": "string", "enum": ["text"]})]
    text: Annotated[str | None, WithJsonSchema({"type": "string"})] = None


def _message_schema(schema: dict[str, Any]) -> None:
    """Document the two message shapes: system/developer/user need ``content``; an assistant's may be null.
    (Tool and function roles are read only to be refused by name.)"""
    props = schema.pop("properties")
    content = [c for c in props["content"]["anyOf"] if c.get("type") != "null"]
    common = {"type": "object", "additionalProperties": False}
    for key in ("required", "additionalProperties", "type"):
        schema.pop(key, None)
    schema["oneOf"] = [
        {**common, "required": ["role", "content"],
         "properties": {**props, "role": {"type": "string", "enum": list(ROLES[:3])}, "content": {"anyOf": content}}},
        {**common, "required": ["role"], "properties": {**props, "role": {"type": "string", "const": "assistant"}}}]


class ChatMessage(OpenAIModel):
    """One message: ``content`` is text or a list of text parts (``null`` for an assistant message)."""

    model_config = OpenAIModel.model_config | {"json_schema_extra": _message_schema}
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported: tools.")
    function_call: None = Field(None, description="Not supported: functions.")
    tool_call_id: str | None = None
    audio: None = None

    @model_validator(mode="after")
    def _supported(self) -> "ChatMessage":
        if self.role in ("tool", "function"):
            raise ValueError(f"{self.role} messages are not supported (this gateway serves no tools)")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role} message")
        for part in self.content if isinstance(self.content, list) else []:
            if part.type != "text" or part.text is None:
                raise ValueError(f"{part.type} content parts are not supported; only text parts")
            if part.model_extra:
                raise ValueError(f"text content part: unknown field {sorted(part.model_extra)[0]!r}")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ResponseFormat(OpenAIModel):
    """Only plain text responses are supported."""

    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    """A chat request; ``max_completion_tokens`` is the newer name for ``max_tokens`` and wins. Without
    either, a reply may take as many tokens as the model allows."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool | None = Field(False, description="Return each token's logprob.")
    top_logprobs: Int | None = Field(None, ge=0, le=20, description="Alternatives per token (needs logprobs).")
    response_format: ResponseFormat | None = Field(None, description='Not supported beyond {"type": "text"}.')
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported: null or [].")
    tool_choice: Literal["none"] | None = Field(None, description='Not supported: "none" or null.')
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported.")
    function_call: Literal["none"] | None = Field(None, description="Not supported.")
    service_tier: str | None = Field(None, description="Accepted; there is one tier.")
    metadata: dict[str, str] | None = None
    store: OnlyFalse | None = Field(None, description="Not supported: completions are not stored.")
    modalities: list[Literal["text"]] | None = Field(None, description="Text only.")
    audio: None = Field(None, description="Not supported.")
    prediction: None = Field(None, description="Not supported.")
    reasoning_effort: None = Field(None, description="Not supported.")
    verbosity: None = Field(None, description="Not supported.")
    web_search_options: None = Field(None, description="Not supported.")
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def conversation(self) -> list[dict[str, str]]:
        """The messages as role/content strings for the chat template (``developer`` is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]
