"""The Task table and its API schemas (data contract v1.0.0).

Field rules live once, as annotated types, and are shared by the table model and the
``TaskCreate`` / ``TaskUpdate`` / ``TaskRead`` schemas. Every rule is enforced by
pydantic before any SQL is sent (the repository validates its input again, so neither
a subclass nor ``model_copy(update=...)`` slips past). CHECK constraints keep even raw
SQL from storing an empty title or user_id, and bound the lengths; PostgreSQL's
VARCHAR limits bound the raw lengths too, while on SQLite the title check bounds the
trimmed length.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    StrictBool,
    StringConstraints,
    TypeAdapter,
    field_validator,
)
from sqlalchemy import BigInteger, CheckConstraint, Index, Integer
from sqlmodel import Field, SQLModel
from sqlmodel._compat import SQLModelConfig, finish_init

__all__ = [
    "DESCRIPTION_MAX_LENGTH",
    "TITLE_MAX_LENGTH",
    "USER_ID_MAX_LENGTH",
    "Description",
    "Task",
    "TaskCreate",
    "TaskRead",
    "TaskUpdate",
    "Title",
    "UserId",
    "utc_now",
    "validate_user_id",
]

TITLE_MAX_LENGTH: Final = 200
DESCRIPTION_MAX_LENGTH: Final = 1000
USER_ID_MAX_LENGTH: Final = 255

# C0 controls, DEL and C1 controls (Unicode category Cc). Emoji joiners and other
# format characters (Cf) are legitimate text and stay allowed.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Descriptions are multi-line text: tab, newline and carriage return are kept.
_CONTROL_EXCEPT_LAYOUT: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_NO_CONTROL_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]*$"
_NO_CONTROL_EXCEPT_LAYOUT_PATTERN: Final = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"


def utc_now() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def _reject(pattern: re.Pattern[str], what: str) -> Any:
    def check(value: str) -> str:
        found = pattern.search(value)
        if found is not None:
            raise ValueError(
                f"{what} must not contain control characters "
                f"(found U+{ord(found.group()):04X} at position {found.start()})"
            )
        return value

    return check


def _strip(value: object) -> object:
    # str.strip() semantics, as the contract promises; pydantic's own strip differs
    # (it keeps U+001C..U+001F, which Python counts as whitespace).
    return value.strip() if isinstance(value, str) else value


def _empty_to_none(value: object) -> object:
    return None if value == "" else value


def _no_surrounding_space(value: str) -> str:
    if value != value.strip():
        raise ValueError("user_id must not start or end with whitespace")
    return value


UserId = Annotated[
    str,
    StringConstraints(
        strict=True, min_length=1, max_length=USER_ID_MAX_LENGTH, pattern=_NO_CONTROL_PATTERN
    ),
    AfterValidator(_no_surrounding_space),
]
"""An owner id: 1..255 code points, no control characters, no surrounding whitespace."""

Title = Annotated[
    str,
    BeforeValidator(_strip),
    StringConstraints(strict=True, min_length=1, max_length=TITLE_MAX_LENGTH),
    AfterValidator(_reject(_CONTROL, "title")),
]
"""A task title: stripped, then 1..200 code points, no control characters."""

_DescriptionText = Annotated[
    str,
    StringConstraints(strict=True, max_length=DESCRIPTION_MAX_LENGTH),
    AfterValidator(_reject(_CONTROL_EXCEPT_LAYOUT, "description")),
]
Description = Annotated[_DescriptionText | None, BeforeValidator(_empty_to_none)]
"""An optional description: up to 1000 code points; tab, CR and LF allowed; "" means None."""

_user_id_adapter: Final[TypeAdapter[str]] = TypeAdapter(UserId)


def validate_user_id(user_id: object) -> str:
    """Validate *user_id* exactly as the model does; raise ``ValidationError`` if invalid."""
    return _user_id_adapter.validate_python(user_id)


def _title_field(default: Any = ...) -> Any:
    return Field(
        default=default,
        max_length=TITLE_MAX_LENGTH,
        schema_extra={"json_schema_extra": {"pattern": _NO_CONTROL_PATTERN}},
    )


def _description_field() -> Any:
    return Field(
        default=None,
        max_length=DESCRIPTION_MAX_LENGTH,
        schema_extra={"json_schema_extra": {"pattern": _NO_CONTROL_EXCEPT_LAYOUT_PATTERN}},
    )


def _user_id_field() -> Any:
    return Field(max_length=USER_ID_MAX_LENGTH)


# Assignments are validated too: `task_create.title = "\x00"` raises like the constructor.
_CHECK_ASSIGNMENTS: Final = SQLModelConfig(validate_assignment=True)


class TaskContent(SQLModel):
    """The fields a user writes: title, description and completion state."""

    model_config = _CHECK_ASSIGNMENTS
    title: Title = _title_field()
    description: Description = _description_field()
    complete: StrictBool = False


class TaskFields(SQLModel):
    """Every column of a task, validated: what ``Task(...)`` is checked against."""

    id: int | None = Field(default=None, primary_key=True)
    user_id: UserId = _user_id_field()
    title: Title = _title_field()
    description: Description = _description_field()
    complete: StrictBool = False
    created_at: AwareDatetime = Field(default_factory=utc_now)
    updated_at: AwareDatetime = Field(default_factory=utc_now)


class Task(TaskFields, table=True):
    """A todo item owned by one user: the ``tasks`` table.

    Unlike a plain SQLModel table model, ``Task(...)`` validates its input (sqlmodel
    skips validation for ``table=True`` models) and raises ``ValidationError`` on bad
    data, so an invalid task can never reach a session. Timestamps are aware UTC
    datetimes on PostgreSQL and SQLite alike.
    """

    __tablename__ = "tasks"
    __table_args__ = (
        # Newest-first listing and keyset pagination for one user walk these backwards;
        # the leading user_id column also serves every owner lookup.
        Index("ix_tasks_user_id_id", "user_id", "id"),
        Index("ix_tasks_user_id_complete_id", "user_id", "complete", "id"),
        CheckConstraint(
            f"length(user_id) BETWEEN 1 AND {USER_ID_MAX_LENGTH} AND user_id = trim(user_id)",
            name="ck_tasks_user_id_valid",
        ),
        CheckConstraint(
            f"length(trim(title)) BETWEEN 1 AND {TITLE_MAX_LENGTH}",
            name="ck_tasks_title_valid",
        ),
        CheckConstraint(
            f"description IS NULL OR length(description) BETWEEN 1 AND {DESCRIPTION_MAX_LENGTH}",
            name="ck_tasks_description_valid",
        ),
    )

    id: int | None = Field(
        default=None,
        primary_key=True,
        # BIGINT on PostgreSQL; SQLite only auto-increments a plain INTEGER primary key.
        sa_type=BigInteger().with_variant(Integer(), "sqlite"),
    )

    def __init__(self, **data: Any) -> None:
        if finish_init.get():
            # sqlmodel's model_validate() calls __init__ with finish_init unset after
            # validating; every other call validates here first.
            data = TaskFields.model_validate(data).model_dump()
        super().__init__(**data)


class TaskCreate(TaskContent):
    """Input for creating a task; the owner comes from the authenticated caller."""


class TaskUpdate(SQLModel):
    """A partial update: only the fields given explicitly change.

    ``description=None`` clears the description; ``title`` and ``complete`` may be
    omitted but not set to None.
    """

    model_config = _CHECK_ASSIGNMENTS
    title: Title | None = _title_field(default=None)
    description: Description = _description_field()
    complete: StrictBool | None = None

    @field_validator("title", "complete", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("may be omitted but not set to null")
        return value

    def changes(self) -> dict[str, Any]:
        """Return the explicitly set fields, ready for an UPDATE's SET clause."""
        return self.model_dump(exclude_unset=True)


class TaskRead(SQLModel):
    """A stored task as the API returns it; timestamps serialise as ISO-8601 UTC.

    Built from a ``Task`` with ``TaskRead.model_validate(task)`` (SQLModel reads
    attributes by default).
    """

    model_config = _CHECK_ASSIGNMENTS
    id: int
    user_id: UserId = _user_id_field()
    title: Title = _title_field()
    description: Description = _description_field()
    complete: StrictBool
    created_at: AwareDatetime
    updated_at: AwareDatetime
