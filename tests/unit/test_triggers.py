"""Trigger rules without Ray: parsing and checking against the event schemas, conditions, overrides filled from
events, the dedupe key, the run table's claim (a duplicate claims nothing), the rules' CLI and every bad input.
The engine submitting real jobs is tested on the session cluster (tests/integration/test_triggers.py)."""

from __future__ import annotations

import json

import pytest

from mass.automation.rules import Condition, dedupe_key, load_rules, parse_rule
from mass.automation.store import AutomationStore, RuleNotFound
from mass.cli.main import main
from mass.errors import ConfigError, Conflict
from mass.events.schemas import make_event

SMOKE = "jobs/configs/tiny-gpt-smoke.yaml"


def _dataset(name="docs", version="3", rows=12):
    return make_event("dataset.updated", {"name": name, "version": version, "path": "/d", "rows": rows,
                                          "content_hash": "ab"}, "test")


def _rule(**over):
    return parse_rule({"name": "retrain", "on": "dataset.updated", "where": "name == 'docs'", "action": "train",
                       "config": SMOKE, "set": ["data.dataset={name}@{version}"], **over})


@pytest.mark.parametrize("where, payload, expected", [
    ("name == 'docs'", {"name": "docs"}, True),
    ("name == 'docs' and rows >= 10", {"name": "docs", "rows": 9}, False),
    ("name in ['a', 'docs'] or rows > 100", {"name": "docs", "rows": 1}, True),
    ("not name != 'docs'", {"name": "docs"}, True),
    ("metrics.val_loss > 3.0", {"metrics": {"val_loss": 3.5}}, True),
    ("metrics.val_loss > 3.0", {"metrics": {}}, False),             # a missing field: no match, no error
    ("metrics.val_loss > 3.0", {"metrics": {"val_loss": "high"}}, False),  # incomparable: no match
    ("version == None", {"version": None}, True),
    ("1 < rows <= 5", {"rows": 5}, True),
])
def test_conditions(where, payload, expected):
    event_type = "training.completed" if "metrics" in where else "dataset.updated"
    if "version" in where:
        event_type = "training.completed"
    assert Condition(where, event_type).matches(payload) is expected


def test_a_rule_matches_its_events_and_fills_its_overrides_from_them():
    rule = _rule()
    assert rule.matches(_dataset()) and not rule.matches(_dataset(name="other"))
    assert rule.overrides(_dataset()) == ["data.dataset=docs@3"]
    assert not _rule(enabled=False).matches(_dataset())
    tuned = parse_rule({"name": "tune-bad", "on": "training.completed", "where": "metrics.val_loss > 3",
                        "action": "tune", "config": "jobs/configs/tiny-gpt-tune.yaml",
                        "set": ["recipe={model}", "loss={metrics.val_loss}"]})
    event = make_event("training.completed", {"run_id": "r1", "model": "m", "metrics": {"val_loss": 3.5}}, "t")
    assert tuned.matches(event) and tuned.overrides(event) == ["recipe=m", "loss=3.5"]


def test_the_dedupe_key_is_the_events_meaning_not_its_offset_or_time():
    first, again = _dataset(), _dataset()
    assert dedupe_key(first) == dedupe_key(again.model_copy(update={"offset": "99"}))
    assert dedupe_key(first) != dedupe_key(_dataset(version="4"))


