"""Trigger rules, schedules, and the runs they started (one row per event or cron slot, deduplicated).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trigger_rules",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "schedules",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_slot", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "automation_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("dedupe_key", sa.String(64), nullable=False),
        sa.Column("event_type", sa.String(64)),
        sa.Column("event_offset", sa.String(64)),
        sa.Column("event", sa.Text),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("kind", "name", "dedupe_key", name="uq_automation_runs_key"),
    )
    op.create_index("ix_automation_runs_name_at", "automation_runs", ["name", "at"])


def downgrade() -> None:
    op.drop_table("automation_runs")
    op.drop_table("schedules")
    op.drop_table("trigger_rules")
