"""The repository's hot path (todo_backend.direct): the same answers, invisible to others.

A repository call outside a transaction goes straight to a pooled driver connection
instead of through SQLAlchemy's execution. These tests hold it to what users rely on:

* every call shape answers exactly as the SQLAlchemy path does, field by field
  (derived from the models: each updatable field alone and all together), both ways
  round: what one path writes, the other reads back equal;
* it is taken only while nothing but the package watches the engine: a caller's
  statement listener (on the engine, or the Engine class), an error hook, ``echo`` or
  INFO logging of ``sqlalchemy.engine`` all see every repository statement again;
* the connections it leaves in the pool in autocommit serve sessions and
  ``engine.connect()`` transactionally: a rolled-back transaction stores nothing;
* rows pass through the column types' own result processors: timestamps come back
  as UTC whatever the server's time zone;
* a statement the server refuses or cuts short leaves a usable connection.

Sync and async faces, directly and through PgBouncer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import selectors
import socket
import threading
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC
from itertools import combinations
from typing import Any, cast

import pytest
from sqlalchemy import Engine, bindparam, create_engine, event, literal_column, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool
from sqlalchemy.sql.expression import ColumnClause
from sqlmodel import Session

from tests.integration.databases import fresh_database
from tests.integration.test_bounds_pg import ALICE, Target, made, target
from tests.relay import LoopbackRelay
from tests.repository_contract import content_samples
from todo_backend import db
from todo_backend import repository_core as core
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.config import Settings
from todo_backend.db import BOUNDED, USER_SETTING, create_db_engine, init_db, owned_by
from todo_backend.direct import direct_statement
from todo_backend.errors import (
    ConfigurationError,
    DatabaseTimeoutError,
    DatabaseUnavailableError,
)
from todo_backend.models import Task, TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

__all__ = ["made", "target"]  # fixtures

BOB = "bob"
# Every shape a call can take: list and count filters, keyset pages, bounded counts.
_LIST_SHAPES: list[dict[str, Any]] = [
    {},
    {"complete": True},
    {"complete": False, "limit": 3},
    {"before_id": 4},
    {"complete": False, "before_id": 5, "limit": 2},
]
_COUNT_SHAPES: list[dict[str, Any]] = [
    {},
    {"complete": True},
    {"limit": 2},
    {"complete": False, "limit": 1},
]


def _update_shapes() -> list[dict[str, Any]]:
    """Every subset of the updatable fields, each set to its second sample value."""
    fields = sorted(TaskUpdate.model_fields)
    return [
        {name: content_samples(name)[1] for name in subset}
        for size in range(len(fields) + 1)
        for subset in combinations(fields, size)
    ]


def _created() -> TaskCreate:
    """A task with every content field at its first sample value (none at its default)."""
    return TaskCreate.model_validate(
        {name: content_samples(name)[0] for name in TaskCreate.model_fields}
    )


def _fields(task: Task | None) -> dict[str, Any] | None:
    return None if task is None else task.model_dump()


@contextmanager
def through_sqlalchemy(engine: Engine) -> Iterator[list[str]]:
    """Send the repository's statements through SQLAlchemy's execution for the block.

    A caller's own statement listener is exactly what switches the hot path off; the
    list it fills shows the statements SQLAlchemy ran.
    """
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
def hot(target: Target, made: list[Engine]) -> Engine:
    """The package's sync engine on the target, with its hot path in use."""
    engine = target.engine()
    made.append(engine)
    with engine.connect() as conn:  # an empty table, as the connecting role
        conn.execute(text("DELETE FROM tasks"))
        conn.commit()
    assert direct_statement(engine, core._GET) is not None
    return engine


def _seed(repo: TaskRepository) -> list[Task]:
    return [
        repo.create(user, TaskCreate(title=f"task {n}", description=None, complete=n % 2 == 0))
        for n in range(8)
        for user in (ALICE, BOB)
    ]


def test_every_read_answers_as_through_sqlalchemy(hot: Engine) -> None:
    repo = TaskRepository(hot)
    tasks = _seed(repo)
    ids = [task.id or 0 for task in tasks] + [10**9]

    def reads() -> list[Any]:
        return [
            *[_fields(repo.get(user, task_id)) for user in (ALICE, BOB) for task_id in ids],
            *[[_fields(t) for t in repo.list(ALICE, **shape)] for shape in _LIST_SHAPES],
            *[repo.count(ALICE, **shape) for shape in _COUNT_SHAPES],
        ]

    fast = reads()
    with through_sqlalchemy(hot) as seen:
        slow = reads()
    assert seen, "the listener must switch the hot path off"
    assert fast == slow
    assert any(row for row in fast[: len(ids) * 2])  # the reads found something to compare


