"""The repository's hot path: a statement sent straight on a pooled driver connection.

A repository call outside any transaction is one autocommitted statement. Sent through
SQLAlchemy (a ``Connection``, an execution context, a ``CursorResult``), it costs
several times the driver's own CPU per call, about as much as the driver and server
together at zero network latency (``docs/benchmarks/profile-async.md``). Here the same
statement goes out with less work around it:

* it is compiled once per engine and statement shape by SQLAlchemy itself, so the SQL
  is exactly what SQLAlchemy would send (still derived from the models);
* the bounds, the row-security role and the owner ride in front of it in the same
  message, built by the engine's own :class:`~todo_backend.db.StatementPrefixes`
  (one round trip, pooler-safe);
* it runs on a cursor of a connection checked out of the engine's own pool (its size,
  timeout, dead-connection check and idle shedding all apply), handed out in
  autocommit and given back as it is (:func:`todo_backend.db.checkout_mode` switches
  it back for any other user), so the call needs no switch and no rollback;
* parameters and rows pass through the columns' own bind and result processors (on
  the async face, psycopg 3 loads ``timestamptz`` straight into UTC, which is what
  sqlmodel's ``UTCDateTime`` processor would make of it, and that processor is skipped:
  :class:`todo_backend.aio.db.HotPathCursor`);
* a driver error comes out as SQLAlchemy would raise it (a ``DBAPIError``, the
  connection invalidated when the driver's error says it was lost, the pool's older
  connections replaced), so the repository's retry policy and error translation
  (:func:`repository_core.translate`) are unchanged.

It is used only where it is invisible (:func:`direct_statement`): on a PostgreSQL engine
of this package while nothing but the package listens to its statement events, the
engine has no execution options of its own and no SQL is logged, and only for the
package's own statements that can be rendered once. Otherwise, and for anything else
(a transaction, an executemany, SQLite), statements go through SQLAlchemy as before.
The async engine runs the same code inside SQLAlchemy's greenlet bridge, awaiting
psycopg 3 once per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, cast

from sqlalchemy import Engine, Executable
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import await_only, greenlet_spawn
from sqlmodel import UTCDateTime

from todo_backend.db import (
    AUTOCOMMIT_CHECKOUT,
    USER_PARAMETER,
    DirectUse,
    direct_use,
    own_statement,
    ready_without_io,
)
from todo_backend.pool import AsyncIdleQueuePool, IdleQueuePool, reserved

__all__ = ["DirectStatement", "Rows", "direct_statement"]

Rows = tuple[Sequence[Sequence[Any]], int]
"""What a statement returned: its rows (empty for a statement without a result), and
the driver's row count."""

_Processor = Callable[[Any], Any]


