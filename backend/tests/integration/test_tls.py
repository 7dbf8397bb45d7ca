"""TLS: with its defaults the engine encrypts every connection to a non-local host.

Neon refuses plain text, and libpq's own default (``sslmode=prefer``) would silently
fall back to it elsewhere, so ``create_db_engine`` adds ``sslmode=require`` for any
host that is not this machine. The tests reach a throwaway cluster through
``127.0.0.2``: loopback on Linux (all of 127/8 is), but not a name the engine treats
as local, so the engine behaves exactly as it would towards Neon.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, event, text

from tests.fix_servers import LOOPBACK, ClusterFactory, PgCluster
from todo_backend.db import (
    check_database,
    create_db_engine,
    get_session,
    init_db,
    is_local_host,
    wait_for_database,
)
from todo_backend.errors import DatabaseUnavailableError
from todo_backend.models import TaskCreate, TaskUpdate
from todo_backend.repository import TaskRepository

REMOTE = "127.0.0.2"


def _cluster(make: ClusterFactory, *, ssl: bool) -> PgCluster:
    # Plain and TLS both allowed: what is asserted is the engine's own choice.
    return make(listen=(LOOPBACK, REMOTE), ssl=ssl, hba=("host all all 127.0.0.0/8 trust",))


def _remote_engine(cluster: PgCluster, query: str = "") -> Engine:
    url = cluster.url(host=REMOTE).render_as_string(hide_password=False) + query
    engine = create_db_engine(url)
    assert not is_local_host(engine.url)
    return engine


def test_non_local_host_is_encrypted_by_default(pg_cluster: ClusterFactory) -> None:
    """The engine's connections to a non-local host use TLS and check_database says so."""
    cluster = _cluster(pg_cluster, ssl=True)
    engine = _remote_engine(cluster)
    admin = cluster.admin_engine()
    try:
        health = check_database(engine)
        assert health.ok, health.detail
        assert health.ssl is True
        init_db(engine)
        repo = TaskRepository(next(get_session(engine)))
        task = repo.create("alice", TaskCreate(title="over TLS"))
        assert repo.update("alice", task.id or 0, TaskUpdate(complete=True)) is not None
        with engine.connect() as held, admin.connect() as conn:
            reached = held.exec_driver_sql("select inet_server_addr()::text").scalar_one()
            seen = conn.execute(
                text(
                    "select s.ssl, s.version from pg_stat_activity a join pg_stat_ssl s "
                    "using (pid) where a.application_name = 'todo-backend'"
                )
            ).all()
            own = conn.execute(
                text("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            ).scalar_one()
        assert reached == f"{REMOTE}/32"
        assert seen  # the engine's backends are visible...
        assert {row.ssl for row in seen} == {True}
        assert all(row.version.startswith("TLS") for row in seen)
        assert own is False  # ...and pg_stat_ssl does tell plain connections apart
    finally:
        engine.dispose()


def test_pooled_tls_connections_are_reused(pg_cluster: ClusterFactory) -> None:
    """The zero-round-trip liveness check does not mistake TLS traffic for a dead server."""
    cluster = _cluster(pg_cluster, ssl=True)
    engine = _remote_engine(cluster)
    connects: list[object] = []
    event.listen(engine, "connect", lambda *_: connects.append(None))
    try:
        init_db(engine)
        repo = TaskRepository(next(get_session(engine)))
        for i in range(20):
            repo.create("alice", TaskCreate(title=f"t{i}"))
            repo.count("alice")
        assert repo.count("alice") == 20
        assert len(connects) == 1
    finally:
        engine.dispose()


def test_non_local_host_without_tls_is_refused(pg_cluster: ClusterFactory) -> None:
    """Against a server without TLS the default non-local URL fails; it never falls back."""
    cluster = _cluster(pg_cluster, ssl=False)
    engine = _remote_engine(cluster)
    plain = _remote_engine(cluster, "?sslmode=disable")
    try:
        health = check_database(engine)  # reports, does not raise
        assert health.ok is False
        assert health.ssl is None
        assert "SSL" in health.detail
        assert f"{REMOTE}:{cluster.port}" in health.detail
        with pytest.raises(DatabaseUnavailableError, match="after 2 attempts"):
            wait_for_database(engine, attempts=2, base_delay=0)
        with pytest.raises(DatabaseUnavailableError, match="SSL"):
            TaskRepository(next(get_session(engine))).count("alice")
        # The server itself is reachable: only the missing TLS made the difference,
        # and an sslmode chosen in the URL is respected.
        assert check_database(plain).ok
        assert check_database(plain).ssl is False
    finally:
        engine.dispose()
        plain.dispose()
