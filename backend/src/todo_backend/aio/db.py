"""Async engines and sessions: the Neon-ready engine of :mod:`todo_backend.db`, awaited.

PostgreSQL runs on psycopg 3 (``postgresql+psycopg_async``) with the sync engine's
pool bounds, recycling, connect timeout, keepalives and TLS rule, and the same
zero-round-trip check that replaces dead pooled connections before a statement is
sent, and the same statement, lock and idle-in-transaction bounds, set once per
transaction in its first statement's own query message
(:func:`todo_backend.db.bound_every_statement`). For that, psycopg 3 binds parameters
on the client (:class:`_LastResultCursor`): a statement goes out as one
simple-protocol message, as psycopg2 sends it, and is never prepared on the server,
which PgBouncer in transaction mode (Neon's pooled endpoint) would break by handing
the next transaction to a server connection that lacks the prepared statement.
SQLite runs on aiosqlite.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final, TypeVar, cast

from psycopg import AsyncClientCursor, AsyncConnection
from psycopg.abc import AdaptContext, Buffer
from psycopg.abc import Loader as AbcLoader
from psycopg.adapt import Loader
from psycopg.pq import Format
from psycopg.types.datetime import TimestamptzLoader
from sqlalchemy import Dialect, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlmodel import UTCDateTime
from sqlmodel.ext.asyncio.session import AsyncSession

from todo_backend.config import Settings
from todo_backend.db import (
    allow_direct,
    as_settings,
    bound_every_statement,
    checkout_mode,
    enter_scope,
    is_in_memory,
    leave_scope,
    pool_listeners,
    postgres_engine_options,
    reject_dead_connection,
    scope_transaction,
    sqlite_engine_options,
    sqlite_on_connect,
    statement_listeners,
)
from todo_backend.pool import AsyncIdleQueuePool

__all__ = [
    "HotPathCursor",
    "create_async_db_engine",
    "get_async_session",
    "hot_cursor",
    "user_scope",
]

_POSTGRES_DRIVER: Final = "postgresql+psycopg_async"
_S = TypeVar("_S", bound=SAAsyncSession)
_SQLITE_DRIVER: Final = "sqlite+aiosqlite"


class _LastResultCursor(AsyncClientCursor[Any]):
    """psycopg 3's client-binding cursor, positioned on the last statement's result.

    The bounds travel as a ``SELECT set_config(...);`` in front of a transaction's
    first statement, in the same message. psycopg leaves a cursor on the first result
    of such a message; the caller (SQLAlchemy) wants the statement's own, the last:
    rows, ``RETURNING`` and rowcount. The results are all in memory already, so moving
    costs nothing. An executemany never carries the bounds and runs as psycopg runs it.
    """

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        """Execute *query*; leave the cursor on its last result."""
        await super().execute(query, params, **kwargs)
        while self.nextset():
            pass
        return self


# PostgreSQL's type oid of timestamptz.
_TIMESTAMPTZ: Final = 1184


class _UTCTimestamptzLoader(Loader):
    """Load ``timestamptz`` as sqlmodel's ``UTCDateTime`` returns it (the hot path's cursors).

    psycopg 3 loads a ``timestamptz`` into the connection's time zone (a ``ZoneInfo``
    such as ``Etc/UTC``), which the columns' ``UTCDateTime`` processor then converts to
    UTC: two conversions per value, about 0.6 µs, so a tenth of a 50-task page's cost.
    Where the connection loads timestamps with psycopg's own loader, the server's ISO
    text (DateStyle ISO, which psycopg requires too) is read with
    ``datetime.fromisoformat`` and converted once. Anything else goes to the loader the
    connection has, psycopg's or the application's own (one that reads ``infinity``,
    say), and its value through what ``UTCDateTime`` does with it: so the hot path reads
    what SQLAlchemy's path reads, and fails where it fails.
    """

    __slots__ = ("_context", "_exact", "_fast", "_loader")

    def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
        super().__init__(oid, context)
        self._context = context
        connection = self.connection
        # The loader the connection itself would use (not this cursor's).
        exact = connection.adapters.get_loader(oid, Format.TEXT) if connection else None
        self._exact: type[AbcLoader] = exact or TimestamptzLoader
        self._fast = _is_psycopgs_own(self._exact)
        self._loader: AbcLoader | None = None

    def load(self, data: Buffer) -> datetime | None:
        """Return *data*, the server's text of a ``timestamptz``, as ``UTCDateTime`` reads it."""
        if self._fast:
            try:
                value = datetime.fromisoformat(bytes(data).decode())
            except ValueError:
                pass  # psycopg's own loader reads it, or fails as psycopg fails
            else:
                # fromisoformat gives UTC itself for a +00 offset: no conversion then.
                return value if value.tzinfo is UTC else value.astimezone(UTC)
        if self._loader is None:
            self._loader = self._exact(self.oid, self._context)
        return _as_utc(self._loader.load(data))


