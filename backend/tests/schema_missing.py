"""Every repository call on a database without the tasks table, for both faces.

Shared by the SQLite (unit) and PostgreSQL (integration) checks that such a call
raises :class:`~todo_backend.errors.SchemaMissingError` naming ``todo-db migrate``;
so do the calls that need a column a database behind the code lacks (BEHIND_CALLS).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session

from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.db import create_db_engine
from todo_backend.errors import SchemaMissingError, TodoBackendError
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

__all__ = [
    "BEHIND_CALLS",
    "CALLS",
    "check_async",
    "check_sync",
    "create_behind_table",
    "drop_tasks",
]

# name -> a call on a repository (sync or async alike: the async one returns a coroutine).
CALLS: dict[str, Callable[[Any], Any]] = {
    "create": lambda repo: repo.create("alice", TaskCreate(title="t")),
    "create_many": lambda repo: repo.create_many("alice", [TaskCreate(title="t")] * 2),
    "get": lambda repo: repo.get("alice", 1),
    "list": lambda repo: repo.list("alice"),
    "update": lambda repo: repo.update("alice", 1, TaskUpdate(complete=True)),
    "delete": lambda repo: repo.delete("alice", 1),
    "count": lambda repo: repo.count("alice"),
}

# The calls that read or write every content column (delete and count need none of them).
BEHIND_CALLS: dict[str, Callable[[Any], Any]] = {
    name: CALLS[name] for name in ("create", "create_many", "get", "list", "update")
}


def create_behind_table(url: str) -> None:
    """Create ``tasks`` as a schema older than the code has it: without ``description``."""
    engine = create_db_engine(url)
    key = (
        "id INTEGER PRIMARY KEY" if engine.dialect.name == "sqlite" else "id BIGSERIAL PRIMARY KEY"
    )
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS tasks"))
            conn.execute(
                text(
                    f"CREATE TABLE tasks ({key}, user_id VARCHAR(255) NOT NULL, "
                    "title VARCHAR(200) NOT NULL, complete BOOLEAN NOT NULL, "
                    "created_at TIMESTAMP WITH TIME ZONE NOT NULL, "
                    "updated_at TIMESTAMP WITH TIME ZONE NOT NULL)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                    "VALUES ('alice', 't', false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
    finally:
        engine.dispose()


def check_sync(url: str, call: Callable[[Any], Any], says: str = "todo-db migrate") -> None:
    """Assert that *call* on a TaskRepository on *url* raises the missing-schema error."""
    engine = create_db_engine(url)
    try:
        with Session(engine) as session, pytest.raises(SchemaMissingError) as info:
            call(TaskRepository(session))
    finally:
        engine.dispose()
    assert isinstance(info.value, TodoBackendError)
    assert "todo-db migrate" in str(info.value)
    assert says in str(info.value)


def check_async(
    url: str, call: Callable[[Any], Any], runner: asyncio.Runner, says: str = "todo-db migrate"
) -> None:
    """Assert the same of *call* on an AsyncTaskRepository on *url*."""
    engine = create_async_db_engine(url)

    async def scenario() -> None:
        async for session in get_async_session(engine):
            await call(AsyncTaskRepository(session))

    try:
        with pytest.raises(SchemaMissingError, match="todo-db migrate") as info:
            runner.run(scenario())
    finally:
        runner.run(engine.dispose())
    assert says in str(info.value)


def drop_tasks(url: str) -> None:
    """Drop the ``tasks`` table :func:`create_behind_table` made, if it is there."""
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS tasks"))
    finally:
        engine.dispose()
