"""IdleQueuePool: keeps up to pool_size + max_overflow connections, sheds them once idle.

Driven with stand-in DBAPI connections and a controlled clock, so each test counts
exactly what the pool opened and closed; the PostgreSQL tests (test_pool_pg.py)
count server sessions on both faces.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from sqlalchemy import event
from sqlalchemy.exc import SAWarning
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import PoolProxiedConnection, PoolResetState, QueuePool
from sqlalchemy.util import greenlet_spawn

from tests.async_face import runner
from todo_backend import pool as pool_module
from todo_backend.aio import create_async_db_engine
from todo_backend.config import Settings, load_settings
from todo_backend.db import create_db_engine
from todo_backend.errors import ConfigurationError
from todo_backend.pool import AsyncIdleQueuePool, IdleQueuePool

__all__ = ["runner"]  # fixture


@dataclass
class FakeConnection:
    """A DBAPI connection that only records whether it was closed."""

    closed: bool = False

    def close(self) -> None:
        """Close it."""
        self.closed = True

    def rollback(self) -> None:
        """Nothing to roll back."""

    def commit(self) -> None:
        """Nothing to commit."""

    def cursor(self) -> None:
        """Never used by the pool."""


@dataclass
class Server:
    """Hands out FakeConnections and remembers each one."""

    opened: list[FakeConnection] = field(default_factory=list)

    def connect(self) -> FakeConnection:
        """Open a new connection."""
        connection = FakeConnection()
        self.opened.append(connection)
        return connection

    @property
    def open(self) -> int:
        """Connections opened and not closed."""
        return sum(not c.closed for c in self.opened)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The pool module's clock, under the test's control."""
    fake = Clock()
    monkeypatch.setattr(pool_module, "monotonic", fake)
    return fake


@pytest.fixture
def server() -> Server:
    """A fresh stand-in server."""
    return Server()


@pytest.fixture
def pool(server: Server, clock: Clock) -> Iterator[IdleQueuePool]:
    """A pool of 2 + 3 connections, closing the extra ones after 60 s idle."""
    idle = IdleQueuePool(server.connect, pool_size=2, max_overflow=3, timeout=0.05, idle_timeout=60)
    yield idle
    idle.dispose()


def checkout(pool: QueuePool, n: int) -> list[PoolProxiedConnection]:
    """Check out *n* connections at once."""
    return [pool.connect() for _ in range(n)]


def checkin(connections: list[PoolProxiedConnection]) -> None:
    """Return every connection to its pool."""
    for connection in connections:
        connection.close()


def test_overflow_connections_stay_open_when_returned(pool: IdleQueuePool, server: Server) -> None:
    """A burst to the maximum keeps all its connections: the next burst opens none."""
    checkin(checkout(pool, 5))
    assert server.open == 5
    assert pool.checkedin() == 5
    assert pool.overflow() == 3
    checkin(checkout(pool, 5))
    assert len(server.opened) == 5


def test_plain_queuepool_closes_them(server: Server) -> None:
    """The pool this replaces reopens its overflow on each burst (what the pool rules out)."""
    plain = QueuePool(server.connect, pool_size=2, max_overflow=3)  # type: ignore[arg-type]
    checkin(checkout(plain, 5))
    checkin(checkout(plain, 5))
    assert len(server.opened) == 8
    plain.dispose()


def test_idle_connections_above_the_minimum_close_after_the_timeout(
    pool: IdleQueuePool, server: Server, clock: Clock
) -> None:
    """After idle_timeout unused, the next checkout closes the ones above pool_size."""
    checkin(checkout(pool, 5))
    clock.now += 59
    checkin(checkout(pool, 1))
    assert server.open == 5  # not idle long enough yet
    clock.now += 2
    checkin(checkout(pool, 1))
    assert server.open == 2
    assert pool.checkedin() == 2
    assert pool.overflow() == 0
    assert pool.checkedout() == 0


