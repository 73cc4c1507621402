"""API keys and the access version counter.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("models", sa.Text, nullable=False),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.Column("max_parallel", sa.Integer),
        sa.Column("budget_tokens", sa.BigInteger),
        sa.Column("budget_period", sa.String(8)),
        sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    state = op.create_table("access_state", sa.Column("id", sa.Integer, primary_key=True),
                            sa.Column("version", sa.BigInteger, nullable=False))
    op.bulk_insert(state, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("access_state")
    op.drop_table("api_keys")
