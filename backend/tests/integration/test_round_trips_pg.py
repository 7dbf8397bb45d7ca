"""One network round trip per repository call, seen on the wire to PostgreSQL.

Every test on ``wired_repo`` or ``wired_engines`` runs on both faces: TaskRepository
and the sync engine (psycopg2), AsyncTaskRepository and the async engine (psycopg 3
with client-side binding). Both send a statement as one simple-protocol query
message, the engine's bounds in front of a transaction's first statement and of each
autocommitted repository call.

A small proxy on loopback sits between the package's engine and a throwaway cluster of
our own (the wire to a hosted server is encrypted, so it is read here). It reads
the PostgreSQL protocol the client sends, records the SQL of every query message,
and counts round trips: a client-to-server burst after the server has spoken. A
hidden ``BEGIN``, ``COMMIT``, ``ROLLBACK`` or ``SET`` shows up as an extra query and
an extra round trip, so these tests fail the day a call starts costing two.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import URL

from tests.async_face import AwaitedRepository, open_session
from tests.relay import LoopbackRelay
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.db import create_db_engine, get_session
from todo_backend.errors import ConfigurationError
from todo_backend.models import Task, TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

ALICE = "alice"
_PROTOCOL_3: int = 196608  # the StartupMessage's protocol version; earlier ones are requests
# Bind, Describe, Execute, Sync follow a Parse in one extended-protocol query; X
# (Terminate) is sent when a connection closes.
_PARTS_OF_A_QUERY = frozenset({b"B", b"D", b"E", b"S", b"X"})
# The statement, lock and idle bounds the engine puts in front of a statement, in the
# same query message: recorded, then stripped so the tests see the statement. Sent
# alone (before an executemany or a server-side cursor), they are a query of their own.
_BOUNDS = re.compile(
    r"^SELECT set_config\('statement_timeout', '\d+', true\), "
    r"set_config\('lock_timeout', '\d+', true\), "
    r"set_config\('idle_in_transaction_session_timeout', '\d+', true\)"
    # The application role and the row-level security user ride with them.
    r"(, set_config\('role', .*?, true\), set_config\('todo\.user_id', .*?, true\))?"
    r"(; |\Z)"
)
BOUNDS_ALONE = "<bounds>"


@dataclass
class Recording:
    """What the client sent while recording: query texts and round trips."""

    queries: list[str] = field(default_factory=list)
    round_trips: int = 0
    bounded: list[str] = field(default_factory=list)  # queries that carried the bounds
    prepared: list[str] = field(default_factory=list)  # names of server-side prepared statements


class _ClientMessages:
    """Splits one connection's client-to-server bytes into protocol messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._started = False

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add *data*; return the complete (type, payload) messages it finished."""
        buf = self._buffer
        buf += data
        done: list[tuple[bytes, bytes]] = []
        while True:
            if not self._started:  # untyped: SSL/GSS requests, then the startup message
                if len(buf) < 8 or len(buf) < int.from_bytes(buf[:4], "big"):
                    return done
                size = int.from_bytes(buf[:4], "big")
                self._started = int.from_bytes(buf[4:8], "big") == _PROTOCOL_3
                del buf[:size]
                continue
            if len(buf) < 5 or len(buf) < 1 + int.from_bytes(buf[1:5], "big"):
                return done
            size = 1 + int.from_bytes(buf[1:5], "big")
            done.append((bytes(buf[:1]), bytes(buf[5:size])))
            del buf[:size]


class Wire(LoopbackRelay):
    """A counting TCP proxy on loopback in front of one PostgreSQL server."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._lock = threading.Lock()
        self._recording: Recording | None = None
        super().__init__(upstream)

    @contextmanager
    def recording(self) -> Iterator[Recording]:
        """Record what every connection sends inside the block."""
        seen = Recording()
        with self._lock:
            self._recording = seen
        try:
            yield seen
        finally:
            with self._lock:
                self._recording = None

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        spoke = [True]  # has the server answered since the client's last burst?
        messages = _ClientMessages()
        threading.Thread(
            target=self._pump, args=(client, server, spoke, messages), daemon=True
        ).start()
        threading.Thread(target=self._pump, args=(server, client, spoke, None), daemon=True).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        spoke: list[bool],
        messages: _ClientMessages | None,
    ) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                dst.close()
                return
            if messages is None:
                spoke[0] = True
            else:
                # Recorded before forwarding: the call cannot return before this ran.
                self._record(data, spoke, messages)
            try:
                dst.sendall(data)
            except OSError:
                return

    def _record(self, data: bytes, spoke: list[bool], messages: _ClientMessages) -> None:
        parsed = messages.feed(data)
        with self._lock:
            seen = self._recording
            if seen is None:
                spoke[0] = False
                return
            if spoke[0]:
                seen.round_trips += 1
            spoke[0] = False
            for kind, payload in parsed:
                if kind == b"Q":
                    query = payload.rstrip(b"\0").decode()
                    bounded = _BOUNDS.match(query)
                    if bounded:
                        query = query[bounded.end() :] or BOUNDS_ALONE
                        seen.bounded.append(query)
                    seen.queries.append(query)
                elif kind == b"P":  # extended protocol (psycopg 3): Parse names the SQL
                    name, sql = payload.split(b"\0")[:2]
                    seen.queries.append(sql.decode())
                    if name:
                        seen.prepared.append(name.decode())
                elif kind not in _PARTS_OF_A_QUERY:
                    seen.queries.append(f"<protocol message {kind!r}>")


