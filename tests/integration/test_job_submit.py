"""The same training script through ``ray job submit`` and ``mass train --address`` on a real head node (side by
side: the second is submitted while the first runs)."""

from __future__ import annotations

import subprocess

from mass.registry import ModelRegistry
from tests.integration.support import ROOT, SMOKE, VENV_BIN, last_json, run_cli

QUICK = ["--set", "optim.epochs=1", "--set", "data.max_train_tokens=40000", "--set", "registration.aliases=[]"]


def test_ray_job_submit_and_mass_train_address_run_the_training_script_unchanged(ray_cluster, corpus):
    """``ray job submit`` (left running: ``--no-wait``) and, meanwhile, ``mass train --address``, which streams the
    job's logs with progress and returns its result; both register their model."""
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", ".",
           "--no-wait", "--", "python", "jobs/train.py", "--config", "jobs/configs/tiny-gpt-smoke.yaml",
           "--set", "name=tiny-gpt-submitted", *QUICK]
    submitted = subprocess.run(cmd, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = next(w.strip("'") for w in (submitted.stdout + submitted.stderr).split() if w.strip("'").startswith(
        "raysubmit_"))

    proc = run_cli(["-o", "json", "train", "--config", str(SMOKE), "--set", "name=tiny-gpt-cli", *QUICK,
                    "--address", ray_cluster.dashboard_url], env=ray_cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["model_ref"] == "tiny-gpt-cli/1" and result["job_id"].startswith("raysubmit_")
    assert "submitted job raysubmit_" in proc.stderr and "epoch 1/1" in proc.stderr  # logs and progress streamed

    logs = subprocess.run([str(VENV_BIN / "ray"), "job", "logs", "--address", ray_cluster.dashboard_url, "--follow",
                           job_id], env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    raw = last_json(logs.stdout)
    assert raw["model_ref"] == "tiny-gpt-submitted/1", logs.stdout[-3000:]
    info = ModelRegistry().resolve("tiny-gpt-submitted")
    assert info.run_id == raw["run_id"] and info.metrics["val_loss"] < info.metrics["initial_val_loss"]


def test_a_job_that_fails_on_the_cluster_exits_with_its_error_kind(ray_cluster, corpus):
    proc = run_cli(["train", "--config", str(SMOKE), "--set", "name=tiny-gpt-ghost",
                    "--set", "model.base=ghost-model@production", "--address", ray_cluster.dashboard_url],
                   env=ray_cluster.env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no registered model 'ghost-model'")
    assert "ghost-model" not in ModelRegistry().model_names()
