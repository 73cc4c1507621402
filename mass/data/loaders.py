"""Load text documents from user files (jsonl, parquet, txt) or a built corpus directory."""

from __future__ import annotations

import json
from pathlib import Path

from mass.errors import DataError

SUFFIXES = (".jsonl", ".parquet", ".txt")


def load_texts(path: str | Path, field: str = "text") -> list[str]:
    """Read documents from one file.

    ``.jsonl``: one JSON object per line with a ``field`` string. ``.parquet``: a ``field`` column.
    ``.txt``: documents separated by blank lines.

    Raises:
        DataError: missing file, unknown suffix, bad line or column, or no documents.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", field="data", path=str(path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})", path=str(path)) from exc
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string {field!r} field",
                                path=str(path))
            texts.append(row[field])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc})", path=str(path)) from exc
        if field not in table.column_names:
            raise DataError(f"{path}: no {field!r} column; columns: {table.column_names}", path=str(path))
        texts = [t for t in table.column(field).to_pylist() if isinstance(t, str)]
    elif suffix == ".txt":
        raw = path.read_text(encoding="utf-8")
        texts = [block.strip() for block in raw.split("\n\n")]
    else:
        raise DataError(f"{path}: unsupported data format {suffix!r}; use one of {', '.join(SUFFIXES)}",
                        path=str(path))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{path}: contains no documents", path=str(path))
    return texts


def load_corpus_split(corpus_dir: str | Path, split: str) -> list[str]:
    """Documents of one split of a corpus built by ``mass data build-corpus``."""
    path = Path(corpus_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"corpus split {path} not found; build it with `mass data build-corpus`",
                        field="data.corpus_dir", path=str(path))
    return load_texts(path)
