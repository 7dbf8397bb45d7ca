"""Repository behaviour every supported database must show.

``tests/unit/test_repository.py`` runs this suite on SQLite and
``tests/integration/test_repository_pg.py`` on PostgreSQL; each provides ``engine``.
The repository and session fixtures come from ``tests/conftest.py``;
``tests/async_face.py`` replaces them to run the same suite on AsyncTaskRepository.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import Engine, event, orm, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel import Session

from todo_backend.errors import DatabaseStatementError, SchemaMissingError, TodoBackendError
from todo_backend.models import Task, TaskCreate, TaskRead, TaskUpdate
from todo_backend.repository import MAX_PAGE_SIZE, TaskRepository

ALICE = "alice"
BOB = "bob"

# Text the character rules refuse in every field: a lone surrogate (UTF-8 cannot
# encode it), NUL, a C0 escape and a C1 control.
REFUSED_EVERYWHERE = ["a\ud800b", "a\x00b", "a\x1bb", "a\x85b"]
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Any text, weighted towards what the rules are about: surrogates, controls (NUL
# included), whitespace and format characters, around ordinary text.
_awkward = st.characters(categories=["Cs", "Cc", "Zs", "Zl", "Zp", "Cf"])
_any_text = st.one_of(
    st.text(st.one_of(_awkward, st.characters()), max_size=12),
    st.tuples(st.text(_awkward, max_size=3), st.text(min_size=1, max_size=8)).map(
        lambda parts: parts[0] + parts[1] + parts[0]
    ),
)
# The contract runs once per database and face (several subclasses, one function):
# each run's examples stand on their own, so differing executors are by design.
_properties = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.differing_executors,
    ],
)


def _encodable(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _acceptable_title(title: str) -> bool:
    stripped = title.strip()
    return _encodable(title) and 1 <= len(stripped) <= 200 and not _CONTROL.search(stripped)


_RAW_INSERT = text(
    "insert into tasks (user_id, title, description, complete, created_at, updated_at) "
    "values (:user_id, :title, :description, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
)
_RAW_VALID = {"user_id": "alice", "title": "fine", "description": None}


def _new(repo: TaskRepository, user: str = ALICE, title: str = "write tests", **kw: object) -> Task:
    return repo.create(user, TaskCreate.model_validate({"title": title, **kw}))


CONTENT_FIELDS = tuple(TaskCreate.model_fields)
"""Every content field, read from the models: the field round trip runs once for each."""

# Sample values for a content field whose rules the JSON Schema cannot say (a custom
# validator, say): (first, second), two valid values, the first not the default.
SAMPLES: dict[str, tuple[object, object]] = {}
_WHEN = (
    datetime(2030, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
    datetime(2031, 6, 7, 8, 9, 10, tzinfo=UTC),
)
_Maker = Callable[[dict[str, Any], object, str], tuple[object, object] | None]


def _enum(branch: dict[str, Any], default: object, _field: str) -> tuple[object, object] | None:
    values = [value for value in branch["enum"] if value != default] + [default]
    return (values[0], values[1]) if len(values) > 1 else None


def _integer(branch: dict[str, Any], default: object, _field: str) -> tuple[object, object]:
    low = int(branch.get("minimum", branch.get("exclusiveMinimum", 0) + 1))
    high = int(branch.get("maximum", branch.get("exclusiveMaximum", low + 10) - 1))
    first = next(v for v in range(low, high + 1) if v != default)
    return (first, next(v for v in range(low, high + 1) if v not in {first, default}))


def _text(branch: dict[str, Any], _default: object, field: str) -> tuple[object, object]:
    size = max(1, min(12, int(branch.get("maxLength", 12))))
    return (f"one {field}"[:size], f"two {field}"[:size])


_MAKERS: dict[str, _Maker] = {
    "enum": _enum,
    "boolean": lambda _b, default, _f: (not default, bool(default)),
    "integer": _integer,
    "number": lambda branch, _d, _f: (branch.get("minimum", 0) + 0.5, branch.get("minimum", 0)),
    "string": _text,
    "string date-time": lambda _b, _d, _f: _WHEN,
    "string date": lambda _b, _d, _f: (_WHEN[0].date(), _WHEN[1].date()),
}


def _from_schema(field: str) -> tuple[object, object] | None:
    """Two distinct values for *field* from TaskCreate's JSON Schema, or None if unknown."""
    schema = TaskCreate.model_json_schema()
    found = schema["properties"][field]
    branch = next((b for b in found.get("anyOf", [found]) if b.get("type") != "null"), found)
    if "$ref" in branch:
        branch = schema["$defs"][branch["$ref"].rsplit("/", 1)[-1]]
    kind = "enum" if "enum" in branch else f"{branch.get('type')} {branch.get('format', '')}"
    make = _MAKERS.get(kind.strip())
    return None if make is None else make(branch, found.get("default"), field)


def content_samples(field: str) -> tuple[object, object]:
    """Two valid values of content *field*, different, the first not its default."""
    samples = SAMPLES.get(field) or _from_schema(field)
    if (
        samples is None
        or samples[0] == samples[1]
        or samples[0] == TaskCreate.model_fields[field].default
        or not all(_valid(field, value) for value in samples)
    ):
        pytest.fail(
            f"no sample values for the content field {field!r}: add two valid ones to "
            "SAMPLES in backend/tests/repository_contract.py"
        )
    return samples


def _valid(field: str, value: object) -> bool:
    try:
        TaskCreate.__pydantic_validator__.validate_assignment(
            TaskCreate.model_construct(), field, value
        )
    except ValidationError:
        return False
    return True


