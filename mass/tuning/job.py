"""``run_tuning``: a Ray Tune search over a training recipe — each trial one Ray Train run in an MLflow child run,
ASHA stopping the weak ones early — then the best trial's model registered with its config, metrics and lineage,
and a report of what the search ran and what early stopping saved."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mass.errors import ConfigError, JobFailed, MassError
from mass.settings import Settings, get_settings, settings_env
from mass.tuning.config import TuningPlan

log = logging.getLogger(__name__)
TRIAL_KIND, TUNE_KIND = "tune-trial", "tune"


@dataclass
class TrialSummary:
    """One trial as the search left it."""

    trial_id: str
    config: dict[str, Any]  # the tuned fields' values
    status: str  # completed | stopped early | failed
    epochs: int  # epochs it ran
    planned_epochs: int
    steps: int  # optimizer steps its workers ran (0 when it never reported); see ``worker_steps``
    planned_steps: int
    metric: float | None  # its last reported value of the search's metric
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) per epoch
    run_id: str | None = None  # its MLflow child run
    error: str | None = None
    reported_steps: int = 0  # its steps at the last result Tune recorded (a stopped trial's workers ran on)


@dataclass
class TuneResult:
    """What a tuning job produced; printed as the job's one JSON result line."""

    run_id: str
    model_ref: str | None
    metric: str
    best: dict[str, Any]
    trials: list[dict[str, Any]]
    steps_run: int  # optimizer steps the trials' workers ran (what the search cost)
    steps_budget: int
    experiment: str  # Ray Tune's experiment folder (``--resume`` takes the run id and finds it)
    steps_reported: int = 0  # the same at the trials' last results as Tune recorded them

    @property
    def saved(self) -> float:
        """The share of the full budget (every trial run to its last epoch) that early stopping did not spend."""
        return 0.0 if not self.steps_budget else 1 - self.steps_run / self.steps_budget

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**asdict(self), "saved": round(self.saved, 4)}


def concurrency(plan: TuningPlan) -> int:
    """Trials that can run at once: ``search.max_concurrent_trials`` or, unset, as many as the cluster's free CPUs
    (and GPUs) place, each trial needing its recipe's workers. More than fits is clamped, with a warning (Ray
    Tune cannot see the resources a trial's Ray Train workers ask for, and would start trials that then wait)."""
    import ray

    scaling = plan.recipe.scaling
    free = ray.available_resources()
    fits = math.floor(free.get("CPU", 0.0) / (scaling.num_workers * scaling.cpus_per_worker) + 1e-9)
    if scaling.use_gpu:
        fits = min(fits, math.floor(free.get("GPU", 0.0) / scaling.num_workers + 1e-9))
    fits = max(1, fits)
    asked = plan.config.search.max_concurrent_trials
    if asked is not None and asked > fits:
        log.warning("search.max_concurrent_trials=%d: the cluster's free resources hold %d trial(s) of %d workers x "
                    "%g CPUs at once; running %d at a time", asked, fits, scaling.num_workers,
                    scaling.cpus_per_worker, fits)
    return fits if asked is None else min(asked, fits)


