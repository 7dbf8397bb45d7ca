"""The sync engine as an ordinary SQLAlchemy/SQLModel engine, directly and through PgBouncer.

An application built on the package uses ``create_db_engine`` for its own tables,
queries and test fixtures too. Whatever the engine adds (the statement, lock and
idle bounds in front of a transaction's first statement) must not change what
SQLAlchemy promises: savepoints recover, the ``create_savepoint`` fixture pattern
works, executemany and bulk inserts run, results stream, statements that refuse a
transaction block run in autocommit, and a caller's own ``SET LOCAL`` stands. The
bounds still hold for the caller's statements inside a transaction. Targets are
those of test_bounds_pg.py: the server under test, or a throwaway cluster behind
PgBouncer. Errors of the caller's own SQL are SQLAlchemy's, as with any engine.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, insert, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, col, select

from tests.integration.test_bounds_pg import ALICE, PAST_TINY, TINY, Target, _titles, made, target
from todo_backend.models import Task, TaskCreate, utc_now
from todo_backend.repository import TaskRepository

__all__ = ["made", "target"]  # fixtures

# Bounds the server reports back in its own spelling, unlike any server default.
BOUNDS: dict[str, float] = {
    "statement_timeout": 7,
    "lock_timeout": 0.25,
    "idle_in_transaction_timeout": 90,
}
SHOWN = {
    "statement_timeout": "7s",
    "lock_timeout": "250ms",
    "idle_in_transaction_session_timeout": "90s",
}
_INSERT_ROW = text(
    "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
    "VALUES (:user_id, :title, false, :now, :now)"
)


@pytest.fixture
def compat(target: Target, made: list[Engine]) -> Engine:
    """The package's engine on the target, with bounds the tests can recognise."""
    engine = target.engine(**BOUNDS)
    made.append(engine)
    return engine


def shown(conn: Connection) -> dict[str, str]:
    """The three bounds as the server applies them to the current transaction."""
    return {name: str(conn.execute(text(f"SHOW {name}")).scalar_one()) for name in SHOWN}


def rows(*titles: str) -> list[dict[str, Any]]:
    """Parameter sets of ALICE's tasks with *titles*, for executemany and bulk inserts."""
    now = utc_now()
    return [{"user_id": ALICE, "title": title, "now": now} for title in titles]


def test_begin_nested_recovers_from_an_integrity_error(
    compat: Engine, target: Target, made: list[Engine]
) -> None:
    """After an IntegrityError in a savepoint the transaction goes on, still bounded."""
    with Session(compat, expire_on_commit=False) as session:
        first = Task(user_id=ALICE, title="first")
        session.add(first)
        session.commit()
    with Session(compat) as session:
        # The failing INSERT is the transaction's first statement: the bounds it carried
        # are undone with the savepoint and must be sent again.
        with pytest.raises(IntegrityError), session.begin_nested():  # noqa: PT012
            session.add(Task(id=first.id, user_id=ALICE, title="duplicate"))
            session.flush()
        assert shown(session.connection()) == SHOWN
        session.add(Task(user_id=ALICE, title="second"))
        session.commit()
    assert sorted(_titles(target, made)) == ["first", "second"]


def test_the_create_savepoint_fixture_pattern_runs_repository_calls(
    compat: Engine, target: Target, made: list[Engine]
) -> None:
    """A test session joined to an outer transaction recovers from errors and leaves nothing."""
    with compat.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        repo = TaskRepository(session)
        kept = repo.create(ALICE, TaskCreate(title="kept"))
        session.add(Task(id=kept.id, user_id=ALICE, title="duplicate"))
        with pytest.raises(IntegrityError):
            session.flush()
        session.rollback()
        repo.create(ALICE, TaskCreate(title="after"))
        assert [t.title for t in repo.list(ALICE)] == ["after", "kept"]
        assert shown(session.connection()) == SHOWN
        session.close()
        outer.rollback()
    assert _titles(target, made) == []


def test_an_orm_flush_of_several_changed_rows(compat: Engine) -> None:
    """Changing several loaded rows and committing updates all of them (an executemany)."""
    repo = TaskRepository(Session(compat))
    for title in ("a", "b", "c"):
        repo.create(ALICE, TaskCreate(title=title))
    with Session(compat) as session:
        for task in session.exec(select(Task).where(col(Task.user_id) == ALICE)):
            task.complete = True
        session.commit()
    assert repo.count(ALICE, complete=True) == 3


def test_executemany_of_a_text_statement(
    compat: Engine, target: Target, made: list[Engine]
) -> None:
    """execute(text(...), [params, ...]) runs first in a transaction and later, bounded."""
    with compat.begin() as conn:
        conn.execute(_INSERT_ROW, rows("a", "b"))
        assert shown(conn) == SHOWN
        conn.execute(_INSERT_ROW, rows("c", "d"))
    assert sorted(_titles(target, made)) == ["a", "b", "c", "d"]


def test_a_bulk_orm_insert(compat: Engine) -> None:
    """session.exec(insert(Task), params=[...]) stores every row (a bulk ORM insert)."""
    now = utc_now()
    values = [
        {
            "user_id": ALICE,
            "title": f"t{i}",
            "complete": False,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(5)
    ]
    with Session(compat) as session:
        session.exec(insert(Task), params=values)
        session.commit()
    assert TaskRepository(Session(compat)).count(ALICE) == 5


def test_stream_results_returns_every_row(compat: Engine) -> None:
    """A server-side cursor streams the rows in batches as the caller asks for them."""
    TaskRepository(Session(compat)).create_many(
        ALICE, [TaskCreate(title=f"t{i}") for i in range(7)]
    )
    with compat.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=2).execute(
            text("SELECT title FROM tasks WHERE user_id = :u ORDER BY id"), {"u": ALICE}
        )
        assert list(result.scalars()) == [f"t{i}" for i in range(7)]


