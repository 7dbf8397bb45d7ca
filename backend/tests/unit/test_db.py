"""Engine factory, session helper, schema creation and health checks (SQLite side)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.pool import QueuePool, StaticPool

from todo_backend.config import Settings
from todo_backend.db import (
    _CLOSED,
    MAX_BACKOFF_SECONDS,
    POOL_RECYCLE_SECONDS,
    _note_closed,
    _Transaction,
    bounds_settings,
    check_database,
    create_db_engine,
    get_session,
    init_db,
    is_local_host,
    set_local_sql,
    wait_for_database,
)
from todo_backend.errors import DatabaseTimeoutError, DatabaseUnavailableError, TodoBackendError
from todo_backend.models import TaskCreate
from todo_backend.repository import TaskRepository

SECRET = "Sup3rSecretSentinel"


class _CapturedError(Exception):
    """Stops a connection attempt once its parameters are known."""


def connect_args(url: str) -> dict[str, object]:
    """The keyword arguments the engine for *url* hands to psycopg2.connect; no I/O."""
    engine = create_db_engine(url)
    captured: dict[str, object] = {}

    def capture(dialect: object, record: object, cargs: object, cparams: dict[str, object]) -> None:
        captured.update(cparams)
        raise _CapturedError

    event.listen(engine, "do_connect", capture)
    try:
        with pytest.raises(_CapturedError):
            engine.connect()
        return captured
    finally:
        engine.dispose()


def test_postgres_engine_pool_bounds_and_recycling() -> None:
    """A PostgreSQL engine pools 5..20 connections and recycles them below Neon's 300 s."""
    engine = create_db_engine(Settings(database_url="postgresql://u:p@db.example.com/app"))
    try:
        assert engine.dialect.driver == "psycopg2"
        pool = engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.size() == 5
        assert pool._max_overflow == 15
        assert pool._recycle == POOL_RECYCLE_SECONDS < 300
        assert pool._pre_ping is False
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "sslmode"),
    [
        ("postgresql://u:p@ep-x-pooler.eu-central-1.aws.neon.tech/db", "require"),
        ("postgresql://u:p@10.0.0.5/db", "require"),
        ("postgresql://u:p@db.example.com/db?sslmode=verify-full", "verify-full"),
        ("postgresql://u:p@localhost/db", None),
        ("postgresql://u:p@127.0.0.1/db", None),
        ("postgresql://u:p@[::1]/db", None),
        ("postgresql://u@/db?host=/var/run/postgresql", None),
        ("postgresql://u:p@localhost/db?hostaddr=203.0.113.5", "require"),
        ("postgresql://u@/db?host=/tmp,remote.example.com", "require"),
    ],
)
def test_remote_hosts_get_sslmode_require(url: str, sslmode: str | None) -> None:
    """Non-local hosts without an sslmode get sslmode=require; local ones keep the URL's."""
    assert connect_args(url).get("sslmode") == sslmode


def test_connect_timeout_and_keepalives_reach_the_driver() -> None:
    """connect_timeout, keepalives and the application name are passed to libpq."""
    args = connect_args("postgresql://u:p@localhost/db")
    assert args["connect_timeout"] == 10
    assert args["keepalives"] == 1
    assert args["application_name"] == "todo-backend"


