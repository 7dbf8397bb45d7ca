"""Connections the server drops are survived: terminated backends, restarts, late starts.

Faults are injected from outside, as Neon injects them: pg_terminate_backend from an
admin connection (a suspended compute), ``pg_ctl restart -m fast`` on a throwaway
cluster (maintenance), and a server that is not up yet when the application starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool, QueuePool
from sqlmodel import Session

from tests.fix_servers import ClusterFactory, free_port
from todo_backend.db import check_database, create_db_engine, get_session, init_db
from todo_backend.db import wait_for_database as wait_for_database_
from todo_backend.errors import DatabaseUnavailableError
from todo_backend.models import Task, TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

ALICE = "alice"
BOB = "bob"
_WAIT = 15.0  # seconds: bound on every wait for the server; never asserted on


def _repo(engine: Engine) -> TaskRepository:
    return TaskRepository(next(get_session(engine)))


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _backends(admin: Engine, database: str, *, waiting_on_lock: bool = False) -> set[int]:
    query = (
        "select pid from pg_stat_activity where datname = :db "
        "and application_name = 'todo-backend' and pid <> pg_backend_pid()"
    )
    if waiting_on_lock:
        query += " and wait_event_type = 'Lock'"
    with admin.connect() as conn:
        return set(conn.execute(text(query), {"db": database}).scalars())


def _terminate(admin: Engine, database: str, pids: set[int] | None = None) -> set[int]:
    """Terminate *pids* (default: every backend of *database*) and wait until they are gone."""
    with admin.connect() as conn:
        if pids is None:
            pids = set(
                conn.execute(
                    text(
                        "select pid from pg_stat_activity "
                        "where datname = :db and pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                ).scalars()
            )
        for pid in pids:
            conn.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})

    def gone() -> bool:
        with admin.connect() as conn:
            alive: int = conn.execute(
                text("select count(*) from pg_stat_activity where pid = any(:pids)"),
                {"pids": list(pids)},
            ).scalar_one()
        return alive == 0

    _wait_for(gone, f"backends {sorted(pids)} to exit")
    return pids


def _warm_pool(engine: Engine, connections: int = 3) -> None:
    """Leave *connections* idle connections in the pool, as a busy API would."""
    held = [engine.connect() for _ in range(connections)]
    for conn in held:
        conn.exec_driver_sql("select 1")
    for conn in held:
        conn.close()


class _Connects:
    """Counts the new DBAPI connections an engine opens."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "connect", self._on_connect)
        self._engine = engine

    def _on_connect(self, *_args: object) -> None:
        self.count += 1

    def remove(self) -> None:
        event.remove(self._engine, "connect", self._on_connect)


@dataclass(frozen=True)
class _Outside:
    """What acts on the app's database from outside the app."""

    admin: Engine  # on the server's admin database: terminates backends, reads activity
    observer: Engine  # on the app's database, pool-less: counts rows, takes locks
    database: str

    def terminate(self, pids: set[int] | None = None) -> set[int]:
        """Terminate *pids* (default: every backend of the database); wait until gone."""
        return _terminate(self.admin, self.database, pids)

    def waiting_on_lock(self) -> set[int]:
        """The app's backends currently waiting for a lock."""
        return _backends(self.admin, self.database, waiting_on_lock=True)

    def rows(self, user: str) -> list[tuple[int, str]]:
        """(id, title) of *user*'s stored tasks, by id."""
        with self.observer.connect() as conn:
            result = conn.execute(
                text("select id, title from tasks where user_id = :u order by id"), {"u": user}
            )
            return [(row.id, row.title) for row in result]