@pytest.fixture(scope="module")
def wire(own_scratch_url: URL) -> Iterator[Wire]:
    """A counting proxy in front of our own cluster (plain text on loopback, readable)."""
    assert own_scratch_url.host is not None
    proxy = Wire((own_scratch_url.host, own_scratch_url.port or 5432))
    yield proxy
    proxy.close()


@pytest.fixture
def wired_url(own_engine: Engine, wire: Wire, own_scratch_url: URL) -> str:
    """A database of our own cluster (tasks emptied by ``own_engine``), through the proxy."""
    url = own_scratch_url.set(
        host="127.0.0.1",
        port=wire.port,
        # Plain text so the proxy can read it; loopback only.
        query={"sslmode": "disable", "gssencmode": "disable"},
    )
    return url.render_as_string(hide_password=False)


@pytest.fixture
def wired_engine(wired_url: str) -> Iterator[Engine]:
    """The package's engine on a database of our own cluster, reached through the proxy."""
    wired = create_db_engine(wired_url)
    yield wired
    wired.dispose()


@pytest.fixture(params=["sync", "async", "sync-engine", "async-engine"])
def wired_repo(
    request: pytest.FixtureRequest, wired_engine: Engine, wired_url: str
) -> Iterator[TaskRepository]:
    """A repository of each face on a proxied session or engine, its connection open.

    The async one is AsyncTaskRepository on psycopg 3, each call awaited to its end
    (tests/async_face.py): the same calls must cost the same round trips, whether the
    repository is bound to a session or to the engine.
    """
    if request.param == "sync-engine":
        repo = TaskRepository(wired_engine)
        repo.count(ALICE)  # connect (startup messages) before anything is recorded
        yield repo
        return
    if request.param == "sync":
        sessions = get_session(wired_engine)
        repo = TaskRepository(next(sessions))
        repo.count(ALICE)
        yield repo
        sessions.close()
        return
    with asyncio.Runner() as runner:
        engine = create_async_db_engine(wired_url)
        if request.param == "async-engine":
            awaited = AwaitedRepository(AsyncTaskRepository(engine), runner)
            awaited.count(ALICE)
            yield awaited  # type: ignore[misc]
            runner.run(engine.dispose())
            return
        session, _ = runner.run(open_session(engine))
        awaited = AwaitedRepository(AsyncTaskRepository(session), runner)
        awaited.count(ALICE)
        yield awaited  # type: ignore[misc]
        runner.run(session.close())
        runner.run(engine.dispose())


