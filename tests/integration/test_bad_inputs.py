"""Every bad training input fails fast with one line naming the field or resource, a non-zero exit,
no MLflow run and no model version."""

from __future__ import annotations

import pytest

from mass.registry import ModelRegistry
from tests.integration.support import ROOT, SMOKE, run_cli


def _state():
    reg = ModelRegistry()
    runs = reg.client.search_runs([reg.experiment_id()], max_results=1000)
    versions = [(m.name, v.version) for m in reg.list_models() for v in m.versions]
    return len(runs), versions


def _assert_one_line_error(proc, exit_code: int, needle: str):
    assert proc.returncode == exit_code, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("yaml_text,code,needle", [
    ("name: x\noptim: {epochs: [1\n", 2, "malformed YAML"),
    ("name: x\noptim: {epochz: 1}\n", 2, "optim.epochz: unknown key"),
    ("name: x\noptim: {epochs: three}\n", 2, "optim.epochs: Input should be a valid integer"),
    ("name: x\ndata: {train: /nope/train.jsonl}\n", 2, "data file not found: /nope/train.jsonl"),
    ("name: 'tiny gpt!'\n", 2, "illegal model name 'tiny gpt!'"),
    ("name: x\nmodel: {base: 'a@B'}\n", 2, "illegal alias 'B'"),
])
def test_bad_recipes(tmp_path, session_home, yaml_text, code, needle):
    before = _state()
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml_text)
    _assert_one_line_error(run_cli(["train", "--config", str(recipe)]), code, needle)
    assert _state() == before


@pytest.mark.parametrize("override,code,needle", [
    ("model.base=ghost@production", 3, "no registered model 'ghost'"),
    ("scaling.num_workers=64", 4, "scaling.num_workers=64 x scaling.cpus_per_worker=1.0 needs 64 CPUs but the "
                                  "cluster has 4"),
    ("scaling.use_gpu=true", 4, "scaling.use_gpu=true (one GPU per worker) needs 2 GPUs but the cluster has 0"),
    ("data.corpus_dir=/nope/corpus", 2, "corpus split /nope/corpus/train.parquet not found"),
])
def test_bad_resources_and_references(ray_cluster, corpus, override, code, needle):
    before = _state()
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address}
    _assert_one_line_error(run_cli(["train", "--config", str(SMOKE), "--set", override], env=env), code, needle)
    assert _state() == before


def test_serve_up_refuses_an_app_the_cluster_cannot_place(ray_cluster):
    """`mass serve up` checks the app's CPUs against the cluster before deploying anything."""
    apps_before = _serve_apps()
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address}
    proc = run_cli(["serve", "up", "--config", str(ROOT / "serve_apps" / "configs" / "demo.yaml"),
                    "--set", "gateway.num_cpus=64", "--detach"], env=env)
    _assert_one_line_error(proc, 4, "the app (gateway.num_cpus x gateway.replicas + each model's num_cpus x its "
                                    "starting replicas) needs 65 CPUs")
    assert "but the cluster has 4" in proc.stderr and "lower num_cpus" in proc.stderr
    assert _serve_apps() == apps_before


def _serve_apps() -> set[str]:
    """Applications on the cluster's Serve (none when Serve is not running)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return set(serve.status().applications)
    except RayServeException:
        return set()
