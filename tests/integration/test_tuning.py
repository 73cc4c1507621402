"""The tuning job on the session's Ray cluster, submitted as users do (``mass tune --address``), its driver killed
mid-search and the search resumed (``--resume``, Tuner.restore): ASHA stops the weak trial, the best trial's
model is registered with its lineage, the search is reported in MLflow and announced on the event bus."""

from __future__ import annotations

import time

import pytest
import yaml

from mass.registry import ModelRegistry
from mass.tuning.config import TuneConfig
from mass.tuning.job import run_tuning
from tests.integration.support import ROOT, last_json, run_cli, wait_for

GOOD, BAD = 3e-3, 1e-5


def _leftovers(address: str, job_id: str) -> list[str]:
    """What the killed search's Ray job still holds: placement groups not removed, actors alive that die with
    their job (a detached one, Ray Train's placement-group cleaner, leaves by itself once its group is gone)."""
    from ray.util.state import list_actors, list_placement_groups

    groups = list_placement_groups(address=address, filters=[("creator_job_id", "=", job_id)], detail=True)
    actors = list_actors(address=address, filters=[("job_id", "=", job_id)], detail=True)
    return [f"placement group {g.placement_group_id} {g.state}" for g in groups if g.state != "REMOVED"] + \
        [f"actor {a.class_name} {a.state}" for a in actors if a.state != "DEAD" and not a.is_detached]


