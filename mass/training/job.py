"""``run_training``: validate a recipe, prepare data, run the Ray Train job, log to MLflow, register.

Everything that can be checked is checked before an MLflow run exists; after that, any failure
marks the run FAILED and leaves no model version behind.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mass.cluster import connect_ray, require, worker_error
from mass.errors import ConfigError, JobFailed, MassError
from mass.refs import ModelRef
from mass.registry import ModelRegistry
from mass.registry.versions import CONFIG_ARTIFACT
from mass.settings import Settings, get_settings
from mass.training.config import TrainConfig

DATASETS_ARTIFACT = "datasets.json"  # per run: the files and registered dataset versions its data came from

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training job produced; printed as the job's one JSON result line."""

    run_id: str
    model_ref: str | None
    metrics: dict[str, float]
    resumed_from_epoch: int = 0
    checkpoint: str | None = None
    data_tokens: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def check_resources(cfg: TrainConfig) -> None:
    """Fail fast when the cluster cannot ever hold the requested workers."""
    workers = cfg.scaling.num_workers
    require("CPU", workers * cfg.scaling.cpus_per_worker,
            f"scaling.num_workers={workers} x scaling.cpus_per_worker={cfg.scaling.cpus_per_worker}",
            "lower scaling.num_workers or add nodes", "scaling.num_workers")
    if cfg.scaling.use_gpu:
        require("GPU", workers, "scaling.use_gpu=true (one GPU per worker)", "set scaling.use_gpu=false or add GPU nodes",
                "scaling.use_gpu")


def _base_model(cfg: TrainConfig, registry: ModelRegistry):
    """(model, tokenizer, parent ref or path) for a fine-tune; raises ModelNotFound / ConfigError early."""
    from mass.models import load_hf_dir

    base = cfg.model.base
    if Path(base).expanduser().is_dir():
        model, tokenizer = load_hf_dir(Path(base).expanduser(), "text-generation")
        return model, tokenizer, str(Path(base).expanduser().resolve())
    info = registry.resolve(ModelRef.parse(base))
    if info.task != "text-generation":
        raise ConfigError(f"model.base {base!r} is a {info.task} model; fine-tuning needs a text-generation "
                          "model", field="model.base")
    model, tokenizer, _ = registry.load(info.ref)
    return model, tokenizer, info.ref


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, item, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return out


@dataclass
class PreparedRun:
    """A recipe made ready to train, before any run exists: its tokenizer (trained on the data, or the base
    model's), the model's config dict, the base model of a fine-tune (and its ref or path) and the packed data."""

    tokenizer: Any
    model_spec: dict[str, Any]
    base_model: Any
    parent: str | None
    data: Any  # mass.training.prep.PreparedData
    sources: list[dict] = field(default_factory=list)  # what was read: mass.training.prep.Inputs.sources

    def datasets(self) -> list[str]:
        """The registered dataset versions the data came from (``name@version``), once each."""
        from mass.training.prep import datasets_read

        return datasets_read(self.sources)

    def model(self, state: dict[str, Any]):
        """The trained model: the base (fine-tune) or a fresh one of ``model_spec``, with ``state`` loaded."""
        from mass.training.loop import build_model

        model = self.base_model if self.base_model is not None else build_model(self.model_spec)
        model.load_state_dict(state)
        return model.eval()


def prepare_run(cfg: TrainConfig, registry: ModelRegistry, settings: Settings, address: str | None = None
                ) -> PreparedRun:
    """Everything checkable before a run exists, and the data made ready: the repository answers, the corpus
    or the user's files are read (once), the tokenizer is trained (or the base model loaded), the block size fits
    the model, Ray is joined and can hold the workers, the blocks are packed."""
    from transformers import GPT2Config

    from mass.data.tokenizer import train_tokenizer
    from mass.training.prep import prepare, read_inputs

    registry.experiment_id()  # the repository is reachable
    corpus_dir = Path(cfg.data.corpus_dir or settings.corpus_dir()).expanduser()
    inputs = read_inputs(cfg.data, corpus_dir, cfg.optim.seed)  # read once: tokenizer and packing share it
    texts = inputs.texts
    parent = None
    if cfg.model.base:
        base_model, tokenizer, parent = _base_model(cfg, registry)
        model_spec = base_model.config.to_dict()
    else:
        base_model = None
        tokenizer = train_tokenizer(texts["train"], cfg.model.vocab_size, cfg.model.arch.n_positions)
        arch = cfg.model.arch
        model_spec = GPT2Config(vocab_size=len(tokenizer), n_positions=arch.n_positions, n_embd=arch.n_embd,
                                n_layer=arch.n_layer, n_head=arch.n_head, resid_pdrop=arch.dropout,
                                embd_pdrop=arch.dropout, attn_pdrop=arch.dropout,
                                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.eos_token_id).to_dict()
    max_positions = model_spec.get("n_positions") or model_spec.get("max_position_embeddings") or 0
    if max_positions and cfg.data.block_size > max_positions:
        raise ConfigError(f"data.block_size={cfg.data.block_size} exceeds the model's context of "
                          f"{max_positions} tokens", field="data.block_size")
    connect_ray(address, settings)
    check_resources(cfg)
    data = prepare(cfg.data, tokenizer, texts, min_blocks=cfg.scaling.num_workers * cfg.optim.batch_size)
    return PreparedRun(tokenizer, model_spec, base_model, parent, data, inputs.sources)


