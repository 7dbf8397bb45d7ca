"""Bounded waits on PostgreSQL: each bound raises DatabaseTimeoutError, direct and via PgBouncer.

The engine sets the statement, lock and idle-in-transaction bounds once per
transaction, in the same query message as its first statement (and as each
autocommitted repository call), so they hold through PgBouncer's transaction pooling
too. The direct variants run on the server under test (any role,
TLS or not); the PgBouncer variants on a throwaway cluster with its own PgBouncer (and
the idle bound also on one over TLS, where the server's last message is unreadable). In
every case nothing of the call is stored and no pooled connection is leaked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from tests.fix_servers import ClusterFactory, PgBouncerFactory
from todo_backend.config import Settings
from todo_backend.db import check_database, create_db_engine, get_session, init_db
from todo_backend.errors import DatabaseTimeoutError, DatabaseUnavailableError
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

ALICE = "alice"
TINY = 0.2  # seconds: a bound the test runs into on purpose
LONG = 30.0  # seconds: a bound the test must not run into
# Comfortably past TINY: a bound is a server-side timer, never a timed assert here.
PAST_TINY = 1.0


@dataclass
class Target:
    """Where the engine under test connects, and a direct URL for a second client."""

    url: URL
    direct: URL

    def engine(self, **bounds: float) -> Engine:
        """The package's engine on the target with the given Settings overrides."""
        settings = Settings(
            database_url=self.url.render_as_string(hide_password=False),
            **bounds,  # type: ignore[arg-type]
        )
        return create_db_engine(settings)


@pytest.fixture(params=["direct", "pgbouncer"])
def target(
    request: pytest.FixtureRequest,
    engine: Engine,
    scratch_url: URL,
    pg_cluster: ClusterFactory,
    pgbouncer: PgBouncerFactory,
) -> Target:
    """The scratch database directly, or a throwaway cluster behind PgBouncer."""
    return _target(request.param, scratch_url, pg_cluster, pgbouncer)


@pytest.fixture(params=["direct", "pgbouncer", "tls"])
def idle_target(
    request: pytest.FixtureRequest,
    engine: Engine,
    scratch_url: URL,
    pg_cluster: ClusterFactory,
    pgbouncer: PgBouncerFactory,
) -> Target:
    """The targets of the idle bound: also a throwaway cluster over TLS.

    Over TLS the server's last message before it closes a connection cannot be read
    without the driver: the engine tells the idle bound by the gap it measured.
    """
    return _target(request.param, scratch_url, pg_cluster, pgbouncer)


def _target(
    kind: str, scratch_url: URL, pg_cluster: ClusterFactory, pgbouncer: PgBouncerFactory
) -> Target:
    if kind == "direct":
        return Target(scratch_url, scratch_url)
    cluster = pg_cluster(ssl=kind == "tls")
    direct = cluster.url()
    schema = create_db_engine(direct.render_as_string(hide_password=False))
    init_db(schema)
    schema.dispose()
    if kind == "tls":
        return Target(direct.update_query_dict({"sslmode": "require"}), direct)
    bouncer = pgbouncer(direct)
    return Target(bouncer.url(direct.database or ""), direct)


@pytest.fixture
def made() -> Iterator[list[Engine]]:
    """Engines a test makes, disposed afterwards."""
    engines: list[Engine] = []
    yield engines
    for engine in engines:
        engine.dispose()


def _repo(engine: Engine) -> TaskRepository:
    return TaskRepository(next(get_session(engine)))


def _titles(target: Target, made: list[Engine]) -> list[str]:
    engine = target.engine()
    made.append(engine)
    return [t.title for t in _repo(engine).list(ALICE)]


