"""``mass``: the command-line interface. Parsing is instant; heavy imports happen inside commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

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
    why = {"default": "", "help": "why (kept in the operation log)"}
    publish = models.add_parser("publish", help="make VERSION production (the previous one is kept for rollback)")
    publish.add_argument("name")
    publish.add_argument("version", type=int)
    publish.add_argument("--why", **why)
    canary = models.add_parser("canary", help="send a share of NAME's traffic to VERSION: --weight or --plan")
    canary.add_argument("name")
    canary.add_argument("version", type=int)
    share = canary.add_mutually_exclusive_group(required=True)
    share.add_argument("--weight", type=int, help="percent of traffic, 1-99")
    share.add_argument("--plan", help="rollout steps 'percent:bake,...' ending at 100, e.g. 10:5m,50:5m,100")
    canary.add_argument("--why", **why)
    for verb, text in (("promote", "make the canary version production"),
                       ("rollback", "end the canary; without one, make the previous production version production"),
                       ("offline", "take NAME offline: 404 naming it as offline, gone from /v1/models"),
                       ("online", "serve an offline model again")):
        op = models.add_parser(verb, help=text)
        op.add_argument("name")
        op.add_argument("--why", **why)
    status = models.add_parser("status", help="NAME's versions, aliases, traffic split, state and operation log")
    status.add_argument("name")
    status.add_argument("--url", default=None, help="ask the gateway's admin API instead (sends MASS_API_KEY): "
                                                    "adds the deployed versions' state, replicas and SLO figures")
    minilm = models.add_parser("import-minilm", help="register the pretrained all-MiniLM-L6-v2 as minilm-l6")
    minilm.add_argument("--name", default="minilm-l6")
    minilm.add_argument("--alias", action="append", default=None, help="default: production")
    minilm.add_argument("--force", action="store_true", help="register a new version even if one exists")

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="cmd", required=True)
    corpus = data.add_parser("build-corpus", help="docstrings of installed modules -> parquet splits")
    corpus.add_argument("--out", default=None, help="default: $MASS_HOME/corpus")
    corpus.add_argument("--packages", default=None, help="comma-separated module names (default: a stdlib set)")
    dreg = data.add_parser("register", help="record what PATH holds now as a new version of dataset NAME (rows, "
                                            "content hash, columns) and announce dataset.updated")
    dreg.add_argument("name")
    dreg.add_argument("path", help="a .parquet/.jsonl/.txt file or a folder of them; local or a pyarrow "
                                   "filesystem URI (s3://, gs://, hdfs://, file://)")
    dreg.add_argument("--field", default="text", help="the text column or key (default: text)")
    dreg.add_argument("--description", default="")
    dlist = data.add_parser("list", help="registered datasets, newest version first")
    dlist.add_argument("name", nargs="?", default=None)
    data.add_parser("show", help="one dataset version in full: NAME or NAME@VERSION").add_argument("ref")

    train = sub.add_parser("train", help="train and register a model (local Ray, or --address to submit)")
    train.add_argument("--config", required=True)
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--address", default=None,
                       help="Ray dashboard address (http://HOST:8265): submit as a Ray job and stream logs")
    train.add_argument("--no-follow", action="store_true", help="with --address: submit and return")

    tune = sub.add_parser("tune", help="search a training recipe's hyperparameters (Ray Tune, ASHA) and register "
                                       "the best model (local Ray, or --address to submit)")
    from mass.jobs import add_tune_args

    add_tune_args(tune)
    tune.add_argument("--address", default=None,
                      help="Ray dashboard address (http://HOST:8265): submit as a Ray job and stream logs")
    tune.add_argument("--no-follow", action="store_true", help="with --address: submit and return")

    serve_cmd = sub.add_parser("serve", help="serving").add_subparsers(dest="cmd", required=True)
    up = serve_cmd.add_parser("up", help="deploy a Serve app config (gateway + models) and serve it")
    up.add_argument("--config", required=True, help="e.g. serve_apps/configs/demo.yaml")
    up.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    up.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--detach", action="store_true", help="return once ready (the app stays on the cluster)")

    keys = sub.add_parser("keys", help="API keys of the gateway").add_subparsers(dest="cmd", required=True)
    create = keys.add_parser("create", help="a new key; its secret is printed once")
    create.add_argument("--name", required=True, help="unique name, e.g. team-a")
    _limit_args(create)
    create.add_argument("--admin", action="store_true", help="may call /admin/* (manage keys, read usage)")
    keys.add_parser("list", help="every key (never a secret)")
    for verb, text in (("show", "one key in full"), ("revoke", "revoke a key for good (every gateway "
                                                                "replica refuses it within 1 s)"),
                       ("rotate", "a new secret for a key, printed once (the old one stops working)")):
        keys.add_parser(verb, help=text).add_argument("key", help="its name or id")
    update = keys.add_parser("update", help="change a key's models, limits, budget, name or admin flag")
    update.add_argument("key", help="its name or id")
    update.add_argument("--name", default=None, help="a new unique name")
    _limit_args(update)
    update.add_argument("--admin", choices=["true", "false"], default=None)

    triggers = sub.add_parser("triggers", help="rules that start jobs on events").add_subparsers(dest="cmd",
                                                                                                 required=True)
    tadd = triggers.add_parser("add", help="add rules from --file, or one rule from flags")
    tadd.add_argument("--name", default=None, help="unique rule name")
    tadd.add_argument("--file", default=None, help="YAML: a list of rules (name, on, where, action, config, set)")
    tadd.add_argument("--on", dest="on_type", default=None, help="event type, e.g. dataset.updated")
    tadd.add_argument("--where", default=None, help="condition over the payload, e.g. \"name == 'docs'\"")
    tadd.add_argument("--job", dest="action", choices=["train", "tune", "compress"], default=None,
                      help="the job it starts (compress: a pipeline config)")
    tadd.add_argument("--config", default=None, help="the job's recipe, relative to the project")
    tadd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override; {field} is filled from the event, e.g. data.dataset={name}@{version}")
    tadd.add_argument("--replace", action="store_true", help="replace a rule of the same name")
    triggers.add_parser("list", help="every rule")
    triggers.add_parser("remove", help="delete a rule (its runs stay in the history)").add_argument("name")
    truns = triggers.add_parser("runs", help="jobs rules started (or refused), newest first")
    truns.add_argument("name", nargs="?", default=None)
    trun = triggers.add_parser("run", help="the trigger engine: consume events and start the rules' jobs")
    trun.add_argument("--address", default=None, help="Ray job server (default: http://127.0.0.1:8265)")
    trun.add_argument("--once", action="store_true", help="handle what is waiting, record job states, exit")

    sched = sub.add_parser("schedule", help="jobs on a cron schedule").add_subparsers(dest="cmd", required=True)
    sadd = sched.add_parser("add", help="start a job at the slots of a cron expression (UTC)")
    sadd.add_argument("--name", required=True, help="unique schedule name")
    sadd.add_argument("--cron", required=True, help="minute hour day month weekday, e.g. '0 3 * * *'")
    sadd.add_argument("--job", dest="action", choices=["train", "tune", "compress"], default="train")
    sadd.add_argument("--config", required=True, help="the job's recipe, relative to the project")
    sadd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sadd.add_argument("--catch-up", choices=["once", "none"], default="once",
                      help="after downtime: run the latest missed slot once (default), or wait for the next")
    sched.add_parser("list", help="every schedule with its next slot")
    for verb, text in (("show", "one schedule and its runs"), ("pause", "stop starting its jobs"),
                       ("resume", "start its jobs again from the next slot (missed ones are not run)"),
                       ("remove", "delete a schedule (its runs stay in the history)")):
        sched.add_parser(verb, help=text).add_argument("name")

    auto = sub.add_parser("automation", help="the service that runs schedules and triggers (a detached Ray "
                                             "actor)").add_subparsers(dest="cmd", required=True)
    astart = auto.add_parser("start", help="start it on the cluster unless it runs already")
    astart.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else the local one)")
    astart.add_argument("--jobs", default="http://127.0.0.1:8265", help="the Ray job server jobs go to")
    astart.add_argument("--tick", type=float, default=15.0, help="seconds between ticks (default 15)")
    for verb, text in (("status", "whether it runs, where, and how its ticks go"), ("stop", "stop it for good")):
        auto.add_parser(verb, help=text).add_argument("--address", default=None)
    atick = auto.add_parser("tick", help="tick the schedules now (or --at a time) and print what was recorded")
    atick.add_argument("--address", default=None)
    atick.add_argument("--at", default=None, help="ISO time to tick at, e.g. 2026-11-29T03:00:00+00:00")

    compress = sub.add_parser("compress", help="compress or convert a registered model, measured and gated"
                              ).add_subparsers(dest="cmd", required=True)
    convert = compress.add_parser("convert", help="export an encoder to ONNX (int8 by default), measure it against "
                                                  "its parent, register it if it passes the gate")
    from mass.compression.convert import add_convert_args
    from mass.compression.quantize import add_quantize_args

    add_convert_args(convert)
    add_quantize_args(compress.add_parser("quantize", help="quantize an encoder (torch-int8, onnx-int8, bnb-int8, "
                                          "bnb-nf4) or a causal LM (bnb-int8, bnb-nf4) by several methods in "
                                          "parallel, each child measured against its parent and registered if it "
                                          "passes the gate"))
    from mass.compression.distill import add_distill_args

    from mass.compression.prune import add_prune_args

    add_prune_args(compress.add_parser("prune", help="prune an encoder: whole layers and FFN channels by importance "
                                       "(then a recovery run), or weights by magnitude; measured and gated"))
    from mass.compression.pipeline import add_pipeline_args

    add_pipeline_args(compress.add_parser("pipeline", help="run a compression pipeline (distill -> quantize, ...): "
                                          "steps chained by `after`, independent ones side by side"))
    add_distill_args(compress.add_parser("distill", help="distil an encoder into smaller students (Ray Train, DDP), "
                                         "each measured against its teacher and registered if it passes the gate"))

    usage = sub.add_parser("usage", help="the usage ledger: requests and tokens per key, model or day")
    usage.add_argument("--key", default=None, help="one key (name or id); default: every key")
    usage.add_argument("--since", default="1d", help="30m, 12h, 1d, 2w or an ISO date (default 1d)")
    usage.add_argument("--by", choices=["key", "model", "day"], default=None,
                       help="group rows (default: by key, or one total row with --key)")

    events = sub.add_parser("events", help="the event bus (MASS_EVENTS_URL)").add_subparsers(dest="cmd", required=True)
    listed = events.add_parser("list", help="events in the log, oldest first")
    listed.add_argument("--after", default=None, help="only events after this offset (replay from it)")
    listed.add_argument("--type", default=None, help="only this event type, e.g. model.alias.changed")
    listed.add_argument("--count", type=int, default=50, help="events read from the log at most (default 50)")
    events.add_parser("dead-letters", help="events set aside: unreadable, or never acknowledged by a group")
    hook = events.add_parser("mlflow-webhook", help="register MLflow's registry webhook (an mlflow server with a SQL "
                                                    "backend) so changes made outside MASS become events")
    hook.add_argument("--url", required=True, help="the gateway's hook, e.g. http://HOST:8000/hooks/mlflow")
    publish = events.add_parser("publish", help="publish one event (validated against its type's schema)")
    publish.add_argument("type", help="event type, e.g. dataset.updated")
    publish.add_argument("data", help="the payload as JSON")

    status = sub.add_parser("status", help="the served models as the gateway sees them: breakers, fallbacks")
    status.add_argument("--url", default=None, help="the gateway (default MASS_GATEWAY_URL); sends MASS_API_KEY")

    demo = sub.add_parser("demo", help="the end-to-end demo that `make demo` runs")
    demo.add_argument("--quick", action="store_true", help="train each tiny-gpt for one epoch on 40,000 tokens "
                                                         "(about a minute less; the rest is the same)")
    demo.add_argument("--tuning", action="store_true", help="instead: a 4-trial ASHA search, then a retrain "
                                                          "started by a dataset.updated event (with --quick: "
                                                          "trials on 20,000 tokens, a one-epoch retrain)")
    return parser


def _limit_args(parser: argparse.ArgumentParser) -> None:
    """The options of a key's access and limits (``none`` clears a limit in ``update``)."""
    parser.add_argument("--models", default=None, help="comma-separated glob patterns of model ids, e.g. "
                                                       "'tiny-gpt,minilm*' (create's default: '*', every model)")
    parser.add_argument("--rpm", default=None, help="requests per minute (sliding 60 s window)")
    parser.add_argument("--tpm", default=None, help="tokens per minute, prompt + completion")
    parser.add_argument("--max-parallel", default=None, help="requests in flight at once")
    parser.add_argument("--budget-tokens", default=None, help="token budget per UTC day or month: "
                                                              "1000000/day, 30000000/month")


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
PLATFORM_MODULES = {"torch", "transformers", "mlflow", "ray", "tokenizers", "pyarrow", "safetensors", "accelerate",
                    "sqlalchemy", "alembic", "redis"}


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