def test_two_checkouts_at_once_never_shed_below_pool_size(
    pool: IdleQueuePool, server: Server, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout while another is still closing idle connections keeps pool_size open."""
    checkin(checkout(pool, 5))
    clock.now += 61
    closing, release = threading.Event(), threading.Event()
    closes = itertools.count()
    plain_close = FakeConnection.close

    def slow_close(connection: FakeConnection) -> None:
        if next(closes) == 0:  # the first close hangs (a TLS shutdown on a slow network)
            closing.set()
            release.wait(10)
        plain_close(connection)

    monkeypatch.setattr(FakeConnection, "close", slow_close)
    held: list[PoolProxiedConnection] = []
    first = threading.Thread(target=lambda: held.append(pool.connect()))
    first.start()
    assert closing.wait(10)  # the first checkout is closing the overflow it took
    try:
        held.append(pool.connect())  # sheds nothing more: takes a kept connection
    finally:
        release.set()
        first.join(10)
    assert len(held) == 2
    assert len(server.opened) == 5  # no kept connection was closed and opened again
    assert server.open == 2
    checkin(held)
    assert pool.checkedin() == 2
    assert pool.overflow() == 0


def test_a_steady_low_load_keeps_only_what_it_uses(
    pool: IdleQueuePool, server: Server, clock: Clock
) -> None:
    """Connections a lower load leaves unused age out, while the one in use is kept."""
    checkin(checkout(pool, 5))
    for _ in range(7):  # one call every 10 s: LIFO hands out the same connection
        clock.now += 10
        checkin(checkout(pool, 1))
    assert server.open == 2
    assert len(server.opened) == 5


def test_the_pool_regrows_after_shrinking(
    pool: IdleQueuePool, server: Server, clock: Clock
) -> None:
    """A new burst after shrinking opens connections again, up to the maximum."""
    checkin(checkout(pool, 5))
    clock.now += 61
    checkin(checkout(pool, 1))
    checkin(checkout(pool, 5))
    assert server.open == 5
    assert len(server.opened) == 8


def test_checkout_waits_at_most_timeout_beyond_the_maximum(pool: IdleQueuePool) -> None:
    """With every connection busy, a checkout raises the pool's TimeoutError after ``timeout``."""
    held = checkout(pool, 5)
    with pytest.raises(PoolTimeoutError):
        pool.connect()
    checkin(held)
    assert pool.checkedout() == 0


def test_recreate_and_dispose_keep_the_settings(pool: IdleQueuePool, server: Server) -> None:
    """engine.dispose() (recreate) gives an empty pool with the same bounds and idle timeout."""
    checkin(checkout(pool, 5))
    fresh = pool.recreate()
    pool.dispose()
    assert server.open == 0
    assert isinstance(fresh, IdleQueuePool)
    assert (fresh.size(), fresh.idle_timeout, fresh.timeout()) == (2, 60, 0.05)
    checkin(checkout(fresh, 5))
    assert fresh.overflow() == 3
    fresh.dispose()


def test_idle_timeout_must_be_positive(server: Server) -> None:
    """A zero idle timeout is refused."""
    with pytest.raises(ValueError, match="idle_timeout"):
        IdleQueuePool(server.connect, idle_timeout=0)


# -- the engines' pools, from the settings ---------------------------------------------


def test_db_pool_idle_timeout_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """DB_POOL_IDLE_TIMEOUT sets the idle timeout (default 60 s); zero or text is refused."""
    monkeypatch.setenv("DATABASE_URL", "sqlite://")
    monkeypatch.delenv("DB_POOL_IDLE_TIMEOUT", raising=False)
    assert load_settings(None).pool_idle_timeout == 60
    monkeypatch.setenv("DB_POOL_IDLE_TIMEOUT", "2.5")
    assert load_settings(None).pool_idle_timeout == 2.5
    for bad in ("0", "soon"):
        monkeypatch.setenv("DB_POOL_IDLE_TIMEOUT", bad)
        with pytest.raises(ConfigurationError, match="DB_POOL_IDLE_TIMEOUT"):
            load_settings(None)


def test_both_postgres_engines_get_the_idle_pool(runner: asyncio.Runner) -> None:
    """The sync and the async PostgreSQL engine pool with the settings' bounds and idle timeout."""
    settings = Settings(
        database_url="postgresql://u:p@db.example.com/app",
        pool_size=3,
        max_overflow=4,
        pool_timeout=7,
        pool_idle_timeout=9,
    )
    sync = create_db_engine(settings)
    engine = create_async_db_engine(settings)
    try:
        sync_pool, async_pool = sync.pool, engine.sync_engine.pool
        assert type(sync_pool) is IdleQueuePool
        assert type(async_pool) is AsyncIdleQueuePool
        for each in (sync_pool, async_pool):
            assert isinstance(each, IdleQueuePool)
            assert (each.size(), each.idle_timeout, each.timeout()) == (3, 9, 7)
            assert each._max_overflow == 4
    finally:
        sync.dispose()
        runner.run(engine.dispose())


# -- lend and give_back: what the async hot path borrows outside the greenlet bridge ----


def _anything(_connection: object) -> bool:
    return True


def _state(pool: IdleQueuePool) -> tuple[object, ...]:
    """What a refused loan must leave as it was: the stack, its times, the counts."""
    stack = list(cast(Any, pool._pool).queue)  # the stack itself, bottom first
    return (stack, list(pool._put_at), pool._overflow, pool.checkedin())


def test_a_loan_takes_the_most_recent_idle_connection_and_counts_as_checked_out(
    pool: IdleQueuePool, server: Server
) -> None:
    """The connection returned last comes out, as a checkout would give it, and goes back."""
    first, second = checkout(pool, 2)
    last = second.dbapi_connection
    checkin([first, second])
    record = pool.lend(_anything)
    assert record is not None
    assert record.dbapi_connection is last
    assert (pool.checkedout(), pool.checkedin()) == (1, 1)
    assert record.in_use
    pool.give_back(record)
    assert (pool.checkedout(), pool.checkedin()) == (0, 2)
    assert len(server.opened) == 2
    taken = pool.connect()  # the stack's top again: the same connection, nothing opened
    assert taken.dbapi_connection is last
    assert len(server.opened) == 2
    checkin([taken])


@pytest.mark.parametrize("reason", ["empty", "refused", "shed due", "pre-ping", "debug log"])
def test_a_loan_that_would_need_io_or_hide_a_checkout_is_refused_leaving_the_pool_as_it_was(
    server: Server, clock: Clock, reason: str
) -> None:
    """No connect, no shedding, no wait, no skipped ping or log line: None, nothing moved."""
    options: dict[str, Any] = {"pre_ping": reason == "pre-ping"}
    if reason == "debug log":
        options["echo"] = "debug"  # the pool's checkouts logged: a loan would hide one
    pool = IdleQueuePool(server.connect, pool_size=2, max_overflow=3, idle_timeout=60, **options)
    held = checkout(pool, 3)  # one above pool_size
    if reason != "empty":
        checkin(held)
        held = []
    if reason == "shed due":
        clock.now += 61
    before = _state(pool)
    ready = (lambda _c: False) if reason == "refused" else _anything
    assert pool.lend(ready) is None
    assert _state(pool) == before
    assert len(server.opened) == 3
    assert server.open == 3
    checkin(held)
    pool.dispose()


@pytest.mark.parametrize("reason", ["recycle", "pool invalidated", "soft invalidated", "lost"])
def test_a_connection_sqlalchemy_would_reconnect_is_left_to_a_normal_checkout(
    server: Server, monkeypatch: pytest.MonkeyPatch, reason: str
) -> None:
    """The pool's look agrees with SQLAlchemy's own reconnect rules (private API, pinned).

    For each reason SQLAlchemy's checkout reconnects a pooled connection, the loan
    refuses it, and the normal checkout then does reconnect it.
    """
    now = [5000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])  # SQLAlchemy's clock and the pool's
    pool = IdleQueuePool(server.connect, pool_size=2, max_overflow=0, recycle=100, idle_timeout=60)
    other, top = checkout(pool, 2)
    now[0] += 1  # SQLAlchemy compares invalidation times with connection times
    if reason == "pool invalidated":
        pool._invalidate(other)
        checkin([pool.connect()])  # that one reconnected; *top* is older than the event
    else:
        checkin([other])
    if reason == "soft invalidated":
        top.invalidate(soft=True)
    if reason == "lost":
        top.invalidate()  # given back at once, without its connection
    checkin([top])  # on top of the stack: the next checkout's
    if reason == "recycle":
        now[0] += 98.5  # 99.5 s old: within the margin (SQLAlchemy recycles past 100 s)
    before = len(server.opened)
    assert pool.lend(_anything) is None
    assert len(server.opened) == before
    if reason == "recycle":
        now[0] += 1  # past SQLAlchemy's own limit now
    taken = pool.connect()  # the normal checkout reconnects it
    assert len(server.opened) == before + 1
    assert taken.dbapi_connection is cast(Any, server.opened[-1])
    checkin([taken])
    pool.dispose()


