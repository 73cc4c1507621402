"""Event-driven and scheduled training on the session cluster, through the automation service (a detached Ray
actor): registering a dataset version publishes dataset.updated on the real bus and the service starts one Ray
job that trains on exactly that version (a duplicate of the event, and a second engine, start nothing); a
schedule's slot starts one job, and after the actor is killed and restarted by Ray the slot is not run again;
recipes deleted after a rule or schedule was added record failed runs; every job's MLflow run names what
started it."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
import ray

from mass.automation.rules import parse_rule
from mass.automation.schedules import ScheduleStore, parse_schedule
from mass.automation.service import service, start_service, stop_service
from mass.automation.store import AutomationStore
from mass.automation.triggers import run_engine
from mass.data.datasets import DatasetStore
from mass.events import open_bus
from mass.registry import ModelRegistry
from tests.integration.support import ROOT, wait_for

QUICK = ["optim.epochs=1", "data.max_train_tokens=20000", "registration.aliases=[]", "scaling.num_workers=1",
         "optim.batch_size=8"]
SMOKE = "jobs/configs/tiny-gpt-smoke.yaml"
# The daily schedules' hour: 12 hours from when the suite starts, so exactly one slot lies between a schedule's
# creation and the slot the test ticks at, whatever the time of day (with a fixed 03:00 and the slot taken as
# tomorrow's, a run between 00:00 and 03:00 UTC also passed today's: a missed slot was recorded beside it)
HOUR = (datetime.now(timezone.utc).hour + 12) % 24


@pytest.fixture(scope="module")
def automation(ray_cluster, corpus):
    """The automation service on the session cluster, ticking every second."""
    status = start_service(ray_cluster.dashboard_url, ray_cluster.gcs_address, tick_s=1.0)
    yield status
    stop_service(ray_cluster.gcs_address)


def _ghost(name: str) -> str:
    """A recipe that exists now (so a rule or schedule naming it is accepted) and is deleted by the caller."""
    path = ROOT / "jobs" / "configs" / f"test-{name}.yaml"
    path.write_text((ROOT / SMOKE).read_text())
    return str(path.relative_to(ROOT))


def test_a_dataset_update_starts_one_training_job_however_often_the_event_arrives(automation, ray_cluster,
                                                                                   tmp_path):
    store = AutomationStore()
    store.add_rule(parse_rule({"name": "retrain-chats", "on": "dataset.updated", "where": "name == 'trig-chats'",
                               "action": "train", "config": SMOKE,
                               "set": ["name=tiny-gpt-triggered", "data.dataset={name}@{version}", *QUICK]}))
    ghost = _ghost("ghost-rule")
    store.add_rule(parse_rule({"name": "ghost-recipe", "on": "dataset.updated", "where": "name == 'trig-chats'",
                               "action": "train", "config": ghost}))
    (ROOT / ghost).unlink()  # deleted after the rule was added
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

    [run] = wait_for(lambda: [r for r in store.runs("retrain-chats") if r.job_id], 60, "the service started the job",
                     interval=1)
    assert run.job_id.startswith("mass-trigger-retrain-chats-") and run.event_type == "dataset.updated"
    assert run.event_offset == event.offset and "--set data.dataset=trig-chats@1" in run.detail
    [failed] = wait_for(lambda: store.runs("ghost-recipe"), 30, "the ghost rule recorded its run", interval=1)
    assert failed.status == "failed" and "test-ghost-rule.yaml' is not a file under" in failed.detail
    assert [r.rule.name for r in store.rules()] == ["ghost-recipe", "retrain-chats"]  # the rule is kept
    time.sleep(3)  # the service has seen the duplicate by now
    run_engine(ray_cluster.dashboard_url, once=True)  # a second engine over the same log: nothing new
    assert len(store.runs("retrain-chats")) == 1 and version.ref == "trig-chats@1"


def test_a_slot_runs_once_even_after_the_service_is_killed_and_restarted(automation, ray_cluster):
    ScheduleStore().add(parse_schedule({"name": "nightly", "cron": f"0 {HOUR} * * *", "config": SMOKE,
                                        "set": ["name=tiny-gpt-scheduled", *QUICK]}))
    ghost = _ghost("ghost-schedule")
    ScheduleStore().add(parse_schedule({"name": "doomed", "cron": f"0 {HOUR} * * *", "config": ghost}))
    (ROOT / ghost).unlink()
    now = datetime.now(timezone.utc)
    slot = now.replace(hour=HOUR, minute=0, second=0, microsecond=0)
    slot += timedelta(days=1) if slot <= now else timedelta(0)  # the next one: 11 to 12 hours away
    handle = service(ray_cluster.gcs_address)
    recorded = ray.get(handle.tick.remote((slot + timedelta(seconds=5)).isoformat()), timeout=120)
    by_name = {r["name"]: r for r in recorded}
    assert by_name["nightly"]["status"] == "submitted"
    assert by_name["nightly"]["job_id"] == f"mass-schedule-nightly-{slot:%Y%m%dT%H%M%S}"
    assert by_name["doomed"]["status"] == "failed" and "is not a file under" in by_name["doomed"]["detail"]

    pid = automation["pid"]
    ray.kill(handle, no_restart=False)  # Ray restarts it: max_restarts=-1
    restarted = wait_for(lambda: (_status(ray_cluster) or {}).get("pid") not in (None, pid), 120,
                         "the service came back in a new process", interval=1)
    assert restarted
    again = ray.get(service(ray_cluster.gcs_address).tick.remote((slot + timedelta(seconds=30)).isoformat()),
                    timeout=120)
    assert again == []  # the slot was handled before the kill: not run twice
    assert {s.spec.name for s in ScheduleStore().list()} == {"nightly", "doomed"}  # nothing lost
    assert len(AutomationStore().runs("nightly")) == 1


def _status(cluster):
    try:
        return ray.get(service(cluster.gcs_address).status.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - still restarting
        return None


def test_the_started_jobs_train_and_their_runs_name_what_started_them(automation):
    store = AutomationStore()

    def finished():
        runs = store.runs("retrain-chats") + store.runs("nightly")
        return runs if all(r.status in ("succeeded", "failed", "stopped") for r in runs) else None

    runs = wait_for(finished, 480, "both jobs finished", interval=1)
    assert [r.status for r in runs] == ["succeeded", "succeeded"], [r.detail for r in runs]
    registry = ModelRegistry()
    triggered = registry.resolve("tiny-gpt-triggered")
    assert triggered.lineage["datasets"] == "trig-chats@1"
    tags = registry.client.get_run(triggered.run_id).data.tags
    assert tags["mass.trigger.rule"] == "retrain-chats" and tags["mass.trigger.event"].startswith("dataset.updated@")
    scheduled = registry.client.get_run(registry.resolve("tiny-gpt-scheduled").run_id).data.tags
    assert scheduled["mass.schedule"] == "nightly"
    assert scheduled["mass.schedule.slot"].endswith(f"T{HOUR:02d}:00:00+00:00")
