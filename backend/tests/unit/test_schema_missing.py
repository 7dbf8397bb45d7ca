"""A database without the tasks table: each repository call says to run `todo-db migrate`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session

from tests.async_face import runner
from tests.schema_missing import CALLS
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.db import create_db_engine
from todo_backend.errors import SchemaMissingError, TodoBackendError
from todo_backend.repository import TaskRepository

__all__ = ["runner"]  # fixture


@pytest.fixture
def empty_file(tmp_path: Path) -> str:
    """The URL of a SQLite file database with no tables."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    engine = create_db_engine(url)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    engine.dispose()
    return url


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_sync_calls_raise_schema_missing(empty_file: str, call: Callable[[Any], Any]) -> None:
    """TaskRepository: SchemaMissingError (a TodoBackendError) naming `todo-db migrate`."""
    engine = create_db_engine(empty_file)
    try:
        with Session(engine) as session, pytest.raises(SchemaMissingError) as info:
            call(TaskRepository(session))
    finally:
        engine.dispose()
    assert isinstance(info.value, TodoBackendError)
    assert "todo-db migrate" in str(info.value)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_async_calls_raise_schema_missing(
    empty_file: str, call: Callable[[Any], Any], runner: asyncio.Runner
) -> None:
    """AsyncTaskRepository: the same SchemaMissingError."""
    engine = create_async_db_engine(empty_file)

    async def scenario() -> None:
        async for session in get_async_session(engine):
            await call(AsyncTaskRepository(session))

    try:
        with pytest.raises(SchemaMissingError, match="todo-db migrate"):
            runner.run(scenario())
    finally:
        runner.run(engine.dispose())