def test_stream_results_is_bounded(target: Target, made: list[Engine]) -> None:
    """A streamed statement first in its transaction still runs under the statement bound."""
    engine = target.engine(statement_timeout=TINY)
    made.append(engine)
    with engine.connect() as conn, pytest.raises(DBAPIError, match="statement timeout"):
        conn.execution_options(stream_results=True).execute(
            text("SELECT pg_sleep(:s)"), {"s": PAST_TINY}
        ).all()


def test_vacuum_and_create_index_concurrently_in_autocommit(compat: Engine) -> None:
    """Statements that refuse a transaction block run on an autocommit connection."""
    with compat.connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        auto.execute(text("VACUUM tasks"))
        auto.execute(text("CREATE INDEX CONCURRENTLY compat_title ON tasks (title)"))
        auto.execute(text("DROP INDEX CONCURRENTLY compat_title"))


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_a_callers_set_local_stands(compat: Engine, first: bool) -> None:
    """A caller's SET LOCAL holds for the rest of its transaction, first statement or not."""
    with compat.begin() as conn:
        if not first:
            conn.execute(text("SELECT 1"))
        conn.execute(text("SET LOCAL statement_timeout = '5s'"))
        conn.execute(text("SELECT 1"))
        assert shown(conn) == {**SHOWN, "statement_timeout": "5s"}


def test_the_bounds_hold_for_a_callers_whole_transaction(compat: Engine) -> None:
    """Every statement of a caller's transaction runs under the engine's bounds."""
    with compat.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.execute(text("SELECT 2"))
        assert shown(conn) == SHOWN
        with conn.begin_nested():
            assert shown(conn) == SHOWN


@pytest.mark.parametrize("where", ["first", "later", "savepoint"])
def test_the_statement_bound_fires_on_a_callers_raw_statement(
    target: Target, made: list[Engine], where: str
) -> None:
    """A raw pg_sleep past DB_STATEMENT_TIMEOUT is cancelled wherever it sits in a transaction."""
    engine = target.engine(statement_timeout=TINY)
    made.append(engine)
    sleep = text("SELECT pg_sleep(:s)")
    with engine.connect() as conn:
        if where == "later":
            conn.execute(text("SELECT 1"))
        if where == "savepoint":
            conn.begin_nested()
        with pytest.raises(DBAPIError, match="statement timeout"):
            conn.execute(sleep, {"s": PAST_TINY})


# Statements PostgreSQL takes only before a transaction's first query, and what they set.
BEFORE_ANY_QUERY = [
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "transaction_isolation", "serializable"),
    ("/* a read-only endpoint */ SET TRANSACTION READ ONLY", "transaction_read_only", "on"),
    (
        "-- reports\nset transaction isolation level repeatable read, read only, deferrable",
        "transaction_deferrable",
        "on",
    ),
    (
        "SET LOCAL transaction_isolation = 'repeatable read'",
        "transaction_isolation",
        "repeatable read",
    ),
]


@pytest.mark.parametrize(("statement", "name", "value"), BEFORE_ANY_QUERY)
def test_set_transaction_as_the_first_statement(
    compat: Engine, statement: str, name: str, value: str
) -> None:
    """SET TRANSACTION opens a caller's transaction as anywhere; the next statement is bounded."""
    with compat.begin() as conn:
        conn.execute(text(statement))
        assert shown(conn) == SHOWN
        assert conn.execute(text(f"SHOW {name}")).scalar_one() == value


def test_a_transaction_imports_an_exported_snapshot(
    compat: Engine, target: Target, made: list[Engine]
) -> None:
    """SET TRANSACTION SNAPSHOT after SET TRANSACTION ISOLATION LEVEL sees the exporter's data."""
    exporter = create_engine(target.direct)
    made.append(exporter)
    with exporter.connect() as source:
        source.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
        snapshot = source.execute(text("SELECT pg_export_snapshot()")).scalar_one()
        with compat.begin() as conn:
            conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            conn.execute(text(f"SET TRANSACTION SNAPSHOT '{snapshot}'"))
            assert shown(conn) == SHOWN
        source.execute(text("ROLLBACK"))


def test_a_commented_rollback_to_savepoint_sends_the_bounds_again(compat: Engine) -> None:
    """A comment before ROLLBACK TO SAVEPOINT hides nothing: the bounds it undid come back."""
    with compat.begin() as conn:
        conn.execute(text("SAVEPOINT s1"))
        conn.execute(text("SELECT 1"))  # the transaction's first statement: the bounds
        conn.execute(text("/* undo */ ROLLBACK TO SAVEPOINT s1"))
        assert shown(conn) == SHOWN


def test_two_phase_transactions_are_bounded_like_any(target: Target, made: list[Engine]) -> None:
    """begin_twophase opens a transaction as begin does: its first statement carries the bounds."""
    engine = target.engine(**BOUNDS, pool_size=1, max_overflow=0)  # one connection throughout
    made.append(engine)
    with engine.begin() as conn:
        assert shown(conn) == SHOWN
    for _ in range(2):  # after an ordinary transaction, then after a two-phase one
        with engine.connect() as conn:
            two_phase = conn.begin_twophase()
            assert shown(conn) == SHOWN
            two_phase.rollback()