@command("data register")
def _data_register(args) -> int:
    from mass.cli.output import emit
    from mass.data.datasets import DatasetStore

    version, created = DatasetStore().register(args.name, args.path, field=args.field, description=args.description)
    text = (f"registered dataset {version.ref}: {version.rows} rows in {version.files} {version.format} file(s), "
            f"sha256 {version.content_hash[:12]} (dataset.updated announced)" if created else
            f"unchanged: {args.path} holds what {version.ref} holds (sha256 {version.content_hash[:12]}); "
            "no new version")
    emit(args.output, {**version.to_dict(), "created": created}, text)
    return 0


@command("data list")
def _data_list(args) -> int:
    from mass.cli.output import emit, human_size, table
    from mass.data.datasets import DatasetStore

    versions = DatasetStore().list(args.name)
    rows = [[v.name, v.version, v.format, v.rows, v.files, human_size(v.bytes), v.content_hash[:12],
             v.created_at.strftime("%Y-%m-%d %H:%M"), v.path] for v in versions]
    text = (table(["DATASET", "VERSION", "FORMAT", "ROWS", "FILES", "SIZE", "SHA256", "CREATED", "PATH"], rows)
            if rows else "no registered datasets (register one with `mass data register NAME PATH`)")
    emit(args.output, [v.to_dict() for v in versions], text)
    return 0


