"""A training worker killed mid-run: Ray Train restarts the group and resumes from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import psutil

from mass.registry import ModelRegistry
from tests.integration.support import ROOT, SMOKE, VENV_BIN, last_json, wait_for


def _train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker actors (earlier runs' actors are DEAD)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if psutil.pid_exists(a.pid)]


def _registered_checkpoint(snapshot) -> bool:
    try:
        return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
    except (OSError, ValueError):
        return False


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, corpus, session_home):
    reg = ModelRegistry()
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address}
    job = subprocess.Popen(
        [str(VENV_BIN / "python"), "jobs/train.py", "--config", str(SMOKE), "--set", "name=tiny-gpt-ft",
         "--set", "optim.epochs=4", "--set", "data.max_train_tokens=60000", "--set", "registration.aliases=[]"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def running_run():
            runs = reg.client.search_runs([reg.experiment_id()],
                                          "tags.`mass.model_name` = 'tiny-gpt-ft' and attributes.status = 'RUNNING'")
            return runs[0].info.run_id if runs else None

        run_id = wait_for(running_run, 240, "the training run to start")
        # Ray Train's controller records each checkpoint it has taken over in this snapshot file;
        # once it names one, a failure must resume from it (earlier, the report may still be in flight).
        snapshot = session_home / "ray_results" / f"tiny-gpt-ft-{run_id[:12]}" / "checkpoint_manager_snapshot.json"
        wait_for(lambda: _registered_checkpoint(snapshot), 240, "Ray Train to register the epoch-1 checkpoint")
        victims = _train_worker_pids()
        assert len(victims) == 2, victims
        os.kill(victims[-1], signal.SIGKILL)
        out, _ = job.communicate(timeout=480)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-4000:]
    result = last_json(out)
    assert result["resumed_from_epoch"] >= 1, out[-6000:]     # restarted from a checkpoint, not from scratch
    assert "resumed from checkpoint after epoch" in out
    assert result["metrics"]["val_loss"] < result["metrics"]["initial_val_loss"] - 1.0
    info = reg.resolve("tiny-gpt-ft")
    assert info.ref == result["model_ref"] and reg.client.get_run(run_id).info.status == "FINISHED"
    assert [h.step for h in reg.client.get_metric_history(run_id, "val_loss")][-1] == 4
