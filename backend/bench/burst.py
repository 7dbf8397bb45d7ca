"""How many server connections a burst of calls opens, on each face of the repository.

``python backend/bench/burst.py [--workers 32] [--seconds 5] [--queuepool]``: on a
scratch database of the server named by ``TEST_DATABASE_URL`` (default: the local
one), *workers* threads (sync face) or coroutines (async face) call ``get`` for
*seconds* on one engine with the default settings; the server's count of sessions
(``pg_stat_database.sessions``) before and after tells how many connections the
burst opened. ``--queuepool`` runs the same burst on SQLAlchemy's plain QueuePool,
the pool the engines had before :class:`~todo_backend.pool.IdleQueuePool`, which
closes every overflow connection as soon as it is returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool
from sqlmodel import Session

from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.config import normalize_database_url
from todo_backend.db import create_db_engine, init_db
from todo_backend.models import TaskCreate
from todo_backend.repository import TaskRepository

# Run as a script, this file's folder is on sys.path but its package is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common

DEFAULT_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
USER: Final = "burst"


def scratch_database(server: URL) -> AbstractContextManager[URL]:
    """Create an empty database on *server* for the run; drop it afterwards."""
    return common.scratch_database(server, "todo_burst")


def server_sessions(admin: Engine, database: str) -> int:
    """Sessions ever opened on *database*, once every one of them has ended.

    A backend reports its session to the statistics by its exit at the latest, so
    the count is read after the database has no backends left.
    """
    deadline = time.monotonic() + 30
    with admin.connect() as conn:
        while time.monotonic() < deadline:
            busy = conn.execute(
                text("select count(*) from pg_stat_activity where datname = :db"),
                {"db": database},
            ).scalar_one()
            if busy == 0:
                break
            time.sleep(0.1)
        conn.execute(text("select pg_stat_clear_snapshot()"))
        return int(
            conn.execute(
                text("select sessions from pg_stat_database where datname = :db"),
                {"db": database},
            ).scalar_one()
        )


def _sync_burst(url: str, workers: int, seconds: float, queuepool: bool) -> tuple[int, Engine]:
    engine = create_db_engine(url)
    if queuepool:
        engine.pool = QueuePool(
            engine.pool._creator,
            pool_size=5,
            max_overflow=15,
            recycle=280,
            dialect=engine.dialect,
            _dispatch=engine.pool.dispatch,
        )
    with Session(engine) as session:
        task_id = TaskRepository(session).create(USER, TaskCreate(title="burst")).id or 0
    calls = [0] * workers
    stop = time.monotonic() + seconds

    def work(n: int) -> None:
        while time.monotonic() < stop:
            with Session(engine) as session:  # one session per call, as per request
                TaskRepository(session).get(USER, task_id)
            calls[n] += 1
            time.sleep(0)  # let another thread in, as serving a request would

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(calls), engine


async def _async_burst(url: str, workers: int, seconds: float, queuepool: bool) -> int:
    engine = create_async_db_engine(url)
    if queuepool:
        sync = engine.sync_engine
        sync.pool = AsyncAdaptedQueuePool(
            sync.pool._creator,
            pool_size=5,
            max_overflow=15,
            recycle=280,
            dialect=sync.dialect,
            _dispatch=sync.pool.dispatch,
        )
    async for session in get_async_session(engine):
        task = await AsyncTaskRepository(session).create(USER, TaskCreate(title="b"))
    task_id = task.id or 0
    calls = [0] * workers
    stop = time.monotonic() + seconds

    async def work(n: int) -> None:
        while time.monotonic() < stop:
            # One session per call, as one per request in a web app.
            async for session in get_async_session(engine):
                await AsyncTaskRepository(session).get(USER, task_id)
            calls[n] += 1
            await asyncio.sleep(0)  # what serving a request yields besides the call

    await asyncio.gather(*(work(n) for n in range(workers)))
    await engine.dispose()
    return sum(calls)


def run_burst(
    server: URL, face: str, *, workers: int = 32, seconds: float = 5, queuepool: bool = False
) -> dict[str, Any]:
    """Run one burst on a scratch database; return the calls made and sessions opened."""
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with scratch_database(server) as url:
            database = url.database or ""
            text_url = url.render_as_string(hide_password=False)
            schema = create_db_engine(text_url)
            init_db(schema)
            schema.dispose()
            before = server_sessions(admin, database)
            if face == "sync":
                calls, engine = _sync_burst(text_url, workers, seconds, queuepool)
                engine.dispose()
            else:
                calls = asyncio.run(_async_burst(text_url, workers, seconds, queuepool))
            after = server_sessions(admin, database)
    finally:
        admin.dispose()
    return {
        "face": face,
        "pool": "QueuePool" if queuepool else "IdleQueuePool",
        "workers": workers,
        "seconds": seconds,
        "calls": calls,
        # One session of the burst creates the task the others read.
        "new_server_connections": after - before,
    }


def main() -> None:
    """Run the burst on both faces and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--queuepool", action="store_true", help="the plain QueuePool")
    args = parser.parse_args()
    server = normalize_database_url(os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    for face in ("sync", "async"):
        result = run_burst(
            server, face, workers=args.workers, seconds=args.seconds, queuepool=args.queuepool
        )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
