"""PostgreSQL fixtures: scratch databases on the server under test, and on our own.

The server under test is TEST_DATABASE_URL: this machine's server, GitHub's service
container, a Neon branch through its pooled or its direct endpoint, or the Neon
stand-in (tests/neon_standin.py). Nothing here may assume more of it than Neon grants
its owner role: a password, TLS, CREATEDB, terminating its own backends; no
superuser, no control of the server, perhaps a PgBouncer in between. Each test module
gets its own database there (``scratch_url``), created on entry and dropped on exit.

What needs more (a PgBouncer of our own in front, reading the wire, the server's
statement log) runs on ``own_cluster``, a throwaway cluster on loopback, through the
same kind of scratch database (``own_scratch_url``), whatever TEST_DATABASE_URL is.

Tests that need a server are marked ``postgres``; the console-script tests on SQLite
files (test_cli_script.py) live here because they are slow, not because they need
it. Without a reachable server the tests skip locally, but with ``CI=true`` they
fail: a skipped integration run must never look green.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from tests.fix_servers import (
    PgCluster,
    own_cluster,
    pg_cluster,
    pg_template,
    pgbouncer,
    server_account,
)
from tests.integration.databases import emptied, engine_with_schema, fresh_database
from tests.skips import POSTGRES_SERVER, skip_missing
from todo_backend.config import normalize_database_url

# Throwaway PostgreSQL clusters and PgBouncers (tests/fix_servers.py). Imported, not
# listed in ``pytest_plugins``: pytest refuses that variable outside the rootdir's
# conftest, which breaks a plain ``pytest`` run from the repository root.
__all__ = ["own_cluster", "pg_cluster", "pg_template", "pgbouncer", "server_account"]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# A test that uses any of these needs a PostgreSQL server or its binaries.
_SERVER_FIXTURES = frozenset({"admin_url", "own_cluster", "pg_cluster", "pg_template", "pgbouncer"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of this folder that need PostgreSQL (directly or via a fixture)."""
    for item in items:
        needs = _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if "integration" in item.path.parts and needs:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def admin_url() -> URL:
    """The server to test against, checked once; unreachable means skip, or fail in CI."""
    url = normalize_database_url(os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    engine = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except OperationalError as err:
        skip_missing(
            POSTGRES_SERVER, f"PostgreSQL at {url.render_as_string()} is unreachable: {err.orig}"
        )
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def relayed(admin_url: URL) -> bool:
    """Whether connections to the server under test pass through a relay.

    PgBouncer (Neon's pooled endpoint) or a proxy (Neon's direct endpoint) holds the
    client's connection and opens its own to the server, on the server's own port:
    a port other than the URL's gives the relay away.
    """
    engine = create_engine(admin_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            server_port = int(conn.execute(text("show port")).scalar_one())
    finally:
        engine.dispose()
    return server_port != (admin_url.port or 5432)


@pytest.fixture(scope="module")
def scratch_url(admin_url: URL) -> Iterator[URL]:
    """A new, empty database on the server under test for one test module."""
    with fresh_database(admin_url) as url:
        yield url


@pytest.fixture(scope="module")
def module_engine(scratch_url: URL) -> Iterator[Engine]:
    """The package's engine on the module's scratch database, schema created."""
    with engine_with_schema(scratch_url) as engine:
        yield engine


@pytest.fixture
def engine(module_engine: Engine) -> Engine:
    """The module's engine with an empty tasks table for each test."""
    return emptied(module_engine)


@pytest.fixture(scope="module")
def own_scratch_url(own_cluster: PgCluster) -> Iterator[URL]:
    """A new, empty database for one test module on our own throwaway cluster."""
    with fresh_database(own_cluster.url()) as url:
        yield url


@pytest.fixture(scope="module")
def own_module_engine(own_scratch_url: URL) -> Iterator[Engine]:
    """The package's engine on the module's database on our own cluster, schema created."""
    with engine_with_schema(own_scratch_url) as engine:
        yield engine


@pytest.fixture
def own_engine(own_module_engine: Engine) -> Engine:
    """``own_module_engine`` with an empty tasks table for each test."""
    return emptied(own_module_engine)


@pytest.fixture(scope="module")
def admin_engine(admin_url: URL) -> Iterator[Engine]:
    """An autocommit engine on the admin database, for server-side inspection."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()
