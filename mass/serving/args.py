"""Serve application config: which registered models are served, by which engine, with what resources.

Read from ``serve_apps/configs/*.yaml`` (the ``args:`` of a Serve config, or ``mass serve up``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, field_validator, model_validator

from mass.config import UNION_TAGS, MassConfig
from mass.refs import ModelRef
from mass.routing import KINDS


class AutoscalingArgs(MassConfig):
    """Ray Serve autoscaling for one deployment (min_replicas 0 = scale to zero)."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 scales to zero).")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    max_replicas: int = Field(1, ge=1, description="Upper bound under load.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="In-flight requests per replica to aim for.")
    upscale_delay_s: float = Field(3.0, ge=0, description="Load must persist this long before scaling up.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Idleness must persist this long before scaling down.")
    look_back_period_s: float = Field(12.0, gt=10, description="Window for averaging load (Ray needs > 10).")

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class BatchArgs(MassConfig):
    """Dynamic batching of embedding requests (``@serve.batch``)."""

    max_batch_size: int = Field(32, ge=1, le=1024, description="Requests merged into one forward pass.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5, description="Wait this long to fill a batch.")


class _ServedModel(MassConfig):
    """What every served model has, whatever its engine."""

    name: str = Field(..., description="Model id clients send (`model` in the OpenAI API).")
    ref: str = Field(..., description="Registered ModelRef to serve, usually an alias: tiny-gpt@production.")
    pool: str | None = Field(None, description="Serve from this shared pool (multiplexed, LRU) instead of a "
                                               "dedicated deployment; resources then come from the pool.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica accepts at once.")
    max_queued_requests: int = Field(-1, ge=-1, description="Queued per caller before 503 (-1: unbounded).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype at load time (auto: bf16 where it measured faster and a parity check "
                            "against fp32 passes at load, else as saved; see `describe()`).")
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none", description="Load weights quantized with bitsandbytes (int8, or 4-bit nf4).")
    fallbacks: list[str] = Field(default_factory=list, description="Served models (same engine) that answer, in "
                                 "order, while this model's circuit breaker is open or its replica was lost twice.")
    managed: bool = Field(False, description="Serve the versions the registry's lifecycle names (production, and a "
                                             "canary at its weight) and follow `mass models publish|canary|promote|"
                                             "rollback|offline` live: the controller deploys each version as its own "
                                             "Serve app. The ref must be <model>@production; no pool.")

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str) -> str:
        ModelRef.parse(value)
        return value

    @model_validator(mode="after")
    def _managed(self):
        if self.managed:
            ref = ModelRef.parse(self.ref)
            if ref.alias != "production":
                raise ValueError(f"model {self.name!r}: a managed model follows its lifecycle aliases, so its ref must "
                                 f"be {ref.name}@production (got {self.ref!r})")
            if self.pool is not None:
                raise ValueError(f"model {self.name!r}: a managed model gets a deployment per version; it cannot "
                                 f"join pool {self.pool!r}")
        return self

    def pinned(self, version: int) -> "_ServedModel":
        """These args serving one fixed version of the registered model (a managed model's version app)."""
        return self.model_copy(update={"ref": f"{ModelRef.parse(self.ref).name}/{version}", "managed": False})


class VLLMOptions(MassConfig):
    """vLLM's own settings for a model served with ``engine: vllm``."""

    kv_cache_gb: float = Field(1.0, gt=0, description="KV cache of a replica in GiB on CPU nodes "
                               "(vLLM's VLLM_CPU_KVCACHE_SPACE; on GPUs vLLM sizes it from gpu_memory_utilization).")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="More vLLM AsyncEngineArgs, passed as "
                                        "they are (e.g. enable_prefix_caching: false, gpu_memory_utilization: 0.5).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the replica's vLLM, over MASS's "
                                "(e.g. VLLM_CPU_OMP_THREADS_BIND: '2-7' pins its threads to cores of their own).")


