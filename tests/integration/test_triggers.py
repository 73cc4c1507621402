"""Event-driven training on the session cluster: registering a dataset version publishes dataset.updated on the
real bus, the trigger engine starts one Ray job (through the job server) that trains on exactly that version, the
job's MLflow run names the rule and event, a duplicate of the event starts nothing, and a rule whose recipe was
deleted records a failed run and is kept."""

from __future__ import annotations

import json
import time

from mass.automation.rules import parse_rule
from mass.automation.store import AutomationStore
from mass.automation.triggers import TriggerEngine, run_engine
from mass.data.datasets import DatasetStore
from mass.events import open_bus
from mass.registry import ModelRegistry
from tests.integration.support import ROOT

QUICK = ["optim.epochs=1", "data.max_train_tokens=40000", "registration.aliases=[]", "scaling.num_workers=1"]


def _wait(engine: TriggerEngine, rule: str, timeout: float = 420):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        engine.follow()
        [run] = AutomationStore().runs(rule)
        if run.status in ("succeeded", "failed", "stopped"):
            return run
        time.sleep(2)
    raise AssertionError(f"the job of rule {rule} did not finish in {timeout} s: {run}")


def test_a_dataset_update_starts_one_training_job_however_often_the_event_arrives(ray_cluster, tmp_path):
    store = AutomationStore()
    store.add_rule(parse_rule({
        "name": "retrain-chats", "on": "dataset.updated", "where": "name == 'trig-chats'", "action": "train",
        "config": "jobs/configs/tiny-gpt-smoke.yaml",
        "set": ["name=tiny-gpt-triggered", "data.dataset={name}@{version}", *QUICK]}))
    ghost = ROOT / "jobs" / "configs" / "test-ghost-recipe.yaml"
    ghost.write_text((ROOT / "jobs" / "configs" / "tiny-gpt-smoke.yaml").read_text())
    try:
        store.add_rule(parse_rule({"name": "ghost-recipe", "on": "dataset.updated", "where": "name == 'trig-chats'",
                                   "action": "train", "config": "jobs/configs/test-ghost-recipe.yaml"}))
    finally:
        ghost.unlink()  # deleted after the rule was added
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("\n".join(json.dumps(
        {"text": f"Customer {i} asks how to reset the password of account {i % 7}; the agent sends link {i}."})
        for i in range(900)))
    version, _ = DatasetStore().register("trig-chats", str(folder))
    DatasetStore().register("other-chats", str(folder))  # matches no rule
    bus = open_bus()  # a publisher that sends one change twice (at-least-once publishing)
    [event] = [e for e in bus.replay(count=100_000) if e.type == "dataset.updated" and e.data.name == "trig-chats"]
    bus.publish("dataset.updated", event.data, source="replayed")
    bus.close()

    run_engine(ray_cluster.dashboard_url, once=True)
    [run] = store.runs("retrain-chats")
    assert run.job_id.startswith("mass-trigger-retrain-chats-") and run.event_type == "dataset.updated"
    assert run.event_offset == event.offset and "--set data.dataset=trig-chats@1" in run.detail
    [failed] = store.runs("ghost-recipe")
    assert failed.status == "failed" and "test-ghost-recipe.yaml' is not a file under" in failed.detail
    assert [r.rule.name for r in store.rules()] == ["ghost-recipe", "retrain-chats"]  # the rule is kept

    engine = TriggerEngine(ray_cluster.dashboard_url)
    assert engine.handle(event) == []  # a replay of the handled event: nothing new
    done = _wait(engine, "retrain-chats")
    assert done.status == "succeeded", done.detail
    info = ModelRegistry().resolve("tiny-gpt-triggered")
    assert info.ref == "tiny-gpt-triggered/1" and info.lineage["datasets"] == version.ref
    tags = ModelRegistry().client.get_run(info.run_id).data.tags
    assert tags["mass.trigger.rule"] == "retrain-chats"
    assert tags["mass.trigger.event"] == f"dataset.updated@{event.offset}"
    assert len(store.runs("retrain-chats")) == 1
