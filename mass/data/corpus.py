"""Build a deterministic text corpus from the docstrings of installed Python modules.

Sources are parsed with ``ast`` (nothing is imported or executed), documents are de-duplicated and
split by a hash of their text, so the same installed packages always give the same parquet splits.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mass.errors import DataError
from mass.pyast import parse_python

log = logging.getLogger(__name__)
#: Standard-library packages present on every Python 3.11: several MB of well-written English.
DEFAULT_PACKAGES = ("argparse", "asyncio", "collections", "concurrent", "email", "http", "importlib", "json",
                    "logging", "multiprocessing", "pathlib", "unittest", "urllib", "xml", "typing",
                    "dataclasses", "functools", "statistics", "textwrap", "tarfile", "zipfile",
                    "shutil", "subprocess", "threading", "decimal", "fractions", "datetime", "calendar", "csv")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class CorpusResult:
    """What ``build_corpus`` wrote: the directory, documents per split and the content digest."""

    path: str
    counts: dict[str, int]
    digest: str
    packages: list[str]

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def _package_files(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise DataError(f"package {name!r} is not installed; remove it from the corpus package list",
                        field="packages", name=name)
    if spec.submodule_search_locations:
        files: list[Path] = []
        for location in spec.submodule_search_locations:
            files.extend(p for p in Path(location).rglob("*.py") if "test" not in p.relative_to(location).parts[0])
        return sorted(files)
    if spec.origin and spec.origin.endswith(".py"):
        return [Path(spec.origin)]
    return []


def _docstrings(path: Path, module: str) -> list[tuple[str, str]]:
    """(qualified source, cleaned docstring) for the module, its classes and functions."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = parse_python(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, qual = stack.pop(0)
        doc = ast.get_docstring(node, clean=False)
        if doc:
            found.append((qual, inspect.cleandoc(doc)))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((child, f"{qual}.{child.name}"))
    return found


def _split_of(text: str) -> str:
    bucket = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def collect_documents(packages: tuple[str, ...] | list[str] = DEFAULT_PACKAGES, min_chars: int = 40,
                      progress: bool = True) -> list[dict[str, str]]:
    """Return de-duplicated docstring documents ``{id, source, text, split}`` in a stable order."""
    from tqdm import tqdm

    files = [(name, f) for name in sorted(set(packages)) for f in _package_files(name)]
    seen: set[str] = set()
    docs = []
    for name, path in tqdm(files, desc="corpus", unit="file", disable=not progress, file=sys.stderr):
        spec_root = importlib.util.find_spec(name)
        roots = list(spec_root.submodule_search_locations or []) if spec_root else []
        rel = path.relative_to(roots[0]).with_suffix("") if roots else Path()
        module = ".".join([name, *[p for p in rel.parts if p != "__init__"]]) if roots else name
        for source, text in _docstrings(path, module):
            text = text.strip()
            if len(text) < min_chars or text in seen:
                continue
            seen.add(text)
            docs.append({"id": hashlib.sha1(text.encode()).hexdigest()[:16], "source": source, "text": text,
                         "split": _split_of(text)})
    docs.sort(key=lambda d: (d["source"], d["id"]))
    return docs


def build_corpus(out_dir: str | Path | None = None, packages: tuple[str, ...] | list[str] = DEFAULT_PACKAGES,
                 min_chars: int = 40, progress: bool = True) -> CorpusResult:
    """Write ``train/validation/test.parquet`` and ``manifest.json`` into ``out_dir`` atomically.

    Args:
        out_dir: target directory; ``$MASS_HOME/corpus`` when omitted. Replaced as a whole.
        packages: importable package or module names whose docstrings form the corpus.
        min_chars: shorter docstrings are skipped.
        progress: show a progress bar on stderr.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mass.settings import get_settings

    out = Path(out_dir) if out_dir else get_settings().corpus_dir()
    docs = collect_documents(packages, min_chars=min_chars, progress=progress)
    if not docs:
        raise DataError(f"no docstrings of at least {min_chars} characters in packages {list(packages)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    counts = {}
    digest = hashlib.sha256()
    for split in SPLITS:
        rows = [d for d in docs if d["split"] == split]
        counts[split] = len(rows)
        for row in rows:
            digest.update(row["id"].encode())
        table = pa.table({k: [r[k] for r in rows] for k in ("id", "source", "text")})
        pq.write_table(table, staging / f"{split}.parquet")
    versions = {}
    for name in sorted(set(packages)):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = f"stdlib-{sys.version_info.major}.{sys.version_info.minor}"
    result = CorpusResult(path=str(out), counts=counts, digest=digest.hexdigest()[:16], packages=sorted(versions))
    (staging / "manifest.json").write_text(json.dumps({**result.to_dict(), "versions": versions}, indent=2))
    if out.exists():  # swap whole directories so a reader never sees a half-written corpus
        old = out.with_name(f".{out.name}-old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
    log.info("corpus: %s documents in %s", counts, out)
    return result
