"""The data layer through PgBouncer in transaction pool mode, as behind Neon's pooled endpoint.

Transaction pooling hands each transaction (in autocommit: each statement) to any free
server connection, so nothing may rely on session state: no session-level SET, no
server-side prepared statements, no LISTEN, no advisory locks or cursors held across
transactions. The repository contract runs through a PgBouncer of our own (in front
of a throwaway cluster, whatever server TEST_DATABASE_URL names); a concurrency test
squeezes many clients through two server connections; and the server's own statement
log shows the engine never sends anything session-scoped.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from tests.fix_servers import ClusterFactory, PeakSampler, PgBouncerFactory, PgCluster
from tests.repository_contract import RepositoryContract
from todo_backend.db import check_database, create_db_engine, get_session, init_db
from todo_backend.db import wait_for_database as wait_for_database_
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

pytestmark = pytest.mark.pgbouncer


def _url_text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.fixture
def engine(
    own_engine: Engine, own_scratch_url: URL, pgbouncer: PgBouncerFactory
) -> Iterator[Engine]:
    """The package's engine on a database of our own cluster, through a fresh PgBouncer."""
    bouncer = pgbouncer(own_scratch_url)
    bounced = create_db_engine(_url_text(bouncer.url(own_scratch_url.database or "")))
    yield bounced
    bounced.dispose()


class TestRepositoryThroughPgBouncer(RepositoryContract):
    """The shared repository contract, through PgBouncer in transaction pool mode."""


def test_health_checks_work_through_pgbouncer(engine: Engine) -> None:
    """check_database and wait_for_database answer through PgBouncer like direct."""
    wait_for_database_(engine, attempts=1)
    health = check_database(engine)
    assert health.ok, health.detail
    assert health.server_version


@dataclass
class _Client:
    """One API worker: its own session, its own tasks, what it expects to remain."""

    engine: Engine
    user: str
    kept: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)

    def run(self, barrier: threading.Barrier) -> None:
        try:
            with self.engine.connect() as conn:
                # Autocommit: an idle client connection holds no server connection.
                conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql("select 1")
                barrier.wait(timeout=30)  # every client connected at once
            self._work()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)
            barrier.abort()

    def _work(self) -> None:
        repo = TaskRepository(next(get_session(self.engine)))
        mine = [repo.create(self.user, TaskCreate(title=f"{self.user} {i}")) for i in range(6)]
        mine += repo.create_many(self.user, [TaskCreate(title=f"batch {i}") for i in range(4)])
        ids = [t.id or 0 for t in mine]
        for task_id in ids[:4]:
            assert repo.update(self.user, task_id, TaskUpdate(complete=True)) is not None
        for task_id in ids[-2:]:
            assert repo.delete(self.user, task_id) is True
        with repo.atomic():
            extra = repo.create(self.user, TaskCreate(title="atomic", complete=True))
            assert repo.update(self.user, ids[4], TaskUpdate(title="renamed")) is not None
        self.kept = {*ids[:-2], extra.id or 0}
        self.done = {*ids[:4], extra.id or 0}
        for task_id in self.kept:
            got = repo.get(self.user, task_id)
            assert got is not None
            assert got.user_id == self.user
        assert all(t.user_id == self.user for t in repo.list(self.user, limit=100))


def test_health_reports_the_clients_own_tls_behind_a_pooler(
    own_scratch_url: URL, own_cluster: PgCluster, pgbouncer: PgBouncerFactory
) -> None:
    """Behind a TLS pooler whose server hop is plain, check_database reports TLS on.

    That is Neon's pooled endpoint: the pooler sits next to the server, so the server
    sees a plain-text connection while the one leaving the client's machine is
    encrypted, and that one is what the health check must tell about.
    """
    bouncer = pgbouncer(own_scratch_url, tls=True)
    url = bouncer.url(own_scratch_url.database or "").update_query_dict({"sslmode": "require"})
    engine = create_db_engine(_url_text(url))
    try:
        health = check_database(engine)
        with own_cluster.admin_engine().connect() as conn:
            server_side = conn.execute(
                text(
                    "select bool_or(s.ssl) from pg_stat_ssl s join pg_stat_activity a using (pid)"
                    " where a.datname = :db"
                ),
                {"db": own_scratch_url.database},
            ).scalar_one()
    finally:
        engine.dispose()
    assert health.ok, health.detail
    assert health.ssl is True
    assert server_side is False  # the pooler's own connection to the server is plain


