"""The LLM engine benchmark's machinery, run small: both engines' worker processes (MASS's from ``.venv``, vLLM's
from ``.venv-vllm``, built by ``make test``) driven over their pipes for a warm-up and a counted round, and the
JSON it saves. Its figures are not checked (speed belongs to benchmark runs); what the table is made of is."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.support import ROOT


def test_the_engine_benchmark_drives_both_engines_and_saves_what_its_table_shows(tmp_path):
    out = tmp_path / "llm_engines.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llm_engines.py"), "--shapes", "2x128",
                           "--dtypes", "float32", "--workloads", "staggered", "--rounds", "1", "--threads", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MASS_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads(out.read_text())
    assert result["systems"] == ["mass", "vllm"] and result["rounds"] == 1
    [cell] = result["cells"]
    assert (cell["shape"], cell["dtype"], cell["workload"]) == ("2x128", "float32", "staggered")
    for system in ("mass", "vllm"):  # each worker streamed every request's tokens (the worker asserts the counts)
        figures = cell["systems"][system]
        assert len(figures["tokens_per_s"]) == 1 and figures["tokens_per_s"][0] > 0
        assert 0 < figures["ttft_ms_p50"] <= figures["ttft_ms_p95"] and cell["peak_rss_mb"][system] > 0
    # greedy fp32 on the same weights and prompt: both engines chose the same tokens for the first request
    assert cell["first_request_same_tokens"] is True
    assert cell["mass_vs_vllm"] > 0 and "2x128" in proc.stdout  # the table was printed