@pytest.fixture
def outside(admin_engine: Engine, scratch_url: URL) -> Iterator[_Outside]:
    """Admin and observer access to the app's scratch database."""
    observer = create_engine(scratch_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    yield _Outside(admin_engine, observer, scratch_url.database or "")
    observer.dispose()


@pytest.fixture
def connects(engine: Engine) -> Iterator[_Connects]:
    """Counts the connections the app's engine opens during the test."""
    counter = _Connects(engine)
    yield counter
    counter.remove()


@dataclass
class _Case:
    """One repository call made right after its connections were killed."""

    call: Callable[[TaskRepository, Task], object]
    check: Callable[[object, Task], bool]
    row_delta: int


_CASES = {
    "create": _Case(
        lambda r, t: r.create(ALICE, TaskCreate(title="after kill")),
        lambda out, t: isinstance(out, Task) and out.title == "after kill",
        +1,
    ),
    "create_many": _Case(
        lambda r, t: r.create_many(ALICE, [TaskCreate(title=f"many {i}") for i in range(3)]),
        lambda out, t: isinstance(out, list) and len(out) == 3,
        +3,
    ),
    "get": _Case(lambda r, t: r.get(ALICE, t.id or 0), lambda out, t: out == t, 0),
    "list": _Case(
        lambda r, t: r.list(ALICE),
        lambda out, t: isinstance(out, list) and [x.title for x in out] == ["second", "first"],
        0,
    ),
    "update": _Case(
        lambda r, t: r.update(ALICE, t.id or 0, TaskUpdate(title="renamed", complete=True)),
        lambda out, t: isinstance(out, Task) and out.title == "renamed" and out.complete,
        0,
    ),
    "delete": _Case(lambda r, t: r.delete(ALICE, t.id or 0), lambda out, t: out is True, -1),
    "count": _Case(lambda r, t: r.count(ALICE), lambda out, t: out == 2, 0),
}


@pytest.mark.parametrize("method", sorted(_CASES))
def test_every_method_survives_terminated_connections(
    method: str, engine: Engine, outside: _Outside, connects: _Connects, relayed: bool
) -> None:
    """After every backend of the database is terminated, each method's next call just works."""
    case = _CASES[method]
    repo = _repo(engine)
    first = repo.create(ALICE, TaskCreate(title="first"))
    repo.create(ALICE, TaskCreate(title="second"))
    repo.create(BOB, TaskCreate(title="bystander"))
    _warm_pool(engine)
    before_alice, before_bob = outside.rows(ALICE), outside.rows(BOB)
    opened = connects.count

    killed = outside.terminate()

    assert len(killed) >= 3  # the warmed pool really held server connections
    outcome = case.call(repo, first)
    assert case.check(outcome, first), outcome
    after_alice = outside.rows(ALICE)
    assert len(after_alice) == len(before_alice) + case.row_delta  # no write applied twice
    assert len({title for _, title in after_alice}) == len(after_alice)
    assert outside.rows(BOB) == before_bob
    if not relayed:
        assert connects.count > opened  # a fresh connection replaced the dead one
    # Behind a relay (PgBouncer, Neon's proxy) the client's own connection may live on:
    # the relay replaces the server side, and the checks above are what must hold.


def test_health_checks_answer_on_the_server_under_test(engine: Engine) -> None:
    """check_database and wait_for_database succeed and report the connection's own TLS."""
    wait_for_database_(engine, attempts=1)
    health = check_database(engine)
    assert health.ok, health.detail
    assert health.server_version[:1].isdigit()
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        assert health.ssl is bool(dbapi.info.ssl_in_use)


def test_healthy_idle_connections_are_reused(engine: Engine, connects: _Connects) -> None:
    """The liveness check at checkout never rejects a healthy idle connection."""
    repo = _repo(engine)
    repo.count(ALICE)  # opens (or reuses) one pooled connection
    opened = connects.count
    for i in range(20):
        repo.create(ALICE, TaskCreate(title=f"t{i}"))
        repo.list(ALICE, limit=5)
    assert connects.count == opened
    assert repo.count(ALICE) == 20


def test_connection_dropped_right_after_a_write_keeps_the_write_and_the_pool_slot(
    engine: Engine, outside: _Outside
) -> None:
    """A write whose connection dies after it completed returns its row; the pool stays whole."""
    repo = _repo(engine)
    repo.count(ALICE)  # the pooled connection has served a call before, as in production
    fired: list[int] = []

    def kill_own_backend(conn: Connection, *_args: object) -> None:
        if not fired:
            pid = conn.connection.dbapi_connection.get_backend_pid()  # type: ignore[union-attr]
            fired.append(pid)
            outside.terminate({pid})

    event.listen(engine, "after_cursor_execute", kill_own_backend)
    try:
        task = repo.create(ALICE, TaskCreate(title="applied"))
    finally:
        event.remove(engine, "after_cursor_execute", kill_own_backend)
    assert fired  # the backend really died between the INSERT and the return to the pool
    assert task.title == "applied"
    assert outside.rows(ALICE) == [(task.id, "applied")]
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    assert pool.checkedout() == 0  # the connection went back to the pool, not leaked
    assert repo.get(ALICE, task.id or 0) == task


@contextmanager
def _tasks_locked(observer: Engine) -> Iterator[None]:
    """Hold an exclusive lock on the tasks table: the app's statements queue behind it."""
    with observer.connect() as conn:
        conn.execution_options(isolation_level="READ COMMITTED")
        with conn.begin():
            conn.execute(text("lock table tasks in access exclusive mode"))
            yield


@dataclass
class _Call:
    """A repository call running in its own thread, with its outcome."""

    target: Callable[[], object]
    result: object = None
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.target()
        except BaseException as err:  # noqa: BLE001 - inspected by the test
            self.error = err

    def join(self) -> None:
        self.thread.join(timeout=_WAIT)
        assert not self.thread.is_alive(), "the call is still blocked"


def test_write_lost_in_flight_is_reported_and_not_retried(
    engine: Engine, outside: _Outside
) -> None:
    """A write whose connection dies after it was sent raises DatabaseUnavailableError, once."""
    _repo(engine).count(ALICE)  # schema and pool warm, so only the INSERT can block
    with _tasks_locked(outside.observer):
        call = _Call(lambda: _repo(engine).create(ALICE, TaskCreate(title="in flight")))
        _wait_for(lambda: bool(outside.waiting_on_lock()), "the INSERT to queue")
        outside.terminate(outside.waiting_on_lock())
        # Joined while the lock is still held: a retried INSERT would block here.
        call.join()
    assert isinstance(call.error, DatabaseUnavailableError), call.error
    assert "not retried" in str(call.error)
    assert outside.rows(ALICE) == []


def test_read_lost_in_flight_is_retried_on_a_new_connection(
    engine: Engine, outside: _Outside
) -> None:
    """A read whose connection dies mid-statement is repeated once and returns the answer."""
    task = _repo(engine).create(ALICE, TaskCreate(title="read me"))
    with _tasks_locked(outside.observer):
        call = _Call(lambda: _repo(engine).get(ALICE, task.id or 0))
        _wait_for(lambda: bool(outside.waiting_on_lock()), "the SELECT to queue")
        killed = outside.terminate(outside.waiting_on_lock())
        # The retry queues behind the same lock, from a new backend.
        _wait_for(lambda: bool(outside.waiting_on_lock() - killed), "the retried SELECT")
    call.join()
    assert call.error is None, call.error
    assert call.result == task


def test_read_lost_inside_the_callers_transaction_is_reported(
    engine: Engine, outside: _Outside
) -> None:
    """A read cut mid-flight in the caller's transaction raises: a retry would hide its loss."""
    task = _repo(engine).create(ALICE, TaskCreate(title="read me"))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS notes (body text)"))
        conn.execute(text("TRUNCATE notes"))
    session = next(get_session(engine))
    repo = TaskRepository(session)
    written = threading.Event()
    locked = threading.Event()

    def block() -> object:
        # The caller's own transaction writes to another table, so only the read
        # meets the lock; the read joins that transaction.
        session.execute(text("INSERT INTO notes VALUES ('pending in the caller')"))
        written.set()
        locked.wait(_WAIT)
        return repo.get(ALICE, task.id or 0)

    call = _Call(block)
    assert written.wait(_WAIT)
    with _tasks_locked(outside.observer):
        locked.set()
        _wait_for(lambda: bool(outside.waiting_on_lock()), "the SELECT to queue")
        outside.terminate(outside.waiting_on_lock())
        call.join()
    assert isinstance(call.error, DatabaseUnavailableError), call.error
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM notes")).scalar_one() == 0


# -- a throwaway cluster restarted -------------------------------------------------------


@pytest.mark.slow
def test_calls_after_a_restart_succeed_and_keep_every_commit(pg_cluster: ClusterFactory) -> None:
    """After ``pg_ctl restart -m fast`` every method works and every earlier commit is there."""
    cluster = pg_cluster()
    engine = create_db_engine(cluster.url().render_as_string(hide_password=False))
    try:
        init_db(engine)
        repo = _repo(engine)
        kept = repo.create_many(ALICE, [TaskCreate(title=f"kept {i}") for i in range(10)])
        repo.update(ALICE, kept[0].id or 0, TaskUpdate(complete=True))
        repo.delete(ALICE, kept[1].id or 0)
        bob = repo.create(BOB, TaskCreate(title="bob's"))
        before = repo.list(ALICE)
        _warm_pool(engine)

        cluster.restart()

        assert repo.list(ALICE) == before
        assert repo.get(BOB, bob.id or 0) == bob
        assert repo.count(ALICE) == 9
        assert repo.count(ALICE, complete=True) == 1
        new = repo.create(ALICE, TaskCreate(title="after restart"))
        assert len(repo.create_many(BOB, [TaskCreate(title="b1"), TaskCreate(title="b2")])) == 2
        assert repo.update(ALICE, new.id or 0, TaskUpdate(complete=True)) is not None
        assert repo.delete(ALICE, kept[2].id or 0) is True
        assert repo.count(ALICE) == 9
        assert repo.count(BOB) == 3
    finally:
        engine.dispose()


@dataclass
class _Writer:
    """Creates tasks for one user in a loop; remembers what was acknowledged."""

    engine: Engine
    user: str
    acknowledged: dict[int, str] = field(default_factory=dict)
    unavailable: int = 0
    unexpected: list[BaseException] = field(default_factory=list)
    attempts: int = 0

    def run(self, stop: threading.Event) -> None:
        session: Session | None = None
        while not stop.is_set():
            self.attempts += 1
            title = f"{self.user} #{self.attempts}"
            try:
                session = session or next(get_session(self.engine))
                task = TaskRepository(session).create(self.user, TaskCreate(title=title))
            except DatabaseUnavailableError:
                self.unavailable += 1  # the server is restarting: expected, retried later
                time.sleep(0.01)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                self.unexpected.append(err)
                return
            else:
                self.acknowledged[task.id or 0] = title


@pytest.mark.slow
def test_restart_mid_workload_loses_no_acknowledged_write(pg_cluster: ClusterFactory) -> None:
    """Writers running through a restart only see DatabaseUnavailableError, and lose nothing."""
    cluster = pg_cluster()
    engine = create_db_engine(cluster.url().render_as_string(hide_password=False))
    writers = [_Writer(engine, f"writer{i}") for i in range(4)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in writers]
    try:
        init_db(engine)
        for thread in threads:
            thread.start()
        _wait_for(lambda: all(len(w.acknowledged) >= 5 for w in writers), "writes before")
        before_restart = [len(w.acknowledged) for w in writers]

        cluster.restart()
        _wait_for(
            lambda: all(
                len(w.acknowledged) >= n + 5 for w, n in zip(writers, before_restart, strict=True)
            ),
            "writes after the restart",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=_WAIT)
    try:
        assert [w.unexpected for w in writers] == [[] for _ in writers]
        with engine.connect() as conn:
            for writer in writers:
                stored: dict[int, str] = dict(
                    conn.execute(
                        text("select id, title from tasks where user_id = :u"), {"u": writer.user}
                    ).all()
                )
                # Every acknowledged write survived the restart, unchanged...
                assert {i: stored.get(i) for i in writer.acknowledged} == writer.acknowledged
                # ...and none was applied twice; only writes lost in flight may be extra.
                assert len(set(stored.values())) == len(stored)
                assert len(stored) - len(writer.acknowledged) <= writer.unavailable
    finally:
        engine.dispose()


# -- startup with the server down --------------------------------------------------------


class _RecordingClock:
    """The time module as todo_backend.db sees it, with sleep() recorded."""

    def __init__(self, recorded: list[float]) -> None:
        self._recorded = recorded

    def sleep(self, seconds: float) -> None:
        self._recorded.append(seconds)
        time.sleep(seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays wait_for_database sleeps between attempts (it still really sleeps)."""
    recorded: list[float] = []
    monkeypatch.setattr("todo_backend.db.time", _RecordingClock(recorded))
    return recorded


def _attempt_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "todo_backend.db" and "database not ready" in r.getMessage()
    ]


def test_wait_for_database_gives_up_after_its_attempts(
    caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    """With nothing listening, wait_for_database tries exactly *attempts* times, backing off."""
    port = free_port()
    engine = create_db_engine(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    caplog.set_level(logging.WARNING, logger="todo_backend.db")
    try:
        with pytest.raises(DatabaseUnavailableError) as raised:
            wait_for_database_(engine, attempts=4, base_delay=0.01)
    finally:
        engine.dispose()
    logs = _attempt_logs(caplog)
    assert [f"(attempt {n} of 4)" in line for n, line in enumerate(logs, 1)] == [True] * 4
    assert len(sleeps) == 3  # between attempts, not after the last
    assert all(0 <= s <= 0.01 * 2**n for n, s in enumerate(sleeps))
    message = str(raised.value)
    assert "after 4 attempts" in message
    assert f"127.0.0.1:{port}" in message


@pytest.mark.slow
def test_wait_for_database_succeeds_when_the_server_comes_up_during_the_wait(
    pg_cluster: ClusterFactory, caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    """A server started while the application waits is picked up by a later attempt."""
    cluster = pg_cluster(start=False)
    engine = create_db_engine(cluster.url().render_as_string(hide_password=False))
    caplog.set_level(logging.WARNING, logger="todo_backend.db")
    failures: list[BaseException] = []

    def start_after_first_failure() -> None:
        try:
            _wait_for(lambda: bool(sleeps), "the first failed attempt")
            cluster.start()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            failures.append(err)

    starter = threading.Thread(target=start_after_first_failure, daemon=True)
    starter.start()
    try:
        wait_for_database_(engine, attempts=12, base_delay=0.05)
        starter.join(timeout=_WAIT)
        assert failures == []
        attempts = len(_attempt_logs(caplog))
        assert 1 <= attempts < 12
        assert len(sleeps) == attempts
        assert check_database(engine).ok
    finally:
        starter.join(timeout=_WAIT)
        engine.dispose()
