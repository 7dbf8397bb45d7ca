"""The settings' ranges on PostgreSQL: the largest bound Settings accepts, the server takes.

Settings refuse a statement, lock or idle-in-transaction bound above MAX_SECONDS
(unit tests); these show that MAX_SECONDS itself is no such value: on both faces the
engine sends it and PostgreSQL runs the statement under it, to the millisecond.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from tests.async_face import runner
from todo_backend.aio import create_async_db_engine
from todo_backend.config import MAX_SECONDS, Settings
from todo_backend.db import create_db_engine

__all__ = ["runner"]  # fixture

SHOWN: tuple[tuple[str, str], ...] = (
    ("statement_timeout", "2147483647ms"),
    ("lock_timeout", "2147483647ms"),
    ("idle_in_transaction_session_timeout", "2147483647ms"),
)
SHOW_ALL = "SELECT " + ", ".join(f"current_setting('{name}')" for name, _ in SHOWN)


@pytest.fixture
def largest(scratch_url: URL) -> Settings:
    """Settings for the server under test with every PostgreSQL bound at its largest."""
    return Settings(
        database_url=scratch_url.render_as_string(hide_password=False),
        statement_timeout=MAX_SECONDS,
        lock_timeout=MAX_SECONDS,
        idle_in_transaction_timeout=MAX_SECONDS,
    )


def test_the_largest_bounds_run_on_the_sync_engine(largest: Settings) -> None:
    """psycopg2's engine sends MAX_SECONDS as 2,147,483,647 ms and the statement runs."""
    engine = create_db_engine(largest)
    try:
        with engine.begin() as connection:
            shown = connection.execute(text(SHOW_ALL)).one()
    finally:
        engine.dispose()
    assert tuple(shown) == tuple(value for _, value in SHOWN)


def test_the_largest_bounds_run_on_the_async_engine(
    largest: Settings, runner: asyncio.Runner
) -> None:
    """psycopg 3's engine sends MAX_SECONDS as 2,147,483,647 ms and the statement runs."""
    engine = create_async_db_engine(largest)

    async def show() -> tuple[object, ...]:
        async with engine.begin() as connection:
            return tuple((await connection.execute(text(SHOW_ALL))).one())

    try:
        shown = runner.run(show())
    finally:
        runner.run(engine.dispose())
    assert shown == tuple(value for _, value in SHOWN)