@pytest.mark.parametrize("over, field, needle", [
    ({"on": "data.updated"}, "on", "unknown event type 'data.updated'; known: compression.completed"),
    ({"where": "nam == 'docs'"}, "where", "dataset.updated events have no field 'nam'; fields: content_hash"),
    ({"where": "name = 'docs'"}, "where", "does not parse"),
    ({"where": "len(name) > 1"}, "where", r"'len\(name\)' is neither a field nor a literal"),
    ({"where": "name"}, "where", "'name' is not a comparison"),
    ({"action": "deploy"}, "action", "unknown action 'deploy'; use one of train, tune, compress"),
    ({"set": ["data.dataset={nme}"]}, "set", "dataset.updated events have no field 'nme'"),
    ({"set": ["no-equals"]}, "set", "is not KEY=VALUE"),
    ({"name": "bad name"}, "name", "name: illegal name 'bad name'"),
    ({"cron": "0 3 * * *"}, "cron", "cron: Extra inputs are not permitted"),
])
def test_bad_rules_are_refused_naming_the_field(over, field, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        _rule(**over)
    assert info.value.details["field"] == field


def test_rules_load_from_yaml_with_a_bare_on_key(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(f"rules:\n  - name: retrain\n    on: dataset.updated\n    where: name == 'docs'\n"
                    f"    action: train\n    config: {SMOKE}\n    set: ['data.dataset={{name}}@{{version}}']\n")
    [rule] = load_rules(path)
    assert rule.on == "dataset.updated" and rule.set == ["data.dataset={name}@{version}"]
    path.write_text("rules: []\n")
    with pytest.raises(ConfigError, match="expected a list of rules"):
        load_rules(path)
    path.write_text("- name: x\n  on: nope.event\n  action: train\n  config: c\n")
    with pytest.raises(ConfigError, match="rules.yaml: rule 1: on: unknown event type 'nope.event'"):
        load_rules(path)


def test_a_claimed_event_cannot_be_claimed_again(mass_home):
    store = AutomationStore()
    event = _dataset()
    run = store.claim("trigger", "retrain", dedupe_key(event), "train", event)
    assert run.status == "submitting" and run.event == event.data.model_dump(mode="json")
    assert store.claim("trigger", "retrain", dedupe_key(event), "train", event) is None  # the duplicate
    assert store.claim("trigger", "other-rule", dedupe_key(event), "train", event) is not None  # its own run
    store.update(run.id, status="failed", detail="why")
    [done] = store.runs("retrain")
    assert done.status == "failed" and done.finished_at is not None
    assert [r.name for r in store.runs(unfinished=True)] == ["other-rule"]
    store.forget(run.id)
    assert store.claim("trigger", "retrain", dedupe_key(event), "train", event) is not None  # forgotten: again


def test_rules_are_stored_once_by_name(mass_home):
    store = AutomationStore()
    store.add_rule(_rule())
    with pytest.raises(Conflict, match="a trigger rule named 'retrain' exists"):
        store.add_rule(_rule())
    replaced = store.add_rule(_rule(where="name == 'other'"), replace=True)
    assert [r.rule.where for r in store.rules()] == ["name == 'other'"] and replaced.created_at
    store.remove_rule("retrain")
    with pytest.raises(RuleNotFound, match="no trigger rule named 'retrain'"):
        store.remove_rule("retrain")


def test_mass_triggers_commands(mass_home, tmp_path, capsys):
    assert main(["triggers", "add", "--name", "retrain", "--on", "dataset.updated", "--where", "name == 'docs'",
                 "--job", "train", "--config", SMOKE, "--set", "data.dataset={name}@{version}"]) == 0
    assert "added rule retrain: on dataset.updated where name == 'docs' -> train" in capsys.readouterr().out
    assert main(["-o", "json", "triggers", "list"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["name"] == "retrain" and listed["set"] == ["data.dataset={name}@{version}"]
    assert main(["triggers", "add", "--name", "ghost", "--on", "dataset.updated", "--job", "train",
                 "--config", "jobs/configs/deleted.yaml"]) == 2
    assert "config 'jobs/configs/deleted.yaml' is not a file under" in capsys.readouterr().err
    assert main(["triggers", "add", "--name", "typo", "--on", "dataset.update", "--job", "train", "--config",
                 SMOKE]) == 2
    assert "unknown event type 'dataset.update'" in capsys.readouterr().err
    assert main(["triggers", "runs"]) == 0 and "no triggered runs" in capsys.readouterr().out
    assert main(["triggers", "remove", "retrain"]) == 0
    assert main(["triggers", "remove", "retrain"]) == 3
    assert "no trigger rule named 'retrain'" in capsys.readouterr().err


@pytest.fixture(params=["sqlite", "redis"])
def event_bus(request, tmp_path):
    """The embedded log and Redis Streams (a key prefix of this test's own on the machine's Redis)."""
    import uuid

    from mass.events.redis_streams import RedisBus
    from mass.events.sqlite_log import SqliteBus

    bus = (SqliteBus(str(tmp_path / "events.db")) if request.param == "sqlite" else
           RedisBus("redis://127.0.0.1:6379/0", prefix=f"test:triggers:{uuid.uuid4().hex[:8]}"))
    yield bus
    if request.param == "redis":
        bus._redis.delete(bus.log_key, bus.dead_key)
    bus.close()


def test_the_engine_starts_one_job_per_rule_and_event_on_either_bus(mass_home, event_bus):
    """Published twice, delivered again, handled by a second engine: one job. A job server that refuses leaves the
    event to be tried again, and nothing recorded."""
    from mass.automation.triggers import TriggerEngine, run_engine
    from mass.errors import MassError
    from tests.unit.jobserver import JobServer

    store = AutomationStore()
    store.add_rule(_rule(set=["data.dataset={name}@{version}", "optim.epochs=1"]))
    server = JobServer()
    engine = TriggerEngine("http://job-server")
    engine._client = server  # (the stand-in for Ray's job server)
    first = event_bus.publish("dataset.updated", _dataset().data)
    event_bus.publish("dataset.updated", _dataset().data, source="again")  # the same change, published twice
    event_bus.publish("dataset.updated", _dataset(name="other").data)       # no rule matches
    run_engine("http://job-server", once=True, bus=event_bus, engine=engine)
    assert list(server.jobs) == [f"mass-trigger-retrain-{dedupe_key(first)[:12]}"]
    [run] = store.runs("retrain")
    assert run.status == "running" and run.event_offset == first.offset  # (followed: RUNNING at the server)
    assert "--set data.dataset=docs@3 --set optim.epochs=1" in server.jobs[run.job_id]["entrypoint"]
    assert engine.handle(first) == []  # a redelivery
    other = TriggerEngine("http://job-server")
    other._client = server
    assert other.handle(first) == [] and len(server.jobs) == 1  # a second engine

    class Refusing(JobServer):
        def submit_job(self, **kwargs):
            raise ConnectionError("Failed to connect to Ray job server")

    engine._client = Refusing()
    later = event_bus.publish("dataset.updated", _dataset(version="4").data)
    with pytest.raises(MassError, match="refused job .*Failed to connect.*"):
        engine.handle(later)
    assert len(store.runs("retrain")) == 1  # nothing recorded: the event is tried again
    engine._client = server
    [again] = engine.handle(later)
    assert again.status == "submitted" and len(server.jobs) == 2
    server.jobs[again.job_id]["status"] = "FAILED"
    assert engine.follow() == 1 and store.runs("retrain")[0].status == "failed"
    assert store.runs("retrain")[0].detail.endswith(": exit 1")