def test_a_fresh_connection_within_its_recycling_age_is_lent(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short of the margin before recycling, the loan takes it."""
    now = [5000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])  # SQLAlchemy's clock and the pool's
    pool = IdleQueuePool(server.connect, pool_size=1, max_overflow=0, recycle=100, idle_timeout=60)
    checkin(checkout(pool, 1))
    now[0] += 98.5
    record = pool.lend(_anything)
    assert record is not None
    assert record.dbapi_connection is cast(Any, server.opened[0])
    pool.give_back(record)
    pool.dispose()


def test_a_given_back_connection_passes_the_pools_reset_and_checkin_events(
    pool: IdleQueuePool,
) -> None:
    """A caller's reset and checkin listeners see a lent connection come back, as any other."""
    seen: list[tuple[str, object, bool | None]] = []

    def on_reset(dbapi: object, _record: object, state: PoolResetState) -> None:
        seen.append(("reset", dbapi, state.transaction_was_reset))

    def on_checkin(dbapi: object, _record: object) -> None:
        seen.append(("checkin", dbapi, None))

    checkin(checkout(pool, 1))
    event.listen(pool, "reset", on_reset)
    event.listen(pool, "checkin", on_checkin)
    record = pool.lend(_anything)
    assert record is not None
    connection = record.dbapi_connection
    pool.give_back(record)
    assert seen == [("reset", connection, False), ("checkin", connection, None)]


def test_a_connection_given_back_twice_is_pooled_once(pool: IdleQueuePool) -> None:
    """SQLAlchemy's double check-in warning, and the pool still holds the connection once."""
    checkin(checkout(pool, 1))
    record = pool.lend(_anything)
    assert record is not None
    pool.give_back(record)
    with pytest.warns(SAWarning, match="Double checkin"):
        pool.give_back(record)
    assert pool.checkedin() == 1


def test_a_lost_loan_replaces_every_connection_opened_before_it(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As SQLAlchemy reacts to a disconnect: the lost one, and all older, reconnect on checkout."""
    now = [5000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])  # SQLAlchemy's clock and the pool's
    pool = IdleQueuePool(server.connect, pool_size=3, max_overflow=0, idle_timeout=60)
    older, lost = checkout(pool, 2)
    now[0] += 1
    checkin([older, lost])  # *lost* on top
    now[0] += 1
    record = pool.lend(_anything)
    assert record is not None
    dropped = record.dbapi_connection
    pool.invalidate_older(record, RuntimeError("server closed the connection"))
    pool.give_back(record)
    assert cast(Any, dropped).closed
    assert record.dbapi_connection is None
    now[0] += 1
    replaced = checkout(pool, 2)  # both reconnect: the empty slot and the older one
    assert len(server.opened) == 4
    assert {id(c.dbapi_connection) for c in replaced} == {id(c) for c in server.opened[2:]}
    checkin(replaced)
    pool.dispose()


def test_a_thread_asking_again_right_after_giving_back_waits_behind_the_waiting_one(
    server: Server,
) -> None:
    """First come, first served for threads: the waiting checkout gets the connection.

    SQLAlchemy's own queue lets the thread that gave the connection back take it
    again before the woken waiter runs; in a loop, the waiter waits until its timeout.
    """
    # The waiter is handed the connection at once; the second ask waits out 1 s.
    pool = IdleQueuePool(server.connect, pool_size=1, max_overflow=0, timeout=1)
    [held] = checkout(pool, 1)
    connection = held.dbapi_connection
    got: list[PoolProxiedConnection] = []
    waiter = threading.Thread(target=lambda: got.append(pool.connect()))
    waiter.start()
    deadline = time.monotonic() + 10  # a liveness bound: the thread reaches its wait at once
    while not _waiting(pool, 1) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert _waiting(pool, 1), "the waiting checkout never started"
    checkin([held])
    assert pool.lend(_anything) is None  # nothing in the queue: it was handed over
    with pytest.raises(PoolTimeoutError):
        pool.connect()  # asking again at once: the connection is the waiter's now
    waiter.join(10)
    assert [c.dbapi_connection for c in got] == [connection]
    checkin(got)
    assert (pool.checkedin(), len(server.opened)) == (1, 1)
    pool.dispose()


def _waiting(pool: IdleQueuePool, count: int) -> bool:
    return len(cast(Any, pool._pool)._waiters) == count


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run until *condition* holds (a liveness bound of 10 s)."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.001)


def test_a_connection_given_back_goes_to_the_checkout_that_waited_first(
    runner: asyncio.Runner, server: Server
) -> None:
    """First come, first served: asking again right after giving back means waiting in line.

    SQLAlchemy's own asyncio queue lets such a caller take the connection back before
    the woken waiter runs; under a steady load the waiter then waits until its timeout.
    """
    pool = AsyncIdleQueuePool(server.connect, pool_size=1, max_overflow=0, timeout=10)

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        connection = held.dbapi_connection
        waiting = asyncio.ensure_future(greenlet_spawn(pool.connect))
        await _until(lambda: _waiting(pool, 1))

        def give_back_and_ask_again() -> PoolProxiedConnection:
            held.close()
            return pool.connect()

        again = asyncio.ensure_future(greenlet_spawn(give_back_and_ask_again))
        first = await asyncio.wait_for(waiting, 10)
        assert first.dbapi_connection is connection
        assert pool.lend(_anything) is None  # nothing in the queue while anyone waits
        await _until(lambda: _waiting(pool, 1))
        assert not again.done()
        await greenlet_spawn(first.close)
        second = await asyncio.wait_for(again, 10)
        assert second.dbapi_connection is connection
        await greenlet_spawn(second.close)
        assert (pool.checkedin(), len(server.opened)) == (1, 1)

    runner.run(scenario())
    pool.dispose()


@pytest.mark.parametrize("how", ["cancelled", "timed out"])
def test_a_checkout_that_stops_waiting_leaves_the_line_and_the_pool_whole(
    runner: asyncio.Runner, server: Server, how: str
) -> None:
    """A waiter cancelled or out of time leaves; the next in line gets the connection."""
    timeout = 0.2 if how == "timed out" else 10
    pool = AsyncIdleQueuePool(server.connect, pool_size=1, max_overflow=0, timeout=timeout)

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        first = asyncio.ensure_future(greenlet_spawn(pool.connect))
        await _until(lambda: _waiting(pool, 1))
        if how == "cancelled":
            second = asyncio.ensure_future(greenlet_spawn(pool.connect))
            await _until(lambda: _waiting(pool, 2))
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            await _until(lambda: _waiting(pool, 1))
            await greenlet_spawn(held.close)
            taken = await asyncio.wait_for(second, 10)
            await greenlet_spawn(taken.close)
        else:
            with pytest.raises(PoolTimeoutError):
                await first
            assert _waiting(pool, 0)
            await greenlet_spawn(held.close)
        assert (pool.checkedout(), pool.checkedin(), len(server.opened)) == (0, 1, 1)

    runner.run(scenario())
    pool.dispose()


# -- borrow: the async hot path's loan, waiting in the pool's line when all are out ----


def _async_pool(server: Server, size: int = 1, **options: Any) -> AsyncIdleQueuePool:
    return AsyncIdleQueuePool(server.connect, pool_size=size, max_overflow=0, **options)


def test_a_borrow_waits_in_line_in_turn_with_checkouts(
    runner: asyncio.Runner, server: Server
) -> None:
    """All out: a checkout that came first is served first, then the borrow, no greenlet."""
    pool = _async_pool(server, timeout=10)

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        connection = held.dbapi_connection
        checkout_first = asyncio.ensure_future(greenlet_spawn(pool.connect))
        await _until(lambda: _waiting(pool, 1))
        borrowing = asyncio.ensure_future(pool.borrow(_anything))
        await _until(lambda: _waiting(pool, 2))
        await greenlet_spawn(held.close)
        first = await asyncio.wait_for(checkout_first, 10)
        assert first.dbapi_connection is connection
        assert not borrowing.done()
        await greenlet_spawn(first.close)
        record, lent = await asyncio.wait_for(borrowing, 10)
        assert record is not None
        assert not lent  # handed over in turn: still to be taken
        assert record.dbapi_connection is connection
        assert pool.take_handed(record, _anything)
        assert pool.checkedout() == 1
        pool.give_back(record)
        assert (pool.checkedout(), pool.checkedin(), len(server.opened)) == (0, 1, 1)

    runner.run(scenario())
    pool.dispose()


def test_a_borrow_that_may_connect_is_left_to_a_checkout(
    runner: asyncio.Runner, server: Server
) -> None:
    """Below the pool's maximum a checkout would open a connection (I/O): None, nothing waits."""
    pool = AsyncIdleQueuePool(server.connect, pool_size=1, max_overflow=1, timeout=10)

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        assert await pool.borrow(_anything) == (None, False)
        assert _waiting(pool, 0)
        await greenlet_spawn(held.close)

    runner.run(scenario())
    assert len(server.opened) == 1
    pool.dispose()


def test_a_borrow_out_of_time_raises_the_pools_timeout_and_leaves_the_line(
    runner: asyncio.Runner, server: Server
) -> None:
    """As a checkout times out: SQLAlchemy's TimeoutError, nobody left waiting."""
    pool = _async_pool(server, timeout=0.1)

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        with pytest.raises(PoolTimeoutError, match="timed out"):
            await pool.borrow(_anything)
        assert _waiting(pool, 0)
        await greenlet_spawn(held.close)
        assert pool.checkedin() == 1

    runner.run(scenario())
    pool.dispose()


@pytest.mark.parametrize("why", ["needs I/O", "cannot tell"])
def test_a_handed_connection_that_needs_io_is_checked_out_in_its_turn(
    runner: asyncio.Runner, server: Server, why: str
) -> None:
    """Not taken as it is: the caller's own checkout gets it, without waiting in line again.

    The next in line keeps waiting; the caller, first in line, is served first.
    """
    pool = _async_pool(server, timeout=10)
    seen: list[object] = []
    event.listen(pool, "checkout", lambda dbapi, *_: seen.append(dbapi))

    def refuse(_connection: object) -> bool:
        if why == "cannot tell":
            raise OSError("poll failed")
        return False

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        connection = held.dbapi_connection
        borrowing = asyncio.ensure_future(pool.borrow(_anything))
        await _until(lambda: _waiting(pool, 1))
        next_in_line = asyncio.ensure_future(greenlet_spawn(pool.connect))
        await _until(lambda: _waiting(pool, 2))
        await greenlet_spawn(held.close)
        record, lent = await asyncio.wait_for(borrowing, 10)
        assert record is not None
        assert not lent
        assert not pool.take_handed(record, refuse)

        def checkout_reserved() -> PoolProxiedConnection:
            with pool_module.reserved(pool, record):
                return pool.connect()

        taken = await greenlet_spawn(checkout_reserved)  # no second wait
        assert taken.dbapi_connection is connection
        assert seen[-1] is connection  # SQLAlchemy's checkout, listeners and all
        assert not next_in_line.done()
        await greenlet_spawn(taken.close)
        after = await asyncio.wait_for(next_in_line, 10)
        await greenlet_spawn(after.close)
        assert (pool.checkedout(), pool.checkedin(), len(server.opened)) == (0, 1, 1)

    runner.run(scenario())
    pool.dispose()


def test_a_reservation_left_unused_goes_back_to_its_pool(server: Server) -> None:
    """A block that never checked out returns the reserved connection (nothing lost)."""
    pool = IdleQueuePool(server.connect, pool_size=1, max_overflow=0, timeout=1)
    checkin(checkout(pool, 1))
    record = pool.lend(_anything)
    assert record is not None
    record.fairy_ref = None  # type: ignore[attr-defined]  # as handed over: not lent
    with pytest.raises(RuntimeError), pool_module.reserved(pool, record):
        raise RuntimeError("failed before its checkout")
    assert (pool.checkedout(), pool.checkedin()) == (0, 1)
    other = IdleQueuePool(server.connect, pool_size=1, max_overflow=0, timeout=1)
    record = pool.lend(_anything)
    assert record is not None
    record.fairy_ref = None  # type: ignore[attr-defined]
    with pool_module.reserved(pool, record):
        taken = other.connect()  # another pool (an engine disposed meanwhile)
    assert (pool.checkedout(), pool.checkedin()) == (0, 1)
    checkin([taken])
    other.dispose()
    pool.dispose()


def test_a_borrow_cancelled_in_line_passes_its_turn_on(
    runner: asyncio.Runner, server: Server
) -> None:
    """Cancelled as the connection is handed to it: the next in line gets it, none is lost."""
    pool = _async_pool(server, timeout=10)

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        borrowing = asyncio.ensure_future(pool.borrow(_anything))
        await _until(lambda: _waiting(pool, 1))
        after = asyncio.ensure_future(greenlet_spawn(pool.connect))
        await _until(lambda: _waiting(pool, 2))
        await greenlet_spawn(held.close)  # handed to the borrow, which has not run yet
        borrowing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await borrowing
        taken = await asyncio.wait_for(after, 10)
        await greenlet_spawn(taken.close)
        assert (pool.checkedout(), pool.checkedin(), len(server.opened)) == (0, 1, 1)

    runner.run(scenario())
    pool.dispose()


# -- faults around the line and the loans: nothing lost, nothing early -------------------


def test_a_waiter_cancelled_in_the_pass_its_connection_comes_is_cancelled_cleanly(
    runner: asyncio.Runner, server: Server
) -> None:
    """Cancelled, then a connection given back before it runs: CancelledError, nothing lost."""
    pool = _async_pool(server, timeout=10)

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        waiting = asyncio.ensure_future(pool.borrow(_anything))
        await _until(lambda: _waiting(pool, 1))
        waiting.cancel()  # its future is cancelled now; the task has not run yet
        await greenlet_spawn(held.close)  # the line's first is the cancelled one: skipped
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert _waiting(pool, 0)
        assert (pool.checkedout(), pool.checkedin()) == (0, 1)

    runner.run(scenario())
    pool.dispose()


def test_a_connection_a_cancelled_waiter_passes_on_is_idle_from_then_only(
    runner: asyncio.Runner, server: Server, clock: Clock
) -> None:
    """Queued again after a hand-off that came too late, it counts as just returned."""
    pool = AsyncIdleQueuePool(server.connect, pool_size=1, max_overflow=1, timeout=10)

    async def scenario() -> None:
        kept, extra = await greenlet_spawn(lambda: checkout(pool, 2))
        waiting = asyncio.ensure_future(pool.borrow(_anything))
        await _until(lambda: _waiting(pool, 1))
        clock.now += 600  # long after any earlier put: a stale time would shed at once
        await greenlet_spawn(extra.close)  # handed to the waiter...
        waiting.cancel()  # ...which is cancelled before it runs: queued again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await greenlet_spawn(kept.close)
        taken = await greenlet_spawn(pool.connect)  # sheds what idled 60 s: nothing
        assert server.open == 2
        await greenlet_spawn(taken.close)

    runner.run(scenario())
    pool.dispose()


class _Interrupt(BaseException):
    """Stands for a KeyboardInterrupt or a cancellation inside a listener."""


@pytest.mark.parametrize("failure", [RuntimeError, _Interrupt])
def test_a_failing_reset_listener_never_keeps_a_lent_connection_out(
    pool: IdleQueuePool, server: Server, failure: type[BaseException]
) -> None:
    """As SQLAlchemy's check-in: the connection is discarded and its slot given back.

    An error is logged, not raised (the caller's statement succeeded); an interruption
    is raised, after the slot was given back.
    """
    checkin(checkout(pool, 1))

    def reset(*_args: object) -> None:
        raise failure("reset hook failed")

    event.listen(pool, "reset", reset)
    record = pool.lend(_anything)
    assert record is not None
    dropped = record.dbapi_connection
    if failure is RuntimeError:
        pool.give_back(record)
    else:
        with pytest.raises(failure):
            pool.give_back(record)
    assert cast(Any, dropped).closed
    assert (pool.checkedout(), pool.checkedin()) == (0, 1)
    event.remove(pool, "reset", reset)
    taken = pool.connect()  # reconnected in the slot
    assert taken.dbapi_connection is cast(Any, server.opened[-1])
    assert len(server.opened) == 2
    checkin([taken])


def test_a_waiter_of_a_closed_event_loop_never_takes_a_connection(
    runner: asyncio.Runner, server: Server
) -> None:
    """A loop closed with a checkout still in line (its task never cancelled): skipped."""
    pool = _async_pool(server, timeout=10)
    old_loop = asyncio.new_event_loop()
    dead = old_loop.create_future()  # what such a waiter leaves in the line
    old_loop.close()

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        cast(Any, pool._pool)._waiters.append(dead)
        await greenlet_spawn(held.close)
        assert pool.checkedin() == 1
        assert not dead.done()
        record, lent = await pool.borrow(_anything)
        assert record is not None
        assert lent
        pool.give_back(record)

    runner.run(scenario())
    pool.dispose()


def test_a_loan_whose_readiness_check_raises_leaves_the_connection_pooled(
    pool: IdleQueuePool,
) -> None:
    """The error reaches the caller; the connection stays where it was."""
    checkin(checkout(pool, 1))
    before = _state(pool)

    def broken(_connection: object) -> bool:
        raise OSError("poll failed")

    with pytest.raises(OSError, match="poll failed"):
        pool.lend(broken)
    assert _state(pool) == before


def test_a_borrow_never_waits_where_checkouts_are_logged(
    runner: asyncio.Runner, server: Server
) -> None:
    """The pool's checkouts logged (echo_pool="debug"): the caller checks out as usual."""
    pool = _async_pool(server, timeout=10, echo="debug")

    async def scenario() -> None:
        held = await greenlet_spawn(pool.connect)
        assert await pool.borrow(_anything) == (None, False)
        assert _waiting(pool, 0)
        await greenlet_spawn(held.close)

    runner.run(scenario())
    pool.dispose()
