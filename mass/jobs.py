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


def run_convert_job(argv: list[str]) -> int:
    """Run the conversion job (``mass.compression.convert``) with ``argv``; return an exit code."""
    from mass.compression.convert import add_convert_args, convert_from_args

    parser = argparse.ArgumentParser(prog="jobs/convert.py", description="Convert a registered encoder to ONNX "
                                     "(optionally int8), measure it against its parent, register it if it passes.")
    add_convert_args(parser)
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    args = parser.parse_args(argv)

    from mass.logs import setup_logging
    from mass.settings import apply_offline_env, get_settings

    apply_offline_env()
    setup_logging(get_settings().log_level)
    try:
        result = convert_from_args(args, address=args.address)
    except MassError as exc:
        return report_error(exc, as_json=True)
    print(json.dumps(result.to_dict(), default=str), flush=True)
    return 0
