"""A PostgreSQL database without the tasks table (42P01): each call says `todo-db migrate`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.engine import URL
from sqlmodel import Session

from tests.async_face import runner
from tests.schema_missing import CALLS
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.db import create_db_engine
from todo_backend.errors import SchemaMissingError
from todo_backend.repository import TaskRepository

__all__ = ["runner"]  # fixture


def _url(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_sync_calls_raise_schema_missing(scratch_url: URL, call: Callable[[Any], Any]) -> None:
    """TaskRepository on psycopg2: SchemaMissingError naming `todo-db migrate`."""
    engine = create_db_engine(_url(scratch_url))
    try:
        with Session(engine) as session, pytest.raises(SchemaMissingError, match="todo-db migrate"):
            call(TaskRepository(session))
    finally:
        engine.dispose()


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_async_calls_raise_schema_missing(
    scratch_url: URL, call: Callable[[Any], Any], runner: asyncio.Runner
) -> None:
    """AsyncTaskRepository on psycopg 3: the same SchemaMissingError."""
    engine = create_async_db_engine(_url(scratch_url))

    async def scenario() -> None:
        async for session in get_async_session(engine):
            await call(AsyncTaskRepository(session))

    try:
        with pytest.raises(SchemaMissingError, match="todo-db migrate"):
            runner.run(scenario())
    finally:
        runner.run(engine.dispose())