@pytest.fixture(scope="module")
def tuned(ray_cluster, corpus):
    """Two trials of the smoke recipe one after the other: a good learning rate first (it sets the bar at each
    rung), then one far too small (ASHA stops it after its first epoch). The search is submitted as a Ray job;
    once the first trial has reported its first epoch the job is stopped (its driver killed), and the search is
    resumed here: the first trial goes on from its checkpoint, the second starts."""
    from ray.job_submission import JobSubmissionClient

    # a job's recipe lives in the project (not in .gitignore: Ray leaves ignored files out of a job's working_dir)
    path = ROOT / "jobs" / "configs" / "test-tune-restore.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-gpt-tuned", "train": "tiny-gpt-smoke.yaml",
        "set": ["data.max_train_tokens=40000", "optim.epochs=3", "registration.aliases=[best-tuned]"],
        "space": {"optim.lr": {"grid": [GOOD, BAD]}},
        "search": {"num_samples": 1, "max_concurrent_trials": 1, "grace_period": 1, "reduction_factor": 2}}))
    try:
        plan = TuneConfig.load(path)
        proc = run_cli(["-o", "json", "tune", "--config", str(path.relative_to(ROOT)), "--address",
                        ray_cluster.dashboard_url, "--no-follow"], env=ray_cluster.env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        job_id = last_json(proc.stdout)["job_id"]
        registry = ModelRegistry()
        client, experiment = registry.client, registry.experiment_id()

        jobs = JobSubmissionClient(ray_cluster.dashboard_url)

        def first_epoch_reported():
            status = str(jobs.get_job_status(job_id))
            assert not status.endswith(("FAILED", "STOPPED")), (status, jobs.get_job_logs(job_id)[-3000:])
            runs = client.search_runs([experiment], filter_string="tags.`mass.kind` = 'tune' and "
                                      "tags.`mass.model_name` = 'tiny-gpt-tuned'")
            children = [] if not runs else client.search_runs(
                [experiment], filter_string=f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'")
            return runs[0] if any("val_loss" in r.data.metrics for r in children) else None

        parent = wait_for(first_epoch_reported, 420, "the submitted search's first trial to report its first "
                          "epoch", interval=0.25)
        jobs.stop_job(job_id)  # the driver is killed: the search stops mid-way
        wait_for(lambda: str(jobs.get_job_status(job_id)).endswith(("STOPPED", "FAILED")), 120, "the job to stop")
        # the driver never finished it (stopped by SIGTERM it marks its run FAILED; a SIGKILL leaves it RUNNING)
        assert client.get_run(parent.info.run_id).info.status in ("FAILED", "RUNNING")
        ray_job = jobs.get_job_info(job_id).driver_info.id
        deadline = time.monotonic() + 120
        while held := _leftovers(ray_cluster.dashboard_url, ray_job):  # Ray frees a dead job's resources
            assert time.monotonic() < deadline, f"the killed search still holds, after 120 s: {held}"
            time.sleep(0.5)
        result = run_tuning(plan, address=ray_cluster.gcs_address, resume=parent.info.run_id)
    finally:
        path.unlink()
    return plan, result


def test_asha_stops_the_weak_trial_and_reports_what_it_saved(tuned):
    _, result = tuned
    trials = {t["config"]["optim.lr"]: t for t in result.trials}
    good, bad = trials[GOOD], trials[BAD]
    assert (good["status"], good["epochs"], bad["status"], bad["epochs"]) == ("completed", 3, "stopped early", 1)
    # (the resumed trial's Tune history may start after the epoch its checkpoint holds: MLflow has every epoch)
    first_rung = [m.value for m in ModelRegistry().client.get_metric_history(good["run_id"], "val_loss")
                  if m.step == 1]
    assert bad["metric"] > first_rung[0]  # worse than the good trial at the same rung
    per_epoch = good["history"][-1][0] // 3
    assert good["planned_steps"] == bad["planned_steps"] == 3 * per_epoch
    assert result.steps_run == good["steps"] + bad["steps"] and result.steps_budget == 2 * good["planned_steps"]
    # Tune recorded 4 of 6 epochs; the bad trial's workers may have run on into its second epoch until the stop
    # reached them, and those steps count as run (its MLflow run's last train_loss step says how far)
    assert (good["reported_steps"], bad["reported_steps"], result.steps_reported) == (3 * per_epoch, per_epoch,
                                                                                      4 * per_epoch)
    assert good["steps"] == 3 * per_epoch and per_epoch <= bad["steps"] <= 2 * per_epoch
    history = ModelRegistry().client.get_metric_history(bad["run_id"], "train_loss")
    assert bad["steps"] == max(m.step for m in history)  # the last step its rank 0 logged
    assert 1 / 6 - 1e-9 <= result.saved <= 1 / 3 + 1e-9
    assert result.best["trial_id"] == good["trial_id"] and result.best["metric"] == good["metric"]


def test_the_best_trial_is_registered_with_its_config_and_lineage(tuned):
    plan, result = tuned
    registry = ModelRegistry()
    info = registry.resolve("tiny-gpt-tuned@best-tuned")
    assert info.ref == result.model_ref and info.run_id == result.run_id
    assert info.lineage == {"source_run": result.best["run_id"], "tuning_run": result.run_id, "method": "tune"}
    assert info.config["optim"]["lr"] == GOOD and info.config["optim"]["epochs"] == 3
    assert info.metrics["val_loss"] == pytest.approx(result.best["metric"])
    model, tokenizer, _ = registry.load(info.ref)  # the checkpoint and the trial's own tokenizer, reloaded
    ids = tokenizer("Return the", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id).shape[1] == ids.shape[1] + 4


def test_the_search_is_one_mlflow_run_with_a_child_run_per_trial_and_is_announced(tuned):
    plan, result = tuned
    client = ModelRegistry().client
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mass.kind"] == "tune"
    assert parent.data.params["space.optim.lr"] == f"grid [{GOOD}, {BAD}]"
    assert parent.data.metrics["early_stopping_saved"] == pytest.approx(result.saved)
    assert parent.data.metrics["steps_reported"] == result.steps_reported
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "tuning")}
    assert artifacts == {"tuning/trials.md", "tuning/trials.json", "tuning/val_loss.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    status = {float(r.data.params["optim.lr"]): r.info.status for r in children}
    assert status == {GOOD: "FINISHED", BAD: "KILLED"}
    good, bad = (next(r for r in children if float(r.data.params["optim.lr"]) == lr) for lr in (GOOD, BAD))
    reported = client.get_metric_history(good.info.run_id, "val_loss")
    # (an epoch the killed driver saw end, but whose checkpoint Tune had not recorded, is run and logged again)
    assert sorted({m.step for m in reported}) == [1, 2, 3]
    assert reported[-1].timestamp <= bad.info.start_time  # max_concurrent_trials=1: one trial after the other

    from mass.events import open_bus

    bus = open_bus()
    mine = [e for e in bus.replay(count=100_000) if e.type == "tuning.completed"
            and getattr(e.data, "run_id", None) == result.run_id]
    bus.close()
    assert len(mine) == 1 and mine[0].data.best_value == pytest.approx(result.best["metric"])
    assert mine[0].data.best_config == {"optim.lr": GOOD} and mine[0].data.version == result.model_ref.split("/")[1]


def test_resume_names_a_search_or_is_refused_before_any_trial(tuned, ray_cluster):
    from mass.errors import ConfigError

    plan, result = tuned
    for run, needle in ((result.best["run_id"], "is not a tuning run"), ("0" * 32, "no such MLflow run")):
        with pytest.raises(ConfigError) as info:
            run_tuning(plan, address=ray_cluster.gcs_address, resume=run)
        assert needle in str(info.value) and info.value.details["field"] == "resume"


def test_more_trials_at_once_than_the_cluster_holds_are_clamped_with_a_warning(tuned, caplog):
    from mass.tuning.job import concurrency

    plan, _ = tuned
    search = plan.config.search
    search.max_concurrent_trials = 64
    try:
        with caplog.at_level("WARNING", logger="mass.tuning.job"):
            at_once = concurrency(plan)
    finally:
        search.max_concurrent_trials = 1
    assert 1 <= at_once <= 2  # the session cluster's 4 CPUs hold two trials of 2 workers x 1 CPU at most
    assert f"search.max_concurrent_trials=64: the cluster's free resources hold {at_once} trial(s)" in caplog.text
