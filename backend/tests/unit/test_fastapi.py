"""todo_backend.fastapi over HTTP on SQLite: the README's service as written, and each handler.

The README's recipe runs under Starlette's TestClient (which runs the lifespan too)
on a SQLite file; the error handlers are also checked one by one on a small app whose
routes raise each of the package's errors. PostgreSQL: tests/integration/test_fastapi_pg.py.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.fastapi_app import readme_app
from todo_backend.aio import AsyncTaskRepository, create_async_db_engine
from todo_backend.db import create_db_engine, init_db
from todo_backend.errors import (
    ConfigurationError,
    DatabaseConflictError,
    DatabaseTimeoutError,
    DatabaseUnavailableError,
    SchemaMissingError,
    TodoBackendError,
)
from todo_backend.fastapi import (
    add_error_handlers,
    lifespan,
    repository_dependency,
    session_dependency,
)
from todo_backend.models import TaskCreate, TaskRead

ALICE = {"X-User": "alice"}
SECRET = "s3cret-pw"


def _sqlite_file(tmp_path: Path, *, schema: bool) -> str:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    engine = create_db_engine(url)
    if schema:
        init_db(engine)
    else:
        with engine.connect() as conn:  # creates the empty file
            conn.execute(text("select 1"))
    engine.dispose()
    return url


@pytest.fixture
def service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, AsyncEngine]]:
    """The README's service on a SQLite file with the schema, started (lifespan entered)."""
    app, engine = readme_app(monkeypatch, _sqlite_file(tmp_path, schema=True))
    with TestClient(app) as client:
        yield client, engine


@pytest.fixture
def client(service: tuple[TestClient, AsyncEngine]) -> TestClient:
    """The HTTP client of the README's service."""
    return service[0]


def test_the_readme_service_creates_reads_lists_and_updates(client: TestClient) -> None:
    """POST answers 201 with the TaskRead; GET, list and PATCH work on it, for its owner only."""
    created = client.post("/tasks", json={"title": "Buy milk"}, headers=ALICE)
    assert created.status_code == 201
    task = created.json()
    assert set(task) == set(TaskRead.model_fields)  # every field, whichever the models declare
    assert (task["user_id"], task["title"], task["complete"]) == ("alice", "Buy milk", False)
    assert task["created_at"].endswith("Z") or task["created_at"].endswith("+00:00")
    assert client.get(f"/tasks/{task['id']}", headers=ALICE).json() == task
    assert client.get("/tasks", headers=ALICE).json() == [task]
    changed = client.patch(f"/tasks/{task['id']}", json={"complete": True}, headers=ALICE)
    assert changed.status_code == 200
    assert changed.json()["complete"] is True
    assert client.get(f"/tasks/{task['id']}", headers={"X-User": "bob"}).status_code == 404
    assert client.get("/tasks", headers={"X-User": "bob"}).json() == []


def test_invalid_task_data_is_a_422(client: TestClient) -> None:
    """A blank title is refused by FastAPI's own request validation with 422."""
    response = client.post("/tasks", json={"title": "   "}, headers=ALICE)
    assert response.status_code == 422


@pytest.mark.parametrize(
    "user",
    [
        pytest.param("al\x1bice", id="control-character"),
        pytest.param("a" * 256, id="over-255"),
        pytest.param("al\x85ice".encode("latin-1"), id="c1-control-character"),
    ],
)
def test_a_bad_user_id_is_a_422_not_a_500(client: TestClient, user: str | bytes) -> None:
    """A user id the repository refuses (pydantic.ValidationError) answers 422 with its errors."""
    raw = user if isinstance(user, bytes) else user.encode("latin-1")
    response = client.get("/tasks", headers=[(b"X-User", raw)])
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert set(error) == {"type", "loc", "msg"}
    assert error["loc"] == ["user_id"]  # the client is told which input was wrong
    assert client.get("/tasks", headers=ALICE).status_code == 200  # the server still serves


@pytest.mark.parametrize("limit", [0, 101])
def test_a_limit_outside_1_to_100_is_a_422(client: TestClient, limit: int) -> None:
    """list's limit outside 1..100 is a ValidationError from the repository, hence 422."""
    response = client.get("/tasks", params={"limit": limit}, headers=ALICE)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] in {"greater_than_equal", "less_than_equal"}


