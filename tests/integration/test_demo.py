"""``mass demo`` (what ``make demo`` runs) end to end, in a fresh MASS_HOME."""

from __future__ import annotations

from tests.integration.support import run_cli


def test_demo_runs_to_the_end(ray_cluster, tmp_path):
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address, "MASS_HOME": str(tmp_path / "demo-home")}
    proc = run_cli(["demo"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("1/4 build the docstring corpus", "2/4 train tiny-gpt", "3/4 import", "4/4 the model repository"):
        assert step in out
    rows = [line.split()[:5] for line in out.splitlines() if line.startswith(("minilm-l6 ", "tiny-gpt "))]
    assert ["minilm-l6", "1", "production", "READY", "embedding"] in rows
    assert ["tiny-gpt", "1", "latest-train", "READY", "text-generation"] in rows
    assert (tmp_path / "demo-home" / "mlflow.db").is_file()
