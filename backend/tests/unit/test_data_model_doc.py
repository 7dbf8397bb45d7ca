"""The data model document (specs/002-database-setup/data-model.md) matches the models.

Adding a field to the models fails these tests until the document describes it: each
message names the file, what to add and the command that shows the new schema.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import CheckConstraint, Dialect, Table
from sqlalchemy.dialects import postgresql, sqlite

from tests.unit.test_contract import _repo_root, _table_rows
from todo_backend.models import Task

DATA_MODEL = Path("specs") / "002-database-setup" / "data-model.md"
SHOW_DDL = "uv run python -m todo_backend.migrate sql --url {}"
_TABLE: Table = Task.__table__  # type: ignore[attr-defined]


def _text() -> str:
    return (_repo_root() / DATA_MODEL).read_text(encoding="utf-8")


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _type(column_name: str, dialect: Dialect) -> str:
    return str(_TABLE.c[column_name].type.compile(dialect=dialect))


def test_the_columns_table_describes_every_column() -> None:
    """One row per column of tasks, with its type on each database and whether it may be null."""
    rows = {row[0].strip("`"): row for row in _table_rows(_text(), "## Columns")}
    pg, lite = postgresql.dialect(), sqlite.dialect()  # type: ignore[no-untyped-call]
    expected = {
        column.name: (
            _type(column.name, pg),
            _type(column.name, lite),
            "yes" if column.nullable else "no",
        )
        for column in _TABLE.columns
    }
    missing = [
        f"| `{name}` | ... | `{pg_type}` | `{lite_type}` | {null} | ... |"
        for name, (pg_type, lite_type, null) in expected.items()
        if name not in rows
    ]
    assert not missing, (
        f"{DATA_MODEL}: the Columns table lacks rows for columns the models declare; add "
        f"{missing} (the DDL: `{SHOW_DDL.format('postgresql://')}`, "
        f"`{SHOW_DDL.format('sqlite://')}`)"
    )
    assert set(rows) == set(expected), f"{DATA_MODEL}: rows for columns the models do not have"
    for name, (pg_type, lite_type, null) in expected.items():
        _, _, pg_cell, lite_cell, null_cell, _ = rows[name]
        assert pg_type in pg_cell, f"{DATA_MODEL}: `{name}` is {pg_type} on PostgreSQL"
        assert lite_type in lite_cell, f"{DATA_MODEL}: `{name}` is {lite_type} on SQLite"
        assert null_cell == null, f"{DATA_MODEL}: `{name}` nullable: {null}"


def test_the_constraints_and_indexes_tables_name_every_one() -> None:
    """Every named CHECK constraint and index of the models has its row, and no other."""
    text = _text()
    checks = {
        str(constraint.name)
        for constraint in _TABLE.constraints
        if isinstance(constraint, CheckConstraint)
    }
    documented = {
        name for row in _table_rows(text, "## Constraints") for name in _names(row[0])
    } - {"id"}
    assert documented == checks, (
        f"{DATA_MODEL}: the Constraints table names {sorted(documented)}, the models "
        f"{sorted(checks)} (their SQL: `{SHOW_DDL.format('postgresql://')}`)"
    )
    indexes = {str(index.name) for index in _TABLE.indexes}
    documented = {name for row in _table_rows(text, "## Indexes") for name in _names(row[0])}
    assert documented - {"tasks_pkey", "id"} == indexes, (
        f"{DATA_MODEL}: the Indexes table names {sorted(documented)}, the models {sorted(indexes)}"
    )


def test_the_validation_table_has_every_column() -> None:
    """The validation table says what each column accepts, normalises and rejects."""
    rows = _table_rows(_text(), "### Character rules")
    documented = {name for row in rows for name in _names(row[0])}
    columns = {column.name for column in _TABLE.columns}
    assert documented == columns, (
        f"{DATA_MODEL}: the validation table (under 'Character rules') covers "
        f"{sorted(documented)}, the columns are {sorted(columns)}: add a row for each new one"
    )