def test_the_lifespan_disposes_of_the_engine(service: tuple[TestClient, AsyncEngine]) -> None:
    """Leaving the app closes the pooled connections the requests left in the pool."""
    client, engine = service
    client.post("/tasks", json={"title": "t"}, headers=ALICE)
    pool = engine.sync_engine.pool
    assert pool.checkedin() == 1  # type: ignore[attr-defined]
    client.__exit__(None, None, None)
    assert engine.sync_engine.pool.checkedin() == 0  # type: ignore[attr-defined]


def test_a_request_holds_no_connection_or_session_after_it(
    service: tuple[TestClient, AsyncEngine],
) -> None:
    """The repository a request gets is bound to the engine: nothing stays checked out."""
    client, engine = service
    created = client.post("/tasks", json={"title": "t"}, headers=ALICE).json()
    assert client.get(f"/tasks/{created['id']}", headers=ALICE).status_code == 200
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_repository_dependency_is_a_plain_coroutine_giving_an_engine_bound_repository(
    tmp_path: Path,
) -> None:
    """No generator, so FastAPI needs no exit stack; atomic() still works on what it gives."""
    engine = create_async_db_engine(_sqlite_file(tmp_path, schema=True))
    dependency = repository_dependency(engine)
    assert inspect.iscoroutinefunction(dependency)
    assert not inspect.isasyncgenfunction(dependency)

    async def scenario() -> list[str]:
        repo = await dependency()
        async with repo.atomic():
            await repo.create("alice", TaskCreate(title="one"))
            await repo.create("alice", TaskCreate(title="two"))
        titles = [task.title for task in await (await dependency()).list("alice")]
        assert await dependency() is repo  # one repository for every request
        await engine.dispose()
        return titles

    assert asyncio.run(scenario()) == ["two", "one"]


@pytest.mark.parametrize("freeze", [True, False])
def test_the_lifespan_freezes_the_startup_objects_while_the_app_runs(
    tmp_path: Path, freeze: bool
) -> None:
    """gc.freeze() at startup (unless freeze_gc=False), gc.unfreeze() at shutdown."""
    engine = create_async_db_engine(_sqlite_file(tmp_path, schema=True))
    app = FastAPI(lifespan=lifespan(engine, freeze_gc=freeze))
    app.get("/frozen")(gc.get_freeze_count)
    before = gc.get_freeze_count()  # Python 3.12 starts with a few objects frozen
    with TestClient(app) as client:
        frozen = client.get("/frozen").json()
    assert (frozen > before) is freeze
    if freeze and before == 0:
        assert gc.get_freeze_count() == 0
    elif freeze:  # frozen before the app started: left frozen, with the app's objects
        assert gc.get_freeze_count() > before
    else:  # nothing frozen by the app (frozen objects may still be freed meanwhile)
        assert gc.get_freeze_count() <= before