@pytest.mark.parametrize("hot_writes", [True, False], ids=["hot-writes", "sqlalchemy-writes"])
def test_every_write_reads_back_equal_through_the_other_path(hot: Engine, hot_writes: bool) -> None:
    repo = TaskRepository(hot)

    @contextmanager
    def writing() -> Iterator[None]:
        if hot_writes:
            yield
        else:
            with through_sqlalchemy(hot):
                yield

    @contextmanager
    def reading() -> Iterator[None]:
        if hot_writes:
            with through_sqlalchemy(hot):
                yield
        else:
            yield

    for changes in _update_shapes():
        with writing():
            created = repo.create(ALICE, _created())
            assert created.id is not None
            updated = repo.update(ALICE, created.id, TaskUpdate(**changes))
            not_owned = repo.update(BOB, created.id, TaskUpdate(**changes))
        with reading():
            read = repo.get(ALICE, created.id)
        assert not_owned is None
        assert _fields(read) == _fields(updated), changes
        assert updated is not None
        assert updated.model_dump(include=set(changes)) == changes
        with writing():
            assert repo.delete(BOB, created.id) is False
            assert repo.delete(ALICE, created.id) is True
        with reading():
            assert repo.get(ALICE, created.id) is None
    with writing():
        many = repo.create_many(ALICE, [TaskCreate(title=f"bulk {n}") for n in range(5)])
    with reading():
        assert [_fields(repo.get(ALICE, t.id or 0)) for t in many] == [_fields(t) for t in many]


def _never(*_args: Any) -> None:
    """A listener that does nothing: only its presence matters."""


@pytest.mark.parametrize(
    "watch",
    [
        "before_cursor_execute",
        "after_cursor_execute",
        "before_execute",
        "handle_error",
        "engine_class",
        "echo",
        "logging",
    ],
)
def test_anything_watching_the_engine_switches_the_hot_path_off(
    hot: Engine, watch: str, caplog: pytest.LogCaptureFixture
) -> None:
    stmt = core._GET
    with ExitStack() as watching:
        if watch == "engine_class":
            event.listen(Engine, "before_cursor_execute", _never)
            watching.callback(event.remove, Engine, "before_cursor_execute", _never)
        elif watch == "echo":
            hot.echo = True
            watching.callback(setattr, hot, "echo", False)
        elif watch == "logging":
            watching.enter_context(caplog.at_level(logging.INFO, logger="sqlalchemy.engine"))
        else:
            event.listen(hot, watch, _never)
            watching.callback(event.remove, hot, watch, _never)
        assert direct_statement(hot, stmt) is None
        created = TaskRepository(hot).create(ALICE, TaskCreate(title="seen by the watcher"))
        assert TaskRepository(hot).get(ALICE, created.id or 0) == created
        if watch == "logging":
            assert any("INSERT INTO tasks" in record.getMessage() for record in caplog.records)
    assert direct_statement(hot, stmt) is not None


def test_a_callers_listener_sees_every_repository_statement(hot: Engine) -> None:
    repo = TaskRepository(hot)
    with through_sqlalchemy(hot) as seen:
        created = repo.create(ALICE, TaskCreate(title="traced"))
        repo.get(ALICE, created.id or 0)
        repo.list(ALICE)
        repo.delete(ALICE, created.id or 0)
    verbs = [statement.split("; ", 1)[1].split(" ", 1)[0] for statement in seen]
    assert verbs == ["INSERT", "SELECT", "SELECT", "DELETE"]


def _engine(target: Target, made: list[Engine], **options: Any) -> Engine:
    """The package's sync engine on the target, with Settings *options*."""
    settings = Settings(database_url=target.url.render_as_string(hide_password=False), **options)
    engine = create_db_engine(settings)
    made.append(engine)
    return engine


def _pool_of_one(target: Target, made: list[Engine], **options: Any) -> Engine:
    return _engine(target, made, pool_size=1, max_overflow=0, **options)


def _titles(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT title FROM tasks ORDER BY id")).scalars())


def test_connections_the_hot_path_returns_serve_transactions(
    target: Target, made: list[Engine]
) -> None:
    engine = _pool_of_one(target, made)
    repo = TaskRepository(engine)
    repo.create(ALICE, TaskCreate(title="autocommitted"))  # the one connection, in autocommit
    with Session(engine) as session:
        session.add(Task(user_id=ALICE, title="rolled back, session"))
        session.flush()
        session.rollback()
    repo.get(ALICE, 1)
    with engine.connect() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                "VALUES ('alice', 'rolled back, connection', false, now(), now())"
            )
        )
        conn.rollback()
    repo.count(ALICE)

    def failing_block() -> None:
        with repo.atomic():
            repo.create(ALICE, TaskCreate(title="rolled back, block"))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        failing_block()
    assert _titles(engine) == ["autocommitted"]
    # ...and after the transactions, the hot path autocommits again.
    repo.create(ALICE, TaskCreate(title="autocommitted again"))
    other = create_engine(target.direct)
    made.append(other)
    assert _titles(other) == ["autocommitted", "autocommitted again"]


