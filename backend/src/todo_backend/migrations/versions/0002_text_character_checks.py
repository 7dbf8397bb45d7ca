"""Refuse in the database what the validators refuse in tasks' text: three CHECK constraints.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

``ck_tasks_user_id_text``, ``ck_tasks_title_text`` and ``ck_tasks_description_text``
repeat the models' character rules (``todo_backend.models.TextCheck``): no control
character in user_id or title, none but tab, LF and CR in a description, no
whitespace of any kind around user_id. The condition differs per database (SQLite
has no regular expressions, PostgreSQL no GLOB); the literals are frozen here, as
``init_db`` renders them at this revision.

Rows already stored that break a rule stop the upgrade before anything changes, with
their ids in the error. On PostgreSQL the stored rows are checked, each constraint is
added ``NOT VALID`` (new writes are checked from then on) and committed, which ends
the brief ACCESS EXCLUSIVE lock the ``ADD`` needs; the constraints are then validated
in a second transaction, whose scans take only SHARE UPDATE EXCLUSIVE (reads and
writes go on). The revision is recorded with the second transaction; a rerun after a
failure between the two skips the constraints already added. SQLite cannot add a
constraint to a table, so the table is rebuilt the way SQLite documents (new table,
copy, drop, rename), ids and all, in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from alembic import context, op

from todo_backend.migrate import MigrationError, commit_point

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# squawk rules this revision does not follow, each with why (todo_backend.migration_lint).
squawk_exclude: Mapping[str, str] = {
    "prefer-robust-stmts": "each ADD runs only if pg_constraint lacks it, so a rerun resumes",
}

_POSTGRESQL: Mapping[str, str] = {
    "ck_tasks_user_id_text": (
        r"user_id !~ '[\u0001-\u001f\u007f-\u009f]' AND user_id !~ "
        r"'^[\u0020\u00a0\u1680\u2000-\u200a\u2028-\u2029\u202f\u205f\u3000]"
        r"|[\u0020\u00a0\u1680\u2000-\u200a\u2028-\u2029\u202f\u205f\u3000]$'"
    ),
    "ck_tasks_title_text": r"title !~ '[\u0001-\u001f\u007f-\u009f]'",
    "ck_tasks_description_text": (
        r"description !~ '[\u0001-\u0008\u000b-\u000c\u000e-\u001f\u007f-\u009f]'"
    ),
}
_SQLITE: Mapping[str, str] = {
    "ck_tasks_user_id_text": (
        "instr(CAST(user_id AS BLOB), x'00') = 0 AND user_id NOT GLOB "
        "('*[' || char(1) || '-' || char(31) || char(127) || '-' || char(159) || ']*') "
        "AND user_id = trim(user_id, char(32, 160, 5760, 8192, 8193, 8194, 8195, 8196, "
        "8197, 8198, 8199, 8200, 8201, 8202, 8232, 8233, 8239, 8287, 12288))"
    ),
    "ck_tasks_title_text": (
        "instr(CAST(title AS BLOB), x'00') = 0 AND title NOT GLOB "
        "('*[' || char(1) || '-' || char(31) || char(127) || '-' || char(159) || ']*')"
    ),
    "ck_tasks_description_text": (
        "instr(CAST(description AS BLOB), x'00') = 0 AND description NOT GLOB "
        "('*[' || char(1) || '-' || char(8) || char(11) || '-' || char(12) || char(14) "
        "|| '-' || char(31) || char(127) || '-' || char(159) || ']*')"
    ),
}
# The constraints of revision 0001, which the rebuilt SQLite table keeps.
_KEPT: Mapping[str, str] = {
    "ck_tasks_user_id_valid": "length(user_id) BETWEEN 1 AND 255 AND user_id = trim(user_id)",
    "ck_tasks_title_valid": "length(trim(title)) BETWEEN 1 AND 200",
    "ck_tasks_description_valid": ("description IS NULL OR length(description) BETWEEN 1 AND 1000"),
}
_COLUMNS = "id, user_id, title, description, complete, created_at, updated_at"
_SHOWN_IDS = 20


def upgrade() -> None:
    """Add the three constraints, after checking that every stored row keeps them."""
    if _dialect() == "postgresql":
        _refuse_rows_breaking(_POSTGRESQL)
        present = _constraints_present()
        for name, condition in _POSTGRESQL.items():
            if name not in present:
                op.execute(f"ALTER TABLE tasks ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID")
        commit_point()  # ends the ACCESS EXCLUSIVE lock before the validating scans
        for name in _POSTGRESQL:
            op.execute(f"ALTER TABLE tasks VALIDATE CONSTRAINT {name}")
    else:
        _refuse_rows_breaking(_SQLITE)
        _rebuild_sqlite_table({**_KEPT, **_SQLITE})


def downgrade() -> None:
    """Drop the three constraints; every row stays."""
    if _dialect() == "postgresql":
        for name in reversed(list(_POSTGRESQL)):
            op.execute(f"ALTER TABLE tasks DROP CONSTRAINT IF EXISTS {name}")
    else:
        _rebuild_sqlite_table(_KEPT)


def _dialect() -> str:
    return str(context.get_context().dialect.name)


def _constraints_present() -> set[str]:
    """Return the names of 0002's constraints already on tasks (a rerun resumes)."""
    if context.is_offline_mode():
        return set()
    query = sa.text(
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass('tasks')"
        " AND conname IN :names"
    ).bindparams(sa.bindparam("names", expanding=True))
    return set(op.get_bind().execute(query, {"names": list(_POSTGRESQL)}).scalars())


def _refuse_rows_breaking(checks: Mapping[str, str]) -> None:
    """Raise :class:`MigrationError` naming the stored rows that break any of *checks*."""
    if context.is_offline_mode():
        return  # no rows to read: the database reports a violation when the SQL runs
    connection = op.get_bind()
    broken = []
    for name, condition in checks.items():
        query = f"SELECT id FROM tasks WHERE NOT ({condition}) ORDER BY id"  # noqa: S608
        ids = list(connection.execute(sa.text(query)).scalars().all())
        if ids:
            shown = ", ".join(str(i) for i in ids[:_SHOWN_IDS])
            more = f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else ""
            field = name.removeprefix("ck_tasks_").removesuffix("_text")
            ids_word = "task id" if len(ids) == 1 else "task ids"
            broken.append(f"{field} ({name}): {ids_word} {shown}{more}")
    if broken:
        raise MigrationError(
            "revision 0002 refuses control characters in tasks' text (and whitespace "
            "around user_id), and stored rows break that: "
            + "; ".join(broken)
            + ". Nothing was changed: correct or delete those rows with SQL (the "
            "application refuses such text), then migrate again."
        )


def _rebuild_sqlite_table(checks: Mapping[str, str]) -> None:
    """Recreate ``tasks`` with *checks* as its CHECK constraints, keeping every row and id."""
    op.create_table(
        "_tasks_rebuilt",
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
        *(sa.CheckConstraint(condition, name=name) for name, condition in checks.items()),
    )
    op.execute(f"INSERT INTO _tasks_rebuilt ({_COLUMNS}) SELECT {_COLUMNS} FROM tasks")  # noqa: S608
    op.drop_table("tasks")  # its indexes go with it
    op.rename_table("_tasks_rebuilt", "tasks")
    op.create_index("ix_tasks_user_id_id", "tasks", ["user_id", "id"], unique=False)
    op.create_index(
        "ix_tasks_user_id_complete_id", "tasks", ["user_id", "complete", "id"], unique=False
    )
