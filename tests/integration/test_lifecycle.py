"""Lifecycle operations on the real embedded registry (MLflow) and platform database: publish, canary, promote,
rollback, offline, online — checked, recorded, announced, and safe with two operators at once."""

from __future__ import annotations

import json
import threading

import pytest

from mass.cli.main import main
from mass.errors import Conflict, InvalidRequest, ModelNotFound
from mass.events import open_bus
from mass.lifecycle import Lifecycle
from mass.registry import ModelRegistry


@pytest.fixture
def life(mass_home, tiny_dir):
    """Model ``lc`` with three READY versions and no aliases, in a fresh MASS_HOME."""
    registry = ModelRegistry()
    for _ in range(3):
        registry.register(tiny_dir, "lc", "text-generation")
    return Lifecycle(registry)


def test_publish_canary_promote_rollback_offline_online(life):
    with pytest.raises(InvalidRequest, match="no production version"):
        life.canary("lc", 2, "alice", weight=20)
    assert life.publish("lc", 1, "alice", "first release").weights() == {"1": 100}
    plan = life.canary("lc", 2, "bob", weight=20, reason="try v2")
    assert plan.weights() == {"1": 80, "2": 20} and plan.canary_since
    plan = life.promote("lc", "bob", "v2 looks good")
    assert (plan.production, plan.canary, plan.history) == (2, None, (1,))
    plan = life.canary("lc", 3, "carol", plan="10:1m,50:30s,100")
    assert plan.weights() == {"2": 90, "3": 10} and [(s.weight, s.bake_s) for s in plan.plan] == \
        [(10, 60), (50, 30), (100, 0)]
    plan = life.rollback("lc", "carol", "p95 latency")  # with a canary: ends it, production stays
    assert (plan.production, plan.canary) == (2, None) and "canary" not in life.registry.get_model("lc").aliases
    plan = life.rollback("lc", "dave", "bad release")  # without: back to the previous production version
    assert (plan.production, plan.history) == (1, ())
    with pytest.raises(InvalidRequest, match="no earlier production version"):
        life.rollback("lc", "dave")
    plan = life.offline("lc", "erin", "incident 42")
    assert plan.weights() == {} and plan.offline["reason"] == "incident 42" and plan.offline["actor"] == "erin"
    with pytest.raises(InvalidRequest, match="already offline"):
        life.offline("lc", "erin")
    assert life.online("lc", "erin").weights() == {"1": 100}

    log = list(reversed(life.history("lc")))
    assert [(o["action"], o["version"], o["actor"]) for o in log] == [
        ("publish", "1", "alice"), ("canary", "2", "bob"), ("promote", "2", "bob"), ("canary", "3", "carol"),
        ("rollback", "3", "carol"), ("rollback", "1", "dave"), ("offline", None, "erin"), ("online", None, "erin")]
    assert log[0]["reason"] == "first release" and log[4]["detail"] == {"ended_canary": 3, "production": 2}
    assert life.generation("lc") == 8

    bus = open_bus()
    events = [e for e in bus.replay(count=10_000) if e.data.model == "lc" and e.source == "lifecycle"]
    bus.close()
    assert [e.type for e in events if e.type != "model.traffic.changed"] == [
        "rollout.started", "rollout.promoted", "rollout.started", "rollout.rolled_back", "model.offline",
        "model.online"]
    assert [e.data.weights for e in events if e.type == "model.traffic.changed"] == [
        {"1": 100}, {"1": 80, "2": 20}, {"2": 100}, {"2": 90, "3": 10}, {"2": 100}, {"1": 100}, {}, {"1": 100}]


@pytest.mark.parametrize("call, error, needle", [
    (lambda lf: lf.canary("lc", 2, "x", weight=0), InvalidRequest, "1 to 99"),
    (lambda lf: lf.canary("lc", 2, "x", weight=150), InvalidRequest, "1 to 99"),
    (lambda lf: lf.canary("lc", 2, "x", plan="50:1m,10:1m,100"), InvalidRequest, "must rise"),
    (lambda lf: lf.canary("lc", 2, "x", plan="10:5y,100"), InvalidRequest, "bake time"),
    (lambda lf: lf.canary("lc", 1, "x", weight=10), InvalidRequest, "production already"),
    (lambda lf: lf.publish("lc", 9, "x"), ModelNotFound, "no version 9; versions: 1, 2, 3"),
    (lambda lf: lf.publish("ghost", 1, "x"), ModelNotFound, "no registered model 'ghost'"),
    (lambda lf: lf.promote("lc", "x"), InvalidRequest, "no canary to promote"),
    (lambda lf: lf.online("lc", "x"), InvalidRequest, "not offline"),
    (lambda lf: lf.publish("lc", 1, "x"), InvalidRequest, "already production"),
])
def test_bad_operations_are_refused_and_leave_everything_as_it_was(life, call, error, needle):
    life.publish("lc", 1, "setup")
    before, generation = life.state("lc"), life.generation("lc")
    with pytest.raises(error, match=needle):
        call(life)
    assert life.state("lc") == before and life.generation("lc") == generation == 1


