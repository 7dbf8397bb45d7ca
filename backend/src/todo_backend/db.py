"""Engines and sessions for Neon PostgreSQL and SQLite, plus health checks.

One engine factory (:func:`create_db_engine`), one session helper
(:func:`get_session`), one schema initialiser (:func:`init_db`). PostgreSQL engines
are built for Neon: TLS for remote hosts, a bounded pool recycled before Neon's idle
timeout, TCP keepalives, nothing that PgBouncer's transaction pooling breaks, a
zero-round-trip liveness check that replaces dead pooled connections before use, and
server-side bounds set once per transaction, in its first statement's own query
message (:func:`bound_every_statement`; :func:`timeout_error` names the one a failed
call ran into).
"""

from __future__ import annotations

import logging
import os
import random
import re
import select
import socket
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from ipaddress import ip_address
from operator import attrgetter
from typing import Any, Final, TypeVar
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Engine, create_engine, event, orm, text
from sqlalchemy.engine import URL, ExceptionContext, ExecutionContext
from sqlalchemy.engine.interfaces import ExecuteStyle
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlmodel import Session, SQLModel

from todo_backend.config import Settings, mask_url
from todo_backend.errors import (
    ConfigurationError,
    DatabaseTimeoutError,
    DatabaseUnavailableError,
)
from todo_backend.models import Task, validate_user_id
from todo_backend.pool import IdleQueuePool

__all__ = [
    "APP_ROLE",
    "AUTOCOMMIT_CHECKOUT",
    "BOUNDED",
    "CONNECTING_ROLE",
    "IN_INDEX_ORDER",
    "UNBOUNDED",
    "USER_PARAMETER",
    "USER_SETTING",
    "DatabaseHealth",
    "DirectUse",
    "StatementPrefixes",
    "allow_direct",
    "as_settings",
    "bound_every_statement",
    "bounds_settings",
    "cannot_connect",
    "check_database",
    "checkout_mode",
    "create_db_engine",
    "direct_use",
    "enter_scope",
    "error_reason",
    "get_session",
    "init_db",
    "is_in_memory",
    "is_local_host",
    "leave_scope",
    "own_statement",
    "owned_by",
    "pool_listeners",
    "postgres_engine_options",
    "ready_without_io",
    "reject_dead_connection",
    "role_error",
    "scope_transaction",
    "set_local_sql",
    "sqlite_engine_options",
    "sqlite_on_connect",
    "statement_listeners",
    "timeout_error",
    "url_host",
    "user_call",
    "user_scope",
    "wait_for_database",
]

logger = logging.getLogger(__name__)

_LOOPBACK_ADDRESSES: Final = frozenset({ip_address("127.0.0.1"), ip_address("::1")})
# The longest single wait of wait_for_database: a Neon cold start takes a few seconds.
MAX_BACKOFF_SECONDS: Final = 10.0
# Neon suspends an idle compute after 300 s and closes its connections; recycle first.
POOL_RECYCLE_SECONDS: Final = 280
_KEEPALIVES: Final = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def url_host(url: URL) -> str:
    """Return the server host of *url*: its host part, else libpq's ``?host=``, else ""."""
    return url.host or ",".join(_query_values(url, "host"))


def _query_values(url: URL, key: str) -> list[str]:
    """Return the values of *key* in *url*'s query (a repeated key gives several)."""
    value = url.query.get(key, ())
    return [value] if isinstance(value, str) else list(value)


def _split(values: list[str]) -> list[str]:
    """libpq's comma-separated lists of hosts or addresses, one entry each."""
    return [entry.strip() for value in values for entry in value.split(",")]


def _is_loopback(host: str) -> bool:
    """Tell whether *host* is the default socket (empty), a Unix socket, or loopback."""
    if not host or host.startswith(("/", "@")):  # libpq: a path or @name is a socket
        return True
    name = host.removeprefix("[").removesuffix("]").lower()
    if name == "localhost":
        return True
    try:
        return ip_address(name) in _LOOPBACK_ADDRESSES
    except ValueError:
        return False


def is_local_host(url: URL) -> bool:
    """Tell whether *url* connects only to this machine (loopback or a Unix socket).

    Every host counts, libpq's multi-host lists (``h1,h2``, ``?host=/tmp,remote``)
    and every ``hostaddr`` (libpq connects to that address, whatever the host says);
    without them in the URL, libpq's ``PGHOST`` and ``PGHOSTADDR`` do. Loopback means
    ``localhost``, ``127.0.0.1`` and ``::1``: other 127/8 addresses count as remote,
    so a test server there (the Neon stand-in on 127.0.0.2) is held to TLS as a remote
    one would be.
    """
    hosts = _split([url.host] if url.host else []) + _split(_query_values(url, "host"))
    if not url.host and "host" not in url.query:
        hosts = _split([os.environ.get("PGHOST", "")])
    addresses = _split(_query_values(url, "hostaddr")) or _split([os.environ.get("PGHOSTADDR", "")])
    return all(_is_loopback(host) for host in hosts) and all(
        _is_loopback(address) for address in addresses if address
    )


def create_db_engine(settings_or_url: Settings | str) -> Engine:
    """Create the engine for *settings_or_url*, tuned for its database.

    PostgreSQL (psycopg2): a pool of ``pool_size`` plus ``max_overflow`` connections
    that keeps them while busy and closes those above ``pool_size`` once idle for
    ``pool_idle_timeout`` (:class:`~todo_backend.pool.IdleQueuePool`),
    ``connect_timeout``, keepalives, recycling below Neon's 300 s idle suspend, and
    ``sslmode=require`` for any non-local host whose URL does not choose an sslmode.
    Dead pooled connections (Neon suspend, restart, terminated backends) are detected
    at checkout without a round trip and replaced transparently. The URL may name any
    PostgreSQL driver (``postgresql://``, ``postgres://``, ``postgresql+psycopg2://``,
    ``postgresql+psycopg://``): this engine runs psycopg2.

    SQLite: ``sqlite://`` is one in-memory database shared by every session and
    thread (a static pool); file databases enforce foreign keys.
    """
    settings = as_settings(settings_or_url)
    url = settings.url
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url, settings)
    return _create_postgres_engine(url, settings)


def as_settings(settings_or_url: Settings | str) -> Settings:
    """Return *settings_or_url* as :class:`Settings` (a URL gets the default options)."""
    if isinstance(settings_or_url, Settings):
        return settings_or_url
    return Settings(database_url=settings_or_url)


def _create_postgres_engine(url: URL, settings: Settings) -> Engine:
    engine = create_engine(url, **postgres_engine_options(url, settings))
    foreign = statement_listeners(engine)
    event.listen(engine, "checkout", reject_dead_connection)
    event.listen(engine, "checkout", checkout_mode)
    _switch_isolation_without_round_trips(engine)
    bound_every_statement(engine, settings)
    allow_direct(engine, foreign)
    return engine


def postgres_engine_options(url: URL, settings: Settings) -> dict[str, Any]:
    """Return the ``create_engine`` keywords of a Neon-ready PostgreSQL engine.

    Shared by the sync and the async engine: the pool (an :class:`IdleQueuePool`,
    which the async engine swaps for its asyncio twin), its bounds, idle timeout and
    recycling, and the libpq connection options (timeout, keepalives, TLS for
    non-local hosts), which psycopg2 and psycopg 3 take alike.
    """
    connect_args: dict[str, Any] = {
        "connect_timeout": settings.connect_timeout,
        "application_name": "todo-backend",
        **_KEEPALIVES,
    }
    if "sslmode" not in url.query and not is_local_host(url):
        # Neon refuses plain-text connections; libpq's default "prefer" would
        # silently fall back to plain text against any other server.
        connect_args["sslmode"] = "require"
    return {
        # Keeps up to pool_size + max_overflow connections while busy and closes those
        # above pool_size once idle (QueuePool would close each overflow connection
        # as soon as it is returned: a new connection per call under steady load).
        "poolclass": IdleQueuePool,
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "idle_timeout": settings.pool_idle_timeout,
        "pool_recycle": POOL_RECYCLE_SECONDS,
        # No pre-ping: it costs a round trip per checkout. reject_dead_connection
        # catches server-closed sockets for free instead.
        "pool_pre_ping": False,
        # An autocommit connection has nothing to roll back when returned to the pool.
        "skip_autocommit_rollback": True,
        # Bound parameters are user data; keep them out of error messages and logs.
        "hide_parameters": True,
        "echo": settings.echo,
        "connect_args": connect_args,
    }


