"""Secrets: the database password never shows in errors, logs, reprs or health reports.

A sentinel password (with characters URLs must escape) is used against a throwaway
cluster with SCRAM authentication: accepted, refused as wrong, and aimed at a port
where nothing listens. Every text a caller or an operator could see is scanned for
it, raw and URL-escaped: exception messages and reprs along the whole
``__cause__``/``__context__`` chain, formatted tracebacks, every log record (also
with ``echo=True``), reprs of the settings, engine and URL, and the health detail.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError

from tests.fix_servers import LOOPBACK, ClusterFactory, PgCluster, free_port
from todo_backend.config import Settings, mask_url
from todo_backend.db import (
    DatabaseHealth,
    check_database,
    create_db_engine,
    get_session,
    init_db,
    wait_for_database,
)
from todo_backend.errors import ConfigurationError, DatabaseUnavailableError
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

SENTINEL = "Sentinel:p@ss/w0rd%7Eq?x#1"
_FORMS = frozenset({SENTINEL, quote(SENTINEL), quote(SENTINEL, safe=""), quote_plus(SENTINEL)})


def _leaks(texts: Iterable[str]) -> list[str]:
    """The texts that contain the sentinel in any spelling."""
    return [t for t in texts if any(form in t for form in _FORMS)]


def _exception_texts(err: BaseException) -> list[str]:
    """What an exception can show: messages, reprs and args along its chain, traceback."""
    texts = ["".join(traceback.format_exception(err))]
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), *map(repr, current.args)]
        current = current.__cause__ or current.__context__
    return texts


def _log_texts(records: Iterable[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(record) for record in records] + [
        repr(record.args) for record in records
    ]


@dataclass(frozen=True)
class _Secured:
    """A cluster where role ``todo_app`` logs in with SENTINEL through SCRAM."""

    cluster: PgCluster

    def url(self, *, password: str = SENTINEL, user: str = "todo_app") -> str:
        return self.cluster.url(user=user, password=password, database="todo").render_as_string(
            hide_password=False
        )


@pytest.fixture
def secured(pg_cluster: ClusterFactory) -> _Secured:
    """A throwaway cluster with password authentication for everyone but its admin."""
    cluster = pg_cluster(
        hba=(
            f"host all postgres {LOOPBACK}/32 trust",
            f"host all all {LOOPBACK}/32 scram-sha-256",
        )
    )
    with cluster.admin_engine().connect() as conn:
        conn.exec_driver_sql("CREATE ROLE todo_app LOGIN PASSWORD %s", (SENTINEL,))
        conn.exec_driver_sql("CREATE ROLE todo_other LOGIN PASSWORD %s", ("not the sentinel",))
        conn.exec_driver_sql("CREATE DATABASE todo OWNER todo_app")
    return _Secured(cluster)


def test_the_scan_finds_the_sentinel() -> None:
    """The leak scan itself sees the password in a rendered URL (so the tests can fail)."""
    url = URL.create("postgresql+psycopg2", "u", SENTINEL, LOOPBACK, 1, "db")
    assert _leaks([url.render_as_string(hide_password=False)])
    assert _leaks([f"password={quote_plus(SENTINEL)}"])
    assert not _leaks([url.render_as_string(hide_password=True)])


def test_successful_work_with_echo_logs_no_password(
    secured: _Secured, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """With echo on, a full session of work logs statements but never the password."""
    caplog.set_level(logging.DEBUG)
    settings = Settings(database_url=secured.url(), echo=True)
    engine = create_db_engine(settings)
    texts: list[str] = [repr(settings), str(settings), settings.masked_url]
    try:
        init_db(engine)
        wait_for_database(engine, attempts=1)
        health = check_database(engine)
        assert health.ok, health.detail
        repo = TaskRepository(next(get_session(engine)))
        task = repo.create("alice", TaskCreate(title="secret-free"))
        repo.update("alice", task.id or 0, TaskUpdate(complete=True))
        assert repo.list("alice") != []
        with pytest.raises(IntegrityError) as refused, engine.begin() as conn:
            conn.execute(
                text(
                    "insert into tasks (user_id, title, complete, created_at, updated_at) "
                    "values ('alice', '', false, now(), now())"
                )
            )
        texts += _exception_texts(refused.value)
        texts += [repr(health), health.detail, repr(engine), repr(engine.url), str(engine.url)]
        texts += [repr(engine.pool), mask_url(engine.url)]
    finally:
        engine.dispose()
    echoed = [r for r in caplog.records if r.name.startswith("sqlalchemy.engine")]
    assert echoed  # echo really logged statements
    texts += _log_texts(caplog.records)
    texts += capsys.readouterr()
    assert _leaks(texts) == []


@pytest.mark.parametrize("case", ["wrong password", "nothing listening"])
def test_failures_never_show_the_password(
    case: str, secured: _Secured, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused logins and refused connections report the host, never the password."""
    caplog.set_level(logging.DEBUG)
    if case == "wrong password":
        url = secured.url(user="todo_other")  # exists, but SENTINEL is not its password
        expected = "password authentication failed"
    else:
        url = f"postgresql://todo_app:{quote(SENTINEL, safe='')}@{LOOPBACK}:{free_port()}/todo"
        expected = "refused"
    engine = create_db_engine(Settings(database_url=url, echo=True))
    texts: list[str] = [repr(engine), repr(engine.url), str(engine.url)]
    try:
        health: DatabaseHealth = check_database(engine)
        assert health.ok is False
        assert expected in health.detail
        texts += [repr(health), health.detail]
        with pytest.raises(DatabaseUnavailableError) as waited:
            wait_for_database(engine, attempts=2, base_delay=0)
        texts += _exception_texts(waited.value)
        repo = TaskRepository(next(get_session(engine)))
        for call in (
            lambda: repo.create("alice", TaskCreate(title="x")),
            lambda: repo.create_many("alice", [TaskCreate(title="x")]),
            lambda: repo.get("alice", 1),
            lambda: repo.list("alice"),
            lambda: repo.update("alice", 1, TaskUpdate(complete=True)),
            lambda: repo.delete("alice", 1),
            lambda: repo.count("alice"),
        ):
            with pytest.raises(DatabaseUnavailableError) as raised:
                call()
            assert raised.value.__cause__ is not None  # the driver error travels along...
            assert expected in str(raised.value)
            texts += _exception_texts(raised.value)  # ...and is scanned too
    finally:
        engine.dispose()
    assert any(r.name == "todo_backend.db" for r in caplog.records)
    texts += _log_texts(caplog.records)
    assert _leaks(texts) == []


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://u:{quote(SENTINEL, safe='')}@db.example/app",
        f"postgresql://u:{quote(SENTINEL, safe='')}@/app",
        f"not a url {SENTINEL}",
    ],
    ids=["unsupported scheme", "no host", "unparseable"],
)
def test_configuration_errors_never_show_the_password(url: str) -> None:
    """A rejected DATABASE_URL is described without repeating its password."""
    with pytest.raises(ConfigurationError) as raised:
        Settings(database_url=url)
    assert _leaks(_exception_texts(raised.value)) == []


def _query_password_settings() -> Settings:
    return Settings(
        database_url=f"postgresql://u@{LOOPBACK}:{free_port()}/app?password={quote_plus(SENTINEL)}"
    )


def test_password_given_as_a_query_parameter_is_masked() -> None:
    """A password in the URL's query string (libpq accepts it) is masked in reports too."""
    settings = _query_password_settings()
    engine = create_db_engine(settings)
    try:
        health = check_database(engine)
        with pytest.raises(DatabaseUnavailableError) as raised:
            wait_for_database(engine, attempts=1)
    finally:
        engine.dispose()
    assert health.ok is False
    texts = [repr(settings), settings.masked_url, repr(health), health.detail]
    assert _leaks(texts + _exception_texts(raised.value)) == []


def test_engine_repr_masks_a_query_parameter_password() -> None:
    """The engine's repr, printed in tracebacks and test reports, hides a query password."""
    engine = create_db_engine(_query_password_settings())
    try:
        assert _leaks([repr(engine), str(engine.url)]) == []
    finally:
        engine.dispose()
