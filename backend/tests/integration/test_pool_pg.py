"""The engines' pools on a real server: no connection churn under a burst, idle ones shed.

Counted on our own cluster (``own_scratch_url``): the server's session counter
(``pg_stat_database.sessions``) and its backends are this test's alone there, with
no pooler in between. A burst of 32 workers through the default pool (5 + 15) must
open at most 20 server connections, on the sync face (threads) and the async face
(coroutines); connections above ``pool_size`` stay open between calls and close
once idle for ``DB_POOL_IDLE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from tests.async_face import runner
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.config import Settings
from todo_backend.db import create_db_engine, get_session, init_db
from todo_backend.models import TaskCreate
from todo_backend.repository import TaskRepository

__all__ = ["runner"]  # fixture

pytestmark = pytest.mark.slow

WORKERS = 32
CALLS = 150  # per worker
USER = "burst"
IDLE = 1.0  # the short idle timeout of the shedding tests, in seconds
LIVENESS = 60.0  # generous bound on waiting for the server to notice closed connections


@pytest.fixture(scope="module")
def schema_url(own_scratch_url: URL) -> str:
    """A database of our own cluster with the schema, and no connection left open to it."""
    url = own_scratch_url.render_as_string(hide_password=False)
    engine = create_db_engine(url)
    init_db(engine)
    engine.dispose()
    return url


@pytest.fixture
def admin(own_scratch_url: URL) -> Iterator[Engine]:
    """An autocommit engine on the cluster's postgres database, for its statistics."""
    engine = create_engine(own_scratch_url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIVENESS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {LIVENESS:.0f} s: {what}")
        time.sleep(0.05)


def _backends(admin: Engine, database: str) -> int:
    with admin.connect() as conn:
        return int(
            conn.execute(
                text("select count(*) from pg_stat_activity where datname = :db"), {"db": database}
            ).scalar_one()
        )


def _sessions(admin: Engine, database: str) -> int:
    """Sessions ever opened on *database*, read once all of them ended (each reports by exit)."""
    _wait_for(lambda: _backends(admin, database) == 0, f"no backend left on {database}")
    with admin.connect() as conn:
        conn.execute(text("select pg_stat_clear_snapshot()"))
        return int(
            conn.execute(
                text("select sessions from pg_stat_database where datname = :db"),
                {"db": database},
            ).scalar_one()
        )


def _database(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def test_a_sync_burst_opens_at_most_the_pool_maximum(schema_url: str, admin: Engine) -> None:
    """32 threads, one session per call, open at most pool_size + max_overflow connections."""
    settings = Settings(database_url=schema_url)
    database = _database(schema_url)
    before = _sessions(admin, database)
    engine = create_db_engine(settings)
    for session in get_session(engine):
        task_id = TaskRepository(session).create(USER, TaskCreate(title="burst")).id or 0
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(CALLS):
                for session in get_session(engine):  # one session per call, as per request
                    assert TaskRepository(session).get(USER, task_id) is not None
                time.sleep(0)  # let another thread in, as serving a request would
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    assert errors == []
    opened = _sessions(admin, database) - before
    assert 1 <= opened <= settings.pool_size + settings.max_overflow


def test_an_async_burst_opens_at_most_the_pool_maximum(
    schema_url: str, admin: Engine, runner: asyncio.Runner
) -> None:
    """32 coroutines, one session per call, open at most pool_size + max_overflow connections."""
    settings = Settings(database_url=schema_url)
    database = _database(schema_url)
    before = _sessions(admin, database)

    async def burst() -> None:
        engine = create_async_db_engine(settings)
        async for session in get_async_session(engine):
            task = await AsyncTaskRepository(session).create(USER, TaskCreate(title="b"))
        task_id = task.id or 0

        async def work() -> None:
            for _ in range(CALLS):
                async for session in get_async_session(engine):
                    assert await AsyncTaskRepository(session).get(USER, task_id) is not None
                await asyncio.sleep(0)  # what serving a request yields besides the call

        try:
            await asyncio.gather(*(work() for _ in range(WORKERS)))
        finally:
            await engine.dispose()

    runner.run(burst())
    opened = _sessions(admin, database) - before
    assert 1 <= opened <= settings.pool_size + settings.max_overflow


def _shedding_settings(url: str) -> Settings:
    return Settings(database_url=url, pool_size=2, max_overflow=4, pool_idle_timeout=IDLE)


def test_sync_idle_connections_above_the_minimum_close(schema_url: str, admin: Engine) -> None:
    """Six connections stay open after use, and shrink to pool_size once idle past the timeout."""
    database = _database(schema_url)
    engine = create_db_engine(_shedding_settings(schema_url))
    try:
        held = [engine.connect() for _ in range(6)]
        for conn in held:
            conn.execute(text("select 1"))
        for conn in held:
            conn.close()
        assert engine.pool.checkedin() == 6  # type: ignore[attr-defined]
        assert _backends(admin, database) == 6  # kept: QueuePool would have closed 4
        time.sleep(IDLE * 1.5)  # let them sit idle past the timeout
        with engine.connect() as conn:  # the next checkout closes the idle extra ones
            conn.execute(text("select 1"))
        assert engine.pool.checkedin() == 2  # type: ignore[attr-defined]
        _wait_for(lambda: _backends(admin, database) == 2, "two connections left")
    finally:
        engine.dispose()


def test_async_idle_connections_above_the_minimum_close(
    schema_url: str, admin: Engine, runner: asyncio.Runner
) -> None:
    """The async engine keeps its six connections after use and sheds four once idle."""
    database = _database(schema_url)
    engine = create_async_db_engine(_shedding_settings(schema_url))
    pool = engine.sync_engine.pool

    async def use(n: int) -> None:
        held = [await engine.connect() for _ in range(n)]
        for conn in held:
            await conn.execute(text("select 1"))
        for conn in held:
            await conn.close()

    try:
        runner.run(use(6))
        assert pool.checkedin() == 6  # type: ignore[attr-defined]
        assert _backends(admin, database) == 6
        time.sleep(IDLE * 1.5)
        runner.run(use(1))
        assert pool.checkedin() == 2  # type: ignore[attr-defined]
        _wait_for(lambda: _backends(admin, database) == 2, "two connections left")
    finally:
        runner.run(engine.dispose())