def log_recipe(client, run_id: str, cfg: TrainConfig, data, sources: list[dict] | None = None) -> None:
    """The resolved recipe into ``run_id``: every field as a param, the whole as an artifact, the token counts,
    and what the data came from (``sources``: ``datasets.json``, and the tag ``mass.datasets`` naming the
    registered dataset versions read)."""
    from mlflow.entities import Param

    resolved = cfg.model_dump(mode="json")
    params = _flatten("", resolved, {})
    # MLflow 3.17 caps a param value at 6,000 characters; the whole config is the artifact below
    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in sorted(params.items())])
    client.log_dict(run_id, resolved, CONFIG_ARTIFACT)
    for split, tokens in data.counts().items():
        client.log_metric(run_id, f"data_tokens_{split}", tokens)
    if sources:
        from mass.training.prep import datasets_read

        client.log_dict(run_id, sources, DATASETS_ARTIFACT)
        client.set_tag(run_id, "mass.datasets", ",".join(datasets_read(sources)))


def run_training(cfg: TrainConfig, address: str | None = None, settings: Settings | None = None) -> TrainResult:
    """Train ``cfg`` on Ray Train, log it to MLflow and register the final model.

    Args:
        cfg: the validated recipe.
        address: Ray cluster address; default ``RAY_ADDRESS`` or a new local Ray.
        settings: deployment settings; read from the environment when omitted.

    Raises:
        ConfigError, DataError, ModelNotFound, InsufficientResources: before anything is written.
        JobFailed: the Ray Train run failed after retries (its MLflow run is marked FAILED).
    """
    from mass.training.loop import train_loop_per_worker

    settings = settings or get_settings()
    registry = ModelRegistry(settings)
    resolved = cfg.model_dump(mode="json")

    # ---- 1. everything checkable before a run exists
    prepared = prepare_run(cfg, registry, settings, address)
    base_model, tokenizer, parent, data = prepared.base_model, prepared.tokenizer, prepared.parent, prepared.data

    # ---- 2. the MLflow run; from here on a failure marks it FAILED
    run_id = None
    tags = {"mass.kind": "train", "mass.model_name": cfg.name, "mass.parent": parent or ""}
    try:
        with registry.tracked_run(f"train-{cfg.name}", tags) as run_id:
            log_recipe(registry.client, run_id, cfg, data, prepared.sources)
            result = fit(cfg, settings, run_id, prepared.model_spec, base_model, data, train_loop_per_worker)
            metrics = final_metrics(result.metrics)
            if result.checkpoint is None:
                raise JobFailed("training finished without a checkpoint; nothing to register")
            with result.checkpoint.as_directory() as ckpt_dir:
                model = prepared.model(load_state(ckpt_dir))
            model_ref = None
            if cfg.registration.enabled:  # straight from memory: no save and reload
                info = registry.register(
                    (model, tokenizer), cfg.name, "text-generation", metrics=metrics, config=resolved,
                    run_id=run_id, lineage={"source_run": run_id, "parent": parent,
                                            "method": "finetune" if parent else "train",
                                            "datasets": ",".join(prepared.datasets()) or None},
                    aliases=cfg.registration.aliases, description=cfg.registration.description)
                model_ref = info.ref
    except MassError:
        raise
    except Exception as exc:
        raise JobFailed(f"training run {run_id} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                        run_id=run_id) from exc
    registry.announce("training.completed", {"run_id": run_id, "model": cfg.name, "metrics": metrics,
                                             "version": str(info.version) if model_ref else None}, source="training")
    resumed = int(result.metrics.get("start_epoch", 0))
    return TrainResult(run_id=run_id, model_ref=model_ref, metrics=metrics, resumed_from_epoch=resumed,
                       checkpoint=result.checkpoint.path, data_tokens=data.counts())


def final_metrics(reported: dict[str, Any]) -> dict[str, float]:
    """The figures of a run's last report worth keeping with the model (not its epoch and step counters or timing)."""
    return {k: float(v) for k, v in reported.items()
            if isinstance(v, (int, float)) and k not in ("epoch", "step", "start_epoch", "epoch_s")}


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The model's weights in a checkpoint the training loop wrote."""
    import torch

    from mass.training.loop import STATE_FILE

    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=False)["model"]


def fit(cfg: TrainConfig, settings: Settings, run_id: str, model_spec: dict[str, Any], base_model,
         data, loop, name: str | None = None, callbacks: list | None = None):
    """Run the TorchTrainer and return its Result; JobFailed when it ends in error. ``name``: the Ray Train run's
    (default ``<model>-<run id>``); ``callbacks``: Ray Train callbacks (a tuning trial reports through one)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data_ref = ray.put({"train": data.train, "validation": data.validation, "test": data.test})
    datasets = {"train": data.train_dataset} if data.train_dataset is not None else None
    init_ref = ray.put(base_model.state_dict()) if base_model is not None else None
    loop_config = {
        "run_id": run_id, "tracking_uri": settings.tracking_uri, "model_spec": model_spec,
        "data_ref": data_ref, "train_blocks": data.train_blocks, "init_state_ref": init_ref,
        "epochs": cfg.optim.epochs,
        "optim": cfg.optim.model_dump(), "threads_per_worker": max(1, math.floor(cfg.scaling.cpus_per_worker)),
    }
    trainer = TorchTrainer(
        train_loop_per_worker=loop,
        train_loop_config=loop_config,
        datasets=datasets,  # (data.pipeline: ray) split equally across the workers, streamed
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=name or f"{cfg.name}-{run_id[:12]}",
            callbacks=callbacks,
            storage_path=settings.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        raise JobFailed(f"Ray Train run failed (worker failures are retried up to checkpoint.max_failures="
                        f"{cfg.checkpoint.max_failures} times): {worker_error(exc)}", run_id=run_id) from exc
    if getattr(result, "error", None):
        raise JobFailed(f"Ray Train run failed: {result.error}", run_id=run_id)
    return result