def test_is_local_host() -> None:
    """Loopback names and Unix sockets count as local; anything else does not."""
    from sqlalchemy.engine import make_url

    assert is_local_host(make_url("postgresql://localhost/db"))
    assert is_local_host(make_url("postgresql:///db"))
    assert not is_local_host(make_url("postgresql://127.0.0.2/db"))
    assert not is_local_host(make_url("postgresql://db.neon.tech/db"))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@localhost/db?hostaddr=203.0.113.5",
        "postgresql://u:pw@localhost/db?hostaddr=127.0.0.1,203.0.113.5",
        "postgresql://u:pw@/db?host=/tmp,remote.example.com",
        "postgresql://u:pw@/db?host=/tmp&host=remote.example.com",
        "postgresql://u:pw@localhost,remote.example.com/db",
        "postgresql://u:pw@localhost/db?host=remote.example.com",
        "postgresql://u:pw@127.0.0.2/db",
        "postgresql://u:pw@[2001:db8::1]/db",
        "postgresql://u:pw@db.example.com/db?hostaddr=::1",
    ],
)
def test_a_url_with_any_remote_host_or_hostaddr_is_not_local(url: str) -> None:
    """Any remote host of a multi-host list, or any remote hostaddr, makes the URL remote."""
    from sqlalchemy.engine import make_url

    assert not is_local_host(make_url(url))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@localhost/db?hostaddr=127.0.0.1",
        "postgresql://u:pw@/db?host=/tmp,/var/run/postgresql",
        "postgresql://u:pw@/db?host=@abstract",
        "postgresql://u:pw@localhost,127.0.0.1/db",
        "postgresql://u:pw@[::1]/db",
    ],
)
def test_a_url_whose_every_host_is_loopback_is_local(url: str) -> None:
    """Loopback names, addresses and sockets, alone or in lists, keep the URL local."""
    from sqlalchemy.engine import make_url

    assert is_local_host(make_url(url))


def test_without_a_host_in_the_url_libpqs_environment_decides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no host in the URL, PGHOST and PGHOSTADDR (what libpq then uses) are checked."""
    from sqlalchemy.engine import make_url

    url = make_url("postgresql:///db")
    monkeypatch.setenv("PGHOST", "remote.example.com")
    assert not is_local_host(url)
    monkeypatch.setenv("PGHOST", "/tmp")
    monkeypatch.setenv("PGHOSTADDR", "203.0.113.5")
    assert not is_local_host(url)
    monkeypatch.delenv("PGHOSTADDR")
    assert is_local_host(url)


def test_memory_database_is_shared_across_sessions_and_threads() -> None:
    """sqlite:// is one database for every session and thread of the engine."""
    engine = create_db_engine("sqlite://")
    try:
        assert isinstance(engine.pool, StaticPool)
        init_db(engine)
        task = TaskRepository(next(get_session(engine))).create("u", TaskCreate(title="shared"))
        seen: list[object] = []

        def read() -> None:
            seen.append(TaskRepository(next(get_session(engine))).get("u", task.id or 0))

        reader = threading.Thread(target=read)
        reader.start()
        reader.join()
        assert seen == [task]
    finally:
        engine.dispose()


def test_file_database_enforces_foreign_keys(tmp_path: Path) -> None:
    """File databases turn foreign-key enforcement on for every connection."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'fk.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
    finally:
        engine.dispose()


def test_init_db_is_idempotent_and_keeps_data(tmp_path: Path) -> None:
    """init_db creates the table and indexes once; running it again loses nothing."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'todo.db'}")
    try:
        init_db(engine)
        repo = TaskRepository(next(get_session(engine)))
        repo.create("u", TaskCreate(title="survives"))
        init_db(engine)
        assert repo.count("u") == 1
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("tasks")}
        assert {"ix_tasks_user_id_id", "ix_tasks_user_id_complete_id"} <= indexes
    finally:
        engine.dispose()


def test_get_session_yields_a_session_that_keeps_objects_loaded() -> None:
    """get_session is a generator dependency whose session does not expire on commit."""
    engine = create_db_engine("sqlite://")
    try:
        sessions = get_session(engine)
        session = next(sessions)
        assert session.expire_on_commit is False
        sessions.close()
    finally:
        engine.dispose()


def test_check_database_reports_sqlite() -> None:
    """check_database on SQLite is ok, names the SQLite version, has no TLS state or bounds."""
    engine = create_db_engine("sqlite://")
    try:
        health = check_database(engine)
        assert health.ok
        assert health.server_version.startswith("SQLite 3.")
        assert health.ssl is None
        assert health.timeouts == {}
        assert health.latency_ms >= 0
    finally:
        engine.dispose()


