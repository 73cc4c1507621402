"""Schedules: start a train, tune or compress job at the slots of a cron expression. ``Scheduler.tick(now)``
decides, from the database alone, what is due: a slot whose previous run is still going is skipped (recorded),
a slot is claimed once (a restarted or second scheduler cannot run it again), and after downtime the missed
slots are caught up once (``catch_up: once``) or skipped (``none``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import Field, field_validator

from mass.automation.launch import JobSpec, follow, launch
from mass.automation.store import AutomationRun, AutomationStore, utc
from mass.errors import Conflict, NotFound

log = logging.getLogger(__name__)

#: a slot is on time while the scheduler reaches it within this long; later it was missed (downtime)
GRACE = timedelta(seconds=90)
_MAX_COUNTED = 10_000  # missed slots counted for the record, at most


class ScheduleNotFound(NotFound):
    """A schedule name that does not exist."""

    code = "schedule_not_found"


class ScheduleSpec(JobSpec):
    """One schedule (``mass schedule add`` flags): start the job at every slot of ``cron``."""

    cron: str = Field(..., description="Five cron fields (minute hour day month weekday), in UTC; a sixth field "
                                       "is seconds.")
    catch_up: Literal["once", "none"] = Field("once", description="After downtime: run the latest missed slot once "
                                                                  "(once) or wait for the next slot (none).")

    @field_validator("cron")
    @classmethod
    def _parses(cls, value: str) -> str:
        from croniter import croniter

        value = " ".join(value.split())
        if len(value.split()) not in (5, 6) or not croniter.is_valid(value):
            raise ValueError(f"cron {value!r} does not parse: give five fields, minute hour day-of-month month "
                             "day-of-week (e.g. '0 3 * * *': 03:00 UTC daily), or six with seconds last")
        return value

    def slots(self, after: datetime, until: datetime) -> tuple[datetime | None, int]:
        """(the latest slot in (after, until], how many slots that interval holds — at most 10,000 counted)."""
        from croniter import croniter

        latest = croniter(self.cron, until + timedelta(microseconds=1)).get_prev(datetime)
        if latest <= after:
            return None, 0
        it, count = croniter(self.cron, after), 0
        while count < _MAX_COUNTED and it.get_next(datetime) <= until:
            count += 1
        return latest, count

    def next_slot(self, after: datetime) -> datetime:
        """The first slot after ``after``."""
        from croniter import croniter

        return croniter(self.cron, after).get_next(datetime)


@dataclass(frozen=True)
class Schedule:
    """A stored schedule: its spec, whether paused, and the last slot handled."""

    spec: ScheduleSpec
    paused: bool
    created_at: datetime
    last_slot: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (with the next slot)."""
        now = datetime.now(timezone.utc)
        return {**self.spec.model_dump(mode="json"), "paused": self.paused, "created_at": self.created_at.isoformat(),
                "last_slot": self.last_slot.isoformat() if self.last_slot else None,
                "next_slot": None if self.paused else self.spec.next_slot(max(now, self.last_slot or now)).isoformat()}


def parse_schedule(data: dict[str, Any]) -> ScheduleSpec:
    """A validated ScheduleSpec; ConfigError naming the field otherwise."""
    from pydantic import ValidationError

    from mass.errors import ConfigError

    try:
        return ScheduleSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        field = ".".join(str(p) for p in first["loc"]) or ("set" if message.startswith("set ") else "schedule")
        raise ConfigError(f"schedule: {field}: {message}" if first["loc"] else f"schedule: {message}",
                          field=field) from None


