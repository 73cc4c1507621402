"""The README stays true: it opens with the two commands and documents every variable, command and recipe key."""

from pathlib import Path

import pytest

from mass.cli.main import COMMANDS
from mass.settings import VARIABLES, settings_table
from mass.training.config import TrainConfig

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_opens_with_the_two_commands():
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


def test_the_settings_table_is_the_declaration():
    assert settings_table() in README
    for name in VARIABLES:
        assert f"| `{name}` |" in README, name


def test_every_cli_command_is_documented():
    for command in COMMANDS:
        assert f"`mass {command}" in README, command


def test_every_recipe_section_is_documented():
    for section in TrainConfig.model_fields:
        assert f"`{section}" in README, section


@pytest.mark.parametrize("name,saved", [("serving", "serving"), ("serving", "serving_cuda_4x256"),
                                        ("serving", "serving_cuda_12x768"), ("proxy", "proxy"), ("rollout", "rollout"),
                                        ("compression", "compression"), ("tuning", "tuning"),
                                        ("llm_engines", "llm_engines"), ("vllm_gateway", "vllm_gateway")])
def test_benchmark_tables_are_the_saved_runs(name, saved):
    """The README's benchmark tables are exactly what benchmarks/<name>.py renders from its saved JSON
    (``saved``: the GPU runs of the serving benchmark have their own JSON and README block)."""
    import importlib
    import json
    import sys

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        bench = importlib.import_module(name)
    finally:
        sys.path.remove(str(root / "benchmarks"))
    result = json.loads((root / "benchmarks" / "results" / f"{saved}.json").read_text())
    start, end = (bench.readme_markers(result.get("device", "cpu"), result.get("shape", "4x256")) if name == "serving"
                  else (bench.README_START, bench.README_END))
    block = README.split(start, 1)[1].split(end, 1)[0]
    assert block.strip() == bench.render_table(result).strip()
    if name == "serving":
        assert {"engine", "engine_hf_runner", "one_by_one", "static_batch"} <= set(result["tokens_per_s"])
        if saved == "serving":
            assert {"in_process_1x2", "in_process_2x1", "gateway"} <= set(result["texts_per_s"])
    elif name == "compression":
        assert [r["label"] for r in result["card"]["rows"]][:3] == ["parent fp32", "parent bf16", "onnx fp32"]
        assert set(result["cards"]) == set(result["methods"]) and {"onnx-int8", "torch-int8"} <= set(result["methods"])
    elif name == "tuning":
        assert all(len(v) == result["rounds"] for part in ("walls", "epoch_s") for v in result[part].values())
        assert result["searches"] and all(r["asha"]["steps_budget"] == r["random"]["steps_budget"]
                                          for r in result["searches"])
    elif name == "proxy":
        assert {"embed_on", "embed_off", "chat_on", "chat_off"} == set(result["rates"])
    elif name == "llm_engines":  # every shape x dtype x workload, both engines, each with every round
        assert len(result["cells"]) == 12 and all(set(c["systems"]) == {"mass", "vllm"} for c in result["cells"])
        assert all(len(f["tokens_per_s"]) == result["rounds"] for c in result["cells"] for f in c["systems"].values())
    elif name == "vllm_gateway":  # both systems served the same tokens in every cell, every round counted
        assert all(set(c["systems"]) == {"gateway", "vllm_serve"} for c in result["cells"]) and result["cells"]
        assert all(len({f["tokens"] for f in c["systems"].values()}) == 1 for c in result["cells"])
        assert all(len(f["tokens_per_s"]) == result["rounds"] for c in result["cells"] for f in c["systems"].values())
    else:
        assert len(result["per_round"]) == result["rounds"] and all("chat_failed" in r for r in result["per_round"])
