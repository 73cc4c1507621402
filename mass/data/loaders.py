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
    check_suffix(str(path))
    return parse_texts(path.read_bytes(), str(path), field)


def check_suffix(where: str) -> str:
    """The lower-case suffix of ``where`` if it is a data format MASS reads, else DataError."""
    suffix = Path(where).suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{where}: unsupported data format {suffix!r}; use one of {', '.join(SUFFIXES)}",
                        path=where)
    return suffix


def parse_texts(raw: bytes, where: str, field: str = "text") -> list[str]:
    """The documents in ``raw``, the bytes of the file named ``where`` (its suffix says the format; see
    ``load_texts``). DataError naming ``where`` (and the line) when they cannot be read or hold none."""
    suffix = check_suffix(where)
    if suffix == ".jsonl":
        texts = []
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})", path=where) from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}:{lineno}: not valid JSON ({exc.msg})", path=where) from exc
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise DataError(f"{where}:{lineno}: expected an object with a string {field!r} field", path=where)
            texts.append(row[field])
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(raw))
        except Exception as exc:
            raise DataError(f"{where}: not a readable parquet file ({exc})", path=where) from exc
        if field not in table.column_names:
            raise DataError(f"{where}: no {field!r} column; columns: {table.column_names}", path=where)
        texts = [t for t in table.column(field).to_pylist() if isinstance(t, str)]
    else:
        try:
            texts = [block.strip() for block in raw.decode("utf-8").split("\n\n")]
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})", path=where) from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{where}: contains no documents", path=where)
    return texts


def load_corpus_split(corpus_dir: str | Path, split: str) -> list[str]:
    """Documents of one split of a corpus built by ``mass data build-corpus``."""
    path = Path(corpus_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"corpus split {path} not found; build it with `mass data build-corpus`",
                        field="data.corpus_dir", path=str(path))
    return load_texts(path)