class ScheduleStore:
    """Schedules in the platform database at ``url`` (default: ``MASS_DATABASE_URL``)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url

    def add(self, spec: ScheduleSpec) -> Schedule:
        """Store ``spec`` (its first slot is the first after now); Conflict if the name exists."""
        from sqlalchemy import insert, select

        from mass.access.db import transaction
        from mass.access.schema import schedules

        now = datetime.now(timezone.utc)
        with transaction(self.url, "add a schedule") as conn:
            if conn.execute(select(schedules.c.name).where(schedules.c.name == spec.name)).first():
                raise Conflict(f"a schedule named {spec.name!r} exists; remove it first", field="name")
            conn.execute(insert(schedules).values(name=spec.name, spec=spec.model_dump_json(), paused=False,
                                                  created_at=now, last_slot=None))
        return Schedule(spec, False, now, None)

    def list(self) -> list[Schedule]:
        """Every schedule, by name."""
        from sqlalchemy import select

        from mass.access.db import transaction
        from mass.access.schema import schedules

        with transaction(self.url, "read schedules") as conn:
            rows = conn.execute(select(schedules).order_by(schedules.c.name)).mappings().all()
        return [_schedule(r) for r in rows]

    def get(self, name: str) -> Schedule:
        """Schedule ``name``; ScheduleNotFound naming those there are."""
        schedules = self.list()
        for schedule in schedules:
            if schedule.spec.name == name:
                return schedule
        names = [s.spec.name for s in schedules]
        raise ScheduleNotFound(f"no schedule named {name!r}" + (f"; schedules: {', '.join(names)}" if names else
                                                                "; add one with `mass schedule add`"), field="name")

    def set_paused(self, name: str, paused: bool) -> Schedule:
        """Pause or resume ``name``. Resuming does not run the slots that passed while paused: the schedule goes
        on from now."""
        self.get(name)
        values: dict[str, Any] = {"paused": paused}
        if not paused:
            values["last_slot"] = datetime.now(timezone.utc)
        self._update(name, **values)
        return self.get(name)

    def remove(self, name: str) -> None:
        """Delete ``name`` (its runs stay in the history)."""
        from sqlalchemy import delete

        from mass.access.db import transaction
        from mass.access.schema import schedules

        self.get(name)
        with transaction(self.url, "remove a schedule") as conn:
            conn.execute(delete(schedules).where(schedules.c.name == name))

    def mark(self, name: str, slot: datetime) -> None:
        """Record ``slot`` as the last one handled."""
        self._update(name, last_slot=slot)

    def _update(self, name: str, **values: Any) -> None:
        from sqlalchemy import update

        from mass.access.db import transaction
        from mass.access.schema import schedules

        with transaction(self.url, "update a schedule") as conn:
            conn.execute(update(schedules).where(schedules.c.name == name).values(**values))


def _schedule(row) -> Schedule:
    return Schedule(ScheduleSpec.model_validate(json.loads(row["spec"])), bool(row["paused"]),
                    utc(row["created_at"]), utc(row["last_slot"]))


class Scheduler:
    """Decides and starts what the schedules have due.

    Args:
        client: the Ray JobSubmissionClient jobs go to (``mass.cli.submit.job_client``).
        store, runs: where schedules and runs live (default: the platform database).
    """

    def __init__(self, client, store: ScheduleStore | None = None, runs: AutomationStore | None = None) -> None:
        self.client = client
        self.store = store or ScheduleStore()
        self.runs = runs or AutomationStore()

    def tick(self, now: datetime | None = None) -> list[AutomationRun]:
        """Handle every schedule's due slot at ``now`` (default: the clock); the runs recorded (started, skipped
        or failed). A schedule's error is logged and does not stop the others."""
        now = now or datetime.now(timezone.utc)
        follow(self.runs, self.client, kind="schedule")  # so "still running" is current
        recorded = []
        for schedule in self.store.list():
            if schedule.paused:
                continue
            try:
                recorded += self._due(schedule, now)
            except Exception as exc:  # noqa: BLE001 - one schedule's trouble is not every schedule's
                log.warning("schedule %s: %s: %s", schedule.spec.name, type(exc).__name__, exc)
        return recorded

    def _due(self, schedule: Schedule, now: datetime) -> list[AutomationRun]:
        spec = schedule.spec
        latest, count = spec.slots(schedule.last_slot or schedule.created_at, now)
        if latest is None:
            return []
        recorded = []
        run_latest = now - latest <= GRACE or spec.catch_up == "once"
        missed = count - 1 if run_latest else count  # slots that passed while no scheduler ran
        if missed:
            run = self.runs.claim("schedule", spec.name, f"missed-until-{latest.isoformat()}", spec.action,
                                  status="skipped", detail=f"{missed} slot(s) up to {latest.isoformat()} passed while "
                                  f"no scheduler ran; {'the latest runs' if run_latest else 'none runs'} "
                                  f"(catch_up: {spec.catch_up})")
            recorded += [run] if run else []
        if not run_latest:
            self.store.mark(spec.name, latest)
            return recorded
        going = [r for r in self.runs.runs(spec.name, kind="schedule", unfinished=True)
                 if r.status in ("submitting", "submitted", "running")]
        skip = (f"the previous run ({going[0].job_id}, {going[0].status}) is still going" if going else None)
        run = launch(self.runs, self.client, kind="schedule", name=spec.name, key=latest.isoformat(),
                     action=spec.action, config=spec.config, overrides=spec.set,
                     job_id=f"mass-schedule-{spec.name}-{latest:%Y%m%dT%H%M%S}",
                     tags={"mass.schedule": spec.name, "mass.schedule.slot": latest.isoformat()}, skip=skip)
        self.store.mark(spec.name, latest)
        return recorded + ([run] if run else [])