# Execution option that sends statements without the bounds (see bound_every_statement),
# and as the connecting role: migrations use it.
UNBOUNDED: Final = {"todo_backend_unbounded": True}
_UNBOUNDED_KEY: Final = "todo_backend_unbounded"
# Execution option of the package's own statements (the repository's): bounded even
# when they autocommit, and the only statements after which the idle bound is inferred.
BOUNDED: Final = {"todo_backend_bounded": True}
_BOUNDED_KEY: Final = "todo_backend_bounded"
# Execution option naming the parameter that holds a package statement's owner: the
# statement runs with the row-level security user set to it (see owned_by).
_OWNER_KEY: Final = "todo_backend_owner"
# Execution option of admin paths (todo-db check): bounded, but run as the connecting
# role instead of APP_ROLE, explicitly.
CONNECTING_ROLE: Final = {"todo_backend_connecting_role": True}
_CONNECTING_ROLE_KEY: Final = "todo_backend_connecting_role"
# Execution option of a package statement that must run with planner settings of its
# own: the SQL of the set_config calls, sent with the statement's bounds where the
# statement runs alone in its transaction (autocommitted), and ignored inside a
# transaction, where a setting would outlive the statement.
_PLAN_KEY: Final = "todo_backend_plan"
IN_INDEX_ORDER: Final = {_PLAN_KEY: "set_config('enable_sort', 'off', true)"}
"""Execution option of a statement whose rows must come from an index in order (a page).

PostgreSQL multiplies the selectivities of the page's owner condition and of the
row-level security policy's (two restrictions on ``user_id``), so it may expect a
dozen rows where an owner has thousands, and read and sort all of them instead of the
page's from the ``(user_id, id)`` index. With sorting off for the statement alone,
the ordered index scan is the plan: measured on 100 users x 1000 tasks, 0.03 ms a
page instead of 0.5 ms (``tests/integration/test_plans_pg.py``).
"""
# The role every transaction of the package's engines runs as where the database has
# row-level security on tasks (revision 0003), and the transaction-local setting its
# policy reads the user from.
APP_ROLE: Final = "todo_app"
USER_SETTING: Final = "todo.user_id"
# Switch to APP_ROLE only where it holds privileges on this database's tasks (granted
# by revision 0003 with the policy, revoked by its downgrade): a database made by
# init_db, or not yet migrated, runs as the connecting role, as before. Two name
# lookups and an ACL check, evaluated once, in the statement that sets the bounds:
# about 7 us of server time, against about 45 us for a query on pg_class.
_ROLE_CALL: Final = (
    "set_config('role', CASE WHEN pg_catalog.has_table_privilege("
    f"pg_catalog.to_regrole('{APP_ROLE}'), pg_catalog.to_regclass('tasks'), 'SELECT') "
    f"THEN '{APP_ROLE}' ELSE 'none' END, true)"
)
_NO_USER_CALL: Final = f"set_config('{USER_SETTING}', '', true)"
# The parameter that carries the owner in owned_autocommitted's statements.
USER_PARAMETER: Final = "todo_backend_user"
# Caller's statements that refuse a transaction block: sent as they are (as the
# connecting role) on an autocommit connection; they read and write no rows.
_REFUSES_BLOCK: Final = re.compile(
    r"\s*(VACUUM|CREATE\s+(UNIQUE\s+)?INDEX\s+CONCURRENTLY|DROP\s+INDEX\s+CONCURRENTLY"
    r"|REINDEX|CLUSTER|CREATE\s+DATABASE|DROP\s+DATABASE|ALTER\s+SYSTEM|CREATE\s+TABLESPACE"
    r"|DROP\s+TABLESPACE|ALTER\s+DATABASE|CREATE\s+SUBSCRIPTION|ALTER\s+SUBSCRIPTION"
    r"|DROP\s+SUBSCRIPTION|DISCARD|CHECKPOINT)\b",
    re.IGNORECASE,
)
# The user a transaction's setting holds is not known (after ROLLBACK TO SAVEPOINT).
_UNKNOWN: Final = object()


def owned_by(parameter: str) -> dict[str, Any]:
    """Return the execution options of a package statement whose owner is *parameter*.

    :data:`BOUNDED`, plus the name of the bound parameter that holds the user id: the
    engine sets the row-level security user (:data:`USER_SETTING`) to its value in the
    same message, so the policy lets the statement see exactly that user's rows.
    """
    return {**BOUNDED, _OWNER_KEY: parameter}


def user_call(user_id: str | None) -> str:
    """Return the ``set_config`` call that sets the row-level security user (None: unset).

    The user id travels hex-encoded (``convert_from(decode('...', 'hex'), 'UTF8')``):
    no quote, backslash or ``%`` of a user id can reach the SQL text or the driver's
    parameter formatting, whatever the statement it rides with.
    """
    if not user_id:
        return _NO_USER_CALL
    encoded = user_id.encode().hex()
    return f"set_config('{USER_SETTING}', convert_from(decode('{encoded}', 'hex'), 'UTF8'), true)"


# Connection.info key of the connection's _Transaction.
_TRANSACTION: Final = "todo_backend.transaction"
# Set on a disconnect error that the idle-in-transaction bound explains.
_IDLE_EXPIRED: Final = "_todo_backend_idle_expired"
# Statements that control the transaction itself: never carry the bounds, never use up
# the first statement of a transaction. Group 1 the verb, group 2 the rest. Matched
# after leading comments and whitespace (:func:`_strip_leading_comments`).
_CONTROL: Final = re.compile(
    r"(SAVEPOINT|RELEASE|ROLLBACK|COMMIT|END|ABORT|BEGIN|START)\b\s*(.*?)[\s;]*\Z",
    re.IGNORECASE | re.DOTALL,
)
# Statements PostgreSQL accepts only before the first query of a transaction
# ("SET TRANSACTION ISOLATION LEVEL must be called before any query"): SET TRANSACTION
# (isolation, READ ONLY, DEFERRABLE, SNAPSHOT) and its GUC spellings. They go out
# alone and leave the bounds to the next statement.
_BEFORE_ANY_QUERY: Final = re.compile(
    r"SET\s+(?:LOCAL\s+|SESSION\s+)?"
    r"(?:TRANSACTION\b|transaction_(?:isolation|read_only|deferrable)\b)",
    re.IGNORECASE,
)
_ROLLBACK_TO: Final = re.compile(
    r"(?:(?:WORK|TRANSACTION)\s+)?TO\s+(.*)", re.IGNORECASE | re.DOTALL
)
_SAVEPOINT_WORD: Final = re.compile(r"\ASAVEPOINT\s+", re.IGNORECASE)
_LINE_COMMENT: Final = re.compile(r"\s*--[^\n]*(?:\n|\Z)")


def _strip_leading_comments(statement: str) -> str:
    """Return *statement* without its leading whitespace, ``--`` and ``/* */`` comments.

    PostgreSQL's block comments nest; an unterminated one leaves the text as it is
    (the server refuses it anyway).
    """
    rest = statement
    while True:
        rest = rest.lstrip()
        line = _LINE_COMMENT.match(rest)
        if line is not None:
            rest = rest[line.end() :]
            continue
        if not rest.startswith("/*"):
            return rest
        depth, i = 1, 2
        while depth and i < len(rest):
            pair = rest[i : i + 2]
            if pair == "/*":
                depth, i = depth + 1, i + 2
            elif pair == "*/":
                depth, i = depth - 1, i + 2
            else:
                i += 1
        if depth:
            return rest
        rest = rest[i:]


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def bounds_settings(settings: Settings) -> list[tuple[str, str]]:
    """Return the server settings that carry *settings*' statement, lock and idle bounds."""
    return [
        ("statement_timeout", str(_milliseconds(settings.statement_timeout))),
        ("lock_timeout", str(_milliseconds(settings.lock_timeout))),
        (
            "idle_in_transaction_session_timeout",
            str(_milliseconds(settings.idle_in_transaction_timeout)),
        ),
    ]