def _accepts_none(field: str) -> bool:
    return _valid(field, None)


class RepositoryContract:
    """Behaviour of TaskRepository that must hold on every database."""

    @pytest.mark.parametrize("field", CONTENT_FIELDS)
    def test_every_content_field_round_trips_through_every_call(
        self, repo: TaskRepository, field: str
    ) -> None:
        """Each content field of the models is stored and read back by every call and TaskRead."""
        first, second = content_samples(field)
        given = {name: content_samples(name)[0] for name in CONTENT_FIELDS}
        changed = {name: content_samples(name)[1] for name in CONTENT_FIELDS}
        assert field in TaskUpdate.model_fields, (
            f"TaskUpdate has no field {field!r}: declare it there too, optional (models.py)"
        )

        def holds(task: Task | None, expected: object, path: str) -> Task:
            assert task is not None, path
            found = getattr(task, field)
            assert found == expected, f"{field} lost by {path}: {found!r}, not {expected!r}"
            return task

        created = holds(repo.create(ALICE, TaskCreate.model_validate(given)), first, "create()")
        task_id = created.id or 0
        holds(repo.get(ALICE, task_id), first, "get()")
        holds(repo.list(ALICE)[0], first, "list()")

        alone = repo.update(ALICE, task_id, TaskUpdate.model_validate({field: second}))
        holds(alone, second, "update() of it alone")
        holds(repo.get(ALICE, task_id), second, "get() after update()")
        assert TaskRead.model_validate(alone).model_dump(exclude={field, "updated_at"}) == (
            TaskRead.model_validate(created).model_dump(exclude={field, "updated_at"})
        ), f"update() of {field} alone changed other fields"

        together = {**changed, field: first}
        both = holds(
            repo.update(ALICE, task_id, TaskUpdate.model_validate(together)),
            first,
            "update() with the other fields",
        )
        assert {name: getattr(both, name) for name in CONTENT_FIELDS} == together
        holds(repo.get(ALICE, task_id), first, "get() after update() with the other fields")
        if _accepts_none(field):
            cleared = repo.update(ALICE, task_id, TaskUpdate.model_validate({field: None}))
            holds(cleared, None, "update() to None")
            holds(repo.get(ALICE, task_id), None, "get() after update() to None")

        items = [TaskCreate.model_validate({**given, field: value}) for value in (first, second)]
        many = repo.create_many(ALICE, items)
        holds(many[0], first, "create_many()")
        holds(many[1], second, "create_many()")
        stored = holds(repo.get(ALICE, many[1].id or 0), second, "get() after create_many()")

        assert field in TaskRead.model_fields, f"TaskRead has no field {field!r}"
        read = TaskRead.model_validate(stored)
        assert getattr(read, field) == second, f"{field} lost by TaskRead"
        assert TaskRead.model_validate_json(read.model_dump_json()) == read, (
            f"{field} does not survive TaskRead's JSON"
        )

    def test_create_returns_id_and_equal_utc_timestamps(self, repo: TaskRepository) -> None:
        """A created task has a generated id and equal, aware UTC timestamps."""
        task = _new(repo, description="details")
        assert task.id is not None
        assert task.id > 0
        assert task.user_id == ALICE
        assert task.title == "write tests"
        assert task.description == "details"
        assert task.complete is False
        assert task.created_at == task.updated_at
        assert task.created_at.utcoffset() == timedelta(0)

    def test_get_reads_back_exactly_what_was_stored(self, repo: TaskRepository) -> None:
        """get() returns the same values create() returned, timestamps included."""
        task = _new(repo, description="line one\nline two\ttabbed")
        got = repo.get(ALICE, task.id or 0)
        assert got is not None
        assert TaskRead.model_validate(got) == TaskRead.model_validate(task)
        assert got.created_at.tzinfo is not None
        assert got.created_at.utcoffset() == timedelta(0)

    def test_title_is_stored_stripped(self, repo: TaskRepository) -> None:
        """Surrounding whitespace of a title is not stored."""
        task = _new(repo, title="  padded\u3000 ")
        assert repo.get(ALICE, task.id or 0) == task
        assert task.title == "padded"

    def test_non_ascii_text_round_trips(self, repo: TaskRepository) -> None:
        """Emoji, CJK and combining marks come back byte for byte."""
        title = "\U0001f469\u200d\U0001f4bb 買い物 e\u0301te\u0301"
        description = "\u0928\u092e\u0938\u094d\u0924\u0947 \U0001f1fa\U0001f1e6"
        task = _new(repo, title=title, description=description)
        got = repo.get(ALICE, task.id or 0)
        assert got is not None
        assert (got.title, got.description) == (title, description)

    def test_200_emoji_title_is_accepted(self, repo: TaskRepository) -> None:
        """Length limits count code points, not bytes: 200 emoji fit a title."""
        task = _new(repo, title="\U0001f600" * 200)
        got = repo.get(ALICE, task.id or 0)
        assert got is not None
        assert len(got.title) == 200

    def test_get_missing_or_foreign_task_is_none(self, repo: TaskRepository) -> None:
        """get() answers None for an unknown id and for another user's task."""
        task = _new(repo)
        assert repo.get(BOB, task.id or 0) is None
        assert repo.get(ALICE, (task.id or 0) + 1000) is None
        assert repo.get(ALICE, 2**70) is None
        assert repo.get(ALICE, 0) is None

    def test_update_changes_only_given_fields_and_bumps_updated_at(
        self, repo: TaskRepository
    ) -> None:
        """Only explicitly set fields change; updated_at moves on, created_at stays."""
        task = _new(repo, description="keep me")
        updated = repo.update(ALICE, task.id or 0, TaskUpdate(complete=True))
        assert updated is not None
        assert updated.complete is True
        assert updated.title == task.title
        assert updated.description == "keep me"
        assert updated.created_at == task.created_at
        assert updated.updated_at > task.updated_at
        assert repo.get(ALICE, task.id or 0) == updated

    def test_update_with_explicit_none_clears_description(self, repo: TaskRepository) -> None:
        """description=None given explicitly clears it; omitted leaves it alone."""
        task = _new(repo, description="to be cleared")
        kept = repo.update(ALICE, task.id or 0, TaskUpdate(title="renamed"))
        assert kept is not None
        assert kept.description == "to be cleared"
        cleared = repo.update(ALICE, task.id or 0, TaskUpdate(description=None))
        assert cleared is not None
        assert cleared.description is None
        assert cleared.title == "renamed"

    def test_update_of_foreign_task_changes_nothing(self, repo: TaskRepository) -> None:
        """Another user's update returns None and leaves the task untouched."""
        task = _new(repo)
        assert repo.update(BOB, task.id or 0, TaskUpdate(title="hijacked", complete=True)) is None
        assert repo.update(ALICE, 2**70, TaskUpdate(title="nothing")) is None
        assert repo.get(ALICE, task.id or 0) == task

    def test_delete_removes_only_own_task(self, repo: TaskRepository) -> None:
        """delete() is True once for the owner, False for others and for a second call."""
        task = _new(repo)
        assert repo.delete(BOB, task.id or 0) is False
        assert repo.get(ALICE, task.id or 0) is not None
        assert repo.delete(ALICE, task.id or 0) is True
        assert repo.delete(ALICE, task.id or 0) is False
        assert repo.delete(ALICE, -1) is False
        assert repo.get(ALICE, task.id or 0) is None

    def test_list_is_newest_first_and_scoped_to_the_user(self, repo: TaskRepository) -> None:
        """list() returns only the caller's tasks, highest id first."""
        mine = [_new(repo, title=f"a{i}") for i in range(3)]
        _new(repo, BOB, title="not yours")
        listed = repo.list(ALICE)
        assert [t.id for t in listed] == sorted((t.id or 0 for t in mine), reverse=True)
        assert all(t.user_id == ALICE for t in listed)

    def test_list_filters_on_complete(self, repo: TaskRepository) -> None:
        """complete=True/False return only done/pending tasks; counts agree."""
        done = _new(repo, title="done", complete=True)
        pending = _new(repo, title="pending")
        _new(repo, BOB, title="bob's done", complete=True)
        assert [t.id for t in repo.list(ALICE, complete=True)] == [done.id]
        assert [t.id for t in repo.list(ALICE, complete=False)] == [pending.id]
        assert repo.count(ALICE) == 2
        assert repo.count(ALICE, complete=True) == 1
        assert repo.count(ALICE, complete=False) == 1
        assert repo.count("nobody") == 0

    def test_keyset_pagination_visits_every_task_once(self, repo: TaskRepository) -> None:
        """Following before_id page by page yields each task exactly once, in order."""
        created = repo.create_many(ALICE, [TaskCreate(title=f"t{i}") for i in range(23)])
        _new(repo, BOB, title="interleaved")
        seen: list[int] = []
        before: int | None = None
        while page := repo.list(ALICE, limit=5, before_id=before):
            seen.extend(t.id or 0 for t in page)
            before = page[-1].id
        assert seen == sorted((t.id or 0 for t in created), reverse=True)

    def test_keyset_pagination_with_filter(self, repo: TaskRepository) -> None:
        """Pagination and the complete filter combine."""
        items = [TaskCreate(title=f"t{i}", complete=i % 2 == 0) for i in range(9)]
        created = repo.create_many(ALICE, items)
        done = sorted((t.id or 0 for t in created if t.complete), reverse=True)
        first = repo.list(ALICE, complete=True, limit=2)
        rest = repo.list(ALICE, complete=True, before_id=first[-1].id)
        assert [t.id for t in first + rest] == done

    @pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_SIZE + 1])
    def test_list_rejects_limit_out_of_range(self, repo: TaskRepository, limit: int) -> None:
        """A page size outside 1..100 is a ValidationError naming limit, not a silent clamp."""
        with pytest.raises(ValidationError, match="limit"):
            repo.list(ALICE, limit=limit)

    def test_list_accepts_the_page_size_bounds(self, repo: TaskRepository) -> None:
        """Both ends of 1..100 are valid page sizes."""
        repo.create_many(ALICE, [TaskCreate(title=f"t{i}") for i in range(MAX_PAGE_SIZE + 1)])
        assert len(repo.list(ALICE, limit=1)) == 1
        assert len(repo.list(ALICE, limit=MAX_PAGE_SIZE)) == MAX_PAGE_SIZE

    def test_create_many_returns_tasks_in_order_with_ids(self, repo: TaskRepository) -> None:
        """create_many keeps the input order and fills ids and timestamps."""
        created = repo.create_many(ALICE, [TaskCreate(title=f"n{i}") for i in range(250)])
        assert [t.title for t in created] == [f"n{i}" for i in range(250)]
        ids = [t.id or 0 for t in created]
        assert ids == sorted(ids)
        assert len(set(ids)) == 250
        assert all(t.created_at.utcoffset() == timedelta(0) for t in created)
        assert repo.count(ALICE) == 250
        assert repo.create_many(ALICE, []) == []

    def test_create_many_is_all_or_nothing(self, repo: TaskRepository, engine: Engine) -> None:
        """If the batch fails part-way, no row of it is stored."""
        _new(repo, title="before")
        calls = {"n": 0}

        def fail_second_batch(conn: object, *args: object) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected failure in the second statement")

        items = [TaskCreate(title=f"b{i}") for i in range(3000)]
        event.listen(engine, "before_cursor_execute", fail_second_batch)
        try:
            with pytest.raises(RuntimeError, match="injected"):
                repo.create_many(ALICE, items)
        finally:
            event.remove(engine, "before_cursor_execute", fail_second_batch)
        assert calls["n"] >= 2
        assert repo.count(ALICE) == 1

    def test_atomic_block_rolls_back_every_call(self, repo: TaskRepository) -> None:
        """An exception inside atomic() undoes all the block's writes."""
        kept = _new(repo, title="kept")

        def failing_block() -> None:
            with repo.atomic():
                _new(repo, title="rolled back")
                repo.update(ALICE, kept.id or 0, TaskUpdate(title="changed"))
                repo.delete(ALICE, kept.id or 0)
                raise LookupError

        with pytest.raises(LookupError):
            failing_block()
        assert [t.title for t in repo.list(ALICE)] == ["kept"]

    def test_atomic_block_commits_together(self, repo: TaskRepository) -> None:
        """Calls inside a successful atomic() block are all stored, nested blocks join."""
        with repo.atomic():
            first = _new(repo, title="one")
            with repo.atomic():
                _new(repo, title="two")
            repo.update(ALICE, first.id or 0, TaskUpdate(complete=True))
        assert repo.count(ALICE) == 2
        assert repo.count(ALICE, complete=True) == 1

    def test_invalid_user_id_is_rejected_before_sql(
        self, repo: TaskRepository, engine: Engine
    ) -> None:
        """Every method validates user_id like the model and sends nothing when invalid."""
        sent: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *a: sent.append(str(a[2])))
        calls: list[Callable[[Any], object]] = [
            lambda u: repo.create(u, TaskCreate(title="x")),
            lambda u: repo.create_many(u, [TaskCreate(title="x")]),
            lambda u: repo.get(u, 1),
            repo.list,
            lambda u: repo.update(u, 1, TaskUpdate(title="x")),
            lambda u: repo.delete(u, 1),
            repo.count,
        ]
        for call in calls:
            for bad in ("", "   ", " a", "a\n", None, 7):
                with pytest.raises(ValidationError):
                    call(bad)
        assert sent == []

    def test_sql_injection_strings_are_stored_literally(self, repo: TaskRepository) -> None:
        """Hostile strings are data: stored as given and matching nothing else."""
        evil = "x' OR '1'='1"
        victim = _new(repo, BOB, title="bob's secret")
        task = _new(repo, evil, title="'; DROP TABLE tasks; --", description='" OR 1=1 --')
        assert repo.get(evil, task.id or 0) == task
        assert [t.id for t in repo.list(evil)] == [task.id]
        assert repo.get(evil, victim.id or 0) is None
        assert repo.count(BOB) == 1

    def test_returned_tasks_are_detached_snapshots(
        self, repo: TaskRepository, session: Session
    ) -> None:
        """Returned tasks are not pending in the session and survive its closing."""
        task = _new(repo)
        assert task not in session
        session.close()
        assert task.title == "write tests"

    def test_sessions_see_each_others_commits(
        self, open_repo: Callable[[], TaskRepository]
    ) -> None:
        """A task written through one session is visible from a fresh one."""
        first = open_repo()
        task = _new(first)
        second = open_repo()
        assert second.get(ALICE, task.id or 0) == task
        assert task.created_at.tzinfo is UTC or task.created_at.utcoffset() == timedelta(0)

    def test_an_update_cannot_move_a_task_to_another_owner(self, repo: TaskRepository) -> None:
        """Fields beyond title, description and complete are refused, whatever the class."""

        class Hijack(TaskUpdate):
            user_id: str

        task = _new(repo)
        with pytest.raises(ValueError, match="user_id"):
            repo.update(ALICE, task.id or 0, Hijack(user_id=BOB, title="mine now"))
        assert repo.get(ALICE, task.id or 0) == task
        assert repo.list(BOB) == []

    def test_values_that_skipped_validation_are_refused(self, repo: TaskRepository) -> None:
        """model_copy(update=...) skips pydantic; the repository validates again before SQL."""
        sneaky_create = TaskCreate(title="ok").model_copy(update={"title": "bad\x00"})
        with pytest.raises(ValidationError):
            repo.create(ALICE, sneaky_create)
        with pytest.raises(ValidationError):
            repo.create_many(ALICE, [TaskCreate(title="fine"), sneaky_create])
        task = _new(repo)
        sneaky_update = TaskUpdate(title="ok").model_copy(update={"title": " "})
        with pytest.raises(ValidationError):
            repo.update(ALICE, task.id or 0, sneaky_update)
        assert repo.count(ALICE) == 1

    def test_assignment_is_validated(self) -> None:
        """Changing a field of TaskCreate or TaskUpdate after creation is validated too."""
        data = TaskCreate(title="ok")
        with pytest.raises(ValidationError):
            data.title = "a\nb"
        patch = TaskUpdate()
        with pytest.raises(ValidationError):
            patch.complete = "yes"  # type: ignore[assignment]

    def test_repositories_sharing_a_session_share_the_block(
        self, session: Session, repo_on: Callable[[Session], TaskRepository]
    ) -> None:
        """A second repository on the same session joins the first one's atomic block."""
        first, second = repo_on(session), repo_on(session)

        def failing_block() -> None:
            with first.atomic():
                _new(first, title="one")
                _new(second, title="two")
                raise LookupError

        with pytest.raises(LookupError):
            failing_block()
        assert first.count(ALICE) == 0

    def test_a_caught_failure_still_rolls_back_the_whole_block(
        self, repo: TaskRepository, engine: Engine
    ) -> None:
        """If a call in an atomic block fails and the caller swallows it, nothing is stored."""
        done = _new(repo, title="already there")

        def block() -> None:
            with repo.atomic():
                _new(repo, title="first")
                with contextlib.suppress(Exception), _next_statement_fails(engine):
                    repo.update(ALICE, done.id or 0, TaskUpdate(title="second"))
                _new(repo, title="third")

        with pytest.raises(TodoBackendError, match="rolled back"):
            block()
        assert [t.title for t in repo.list(ALICE)] == ["already there"]

    def test_a_nested_block_that_raises_fails_the_whole_block(self, repo: TaskRepository) -> None:
        """A nested block that exits with an exception, caught outside it, fails the outer block."""
        done = _new(repo, title="already there")

        def block() -> None:
            with repo.atomic():
                _new(repo, title="outer")
                with contextlib.suppress(LookupError), repo.atomic():
                    _new(repo, title="inner")
                    repo.update(ALICE, done.id or 0, TaskUpdate(complete=True))
                    raise LookupError
                with pytest.raises(TodoBackendError, match="rolled back"):
                    _new(repo, title="after the nested block")

        with pytest.raises(TodoBackendError, match="rolled back"):
            block()
        assert [(t.title, t.complete) for t in repo.list(ALICE)] == [("already there", False)]

    def test_a_call_cut_short_fails_the_whole_block(
        self, repo: TaskRepository, cut_short: CutShort
    ) -> None:
        """A call cut short (cancelled, interrupted), its error caught, fails the block."""
        done = _new(repo, title="already there")

        def block() -> None:
            with repo.atomic():
                _new(repo, title="first")
                with pytest.raises(cut_short.error), cut_short.at("before_execute"):
                    repo.update(ALICE, done.id or 0, TaskUpdate(title="second"))
                with pytest.raises(TodoBackendError, match="rolled back"):
                    _new(repo, title="third")

        with pytest.raises(TodoBackendError, match="rolled back"):
            block()
        assert [(t.title, t.complete) for t in repo.list(ALICE)] == [("already there", False)]
        assert repo.count(ALICE) == 1  # the session works after the block

    def test_a_call_cut_short_that_leaves_the_block_rolls_it_back(
        self, repo: TaskRepository, cut_short: CutShort
    ) -> None:
        """A cancellation or interrupt leaving the block reaches the caller; nothing is stored."""
        done = _new(repo, title="already there")

        def block() -> None:
            with repo.atomic():
                _new(repo, title="first")
                with cut_short.at("before_execute"):
                    repo.update(ALICE, done.id or 0, TaskUpdate(title="second"))

        with pytest.raises(cut_short.error):
            block()
        assert [t.title for t in repo.list(ALICE)] == ["already there"]

    def test_a_block_cut_short_at_its_commit_leaves_the_session_usable(
        self, repo: TaskRepository, cut_short: CutShort
    ) -> None:
        """A block cancelled or interrupted at its COMMIT raises as is; the session goes on."""

        def block() -> None:
            with repo.atomic():
                _new(repo, title="first")
                _new(repo, title="second")

        with pytest.raises(cut_short.error), cut_short.at("commit"):
            block()
        # The COMMIT may or may not have happened; the block is never applied in part.
        assert [t.title for t in repo.list(ALICE)] in ([], ["second", "first"])
        with repo.atomic():
            _new(repo, title="next block")
        assert repo.count(ALICE, complete=False) in (1, 3)

    def test_a_failed_rollback_never_hides_an_interrupted_commit(
        self, repo: TaskRepository, cut_short: CutShort
    ) -> None:
        """A block cut short at COMMIT whose ROLLBACK fails too still raises the interruption."""

        def block() -> None:
            with repo.atomic():
                _new(repo, title="first")

        with (
            pytest.raises(cut_short.error) as raised,
            cut_short.at("commit"),
            _next_rollback_fails(),
        ):
            block()
        notes = "\n".join(getattr(raised.value, "__notes__", []))
        assert "ROLLBACK failed" in notes
        assert "may or may not have been applied" in notes  # never "nothing was stored"
        assert repo.count(ALICE) in (0, 1)

    def test_a_call_cut_short_in_its_argument_checks_fails_the_block(
        self, repo: TaskRepository, cut_short: CutShort
    ) -> None:
        """An interrupt while a call checks its arguments fails the block like any failed call."""
        error = cut_short.error

        class Interrupting(TaskUpdate):
            def model_dump(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
                raise error

        done = _new(repo, title="already there")

        def block() -> None:
            with repo.atomic():
                _new(repo, title="first")
                with pytest.raises(error):
                    repo.update(ALICE, done.id or 0, Interrupting(title="second"))

        with pytest.raises(TodoBackendError, match="rolled back"):
            block()
        assert [t.title for t in repo.list(ALICE)] == ["already there"]

    @pytest.mark.parametrize("caught", [False, True], ids=["raised", "caught"])
    def test_a_failed_rollback_never_hides_the_callers_error(
        self, repo: TaskRepository, caught: bool
    ) -> None:
        """When the block's ROLLBACK fails too, the caller gets its own error, the failure noted."""

        def block() -> None:
            with repo.atomic():
                _new(repo, title="first")
                if caught:
                    with contextlib.suppress(LookupError), repo.atomic():
                        raise LookupError("the caller's own error")
                else:
                    raise LookupError("the caller's own error")

        expected: type[Exception] = TodoBackendError if caught else LookupError
        with pytest.raises(expected) as raised, _next_rollback_fails():
            block()
        error = raised.value
        assert ("rolled back" if caught else "the caller's own error") in str(error)
        notes = "\n".join(getattr(error, "__notes__", []))
        assert "ROLLBACK failed too (the database connection was lost)" in notes
        assert "Nothing of the block was stored" in notes
        assert "server closed the connection" not in str(error) + notes  # no raw driver text
        assert repo.list(ALICE) == []

    @pytest.mark.parametrize(
        "refused",
        [
            pytest.param(lambda repo: repo.get(" alice", 1), id="ValidationError"),
            pytest.param(
                lambda repo: repo.create(
                    ALICE, TaskCreate(title="ok").model_copy(update={"title": "bad\x00"})
                ),
                id="ValidationError-bypassed",
            ),
            pytest.param(lambda repo: repo.get(ALICE, "1"), id="TypeError"),
            pytest.param(lambda repo: repo.list(ALICE, limit=0), id="ValueError"),
        ],
    )
    def test_a_refused_call_still_rolls_back_the_whole_block(
        self, repo: TaskRepository, refused: Callable[[TaskRepository], object]
    ) -> None:
        """A call refused before SQL, its error caught, fails the atomic block all the same."""
        done = _new(repo, title="already there")

        def block() -> None:
            with repo.atomic():
                _new(repo, title="first")
                with contextlib.suppress(ValidationError, TypeError, ValueError):
                    refused(repo)
                repo.update(ALICE, done.id or 0, TaskUpdate(complete=True))

        with pytest.raises(TodoBackendError, match="rolled back"):
            block()
        assert [(t.title, t.complete) for t in repo.list(ALICE)] == [("already there", False)]

    @pytest.mark.parametrize("bad", REFUSED_EVERYWHERE)
    def test_refused_text_in_any_field_never_reaches_sql(
        self, repo: TaskRepository, engine: Engine, bad: str
    ) -> None:
        """Surrogates and control characters are a ValidationError naming the field, unsent."""
        task = _new(repo)
        task_id = task.id or 0
        ok = TaskCreate(title="ok")
        calls: dict[str, list[Callable[[], object]]] = {
            "title": [
                lambda: repo.create(ALICE, TaskCreate(title=bad)),
                lambda: repo.update(ALICE, task_id, TaskUpdate(title=bad)),
                lambda: repo.create(ALICE, ok.model_copy(update={"title": bad})),
                lambda: repo.create_many(ALICE, [ok, ok.model_copy(update={"title": bad})]),
                lambda: repo.update(
                    ALICE, task_id, TaskUpdate(title="x").model_copy(update={"title": bad})
                ),
            ],
            "description": [
                lambda: repo.create(ALICE, TaskCreate(title="ok", description=bad)),
                lambda: repo.update(ALICE, task_id, TaskUpdate(description=bad)),
                lambda: repo.update(
                    ALICE, task_id, TaskUpdate().model_copy(update={"description": bad})
                ),
            ],
            "user_id": [
                lambda: repo.create(bad, ok),
                lambda: repo.create_many(bad, [ok]),
                lambda: repo.get(bad, task_id),
                lambda: repo.list(bad),
                lambda: repo.update(bad, task_id, TaskUpdate(complete=True)),
                lambda: repo.delete(bad, task_id),
                lambda: repo.count(bad),
            ],
        }
        sent: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *a: sent.append(str(a[2])))
        for field, attempts in calls.items():
            for attempt in attempts:
                with pytest.raises(ValidationError) as refused:
                    attempt()
                assert field in str(refused.value)
        assert sent == []
        assert repo.get(ALICE, task_id) == task

    def test_a_returned_task_cannot_carry_invalid_data_into_a_session(
        self, repo: TaskRepository, session: Session
    ) -> None:
        """Assigning refused text to a task the repository returned raises; nothing is stored."""
        task = _new(repo)
        got = repo.get(ALICE, task.id or 0)
        assert got is not None
        for field, bad in [
            ("title", "bad\x00"),
            ("title", "a\ud800b"),
            ("title", "   "),
            ("user_id", "alice\t"),
            ("user_id", "alice\u3000"),
            ("description", "\x1b[31m"),
            ("complete", "yes"),
        ]:
            with pytest.raises(ValidationError, match=field):
                setattr(got, field, bad)
        assert got == task
        session.add(got)
        session.commit()
        assert repo.get(ALICE, task.id or 0) == task
        got.title = "  renamed through the session  "  # a valid value, stored validated
        session.commit()
        stored = repo.get(ALICE, task.id or 0)
        assert stored is not None
        assert stored.title == "renamed through the session"

    @_properties
    @given(title=_any_text)
    def test_any_title_is_refused_or_stored_stripped(
        self, repo: TaskRepository, title: str
    ) -> None:
        """Any text as a title, through create() or update(), is refused or read back stripped."""
        acceptable = _acceptable_title(title)
        try:
            created = repo.create(ALICE, TaskCreate(title=title))
        except ValidationError:
            assert not acceptable
        else:
            assert acceptable
            assert created.title == title.strip()
        task = _new(repo, title="before")
        # update() validates again whatever it is given, TaskUpdate's checks bypassed.
        updates: tuple[Callable[[], TaskUpdate], ...] = (
            lambda: TaskUpdate(title=title),
            lambda: TaskUpdate().model_copy(update={"title": title}),
        )
        for data in updates:
            try:
                updated = repo.update(ALICE, task.id or 0, data())
            except ValidationError:
                assert not acceptable
                continue
            assert acceptable
            got = repo.get(ALICE, task.id or 0)
            assert updated is not None
            assert got is not None
            assert updated.title == got.title == title.strip()

    @_properties
    @given(description=_any_text)
    def test_any_description_is_refused_or_stored_as_given(
        self, repo: TaskRepository, description: str
    ) -> None:
        """Any text as a description is refused, or stored unchanged ("" as None)."""
        layout_free = re.sub(r"[\t\n\r]", "", description)
        acceptable = _encodable(description) and not _CONTROL.search(layout_free)
        stored = description or None
        task = _new(repo, title="described")
        attempts: tuple[Callable[[], Task | None], ...] = (
            lambda: repo.create(ALICE, TaskCreate(title="t", description=description)),
            lambda: repo.update(ALICE, task.id or 0, TaskUpdate(description=description)),
        )
        for attempt in attempts:
            try:
                result = attempt()
            except ValidationError:
                assert not acceptable
                continue
            assert acceptable
            assert isinstance(result, Task)
            assert result.description == stored
            assert repo.get(ALICE, result.id or 0) == result

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("title", "a\x01b"),
            ("title", "two\nlines"),
            ("title", "tab\tbed"),
            ("title", "del\x7f"),
            ("title", "next line\x85"),
            ("title", "\x9f"),
            ("user_id", "alice\x1b"),
            ("user_id", "\talice"),
            ("user_id", "alice\t"),
            ("user_id", "alice\n"),
            ("user_id", "\u00a0alice"),
            ("user_id", "alice\u3000"),
            ("user_id", "\u2003alice"),
            ("user_id", "alice\u2028"),
            ("description", "\x1b[31mred"),
            ("description", "vertical\x0btab"),
            ("description", "form\x0cfeed"),
            ("description", "c1\x85"),
        ],
    )
    def test_raw_sql_cannot_store_refused_characters(
        self, raw_engine: Engine, field: str, value: str
    ) -> None:
        """A raw INSERT of a control character, or of user_id padded by any whitespace, fails."""
        with (
            pytest.raises(IntegrityError, match=f"ck_tasks_{field}_text"),
            raw_engine.begin() as conn,
        ):
            conn.execute(_RAW_INSERT, {**_RAW_VALID, field: value})
        with raw_engine.connect() as conn:
            assert conn.execute(text("select count(*) from tasks")).scalar_one() == 0

    def test_raw_sql_stores_the_characters_the_rules_allow(
        self, repo: TaskRepository, raw_engine: Engine
    ) -> None:
        """Layout controls in a description, inner and non-control odd characters all fit."""
        allowed = [
            {"description": "line\nline\r\n\ttabbed"},
            {"user_id": "a\u00a0b", "title": "\U0001f469\u200d\U0001f4bb zwj"},
            {"user_id": "a b", "description": "\u3000 padded \u00a0"},
            {"title": "\u2028 line separator inside \u2029"},
        ]
        with raw_engine.begin() as conn:
            for row in allowed:
                conn.execute(_RAW_INSERT, {**_RAW_VALID, **row})
        assert repo.count("alice") == 2
        assert [t.user_id for t in repo.list("a\u00a0b")] == ["a\u00a0b"]

    def test_reads_leave_the_callers_transaction_open(
        self, repo: TaskRepository, session: Session
    ) -> None:
        """A read inside the caller's transaction neither commits nor ends it."""
        task = _new(repo)
        session.execute(text("SELECT 1"))
        assert session.in_transaction()
        assert repo.get(ALICE, task.id or 0) == task
        assert repo.count(ALICE) == 1
        assert session.in_transaction()
        session.rollback()

    def test_count_checks_its_filter_type(self, repo: TaskRepository) -> None:
        """count(complete=...) takes a bool or None, like list()."""
        with pytest.raises(TypeError, match="complete"):
            repo.count(ALICE, complete="yes")  # type: ignore[arg-type]

    def test_a_statement_the_database_refuses_is_a_package_error(
        self, repo: TaskRepository, raw_engine: Engine
    ) -> None:
        """A refused statement is DatabaseStatementError with its cause, never a DBAPIError."""
        postgresql = raw_engine.dialect.name == "postgresql"
        refuse = (
            [
                "CREATE FUNCTION refuse_tasks() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$",
                "CREATE TRIGGER refuse BEFORE INSERT ON tasks "
                "FOR EACH ROW EXECUTE FUNCTION refuse_tasks()",
            ]
            if postgresql
            else [
                "CREATE TRIGGER refuse BEFORE INSERT ON tasks "
                "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
            ]
        )
        undo = ["DROP TRIGGER refuse ON tasks", "DROP FUNCTION refuse_tasks()"]
        with raw_engine.begin() as conn:
            for statement in refuse:
                conn.execute(text(statement))
        try:
            with pytest.raises(DatabaseStatementError, match="refused by a trigger") as refused:
                _new(repo, description="param-sentinel")
        finally:
            with raw_engine.begin() as conn:
                for statement in undo if postgresql else ["DROP TRIGGER refuse"]:
                    conn.execute(text(statement))
        assert isinstance(refused.value.__cause__, DBAPIError)
        assert "param-sentinel" not in str(refused.value)
        assert refused.value.sqlstate in {"", "P0001"}  # SQLite gives no SQLSTATE
        assert repo.count(ALICE) == 0

    def test_a_column_the_database_lacks_says_it_is_behind_the_code(
        self, repo: TaskRepository, raw_engine: Engine
    ) -> None:
        """A column of the models missing from the table is SchemaMissingError: migrate."""
        with raw_engine.begin() as conn:
            conn.execute(text("ALTER TABLE tasks RENAME COLUMN description TO notes"))
        try:
            with pytest.raises(SchemaMissingError, match="behind the code") as refused:
                _new(repo, description="param-sentinel")
        finally:
            with raw_engine.begin() as conn:
                conn.execute(text("ALTER TABLE tasks RENAME COLUMN notes TO description"))
        assert "todo-db migrate" in str(refused.value)
        assert isinstance(refused.value.__cause__, DBAPIError)
        assert "param-sentinel" not in str(refused.value)
        assert repo.count(ALICE) == 0

    def test_count_with_a_limit_answers_at_most_the_limit(self, repo: TaskRepository) -> None:
        """count(limit=N) is the exact count up to N, then N ("N or more"), per filter and owner."""
        repo.create_many(ALICE, [TaskCreate(title=f"t{i}", complete=i < 2) for i in range(5)])
        _new(repo, BOB, title="bob's")
        assert repo.count(ALICE, limit=3) == 3
        assert repo.count(ALICE, limit=5) == 5
        assert repo.count(ALICE, limit=100) == 5
        assert repo.count(ALICE, limit=1) == 1
        assert repo.count(ALICE, complete=True, limit=10) == 2
        assert repo.count(ALICE, complete=False, limit=2) == 2
        assert repo.count(BOB, limit=10) == 1
        assert repo.count("nobody", limit=10) == 0
        assert repo.count(ALICE, limit=2**70) == 5

    def test_count_checks_its_limit(self, repo: TaskRepository) -> None:
        """count(limit=...) takes an int of at least 1 or None; a bool is refused too."""
        for refused in (0, -1):
            with pytest.raises(ValidationError, match="limit") as info:
                repo.count(ALICE, limit=refused)
            assert info.value.errors()[0]["type"] == "greater_than_equal"
        with pytest.raises(TypeError, match="limit"):
            repo.count(ALICE, limit=True)
        with pytest.raises(TypeError, match="limit"):
            repo.count(ALICE, limit="10")  # type: ignore[arg-type]

    def test_session_bound_to_a_connection_in_a_transaction(
        self, repo_in_outer_transaction: Callable[[], AbstractContextManager[TaskRepository]]
    ) -> None:
        """A session on a Connection that already began a transaction works (test fixtures)."""
        with repo_in_outer_transaction() as repo:
            task = _new(repo)
            assert repo.get(ALICE, task.id or 0) == task
            with repo.atomic():
                _new(repo, title="inside")
            assert repo.count(ALICE) == 2


