"""The Task table and its API schemas (data contract v1.0.0).

Field rules live once, as annotated types, and are shared by the table model and the
``TaskCreate`` / ``TaskUpdate`` / ``TaskRead`` schemas. Every rule is enforced by
pydantic before any SQL is sent (the repository validates its input again, so neither
a subclass nor ``model_copy(update=...)`` slips past). CHECK constraints keep even raw
SQL from storing an empty title or user_id, a control character or a padded user_id,
and bound the lengths; PostgreSQL's VARCHAR limits bound the raw lengths too, while on
SQLite the title check bounds the trimmed length. Tasks validate every assignment to
a field as well, so a task the repository returned cannot carry bad data into a
session either.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Final, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ColumnElement,
    DefaultClause,
    Index,
    Integer,
    Table,
)
from sqlalchemy.ext.compiler import compiles
from sqlmodel import Field, SQLModel
from sqlmodel._compat import SQLModelConfig, finish_init

__all__ = [
    "CONTROL_RANGES",
    "DESCRIPTION_MAX_LENGTH",
    "LAYOUT_CONTROLS",
    "TITLE_MAX_LENGTH",
    "USER_ID_MAX_LENGTH",
    "WHITESPACE_RANGES",
    "Description",
    "Task",
    "TaskCreate",
    "TaskRead",
    "TaskUpdate",
    "TextCheck",
    "Title",
    "UserId",
    "utc_now",
    "validate_user_id",
]

TITLE_MAX_LENGTH: Final = 200
DESCRIPTION_MAX_LENGTH: Final = 1000
USER_ID_MAX_LENGTH: Final = 255

# The character rules, stated once for every text field and every model (and repeated
# for raw SQL by the table's CHECK constraints, see TextCheck):
# - text must be encodable as UTF-8: a lone surrogate (U+D800..U+DFFF, which Python
#   strings can hold, e.g. from undecodable command-line bytes) is refused;
# - no control character (Unicode category Cc: C0 controls, DEL, C1 controls) in
#   user_id or title; a description may hold the layout controls tab, LF and CR.
#   Format characters (Cf, such as the emoji zero-width joiner) are legitimate text.
# - user_id must not start or end with whitespace of any kind (str.strip()'s set).
CONTROL_RANGES: Final = ((0x00, 0x1F), (0x7F, 0x9F))
LAYOUT_CONTROLS: Final = "\t\n\r"
# The characters str.isspace() accepts that are not controls (the controls among
# Python's whitespace are refused anywhere already); test_models.py pins the set.
WHITESPACE_RANGES: Final = (
    (0x20, 0x20),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)


def _runs(ranges: tuple[tuple[int, int], ...], *, keep: str = "") -> tuple[tuple[int, int], ...]:
    """Return the code points of *ranges* minus those in *keep* as sorted inclusive runs."""
    kept = {ord(c) for c in keep}
    points = sorted(cp for low, high in ranges for cp in range(low, high + 1) if cp not in kept)
    runs: list[tuple[int, int]] = []
    for cp in points:
        if runs and runs[-1][1] == cp - 1:
            runs[-1] = (runs[-1][0], cp)
        else:
            runs.append((cp, cp))
    return tuple(runs)


def _regex_class(runs: tuple[tuple[int, int], ...]) -> str:
    """Return the body of a regular-expression class matching the code points of *runs*."""
    return "".join(
        f"\\x{low:02x}-\\x{high:02x}"
        if high > low + 1
        else "".join(f"\\x{cp:02x}" for cp in range(low, high + 1))
        for low, high in runs
    )


_CONTROLS: Final = _runs(CONTROL_RANGES)
_CONTROLS_EXCEPT_LAYOUT: Final = _runs(CONTROL_RANGES, keep=LAYOUT_CONTROLS)
_WHITESPACE: Final = _runs(WHITESPACE_RANGES)
_CONTROL: Final = re.compile(f"[{_regex_class(_CONTROLS)}]")
_CONTROL_EXCEPT_LAYOUT: Final = re.compile(f"[{_regex_class(_CONTROLS_EXCEPT_LAYOUT)}]")


class TextCheck(ColumnElement[bool]):
    r"""A CHECK condition keeping a text column to the character rules, per database.

    Raw SQL must not store what the validators refuse, so the table repeats their
    rules: none of the *forbidden* code-point runs anywhere in *column*, and none of
    the *edges* runs at either end. SQLite has no regular expressions without an
    extension and PostgreSQL has no GLOB, so the condition compiles per dialect from
    the same runs the validators use (specs/002-database-setup/research.md): GLOB
    with a character class built by ``char()``, a NUL test on the bytes and
    ``trim()`` for the ends on SQLite; a regular expression with ``\u`` escapes on
    PostgreSQL (whose text can never hold NUL). A NULL value passes, as in every
    CHECK constraint.
    """

    inherit_cache = False

    def __init__(
        self,
        column: str,
        forbidden: tuple[tuple[int, int], ...],
        *,
        edges: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self.column = column
        # NUL is tested separately on SQLite and cannot occur on PostgreSQL.
        self.forbidden = tuple((max(low, 1), high) for low, high in forbidden if high >= 1)
        self.edges = edges


def _sqlite_class(runs: tuple[tuple[int, int], ...]) -> str:
    return " || ".join(
        f"char({low})" if low == high else f"char({low}) || '-' || char({high})"
        for low, high in runs
    )


def _postgresql_class(runs: tuple[tuple[int, int], ...]) -> str:
    return "".join(
        f"\\u{low:04x}" if low == high else f"\\u{low:04x}-\\u{high:04x}" for low, high in runs
    )


@compiles(TextCheck, "sqlite")
def _text_check_on_sqlite(element: TextCheck, _compiler: Any, **_kw: Any) -> str:
    column = element.column
    anywhere = _sqlite_class(element.forbidden)
    conditions = [
        f"instr(CAST({column} AS BLOB), x'00') = 0",
        f"{column} NOT GLOB ('*[' || {anywhere} || ']*')",
    ]
    if element.edges:
        edge = ", ".join(str(cp) for low, high in element.edges for cp in range(low, high + 1))
        conditions.append(f"{column} = trim({column}, char({edge}))")
    return " AND ".join(conditions)


@compiles(TextCheck, "postgresql")
@compiles(TextCheck)  # the production database's form, e.g. for str() and rendered code
def _text_check_on_postgresql(element: TextCheck, _compiler: Any, **_kw: Any) -> str:
    column = element.column
    conditions = [f"{column} !~ '[{_postgresql_class(element.forbidden)}]'"]
    if element.edges:
        edge = _postgresql_class(element.edges)
        conditions.append(f"{column} !~ '^[{edge}]|[{edge}]$'")
    return " AND ".join(conditions)


# The same rules as JSON Schema patterns for TaskRead's schema (data contract v1.0.0).
_NO_CONTROL_PATTERN: Final = f"^[^{_regex_class(_CONTROLS)}]*$"
_NO_CONTROL_EXCEPT_LAYOUT_PATTERN: Final = f"^[^{_regex_class(_CONTROLS_EXCEPT_LAYOUT)}]*$"


def utc_now() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def _text_rule(field: str, forbidden: re.Pattern[str], *, strip: bool = False) -> Any:
    """Build the character rule of *field*, run before pydantic's own string checks.

    Refuses text that UTF-8 cannot encode and any character *forbidden* matches,
    naming the character and its position; with *strip*, ``str.strip()`` comes first.
    Non-strings pass through untouched for the strict type check to refuse.
    """

    def check(value: object) -> object:
        if not isinstance(value, str):
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{field} must be text that UTF-8 can encode (found the lone surrogate "
                f"U+{ord(value[err.start]):04X} at position {err.start})"
            ) from None
        if strip:
            # str.strip() semantics, as the contract promises; pydantic's own strip
            # differs (it keeps U+001C..U+001F, which Python counts as whitespace).
            value = value.strip()
        found = forbidden.search(value)
        if found is not None:
            raise ValueError(
                f"{field} must not contain control characters "
                f"(found U+{ord(found.group()):04X} at position {found.start()})"
            )
        return value

    return BeforeValidator(check)


def _empty_to_none(value: object) -> object:
    return None if value == "" else value


def _no_surrounding_space(value: str) -> str:
    if value != value.strip():
        raise ValueError("user_id must not start or end with whitespace")
    return value


UserId = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=USER_ID_MAX_LENGTH),
    _text_rule("user_id", _CONTROL),
    AfterValidator(_no_surrounding_space),
]
"""An owner id: 1..255 code points, no control characters, no surrounding whitespace."""

Title = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=TITLE_MAX_LENGTH),
    _text_rule("title", _CONTROL, strip=True),
]
"""A task title: stripped, then 1..200 code points, no control characters."""

_DescriptionText = Annotated[
    str,
    StringConstraints(strict=True, max_length=DESCRIPTION_MAX_LENGTH),
    _text_rule("description", _CONTROL_EXCEPT_LAYOUT),
]
Description = Annotated[_DescriptionText | None, BeforeValidator(_empty_to_none)]
"""An optional description: up to 1000 code points; tab, CR and LF allowed; "" means None."""


class _Owner(BaseModel):
    # Titled, so that an error names the field: "1 validation error for user_id"; and
    # validated as a field, so that each error's loc is ("user_id",) (an API's 422
    # tells the client which input was wrong).
    model_config = ConfigDict(title="user_id")
    user_id: UserId


def validate_user_id(user_id: object) -> str:
    """Validate *user_id* exactly as the model does; raise ``ValidationError`` if invalid.

    Each error's location is ``("user_id",)``. Every repository call validates its
    owner, and an API sees the same few users again and again: the answers for the
    last few thousand valid strings are kept (a refused one is checked every time).
    """
    if type(user_id) is str:
        return _valid_user_id(user_id)
    return _Owner.model_validate({"user_id": user_id}).user_id


@lru_cache(maxsize=4096)
def _valid_user_id(user_id: str) -> str:
    return _Owner.model_validate({"user_id": user_id}).user_id


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
    return Field(
        max_length=USER_ID_MAX_LENGTH,
        schema_extra={"json_schema_extra": {"pattern": _NO_CONTROL_PATTERN}},
    )


# Assignments are validated too: `task_create.title = "\x00"` raises like the constructor.
_CHECK_ASSIGNMENTS: Final = SQLModelConfig(validate_assignment=True)


class TaskContent(SQLModel):
    """The fields a user writes: THE declaration of every content field of a task.

    A field declared here is a column of ``tasks`` (through :class:`TaskFields`), an
    input of :class:`TaskCreate` and an output of :class:`TaskRead`, and the
    repository inserts, returns and lists it. It must also be declared, optional, on
    :class:`TaskUpdate` (whose fields mypy must see one by one); the repository
    contract fails, naming the field, when one is missing anywhere.
    """

    model_config = _CHECK_ASSIGNMENTS
    title: Title = _title_field()
    description: Description = _description_field()
    complete: StrictBool = False


class _Key(SQLModel):
    """The columns that place a task: its id and its owner (set by the database and caller)."""

    id: int | None = Field(default=None, primary_key=True)
    user_id: UserId = _user_id_field()


class _Times(SQLModel):
    """The columns the repository sets: when a task was created and last changed."""

    created_at: AwareDatetime = Field(default_factory=utc_now)
    updated_at: AwareDatetime = Field(default_factory=utc_now)


# Bases in this order give the columns the order id, user_id, content..., created_at,
# updated_at (pydantic orders fields from the last base to the first).
class TaskFields(_Times, TaskContent, _Key):
    """Every column of a task, validated: what ``Task(...)`` is checked against."""

    # Task validates assignments itself (Task.__setattr__), once.
    model_config = SQLModelConfig(validate_assignment=False)


_FIELD_NAMES: Final = frozenset(TaskFields.model_fields)
_BUILDING: Final[ContextVar[bool]] = ContextVar("todo_backend_task_building", default=False)


def _validated_field(name: str, value: object) -> Any:
    # Validated on a throwaway TaskFields, so the error names the field like Task(...).
    probe = TaskFields.model_construct()
    TaskFields.__pydantic_validator__.validate_assignment(probe, name, value)
    return probe.__dict__[name]


class Task(TaskFields, table=True):
    """A todo item owned by one user: the ``tasks`` table.

    Unlike a plain SQLModel table model, ``Task(...)`` validates its input (sqlmodel
    skips validation for ``table=True`` models) and so does every assignment to a
    field, on new tasks and on those the repository returns alike: bad data raises
    ``ValidationError``, so an invalid task can never reach a session. Timestamps are aware UTC
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
        # The character rules of the validators above, for raw SQL (TextCheck).
        CheckConstraint(
            TextCheck("user_id", _CONTROLS, edges=_WHITESPACE), name="ck_tasks_user_id_text"
        ),
        CheckConstraint(TextCheck("title", _CONTROLS), name="ck_tasks_title_text"),
        CheckConstraint(
            TextCheck("description", _CONTROLS_EXCEPT_LAYOUT), name="ck_tasks_description_text"
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
        building = _BUILDING.set(True)  # the values are validated: skip __setattr__'s check
        try:
            super().__init__(**data)
        finally:
            _BUILDING.reset(building)

    @classmethod
    def model_validate(cls, *args: Any, **kwargs: Any) -> Self:
        """Validate like ``TaskFields`` (sqlmodel's path), then set the values unchecked."""
        building = _BUILDING.set(True)  # sqlmodel assigns the values it just validated
        try:
            return super().model_validate(*args, **kwargs)
        finally:
            _BUILDING.reset(building)

    def __setattr__(self, name: str, value: Any) -> None:
        r"""Validate an assignment to a field before SQLAlchemy or pydantic store it.

        SQLModel's own ``validate_assignment`` hands the value to SQLAlchemy first and
        validates afterwards, so a refused value would still reach the session; here
        ``task.title = "bad\x00"`` raises ``ValidationError`` and leaves the task,
        and its pending changes, as they were.
        """
        if name in _FIELD_NAMES and not _BUILDING.get():
            value = _validated_field(name, value)
        super().__setattr__(name, value)


# The columns of revision 0001 (data contract v1.0.0), whose DDL is frozen as it is.
_FIRST_COLUMNS: Final = frozenset(
    {"id", "user_id", "title", "description", "complete", "created_at", "updated_at"}
)


def _server_default(value: object) -> DefaultClause | None:
    """Return the DDL default for a scalar Python *value*, or None when it has no literal.

    Always a quoted literal ('0' for False, '5', 'text'): PostgreSQL casts it to the
    column's type, SQLite's column affinity stores it as a number, and Alembic adds
    such a column on SQLite without rebuilding the table (an SQL expression default
    would force the rebuild).
    """
    if isinstance(value, bool):  # before int: True is an int too
        return DefaultClause("1" if value else "0")
    if isinstance(value, int | float | str):
        return DefaultClause(str(value))
    return None


def _map_column(column: Column[Any]) -> None:
    """Give a content column the DDL a live table can take (see :func:`_map_columns`)."""
    if type(column.type) is Integer and not column.primary_key:
        column.type = BigInteger()
    default = column.default
    if (
        column.name in _FIRST_COLUMNS
        or column.nullable
        or column.server_default is not None
        or default is None
        or not default.is_scalar
    ):
        return
    clause = _server_default(getattr(default, "arg", None))
    if clause is not None:
        column.server_default = clause
        clause.column = column


def _map_columns(table: Table) -> None:
    """Map the fields declared on the models to column DDL safe for a live table.

    A Python ``int`` field is a ``BIGINT`` column (an ``INTEGER`` overflows at 2**31
    and widening it later rewrites the table), and a ``NOT NULL`` field added after
    the first revision with a scalar default (``flag: bool = False``) gets that
    default in the DDL too: adding such a column to a table with rows then needs no
    rewrite (PostgreSQL 11 and later) and no backfill, and a writer that predates the
    column still inserts. ``init_db`` and the revisions that ``migrate revision``
    generates both follow from this mapping.
    """
    for column in table.columns:
        _map_column(column)


_map_columns(SQLModel.metadata.tables["tasks"])


class TaskCreate(TaskContent):
    """Input for creating a task; the owner comes from the authenticated caller."""


def _accepts_none(name: str) -> bool:
    """Whether content field *name* may hold None (then None given to an update clears it)."""
    try:
        TaskContent.__pydantic_validator__.validate_assignment(
            TaskContent.model_construct(), name, None
        )
    except ValidationError:
        return False
    return True


# The content fields an update may omit but not set to None: derived from TaskContent.
_NOT_NULL: Final = frozenset(name for name in TaskContent.model_fields if not _accepts_none(name))


class TaskUpdate(SQLModel):
    """A partial update: only the fields given explicitly change.

    Every field of :class:`TaskContent`, declared again as optional so that mypy sees
    each one. ``None`` clears a field that may be null (``description=None``); for the
    others (``title``, ``complete``) it is refused: they may be omitted instead.
    """

    model_config = _CHECK_ASSIGNMENTS
    title: Title | None = _title_field(default=None)
    description: Description = _description_field()
    complete: StrictBool | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: object, info: ValidationInfo) -> object:
        if value is None and info.field_name in _NOT_NULL:
            raise ValueError("may be omitted but not set to null")
        return value

    def changes(self) -> dict[str, Any]:
        """Return the explicitly set fields, ready for an UPDATE's SET clause."""
        return self.model_dump(exclude_unset=True)


class TaskRead(_Times, TaskContent, _Key):
    """A stored task as the API returns it; timestamps serialise as ISO-8601 UTC.

    Built from a ``Task`` with ``TaskRead.model_validate(task)`` (SQLModel reads
    attributes by default).
    """

    # A stored task has all of these (data contract v1.0.0: required in the schema).
    id: int
    complete: StrictBool
    created_at: AwareDatetime
    updated_at: AwareDatetime