def run_tuning(plan: TuningPlan, address: str | None = None, settings: Settings | None = None,
               resume: str | None = None) -> TuneResult:
    """Run the search ``plan`` describes and register its best model.

    Args:
        plan: a checked tuning config (``TuneConfig.load``).
        address: Ray cluster address; default ``RAY_ADDRESS`` or a new local Ray.
        settings: deployment settings; read from the environment when omitted.
        resume: the MLflow run id of a search whose driver died: its trials go on from their checkpoints
            (``Tuner.restore``) instead of a new search starting.

    Raises:
        ConfigError, InsufficientResources: before any trial starts (one trial must fit the cluster).
        JobFailed: every trial failed, or none reported the metric (the run is marked FAILED).
    """
    from mass.cluster import connect_ray
    from mass.registry import ModelRegistry
    from mass.training.job import check_resources

    settings = settings or get_settings()
    registry = ModelRegistry(settings)
    registry.experiment_id()  # the repository is reachable
    connect_ray(address, settings)
    check_resources(plan.recipe)
    at_once = concurrency(plan)
    client = registry.client
    if resume:
        try:
            run = client.get_run(resume)
        except Exception as exc:  # noqa: BLE001 - MLflow's not-found, or the store's failure: both stop here
            raise ConfigError(f"--resume {resume}: no such MLflow run ({str(exc).splitlines()[0][:200]})",
                              field="resume") from exc
        if run.data.tags.get("mass.kind") != TUNE_KIND:
            raise ConfigError(f"--resume {resume}: that MLflow run is not a tuning run", field="resume")
    tags = {"mass.kind": TUNE_KIND, "mass.model_name": plan.name}
    try:
        with registry.tracked_run(f"tune-{plan.name}", tags, resume=resume) as run_id:
            experiment = f"tune-{plan.name}-{run_id[:12]}"
            if not resume:
                _log_plan(client, run_id, plan, at_once)
            try:
                grid = _search(plan, settings, run_id, experiment, at_once, resume is not None)
            except BaseException:
                _fail_open_trials(client, registry.experiment_id(), run_id)
                raise
            trials = _summaries(plan, grid, client, registry.experiment_id(), run_id)
            reported = [t for t in trials if t.metric is not None]
            if not reported:
                raise JobFailed("no trial reported " + plan.config.search.metric + ": " +
                                "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error)[:2000],
                                run_id=run_id)
            best = (min if plan.config.search.mode == "min" else max)(reported, key=lambda t: t.metric)
            result = TuneResult(run_id, None, plan.config.search.metric, asdict(best),
                                [asdict(t) for t in trials], sum(t.steps for t in trials),
                                sum(t.planned_steps for t in trials), experiment,
                                sum(t.reported_steps for t in trials))
            _log_report(client, run_id, result, trials)
            if plan.recipe.registration.enabled:
                result.model_ref = _register_best(registry, plan, best, grid, run_id)
    except MassError:
        raise
    except Exception as exc:
        raise JobFailed(f"tuning failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    registry.announce("tuning.completed", {"run_id": result.run_id, "model": plan.name, "metric": result.metric,
                                           "best_value": best.metric, "best_config": best.config,
                                           "trials": len(result.trials), "saved": round(result.saved, 4),
                                           "version": result.model_ref.split("/")[1] if result.model_ref else None},
                      source="tuning")
    return result


def _log_plan(client, run_id: str, plan: TuningPlan, at_once: int) -> None:
    from mlflow.entities import Param

    search = plan.config.search
    params = {"recipe": str(plan.recipe_path), "algorithm": search.algorithm, "num_samples": search.num_samples,
              "metric": search.metric, "mode": search.mode, "max_concurrent_trials": at_once,
              "grace_period": search.grace_period, "reduction_factor": search.reduction_factor,
              "max_epochs": plan.max_epochs, **{f"space.{d.path}": f"{d.kind} {list(d.values)}" for d in plan.dims}}
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    client.log_dict(run_id, {"tune": plan.config.model_dump(mode="json"),
                             "recipe": plan.recipe.model_dump(mode="json")}, "tune_config.json")


