"""Scratch databases for the integration tests, on any server a URL names."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ProgrammingError

from todo_backend.db import CONNECTING_ROLE, create_db_engine, init_db

__all__ = ["emptied", "engine_with_schema", "fresh_database"]


@contextmanager
def fresh_database(server: URL, *, settings: Mapping[str, str] | None = None) -> Iterator[URL]:
    """Create an empty database on *server* (with per-database *settings*); drop it after.

    Settings made before anyone connects apply to every backend, also to those a
    pooler opens for it: a pooler's existing server connections are per database.
    """
    name = f"todo_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        for key, value in (settings or {}).items():
            conn.execute(text(f'ALTER DATABASE "{name}" SET "{key}" TO :value'), {"value": value})
    try:
        yield server.set(database=name)
    finally:
        try:
            _drop(admin, name)
        finally:
            admin.dispose()


def _drop(admin: Engine, name: str) -> None:
    """Drop database *name*, ending its remaining sessions (ours, or a pooler's).

    A role that is not a superuser may not end an autovacuum worker that happens to
    be working in the database (PostgreSQL 15 refuses the whole DROP ... FORCE with
    SQLSTATE 42501, "must be a member of the role whose process is being
    terminated": the worker has no role); it finishes within moments, so the drop is
    tried again for up to 10 s.
    """
    deadline = time.monotonic() + 10
    while True:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except ProgrammingError as err:
            if getattr(err.orig, "pgcode", None) != "42501" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextmanager
def engine_with_schema(url: URL) -> Iterator[Engine]:
    """The package's engine on *url* with the schema created; disposed afterwards."""
    engine = create_db_engine(url.render_as_string(hide_password=False))
    try:
        init_db(engine)
        yield engine
    finally:
        engine.dispose()


def emptied(engine: Engine) -> Engine:
    """Return *engine* after emptying its tasks table and restarting the ids.

    As the connecting role: the application role may not TRUNCATE (which row-level
    security does not filter) where the database is migrated to head.
    """
    with engine.execution_options(**CONNECTING_ROLE).begin() as conn:
        conn.execute(text("TRUNCATE tasks RESTART IDENTITY"))
    return engine
