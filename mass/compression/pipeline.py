"""Compression pipelines (``jobs/compress.py --config`` / ``mass compress pipeline``): steps (quantize, distill,
prune) chained by ``after`` — a step compresses the child its ``after`` step registered — run as soon as their
step before is done, independent steps side by side; children are made in parallel, measured one job at a time."""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from mass.config import MassConfig, load_config

log = logging.getLogger(__name__)

KINDS = ("quantize", "distill", "prune")
_RESERVED = ("ref", "address", "phases")  # set by the pipeline, not by a step


def _runner(kind: str):
    if kind == "quantize":
        from mass.compression.job import run_compression
        return run_compression
    if kind == "distill":
        from mass.compression.distill import run_distillation
        return run_distillation
    from mass.compression.prune import run_pruning
    return run_pruning


class StepConfig(MassConfig):
    """One step: what it does (``kind`` and the options of that job), and what it starts from."""

    id: str = Field(..., description="Names the step; later steps refer to it in `after`.")
    kind: str = Field(..., description="quantize | distill | prune.")
    after: str | None = Field(None, description="Compress the child this step registered (it must register exactly "
                                                "one). Null: the pipeline's parent.")
    options: dict[str, Any] = Field(default_factory=dict, description="The job's options, as its Python function "
                                                                      "names them (methods, layers, ffn, gate...).")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in KINDS:
            raise ValueError(f"unknown kind {value!r}; kinds: {', '.join(KINDS)}")
        return value

    @model_validator(mode="after")
    def _options_fit(self) -> "StepConfig":
        if self.kind == "quantize" and not self.options.get("methods"):
            raise ValueError(f"step {self.id!r}: quantize needs methods (e.g. [onnx-int8])")
        params = inspect.signature(_runner(self.kind)).parameters
        for key in self.options:
            if key in _RESERVED or key not in params:
                allowed = sorted(k for k in params if k not in _RESERVED)
                raise ValueError(f"step {self.id!r}: {self.kind} has no option {key!r}; options: {', '.join(allowed)}")
        return self


class PipelineConfig(MassConfig):
    """A pipeline: ``jobs/compress.py --config <this>.yaml``."""

    parent: str = Field(..., description="The registered encoder the first steps compress (name/3, name@alias).")
    gate: str | None = Field(None, description="The gate of every step that names none (default: the jobs' own).")
    threads: int | None = Field(None, ge=1, description="Threads every measurement runs with (default: the CPUs).")
    rounds: int = Field(3, ge=1, description="Throughput rounds per model on every card.")
    steps: list[StepConfig] = Field(..., min_length=1, description="The steps; `after` names an earlier one.")

    @model_validator(mode="after")
    def _steps_chain(self) -> "PipelineConfig":
        seen: set[str] = set()
        for step in self.steps:
            if step.id in seen:
                raise ValueError(f"two steps are called {step.id!r}")
            if step.after is not None and step.after not in seen:
                raise ValueError(f"step {step.id!r} runs after {step.after!r}, which is not an earlier step")
            seen.add(step.id)
        return self

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "PipelineConfig":
        """Load a pipeline from YAML with ``--set`` overrides (ConfigError names the field)."""
        return load_config(cls, path, overrides)


@dataclass
class StepResult:
    """What one step did: its parent, its children's results (``CompressionResult`` dicts), or why it did not run."""

    id: str
    kind: str
    parent: str | None
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def registered(self) -> list[str]:
        """The versions this step registered."""
        return [r["registered"] for r in self.results if r.get("registered")]

    @property
    def complete(self) -> bool:
        """The step ran and registered every child it made."""
        return not self.error and bool(self.results) and all(r.get("registered") for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def run_pipeline(config: PipelineConfig, address: str | None = None) -> tuple[list[StepResult], list[tuple]]:
    """Run every step of ``config``; (a result per step in config order, the phases' spans).

    Checked before any work: every step's gate (its own or the pipeline's) parses. A step starts as soon as its
    ``after`` step has finished, steps without one at once — each in a thread of this driver whose job runs its
    work as Ray tasks and Train runs —, and all share one ``Phases``: children are made side by side, but a card is
    measured only while nothing else is being made or measured. A step whose ``after`` step failed, or registered
    no child or more than one, does not run (its ``error`` says why); the others go on.
    """
    from mass.cluster import connect_ray
    from mass.compression.gate import Gate
    from mass.compression.job import Phases

    for step in config.steps:
        Gate.parse(step.options.get("gate", config.gate))
    connect_ray(address)
    phases = Phases()
    results: dict[str, StepResult] = {}
    done = {step.id: threading.Event() for step in config.steps}

    def run(step: StepConfig) -> None:
        phases.label(step.id)
        try:
            parent = config.parent
            if step.after is not None:
                done[step.after].wait()
                before = results[step.after]
                if len(before.registered) != 1:
                    why = before.error or (f"it registered {len(before.registered)} children"
                                           if before.registered else "it registered no child")
                    results[step.id] = StepResult(step.id, step.kind, None,
                                                  error=f"not run: step {step.after!r} gave it no parent ({why})")
                    return
                parent = before.registered[0]
            options = {"gate": config.gate, "threads": config.threads, "rounds": config.rounds, **step.options}
            log.info("step %s: %s of %s", step.id, step.kind, parent)
            try:
                out = _runner(step.kind)(parent, address=address, phases=phases, **options)
                results[step.id] = StepResult(step.id, step.kind, parent, [r.to_dict() for r in out])
            except Exception as exc:  # one step failing does not stop the independent ones
                log.error("step %s failed: %s", step.id, exc)
                results[step.id] = StepResult(step.id, step.kind, parent, error=str(exc).splitlines()[0])
        finally:
            done[step.id].set()

    threads = [threading.Thread(target=run, args=(step,), name=f"step-{step.id}") for step in config.steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [results[step.id] for step in config.steps], phases.spans


def add_pipeline_args(parser) -> None:
    """The options of ``mass compress pipeline`` and ``jobs/compress.py`` (one definition for both)."""
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. jobs/configs/minilm-pipeline.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a top-level field, e.g. --set rounds=1 (repeatable)")


def pipeline_from_args(args, address: str | None = None) -> list[StepResult]:
    """Load the pipeline of parsed ``add_pipeline_args`` options and run it; the steps' results."""
    return run_pipeline(PipelineConfig.load(args.config, args.overrides), address=address)[0]


def step_text(step: StepResult) -> str:
    """What the CLI prints for one step: its parent and each child's card and verdict (or why it did not run)."""
    from mass.compression.job import CompressionResult, result_text

    if step.error and not step.results:
        return f"step {step.id} ({step.kind}): {step.error}"
    return f"step {step.id} ({step.kind} of {step.parent})\n\n" + "\n\n".join(
        result_text(CompressionResult(**r)) for r in step.results)
