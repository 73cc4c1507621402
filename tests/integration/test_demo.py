"""``mass demo`` (what ``make demo`` runs) end to end, in a fresh MASS_HOME."""

from __future__ import annotations

from tests.integration.support import run_cli


def test_demo_runs_to_the_end(ray_cluster, tmp_path):
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address, "MASS_HOME": str(tmp_path / "demo-home")}
    proc = run_cli(["demo"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("1/6 build the docstring corpus", "2/6 train tiny-gpt", "3/6 import", "4/6 the model repository",
                 "  event 1: model.version.registered {'model': 'tiny-gpt', 'version': '1'} (from registry)",
                 "training.completed {'model': 'tiny-gpt', 'version': '1'} (from training)",
                 "model.alias.changed {'model': 'minilm-l6', 'alias': 'production', 'version': '1'}",
                 "5/6 serve tiny-gpt and MiniLM", "6/6 semantic search"):
        assert step in out
    assert "  without a key: invalid_api_key: missing API key" in out  # the app at /mass-demo is protected
    assert "chat (HTTP):" in out and "stream (HTTP SSE, " in out and "embedded 500 docstrings via handles" in out
    assert "tiny-gpt is a 0.7M-parameter GPT-2 trained for" in out and "frequency_penalty=1.0" in out
    hits = [line for line in out.splitlines() if line.startswith("    0.")]
    assert len(hits) == 9  # three hits for each of three queries
    rows = [line.split()[:5] for line in out.splitlines() if line.startswith(("minilm-l6 ", "tiny-gpt "))]
    assert ["minilm-l6", "1", "production", "READY", "embedding"] in rows
    assert ["tiny-gpt", "1", "latest-train", "READY", "text-generation"] in rows
    assert (tmp_path / "demo-home" / "mlflow.db").is_file()