def _search(plan: TuningPlan, settings: Settings, run_id: str, experiment: str, at_once: int, resume: bool):
    """Ray Tune's ResultGrid for the search (a new one, or the one in ``experiment`` restored)."""
    from ray import tune

    # the trial's Ray Train workers ask for the CPUs themselves: the trial (their driver) takes none (a bundle may not
    # be empty, so it asks for one byte of memory); how many run at once is ``concurrency``'s choice
    trainable = tune.with_resources(
        tune.with_parameters(trial, recipe=plan.recipe.model_dump(mode="json"), paths=[d.path for d in plan.dims],
                             parent_run=run_id, env={k: v for k, v in settings_env(settings).items() if v}),
        {"CPU": 0, "memory": 1})
    path = str(Path(settings.storage_path).expanduser() / experiment)
    if resume:
        from ray.tune import Tuner

        if not Tuner.can_restore(path):
            raise ConfigError(f"nothing to resume at {path}: the search's driver never checkpointed it",
                              field="resume")
        tuner = Tuner.restore(path, trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={d.path: d.to_tune() for d in plan.dims},
                           tune_config=_tune_config(plan, at_once, str(Path(path) / "mass_asha_state.pkl")),
                           run_config=tune.RunConfig(name=experiment,
                                                     storage_path=str(Path(settings.storage_path).expanduser()),
                                                     verbose=0, callbacks=[_progress(plan)]))
    return tuner.fit()


def _progress(plan: TuningPlan):
    """A Tune callback that logs one line per trial epoch and per trial end (instead of Tune's status tables)."""
    from ray.tune import Callback

    metric = plan.config.search.metric

    class Progress(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            log.info("trial %s epoch %s/%s: %s=%.4f  %s", trial.trial_id, result.get("epoch"), plan.max_epochs,
                     metric, result.get(metric, float("nan")), _values(trial.config, plan))

        def on_trial_complete(self, iteration, trials, trial, **info):
            epoch = (trial.last_result or {}).get("epoch")
            log.info("trial %s ended after epoch %s of %s", trial.trial_id, epoch, plan.max_epochs)

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("trial %s failed: %s", trial.trial_id, trial.error_file or "see its logs")

    return Progress()


def _values(config: dict[str, Any], plan: TuningPlan) -> str:
    return " ".join(f"{d.path}={_fmt(config.get(d.path))}" for d in plan.dims)


def _tune_config(plan: TuningPlan, at_once: int, asha_state: str):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from mass.tuning.asha import PersistentASHA

    search = plan.config.search
    scheduler = FIFOScheduler() if search.algorithm == "random" else PersistentASHA(
        asha_state, time_attr="epoch", max_t=plan.max_epochs, grace_period=search.grace_period,
        reduction_factor=search.reduction_factor)
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=search.seed)
    else:  # random sampling (ASHA's too) drawn from search.seed: the same seed draws the same trials. Tune ignores
        # max_concurrent_trials for a generator passed in (it limits only Searchers): the generator limits itself
        from ray.tune.search.basic_variant import BasicVariantGenerator

        searcher = BasicVariantGenerator(random_state=search.seed, max_concurrent=at_once)
    return tune.TuneConfig(metric=search.metric, mode=search.mode, scheduler=scheduler, search_alg=searcher,
                           num_samples=search.num_samples,
                           max_concurrent_trials=at_once if search.algorithm == "optuna" else None)


def trial(config: dict[str, Any], recipe: dict[str, Any], paths: list[str], parent_run: str,
          env: dict[str, str]) -> None:
    """One trial (a Ray Tune function trainable): the recipe with the trial's values trains on Ray Train in an
    MLflow child run of the search's; every epoch's report reaches Tune (ASHA may stop it there). The tokenizer
    and the model's config go into the child run, so the search can register the best trial's model."""
    os.environ.update(env)
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mass.registry import ModelRegistry
    from mass.training.config import TrainConfig
    from mass.training.job import fit, log_recipe, prepare_run
    from mass.training.loop import train_loop_per_worker
    from mass.tuning.space import apply

    settings = get_settings()
    registry = ModelRegistry(settings)
    cfg = TrainConfig.model_validate(apply(recipe, {p: config[p] for p in paths}))
    prepared = prepare_run(cfg, registry, settings)
    trial_id = tune.get_context().get_trial_id()
    tags = {"mass.kind": TRIAL_KIND, "mlflow.parentRunId": parent_run, "mass.trial": trial_id,
            "mass.model_name": cfg.name}
    client = registry.client
    earlier = client.search_runs([registry.experiment_id()], max_results=1, filter_string=(
        f"tags.mlflow.parentRunId = '{parent_run}' and tags.`mass.trial` = '{trial_id}'"))
    # a search resumed after its driver died restarts its unfinished trials: each goes on in its own child run.
    # The search's driver closes the run with the trial's outcome (_summaries), not the trial: a trial ASHA stops
    # may raise in its dying actor after the driver has marked its run KILLED
    with registry.tracked_run(f"trial-{trial_id}", tags, resume=earlier[0].info.run_id if earlier else None,
                              close=False) as run_id:
        log_recipe(client, run_id, cfg, prepared.data, prepared.sources)
        with tempfile.TemporaryDirectory() as tmp:
            prepared.tokenizer.save_pretrained(tmp)
            client.log_artifacts(run_id, tmp, "tokenizer")
        client.log_dict(run_id, prepared.model_spec, "model_spec.json")
        fit(cfg, settings, run_id, prepared.model_spec, prepared.base_model, prepared.data, train_loop_per_worker,
             name=f"{parent_run[:12]}-{trial_id}", callbacks=[TuneReportCallback()])


