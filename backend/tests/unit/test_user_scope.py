"""user_scope on SQLite: a validated marker; the repository's condition is the only wall."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import Session

from todo_backend import TaskCreate, TaskRepository, check_database, user_scope
from todo_backend.aio import create_async_db_engine
from todo_backend.aio import user_scope as async_user_scope
from todo_backend.db import user_call

COUNT = text("SELECT count(*) FROM tasks")


def test_user_scope_on_sqlite_marks_the_session_only(sqlite_engine: Engine) -> None:
    """SQLite has no row-level security: inside a scope raw SQL still sees every row."""
    repo = TaskRepository(Session(sqlite_engine))
    repo.create("alice", TaskCreate(title="a"))
    repo.create("bob", TaskCreate(title="b"))
    with Session(sqlite_engine) as session:
        with user_scope(session, "alice") as scoped:
            assert scoped is session
            assert session.info["todo_backend.user_scope"] == "alice"
            with user_scope(session, "bob"):
                assert session.info["todo_backend.user_scope"] == "bob"
            assert session.info["todo_backend.user_scope"] == "alice"
            assert session.execute(COUNT).scalar_one() == 2
        assert "todo_backend.user_scope" not in session.info
    assert [t.title for t in repo.list("alice")] == ["a"]


@pytest.mark.parametrize("bad", ["", " alice", "a" * 256, "al\x00ice", "tab\there"])
def test_user_scope_validates_like_the_repository(sqlite_engine: Engine, bad: str) -> None:
    """A user_id the repository refuses is refused before the block runs."""
    with Session(sqlite_engine) as session:
        with pytest.raises(ValidationError), user_scope(session, bad):
            pass  # pragma: no cover - never entered
        assert "todo_backend.user_scope" not in session.info


def test_async_user_scope_on_sqlite_marks_the_session_only() -> None:
    """The async scope validates, marks and unmarks the session, as the sync one."""

    async def body() -> None:
        engine = create_async_db_engine("sqlite://")
        try:
            async with AsyncSession(engine) as session:
                async with async_user_scope(session, "alice") as scoped:
                    assert scoped is session
                    assert session.info["todo_backend.user_scope"] == "alice"
                assert "todo_backend.user_scope" not in session.info
                with pytest.raises(ValidationError):
                    async with async_user_scope(session, " bad"):
                        pass  # pragma: no cover - never entered
        finally:
            await engine.dispose()

    asyncio.run(body())


def test_check_says_nothing_of_row_security_on_sqlite(sqlite_engine: Engine) -> None:
    """check_database leaves row_security empty and warns of nothing on SQLite."""
    health = check_database(sqlite_engine)
    assert (health.row_security, health.warnings) == ("", ())


@pytest.mark.parametrize("user_id", ["alice", "o'brien", "100%", "back\\slash", "ünï"])
def test_the_user_travels_hex_encoded(user_id: str) -> None:
    """No character of a user id reaches the SQL text: it is sent as hex digits."""
    call = user_call(user_id)
    assert user_id.encode().hex() in call
    inner = call.split("decode('", 1)[1].split("'", 1)[0]
    assert set(inner) <= set("0123456789abcdef")
    assert "%" not in call
    assert user_call(None) == "set_config('todo.user_id', '', true)"
