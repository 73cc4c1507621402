"""Shared entry logic for ``jobs/*.py`` scripts: parse args, run, print one JSON line, map errors to exits."""

from __future__ import annotations

import argparse
import json

from mass.cli.output import report_error
from mass.errors import MassError


def run_train_job(argv: list[str]) -> int:
    """Run the training job described by ``--config`` and ``--set`` overrides; return an exit code."""
    parser = argparse.ArgumentParser(prog="jobs/train.py", description="Train and register a causal LM on Ray Train.")
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. jobs/configs/tiny-gpt-smoke.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set optim.epochs=1 (repeatable)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    args = parser.parse_args(argv)

    from mass.logs import setup_logging
    from mass.settings import apply_offline_env, get_settings

    apply_offline_env()
    setup_logging(get_settings().log_level)
    try:
        from mass.training.config import TrainConfig
        from mass.training.job import run_training

        cfg = TrainConfig.load(args.config, args.overrides)
        result = run_training(cfg, address=args.address)
    except MassError as exc:
        return report_error(exc, as_json=True)  # scripts read the JSON line; people read stderr
    print(json.dumps(result.to_dict(), default=str), flush=True)
    return 0


def run_tune_job(argv: list[str]) -> int:
    """Run the tuning job described by ``--config`` (``mass.tuning``); return an exit code."""
    parser = argparse.ArgumentParser(prog="jobs/tune.py", description="Search a training recipe's hyperparameters "
                                     "with Ray Tune (ASHA) and register the best trial's model.")
    add_tune_args(parser)
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    args = parser.parse_args(argv)

    from mass.logs import setup_logging
    from mass.settings import apply_offline_env, get_settings

    apply_offline_env()
    setup_logging(get_settings().log_level)
    try:
        from mass.tuning.config import TuneConfig
        from mass.tuning.job import run_tuning

        plan = TuneConfig.load(args.config, args.overrides, args.recipe_overrides)
        result = run_tuning(plan, address=args.address, resume=args.resume)
    except MassError as exc:
        return report_error(exc, as_json=True)
    print(json.dumps(result.to_dict(), default=str), flush=True)
    return 0


def add_tune_args(parser) -> None:
    """The tuning job's arguments (``jobs/tune.py`` and ``mass tune``), but ``--address``."""
    parser.add_argument("--config", required=True, help="YAML tuning config, e.g. jobs/configs/tiny-gpt-tune.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the tuning config, e.g. --set search.num_samples=2 (repeatable)")
    parser.add_argument("--recipe-set", dest="recipe_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the training recipe for every trial, e.g. --recipe-set "
                             "optim.epochs=2 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="RUN_ID",
                        help="go on with the search of this MLflow run (its driver died): unfinished trials resume "
                             "from their checkpoints")


def run_convert_job(argv: list[str]) -> int:
    """Run the conversion job (``mass.compression.convert``) with ``argv``; return an exit code."""
    from mass.compression.convert import add_convert_args, convert_from_args

    return _compression_job(argv, "jobs/convert.py", "Convert a registered encoder to ONNX (optionally int8), "
                            "measure it against its parent, register it if it passes.", add_convert_args,
                            lambda args: [convert_from_args(args, address=args.address)])


def run_quantize_job(argv: list[str]) -> int:
    """Run the quantization job (``mass.compression.quantize``) with ``argv``; return an exit code: 0 when every
    child was registered, 1 when one was refused or could not be made."""
    from mass.compression.quantize import add_quantize_args, quantize_from_args

    return _compression_job(argv, "jobs/quantize.py", "Quantize a registered encoder by several methods in "
                            "parallel, measure each child against its parent, register those that pass.",
                            add_quantize_args, lambda args: quantize_from_args(args, address=args.address))


def run_distill_job(argv: list[str]) -> int:
    """Run the distillation job (``mass.compression.distill``) with ``argv``; return an exit code: 0 when every
    student was registered, 1 when one was refused or could not be trained."""
    from mass.compression.distill import add_distill_args, distill_from_args

    return _compression_job(argv, "jobs/distill.py", "Distil a registered encoder into smaller students (Ray "
                            "Train), measure each against its teacher, register those that pass.",
                            add_distill_args, lambda args: distill_from_args(args, address=args.address))


def run_prune_job(argv: list[str]) -> int:
    """Run the pruning job (``mass.compression.prune``) with ``argv``; return an exit code: 0 when the child was
    registered, 1 when it was refused or could not be made."""
    from mass.compression.prune import add_prune_args, prune_from_args

    return _compression_job(argv, "jobs/prune.py", "Prune a registered encoder (structured, with recovery, or by "
                            "magnitude), measure the child against its parent, register it if it passes.",
                            add_prune_args, lambda args: prune_from_args(args, address=args.address))


def run_pipeline_job(argv: list[str]) -> int:
    """Run a compression pipeline (``mass.compression.pipeline``) with ``argv``; return an exit code: 0 when every
    step ran and registered what it made, 1 otherwise. Prints one JSON line per step."""
    from mass.compression.pipeline import add_pipeline_args, pipeline_from_args

    return _compression_job(argv, "jobs/compress.py", "Run a compression pipeline: steps chained by `after`, "
                            "independent ones side by side, each child measured and gated.", add_pipeline_args,
                            lambda args: pipeline_from_args(args, address=args.address),
                            done=lambda step: step.complete)


def _compression_job(argv: list[str], prog: str, description: str, add_args, run,
                     done=lambda result: bool(result.registered)) -> int:
    """Parse, run and print one JSON line per result (a child, or a pipeline's step); exit 1 unless each is
    ``done`` (registered)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_args(parser)
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    args = parser.parse_args(argv)

    from mass.logs import setup_logging
    from mass.settings import apply_offline_env, get_settings

    apply_offline_env()
    setup_logging(get_settings().log_level)
    try:
        results = run(args)
    except MassError as exc:
        return report_error(exc, as_json=True)
    for result in results:
        print(json.dumps(result.to_dict(), default=str), flush=True)
    return 0 if all(done(r) for r in results) else 1
