"""TaskRepository on PostgreSQL: the shared contract, plus PostgreSQL-only facts."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, text

from tests.repository_contract import RepositoryContract
from todo_backend.models import TaskCreate
from todo_backend.repository import TaskRepository


class TestRepositoryOnPostgreSQL(RepositoryContract):
    """The shared repository contract, on PostgreSQL."""


def test_timestamps_are_utc_whatever_the_session_timezone(engine: Engine) -> None:
    """A server or role TimeZone other than UTC still yields UTC-offset timestamps."""
    with engine.connect() as conn:
        database = conn.execute(text("select current_database()")).scalar_one()
        conn.execute(text(f"ALTER DATABASE \"{database}\" SET timezone TO 'Asia/Kolkata'"))
        conn.commit()
    engine.dispose()  # new connections pick up the database's TimeZone
    try:
        from todo_backend.db import get_session

        repo = TaskRepository(next(get_session(engine)))
        task = repo.create("alice", TaskCreate(title="tz"))
        with engine.connect() as conn:
            assert conn.execute(text("show timezone")).scalar_one() == "Asia/Kolkata"
        got = repo.get("alice", task.id or 0)
        assert got is not None
        assert got.created_at == task.created_at
        assert got.created_at.utcoffset() == timedelta(0)
        assert [t.created_at.utcoffset() for t in repo.list("alice")] == [timedelta(0)]
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" RESET timezone'))
            conn.commit()
        engine.dispose()