class LLMArgs(_ServedModel):
    """A served causal LM: MASS's continuous-batching engine (``llm``) or vLLM's (``vllm``)."""

    engine: Literal["llm", "vllm"] = Field(..., description="llm: text generation by MASS's continuous-batching "
                                           "engine; vllm: by vLLM's engine, run from its own venv (`make vllm`).")
    max_running: int = Field(16, ge=1, description="Sequences decoded together (vLLM: max_num_seqs).")
    max_batch_tokens: int = Field(8192, ge=16, description="Prompt + max_tokens summed over the batch (MASS "
                                  "engine; vLLM's KV budget is `vllm.kv_cache_gb`).")
    max_step_prompt_tokens: int = Field(512, ge=1, description="Prompt tokens one engine step prefills at most "
                                        "(GPT-2 runner; vLLM: max_num_batched_tokens, at least the context): a "
                                        "longer prompt is prefilled in parts while the others decode; lower "
                                        "favours inter-token latency, higher throughput.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="vLLM's settings (`engine: vllm` only).")

    @property
    def kind(self) -> str:
        """What the model does, whichever engine runs it: ``llm`` (text generation; ``mass.routing.KINDS``)."""
        return KINDS[self.engine]

    @model_validator(mode="after")
    def _vllm(self) -> "LLMArgs":
        if self.engine != "vllm":
            if self.vllm != VLLMOptions():
                raise ValueError(f"model {self.name!r}: `vllm` settings apply to `engine: vllm` only")
            return self
        if self.pool is not None:
            raise ValueError(f"model {self.name!r}: a vLLM engine holds its KV cache for one model; it cannot join "
                             f"pool {self.pool!r} (serve it dedicated)")
        if self.quantization != "none":
            raise ValueError(f"model {self.name!r}: quantization {self.quantization!r} is bitsandbytes on MASS's "
                             "engine; with `engine: vllm` serve a quantized checkpoint or pass vLLM's own "
                             "`vllm.engine_args.quantization`")
        return self


class EmbeddingArgs(_ServedModel):
    """A served sentence encoder (dynamically batched)."""

    engine: Literal["embedding"] = Field(..., description="embedding: encoders.")
    batch: BatchArgs = Field(default_factory=BatchArgs)
    max_length: int = Field(256, ge=8, description="Inputs truncated to this many tokens.")
    normalize: bool = Field(True, description="L2-normalise vectors.")

    @property
    def kind(self) -> str:
        """What the model does: ``embedding`` (``mass.routing.KINDS``)."""
        return KINDS[self.engine]


#: one served model: its options depend on ``engine`` (an LLM has no ``batch``, an encoder no ``max_running``)
ModelArgs = Annotated[LLMArgs | EmbeddingArgs, Field(discriminator="engine")]
_MODEL_ARGS: TypeAdapter = TypeAdapter(ModelArgs)
UNION_TAGS.update({"llm", "vllm", "embedding"})


def model_args(data: dict) -> LLMArgs | EmbeddingArgs:
    """Validate one model's args (as the deployments receive them)."""
    return _MODEL_ARGS.validate_python(data)


class PoolArgs(MassConfig):
    """A pool deployment: many small models per replica through ``@serve.multiplexed`` with an LRU limit."""

    name: str = Field(..., description="Pool name; models join it with `pool: <name>`.")
    engine: Literal["llm", "embedding"] = Field(..., description="The engine kind of every model in the pool.")
    max_models_per_replica: int = Field(3, ge=1, le=64, description="Loaded models per replica; the least "
                                                                    "recently used is evicted past this.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica accepts at once.")
    max_queued_requests: int = Field(-1, ge=-1, description="Queued per caller before 503 (-1: unbounded).")


class BreakerArgs(MassConfig):
    """The circuit breaker the gateway keeps for every served model."""

    failure_ratio: float = Field(0.5, gt=0, le=1, description="Open at this share of failed requests...")
    min_requests: int = Field(10, ge=1, description="...once the window holds at least this many.")
    window_s: float = Field(30.0, gt=0, description="Sliding window of request outcomes.")
    open_s: float = Field(10.0, gt=0, description="Stay open this long, then let probe requests through.")
    half_open_probes: int = Field(2, ge=1, description="Probe requests that must all succeed to close again.")


class SloArgs(MassConfig):
    """The bounds a canary must hold against production, over a sliding window of the gateways' requests;
    the controller rolls back a canary that breaks one."""

    enabled: bool = Field(True, description="Roll a canary back automatically when it breaks a bound.")
    window_s: float = Field(60.0, gt=0, description="Sliding window of request outcomes per version.")
    min_requests: int = Field(20, ge=1, description="Requests a version needs in the window before it is judged.")
    error_ratio_factor: float = Field(2.0, ge=1, description="Canary error rate may be at most this x "
                                                             "production's...")
    error_ratio_margin: float = Field(0.01, ge=0, le=1, description="...plus this (0.01: one point).")
    latency_factor: float = Field(1.5, ge=1, description="Canary p95 latency and p95 time to first token may be at "
                                                         "most this x production's...")
    latency_margin_ms: float = Field(50.0, ge=0, description="...or production's plus this, whichever is larger "
                                                             "(small models' p95 is mostly noise).")


class ControllerArgs(MassConfig):
    """The lifecycle controller of an app with managed models (one named Ray actor per app)."""

    reconcile_s: float = Field(5.0, gt=0, description="Read every managed model's desired state from the registry "
                                                      "this often, whatever the event bus said.")
    table_poll_s: float = Field(0.25, gt=0, description="How often each gateway replica reads the routing table.")
    drain_s: float = Field(30.0, ge=0, description="A version that leaves the traffic split keeps its replicas this "
                                                   "long (requests in flight finish) before its app is deleted.")
    slo: SloArgs = Field(default_factory=SloArgs)


class GatewayArgs(MassConfig):
    """The OpenAI-compatible gateway."""

    request_timeout_s: float = Field(60.0, gt=0, description="Upstream timeout; exceeded -> 504.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503 on backpressure.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per gateway replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests a gateway replica accepts at once.")
    replicas: int = Field(1, ge=1, description="Gateway replicas (HAProxy spreads requests over them).")
    redis_url: str | None = Field(None, description="Redis shared by the gateway replicas for exact per-key "
                                                    "limits and budgets (redis://host:port/db). None: in-process "
                                                    "limits, exact for one replica.")
    ledger: bool = Field(True, description="Record every /v1 request in the usage ledger (platform database).")
    breaker: BreakerArgs = Field(default_factory=BreakerArgs)
    auth: bool = Field(True, description="Require an API key (`Authorization: Bearer`) on /v1 and /admin. "
                                         "false: anyone who reaches the port calls every model without limits "
                                         "(logged as a warning at start).")


class AppArgs(MassConfig):
    """A whole Serve application: models behind one gateway."""

    models: list[ModelArgs] = Field(..., min_length=1)
    pools: list[PoolArgs] = Field(default_factory=list, description="Shared multiplexed deployments.")
    gateway: GatewayArgs = Field(default_factory=GatewayArgs)
    controller: ControllerArgs = Field(default_factory=ControllerArgs)

    @model_validator(mode="after")
    def _unique(self) -> "AppArgs":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        pools = {p.name: p for p in self.pools}
        for model in self.models:
            if model.pool is None:
                continue
            if model.pool not in pools:
                raise ValueError(f"model {model.name!r}: pool {model.pool!r} is not defined; pools: "
                                 f"{sorted(pools) or 'none'}")
            if pools[model.pool].engine != model.engine:
                raise ValueError(f"model {model.name!r} ({model.engine}) cannot join pool {model.pool!r} "
                                 f"({pools[model.pool].engine})")
        return self

    @model_validator(mode="after")
    def _fallbacks(self) -> "AppArgs":
        kinds = {m.name: m.kind for m in self.models}  # a vllm model may fall back to an llm one, and back
        for model in self.models:
            for name in model.fallbacks:
                if name == model.name or name not in kinds:
                    raise ValueError(f"model {model.name!r}: fallback {name!r} must be another served model; "
                                     f"served: {sorted(kinds)}")
                if kinds[name] != model.kind:
                    raise ValueError(f"model {model.name!r} ({model.kind}) cannot fall back to {name!r} "
                                     f"({kinds[name]})")
        return self

    def deployment_of(self, model: ModelArgs) -> str:
        """The Serve deployment that serves ``model`` (a managed model's versions each have one of this name, in
        their own app: ``version_app``)."""
        return f"pool-{model.pool}" if model.pool else f"{model.engine}-{model.name}"

    @property
    def managed(self) -> list[ModelArgs]:
        """The models whose versions the controller serves."""
        return [m for m in self.models if m.managed]


def version_app(app: str, model: str, version: int | str, deploy: int = 1) -> str:
    """The Serve app that serves one version of a managed model of app ``app``: ``<app>--<model>--v<N>``, and
    ``...--v<N>.<deploy>`` for a version deployed again while Serve still deletes its earlier app."""
    return f"{app}--{model}--v{version}" + (f".{deploy}" if deploy > 1 else "")


def version_of_app(app: str, model: str, name: str) -> int | None:
    """The version a Serve app named ``name`` serves for managed model ``model`` of ``app`` (None: not one)."""
    import re

    prefix = version_app(app, model, "")
    match = re.fullmatch(r"(\d+)(?:\.\d+)?", name[len(prefix):]) if name.startswith(prefix) else None
    return int(match.group(1)) if match else None
