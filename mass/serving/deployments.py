"""Ray Serve deployments that host the engines: one class per engine kind, options from ``ModelArgs``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict
from typing import Any, AsyncIterator

from ray import serve

from mass.errors import InvalidRequest, MassError
from mass.serving.args import ModelArgs

log = logging.getLogger(__name__)


def _load(args: ModelArgs):
    """(model, tokenizer, version info) of the served ref, on the GPU when the replica has one."""
    from mass.registry import ModelRegistry
    from mass.settings import apply_offline_env

    apply_offline_env()
    return ModelRegistry().load(args.ref, device="cuda" if args.num_gpus > 0 else None)


@serve.deployment
class LLMServer:
    """Continuous-batching text generation for one registered causal LM."""

    def __init__(self, args: dict[str, Any]) -> None:
        from mass.serving.engines.llm import LLMEngine

        self.args = ModelArgs.model_validate(args)
        model, tokenizer, self.info = _load(self.args)
        self.engine = LLMEngine(model, tokenizer, max_running=self.args.max_running,
                                max_batch_tokens=self.args.max_batch_tokens)
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def describe(self) -> dict[str, Any]:
        """Model facts the gateway needs (context length, chat template, version)."""
        return {"context_length": self.engine.context_length, "has_chat_template": bool(self.chat_template),
                "ref": self.info.ref, "max_tokens_limit": self.args.max_tokens_limit}

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a chat: the tokenizer's template, or a plain role-prefixed one."""
        if self.chat_template:
            return self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"

    def _prepare(self, request: dict[str, Any]):
        from mass.serving.engines.sampling import SamplingParams

        prompt = request["prompt"] if "prompt" in request else self.render_chat(request["messages"])
        ids = self.engine.encode(prompt)
        sampling = dict(request["sampling"])
        sampling["stop"] = tuple(sampling.get("stop") or ())
        params = SamplingParams(**sampling)
        limit = min(self.args.max_tokens_limit, self.engine.context_length)
        if params.max_tokens > limit:
            raise InvalidRequest(f"max_tokens={params.max_tokens} exceeds this model's limit of {limit}",
                                 param="max_tokens", limit=limit)
        self.engine.check(ids, params)
        return ids, params

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield token events as dicts; cancelling the call (client gone) cancels the sequence.

        A request the model cannot take yields one ``{"error": ...}`` event instead of raising, so
        client mistakes are answered, not logged as replica crashes.
        """
        try:
            ids, params = self._prepare(request)
        except MassError as exc:
            yield {"error": exc.to_dict()}
            return
        async for event in self.engine.stream(ids, params):
            yield {k: v for k, v in asdict(event).items() if k != "error"}

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """The whole completion at once (or ``{"error": ...}`` for a request the model cannot take)."""
        try:
            ids, params = self._prepare(request)
        except MassError as exc:
            return {"error": exc.to_dict()}
        event = await self.engine.generate(ids, params)
        return {k: v for k, v in asdict(event).items() if k != "error"}

    def stats(self) -> dict[str, int]:
        """The engine's queue depths (waiting, running) and steps taken."""
        return self.engine.stats()

    def check_health(self) -> None:
        """Serve's health probe: the engine thread must be alive."""
        if not self.engine._thread.is_alive():
            raise RuntimeError("LLM engine thread died")


@serve.deployment
class EmbeddingServer:
    """Dynamically batched sentence embeddings for one registered encoder."""

    def __init__(self, args: dict[str, Any]) -> None:
        from mass.serving.engines.embedding import EmbeddingEngine

        self.args = ModelArgs.model_validate(args)
        model, tokenizer, self.info = _load(self.args)
        self.engine = EmbeddingEngine(model, tokenizer, max_length=self.args.max_length,
                                      normalize=self.args.normalize)
        self._embed_batch.set_max_batch_size(self.args.batch.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(self.args.batch.batch_wait_timeout_s)

    def describe(self) -> dict[str, Any]:
        """Model facts for the gateway."""
        return {"dim": self.engine.dim, "ref": self.info.ref, "max_length": self.args.max_length}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, requests: list[list[str]]) -> list[tuple[list[list[float]], int]]:
        flat = [text for texts in requests for text in texts]
        vectors, lengths = await asyncio.to_thread(self.engine.embed, flat)
        results, start = [], 0
        for texts in requests:
            end = start + len(texts)
            results.append((vectors[start:end], sum(lengths[start:end])))
            start = end
        return results

    async def embed(self, texts: list[str]) -> dict[str, Any]:
        """Vectors for ``texts`` (in order) and the prompt tokens they used."""
        if not texts:
            raise InvalidRequest("input must contain at least one text", field="input")
        vectors, tokens = await self._embed_batch(texts)
        return {"data": vectors, "prompt_tokens": tokens}


def bind_model(args: ModelArgs):
    """The Serve deployment (bound, with options from ``args``) for one served model."""
    cls = LLMServer if args.engine == "llm" else EmbeddingServer
    scaling = args.autoscaling.model_dump(exclude_none=True)
    return cls.options(
        name=f"{args.engine}-{args.name}",
        autoscaling_config=scaling,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
    ).bind(args.model_dump())
