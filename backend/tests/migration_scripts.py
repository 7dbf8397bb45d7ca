"""A copy of the package's migrations with one extra revision, and model changes, for tests."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy import CheckConstraint, Column, Table

from todo_backend import migrate
from todo_backend.models import Task, TextCheck, _map_column

# Not a number, so never the id of a real revision (those are 0001, 0002, ...).
SCRATCH = "scratch_test_change"
# A revision body building an index online: outside_transaction() with CREATE INDEX
# CONCURRENTLY on PostgreSQL, a plain index build on SQLite.
ONLINE_INDEX = """
from todo_backend.migrate import outside_transaction

with outside_transaction():
    op.create_index(
        "ix_tasks_title", "tasks", ["title"],
        postgresql_concurrently=True, if_not_exists=True,
    )
"""


def _shipped_head() -> str:
    head = migrate.head_revision()
    assert head is not None, "the package ships no revision"
    return head


HEAD: Final = _shipped_head()
"""The newest revision the package ships: tests name no revision as the head."""


def scripts_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upgrade_body: str) -> Path:
    """Point :mod:`todo_backend.migrate` at a copy of its scripts plus a revision SCRATCH.

    The copy lives in *tmp_path*; revision :data:`SCRATCH` revises the package's head,
    runs *upgrade_body* (Python statements using ``op`` and ``sa``) and downgrades as
    a no-op. Returns the copied script directory; *monkeypatch* undoes the
    redirection after the test.
    """
    head = migrate.head_revision()
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    body = textwrap.indent(textwrap.dedent(upgrade_body).strip(), "    ")
    (scripts / "versions" / f"{SCRATCH}.py").write_text(
        '"""A change made by a test."""\n\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"revision = {SCRATCH!r}\ndown_revision = {head!r}\n"
        "branch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade() -> None:\n{body}\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", scripts)
    return scripts


def tasks_table() -> Table:
    """The ``tasks`` table the models declare."""
    table: Table = Task.__table__  # type: ignore[attr-defined]
    return table


@contextmanager
def model_column(column: Column[object]) -> Iterator[Column[object]]:
    """Declare *column* on the models' ``tasks`` table for the block (a field added in code).

    The column gets the DDL a field declared on the models gets (``int`` as BIGINT, a
    scalar default of a NOT NULL column in the DDL too). It is taken off again
    afterwards (SQLAlchemy has no public way to remove a column from a Table; its
    column collection's ``remove`` is used).
    """
    table = tasks_table()
    table.append_column(column)
    _map_column(column)
    try:
        yield column
    finally:
        table._columns.remove(column)


@contextmanager
def probe_checks() -> Iterator[None]:
    """Declare two CHECK constraints on the models' ``tasks`` for the block, as a new rule.

    ``ck_tasks_probe_short`` (one condition on every database: titles under 150
    characters) and ``ck_tasks_probe_text`` (written per database by ``TextCheck``: no
    tilde in a title).
    """
    table = tasks_table()
    checks = (
        CheckConstraint("length(title) < 150", name="ck_tasks_probe_short"),
        CheckConstraint(TextCheck("title", ((0x7E, 0x7E),)), name="ck_tasks_probe_text"),
    )
    for check in checks:
        table.append_constraint(check)
    try:
        yield
    finally:
        for check in checks:
            table.constraints.discard(check)
