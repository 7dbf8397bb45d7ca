"""todo_backend.fastapi over HTTP on PostgreSQL: the README's service as written.

The same recipe as tests/unit/test_fastapi.py, on the server under test (psycopg 3):
the round trip of a task, a lock held elsewhere answering 503 with Retry-After, an
unreachable server answering 503 without its address, a database without the schema
answering 500 with `todo-db migrate` in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from tests.fastapi_app import readme_app
from tests.integration.databases import fresh_database

ALICE = {"X-User": "alice"}
SECRET = "s3cret-pw"


def _url(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.fixture
def client(
    engine: Engine, scratch_url: URL, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """The README's service on the module's scratch database (tasks emptied), started."""
    monkeypatch.setenv("DB_LOCK_TIMEOUT", "0.2")
    app, _engine = readme_app(monkeypatch, _url(scratch_url))
    with TestClient(app) as started:
        yield started


def test_the_readme_service_round_trip(client: TestClient) -> None:
    """POST 201, then GET, list and PATCH return the same task on PostgreSQL."""
    created = client.post("/tasks", json={"title": "Buy milk"}, headers=ALICE)
    assert created.status_code == 201
    task = created.json()
    assert client.get(f"/tasks/{task['id']}", headers=ALICE).json() == task
    assert client.get("/tasks", params={"limit": 1}, headers=ALICE).json() == [task]
    assert client.get("/tasks", params={"limit": 101}, headers=ALICE).status_code == 422
    changed = client.patch(f"/tasks/{task['id']}", json={"complete": True}, headers=ALICE)
    assert changed.json()["complete"] is True


def test_a_locked_row_answers_503_with_retry_after(client: TestClient, engine: Engine) -> None:
    """An update blocked past DB_LOCK_TIMEOUT answers 503, Retry-After, bound DB_LOCK_TIMEOUT."""
    task = client.post("/tasks", json={"title": "busy"}, headers=ALICE).json()
    with engine.connect() as holder, holder.begin():
        holder.execute(text("select id from tasks where id = :id for update"), {"id": task["id"]})
        response = client.patch(f"/tasks/{task['id']}", json={"complete": True}, headers=ALICE)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["bound"] == "DB_LOCK_TIMEOUT"
    assert client.get(f"/tasks/{task['id']}", headers=ALICE).json()["complete"] is False


def test_an_unreachable_server_answers_503_without_its_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No server listening: 503, and neither the password nor the host reaches the client."""
    monkeypatch.setenv("DB_CONNECT_TIMEOUT", "2")
    app, _engine = readme_app(monkeypatch, f"postgresql://app:{SECRET}@127.0.0.1:1/app")
    with TestClient(app) as client:
        response = client.get("/tasks", headers=ALICE)
    assert response.status_code == 503
    for leak in (SECRET, "127.0.0.1", "app:"):
        assert leak not in response.text


def test_a_database_without_the_schema_answers_500_and_logs_the_fix(
    scratch_url: URL, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No tasks table: 500 with a fixed message; the log says to run `todo-db migrate`."""
    with fresh_database(scratch_url) as empty:
        app, _engine = readme_app(monkeypatch, _url(empty))
        with (
            caplog.at_level(logging.ERROR, logger="todo_backend.fastapi"),
            TestClient(app) as client,
        ):
            response = client.post("/tasks", json={"title": "t"}, headers=ALICE)
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "todo-db migrate" in caplog.text
