"""Statements each repository call sends, counted on SQLite: one per single-task call.

SQLAlchemy's ``before_cursor_execute`` event sees every statement the repository
executes. A refactor that adds a statement (a refresh, a re-read, a second query)
fails here; ``tests/integration/test_round_trips_pg.py`` checks the PostgreSQL wire,
where a hidden BEGIN or COMMIT would be one more round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, event
from sqlmodel import Session

from todo_backend.models import Task, TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

ALICE = "alice"


@pytest.fixture
def sent(engine: Engine) -> Iterator[list[str]]:
    """Collect the SQL of every statement the engine executes during the test."""
    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield statements
    event.remove(engine, "before_cursor_execute", record)


_SINGLE_CALLS: dict[str, tuple[str, Callable[[TaskRepository, Task], object]]] = {
    "create": ("INSERT", lambda r, t: r.create(ALICE, TaskCreate(title="new"))),
    "get": ("SELECT", lambda r, t: r.get(ALICE, t.id or 0)),
    "list": ("SELECT", lambda r, t: r.list(ALICE)),
    "list page": ("SELECT", lambda r, t: r.list(ALICE, complete=False, before_id=t.id)),
    "update": ("UPDATE", lambda r, t: r.update(ALICE, t.id or 0, TaskUpdate(title="renamed"))),
    "delete": ("DELETE", lambda r, t: r.delete(ALICE, t.id or 0)),
    "count": ("SELECT", lambda r, t: r.count(ALICE)),
}


@pytest.mark.parametrize("name", list(_SINGLE_CALLS))
def test_single_task_call_sends_one_owner_scoped_statement(
    name: str, repo: TaskRepository, sent: list[str]
) -> None:
    """Each single-task method sends exactly one statement, and it filters on the owner."""
    verb, call = _SINGLE_CALLS[name]
    task = repo.create(ALICE, TaskCreate(title="seed"))
    sent.clear()
    call(repo, task)
    assert len(sent) == 1, sent
    assert sent[0].lstrip().startswith(verb)
    assert "user_id" in sent[0]


@pytest.mark.parametrize("task_id", [0, -1, 2**63, 2**70])
def test_ids_that_cannot_exist_send_nothing(
    task_id: int, repo: TaskRepository, sent: list[str]
) -> None:
    """get, update and delete answer for impossible ids without any statement."""
    assert repo.get(ALICE, task_id) is None
    assert repo.update(ALICE, task_id, TaskUpdate(title="x")) is None
    assert repo.delete(ALICE, task_id) is False
    assert sent == []


def test_create_many_sends_only_inserts(repo: TaskRepository, sent: list[str]) -> None:
    """create_many sends INSERTs and nothing else: no re-read of the rows it returns."""
    # SQLite cannot keep a multi-row INSERT's RETURNING in input order, so it gets one
    # INSERT per row (in-process, no network); test_round_trips_pg.py checks that
    # PostgreSQL batches them.
    created = repo.create_many(ALICE, [TaskCreate(title=f"t{i}") for i in range(5)])
    assert [t.title for t in created] == [f"t{i}" for i in range(5)]
    assert sent
    assert all(s.lstrip().startswith("INSERT") for s in sent)


def test_atomic_block_sends_only_its_calls(repo: TaskRepository, sent: list[str]) -> None:
    """Inside atomic() each call is still one statement; nothing is re-read at commit."""
    task = repo.create(ALICE, TaskCreate(title="seed"))
    sent.clear()
    with repo.atomic():
        repo.update(ALICE, task.id or 0, TaskUpdate(complete=True))
        repo.create(ALICE, TaskCreate(title="second"))
        repo.delete(ALICE, task.id or 0)
    assert [s.split()[0] for s in sent] == ["UPDATE", "INSERT", "DELETE"]


def test_single_calls_leave_the_session_idle(repo: TaskRepository, session: Session) -> None:
    """A single call opens no session transaction, so there is nothing left to commit."""
    task = repo.create(ALICE, TaskCreate(title="seed"))
    repo.get(ALICE, task.id or 0)
    repo.list(ALICE)
    repo.update(ALICE, task.id or 0, TaskUpdate(complete=True))
    repo.count(ALICE)
    repo.delete(ALICE, task.id or 0)
    assert not session.in_transaction()


def test_call_inside_a_caller_transaction_joins_and_commits_it(
    repo: TaskRepository, session: Session, sent: list[str]
) -> None:
    """A call made while the caller holds a session transaction runs in it and commits it."""
    session.begin()
    task = repo.create(ALICE, TaskCreate(title="in the caller's transaction"))
    assert not session.in_transaction()
    assert repo.get(ALICE, task.id or 0) == task
    assert len(sent) == 2


def test_session_bound_to_a_connection_sends_one_statement_per_call(
    engine: Engine, sent: list[str]
) -> None:
    """A session bound to a Connection rather than an Engine still costs one statement a call."""
    with engine.connect() as conn, Session(bind=conn, expire_on_commit=False) as session:
        repo = TaskRepository(session)
        task = repo.create(ALICE, TaskCreate(title="on a connection"))
        assert repo.get(ALICE, task.id or 0) == task
        assert [t.id for t in repo.list(ALICE)] == [task.id]
    assert [s.split()[0] for s in sent] == ["INSERT", "SELECT", "SELECT"]