_SINGLE_CALLS: dict[str, tuple[str, Callable[[TaskRepository, Task], object]]] = {
    "create": ("INSERT", lambda r, t: r.create(ALICE, TaskCreate(title="new"))),
    "get": ("SELECT", lambda r, t: r.get(ALICE, t.id or 0)),
    "list": ("SELECT", lambda r, t: r.list(ALICE, limit=50)),
    "list page": ("SELECT", lambda r, t: r.list(ALICE, complete=False, before_id=(t.id or 0) + 1)),
    "update": ("UPDATE", lambda r, t: r.update(ALICE, t.id or 0, TaskUpdate(complete=True))),
    "delete": ("DELETE", lambda r, t: r.delete(ALICE, t.id or 0)),
    "count": ("SELECT", lambda r, t: r.count(ALICE, complete=True)),
}


@pytest.mark.parametrize("name", list(_SINGLE_CALLS))
def test_single_task_call_is_one_query_and_one_round_trip(
    name: str, wired_repo: TaskRepository, wire: Wire
) -> None:
    """Each single-task method sends exactly one query, its own, in one round trip."""
    verb, call = _SINGLE_CALLS[name]
    task = wired_repo.create(ALICE, TaskCreate(title="seed"))
    with wire.recording() as seen:
        call(wired_repo, task)
    assert len(seen.queries) == 1, seen.queries
    assert seen.queries[0].startswith(verb), seen.queries
    assert seen.bounded == seen.queries  # the bounds ride in the same message, on both faces
    assert seen.round_trips == 1
    assert seen.prepared == []


def test_calls_repeat_at_one_round_trip_each(wired_repo: TaskRepository, wire: Wire) -> None:
    """A warm connection stays at one round trip per call and never prepares a statement."""
    task = wired_repo.create(ALICE, TaskCreate(title="seed"))
    with wire.recording() as seen:
        for _ in range(8):  # psycopg 3 would prepare from the 5th execution by default
            wired_repo.get(ALICE, task.id or 0)
            wired_repo.update(ALICE, task.id or 0, TaskUpdate(title="again"))
    assert seen.round_trips == 16
    assert [q.split()[0] for q in seen.queries] == ["SELECT", "UPDATE"] * 8
    assert seen.prepared == []


def test_a_fresh_session_per_call_costs_one_round_trip(wired_engine: Engine, wire: Wire) -> None:
    """A call on a new session, as one API request makes it, still costs one round trip."""
    for session in get_session(wired_engine):
        TaskRepository(session).count(ALICE)  # open the pooled connection
    with wire.recording() as seen:
        for session in get_session(wired_engine):
            TaskRepository(session).list(ALICE)
    assert seen.round_trips == 1
    assert len(seen.queries) == 1


def test_create_many_of_one_batch_is_one_round_trip(
    wired_repo: TaskRepository, wired_engine: Engine, wire: Wire
) -> None:
    """Up to one batch of tasks is a single autocommitted INSERT: one round trip."""
    page = wired_engine.dialect.insertmanyvalues_page_size
    with wire.recording() as seen:
        created = wired_repo.create_many(ALICE, [TaskCreate(title=f"t{i}") for i in range(page)])
    assert len(created) == page
    assert [q.split()[0] for q in seen.queries] == ["INSERT"]
    assert seen.round_trips == 1


def test_create_many_is_one_transaction_of_batched_inserts(
    wired_repo: TaskRepository, wired_engine: Engine, wire: Wire
) -> None:
    """create_many sends BEGIN, one INSERT per batch and COMMIT: nothing else."""
    page = wired_engine.dialect.insertmanyvalues_page_size
    with wire.recording() as seen:
        created = wired_repo.create_many(
            ALICE, [TaskCreate(title=f"t{i}") for i in range(page + 1)]
        )
    assert len(created) == page + 1
    assert [q.split()[0] for q in seen.queries] == ["BEGIN", "INSERT", "INSERT", "COMMIT"]
    assert seen.bounded == [seen.queries[1]]  # once, in the transaction's first statement
    assert seen.round_trips == 4


def test_atomic_block_adds_only_begin_and_commit(wired_repo: TaskRepository, wire: Wire) -> None:
    """An atomic block costs its statements plus BEGIN and COMMIT, one round trip each."""
    task = wired_repo.create(ALICE, TaskCreate(title="seed"))
    with wire.recording() as seen, wired_repo.atomic():
        wired_repo.update(ALICE, task.id or 0, TaskUpdate(title="renamed"))
        wired_repo.create(ALICE, TaskCreate(title="second"))
    assert [q.split()[0] for q in seen.queries] == ["BEGIN", "UPDATE", "INSERT", "COMMIT"]
    assert seen.bounded == [seen.queries[1]]  # once, in the block's first statement
    assert seen.round_trips == 4


