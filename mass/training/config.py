"""``TrainConfig``: the training recipe read from ``jobs/configs/*.yaml`` (every key documented)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mass.config import MassConfig, load_config
from mass.refs import NAME_RE, ModelRef, validate_alias, validate_name


class ArchConfig(MassConfig):
    """GPT-2 style architecture for a model trained from scratch."""

    n_layer: int = Field(2, ge=1, le=48, description="Transformer blocks.")
    n_embd: int = Field(128, ge=8, le=8192, description="Hidden width; must divide by n_head.")
    n_head: int = Field(4, ge=1, le=128, description="Attention heads.")
    n_positions: int = Field(256, ge=8, le=32768, description="Maximum context length in tokens.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on residuals, attention and embeddings.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ArchConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class ModelConfig(MassConfig):
    """Which model to train: a fresh GPT (``arch``) or a fine-tune of ``base``."""

    base: str | None = Field(None, description="Fine-tune this: a registered ModelRef (tiny-gpt@production) "
                                               "or a local HF model directory. Null: train from scratch.")
    arch: ArchConfig = Field(default_factory=ArchConfig, description="Architecture when training from scratch.")
    vocab_size: int = Field(2048, ge=300, le=65536, description="BPE vocabulary trained on the data "
                                                              "(from scratch only).")


class DataConfig(MassConfig):
    """Where text comes from and how it is cut into training blocks."""

    corpus_dir: str | None = Field(None, description="Built corpus (train/validation/test.parquet). "
                                                     "Null: $MASS_HOME/corpus. Ignored when `dataset` or "
                                                     "`train` is set.")
    dataset: str | None = Field(None, description="A registered dataset (`mass data register`) to train on: NAME "
                                                  "(its newest version) or NAME@VERSION. Checked unchanged "
                                                  "since registration; validation/test are held out of it "
                                                  "unless given. Overrides `train` and the corpus.")
    train: str | None = Field(None, description="User training file (.jsonl with 'text', .parquet, .txt).")
    validation: str | None = Field(None, description="User validation file; default: 5% of `train`.")
    test: str | None = Field(None, description="User test file; default: 5% of `train`.")
    block_size: int = Field(128, ge=8, le=32768, description="Tokens per training sequence.")
    pipeline: Literal["driver", "ray"] = Field("driver", description="Where the training split is tokenized and "
                                                                     "packed: on the job driver (shared with the "
                                                                     "workers whole), or by Ray Data tasks across the "
                                                                     "cluster, streamed to the workers in shards.")
    max_train_tokens: int | None = Field(None, ge=1000, description="Cap on training tokens (smoke runs).")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if self.dataset is not None and self.train is not None:
            raise ValueError("give data.dataset or data.train, not both")
        return self

    @field_validator("dataset")
    @classmethod
    def _dataset_ref(cls, value: str | None) -> str | None:
        if value is not None:
            name, _, number = value.partition("@")
            if not NAME_RE.match(name) or ("@" in value and not number.isdigit()):
                raise ValueError(f"illegal dataset reference {value!r}: use NAME or NAME@VERSION (a number)")
        return value

    @field_validator("train", "validation", "test")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"data file not found: {value}")
        return value


class OptimConfig(MassConfig):
    """Optimisation schedule (AdamW with linear warm-up and cosine decay)."""

    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training blocks.")
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per worker per step.")
    lr: float = Field(3e-3, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    seed: int = Field(0, description="Seed for init, shuffling and data splits.")
    log_every: int = Field(10, ge=1, description="Log training loss to MLflow every N steps.")


class ScalingConfig(MassConfig):
    """How many Ray Train workers and what each one gets."""

    num_workers: int = Field(2, ge=1, le=4096, description="DDP workers (processes).")
    use_gpu: bool = Field(False, description="One GPU per worker when true.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")


class CheckpointConfig(MassConfig):
    """Checkpointing and automatic recovery."""

    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept (one per epoch).")
    max_failures: int = Field(3, ge=0, description="Worker failures survived by restarting from the "
                                                   "latest checkpoint.")


class RegisterConfig(MassConfig):
    """Registration of the final model."""

    enabled: bool = Field(True, description="Register the trained model in the model repository.")
    aliases: list[str] = Field(default_factory=list, description="Aliases to point at the new version.")
    description: str = Field("", description="Shown by `mass models show`.")

    @field_validator("aliases")
    @classmethod
    def _legal_aliases(cls, value: list[str]) -> list[str]:
        for alias in value:
            validate_alias(alias)
        return value


class TrainConfig(MassConfig):
    """A training recipe: ``jobs/train.py --config <this>.yaml [--set a.b=c]``."""

    name: str = Field(..., description="Registered model name the result is stored under.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    registration: RegisterConfig = Field(default_factory=RegisterConfig)

    @field_validator("name")
    @classmethod
    def _legal_name(cls, value: str) -> str:
        return validate_name(value)

    @model_validator(mode="after")
    def _base_ref_or_dir(self) -> "TrainConfig":
        base = self.model.base
        if base is not None and not Path(base).expanduser().is_dir():
            ModelRef.parse(base)  # raises InvalidModelRef for illegal refs
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "TrainConfig":
        """Load a recipe from YAML with ``--set`` overrides (ConfigError names the field)."""
        return load_config(cls, path, overrides)