@command("data show")
def _data_show(args) -> int:
    from mass.cli.output import emit, human_size
    from mass.data.datasets import DatasetStore

    v = DatasetStore().get(args.ref)
    lines = [f"{'ref':12} {v.ref}", f"{'path':12} {v.path}", f"{'format':12} {v.format} (text in {v.field!r})",
             f"{'rows':12} {v.rows} in {v.files} file(s), {human_size(v.bytes)}", f"{'sha256':12} {v.content_hash}",
             f"{'columns':12} {json.dumps(v.columns)}", f"{'created':12} {v.created_at.isoformat()}"]
    if v.description:
        lines.append(f"{'description':12} {v.description}")
    emit(args.output, v.to_dict(), "\n".join(lines))
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


@command("tune")
def _tune(args) -> int:
    from mass.cli.output import emit
    from mass.tuning.config import TuneConfig
    from mass.tuning.job import TuneResult, report_table

    plan = TuneConfig.load(args.config, args.overrides, args.recipe_overrides)  # fail fast, before any submission
    if args.address:
        from mass.cli.submit import submit_train

        extra = [a for item in args.recipe_overrides for a in ("--recipe-set", item)]
        extra += ["--resume", args.resume] if args.resume else []
        result = submit_train(args.config, args.overrides, args.address, follow=not args.no_follow,
                              script="jobs/tune.py", extra=extra)
    else:
        from mass.tuning.job import run_tuning

        result = run_tuning(plan, resume=args.resume).to_dict()
    if "trials" not in result:
        emit(args.output, result, f"submitted job {result['job_id']}")
        return 0
    done = TuneResult(**{k: result[k] for k in TuneResult.__dataclass_fields__})
    best = done.best
    text = (f"{report_table(done)}\n\nbest: {best['trial_id']} {done.metric}={best['metric']:.4f} {best['config']}\n"
            + (f"registered {done.model_ref} " if done.model_ref else "") + f"(tuning run {done.run_id})")
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