def test_concurrent_clients_share_two_server_connections(
    own_engine: Engine, own_cluster: PgCluster, own_scratch_url: URL, pgbouncer: PgBouncerFactory
) -> None:
    """Sixteen concurrent clients through a 2-connection PgBouncer pool get exact results."""
    own_engine.dispose()  # from here on, every backend of the database is PgBouncer's
    database = own_scratch_url.database or ""
    bouncer = pgbouncer(own_scratch_url, pool_size=2)
    engine = create_db_engine(_url_text(bouncer.url(database)))
    clients = [_Client(engine, f"user{i % 8}") for i in range(16)]
    barrier = threading.Barrier(len(clients))
    threads = [threading.Thread(target=c.run, args=(barrier,), daemon=True) for c in clients]
    try:
        with PeakSampler(
            own_cluster.admin_engine(),
            "select count(*) from pg_stat_activity where datname = :db",
            {"db": database},
        ) as servers:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert [c.errors for c in clients] == [[] for _ in clients]
        assert 1 <= servers.peak <= 2  # sixteen clients, never more than two server backends
        repo = TaskRepository(next(get_session(engine)))
        for user in sorted({c.user for c in clients}):
            kept = set().union(*(c.kept for c in clients if c.user == user))
            done = set().union(*(c.done for c in clients if c.user == user))
            assert {t.id for t in repo.list(user, limit=100)} == kept
            assert repo.count(user) == len(kept) == 18
            assert repo.count(user, complete=True) == len(done) == 10
    finally:
        engine.dispose()


# -- no session state ----------------------------------------------------------------

# Anything that outlives one transaction on a server connection: PgBouncer's
# transaction pooling would leak it to other clients or lose it between statements.
# Checked at the start of every statement of a (multi-statement) query string; SET
# LOCAL and set_config(..., true) end with their transaction and are the only ways of
# setting allowed.
_SESSION_STATE = re.compile(
    r"(^|;)\s*(SET(?!\s+LOCAL\b)|RESET|PREPARE|EXECUTE|DEALLOCATE|LISTEN|UNLISTEN|DECLARE"
    r"|DISCARD|LOAD)\b"
    r"|pg_advisory_lock|pg_advisory_unlock|\bTEMP(ORARY)?\s+TABLE\b"
    r"|set_config\s*\((?![^()]*,\s*true\s*\))",
    re.IGNORECASE,
)
# The engine's bounds, sent in the same query message as a transaction's first statement.
_BOUNDS = re.compile(
    r"^SELECT set_config\('statement_timeout', '\d+', true\), "
    r"set_config\('lock_timeout', '\d+', true\), "
    r"set_config\('idle_in_transaction_session_timeout', '\d+', true\)"
    # The application role and the row-level security user ride with them.
    r"(, set_config\('role', .*?, true\), set_config\('todo\.user_id', .*?, true\))?"
    r"(; |$)"
)
# The row-level security user, set again in front of a later statement of a transaction.
_USER = re.compile(r"^SELECT set_config\('todo\.user_id', .*?, true\)(; |$)")
_LOG_START = re.compile(r"^@@(?P<app>[^|]*)\|(?P<pid>\d+)\|(?P<kind>[A-Z]+):  (?P<message>.*)$")
_SAVEPOINTS = re.compile(r"^(SAVEPOINT|RELEASE|ROLLBACK TO)\b")
# SQLAlchemy's own probes of a new engine's first connection (server version, hstore),
# sent on the driver connection before the engine's hooks exist for it.
_DIALECT_PROBES = re.compile(r"^(select pg_catalog\.version\(\)|SELECT t\.oid, typarray\b)")


def _app_log(log: str) -> list[tuple[str, str]]:
    """The (backend pid, message) the server logged for the application, multi-line joined."""
    messages: list[tuple[str, str, str]] = []
    for line in log.splitlines():
        start = _LOG_START.match(line)
        if start:
            messages.append((start["app"], start["pid"], start["message"]))
        elif messages:
            app, pid, message = messages[-1]
            messages[-1] = (app, pid, f"{message}\n{line}")
    return [(pid, message) for app, pid, message in messages if app == "todo-backend"]


