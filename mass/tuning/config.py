"""``TuneConfig``: a tuning run read from YAML — the training recipe it starts from, the search space over the
recipe's fields and the search (algorithm, trials, metric, early stopping) — checked whole before any trial."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from mass.config import MassConfig, load_config
from mass.errors import ConfigError
from mass.refs import validate_name
from mass.training.loop import EPOCH_METRICS


class SearchConfig(MassConfig):
    """How trials are chosen, run side by side and stopped early."""

    algorithm: Literal["asha", "random", "optuna"] = Field(
        "asha", description="asha: random sampling with ASHA early stopping; random: every trial runs its whole "
                            "budget; optuna: Optuna's TPE sampler with ASHA (needs `pip install optuna`).")
    num_samples: int = Field(8, ge=1, le=10000, description="Trials (each combination of `grid` values gets "
                                                            "this many).")
    metric: str = Field("val_loss", description=f"Ranks trials; one the trainer reports each epoch: "
                                                f"{', '.join(EPOCH_METRICS)}.")
    mode: Literal["min", "max"] = Field("min", description="Whether a lower or a higher metric is better.")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Trials run at once. Null: as many as the "
                                                                      "cluster's free CPUs (GPUs) place; more "
                                                                      "than that is clamped, with a warning.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1/reduction_factor of the trials at a rung go "
                                                           "on to the next.")
    seed: int = Field(0, description="Seed of the search's sampling.")

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str) -> str:
        if value not in EPOCH_METRICS:
            raise ValueError(f"the trainer never reports {value!r}; it reports {', '.join(EPOCH_METRICS)} each epoch")
        return value


class TuneConfig(MassConfig):
    """A tuning run: ``mass tune --config <this>.yaml`` or ``jobs/tune.py --config <this>.yaml``."""

    name: str | None = Field(None, description="Name of the tuning run and of the registered best model. Null: "
                                               "the training recipe's name.")
    train: str = Field(..., description="The training recipe every trial starts from (a path; relative paths "
                                        "are read from this file's folder).")
    set: list[str] = Field(default_factory=list, description="`dotted.key=value` overrides of the recipe, for "
                                                             "every trial.")
    space: dict[str, Any] = Field(default_factory=dict, description="Dotted recipe field -> one distribution: "
                                                                     "{loguniform|uniform|randint: [low, high]} "
                                                                     "or {choice|grid: [values]}.")
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("name")
    @classmethod
    def _legal_name(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None,
             recipe_overrides: list[str] | None = None) -> "TuningPlan":
        """Read a tuning config (``overrides``: ``--set`` of its own fields, e.g. ``search.num_samples=2``;
        ``recipe_overrides``: of the training recipe's, after its ``set:``) and check it whole (see
        ``TuningPlan``); ConfigError names the file and field."""
        cfg = load_config(cls, path, overrides)
        if recipe_overrides:
            cfg.set = [*cfg.set, *recipe_overrides]
        return cfg.plan(Path(path).expanduser().resolve().parent)

    def plan(self, folder: Path) -> "TuningPlan":
        """The checked plan, the recipe read from ``train`` (relative to ``folder``)."""
        from mass.training.config import TrainConfig
        from mass.tuning.space import check_space, high_end, parse_space

        path = Path(self.train).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise ConfigError(f"train: the training recipe {path} does not exist", field="train")
        recipe = TrainConfig.load(path, self.set)
        dims = parse_space(self.space)
        check_space(dims, recipe.model_dump(mode="json"), TrainConfig)
        max_epochs = high_end(dims, "optim.epochs", recipe.optim.epochs)
        if self.search.algorithm != "random" and self.search.grace_period > max_epochs:
            raise ConfigError(f"search.grace_period={self.search.grace_period} exceeds the most epochs a trial runs "
                              f"({max_epochs}): no trial could ever be stopped early", field="search.grace_period")
        if self.search.algorithm == "optuna":
            try:
                import optuna  # noqa: F401
            except ImportError as exc:
                raise ConfigError("search.algorithm=optuna needs the optuna package: `pip install optuna` (or use "
                                  "asha)", field="search.algorithm") from exc
            if any(d.kind == "grid" for d in dims):
                raise ConfigError("search.algorithm=optuna samples every field itself: use choice instead of grid",
                                  field="space")
        return TuningPlan(self, recipe, dims, path, max_epochs)


@dataclass
class TuningPlan:
    """A tuning config checked against its recipe: what every trial starts from (``recipe``), the ``dims`` it
    varies, and the most epochs any trial runs (the full budget per trial)."""

    config: TuneConfig
    recipe: Any  # mass.training.config.TrainConfig
    dims: list
    recipe_path: Path
    max_epochs: int

    @property
    def name(self) -> str:
        """The tuning run's name (and the best model's)."""
        return self.config.name or self.recipe.name