def test_single_calls_run_in_driver_autocommit(engine: Engine) -> None:
    """Every single call executes with psycopg2 in autocommit and leaves no transaction open."""
    repo = TaskRepository(next(get_session(engine)))
    task = repo.create(ALICE, TaskCreate(title="seed"))
    modes: list[bool] = []

    def record(conn: object, cursor: object, *_args: object) -> None:
        modes.append(bool(cursor.connection.autocommit))  # type: ignore[attr-defined]

    event.listen(engine, "before_cursor_execute", record)
    try:
        repo.get(ALICE, task.id or 0)
        repo.list(ALICE)
        repo.update(ALICE, task.id or 0, TaskUpdate(complete=True))
        repo.count(ALICE)
        repo.delete(ALICE, task.id or 0)
        repo.create(ALICE, TaskCreate(title="last"))
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert modes == [True] * 6
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        assert dbapi.autocommit is False  # the pool's connections rest in normal mode
        assert dbapi.info.transaction_status == 0  # TRANSACTION_STATUS_IDLE


# -- the engines as ordinary SQLAlchemy engines --------------------------------------

Body = Callable[[Connection], None]


@pytest.fixture(params=["sync", "async"])
def wired_run(
    request: pytest.FixtureRequest, wired_engine: Engine, wired_url: str
) -> Iterator[Callable[[Body], None]]:
    """Run a body on a connection of the sync engine, or of the async one (via run_sync).

    The connection is opened, and the engine's first-connect queries sent, before
    anything is recorded.
    """
    if request.param == "sync":
        with wired_engine.connect() as conn:
            conn.rollback()  # the first connect's own transaction
        yield lambda body: _run_sync(wired_engine, body)
        return
    with asyncio.Runner() as runner:
        engine = create_async_db_engine(wired_url)

        async def run(body: Body) -> None:
            async with engine.connect() as conn:
                await conn.run_sync(body)

        runner.run(run(lambda conn: None))
        yield lambda body: runner.run(run(body))
        runner.run(engine.dispose())


def _run_sync(engine: Engine, body: Body) -> None:
    with engine.connect() as conn:
        body(conn)


def test_a_transaction_carries_the_bounds_once(
    wired_run: Callable[[Body], None], wire: Wire
) -> None:
    """The first statement of a transaction carries the bounds; savepoints and the rest never."""

    def body(conn: Connection) -> None:
        conn.execute(text("SELECT 1"))
        with conn.begin_nested():
            conn.execute(text("SELECT 2"))
        nested = conn.begin_nested()
        conn.execute(text("SELECT 3"))
        nested.rollback()
        conn.execute(text("SELECT 4"))
        conn.commit()

    with wire.recording() as seen:
        wired_run(body)
    assert [q.split()[0] for q in seen.queries] == [
        *("BEGIN", "SELECT", "SAVEPOINT", "SELECT", "RELEASE"),
        *("SAVEPOINT", "SELECT", "ROLLBACK", "SELECT", "COMMIT"),
    ]
    assert seen.bounded == ["SELECT 1"]
    assert seen.round_trips == len(seen.queries)


def test_bounds_undone_by_a_savepoint_rollback_are_sent_again(
    wired_run: Callable[[Body], None], wire: Wire
) -> None:
    """Bounds set inside a savepoint that is rolled back go out again with the next statement."""

    def body(conn: Connection) -> None:
        nested = conn.begin_nested()
        conn.execute(text("SELECT 1"))
        nested.rollback()
        conn.execute(text("SELECT 2"))
        conn.execute(text("SELECT 3"))
        conn.rollback()

    with wire.recording() as seen:
        wired_run(body)
    assert seen.bounded == ["SELECT 1", "SELECT 2"]