# ------------------------------------------------------------------ keys
def _limits(args) -> dict:
    """The key fields given on the command line (``none`` clears a limit)."""
    from mass.errors import InvalidRequest

    out: dict = {}
    if args.models is not None:
        out["models"] = [p.strip() for p in args.models.split(",") if p.strip()]
    for opt, field in (("rpm", "rpm"), ("tpm", "tpm"), ("max_parallel", "max_parallel")):
        value = getattr(args, opt)
        if value is None:
            continue
        if value.strip().lower() in ("none", "unlimited"):
            out[field] = None
            continue
        try:
            out[field] = int(value)
        except ValueError:
            raise InvalidRequest(f"--{opt.replace('_', '-')} {value!r} is not a whole number (or none)",
                                 field=field) from None
    if args.budget_tokens is not None:
        out["budget"] = args.budget_tokens
    return out


def _key_text(key: dict, secret: str | None = None) -> str:
    from mass.cli.output import key_detail

    text = key_detail(key)
    if secret:
        text += (f"\n\nsecret (shown once; store it now): {secret}\n"
                 f"use it as: Authorization: Bearer {secret[:17]}...")
    return text


@command("keys create")
def _keys_create(args) -> int:
    from mass.access.keys import KeyStore
    from mass.cli.output import emit

    key, secret = KeyStore().create({"name": args.name, **_limits(args), "admin": args.admin})
    emit(args.output, {**key.to_dict(), "secret": secret}, _key_text(key.to_dict(), secret))
    return 0


@command("keys list")
def _keys_list(args) -> int:
    from mass.access.keys import KeyStore
    from mass.cli.output import emit, keys_table

    keys = [k.to_dict() for k in KeyStore().list()]
    emit(args.output, keys, keys_table(keys))
    return 0


