"""What both parts of the benchmark share: the statements of the floor, users, samples.

``run.py`` (the sync repository against raw psycopg2) and ``async_side.py`` (the async
repository against raw psycopg 3) time the same operations with the same SQL.
"""

from __future__ import annotations

import json
import statistics
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from todo_backend import migrate
from todo_backend.db import init_db

__all__ = [
    "BULK_USER",
    "LIST_USER",
    "OPS",
    "SQL_BULK",
    "SQL_DELETE",
    "SQL_GET",
    "SQL_INSERT",
    "SQL_LIST",
    "SQL_UPDATE",
    "WORK_USER",
    "Samples",
    "check",
    "make_schema",
    "scratch_database",
    "write_report",
]

OPS: Final = ("create", "get", "list", "update", "delete")
LIST_USER: Final = "bench-list"
WORK_USER: Final = "bench-work"
BULK_USER: Final = "bench-bulk"

SQL_INSERT: Final = (
    "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at) "
    "VALUES (%s, %s, %s, %s, %s, %s) "
    "RETURNING id, user_id, title, description, complete, created_at, updated_at"
)
SQL_GET: Final = (
    "SELECT id, user_id, title, description, complete, created_at, updated_at "
    "FROM tasks WHERE user_id = %s AND id = %s"
)
SQL_LIST: Final = (
    "SELECT id, user_id, title, description, complete, created_at, updated_at "
    "FROM tasks WHERE user_id = %s ORDER BY id DESC LIMIT %s"
)
SQL_UPDATE: Final = (
    "UPDATE tasks SET title = %s, complete = %s, updated_at = %s "
    "WHERE user_id = %s AND id = %s "
    "RETURNING id, user_id, title, description, complete, created_at, updated_at"
)
SQL_DELETE: Final = "DELETE FROM tasks WHERE user_id = %s AND id = %s"
SQL_BULK: Final = (
    "INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at) "
    "VALUES %s RETURNING id, user_id, title, description, complete, created_at, updated_at"
)


@dataclass
class Samples:
    """Wall times (seconds) and round trips of repeated calls of one operation."""

    seconds: list[float] = field(default_factory=list)
    trips: list[int] = field(default_factory=list)

    def add(self, seconds: float, trips: int) -> None:
        """Record one call."""
        self.seconds.append(seconds)
        self.trips.append(trips)

    def summary(self) -> dict[str, Any]:
        """Return median, p10 and p90 in microseconds, and the round trips seen."""
        us = sorted(s * 1e6 for s in self.seconds)
        return {
            "n": len(us),
            "median_us": statistics.median(us),
            "p10_us": us[len(us) // 10],
            "p90_us": us[(len(us) * 9) // 10],
            "round_trips": _trips(self.trips),
        }


def _trips(trips: list[int]) -> dict[str, int] | None:
    if not trips or all(t < 0 for t in trips):
        return None
    return {"median": int(statistics.median(trips)), "max": max(trips), "min": min(trips)}


def check(ok: bool, what: str) -> None:
    """Stop the benchmark if a call did not do what it is timed for."""
    if not ok:
        raise RuntimeError(f"benchmark sanity check failed: {what}")


@contextmanager
def scratch_database(server: URL, prefix: str) -> Iterator[URL]:
    """Create an empty database named *prefix* plus a random suffix on *server*; drop it after."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def make_schema(engine: Engine, row_security: str) -> None:
    """Create the schema: migrated to head (row-level security on), or by init_db (off).

    Off is the same code with the policy absent: the engine's per-transaction role
    switch then falls back to the connecting role, as on a database made by init_db.
    The raw driver side connects as the connecting role either way (a superuser or
    BYPASSRLS role for its seeding and bulk loads).
    """
    if row_security == "on":
        migrate.upgrade(engine)
    else:
        init_db(engine)


def write_report(out: Path, name: str, markdown: str, results: dict[str, Any]) -> None:
    """Print *markdown* and write it and *results* to *out*/NAME.md and NAME.json."""
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown, encoding="utf-8")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
