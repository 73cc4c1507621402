"""``mass demo`` (what ``make demo`` runs) end to end, in a fresh MASS_HOME."""

from __future__ import annotations

import re

from tests.integration.support import run_cli


def test_demo_runs_to_the_end(ray_cluster, tmp_path):
    """``--quick`` trains for one epoch (the smoke recipe's full training is the ``trained`` fixture's)."""
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address, "MASS_HOME": str(tmp_path / "demo-home")}
    proc = run_cli(["demo", "--quick"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("1/9 build the docstring corpus", "2/9 train tiny-gpt", "3/9 train a candidate", "4/9 import",
                 "5/9 compress MiniLM", "onnx-int8 of minilm-l6/1", "| onnx int8 | onnx int8 |",
                 "registered minilm-l6-int8/1 (card in MLflow run",
                 "6/9 the model repository",
                 "  event 1: model.version.registered {'model': 'tiny-gpt', 'version': '1'} (from registry)",
                 "training.completed {'model': 'tiny-gpt', 'version': '1'} (from training)",
                 "training.completed {'model': 'tiny-gpt', 'version': '2'} (from training)",
                 "model.alias.changed {'model': 'minilm-l6', 'alias': 'production', 'version': '1'}",
                 "published tiny-gpt/1 as production", "7/9 serve tiny-gpt and MiniLM", "8/9 semantic search",
                 "9/9 lifecycle", "canary: tiny-gpt v2 at 20 %", "promote: v2 is production",
                 "rollback: v1 is production again", "rollout.promoted {'model': 'tiny-gpt', 'version': '2'}",
                 "model.traffic.changed {'model': 'tiny-gpt', 'weights': {'1': 80, '2': 20}}"):
        assert step in out, step
    split = next(line for line in out.splitlines() if "200 chats answered by" in line)
    shares = {v: int(n) for v, n in re.findall(r"v(\d+) (\d+) \(", split)}
    assert sum(shares.values()) == 200 and 20 <= shares.get("2", 0) <= 65, split  # 20 % of 200: 40 +- 3.5 sd
    assert [line.split()[1:3] for line in out.splitlines() if " by demo: " in line] == [
        ["publish", "v1"], ["canary", "v2"], ["promote", "v2"], ["rollback", "v1"]]
    assert "  without a key: invalid_api_key: missing API key" in out  # the app at /mass-demo is protected
    assert "chat (HTTP):" in out and "stream (HTTP SSE, " in out and "embedded 500 docstrings via handles" in out
    assert "tiny-gpt is a 0.7M-parameter GPT-2 trained for" in out and "frequency_penalty=1.0" in out
    hits = [line for line in out.splitlines() if line.startswith("    0.")]
    assert len(hits) == 9  # three hits for each of three queries
    rows = [line.split()[:5] for line in out.splitlines() if line.startswith(("minilm-l6 ", "tiny-gpt "))]
    assert ["minilm-l6", "1", "production", "READY", "embedding"] in rows
    assert ["tiny-gpt", "1", "production", "READY", "text-generation"] in rows
    assert ["tiny-gpt", "2", "latest-train", "READY", "text-generation"] in rows
    assert (tmp_path / "demo-home" / "mlflow.db").is_file()


def test_tuning_demo_searches_then_retrains_on_an_event(ray_cluster, tmp_path):
    """``mass demo --tuning --quick`` in a fresh MASS_HOME: 4 trials (ASHA), the best registered, then a dataset
    version that a trigger rule turns into a Ray job whose model names the event."""
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address, "MASS_HOME": str(tmp_path / "tuning-home")}
    proc = run_cli(["demo", "--tuning", "--quick"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \w+_0000\d", line)]
    assert len(rows) == 4 and {r[4].strip() for r in rows} <= {"completed", "stopped early"}
    steps = [tuple(int(n) for n in r[6].split("/")) for r in rows]
    run, budget = sum(s[0] for s in steps), sum(s[1] for s in steps)
    saved = re.search(r"steps run: (\d+) of a full budget of (\d+) \(early stopping saved (\d+)%\)", out)
    assert saved and (int(saved[1]), int(saved[2])) == (run, budget)
    assert int(saved[3]) == round(100 * (1 - run / budget))
    assert sum("**best**" in r[0] for r in rows) == 1 and "best trial registered as tiny-gpt/1" in out
    assert "registered dataset demo-chats@1 (600 rows): dataset.updated published" in out
    job = re.search(r"started Ray job (mass-trigger-demo-retrain-\w+) for event (dataset\.updated@\d+)", out)
    assert job and f"job {job[1]}: SUCCEEDED" in out
    assert ("registered tiny-gpt-retrained/1: trained on demo-chats@1" in out
            and f"rule demo-retrain, event {job[2]}" in out)
