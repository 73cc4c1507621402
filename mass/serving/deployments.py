"""Ray Serve deployments that host the engines: a dedicated deployment per big model, or a pool that
multiplexes many small ones (``@serve.multiplexed``, LRU). Options come from ``LLMArgs``/``EmbeddingArgs``/``PoolArgs``.

Requests a model cannot take are answered with ``{"error": ...}`` values instead of raised, so client
mistakes are not logged by Serve as replica errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from ray import serve

from mass.errors import InvalidRequest, MassError
from mass.logs import setup_replica_logging
from mass.sampling import MAX_CHOICES, SamplingParams
from mass.serving.args import AppArgs, EmbeddingArgs, LLMArgs, PoolArgs, model_args

log = logging.getLogger(__name__)


class Served:
    """One loaded model: its engine plus the request logic shared by dedicated and pooled deployments."""

    def __init__(self, args: LLMArgs | EmbeddingArgs, loaded: tuple[Any, Any, str] | None = None,
                 source: dict[str, str] | None = None) -> None:
        """Load ``args.ref`` from the registry, or take ``loaded`` = (model, tokenizer, version ref) as is; an
        ``engine: vllm`` model loads from ``source`` (``mass.serving.vllm_env.vllm_source``, resolved by the
        deployer: this replica runs on vLLM's venv, without MLflow)."""
        self.args = args
        if args.engine == "vllm":
            self._start_vllm(source)
            return
        if loaded is None:
            from mass.registry import ModelRegistry
            from mass.settings import apply_offline_env

            apply_offline_env()
            model, tokenizer, info = ModelRegistry().load(args.ref, device="cuda" if args.num_gpus > 0 else None,
                                                          dtype=args.dtype, quantization=args.quantization)
            self.ref = info.ref
        else:
            model, tokenizer, self.ref = loaded
        model, self.precision = self._precision(model, tokenizer)
        log.info("%s (%s) serves in %s: %s", args.name, self.ref, self.precision.dtype, self.precision.reason)
        if args.engine == "llm":
            from mass.serving.engines.llm import LLMEngine

            self.engine = LLMEngine(model, tokenizer, max_running=args.max_running,
                                    max_batch_tokens=args.max_batch_tokens,
                                    max_step_prompt_tokens=args.max_step_prompt_tokens)
        else:
            from mass.serving.engines.embedding import EmbeddingEngine

            self.engine = EmbeddingEngine(model, tokenizer, max_length=args.max_length, normalize=args.normalize)

    def _start_vllm(self, source: dict[str, str] | None) -> None:
        from mass.serving.engines.vllm import VLLMEngine
        from mass.serving.precision import Precision

        if source is None:
            raise ValueError("an engine: vllm model needs its source (bind it with deployments.bind_model)")
        args, self.ref = self.args, source["ref"]
        self.engine = VLLMEngine(source["model_dir"], dtype=args.dtype,
                                 max_running=args.max_running, kv_cache_gb=args.vllm.kv_cache_gb,
                                 device="cuda" if args.num_gpus > 0 else "cpu", engine_args=args.vllm.engine_args)
        self.precision = Precision(self.engine.dtype, "vLLM's choice (dtype: auto)" if args.dtype == "auto"
                                   else "as configured")
        log.info("%s (%s) serves on vLLM in %s", args.name, self.ref, self.engine.dtype)

    def _precision(self, model, tokenizer):
        """The model to serve and its ``Precision``: ``dtype: auto`` chooses (see ``mass.serving.precision``) for
        a plain torch model loaded as saved; anything else runs as configured or as made."""
        import torch

        from mass.serving.precision import Precision, choose, weight_dtype

        if not isinstance(model, torch.nn.Module):
            return model, Precision("as exported", "fixed by its format (ONNX Runtime)")
        if self.args.quantization != "none" or getattr(model.config, "quantization_config", None) is not None \
                or any("quantized" in type(m).__module__ for m in model.modules()):
            return model, Precision(weight_dtype(model), "quantized weights: precision fixed when quantized")
        if self.args.dtype != "auto":
            return model, Precision(self.args.dtype, "as configured")
        return choose(model, tokenizer, self.args.engine, next(model.parameters()).device.type)

    def __del__(self) -> None:  # called by Serve's multiplexer on LRU eviction
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

    def describe(self) -> dict[str, Any]:
        """Model facts the gateway needs."""
        precision = {"dtype": self.precision.dtype, "dtype_reason": self.precision.reason}
        if self.args.kind == "llm":
            return {"engine": self.args.engine, "context_length": self.engine.context_length, "ref": self.ref,
                    "max_tokens_limit": self.args.max_tokens_limit, **precision}
        return {"dim": self.engine.dim, "ref": self.ref, "max_length": self.args.max_length, **precision}

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a chat: the tokenizer's template, or a plain role-prefixed one."""
        tokenizer = self.engine.tokenizer
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def prepare(self, request: dict[str, Any]) -> list[tuple[list[int], SamplingParams]]:
        """The engine sequences of a generation request, one per choice (prompt-major: choice ``p * n + j``
        is prompt ``p``'s ``j``-th); InvalidRequest when a value is invalid or a prompt cannot fit.

        ``request``: ``prompts`` (texts or token-id lists) or ``messages``, ``n`` (choices per prompt,
        default 1), ``sampling`` (``SamplingParams.to_dict()``) and ``echo`` (prompts: each choice's text
        starts with its prompt)."""
        params = SamplingParams.from_dict(request.get("sampling") or {})
        limit = min(self.args.max_tokens_limit, self.engine.context_length)
        if params.max_tokens is not None and params.max_tokens > limit:
            raise InvalidRequest(f"max_tokens={params.max_tokens} exceeds this model's limit of {limit}",
                                 param="max_tokens", limit=limit)
        n = request.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise InvalidRequest(f"n must be an integer in [1, {MAX_CHOICES}], got {n!r}", param="n")
        if "messages" in request:
            prompts = [self.render_chat(request["messages"])]
        else:
            prompts = request.get("prompts") or []
        if not prompts:
            raise InvalidRequest("prompt is empty", param="prompt")
        if len(prompts) * n > MAX_CHOICES:
            raise InvalidRequest(f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} choices; at most "
                                 f"{MAX_CHOICES} per request", param="n")
        sequences = []
        for prompt in prompts:
            ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
            own = params
            if params.max_tokens is None:  # as many as the model allows after this prompt
                room = max(1, min(limit, self.engine.context_length - len(ids), self.engine.max_batch_tokens - len(ids)))
                own = params.replace(max_tokens=room)
            self.engine.check(ids, own)
            sequences += [(ids, own.for_choice(j)) for j in range(n)]
        return sequences

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """``{"prompt_tokens": N}`` once the request is accepted, then choice events (``index``, ``text``,
        ``token_ids``, ``finish_reason``, ``logprobs``) as the tokens come, then one ``{"usage": ...}``;
        ``{"error": ...}`` alone for a request that cannot run. Closing the stream (client gone) cancels every
        choice (the gateway then charges the prompt and the tokens it saw).

        ``request["resume"]`` continues a stream whose replica was lost: one entry per choice, ``{"index",
        "token_ids", "sent", "finished", "echoed"}`` (the output the client got so far, how many characters of
        its text, and whether its echoed prompt arrived); finished choices are not run again, the others continue
        after their tokens.
        Greedy choices continue exactly as they would have; sampled ones continue from a fresh generator."""
        try:
            sequences = self.prepare(request)
            resumed = self._resumed(request, sequences)
        except MassError as exc:
            yield exc.as_value()
            return
        yield {"prompt_tokens": _usage(sequences, [])["prompt_tokens"]}
        counts = [len(r["token_ids"]) for r in resumed] if resumed else [0] * len(sequences)
        if request.get("echo"):  # (a resumed choice whose prompt already reached the client is not echoed again)
            for index, (ids, _) in enumerate(sequences):
                if not resumed or not resumed[index].get("echoed", True):
                    yield {"index": index, "text": self._echo(request, index, ids), "token_ids": [],
                           "finish_reason": None, "logprobs": None}
        runs = [(index, ids, params, resumed[index] if resumed else None)
                for index, (ids, params) in enumerate(sequences) if not (resumed and resumed[index]["finished"])]
        streams = [self.engine.stream(ids, params, r["token_ids"], r["sent"]) if r else self.engine.stream(ids, params)
                   for _, ids, params, r in runs]
        async for k, event in merge_streams(streams):
            index = runs[k][0]
            counts[index] = event.completion_tokens
            yield _choice(index, event)
        yield {"usage": _usage(sequences, counts)}

    def _resumed(self, request: dict[str, Any], sequences: list[tuple[list[int], SamplingParams]]
                 ) -> list[dict[str, Any]] | None:
        """The validated ``resume`` entries of a request, one per choice in order (None when it has none)."""
        entries = request.get("resume")
        if entries is None:
            return None
        indexes = [e.get("index") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        if len(indexes) != len(sequences) or not all(type(i) is int for i in indexes) or \
                sorted(indexes) != list(range(len(sequences))):
            raise InvalidRequest(f"resume must hold one entry per choice (indexes 0..{len(sequences) - 1})",
                                 param="resume")
        out = sorted(entries, key=lambda e: e["index"])
        for entry, (_, params) in zip(out, sequences):
            ids, sent = entry.get("token_ids"), entry.get("sent")
            if not isinstance(ids, list) or isinstance(sent, bool) or not isinstance(sent, int) or sent < 0 \
                    or not isinstance(entry.get("finished"), bool) or not isinstance(entry.get("echoed", True), bool):
                raise InvalidRequest("each resume entry needs token_ids (a list), sent (characters >= 0), finished "
                                     "and optionally echoed (booleans)", param="resume")
            if not entry["finished"]:
                self.engine.check_resume(ids, params)
        return out

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Every choice whole: ``{"choices": [...], "usage": ...}`` (or ``{"error": ...}``)."""
        try:
            sequences = self.prepare(request)
        except MassError as exc:
            return exc.as_value()
        events = await asyncio.gather(*(self.engine.generate(ids, p) for ids, p in sequences))
        choices = [_choice(i, e) for i, e in enumerate(events)]
        if request.get("echo"):
            for index, (choice, (ids, _)) in enumerate(zip(choices, sequences)):
                choice["text"] = self._echo(request, index, ids) + choice["text"]
        return {"choices": choices, "usage": _usage(sequences, [e.completion_tokens for e in events])}

    def _echo(self, request: dict[str, Any], index: int, ids: list[int]) -> str:
        """The prompt of choice ``index``: as sent when it was text, decoded when it was token ids."""
        prompt = request["prompts"][index // request.get("n", 1)]
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(ids, skip_special_tokens=True)


def _choice(index: int, event) -> dict[str, Any]:
    return {"index": index, "text": event.text, "token_ids": event.token_ids, "finish_reason": event.finish_reason,
            "logprobs": event.logprobs}


def _usage(sequences: list[tuple[list[int], Any]], completion: list[int]) -> dict[str, int]:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
    prompt = sum({id(ids): len(ids) for ids, _ in sequences}.values())  # the n choices of a prompt share ids
    return {"prompt_tokens": prompt, "completion_tokens": sum(completion),
            "total_tokens": prompt + sum(completion)}


async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from several async iterators as the items come; the first failure is raised, and
    closing the merged stream closes every source (their ``finally`` blocks run)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
            await queue.put((index, done, None))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((index, done, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            index, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is done:
                left -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@serve.deployment
class LLMServer:
    """Continuous-batching text generation for one registered causal LM."""

    def __init__(self, args: dict[str, Any], served: Served | None = None,
                 source: dict[str, str] | None = None) -> None:
        setup_replica_logging()
        self.served = served or Served(model_args(args), source=source)

    def ready(self) -> bool:
        """Readiness probe: the replica is up (its model loaded in ``__init__``)."""
        return True

    def describe(self) -> dict[str, Any]:
        """Model facts (engine, context length, limits, version, dtype)."""
        return self.served.describe()

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one generation."""
        async for event in self.served.stream(request):
            yield event

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """One generation, whole."""
        return await self.served.generate(request)

    def stats(self) -> dict[str, int]:
        """The engine's queue depths (waiting, running) and steps taken (vLLM: requests in flight and served)."""
        return self.served.engine.stats()

    def check_health(self) -> None:
        """Serve's health probe: the engine thread (vLLM: its engine core) must be alive."""
        if not self.served.engine.alive():
            raise RuntimeError(f"{self.served.args.engine} engine died")


@serve.deployment
class EmbeddingServer:
    """Dynamically batched sentence embeddings for one registered encoder."""

    def __init__(self, args: dict[str, Any], served: Served | None = None) -> None:
        setup_replica_logging()
        self.served = served or Served(model_args(args))
        batch = self.served.args.batch
        self._embed_batch.set_max_batch_size(batch.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
        self._counts = {"batches": 0, "calls": 0, "texts": 0, "busy_s": 0.0}

    def ready(self) -> bool:
        """Readiness probe: the replica is up (its model loaded in ``__init__``)."""
        return True

    def describe(self) -> dict[str, Any]:
        """Model facts (dimension, version)."""
        return self.served.describe()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, requests: list[list[Any]]) -> list[tuple[list[list[float]], list[int]]]:
        return self._run_batch(requests)

    def _run_batch(self, requests: list[list[Any]]) -> list[tuple[list[list[float]], list[int]]]:
        """One forward over every request's inputs; each request gets its own (vectors, token counts)."""
        # The forward runs on the replica's event loop, not in a worker thread: requests that arrive
        # meanwhile wait in Ray's queue and form the next batch whole. Off-loop (asyncio.to_thread) the loop
        # and the forward fight over the GIL, requests trickle in, and batches shrank to one or two texts
        # under 32 concurrent HTTP clients.
        start = time.perf_counter()
        vectors, lengths = self.served.engine.embed([text for texts in requests for text in texts])
        self._counts["busy_s"] += time.perf_counter() - start
        self._counts["batches"] += 1
        self._counts["calls"] += len(requests)
        self._counts["texts"] += len(vectors)
        results, start = [], 0
        for texts in requests:
            end = start + len(texts)
            results.append((vectors[start:end], lengths[start:end]))
            start = end
        return results

    async def embed(self, texts: list[Any]) -> dict[str, Any]:
        """Vectors for ``texts`` (texts or token-id lists, in order), the tokens of each and their sum."""
        if not texts:
            return InvalidRequest("input must contain at least one text", field="input").as_value()
        if len(texts) > 1:  # a batch already (the gateway merges concurrent requests): waiting in @serve.batch
            vectors, tokens = self._run_batch([texts])[0]  # for more would only leave the core idle
        else:
            vectors, tokens = await self._embed_batch(texts)
        return {"data": vectors, "tokens": tokens, "prompt_tokens": sum(tokens)}

    def stats(self) -> dict[str, float]:
        """Forward passes run (``batches``), the calls and texts they held, and seconds spent in them
        (``busy_s``): ``texts / batches`` is the mean batch size dynamic batching achieved."""
        return dict(self._counts)


class _Pool:
    """Many registered models behind one deployment; the model id of each call picks (and loads) one."""

    def __init__(self, models: dict[str, dict[str, Any]]) -> None:
        setup_replica_logging()
        self.models = {name: model_args(a) for name, a in models.items()}
        self.loads: list[str] = []

    async def _load(self, model_id: str) -> Served:
        if model_id not in self.models:
            raise InvalidRequest(f"model {model_id!r} is not in this pool", param="model")
        served = await asyncio.to_thread(Served, self.models[model_id])
        self.loads.append(model_id)
        return served

    async def _served(self) -> Served:
        return await self.engine_for(serve.get_multiplexed_model_id())

    def ready(self) -> bool:
        """Readiness probe: the replica is up (a pool loads no model for it)."""
        return True

    async def describe(self) -> dict[str, Any]:
        """Facts of the requested model (loading it if needed)."""
        return (await self._served()).describe()

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one generation from the requested model."""
        async for event in (await self._served()).stream(request):
            yield event

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """One generation from the requested model."""
        return await (await self._served()).generate(request)

    async def embed(self, texts: list[str]) -> dict[str, Any]:
        """Embeddings from the requested model (the forward runs on the event loop, as in EmbeddingServer:
        one compute thread per replica; the gateway has already merged concurrent requests)."""
        try:
            vectors, lengths = (await self._served()).engine.embed(texts)
        except MassError as exc:
            return exc.as_value()
        return {"data": vectors, "tokens": lengths, "prompt_tokens": sum(lengths)}

    def stats(self) -> dict[str, Any]:
        """Which models this replica loaded, in order (evictions show up as reloads)."""
        return {"loads": list(self.loads)}


def _pool_deployment(pool: PoolArgs):
    """A pool deployment class whose LRU size comes from the config (a decorator argument in Serve)."""

    class PoolServer(_Pool):
        @serve.multiplexed(max_num_models_per_replica=pool.max_models_per_replica)
        async def engine_for(self, model_id: str) -> Served:
            return await self._load(model_id)

    PoolServer.__name__ = PoolServer.__qualname__ = f"PoolServer_{pool.name}"
    return serve.deployment(PoolServer)


def actor_options(num_cpus: float, num_gpus: float = 0.0) -> dict[str, Any]:
    """Replica resources, plus the deployer's ``MASS_*`` settings so replicas read the same registry."""
    from mass.settings import get_settings, settings_env

    env = {k: v for k, v in settings_env(get_settings()).items() if v}
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": env}}


def bind_app_models(args: AppArgs) -> dict[str, Any]:
    """Bound deployments for every served model name (pooled models share their pool's deployment)."""
    bound: dict[str, Any] = {}
    for pool in args.pools:
        members = {m.name: m.model_dump() for m in args.models if m.pool == pool.name}
        if not members:
            continue
        app = _pool_deployment(pool).options(
            name=f"pool-{pool.name}", autoscaling_config=pool.autoscaling.model_dump(exclude_none=True),
            max_ongoing_requests=pool.max_ongoing_requests, max_queued_requests=pool.max_queued_requests,
            ray_actor_options=actor_options(pool.num_cpus, pool.num_gpus)).bind(members)
        bound.update({name: app for name in members})
    for model in args.models:
        if model.pool is None and not model.managed:  # a managed model's versions are deployed by the controller
            bound[model.name] = bind_model(model, args.deployment_of(model))
    return bound


def bind_model(model: LLMArgs | EmbeddingArgs, name: str):
    """The bound dedicated deployment ``name`` serving ``model`` (its ``ref`` is loaded at replica start; an
    ``engine: vllm`` model's version is resolved and downloaded here, and its replicas run on vLLM's venv)."""
    options = actor_options(model.num_cpus, model.num_gpus)
    source = None
    if model.engine == "vllm":
        from mass.serving.vllm_env import vllm_runtime_env, vllm_source

        options["runtime_env"] = vllm_runtime_env(options["runtime_env"], model.num_cpus, env=model.vllm.env)
        source = vllm_source(model.ref)
    cls = LLMServer if model.kind == "llm" else EmbeddingServer
    bound = cls.options(
        name=name, autoscaling_config=model.autoscaling.model_dump(exclude_none=True),
        max_ongoing_requests=model.max_ongoing_requests, max_queued_requests=model.max_queued_requests,
        ray_actor_options=options)
    return bound.bind(model.model_dump(), None, source) if source else bound.bind(model.model_dump())
