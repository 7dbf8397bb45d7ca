"""A PostgreSQL database without the tasks table (42P01): each call says `todo-db migrate`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.engine import URL

from tests.async_face import runner
from tests.schema_missing import (
    BEHIND_CALLS,
    CALLS,
    check_async,
    check_sync,
    create_behind_table,
    drop_tasks,
)

__all__ = ["runner"]  # fixture


def _url(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_sync_calls_raise_schema_missing(scratch_url: URL, call: Callable[[Any], Any]) -> None:
    """TaskRepository on psycopg2: SchemaMissingError naming `todo-db migrate`."""
    check_sync(_url(scratch_url), call)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_async_calls_raise_schema_missing(
    scratch_url: URL, call: Callable[[Any], Any], runner: asyncio.Runner
) -> None:
    """AsyncTaskRepository on psycopg 3: the same SchemaMissingError."""
    check_async(_url(scratch_url), call, runner)


@pytest.fixture
def behind_url(scratch_url: URL) -> Iterator[str]:
    """The scratch database with a tasks table lacking a column the models have, for the test."""
    url = _url(scratch_url)
    create_behind_table(url)
    yield url
    drop_tasks(url)


@pytest.mark.parametrize("call", BEHIND_CALLS.values(), ids=BEHIND_CALLS.keys())
def test_sync_calls_on_a_schema_behind_the_code_say_migrate(
    behind_url: str, call: Callable[[Any], Any]
) -> None:
    """TaskRepository, a column missing (42703): SchemaMissingError, the database is behind."""
    check_sync(behind_url, call, says="the database is behind the code")


@pytest.mark.parametrize("call", BEHIND_CALLS.values(), ids=BEHIND_CALLS.keys())
def test_async_calls_on_a_schema_behind_the_code_say_migrate(
    behind_url: str, call: Callable[[Any], Any], runner: asyncio.Runner
) -> None:
    """AsyncTaskRepository on psycopg 3, a column missing: the same SchemaMissingError."""
    check_async(behind_url, call, runner, says="the database is behind the code")