@command("keys show")
def _keys_show(args) -> int:
    from mass.access.keys import KeyStore
    from mass.cli.output import emit

    key = KeyStore().get(args.key).to_dict()
    emit(args.output, key, _key_text(key))
    return 0


@command("keys revoke")
def _keys_revoke(args) -> int:
    from mass.access.keys import KeyStore
    from mass.cli.output import emit

    key = KeyStore().revoke(args.key).to_dict()
    emit(args.output, key, f"revoked {key['name']} ({key['prefix']}) at {key['revoked_at']}")
    return 0


@command("keys rotate")
def _keys_rotate(args) -> int:
    from mass.access.keys import KeyStore
    from mass.cli.output import emit

    key, secret = KeyStore().rotate(args.key)
    emit(args.output, {**key.to_dict(), "secret": secret}, _key_text(key.to_dict(), secret))
    return 0


@command("keys update")
def _keys_update(args) -> int:
    from mass.access.keys import KeyStore
    from mass.cli.output import emit

    changes = _limits(args)
    if args.name is not None:
        changes["name"] = args.name
    if args.admin is not None:
        changes["admin"] = args.admin == "true"
    key = KeyStore().update(args.key, changes).to_dict()
    emit(args.output, key, _key_text(key))
    return 0


@command("usage")
def _usage(args) -> int:
    from mass.access.ledger import usage_summary
    from mass.cli.output import emit, usage_table

    by = args.by or (None if args.key else "key")
    rows = usage_summary(key=args.key, since=args.since, by=by)
    emit(args.output, rows, usage_table(rows, by))
    return 0


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in this environment
        return "cli"


def _lifecycle_op(verb: str):
    def run(args) -> int:
        from mass.cli.output import emit
        from mass.lifecycle import Lifecycle

        life = Lifecycle()
        if verb == "publish":
            plan = life.publish(args.name, args.version, _actor(), args.why)
        elif verb == "canary":
            plan = life.canary(args.name, args.version, _actor(), weight=args.weight, plan=args.plan, reason=args.why)
        else:
            plan = getattr(life, verb)(args.name, _actor(), args.why)
        split = ", ".join(f"v{v} {w}%" for v, w in plan.weights().items()) or "nothing served"
        emit(args.output, plan.to_dict(), f"{args.name}: {verb} done; traffic: {split}"
                                          + (" (offline)" if plan.offline else ""))
        return 0
    return run


for _verb in ("publish", "canary", "promote", "rollback", "offline", "online"):
    command(f"models {_verb}")(_lifecycle_op(_verb))


@command("models status")
def _models_status(args) -> int:
    from mass.cli.output import emit, table
    from mass.lifecycle import Lifecycle

    if args.url:
        from mass.sdk import Client

        shown = Client(base_url=args.url, via="http").model_status(args.name)
    else:
        shown = Lifecycle().show(args.name)
    split = ", ".join(f"v{v} {w}%" for v, w in shown["weights"].items()) or "nothing served"
    lines = [f"{args.name}: production v{shown['production']}, traffic {split}"
             + (f", OFFLINE since {shown['offline']['at'][:19]} ({shown['offline']['reason']})"
                if shown["offline"] else "")]
    if shown["plan"]:
        lines.append("rollout plan: " + ", ".join(f"{s['weight']}% for {s['bake_s']:g}s" for s in shown["plan"])
                     + f" (step {shown['step'] + 1})")
    lines += ["", table(["version", "status", "aliases", "method"],
                        [[v["version"], v["status"], ",".join(v["aliases"]), v["method"]] for v in shown["versions"]]),
              "", table(["at", "action", "version", "actor", "why"],
                        [[o["at"][:19], o["action"], o["version"], o["actor"], o["reason"]]
                         for o in shown["operations"]])]
    if shown.get("serving"):
        lines += ["", "deployed versions (the lifecycle controller's view)",
                  table(SERVING_COLUMNS, _serving_rows(args.name, shown["serving"]))]
    emit(args.output, shown, "\n".join(lines))
    return 0


# ------------------------------------------------------------------ triggers
@command("triggers add")
def _triggers_add(args) -> int:
    from mass.automation.launch import check_recipe
    from mass.automation.rules import load_rules, parse_rule
    from mass.automation.store import AutomationStore
    from mass.cli.output import emit
    from mass.cli.submit import project_root
    from mass.errors import ConfigError

    if args.file:
        if args.name or args.on_type or args.action or args.config:
            raise ConfigError("give --file or one rule's flags, not both", field="file")
        rules = load_rules(args.file)
    else:
        rules = [parse_rule({"name": args.name, "on": args.on_type, "where": args.where, "action": args.action,
                             "config": args.config, "set": args.overrides}, "rule")]
    root = project_root()
    for rule in rules:  # every rule checked before any is stored
        check_recipe(rule.config, f"rule {rule.name}", root)
    store = AutomationStore()
    added = [store.add_rule(rule, replace=args.replace) for rule in rules]
    emit(args.output, [a.to_dict() for a in added], "\n".join(
        f"added rule {a.rule.name}: on {a.rule.on}" + (f" where {a.rule.where}" if a.rule.where else "")
        + f" -> {a.rule.action} {a.rule.config}" for a in added))
    return 0