def test_an_async_connection_the_hot_path_returns_serves_transactions(
    target: Target, made: list[Engine]
) -> None:
    settings = Settings(
        database_url=target.url.render_as_string(hide_password=False), pool_size=1, max_overflow=0
    )

    async def scenario() -> None:
        engine = create_async_db_engine(settings)
        try:
            repo = AsyncTaskRepository(engine)
            await repo.create(ALICE, TaskCreate(title="autocommitted"))
            async with engine.connect() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                        "VALUES ('alice', 'rolled back', false, now(), now())"
                    )
                )
                await conn.rollback()
            await repo.get(ALICE, 1)

            async def failing_block() -> None:
                async with repo.atomic():
                    await repo.create(ALICE, TaskCreate(title="rolled back, block"))
                    raise ZeroDivisionError

            with pytest.raises(ZeroDivisionError):
                await failing_block()
            await repo.create(ALICE, TaskCreate(title="autocommitted again"))
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    other = create_engine(target.direct)
    made.append(other)
    assert _titles(other) == ["autocommitted", "autocommitted again"]


@pytest.fixture
def tokyo(admin_url: URL) -> Iterator[URL]:
    """A database of the server under test whose time zone is far from UTC, with the schema.

    Set before anyone connects, so that a pooler's server connections have it too.
    """
    with fresh_database(admin_url, settings={"timezone": "Asia/Tokyo"}) as url:
        schema = create_db_engine(url.render_as_string(hide_password=False))
        init_db(schema)
        schema.dispose()
        yield url