def set_local_sql(pairs: Sequence[tuple[str, str]]) -> str:
    """Return ONE statement that sets each ``(name, value)`` for the current transaction only.

    ``SELECT set_config('name', 'value', true), ...``: the server parses one statement
    however many settings it carries (three ``SET LOCAL`` statements cost three), and
    each setting ends with its transaction, like ``SET LOCAL``, so nothing outlives it
    on a server connection PgBouncer hands to someone else. Add a pair to carry another
    per-transaction setting. Names and values become SQL string literals; ``%`` is
    refused, because the driver's parameter formatting would rewrite it.
    """
    if not pairs:
        raise ValueError("set_local_sql needs at least one (name, value) pair")
    calls = []
    for name, value in pairs:
        if "%" in name or "%" in value or "\0" in name or "\0" in value:
            raise ValueError(f"setting {name!r}: '%' and NUL cannot be sent in a bound's text")
        calls.append(f"set_config({_literal(name)}, {_literal(value)}, true)")
    return "SELECT " + ", ".join(calls)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _Transaction:
    """What the bounds' hooks know of the transaction open on one connection.

    ``bounded_at`` is the savepoint depth at which the bounds were set (None: not yet,
    or undone by ``ROLLBACK TO SAVEPOINT``); ``trusted`` says whether everything sent in
    it went through the hooks as the package's own statements with the bounds in force,
    the only case in which a lost connection may be explained by the idle bound.
    """

    __slots__ = ("bounded_at", "idle_since", "savepoints", "sent_at", "trusted", "user", "want")

    def __init__(self) -> None:
        self.bounded_at: int | None = None
        # The row-level security user the transaction's setting holds (None: unset),
        # and the one its next statement of the caller's must run as (user_scope).
        self.user: object = _UNKNOWN
        self.want: str | None = None
        self.savepoints: list[str] = []
        self.trusted = True
        # When the last statement's answer arrived; when the next message was sent.
        self.idle_since: float | None = None
        self.sent_at: float | None = None

    def follow(self, statement: str) -> bool:
        """Tell whether *statement* controls the transaction; if so, follow what it does.

        Savepoints are tracked by name (``SAVEPOINT``, ``RELEASE``, ``ROLLBACK TO``);
        a ``COMMIT`` or ``ROLLBACK`` sent as a statement ends the transaction;
        ``SET TRANSACTION`` (which must precede any query) changes nothing here. Leading
        comments are skipped.
        """
        text = _strip_leading_comments(statement)
        if _BEFORE_ANY_QUERY.match(text) is not None:
            return True
        control = _CONTROL.match(text)
        if control is None:
            return False
        self._control(control[1].upper(), control[2])
        return True

    def _control(self, verb: str, rest: str) -> None:
        if verb == "SAVEPOINT":
            self.savepoints.append(rest)
            return
        if verb == "RELEASE":
            depth = self._depth_of(_SAVEPOINT_WORD.sub("", rest, count=1))
            if depth is None:
                self.trusted = False
                return
            del self.savepoints[depth:]
            # The settings of a released savepoint belong to its parent now.
            if self.bounded_at is not None and self.bounded_at > depth:
                self.bounded_at = depth
            return
        target = _ROLLBACK_TO.fullmatch(rest) if verb == "ROLLBACK" else None
        if target is not None:
            depth = self._depth_of(_SAVEPOINT_WORD.sub("", target[1], count=1))
            if depth is not None:
                del self.savepoints[depth + 1 :]
            # Rolling back to a savepoint undoes the settings made after it: the next
            # statement sets the bounds again, and they were not in force throughout.
            self.user = _UNKNOWN
            if depth is None or (self.bounded_at is not None and self.bounded_at > depth):
                self.bounded_at = None
                self.trusted = False
            return
        if verb in ("COMMIT", "END", "ABORT", "ROLLBACK"):
            # Ended behind SQLAlchemy's back: the driver begins anew with the next statement.
            self.bounded_at = self.idle_since = None
            self.savepoints.clear()
            self.trusted = False

    def _depth_of(self, name: str) -> int | None:
        for depth in range(len(self.savepoints) - 1, -1, -1):
            if self.savepoints[depth] == name:
                return depth
        return None


def bound_every_statement(engine: Engine, settings: Settings) -> None:
    """Apply the statement, lock and idle-in-transaction bounds, once per transaction.

    The bounds are one ``SELECT set_config('statement_timeout', ..., true),
    set_config('lock_timeout', ...), set_config('idle_in_transaction_session_timeout',
    ...);`` (:func:`set_local_sql`) that rides in front of a statement in the SAME
    simple-protocol query message: no extra round trip, and no session state, so they
    hold through PgBouncer's transaction pooling. Session-level ways to set them (the
    libpq ``options`` startup parameter, ``ALTER ROLE ... SET``) do not survive that
    pooling or are not per engine: see research.md. The bounds go in front of:

    * the first statement of each transaction (``engine.begin()``, a session, an
      ``atomic()`` block). They last to its end, so every later statement is bounded
      too, and a caller's own ``SET LOCAL`` later in the transaction stands;
    * each autocommitted statement the package itself sends (the repository's single
      calls, marked with the :data:`BOUNDED` execution option): the server runs such a
      message as one implicit transaction, which the bounds cover exactly.

    Nothing is put in front of ``SAVEPOINT``, ``RELEASE``, ``ROLLBACK [TO SAVEPOINT]``,
    ``COMMIT``, ``SET TRANSACTION ...`` (and ``SET [LOCAL] transaction_isolation`` and
    the like, which PostgreSQL takes only before a transaction's first query: the next
    statement carries the bounds), a caller's own autocommitted statements (``VACUUM``
    and ``CREATE INDEX CONCURRENTLY`` refuse the implicit transaction a prefix would
    make), an executemany, a server-side (``stream_results``) cursor's ``DECLARE``, or
    statements run with :data:`UNBOUNDED`. These are recognised after leading ``--``
    and ``/* */`` comments. When an executemany or a server-side cursor is the first
    statement of a transaction, the bounds go out alone just before it: one extra round
    trip, once in that transaction (the repository never does either). After ``ROLLBACK
    TO SAVEPOINT`` has undone the bounds (they were set inside that savepoint), the next
    statement carries them again. Two-phase transactions (``begin_twophase``) are
    bounded like any other; the hooks' record of a transaction ends with it.

    The server closes a connection idle in a transaction past its bound; the client
    only sees a dropped connection. Before each statement inside a transaction and
    before its COMMIT, a zero-timeout poll of the socket (no round trip) tells whether
    the server had already closed it: only then was nothing of the transaction stored,
    and the error is put down to the idle bound (:func:`timeout_error`) when the
    server's message says so (plain text) or, over TLS, when the measured idle gap
    exceeded the bound the server enforces and the hooks saw the whole transaction
    (:func:`_note_closed`). Without that evidence, a lost COMMIT above all, the outcome
    is unknown (``DatabaseUnavailableError``), however long the transaction looked
    idle: work on the driver's own cursor (a ``COPY``) is invisible to the hooks.

    The driver must send the string as one simple-protocol message and hand back the
    last statement's result: psycopg2 does; the async engine gives psycopg 3 a
    client-binding cursor that does (``todo_backend.aio.db``). *engine* is a sync
    engine, or an async engine's ``sync_engine``.
    """
    bounds = set_local_sql(bounds_settings(settings))
    prefixes = StatementPrefixes(bounds)

    def before(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None,
        _executemany: bool,
    ) -> tuple[str, Any]:
        options = context.execution_options if context else conn.get_execution_options()
        unbounded = options.get(_UNBOUNDED_KEY, False)
        own, owner, as_app = _marks(options, parameters)
        # A server-side cursor wraps the statement in DECLARE, which takes one query only;
        # an executemany sends its statement once per row (psycopg2) or prepared (psycopg 3).
        alone = getattr(cursor, "name", None) is not None or (
            context is not None and context.execute_style is ExecuteStyle.EXECUTEMANY
        )
        if _autocommit(conn):
            if not (unbounded or alone):
                plan = options.get(_PLAN_KEY) if own else None
                if plan is not None and not _server_idle(conn.connection.dbapi_connection):
                    plan = None  # the caller began a transaction itself: it would outlive us
                statement = prefixes.autocommitted(statement, own, owner, as_app, plan)
            return statement, parameters
        info = conn.info
        tx: _Transaction | None = info.get(_TRANSACTION)
        if tx is None:
            tx = info[_TRANSACTION] = _Transaction()
        tx.sent_at = time.monotonic()
        if tx.idle_since is not None:
            _note_closed(conn, tx, settings)
        if tx.follow(statement):
            return statement, parameters
        if not own or alone:
            tx.trusted = False
        setting = None if unbounded else prefixes.in_transaction(tx, owner or tx.want, as_app)
        if setting is not None and alone:
            _send_alone(conn, setting)
            setting = None
        return (statement if setting is None else setting + "; " + statement), parameters

    def after(conn: Connection, *_args: Any) -> None:
        conn.info.pop(_CLOSED, None)  # answered: whatever the poll saw, the server was there
        if not _autocommit(conn):
            tx = conn.info.get(_TRANSACTION)
            if tx is not None:
                tx.idle_since = time.monotonic()

    def begin(conn: Connection, *_xid: Any) -> None:
        # The next statement sent in a transaction starts a fresh record (autocommit
        # statements, the repository's common case, never need one).
        conn.info.pop(_TRANSACTION, None)
        conn.info.pop(_CLOSED, None)

    def commit(conn: Connection, *_xid: Any) -> None:
        # The record ends with its transaction; only the evidence about the COMMIT
        # about to be sent stays, for handle_error, until the next transaction.
        tx = conn.info.pop(_TRANSACTION, None)
        if tx is not None and tx.idle_since is not None:
            tx.sent_at = time.monotonic()
            _note_closed(conn, tx, settings)

    def rollback(conn: Connection, *_xid: Any) -> None:
        # Also called after the connection was lost or closed: it has no info then.
        if conn.invalidated or conn.closed:
            return
        conn.info.pop(_TRANSACTION, None)

    event.listen(engine, "before_cursor_execute", before, retval=True)
    for name, hook in (
        ("after_cursor_execute", after),
        ("begin", begin),
        ("begin_twophase", begin),
        ("commit", commit),
        ("commit_twophase", commit),
        ("rollback", rollback),
        ("rollback_twophase", rollback),
        ("handle_error", _explain_closed),
    ):
        event.listen(engine, name, hook)
    _ENGINE_PREFIXES[engine] = prefixes


