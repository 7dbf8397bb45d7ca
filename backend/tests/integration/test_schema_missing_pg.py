"""A PostgreSQL database without the tasks table (42P01): each call says `todo-db migrate`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.engine import URL

from tests.async_face import runner
from tests.schema_missing import CALLS, check_async, check_sync

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
