"""Trigger rules and automation runs in the platform database: rules added, listed and removed; one run row per
(rule or schedule, dedupe key), claimed before its job is submitted, so a duplicate never submits twice."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from mass.automation.rules import Rule, parse_rule
from mass.errors import Conflict, NotFound


class RuleNotFound(NotFound):
    """A trigger rule name that does not exist."""

    code = "rule_not_found"


@dataclass(frozen=True)
class StoredRule:
    """A rule and when it was added (it reacts only to events published after that)."""

    rule: Rule
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**self.rule.model_dump(mode="json"), "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class AutomationRun:
    """A job a trigger or schedule started (or a start it refused: ``skipped``/``failed`` with ``detail``)."""

    id: int
    at: datetime
    kind: str
    name: str
    dedupe_key: str
    event_type: str | None
    event_offset: str | None
    event: dict[str, Any] | None
    action: str
    job_id: str | None
    status: str
    detail: str
    finished_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        d = asdict(self)
        d["at"] = self.at.isoformat()
        d["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        return d


FINAL = ("succeeded", "failed", "skipped", "stopped")


class AutomationStore:
    """Rules and runs in the database at ``url`` (default: ``MASS_DATABASE_URL``)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url

    # ---------------------------------------------------------------- rules
    def add_rule(self, rule: Rule, replace: bool = False) -> StoredRule:
        """Store ``rule``; Conflict if its name exists (unless ``replace``: the rule is updated and its clock
        restarts)."""
        from sqlalchemy import delete, insert, select

        from mass.access.db import transaction
        from mass.access.schema import trigger_rules

        now = datetime.now(timezone.utc)
        with transaction(self.url, "add a trigger rule") as conn:
            exists = conn.execute(select(trigger_rules.c.name).where(trigger_rules.c.name == rule.name)).first()
            if exists and not replace:
                raise Conflict(f"a trigger rule named {rule.name!r} exists; remove it first or add with --replace",
                               field="name")
            conn.execute(delete(trigger_rules).where(trigger_rules.c.name == rule.name))
            conn.execute(insert(trigger_rules).values(name=rule.name, spec=rule.model_dump_json(), created_at=now))
        return StoredRule(rule, now)

    def rules(self) -> list[StoredRule]:
        """Every rule, by name."""
        from sqlalchemy import select

        from mass.access.db import transaction
        from mass.access.schema import trigger_rules

        with transaction(self.url, "read trigger rules") as conn:
            rows = conn.execute(select(trigger_rules).order_by(trigger_rules.c.name)).mappings().all()
        return [StoredRule(parse_rule(json.loads(r["spec"]), f"stored rule {r['name']}"), utc(r["created_at"]))
                for r in rows]

    def remove_rule(self, name: str) -> None:
        """Delete rule ``name`` (its runs stay in the history); RuleNotFound naming the rules there are."""
        from sqlalchemy import delete

        from mass.access.db import transaction
        from mass.access.schema import trigger_rules

        with transaction(self.url, "remove a trigger rule") as conn:
            gone = conn.execute(delete(trigger_rules).where(trigger_rules.c.name == name)).rowcount
        if not gone:
            names = [r.rule.name for r in self.rules()]
            raise RuleNotFound(f"no trigger rule named {name!r}" + (f"; rules: {', '.join(names)}" if names else ""),
                               field="name")

    # ---------------------------------------------------------------- runs
    def claim(self, kind: str, name: str, dedupe_key: str, action: str, event=None,
              status: str = "submitting", detail: str = "") -> AutomationRun | None:
        """Insert the run row for (kind, name, dedupe_key) before anything is submitted; None when it exists
        already (a duplicate: nothing must be started)."""
        from sqlalchemy import insert
        from sqlalchemy.exc import IntegrityError

        from mass.access.db import DatabaseError, transaction
        from mass.access.schema import automation_runs

        row = {"at": datetime.now(timezone.utc), "kind": kind, "name": name, "dedupe_key": dedupe_key,
               "event_type": event.type if event else None, "event_offset": event.offset if event else None,
               "event": event.data.model_dump_json() if event else None, "action": action, "job_id": None,
               "status": status, "detail": detail, "finished_at": None}
        try:
            with transaction(self.url, "record an automation run") as conn:
                new_id = conn.execute(insert(automation_runs).values(**row)).inserted_primary_key[0]
        except DatabaseError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                return None
            raise
        return _run({**row, "id": new_id})

    def update(self, run_id: int, **values: Any) -> None:
        """Set fields of run ``run_id`` (status, job_id, detail, finished_at)."""
        from sqlalchemy import update

        from mass.access.db import transaction
        from mass.access.schema import automation_runs

        if values.get("status") in FINAL and "finished_at" not in values:
            values["finished_at"] = datetime.now(timezone.utc)
        with transaction(self.url, "update an automation run") as conn:
            conn.execute(update(automation_runs).where(automation_runs.c.id == run_id).values(**values))

    def forget(self, run_id: int) -> None:
        """Delete a claimed run whose job could not be submitted (the event is redelivered and tried again)."""
        from sqlalchemy import delete

        from mass.access.db import transaction
        from mass.access.schema import automation_runs

        with transaction(self.url, "forget an automation run") as conn:
            conn.execute(delete(automation_runs).where(automation_runs.c.id == run_id))

    def runs(self, name: str | None = None, kind: str | None = None, unfinished: bool = False,
             limit: int = 100) -> list[AutomationRun]:
        """Runs, newest first (of rule or schedule ``name``; only those not finished with ``unfinished``)."""
        from sqlalchemy import select

        from mass.access.db import transaction
        from mass.access.schema import automation_runs as t

        query = select(t).order_by(t.c.id.desc()).limit(limit)
        if name is not None:
            query = query.where(t.c.name == name)
        if kind is not None:
            query = query.where(t.c.kind == kind)
        if unfinished:
            query = query.where(t.c.status.not_in(FINAL))
        with transaction(self.url, "read automation runs") as conn:
            return [_run(r) for r in conn.execute(query).mappings()]


def utc(value: datetime | None) -> datetime | None:
    """``value`` with UTC attached when the database handed it back naive (sqlite does)."""
    if value is not None and value.tzinfo is None:  # sqlite hands back naive datetimes
        value = value.replace(tzinfo=timezone.utc)
    return value


def _run(row) -> AutomationRun:
    return AutomationRun(id=int(row["id"]), at=utc(row["at"]), kind=row["kind"], name=row["name"],
                         dedupe_key=row["dedupe_key"], event_type=row["event_type"], event_offset=row["event_offset"],
                         event=json.loads(row["event"]) if row["event"] else None, action=row["action"],
                         job_id=row["job_id"], status=row["status"], detail=row["detail"],
                         finished_at=utc(row["finished_at"]))
