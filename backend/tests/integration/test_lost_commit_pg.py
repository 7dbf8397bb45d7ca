"""A COMMIT whose answer is lost: its outcome is unknown, never "nothing was stored".

A loopback relay between the package's engine and a cluster of our own forwards an
``atomic()`` block's COMMIT to the server, lets the server commit, then drops the
answer and closes the client's connection. The block's writes are stored, so the
caller must hear DatabaseUnavailableError (check, maybe repeat), never
DatabaseTimeoutError (nothing stored, repeat the block), which would make it store
the block twice. Only a server that had closed the connection
before the COMMIT was sent ended the block; however long the block looked idle
before its COMMIT (after an UNBOUNDED statement, a streamed result whose fetches
the engine does not see, or a COPY on the driver's own cursor), a lost answer is
outcome unknown. Both faces, on psycopg2 and psycopg 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import Session

from tests.async_face import open_session, runner
from tests.integration.test_round_trips_pg import _ClientMessages
from tests.relay import LoopbackRelay
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.config import Settings
from todo_backend.db import UNBOUNDED, create_db_engine, get_session
from todo_backend.errors import DatabaseUnavailableError
from todo_backend.models import TaskCreate
from todo_backend.repository import TaskRepository

__all__ = ["runner"]  # fixtures

ALICE = "alice"
TINY = 0.2  # seconds: the engine's idle bound, which the blocks here look idle past
PAST_TINY = 1.0


class CommitAnswerDropper(LoopbackRelay):
    """A TCP relay on loopback that, when armed, loses the answer to the next COMMIT."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._armed = threading.Event()
        self.dropped = threading.Event()
        super().__init__(upstream)

    def arm(self) -> None:
        """Lose the answer to the next COMMIT any connection sends."""
        self.dropped.clear()
        self._armed.set()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        committing = threading.Event()
        threading.Thread(
            target=self._upstream_pump, args=(client, server, committing), daemon=True
        ).start()
        threading.Thread(
            target=self._downstream_pump, args=(server, client, committing), daemon=True
        ).start()

    def _upstream_pump(
        self, client: socket.socket, server: socket.socket, committing: threading.Event
    ) -> None:
        messages = _ClientMessages()
        while True:
            try:
                data = client.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                _hang_up(server)
                return
            commits = any(_is_commit(kind, payload) for kind, payload in messages.feed(data))
            if commits and self._armed.is_set():
                self._armed.clear()
                committing.set()  # before the server can answer it
            try:
                server.sendall(data)
            except OSError:
                return

    def _downstream_pump(
        self, server: socket.socket, client: socket.socket, committing: threading.Event
    ) -> None:
        while True:
            try:
                data = server.recv(1 << 16)
            except OSError:
                data = b""
            if not data or committing.is_set():
                # The server has committed (or went away): the client never hears it.
                # shutdown() also wakes the other pump, blocked reading the client.
                if data:
                    self.dropped.set()
                for sock in (client, server):
                    _hang_up(sock)
                return
            try:
                client.sendall(data)
            except OSError:
                return


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already disconnected
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _is_commit(kind: bytes, payload: bytes) -> bool:
    # A simple query (psycopg2) or the Parse of an extended one (psycopg 3's commit()).
    if kind == b"Q":
        sql = payload.rstrip(b"\0")
    elif kind == b"P":
        sql = payload.split(b"\0")[1]
    else:
        return False
    return sql.strip().rstrip(b";").upper() == b"COMMIT"


@pytest.fixture
def relay(own_engine: Engine, own_scratch_url: URL) -> Iterator[CommitAnswerDropper]:
    """The relay in front of a database of our own cluster, its tasks emptied."""
    assert own_scratch_url.host is not None
    dropper = CommitAnswerDropper((own_scratch_url.host, own_scratch_url.port or 5432))
    yield dropper
    dropper.close()