def test_an_executemany_first_in_a_transaction_gets_the_bounds_alone(
    wired_run: Callable[[Body], None], wire: Wire
) -> None:
    """An executemany carries nothing; first in its transaction, the bounds go just before it."""

    def body(conn: Connection) -> None:
        conn.execute(text("SELECT CAST(:n AS int)"), [{"n": 1}, {"n": 2}])
        conn.execute(text("SELECT CAST(:n AS int)"), [{"n": 3}, {"n": 4}])
        conn.rollback()

    with wire.recording() as seen:
        wired_run(body)
    assert seen.queries[:2] == ["BEGIN", BOUNDS_ALONE]
    assert seen.bounded == [BOUNDS_ALONE]
    assert [q for q in seen.queries if q.startswith("SELECT")] == [
        f"SELECT CAST({n} AS int)" for n in (1, 2, 3, 4)
    ]


def test_a_callers_autocommit_statement_carries_the_role_and_no_bounds(
    wired_run: Callable[[Body], None], wire: Wire
) -> None:
    """A caller's autocommitted statement runs as the application role, unscoped, unbounded.

    In its own message, with no extra round trip; VACUUM, which refuses the implicit
    transaction such a message makes, goes out exactly as written.
    """

    def body(conn: Connection) -> None:
        autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
        autocommit.execute(text("SELECT 1"))
        autocommit.execute(text("VACUUM pg_catalog.pg_am"))

    with wire.recording() as seen:
        wired_run(body)
    assert len(seen.queries) == 2
    assert seen.queries[0].startswith("SELECT set_config('role', ")
    assert seen.queries[0].endswith(", set_config('todo.user_id', '', true); SELECT 1")
    assert seen.queries[1] == "VACUUM pg_catalog.pg_am"
    assert seen.bounded == []


@pytest.mark.parametrize("option", ["postgresql_readonly", "postgresql_deferrable"])
def test_a_read_only_transaction_leaves_nothing_for_later_calls(
    wired_engine: Engine, wire: Wire, option: str
) -> None:
    """After a read-only or deferrable transaction, calls on its connection cost one round trip."""
    for session in get_session(wired_engine):
        TaskRepository(session).count(ALICE)  # the one pooled connection
    with wire.recording() as during, wired_engine.connect() as conn:
        conn.execution_options(**{option: True})
        conn.execute(text("SELECT 1"))
        conn.commit()
    with wire.recording() as seen:
        for _ in range(3):
            for session in get_session(wired_engine):
                TaskRepository(session).count(ALICE)
    assert wired_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    assert seen.round_trips == 3
    assert [q.split()[0] for q in seen.queries] == ["SELECT"] * 3
    begin = "BEGIN READ ONLY" if option == "postgresql_readonly" else "BEGIN DEFERRABLE"
    assert during.queries == [begin, "SELECT 1", "COMMIT"]  # the flags cost nothing more


_SESSION_LEVEL_REQUESTS: dict[str, Callable[[Connection], object]] = {
    "together": lambda c: c.execution_options(
        isolation_level="AUTOCOMMIT", postgresql_readonly=True
    ),
    "readonly later": lambda c: (
        c.execution_options(isolation_level="AUTOCOMMIT").execute(text("SELECT 1")).all()
        and c.execution_options(postgresql_readonly=True)
    ),
    "autocommit later": lambda c: c.execution_options(postgresql_deferrable=True).execution_options(
        isolation_level="AUTOCOMMIT"
    ),
}


@pytest.mark.parametrize("request_kind", list(_SESSION_LEVEL_REQUESTS))
def test_read_only_with_autocommit_is_refused_before_anything_is_sent(
    wired_engine: Engine, wire: Wire, request_kind: str
) -> None:
    """Read-only or deferrable with AUTOCOMMIT would be session SETs: a ConfigurationError."""
    for session in get_session(wired_engine):
        TaskRepository(session).count(ALICE)
    with (
        wire.recording() as seen,
        wired_engine.connect() as conn,
        pytest.raises(ConfigurationError, match="AUTOCOMMIT"),
    ):
        _SESSION_LEVEL_REQUESTS[request_kind](conn)
    assert not [q for q in seen.queries if q.upper().startswith("SET")]
    with wired_engine.connect() as conn:
        assert conn.execute(text("SHOW transaction_read_only")).scalar_one() == "off"
        assert conn.execute(text("SHOW transaction_deferrable")).scalar_one() == "off"
