"""``mass models ...`` and ``mass data ...`` against the real registry of the session."""

from __future__ import annotations

import json

from tests.integration.support import run_cli


def cli_json(*args):
    proc = run_cli(["-o", "json", *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_list_show_alias_delete(trained):
    listed = {m["name"]: m for m in cli_json("models", "list")}
    version = listed["tiny-gpt"]["versions"][-1]
    assert version["version"] == 1 and version["status"] == "READY" and version["size_bytes"] > 0
    assert "val_loss" in version["metrics"]

    shown = cli_json("models", "show", "tiny-gpt@latest-train")
    assert shown["ref"] == "tiny-gpt/1" and shown["lineage"]["method"] == "train"

    assert cli_json("models", "alias", "tiny-gpt", "staging", "1")["aliases"] == ["latest-train", "staging"]
    rows = [line.split() for line in run_cli(["models", "list"]).stdout.splitlines()]
    assert rows[0][:4] == ["MODEL", "VERSION", "ALIASES", "STATUS"]
    assert ["tiny-gpt", "1", "latest-train,staging", "READY"] in [row[:4] for row in rows]
    assert cli_json("models", "alias", "tiny-gpt", "staging", "--remove") == {"removed": "tiny-gpt@staging"}

    proc = run_cli(["models", "show", "tiny-gpt@staging"])
    assert proc.returncode == 3 and "no alias 'staging'" in proc.stderr
    proc = run_cli(["models", "delete", "tiny-gpt/99"])
    assert proc.returncode == 3 and "no version 99" in proc.stderr


def test_register_then_delete_a_directory(trained, tmp_path):
    from mass.registry import ModelRegistry

    model, tokenizer, _ = ModelRegistry().load("tiny-gpt/1")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    info = cli_json("models", "register", str(tmp_path), "--name", "tiny-gpt-copy", "--task", "text-generation")
    assert info["ref"] == "tiny-gpt-copy/1" and info["lineage"]["method"] == "register"
    assert cli_json("models", "delete", "tiny-gpt-copy/1") == {"deleted": "tiny-gpt-copy/1"}
    assert "tiny-gpt-copy" not in {m["name"] for m in cli_json("models", "list")}


def test_import_minilm_cli_and_corpus_cli(session_home, tmp_path):
    first = cli_json("models", "import-minilm")
    again = cli_json("models", "import-minilm")
    assert first["ref"] == again["ref"] and again["created"] is False and again["aliases"] == ["production"]
    built = cli_json("data", "build-corpus", "--out", str(tmp_path / "c"), "--packages", "json,csv")
    assert built["counts"]["train"] > 0 and built["packages"] == ["csv", "json"]
