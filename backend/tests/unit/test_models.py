"""Validation rules of the Task model and its schemas (the contract's validation table)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import Engine, event
from sqlmodel import Session

from todo_backend.models import (
    DESCRIPTION_MAX_LENGTH,
    TITLE_MAX_LENGTH,
    USER_ID_MAX_LENGTH,
    WHITESPACE_RANGES,
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
    assert set(data) == set(Task.model_fields) == set(TaskRead.model_fields)
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


# -- the character rules, on every model ----------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_awkward = st.characters(categories=["Cs", "Cc", "Zs", "Zl", "Zp", "Cf"])
_any_text = st.one_of(
    st.text(st.one_of(_awkward, st.characters()), max_size=12),
    st.tuples(st.text(_awkward, max_size=3), st.text(min_size=1, max_size=8)).map(
        lambda parts: parts[0] + parts[1] + parts[0]
    ),
    st.text(min_size=TITLE_MAX_LENGTH - 2, max_size=TITLE_MAX_LENGTH + 2),
)


def _encodable(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _expected(field: str, text: str) -> bool:
    """Whether *text* is acceptable as *field*, by the rules restated independently."""
    if not _encodable(text):
        return False
    if field == "title":
        stripped = text.strip()
        return 1 <= len(stripped) <= TITLE_MAX_LENGTH and not _CONTROL.search(stripped)
    if field == "description":
        return len(text) <= DESCRIPTION_MAX_LENGTH and not _CONTROL.search(
            re.sub(r"[\t\n\r]", "", text)
        )
    return (
        1 <= len(text) <= USER_ID_MAX_LENGTH and text == text.strip() and not _CONTROL.search(text)
    )


def _acceptance(field: str, text: str) -> dict[str, bool]:
    """Whether each model (and validate_user_id) accepts *text* as *field*."""
    stored = {"id": 1, "user_id": "alice", "title": "t", "complete": False}
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    attempts: dict[str, Callable[[], object]] = {
        "Task": lambda: task(**{field: text}),
        "Task assignment": lambda: setattr(task(), field, text),
        "TaskRead": lambda: TaskRead.model_validate(
            {**stored, "created_at": moment, "updated_at": moment, field: text}
        ),
    }
    if field == "user_id":
        attempts["validate_user_id"] = lambda: validate_user_id(text)
    else:
        attempts["TaskCreate"] = lambda: TaskCreate.model_validate({"title": "t", field: text})
        attempts["TaskUpdate"] = lambda: TaskUpdate.model_validate({field: text})
    accepted = {}
    unnamed = []
    for name, attempt in attempts.items():
        try:
            attempt()
        except ValidationError as err:
            accepted[name] = False
            if field not in str(err):
                unnamed.append(str(err))
        else:
            accepted[name] = True
    assert unnamed == []  # every error names the field
    return accepted


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(["user_id", "title", "description"]), text=_any_text)
def test_every_model_applies_the_same_character_rules(field: str, text: str) -> None:
    """Surrogates, controls and padding: every model accepts exactly what the rules allow."""
    accepted = _acceptance(field, text)
    assert accepted == dict.fromkeys(accepted, _expected(field, text))


@pytest.mark.parametrize("field", ["title", "description"])
def test_update_refuses_a_lone_surrogate(field: str) -> None:
    """TaskUpdate refuses text UTF-8 cannot encode, like TaskCreate, naming the field."""
    for model in (TaskUpdate, TaskCreate):
        with pytest.raises(ValidationError, match=f"{field}\n.*lone surrogate U\\+D800"):
            model.model_validate({"title": "t", field: f"a{LONE_SURROGATE}b"})


def test_a_refused_user_id_is_named() -> None:
    """validate_user_id's error names user_id, as the models' errors name their fields."""
    with pytest.raises(ValidationError, match="1 validation error for user_id"):
        validate_user_id(f"a{LONE_SURROGATE}")


def test_the_whitespace_refused_around_user_id_is_pythons() -> None:
    """The whitespace the CHECK constraint refuses around user_id is str.strip()'s set."""
    python = {cp for cp in range(0x110000) if chr(cp).isspace() and not _CONTROL.match(chr(cp))}
    declared = {cp for low, high in WHITESPACE_RANGES for cp in range(low, high + 1)}
    assert declared == python


def test_assignment_to_a_task_is_validated_before_it_is_stored() -> None:
    """A refused assignment raises and leaves the task as it was; a valid one is normalised."""
    new = task(description="keep")
    with pytest.raises(ValidationError, match="title"):
        new.title = "bad\x00"
    with pytest.raises(ValidationError, match="created_at"):
        new.created_at = datetime(2026, 1, 1)  # noqa: DTZ001 - the naive value under test
    assert new.title == "buy milk"
    new.title = "  trimmed  "
    new.description = ""
    assert new.model_dump(include={"title", "description"}) == {
        "title": "trimmed",
        "description": None,
    }


def test_a_refused_assignment_never_reaches_the_session(sqlite_engine: Engine) -> None:
    """SQLModel would hand the value to SQLAlchemy before validating; Task validates first."""
    with Session(sqlite_engine, expire_on_commit=False) as session:
        stored = task()
        session.add(stored)
        session.commit()
        with pytest.raises(ValidationError):
            stored.title = "bad\x00"
        assert not session.dirty
        session.commit()
    with Session(sqlite_engine) as session:
        again = session.get(Task, stored.id)
        assert again is not None
        assert again.title == "buy milk"