@cache
def _is_psycopgs_own(loader: type[AbcLoader]) -> bool:
    """Tell whether *loader* is psycopg's own ``timestamptz`` text loader (C or Python)."""
    return loader.__name__ == "TimestamptzLoader" and loader.__module__.split(".")[0] in {
        "psycopg",
        "psycopg_c",
        "psycopg_binary",
    }


def _as_utc(value: Any) -> datetime | None:
    """Return *value*, as loaded, made what sqlmodel's ``UTCDateTime`` makes of it."""
    # Its own result processing (which does not look at the dialect).
    return _UTC_DATETIME.process_result_value(value, cast(Dialect, None))


_UTC_DATETIME: Final = UTCDateTime()


class HotPathCursor(_LastResultCursor):
    """The cursor of the repository's hot path (:mod:`todo_backend.direct`), async face.

    The engine's cursor, with ``timestamptz`` loaded straight into UTC
    (:class:`_UTCTimestamptzLoader`), so the columns' ``UTCDateTime`` processor has
    nothing left to do and the hot path skips it. Only the hot path's own statements
    run on it: every other cursor of the engine loads as psycopg does.
    """

    # The driver type codes this cursor loads into aware UTC datetimes.
    utc_type_codes: Final = frozenset({_TIMESTAMPTZ})

    def __init__(self, connection: AsyncConnection[Any], **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.adapters.register_loader(_TIMESTAMPTZ, _UTCTimestamptzLoader)
        self._made_from = _adaptation(connection)

    def adapts_as(self, connection: AsyncConnection[Any]) -> bool:
        """Tell whether this cursor still loads and dumps as a new one on *connection* would.

        Made once per connection and reused, it copied the connection's loaders and
        dumpers and took its row factory when it was made; one the application
        registers or sets on the connection since (``connection.adapters
        .register_loader``, ``connection.row_factory``) is not in it.
        """
        return self.connection is connection and _adaptation(connection) == self._made_from


def _adaptation(connection: AsyncConnection[Any]) -> tuple[Any, ...]:
    """Return the row factory and the maps of loaders and dumpers of *connection* now.

    psycopg copies a map before changing it once another map was made from it
    (copy-on-write), so the same objects mean nothing was registered since (private
    API, pinned by test_aio_hot_cursor_pg.py).
    """
    maps: Any = connection.adapters
    return (
        connection.row_factory,
        *maps._loaders,
        *maps._dumpers_by_oid,
        *maps._dumpers.values(),
    )


# ConnectionPoolEntry.info key: the connection's hot-path cursor.
_HOT_CURSOR: Final = "todo_backend.hot_cursor"


def hot_cursor(info: dict[Any, Any], connection: AsyncConnection[Any]) -> HotPathCursor:
    """Return *connection*'s :class:`HotPathCursor`, made once and kept in its pool *info*.

    A new cursor costs about 5 µs (its own copy of the connection's adapters, the UTC
    loader registered on it), a tenth of the hot path's own CPU for a single task;
    reused, it also keeps its loaders from one statement to the next. A new one is
    made for a new connection (the pool clears *info* when it reconnects) and when the
    application has changed the connection's loaders or dumpers since.
    """
    cursor: HotPathCursor | None = info.get(_HOT_CURSOR)
    if cursor is None or not cursor.adapts_as(connection):
        cursor = info[_HOT_CURSOR] = HotPathCursor(connection)
    return cursor


def create_async_db_engine(settings_or_url: Settings | str) -> AsyncEngine:
    """Create the async engine for *settings_or_url*, tuned like :func:`create_db_engine`.

    Takes the same Settings or URL (``postgresql://``, ``postgres://``,
    ``postgresql+psycopg://``, ``postgresql+psycopg2://``, ``sqlite:///FILE``,
    ``sqlite://``) and picks the async driver itself: psycopg 3 or aiosqlite, whichever
    driver the URL names. PostgreSQL: a pool of ``pool_size`` plus ``max_overflow``
    connections kept while busy, those above ``pool_size`` closed once idle for
    ``pool_idle_timeout``, ``connect_timeout``,
    keepalives, recycling below Neon's 300 s idle suspend, ``sslmode=require`` for a
    non-local host whose URL does not choose one, no server-side prepared statements,
    and dead pooled connections replaced at checkout without a round trip. SQLite:
    ``sqlite://`` is one in-memory database shared by every session; file databases
    enforce foreign keys.
    """
    settings = as_settings(settings_or_url)
    url = settings.url
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(
            url.set(drivername=_SQLITE_DRIVER), **sqlite_engine_options(url, settings)
        )
        if not is_in_memory(url):
            event.listen(engine.sync_engine, "connect", sqlite_on_connect)
        return engine
    options = postgres_engine_options(url, settings)
    options["poolclass"] = AsyncIdleQueuePool
    options["connect_args"]["cursor_factory"] = _LastResultCursor
    # Client-side binding never prepares; this keeps it so should a cursor of another
    # kind ever be used.
    options["connect_args"]["prepare_threshold"] = None
    engine = create_async_engine(url.set(drivername=_POSTGRES_DRIVER), **options)
    foreign = statement_listeners(engine.sync_engine)
    foreign_pool = pool_listeners(engine.sync_engine)
    # psycopg 3 switches autocommit and isolation on the client, without a round trip
    # (unlike psycopg2, see db._switch_isolation_without_round_trips): nothing to patch.
    event.listen(engine.sync_engine, "checkout", reject_dead_connection)
    event.listen(engine.sync_engine, "checkout", checkout_mode)
    bound_every_statement(engine.sync_engine, settings)
    allow_direct(engine.sync_engine, foreign, foreign_pool)
    return engine


async def get_async_session(engine: AsyncEngine) -> AsyncGenerator[AsyncSession, None]:
    """Yield an async session on *engine* and close it afterwards.

    Not a FastAPI dependency by itself (FastAPI cannot supply *engine*):
    :func:`todo_backend.fastapi.session_dependency` makes one from an engine.

    Objects stay readable after commit (``expire_on_commit=False``), as with
    :func:`~todo_backend.get_session`: an async session could not lazily re-read them.
    """
    async with AsyncSession(engine, expire_on_commit=False) as session:
        yield session


@asynccontextmanager
async def user_scope(session: _S, user_id: str) -> AsyncIterator[_S]:
    """Run the SQL sent through *session* inside the block as *user_id*: ``async with``.

    The async form of :func:`todo_backend.user_scope`, with the same promises: raw SQL
    and ORM queries on *session* inside the block see and change exactly *user_id*'s
    tasks (row-level security, PostgreSQL), the user rides in the next statement's own
    message, and after the block the session is unscoped again. On SQLite it only
    marks the session.
    """
    user_id, outer = enter_scope(session.sync_session, user_id)
    await _rescope(session, user_id)
    try:
        yield session
    finally:
        leave_scope(session.sync_session, outer)
        await _rescope(session, outer)


async def _rescope(session: SAAsyncSession, user_id: str | None) -> None:
    """Make *session*'s open transaction, if any, run its next statement as *user_id*."""
    if session.in_transaction():
        conn = (await session.connection()).sync_connection
        if conn is not None:
            scope_transaction(conn, user_id)
