"""The README stays true: it opens with the two commands and documents every variable, command and recipe key."""

from pathlib import Path

from mass.cli.main import COMMANDS
from mass.settings import VARIABLES
from mass.training.config import TrainConfig

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_opens_with_the_two_commands():
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


def test_every_setting_is_documented():
    for name in VARIABLES:
        assert f"| `{name}` |" in README, name


def test_every_cli_command_is_documented():
    for command in COMMANDS:
        assert f"`mass {command}" in README, command


def test_every_recipe_section_is_documented():
    for section in TrainConfig.model_fields:
        assert f"`{section}" in README, section
