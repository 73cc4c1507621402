"""``mass``: the command-line interface. Parsing is instant; heavy imports happen inside commands."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from mass.errors import MassError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    """Register a handler for a (sub)command path such as ``models list``."""
    def wrap(fn):
        COMMANDS[name] = fn
        return fn
    return wrap


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI grammar."""
    parser = argparse.ArgumentParser(prog="mass", description="MASS: train, register and serve models on Ray.")
    parser.add_argument("--output", "-o", choices=["table", "json"], default="table",
                        help="table for people, json for scripts")
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="the model repository").add_subparsers(dest="cmd", required=True)
    models.add_parser("list", help="every model with versions, aliases, status, size and metrics")
    show = models.add_parser("show", help="one version in full: name, name/3 or name@alias")
    show.add_argument("ref")
    alias = models.add_parser("alias", help="point NAME@ALIAS at VERSION, or --remove it")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", nargs="?", type=int)
    alias.add_argument("--remove", action="store_true")
    delete = models.add_parser("delete", help="delete a version: NAME/VERSION")
    delete.add_argument("ref")
    register = models.add_parser("register", help="register an HF model directory as a new version")
    register.add_argument("path")
    register.add_argument("--name", required=True)
    register.add_argument("--task", required=True, choices=["text-generation", "embedding"])
    register.add_argument("--alias", action="append", default=[])
    minilm = models.add_parser("import-minilm", help="register the pretrained all-MiniLM-L6-v2 as minilm-l6")
    minilm.add_argument("--name", default="minilm-l6")
    minilm.add_argument("--alias", action="append", default=None, help="default: production")
    minilm.add_argument("--force", action="store_true", help="register a new version even if one exists")

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="cmd", required=True)
    corpus = data.add_parser("build-corpus", help="docstrings of installed modules -> parquet splits")
    corpus.add_argument("--out", default=None, help="default: $MASS_HOME/corpus")
    corpus.add_argument("--packages", default=None, help="comma-separated module names (default: a stdlib set)")

    train = sub.add_parser("train", help="train and register a model (local Ray, or --address to submit)")
    train.add_argument("--config", required=True)
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--address", default=None,
                       help="Ray dashboard address (http://HOST:8265): submit as a Ray job and stream logs")
    train.add_argument("--no-follow", action="store_true", help="with --address: submit and return")

    serve_cmd = sub.add_parser("serve", help="serving").add_subparsers(dest="cmd", required=True)
    up = serve_cmd.add_parser("up", help="deploy a Serve app config (gateway + models) and serve it")
    up.add_argument("--config", required=True, help="e.g. serve_apps/configs/demo.yaml")
    up.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    up.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--detach", action="store_true", help="return once ready (the app stays on the cluster)")

    sub.add_parser("demo", help="the end-to-end demo that `make demo` runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mass`` console script; returns the exit code for the error kind."""
    args = build_parser().parse_args(argv)
    from mass.logs import setup_logging
    from mass.settings import apply_offline_env, get_settings

    apply_offline_env()
    setup_logging(get_settings().log_level)
    key = f"{args.group} {args.cmd}" if getattr(args, "cmd", None) else args.group
    try:
        return COMMANDS[key](args)
    except MassError as exc:
        from mass.cli.output import report_error

        return report_error(exc, as_json=args.output == "json")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # a light install (the SDK and CLI client) running a platform command
        if (exc.name or "").split(".")[0] not in PLATFORM_MODULES:
            raise
        print(f"error: `mass {key}` needs {exc.name}, which this install lacks: "
              "pip install 'mass-platform[all]'", file=sys.stderr)
        return 1


#: top-level modules the platform extras bring (``pip install mass-platform`` alone is the SDK and CLI client)
PLATFORM_MODULES = {"torch", "transformers", "mlflow", "ray", "tokenizers", "pyarrow", "safetensors", "accelerate"}


# ------------------------------------------------------------------ models
def _registry():
    from mass.registry import ModelRegistry

    return ModelRegistry()


@command("models list")
def _models_list(args) -> int:
    from mass.cli.output import emit, models_table

    models = _registry().list_models()
    emit(args.output, [m.to_dict() for m in models], models_table(models))
    return 0


@command("models show")
def _models_show(args) -> int:
    from mass.cli.output import emit, version_detail

    info = _registry().resolve(args.ref)
    emit(args.output, info.to_dict(), version_detail(info))
    return 0


@command("models alias")
def _models_alias(args) -> int:
    from mass.cli.output import emit
    from mass.errors import InvalidRequest

    registry = _registry()
    if args.remove:
        registry.remove_alias(args.name, args.alias)
        emit(args.output, {"removed": f"{args.name}@{args.alias}"}, f"removed {args.name}@{args.alias}")
        return 0
    if args.version is None:
        raise InvalidRequest("give a VERSION to point the alias at, or --remove", field="version")
    info = registry.set_alias(args.name, args.alias, args.version)
    emit(args.output, info.to_dict(), f"{args.name}@{args.alias} -> {info.ref}")
    return 0


@command("models delete")
def _models_delete(args) -> int:
    from mass.cli.output import emit
    from mass.errors import InvalidRequest
    from mass.refs import ModelRef

    ref = ModelRef.parse(args.ref)
    if ref.version is None:
        raise InvalidRequest(f"delete needs a fixed version, e.g. {ref.name}/1 (got {args.ref!r})", field="ref")
    _registry().delete_version(ref.name, ref.version)
    emit(args.output, {"deleted": str(ref)}, f"deleted {ref}")
    return 0


@command("models register")
def _models_register(args) -> int:
    from mass.cli.output import emit, version_detail

    info = _registry().register(args.path, args.name, args.task, aliases=args.alias,
                                lineage={"method": "register", "source": args.path})
    emit(args.output, info.to_dict(), version_detail(info))
    return 0


@command("models import-minilm")
def _models_import_minilm(args) -> int:
    from mass.cli.output import emit
    from mass.registry.imports import import_minilm

    aliases = tuple(args.alias) if args.alias is not None else ("production",)
    info, created = import_minilm(_registry(), name=args.name, aliases=aliases, force=args.force)
    verb = "imported" if created else "already imported"
    emit(args.output, {**info.to_dict(), "created": created}, f"{verb}: {info.ref} ({', '.join(info.aliases)})")
    return 0


# ------------------------------------------------------------------ data, train, demo
@command("data build-corpus")
def _data_build_corpus(args) -> int:
    from mass.cli.output import emit
    from mass.data.corpus import DEFAULT_PACKAGES, build_corpus

    packages = [p.strip() for p in args.packages.split(",") if p.strip()] if args.packages else DEFAULT_PACKAGES
    result = build_corpus(args.out, packages)
    emit(args.output, result.to_dict(), f"corpus {result.path}: {result.counts} (digest {result.digest})")
    return 0


@command("train")
def _train(args) -> int:
    from mass.cli.output import emit
    from mass.training.config import TrainConfig

    cfg = TrainConfig.load(args.config, args.overrides)  # fail fast, before any submission
    if args.address:
        from mass.cli.submit import submit_train

        result = submit_train(args.config, args.overrides, args.address, follow=not args.no_follow)
    else:
        from mass.training.job import run_training

        result = run_training(cfg).to_dict()
    if result.get("model_ref"):
        text = f"registered {result['model_ref']} (run {result['run_id']})  " + " ".join(
            f"{k}={v:.4g}" for k, v in result["metrics"].items())
    elif result.get("run_id"):
        text = f"trained run {result['run_id']} (registration disabled)"
    else:
        text = f"submitted job {result['job_id']}"
    emit(args.output, result, text)
    return 0


@command("serve up")
def _serve_up(args) -> int:
    from mass.app import load_app_args, serve_up
    from mass.errors import ConfigError
    from mass.settings import get_settings

    app_args = load_app_args(args.config, args.overrides)  # fail fast, before Ray starts
    if args.detach and not (args.address or get_settings().ray_address):
        raise ConfigError("--detach needs a running Ray cluster: a local Ray started by this command would stop "
                          "when it exits. Start one (`ray start --head --port=6380`), then pass --address "
                          "127.0.0.1:6380 or set RAY_ADDRESS; or drop --detach to serve until Ctrl-C",
                          field="detach")
    url = serve_up(app_args, address=args.address, host=args.host, port=args.port, block=not args.detach)
    from mass.cli.output import emit

    emit(args.output, {"url": url, "models": [m.name for m in app_args.models]}, f"serving at {url}")
    return 0


@command("demo")
def _demo(args) -> int:
    from mass.cli.demo import run_demo

    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