@command("triggers list")
def _triggers_list(args) -> int:
    from mass.automation.store import AutomationStore
    from mass.cli.output import emit, table

    rules = AutomationStore().rules()
    rows = [[r.rule.name, r.rule.on, r.rule.where or "", f"{r.rule.action} {r.rule.config}", " ".join(r.rule.set),
             r.created_at.strftime("%Y-%m-%d %H:%M")] for r in rules]
    emit(args.output, [r.to_dict() for r in rules],
         table(["RULE", "ON", "WHERE", "ACTION", "SET", "ADDED"], rows) if rows else
         "no trigger rules (add one with `mass triggers add`)")
    return 0


@command("triggers remove")
def _triggers_remove(args) -> int:
    from mass.automation.store import AutomationStore
    from mass.cli.output import emit

    AutomationStore().remove_rule(args.name)
    emit(args.output, {"removed": args.name}, f"removed rule {args.name}")
    return 0


@command("triggers runs")
def _triggers_runs(args) -> int:
    from mass.automation.store import AutomationStore
    from mass.cli.output import emit, table

    runs = AutomationStore().runs(args.name, kind="trigger")
    rows = [[r.id, r.at.strftime("%Y-%m-%d %H:%M:%S"), r.name, f"{r.event_type}@{r.event_offset}", r.status,
             r.job_id or "", r.detail] for r in runs]
    emit(args.output, [r.to_dict() for r in runs],
         table(["RUN", "AT", "RULE", "EVENT", "STATUS", "JOB", "DETAIL"], rows) if rows else "no triggered runs")
    return 0


@command("triggers run")
def _triggers_run(args) -> int:
    import signal
    import threading

    from mass.automation.triggers import run_engine

    address = args.address or "http://127.0.0.1:8265"
    if "://" not in address:
        address = f"http://{address}"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"trigger engine: starting jobs on {address}" + (" (once)" if args.once else "; Ctrl-C stops"),
          file=sys.stderr, flush=True)
    try:
        run_engine(address, stop, once=args.once)
    except KeyboardInterrupt:
        pass
    return 0


# ------------------------------------------------------------------ schedules and the automation service
@command("schedule add")
def _schedule_add(args) -> int:
    from mass.automation.launch import check_recipe
    from mass.automation.schedules import ScheduleStore, parse_schedule
    from mass.cli.output import emit

    spec = parse_schedule({"name": args.name, "cron": args.cron, "action": args.action, "config": args.config,
                           "set": args.overrides, "catch_up": args.catch_up})
    check_recipe(spec.config, f"schedule {spec.name}")
    added = ScheduleStore().add(spec).to_dict()
    emit(args.output, added, f"added schedule {spec.name}: {spec.action} {spec.config} at '{spec.cron}' (UTC), "
                             f"next {added['next_slot']}; catch-up: {spec.catch_up}")
    return 0


@command("schedule list")
def _schedule_list(args) -> int:
    from mass.automation.schedules import ScheduleStore
    from mass.cli.output import emit, table

    shown = [s.to_dict() for s in ScheduleStore().list()]
    rows = [[s["name"], s["cron"], f"{s['action']} {s['config']}", " ".join(s["set"]), s["catch_up"],
             "paused" if s["paused"] else "active", s["last_slot"] or "", s["next_slot"] or ""] for s in shown]
    emit(args.output, shown, table(["SCHEDULE", "CRON", "JOB", "SET", "CATCH-UP", "STATE", "LAST SLOT", "NEXT SLOT"],
                                   rows) if rows else "no schedules (add one with `mass schedule add`)")
    return 0


@command("schedule show")
def _schedule_show(args) -> int:
    from mass.automation.schedules import ScheduleStore
    from mass.automation.store import AutomationStore
    from mass.cli.output import emit, table

    shown = ScheduleStore().get(args.name).to_dict()
    runs = AutomationStore().runs(args.name, kind="schedule", limit=20)
    shown["runs"] = [r.to_dict() for r in runs]
    lines = [f"{k:10} {shown[k]}" for k in ("name", "cron", "action", "config", "set", "catch_up", "paused",
                                             "last_slot", "next_slot")]
    rows = [[r.id, r.dedupe_key, r.status, r.job_id or "", r.detail] for r in runs]
    lines += ["", table(["RUN", "SLOT", "STATUS", "JOB", "DETAIL"], rows) if rows else "no runs yet"]
    emit(args.output, shown, "\n".join(lines))
    return 0


