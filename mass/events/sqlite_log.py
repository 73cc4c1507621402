"""``SqliteBus``: the embedded event bus (the default, no server) — a durable append-only log in one SQLite file
(WAL, ``synchronous=FULL``: a published event survives a crash), with consumer groups, pending deliveries and
dead letters in tables beside it. Any number of processes on one machine may share the file."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from mass.errors import EventBusError
from mass.events.bus import DeadLetter, EventBus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, version TEXT, time TEXT, source TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    grp TEXT NOT NULL, id INTEGER NOT NULL, consumer TEXT NOT NULL, delivered REAL NOT NULL,
    attempts INTEGER NOT NULL, PRIMARY KEY (grp, id));
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, grp TEXT, reason TEXT, fields TEXT, time TEXT);
"""
_FIELDS = ("type", "version", "time", "source", "data")


class SqliteBus(EventBus):
    """The event log in the SQLite file at ``path`` (created with its tables on first use)."""

    def __init__(self, path: str | Path, max_deliveries: int = 5) -> None:
        super().__init__(max_deliveries)
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise EventBusError(f"cannot open the event log {self.path}: {exc}", path=str(self.path)) from exc

    def __repr__(self) -> str:
        return f"SqliteBus({str(self.path)!r})"

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers queue instead of failing half-way)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise EventBusError(f"event log {self.path}: {exc}", path=str(self.path)) from exc

    def _append(self, fields: dict[str, str]) -> str:
        with self._tx() as db:
            cur = db.execute("INSERT INTO events (type, version, time, source, data) VALUES (?, ?, ?, ?, ?)",
                             [fields[f] for f in _FIELDS])
            return str(cur.lastrowid)

    def _waiting(self, group: str) -> bool:
        """Whether ``group`` may have events to take (a read: no write lock while a consumer blocks)."""
        with self._lock:
            try:
                row = self._db.execute("SELECT last FROM groups WHERE name = ?", (group,)).fetchone()
                newest = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
            except sqlite3.Error as exc:
                raise EventBusError(f"event log {self.path}: {exc}", path=str(self.path)) from exc
        return row is None or newest > row[0]

    def _read_new(self, group, consumer, count, block_s, start):
        deadline = time.monotonic() + block_s
        while True:
            if not self._waiting(group):
                if time.monotonic() >= deadline:
                    return []
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            with self._tx() as db:
                row = db.execute("SELECT last FROM groups WHERE name = ?", (group,)).fetchone()
                if row is None:
                    last = 0 if start == "earliest" else db.execute("SELECT COALESCE(MAX(id), 0) FROM events"
                                                                    ).fetchone()[0]
                    db.execute("INSERT INTO groups (name, last) VALUES (?, ?)", (group, last))
                else:
                    last = row[0]
                rows = db.execute(f"SELECT id, {', '.join(_FIELDS)} FROM events WHERE id > ? ORDER BY id LIMIT ?",
                                  (last, count)).fetchall()
                if rows:
                    now = time.time()
                    db.executemany("INSERT INTO pending (grp, id, consumer, delivered, attempts) VALUES (?, ?, ?, ?, 1)",
                                   [(group, r[0], consumer, now) for r in rows])
                    db.execute("UPDATE groups SET last = ? WHERE name = ?", (rows[-1][0], group))
            if rows or time.monotonic() >= deadline:
                return [(str(r[0]), dict(zip(_FIELDS, r[1:])), 1) for r in rows]
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def ack(self, group: str, offset: str) -> None:
        """Acknowledge ``offset`` for ``group``."""
        with self._tx() as db:
            db.execute("DELETE FROM pending WHERE grp = ? AND id = ?", (group, int(offset)))

    def _pending_idle(self, group, idle_s, count):
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM pending WHERE grp = ? AND delivered <= ? ORDER BY id LIMIT ?",
                              (group, time.time() - idle_s, count)).fetchall()
        return [(str(i), a) for i, a in rows]

    def _claim(self, group, consumer, offsets, idle_s):
        out = []
        with self._tx() as db:
            for offset in offsets:
                cur = db.execute("UPDATE pending SET consumer = ?, delivered = ?, attempts = attempts + 1 "
                                 "WHERE grp = ? AND id = ? AND delivered <= ?",
                                 (consumer, time.time(), group, int(offset), time.time() - idle_s))
                if cur.rowcount:  # not taken by another consumer meanwhile
                    row = db.execute(f"SELECT {', '.join(_FIELDS)} FROM events WHERE id = ?", (int(offset),)).fetchone()
                    attempts = db.execute("SELECT attempts FROM pending WHERE grp = ? AND id = ?",
                                          (group, int(offset))).fetchone()[0]
                    if row is None:  # deleted from the log: nothing to deliver
                        db.execute("DELETE FROM pending WHERE grp = ? AND id = ?", (group, int(offset)))
                    else:
                        out.append((offset, dict(zip(_FIELDS, row)), attempts))
        return out

    def _fields(self, offset):
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM events WHERE id = ?", (int(offset),)).fetchone()
        return dict(zip(_FIELDS, row)) if row else {}

    def _range(self, after, count):
        with self._lock:
            rows = self._db.execute(f"SELECT id, {', '.join(_FIELDS)} FROM events WHERE id > ? ORDER BY id LIMIT ?",
                                    (int(after or 0), count)).fetchall()
        return [(str(r[0]), dict(zip(_FIELDS, r[1:]))) for r in rows]

    def _dead_letter(self, group, offset, reason, fields):
        with self._tx() as db:
            db.execute("INSERT INTO dead_letters (id, grp, reason, fields, time) VALUES (?, ?, ?, ?, ?)",
                       (offset, group, reason, json.dumps({k: v for k, v in fields.items() if v is not None}),
                        datetime.now(timezone.utc).isoformat()))
            db.execute("DELETE FROM pending WHERE grp = ? AND id = ?", (group, int(offset)))

    def last_offset(self) -> str | None:
        """The newest event's offset (None when the log is empty)."""
        with self._lock:
            newest = self._db.execute("SELECT MAX(id) FROM events").fetchone()[0]
        return None if newest is None else str(newest)

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, grp, reason, fields, time FROM dead_letters ORDER BY seq DESC LIMIT ?",
                                    (count,)).fetchall()
        return [DeadLetter(i, g, r, json.loads(f), datetime.fromisoformat(t)) for i, g, r, f, t in reversed(rows)]

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()
