"""The README stays true: it opens with the two commands and documents every variable, command and recipe key."""

from pathlib import Path

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


def test_benchmark_table_is_the_saved_run():
    """The README's benchmark table is exactly what benchmarks/serving.py renders from its saved JSON."""
    import json
    import sys

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import serving
    finally:
        sys.path.remove(str(root / "benchmarks"))
    result = json.loads((root / "benchmarks" / "results" / "serving.json").read_text())
    block = README.split(serving.README_START, 1)[1].split(serving.README_END, 1)[0]
    assert block.strip() == serving.render_table(result).strip()
    assert {"engine", "engine_hf_runner", "one_by_one", "static_batch"} <= set(result["tokens_per_s"])
    assert {"in_process_1x2", "in_process_2x1", "gateway"} <= set(result["texts_per_s"])
