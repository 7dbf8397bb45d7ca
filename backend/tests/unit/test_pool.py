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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import PoolProxiedConnection, QueuePool

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


# -- checkout_without_io: what the async hot path takes outside the greenlet bridge ----


def _anything(_connection: object) -> bool:
    return True


def _state(pool: IdleQueuePool) -> tuple[object, ...]:
    """What a refused checkout must leave as it was: the stack, its times, the counts."""
    stack = list(cast(Any, pool._pool).queue)  # the stack itself, bottom first
    return (stack, list(pool._put_at), pool._overflow, pool.checkedin())


def test_a_checkout_without_io_takes_the_most_recent_idle_connection(
    pool: IdleQueuePool, server: Server
) -> None:
    """The connection returned last comes out, as a normal checkout would give it."""
    first, second = checkout(pool, 2)
    last = second.dbapi_connection
    checkin([first, second])
    with pool_module.checkout_without_io(_anything):
        taken = pool.connect()
    assert taken.dbapi_connection is last
    assert len(server.opened) == 2
    checkin([taken])
    assert pool.checkedin() == 2


@pytest.mark.parametrize("reason", ["empty", "refused", "shed due"])
def test_a_checkout_that_would_need_io_is_refused_leaving_the_pool_as_it_was(
    pool: IdleQueuePool, server: Server, clock: Clock, reason: str
) -> None:
    """No connect, no shedding, no wait: CheckoutNeedsIO, and nothing moved."""
    held = checkout(pool, 3)  # one above pool_size
    if reason != "empty":
        checkin(held)
        held = []
    if reason == "shed due":
        clock.now += 61
    before = _state(pool)
    ready = (lambda _c: False) if reason == "refused" else _anything
    with pool_module.checkout_without_io(ready), pytest.raises(pool_module.CheckoutNeedsIO):
        pool.connect()
    assert _state(pool) == before
    assert len(server.opened) == 3
    assert server.open == 3
    checkin(held)


@pytest.mark.parametrize("reason", ["recycle", "pool invalidated", "soft invalidated", "lost"])
def test_a_connection_sqlalchemy_would_reconnect_is_left_to_a_normal_checkout(
    server: Server, monkeypatch: pytest.MonkeyPatch, reason: str
) -> None:
    """The pool's look agrees with SQLAlchemy's own reconnect rules (private API, pinned).

    For each reason SQLAlchemy's checkout reconnects a pooled connection, the checkout
    without I/O refuses it, and the normal checkout then does reconnect it.
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
    with pool_module.checkout_without_io(_anything), pytest.raises(pool_module.CheckoutNeedsIO):
        pool.connect()
    assert len(server.opened) == before
    if reason == "recycle":
        now[0] += 1  # past SQLAlchemy's own limit now
    taken = pool.connect()  # the normal checkout reconnects it
    assert len(server.opened) == before + 1
    assert taken.dbapi_connection is cast(Any, server.opened[-1])
    checkin([taken])
    pool.dispose()


def test_a_fresh_connection_within_its_recycling_age_is_taken(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short of the margin before recycling, the checkout without I/O takes it."""
    now = [5000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])  # SQLAlchemy's clock and the pool's
    pool = IdleQueuePool(server.connect, pool_size=1, max_overflow=0, recycle=100, idle_timeout=60)
    checkin(checkout(pool, 1))
    now[0] += 98.5
    with pool_module.checkout_without_io(_anything):
        taken = pool.connect()
    assert taken.dbapi_connection is cast(Any, server.opened[0])
    checkin([taken])
    pool.dispose()
