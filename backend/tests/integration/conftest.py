"""PostgreSQL fixtures: scratch databases on the server named by TEST_DATABASE_URL.

Each test module gets its own database, created on entry and dropped on exit. Tests
that need the server are marked ``postgres``; the console-script tests on SQLite
files (test_cli_script.py) live here because they are slow, not because they need
it. Without a reachable server the tests skip locally, but with ``CI=true`` they
fail: a skipped integration run must never look green.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from tests.fix_servers import pg_cluster, pg_template, pgbouncer, server_account
from todo_backend.config import normalize_database_url
from todo_backend.db import create_db_engine, init_db

# Throwaway PostgreSQL clusters and PgBouncers (tests/fix_servers.py). Imported, not
# listed in ``pytest_plugins``: pytest refuses that variable outside the rootdir's
# conftest, which breaks a plain ``pytest`` run from the repository root.
__all__ = ["pg_cluster", "pg_template", "pgbouncer", "server_account"]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# A test that uses any of these needs a PostgreSQL server or its binaries.
_SERVER_FIXTURES = frozenset({"admin_url", "pg_cluster", "pg_template", "pgbouncer"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of this folder that need PostgreSQL (directly or via a fixture)."""
    for item in items:
        needs = _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if "integration" in item.path.parts and needs:
            item.add_marker(pytest.mark.postgres)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def admin_url() -> URL:
    """The server to test against, checked once; unreachable means skip, or fail in CI."""
    url = normalize_database_url(os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    engine = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except OperationalError as err:
        reason = f"PostgreSQL at {url.render_as_string()} is unreachable: {err.orig}"
        if _in_ci():
            pytest.fail(f"{reason} (CI=true: integration tests must not skip)", pytrace=False)
        pytest.skip(reason)
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="module")
def scratch_url(admin_url: URL) -> Iterator[URL]:
    """A new, empty database for one test module, dropped afterwards."""
    name = f"todo_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def module_engine(scratch_url: URL) -> Iterator[Engine]:
    """The package's engine on the module's scratch database, schema created."""
    engine = create_db_engine(scratch_url.render_as_string(hide_password=False))
    init_db(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(module_engine: Engine) -> Engine:
    """The module's engine with an empty tasks table for each test."""
    with module_engine.begin() as conn:
        conn.execute(text("TRUNCATE tasks RESTART IDENTITY"))
    return module_engine


@pytest.fixture(scope="module")
def admin_engine(admin_url: URL) -> Iterator[Engine]:
    """An autocommit engine on the admin database, for server-side inspection."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()
