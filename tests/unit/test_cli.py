import json
import subprocess
import sys

import pytest

from mass.cli.main import build_parser, main


def test_help_lists_every_command():
    text = build_parser().format_help()
    for cmd in ("models", "data", "train", "tune", "demo"):
        assert cmd in text


def test_mass_help_does_not_import_heavy_libraries():
    code = "import sys; from mass.cli.main import build_parser; build_parser(); " \
           "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_illegal_ref_exits_2_with_one_line(mass_home, capsys):
    assert main(["models", "show", "bad name!"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: illegal model name 'bad name!': use letters, digits, '.', '_' or '-', "
                   "starting with a letter or digit, at most 64 characters"]


def test_bad_recipe_exits_2_before_touching_ray(tmp_path, mass_home, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\noptim: {epochs: 1, bogus: 2}\n")
    assert main(["-o", "json", "train", "--config", str(recipe), "--address", "http://127.0.0.1:9"]) == 2
    out = capsys.readouterr().out
    assert json.loads(out)["error"]["field"] == "optim.bogus"


def test_a_bad_search_space_exits_2_before_touching_ray(tmp_path, mass_home, capsys):
    from pathlib import Path

    smoke = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny-gpt-smoke.yaml"
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"train: {smoke}\nspace: {{optim.lr: {{loguniform: [0.01, 0.0001]}}}}\n")
    assert main(["-o", "json", "tune", "--config", str(cfg), "--address", "http://127.0.0.1:9"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["field"] == "space.optim.lr" and "are inverted" in error["message"]


@pytest.mark.parametrize("argv", [["models", "delete", "m"], ["models", "alias", "m", "prod"]])
def test_incomplete_commands_exit_2(argv, mass_home, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_serve_up_detach_without_a_cluster_is_refused_before_ray_starts(mass_home, monkeypatch, capsys):
    """A detached local Ray would die with the command and leave a URL that refuses connections."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "up", "--config", "serve_apps/configs/demo.yaml", "--detach"]) == 2
    err = capsys.readouterr().err
    assert "--detach needs a running Ray cluster" in err and "ray start --head" in err


def test_events_publish_list_and_refuse_a_bad_payload(mass_home, capsys):
    assert main(["-o", "json", "events", "publish", "dataset.updated",
                 '{"name": "docs", "version": "1", "path": "/d", "rows": 3, "content_hash": "ab"}']) == 0
    offset = json.loads(capsys.readouterr().out)["offset"]
    assert main(["events", "publish", "dataset.updated", '{"name": "docs"}']) == 2
    assert "dataset.updated event: version: Field required" in capsys.readouterr().err
    assert main(["events", "publish", "dataset.updated", "{nope"]) == 2
    assert main(["-o", "json", "events", "list", "--type", "dataset.updated"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["offset"], e["source"], e["data"]["rows"]) for e in listed] == [(offset, "cli", 3)]
    assert main(["events", "list"]) == 0 and "dataset.updated" in capsys.readouterr().out
    assert main(["-o", "json", "events", "dead-letters"]) == 0 and json.loads(capsys.readouterr().out) == []
