"""The tuning job on the session's Ray cluster: ASHA stops the weak trial, the best trial's model is registered
with its lineage, the search is reported in MLflow and announced on the event bus."""

from __future__ import annotations

import pytest
import yaml

from mass.registry import ModelRegistry
from mass.tuning.config import TuneConfig
from mass.tuning.job import run_tuning
from tests.integration.support import SMOKE

GOOD, BAD = 3e-3, 1e-5


@pytest.fixture(scope="module")
def tuned(ray_cluster, corpus, tmp_path_factory):
    """Two trials of the smoke recipe one after the other: a good learning rate first (it sets the bar at each
    rung), then one far too small (ASHA stops it after its first epoch)."""
    path = tmp_path_factory.mktemp("tune") / "tune.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-gpt-tuned", "train": str(SMOKE),
        "set": ["data.max_train_tokens=40000", "optim.epochs=3", "registration.aliases=[best-tuned]"],
        "space": {"optim.lr": {"grid": [GOOD, BAD]}},
        "search": {"num_samples": 1, "max_concurrent_trials": 1, "grace_period": 1, "reduction_factor": 2}}))
    plan = TuneConfig.load(path)
    return plan, run_tuning(plan, address=ray_cluster.gcs_address)


def test_asha_stops_the_weak_trial_and_reports_what_it_saved(tuned):
    _, result = tuned
    trials = {t["config"]["optim.lr"]: t for t in result.trials}
    good, bad = trials[GOOD], trials[BAD]
    assert (good["status"], good["epochs"], bad["status"], bad["epochs"]) == ("completed", 3, "stopped early", 1)
    assert bad["metric"] > good["history"][0][1]  # worse than the good trial at the same rung
    per_epoch = good["history"][0][0]
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
    assert [m.step for m in reported] == [1, 2, 3]
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
