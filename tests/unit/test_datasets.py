"""Registered datasets: versions with rows, content hash and columns in the platform database (sqlite and the
machine's PostgreSQL), dataset.updated on the event bus, reading a version back (refused once it changed), the
provenance a training run records, the CLI, and every bad input."""

from __future__ import annotations

import json
import threading
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mass.cli.main import main
from mass.data.datasets import DatasetNotFound, DatasetStore, scan
from mass.errors import ConfigError, DataError, InvalidRequest
from mass.training.config import TrainConfig
from mass.training.prep import read_inputs

SMOKE = "jobs/configs/tiny-gpt-smoke.yaml"


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _events(home):
    from mass.events import open_bus

    bus = open_bus(f"sqlite:///{home / 'events.db'}")
    try:
        return [e for e in bus.replay(None, count=1000) if e.type == "dataset.updated"]
    finally:
        bus.close()


@pytest.fixture
def store(mass_home):
    return DatasetStore()


def test_a_folder_registers_once_per_content_and_each_new_version_is_announced(store, mass_home, tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    _jsonl(folder / "part-0.jsonl", ["hello there", "how are you"])
    (folder / "_SUCCESS").write_text("")  # a writer's marker: skipped
    (folder / ".part-0.jsonl.crc").write_text("x")
    first, created = store.register("support-chats", str(folder), description="week 1")
    assert created and first.ref == "support-chats@1" and first.format == "jsonl" and first.files == 1
    assert first.rows == 2 and first.columns == {"text": "str", "id": "int"} and len(first.content_hash) == 64
    assert first.path == str(folder.resolve()) and first.description == "week 1"

    again, created = store.register("support-chats", str(folder))
    assert not created and again == first  # same content: no new version, nothing announced
    assert [e.data.version for e in _events(mass_home)] == ["1"]

    _jsonl(folder / "part-1.jsonl", ["a third chat"])
    second, created = store.register("support-chats", str(folder))
    assert created and second.version == 2 and second.rows == 3 and second.files == 2
    assert second.content_hash != first.content_hash
    events = _events(mass_home)
    assert [(e.data.name, e.data.version, e.data.rows, e.data.content_hash, e.source) for e in events] == [
        ("support-chats", "1", 2, first.content_hash, "data"), ("support-chats", "2", 3, second.content_hash, "data")]
    assert [v.ref for v in store.list()] == ["support-chats@2", "support-chats@1"]
    assert store.get("support-chats") == second and store.get("support-chats@1") == first
    assert store.find(first.content_hash) == [first]


def test_parquet_through_a_filesystem_uri_hashes_as_the_local_path(store, tmp_path):
    folder = tmp_path / "pq"
    (folder / "day=1").mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"text": [f"doc {i}-{j}" for j in range(5)], "score": [0.5] * 5}),
                       folder / "day=1" / f"part-{i}.parquet")
    local = scan(str(folder))
    remote = scan(f"file://{folder}")
    assert local.content_hash == remote.content_hash and local.files == remote.files == 2
    assert len(local.texts) == 10 and local.columns == {"text": "string", "score": "double"}
    version, _ = store.register("pq-docs", f"file://{folder}")
    assert version.path == f"file://{folder}" and version.format == "parquet"


def test_reading_a_version_back_is_refused_once_its_files_changed(store, tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["one", "two"])
    store.register("docs", str(path))
    assert store.read("docs@1")[1] == ["one", "two"]
    _jsonl(path, ["one", "two", "three"])
    with pytest.raises(DataError, match=r"dataset docs@1 changed since it was registered: .* register it again "
                                        r"\(`mass data register docs .*d.jsonl`\)"):
        store.read("docs@1")


def test_unknown_names_versions_and_bad_references_say_what_exists(store, tmp_path):
    with pytest.raises(DatasetNotFound, match="no dataset named 'nope' is registered; register one with"):
        store.get("nope")
    store.register("docs", str(_jsonl(tmp_path / "d.jsonl", ["one"])))
    with pytest.raises(DatasetNotFound, match="no dataset named 'nope' is registered; registered: docs"):
        store.get("nope")
    with pytest.raises(DatasetNotFound, match="dataset 'docs' has no version 7; versions: 1"):
        store.get("docs@7")
    with pytest.raises(Exception, match=r"illegal dataset reference 'docs@latest'"):
        store.get("docs@latest")


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing", "dataset path not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", r"no data files \(.jsonl, .parquet, .txt\) in this folder"),
    (lambda p: _jsonl(p / "a.jsonl", ["x"]) and (p / "b.txt").write_text("y") and p,
     r"holds files of several formats \(.jsonl, .txt\); register one format per dataset"),
    (lambda p: (p / "a.csv").write_text("text\nx\n") and p / "a.csv", "unsupported data format '.csv'"),
    (lambda p: (p / "a.jsonl").write_text('{"body": "x"}\n') and p / "a.jsonl",
     "a.jsonl:1: expected an object with a string 'text' field"),
    (lambda p: (p / "a.txt").write_bytes(b"\xff\xfe\x00") and p / "a.txt", "not UTF-8 text"),
    (lambda p: "s3x://bucket/key", "cannot open 's3x://bucket/key'"),
])
def test_what_cannot_be_registered_is_refused_and_nothing_is_recorded(store, tmp_path, make, needle):
    with pytest.raises(DataError, match=needle):
        store.register("docs", str(make(tmp_path)))
    assert store.list() == []


