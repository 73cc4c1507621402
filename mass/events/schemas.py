"""The platform's events: one typed, versioned payload schema per event type, and the envelope every backend
stores (type, schema version, time, source, payload)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from mass.errors import InvalidEvent


class Payload(BaseModel):
    """Base of every event payload: strict (unknown fields refused, so a typo never publishes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingCompleted(Payload):
    """A training job finished (``version``: the model version it registered; None when registration is off)."""

    run_id: str
    model: str
    version: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class TuningCompleted(Payload):
    """A tuning search finished (``version``: the best trial's model as registered; None when registration is
    off). ``best_value``: the best trial's ``metric``; ``best_config``: its tuned values; ``saved``: the share of
    the full trial budget early stopping did not spend."""

    run_id: str
    model: str
    metric: str
    best_value: float
    best_config: dict[str, Any] = Field(default_factory=dict)
    trials: int = 0
    saved: float = 0.0
    version: str | None = None


class ModelVersionRegistered(Payload):
    """A new version of a model exists in the registry."""

    model: str
    version: str
    task: str | None = Field(None, description="llm, embedding... (the version's task tag)")
    run_id: str | None = None


class ModelAliasChanged(Payload):
    """An alias (``production``, ``canary``...) now points at ``version`` (None: removed)."""

    model: str
    alias: str
    version: str | None
    previous: str | None = None


class ModelTrafficChanged(Payload):
    """A model's traffic split: version -> percent (summing to 100)."""

    model: str
    weights: dict[str, int]


class ModelOffline(Payload):
    """A model was taken offline (its requests get 404 naming it as offline)."""

    model: str
    reason: str = ""


class ModelOnline(Payload):
    """A model taken offline serves again."""

    model: str


class CompressionCompleted(Payload):
    """A compressed or converted child version was measured against its parent (and registered if it passed)."""

    model: str
    version: str | None
    parent: str
    method: str
    metrics: dict[str, float] = Field(default_factory=dict)


class DatasetUpdated(Payload):
    """A dataset version was registered."""

    name: str
    version: str
    path: str
    rows: int
    content_hash: str


class RolloutStarted(Payload):
    """A canary or staged rollout of ``version`` began."""

    model: str
    version: str
    plan: list[dict[str, Any]] = Field(default_factory=list)


class RolloutPromoted(Payload):
    """A rollout finished: ``version`` is production."""

    model: str
    version: str


class RolloutRolledBack(Payload):
    """A rollout was rolled back (by an operator, or because a bound broke)."""

    model: str
    version: str
    reason: str


#: event type -> (current schema version, payload model). A new field with a default keeps the version; a
#: change that old readers cannot parse takes the next one.
SCHEMAS: dict[str, tuple[int, type[Payload]]] = {
    "training.completed": (1, TrainingCompleted),
    "tuning.completed": (1, TuningCompleted),
    "model.version.registered": (1, ModelVersionRegistered),
    "model.alias.changed": (1, ModelAliasChanged),
    "model.traffic.changed": (1, ModelTrafficChanged),
    "model.offline": (1, ModelOffline),
    "model.online": (1, ModelOnline),
    "compression.completed": (1, CompressionCompleted),
    "dataset.updated": (1, DatasetUpdated),
    "rollout.started": (1, RolloutStarted),
    "rollout.promoted": (1, RolloutPromoted),
    "rollout.rolled_back": (1, RolloutRolledBack),
}


class Event(BaseModel):
    """One event as stored and delivered. ``offset`` is its place in the log (set by the backend; ordered
    within one backend, opaque across them)."""

    model_config = ConfigDict(frozen=True)

    type: str
    version: int
    time: datetime
    source: str
    data: SerializeAsAny[Payload]  # dumped as its own type, not as the empty base
    offset: str = ""

    def to_fields(self) -> dict[str, str]:
        """The stored form: flat strings (a Redis stream entry, a SQLite row)."""
        return {"type": self.type, "version": str(self.version), "time": self.time.isoformat(),
                "source": self.source, "data": self.data.model_dump_json()}


def make_event(event_type: str, data: dict[str, Any] | Payload, source: str) -> Event:
    """A new event of ``event_type`` (its current schema version, now); InvalidEvent (400) naming the field
    when ``data`` does not match the type's schema, or the type is unknown."""
    if event_type not in SCHEMAS:
        raise InvalidEvent(f"unknown event type {event_type!r}; known: {', '.join(sorted(SCHEMAS))}",
                           field="type")
    version, model = SCHEMAS[event_type]
    try:
        payload = data if isinstance(data, model) else model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "data"
        raise InvalidEvent(f"{event_type} event: {where}: {first['msg']}", field=where) from None
    return Event(type=event_type, version=version, time=datetime.now(timezone.utc), source=source, data=payload)


def parse_event(fields: dict[str, str], offset: str) -> Event:
    """An event from its stored form; InvalidEvent saying why when it cannot be read (unknown type, a schema
    version newer than this MASS knows, a payload that does not match) — the bus dead-letters it."""
    try:
        event_type, version = fields["type"], int(fields["version"])
        when, source, raw = datetime.fromisoformat(fields["time"]), fields["source"], fields["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidEvent(f"event {offset}: malformed envelope ({type(exc).__name__}: {exc})") from None
    if event_type not in SCHEMAS:
        raise InvalidEvent(f"event {offset}: unknown type {event_type!r}")
    current, model = SCHEMAS[event_type]
    if version > current:
        raise InvalidEvent(f"event {offset}: {event_type} schema version {version} is newer than this MASS "
                           f"reads ({current}); upgrade MASS")
    try:
        payload = model.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidEvent(f"event {offset}: {event_type} payload does not match its schema: "
                           f"{exc.errors()[0]['msg']}") from None
    return Event(type=event_type, version=version, time=when, source=source, data=payload, offset=offset)
