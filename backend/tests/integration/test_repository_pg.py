"""TaskRepository on PostgreSQL: the shared contract, plus PostgreSQL-only facts."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import DateTime, Engine, inspect, text
from sqlalchemy.engine import URL
from sqlmodel import Session

from tests.integration.databases import engine_with_schema, fresh_database
from tests.repository_contract import BoundToTheEngine, RepositoryContract
from todo_backend.db import get_session
from todo_backend.models import Task, TaskCreate
from todo_backend.repository import TaskRepository


class TestRepositoryOnPostgreSQL(RepositoryContract):
    """The shared repository contract, on PostgreSQL."""


class TestRepositoryBoundToTheEngineOnPostgreSQL(BoundToTheEngine, RepositoryContract):
    """The shared contract on PostgreSQL, the repositories bound to the engine."""


def test_timestamps_are_utc_whatever_the_session_timezone(admin_url: URL) -> None:
    """A database whose TimeZone is not UTC still yields UTC-offset timestamps."""
    with (
        fresh_database(admin_url, settings={"timezone": "Asia/Kolkata"}) as url,
        engine_with_schema(url) as engine,
    ):
        repo = TaskRepository(next(get_session(engine)))
        task = repo.create("alice", TaskCreate(title="tz"))
        with engine.connect() as conn:
            assert conn.execute(text("show timezone")).scalar_one() == "Asia/Kolkata"
        got = repo.get("alice", task.id or 0)
        assert got is not None
        assert got.created_at == task.created_at
        assert got.created_at.utcoffset() == timedelta(0)
        assert [t.created_at.utcoffset() for t in repo.list("alice")] == [timedelta(0)]


def test_schema_is_as_the_models_state(engine: Engine) -> None:
    """Column types, NULL-ability, primary key and indexes are those the models declare.

    BIGINT ids and TIMESTAMP WITH TIME ZONE timestamps among them (the data model,
    specs/002-database-setup/data-model.md, documents each column; test_docs.py keeps
    it true).
    """
    inspector = inspect(engine)
    columns = {c["name"]: c for c in inspector.get_columns("tasks")}
    table = Task.__table__  # type: ignore[attr-defined]
    described = {
        name: (c["type"].compile(dialect=engine.dialect), c["nullable"])
        for name, c in columns.items()
    }
    assert described == {
        column.name: (column.type.compile(dialect=engine.dialect), column.nullable)
        for column in table.columns
    }
    assert described["id"] == ("BIGINT", False)
    for name in ("created_at", "updated_at"):
        column_type = columns[name]["type"]
        assert isinstance(column_type, DateTime)
        assert column_type.timezone, f"{name} must be TIMESTAMP WITH TIME ZONE"
    assert inspector.get_pk_constraint("tasks")["constrained_columns"] == ["id"]
    indexes = {ix["name"]: ix["column_names"] for ix in inspector.get_indexes("tasks")}
    assert indexes == {index.name: [c.name for c in index.columns] for index in table.indexes}
    assert set(indexes) >= {"ix_tasks_user_id_id", "ix_tasks_user_id_complete_id"}


def test_a_users_page_is_read_from_the_index(engine: Engine) -> None:
    """The newest-first page of one user is an index scan, not a scan of others' rows."""
    repo = TaskRepository(next(get_session(engine)))
    for user in ("alice", "bob", "carol"):
        repo.create_many(user, [TaskCreate(title=f"t{i}") for i in range(300)])
    with engine.connect() as conn:
        conn.execute(text("ANALYZE tasks"))
        plans = [
            "\n".join(conn.execute(text(f"EXPLAIN {query}"), {"owner": "bob"}).scalars())
            for query in (
                "SELECT * FROM tasks WHERE user_id = :owner ORDER BY id DESC LIMIT 50",
                "SELECT * FROM tasks WHERE user_id = :owner AND complete ORDER BY id DESC LIMIT 50",
                "SELECT * FROM tasks WHERE user_id = :owner AND id < 500 ORDER BY id DESC LIMIT 50",
            )
        ]
    for plan in plans:
        assert "Seq Scan" not in plan, plan
        assert "ix_tasks_user_id" in plan, plan


def test_outer_connection_transaction_still_decides(engine: Engine) -> None:
    """With the session on a Connection in a transaction, rolling that back undoes every call."""
    with engine.connect() as conn:
        outer = conn.begin()
        with Session(
            bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        ) as session:
            repo = TaskRepository(session)
            repo.create("alice", TaskCreate(title="single call"))
            with repo.atomic():
                repo.create("alice", TaskCreate(title="in a block"))
            assert repo.count("alice") == 2
        outer.rollback()
    assert TaskRepository(next(get_session(engine))).count("alice") == 0