def test_an_illegal_name_is_refused(store, tmp_path):
    with pytest.raises(InvalidRequest, match="illegal dataset name 'bad name'"):
        store.register("bad name", str(_jsonl(tmp_path / "d.jsonl", ["x"])))


def test_concurrent_registrations_of_one_name_on_postgresql_take_distinct_versions(tmp_path):
    from sqlalchemy import create_engine, text

    from mass.access.db import dispose

    name = f"mass_ds_{uuid.uuid4().hex[:8]}"
    admin = create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    try:
        store = DatasetStore(url, events_url=f"sqlite:///{tmp_path / 'events.db'}")
        paths = [_jsonl(tmp_path / f"d{i}.jsonl", [f"text {i}"]) for i in range(12)]
        made, errors = [], []

        def register(path):
            try:
                made.append(store.register("shared", str(path))[0].version)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=register, args=(p,)) for p in paths]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and sorted(made) == list(range(1, 13))  # 12 at once: each lost try is a win of another
        assert {v.content_hash for v in store.list("shared")} == {scan(str(p)).content_hash for p in paths}
    finally:
        dispose(url)
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def test_a_training_recipe_reads_a_registered_version_and_records_what_it_read(store, tmp_path):
    docs = [f"document number {i} " * 3 for i in range(100)]
    path = _jsonl(tmp_path / "chats.jsonl", docs)
    version, _ = store.register("chats", str(path))
    cfg = TrainConfig.load(SMOKE, ["data.dataset=chats"]).data
    inputs = read_inputs(cfg, tmp_path, seed=0, store=store)
    assert sorted(sum(inputs.texts.values(), [])) == sorted(docs)  # validation and test held out of it
    assert len(inputs.texts["validation"]) == len(inputs.texts["test"]) == 5
    assert inputs.sources == [{"split": "train", "path": str(path.resolve()), "content_hash": version.content_hash,
                               "dataset": "chats@1"}]
    # a plain file is named by the registered version that holds exactly its bytes, else by its hash alone
    held = read_inputs(TrainConfig.load(SMOKE, [f"data.train={path}"]).data, tmp_path, seed=0, store=store)
    assert held.datasets() == ["chats@1"] and held.texts == inputs.texts
    other = _jsonl(tmp_path / "other.jsonl", docs[:50])
    plain = read_inputs(TrainConfig.load(SMOKE, [f"data.train={other}"]).data, tmp_path, seed=0, store=store)
    assert plain.datasets() == [] and plain.sources[0]["content_hash"] == scan(str(other)).content_hash


@pytest.mark.parametrize("overrides, needle", [
    (["data.dataset=chats@two"], "illegal dataset reference 'chats@two'"),
    (["data.dataset=bad name"], "illegal dataset reference 'bad name'"),
    (["data.dataset=chats", "data.train=jobs/configs/tiny-gpt-smoke.yaml"], "give data.dataset or data.train"),
])
def test_bad_dataset_references_in_a_recipe_fail_fast(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.load(SMOKE, overrides)


def test_mass_data_commands(mass_home, tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", ["one", "two"])
    assert main(["data", "register", "docs", str(path), "--description", "two docs"]) == 0
    assert "registered dataset docs@1: 2 rows in 1 jsonl file(s)" in capsys.readouterr().out
    assert main(["-o", "json", "data", "register", "docs", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["created"] is False
    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[0].split()[:4] == ["DATASET", "VERSION", "FORMAT", "ROWS"]
    assert listing.splitlines()[1].split()[:4] == ["docs", "1", "jsonl", "2"]
    assert main(["data", "show", "docs@1"]) == 0 and "two docs" in capsys.readouterr().out
    assert main(["data", "show", "docs@2"]) == 3
    assert "dataset 'docs' has no version 2; versions: 1" in capsys.readouterr().err
    assert main(["data", "register", "docs", str(tmp_path / "nope.jsonl")]) != 0
    assert "dataset path not found" in capsys.readouterr().err