@contextmanager
def _locked_row(target: Target, made: list[Engine], task_id: int) -> Iterator[None]:
    """Hold *task_id*'s row lock from a second, direct client until the block ends."""
    other = create_engine(target.direct)
    made.append(other)
    with other.connect() as conn, conn.begin():
        conn.execute(text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": task_id})
        yield


def test_a_locked_row_raises_the_lock_bound(target: Target, made: list[Engine]) -> None:
    """An update of a row another transaction holds fails at DB_LOCK_TIMEOUT, changing nothing."""
    engine = target.engine(lock_timeout=TINY, statement_timeout=LONG)
    made.append(engine)
    repo = _repo(engine)
    task = repo.create(ALICE, TaskCreate(title="before"))
    with _locked_row(target, made, task.id or 0), pytest.raises(DatabaseTimeoutError) as caught:
        repo.update(ALICE, task.id or 0, TaskUpdate(title="after"))
    assert caught.value.bound == "DB_LOCK_TIMEOUT"
    assert "DB_LOCK_TIMEOUT" in str(caught.value)
    assert _titles(target, made) == ["before"]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_slow_statement_raises_the_statement_bound(target: Target, made: list[Engine]) -> None:
    """A statement still running at DB_STATEMENT_TIMEOUT is cancelled and changes nothing."""
    # Waiting on the lock is the slow part; the statement bound comes first.
    engine = target.engine(lock_timeout=LONG, statement_timeout=TINY)
    made.append(engine)
    repo = _repo(engine)
    task = repo.create(ALICE, TaskCreate(title="before"))
    with _locked_row(target, made, task.id or 0), pytest.raises(DatabaseTimeoutError) as caught:
        repo.delete(ALICE, task.id or 0)
    assert caught.value.bound == "DB_STATEMENT_TIMEOUT"
    assert _titles(target, made) == ["before"]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_statement_bound_covers_any_statement_of_the_engine(
    target: Target, made: list[Engine]
) -> None:
    """Any statement the engine sends carries the bound, not only the repository's."""
    engine = target.engine(statement_timeout=TINY)
    made.append(engine)
    with engine.connect() as conn, pytest.raises(Exception, match="statement timeout"):
        conn.execute(text("SELECT pg_sleep(:s)"), {"s": PAST_TINY})


def test_an_idle_atomic_block_raises_the_idle_bound(
    idle_target: Target, made: list[Engine]
) -> None:
    """A block idle past DB_IDLE_IN_TRANSACTION_TIMEOUT is ended by the server; none of it stays."""
    engine = idle_target.engine(idle_in_transaction_timeout=TINY)
    made.append(engine)
    repo = _repo(engine)

    def stalled_block() -> None:
        with repo.atomic():
            repo.create(ALICE, TaskCreate(title="first"))
            time.sleep(PAST_TINY)  # a stalled caller, e.g. a slow upstream call
            repo.create(ALICE, TaskCreate(title="second"))

    with pytest.raises(DatabaseTimeoutError) as caught:
        stalled_block()
    assert caught.value.bound == "DB_IDLE_IN_TRANSACTION_TIMEOUT"
    assert "atomic()" in str(caught.value)
    assert _titles(idle_target, made) == []
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_an_atomic_block_idle_before_its_commit_stores_nothing(
    idle_target: Target, made: list[Engine]
) -> None:
    """A block that stalls after its last statement fails at COMMIT with the idle bound."""
    engine = idle_target.engine(idle_in_transaction_timeout=TINY)
    made.append(engine)
    repo = _repo(engine)

    def stalled_block() -> None:
        with repo.atomic():
            repo.create(ALICE, TaskCreate(title="only"))
            time.sleep(PAST_TINY)

    with pytest.raises(DatabaseTimeoutError) as caught:
        stalled_block()
    assert caught.value.bound == "DB_IDLE_IN_TRANSACTION_TIMEOUT"
    assert _titles(idle_target, made) == []
    assert repo.create(ALICE, TaskCreate(title="next")).title == "next"  # the session recovers


def test_a_busy_block_within_the_idle_bound_commits(target: Target, made: list[Engine]) -> None:
    """The idle bound counts time between statements, not the block's length."""
    engine = target.engine(idle_in_transaction_timeout=LONG)
    made.append(engine)
    repo = _repo(engine)
    with repo.atomic():
        for i in range(3):
            repo.create(ALICE, TaskCreate(title=f"t{i}"))
    assert sorted(_titles(target, made)) == ["t0", "t1", "t2"]


def test_a_lost_connection_in_a_block_is_not_called_a_timeout(
    idle_target: Target, made: list[Engine]
) -> None:
    """A block whose backend is terminated (not idle) reports a lost connection, not a bound."""
    engine = idle_target.engine()
    made.append(engine)
    repo = _repo(engine)
    killer = create_engine(idle_target.direct, isolation_level="AUTOCOMMIT")
    made.append(killer)

    def interrupted_block() -> None:
        with repo.atomic():
            repo.create(ALICE, TaskCreate(title="lost"))
            with killer.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'todo-backend' "
                        "AND datname = current_database() "
                        "AND state LIKE 'idle in transaction%'"
                    )
                )
            repo.create(ALICE, TaskCreate(title="after"))

    with pytest.raises(DatabaseUnavailableError):
        interrupted_block()
    assert _titles(idle_target, made) == []


def test_no_free_pooled_connection_raises_the_pool_bound(
    target: Target, made: list[Engine]
) -> None:
    """With the only pooled connection checked out, a call fails at DB_POOL_TIMEOUT."""
    engine = target.engine(pool_size=1, max_overflow=0, pool_timeout=TINY)
    made.append(engine)
    repo = _repo(engine)
    with engine.connect(), pytest.raises(DatabaseTimeoutError) as caught:
        repo.create(ALICE, TaskCreate(title="never"))
    assert caught.value.bound == "DB_POOL_TIMEOUT"
    assert _titles(target, made) == []
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_check_reports_the_bounds_the_server_applies(target: Target, made: list[Engine]) -> None:
    """check_database shows the server's own values of the three bounds for this engine."""
    engine = target.engine(statement_timeout=7, lock_timeout=0.25, idle_in_transaction_timeout=90)
    made.append(engine)
    health = check_database(engine)
    assert health.ok, health.detail
    assert health.timeouts == {
        "statement_timeout": "7s",
        "lock_timeout": "250ms",
        "idle_in_transaction_session_timeout": "90s",
    }


def test_server_side_cursors_still_work(target: Target, made: list[Engine]) -> None:
    """Streaming results (a DECLAREd cursor, one query only) runs despite the bounds."""
    engine = target.engine()
    made.append(engine)
    repo = _repo(engine)
    repo.create(ALICE, TaskCreate(title="streamed"))
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True).execute(
            text("SELECT title FROM tasks WHERE user_id = :u"), {"u": ALICE}
        )
        assert result.scalars().all() == ["streamed"]
