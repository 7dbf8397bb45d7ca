"""Integrity at the database level: PostgreSQL itself refuses rows the model would refuse.

Validation before SQL is the first line; the table's types and CHECK constraints are
the last, for raw SQL, other tools, or code that skips validation. Both the refused
rows and the boundary rows that must still fit are pinned.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from todo_backend.db import get_session
from todo_backend.models import TaskCreate
from todo_backend.repository import TaskRepository

_INSERT = text(
    "insert into tasks (user_id, title, description, complete, created_at, updated_at) "
    "values (:user_id, :title, :description, false, now(), now())"
)
_VALID = {"user_id": "alice", "title": "fine", "description": None}
_CHECK_VIOLATION = "23514"
_NOT_NULL_VIOLATION = "23502"
_TOO_LONG = "22001"  # string_data_right_truncation: the VARCHAR length


def _insert(engine: Engine, **row: object) -> None:
    with engine.begin() as conn:
        conn.execute(_INSERT, {**_VALID, **row})


def _rows(engine: Engine) -> int:
    with engine.connect() as conn:
        count: int = conn.execute(text("select count(*) from tasks")).scalar_one()
    return count


@pytest.mark.parametrize(
    ("row", "codes"),
    [
        ({"title": ""}, {_CHECK_VIOLATION}),
        ({"title": "   "}, {_CHECK_VIOLATION}),
        ({"title": None}, {_NOT_NULL_VIOLATION}),
        ({"title": "x" * 201}, {_TOO_LONG, _CHECK_VIOLATION}),
        ({"user_id": ""}, {_CHECK_VIOLATION}),
        ({"user_id": " alice"}, {_CHECK_VIOLATION}),
        ({"user_id": "alice "}, {_CHECK_VIOLATION}),
        ({"user_id": "u" * 256}, {_TOO_LONG, _CHECK_VIOLATION}),
        ({"description": ""}, {_CHECK_VIOLATION}),
        ({"description": "d" * 1001}, {_TOO_LONG, _CHECK_VIOLATION}),
        ({"user_id": "\talice"}, {_CHECK_VIOLATION}),
        ({"user_id": "alice\u00a0"}, {_CHECK_VIOLATION}),
        ({"title": "bell\x07"}, {_CHECK_VIOLATION}),
        ({"description": "\x1b[31m"}, {_CHECK_VIOLATION}),
    ],
    ids=[
        "empty title",
        "blank title",
        "null title",
        "title 201",
        "empty user_id",
        "user_id leading space",
        "user_id trailing space",
        "user_id 256",
        "empty description",
        "description 1001",
        "user_id tab-padded",
        "user_id padded by no-break space",
        "title control character",
        "description escape sequence",
    ],
)
def test_raw_sql_cannot_store_an_invalid_row(
    engine: Engine, row: dict[str, object], codes: set[str]
) -> None:
    """A raw INSERT of an empty, blank, padded, over-long or control-laden field is refused."""
    with pytest.raises((IntegrityError, DataError)) as refused:
        _insert(engine, **row)
    assert isinstance(refused.value, DBAPIError)
    assert getattr(refused.value.orig, "pgcode", None) in codes
    assert _rows(engine) == 0


def test_raw_sql_stores_rows_at_the_limits(engine: Engine) -> None:
    """The constraints are not stricter than the model: every limit itself fits."""
    _insert(engine, title="x" * 200, user_id="u" * 255, description="d" * 1000)
    _insert(engine, title="\U0001f600" * 200)  # code points, not bytes
    _insert(engine, title=" padded ", user_id="a b")  # inner space and a trimmable title
    _insert(engine, description=None)
    assert _rows(engine) == 4


def test_unvalidated_input_is_refused_before_the_database(engine: Engine) -> None:
    """Data that skipped validation (model_construct) is refused by the repository, unsent."""
    repo = TaskRepository(next(get_session(engine)))
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: sent.append(str(args[2])))
    bypass = TaskCreate.model_construct(title="x" * 1_000_000, description=None, complete=False)
    with pytest.raises(ValidationError):
        repo.create("alice", bypass)
    blank = TaskCreate.model_construct(title="   ", description=None, complete=False)
    with pytest.raises(ValidationError):
        repo.create("alice", blank)
    assert sent == []
    assert _rows(engine) == 0
    assert repo.count("alice") == 0


def test_postgresql_text_cannot_hold_nul_at_all(engine: Engine) -> None:
    """NUL never reaches the server (the driver refuses it), so no CHECK needs to test for it."""
    with pytest.raises(ValueError, match="NUL"):
        _insert(engine, title="bad\x00")
    assert _rows(engine) == 0
