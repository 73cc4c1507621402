"""The conversion job: a registered encoder exported to ONNX (and optionally quantized to int8 by ONNX Runtime),
checked for parity, measured against its parent on the card, gated, and registered with its lineage only if it
passes. Export, quantization and each measurement are Ray tasks pinned to one node (the files stay there)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mass.compression.card import Card, Row, Subject, agreement, eval_texts, measure_encoder
from mass.compression.gate import Gate
from mass.errors import ConfigError, ParityError

log = logging.getLogger(__name__)

METHODS = {
    "onnx": "export to ONNX (float32), served by ONNX Runtime",
    "onnx-int8": "export to ONNX, apply ONNX Runtime's transformer fusions, then its dynamic int8 (int8 weights "
                 "with per-channel scales, activations quantized on the fly; the embedding tables too unless "
                 "--keep-embeddings)",
}


@dataclass
class CompressionResult:
    """What a compression job did: the card, the gate's verdict and why, and the version it registered (None when
    the child was refused)."""

    parent: str
    method: str
    passed: bool
    gate: str
    why: str
    card: dict[str, Any]
    registered: str | None
    run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _export(ref: str) -> dict[str, str]:
    """Download the parent on this node and export it to ONNX in a work directory of its own — a Ray task.
    Returns the node id and the paths: ``work``, ``parent``, ``tokenizer``, ``export``."""
    import shutil

    import ray

    from mass.compression.onnx_export import export_encoder
    from mass.registry import ModelRegistry

    root = ModelRegistry().download(ref)
    work = tempfile.mkdtemp(prefix="mass-compress-")
    paths = {"node": ray.get_runtime_context().get_node_id(), "work": work, "parent": str(root / "model"),
             "tokenizer": str(root / "components" / "tokenizer")}
    try:
        export = export_encoder(Path(paths["parent"]), Path(work) / "onnx", tokenizer_dir=Path(paths["tokenizer"]))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {**paths, "export": str(export)}


def _quantize(src: str, work: str, per_channel: bool, embeddings: bool) -> str:
    """Path of the int8 export — a Ray task."""
    from mass.compression.onnx_export import quantize_int8

    return str(quantize_int8(Path(src), Path(work) / "onnx-int8", per_channel=per_channel, embeddings=embeddings))


def _register(path: str, name: str, run_id: str, metrics: dict[str, float], lineage: dict[str, str],
              config: dict[str, Any], aliases: list[str], description: str) -> str:
    """Register the child (its files are on this node) — a Ray task; its ``name/version``."""
    from mass.registry import ModelRegistry

    return ModelRegistry().register(path, name, "embedding", metrics=metrics, lineage=lineage, config=config,
                                    run_id=run_id, aliases=aliases, description=description).ref


def _cleanup(work: str) -> None:
    import shutil

    shutil.rmtree(work, ignore_errors=True)


def run_convert(ref: str, method: str = "onnx-int8", name: str | None = None, gate: str | None = None,
                tolerance: float = 1e-4, per_channel: bool = True, embeddings: bool = True,
                aliases: tuple[str, ...] = (), threads: int | None = None, rounds: int = 3,
                address: str | None = None) -> CompressionResult:
    """Convert the registered encoder ``ref`` by ``method`` (``METHODS``) and register the child as a new version
    of ``name`` (default: the parent's model) if it passes ``gate`` (``mass.compression.gate``).

    Everything that can be refused is checked before any work: the method, the gate expression, the parent
    (an embedding model stored as an HF directory). The export must match the parent within ``tolerance`` (max
    absolute difference of the embeddings on held-out texts), or the job stops with ``ParityError`` and
    registers nothing. ``threads`` (default: the node's CPUs) is what every measurement runs with.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from mass.cluster import connect_ray
    from mass.registry import ModelRegistry
    from mass.settings import get_settings, settings_env

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; methods: {', '.join(METHODS)}", field="method")
    checked = Gate.parse(gate)
    if not 0 < tolerance < 1:
        raise ConfigError(f"tolerance must be in (0, 1), got {tolerance!r}", field="tolerance")
    registry = ModelRegistry()
    parent = registry.resolve(ref)
    if parent.task != "embedding":
        raise ConfigError(f"{parent.ref} is a {parent.task} model; ONNX conversion serves encoders (embedding "
                          "models) for now", field="ref")
    if parent.format != "transformers":
        raise ConfigError(f"{parent.ref} is already an {parent.format} export; convert its source "
                          f"({parent.lineage.get('parent', 'the float model it came from')}) instead", field="ref")
    name = name or parent.name
    params = {"per_channel": per_channel, "embeddings": embeddings, "tolerance": tolerance} \
        if method == "onnx-int8" else {"tolerance": tolerance}
    queries, documents = eval_texts()
    connect_ray(address)
    threads = threads or os.cpu_count() or 1

    # every task sees this process's settings (registry, home, database), as serving's replicas do
    env = {"env_vars": {k: v for k, v in settings_env(get_settings()).items() if v}}
    paths = ray.get(ray.remote(_export).options(num_cpus=1, max_retries=0, runtime_env=env).remote(parent.ref))
    pinned = {"scheduling_strategy": NodeAffinitySchedulingStrategy(paths["node"], soft=False), "runtime_env": env}
    parent_dir, tokenizer_dir, export, work = paths["parent"], paths["tokenizer"], paths["export"], paths["work"]
    # a fresh worker process per measurement (max_calls=1): memory is measured from a clean start
    measure = ray.remote(max_calls=1)(measure_encoder).options(num_cpus=1, max_retries=0, **pinned)

    def measured(subject: Subject) -> tuple[Row, Any, Any]:
        log.info("measuring %s", subject.label)
        return ray.get(measure.remote(subject, queries, documents, threads, rounds))

    try:
        with registry.tracked_run(f"compress-{parent.name}-{method}", {"mass.kind": "compress",
                                                                      "mass.parent": parent.ref}) as run_id:
            base, *parent_vectors = measured(Subject("parent fp32", parent_dir, tokenizer_dir))
            onnx, *onnx_vectors = measured(Subject("onnx fp32", export, f"{export}/tokenizer", runtime="onnx"))
            onnx.quality, onnx.top10 = agreement(parent_vectors, onnx_vectors)
            rows = [base, onnx]
            card = Card(parent.ref, method, params, rows, {"queries": len(queries), "documents": len(documents)})
            worst = max(float(abs(p - c).max()) for p, c in zip(parent_vectors, onnx_vectors))
            if worst > tolerance:  # (checked before anything else is spent on it)
                _log_card(registry, run_id, card, passed=False)
                raise ParityError(f"the ONNX export of {parent.ref} differs from it by up to {worst:.3g} (tolerance "
                                  f"{tolerance:g}) on {len(queries) + len(documents)} held-out texts; nothing was "
                                  f"registered", max_abs_diff=worst, tolerance=tolerance)
            bf16, *bf16_vectors = measured(Subject("parent bf16", parent_dir, tokenizer_dir, dtype="bfloat16"))
            bf16.quality, bf16.top10 = agreement(parent_vectors, bf16_vectors)
            rows.insert(1, bf16)  # the reference row, next to its parent
            child_path = export
            if method == "onnx-int8":
                child_path = ray.get(ray.remote(_quantize).options(num_cpus=1, max_retries=0, **pinned).remote(
                    export, work, per_channel, embeddings))
                child, *child_vectors = measured(Subject("onnx int8", child_path, f"{child_path}/tokenizer",
                                                         runtime="onnx", dtype="int8"))
                child.quality, child.top10 = agreement(parent_vectors, child_vectors)
                rows.append(child)
            figures = card.figures
            passed, why = checked.check(figures)
            _log_card(registry, run_id, card, passed)
            log.info("%s of %s: gate %s (%s)", method, parent.ref, "passed" if passed else "refused", why)
            registered = None
            if passed:
                lineage = {"parent": parent.ref, "method": method, "params": json.dumps(params, sort_keys=True),
                           "source_run": run_id}
                registered = ray.get(ray.remote(_register).options(num_cpus=0, max_retries=0, **pinned).remote(
                    child_path, name, run_id, {k: v for k, v in figures.items() if v is not None}, lineage,
                    {"card": card.to_dict(), "gate": checked.text}, list(aliases),
                    f"{METHODS[method]} of {parent.ref}; {why}"))
    finally:
        ray.get(ray.remote(_cleanup).options(num_cpus=0, **pinned).remote(work))
    registry.announce("compression.completed", {"model": name, "version": registered.split("/")[1] if registered
                                                else None, "parent": parent.ref, "method": method,
                                                "metrics": {k: v for k, v in figures.items() if v is not None}})
    return CompressionResult(parent.ref, method, passed, checked.text, why, card.to_dict(), registered, run_id)


def _log_card(registry, run_id: str, card: Card, passed: bool) -> None:
    """The card into the job's MLflow run: JSON, markdown table, PNG chart, the figures as metrics."""
    client = registry.client
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "card.json").write_text(json.dumps(card.to_dict(), indent=2))
        (Path(tmp) / "card.md").write_text(card.table() + "\n")
        card.plot(Path(tmp) / "card.png")
        client.log_artifacts(run_id, tmp, "card")
    for key, value in card.figures.items():
        if value is not None:
            client.log_metric(run_id, key, float(value))
    client.set_tag(run_id, "mass.gate", "passed" if passed else "refused")


def add_convert_args(parser) -> None:
    """The options of ``mass compress convert`` and ``jobs/convert.py`` (one definition for both)."""
    from mass.compression.gate import DEFAULT_GATE, FIGURES

    parser.add_argument("ref", help="the registered encoder to convert: name, name/3 or name@alias")
    parser.add_argument("--method", default="onnx-int8", choices=list(METHODS),
                        help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    parser.add_argument("--name", default=None, help="register the child under this model (default: the parent's)")
    parser.add_argument("--gate", default=None, help=f"registration condition over {', '.join(FIGURES)} "
                                                     f"(default: {DEFAULT_GATE!r})")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest difference allowed between the export's embeddings and the parent's")
    parser.add_argument("--keep-embeddings", action="store_true", help="int8: leave the embedding tables in float")
    parser.add_argument("--per-tensor", action="store_true", help="int8: one scale per weight tensor, not per "
                                                                  "output channel")
    parser.add_argument("--alias", action="append", default=[], help="point these aliases at the child")
    parser.add_argument("--threads", type=int, default=None, help="threads each measurement runs with "
                                                                  "(default: the node's CPUs)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per model (median and range)")


def convert_from_args(args, address: str | None = None) -> CompressionResult:
    """Run ``run_convert`` with parsed ``add_convert_args`` options."""
    return run_convert(args.ref, method=args.method, name=args.name, gate=args.gate, tolerance=args.tolerance,
                       per_channel=not args.per_tensor, embeddings=not args.keep_embeddings,
                       aliases=tuple(args.alias), threads=args.threads, rounds=args.rounds, address=address)


def result_text(result: CompressionResult) -> str:
    """What the CLI prints: the card, the gate's verdict and the registered version."""
    card = Card.from_dict(result.card)
    verdict = f"registered {result.registered}" if result.registered else "refused: not registered"
    return f"{result.method} of {result.parent}\n\n{card.table()}\n\ngate: {result.why}\n{verdict} " \
           f"(card in MLflow run {result.run_id})"
