"""The async engine factory and session helper, and the sync package without the extra."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError

from tests.async_face import create_schema, runner
from tests.unit.test_db import _CapturedError
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine, get_async_session
from todo_backend.config import Settings
from todo_backend.db import POOL_RECYCLE_SECONDS, create_db_engine

__all__ = ["runner"]


def async_connect_args(runner: asyncio.Runner, url: str) -> dict[str, object]:
    """The keyword arguments the async engine for *url* hands to psycopg; no I/O."""
    engine = create_async_db_engine(url)
    captured: dict[str, object] = {}

    def capture(dialect: object, record: object, cargs: object, cparams: dict[str, object]) -> None:
        captured.update(cparams)
        raise _CapturedError

    event.listen(engine.sync_engine, "do_connect", capture)

    async def connect() -> None:
        async with engine.connect():
            pass

    with pytest.raises(_CapturedError):
        runner.run(connect())
    runner.run(engine.dispose())
    return captured


def test_postgres_urls_get_psycopg3_and_the_sync_pool(runner: asyncio.Runner) -> None:
    """postgres:// and postgresql:// pick psycopg 3 async with the sync engine's pool settings."""
    settings = Settings(database_url="postgres://u:p@db.example.com/app", pool_size=7)
    engine = create_async_db_engine(settings)
    sync = create_db_engine(settings)
    try:
        assert engine.dialect.driver == "psycopg"
        assert engine.dialect.is_async
        pool, sync_pool = engine.sync_engine.pool, sync.pool
        assert pool.size() == sync_pool.size() == 7  # type: ignore[attr-defined]
        assert pool._max_overflow == sync_pool._max_overflow  # type: ignore[attr-defined]
        assert pool._recycle == POOL_RECYCLE_SECONDS
        assert pool._pre_ping is False
        assert engine.sync_engine.hide_parameters
    finally:
        runner.run(engine.dispose())
        sync.dispose()


@pytest.mark.parametrize(
    ("scheme", "sync_driver", "async_driver"),
    [
        ("postgresql", "psycopg2", "psycopg"),
        ("postgres", "psycopg2", "psycopg"),
        ("postgresql+psycopg2", "psycopg2", "psycopg"),
        ("postgresql+psycopg", "psycopg2", "psycopg"),
        ("postgresql+psycopg_async", "psycopg2", "psycopg"),
        ("sqlite", "pysqlite", "aiosqlite"),
        ("sqlite+pysqlite", "pysqlite", "aiosqlite"),
        ("sqlite+aiosqlite", "pysqlite", "aiosqlite"),
    ],
)
def test_every_driver_spelling_runs_on_each_faces_own_driver(
    runner: asyncio.Runner, tmp_path: Path, scheme: str, sync_driver: str, async_driver: str
) -> None:
    """Whichever driver a URL names, the sync face runs psycopg2 and the async face psycopg 3."""
    where = f"/{tmp_path}/t.db" if scheme.startswith("sqlite") else "u:p@db.example.com/app"
    url = f"{scheme}://{where}"
    for settings_or_url in (url, Settings(database_url=url)):
        sync = create_db_engine(settings_or_url)
        engine = create_async_db_engine(settings_or_url)
        try:
            assert sync.dialect.driver == sync_driver
            assert not sync.dialect.is_async
            assert engine.dialect.driver == async_driver
            assert engine.dialect.is_async
        finally:
            runner.run(engine.dispose())
            sync.dispose()


@pytest.mark.parametrize(
    ("url", "sslmode"),
    [
        ("postgresql://u:p@ep-x-pooler.eu-central-1.aws.neon.tech/db", "require"),
        ("postgresql://u:p@db.example.com/db?sslmode=verify-full", "verify-full"),
        ("postgresql://u:p@127.0.0.1/db", None),
    ],
)
def test_async_engine_tls_rule_matches_the_sync_one(
    runner: asyncio.Runner, url: str, sslmode: str | None
) -> None:
    """Non-local hosts get sslmode=require unless the URL chooses; local ones keep the URL's."""
    assert async_connect_args(runner, url).get("sslmode") == sslmode


def test_no_server_side_prepared_statements(runner: asyncio.Runner) -> None:
    """psycopg 3 never prepares statements (PgBouncer transaction mode), and times out connects."""
    args = async_connect_args(runner, "postgresql://u:p@localhost/db")
    assert "prepare_threshold" in args
    assert args["prepare_threshold"] is None
    assert args["connect_timeout"] == 10
    assert args["keepalives"] == 1
    assert args["application_name"] == "todo-backend"


def test_sqlite_file_database_enforces_foreign_keys(runner: asyncio.Runner, tmp_path: Path) -> None:
    """An aiosqlite file database turns foreign keys on for every connection."""
    engine = create_async_db_engine(f"sqlite:///{tmp_path / 'tasks.db'}")

    async def check() -> None:
        assert engine.dialect.driver == "aiosqlite"
        async with engine.begin() as conn:
            await conn.execute(text("create table parent (id integer primary key)"))
            await conn.execute(text("create table child (p integer references parent(id))"))
        async with engine.begin() as conn:
            await conn.execute(text("insert into child values (1)"))

    try:
        with pytest.raises(IntegrityError):
            runner.run(check())
    finally:
        runner.run(engine.dispose())


def test_get_async_session_closes_its_session(runner: asyncio.Runner) -> None:
    """The dependency yields one session and closes it when the request ends."""
    engine = create_async_db_engine("sqlite://")

    async def use() -> None:
        await create_schema(engine)
        sessions = get_async_session(engine)
        session = await anext(sessions)
        await AsyncTaskRepository(session).count("alice")
        with pytest.raises(StopAsyncIteration):
            await anext(sessions)
        assert not session.in_transaction()

    runner.run(use())
    runner.run(engine.dispose())


def test_sync_package_imports_without_the_async_extra() -> None:
    """import todo_backend works when psycopg 3, aiosqlite and greenlet are missing."""
    blocked = ("psycopg", "aiosqlite", "greenlet", "sqlalchemy.ext.asyncio")
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "import todo_backend, todo_backend.repository, todo_backend.cli\n"
        "engine = todo_backend.create_db_engine('sqlite://')\n"
        "todo_backend.init_db(engine)\n"
        "repo = todo_backend.TaskRepository(next(todo_backend.get_session(engine)))\n"
        "print(repo.create('u', todo_backend.TaskCreate(title='t')).title)\n"
        "print('todo_backend.aio' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["t", "False"]


def test_async_face_without_the_extra_says_how_to_install_it() -> None:
    """import todo_backend.aio without psycopg 3 raises ImportError naming the extra."""
    code = "import sys\nsys.modules['psycopg'] = None\nimport todo_backend.aio\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode != 0
    assert "ImportError: todo_backend.aio needs the async extra (psycopg" in done.stderr
    assert 'pip install "todo-backend[async]"' in done.stderr
