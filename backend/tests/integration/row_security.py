"""Helpers of the row-level security tests: migrated databases and raw SQL on tasks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlmodel import Session

from tests.integration.databases import fresh_database
from todo_backend import migrate
from todo_backend.db import create_db_engine

__all__ = ["COUNT", "INSERT", "SEE", "migrated_database", "migrated_engine", "raw_rows"]

# Raw SQL of the kind later stages write, without any user condition.
SEE: Final = text("SELECT user_id, title FROM tasks ORDER BY id")
COUNT: Final = text("SELECT count(*) FROM tasks")
INSERT: Final = text(
    "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
    "VALUES (:user_id, :title, false, now(), now())"
)


@contextmanager
def migrated_database(server: URL) -> Iterator[URL]:
    """A fresh database on *server*, migrated to head (row-level security on)."""
    with fresh_database(server) as url:
        migrate.upgrade(url)
        yield url


@contextmanager
def migrated_engine(server: URL) -> Iterator[Engine]:
    """The package's engine on a fresh database of *server* migrated to head."""
    with migrated_database(server) as url:
        engine = create_db_engine(url.render_as_string(hide_password=False))
        try:
            yield engine
        finally:
            engine.dispose()


def raw_rows(session: Session) -> list[tuple[str, str]]:
    """Every (user_id, title) of tasks that *session*'s raw SQL can see, in id order."""
    return [(str(user), str(title)) for user, title in session.execute(SEE)]
