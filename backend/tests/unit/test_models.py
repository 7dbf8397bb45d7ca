"""Validation rules of the Task model and its schemas (the contract's validation table)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, event
from sqlmodel import Session

from todo_backend.models import (
    DESCRIPTION_MAX_LENGTH,
    TITLE_MAX_LENGTH,
    USER_ID_MAX_LENGTH,
    Task,
    TaskCreate,
    TaskRead,
    TaskUpdate,
    validate_user_id,
)

C1_CONTROL = "\x85"
LONE_SURROGATE = "\ud800"


def task(**overrides: Any) -> Task:
    """Build a Task from valid defaults and *overrides*."""
    return Task(**{"user_id": "alice", "title": "buy milk", **overrides})


@pytest.mark.parametrize(
    "user_id", ["a", "user-123", "x" * USER_ID_MAX_LENGTH, "ユーザー", "a b", "\U0001f600"]
)
def test_user_id_accepted(user_id: str) -> None:
    """A user_id of 1..255 characters with no surrounding whitespace is kept as is."""
    assert task(user_id=user_id).user_id == user_id
    assert validate_user_id(user_id) == user_id


@pytest.mark.parametrize(
    "user_id",
    [
        None,
        "",
        "   ",
        " a",
        "a ",
        "a\tb",
        "a\x00",
        "x" * (USER_ID_MAX_LENGTH + 1),
        42,
        b"a",
        LONE_SURROGATE,
    ],
)
def test_user_id_rejected(user_id: object) -> None:
    """None, blank, padded, control characters, over-long and non-str user_ids are refused."""
    with pytest.raises(ValidationError):
        task(user_id=user_id)
    with pytest.raises(ValidationError):
        validate_user_id(user_id)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("buy milk", "buy milk"),
        ("  padded  ", "padded"),
        ("\u3000ideographic space\u2003", "ideographic space"),
        ("x" * TITLE_MAX_LENGTH, "x" * TITLE_MAX_LENGTH),
        ("  " + "y" * TITLE_MAX_LENGTH + "\n", "y" * TITLE_MAX_LENGTH),
        ("\U0001f600" * TITLE_MAX_LENGTH, "\U0001f600" * TITLE_MAX_LENGTH),
        ("\U0001f469\u200d\U0001f4bb code", "\U0001f469\u200d\U0001f4bb code"),
    ],
)
def test_title_accepted_and_stripped(given: str, stored: str) -> None:
    """A title is stripped like str.strip(), then 1..200 code points are accepted."""
    assert task(title=given).title == stored
    assert TaskCreate(title=given).title == stored


@pytest.mark.parametrize(
    "title",
    [
        None,
        "",
        "   ",
        "\n\t ",
        "x" * (TITLE_MAX_LENGTH + 1),
        "a\x00b",
        "a\nb",
        "a\tb",
        "a\x7fb",
        f"a{C1_CONTROL}b",
        123,
        12.5,
        ["a"],
        LONE_SURROGATE,
        f"ok{LONE_SURROGATE}",
    ],
)
def test_title_rejected(title: object) -> None:
    """Missing, blank, over-long, control-character, non-str and non-UTF-8 titles are refused."""
    with pytest.raises(ValidationError):
        task(title=title)
    with pytest.raises(ValidationError):
        TaskCreate.model_validate({"title": title})


def test_title_length_is_checked_after_stripping() -> None:
    """201 characters that strip to 200 are accepted; 201 after stripping are not."""
    assert len(task(title=" " + "a" * 200 + " ").title) == 200
    with pytest.raises(ValidationError, match="at most 200"):
        task(title=" " + "a" * 201 + " ")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (None, None),
        ("", None),
        ("plain", "plain"),
        ("line\nbreak\r\nand\ttab", "line\nbreak\r\nand\ttab"),
        ("  kept padding  ", "  kept padding  "),
        ("d" * DESCRIPTION_MAX_LENGTH, "d" * DESCRIPTION_MAX_LENGTH),
        ("\u0928\u092e\u0938\u094d\u0924\u0947", "\u0928\u092e\u0938\u094d\u0924\u0947"),
    ],
)
def test_description_accepted(given: str | None, stored: str | None) -> None:
    """None or up to 1000 characters; tab, CR and LF kept; "" becomes None."""
    assert task(description=given).description == stored
    assert TaskCreate(title="t", description=given).description == stored


@pytest.mark.parametrize(
    "description",
    ["a\x00", "a\x1b[31m", f"a{C1_CONTROL}", "d" * (DESCRIPTION_MAX_LENGTH + 1), 5, LONE_SURROGATE],
)
def test_description_rejected(description: object) -> None:
    """NUL and other control characters, 1001 characters and non-str are refused."""
    with pytest.raises(ValidationError):
        task(description=description)


@pytest.mark.parametrize("complete", [True, False])
def test_complete_accepts_booleans(complete: bool) -> None:
    """complete takes a real bool."""
    assert task(complete=complete).complete is complete


@pytest.mark.parametrize("complete", ["yes", "true", 1, 0, None, 1.0])
def test_complete_rejects_non_booleans(complete: object) -> None:
    """Strings, numbers and None are not coerced to a bool."""
    with pytest.raises(ValidationError):
        task(complete=complete)
    with pytest.raises(ValidationError):
        TaskCreate.model_validate({"title": "t", "complete": complete})


def test_defaults() -> None:
    """A new task is pending, has no id or description, and equal aware UTC timestamps."""
    new = task()
    assert new.id is None
    assert new.complete is False
    assert new.description is None
    assert new.created_at.utcoffset() == timedelta(0)
    assert new.updated_at.utcoffset() == timedelta(0)
    assert abs(new.created_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_naive_timestamps_are_rejected() -> None:
    """A timestamp without a timezone is refused rather than guessed."""
    with pytest.raises(ValidationError):
        task(created_at=datetime(2026, 1, 1))  # noqa: DTZ001 - the naive value under test


def test_aware_timestamps_in_other_zones_are_accepted() -> None:
    """An aware timestamp in another zone is kept as the same instant."""
    ist = timezone(timedelta(hours=5, minutes=30))
    moment = datetime(2026, 1, 1, 12, 0, tzinfo=ist)
    assert task(created_at=moment).created_at == moment


def test_model_validate_validates_table_model() -> None:
    """Task.model_validate() applies the same rules as Task()."""
    assert Task.model_validate({"user_id": "u", "title": " t "}).title == "t"
    with pytest.raises(ValidationError):
        Task.model_validate({"user_id": "u", "title": ""})
    with pytest.raises(ValidationError):
        Task()


def test_invalid_task_never_reaches_sql(sqlite_engine: Engine) -> None:
    """Validation fails in the constructor, so no statement is sent for a bad task."""
    sent: list[str] = []
    event.listen(sqlite_engine, "before_cursor_execute", lambda *a: sent.append(str(a[2])))
    with Session(sqlite_engine) as session:
        with pytest.raises(ValidationError):
            task(title="\x00")
        session.commit()
    assert sent == []


def test_valid_task_can_be_added_through_a_plain_session(sqlite_engine: Engine) -> None:
    """A validated Task is a normal SQLModel table row for code that uses the session."""
    with Session(sqlite_engine) as session:
        session.add(task(title="via session"))
        session.commit()
        stored = session.get(Task, 1)
        assert stored is not None
        assert stored.title == "via session"
        assert stored.created_at.utcoffset() == timedelta(0)


def test_update_sets_only_given_fields() -> None:
    """TaskUpdate reports only the fields given, including an explicit description=None."""
    assert TaskUpdate().changes() == {}
    assert TaskUpdate(complete=True).changes() == {"complete": True}
    assert TaskUpdate(description=None).changes() == {"description": None}
    assert TaskUpdate(title="  t ").changes() == {"title": "t"}
    assert TaskUpdate(description="").changes() == {"description": None}


@pytest.mark.parametrize("field", ["title", "complete"])
def test_update_refuses_null_for_required_fields(field: str) -> None:
    """title and complete may be omitted from an update but not set to null."""
    with pytest.raises(ValidationError, match="not set to null"):
        TaskUpdate.model_validate({field: None})


@pytest.mark.parametrize(
    "payload", [{"title": ""}, {"title": "a\x00"}, {"complete": "yes"}, {"description": 1}]
)
def test_update_applies_field_rules(payload: dict[str, object]) -> None:
    """TaskUpdate validates given fields with the same rules as TaskCreate."""
    with pytest.raises(ValidationError):
        TaskUpdate.model_validate(payload)


def test_read_serialises_utc_iso_timestamps() -> None:
    """TaskRead JSON carries every field and ISO-8601 timestamps with a zero UTC offset."""
    moment = datetime(2026, 11, 25, 10, 30, 0, 123456, tzinfo=UTC)
    read = TaskRead.model_validate(task(id=7, created_at=moment, updated_at=moment))
    data = json.loads(read.model_dump_json())
    assert set(data) == {
        "id",
        "user_id",
        "title",
        "description",
        "complete",
        "created_at",
        "updated_at",
    }
    parsed = datetime.fromisoformat(data["created_at"])
    assert parsed == moment
    assert parsed.utcoffset() == timedelta(0)


def test_read_requires_an_id() -> None:
    """TaskRead describes stored tasks: an unsaved task (no id) does not fit."""
    with pytest.raises(ValidationError):
        TaskRead.model_validate(task())


def test_error_messages_name_the_control_character() -> None:
    """The message says which control character was found and where."""
    with pytest.raises(ValidationError, match=r"U\+0000 at position 1"):
        task(title="a\x00b")