# The events that observe or alter the statements SQLAlchemy runs on a connection
# (ConnectionEvents on the engine, DialectEvents on its dialect). The repository's hot
# path (todo_backend.direct) sends its statements beside them, so it is used only
# while an engine has no listener on them but the package's own.
_STATEMENT_EVENTS: Final = (
    "engine_connect",
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
    "begin",
    "commit",
    "rollback",
    "set_connection_execution_options",
)
_DIALECT_EVENTS: Final = ("handle_error", "do_execute", "do_setinputsizes")
# The prefixes of each engine bound_every_statement ran on, and of those the hot path
# may use, with the listener counts that are the package's own.
_ENGINE_PREFIXES: WeakKeyDictionary[Engine, StatementPrefixes] = WeakKeyDictionary()


_STATEMENT_LISTENERS: Final = attrgetter(*_STATEMENT_EVENTS)
_DIALECT_LISTENERS: Final = attrgetter(*_DIALECT_EVENTS)


def _statement_collections(engine: Engine) -> tuple[Any, ...]:
    """Return SQLAlchemy's listener collection of each statement event of *engine*."""
    events: tuple[Any, ...] = _STATEMENT_LISTENERS(engine.dispatch)
    return events + _DIALECT_LISTENERS(engine.dialect.dispatch)


def statement_listeners(engine: Engine) -> tuple[int, ...]:
    """Return how many listeners *engine*'s statement events have, event by event.

    The events that observe or alter the statements SQLAlchemy runs (on the engine,
    the ``Engine`` class or the engine's dialect); see :func:`allow_direct`.
    """
    return tuple(map(len, _statement_collections(engine)))


# The pool events that run at checkout and check-in: the async hot path runs them
# outside SQLAlchemy's greenlet bridge, where a caller's listener could not do I/O.
_POOL_EVENTS: Final = ("checkout", "checkin", "reset")
_POOL_LISTENERS: Final = attrgetter(*_POOL_EVENTS)


def _pool_collections(engine: Engine) -> tuple[Any, ...]:
    """Return SQLAlchemy's listener collection of each of *engine*'s pool events above."""
    collections: tuple[Any, ...] = _POOL_LISTENERS(engine.pool.dispatch)
    return collections


def pool_listeners(engine: Engine) -> tuple[int, ...]:
    """Return how many listeners the checkout, checkin and reset events of *engine*'s pool have."""
    return tuple(map(len, _pool_collections(engine)))


class _Listeners:
    """An engine's listeners on some events as the package left them, compared per call.

    The exact test is SQLAlchemy's count of each event's listeners (``len()`` of its
    collection: a Python call per event, about 2 µs a call for all of them). Each call
    compares instead the collections themselves (still the same objects) and the
    lengths of the lists inside them, at C speed; only when either differs (a listener
    added or removed, a disposed engine's new pool) are the counts taken again, and
    the same counts as the package left mean the same listeners in new collections.
    The lists are what the collections' own ``len()`` sums (private API, pinned by the
    tests that add listeners on the engine, its class, its dialect and its pool).
    """

    __slots__ = ("_collections", "_counts", "_seen")

    def __init__(self, collections: Callable[[Engine], tuple[Any, ...]], engine: Engine) -> None:
        self._collections = collections
        found = collections(engine)
        self._counts = tuple(map(len, found))
        # One tuple, replaced whole: threads never see half of an update.
        self._seen = _inside(found)

    def unchanged(self, engine: Engine) -> bool:
        """Tell whether *engine*'s listeners on these events are still the package's own."""
        found = self._collections(engine)
        seen, lists, sizes = self._seen
        if lists is not None and found == seen and tuple(map(len, lists)) == sizes:
            return True
        if tuple(map(len, found)) != self._counts:
            return False
        self._seen = _inside(found)
        return True


def _inside(
    collections: tuple[Any, ...],
) -> tuple[tuple[Any, ...], tuple[Any, ...] | None, tuple[int, ...]]:
    """Return *collections*, the lists in them, and those lists' lengths.

    No lists (None) when a collection is of a kind without them: every call then
    takes the exact count.
    """
    lists: list[Any] = []
    for collection in collections:
        parent = getattr(collection, "parent_listeners", None)
        if parent is None:
            return collections, None, ()
        lists.append(parent)
        own = getattr(collection, "listeners", None)
        if own is not None:
            lists.append(own)
    return collections, tuple(lists), tuple(map(len, lists))


class DirectUse:
    """What lets the repository's hot path use one engine, checked on every call.

    Made by :func:`allow_direct` for a PostgreSQL engine of this package whose
    statement events had no listener but the package's own when it was made; looked up
    once per call with :func:`direct_use`, which also makes the per-call checks that
    all hold for every statement. :attr:`statements` is the hot path's own cache of
    this engine's compiled statements (:mod:`todo_backend.direct`), kept here so a
    call needs one lookup, not one per cache, and gone with the engine.
    """

    __slots__ = ("_pool", "_statements", "prefixes", "statements")

    def __init__(self, prefixes: StatementPrefixes, engine: Engine, *, own_pool: bool) -> None:
        self.prefixes = prefixes
        self.statements: dict[Any, Any] = {}
        self._statements = _Listeners(_statement_collections, engine)
        self._pool = _Listeners(_pool_collections, engine) if own_pool else None

    def unwatched(self, engine: Engine) -> bool:
        """Tell whether nothing but the package watches *engine*'s statements now.

        Its statement events (``before_execute``, ``before_cursor_execute``,
        ``handle_error``, ``begin``... on the engine or on the Engine class) have no
        listener but the package's own, it has no execution options of its own
        (``schema_translate_map``...), and it logs no SQL (``echo`` or the
        ``sqlalchemy.engine`` logger at INFO, which is what SQLAlchemy's own
        connections ask). Only then may a statement go to the driver without passing
        through SQLAlchemy's execution: a caller's instrumentation, logging or error
        hooks see every statement otherwise.
        """
        return (
            not engine.logger.isEnabledFor(logging.INFO)
            and not engine.get_execution_options()
            and self._statements.unchanged(engine)
        )

    def pool_unwatched(self, engine: Engine) -> bool:
        """Tell whether *engine*'s pool events have no listener but the package's own.

        True only for an async engine whose pool had no listener (on the engine, or on
        the ``Pool`` class) before the package added its own: the async hot path then
        borrows connections without SQLAlchemy's greenlet bridge or its checkout
        (:meth:`todo_backend.pool.IdleQueuePool.lend`) while the counts stay the same.
        """
        return self._pool is not None and self._pool.unchanged(engine)


_DIRECT: WeakKeyDictionary[Engine, DirectUse] = WeakKeyDictionary()


def direct_use(engine: Engine) -> DirectUse | None:
    """Return what lets the hot path use *engine*, if it may now (:meth:`DirectUse.unwatched`).

    None unless *engine* is a PostgreSQL engine of this package (:func:`allow_direct`)
    that nothing but the package watches at this moment.
    """
    use = _DIRECT.get(engine)
    return use if use is not None and use.unwatched(engine) else None


