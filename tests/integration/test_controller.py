"""The lifecycle controller on a real Serve app: a managed model follows publish, canary, promote, offline,
online and rollback live while a client keeps calling (no request fails); each response names the version that
answered; a version that cannot load is rolled back automatically; the controller survives being killed."""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from mass.cli.main import main
from mass.lifecycle import Lifecycle
from mass.lifecycle.controller import NAMESPACE, controller_name
from mass.registry import ModelRegistry
from mass.sdk import Client
from mass.serving.args import version_app
from tests.integration.support import wait_for

APP, MODEL = "mass-ctl", "ctl-gpt"


@dataclass
class Ctl:
    url: str
    life: Lifecycle
    headers: dict[str, str]

    def ask(self, client: httpx.Client) -> httpx.Response:
        return client.post(f"{self.url}/v1/chat/completions", headers=self.headers, timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})

    def versions(self, n: int) -> Counter:
        with httpx.Client() as client:
            out = Counter()
            for _ in range(n):
                resp = self.ask(client)
                assert resp.status_code == 200, resp.text
                version = resp.headers["x-mass-model-version"]
                assert resp.json()["system_fingerprint"] == f"{MODEL}/v{version}"
                out[version] += 1
            return out


@dataclass
class Caller:
    """A client calling the model in a loop; every answer is recorded."""

    ctl: Ctl
    results: list[tuple[int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client() as client:
            while not self.stop.is_set():
                if self.paused.is_set():
                    time.sleep(0.05)
                    continue
                try:
                    resp = self.ctl.ask(client)
                    self.results.append((resp.status_code, resp.headers.get("x-mass-model-version", resp.text)))
                except httpx.HTTPError as exc:
                    self.results.append((0, repr(exc)))


def rolled_back() -> bool:
    """The controller's rollback is recorded (its registry writes land first, inside the recording transaction:
    waiting on the registry alone could read the log before the row commits)."""
    last = Lifecycle().history(MODEL, limit=1)
    return bool(last) and (last[0]["action"], last[0]["actor"]) == ("rollback", "controller")


@contextmanager
def calling(ctl: Ctl):
    """A ``Caller`` running on a thread of its own while the block runs."""
    caller = Caller(ctl)
    thread = threading.Thread(target=caller.run, daemon=True)
    thread.start()
    try:
        yield caller
    finally:
        caller.stop.set()
        thread.join(60)


def version_apps() -> set[str]:
    from ray import serve

    return {name for name in serve.status().applications if name.startswith(version_app(APP, MODEL, ""))}


@pytest.fixture(scope="module")
def ctl(gateway, tiny_dir, api_key):
    """Model ``ctl-gpt`` (three versions, v1 production) served as a managed model of its own app."""
    from ray import serve

    from mass.app import build_app, wait_ready

    registry = ModelRegistry()
    for _ in range(3):
        registry.register(tiny_dir, MODEL, "text-generation")
    life = Lifecycle(registry)
    life.publish(MODEL, 1, "test", "first release")
    args = {"models": [{"name": MODEL, "ref": f"{MODEL}@production", "engine": "llm", "managed": True,
                        "num_cpus": 0.25, "max_tokens_limit": 8}],
            "gateway": {"num_cpus": 0.25, "ledger": False}, "controller": {"reconcile_s": 2, "drain_s": 2}}
    serve.run(build_app(args), name=APP, route_prefix="/ctl")
    url = f"{gateway}/ctl"
    wait_ready(url, timeout=240)
    yield Ctl(url, life, {"Authorization": f"Bearer {api_key}"})
    serve.delete(APP)
    wait_for(lambda: not version_apps(), 60, "the controller to delete its version apps after the app went")


def test_operations_move_traffic_live_without_a_failed_request(ctl, capsys):
    assert ctl.versions(4) == Counter({"1": 4})
    with calling(ctl) as caller:
        ctl.life.canary(MODEL, 2, "test", weight=50, reason="try v2")
        wait_for(lambda: "2" in ctl.versions(4), 120, "the canary v2 to answer")
        split = ctl.versions(120)
        assert set(split) == {"1", "2"} and 30 <= split["2"] <= 90, split  # 50 % of 120: 60 +- 4 sd
        with httpx.Client() as client:
            services = client.get(f"{ctl.url}/admin/services", headers=ctl.headers).json()
        assert services["data"][MODEL]["versions"] == [{"version": "1", "weight": 50},
                                                          {"version": "2", "weight": 50}], services
        serving = services["data"][MODEL]["serving"]
        assert [(v["version"], v["state"], v["weight"], v["replicas"]) for v in serving["versions"]] == [
            (1, "ready", 50, {"RUNNING": 1}), (2, "ready", 50, {"RUNNING": 1})], serving
        assert serving["desired"]["weights"] == {"1": 50, "2": 50} and serving["versions"][0]["slo"]["requests"] > 0
        assert main(["status", "--url", ctl.url]) == 0
        out = capsys.readouterr().out
        assert "managed versions" in out and f"{APP}--{MODEL}--v2" in out and "1 running" in out, out
        assert main(["models", "status", MODEL, "--url", ctl.url]) == 0
        out = capsys.readouterr().out
        assert "traffic v1 50%, v2 50%" in out and "deployed versions" in out and f"{APP}--{MODEL}--v2" in out, out
        with httpx.Client() as client:
            shown = client.get(f"{ctl.url}/admin/models/{MODEL}", headers=ctl.headers).json()
        assert shown["weights"] == {"1": 50, "2": 50} and len(shown["serving"]["versions"]) == 2
        sdk = Client(app_name=APP)  # in the cluster: Serve handles, the versions picked from the same table
        assert sdk.via == "handle" and isinstance(sdk.chat(MODEL, "hello", max_tokens=2).text, str)

        ctl.life.promote(MODEL, "test", "v2 is good")
        wait_for(lambda: ctl.versions(10) == Counter({"2": 10}), 30, "v2 alone to answer after the promotion")
        wait_for(lambda: version_apps() == {version_app(APP, MODEL, 2)}, 60, "v1 to be drained and deleted")

        caller.paused.set()  # offline answers 404 on purpose
        ctl.life.offline(MODEL, "test", "incident 7")
        with httpx.Client() as client:
            def offline():
                resp = ctl.ask(client)
                return resp if resp.status_code == 404 else None

            resp = wait_for(offline, 30, "the model to answer 404 once offline")
            error = resp.json()["error"]
            assert error["code"] == "model_offline" and "taken offline by test" in error["message"] \
                and "incident 7" in error["message"] and "mass models online" in error["message"]
            assert MODEL not in [m["id"] for m in client.get(f"{ctl.url}/v1/models", headers=ctl.headers).json()["data"]]
            assert client.get(f"{ctl.url}/readyz").status_code == 200  # offline is a state, not unreadiness
        ctl.life.online(MODEL, "test")
        wait_for(lambda: ctl.ask(httpx.Client()).status_code == 200, 60, "the model to answer once online")
        caller.paused.clear()

        ctl.life.rollback(MODEL, "test", "v2 regressed")  # production back to v1, whose app was deleted
        wait_for(lambda: ctl.versions(10) == Counter({"1": 10}), 120, "v1 alone to answer after the rollback")
    import ray

    records = ray.get(ray.get_actor(controller_name(APP), namespace=NAMESPACE).status.remote())["records"]
    assert not [r for r in records if r["action"] == "error"], records  # no reconcile pass failed on the way
    failed = [r for r in caller.results if r[0] != 200]
    assert not failed and len(caller.results) > 50, (failed[:5], len(caller.results))
    assert {v for _, v in caller.results} == {"1", "2"}


def test_a_version_that_cannot_load_is_rolled_back_and_production_keeps_serving(ctl, session_home):
    broken = ModelRegistry().resolve(f"{MODEL}/3").source.split("/")[-1]  # models:/m-<id>
    weights = next(session_home.glob(f"artifacts/**/{broken}/artifacts/model/model.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    production = ctl.life.state(MODEL).production
    with calling(ctl) as caller:
        ctl.life.canary(MODEL, 3, "test", weight=50)
        wait_for(rolled_back, 180, "the controller to roll the broken canary back")
    last = ctl.life.history(MODEL, limit=1)[0]
    assert (last["action"], last["actor"], last["version"]) == ("rollback", "controller", "3")
    assert "version 3 failed to load" in last["reason"]
    assert ctl.life.state(MODEL).production == production
    assert caller.results and all(r == (200, str(production)) for r in caller.results), caller.results[:5]


def test_the_controller_killed_mid_canary_is_restarted_and_finishes_from_the_registry(ctl):
    import ray

    production = ctl.life.state(MODEL).production
    other = 2 if production == 1 else 1
    with calling(ctl) as caller:
        actor = ray.get_actor(controller_name(APP), namespace=NAMESPACE)
        ctl.life.canary(MODEL, other, "test", weight=30)
        ray.kill(actor, no_restart=False)  # Ray restarts it; it rebuilds its state from Serve and the registry
        wait_for(lambda: str(other) in ctl.versions(6), 120, f"the canary v{other} to answer after the restart")
        status = ray.get(ray.get_actor(controller_name(APP), namespace=NAMESPACE).status.remote())
        assert status["models"][MODEL]["traffic"] == {str(production): 70, str(other): 30}
        ctl.life.rollback(MODEL, "test")
        wait_for(lambda: ctl.versions(10) == Counter({str(production): 10}), 60, "production alone again")
    assert caller.results and not [r for r in caller.results if r[0] != 200], caller.results[:5]


def test_a_rollout_plan_advances_after_each_clean_bake_and_promotes(ctl):
    production = ctl.life.state(MODEL).production
    other = 2 if production == 1 else 1
    with calling(ctl) as caller:
        ctl.life.canary(MODEL, other, "test", plan="20:2s,60:2s,100", reason="staged release")
        wait_for(lambda: ctl.life.state(MODEL).production == other, 120, "the plan to reach its last step")
        wait_for(lambda: ctl.versions(10) == Counter({str(other): 10}), 60, f"v{other} alone after the rollout")
    log = [(o["action"], o["actor"], o["detail"].get("weight")) for o in reversed(ctl.life.history(MODEL, 3))]
    assert log == [("canary", "test", 20), ("advance", "controller", 60), ("promote", "controller", None)], log
    assert "baked 2s clean" in ctl.life.history(MODEL, 2)[1]["reason"]
    assert caller.results and not [r for r in caller.results if r[0] != 200], caller.results[:5]
    assert {v for _, v in caller.results} == {str(production), str(other)}


def test_a_canary_that_breaks_its_latency_bound_is_rolled_back_automatically(ctl, tiny_dir, tmp_path):
    """The bad canary is really slower: a 768-wide, 12-layer model registered under the same name, with the same
    tokenizer (well over production's time per request plus the 50 ms margin, also on a fast, idle CPU: an
    8x512 one once stayed under the margin)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from mass.events import open_bus

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=768, n_layer=12, n_head=12)
                    ).save_pretrained(tmp_path / "slow")
    tokenizer.save_pretrained(tmp_path / "slow")
    slow = ModelRegistry().register(tmp_path / "slow", MODEL, "text-generation").version
    production = ctl.life.state(MODEL).production
    bus = open_bus()
    start = bus.last_offset()
    with calling(ctl) as caller:
        ctl.life.canary(MODEL, slow, "test", weight=50)
        wait_for(rolled_back, 180, "the controller to roll the slow canary back")
    last = ctl.life.history(MODEL, limit=1)[0]
    assert (last["action"], last["actor"], last["version"]) == ("rollback", "controller", str(slow))
    assert last["reason"].startswith(f"canary v{slow} broke its SLO: p95 latency"), last["reason"]
    assert ctl.life.state(MODEL).production == production
    events = wait_for(lambda: [e for e in bus.replay(start, count=1000)  # announced once the record commits
                               if e.type == "rollout.rolled_back" and e.data.model == MODEL], 30, "the event")
    bus.close()
    assert events[-1].data.reason == last["reason"]
    assert caller.results and not [r for r in caller.results if r[0] != 200], caller.results[:5]
    assert str(slow) in {v for _, v in caller.results}  # it did get traffic before it was judged


def test_two_operators_racing_through_the_admin_api_leave_one_winner_and_serving_follows_it(ctl):
    """Both read the same generation and send a canary of the same version at different weights at once, with
    ``expect``: one gets 200, the other 409 naming the winner's operation; the gateways route the winner's split."""
    production = ctl.life.state(MODEL).production
    other = 2 if production == 1 else 1
    seen = ctl.life.generation(MODEL)
    barrier, answers = threading.Barrier(2), {}

    def operator(weight: int) -> None:
        with httpx.Client() as client:
            barrier.wait()
            answers[weight] = client.post(f"{ctl.url}/admin/models/{MODEL}/canary", headers=ctl.headers, timeout=30,
                                          json={"version": other, "weight": weight, "expect": seen,
                                                "reason": f"operator at {weight} %"})

    threads = [threading.Thread(target=operator, args=(w,)) for w in (30, 70)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [w for w, r in answers.items() if r.status_code == 200]
    lost = [r for r in answers.values() if r.status_code != 200]
    assert len(won) == 1 and len(lost) == 1, {w: (r.status_code, r.text) for w, r in answers.items()}
    error = lost[0].json()["error"]
    assert lost[0].status_code == 409 and error["code"] == "conflict" and "changed by another operation" in \
        error["message"], error
    weights = {str(production): 100 - won[0], str(other): won[0]}
    assert ctl.life.state(MODEL).weights() == weights

    import ray

    actor = ray.get_actor(controller_name(APP), namespace=NAMESPACE)
    wait_for(lambda: ray.get(actor.status.remote())["models"][MODEL]["traffic"] == weights, 120,
             "the controller to route the winner's split")
    wait_for(lambda: set(ctl.versions(10)) <= {str(production), str(other)}, 30, "the gateway to follow the table")
    answered = ctl.versions(60)
    assert set(answered) == {str(production), str(other)}, answered
    ctl.life.rollback(MODEL, "test", "end the race's canary")
    wait_for(lambda: ctl.versions(10) == Counter({str(production): 10}), 60, "production alone again")


def controller_status() -> dict:
    import ray

    return ray.get(ray.get_actor(controller_name(APP), namespace=NAMESPACE).status.remote())


def test_sdk_handle_calls_count_in_the_versions_slo_windows(ctl):
    """In-cluster handle calls are judged like gateway calls: the SDK sends their outcomes with its next routing
    table read, and the controller counts them for the version that answered."""
    from mass.sdk import TABLE_TTL_S

    production = str(ctl.life.state(MODEL).production)

    def total() -> int:
        versions = controller_status()["models"][MODEL]["versions"]
        return sum(v["slo"]["requests_total"] for v in versions if str(v["version"]) == production)

    def settled() -> tuple[int] | None:  # the previous test's gateway calls all reported
        first = total()
        time.sleep(1.0)
        return (first,) if total() == first else None

    (before,) = wait_for(settled, 30, "the SLO counts to settle")
    sdk = Client(app_name=APP)
    for _ in range(12):
        assert sdk.chat(MODEL, "hello", max_tokens=2).text is not None
    assert "".join(sdk.stream(MODEL, "hello", max_tokens=2)) is not None
    time.sleep(TABLE_TTL_S + 0.2)
    sdk.chat(MODEL, "hello", max_tokens=2)  # reads the table again, sending the 13 calls before it
    wait_for(lambda: total() - before >= 13, 30, "the SDK's calls to reach the controller's window")
    time.sleep(1.0)
    assert total() - before == 13  # each counted once (the last call waits for the next table read)


def test_a_broken_lifecycle_tag_is_recorded_once_and_serving_keeps_its_split(ctl):
    """Someone breaks a lifecycle tag by hand: the controller records one ``error`` naming it (not one per retry),
    keeps routing what it routed, and records ``recovered`` once the tag is mended."""
    from mass.lifecycle.operations import TAG_HISTORY

    production = str(ctl.life.state(MODEL).production)
    kept = ctl.life.registry.model_meta(MODEL)[1].get(TAG_HISTORY, "[]")
    ctl.life.registry.set_model_tags(MODEL, {TAG_HISTORY: "v1, v2"})
    try:
        def errors() -> list[dict]:
            return [r for r in controller_status()["records"] if r["model"] == MODEL and r["action"] == "error"
                    and "mass.production_history" in r["detail"]]

        wait_for(errors, 30, "the controller to record the broken tag")
        time.sleep(3.0)  # a full reconcile pass (2 s) and a dozen retries later: still one record
        assert len(errors()) == 1 and "do not parse" in errors()[0]["detail"], errors()
        assert ctl.versions(10) == Counter({production: 10})
    finally:
        ctl.life.registry.set_model_tags(MODEL, {TAG_HISTORY: kept})
    wait_for(lambda: controller_status()["records"][-1]["action"] == "recovered", 30, "a recovered record")


def test_a_rollback_while_the_old_version_is_still_being_deleted_deploys_it_under_a_fresh_name(ctl):
    """Serve takes a while to delete an app; a rollback that arrives meanwhile does not wait for it: the version
    is deployed again as ``...--v<N>.2`` (or back without the suffix) and answers while the old app still goes."""
    from ray import serve

    production = ctl.life.state(MODEL).production
    other = 2 if production == 1 else 1
    ctl.life.publish(MODEL, other, "test", "to roll back from")
    wait_for(lambda: ctl.versions(6) == Counter({str(other): 6}), 120, f"v{other} alone")

    def deleting() -> str | None:
        apps = serve.status().applications
        return next((n for n in version_apps() if n.startswith(version_app(APP, MODEL, production))
                     and str(apps[n].status.value if hasattr(apps[n].status, "value") else apps[n].status)
                     == "DELETING"), None)

    old = wait_for(deleting, 60, f"v{production}'s app to be deleting", interval=0.05)
    ctl.life.rollback(MODEL, "test", "back while the old app is deleted")
    fresh = wait_for(lambda: next((n for n in version_apps() if n != old and n.startswith(
        version_app(APP, MODEL, production))), None), 30, "the fresh app", interval=0.05)
    assert old in version_apps(), "the old app was gone before the fresh one was deployed: nothing was tested"
    wait_for(lambda: ctl.versions(6) == Counter({str(production): 6}), 120, f"v{production} alone again")
    deploys = [r["detail"] for r in controller_status()["records"] if r["action"] == "deploy"]
    assert f"as Serve app {fresh!r}" in deploys[-1], deploys