class DirectStatement:
    """One of the package's statements, compiled for one engine, sent on its hot path.

    Built once per engine and statement (:func:`direct_statement`); :meth:`run` sends
    it with a call's parameters on a pooled connection, autocommitted.
    """

    __slots__ = (
        "_binds",
        "_cursor",
        "_dialect",
        "_is_async",
        "_owned_sql",
        "_owner",
        "_results",
        "_types",
        "_unscoped_sql",
        "_use",
        "_utc_codes",
        "sql",
    )

    def __init__(
        self,
        engine: Engine,
        use: DirectUse,
        compiled: SQLCompiler,
        own: tuple[str | None, bool, str | None],
    ) -> None:
        # Only the dialect is kept: the cache of statements must not keep the engine
        # (and its pool) alive.
        dialect = self._dialect = engine.dialect
        self._use = use
        prefixes = use.prefixes
        # An async engine's pooled connection wraps psycopg 3's AsyncConnection.
        self._is_async = dialect.is_async
        # The async face's cursor, and the driver type codes it loads into UTC itself.
        self._cursor: Any = None
        utc_codes: frozenset[Any] = frozenset()
        if self._is_async:
            from todo_backend.aio.db import HotPathCursor, hot_cursor  # noqa: PLC0415 - psycopg 3

            self._cursor, utc_codes = hot_cursor, HotPathCursor.utc_type_codes
        self._utc_codes = utc_codes
        self._owner, as_app, plan = own
        self.sql: str = compiled.string
        # What is sent: the bounds, the role, the owner (a parameter) and the statement's
        # planner settings, then the statement.
        self._owned_sql = prefixes.owned_autocommitted(self.sql, as_app, plan)
        self._unscoped_sql = prefixes.autocommitted(self.sql, True, None, as_app, plan)
        binds = []
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                binds.append((name, processor))
        self._binds: tuple[tuple[str, _Processor], ...] = tuple(binds)
        columns = getattr(compiled.statement, "exported_columns", ())
        self._types = tuple(column.type for column in columns)
        # Per result column, its result processor, found from the first result's driver
        # type codes as SQLAlchemy finds it; only the columns that have one.
        self._results: tuple[tuple[int, _Processor], ...] | None = None

    def run(self, engine: Engine, params: Mapping[str, Any]) -> Rows:
        """Send the statement with *params* on *engine* in one message; return its rows and count.

        Errors come out as SQLAlchemy raises them: a driver error as a ``DBAPIError``
        whose ``connection_invalidated`` says the connection was lost (then, as
        SQLAlchemy does, the connection is discarded and every connection the pool
        opened before it is replaced at its next checkout: a server that dropped one
        has usually dropped them all), the pool's errors as they are. A call cut short
        by a BaseException (cancelled, interrupted) discards the connection, whose
        state is unknown.
        """
        sql, params = self._message(params)
        dialect = self._dialect
        error = dialect.loaded_dbapi.Error
        # Checked out in autocommit (db.checkout_mode), returned as it is: no switch and
        # no rollback at check-in, while the connection serves hot-path calls.
        hot = AUTOCOMMIT_CHECKOUT.set(True)
        try:
            fairy = engine.raw_connection()
        except error as err:
            # Opening a connection failed: nothing was sent.
            lost = dialect.is_disconnect(err, None, None)
            raise _wrapped(None, None, err, dialect=dialect, lost=lost) from err
        finally:
            AUTOCOMMIT_CHECKOUT.reset(hot)
        cursor = None
        try:
            if self._is_async:
                # psycopg 3, awaited in one go: one greenlet switch, not one per step.
                rows, count, description = await_only(
                    _send_async(
                        self._cursor(fairy.info, fairy.driver_connection),
                        sql,
                        params,
                        self._results is None,
                    )
                )
            else:
                cursor = fairy.dbapi_connection.cursor()  # type: ignore[union-attr]
                cursor.execute(sql, params)
                description = cursor.description
                rows = cursor.fetchall() if description is not None else ()
                count = cursor.rowcount
                cursor.close()
        except error as err:
            lost = dialect.is_disconnect(err, fairy, cursor)
            if lost:
                # SQLAlchemy's own reaction to a disconnect (Connection's error handling):
                # the pool-wide invalidation is private API, pinned by test_direct_pg.py.
                engine.pool._invalidate(fairy, err)
            raise _wrapped(sql, params, err, dialect=dialect, lost=lost) from err
        except Exception:
            # Not the driver's: a value the client could not load (a timestamp past year
            # 9999 in UTC, say). The result was complete: the connection is fine.
            raise
        except BaseException:
            fairy.invalidate()  # cut short mid-statement: the connection's state is unknown
            raise
        finally:
            fairy.close()
        if rows:
            rows = self._processed(rows, description)
        return rows, count

    async def run_async(self, engine: Engine, params: Mapping[str, Any]) -> Rows:
        """:meth:`run` for an async engine (its ``sync_engine``), awaited without the bridge.

        SQLAlchemy's greenlet bridge, which an async engine's pool and driver adapter
        need for any I/O of their own, costs about 30 µs of CPU per call around the
        statement, and its checkout and check-in about 10 µs more. So where the pool
        can lend a connection that needs nothing done first, at once or when its turn
        in the pool's line comes (:meth:`todo_backend.pool.AsyncIdleQueuePool.borrow`,
        approved by
        :func:`todo_backend.db.ready_without_io`) and only the package listens to its
        events, the statement is awaited on it directly and the connection given back
        as it is, in autocommit (no I/O). Everything that needs I/O goes through the
        bridge, as :meth:`run` does it: a checkout that must connect, recycle, shed or
        wait, and discarding a connection after an error or an interruption. Errors
        come out as from :meth:`run`.
        """
        sql, sent = self._message(params)  # before borrowing: it may raise
        pool = engine.pool
        use = self._use
        if not (isinstance(pool, AsyncIdleQueuePool) and use.pool_unwatched(engine)):
            return cast(Rows, await greenlet_spawn(self.run, engine, params))
        record, lent = await pool.borrow(ready_without_io)
        if record is None:
            return cast(Rows, await greenlet_spawn(self.run, engine, params))
        # Handed over in turn after a wait: a pool listener may have come meanwhile
        # (it must see this checkout), or the connection may need I/O first.
        if not lent and not (
            use.pool_unwatched(engine) and pool.take_handed(record, ready_without_io)
        ):
            return cast(
                Rows, await greenlet_spawn(self._run_reserved, engine, params, pool, record)
            )
        dialect = self._dialect
        try:
            rows, count, description = await _send_async(
                self._cursor(record.info, record.driver_connection),
                sql,
                sent,
                self._results is None,
            )
        except dialect.loaded_dbapi.Error as err:
            lost = dialect.is_disconnect(err, record.dbapi_connection, None)
            await greenlet_spawn(_give_back_lent, pool, record, err if lost else None)
            raise _wrapped(sql, sent, err, dialect=dialect, lost=lost) from err
        except Exception:
            # A value the client could not load, as in run(): the connection is fine.
            await greenlet_spawn(pool.give_back, record)
            raise
        except BaseException:
            # Cut short mid-statement: the connection's state is unknown. Closing it
            # runs to completion: nothing in it waits, so no second cancellation lands.
            await greenlet_spawn(_discard_lent, pool, record)
            raise
        if use.pool_unwatched(engine):
            pool.give_back(record)  # in autocommit: nothing to roll back, no I/O
        else:
            # A checkin or reset listener came while the statement ran: it may do I/O.
            await greenlet_spawn(pool.give_back, record)
        if rows:
            rows = self._processed(rows, description)
        return rows, count

    def _run_reserved(
        self, engine: Engine, params: Mapping[str, Any], pool: Any, record: Any
    ) -> Rows:
        """:meth:`run`, its checkout taking *record* (its turn in *pool*'s line kept)."""
        with reserved(pool, record):
            return self.run(engine, params)

    def _message(self, params: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
        """Return the text to send and its parameters, processed by their types."""
        sent = dict(params)  # one copy: the caller's mapping is never changed
        for name, processor in self._binds:
            sent[name] = processor(sent[name])
        owner = sent.get(self._owner) if self._owner is not None else None
        if not isinstance(owner, str):
            return self._unscoped_sql, sent
        sent[USER_PARAMETER] = owner
        return self._owned_sql, sent

    def _processed(
        self, rows: Sequence[Sequence[Any]], description: Any
    ) -> Sequence[Sequence[Any]]:
        results = self._results
        if results is None:
            dialect = self._dialect
            found = (
                # A UTCDateTime column the cursor loads into UTC needs no processor.
                None
                if column[1] in self._utc_codes and type(type_) is UTCDateTime
                else type_.dialect_impl(dialect).result_processor(dialect, column[1])
                for type_, column in zip(self._types, description, strict=True)
            )
            results = self._results = tuple(
                (position, processor)
                for position, processor in enumerate(found)
                if processor is not None
            )
        if not results:
            return rows
        processed = []
        for row in rows:
            values = list(row)
            for position, processor in results:
                values[position] = processor(values[position])
            processed.append(values)
        return processed


def _give_back_lent(pool: IdleQueuePool, record: Any, lost: BaseException | None) -> None:
    """Give a lent connection back after a driver error; first discard it if *lost*.

    As SQLAlchemy's execution reacts to a disconnect: with it, every connection the
    pool opened before it is replaced at its next checkout.
    """
    try:
        if lost is not None:
            pool.invalidate_older(record, lost)
    finally:
        pool.give_back(record)


def _discard_lent(pool: IdleQueuePool, record: Any) -> None:
    """Discard a lent connection (its state unknown) and give the empty slot back."""
    try:
        record.invalidate()
    finally:
        pool.give_back(record)


async def _send_async(cursor: Any, sql: str, params: Any, describe: bool) -> tuple[Any, int, Any]:
    """Run *sql* on *cursor* (psycopg 3, async, autocommitted), as the sync path does.

    The result's description is read only when *describe* asks for it: psycopg builds
    it anew on each read, and the rows need it only once, for their processors.
    """
    # A new query object for each call: psycopg keeps a cursor's adaptation (its
    # Transformer: the connection's encoding, a loader made for each type) for the
    # very same query object, and the connection may have changed since (a caller's
    # SET client_encoding). The text is ASCII (_prepare): the same in every encoding.
    await cursor.execute(sql.encode(), params)
    returned = cursor.pgresult is not None and cursor.pgresult.status == _TUPLES_OK
    rows = await cursor.fetchall() if returned else ()
    description = cursor.description if returned and describe else None
    count = cursor.rowcount
    # Not closed: the connection's hot cursor serves its next call (aio.db.hot_cursor).
    return rows, count, description


# psycopg 3's ExecStatus.TUPLES_OK: the statement returned rows.
_TUPLES_OK: Final = 2


def _wrapped(
    sql: str | None, params: Any, err: Exception, *, dialect: Any, lost: bool
) -> DBAPIError:
    """Wrap the driver's *err* as SQLAlchemy's execution does (the parameters hidden)."""
    # A driver error (every caller catches only those) comes back as a DBAPIError.
    wrapped = DBAPIError.instance(
        sql,
        params,
        err,
        dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=lost,
        dialect=dialect,
    )
    return cast(DBAPIError, wrapped)


def direct_statement(engine: Engine, stmt: Executable) -> DirectStatement | None:
    """Return *stmt* ready for *engine*'s hot path, or None where it must go through SQLAlchemy.

    None when the hot path would not be invisible (not a PostgreSQL engine of this
    package, a caller's listener on its statement events, SQL logging on:
    :func:`todo_backend.db.direct_use`), or when *stmt* is not one of the package's
    own statements or cannot be rendered once for every call (an expanding or
    literal-rendered parameter).
    """
    use = direct_use(engine)
    if use is None:
        return None
    statements = use.statements
    try:
        found: DirectStatement | None = statements[stmt]
    except KeyError:
        found = statements[stmt] = _prepare(engine, use, stmt)
    return found


def _prepare(engine: Engine, use: DirectUse, stmt: Executable) -> DirectStatement | None:
    own = own_statement(stmt.get_execution_options())
    dialect = engine.dialect
    # A statement's result columns (and so their types) must be known: a text() has none.
    if own is None or dialect.paramstyle != "pyformat" or not hasattr(stmt, "exported_columns"):
        return None
    compiled = stmt.compile(dialect=dialect)  # type: ignore[attr-defined]
    if not isinstance(compiled, SQLCompiler):
        return None
    pre_rendered = not (
        not compiled.string.isascii()  # sent as bytes (_send_async)
        or compiled.literal_execute_params
        or compiled.post_compile_params
        or compiled.escaped_bind_names
        or any(b.value is not None or b.callable is not None for b in compiled.binds.values())
        or USER_PARAMETER in compiled.binds
    )
    return DirectStatement(engine, use, compiled, own) if pre_rendered else None