def allow_direct(
    engine: Engine, foreign: Sequence[int], foreign_pool: Sequence[int] | None = None
) -> None:
    """Let the repository's hot path use *engine* while only the package watches it.

    *foreign* is :func:`statement_listeners` taken right after ``create_engine``,
    before the package added its hooks: any listener there is someone else's (one on
    the ``Engine`` class, or added by an instrumented ``create_engine`` such as
    OpenTelemetry's), and then the hot path is never used on this engine. Otherwise
    it is used while the counts stay those of the package's own hooks
    (:func:`direct_use`). *foreign_pool*, given for an async engine, is
    :func:`pool_listeners` taken at the same moment: with none there, its hot path may
    also borrow connections without the greenlet bridge (:meth:`DirectUse.pool_unwatched`).
    """
    prefixes = _ENGINE_PREFIXES.get(engine)
    if prefixes is not None and not any(foreign):
        own_pool = foreign_pool is not None and not any(foreign_pool)
        _DIRECT[engine] = DirectUse(prefixes, engine, own_pool=own_pool)


# Connection.info key: the server had closed the connection before the message now
# being sent (True: it ended the transaction for the idle bound; False: for another
# reason, or one that cannot be read). Set just before sending, read by handle_error.
_CLOSED: Final = "todo_backend.closed"


def _explain_closed(context: ExceptionContext) -> None:
    """Mark an error raised after the server had closed the connection (a ``handle_error`` hook)."""
    conn = context.connection
    if conn is None:
        return
    try:
        closed = conn.info.pop(_CLOSED, None)
    except SQLAlchemyError:  # pragma: no cover - already invalidated
        return
    if closed is None:
        return
    # The server had closed the connection before the failed message was sent: it
    # never ran, and the server rolled the transaction back. Whatever the driver
    # made of the closed socket, the connection is gone.
    context.is_disconnect = True
    if closed:
        setattr(context.sqlalchemy_exception, _IDLE_EXPIRED, True)


def _note_closed(conn: Connection, tx: _Transaction, settings: Settings) -> None:
    """Record in *conn*.info whether the server closed the connection while *tx* sat idle.

    The server ends a transaction idle past its bound by sending a FATAL
    idle_in_transaction_session_timeout message and closing the socket, as it does
    for a terminated backend (PgBouncer relays the message and closes the client's
    socket too). A zero-timeout poll sees that before the next message is sent, with
    no round trip: then nothing of the transaction can have been stored. Without
    that evidence a lost answer (above all a COMMIT's) has an unknown outcome,
    however long the transaction looked idle. Which bound closed it is read from the
    message itself when it is in clear text; over TLS it is inferred from the idle
    gap the hooks measured, only when the engine's bound was in force throughout.
    """
    seen = _closed_by_server(conn)
    if seen is None:
        return
    if seen:
        # The first message: type, length, then its fields, each a code byte and text.
        idle = b"C" + _IDLE_TIMEOUT.encode() in seen[5:].split(b"\0")
    else:
        sent_at, idle_since = tx.sent_at, tx.idle_since
        # The bound the server enforces: the rounded milliseconds it was given.
        idle_bound = _milliseconds(settings.idle_in_transaction_timeout) / 1000
        idle = (
            tx.trusted
            and tx.bounded_at is not None
            and sent_at is not None
            and idle_since is not None
            and sent_at - idle_since >= idle_bound
        )
    conn.info[_CLOSED] = idle