@command("schedule pause")
def _schedule_pause(args) -> int:
    from mass.automation.schedules import ScheduleStore
    from mass.cli.output import emit

    emit(args.output, ScheduleStore().set_paused(args.name, True).to_dict(), f"paused schedule {args.name}")
    return 0


@command("schedule resume")
def _schedule_resume(args) -> int:
    from mass.automation.schedules import ScheduleStore
    from mass.cli.output import emit

    shown = ScheduleStore().set_paused(args.name, False).to_dict()
    emit(args.output, shown, f"resumed schedule {args.name}; next slot {shown['next_slot']}")
    return 0


@command("schedule remove")
def _schedule_remove(args) -> int:
    from mass.automation.schedules import ScheduleStore
    from mass.cli.output import emit

    ScheduleStore().remove(args.name)
    emit(args.output, {"removed": args.name}, f"removed schedule {args.name}")
    return 0


@command("automation start")
def _automation_start(args) -> int:
    from mass.automation.service import start_service
    from mass.cli.output import emit

    shown = start_service(args.jobs, args.address, args.tick)
    emit(args.output, shown, f"automation service running (pid {shown['pid']} on {shown['node']}, since "
                             f"{shown['started_at']}); jobs go to {shown['job_address']}")
    return 0


@command("automation status")
def _automation_status(args) -> int:
    import ray

    from mass.automation.service import service
    from mass.cli.output import emit

    handle = service(args.address)
    if handle is None:
        emit(args.output, {"running": False}, "automation service not running (start it with `mass automation "
                                              "start`)")
        return 1
    shown = {"running": True, **ray.get(handle.status.remote(), timeout=60)}
    emit(args.output, shown, "\n".join(f"{k:12} {v}" for k, v in shown.items()))
    return 0


@command("automation stop")
def _automation_stop(args) -> int:
    from mass.automation.service import stop_service
    from mass.cli.output import emit

    stopped = stop_service(args.address)
    emit(args.output, {"stopped": stopped}, "automation service stopped" if stopped else "it was not running")
    return 0


@command("automation tick")
def _automation_tick(args) -> int:
    import ray

    from mass.automation.service import service
    from mass.cli.output import emit, table

    handle = service(args.address)
    if handle is None:
        raise MassError("the automation service is not running; start it with `mass automation start`")
    runs = ray.get(handle.tick.remote(args.at), timeout=300)
    emit(args.output, runs, table(["RUN", "SCHEDULE", "SLOT", "STATUS", "JOB", "DETAIL"], [
        [r["id"], r["name"], r["dedupe_key"], r["status"], r["job_id"] or "", r["detail"]] for r in runs])
         if runs else "nothing was due")
    return 0


@command("events list")
def _events_list(args) -> int:
    from mass.cli.output import emit, table
    from mass.events import open_bus

    bus = open_bus()
    try:
        events = [e for e in bus.replay(after=args.after, count=args.count) if args.type in (None, e.type)]
    finally:
        bus.close()
    rows = [e.model_dump(mode="json") for e in events]
    emit(args.output, rows, table(["offset", "time", "type", "source", "data"],
                                  [[r["offset"], r["time"][:19], r["type"], r["source"],
                                    json.dumps(r["data"], separators=(",", ":"))] for r in rows]))
    return 0


@command("events dead-letters")
def _events_dead(args) -> int:
    from dataclasses import asdict

    from mass.cli.output import emit, table
    from mass.events import open_bus

    bus = open_bus()
    try:
        dead = [asdict(d) for d in bus.dead_letters()]
    finally:
        bus.close()
    emit(args.output, dead, table(["offset", "group", "time", "reason"],
                                  [[d["offset"], d["group"], d["time"].isoformat()[:19], d["reason"]] for d in dead]))
    return 0


