"""The same training script through ``ray job submit`` and ``mass train --address`` on a real head node."""

from __future__ import annotations

import subprocess

from mass.registry import ModelRegistry
from tests.integration.support import ROOT, SMOKE, VENV_BIN, last_json, run_cli

QUICK = ["--set", "optim.epochs=1", "--set", "data.max_train_tokens=40000", "--set", "registration.aliases=[]"]


def test_ray_job_submit_runs_the_training_script_unchanged(ray_cluster, corpus):
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", ".",
           "--", "python", "jobs/train.py", "--config", "jobs/configs/tiny-gpt-smoke.yaml",
           "--set", "name=tiny-gpt-submitted", *QUICK]
    proc = subprocess.run(cmd, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["model_ref"] == "tiny-gpt-submitted/1"
    info = ModelRegistry().resolve("tiny-gpt-submitted")
    assert info.run_id == result["run_id"] and info.metrics["val_loss"] < info.metrics["initial_val_loss"]


def test_mass_train_address_submits_streams_and_returns_the_result(ray_cluster, corpus):
    proc = run_cli(["-o", "json", "train", "--config", str(SMOKE), "--set", "name=tiny-gpt-cli", *QUICK,
                    "--address", ray_cluster.dashboard_url], env=ray_cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["model_ref"] == "tiny-gpt-cli/1" and result["job_id"].startswith("raysubmit_")
    assert "submitted job raysubmit_" in proc.stderr and "epoch 1/1" in proc.stderr  # logs and progress streamed


def test_a_job_that_fails_on_the_cluster_exits_with_its_error_kind(ray_cluster, corpus):
    proc = run_cli(["train", "--config", str(SMOKE), "--set", "name=tiny-gpt-ghost",
                    "--set", "model.base=ghost-model@production", "--address", ray_cluster.dashboard_url],
                   env=ray_cluster.env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no registered model 'ghost-model'")
    assert "ghost-model" not in ModelRegistry().model_names()