def _closed_by_server(conn: Connection) -> bytes | None:
    """Return what the server sent before closing *conn*'s socket, or None if it is open.

    The bytes are the start of the server's last message when it is readable
    (``b""`` over TLS or when nothing could be read).
    """
    dbapi: Any = conn.connection.dbapi_connection
    connection = getattr(dbapi, "driver_connection", dbapi)
    fileno = connection.fileno()
    poller = select.poll()
    poller.register(fileno, select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLRDHUP)
    events = poller.poll(0)
    if not events:
        return None
    flags = events[0][1]
    peeked = b""
    if flags & select.POLLIN:
        # A second descriptor of the driver's socket, read without consuming anything
        # and without touching the flags the two share.
        sock = socket.socket(fileno=os.dup(fileno))
        try:
            peeked = sock.recv(512, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            peeked = b""
        finally:
            sock.close()
    # A FATAL ErrorResponse in clear text, or a peer that hung up: the server closed.
    fatal = peeked.startswith(b"E") and b"SFATAL\0" in peeked
    if fatal or flags & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
        return peeked if fatal else b""
    return None


class StatementPrefixes:
    """The settings an engine's hooks send in front of statements, built once per engine.

    A transaction starts with the bounds, the switch to :data:`APP_ROLE` (where tasks
    has row-level security) and the row-level security user, in one statement; later
    statements of the transaction carry the user again only when it must change.
    """

    __slots__ = ("bounds", "head", "unscoped_start")

    def __init__(self, bounds: str) -> None:
        self.bounds = bounds
        self.head = bounds + ", " + _ROLE_CALL + ", "
        self.unscoped_start = self.head + _NO_USER_CALL

    def start(self, user: str | None, as_app: bool, plan: str | None = None) -> str:
        """Return the statement that starts a transaction as *user* (None: unscoped).

        *plan*: the planner settings of a statement that runs alone in it
        (:data:`IN_INDEX_ORDER`), as ``set_config`` calls.
        """
        if not as_app:
            start = self.bounds
        else:
            start = self.unscoped_start if user is None else self.head + user_call(user)
        return start if plan is None else f"{start}, {plan}"

    def owned_autocommitted(self, statement: str, as_app: bool, plan: str | None = None) -> str:
        """Return the package's own *statement*, autocommitted, its owner a bound parameter.

        Like :meth:`autocommitted`, but the owner is not written into the text: it is
        the pyformat parameter :data:`USER_PARAMETER`, quoted by the driver like every
        other value. The text is then the same on every call, so a driver that caches
        the parsing of a query's text (psycopg 3) parses it once. Only for a statement
        whose parameters are a mapping without that key.
        """
        settings = (
            self.bounds
            if not as_app
            else f"{self.head}set_config('{USER_SETTING}', %({USER_PARAMETER})s, true)"
        )
        return f"{settings}; {statement}" if plan is None else f"{settings}, {plan}; {statement}"

    def autocommitted(
        self, statement: str, own: bool, owner: str | None, as_app: bool, plan: str | None = None
    ) -> str:
        """Return *statement* as an autocommit connection sends it.

        The package's own statement carries the bounds, the role and its owner; a
        caller's runs as the application role, unscoped, unless it refuses the
        implicit transaction such a message makes (``VACUUM``...) or controls
        transactions: those go as they are, as the connecting role.
        """
        if own:
            return self.start(owner, as_app, plan) + "; " + statement
        if not as_app or _REFUSES_BLOCK.match(statement) or _CONTROL.match(statement):
            return statement
        return "SELECT " + _ROLE_CALL + ", " + _NO_USER_CALL + "; " + statement

    def in_transaction(self, tx: _Transaction, user: str | None, as_app: bool) -> str | None:
        """Return the settings a statement of *tx* run as *user* needs first, if any."""
        if tx.bounded_at is None:
            tx.bounded_at = len(tx.savepoints)
            tx.user = user
            return self.start(user, as_app)
        if tx.user != user:
            tx.user = user
            return "SELECT " + user_call(user)
        return None


def _marks(options: Any, parameters: Any) -> tuple[bool, str | None, bool]:
    """Return what a statement's execution options say of it.

    Whether it is the package's own, its owner (the value of the parameter its
    options name, for the package's own statements), and whether it runs as the
    application role (not :data:`CONNECTING_ROLE`).
    """
    own = options.get(_BOUNDED_KEY, False) and not options.get(_UNBOUNDED_KEY, False)
    as_app = not options.get(_CONNECTING_ROLE_KEY, False)
    name = options.get(_OWNER_KEY) if own else None
    if name is None or not isinstance(parameters, dict):
        return own, None, as_app
    value = parameters.get(name)
    return own, (value if isinstance(value, str) else None), as_app


def own_statement(options: Any) -> tuple[str | None, bool, str | None] | None:
    """Return how a statement with execution *options* is sent, if it is the package's own.

    ``(owner, as_app, plan)``: the name of the parameter holding its owner (None if it
    has none), whether it runs as :data:`APP_ROLE`, and its planner settings
    (:data:`IN_INDEX_ORDER`); None for any other statement.
    """
    own, _, as_app = _marks(options, None)
    if not own:
        return None
    owner = options.get(_OWNER_KEY)
    plan = options.get(_PLAN_KEY)
    return (owner if isinstance(owner, str) else None), as_app, plan


def _send_alone(conn: Connection, bounds: str) -> None:
    """Send *bounds* as a statement of its own on *conn*'s driver connection."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(bounds)
    finally:
        cursor.close()


def _autocommit(conn: Connection) -> bool:
    # psycopg2's connection and SQLAlchemy's adapter of psycopg 3's both say it.
    return bool(conn.connection.dbapi_connection.autocommit)  # type: ignore[union-attr]


# SQLSTATEs of the server's bounds: query_canceled, lock_not_available,
# idle_in_transaction_session_timeout.
_STATEMENT_CANCELED: Final = "57014"
_LOCK_NOT_AVAILABLE: Final = "55P03"
_IDLE_TIMEOUT: Final = "25P03"


def timeout_error(err: BaseException) -> DatabaseTimeoutError | None:
    """Return the :class:`DatabaseTimeoutError` that explains *err*, or None.

    Recognises the pool's checkout timeout and the server's statement, lock and
    idle-in-transaction bounds. In every case nothing of the call was stored: the pool
    sent nothing, and the server rolled back what the statement or block had done.
    """
    if isinstance(err, PoolTimeoutError):
        return DatabaseTimeoutError(
            "no pooled database connection became free within DB_POOL_TIMEOUT: every "
            "connection is busy, and nothing was sent. Retry later; if it persists, look for "
            "long atomic() blocks holding connections or raise DB_POOL_SIZE / DB_MAX_OVERFLOW.",
            bound="DB_POOL_TIMEOUT",
        )
    orig = getattr(err, "orig", None)
    # psycopg2 names the SQLSTATE pgcode, psycopg 3 (the async engine) sqlstate.
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    if code == _LOCK_NOT_AVAILABLE:
        # The server says which row it waited for ("while updating tuple (0,1) in
        # relation ...") when it was a row; a wait for the table itself says nothing.
        context = str(getattr(getattr(orig, "diag", None), "context", None) or "")
        if "tuple" in context:
            return DatabaseTimeoutError(
                "the task is locked by another transaction that did not finish within "
                "DB_LOCK_TIMEOUT; nothing was changed. Retry the call; if it keeps happening, "
                "look for a long-running transaction or admin session holding the row.",
                bound="DB_LOCK_TIMEOUT",
            )
        return DatabaseTimeoutError(
            "the tasks table stayed locked longer than DB_LOCK_TIMEOUT: the call queued "
            "behind a table lock, such as a schema change (`todo-db migrate`) waiting for "
            "or holding it, or an admin session's LOCK TABLE; nothing was changed. Retry "
            "the call; if it keeps happening, look in pg_stat_activity for a migration or "
            "admin session holding the table.",
            bound="DB_LOCK_TIMEOUT",
        )
    if code == _STATEMENT_CANCELED:
        return DatabaseTimeoutError(
            "the server cancelled the statement: it ran longer than DB_STATEMENT_TIMEOUT "
            "(or an administrator cancelled it); nothing of it was applied. Retry later, or "
            "raise DB_STATEMENT_TIMEOUT if this work is legitimately slow.",
            bound="DB_STATEMENT_TIMEOUT",
        )
    if code == _IDLE_TIMEOUT or getattr(err, _IDLE_EXPIRED, False):
        return DatabaseTimeoutError(
            "the server ended the transaction: the atomic() block sat idle between its "
            "statements longer than DB_IDLE_IN_TRANSACTION_TIMEOUT, and nothing of the block "
            "was stored. Keep slow work (network calls) outside atomic() blocks, then repeat "
            "the block.",
            bound="DB_IDLE_IN_TRANSACTION_TIMEOUT",
        )
    return None


# SQLSTATEs of a failed switch to APP_ROLE: not a member, or the role is gone.
_NOT_A_MEMBER: Final = "42501"
_NO_SUCH_ROLE: Final = "22023"


def role_error(err: BaseException) -> ConfigurationError | None:
    """Return the :class:`ConfigurationError` of a failed switch to :data:`APP_ROLE`, or None.

    Where ``tasks`` has row-level security, every transaction switches to the
    application role in its first message; a login role that is not a member of it
    (or a role dropped by hand) fails there, before the statement ran: nothing was
    stored, and only an administrator can fix it.
    """
    orig = getattr(err, "orig", None)
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    message = str(orig)
    if (code == _NOT_A_MEMBER and "set role" in message) or (
        code == _NO_SUCH_ROLE and f'role "{APP_ROLE}" does not exist' in message
    ):
        return ConfigurationError(
            "the database keeps users apart with row-level security (revision 0003), but "
            f"the connecting role cannot switch to the application role {APP_ROLE}, so "
            f"nothing was sent to tasks. As the database owner, run GRANT {APP_ROLE} TO "
            "<the login role of DATABASE_URL> (or run `todo-db migrate` as that role), then "
            "retry; `todo-db check` shows the state."
        )
    return None


def _switch_isolation_without_round_trips(engine: Engine) -> None:
    """Make the per-call AUTOCOMMIT switch free of network traffic.

    The repository runs single statements with ``isolation_level="AUTOCOMMIT"`` and
    the pool resets the level when the connection comes back. SQLAlchemy's psycopg2
    dialect does both through psycopg2's legacy ``set_isolation_level()``, which
    pins READ COMMITTED explicitly and therefore sends ``SET
    default_transaction_isolation TO DEFAULT`` on every later return: a second round
    trip per call, a session-level SET, and, when the server drops the connection
    between the statement and that SET, a raw driver error from the pool's check-in
    that escapes the repository after the write was committed and leaks the pool
    slot for good. Toggling ``autocommit`` and leaving the isolation level at the
    server default sends nothing; a dead connection is then caught at checkout.

    ``postgresql_readonly`` and ``postgresql_deferrable`` get the same treatment: the
    pool's reset to False becomes psycopg2's DEFAULT (None), which later autocommit
    switches leave alone, and combined with AUTOCOMMIT they are refused
    (:func:`_refuse_session_characteristics`).
    """
    dialect = engine.dialect

    def set_isolation_level(dbapi_connection: Any, level: str) -> None:
        if level == "AUTOCOMMIT":
            dbapi_connection.autocommit = True
        elif level == dialect.default_isolation_level:
            dbapi_connection.set_session(isolation_level="DEFAULT", autocommit=False)
        else:
            dbapi_connection.set_session(isolation_level=level, autocommit=False)

    def set_readonly(dbapi_connection: Any, value: bool) -> None:
        # False (SQLAlchemy's reset) is psycopg2's DEFAULT, None: an explicit False
        # would be re-SET on every later autocommit switch.
        dbapi_connection.readonly = True if value else None

    def set_deferrable(dbapi_connection: Any, value: bool) -> None:
        dbapi_connection.deferrable = True if value else None

    dialect.set_isolation_level = set_isolation_level  # type: ignore[method-assign]
    dialect.set_readonly = set_readonly  # type: ignore[attr-defined]
    dialect.set_deferrable = set_deferrable  # type: ignore[attr-defined]
    event.listen(engine, "set_connection_execution_options", _refuse_session_characteristics)
    event.listen(engine, "set_engine_execution_options", _refuse_session_characteristics)


_SESSION_CHARACTERISTICS: Final = ("postgresql_readonly", "postgresql_deferrable")


def _refuse_session_characteristics(target: Connection | Engine, options: dict[str, Any]) -> None:
    """Refuse read-only or deferrable together with AUTOCOMMIT, before either is applied.

    With autocommit on, psycopg2 turns them into session-level ``SET
    default_transaction_read_only`` / ``default_transaction_deferrable`` statements: a
    round trip each, and session state that PgBouncer's transaction pooling hands to
    other clients. In a transaction they cost nothing (psycopg2 says ``BEGIN READ
    ONLY``), and an autocommitted statement has no transaction for them to shape.
    """
    merged = {**target.get_execution_options(), **options}
    chosen = [name for name in _SESSION_CHARACTERISTICS if merged.get(name)]
    if chosen and merged.get("isolation_level") == "AUTOCOMMIT":
        raise ConfigurationError(
            f"{' and '.join(chosen)} cannot be combined with isolation_level='AUTOCOMMIT' "
            "on this engine: psycopg2 would make them session settings, which outlive the "
            "connection's use behind PgBouncer. Run the work in a transaction instead "
            "(drop AUTOCOMMIT, or begin one), where they apply to that transaction only."
        )


def _create_sqlite_engine(url: URL, settings: Settings) -> Engine:
    engine = create_engine(url, **sqlite_engine_options(url, settings))
    if not is_in_memory(url):
        event.listen(engine, "connect", sqlite_on_connect)
    return engine


def is_in_memory(url: URL) -> bool:
    """Tell whether the SQLite *url* names an in-memory database."""
    return url.database in (None, "", ":memory:")


def sqlite_engine_options(url: URL, settings: Settings) -> dict[str, Any]:
    """Return the ``create_engine`` keywords of a SQLite engine (sync or async).

    ``sqlite://`` is one in-memory database shared by every session and thread (a
    static pool). File databases wait up to ``pool_timeout`` for a lock and, through
    :func:`sqlite_on_connect`, enforce foreign keys.
    """
    options: dict[str, Any] = {"echo": settings.echo, "hide_parameters": True}
    if is_in_memory(url):
        return {**options, "poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    connect_args = {"check_same_thread": False, "timeout": settings.pool_timeout}
    return {**options, "connect_args": connect_args}


def sqlite_on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    """Turn on foreign keys for a new SQLite connection (a ``connect`` event listener).

    SQLite leaves them off unless every connection asks: a file database outlives
    this schema, and tables added later may reference each other.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def reject_dead_connection(
    dbapi_connection: Any, _record: ConnectionPoolEntry, _proxy: Any
) -> None:
    """Refuse a pooled connection whose server side has gone away (a ``checkout`` listener).

    Works for psycopg2 and for psycopg 3 behind SQLAlchemy's async adapter (whose
    ``driver_connection`` is the psycopg connection). An idle connection of this
    package receives no unsolicited data (it never LISTENs; asynchronous notices are
    rare and would only cost a reconnect) except the FATAL message and EOF the server
    sends when it terminates the backend (Neon suspending its compute, a restart,
    pg_terminate_backend). A zero-timeout poll of the socket sees that without a
    round trip; raising DisconnectionError makes the pool open a fresh connection in
    its place before the caller's statement is sent.
    """
    connection = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if connection.closed:
        raise DisconnectionError("connection closed")
    if _has_news(connection):
        raise DisconnectionError("server closed the connection while it was idle in the pool")