@command("events mlflow-webhook")
def _events_hook(args) -> int:
    from mass.cli.output import emit
    from mass.errors import ConfigError
    from mass.events.webhooks import MLFLOW_EVENTS
    from mass.registry import ModelRegistry
    from mass.settings import get_settings

    settings = get_settings()
    if not settings.webhook_secret:
        raise ConfigError("set MASS_WEBHOOK_SECRET (here and on the gateway) first: deliveries are signed with it",
                          field="MASS_WEBHOOK_SECRET")
    if not settings.tracking_uri.startswith(("http://", "https://")):
        raise ConfigError(f"MLflow webhooks need an mlflow server with a SQL backend; MASS_TRACKING_URI is "
                          f"{settings.tracking_uri!r}", field="MASS_TRACKING_URI")
    hook = ModelRegistry(settings).create_webhook(args.url, MLFLOW_EVENTS, settings.webhook_secret)
    emit(args.output, {"id": hook, "url": args.url, "events": list(MLFLOW_EVENTS)},
         f"webhook {hook}: {', '.join(MLFLOW_EVENTS)} -> {args.url}")
    return 0


@command("events publish")
def _events_publish(args) -> int:
    from mass.cli.output import emit
    from mass.errors import InvalidEvent
    from mass.events import open_bus

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"the payload is not JSON: {exc}", field="data") from None
    bus = open_bus()
    try:
        event = bus.publish(args.type, data, source="cli")
    finally:
        bus.close()
    emit(args.output, event.model_dump(mode="json"), f"published {event.type} at offset {event.offset}")
    return 0


SERVING_COLUMNS = ["model", "version", "state", "weight", "replicas", "serve app", "errors/requests", "p95 ms"]


def _serving_rows(name: str, serving: dict[str, Any] | None) -> list[list[Any]]:
    """One row per deployed version of a managed model (``serving``: the controller's view of it)."""
    return [[name, v["version"], v["state"], f"{v['weight']}%",
             ",".join(f"{n} {k.lower()}" for k, n in v["replicas"].items()) or "-", v["app"],
             f"{v['slo']['errors']}/{v['slo']['requests']}", v["slo"]["p95_ms"] or "-"]
            for v in (serving or {}).get("versions", [])]


@command("status")
def _status(args) -> int:
    import time

    from mass.cli.output import emit, table
    from mass.sdk import Client

    services = Client(base_url=args.url, via="http").services()
    rows = []
    for name, svc in services.items():
        breaker = svc["breaker"]
        last = breaker["transitions"][-1] if breaker["transitions"] else None
        rows.append([name, svc["engine"], svc["deployment"], breaker["state"],
                     f"{breaker['window_failures']}/{breaker['window_requests']}", ",".join(svc["fallbacks"]) or "-",
                     f"{time.strftime('%H:%M:%S', time.localtime(last['at']))} {last['to']}: {last['why']}"
                     if last else ""])
    text = table(["model", "engine", "deployment", "breaker", "failed/window", "fallbacks", "last transition"], rows)
    versions = [row for name, svc in services.items() for row in _serving_rows(name, svc.get("serving"))]
    if versions:
        text += "\n\nmanaged versions (the lifecycle controller's view)\n" + table(SERVING_COLUMNS, versions)
    emit(args.output, services, text)
    return 0


@command("compress convert")
def _compress_convert(args) -> int:
    from mass.cli.output import emit
    from mass.compression.convert import convert_from_args, result_text

    result = convert_from_args(args)
    emit(args.output, result.to_dict(), result_text(result))
    return 0 if result.registered else 1  # a refused child is reported with its card, and fails the command


def _emit_children(args, results) -> int:
    """Print a compression job's children (cards and verdicts); exit 1 when one was refused or not made."""
    from mass.cli.output import emit
    from mass.compression.job import result_text

    emit(args.output, [r.to_dict() for r in results], "\n\n".join(result_text(r) for r in results))
    return 0 if all(r.registered for r in results) else 1


@command("compress quantize")
def _compress_quantize(args) -> int:
    from mass.compression.quantize import quantize_from_args

    return _emit_children(args, quantize_from_args(args))


@command("compress distill")
def _compress_distill(args) -> int:
    from mass.compression.distill import distill_from_args

    return _emit_children(args, distill_from_args(args))


@command("compress prune")
def _compress_prune(args) -> int:
    from mass.compression.prune import prune_from_args

    return _emit_children(args, prune_from_args(args))


@command("compress pipeline")
def _compress_pipeline(args) -> int:
    from mass.cli.output import emit
    from mass.compression.pipeline import pipeline_from_args, step_text

    steps = pipeline_from_args(args)
    emit(args.output, [s.to_dict() for s in steps], "\n\n".join(step_text(s) for s in steps))
    return 0 if all(s.complete for s in steps) else 1


@command("demo")
def _demo(args) -> int:
    if args.tuning:
        from mass.cli.demo_tuning import run_tuning_demo

        return run_tuning_demo(quick=args.quick)
    from mass.cli.demo import QUICK, run_demo

    return run_demo(overrides=QUICK if args.quick else None)


if __name__ == "__main__":
    sys.exit(main())