def test_timestamps_come_back_in_utc_whatever_the_server_time_zone(
    tokyo: URL, made: list[Engine]
) -> None:
    engine = create_db_engine(tokyo.render_as_string(hide_password=False))
    made.append(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SHOW timezone")).scalar_one() == "Asia/Tokyo"
    assert direct_statement(engine, core._GET) is not None
    repo = TaskRepository(engine)
    created = repo.create(ALICE, TaskCreate(title="when"))
    for task in (created, repo.get(ALICE, created.id or 0), *repo.list(ALICE)):
        assert task is not None
        assert task.created_at.tzinfo is UTC
        assert task.updated_at.tzinfo is UTC

    async def read_async() -> Task | None:
        aengine: AsyncEngine = create_async_db_engine(tokyo.render_as_string(hide_password=False))
        try:
            return await AsyncTaskRepository(aengine).get(ALICE, created.id or 0)
        finally:
            await aengine.dispose()

    read = asyncio.run(read_async())
    assert read is not None
    assert read.created_at.tzinfo is UTC
    assert read.created_at == created.created_at


def test_a_statement_the_server_cuts_short_leaves_a_usable_connection(
    target: Target, made: list[Engine]
) -> None:
    engine = _pool_of_one(target, made)
    repo = TaskRepository(engine)
    created = repo.create(ALICE, TaskCreate(title="locked"))
    other = create_engine(target.direct)
    made.append(other)
    with other.connect() as conn, conn.begin():
        conn.execute(text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": created.id})
        quick = TaskRepository(_pool_of_one(target, made, lock_timeout=0.05))
        with pytest.raises(DatabaseTimeoutError) as caught:
            quick.update(ALICE, created.id or 0, TaskUpdate(title="never"))
        assert caught.value.bound == "DB_LOCK_TIMEOUT"
        assert quick.get(ALICE, created.id or 0) == created  # the same, only connection
    assert repo.update(ALICE, created.id or 0, TaskUpdate(title="after")) is not None


# -- from the adversarial review of the first hot path --------------------------------


def _url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@pytest.mark.parametrize("face", ["sync", "async"])
def test_an_engine_used_on_the_hot_path_can_be_freed(engine: Engine, face: str) -> None:
    """The statement cache must not keep an engine (its pool, its connections) alive."""

    def used() -> weakref.ref[Engine]:
        if face == "sync":
            fresh = create_db_engine(_url_of(engine))
            TaskRepository(fresh).count(ALICE)
            return weakref.ref(fresh)
        fresh_async = create_async_db_engine(_url_of(engine))

        async def count() -> None:
            await AsyncTaskRepository(fresh_async).count(ALICE)
            await fresh_async.dispose()

        asyncio.run(count())
        return weakref.ref(fresh_async.sync_engine)

    ref = used()
    gc.collect()
    assert ref() is None


def test_a_listener_on_the_engine_class_from_before_the_engine_sees_its_statements(
    engine: Engine,
) -> None:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        fresh = create_db_engine(_url_of(engine))
        try:
            TaskRepository(fresh).create(ALICE, TaskCreate(title="traced"))
        finally:
            fresh.dispose()
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert any("INSERT INTO tasks" in statement for statement in seen)


def test_an_instrumented_create_engine_sees_every_statement(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracing that listens as soon as the engine exists (as OpenTelemetry's does)."""
    seen: list[str] = []
    real = db.create_engine  # type: ignore[attr-defined]

    def instrumented(*args: Any, **kwargs: Any) -> Engine:
        made = real(*args, **kwargs)
        event.listen(made, "before_cursor_execute", lambda _c, _k, sql, *_r: seen.append(sql))
        return made

    monkeypatch.setattr(db, "create_engine", instrumented)
    fresh = create_db_engine(_url_of(engine))
    try:
        TaskRepository(fresh).count(ALICE)
    finally:
        fresh.dispose()
    assert any("count" in statement for statement in seen)


@pytest.mark.parametrize("listened", [False, True], ids=["hot", "sqlalchemy"])
def test_the_engines_schema_translate_map_holds(engine: Engine, listened: bool) -> None:
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS tenant CASCADE"))
        conn.execute(text("CREATE SCHEMA tenant"))
        conn.execute(text("CREATE TABLE tenant.tasks (LIKE public.tasks INCLUDING ALL)"))
        conn.commit()
    fresh = create_db_engine(_url_of(engine))
    try:
        fresh.update_execution_options(schema_translate_map={None: "tenant"})
        if listened:
            event.listen(fresh, "before_cursor_execute", _never)
        TaskRepository(fresh).create(ALICE, TaskCreate(title="for the tenant"))
        with engine.connect() as conn:
            in_tenant = conn.execute(text("SELECT count(*) FROM tenant.tasks")).scalar_one()
            in_public = conn.execute(text("SELECT count(*) FROM public.tasks")).scalar_one()
    finally:
        fresh.dispose()
        with engine.connect() as conn:
            conn.execute(text("DROP SCHEMA tenant CASCADE"))
            conn.commit()
    assert (in_tenant, in_public) == (1, 0)


def test_a_shared_engine_bound_repository_keeps_each_threads_block_its_own(
    engine: Engine,
) -> None:
    repo = TaskRepository(engine)
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def block() -> None:
        try:
            with repo.atomic():
                repo.create(ALICE, TaskCreate(title="in the block"))
                inside.set()
                release.wait(10)
                raise ZeroDivisionError
        except ZeroDivisionError:
            pass
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=block)
    thread.start()
    assert inside.wait(10)
    try:
        repo.create(BOB, TaskCreate(title="alone"))
    finally:
        release.set()
        thread.join()
    assert not errors
    assert [task.title for task in repo.list(BOB)] == ["alone"]
    assert repo.list(ALICE) == []


def test_a_shared_async_engine_bound_repository_keeps_each_tasks_block_its_own(
    engine: Engine,
) -> None:
    async def scenario() -> tuple[list[str], list[Task]]:
        aengine = create_async_db_engine(_url_of(engine))
        repo = AsyncTaskRepository(aengine)
        inside, release = asyncio.Event(), asyncio.Event()

        async def block() -> None:
            async with repo.atomic():
                await repo.create(ALICE, TaskCreate(title="in the block"))
                inside.set()
                await release.wait()
                raise ZeroDivisionError

        task = asyncio.create_task(block())
        await inside.wait()
        try:
            await repo.create(BOB, TaskCreate(title="alone"))
        finally:
            release.set()
            with contextlib.suppress(ZeroDivisionError):
                await task
        try:
            return [t.title for t in await repo.list(BOB)], await repo.list(ALICE)
        finally:
            await aengine.dispose()

    assert asyncio.run(scenario()) == (["alone"], [])


class StaleRelay(LoopbackRelay):
    """A loopback relay to the server whose old connections die when :meth:`go_stale` says.

    After it, every connection opened before closes as soon as the client sends on it:
    pooled connections that look alive at checkout but are not (a server gone behind
    a load balancer).
    """

    def __init__(self, port: int) -> None:
        self.generation = 0
        super().__init__(("127.0.0.1", port))

    def go_stale(self) -> None:
        self.generation += 1

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        threading.Thread(
            target=self._pump, args=(client, server, self.generation), daemon=True
        ).start()

    def _pump(self, client: socket.socket, upstream: socket.socket, generation: int) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while True:
                for key, _ in selector.select(0.5):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    if source is client and self.generation != generation:
                        return
                    data = source.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()


@pytest.mark.parametrize("listened", [False, True], ids=["hot", "sqlalchemy"])
def test_after_one_lost_connection_the_older_pooled_ones_are_replaced(
    own_engine: Engine, listened: bool
) -> None:
    """As SQLAlchemy does on a disconnect: the first call's retry finds the rest replaced.

    On our own cluster: the relay forwards plain TCP to a loopback server.
    """
    relay = StaleRelay(own_engine.url.port or 5432)
    url = own_engine.url.set(port=relay.port).render_as_string(hide_password=False)
    fresh = create_db_engine(Settings(database_url=url, pool_size=3, max_overflow=0))
    if listened:
        event.listen(fresh, "before_cursor_execute", _never)
    repo = TaskRepository(fresh)
    outcomes = []
    try:
        for conn in [fresh.connect() for _ in range(3)]:
            conn.close()
        relay.go_stale()
        assert repo.count(ALICE) == 0  # met a dead connection, retried on a new one
        held = fresh.raw_connection()  # another request holds that new connection
        for n in range(2):
            try:
                repo.create(ALICE, TaskCreate(title=f"write {n}"))
                outcomes.append("stored")
            except DatabaseUnavailableError:
                outcomes.append("lost")
        held.close()
    finally:
        fresh.dispose()
        relay.close()
    assert outcomes == ["stored", "stored"]


def test_a_pool_listener_that_leaves_a_transaction_open_is_named(engine: Engine) -> None:
    fresh = create_db_engine(_url_of(engine))

    @event.listens_for(fresh, "connect")
    def name_it(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET application_name = 'mine'")  # no commit: a transaction stays open
        cursor.close()

    try:
        with pytest.raises(ConfigurationError, match="listener"):
            TaskRepository(fresh).count(ALICE)
        with Session(fresh) as session:  # a session does not need the switch
            assert session.execute(text("SELECT 1")).scalar_one() == 1
        assert fresh.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        fresh.dispose()


def test_a_page_is_sent_with_sorting_off_for_itself_alone(
    own_engine: Engine, made: list[Engine]
) -> None:
    """The list statement's planner setting rides in its message and ends with it.

    On our own cluster, as a superuser: pg_stat_activity shows every session's query,
    and no pooler sends queries of its own in between.
    """
    url = own_engine.url.render_as_string(hide_password=False)
    engine = create_db_engine(Settings(database_url=url, pool_size=1, max_overflow=0))
    made.append(engine)
    repo = TaskRepository(engine)
    repo.create(ALICE, TaskCreate(title="listed"))
    assert len(repo.list(ALICE)) == 1
    with own_engine.connect() as conn:
        # The last query of each server connection of this database (PgBouncer's too).
        last = conn.execute(
            text("SELECT query FROM pg_stat_activity WHERE datname = current_database()")
        ).scalars()
        pages = [query for query in last if "ORDER BY tasks.user_id DESC" in query]
    assert pages
    assert all("set_config('enable_sort', 'off', true)" in query for query in pages)
    with engine.connect() as conn:  # the same, only connection of the pool
        assert conn.execute(text("SHOW enable_sort")).scalar_one() == "on"
    with through_sqlalchemy(engine) as seen:
        repo.list(ALICE)
    assert "set_config('enable_sort', 'off', true)" in seen[0]


def test_a_connection_given_back_inside_its_users_own_begin_is_replaced(
    target: Target, made: list[Engine]
) -> None:
    """A caller's raw BEGIN on an autocommit connection never captures the next user."""
    engine = _pool_of_one(target, made)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("BEGIN")
        conn.execute(
            text(
                "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                "VALUES ('alice', 'never committed', false, now(), now())"
            )
        )
    # The pool has nothing to roll back on an autocommit connection; the hot path's
    # next checkout wants one in autocommit and would have run inside that BEGIN.
    created = TaskRepository(engine).create(ALICE, TaskCreate(title="committed"))
    other = create_engine(target.direct)
    made.append(other)
    assert _titles(other) == ["committed"]
    assert created.title == "committed"


def test_a_page_inside_a_callers_own_begin_leaves_the_planner_alone(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("BEGIN")
        with Session(bind=conn) as session:
            TaskRepository(session).list(ALICE)
        assert conn.execute(text("SHOW enable_sort")).scalar_one() == "on"
        conn.exec_driver_sql("ROLLBACK")


def test_a_hot_call_cancelled_mid_statement_discards_its_connection(
    target: Target, made: list[Engine]
) -> None:
    """Cancelled while the server works (waiting on a row lock): never reused, no leak."""
    engine = _pool_of_one(target, made)
    created = TaskRepository(engine).create(ALICE, TaskCreate(title="locked"))
    url = target.url.render_as_string(hide_password=False)

    async def scenario() -> tuple[int, Task | None]:
        aengine = create_async_db_engine(Settings(database_url=url, pool_size=1, max_overflow=0))
        repo = AsyncTaskRepository(aengine)
        opened: list[object] = []
        # A pool listener: it watches connections, not statements (the hot path stays on).
        event.listen(aengine.sync_engine, "connect", lambda *_: opened.append(None))
        try:
            await repo.count(ALICE)  # the pool's one connection, open
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    repo.update(ALICE, created.id or 0, TaskUpdate(title="cut short")), 0.3
                )
            checked_out = aengine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
            release.set()
            after = await repo.get(ALICE, created.id or 0)
            # Discarded, as SQLAlchemy discards a connection cut short: the next call
            # had to open a new one.
            assert len(opened) == 2
            return checked_out, after
        finally:
            await aengine.dispose()

    release = threading.Event()
    other = create_engine(target.direct)
    made.append(other)

    def hold_the_row() -> None:
        with other.connect() as conn, conn.begin():
            conn.execute(text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": created.id})
            locked.set()
            release.wait(10)

    locked = threading.Event()
    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert locked.wait(10)
        checked_out, after = asyncio.run(scenario())
    finally:
        release.set()
        holder.join()
    assert checked_out == 0
    assert after is not None  # the next call got a working connection


def test_a_bounded_statement_without_an_owner_runs_unscoped_as_the_app_role(
    hot: Engine,
) -> None:
    setting: ColumnClause[str] = literal_column(f"current_setting('{USER_SETTING}', true)")
    stmt = select(setting).execution_options(**BOUNDED)
    direct = direct_statement(hot, stmt)
    assert direct is not None
    rows, _ = direct.run(hot, {})
    assert [tuple(row) for row in rows] == [("",)]  # no owner: the policy would match no row


def test_statements_the_hot_path_cannot_prerender_go_through_sqlalchemy(hot: Engine) -> None:
    table = Task.__table__  # type: ignore[attr-defined]
    own = owned_by("owner")
    assert direct_statement(hot, select(table.c.id)) is None  # not the package's own
    literal = select(table.c.id).where(table.c.title == "x").execution_options(**own)
    assert direct_statement(hot, literal) is None  # a value bound in the statement
    expanding = (
        select(table.c.id)
        .where(table.c.id.in_(bindparam("ids", expanding=True)))
        .execution_options(**own)
    )
    assert direct_statement(hot, expanding) is None  # rendered per call
    raw = text("SELECT id FROM tasks").execution_options(**own)
    assert direct_statement(hot, raw) is None  # result columns unknown


# -- the async hot path awaited outside the greenlet bridge (DirectStatement.run_async)


def _async_pool_of_one(target: Target, **options: Any) -> AsyncEngine:
    """The package's async engine on the target with a pool of one connection."""
    settings = Settings(
        database_url=target.url.render_as_string(hide_password=False),
        pool_size=1,
        max_overflow=0,
        **options,
    )
    return create_async_db_engine(settings)


def _checkout_runs_sql(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A caller's pool listener that does I/O at checkout, and ends what it began."""
    cursor = dbapi_connection.cursor()
    cursor.execute("SELECT 1")
    cursor.close()
    if not dbapi_connection.autocommit:
        dbapi_connection.rollback()


@pytest.mark.parametrize("where", ["engine, later", "Pool class, before"])
def test_a_callers_checkout_listener_doing_io_runs_for_every_async_call(
    target: Target, where: str
) -> None:
    """Where someone else listens to checkouts, the calls go through the bridge, I/O and all."""
    seen: list[None] = []

    def listener(*args: Any) -> None:
        _checkout_runs_sql(*args)
        seen.append(None)

    async def scenario() -> None:
        engine = create_async_db_engine(target.url.render_as_string(hide_password=False))
        try:
            if where == "engine, later":
                event.listen(engine.sync_engine, "checkout", listener)
            repo = AsyncTaskRepository(engine)
            created = await repo.create(ALICE, TaskCreate(title="listened"))
            for _ in range(3):
                assert await repo.get(ALICE, created.id or 0) == created
            assert [t.title for t in await repo.list(ALICE)][:1] == ["listened"]
        finally:
            await engine.dispose()

    if where == "engine, later":
        asyncio.run(scenario())
    else:
        event.listen(Pool, "checkout", listener)
        try:
            asyncio.run(scenario())
        finally:
            event.remove(Pool, "checkout", listener)
    assert len(seen) >= 5  # every call checked a connection out through the listener


def test_async_calls_take_connections_sessions_left_transactional(target: Target) -> None:
    """A connection a session used (autocommit off) serves the next call; then it stays hot."""

    async def scenario() -> None:
        engine = _async_pool_of_one(target)
        try:
            repo = AsyncTaskRepository(engine)
            for n in range(3):
                async with repo.atomic():  # the pool's one connection, transactional
                    await repo.create(ALICE, TaskCreate(title=f"in a block {n}"))
                created = await repo.create(ALICE, TaskCreate(title=f"alone {n}"))
                assert await repo.get(ALICE, created.id or 0) == created
                async with engine.connect() as conn:  # handed back transactional
                    raw = await conn.get_raw_connection()
                    assert not cast(Any, raw.driver_connection).autocommit
            titles = [task.title for task in await repo.list(ALICE)]
            assert len(titles) == 6
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_an_async_call_cancelled_while_waiting_for_the_pool_leaves_it_whole(
    target: Target,
) -> None:
    """With every connection out, a call waits in the bridge; cancelled, it takes none."""

    async def scenario() -> None:
        engine = _async_pool_of_one(target, pool_timeout=10)
        try:
            repo = AsyncTaskRepository(engine)
            created = await repo.create(ALICE, TaskCreate(title="kept"))
            async with engine.connect() as held:  # the only connection
                await held.execute(text("SELECT 1"))
                waiting = asyncio.ensure_future(repo.get(ALICE, created.id or 0))
                await asyncio.sleep(0.1)
                assert not waiting.done()
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
            # The pool still has its one connection, and it serves.
            assert await repo.get(ALICE, created.id or 0) == created
            assert cast(Any, engine.sync_engine.pool).checkedout() == 0
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_back_to_back_calls_in_a_thread_never_starve_a_call_waiting_for_the_pool(
    target: Target, made: list[Engine]
) -> None:
    """The sync face: a thread calling in a loop gives the connection up to the waiter."""
    engine = _pool_of_one(target, made, pool_timeout=30)
    repo = TaskRepository(engine)
    created = repo.create(ALICE, TaskCreate(title="shared"))
    stop = threading.Event()
    calls = [0]

    def busy() -> None:
        while not stop.is_set():
            repo.get(ALICE, created.id or 0)
            calls[0] += 1

    looping = threading.Thread(target=busy)
    looping.start()
    try:
        while calls[0] < 3:  # the loop holds the connection, turn after turn
            stop.wait(0.01)
        waited: list[Task | None] = []
        waiter = threading.Thread(target=lambda: waited.append(repo.get(ALICE, created.id or 0)))
        waiter.start()
        waiter.join(10)  # a liveness bound far below the pool timeout: served next
        assert waited == [created]
    finally:
        stop.set()
        looping.join()


def test_back_to_back_async_calls_never_starve_a_call_waiting_for_the_pool(
    target: Target,
) -> None:
    """A task calling in a loop gives its connection up to the call that waited first.

    Each of its calls gives the pool's one connection back and at once asks for it
    again, with nothing awaited between; the waiting call must get it (first come,
    first served), not wait behind the loop until its pool timeout.
    """

    async def scenario() -> None:
        engine = _async_pool_of_one(target, pool_timeout=30)
        try:
            repo = AsyncTaskRepository(engine)
            created = await repo.create(ALICE, TaskCreate(title="shared"))
            stop = asyncio.Event()
            calls = 0

            async def busy() -> None:
                nonlocal calls
                while not stop.is_set():
                    await repo.get(ALICE, created.id or 0)
                    calls += 1

            looping = asyncio.ensure_future(busy())
            while calls < 3:  # the loop holds the connection, turn after turn
                await asyncio.sleep(0.01)
            # A liveness bound far below the pool timeout: the waiter is served next.
            waited = await asyncio.wait_for(repo.get(ALICE, created.id or 0), 10)
            assert waited == created
            stop.set()
            await looping
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_an_async_call_handed_a_connection_that_needs_a_switch_keeps_its_turn(
    target: Target,
) -> None:
    """Served before a checkout that queued after it, within one pool timeout.

    The connection comes back from a caller's transactional use (not in autocommit):
    the call's own checkout switches it, without waiting in line a second time. Had it
    gone to the back of the line, the checkout behind it, which then holds the
    connection for longer than the pool timeout, would make it time out.
    """

    async def scenario() -> None:
        engine = _async_pool_of_one(target, pool_timeout=1)
        try:
            repo = AsyncTaskRepository(engine)
            created = await repo.create(ALICE, TaskCreate(title="in turn"))

            async def second() -> None:
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                    await asyncio.sleep(1.5)  # longer than the pool timeout

            async with engine.connect() as first:  # transactional: needs a switch
                await first.execute(text("SELECT 1"))
                call = asyncio.ensure_future(repo.get(ALICE, created.id or 0))
                await asyncio.sleep(0.1)  # the call waits in line
                later = asyncio.ensure_future(second())
                await asyncio.sleep(0.1)  # and the other checkout behind it
            assert await call == created
            await later
            assert cast(Any, engine.sync_engine.pool).checkedout() == 0
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_a_pool_listener_added_while_calls_wait_in_line_sees_their_checkouts(
    target: Target,
) -> None:
    """Instrumentation switched on while calls wait: every checkout has its check-in."""

    async def scenario() -> None:
        engine = _async_pool_of_one(target, pool_timeout=10)
        seen: list[str] = []
        try:
            repo = AsyncTaskRepository(engine)
            created = await repo.create(ALICE, TaskCreate(title="watched"))
            async with engine.connect() as held:
                await held.execute(text("SELECT 1"))
                calls = [asyncio.ensure_future(repo.get(ALICE, created.id or 0)) for _ in range(3)]
                await asyncio.sleep(0.1)  # all three wait in line
                event.listen(engine.sync_engine, "checkout", lambda *_: seen.append("out"))
                event.listen(engine.sync_engine, "checkin", lambda *_: seen.append("in"))
            assert await asyncio.gather(*calls) == [created] * 3
            # The held connection's own check-in, then each call's checkout and check-in.
            assert seen.count("out") == 3
            assert seen.count("in") == 4
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def _checkin_runs_sql(dbapi_connection: Any, *_rest: Any) -> None:
    """A caller's checkin or reset listener that does I/O (it runs inside the bridge)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("SELECT 1")
    cursor.close()


@pytest.mark.parametrize("pool_event", ["checkin", "reset"])
def test_a_pool_listener_added_while_an_async_call_runs_sees_its_check_in(
    target: Target, made: list[Engine], pool_event: str
) -> None:
    """Instrumentation switched on mid-call: the call answers, its connection goes back whole.

    The statement waits on a lock while the listener is added; the check-in after it
    then runs the listener (and its I/O) in the bridge: the write's answer reaches the
    caller, the listener ran to its end, and no connection is lost to the pool.
    """
    locker = create_engine(target.direct)
    made.append(locker)
    seen: list[None] = []

    def listener(*args: Any) -> None:
        _checkin_runs_sql(*args)
        seen.append(None)

    async def scenario() -> None:
        engine = _async_pool_of_one(target, pool_timeout=5)
        try:
            repo = AsyncTaskRepository(engine)
            task = await repo.create(ALICE, TaskCreate(title="before"))
            with locker.connect() as lock:
                lock.execute(text("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"))
                call = asyncio.ensure_future(
                    repo.update(ALICE, task.id or 0, TaskUpdate(title="after"))
                )
                await asyncio.sleep(0.2)  # the UPDATE waits for the lock, on the hot path
                event.listen(engine.sync_engine, pool_event, listener)
                lock.rollback()
            changed = await call
            assert changed is not None
            assert changed.title == "after"
            assert cast(Any, engine.sync_engine.pool).checkedout() == 0
            assert seen  # the check-in ran the listener
            assert await repo.get(ALICE, task.id or 0) == changed  # the pool still serves
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_an_async_connection_given_back_inside_its_users_own_begin_is_replaced(
    target: Target, made: list[Engine]
) -> None:
    """The async face too: a caller's raw BEGIN never captures the hot path's next call."""

    async def scenario() -> None:
        engine = _async_pool_of_one(target)
        try:
            repo = AsyncTaskRepository(engine)
            await repo.count(ALICE)  # the pool's one connection, left in autocommit
            async with engine.connect() as conn:
                raw = cast(Any, (await conn.get_raw_connection()).driver_connection)
                await raw.set_autocommit(True)
                await raw.execute("BEGIN")
                await raw.execute(
                    "INSERT INTO tasks (user_id, title, complete, created_at, updated_at) "
                    "VALUES ('alice', 'never committed', false, now(), now())"
                )
            # Given back inside that BEGIN: the next checkout must replace it.
            created = await repo.create(ALICE, TaskCreate(title="committed"))
            assert created.title == "committed"
            assert cast(Any, engine.sync_engine.pool).checkedout() == 0
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    other = create_engine(target.direct)
    made.append(other)
    assert _titles(other) == ["committed"]


def test_news_on_the_socket_after_the_pools_look_still_serves_the_call(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the pool's look (quiet) and the checkout listener's, the listener stays out.

    The server's news (a FATAL, EOF) can land between the two; the listener must not
    then refuse the connection outside the bridge, where replacing it would need I/O:
    the statement is sent, and a lost connection is handled as a lost connection.
    """
    looks: list[bool] = []

    def quiet_once_then_news(_connection: Any) -> bool:
        looks.append(True)
        return len(looks) % 2 == 0  # every second look sees something

    async def scenario() -> None:
        engine = _async_pool_of_one(target)
        try:
            repo = AsyncTaskRepository(engine)
            created = await repo.create(ALICE, TaskCreate(title="served"))
            monkeypatch.setattr(db, "_has_news", quiet_once_then_news)
            assert await repo.get(ALICE, created.id or 0) == created
            assert looks == [True]  # the pool looked once; the listener did not look again
        finally:
            monkeypatch.undo()
            await engine.dispose()

    asyncio.run(scenario())


@pytest.fixture
def new_york(admin_url: URL) -> Iterator[URL]:
    """A database whose time zone is west of UTC (local text can hold year 9999 past UTC's)."""
    with fresh_database(admin_url, settings={"timezone": "America/New_York"}) as url:
        schema = create_db_engine(url.render_as_string(hide_password=False))
        init_db(schema)
        schema.dispose()
        yield url


@pytest.mark.parametrize("last_use", ["a transaction", "a hot call"])
def test_a_timestamp_past_what_utc_holds_fails_as_through_sqlalchemy(
    new_york: URL, last_use: str
) -> None:
    """Year 10000 in UTC: the same error either way, and the connection is kept.

    After a transaction the call checks its connection out through the bridge; after
    a hot call, without it.
    """
    url = new_york.render_as_string(hide_password=False)

    async def read(*, hot: bool) -> tuple[str, list[object]]:
        engine = create_async_db_engine(Settings(database_url=url, pool_size=1, max_overflow=0))
        invalidated: list[object] = []
        event.listen(engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))
        if not hot:  # a caller's statement listener: every statement through SQLAlchemy
            event.listen(engine.sync_engine, "before_cursor_execute", lambda *_: None)
        try:
            repo = AsyncTaskRepository(engine)
            task = await repo.create(ALICE, TaskCreate(title="far"))
            async with engine.begin() as conn:
                await conn.execute(
                    text("UPDATE tasks SET created_at = '9999-12-31 23:00:00-05' WHERE id = :id"),
                    {"id": task.id},
                )
            if last_use == "a hot call":
                assert await repo.count(ALICE) == 1
            try:
                await repo.get(ALICE, task.id or 0)
            except Exception as err:  # noqa: BLE001 - the outcome is what is compared
                outcome = type(err).__name__
            else:
                outcome = "read"
            assert await repo.count(ALICE) == 1  # the pool's one connection still serves
            async with engine.begin() as conn:
                await conn.execute(text("DELETE FROM tasks"))
            return outcome, invalidated
        finally:
            await engine.dispose()

    hot, through_sqlalchemy = asyncio.run(read(hot=True)), asyncio.run(read(hot=False))
    assert hot[0] == through_sqlalchemy[0] == "OverflowError"
    assert hot[1] == through_sqlalchemy[1] == []  # no connection discarded
