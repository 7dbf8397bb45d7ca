"""The async face of todo_backend, for async FastAPI routes (extra ``todo-backend[async]``).

The same engines, sessions and repository contract as the sync package, awaited:
:func:`create_async_db_engine` takes the same settings or URL as
:func:`~todo_backend.create_db_engine` and picks the async driver itself (psycopg 3
for PostgreSQL, aiosqlite for SQLite); :func:`get_async_session` yields one session
(:mod:`todo_backend.fastapi`, extra ``[fastapi]``, makes FastAPI dependencies);
:class:`AsyncTaskRepository` has the methods, arguments, results and errors of
:class:`~todo_backend.TaskRepository`. Both repositories carry
out the rules of :mod:`todo_backend.repository_core`, so they cannot drift apart.

``import todo_backend`` never imports this package: the sync package works without
the extra installed.
"""

import importlib

# Fail at import, with the fix, rather than at the first query with a driver's error.
for _module in ("greenlet", "psycopg", "aiosqlite"):
    try:
        importlib.import_module(_module)
    except ImportError as _missing:
        raise ImportError(
            f"todo_backend.aio needs the async extra ({_module} is not installed): "
            'pip install "todo-backend[async]"'
        ) from _missing

from todo_backend.aio.db import (  # noqa: E402
    create_async_db_engine,
    get_async_session,
    user_scope,
)
from todo_backend.aio.repository import AsyncTaskRepository  # noqa: E402

__all__ = ["AsyncTaskRepository", "create_async_db_engine", "get_async_session", "user_scope"]
