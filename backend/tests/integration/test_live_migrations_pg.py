"""Migrations on a live database: bounded lock waits, retries, online steps, INVALID indexes.

Direct on the server under test, and through a PgBouncer of our own in transaction
mode. Timing appears only as generous liveness bounds; the worst wait seen is printed
(``-s``) for the benchmark notes.
"""

from __future__ import annotations

import ast
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

import psycopg2  # type: ignore[import-untyped]
import pytest
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError

from tests.cli_runner import cli_env, run_cli
from tests.fix_servers import PgBouncerFactory
from tests.migration_scripts import HEAD, SCRATCH, scripts_with
from todo_backend import migrate
from todo_backend.config import Settings
from todo_backend.db import create_db_engine, get_session
from todo_backend.errors import DatabaseTimeoutError, DatabaseUnavailableError
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

ADD_COLUMN = 'op.add_column("tasks", sa.Column("rank", sa.BigInteger(), nullable=True))'
READER = "nightly-report"
_VALID = text(
    "select conname, convalidated from pg_constraint "
    "where conrelid = to_regclass('public.tasks') and conname like '%\\_text' order by conname"
)


def _emptied(database: URL) -> str:
    admin = create_engine(database, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    admin.dispose()
    return database.render_as_string(hide_password=False)


@pytest.fixture
def url(scratch_url: URL) -> str:
    """The module's scratch database on the server under test, its schema emptied."""
    return _emptied(scratch_url)


@pytest.fixture(params=["direct", pytest.param("pgbouncer", marks=pytest.mark.pgbouncer)])
def live_url(request: pytest.FixtureRequest, scratch_url: URL) -> str:
    """An emptied database: direct on the server under test, or through our own PgBouncer.

    The PgBouncer (transaction mode, four server connections) fronts a database on
    our own cluster, since the server under test may not be reachable to one.
    """
    if request.param == "direct":
        return _emptied(scratch_url)
    own: URL = request.getfixturevalue("own_scratch_url")
    pgbouncer: PgBouncerFactory = request.getfixturevalue("pgbouncer")
    _emptied(own)
    bouncer = pgbouncer(own, pool_size=4)
    database = own.database
    assert database is not None
    return bouncer.url(database).render_as_string(hide_password=False)


@contextmanager
def reading(url: str, seconds: float) -> Iterator[threading.Thread]:
    """Hold a reader's transaction on tasks (ACCESS SHARE) for *seconds*, in a thread.

    The block starts once the reader holds its lock; it ends after the reader commits.
    """
    engine = create_engine(url, connect_args={"application_name": READER})
    holding = threading.Event()

    def hold() -> None:
        with engine.connect() as conn, conn.begin():
            conn.execute(text("select count(*) from tasks"))
            holding.set()
            time.sleep(seconds)

    thread = threading.Thread(target=hold, name="reader", daemon=True)
    thread.start()
    try:
        assert holding.wait(30), "the reader never got its lock"
        yield thread
    finally:
        thread.join(60)
        engine.dispose()


@contextmanager
def holding_open(url: str) -> Iterator[int]:
    """Hold a reader's transaction on tasks until the block ends; yield its pid."""
    engine = create_engine(url, connect_args={"application_name": READER})
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(text("select count(*) from tasks"))
            yield int(conn.execute(text("select pg_backend_pid()")).scalar_one())
    finally:
        engine.dispose()


def _columns(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {column["name"] for column in inspect(engine).get_columns("tasks")}
    finally:
        engine.dispose()


def test_the_application_waits_at_most_the_migration_bound_while_a_reader_blocks_it(
    live_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A migration blocked by a reader retries; meanwhile every repository call succeeds."""
    migrate.upgrade(live_url)
    app = create_db_engine(live_url)  # DB_LOCK_TIMEOUT 5 s: longer than the migration's 1 s
    repo = TaskRepository(next(get_session(app)))
    task = repo.create("alice", TaskCreate(title="live"))
    assert task.id is not None
    scripts_with(tmp_path, monkeypatch, ADD_COLUMN)
    waits: list[float] = []
    failures: list[BaseException] = []
    result: list[migrate.UpgradeResult] = []

    def migrating() -> None:
        try:
            result.append(migrate.upgrade(live_url, lock_timeout=1, retry_for=60))
        except BaseException as err:  # noqa: BLE001 - reported by the test's thread
            failures.append(err)

    with caplog.at_level("WARNING", logger="todo_backend.migrate"), reading(live_url, 6):
        migration = threading.Thread(target=migrating, name="migration", daemon=True)
        migration.start()
        while migration.is_alive():
            started = time.monotonic()
            assert repo.get("alice", task.id) is not None
            repo.update("alice", task.id, TaskUpdate(complete=True))
            waits.append(time.monotonic() - started)
        migration.join()
    app.dispose()
    assert not failures, failures
    assert result == [(HEAD, SCRATCH)]
    assert "rank" in _columns(live_url)
    assert any("retrying" in record.getMessage() for record in caplog.records)
    print(f"\nworst application call while the migration waited: {max(waits):.3f} s")
    assert max(waits) < 4  # liveness: the 1 s migration bound, never the reader's 6 s


def test_a_migration_that_never_gets_its_lock_names_the_blocker_and_applies_nothing(
    live_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its retry budget the upgrade fails naming the reader; the revision is not applied."""
    migrate.upgrade(live_url)
    scripts_with(
        tmp_path,
        monkeypatch,
        f"""
        op.create_table("half_done", sa.Column("id", sa.BigInteger(), primary_key=True))
        {ADD_COLUMN}
        """,
    )
    with (
        holding_open(live_url) as pid,
        pytest.raises(migrate.MigrationLockTimeoutError) as caught,
    ):
        migrate.upgrade(live_url, lock_timeout=0.2, retry_for=1.5)
    message = str(caught.value)
    assert f"pid {pid} (application_name {READER!r}, idle in transaction" in message
    assert "holds AccessShareLock on tasks" in message
    assert "DB_MIGRATION_RETRY_FOR=1.5 s" in message
    assert "nothing of it is applied" in message
    assert len(caught.value.blockers) == 1
    assert migrate.current_revision(live_url) == HEAD
    assert "rank" not in _columns(live_url)
    engine = create_engine(live_url)
    assert "half_done" not in inspect(engine).get_table_names()
    engine.dispose()


def test_todo_db_migrate_exits_non_zero_naming_the_blocking_session(
    url: str, tmp_path: Path
) -> None:
    """`todo-db migrate` gives up after DB_MIGRATION_RETRY_FOR with the blocker in its error."""
    migrate.upgrade(url, "0001")
    env = cli_env(DATABASE_URL=url, DB_MIGRATION_LOCK_TIMEOUT="0.2", DB_MIGRATION_RETRY_FOR="1")
    with holding_open(url) as pid:
        result = run_cli("migrate", cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "revision 0002 could not get its table locks" in result.stderr
    assert f"pid {pid} (application_name {READER!r}" in result.stderr
    assert "pg_terminate_backend" in result.stderr
    assert migrate.current_revision(url) == "0001"


def test_the_lock_timeout_error_tells_a_held_row_from_a_locked_table(url: str) -> None:
    """DB_LOCK_TIMEOUT's message names a held row, or a table behind a schema change."""
    migrate.upgrade(url)
    app = create_db_engine(Settings(database_url=url, lock_timeout=0.2))
    repo = TaskRepository(next(get_session(app)))
    task = repo.create("alice", TaskCreate(title="row"))
    assert task.id is not None
    other = create_engine(url)
    try:
        with other.connect() as conn, conn.begin():
            conn.execute(text("select id from tasks where id = :id for update"), {"id": task.id})
            with pytest.raises(DatabaseTimeoutError) as row:
                repo.update("alice", task.id, TaskUpdate(title="x"))
        assert "the task is locked by another transaction" in str(row.value)
        with other.connect() as conn, conn.begin():
            conn.execute(text("lock table tasks in access exclusive mode"))
            with pytest.raises(DatabaseTimeoutError) as table:
                repo.get("alice", task.id)
        message = str(table.value)
        assert "queued behind a table lock" in message
        assert "todo-db migrate" in message
        assert "locked by another transaction" not in message
        assert table.value.bound == row.value.bound == "DB_LOCK_TIMEOUT"
    finally:
        other.dispose()
        app.dispose()


def test_0002_commits_its_not_valid_constraints_first_and_a_rerun_resumes(url: str) -> None:
    """0002's constraints hold for new writes once added; a rerun validates them and finishes."""
    migrate.upgrade(url, "0001")
    engine = create_engine(url)
    # The state a failure after 0002's commit point leaves: its first transaction ran.
    first, _ = migrate.upgrade_sql("postgresql://", "0001:0002").split("COMMIT;", 1)
    with engine.connect() as conn:
        conn.exec_driver_sql(first.replace("BEGIN;", "", 1))
        conn.commit()
    with engine.connect() as conn:
        assert conn.execute(_VALID).all() == [
            ("ck_tasks_description_text", False),
            ("ck_tasks_title_text", False),
            ("ck_tasks_user_id_text", False),
        ]
    with pytest.raises(IntegrityError, match="ck_tasks_title_text"), engine.begin() as conn:
        conn.execute(
            text(
                "insert into tasks (user_id, title, complete, created_at, updated_at) "
                "values ('bob', 'bell' || chr(7), false, now(), now())"
            )
        )
    with engine.connect() as conn:  # a writer's open transaction does not stop VALIDATE
        conn.execute(
            text(
                "insert into tasks (user_id, title, complete, created_at, updated_at) "
                "values ('bob', 'fine', false, now(), now())"
            )
        )
        assert migrate.upgrade(url, "0002", lock_timeout=0.5, retry_for=0) == ("0001", "0002")
        conn.commit()
    with engine.connect() as conn:
        assert conn.execute(_VALID).all() == [
            ("ck_tasks_description_text", True),
            ("ck_tasks_title_text", True),
            ("ck_tasks_user_id_text", True),
        ]
    engine.dispose()
    migrate.upgrade(url)  # the revisions after 0002 (row-level security)
    assert migrate.check(url).ok


def test_an_index_revision_builds_concurrently_and_a_failed_build_is_reported(
    live_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """outside_transaction() runs CREATE INDEX CONCURRENTLY; an INVALID leftover shows in check."""
    migrate.upgrade(live_url)
    engine = create_db_engine(live_url)
    repo = TaskRepository(next(get_session(engine)))
    repo.create("alice", TaskCreate(title="same"))
    repo.create("bob", TaskCreate(title="same"))
    scripts_with(
        tmp_path,
        monkeypatch,
        """
        from todo_backend.migrate import outside_transaction

        with outside_transaction():
            op.create_index(
                "ix_tasks_title_unique", "tasks", ["title"], unique=True,
                postgresql_concurrently=True, if_not_exists=True,
            )
        """,
    )
    with pytest.raises(migrate.MigrationError, match="ix_tasks_title_unique") as failed:
        migrate.upgrade(live_url)
    assert isinstance(failed.value.__cause__, IntegrityError)
    assert "DROP INDEX CONCURRENTLY ix_tasks_title_unique" in str(failed.value)
    assert migrate.current_revision(live_url) == HEAD
    # A rerun: IF NOT EXISTS skips the INVALID index, so the revision must not be recorded.
    with pytest.raises(migrate.MigrationError, match="is not recorded as applied") as rerun:
        migrate.upgrade(live_url)
    assert "index ix_tasks_title_unique on tasks is INVALID" in str(rerun.value)
    assert "DROP INDEX CONCURRENTLY ix_tasks_title_unique;" in str(rerun.value)
    assert migrate.current_revision(live_url) == HEAD
    problems = migrate.check(live_url).problems
    assert any(
        "index ix_tasks_title_unique on tasks is INVALID" in problem
        and "DROP INDEX CONCURRENTLY ix_tasks_title_unique" in problem
        for problem in problems
    ), problems

    raw = create_engine(live_url, isolation_level="AUTOCOMMIT")
    with raw.connect() as conn:
        conn.execute(text("drop index concurrently ix_tasks_title_unique"))
        conn.execute(text("delete from tasks where user_id = 'bob'"))
    raw.dispose()
    assert migrate.upgrade(live_url) == (HEAD, SCRATCH)
    with engine.connect() as conn:
        valid = conn.execute(
            text(
                "select indisvalid from pg_index "
                "where indexrelid = to_regclass('public.ix_tasks_title_unique')"
            )
        ).scalar_one()
        assert migrate.invalid_indexes(conn) == []
    assert valid is True
    engine.dispose()


ROWS = 50_000
CONCURRENT_INDEX = """
from todo_backend.migrate import outside_transaction

with outside_transaction():
    op.create_index(
        "ix_tasks_title_user_id", "tasks", ["title", "user_id"],
        postgresql_concurrently=True, if_not_exists=True,
    )
"""


def _fill(url: str, rows: int) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "insert into tasks (user_id, title, complete, created_at, updated_at) "
                "select 'u' || (g % 100), 't' || g, false, now(), now() "
                "from generate_series(1, :rows) g"
            ),
            {"rows": rows},
        )
    engine.dispose()


# Two replicas starting: alembic's proxies are process-wide, so each run is a process.
def _upgrade_process(scripts: str, url: str, log: IO[str] | None = None) -> subprocess.Popen[str]:
    """Start a run as a process, its stderr piped or written to *log*."""
    return subprocess.Popen(
        [sys.executable, "-c", _RUN_UPGRADE, scripts, url],
        env=cli_env(DB_MIGRATION_LOCK_TIMEOUT="0.2", DB_MIGRATION_RETRY_FOR="300"),
        stdout=subprocess.PIPE,
        stderr=log or subprocess.PIPE,
        text=True,
    )


# The sessions holding the lock that keeps other migration runs out of a block.
_KEEP_OUT = (
    "from pg_locks where locktype = 'advisory' and granted and database = "  # noqa: S608
    "(select oid from pg_database where datname = current_database()) "
    f"and classid = 0 and objid = {migrate._BLOCK_LOCK} and objsubid = 1"
)
_KEEP_OUT_HELD = "select count(*) " + _KEEP_OUT
_KEEP_OUT_ENDED = "select bool_and(pg_terminate_backend(pid)) " + _KEEP_OUT
_TASKS_LOCK_WAITS = (
    "select count(*) from pg_locks where not granted and relation = to_regclass('tasks')"
)


def _poll(what: str, condition: Callable[[], bool], seconds: float = 60) -> None:
    """Wait (a liveness bound, not a timing claim) until *condition* holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds:g} s"
        time.sleep(0.05)


def test_an_index_revision_completes_where_transactions_default_to_repeatable_read(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction keeping other runs out holds no snapshot the build would wait for.

    A caller's engine (or a role's default) may begin REPEATABLE READ transactions;
    the run's own build must not wait on its own second connection. A liveness bound:
    a run stuck that way has its build cancelled, and the test fails.
    """
    migrate.upgrade(url)
    _fill(url, 1_000)
    scripts_with(tmp_path, monkeypatch, CONCURRENT_INDEX)
    engine = create_engine(url, isolation_level="REPEATABLE READ")
    thread, outcome = _in_thread(lambda: migrate.upgrade(engine))
    thread.join(60)
    if thread.is_alive():
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(
                text(
                    "select pg_cancel_backend(pid) from pg_stat_progress_create_index where "
                    "datid = (select oid from pg_database where datname = current_database())"
                )
            )
        admin.dispose()
        thread.join(60)
    engine.dispose()
    assert outcome == [(HEAD, SCRATCH)], outcome
    assert _index_valid(url, "ix_tasks_title_user_id") is True


def test_an_index_revision_on_a_one_connection_engine_says_it_needs_two(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block's second connection cannot be opened: a MigrationError, nothing applied."""
    migrate.upgrade(url)
    scripts_with(tmp_path, monkeypatch, CONCURRENT_INDEX)
    settings = Settings(database_url=url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    engine = create_db_engine(settings)
    with pytest.raises(migrate.MigrationError, match="room for two connections") as raised:
        migrate.upgrade(engine)
    password = make_url(url).password
    assert password is None or str(password) not in str(raised.value)
    assert migrate.current_revision(engine) == HEAD
    with engine.connect() as conn:
        names = {index["name"] for index in inspect(conn).get_indexes("tasks")}
    assert "ix_tasks_title_user_id" not in names
    engine.dispose()


_BUILD_WAITING = (
    "select count(*) from pg_stat_progress_create_index where phase like 'waiting for writers%' "
    "and datid = (select oid from pg_database where datname = current_database())"
)


@contextmanager
def build_held_up(url: str) -> Iterator[Callable[[str], object]]:
    """Hold a writer's lock on tasks (a concurrent build waits for it) until the block ends.

    Yields a function that runs one query on its own autocommit connection.
    """
    watcher = create_engine(url, isolation_level="AUTOCOMMIT")

    def ask(sql: str) -> object:
        with watcher.connect() as conn:
            return conn.execute(text(sql)).scalar()

    writer = create_engine(url)
    try:
        with writer.connect() as held, held.begin():
            held.execute(text("set local idle_in_transaction_session_timeout = 0"))
            held.execute(text("lock table tasks in row exclusive mode"))
            yield ask
    finally:
        writer.dispose()
        watcher.dispose()


def _second_run_arrives(
    ask: Callable[[str], object], scripts: str, url: str, log: Path
) -> subprocess.Popen[str]:
    """Start a run while another's build is held up; return once it is as far as it gets.

    That is waiting for the table (its own build) or retrying, and past the deadlock
    detector's first look at its wait (twice deadlock_timeout), which then finds no
    cycle: the first build is not yet waiting for it.
    """
    with log.open("w") as stderr:
        run = _upgrade_process(scripts, url, stderr)
    _poll(
        "the second run waiting for the table or retrying",
        lambda: "retrying" in log.read_text() or bool(ask(_TASKS_LOCK_WAITS)),
    )
    wait = ask("select extract(epoch from current_setting('deadlock_timeout')::interval)")
    time.sleep(2 * float(str(wait)))
    return run


def _index_valid(url: str, name: str) -> bool | None:
    """Whether index *name* is valid; None when there is none."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return cast(
                "bool | None",
                conn.execute(
                    text("select indisvalid from pg_index where indexrelid = to_regclass(:name)"),
                    {"name": name},
                ).scalar(),
            )
    finally:
        engine.dispose()


def test_a_run_killed_during_its_build_keeps_the_next_run_out_until_the_build_ends(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica killed mid-build: its build goes on server-side, and the next run waits for it.

    The killed run's second connection is gone (its lock with it), so the next run
    must see the build itself; running the same build beside it would deadlock and
    leave the index INVALID. ``check`` meanwhile does not call the index being
    built a failed one.
    """
    migrate.upgrade(url)
    _fill(url, 1_000)
    scripts = str(scripts_with(tmp_path, monkeypatch, CONCURRENT_INDEX))
    second_log = tmp_path / "second.log"
    with build_held_up(url) as ask:
        first = _upgrade_process(scripts, url)
        _poll("the first run's build waiting for the writer", lambda: bool(ask(_BUILD_WAITING)))
        first.kill()
        first.communicate(timeout=60)
        assert ask(_BUILD_WAITING), "the killed run's build goes on on the server"
        assert not any("ix_tasks_title_user_id" in p for p in migrate.check(url).problems)
        second = _second_run_arrives(ask, scripts, url, second_log)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, (out, second_log.read_text())
    assert _index_valid(url, "ix_tasks_title_user_id") is True
    assert migrate.current_revision(url) == SCRATCH


@pytest.mark.parametrize("fault", ["terminated", "idle in transaction timeout"])
def test_a_run_whose_keep_out_connection_is_lost_still_completes(
    fault: str, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection keeping other runs out is lost mid-block: the run's own build completes.

    It is ended from outside, or a database-wide idle_in_transaction_session_timeout
    (a provider's setting) would end it: it opts out of that bound, and its loss is
    no failure of the revision.
    """
    migrate.upgrade(url)
    _fill(url, 1_000)
    scripts = str(scripts_with(tmp_path, monkeypatch, CONCURRENT_INDEX))
    database = make_url(url).database
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    if fault != "terminated":
        with admin.connect() as conn:
            conn.execute(
                text(f'alter database "{database}" set idle_in_transaction_session_timeout = 500')
            )
    try:
        with build_held_up(url) as ask:
            first = _upgrade_process(scripts, url)
            _poll("the build waiting for the writer", lambda: bool(ask(_BUILD_WAITING)))
            _poll("the keep-out lock taken", lambda: bool(ask(_KEEP_OUT_HELD)))
            if fault == "terminated":
                assert ask(_KEEP_OUT_ENDED)
                _poll("the keep-out connection gone", lambda: not ask(_KEEP_OUT_HELD))
            else:
                time.sleep(1.5)  # three times the bound
                assert ask(_KEEP_OUT_HELD) == 1, "the bound ended the keep-out connection"
    finally:
        if fault != "terminated":
            with admin.connect() as conn:
                conn.execute(
                    text(f'alter database "{database}" reset idle_in_transaction_session_timeout')
                )
        admin.dispose()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, (out, err)
    assert _index_valid(url, "ix_tasks_title_user_id") is True
    assert migrate.current_revision(url) == SCRATCH


SLOW_THEN_INDEX = "op.execute('select pg_sleep(0.5)')\n" + CONCURRENT_INDEX


def test_an_index_revision_runs_on_a_two_connection_engine_after_a_long_first_step(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for two connections is enough, even once the lock-wait watcher has looked.

    The step runs past half its lock bound before the block, so the watcher that
    names blockers has begun looking; it never keeps the block's second connection.
    """
    migrate.upgrade(url)
    scripts_with(tmp_path, monkeypatch, SLOW_THEN_INDEX)
    engine = create_db_engine(
        Settings(database_url=url, pool_size=2, max_overflow=0, pool_timeout=2)
    )
    try:
        assert migrate.upgrade(engine, lock_timeout=0.2) == (HEAD, SCRATCH)
    finally:
        engine.dispose()


def test_a_second_run_keeps_out_of_the_first_runs_concurrent_index_build(
    live_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run reaching an index revision while another builds that index waits for it.

    Two ``CREATE INDEX CONCURRENTLY`` of one index at once deadlock: the second waits
    for the first's table lock holding a snapshot, the first then waits for that
    snapshot, and if PostgreSQL cancels the first its half-built index stays INVALID,
    failing both runs. Set up step by step: the first build waits for a writer, the
    second run arrives, the deadlock detector's first look passes, the writer ends.
    """
    migrate.upgrade(live_url)
    _fill(live_url, 1_000)
    scripts = str(scripts_with(tmp_path, monkeypatch, CONCURRENT_INDEX))
    second_log = tmp_path / "second.log"
    with build_held_up(live_url) as ask:
        first = _upgrade_process(scripts, live_url)
        _poll("the first run's build waiting for the writer", lambda: bool(ask(_BUILD_WAITING)))
        second = _second_run_arrives(ask, scripts, live_url, second_log)
    (first_out, first_err), (second_out, _) = (
        run.communicate(timeout=600) for run in (first, second)
    )
    outcomes = [
        (first.returncode, first_out, first_err),
        (second.returncode, second_out, second_log.read_text()),
    ]
    assert [code for code, _, _ in outcomes] == [0, 0], outcomes
    assert _index_valid(live_url, "ix_tasks_title_user_id") is True
    assert migrate.current_revision(live_url) == SCRATCH


_RUN_UPGRADE = (
    "import sys; from pathlib import Path; from todo_backend import migrate\n"
    "if sys.argv[1]: migrate.MIGRATIONS_DIR = Path(sys.argv[1])\n"
    "print(tuple(migrate.upgrade(sys.argv[2])))"
)


@pytest.mark.parametrize("start", ["empty", "0001", "index revision"])
def test_two_migrations_at_once_take_turns_and_both_succeed(
    start: str, live_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two upgrades at once (two replicas starting): one applies, the other waits, none fails."""
    target, scripts, before = HEAD, "", None
    if start == "0001":
        before = "0001"
        migrate.upgrade(live_url, "0001")
        _fill(live_url, ROWS)
    elif start == "index revision":
        migrate.upgrade(live_url)
        _fill(live_url, ROWS)
        before = HEAD
        scripts = str(scripts_with(tmp_path, monkeypatch, CONCURRENT_INDEX))
        target = SCRATCH
    env = cli_env(DB_MIGRATION_LOCK_TIMEOUT="0.2", DB_MIGRATION_RETRY_FOR="300")
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _RUN_UPGRADE, scripts, live_url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    output = [run.communicate(timeout=600) for run in runs]
    outcomes = [(run.returncode, out, err) for run, (out, err) in zip(runs, output, strict=True)]
    assert [code for code, _, _ in outcomes] == [0, 0], outcomes
    assert not any("Traceback" in err for _, _, err in outcomes), outcomes
    results = [ast.literal_eval(out.strip()) for _, out, _ in outcomes]
    assert [after for _, after in results] == [target, target], outcomes
    # Each run says from where it applied something itself: never both from the same place.
    claims = [first for first, after in results if first != after]
    assert before in claims, outcomes
    assert len(claims) == len(set(claims)), outcomes
    assert migrate.current_revision(live_url) == target
    engine = create_engine(live_url)
    with engine.connect() as conn:
        assert migrate.invalid_indexes(conn) == []
        if start == "index revision":
            assert "ix_tasks_title_user_id" in {
                index["name"] for index in inspect(conn).get_indexes("tasks")
            }
    engine.dispose()


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Start *call* in a thread; the list gets its result or the exception it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as err:  # noqa: BLE001 - the test looks at it
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


_BY_HAND = "create index concurrently ix_by_hand on tasks (title)"


def _another_session_runs(url: str, sql: str) -> tuple[threading.Thread, list[object]]:
    """Run *sql* in autocommit on a connection of its own, in a thread (see _in_thread)."""

    def run() -> None:
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    return _in_thread(run)


def test_a_connection_lost_during_a_block_is_a_migration_error_naming_the_fix(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ends the build's session: the error says so and names the index to drop."""
    migrate.upgrade(url)
    _fill(url, 1_000)
    scripts_with(tmp_path, monkeypatch, CONCURRENT_INDEX)
    with build_held_up(url) as ask:
        thread, outcome = _in_thread(lambda: migrate.upgrade(url))
        _poll("the build waiting for the writer", lambda: bool(ask(_BUILD_WAITING)))
        ask(
            "select bool_and(pg_terminate_backend(pid)) from pg_stat_progress_create_index "
            "where datid = (select oid from pg_database where datname = current_database())"
        )
        thread.join(120)
    [raised] = outcome
    assert isinstance(raised, migrate.MigrationError), repr(raised)
    assert "DROP INDEX CONCURRENTLY ix_tasks_title_user_id" in str(raised)
    assert migrate.current_revision(url) == HEAD


def test_an_interrupt_during_a_block_stays_an_interrupt(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the build waits: the run ends with KeyboardInterrupt, not another error."""
    migrate.upgrade(url)
    _fill(url, 1_000)
    scripts = str(scripts_with(tmp_path, monkeypatch, CONCURRENT_INDEX))
    with build_held_up(url) as ask:
        run = _upgrade_process(scripts, url)
        _poll("the build waiting for the writer", lambda: bool(ask(_BUILD_WAITING)))
        run.send_signal(signal.SIGINT)
        # psycopg2 takes the signal once its statement returns: the writer ends, then.
    _, err = run.communicate(timeout=120)
    assert err.strip().splitlines()[-1].startswith("KeyboardInterrupt"), err
    assert migrate.current_revision(url) == HEAD


def test_an_index_rebuilt_concurrently_meanwhile_is_waited_for_not_reported(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REINDEX CONCURRENTLY by someone else: its new index is INVALID until done, not failed.

    The progress view names the old index, not the new INVALID one; check() leaves it
    out, and a revision finishing meanwhile waits for it, then is recorded.
    """
    migrate.upgrade(url)
    _fill(url, 1_000)
    scripts_with(tmp_path, monkeypatch, 'op.execute("select pg_sleep(1)")')
    with build_held_up(url) as ask:
        migration, migrated = _in_thread(lambda: migrate.upgrade(url, retry_for=120))
        _poll(
            "the revision running",
            lambda: bool(
                ask(
                    "select count(*) from pg_stat_activity "
                    "where query = 'select pg_sleep(1)' and state = 'active'"
                )
            ),
        )
        rebuild, rebuilt = _another_session_runs(url, "reindex index concurrently tasks_pkey")
        _poll("the rebuild waiting for the writer", lambda: bool(ask(_BUILD_WAITING)))
        problems = migrate.check(url).problems
        time.sleep(1.5)  # the revision ends and looks for INVALID indexes meanwhile
    rebuild.join(120)
    migration.join(120)
    assert rebuilt == [None]
    assert not [problem for problem in problems if "INVALID" in problem], problems
    assert migrated == [(HEAD, SCRATCH)], migrated


def test_an_index_build_by_another_session_is_named_when_the_budget_runs_out(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run backs off while someone builds an index on tasks, and says so when it gives up."""
    migrate.upgrade(url)
    _fill(url, 1_000)
    scripts_with(tmp_path, monkeypatch, 'op.execute("select 1")')
    with build_held_up(url) as ask:
        thread, built = _another_session_runs(url, _BY_HAND)
        _poll("the build waiting for the writer", lambda: bool(ask(_BUILD_WAITING)))
        with pytest.raises(migrate.MigrationError) as raised:
            migrate.upgrade(url, retry_for=1)
    thread.join(120)
    assert built == [None]
    assert "another session is building an index on the package's tables" in str(raised.value)
    assert "DB_MIGRATION_RETRY_FOR=1 s" in str(raised.value)
    assert migrate.current_revision(url) == HEAD


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (
            "with outside_transaction():\n"
            "    with outside_transaction():\n"
            "        op.execute('select 1')\n",
            "outside_transaction() blocks do not nest",
        ),
        (
            "with outside_transaction():\n    commit_point()\n",
            "commit_point() inside an outside_transaction() block",
        ),
    ],
    ids=["nested block", "commit point in a block"],
)
def test_a_block_misused_by_a_revision_fails_at_once_saying_how(
    body: str, says: str, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a wait for "another run" that is this very run: an error naming the misuse."""
    migrate.upgrade(url)
    scripts_with(
        tmp_path,
        monkeypatch,
        "from todo_backend.migrate import commit_point, outside_transaction\n" + body,
    )
    started = time.monotonic()
    with pytest.raises(migrate.MigrationError, match=re.escape(says)):
        migrate.upgrade(url, retry_for=60)
    assert time.monotonic() - started < 30  # a liveness bound: no wait for the budget
    assert migrate.current_revision(url) == HEAD


def test_a_second_connection_refused_by_the_server_is_named(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refuses the block's second connection (a role's connection limit): its reason."""
    migrate.upgrade(url)
    scripts_with(tmp_path, monkeypatch, CONCURRENT_INDEX)
    engine = create_db_engine(url)
    opened = []

    @event.listens_for(engine, "do_connect")
    def refuse_the_second(*_: object) -> None:
        opened.append(True)
        if len(opened) > 1:
            raise psycopg2.OperationalError('FATAL:  too many connections for role "migrator"')

    try:
        with pytest.raises(migrate.MigrationError) as raised:
            migrate.upgrade(engine)
    finally:
        engine.dispose()
    message = str(raised.value)
    assert 'the server refused it: FATAL:  too many connections for role "migrator"' in message
    assert "room for two connections" in message
    assert migrate.current_revision(url) == HEAD


def test_a_connection_lost_at_commit_is_not_called_a_failure_to_connect(url: str) -> None:
    """The server ends the session as a command commits: a MigrationError, not 'cannot connect'."""
    migrate.upgrade(url)
    engine = create_db_engine(url)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    armed = [True]

    @event.listens_for(engine, "commit")
    def end_the_session(conn: Connection) -> None:
        if armed.pop() if armed else False:
            pid = conn.exec_driver_sql("select pg_backend_pid()").scalar()
            with admin.connect() as other:
                other.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
            _poll("the session ended", lambda: not _alive(admin, pid))

    try:
        with pytest.raises(migrate.MigrationError) as raised:
            migrate.current_revision(engine)
    finally:
        engine.dispose()
        admin.dispose()
    assert not isinstance(raised.value, DatabaseUnavailableError)
    assert "cannot connect" not in str(raised.value)
    assert "a database call of the migration command failed" in str(raised.value)


def _alive(engine: Engine, pid: object) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text("select count(*) from pg_stat_activity where pid = :pid"), {"pid": pid}
            ).scalar()
        )


def test_a_role_that_cannot_see_others_builds_waits_for_them(
    own_scratch_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pg_read_all_stats another role's build shows on no table: taken as on tasks.

    Its INVALID index is then not called a failed build, and a run backs off; the
    role is made on our own cluster (creating one needs a superuser).
    """
    url = _emptied(own_scratch_url)
    migrate.upgrade(url)
    _fill(url, 1_000)
    scripts_with(tmp_path, monkeypatch, 'op.execute("select 1")')
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    role = "todo_no_stats"
    with admin.connect() as conn:
        conn.execute(text(f"create role {role} login"))
        conn.execute(text(f"grant usage on schema public to {role}"))
        conn.execute(text(f"grant select, update on alembic_version to {role}"))
        conn.execute(text(f"grant select on tasks to {role}"))
    as_role = make_url(url).set(username=role).render_as_string(hide_password=False)
    try:
        with build_held_up(url) as ask:
            thread, built = _another_session_runs(url, _BY_HAND)
            _poll("the build waiting for the writer", lambda: bool(ask(_BUILD_WAITING)))
            problems = migrate.check(as_role).problems
            with pytest.raises(migrate.MigrationError) as raised:
                migrate.upgrade(as_role, retry_for=1)
        thread.join(120)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("select pg_terminate_backend(pid) from pg_stat_activity where usename = :r"),
                {"r": role},
            )
            conn.execute(text(f"drop owned by {role}"))
            conn.execute(text(f"drop role {role}"))
        admin.dispose()
    assert built == [None]
    assert not [problem for problem in problems if "INVALID" in problem], problems
    assert "another session is building an index on the package's tables" in str(raised.value)