def _has_news(connection: Any) -> bool:
    """Tell whether an idle *connection*'s socket has something to read (no round trip)."""
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def ready_without_io(dbapi_connection: Any) -> bool:
    """Tell whether a pooled connection can serve the hot path with nothing done first.

    Open, in autocommit already, idle on the server and with nothing on its socket:
    then the checkout listeners (:func:`reject_dead_connection`,
    :func:`checkout_mode`) would have nothing to refuse or switch, and the async hot
    path may borrow it without them and without SQLAlchemy's greenlet bridge
    (:meth:`todo_backend.pool.IdleQueuePool.lend`). Otherwise it is checked out
    through the bridge, where replacing or switching it may do I/O.
    """
    connection = dbapi_connection.driver_connection
    return (
        not connection.closed
        and connection.autocommit
        and _server_idle(dbapi_connection)
        and not _has_news(connection)
    )


# Set by the repository's hot path (todo_backend.direct) around its checkout: the
# connection is handed out in autocommit. Every other checkout gets a transactional one.
AUTOCOMMIT_CHECKOUT: Final[ContextVar[bool]] = ContextVar(
    "todo_backend_autocommit_checkout", default=False
)


# libpq's PQTRANS_IDLE, as psycopg2's and psycopg 3's connection.info report it.
_IDLE: Final = 0


def _server_idle(dbapi_connection: Any) -> bool:
    """Tell whether the server has no transaction open on *dbapi_connection* (no round trip)."""
    connection = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    pgconn = getattr(connection, "pgconn", None)
    if pgconn is not None:
        # psycopg 3's libpq status, read as a plain int: its connection.info builds a
        # ConnectionInfo and an enum on each read, about 1.5 µs.
        return bool(pgconn.transaction_status == _IDLE)
    return getattr(connection.info, "transaction_status", _IDLE) == _IDLE


