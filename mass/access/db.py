"""The platform database: one SQLAlchemy engine per URL and process, migrated to the newest schema by Alembic
on first use (serialised across processes: a file lock for sqlite, an advisory lock for PostgreSQL)."""

from __future__ import annotations

import fcntl
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mass.errors import MassError

log = logging.getLogger(__name__)

_ENGINES: dict[str, object] = {}
_LOCK = threading.Lock()
_MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK_ID = 0x6D617373  # "mass": the advisory lock held while migrating


class DatabaseError(MassError):
    """The platform database (keys, usage ledger) failed or cannot be reached."""

    code = "database_error"
    http_status = 503
    exit_code = 5


def database_url(url: str | None = None) -> str:
    """``url``, or the configured ``MASS_DATABASE_URL`` (default: sqlite under ``MASS_HOME``)."""
    if url:
        return url
    from mass.settings import get_settings

    return get_settings().database_url


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported as given minus everything after '@'
        return url.split("@")[-1]


def engine(url: str | None = None):
    """The migrated SQLAlchemy engine for ``url`` (created and upgraded once per process)."""
    url = database_url(url)
    with _LOCK:
        if url not in _ENGINES:
            _ENGINES[url] = _connect(url)
        return _ENGINES[url]


def _connect(url: str):
    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            eng = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

            @event.listens_for(eng, "connect")
            def _pragmas(conn, _record):  # WAL: gateway replicas read while the CLI writes
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        else:
            eng = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        migrate(eng)
        return eng
    except ArgumentError as exc:
        raise DatabaseError(f"MASS_DATABASE_URL {redact(url)!r} is not a database URL ({exc}); use "
                            "sqlite:///PATH or postgresql+psycopg2://USER@HOST/DB", field="MASS_DATABASE_URL") from exc
    except (SQLAlchemyError, OSError) as exc:
        raise DatabaseError(f"cannot open the platform database {redact(url)}: {_reason(exc)}",
                            url=redact(url)) from exc


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def migrate(eng) -> None:
    """Upgrade the schema to Alembic's head, one process at a time."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with _migration_lock(eng) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()


@contextmanager
def _migration_lock(eng) -> Iterator[object]:
    if eng.dialect.name == "sqlite":
        db = eng.url.database or ""
        lock_path = Path(db + ".lock") if db and db != ":memory:" else None
        if lock_path is None:
            with eng.connect() as conn:
                yield conn
            return
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with eng.connect() as conn:
                    yield conn
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    from sqlalchemy import text

    with eng.connect() as conn:
        if eng.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
        try:
            yield conn
        finally:
            if eng.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                conn.commit()


@contextmanager
def transaction(url: str | None = None, what: str = "query") -> Iterator[object]:
    """A connection in a transaction (committed at the end, rolled back on error); database failures become
    ``DatabaseError`` naming ``what`` and the database."""
    from sqlalchemy.exc import SQLAlchemyError

    eng = engine(url)
    try:
        with eng.begin() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise DatabaseError(f"platform database {redact(str(eng.url))} failed to {what}: {_reason(exc)}") from exc


def dispose(url: str | None = None) -> None:
    """Close the pooled connections of ``url``'s engine (tests, forks)."""
    url = database_url(url)
    with _LOCK:
        eng = _ENGINES.pop(url, None)
    if eng is not None:
        eng.dispose()