def test_check_database_does_not_raise_when_unreachable(tmp_path: Path) -> None:
    """An unusable database gives ok=False with a hint, never an exception."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    try:
        health = check_database(engine)
        assert not health.ok
        assert "directory" in health.detail
    finally:
        engine.dispose()


def test_wait_for_database_gives_up_with_a_helpful_error(tmp_path: Path) -> None:
    """After the allowed attempts, DatabaseUnavailableError explains what to check."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    try:
        with pytest.raises(DatabaseUnavailableError, match="after 2 attempts"):
            wait_for_database(engine, attempts=2, base_delay=0.001)
        with pytest.raises(ValueError, match="attempts"):
            wait_for_database(engine, attempts=0)
    finally:
        engine.dispose()


def test_wait_for_database_returns_when_reachable() -> None:
    """wait_for_database returns at once for a reachable database."""
    engine = create_db_engine("sqlite://")
    try:
        wait_for_database(engine, attempts=1)
    finally:
        engine.dispose()


def test_unreachable_postgres_health_names_host_not_password() -> None:
    """For a refused PostgreSQL port the detail names host and port, never the password."""
    engine = create_db_engine(f"postgresql://app:{SECRET}@127.0.0.1:1/db")
    try:
        health = check_database(engine)
        assert not health.ok
        assert "127.0.0.1:1" in health.detail
        assert "sslmode" in health.detail
        assert SECRET not in health.detail
        with pytest.raises(DatabaseUnavailableError) as info:
            wait_for_database(engine, attempts=2, base_delay=0.001)
        assert SECRET not in str(info.value)
        assert "127.0.0.1:1" in str(info.value)
    finally:
        engine.dispose()


