"""Schedules without Ray: cron parsing, what a tick decides at a given time (due, not yet due, a run still going
-> skipped, downtime -> caught up once or not at all, a slot never run twice even by a second scheduler), a
deleted recipe, pause/resume, the CLI. The Ray job server is stood in for by a recorder of submissions (a
third-party service, not our code); tests/integration/test_automation.py submits to the real one."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from mass.automation.schedules import ScheduleStore, Scheduler, parse_schedule
from mass.automation.store import AutomationStore
from mass.cli.main import main
from mass.cli.submit import project_root
from mass.errors import ConfigError, Conflict
from tests.unit.jobserver import JobServer

SMOKE = "jobs/configs/tiny-gpt-smoke.yaml"
T0 = datetime(2026, 11, 28, 0, 0, tzinfo=timezone.utc)


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, second, tzinfo=timezone.utc)


@pytest.fixture
def nightly(mass_home, monkeypatch):
    """A 03:00 schedule added at T0, a scheduler with a recording job server."""
    store = ScheduleStore()
    spec = parse_schedule({"name": "nightly", "cron": "0 3 * * *", "config": SMOKE, "set": ["optim.epochs=1"]})
    store.add(spec)
    store._update("nightly", created_at=T0)  # as if added at midnight
    server = JobServer()
    return Scheduler(server), server


@pytest.mark.parametrize("data, field, needle", [
    ({"cron": "0 3 * *"}, "cron", "cron '0 3 \\* \\*' does not parse: give five fields"),
    ({"cron": "61 * * * *"}, "cron", "does not parse"),
    ({"cron": "0 3 * * * * * *"}, "cron", "does not parse"),
    ({"action": "deploy"}, "action", "unknown action 'deploy'"),
    ({"catch_up": "all"}, "catch_up", "Input should be 'once' or 'none'"),
    ({"name": "bad name"}, "name", "name: illegal name"),
    ({"set": ["epochs"]}, "set", "set 'epochs' is not KEY=VALUE"),
])
def test_bad_schedules_are_refused_naming_the_field(data, field, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        parse_schedule({"name": "nightly", "cron": "0 3 * * *", "config": SMOKE, **data})
    assert info.value.details["field"] == field


def test_a_slot_starts_its_job_once(nightly):
    scheduler, server = nightly
    assert scheduler.tick(at(28, 2, 59)) == [] and not server.jobs  # not yet due
    [run] = scheduler.tick(at(28, 3, 0, 20))
    assert run.status == "submitted" and run.job_id == "mass-schedule-nightly-20261128T030000"
    job = server.jobs[run.job_id]
    assert "jobs/train.py --config jobs/configs/tiny-gpt-smoke.yaml --set optim.epochs=1" in job["entrypoint"]
    assert json.loads(job["env"]["MASS_RUN_TAGS"]) == {"mass.schedule": "nightly",
                                                       "mass.schedule.slot": "2026-11-28T03:00:00+00:00"}
    assert scheduler.tick(at(28, 3, 1)) == []  # the same slot: nothing more
    assert ScheduleStore().get("nightly").last_slot == at(28, 3)


def test_a_run_still_going_makes_the_next_slot_skip_and_a_finished_one_does_not(nightly):
    scheduler, server = nightly
    [first] = scheduler.tick(at(28, 3))
    [skipped] = scheduler.tick(at(29, 3))  # the first job still RUNNING
    assert skipped.status == "skipped" and first.job_id in skipped.detail and "is still going" in skipped.detail
    assert len(server.jobs) == 1
    server.jobs[first.job_id]["status"] = "SUCCEEDED"
    [third] = scheduler.tick(at(30, 3))
    assert third.status == "submitted" and len(server.jobs) == 2
    assert [r.status for r in AutomationStore().runs("nightly")] == ["submitted", "skipped", "succeeded"]


def test_after_downtime_catch_up_once_runs_the_latest_missed_slot_once(nightly):
    scheduler, server = nightly
    scheduler.tick(at(28, 3))
    server.jobs["mass-schedule-nightly-20261128T030000"]["status"] = "SUCCEEDED"
    recorded = scheduler.tick(at(2, 4) + timedelta(days=30))  # down from the 28th to Dec 2 04:00: 4 slots passed
    assert [(r.status, r.job_id) for r in recorded] == [("skipped", None),
                                                        ("submitted", "mass-schedule-nightly-20261202T030000")]
    assert recorded[0].detail.startswith("3 slot(s) up to 2026-12-02T03:00:00+00:00 passed while no scheduler ran; "
                                         "the latest runs (catch_up: once)")
    assert len(server.jobs) == 2


def test_after_downtime_catch_up_none_waits_for_the_next_slot(mass_home):
    store = ScheduleStore()
    store.add(parse_schedule({"name": "hourly", "cron": "0 * * * *", "config": SMOKE, "catch_up": "none"}))
    store._update("hourly", created_at=T0)
    server = JobServer()
    scheduler = Scheduler(server)
    [missed] = scheduler.tick(at(28, 5, 30))  # five slots passed, the latest 30 minutes ago: none is run
    assert missed.status == "skipped" and missed.detail.startswith("5 slot(s)") and "none runs" in missed.detail
    assert not server.jobs
    [run] = scheduler.tick(at(28, 6, 0, 10))  # on time again
    assert run.status == "submitted" and list(server.jobs) == ["mass-schedule-hourly-20261128T060000"]


def test_a_second_scheduler_or_a_restarted_one_never_runs_a_slot_twice(nightly):
    scheduler, server = nightly
    scheduler.tick(at(28, 3))
    ScheduleStore().mark("nightly", at(27, 3))  # as if the first one died before it recorded the slot
    other = Scheduler(server)
    assert other.tick(at(28, 3, 0, 30)) == [] and len(server.jobs) == 1


def test_a_deleted_recipe_fails_the_run_with_the_reason_and_keeps_the_schedule(mass_home):
    recipe = project_root() / "jobs" / "configs" / "test-deleted-recipe.yaml"
    recipe.write_text((project_root() / SMOKE).read_text())
    store = ScheduleStore()
    store.add(parse_schedule({"name": "doomed", "cron": "*/5 * * * *", "config": str(recipe.relative_to(
        project_root()))}))
    store._update("doomed", created_at=T0)
    recipe.unlink()
    server = JobServer()
    [run] = Scheduler(server).tick(at(28, 0, 5))
    assert run.status == "failed" and "test-deleted-recipe.yaml' is not a file under" in run.detail
    assert not server.jobs and store.get("doomed").spec.name == "doomed"


def test_pause_and_resume(nightly):
    scheduler, server = nightly
    ScheduleStore().set_paused("nightly", True)
    assert scheduler.tick(at(28, 3)) == [] and not server.jobs
    ScheduleStore().set_paused("nightly", False)  # resumed now (2026): the slots of the pause are not run
    assert ScheduleStore().get("nightly").last_slot > at(28, 3)


def test_mass_schedule_commands(mass_home, capsys):
    assert main(["schedule", "add", "--name", "nightly", "--cron", "0 3 * * *", "--job", "train", "--config", SMOKE,
                 "--set", "optim.epochs=1"]) == 0
    assert "added schedule nightly: train jobs/configs/tiny-gpt-smoke.yaml at '0 3 * * *' (UTC), next " in \
        capsys.readouterr().out
    assert main(["-o", "json", "schedule", "list"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["next_slot"].endswith("T03:00:00+00:00") and listed["catch_up"] == "once"
    assert main(["schedule", "pause", "nightly"]) == 0 and "paused" in capsys.readouterr().out
    assert main(["schedule", "show", "nightly"]) == 0 and "no runs yet" in capsys.readouterr().out
    assert main(["schedule", "resume", "nightly"]) == 0
    assert main(["schedule", "add", "--name", "bad", "--cron", "0 3 * *", "--config", SMOKE]) == 2
    assert "does not parse: give five fields" in capsys.readouterr().err
    assert main(["schedule", "add", "--name", "ghost", "--cron", "0 3 * * *", "--config", "jobs/nope.yaml"]) == 2
    assert "config 'jobs/nope.yaml' is not a file under" in capsys.readouterr().err
    with pytest.raises(Conflict):
        ScheduleStore().add(parse_schedule({"name": "nightly", "cron": "0 3 * * *", "config": SMOKE}))
    assert main(["schedule", "remove", "nightly"]) == 0
    assert main(["schedule", "show", "nightly"]) == 3
    assert "no schedule named 'nightly'" in capsys.readouterr().err