@pytest.fixture
def relayed_settings(relay: CommitAnswerDropper, own_scratch_url: URL) -> Settings:
    """Settings reaching the database through the relay, with a short idle bound."""
    url = own_scratch_url.set(
        host="127.0.0.1",
        port=relay.port,
        query={"sslmode": "disable", "gssencmode": "disable"},  # the relay reads the wire
    )
    return Settings(
        database_url=url.render_as_string(hide_password=False),
        idle_in_transaction_timeout=TINY,
    )


def _stored(own_engine: Engine) -> list[str]:
    return [t.title for t in TaskRepository(next(get_session(own_engine))).list(ALICE)]


def _sync_block(kind: str, repo: TaskRepository, session: Session) -> None:
    """The block of *kind* on the sync face: a write, then what makes it look idle."""
    if kind == "unbounded":
        session.connection(execution_options=UNBOUNDED)
    with repo.atomic():
        repo.create(ALICE, TaskCreate(title="stored"))
        if kind == "streamed":
            # The server is busy, not idle, all along: the fetch runs the sleep.
            session.connection().execution_options(stream_results=True).execute(
                text("SELECT pg_sleep(:s)"), {"s": PAST_TINY}
            ).all()
        elif kind == "unbounded":
            time.sleep(PAST_TINY)  # the server's own idle bound (none) applies
        elif kind == "raw":
            # Work on the driver's own cursor, which the engine's hooks never see: the
            # server is busy in COPY, not idle, though no hooked statement ran.
            raw = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            raw.copy_expert(f"COPY (SELECT pg_sleep({PAST_TINY})) TO STDOUT", io.StringIO())


async def _async_block(kind: str, repo: AsyncTaskRepository, session: AsyncSession) -> None:
    """The block of *kind* on the async face."""
    if kind == "unbounded":
        await session.connection(execution_options=UNBOUNDED)
    async with repo.atomic():
        await repo.create(ALICE, TaskCreate(title="stored"))
        if kind == "streamed":
            result = await session.stream(text("SELECT pg_sleep(:s)"), {"s": PAST_TINY})
            await result.all()
        elif kind == "unbounded":
            await asyncio.sleep(PAST_TINY)
        elif kind == "raw":
            raw = await (await session.connection()).get_raw_connection()
            copying = f"COPY (SELECT pg_sleep({PAST_TINY})) TO STDOUT"
            async with (
                raw.driver_connection.cursor() as cursor,  # type: ignore[union-attr]
                cursor.copy(copying) as copy,
            ):
                async for _ in copy:
                    pass


KINDS = ["plain", "streamed", "unbounded", "raw"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_lost_commit_answer_is_outcome_unknown(
    kind: str, relay: CommitAnswerDropper, relayed_settings: Settings, own_engine: Engine
) -> None:
    """TaskRepository: a block whose COMMIT answer is lost raises DatabaseUnavailableError."""
    engine = create_db_engine(relayed_settings)
    try:
        session = next(get_session(engine))
        repo = TaskRepository(session)
        repo.count(ALICE)  # connected before the relay is armed
        relay.arm()
        with pytest.raises(DatabaseUnavailableError):
            _sync_block(kind, repo, session)
        assert relay.dropped.is_set()
    finally:
        engine.dispose()
    assert _stored(own_engine) == ["stored"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_lost_commit_answer_is_outcome_unknown_async(
    kind: str,
    relay: CommitAnswerDropper,
    relayed_settings: Settings,
    own_engine: Engine,
    runner: asyncio.Runner,
) -> None:
    """AsyncTaskRepository: a block whose COMMIT answer is lost raises DatabaseUnavailableError."""

    async def scenario() -> None:
        engine = create_async_db_engine(relayed_settings)
        try:
            session, _ = await open_session(engine)
            repo = AsyncTaskRepository(session)
            await repo.count(ALICE)
            relay.arm()
            with pytest.raises(DatabaseUnavailableError):
                await _async_block(kind, repo, session)
            await session.close()
        finally:
            await engine.dispose()

    runner.run(scenario())
    assert relay.dropped.is_set()
    assert _stored(own_engine) == ["stored"]
