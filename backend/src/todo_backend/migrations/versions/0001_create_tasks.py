"""Create the tasks table, its two owner indexes and its three CHECK constraints.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Data contract v1.0.0, exactly as ``todo_backend.models.Task`` declares it: the id is
BIGINT with a sequence (BIGSERIAL) on PostgreSQL and SQLite's INTEGER PRIMARY KEY
(which auto-increments) on SQLite, the same DDL ``init_db`` emits, so a database
made by ``init_db`` can be stamped at this revision. Timestamps are
``TIMESTAMP WITH TIME ZONE``. The literals are frozen here on purpose: a later change
to the model's limits needs its own revision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# squawk rules this revision does not follow, each with why (todo_backend.migration_lint).
squawk_exclude: Mapping[str, str] = {
    "prefer-text-field": "data contract v1.0.0 fixes VARCHAR(n); the table is new, no lock",
    "prefer-identity": "BIGSERIAL keeps this DDL identical to init_db's; the table is new",
}


def upgrade() -> None:
    """Create ``tasks`` with its CHECK constraints, then its two indexes."""
    op.create_table(
        "tasks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("description", sa.String(length=1000), nullable=True),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint(
            "length(user_id) BETWEEN 1 AND 255 AND user_id = trim(user_id)",
            name="ck_tasks_user_id_valid",
        ),
        sa.CheckConstraint(
            "length(trim(title)) BETWEEN 1 AND 200",
            name="ck_tasks_title_valid",
        ),
        sa.CheckConstraint(
            "description IS NULL OR length(description) BETWEEN 1 AND 1000",
            name="ck_tasks_description_valid",
        ),
    )
    op.create_index("ix_tasks_user_id_id", "tasks", ["user_id", "id"], unique=False)
    op.create_index(
        "ix_tasks_user_id_complete_id", "tasks", ["user_id", "complete", "id"], unique=False
    )


def downgrade() -> None:
    """Drop the indexes and the table (its id sequence goes with it on PostgreSQL)."""
    op.drop_index("ix_tasks_user_id_complete_id", table_name="tasks")
    op.drop_index("ix_tasks_user_id_id", table_name="tasks")
    op.drop_table("tasks")