def _summaries(plan: TuningPlan, grid, client, experiment_id: str, run_id: str) -> list[TrialSummary]:
    """Every trial of the ResultGrid summarised, matched with its MLflow child run (which is closed with the
    trial's outcome: FINISHED, KILLED when stopped early, FAILED)."""
    runs = {r.data.tags.get("mass.trial"): r.info.run_id for r in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=10000)}
    metric = plan.config.search.metric
    out = []
    for result in grid:
        config = {p: result.config.get(p) for p in (d.path for d in plan.dims)}
        planned = int(config.get("optim.epochs") or plan.recipe.optim.epochs)
        frame = result.metrics_dataframe
        rows = [] if frame is None or metric not in frame else frame.dropna(subset=[metric]).to_dict("records")
        epochs = int(rows[-1]["epoch"]) if rows else 0
        steps = int(rows[-1]["step"]) if rows else 0
        per_epoch = int(rows[0]["step"]) // max(1, int(rows[0]["epoch"])) if rows else 0
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        error = None if result.error is None else str(result.error).strip().splitlines()[-1][:500]
        status = "failed" if error else ("completed" if epochs >= planned else "stopped early")
        run = runs.get(trial_id)
        summary = TrialSummary(trial_id, config, status, epochs, planned, worker_steps(client, run, steps),
                               per_epoch * planned, float(rows[-1][metric]) if rows else None,
                               [(int(r["step"]), float(r[metric])) for r in rows], run, error, steps)
        if summary.run_id:
            client.set_terminated(summary.run_id, {"completed": "FINISHED", "stopped early": "KILLED"}.get(
                status, "FAILED"))
        out.append(summary)
    return sorted(out, key=lambda t: t.trial_id)