def test_wait_for_database_backoff_is_capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backoff doubles per attempt but no single wait exceeds MAX_BACKOFF_SECONDS."""
    sleeps: list[float] = []
    monkeypatch.setattr("todo_backend.db.time.sleep", sleeps.append)
    monkeypatch.setattr("todo_backend.db.random.uniform", lambda _low, high: high)
    engine = create_db_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    try:
        with pytest.raises(DatabaseUnavailableError):
            wait_for_database(engine, attempts=6, base_delay=1.0)
    finally:
        engine.dispose()
    assert sleeps == [1.0, 2.0, 4.0, 8.0, MAX_BACKOFF_SECONDS]


def test_no_free_pooled_connection_is_a_typed_timeout(tmp_path: Path) -> None:
    """With every pooled connection busy, a call raises DatabaseTimeoutError naming the pool."""
    engine = create_engine(
        f"sqlite:///{tmp_path / 'pool.db'}", pool_size=1, max_overflow=0, pool_timeout=0.05
    )
    init_db(engine)
    try:
        repo = TaskRepository(next(get_session(engine)))
        task = repo.create("alice", TaskCreate(title="kept"))
        with engine.connect():  # the only connection, checked out
            with pytest.raises(DatabaseTimeoutError) as single:
                repo.get("alice", task.id or 0)
            with pytest.raises(DatabaseTimeoutError), repo.atomic():
                repo.create("alice", TaskCreate(title="never stored"))
        assert single.value.bound == "DB_POOL_TIMEOUT"
        assert "DB_POOL_TIMEOUT" in str(single.value)
        assert isinstance(single.value, TodoBackendError)
        assert [t.title for t in repo.list("alice")] == ["kept"]
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


# -- the bounds' statement and the transaction the hooks follow -----------------------


def test_the_bounds_are_one_set_config_statement_in_milliseconds() -> None:
    """The three bounds become one SELECT of transaction-local set_config calls, in ms."""
    settings = Settings(
        database_url="postgresql://h/db",
        statement_timeout=7,
        lock_timeout=0.25,
        idle_in_transaction_timeout=0.0014,
    )
    assert set_local_sql(bounds_settings(settings)) == (
        "SELECT set_config('statement_timeout', '7000', true), "
        "set_config('lock_timeout', '250', true), "
        "set_config('idle_in_transaction_session_timeout', '1', true)"
    )


def test_set_local_sql_takes_more_settings_as_quoted_literals() -> None:
    """Another per-transaction setting is one more pair; quotes are doubled, never closed."""
    sql = set_local_sql([("app.user_id", "o'brien"), ("search_path", "public")])
    assert sql == (
        "SELECT set_config('app.user_id', 'o''brien', true), "
        "set_config('search_path', 'public', true)"
    )


@pytest.mark.parametrize(
    "pairs", [[], [("app.user_id", "100%")], [("a%", "b")], [("app.user_id", "x\0y")]]
)
def test_set_local_sql_refuses_what_it_cannot_send(pairs: list[tuple[str, str]]) -> None:
    """No pair at all, a '%' (the driver's formatting would rewrite it) or NUL is refused."""
    with pytest.raises(ValueError, match=r"set_local_sql|cannot be sent"):
        set_local_sql(pairs)


def _followed(*statements: str) -> _Transaction:
    tx = _Transaction()
    for statement in statements:
        if statement == "<bounds>":  # the first statement that carried the bounds
            tx.bounded_at = len(tx.savepoints)
        else:
            assert tx.follow(statement), statement
    return tx


def test_ordinary_statements_are_not_transaction_control() -> None:
    """SELECT, SET, COMMENT, STARTS-like words: none is taken for transaction control."""
    tx = _Transaction()
    for statement in ("SELECT 1", "SET LOCAL x = 1", "COMMENT ON TABLE t IS 'x'", "ENDPOINT"):
        assert not tx.follow(statement)


def test_a_savepoint_rollback_undoes_bounds_set_inside_it() -> None:
    """Bounds set after a savepoint are gone once the transaction rolls back to it."""
    tx = _followed("SAVEPOINT sa_savepoint_1", "<bounds>", "ROLLBACK TO SAVEPOINT sa_savepoint_1")
    assert tx.bounded_at is None
    assert not tx.trusted
    assert tx.savepoints == ["sa_savepoint_1"]  # ROLLBACK TO keeps the savepoint itself


def test_a_savepoint_rollback_keeps_bounds_set_before_it() -> None:
    """Bounds set before a savepoint survive a rollback to it."""
    tx = _followed("<bounds>", "SAVEPOINT a", "ROLLBACK TO a", "RELEASE SAVEPOINT a")
    assert tx.bounded_at == 0
    assert tx.trusted
    assert tx.savepoints == []


def test_a_release_hands_the_bounds_to_the_parent() -> None:
    """Released, a savepoint's settings belong to its parent: a rollback there undoes them."""
    tx = _followed("SAVEPOINT a", "SAVEPOINT b", "<bounds>", "release savepoint b;")
    assert tx.bounded_at == 1
    tx.follow("ROLLBACK TRANSACTION TO SAVEPOINT a")
    assert tx.bounded_at is None


def test_an_unknown_savepoint_is_no_longer_trusted() -> None:
    """A rollback to a savepoint the hooks never saw re-sends the bounds and trusts nothing."""
    tx = _followed("<bounds>", "ROLLBACK TO SAVEPOINT elsewhere")
    assert tx.bounded_at is None
    assert not tx.trusted
    tx = _followed("<bounds>", "RELEASE elsewhere")
    assert tx.bounded_at == 0
    assert not tx.trusted


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK", "END", "ABORT"])
def test_a_transaction_ended_by_a_statement_starts_over(end: str) -> None:
    """COMMIT or ROLLBACK sent as SQL: the next statement is a new transaction's first."""
    tx = _followed("<bounds>", "SAVEPOINT a", end)
    assert tx.bounded_at is None
    assert tx.savepoints == []
    assert not tx.trusted


@pytest.mark.parametrize(
    "statement",
    [
        "/* undo */ ROLLBACK TO SAVEPOINT a",
        "-- undo\nROLLBACK TO SAVEPOINT a",
        "  /* outer /* nested */ still */ -- and a line\n\t rollback to a;",
    ],
)
def test_comments_before_a_control_statement_are_skipped(statement: str) -> None:
    """A leading comment hides no ROLLBACK TO SAVEPOINT: the bounds it undoes are sent again."""
    tx = _followed("SAVEPOINT a", "<bounds>")
    assert tx.follow(statement)
    assert tx.bounded_at is None
    assert tx.savepoints == ["a"]


@pytest.mark.parametrize(
    "statement",
    [
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "set transaction read only",
        "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
        "/* first */ SET TRANSACTION DEFERRABLE",
        "SET LOCAL transaction_isolation = 'repeatable read'",
        "SET transaction_read_only TO on",
        "set session transaction_deferrable = on",
    ],
)
def test_what_must_precede_any_query_leaves_the_bounds_to_the_next(statement: str) -> None:
    """SET TRANSACTION and its GUC spellings go out alone and do not use up the first statement."""
    tx = _Transaction()
    assert tx.follow(statement)
    assert tx.bounded_at is None
    assert tx.trusted


@pytest.mark.parametrize(
    "statement",
    [
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SET transaction_timeout = 5",
        "/* unterminated SET TRANSACTION READ ONLY",
        "SELECT 1 -- SET TRANSACTION READ ONLY",
    ],
)
def test_other_sets_are_ordinary_statements(statement: str) -> None:
    """Statements allowed after a query, or no SET TRANSACTION at all, carry the bounds."""
    assert not _Transaction().follow(statement)


_ANY = Settings(database_url="sqlite://")


class _Driver:
    """Stands in for a driver connection: only its socket is looked at."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        """The client end of the socket pair."""
        return self._sock.fileno()


def _closed_evidence(
    server_sends: bytes | None, tx: _Transaction, settings: Settings
) -> bool | None:
    """What _note_closed records for a socket whose server end sent *server_sends* and hung up."""
    client, server = socket.socketpair()
    try:
        if server_sends is not None:
            server.sendall(server_sends)
            server.close()
        conn = SimpleNamespace(
            connection=SimpleNamespace(dbapi_connection=_Driver(client)), info={}
        )
        _note_closed(conn, tx, settings)  # type: ignore[arg-type]
        return conn.info.get(_CLOSED)  # type: ignore[no-any-return]
    finally:
        client.close()
        server.close()


def _fatal(code: str) -> bytes:
    fields = b"SFATAL\0VFATAL\0C" + code.encode() + b"\0Mterminating connection\0\0"
    return b"E" + (len(fields) + 4).to_bytes(4, "big") + fields


def _idle_for(seconds: float, *, trusted: bool = True) -> _Transaction:
    tx = _followed("<bounds>")
    tx.idle_since, tx.sent_at, tx.trusted = 0.0, seconds, trusted
    return tx


def test_an_open_socket_is_no_evidence_of_an_ended_transaction() -> None:
    """However long the transaction looked idle, an open socket says nothing was ended."""
    assert _closed_evidence(None, _idle_for(60), _ANY) is None


def test_the_servers_idle_timeout_message_is_the_idle_bound() -> None:
    """FATAL 25P03 before the hang-up names the idle bound, whatever the measured gap."""
    assert _closed_evidence(_fatal("25P03"), _idle_for(0), _ANY) is True


def test_another_fatal_message_is_a_lost_connection() -> None:
    """A terminated backend (FATAL 57P01) ended the transaction, but not for the idle bound."""
    assert _closed_evidence(_fatal("57P01"), _idle_for(60), _ANY) is False


def test_an_unreadable_hang_up_is_put_down_to_the_rounded_idle_bound() -> None:
    """Over TLS the gap decides, against the milliseconds the server enforces (1.6 ms is 2 ms)."""
    tls = b"\x17\x03\x03\x00\x10" + b"\0" * 16
    settings = Settings(database_url="sqlite://", idle_in_transaction_timeout=0.0016)
    assert _closed_evidence(tls, _idle_for(0.0018), settings) is False
    assert _closed_evidence(tls, _idle_for(0.002), settings) is True
    assert _closed_evidence(b"", _idle_for(0.002), settings) is True
    assert _closed_evidence(b"", _idle_for(60, trusted=False), settings) is False
