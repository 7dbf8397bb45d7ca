"""A SQLite database without the tasks table: each repository call says `todo-db migrate`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tests.async_face import runner
from tests.schema_missing import (
    BEHIND_CALLS,
    CALLS,
    check_async,
    check_sync,
    create_behind_table,
)
from todo_backend.db import create_db_engine

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
    check_sync(empty_file, call)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_async_calls_raise_schema_missing(
    empty_file: str, call: Callable[[Any], Any], runner: asyncio.Runner
) -> None:
    """AsyncTaskRepository: the same SchemaMissingError."""
    check_async(empty_file, call, runner)


@pytest.fixture
def behind_file(tmp_path: Path) -> str:
    """The URL of a SQLite file database whose tasks table lacks a column the models have."""
    url = f"sqlite:///{tmp_path / 'behind.db'}"
    create_behind_table(url)
    return url


@pytest.mark.parametrize("call", BEHIND_CALLS.values(), ids=BEHIND_CALLS.keys())
def test_sync_calls_on_a_schema_behind_the_code_say_migrate(
    behind_file: str, call: Callable[[Any], Any]
) -> None:
    """TaskRepository, a column missing: SchemaMissingError saying the database is behind."""
    check_sync(behind_file, call, says="the database is behind the code")


@pytest.mark.parametrize("call", BEHIND_CALLS.values(), ids=BEHIND_CALLS.keys())
def test_async_calls_on_a_schema_behind_the_code_say_migrate(
    behind_file: str, call: Callable[[Any], Any], runner: asyncio.Runner
) -> None:
    """AsyncTaskRepository, a column missing: the same SchemaMissingError."""
    check_async(behind_file, call, runner, says="the database is behind the code")
