import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mass.data.corpus import build_corpus, collect_documents
from mass.data.loaders import load_corpus_split, load_texts
from mass.data.tokenizer import train_tokenizer
from mass.errors import DataError

PACKAGES = ["json", "argparse", "textwrap"]


def test_corpus_is_deterministic_split_and_atomic(tmp_path):
    first = build_corpus(tmp_path / "c", PACKAGES, progress=False)
    assert set(first.counts) == {"train", "validation", "test"}
    assert first.counts["train"] > first.counts["validation"] > 0
    train = load_corpus_split(tmp_path / "c", "train")
    assert len(train) == first.counts["train"]
    second = build_corpus(tmp_path / "c", PACKAGES, progress=False)  # rebuild replaces in place
    assert second.digest == first.digest and second.counts == first.counts
    assert load_corpus_split(tmp_path / "c", "train") == train
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["digest"] == first.digest and "json" in manifest["versions"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_documents_are_unique_and_have_sources():
    docs = collect_documents(PACKAGES, progress=False)
    texts = [d["text"] for d in docs]
    assert len(texts) == len(set(texts))
    assert all(d["source"].split(".")[0] in PACKAGES for d in docs)
    assert any(d["source"] == "json.dumps" for d in docs)


def test_unknown_package_is_named():
    with pytest.raises(DataError, match="'no_such_pkg_x' is not installed"):
        collect_documents(["no_such_pkg_x"], progress=False)


def test_loaders_read_every_format(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    pq.write_table(pa.table({"text": ["p1", "p2", None]}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    assert load_texts(tmp_path / "a.jsonl") == ["one", "two"]
    assert load_texts(tmp_path / "a.parquet") == ["p1", "p2"]
    assert load_texts(tmp_path / "a.txt") == ["first doc\nstill first", "second doc"]


@pytest.mark.parametrize("name,content,needle", [
    ("bad.jsonl", '{"text": "ok"}\n{not json}\n', "bad.jsonl:2: not valid JSON"),
    ("field.jsonl", '{"body": "x"}\n', "string 'text' field"),
    ("empty.txt", "\n\n  \n", "contains no documents"),
    ("data.csv", "text\nx\n", "unsupported data format '.csv'"),
])
def test_bad_files_are_named(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace("{", r"\{")):
        load_texts(tmp_path / name)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_texts(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="mass data build-corpus"):
        load_corpus_split(tmp_path, "train")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        load_texts(tmp_path / "b.parquet")


def test_tokenizer_round_trips_and_is_deterministic(tmp_path):
    docs = [d["text"] for d in collect_documents(["json"], progress=False)]
    tok = train_tokenizer(docs, vocab_size=400)
    again = train_tokenizer(docs, vocab_size=400)
    assert len(tok) <= 400 and tok.get_vocab() == again.get_vocab()
    ids = tok(docs[0])["input_ids"]
    assert tok.decode(ids) == docs[0] and len(ids) < len(docs[0])
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)(docs[0])["input_ids"] == ids



def test_a_parse_disturbed_by_another_threads_parse_is_tried_again(monkeypatch):
    """CPython 3.11's AST constructor state is shared by threads (cpython#106905): a parse disturbed by another
    thread's (one the lock cannot cover, e.g. the traceback module's) raises a SystemError that says nothing
    about the source; parse_python parses again. Any other SystemError, and a SyntaxError, pass through."""
    import ast

    from mass import pyast

    real, calls = ast.parse, []

    def disturbed(source, *args, **kwargs):
        calls.append(source)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=132, after=74)")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pyast.ast, "parse", disturbed)
    tree = pyast.parse_python("a > 1", mode="eval")
    assert isinstance(tree.body, ast.Compare) and len(calls) == 2

    def broken(source, *args, **kwargs):
        raise SystemError("something else")

    monkeypatch.setattr(pyast.ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        pyast.parse_python("a > 1", mode="eval")
    monkeypatch.setattr(pyast.ast, "parse", real)
    with pytest.raises(SyntaxError):
        pyast.parse_python("a >", mode="eval")