def _fail_open_trials(client, experiment_id: str, run_id: str) -> None:
    """The search itself failed: its trials' runs still RUNNING are marked FAILED (a trial's run is closed by the
    driver, see ``trial``; a resumed search reopens them)."""
    with contextlib.suppress(Exception):
        for run in client.search_runs([experiment_id], max_results=10000, filter_string=(
                f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")):
            client.set_terminated(run.info.run_id, "FAILED")


def worker_steps(client, run_id: str | None, reported: int) -> int:
    """The steps a trial's workers ran: when ASHA stops a trial, its Ray Train workers go on into the next epoch
    until the stop reaches them, past the last result Tune recorded (``reported``). Rank 0 logs ``train_loss`` to
    the trial's MLflow run every ``log_every`` steps and at each epoch's end, so its last logged step is what
    was run (to within ``log_every`` steps)."""
    if run_id is None:
        return reported
    return max([reported, *(m.step for m in client.get_metric_history(run_id, "train_loss"))])


def report_table(result: TuneResult) -> str:
    """The trials as a markdown table, the best marked, and what early stopping saved."""
    trials = result.trials
    paths = list(trials[0]["config"]) if trials else []
    head = ["trial", *paths, "status", "epochs", "steps", result.metric]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        best = " **best**" if t["trial_id"] == result.best["trial_id"] else ""
        values = [_fmt(t["config"][p]) for p in paths]
        value = "–" if t["metric"] is None else f"{t['metric']:.4f}"
        lines.append("| " + " | ".join([t["trial_id"] + best, *values, t["status"], f"{t['epochs']}/"
                                        f"{t['planned_epochs']}", f"{t['steps']}/{t['planned_steps']}", value]) + " |")
    lines.append(f"\nsteps run: {result.steps_run} of a full budget of {result.steps_budget} "
                 f"(early stopping saved {result.saved:.0%})")
    if result.steps_reported and result.steps_reported != result.steps_run:
        lines.append(f"Tune recorded {result.steps_reported} of them: stopped trials' workers ran on until the "
                     "stop reached them")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _log_report(client, run_id: str, result: TuneResult, trials: list[TrialSummary]) -> None:
    """The results table (markdown and JSON), a PNG of the metric per trial against steps, and the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "trials.md").write_text(report_table(result) + "\n")
        (Path(tmp) / "trials.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
        figure, ax = plt.subplots(figsize=(7, 4))
        for t in trials:
            if t.history:
                ax.plot(*zip(*t.history), marker="o", label=f"{t.trial_id} ({t.status})")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(result.metric)
        ax.set_title(f"{result.metric} per trial")
        ax.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(Path(tmp) / f"{result.metric}.png", dpi=100)
        plt.close(figure)
        client.log_artifacts(run_id, tmp, "tuning")
    client.log_metric(run_id, f"best_{result.metric}", float(result.best["metric"]))
    client.log_metric(run_id, "steps_run", result.steps_run)
    client.log_metric(run_id, "steps_reported", result.steps_reported)
    client.log_metric(run_id, "steps_budget", result.steps_budget)
    client.log_metric(run_id, "early_stopping_saved", result.saved)
    client.set_tag(run_id, "mass.best_trial", result.best["trial_id"])


def _register_best(registry, plan: TuningPlan, best: TrialSummary, grid, run_id: str) -> str:
    """Register the best trial's last checkpoint with its tokenizer and config (from its child run)."""
    from transformers import AutoTokenizer

    from mass.training.config import TrainConfig
    from mass.training.job import final_metrics, load_state
    from mass.training.loop import build_model
    from mass.tuning.space import apply

    from ray.train import Checkpoint
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    result = next(r for r in grid if (r.metrics or {}).get("trial_id") == best.trial_id)
    path = (result.metrics or {}).get(CHECKPOINT_PATH_KEY)  # Ray Train's last checkpoint of the trial
    checkpoint = Checkpoint(path) if path else None
    if checkpoint is None or best.run_id is None:
        raise JobFailed(f"the best trial {best.trial_id} left no checkpoint or MLflow run; nothing to register",
                        run_id=run_id)
    client = registry.client
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(client.download_artifacts(best.run_id, "tokenizer", tmp))
        spec = json.loads(Path(client.download_artifacts(best.run_id, "model_spec.json", tmp)).read_text())
    model = build_model(spec)
    with checkpoint.as_directory() as ckpt_dir:
        model.load_state_dict(load_state(ckpt_dir))
    cfg = TrainConfig.model_validate(apply(plan.recipe.model_dump(mode="json"), best.config))
    info = registry.register(
        (model.eval(), tokenizer), plan.name, "text-generation", metrics=final_metrics(result.metrics),
        config=cfg.model_dump(mode="json"), run_id=run_id,
        lineage={"source_run": best.run_id, "tuning_run": run_id, "parent": cfg.model.base,
                 "method": "tune", "datasets": client.get_run(best.run_id).data.tags.get("mass.datasets") or None},
        aliases=cfg.registration.aliases,
        description=cfg.registration.description or f"best of tuning run {run_id} ({best.trial_id})")
    return info.ref