def test_a_missing_schema_is_a_500_that_logs_todo_db_migrate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the tasks table a call answers 500; the log says to run `todo-db migrate`."""
    app, _engine = readme_app(monkeypatch, _sqlite_file(tmp_path, schema=False))
    with caplog.at_level(logging.ERROR, logger="todo_backend.fastapi"), TestClient(app) as client:
        response = client.get("/tasks", headers=ALICE)
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "SchemaMissingError" in caplog.text
    assert "todo-db migrate" in caplog.text


def test_session_dependency_is_a_dependency_as_is(tmp_path: Path) -> None:
    """Depends(session_dependency(engine)) gives each request an open AsyncSession."""
    engine = create_async_db_engine(_sqlite_file(tmp_path, schema=True))
    app = FastAPI(lifespan=lifespan(engine))

    async def one(db: AsyncSession) -> int:
        return int((await db.exec(text("select 1"))).scalar_one())  # type: ignore[call-overload]

    # As `db: Annotated[AsyncSession, Depends(...)]` would read in a module of its own
    # (this one's annotations are strings that name a local).
    one.__annotations__["db"] = Annotated[AsyncSession, Depends(session_dependency(engine))]
    app.get("/one")(one)
    with TestClient(app) as client:
        assert client.get("/one").json() == 1


def test_repository_dependency_serves_routes_and_can_be_overridden(tmp_path: Path) -> None:
    """Depends(repository_dependency(engine)) serves a route; dependency_overrides swaps it."""
    engine = create_async_db_engine(_sqlite_file(tmp_path, schema=True))
    (tmp_path / "other").mkdir()
    other = create_async_db_engine(_sqlite_file(tmp_path / "other", schema=True))
    app = FastAPI(lifespan=lifespan(engine))
    add_error_handlers(app)
    dependency = repository_dependency(engine)

    async def add(title: str, tasks: AsyncTaskRepository) -> TaskRead:
        return TaskRead.model_validate(await tasks.create("alice", TaskCreate(title=title)))

    async def titles(tasks: AsyncTaskRepository) -> list[str]:
        return [task.title for task in await tasks.list("alice")]

    # As `tasks: Annotated[AsyncTaskRepository, Depends(...)]` would read in a module of
    # its own (this one's annotations are strings that name a local).
    for route in (add, titles):
        route.__annotations__["tasks"] = Annotated[AsyncTaskRepository, Depends(dependency)]
    app.post("/tasks", status_code=201)(add)
    app.get("/tasks")(titles)
    with TestClient(app) as client:
        assert client.post("/tasks", params={"title": "kept"}).status_code == 201
        assert client.post("/tasks", params={"title": " "}).status_code == 422
        app.dependency_overrides[dependency] = lambda: AsyncTaskRepository(other)
        assert client.post("/tasks", params={"title": "elsewhere"}).status_code == 201
        assert client.get("/tasks").json() == ["elsewhere"]
        app.dependency_overrides.clear()
        assert client.get("/tasks").json() == ["kept"]
    asyncio.run(other.dispose())


# -- each handler, on a small app whose routes raise the errors --------------------------


def _raising_app() -> FastAPI:
    app = FastAPI()
    add_error_handlers(app, retry_after=3)
    errors: dict[str, Exception] = {
        "timeout": DatabaseTimeoutError("pool exhausted", bound="DB_POOL_TIMEOUT"),
        "unavailable": DatabaseUnavailableError(
            f"cannot reach postgresql://app:{SECRET}@db.internal.example/app: refused"
        ),
        "conflict": DatabaseConflictError(
            f"deadlock detected on postgresql://app:{SECRET}@h/db", sqlstate="40P01"
        ),
        "schema": SchemaMissingError("no tasks table: run `todo-db migrate`"),
        "config": ConfigurationError(f"DATABASE_URL postgresql://app:{SECRET}@h/db is bad"),
        "block": TodoBackendError("a call inside this atomic() block failed"),
    }

    @app.get("/{name}")
    async def fail(name: str) -> None:
        raise errors[name]

    return app


@pytest.fixture
def raising() -> Iterator[TestClient]:
    """A client of an app whose route /{name} raises the named error."""
    with TestClient(_raising_app(), raise_server_exceptions=False) as client:
        yield client


def test_a_timeout_is_a_503_with_retry_after(raising: TestClient) -> None:
    """DatabaseTimeoutError answers 503 with Retry-After and the bound that ran out."""
    response = raising.get("/timeout")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert response.json()["bound"] == "DB_POOL_TIMEOUT"


def test_a_conflict_is_a_503_with_retry_after_that_leaks_nothing(raising: TestClient) -> None:
    """DatabaseConflictError (nothing stored, safe to repeat) answers 503 with Retry-After."""
    response = raising.get("/conflict")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert "nothing of it was stored" in response.json()["detail"]
    assert SECRET not in response.text


def test_an_unavailable_database_is_a_503_that_leaks_nothing(raising: TestClient) -> None:
    """DatabaseUnavailableError answers 503 without the host, user or password."""
    response = raising.get("/unavailable")
    assert response.status_code == 503
    for leak in (SECRET, "db.internal.example", "postgresql://"):
        assert leak not in response.text


@pytest.mark.parametrize("name", ["schema", "config", "block"])
def test_other_package_errors_are_a_500_that_leaks_nothing(raising: TestClient, name: str) -> None:
    """Any other TodoBackendError answers 500 with a fixed message."""
    response = raising.get(f"/{name}")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert SECRET not in response.text


def test_apps_in_one_process_share_the_freeze(tmp_path: Path) -> None:
    """An app stopping never unfreezes what another running app (or the process) froze."""
    engine = create_async_db_engine(_sqlite_file(tmp_path, schema=True))
    first = FastAPI(lifespan=lifespan(engine))
    second = FastAPI(lifespan=lifespan(engine))
    before = gc.get_freeze_count()  # Python 3.12 starts with a few objects frozen
    with TestClient(first):
        with TestClient(second):
            pass
        assert gc.get_freeze_count() > before  # the second app's stop left the first's freeze
    assert (gc.get_freeze_count() == 0) is (before == 0)
    if before:
        return  # what the process froze itself stays frozen: nothing to undo here
    gc.freeze()  # a pre-fork server's own freeze
    try:
        with TestClient(second):
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
