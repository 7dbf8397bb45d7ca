"""Every repository call on a database without the tasks table, for both faces.

Shared by the SQLite (unit) and PostgreSQL (integration) checks that such a call
raises :class:`~todo_backend.errors.SchemaMissingError` naming ``todo-db migrate``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlmodel import Session

from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.db import create_db_engine
from todo_backend.errors import SchemaMissingError, TodoBackendError
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

__all__ = ["CALLS", "check_async", "check_sync"]

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


def check_sync(url: str, call: Callable[[Any], Any]) -> None:
    """Assert that *call* on a TaskRepository on *url* raises the missing-schema error."""
    engine = create_db_engine(url)
    try:
        with Session(engine) as session, pytest.raises(SchemaMissingError) as info:
            call(TaskRepository(session))
    finally:
        engine.dispose()
    assert isinstance(info.value, TodoBackendError)
    assert "todo-db migrate" in str(info.value)


def check_async(url: str, call: Callable[[Any], Any], runner: asyncio.Runner) -> None:
    """Assert the same of *call* on an AsyncTaskRepository on *url*."""
    engine = create_async_db_engine(url)

    async def scenario() -> None:
        async for session in get_async_session(engine):
            await call(AsyncTaskRepository(session))

    try:
        with pytest.raises(SchemaMissingError, match="todo-db migrate"):
            runner.run(scenario())
    finally:
        runner.run(engine.dispose())
