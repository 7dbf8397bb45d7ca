"""Integrity at the database level on SQLite: what only SQLite can be asked to store.

The character constraints shared by both databases are pinned in the repository
contract; PostgreSQL text cannot hold NUL at all, while SQLite stores it unless a
constraint refuses it.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

_INSERT = text(
    "insert into tasks (user_id, title, description, complete, created_at, updated_at) "
    "values (:user_id, :title, :description, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
)
_VALID = {"user_id": "alice", "title": "fine", "description": None}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("title", "bad\x00"),
        ("title", "\x00"),
        ("user_id", "alice\x00"),
        ("description", "ok\x00then more"),
    ],
)
def test_raw_sql_cannot_store_nul(sqlite_engine: Engine, field: str, value: str) -> None:
    """A NUL anywhere in a text field is refused by SQLite's CHECK constraint for the field."""
    with pytest.raises(IntegrityError, match=f"ck_tasks_{field}_"), sqlite_engine.begin() as conn:
        conn.execute(_INSERT, {**_VALID, field: value})
    with sqlite_engine.connect() as conn:
        assert conn.execute(text("select count(*) from tasks")).scalar_one() == 0