def test_an_operation_on_a_stale_view_is_a_conflict_and_two_at_once_leave_one_winner(life):
    life.publish("lc", 1, "setup")
    seen = life.generation("lc")
    life.publish("lc", 2, "alice", expect=seen)
    with pytest.raises(Conflict, match=r"changed by another operation since generation 1 .*publish by alice"):
        life.publish("lc", 3, "bob", expect=seen)
    assert life.state("lc").production == 2

    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def operator(name: str, version: int) -> None:
        own = Lifecycle(ModelRegistry())
        barrier.wait()
        try:
            outcomes[name] = own.canary("lc", version, name, weight=10 + version)
        except Conflict as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=operator, args=(n, v)) for n, v in (("carol", 1), ("dave", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for n, o in outcomes.items() if not isinstance(o, Exception)]
    assert won and all(isinstance(o, Conflict) for n, o in outcomes.items() if n not in won)
    last = life.history("lc", limit=1)[0]  # what the log says last is what the registry serves
    state = life.state("lc")
    assert last["actor"] in won and last["version"] == str(state.canary)
    assert state.weights() == {"2": 100 - state.canary_weight, str(state.canary): state.canary_weight}


def test_cli_status_and_operations(life, capsys):
    assert main(["models", "publish", "lc", "1", "--why", "launch"]) == 0
    assert "lc: publish done; traffic: v1 100%" in capsys.readouterr().out
    assert main(["models", "canary", "lc", "2", "--weight", "150"]) == 2
    assert "1 to 99" in capsys.readouterr().err
    assert main(["models", "canary", "lc", "2", "--plan", "25:10s,100"]) == 0
    assert "v1 75%, v2 25%" in capsys.readouterr().out
    assert main(["models", "status", "lc"]) == 0
    out = capsys.readouterr().out
    assert "production v1, traffic v1 75%, v2 25%" in out and "25% for 10s" in out and "launch" in out
    assert main(["models", "offline", "lc", "--why", "maintenance"]) == 0
    assert "(offline)" in capsys.readouterr().out
    assert main(["-o", "json", "models", "status", "lc"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["offline"]["reason"] == "maintenance" and shown["generation"] == 3
    assert [o["action"] for o in shown["operations"]] == ["offline", "canary", "publish"]
    assert shown["operations"][0]["actor"].startswith("cli")


def test_admin_api_and_sdk_on_the_served_gateway(gateway, tiny_dir):
    """The same operations over HTTP (the gateway's /admin/models, admin keys only), through the SDK."""
    from mass import Client
    from mass.access.keys import KeyStore
    from tests.integration.support import api_key

    registry = ModelRegistry()  # the session's registry, which the gateway replicas read too
    for _ in range(2):
        registry.register(tiny_dir, "lc-http", "text-generation")
    admin = Client(base_url=gateway, via="http", api_key=api_key())
    assert admin.publish("lc-http", 1, reason="launch")["weights"] == {"1": 100}
    shown = admin.model_status("lc-http")
    assert shown["production"] == 1 and shown["operations"][0]["actor"] == "key:integration"
    assert admin.canary("lc-http", 2, weight=30)["weights"] == {"1": 70, "2": 30}
    with pytest.raises(Conflict, match="since generation 1"):
        admin.promote("lc-http", expect=shown["generation"])  # acting on the view from before the canary
    with pytest.raises(InvalidRequest, match="1 to 99"):
        admin.canary("lc-http", 2, weight=150)
    with pytest.raises(ModelNotFound, match="no registered model 'ghost'"):
        admin.model_status("ghost")
    assert admin.promote("lc-http", expect=shown["generation"] + 1)["production"] == 2
    assert admin.offline("lc-http", reason="incident")["weights"] == {}
    _, secret = KeyStore().create({"name": "lc-user"})
    with pytest.raises(Exception, match="not an admin key"):
        Client(base_url=gateway, via="http", api_key=secret).online("lc-http")
    assert admin.online("lc-http")["weights"] == {"2": 100}
    assert [o["action"] for o in admin.model_status("lc-http")["operations"]] == [
        "online", "offline", "promote", "canary", "publish"]


def test_mass_status_shows_the_gateways_models_and_breakers(gateway, capsys):
    assert main(["status", "--url", gateway]) == 0
    out = capsys.readouterr().out
    assert "tiny-gpt" in out and "minilm" in out and "closed" in out and "failed/window" in out
    assert main(["-o", "json", "status", "--url", gateway]) == 0
    services = json.loads(capsys.readouterr().out)
    assert services["tiny-gpt"]["engine"] == "llm" and services["tiny-gpt"]["breaker"]["state"] == "closed"


def test_a_lifecycle_tag_broken_by_hand_is_refused_with_the_way_out(life):
    """Someone edits ``mass.production_history`` in the MLflow UI: reading the state names the model, the tag and
    how to recover, instead of a bare JSON error; every operation refuses until the tag is mended."""
    from mass.errors import RegistryError
    from mass.lifecycle.operations import TAG_HISTORY

    life.publish("lc", 1, "setup")
    life.publish("lc", 2, "setup")
    life.registry.set_model_tags("lc", {TAG_HISTORY: "v1, v2"})
    with pytest.raises(RegistryError, match=r"model 'lc'.*mass.production_history.*v1, v2.*delete_registered_mod"):
        life.state("lc")
    with pytest.raises(RegistryError, match="do not parse"):
        life.rollback("lc", "alice")
    life.registry.set_model_tags("lc", {TAG_HISTORY: "[1]"})
    assert life.rollback("lc", "alice", "mended").production == 1