def _misplaced_bounds(sent: list[tuple[str, str]]) -> tuple[list[str], list[str], list[str]]:
    """Check each backend's statements: (unbounded firsts, bounded laters, unbounded autocommits).

    psycopg2 opens a transaction with a BEGIN of its own: the transaction's first
    statement after it must carry the bounds, later ones and savepoints must not; a
    statement outside any transaction (autocommit) on tasks must carry them.
    """
    first: dict[str, bool | None] = {}  # pid -> awaiting the first statement? None: no tx
    unbounded_firsts: list[str] = []
    bounded_laters: list[str] = []
    unbounded_autocommits: list[str] = []
    for pid, statement in sent:
        bounded = _BOUNDS.match(statement) is not None
        if statement in ("BEGIN", "COMMIT", "ROLLBACK"):
            first[pid] = True if statement == "BEGIN" else None
        elif _SAVEPOINTS.match(statement) or first.get(pid) is False:
            if bounded:
                bounded_laters.append(statement)
        elif first.get(pid):
            first[pid] = False
            if not bounded and not _DIALECT_PROBES.match(statement):
                unbounded_firsts.append(statement)
        elif re.search(r"\btasks\b", statement) and not bounded:
            unbounded_autocommits.append(statement)
    return unbounded_firsts, bounded_laters, unbounded_autocommits


def test_engine_keeps_no_session_state(pg_cluster: ClusterFactory) -> None:
    """The engine bounds each transaction once, keeps nothing past it, and sends simple queries."""
    cluster = pg_cluster(settings={"log_statement": "all", "log_line_prefix": "@@%a|%p|"})
    engine = create_db_engine(_url_text(cluster.url()))
    try:
        init_db(engine)
        wait_for_database_(engine, attempts=1)
        assert check_database(engine).ok
        repo = TaskRepository(next(get_session(engine)))
        task = repo.create("alice", TaskCreate(title="one", description="d"))
        repo.create_many("alice", [TaskCreate(title=f"m{i}") for i in range(3)])
        assert repo.get("alice", task.id or 0) == task
        page = repo.list("alice", limit=2)
        repo.list("alice", complete=False, before_id=page[-1].id)
        repo.update("alice", task.id or 0, TaskUpdate(complete=True, description=None))
        repo.count("alice", complete=True)
        with repo.atomic():
            repo.delete("alice", task.id or 0)
            repo.create("alice", TaskCreate(title="two"))
        assert repo.count("alice") == 4
        # A caller's own transaction: an executemany first (the bounds go out alone
        # before it), then a savepoint rolled back.
        with engine.begin() as conn:
            touch = text("UPDATE tasks SET complete = complete WHERE id = :id")
            conn.execute(touch, [{"id": 1}, {"id": 2}])
            savepoint = conn.begin_nested()
            conn.execute(touch, {"id": 3})
            savepoint.rollback()
    finally:
        engine.dispose()
    messages = _app_log(cluster.log_text())
    sent = [
        (pid, m.removeprefix("statement: ")) for pid, m in messages if m.startswith("statement: ")
    ]
    statements = [_USER.sub("", _BOUNDS.sub("", s)) for _, s in sent]
    # The bounds ride in each transaction's first statement and in each autocommitted
    # repository call, in the same query message, and nowhere else...
    assert _misplaced_bounds(sent) == ([], [], [])
    assert sum(1 for _, s in sent if _BOUNDS.match(s)) >= 10
    # ...the log really holds the workload (so the checks below can fail)...
    assert any(s.startswith("INSERT INTO tasks") for s in statements)
    assert any(s.startswith("UPDATE tasks") for s in statements)
    assert any(s.startswith("DELETE FROM tasks") for s in statements)
    assert "BEGIN" in statements
    # ...every message is a simple-protocol statement (no named prepared statements)...
    assert [m for _, m in messages if not m.startswith("statement: ")] == []
    # ...and none of them leaves state on the server connection.
    assert [s for s in statements if _SESSION_STATE.search(s)] == []
    assert all(_BOUNDS.match(s) or _USER.match(s) for _, s in sent if "set_config" in s)
    assert _SESSION_STATE.search("SET LOCAL lock_timeout = 1; SET statement_timeout = 1")
    assert _SESSION_STATE.search("SELECT set_config('lock_timeout', '1', false)")
    assert not _SESSION_STATE.search("SELECT set_config('lock_timeout', '1', true)")
