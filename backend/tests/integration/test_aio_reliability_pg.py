"""AsyncTaskRepository survives dropped connections and serves many coroutines at once.

The faults of test_reliability.py, injected the same way (pg_terminate_backend from
outside, as Neon's suspend does), against the async face: every method's next call
after its pooled connections were killed just works and writes nothing twice; a
write cut in flight is reported, never retried; a read cut in flight is retried.
Then 200 coroutines for 20 users share the default pool through PgBouncer.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.async_face import AwaitedRepository, open_session, runner
from tests.fix_servers import PeakSampler, PgBouncerFactory, PgCluster
from tests.integration.test_reliability import _CASES, _Outside, _tasks_locked, outside
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.config import Settings
from todo_backend.errors import DatabaseTimeoutError, DatabaseUnavailableError
from todo_backend.models import Task, TaskCreate, TaskUpdate

__all__ = ["outside", "runner"]

ALICE = "alice"
BOB = "bob"
_WAIT = 15.0  # seconds: bound on every wait for the server; never asserted on


@pytest.fixture
def async_engine(runner: asyncio.Runner, engine: Engine, scratch_url: URL) -> Iterator[AsyncEngine]:
    """The package's async engine on the module's scratch database (tasks emptied)."""
    made = create_async_db_engine(scratch_url.render_as_string(hide_password=False))
    yield made
    runner.run(made.dispose())


def _repo(runner: asyncio.Runner, engine: AsyncEngine) -> AsyncTaskRepository:
    session, _ = runner.run(open_session(engine))
    return AsyncTaskRepository(session)


async def _warm_pool(engine: AsyncEngine, connections: int = 3) -> None:
    """Leave *connections* idle connections in the pool, as a busy API would."""
    held = [await engine.connect() for _ in range(connections)]
    for conn in held:
        await conn.exec_driver_sql("select 1")
    for conn in held:
        await conn.close()


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("method", sorted(_CASES))
def test_every_method_survives_terminated_connections(
    method: str,
    runner: asyncio.Runner,
    async_engine: AsyncEngine,
    outside: _Outside,
    relayed: bool,
) -> None:
    """After every backend of the database is terminated, each awaited call just works."""
    case = _CASES[method]
    repo = AwaitedRepository(_repo(runner, async_engine), runner)
    first = repo.create(ALICE, TaskCreate(title="first"))
    repo.create(ALICE, TaskCreate(title="second"))
    repo.create(BOB, TaskCreate(title="bystander"))
    runner.run(_warm_pool(async_engine))
    before_alice, before_bob = outside.rows(ALICE), outside.rows(BOB)
    connects: list[object] = []
    event.listen(async_engine.sync_engine, "connect", lambda *_: connects.append(None))

    killed = outside.terminate()

    assert len(killed) >= 3  # the warmed pool really held server connections
    outcome = case.call(repo, first)  # type: ignore[arg-type]
    assert case.check(outcome, first), outcome
    after_alice = outside.rows(ALICE)
    assert len(after_alice) == len(before_alice) + case.row_delta  # no write applied twice
    assert len({title for _, title in after_alice}) == len(after_alice)
    assert outside.rows(BOB) == before_bob
    if not relayed:
        assert connects  # a fresh connection replaced the dead one
    # Behind a relay (PgBouncer, Neon's proxy) the client's own connection may live on.


def test_healthy_idle_connections_are_reused(
    runner: asyncio.Runner, async_engine: AsyncEngine
) -> None:
    """The zero-round-trip liveness check never rejects a healthy idle psycopg 3 connection."""
    repo = _repo(runner, async_engine)
    runner.run(repo.count(ALICE))
    connects: list[object] = []
    event.listen(async_engine.sync_engine, "connect", lambda *_: connects.append(None))

    async def calls() -> int:
        for i in range(20):
            await repo.create(ALICE, TaskCreate(title=f"t{i}"))
            await repo.list(ALICE, limit=5)
        return await repo.count(ALICE)

    assert runner.run(calls()) == 20
    assert connects == []


def test_write_lost_in_flight_is_reported_and_not_retried(
    runner: asyncio.Runner, async_engine: AsyncEngine, outside: _Outside
) -> None:
    """A write whose connection dies after it was sent raises DatabaseUnavailableError, once."""
    repo = _repo(runner, async_engine)
    runner.run(repo.count(ALICE))  # schema and pool warm, so only the INSERT can block

    async def scenario() -> BaseException | None:
        with _tasks_locked(outside.observer):
            call = asyncio.ensure_future(repo.create(ALICE, TaskCreate(title="in flight")))
            await _until(lambda: bool(outside.waiting_on_lock()), "the INSERT to queue")
            outside.terminate(outside.waiting_on_lock())
            # Awaited while the lock is still held: a retried INSERT would block here.
            await asyncio.wait_for(asyncio.wait([call]), _WAIT)
        return call.exception()

    error = runner.run(scenario())
    assert isinstance(error, DatabaseUnavailableError), error
    assert "not retried" in str(error)
    assert outside.rows(ALICE) == []


def test_read_lost_in_flight_is_retried_on_a_new_connection(
    runner: asyncio.Runner, async_engine: AsyncEngine, outside: _Outside
) -> None:
    """A read whose connection dies mid-statement is repeated once and returns the answer."""
    repo = _repo(runner, async_engine)
    task = runner.run(repo.create(ALICE, TaskCreate(title="read me")))

    async def scenario() -> Task | None:
        with _tasks_locked(outside.observer):
            call = asyncio.ensure_future(repo.get(ALICE, task.id or 0))
            await _until(lambda: bool(outside.waiting_on_lock()), "the SELECT to queue")
            killed = outside.terminate(outside.waiting_on_lock())
            # The retry queues behind the same lock, from a new backend.
            await _until(lambda: bool(outside.waiting_on_lock() - killed), "the retried SELECT")
        return await asyncio.wait_for(call, _WAIT)

    assert runner.run(scenario()) == task


def test_no_free_pooled_connection_is_a_typed_timeout(
    runner: asyncio.Runner, engine: Engine, scratch_url: URL
) -> None:
    """With every pooled connection busy, an awaited call raises DatabaseTimeoutError."""
    settings = Settings(
        database_url=scratch_url.render_as_string(hide_password=False),
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
    )
    bounded = create_async_db_engine(settings)

    async def scenario() -> DatabaseTimeoutError:
        session, _ = await open_session(bounded)
        repo = AsyncTaskRepository(session)
        await repo.count(ALICE)
        async with bounded.connect():  # the only connection, checked out
            with pytest.raises(DatabaseTimeoutError) as caught:
                await repo.create(ALICE, TaskCreate(title="never stored"))
        assert await repo.count(ALICE) == 0  # nothing was sent; the slot is free again
        await session.close()
        return caught.value

    try:
        error = runner.run(scenario())
    finally:
        runner.run(bounded.dispose())
    assert error.bound == "DB_POOL_TIMEOUT"


# -- many coroutines, one engine, through PgBouncer --------------------------------------

COROUTINES = 200
USERS = 20


@dataclass
class _Request:
    """One API request's coroutine: its own session, a mixed workload on one user's tasks."""

    engine: AsyncEngine
    user: str
    number: int
    kept: dict[int, str] = field(default_factory=dict)
    completed: set[int] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)

    async def run(self, start: asyncio.Event) -> None:
        await start.wait()
        try:
            async for session in get_async_session(self.engine):
                await self._work(AsyncTaskRepository(session))
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)

    async def _work(self, repo: AsyncTaskRepository) -> None:
        for n in range(3):
            title = f"c{self.number} n{n}"
            task = await repo.create(self.user, TaskCreate(title=title))
            self.kept[task.id or 0] = title
        oldest, newest = min(self.kept), max(self.kept)
        got = await repo.get(self.user, oldest)
        assert got is not None
        assert got.title == self.kept[oldest]
        assert {t.user_id for t in await repo.list(self.user, limit=10)} == {self.user}
        assert await repo.update(self.user, oldest, TaskUpdate(complete=True)) is not None
        self.completed.add(oldest)
        assert await repo.delete(self.user, newest) is True
        del self.kept[newest]
        async with repo.atomic():
            extra = await repo.create(self.user, TaskCreate(title=f"c{self.number} atomic"))
            self.kept[extra.id or 0] = extra.title
        assert await repo.count(self.user) >= len(self.kept)


@pytest.fixture
def only_pgbouncer_connects(
    runner: asyncio.Runner, own_engine: Engine, own_scratch_url: URL, pgbouncer: PgBouncerFactory
) -> Iterator[AsyncEngine]:
    """The async engine with its default pool, through a PgBouncer that would allow 40.

    On our own cluster, tasks emptied and the module's own engine closed first, so every
    backend of the database is PgBouncer's: the bound under test is the engine's pool.
    """
    own_engine.dispose()
    bounced = pgbouncer(own_scratch_url, pool_size=40).url(own_scratch_url.database or "")
    engine = create_async_db_engine(bounced.render_as_string(hide_password=False))
    yield engine
    runner.run(engine.dispose())


@pytest.mark.slow
@pytest.mark.pgbouncer
def test_200_coroutines_for_20_users_through_pgbouncer(
    runner: asyncio.Runner,
    only_pgbouncer_connects: AsyncEngine,
    own_cluster: PgCluster,
    own_scratch_url: URL,
) -> None:
    """200 concurrent coroutines on the default pool: no error, exact counts, <= 20 servers."""
    engine = only_pgbouncer_connects
    requests = [_Request(engine, f"user{i % USERS}", i) for i in range(COROUTINES)]

    async def serve() -> dict[str, tuple[set[int], int]]:
        start = asyncio.Event()
        running = [asyncio.ensure_future(r.run(start)) for r in requests]
        start.set()
        await asyncio.wait_for(asyncio.gather(*running), 120)
        stored: dict[str, tuple[set[int], int]] = {}
        async for session in get_async_session(engine):
            repo = AsyncTaskRepository(session)
            for user in sorted({r.user for r in requests}):
                ids = {t.id or 0 for t in await repo.list(user, limit=100)}
                stored[user] = (ids, await repo.count(user, complete=True))
        return stored

    with PeakSampler(
        own_cluster.admin_engine(),
        "select count(*) from pg_stat_activity where datname = :db",
        {"db": own_scratch_url.database},
    ) as servers:
        stored = runner.run(serve())
    assert [r.errors for r in requests] == [[] for _ in requests]
    assert 1 <= servers.peak <= 20
    per_user = Counter(r.user for r in requests)
    for user, (ids, completed) in stored.items():
        mine = [r for r in requests if r.user == user]
        assert ids == {i for r in mine for i in r.kept}
        assert len(ids) == 3 * per_user[user]
        assert completed == len({i for r in mine for i in r.completed}) == per_user[user]
