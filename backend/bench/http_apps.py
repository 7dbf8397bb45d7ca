"""The two FastAPI services of the HTTP benchmark, as uvicorn app factories.

- :func:`package_app`: the README's recipe, executed as written (the reader's app on
  ``todo_backend.aio`` and ``todo_backend.fastapi``).
- :func:`queuepool_app`: the same on SQLAlchemy's plain pool, to show the churn.
- :func:`floor_app`: the same HTTP API written by hand on psycopg 3 async and
  ``psycopg_pool.AsyncConnectionPool`` (5 to 20 connections, autocommit,
  ``prepare_threshold=None``: no server-side prepared statements, so it is as
  PgBouncer-safe as the package), the same request models (``TaskCreate``,
  ``TaskUpdate``), the same ``response_model=TaskRead`` and the same collector
  setting as the package's lifespan (``gc.freeze()`` after startup). It is the floor:
  what a careful hand-written service costs, framework included.

Both read ``DATABASE_URL`` from the environment (``postgresql://`` form) and expect
the schema to exist.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import FastAPI, Header, HTTPException
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.pool import AsyncAdaptedQueuePool

from bench.common import SQL_GET, SQL_INSERT, SQL_LIST
from todo_backend.models import TaskCreate, TaskRead, TaskUpdate, utc_now

README: Final = Path(__file__).resolve().parents[2] / "README.md"
_COLUMNS: Final = "id, user_id, title, description, complete, created_at, updated_at"
# The user id, as the README's recipe takes it (module level: routes resolve it here).
User = Annotated[str, Header(alias="X-User")]
_SQL_LIST_BEFORE: Final = (
    "SELECT id, user_id, title, description, complete, created_at, updated_at "
    "FROM tasks WHERE user_id = %s AND id < %s ORDER BY id DESC LIMIT %s"
)


def package_app() -> FastAPI:
    """Return the README's FastAPI service, built from the README's own code block."""
    blocks = re.findall(r"^```python\n(.*?)^```$", README.read_text("utf-8"), re.DOTALL | re.M)
    [recipe] = [block for block in blocks if "todo_backend.fastapi" in block]
    namespace: dict[str, Any] = {"__name__": "readme_recipe"}
    exec(compile(recipe, str(README), "exec"), namespace)  # noqa: S102 - our own README
    app = namespace["app"]
    if not isinstance(app, FastAPI):
        raise TypeError("the README's recipe must define `app`, a FastAPI application")
    app.state.todo_bench_engine = namespace["engine"]
    return app


def queuepool_app() -> FastAPI:
    """Return the README's service on SQLAlchemy's plain QueuePool: the churn before.

    The same pool bounds (5 + 15) and recycling, but each connection above 5 is
    closed as soon as it is returned to a full pool, as the engines did before
    :class:`~todo_backend.pool.AsyncIdleQueuePool`.
    """
    app = package_app()
    engine = app.state.todo_bench_engine
    sync = engine.sync_engine
    old = sync.pool
    sync.pool = AsyncAdaptedQueuePool(
        old._creator,
        pool_size=old.size(),
        max_overflow=old._max_overflow,
        timeout=old.timeout(),
        recycle=old._recycle,
        dialect=old._dialect,
        _dispatch=old.dispatch,
    )
    return app


def floor_app() -> FastAPI:
    """Return the same API hand-written on psycopg 3 and psycopg_pool (the floor)."""
    url = os.environ["DATABASE_URL"].replace("postgresql+psycopg2://", "postgresql://")
    pool = AsyncConnectionPool(
        url,
        min_size=5,
        max_size=20,
        open=False,
        kwargs={"autocommit": True, "prepare_threshold": None, "row_factory": dict_row},
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # The collector set up as the package's lifespan sets it (gc.freeze() after
        # startup), so that the two sides differ only in their data layer.
        gc.collect()
        gc.freeze()
        await pool.open(wait=True)
        try:
            yield
        finally:
            await pool.close()
            gc.unfreeze()

    app = FastAPI(lifespan=lifespan)

    async def one(sql: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        async with pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()  # type: ignore[return-value]

    @app.post("/tasks", status_code=201, response_model=TaskRead)
    async def add_task(data: TaskCreate, user: User) -> Any:
        now = utc_now()
        return await one(SQL_INSERT, (user, data.title, data.description, data.complete, now, now))

    @app.get("/tasks/{task_id}", response_model=TaskRead)
    async def get_task(task_id: int, user: User) -> Any:
        row = await one(SQL_GET, (user, task_id))
        if row is None:
            raise HTTPException(404, "no such task")
        return row

    @app.get("/tasks", response_model=list[TaskRead])
    async def list_tasks(user: User, limit: int = 50, before_id: int | None = None) -> Any:
        if not 1 <= limit <= 100:
            raise HTTPException(422, "limit must be 1..100")
        async with pool.connection() as conn:
            if before_id is None:
                cur = await conn.execute(SQL_LIST, (user, limit))
            else:
                cur = await conn.execute(_SQL_LIST_BEFORE, (user, before_id, limit))
            return await cur.fetchall()

    @app.patch("/tasks/{task_id}", response_model=TaskRead)
    async def change_task(task_id: int, data: TaskUpdate, user: User) -> Any:
        changes = data.model_dump(exclude_unset=True)
        sets = ", ".join(f"{name} = %s" for name in changes)
        # Column names come from TaskUpdate's fields, never from the request.
        sql = (
            f"UPDATE tasks SET {sets + ', ' if sets else ''}updated_at = %s "  # noqa: S608
            f"WHERE user_id = %s AND id = %s RETURNING {_COLUMNS}"
        )
        row = await one(sql, (*changes.values(), utc_now(), user, task_id))
        if row is None:
            raise HTTPException(404, "no such task")
        return row

    return app
