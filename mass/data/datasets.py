"""Registered datasets: named versions of a file or folder of text (a local path or any pyarrow filesystem URI)
with their row count, content hash and columns, kept in the platform database. Registering changed content
makes a new version and announces ``dataset.updated``; reading a version back checks it has not changed."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mass.data.loaders import SUFFIXES, check_suffix, parse_texts
from mass.errors import DataError, InvalidRequest, MassError, NotFound
from mass.refs import NAME_RE

log = logging.getLogger(__name__)
#: Tries to insert a new version of one name while others are registering it at once (see DatasetStore._insert)
INSERT_TRIES = 20


class DatasetNotFound(NotFound):
    """A dataset name or version that is not registered; the message names the versions that are."""

    code = "dataset_not_found"


@dataclass(frozen=True)
class DatasetVersion:
    """One registered version: where it is, what it held when registered (``rows``: documents with text in
    ``field``; ``content_hash``: SHA-256 over its files' names and bytes), and when."""

    name: str
    version: int
    path: str
    format: str
    field: str
    files: int
    rows: int
    bytes: int
    content_hash: str
    columns: dict[str, str]
    description: str
    created_at: datetime

    @property
    def ref(self) -> str:
        """``name@version``: how a training recipe names it (``data.dataset``)."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "ref": self.ref, "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class Scan:
    """What a path holds now: format, file count, bytes, content hash, columns and documents."""

    path: str
    format: str
    files: int
    bytes: int
    content_hash: str
    columns: dict[str, str]
    texts: list[str]


def _filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI (``s3://``, ``gs://``, ``file://``…)."""
    from pyarrow import fs

    if "://" in path:
        try:
            return fs.FileSystem.from_uri(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad or unsupported URIs
            raise DataError(f"cannot open {path!r}: {exc}", field="path", path=path) from None
    return fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def scan(path: str, field: str = "text") -> Scan:
    """Read every data file at ``path`` (one file, or a folder's ``.parquet``/``.jsonl``/``.txt`` files, recursively;
    names starting with ``.`` or ``_`` are skipped, as Spark's and Hadoop's markers are) and hash them.

    Raises:
        DataError: the path does not exist, holds no data files or several formats, or a file cannot be read or
            has no ``field``.
    """
    from pyarrow import fs

    filesystem, base = _filesystem(path)
    info = filesystem.get_file_info(base)
    if info.type == fs.FileType.NotFound:
        raise DataError(f"dataset path not found: {path}", field="path", path=path)
    if info.type == fs.FileType.File:
        check_suffix(base)
        found = [info]
    else:
        found = sorted((i for i in filesystem.get_file_info(fs.FileSelector(base, recursive=True))
                        if i.type == fs.FileType.File and not any(part.startswith((".", "_")) for part in
                                                                  Path(i.path).relative_to(base).parts)),
                       key=lambda i: i.path)
        found = [i for i in found if Path(i.path).suffix.lower() in SUFFIXES]
        if not found:
            raise DataError(f"{path}: no data files ({', '.join(SUFFIXES)}) in this folder", field="path",
                            path=path)
    formats = sorted({Path(i.path).suffix.lower() for i in found})
    if len(formats) > 1:
        raise DataError(f"{path}: holds files of several formats ({', '.join(formats)}); register one format per "
                        "dataset", field="path", path=path)
    read, texts = [], []
    for item in found:
        name = Path(item.path).name if item is info else str(Path(item.path).relative_to(base))
        with filesystem.open_input_stream(item.path) as stream:
            raw = stream.read()
        read.append((name, raw))
        where = item.path if "://" not in path else path if item is info else f"{path.rstrip('/')}/{name}"
        texts.extend(parse_texts(raw, where, field))
    return Scan(path=path if "://" in path else base, format=formats[0][1:], files=len(found),
                bytes=sum(len(raw) for _, raw in read), content_hash=hash_files(read),
                columns=_columns(read[0][1], formats[0], field), texts=texts)


def hash_files(files: list[tuple[str, bytes]]) -> str:
    """SHA-256 over (relative name, length, bytes) of each file in order: a dataset's content hash."""
    digest = hashlib.sha256()
    for name, raw in files:
        digest.update(name.encode() + b"\0" + len(raw).to_bytes(8, "big") + raw)
    return digest.hexdigest()


def _columns(raw: bytes, suffix: str, field: str) -> dict[str, str]:
    """Column -> type of the first file, from its bytes already read (parquet: its Arrow schema; jsonl: its first
    row's keys)."""
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        return {f.name: str(f.type) for f in pq.read_schema(pa.BufferReader(raw))}
    if suffix == ".jsonl":
        for line in raw.decode("utf-8").splitlines():
            if line.strip():
                return {k: type(v).__name__ for k, v in json.loads(line).items()}
    return {field: "str"}


class DatasetStore:
    """Dataset versions in the platform database (``MASS_DATABASE_URL``; sqlite under ``MASS_HOME`` by default).

    Args:
        url: the database URL (default: the configured one).
        events_url: the event bus ``dataset.updated`` goes to (default: ``MASS_EVENTS_URL``).
    """

    def __init__(self, url: str | None = None, events_url: str | None = None) -> None:
        self.url = url
        self.events_url = events_url

    def register(self, name: str, path: str, field: str = "text", description: str = "",
                 announce: bool = True) -> tuple[DatasetVersion, bool]:
        """Register what ``path`` holds now as the next version of ``name``; returns (version, created). Content
        equal to the newest version's (same hash, same path and field) is not registered again: that version
        is returned with ``created`` False and nothing is announced. A new version announces ``dataset.updated``
        (a bus failure is logged: the database is the record).

        Raises:
            InvalidRequest: an illegal name. DataError: see ``scan``. DatabaseError: the database failed.
        """
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequest(f"illegal dataset name {name!r}: use letters, digits, '.', '_' or '-', starting with "
                                 "a letter or digit, at most 64 characters", field="name")
        found = scan(path, field)
        latest = self.list(name)
        if latest and (latest[0].content_hash, latest[0].path, latest[0].field) == (found.content_hash,
                                                                                      found.path, field):
            return latest[0], False
        version = self._insert(name, found, field, description)
        log.info("registered dataset %s (%d rows, %d files, sha256 %s)", version.ref, version.rows, version.files,
                 version.content_hash[:12])
        if announce:
            self._announce(version)
        return version, True

    def get(self, ref: str) -> DatasetVersion:
        """``name`` (its newest version) or ``name@version``; DatasetNotFound naming what exists."""
        name, _, number = ref.partition("@")
        if number and not number.isdigit():
            raise InvalidRequest(f"illegal dataset reference {ref!r}: use NAME or NAME@VERSION (a number)",
                                 field="dataset")
        versions = self.list(name)
        if not versions:
            known = sorted({v.name for v in self.list()})
            raise DatasetNotFound(f"no dataset named {name!r} is registered"
                                  + (f"; registered: {', '.join(known)}" if known else "; register one with "
                                     "`mass data register NAME PATH`"), field="dataset")
        if not number:
            return versions[0]
        for v in versions:
            if v.version == int(number):
                return v
        raise DatasetNotFound(f"dataset {name!r} has no version {number}; versions: "
                              f"{', '.join(str(v.version) for v in reversed(versions))}", field="dataset")

    def list(self, name: str | None = None) -> list[DatasetVersion]:
        """Every version (of ``name``, or of every dataset), by name, newest version first."""
        from sqlalchemy import select

        from mass.access.db import transaction
        from mass.access.schema import datasets

        query = select(datasets).order_by(datasets.c.name, datasets.c.version.desc())
        if name is not None:
            query = query.where(datasets.c.name == name)
        with transaction(self.url, "read datasets") as conn:
            return [_row(r) for r in conn.execute(query).mappings()]

    def find(self, content_hash: str) -> list[DatasetVersion]:
        """The versions whose content hash is ``content_hash`` (how a run on plain files names what it read)."""
        from sqlalchemy import select

        from mass.access.db import transaction
        from mass.access.schema import datasets

        query = select(datasets).where(datasets.c.content_hash == content_hash).order_by(datasets.c.name,
                                                                                        datasets.c.version)
        with transaction(self.url, "read datasets") as conn:
            return [_row(r) for r in conn.execute(query).mappings()]

    def read(self, ref: str) -> tuple[DatasetVersion, list[str]]:
        """A version and its documents, read from its path now; DataError when what is there is no longer what
        was registered (a training run must not silently read other data under the same name)."""
        version = self.get(ref)
        found = scan(version.path, version.field)
        if found.content_hash != version.content_hash:
            raise DataError(f"dataset {version.ref} changed since it was registered: {version.path} now hashes "
                            f"to {found.content_hash[:12]}, registered {version.content_hash[:12]}; register it "
                            f"again (`mass data register {version.name} {version.path}`) and train on the new "
                            "version", field="data.dataset", path=version.path)
        return version, found.texts

    # ---------------------------------------------------------------- plumbing
    def _insert(self, name: str, found: Scan, field: str, description: str) -> DatasetVersion:
        """The next version number of ``name``, inserted; a concurrent register of the same name takes the
        number first -> try the next (the primary key refuses a duplicate), after a short random pause. Every
        lost try is another registration's success, so ``INSERT_TRIES`` registrations of one name at once all
        get a number."""
        import random
        import time

        from sqlalchemy import func, insert, select
        from sqlalchemy.exc import IntegrityError

        from mass.access.db import DatabaseError, transaction
        from mass.access.schema import datasets

        for attempt in range(INSERT_TRIES):
            if attempt:
                time.sleep(random.uniform(0, 0.02 * attempt))
            now = datetime.now(timezone.utc)
            try:
                with transaction(self.url, "register a dataset") as conn:
                    number = (conn.execute(select(func.max(datasets.c.version)).where(datasets.c.name == name))
                              .scalar() or 0) + 1
                    row = {"name": name, "version": number, "path": found.path, "format": found.format,
                           "field": field, "files": found.files, "rows": len(found.texts), "bytes": found.bytes,
                           "content_hash": found.content_hash, "columns": json.dumps(found.columns),
                           "description": description, "created_at": now}
                    conn.execute(insert(datasets).values(**row))
                return _row(row)
            except DatabaseError as exc:
                if not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise DatabaseError(f"could not register dataset {name!r}: other registrations of it took the next version "
                            f"number first {INSERT_TRIES} times; retry")

    def _announce(self, version: DatasetVersion) -> None:
        from mass.events import open_bus

        try:
            bus = open_bus(self.events_url)
            try:
                bus.publish("dataset.updated", {"name": version.name, "version": str(version.version),
                                                "path": version.path, "rows": version.rows,
                                                "content_hash": version.content_hash}, source="data")
            finally:
                bus.close()
        except MassError as exc:
            log.warning("dataset.updated for %s not announced on the event bus (%s); the database has the version",
                        version.ref, exc.message)


def _row(row) -> DatasetVersion:
    from mass.automation.store import utc

    created = utc(row["created_at"])
    return DatasetVersion(name=row["name"], version=int(row["version"]), path=row["path"], format=row["format"],
                          field=row["field"], files=int(row["files"]), rows=int(row["rows"]),
                          bytes=int(row["bytes"]), content_hash=row["content_hash"],
                          columns=json.loads(row["columns"]), description=row["description"], created_at=created)