def checkout_mode(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
    """Hand out a pooled connection in the mode its user expects (a ``checkout`` listener).

    The repository's hot path returns its connections to the pool still in autocommit:
    the next hot-path call then needs no switch, and the pool's check-in has nothing to
    roll back (``skip_autocommit_rollback``). Any other user, a session or a caller's
    ``engine.connect()``, gets the connection switched back first, as SQLAlchemy expects
    it. The switch is made on the client (psycopg2 and psycopg 3 send nothing); a
    connection that cannot take it is replaced, like a dead one.

    A connection given back inside a transaction on the server (its user sent
    ``BEGIN`` itself, which neither the driver nor the pool's reset knows of) is
    replaced too: the next user would work inside that transaction; closing it ends the
    transaction, nothing of it stored. A new connection already inside a transaction
    was left so by the application's own pool ``connect`` listener: a
    :class:`ConfigurationError` that says so.
    """
    served = record.info.get(_SERVED, False)
    record.info[_SERVED] = True
    if not _server_idle(dbapi_connection):
        if served:
            raise DisconnectionError("given back inside a transaction its user began itself")
        if dbapi_connection.autocommit != AUTOCOMMIT_CHECKOUT.get():
            # psycopg2 and psycopg 3 refuse the switch inside a transaction.
            raise ConfigurationError(
                "a new pooled connection was inside an open transaction, so it cannot be "
                "switched to autocommit: a pool 'connect' listener of the application ran "
                "SQL without ending its transaction. Commit in that listener, or run its "
                "SQL with the connection in autocommit."
            )
        return
    wanted = AUTOCOMMIT_CHECKOUT.get()
    if dbapi_connection.autocommit == wanted:
        return
    try:
        dbapi_connection.autocommit = wanted
    except Exception as err:
        # Not a transaction left open: the connection is unusable; the pool replaces it.
        raise DisconnectionError(f"cannot switch autocommit ({type(err).__name__})") from err


# ConnectionPoolEntry.info key: the connection has been handed out before.
_SERVED: Final = "todo_backend.served"


def init_db(engine: Engine) -> None:
    """Create the ``tasks`` table and its indexes when missing; never drops or alters data.

    Meant for tests and throwaway databases. A database that keeps data is created
    and moved forward with migrations (``todo-db migrate``; the CLI's own commands
    create a missing schema that way too).
    """
    SQLModel.metadata.create_all(engine, tables=[Task.__table__])  # type: ignore[attr-defined]


# session.info key: the user a user_scope block runs the session's SQL as.
_SCOPE: Final = "todo_backend.user_scope"
_S = TypeVar("_S", bound=orm.Session)


@contextmanager
def user_scope(session: _S, user_id: str) -> Iterator[_S]:
    """Run the SQL sent through *session* inside the block as *user_id*: a context manager.

    Outside any scope, every transaction of the package's engines runs as the
    application role with no user, and row-level security (revision 0003) lets such SQL
    see and change no task at all. Inside ``with user_scope(session, user_id):`` raw
    SQL and ORM queries on *session* see, change, insert and delete exactly
    *user_id*'s tasks; writing a row of another user is refused by the policy, with
    SQLAlchemy's ``ProgrammingError`` (SQLSTATE 42501) as for any refused statement of
    the caller's own SQL. The user setting rides in the message of the block's next
    statement: no extra round trip, and it ends with the transaction, so nothing leaks
    to the next one or, through PgBouncer, to another client. A commit inside the
    block keeps the scope for the next transaction; after the block the session is
    unscoped again (or back in the enclosing block's scope). *user_id* is validated
    like the repository's (``pydantic.ValidationError``). The repository's own calls
    run as their ``user_id`` argument, inside a scope or not.

    SQLite has no row-level security: there the block only marks the session, and the
    repository's ``user_id`` condition is the only wall.
    """
    user_id, outer = enter_scope(session, user_id)
    if session.in_transaction():
        scope_transaction(session.connection(), user_id)
    try:
        yield session
    finally:
        leave_scope(session, outer)
        if session.in_transaction():
            scope_transaction(session.connection(), outer)


def enter_scope(session: orm.Session, user_id: str) -> tuple[str, str | None]:
    """Mark *session* as scoped to *user_id*; return it validated, and the enclosing user."""
    user_id = validate_user_id(user_id)
    outer: str | None = session.info.get(_SCOPE)
    session.info[_SCOPE] = user_id
    return user_id, outer


def leave_scope(session: orm.Session, outer: str | None) -> None:
    """Give *session* back to the enclosing scope *outer* (None: unscoped)."""
    if outer is None:
        session.info.pop(_SCOPE, None)
    else:
        session.info[_SCOPE] = outer


def scope_transaction(conn: Connection, user_id: str | None) -> None:
    """Set the user the next caller's statements of *conn*'s transaction run as."""
    if conn.dialect.name != "postgresql":
        return
    tx = conn.info.get(_TRANSACTION)
    if tx is None:
        # The record of a transaction is made lazily, by its first statement (the
        # begin hook clears the last one): make it now, to carry the user.
        tx = conn.info[_TRANSACTION] = _Transaction()
    tx.want = user_id


@event.listens_for(orm.Session, "after_begin")
def _scope_new_transaction(
    session: orm.Session, _transaction: orm.SessionTransaction, connection: Connection
) -> None:
    # A session transaction begun inside a user_scope block runs as its user.
    user_id = session.info.get(_SCOPE)
    if user_id is not None:
        scope_transaction(connection, user_id)


def get_session(engine: Engine) -> Generator[Session, None, None]:
    """Yield a session on *engine* and close it afterwards.

    Not a FastAPI dependency by itself (FastAPI cannot supply *engine*): wrap it in a
    function of no arguments that yields from it.

    Objects stay readable after commit (``expire_on_commit=False``): re-reading them
    would cost a round trip per object for data the caller already has.
    """
    with Session(engine, expire_on_commit=False) as session:
        yield session


@dataclass(frozen=True, slots=True)
class DatabaseHealth:
    """The outcome of :func:`check_database`: reachable or not, and what was seen."""

    ok: bool
    latency_ms: float
    server_version: str
    ssl: bool | None
    detail: str
    timeouts: dict[str, str] = field(default_factory=dict)
    row_security: str = ""
    warnings: tuple[str, ...] = ()


def check_database(engine: Engine) -> DatabaseHealth:
    """Connect, run one query, and report; never raises for an unreachable database.

    ``ssl`` tells whether this client's own connection is encrypted, as the driver
    sees it: behind a pooler (Neon's pooled endpoint) that is the hop that leaves the
    machine, while the server only sees the pooler's connection. It is None for
    SQLite. The answer comes within the engine's connect timeout. ``detail``
    names the host (password masked) and, on failure, what to check. ``timeouts``
    holds the statement, lock and idle-in-transaction bounds as the server reports
    them for the check's own statement (empty for SQLite).

    ``row_security`` says how PostgreSQL keeps users apart on ``tasks``: ``"forced"``
    (revision 0003: the policy binds every role but superusers and BYPASSRLS roles),
    ``"on"`` (not forced: the table's owner is exempt), ``"off"`` (the repository's
    ``user_id`` condition is the only wall), ``"no table"``; empty for SQLite or when
    unreachable. ``warnings`` say what weakens it: the connecting role bypasses row
    security (superuser or BYPASSRLS, as Neon's default owner role does), or cannot
    switch to :data:`APP_ROLE`. The check runs as the connecting role
    (:data:`CONNECTING_ROLE`), as every admin path does.
    """
    started = time.perf_counter()
    where = mask_url(engine.url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                version = "SQLite " + str(conn.exec_driver_sql("select sqlite_version()").scalar())
                ssl: bool | None = None
                timeouts: dict[str, str] = {}
                row_security = ""
                warnings: tuple[str, ...] = ()
            else:
                row = conn.execute(_PG_HEALTH, execution_options=CONNECTING_ROLE).one()
                version = str(row.version)
                ssl = bool(conn.connection.dbapi_connection.info.ssl_in_use)  # type: ignore[union-attr]
                timeouts = {name: str(getattr(row, name)) for name in _BOUNDS}
                row_security, warnings = str(row.row_security), _rls_warnings(row)
    except (SQLAlchemyError, OSError) as err:
        latency = (time.perf_counter() - started) * 1000
        return DatabaseHealth(
            ok=False,
            latency_ms=latency,
            server_version="",
            ssl=None,
            detail=f"cannot reach {where}: {error_reason(err)}. {_what_to_check(engine)}",
        )
    latency = (time.perf_counter() - started) * 1000
    return DatabaseHealth(
        ok=True,
        latency_ms=latency,
        server_version=version,
        ssl=ssl,
        detail=f"connected to {where}",
        timeouts=timeouts,
        row_security=row_security,
        warnings=warnings,
    )


_BOUNDS: Final = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
# One round trip: version and the bounds the server applies to this statement's
# transaction. Whether TLS is on is the driver's to say, not the server's.
_PG_HEALTH: Final = text(
    "select current_setting('server_version') as version, "
    "current_setting('statement_timeout') as statement_timeout, "
    "current_setting('lock_timeout') as lock_timeout, "
    "current_setting('idle_in_transaction_session_timeout') "
    "as idle_in_transaction_session_timeout, "
    "(SELECT CASE WHEN c.oid IS NULL THEN 'no table' WHEN NOT c.relrowsecurity THEN 'off' "
    "WHEN c.relforcerowsecurity THEN 'forced' ELSE 'on' END "
    "FROM (SELECT pg_catalog.to_regclass('tasks') AS oid) AS t "
    "LEFT JOIN pg_catalog.pg_class AS c ON c.oid = t.oid) AS row_security, "
    "(SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user) "
    "AS bypasses, "
    "(SELECT pg_catalog.pg_has_role(current_user, oid, 'MEMBER') FROM pg_catalog.pg_roles "
    "WHERE rolname = :app_role) AS app_member, "
    "current_user AS role_name"
).bindparams(app_role=APP_ROLE)


def _rls_warnings(row: Any) -> tuple[str, ...]:
    """Return what weakens row-level security, from the health query's *row*."""
    warnings = []
    protected = row.row_security in ("on", "forced")
    if row.bypasses and protected:
        warnings.append(
            f"the connecting role {row.role_name} bypasses row-level security (superuser "
            "or BYPASSRLS, as Neon's default owner role does): the application's "
            f"transactions are kept apart only because the engine switches them to {APP_ROLE}; "
            "admin paths (migrations, UNBOUNDED or CONNECTING_ROLE statements, psql) see and "
            "change every user's tasks"
        )
    if protected and not row.app_member:
        warnings.append(
            f"the connecting role {row.role_name} cannot switch to {APP_ROLE}, so every "
            f"application statement on tasks fails: run GRANT {APP_ROLE} TO {row.role_name} "
            "as the database owner, or migrate with this role"
        )
    if row.row_security == "on":
        warnings.append(
            "row-level security on tasks is not forced: the table's owner is exempt; "
            "run `todo-db migrate`"
        )
    return tuple(warnings)


def wait_for_database(engine: Engine, *, attempts: int = 5, base_delay: float = 0.5) -> None:
    """Block until *engine* can run a query, retrying with exponential backoff.

    Waits up to ``base_delay * 2**n`` seconds (full jitter, at most
    ``MAX_BACKOFF_SECONDS``) between attempts, which rides out a Neon compute waking
    from suspend. After *attempts* failures raises
    :class:`DatabaseUnavailableError` naming the host and port, never the password.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    last = ""
    for attempt in range(attempts):
        health = check_database(engine)
        if health.ok:
            return
        last = health.detail
        logger.warning("database not ready (attempt %d of %d): %s", attempt + 1, attempts, last)
        if attempt + 1 < attempts:
            delay = min(base_delay * 2**attempt, MAX_BACKOFF_SECONDS)
            time.sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not a secret
    raise DatabaseUnavailableError(f"database unavailable after {attempts} attempts: {last}")


def error_reason(err: BaseException) -> str:
    """Return what failed, from the first line of a (driver) error.

    That line says it ("connection refused", "timeout expired", "SSL ... required");
    the rest of a SQLAlchemy error repeats SQL and parameters. libpq never puts the
    password in it.
    """
    original = getattr(err, "orig", None) or err
    first = str(original).strip().splitlines()
    return first[0] if first else type(original).__name__


def cannot_connect(err: BaseException) -> DatabaseUnavailableError:
    """Return the error for a connection that could not be opened (nothing was sent)."""
    return DatabaseUnavailableError(
        f"cannot connect to the database: {error_reason(err)}. "
        "Run `todo-db check` to see what is wrong."
    )


def _what_to_check(engine: Engine) -> str:
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return "Check that the file's directory exists and is writable."
    host = url_host(url) or "local socket"
    port = url.port or 5432
    return (
        f"Check the host and port ({host}:{port}), the sslmode (Neon requires "
        "sslmode=require), that a suspended Neon compute has had a few seconds to wake, "
        "and that the network allows the connection."
    )