class BoundToTheEngine:
    """Mixed into a contract suite: its repositories are bound to the engine, not a session.

    ``TaskRepository(engine)``: each call borrows a pooled connection, and an
    ``atomic()`` block opens a session of its own; the whole contract holds as well.
    """

    @pytest.fixture
    def repo(self, engine: Engine) -> TaskRepository:
        """A repository bound to the suite's engine."""
        return TaskRepository(engine)

    @pytest.fixture
    def open_repo(self, engine: Engine) -> Callable[[], TaskRepository]:
        """Make another repository bound to the suite's engine."""
        return lambda: TaskRepository(engine)


@dataclass(frozen=True)
class CutShort:
    """How a face cuts a repository call short mid-statement, and what its caller then sees.

    The sync face raises a KeyboardInterrupt-like BaseException as the statement starts;
    the async face cancels the awaiting task, which lands at the driver's await.
    """

    error: type[BaseException]
    at: Callable[[str], AbstractContextManager[None]]  # cut at the next event of this name


@contextlib.contextmanager
def once_at(target: Any, event_name: str, action: Callable[[], None]) -> Iterator[None]:
    """Run *action* at the next *event_name* event of *target* (a fault injected once)."""
    armed = [True]

    def fire(*_args: object) -> None:
        if armed[0]:
            armed[0] = False
            action()

    event.listen(target, event_name, fire)
    try:
        yield
    finally:
        event.remove(target, event_name, fire)


def _lose_the_connection() -> None:
    lost = ConnectionError("server closed the connection unexpectedly")
    raise OperationalError(None, None, lost, connection_invalidated=True)


def _next_rollback_fails() -> AbstractContextManager[None]:
    """Make the next session ROLLBACK fail the way a lost connection does.

    Raised as a session finishes rolling back (``after_rollback``), so it fires
    whatever state the connection's transaction is in, on both faces.
    """
    return once_at(orm.Session, "after_rollback", _lose_the_connection)


@contextlib.contextmanager
def _next_statement_fails(engine: Engine) -> Iterator[None]:
    """Make the database refuse the next statement sent on *engine* (a real driver error)."""
    armed = [True]

    def rewrite(
        conn: object, cursor: object, statement: str, params: object, *rest: object
    ) -> tuple[str, object]:
        if armed[0]:
            armed[0] = False
            return "SELECT * FROM no_such_table_here", params
        return statement, params

    event.listen(engine, "before_cursor_execute", rewrite, retval=True)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", rewrite)
