"""The platform database's tables (SQLAlchemy Core). Alembic's migrations under ``migrations/versions``
create them; a change here needs a new migration."""

from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Column, DateTime, Float, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint)

metadata = MetaData()

#: one row per API key; the secret itself is never stored, only its SHA-256
api_keys = Table(
    "api_keys", metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("models", Text, nullable=False),  # comma-separated glob patterns
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_parallel", Integer),
    Column("budget_tokens", BigInteger),
    Column("budget_period", String(8)),  # day | month
    Column("admin", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)

#: one row: a counter bumped by every key change in the same transaction; gateways poll it and drop
#: their key cache when it moves (how a revoke reaches every replica within a second)
access_state = Table(
    "access_state", metadata,
    Column("id", Integer, primary_key=True),
    Column("version", BigInteger, nullable=False),
)

#: the usage ledger: one row per /v1 request, admitted or refused; appended in batches, never updated
usage_records = Table(
    "usage_records", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("key_id", String(16)),  # None: auth off
    Column("model", String(128)),
    Column("path", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Column("error_code", String(64)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("overhead_ms", Float, nullable=False),
    Index("ix_usage_records_key_at", "key_id", "at"),
    Index("ix_usage_records_at", "at"),
)

#: per model: bumped by every lifecycle operation in the transaction that records it; an operation that read
#: an older generation is refused (Conflict), so two operators at once cannot both win
lifecycle_models = Table(
    "lifecycle_models", metadata,
    Column("model", String(128), primary_key=True),
    Column("generation", BigInteger, nullable=False),
)

#: the lifecycle operation log: who did what to which model and version, when and why
lifecycle_operations = Table(
    "lifecycle_operations", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("model", String(128), nullable=False),
    Column("action", String(32), nullable=False),
    Column("version", String(32)),
    Column("detail", Text, nullable=False),  # JSON
    Column("actor", String(128), nullable=False),
    Column("reason", Text, nullable=False),
    Index("ix_lifecycle_operations_model_at", "model", "at"),
)

#: registered datasets: one row per version of a named dataset (a file or folder, local or a pyarrow filesystem
#: URI), with what it held when registered; a version is never changed
datasets = Table(
    "datasets", metadata,
    Column("name", String(128), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("path", Text, nullable=False),
    Column("format", String(16), nullable=False),
    Column("field", String(128), nullable=False),
    Column("files", Integer, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("columns", Text, nullable=False),  # JSON: column -> type
    Column("description", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_datasets_content_hash", "content_hash"),
)

#: trigger rules (``mass triggers add``): the validated rule as JSON; a rule reacts to events published after
#: ``created_at``
trigger_rules = Table(
    "trigger_rules", metadata,
    Column("name", String(64), primary_key=True),
    Column("spec", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: schedules (``mass schedule add``): the validated spec as JSON, whether paused, and the last cron slot the
#: scheduler handled (run, skipped or failed) — what makes a restarted scheduler go on where it stopped
schedules = Table(
    "schedules", metadata,
    Column("name", String(64), primary_key=True),
    Column("spec", Text, nullable=False),
    Column("paused", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_slot", DateTime(timezone=True)),
)

#: every job a trigger (or a schedule) started or refused to start, with what started it; (kind, name,
#: dedupe_key) is unique, so a redelivered or re-published event never starts a second run
automation_runs = Table(
    "automation_runs", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("kind", String(16), nullable=False),  # trigger | schedule
    Column("name", String(64), nullable=False),
    Column("dedupe_key", String(64), nullable=False),
    Column("event_type", String(64)),
    Column("event_offset", String(64)),
    Column("event", Text),  # JSON payload of the event that started it
    Column("action", String(16), nullable=False),
    Column("job_id", String(128)),
    Column("status", String(16), nullable=False),  # submitted | running | succeeded | failed | skipped
    Column("detail", Text, nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    UniqueConstraint("kind", "name", "dedupe_key", name="uq_automation_runs_key"),
    Index("ix_automation_runs_name_at", "name", "at"),
)
