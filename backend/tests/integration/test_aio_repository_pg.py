"""AsyncTaskRepository on PostgreSQL: the shared contract, the wire, PgBouncer, a Neon stand-in.

The same contract as the sync repository runs on the server under test, through
PgBouncer in transaction pool mode (Neon's pooled endpoint), and against the Neon
stand-in's direct endpoint (tests/neon_standin.py): a TLS-only server reached as a
non-local host by a role that is not a superuser. Round trips on the wire are counted
for both faces in test_round_trips_pg.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from tests import neon_standin
from tests.async_face import (
    AsyncBoundToTheEngine,
    AsyncRepositoryContract,
    create_schema,
    open_session,
    runner,
)
from tests.fix_servers import PgBouncerFactory, PgTemplate
from tests.integration.test_round_trips_pg import wire
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.db import is_local_host
from todo_backend.models import TaskCreate, TaskUpdate

__all__ = ["runner", "wire"]  # fixtures

ALICE = "alice"


def _url_text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _emptied(module_engine: Engine) -> None:
    with module_engine.begin() as conn:
        conn.execute(text("TRUNCATE tasks RESTART IDENTITY"))


class TestAsyncRepositoryOnPostgreSQL(AsyncRepositoryContract):
    """The shared repository contract, on AsyncTaskRepository over psycopg 3."""

    @pytest.fixture
    def async_url(self, module_engine: Engine, scratch_url: URL) -> str:
        """The module's scratch database, tasks emptied."""
        _emptied(module_engine)
        return _url_text(scratch_url)


class TestAsyncRepositoryBoundToTheEngineOnPostgreSQL(
    AsyncBoundToTheEngine, TestAsyncRepositoryOnPostgreSQL
):
    """The shared contract on PostgreSQL, the async repositories bound to the engine."""


@pytest.mark.pgbouncer
class TestAsyncRepositoryThroughPgBouncer(AsyncRepositoryContract):
    """The shared contract through PgBouncer in transaction pool mode."""

    @pytest.fixture
    def async_url(
        self, own_engine: Engine, own_scratch_url: URL, pgbouncer: PgBouncerFactory
    ) -> str:
        """A database of our own cluster (tasks emptied) through a fresh PgBouncer."""
        return _url_text(pgbouncer(own_scratch_url).url(own_scratch_url.database or ""))


@pytest.fixture(scope="module")
def neon_stand_in(pg_template: PgTemplate) -> Iterator[URL]:
    """The Neon stand-in (tests/neon_standin.py) for this module: its direct endpoint."""
    del pg_template  # needed first: it skips or fails cleanly when initdb is missing
    stand_in = neon_standin.start()
    try:
        yield make_url(stand_in.direct_url)
    finally:
        stand_in.stop()


class TestAsyncRepositoryOnANeonStandIn(AsyncRepositoryContract):
    """The shared contract over TLS (sslmode=require chosen by the engine), as a plain role."""

    @pytest.fixture
    def async_url(self, neon_stand_in: URL) -> str:
        """The stand-in's database; its tasks table is emptied by ``cleared``."""
        return _url_text(neon_stand_in)

    @pytest.fixture
    def async_engine(self, runner: asyncio.Runner, async_url: str) -> Iterator[AsyncEngine]:
        """The async engine on the stand-in, checked to use TLS, with an empty tasks table."""
        engine = create_async_db_engine(async_url)
        assert not is_local_host(engine.url)

        async def prepare() -> bool:
            await create_schema(engine)
            async with engine.begin() as conn:
                await conn.execute(text("TRUNCATE tasks RESTART IDENTITY"))
                ssl = await conn.execute(
                    text("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
                )
                return bool(ssl.scalar_one())

        assert runner.run(prepare()) is True
        yield engine
        runner.run(engine.dispose())


# -- the driver -------------------------------------------------------------------------


def test_single_calls_run_in_driver_autocommit(
    runner: asyncio.Runner, module_engine: Engine, scratch_url: URL
) -> None:
    """Every single call runs with psycopg 3 in autocommit; pooled connections rest idle.

    (*module_engine*: the schema exists whichever test of the module runs first.)
    """
    engine = create_async_db_engine(_url_text(scratch_url))
    modes: list[bool] = []

    def record(conn: Connection, *_args: object) -> None:
        modes.append(bool(conn.connection.dbapi_connection.autocommit))  # type: ignore[union-attr]

    event.listen(engine.sync_engine, "before_cursor_execute", record)

    async def calls() -> int:
        session, _ = await open_session(engine)
        repo = AsyncTaskRepository(session)
        task = await repo.create(ALICE, TaskCreate(title="seed"))
        await repo.get(ALICE, task.id or 0)
        await repo.update(ALICE, task.id or 0, TaskUpdate(complete=True))
        await repo.delete(ALICE, task.id or 0)
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            status: int = raw.driver_connection.info.transaction_status  # type: ignore[union-attr]
            assert raw.driver_connection.autocommit is False  # type: ignore[union-attr]
        return status

    try:
        assert runner.run(calls()) == 0  # psycopg.pq.TransactionStatus.IDLE
    finally:
        runner.run(engine.dispose())
    assert modes == [True] * 4
