"""The usage ledger: one append-only row per /v1 request.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(16)),
        sa.Column("model", sa.String(128)),
        sa.Column("path", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("overhead_ms", sa.Float, nullable=False),
    )
    op.create_index("ix_usage_records_key_at", "usage_records", ["key_id", "at"])
    op.create_index("ix_usage_records_at", "usage_records", ["at"])


def downgrade() -> None:
    op.drop_table("usage_records")
